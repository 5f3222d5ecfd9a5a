/*
 * config.ini: one group per drive (the group name is the file name under
 * the mount point) and the group [imgfs] for daemon settings.
 *
 * GKeyFile reads the values; a scan of the raw text before it supplies
 * what GKeyFile cannot: line numbers for messages, and duplicate groups
 * and keys, which GKeyFile would silently merge.  Every problem is fatal
 * and reported as one line naming the file, line, drive and key: imgfs
 * never mounts half a config.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ifs.h"

#define IFS_GLOBAL_GROUP "imgfs"
#define IFS_MAX_IOTHREADS 64
#define IFS_DEFAULT_POLL_MAX_NS 32000

typedef struct ConfigLines {
    GHashTable *group_line; /* group -> line of its header */
    GHashTable *key_line;   /* "group\nkey" -> line */
} ConfigLines;

static void config_error(GError **errp, const char *path, int line,
                         const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void config_error(GError **errp, const char *path, int line,
                         const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list ap;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (line > 0) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_PARSE, "%s:%d: %s",
                    path, line, msg);
    } else {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_PARSE, "%s: %s",
                    path, msg);
    }
}

/* First pass over the text: syntax, line numbers, duplicates. */
static bool config_scan(const char *path, const char *text, ConfigLines *cl,
                        GError **errp)
{
    g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
    g_autofree char *group = NULL;
    int i;

    for (i = 0; lines[i]; i++) {
        char *l = g_strstrip(lines[i]);
        char *eq;

        if (!*l || *l == '#' || *l == ';') {
            continue;
        }
        if (*l == '[') {
            char *end = strrchr(l, ']');

            if (!end || end[1]) {
                config_error(errp, path, i + 1, "malformed group header '%s'",
                             l);
                return false;
            }
            g_free(group);
            group = g_strndup(l + 1, end - l - 1);
            if (g_hash_table_contains(cl->group_line, group)) {
                int first =
                    GPOINTER_TO_INT(g_hash_table_lookup(cl->group_line, group));

                if (!strcmp(group, IFS_GLOBAL_GROUP)) {
                    config_error(errp, path, i + 1,
                                 "duplicate group [%s] (first at line %d)",
                                 group, first);
                } else {
                    config_error(errp, path, i + 1,
                                 "duplicate drive '%s' (first at line %d)",
                                 group, first);
                }
                return false;
            }
            g_hash_table_insert(cl->group_line, g_strdup(group),
                                GINT_TO_POINTER(i + 1));
            continue;
        }
        eq = strchr(l, '=');
        if (!eq) {
            config_error(errp, path, i + 1,
                         "expected 'key = value', a [group] or a comment, "
                         "found '%s'",
                         l);
            return false;
        }
        if (!group) {
            config_error(errp, path, i + 1,
                         "key outside of any group: start with [imgfs] or "
                         "[drive-name]");
            return false;
        }
        *eq = '\0';
        g_strstrip(l);
        /*
         * GKeyFile reads "key[locale]" as a translation of "key" and, by
         * the process's locale, keeps it or drops it without a word: no
         * imgfs key has a '[', so such a line is an unknown key.
         */
        if (strchr(l, '[')) {
            if (!strcmp(group, IFS_GLOBAL_GROUP)) {
                config_error(errp, path, i + 1, "[%s]: unknown key '%s'", group,
                             l);
            } else {
                config_error(errp, path, i + 1, "drive '%s': unknown key '%s'",
                             group, l);
            }
            return false;
        }
        {
            g_autofree char *k = g_strdup_printf("%s\n%s", group, l);

            if (g_hash_table_contains(cl->key_line, k)) {
                if (!strcmp(group, IFS_GLOBAL_GROUP)) {
                    config_error(errp, path, i + 1, "[%s]: duplicate key '%s'",
                                 group, l);
                } else {
                    config_error(errp, path, i + 1,
                                 "drive '%s': duplicate key '%s'", group, l);
                }
                return false;
            }
            g_hash_table_insert(cl->key_line, g_steal_pointer(&k),
                                GINT_TO_POINTER(i + 1));
        }
    }
    return true;
}

