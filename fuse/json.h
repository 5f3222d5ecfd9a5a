/*
 * A small JSON reader and writer for the control interface: requests and
 * replies are one JSON object per line.  Enough of JSON for that (and
 * strict about it), nothing more.
 */
#ifndef IFS_JSON_H
#define IFS_JSON_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

typedef enum JsonType {
    JSON_NULL,
    JSON_BOOL,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT,
} JsonType;

typedef struct JsonValue JsonValue;
struct JsonValue {
    JsonType type;
    bool boolean;
    double number;
    char *string;
    GPtrArray *items; /* array: JsonValue *; object: values */
    GPtrArray *keys;  /* object: char *, parallel to items */
};

/* Parse one JSON value filling all of @text; NULL and *errp if bad. */
JsonValue *json_parse(const char *text, GError **errp);
void json_free(JsonValue *v);

/* Object member by key, or NULL; typed helpers give @def if absent. */
JsonValue *json_get(const JsonValue *obj, const char *key);
const char *json_get_str(const JsonValue *obj, const char *key,
                         const char *def);
double json_get_num(const JsonValue *obj, const char *key, double def);
bool json_get_bool(const JsonValue *obj, const char *key, bool def);

/* Append @v as JSON text (numbers in the shortest exact form). */
void json_write(const JsonValue *v, GString *out);

/* Append @s as a JSON string literal. */
void json_append_string(GString *out, const char *s);

#endif /* IFS_JSON_H */
