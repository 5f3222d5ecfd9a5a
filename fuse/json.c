/*
 * Recursive-descent JSON parser.  Nesting is limited so a hostile client
 * of the control socket cannot exhaust the stack.
 */
#include "json.h"

#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 64

typedef struct JsonParser {
    const char *p;
    GError **errp;
    bool failed;
} JsonParser;

static void json_fail(JsonParser *jp, const char *what)
{
    if (!jp->failed) {
        g_set_error(jp->errp, G_MARKUP_ERROR, G_MARKUP_ERROR_PARSE,
                    "invalid JSON: %s near '%.20s'", what, jp->p);
        jp->failed = true;
    }
}

static void json_skip_ws(JsonParser *jp)
{
    while (*jp->p == ' ' || *jp->p == '\t' || *jp->p == '\n' ||
           *jp->p == '\r') {
        jp->p++;
    }
}

static JsonValue *json_new(JsonType type)
{
    JsonValue *v = g_new0(JsonValue, 1);

    v->type = type;
    return v;
}

void json_free(JsonValue *v)
{
    if (!v) {
        return;
    }
    g_free(v->string);
    if (v->items) {
        g_ptr_array_unref(v->items);
    }
    if (v->keys) {
        g_ptr_array_unref(v->keys);
    }
    g_free(v);
}