/*
 * ';' starts a comment line in most INI dialects and for config_scan(),
 * but GKeyFile knows only '#' and fails on such a line (with no line
 * number) or reads "; key = value" as a key.  Turn those lines into '#'
 * comments in place, so GKeyFile reads them as comments and the line
 * numbers stay as written.
 */
static void config_semicolon_comments(char *text)
{
    char *p = text;

    while (*p) {
        while (*p != '\n' && g_ascii_isspace(*p)) {
            p++;
        }
        if (*p == ';') {
            *p = '#';
        }
        p = strchr(p, '\n');
        if (!p) {
            break;
        }
        p++;
    }
}

static int config_key_line(ConfigLines *cl, const char *group, const char *key)
{
    g_autofree char *k = g_strdup_printf("%s\n%s", group, key);

    return GPOINTER_TO_INT(g_hash_table_lookup(cl->key_line, k));
}

static bool config_check_drive_name(const char *path, int line,
                                    const char *name, GError **errp)
{
    const char *why = NULL;

    if (!*name) {
        why = "it is empty";
    } else if (strchr(name, '/')) {
        why = "it must not contain '/'";
    } else if (name[0] == '.') {
        why = "it must not start with '.'";
    } else if (strlen(name) > 255) {
        why = "it is longer than 255 bytes";
    }
    if (why) {
        config_error(errp, path, line, "invalid drive name '%s': %s", name,
                     why);
        return false;
    }
    return true;
}

/* Drive keys that make no sense as a default for every drive. */
static bool config_key_is_per_drive(const char *key)
{
    return !strcmp(key, "file") || !strcmp(key, "format") ||
           !strcmp(key, "snapshot") || !strcmp(key, "iothread") ||
           (strchr(key, '.') && !g_str_has_prefix(key, "cache.") &&
            !g_str_has_prefix(key, "throttling."));
}

/*
 * [imgfs]: daemon settings, and defaults for every drive written with the
 * drive keys' own names (cache = none, werror = stop, ...).
 */
static bool config_load_global(IfsConfig *cfg, GKeyFile *kf, ConfigLines *cl,
                               GPtrArray *defaults, GError **errp)
{
    g_auto(GStrv) keys = NULL;
    int i;

    if (!g_key_file_has_group(kf, IFS_GLOBAL_GROUP)) {
        return true;
    }
    keys = g_key_file_get_keys(kf, IFS_GLOBAL_GROUP, NULL, NULL);
    for (i = 0; keys && keys[i]; i++) {
        g_autofree char *v =
            g_key_file_get_value(kf, IFS_GLOBAL_GROUP, keys[i], NULL);
        int line = config_key_line(cl, IFS_GLOBAL_GROUP, keys[i]);

        g_strstrip(v);
        if (!strcmp(keys[i], "iothreads")) {
            uint64_t n;

            if (opt_parse_number(v, &n) < 0 || n < 1 || n > IFS_MAX_IOTHREADS) {
                config_error(errp, cfg->path, line,
                             "[imgfs]: key 'iothreads': invalid value '%s' "
                             "(use 1 to %d)",
                             v, IFS_MAX_IOTHREADS);
                return false;
            }
            cfg->iothreads = n;
        } else if (!strcmp(keys[i], "poll-max-ns")) {
            uint64_t n;

            if (opt_parse_number(v, &n) < 0 || n > 1000000) {
                config_error(errp, cfg->path, line,
                             "[imgfs]: key 'poll-max-ns': invalid value '%s' "
                             "(use 0 to 1000000 nanoseconds)",
                             v);
                return false;
            }
            cfg->poll_max_ns = n;
        } else if (!strcmp(keys[i], "fuse-uring")) {
            bool on;

            if (!strcmp(v, "auto")) {
                cfg->fuse_uring = IFS_URING_AUTO;
            } else if (opt_parse_bool(v, &on) == 0) {
                cfg->fuse_uring = on ? IFS_URING_ON : IFS_URING_OFF;
            } else {
                config_error(errp, cfg->path, line,
                             "[imgfs]: key 'fuse-uring': invalid value '%s' "
                             "(use auto, on or off)",
                             v);
                return false;
            }
        } else if (!strcmp(keys[i], "control")) {
            if (!*v) {
                config_error(errp, cfg->path, line,
                             "[imgfs]: key 'control': invalid empty value");
                return false;
            }
            g_free(cfg->control);
            cfg->control = blk_resolve_filename(v, cfg->dir);
        } else if (opt_find(blk_option_table(), keys[i]) &&
                   !config_key_is_per_drive(keys[i])) {
            BlockBackendOptions scratch;
            GError *err = NULL;
            int ret;

            blk_options_init(&scratch);
            ret = blk_options_set(&scratch, keys[i], v, &err);
            blk_options_clear(&scratch);
            if (ret < 0) {
                config_error(errp, cfg->path, line, "[imgfs]: %s",
                             err->message);
                g_error_free(err);
                return false;
            }
            g_ptr_array_add(defaults, g_strdup(keys[i]));
            g_ptr_array_add(defaults, g_steal_pointer(&v));
        } else {
            config_error(errp, cfg->path, line, "[imgfs]: unknown key '%s'",
                         keys[i]);
            return false;
        }
    }
    return true;
}

