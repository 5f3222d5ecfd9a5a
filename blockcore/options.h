/*
 * Typed configuration values.  Every key a drive accepts -- the generic
 * ones of the BlockBackend and the namespaced ones of each driver
 * ("raw.offset", "qcow2.l2-cache-size") -- is described by an OptDesc, so
 * a config file is checked completely before anything is opened, and a
 * driver reads values that are already known to parse.
 *
 * Errors name the key and the bad value; the caller adds the drive and
 * the file it came from.
 */
#ifndef BLOCKCORE_OPTIONS_H
#define BLOCKCORE_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

typedef enum OptType {
    OPT_STRING,
    OPT_BOOL,   /* on/off, true/false, yes/no */
    OPT_SIZE,   /* bytes with an optional K/M/G/T/P/E suffix (powers of 1024) */
    OPT_NUMBER, /* unsigned decimal integer */
    OPT_ENUM,   /* one of enum_values */
    OPT_DOUBLE, /* non-negative decimal number */
} OptType;

typedef struct OptDesc {
    const char *name;
    OptType type;
    const char *const *enum_values; /* OPT_ENUM: NULL-terminated */
    const char *help;
} OptDesc;

/*
 * Find @name in a table ended by an entry with name == NULL.  An entry
 * named "prefix.*" stands for an open family of keys: it matches every
 * "prefix.<something>" (something not empty), e.g. "option.*" for the
 * settings a driver passes through to its library untouched.
 */
const OptDesc *opt_find(const OptDesc *table, const char *name);

/* Check @value against @desc; the error reads "key 'K': invalid ...". */
bool opt_validate(const OptDesc *desc, const char *value, GError **errp);

/* Parsers: return 0 or -EINVAL. */
int opt_parse_bool(const char *s, bool *out);
int opt_parse_size(const char *s, uint64_t *out);
int opt_parse_number(const char *s, uint64_t *out);
int opt_parse_double(const char *s, double *out);
/* Index of @s in @values, or -EINVAL. */
int opt_parse_enum(const char *s, const char *const *values);

/*
 * Accessors for an option table (key -> value strings, already
 * validated).  Missing keys give @def.
 */
const char *opt_get_str(GHashTable *opts, const char *key, const char *def);
bool opt_get_bool(GHashTable *opts, const char *key, bool def);
uint64_t opt_get_size(GHashTable *opts, const char *key, uint64_t def);
uint64_t opt_get_number(GHashTable *opts, const char *key, uint64_t def);
double opt_get_double(GHashTable *opts, const char *key, double def);
int opt_get_enum(GHashTable *opts, const char *key, const char *const *values,
                 int def);

/* A string -> string table owning its keys and values. */
GHashTable *opt_table_new(void);

#endif /* BLOCKCORE_OPTIONS_H */
