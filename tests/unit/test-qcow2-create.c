/*
 * Unit tests for creating qcow2 images through the driver's co_create
 * hook (what snapshot=on uses for its temporary overlays).  The oracles
 * are QEMU's tools: `qemu-img check` must find the new image clean,
 * `qemu-img info` must report its size and backing file, and qemu-io must
 * read, through the new image, what its backing file holds -- and what
 * imgfs itself then wrote into it.
 */
#include <glib.h>
#include <glib/gstdio.h>
#include <inttypes.h>
#include <string.h>
#include <unistd.h>

#include "blockcore/aio.h"
#include "blockcore/driver.h"
#include "blockcore/thread-pool.h"

static AioContext *ctx;

typedef struct Create {
    const char *path;
    int64_t size;
    const char *backing;
    const char *backing_fmt;
    int ret;
    char *error;
} Create;

static void coroutine_fn co_create_image(void *opaque)
{
    Create *c = opaque;
    const BlockDriver *drv = bdrv_find_driver("qcow2");
    GError *err = NULL;
    BdrvChild *file;

    g_assert_nonnull(drv);
    g_assert_nonnull(drv->co_create);
    file = bdrv_co_open_standalone(c->path, "file", BDRV_O_RDWR | BDRV_O_CREATE,
                                   &err);
    g_assert_no_error(err);
    c->ret = drv->co_create(file, c->size, c->backing, c->backing_fmt, &err);
    if (err) {
        c->error = g_strdup(err->message);
        g_error_free(err);
    }
    bdrv_co_close_standalone(file);
}

/* Write 64 KiB of 0x5a at 1 MiB through imgfs's qcow2 driver, read it
 * back, and read 4 KiB of the backing file's data at 0. */
typedef struct Use {
    const char *path;
    int ret;
    uint8_t head[4096];
} Use;

static void coroutine_fn co_use_image(void *opaque)
{
    Use *u = opaque;
    GError *err = NULL;
    BdrvChild *c = bdrv_co_open_standalone(u->path, "qcow2", BDRV_O_RDWR, &err);
    uint8_t *buf = g_malloc(65536);
    uint8_t *back = g_malloc(65536);

    g_assert_no_error(err);
    memset(buf, 0x5a, 65536);
    u->ret = bdrv_co_pwrite(c, 1 << 20, 65536, buf, 0);
    if (u->ret == 0) {
        u->ret = bdrv_co_pread(c, 1 << 20, 65536, back, 0);
    }
    if (u->ret == 0) {
        u->ret = memcmp(buf, back, 65536) ? -1 : 0;
    }
    if (u->ret == 0) {
        u->ret = bdrv_co_pread(c, 0, sizeof(u->head), u->head, 0);
    }
    bdrv_co_close_standalone(c);
    g_free(buf);
    g_free(back);
}

/* Run a program; its stdout, or NULL (test skipped) if it is missing. */
static char *run_tool(const char *const *argv, int *status)
{
    g_autofree char *path = g_find_program_in_path(argv[0]);
    char *out = NULL;
    GError *err = NULL;

    if (!path) {
        return NULL;
    }
    g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                 &out, NULL, status, &err);
    g_assert_no_error(err);
    return out;
}

static bool qemu_img_available(void)
{
    g_autofree char *p = g_find_program_in_path("qemu-img");
    g_autofree char *q = g_find_program_in_path("qemu-io");

    if (!p || !q) {
        g_test_skip("qemu-img or qemu-io is not installed");
        return false;
    }
    return true;
}

static void assert_clean(const char *path)
{
    const char *argv[] = {"qemu-img", "check", path, NULL};
    int status = -1;
    g_autofree char *out = run_tool(argv, &status);

    g_assert_nonnull(out);
    if (!g_spawn_check_wait_status(status, NULL)) {
        g_error("qemu-img check %s:\n%s", path, out);
    }
    g_assert_nonnull(strstr(out, "No errors were found"));
}

static char *qemu_info(const char *path)
{
    const char *argv[] = {"qemu-img", "info", "--output=json", path, NULL};
    int status = -1;
    char *out = run_tool(argv, &status);

    g_assert_nonnull(out);
    g_assert_true(g_spawn_check_wait_status(status, NULL));
    return out;
}

static void create(const char *path, int64_t size, const char *backing,
                   const char *fmt)
{
    Create c = {
        .path = path, .size = size, .backing = backing, .backing_fmt = fmt};

    aio_co_run_sync(ctx, co_create_image, &c);
    if (c.ret < 0) {
        g_error("co_create %s: %s", path, c.error);
    }
}