static void drive_config_free(gpointer p)
{
    IfsDriveConfig *dc = p;

    g_free(dc->name);
    blk_options_clear(&dc->opts);
    g_free(dc);
}

static IfsDriveConfig *config_load_drive(IfsConfig *cfg, GKeyFile *kf,
                                         ConfigLines *cl, const char *group,
                                         GPtrArray *defaults, GError **errp)
{
    IfsDriveConfig *dc = g_new0(IfsDriveConfig, 1);
    g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);
    GError *local_err = NULL;
    unsigned d;
    int i;

    dc->name = g_strdup(group);
    dc->line = GPOINTER_TO_INT(g_hash_table_lookup(cl->group_line, group));
    dc->iothread = -1;
    blk_options_init(&dc->opts);
    if (!config_check_drive_name(cfg->path, dc->line, group, errp)) {
        goto fail;
    }
    for (d = 0; d < defaults->len; d += 2) {
        /* already checked in [imgfs] */
        blk_options_set(&dc->opts, g_ptr_array_index(defaults, d),
                        g_ptr_array_index(defaults, d + 1), NULL);
    }
    for (i = 0; keys && keys[i]; i++) {
        g_autofree char *v = g_key_file_get_value(kf, group, keys[i], NULL);
        int line = config_key_line(cl, group, keys[i]);
        int ret;

        g_strstrip(v);
        if (!strcmp(keys[i], "iothread")) {
            uint64_t n;

            if (opt_parse_number(v, &n) < 0 || n >= cfg->iothreads) {
                config_error(errp, cfg->path, line,
                             "drive '%s': key 'iothread': invalid value '%s' "
                             "(use 0 to %u: [imgfs] iothreads = %u)",
                             group, v, cfg->iothreads - 1, cfg->iothreads);
                goto fail;
            }
            dc->iothread = n;
            continue;
        }
        ret = blk_options_set(&dc->opts, keys[i], v, &local_err);
        if (ret == -ENOENT) {
            config_error(errp, cfg->path, line, "drive '%s': unknown key '%s'",
                         group, keys[i]);
            goto fail;
        }
        if (ret < 0) {
            config_error(errp, cfg->path, line, "drive '%s': %s", group,
                         local_err->message);
            g_clear_error(&local_err);
            goto fail;
        }
    }
    if (dc->opts.format && !strcmp(dc->opts.format, "help")) {
        cfg->format_help = true;
        return dc;
    }
    if (!blk_options_check(&dc->opts, &local_err)) {
        config_error(errp, cfg->path, dc->line, "drive '%s': %s", group,
                     local_err->message);
        g_clear_error(&local_err);
        goto fail;
    }
    if (dc->opts.file) {
        char *abs = blk_resolve_filename(dc->opts.file, cfg->dir);

        g_free(dc->opts.file);
        dc->opts.file = abs;
    }
    return dc;

fail:
    drive_config_free(dc);
    return NULL;
}