static int json_hex(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c = g_ascii_tolower(c);
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

static char *json_parse_string(JsonParser *jp)
{
    GString *s = g_string_new(NULL);

    jp->p++; /* opening quote */
    while (*jp->p != '"') {
        unsigned char c = *jp->p;

        if (!c || c < 0x20) {
            json_fail(jp, "unterminated string");
            return g_string_free(s, TRUE), NULL;
        }
        if (c != '\\') {
            g_string_append_c(s, c);
            jp->p++;
            continue;
        }
        jp->p++;
        switch (*jp->p) {
        case '"':
        case '\\':
        case '/':
            g_string_append_c(s, *jp->p);
            break;
        case 'b':
            g_string_append_c(s, '\b');
            break;
        case 'f':
            g_string_append_c(s, '\f');
            break;
        case 'n':
            g_string_append_c(s, '\n');
            break;
        case 'r':
            g_string_append_c(s, '\r');
            break;
        case 't':
            g_string_append_c(s, '\t');
            break;
        case 'u': {
            gunichar u = 0;
            int i;

            for (i = 1; i <= 4; i++) {
                int h = json_hex(jp->p[i]);

                if (h < 0) {
                    json_fail(jp, "bad \\u escape");
                    return g_string_free(s, TRUE), NULL;
                }
                u = u * 16 + h;
            }
            jp->p += 4;
            if (u == 0 || (u >= 0xd800 && u <= 0xdfff)) {
                json_fail(jp, "unsupported \\u escape");
                return g_string_free(s, TRUE), NULL;
            }
            g_string_append_unichar(s, u);
            break;
        }
        default:
            json_fail(jp, "bad escape");
            return g_string_free(s, TRUE), NULL;
        }
        jp->p++;
    }
    jp->p++;
    return g_string_free(s, FALSE);
}

static JsonValue *json_parse_value(JsonParser *jp, int depth);

static JsonValue *json_parse_container(JsonParser *jp, int depth, bool object)
{
    JsonValue *v = json_new(object ? JSON_OBJECT : JSON_ARRAY);
    char close = object ? '}' : ']';

    v->items = g_ptr_array_new_with_free_func((GDestroyNotify)json_free);
    if (object) {
        v->keys = g_ptr_array_new_with_free_func(g_free);
    }
    jp->p++;
    json_skip_ws(jp);
    if (*jp->p == close) {
        jp->p++;
        return v;
    }
    for (;;) {
        JsonValue *item;

        json_skip_ws(jp);
        if (object) {
            char *key;

            if (*jp->p != '"') {
                json_fail(jp, "expected a key");
                break;
            }
            key = json_parse_string(jp);
            if (!key) {
                break;
            }
            g_ptr_array_add(v->keys, key);
            json_skip_ws(jp);
            if (*jp->p != ':') {
                json_fail(jp, "expected ':'");
                break;
            }
            jp->p++;
        }
        item = json_parse_value(jp, depth + 1);
        if (!item) {
            break;
        }
        g_ptr_array_add(v->items, item);
        json_skip_ws(jp);
        if (*jp->p == ',') {
            jp->p++;
            continue;
        }
        if (*jp->p == close) {
            jp->p++;
            return v;
        }
        json_fail(jp, object ? "expected ',' or '}'" : "expected ',' or ']'");
        break;
    }
    json_free(v);
    return NULL;
}

static JsonValue *json_parse_value(JsonParser *jp, int depth)
{
    JsonValue *v;

    if (depth > JSON_MAX_DEPTH) {
        json_fail(jp, "nested too deeply");
        return NULL;
    }
    json_skip_ws(jp);
    switch (*jp->p) {
    case '{':
        return json_parse_container(jp, depth, true);
    case '[':
        return json_parse_container(jp, depth, false);
    case '"': {
        char *s = json_parse_string(jp);

        if (!s) {
            return NULL;
        }
        v = json_new(JSON_STRING);
        v->string = s;
        return v;
    }
    case 't':
    case 'f':
    case 'n': {
        static const char *const words[] = {"true", "false", "null"};
        int i;

        for (i = 0; i < 3; i++) {
            if (!strncmp(jp->p, words[i], strlen(words[i]))) {
                jp->p += strlen(words[i]);
                v = json_new(i == 2 ? JSON_NULL : JSON_BOOL);
                v->boolean = i == 0;
                return v;
            }
        }
        json_fail(jp, "unknown word");
        return NULL;
    }
    default:
        if (*jp->p == '-' || g_ascii_isdigit(*jp->p)) {
            char *end;
            double d = g_ascii_strtod(jp->p, &end);

            if (end == jp->p) {
                json_fail(jp, "bad number");
                return NULL;
            }
            jp->p = end;
            v = json_new(JSON_NUMBER);
            v->number = d;
            return v;
        }
        json_fail(jp, "unexpected character");
        return NULL;
    }
}

JsonValue *json_parse(const char *text, GError **errp)
{
    JsonParser jp = {.p = text, .errp = errp};
    JsonValue *v = json_parse_value(&jp, 0);

    if (v) {
        json_skip_ws(&jp);
        if (*jp.p) {
            json_fail(&jp, "trailing characters");
            json_free(v);
            return NULL;
        }
    }
    return v;
}

JsonValue *json_get(const JsonValue *obj, const char *key)
{
    unsigned i;

    if (!obj || obj->type != JSON_OBJECT) {
        return NULL;
    }
    for (i = 0; i < obj->keys->len; i++) {
        if (!strcmp(g_ptr_array_index(obj->keys, i), key)) {
            return g_ptr_array_index(obj->items, i);
        }
    }
    return NULL;
}

const char *json_get_str(const JsonValue *obj, const char *key, const char *def)
{
    JsonValue *v = json_get(obj, key);

    return v && v->type == JSON_STRING ? v->string : def;
}

double json_get_num(const JsonValue *obj, const char *key, double def)
{
    JsonValue *v = json_get(obj, key);

    return v && v->type == JSON_NUMBER ? v->number : def;
}

bool json_get_bool(const JsonValue *obj, const char *key, bool def)
{
    JsonValue *v = json_get(obj, key);

    return v && v->type == JSON_BOOL ? v->boolean : def;
}

void json_append_string(GString *out, const char *s)
{
    g_string_append_c(out, '"');
    for (; s && *s; s++) {
        unsigned char c = *s;

        if (c == '"' || c == '\\') {
            g_string_append_printf(out, "\\%c", c);
        } else if (c < 0x20) {
            g_string_append_printf(out, "\\u%04x", c);
        } else {
            g_string_append_c(out, c);
        }
    }
    g_string_append_c(out, '"');
}

void json_write(const JsonValue *v, GString *out)
{
    unsigned i;

    switch (v->type) {
    case JSON_NULL:
        g_string_append(out, "null");
        break;
    case JSON_BOOL:
        g_string_append(out, v->boolean ? "true" : "false");
        break;
    case JSON_NUMBER: {
        char buf[G_ASCII_DTOSTR_BUF_SIZE];

        /* range first: converting a double out of int64_t's range is
         * undefined */
        if (v->number > -9e15 && v->number < 9e15 &&
            v->number == (double)(int64_t)v->number) {
            g_string_append_printf(out, "%" G_GINT64_FORMAT, (gint64)v->number);
        } else {
            g_string_append(out, g_ascii_dtostr(buf, sizeof(buf), v->number));
        }
        break;
    }
    case JSON_STRING:
        json_append_string(out, v->string);
        break;
    case JSON_ARRAY:
    case JSON_OBJECT:
        g_string_append_c(out, v->type == JSON_ARRAY ? '[' : '{');
        for (i = 0; i < v->items->len; i++) {
            if (i) {
                g_string_append(out, ", ");
            }
            if (v->type == JSON_OBJECT) {
                json_append_string(out, g_ptr_array_index(v->keys, i));
                g_string_append(out, ": ");
            }
            json_write(g_ptr_array_index(v->items, i), out);
        }
        g_string_append_c(out, v->type == JSON_ARRAY ? ']' : '}');
        break;
    }
}