static void test_create_sizes(void)
{
    static const int64_t sizes[] = {0, 512, 64 << 20, INT64_C(1) << 40,
                                    INT64_C(17) << 40};
    g_autofree char *dir = g_dir_make_tmp("qcow2-create-XXXXXX", NULL);
    size_t i;

    if (!qemu_img_available()) {
        return;
    }
    for (i = 0; i < G_N_ELEMENTS(sizes); i++) {
        g_autofree char *path = g_strdup_printf("%s/img%zu.qcow2", dir, i);
        g_autofree char *want =
            g_strdup_printf("\"virtual-size\": %" PRId64, sizes[i]);
        g_autofree char *info = NULL;

        create(path, sizes[i], NULL, NULL);
        assert_clean(path);
        info = qemu_info(path);
        g_assert_nonnull(strstr(info, want));
        g_assert_nonnull(strstr(info, "\"format\": \"qcow2\""));
        g_assert_nonnull(strstr(info, "\"cluster-size\": 65536"));
        g_assert_nonnull(strstr(info, "\"compat\": \"1.1\""));
        g_assert_null(strstr(info, "backing-filename"));
        g_unlink(path);
    }
    g_rmdir(dir);
}

static void test_create_with_backing(void)
{
    g_autofree char *dir = g_dir_make_tmp("qcow2-create-XXXXXX", NULL);
    g_autofree char *base = g_build_filename(dir, "base.raw", NULL);
    g_autofree char *mid = g_build_filename(dir, "mid.qcow2", NULL);
    g_autofree char *top = g_build_filename(dir, "top.qcow2", NULL);
    const char *fill[] = {"qemu-io", "-f", "raw", "-c", "write -P 0xa7 0 2M",
                          base,      NULL};
    const char *read_top[] = {"qemu-io",
                              "-f",
                              "qcow2",
                              "-c",
                              "read -P 0xa7 0 1M",
                              "-c",
                              "read -P 0x5a 1M 64k",
                              top,
                              NULL};
    g_autofree char *info = NULL;
    g_autofree char *out = NULL;
    uint8_t expect[4096];
    Use u = {.path = top};
    int status = -1;
    FILE *f;

    if (!qemu_img_available()) {
        return;
    }
    f = fopen(base, "w");
    g_assert_nonnull(f);
    g_assert_cmpint(ftruncate(fileno(f), 4 << 20), ==, 0);
    fclose(f);
    g_free(run_tool(fill, &status));
    g_assert_true(g_spawn_check_wait_status(status, NULL));

    /* An absolute backing name with its format, then a relative one
     * whose format is left to probing. */
    create(mid, 8 << 20, base, "raw");
    create(top, 8 << 20, "mid.qcow2", NULL);
    assert_clean(mid);
    assert_clean(top);
    info = qemu_info(mid);
    g_assert_nonnull(strstr(info, "\"backing-filename-format\": \"raw\""));
    g_assert_nonnull(strstr(info, base));
    g_free(info);
    info = qemu_info(top);
    g_assert_nonnull(strstr(info, "\"backing-filename\": \"mid.qcow2\""));

    /* imgfs reads the backing data through the new images and writes */
    aio_co_run_sync(ctx, co_use_image, &u);
    g_assert_cmpint(u.ret, ==, 0);
    memset(expect, 0xa7, sizeof(expect));
    g_assert_cmpmem(u.head, sizeof(u.head), expect, sizeof(expect));
    assert_clean(top);
    out = run_tool(read_top, &status);
    if (!g_spawn_check_wait_status(status, NULL) ||
        strstr(out, "Pattern verification failed")) {
        g_error("qemu-io on %s:\n%s", top, out);
    }
    g_unlink(base);
    g_unlink(mid);
    g_unlink(top);
    g_rmdir(dir);
}

static void test_create_bad_size(void)
{
    g_autofree char *dir = g_dir_make_tmp("qcow2-create-XXXXXX", NULL);
    g_autofree char *path = g_build_filename(dir, "odd.qcow2", NULL);
    Create c = {.path = path, .size = 1000};

    aio_co_run_sync(ctx, co_create_image, &c);
    g_assert_cmpint(c.ret, <, 0);
    g_assert_nonnull(strstr(c.error, "multiple of 512"));
    g_free(c.error);
    g_unlink(path);
    g_rmdir(dir);
}

int main(int argc, char **argv)
{
    int ret;

    g_test_init(&argc, &argv, NULL);
    ctx = aio_context_new("test-qcow2-create", NULL);
    aio_context_borrow(ctx);
    g_test_add_func("/qcow2/create/sizes", test_create_sizes);
    g_test_add_func("/qcow2/create/backing", test_create_with_backing);
    g_test_add_func("/qcow2/create/bad-size", test_create_bad_size);
    ret = g_test_run();
    thread_pool_shutdown();
    co_pool_drain();
    aio_context_return(NULL);
    aio_context_free(ctx);
    return ret;
}