/* Drives of one throttling group must not name different limits. */
static bool config_check_groups(IfsConfig *cfg, GError **errp)
{
    unsigned i, j;

    for (i = 0; i < cfg->drives->len; i++) {
        IfsDriveConfig *a = g_ptr_array_index(cfg->drives, i);

        if (!a->opts.throttle_group ||
            !throttle_config_enabled(&a->opts.throttle)) {
            continue;
        }
        for (j = i + 1; j < cfg->drives->len; j++) {
            IfsDriveConfig *b = g_ptr_array_index(cfg->drives, j);

            if (b->opts.throttle_group &&
                !strcmp(a->opts.throttle_group, b->opts.throttle_group) &&
                throttle_config_enabled(&b->opts.throttle) &&
                !throttle_config_equal(&a->opts.throttle, &b->opts.throttle)) {
                config_error(errp, cfg->path, b->line,
                             "drive '%s': key 'throttling.group': group '%s' "
                             "already has other limits (drive '%s'); give "
                             "the limits once or the same everywhere",
                             b->name, b->opts.throttle_group, a->name);
                return false;
            }
        }
    }
    return true;
}

IfsConfig *ifs_config_load(const char *path, GError **errp)
{
    IfsConfig *cfg = g_new0(IfsConfig, 1);
    g_autoptr(GKeyFile) kf = g_key_file_new();
    g_autofree char *text = NULL;
    g_autofree char *abs = NULL;
    g_auto(GStrv) groups = NULL;
    g_autoptr(GPtrArray) defaults = g_ptr_array_new_with_free_func(g_free);
    ConfigLines cl;
    GError *local_err = NULL;
    gsize len;
    int i;

    cl.group_line =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    cl.key_line = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    cfg->path = g_strdup(path);
    cfg->drives = g_ptr_array_new_with_free_func(drive_config_free);
    cfg->iothreads = 0;
    cfg->poll_max_ns = IFS_DEFAULT_POLL_MAX_NS;

    if (access(path, R_OK) < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot read config '%s': %s", path, g_strerror(err));
        goto fail;
    }
    if (!g_file_get_contents(path, &text, &len, &local_err)) {
        g_set_error(errp, G_FILE_ERROR, local_err->code,
                    "cannot read config '%s': %s", path, local_err->message);
        g_error_free(local_err);
        goto fail;
    }
    if (strlen(text) != len || !g_utf8_validate(text, len, NULL)) {
        config_error(errp, path, 0,
                     "not a text file (NUL bytes or invalid "
                     "UTF-8)");
        goto fail;
    }
    abs = g_canonicalize_filename(path, NULL);
    cfg->dir = g_path_get_dirname(abs);
    cfg->abs_path = g_strdup(abs);

    config_semicolon_comments(text);
    if (!config_scan(path, text, &cl, errp)) {
        goto fail;
    }
    if (!g_key_file_load_from_data(kf, text, len, G_KEY_FILE_NONE,
                                   &local_err)) {
        config_error(errp, path, 0, "%s", local_err->message);
        g_error_free(local_err);
        goto fail;
    }
    if (!config_load_global(cfg, kf, &cl, defaults, errp)) {
        goto fail;
    }
    if (!cfg->iothreads) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

        cfg->iothreads = ncpu < 1 ? 1 : (ncpu > 4 ? 4 : ncpu);
    }
    groups = g_key_file_get_groups(kf, NULL);
    for (i = 0; groups[i]; i++) {
        IfsDriveConfig *dc;

        if (!strcmp(groups[i], IFS_GLOBAL_GROUP)) {
            continue;
        }
        dc = config_load_drive(cfg, kf, &cl, groups[i], defaults, errp);
        if (!dc) {
            goto fail;
        }
        g_ptr_array_add(cfg->drives, dc);
    }
    if (cfg->drives->len == 0) {
        config_error(errp, path, 0,
                     "no drives configured (add a [name] group with "
                     "file = IMAGE)");
        goto fail;
    }
    if (!cfg->format_help && !config_check_groups(cfg, errp)) {
        goto fail;
    }
    g_hash_table_unref(cl.group_line);
    g_hash_table_unref(cl.key_line);
    return cfg;

fail:
    g_hash_table_unref(cl.group_line);
    g_hash_table_unref(cl.key_line);
    ifs_config_free(cfg);
    return NULL;
}

void ifs_config_free(IfsConfig *cfg)
{
    if (!cfg) {
        return;
    }
    g_free(cfg->path);
    g_free(cfg->abs_path);
    g_free(cfg->dir);
    g_free(cfg->control);
    g_ptr_array_unref(cfg->drives);
    g_free(cfg);
}
