/*
 * Unit tests for option parsing: the value syntax every config key uses,
 * and the error messages a user sees for bad values.
 */
#include <errno.h>
#include <glib.h>
#include <string.h>

#include "blockcore/block.h"
#include "blockcore/options.h"

static void test_bool(void)
{
    static const char *yes[] = {"on", "true", "yes", "ON", "True"};
    static const char *no[] = {"off", "false", "no", "Off"};
    static const char *bad[] = {"", "1", "0", "maybe", "onn", "y"};
    bool b;
    unsigned i;

    for (i = 0; i < G_N_ELEMENTS(yes); i++) {
        g_assert_cmpint(opt_parse_bool(yes[i], &b), ==, 0);
        g_assert_true(b);
    }
    for (i = 0; i < G_N_ELEMENTS(no); i++) {
        g_assert_cmpint(opt_parse_bool(no[i], &b), ==, 0);
        g_assert_false(b);
    }
    for (i = 0; i < G_N_ELEMENTS(bad); i++) {
        g_assert_cmpint(opt_parse_bool(bad[i], &b), <, 0);
    }
}

static void test_size(void)
{
    static const struct {
        const char *s;
        uint64_t v;
    } good[] = {
        {"0", 0},           {"512", 512},       {"1K", 1024},
        {"1k", 1024},       {"64M", 64 << 20},  {"64MiB", 64 << 20},
        {"2G", 2ULL << 30}, {"1T", 1ULL << 40}, {"1.5K", 1536},
        {"10B", 10},        {"1MB", 1 << 20},
    };
    static const char *bad[] = {"",    "-1",   "1X",
                                "M",   "1.5",  "1KK",
                                "1 K", "0x10", "99999999999999999999"};
    uint64_t v;
    unsigned i;

    for (i = 0; i < G_N_ELEMENTS(good); i++) {
        g_assert_cmpint(opt_parse_size(good[i].s, &v), ==, 0);
        g_assert_cmpuint(v, ==, good[i].v);
    }
    for (i = 0; i < G_N_ELEMENTS(bad); i++) {
        g_assert_cmpint(opt_parse_size(bad[i], &v), <, 0);
    }
}

static void test_number_enum(void)
{
    static const char *const modes[] = {"a", "bb", NULL};
    uint64_t v;

    g_assert_cmpint(opt_parse_number("42", &v), ==, 0);
    g_assert_cmpuint(v, ==, 42);
    g_assert_cmpint(opt_parse_number("4 2", &v), <, 0);
    g_assert_cmpint(opt_parse_number("-4", &v), <, 0);
    g_assert_cmpint(opt_parse_enum("bb", modes), ==, 1);
    g_assert_cmpint(opt_parse_enum("c", modes), <, 0);
}

static void test_messages(void)
{
    BlockBackendOptions o;
    GError *err = NULL;

    blk_options_init(&o);
    g_assert_cmpint(blk_options_set(&o, "colour", "red", &err), ==, -ENOENT);
    g_assert_null(err);
    g_assert_cmpint(blk_options_set(&o, "read-only", "maybe", &err), ==,
                    -EINVAL);
    g_assert_nonnull(strstr(err->message, "key 'read-only'"));
    g_assert_nonnull(strstr(err->message, "invalid boolean 'maybe'"));
    g_clear_error(&err);
    g_assert_cmpint(blk_options_set(&o, "raw.offset", "12Q", &err), ==,
                    -EINVAL);
    g_assert_nonnull(strstr(err->message, "key 'raw.offset'"));
    g_clear_error(&err);
    g_assert_cmpint(blk_options_set(&o, "raw.bogus", "1", &err), ==, -ENOENT);
    g_assert_cmpint(blk_options_set(&o, "format", "nosuch", &err), ==, -EINVAL);
    g_assert_nonnull(strstr(err->message, "nosuch"));
    g_clear_error(&err);
    g_assert_cmpint(blk_options_set(&o, "cache", "none", &err), ==, 0);
    g_assert_cmpint(blk_options_set(&o, "file", "x.img", &err), ==, 0);
    g_assert_true(blk_options_check(&o, &err));
    g_assert_true(o.cache_direct);
    g_assert_true(o.write_cache);
    blk_options_clear(&o);
}

/* "prefix.*" entries: an open family of keys, validated by type. */
static void test_family(void)
{
    static const OptDesc table[] = {
        {"pool", OPT_STRING, NULL, ""},
        {"option.*", OPT_STRING, NULL, ""},
        {"limit.*", OPT_NUMBER, NULL, ""},
        {NULL},
    };
    GError *err = NULL;

    g_assert_true(opt_find(table, "pool") == &table[0]);
    g_assert_true(opt_find(table, "option.rbd_cache") == &table[1]);
    g_assert_true(opt_find(table, "option.a.b") == &table[1]);
    g_assert_null(opt_find(table, "option."));
    g_assert_null(opt_find(table, "option"));
    g_assert_null(opt_find(table, "options.x"));
    g_assert_null(opt_find(table, "option*"));
    g_assert_true(opt_find(table, "limit.iops") == &table[2]);
    g_assert_true(opt_validate(opt_find(table, "limit.iops"), "10", &err));
    g_assert_false(opt_validate(opt_find(table, "limit.iops"), "x", &err));
    g_clear_error(&err);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/options/bool", test_bool);
    g_test_add_func("/options/size", test_size);
    g_test_add_func("/options/number-enum", test_number_enum);
    g_test_add_func("/options/messages", test_messages);
    g_test_add_func("/options/family", test_family);
    return g_test_run();
}
