/*
 * Parsing of option values.  Strict on purpose: "10x", "-1", "1.5.2",
 * or an empty value are errors, not zero.
 */
#include "options.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const OptDesc *opt_find(const OptDesc *table, const char *name)
{
    if (!table) {
        return NULL;
    }
    for (; table->name; table++) {
        size_t n = strlen(table->name);

        if (!strcmp(table->name, name)) {
            return table;
        }
        /* "prefix.*": an open family of keys, e.g. "option.<name>". */
        if (n >= 2 && !strcmp(table->name + n - 2, ".*") &&
            !strncmp(table->name, name, n - 1) && name[n - 1]) {
            return table;
        }
    }
    return NULL;
}

int opt_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"on", "true", "yes", NULL};
    static const char *const no[] = {"off", "false", "no", NULL};
    int i;

    for (i = 0; yes[i]; i++) {
        if (!strcasecmp(s, yes[i])) {
            *out = true;
            return 0;
        }
        if (!strcasecmp(s, no[i])) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

int opt_parse_number(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;

    if (!*s || !g_ascii_isdigit(*s)) {
        return -EINVAL;
    }
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || *end) {
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int opt_parse_size(const char *s, uint64_t *out)
{
    static const char suffixes[] = "KMGTPE";
    const char *p = s, *suffix;
    double v;
    int shift = 0;

    /* digits, optionally ".digits", then an optional K/M/G/T/P/E with an
     * optional "B" or "iB": all powers of 1024 */
    if (!g_ascii_isdigit(*p)) {
        return -EINVAL;
    }
    while (g_ascii_isdigit(*p)) {
        p++;
    }
    if (*p == '.') {
        p++;
        if (!g_ascii_isdigit(*p)) {
            return -EINVAL;
        }
        while (g_ascii_isdigit(*p)) {
            p++;
        }
    }
    suffix = p;
    if (*p) {
        const char *k = strchr(suffixes, g_ascii_toupper(*p));

        if (k && *p) {
            shift = 10 * (int)(k - suffixes + 1);
            p++;
            if (g_ascii_tolower(p[0]) == 'i' && g_ascii_toupper(p[1]) == 'B') {
                p += 2;
            } else if (g_ascii_toupper(p[0]) == 'B') {
                p++;
            }
        } else if (g_ascii_toupper(*p) == 'B') {
            p++;
        }
        if (*p) {
            return -EINVAL;
        }
    }
    {
        g_autofree char *num = g_strndup(s, suffix - s);

        v = g_ascii_strtod(num, NULL);
    }
    v = ldexp(v, shift);
    if (v >= 18446744073709551616.0 || v != floor(v)) {
        return -EINVAL;
    }
    *out = (uint64_t)v;
    return 0;
}

int opt_parse_double(const char *s, double *out)
{
    char *end;
    double v;

    if (!*s || !(g_ascii_isdigit(*s) || *s == '.')) {
        return -EINVAL;
    }
    v = g_ascii_strtod(s, &end);
    if (*end || !isfinite(v) || v < 0) {
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int opt_parse_enum(const char *s, const char *const *values)
{
    int i;

    for (i = 0; values[i]; i++) {
        if (!strcmp(s, values[i])) {
            return i;
        }
    }
    return -EINVAL;
}

bool opt_validate(const OptDesc *desc, const char *value, GError **errp)
{
    uint64_t u;
    double d;
    bool b;

    switch (desc->type) {
    case OPT_STRING:
        if (!*value) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s': invalid empty value", desc->name);
            return false;
        }
        return true;
    case OPT_BOOL:
        if (opt_parse_bool(value, &b) < 0) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s': invalid boolean '%s' (use on/off, "
                        "true/false, yes/no)",
                        desc->name, value);
            return false;
        }
        return true;
    case OPT_SIZE:
        if (opt_parse_size(value, &u) < 0) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s': invalid size '%s' (use bytes with an "
                        "optional K, M, G or T suffix)",
                        desc->name, value);
            return false;
        }
        return true;
    case OPT_NUMBER:
        if (opt_parse_number(value, &u) < 0) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s': invalid number '%s'", desc->name, value);
            return false;
        }
        return true;
    case OPT_DOUBLE:
        if (opt_parse_double(value, &d) < 0) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s': invalid number '%s'", desc->name, value);
            return false;
        }
        return true;
    case OPT_ENUM:
        if (opt_parse_enum(value, desc->enum_values) < 0) {
            g_autofree char *list =
                g_strjoinv(", ", (char **)desc->enum_values);

            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s': invalid value '%s' (use one of: %s)",
                        desc->name, value, list);
            return false;
        }
        return true;
    }
    return false;
}

const char *opt_get_str(GHashTable *opts, const char *key, const char *def)
{
    const char *v = opts ? g_hash_table_lookup(opts, key) : NULL;

    return v ? v : def;
}

bool opt_get_bool(GHashTable *opts, const char *key, bool def)
{
    const char *v = opt_get_str(opts, key, NULL);
    bool b;

    return v && opt_parse_bool(v, &b) == 0 ? b : def;
}

uint64_t opt_get_size(GHashTable *opts, const char *key, uint64_t def)
{
    const char *v = opt_get_str(opts, key, NULL);
    uint64_t u;

    return v && opt_parse_size(v, &u) == 0 ? u : def;
}

uint64_t opt_get_number(GHashTable *opts, const char *key, uint64_t def)
{
    const char *v = opt_get_str(opts, key, NULL);
    uint64_t u;

    return v && opt_parse_number(v, &u) == 0 ? u : def;
}

double opt_get_double(GHashTable *opts, const char *key, double def)
{
    const char *v = opt_get_str(opts, key, NULL);
    double d;

    return v && opt_parse_double(v, &d) == 0 ? d : def;
}

int opt_get_enum(GHashTable *opts, const char *key, const char *const *values,
                 int def)
{
    const char *v = opt_get_str(opts, key, NULL);
    int i;

    if (!v) {
        return def;
    }
    i = opt_parse_enum(v, values);
    return i < 0 ? def : i;
}

GHashTable *opt_table_new(void)
{
    return g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
}
