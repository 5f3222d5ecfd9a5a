/*
 * Unit tests for IOVector arithmetic: slicing, copying, zero detection
 * and the alignment test the request path relies on.
 */
#include <glib.h>
#include <stdint.h>
#include <string.h>

#include "blockcore/iov.h"

/* A vector of @n pieces of sizes 1, 2, 3, ... over one buffer. */
static char *make_vector(IOVector *v, int n, size_t *total)
{
    size_t len = n * (n + 1) / 2;
    char *buf = g_malloc(len + n);
    size_t off = 0;
    int i;

    iov_init(v);
    for (i = 1; i <= n; i++) {
        /* a gap of one byte between pieces prevents merging */
        iov_add(v, buf + off + i - 1, i);
        off += i;
    }
    *total = len;
    return buf;
}

static void test_add_merge(void)
{
    char buf[64];
    IOVector v;

    iov_init(&v);
    iov_add(&v, buf, 10);
    iov_add(&v, buf + 10, 10); /* contiguous: merged */
    iov_add(&v, buf + 30, 5);
    iov_add(&v, buf, 0); /* empty: ignored */
    g_assert_cmpint(v.niov, ==, 2);
    g_assert_cmpuint(v.size, ==, 25);
    iov_destroy(&v);
}

static void test_grow(void)
{
    IOVector v;
    size_t total;
    char *buf = make_vector(&v, 40, &total);

    g_assert_cmpint(v.niov, ==, 40);
    g_assert_cmpuint(v.size, ==, total);
    iov_destroy(&v);
    g_free(buf);
}

static void test_copy_roundtrip(void)
{
    IOVector v;
    size_t total, off, len;
    char *buf = make_vector(&v, 20, &total);
    char *src = g_malloc(total), *dst = g_malloc(total);
    size_t i;

    for (i = 0; i < total; i++) {
        src[i] = (char)(i * 7 + 1);
    }
    g_assert_cmpuint(iov_from_buf(&v, 0, src, total), ==, total);
    memset(dst, 0, total);
    g_assert_cmpuint(iov_to_buf(&v, 0, dst, total), ==, total);
    g_assert_cmpmem(src, total, dst, total);

    /* every sub-range */
    for (off = 0; off < total; off += 3) {
        for (len = 0; off + len <= total; len += 5) {
            memset(dst, 0, total);
            g_assert_cmpuint(iov_to_buf(&v, off, dst, len), ==, len);
            g_assert_cmpmem(src + off, len, dst, len);
        }
    }
    /* past the end copies only what exists */
    g_assert_cmpuint(iov_to_buf(&v, total - 2, dst, 10), ==, 2);
    iov_destroy(&v);
    g_free(buf);
    g_free(src);
    g_free(dst);
}

static void test_concat(void)
{
    IOVector v, part;
    size_t total;
    char *buf = make_vector(&v, 10, &total);
    char *a = g_malloc(total), *b = g_malloc(total);
    size_t i;

    for (i = 0; i < total; i++) {
        a[i] = (char)i;
    }
    iov_from_buf(&v, 0, a, total);
    iov_init(&part);
    iov_concat(&part, &v, 7, 20);
    g_assert_cmpuint(part.size, ==, 20);
    iov_to_buf(&part, 0, b, 20);
    g_assert_cmpmem(a + 7, 20, b, 20);
    iov_destroy(&part);
    iov_destroy(&v);
    g_free(buf);
    g_free(a);
    g_free(b);
}

static void test_memset_zero(void)
{
    IOVector v;
    size_t total;
    char *buf = make_vector(&v, 15, &total);

    iov_memset(&v, 0, 0xff, total);
    g_assert_false(iov_is_zero(&v, 0, total));
    iov_memset(&v, 10, 0, 50);
    g_assert_true(iov_is_zero(&v, 10, 50));
    g_assert_false(iov_is_zero(&v, 9, 50));
    g_assert_false(iov_is_zero(&v, 10, 51));
    iov_destroy(&v);
    g_free(buf);
}

static void test_buffer_is_zero(void)
{
    char *b = g_malloc0(8192);
    size_t i;

    g_assert_true(buffer_is_zero(b, 8192));
    g_assert_true(buffer_is_zero(b, 0));
    for (i = 0; i < 8192; i += 511) {
        b[i] = 1;
        g_assert_false(buffer_is_zero(b, 8192));
        g_assert_true(buffer_is_zero(b, i));
        b[i] = 0;
    }
    g_free(b);
}

static void test_aligned(void)
{
    char *buf = g_malloc(3 * 4096 + 4096);
    char *p = (char *)(((uintptr_t)buf + 4095) & ~(uintptr_t)4095);
    IOVector v;

    iov_init(&v);
    iov_add(&v, p, 4096);
    iov_add(&v, p + 8192, 4096);
    g_assert_true(iov_is_aligned(&v, 0, 8192, 512));
    g_assert_true(iov_is_aligned(&v, 0, 8192, 4096));
    g_assert_false(iov_is_aligned(&v, 512, 4096, 4096));
    g_assert_true(iov_is_aligned(&v, 512, 4096, 512));
    g_assert_false(iov_is_aligned(&v, 0, 4000, 512));
    g_assert_true(iov_is_aligned(&v, 3, 5, 1));
    iov_destroy(&v);

    iov_init_buf(&v, p + 100, 4096);
    g_assert_false(iov_is_aligned(&v, 0, 4096, 512));
    g_free(buf);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/iov/add-merge", test_add_merge);
    g_test_add_func("/iov/grow", test_grow);
    g_test_add_func("/iov/copy-roundtrip", test_copy_roundtrip);
    g_test_add_func("/iov/concat", test_concat);
    g_test_add_func("/iov/memset-zero", test_memset_zero);
    g_test_add_func("/iov/buffer-is-zero", test_buffer_is_zero);
    g_test_add_func("/iov/aligned", test_aligned);
    return g_test_run();
}
