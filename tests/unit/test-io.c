/*
 * Unit tests for the request path (blockcore/io.c): alignment with
 * bounce buffers and read-modify-write, serialisation of concurrent
 * unaligned writers, splitting to max_transfer, write-zeroes emulation,
 * reads past the end and flush generations.
 *
 * The node under test is a small in-memory protocol driver defined here.
 * It checks every call against the limits it declared -- exactly the
 * promise blockcore makes to drivers -- and sleeps a little in each call
 * so that concurrent requests really interleave.
 */
#include <glib.h>
#include <string.h>

#include "blockcore/aio.h"
#include "blockcore/driver.h"
#include "blockcore/thread-pool.h"

typedef struct MemState {
    uint8_t *data;
    int64_t size;
    uint32_t align;
    uint32_t mem_align;
    int64_t max_transfer;
    bool zeroes;
    int violations;
    int calls;
    int flushes;
    int64_t largest;
} MemState;

static const OptDesc mem_options[] = {
    {"size", OPT_SIZE, NULL, NULL},
    {"align", OPT_NUMBER, NULL, NULL},
    {"mem-align", OPT_NUMBER, NULL, NULL},
    {"max-transfer", OPT_SIZE, NULL, NULL},
    {"zeroes", OPT_BOOL, NULL, NULL},
    {NULL},
};

static int coroutine_fn mem_co_open(BlockDriverState *bs, GHashTable *opts,
                                    int flags, GError **errp)
{
    MemState *s = bs->opaque;

    s->size = opt_get_size(opts, "size", 64 * 1024);
    s->align = opt_get_number(opts, "align", 1);
    s->mem_align = opt_get_number(opts, "mem-align", 1);
    s->max_transfer = opt_get_size(opts, "max-transfer", 0);
    s->zeroes = opt_get_bool(opts, "zeroes", false);
    s->data = g_malloc0(s->size);
    bs->total_bytes = s->size;
    return 0;
}

static void coroutine_fn mem_co_close(BlockDriverState *bs)
{
    MemState *s = bs->opaque;

    g_free(s->data);
}

static void mem_refresh_limits(BlockDriverState *bs, BlockLimits *bl)
{
    MemState *s = bs->opaque;

    bl->request_alignment = s->align;
    bl->min_mem_alignment = s->mem_align;
    bl->max_transfer = s->max_transfer;
}

/* @grows: a write, which may extend the node */
static void mem_check(BlockDriverState *bs, int64_t offset, int64_t bytes,
                      IOVector *qiov, size_t qoff, bool grows)
{
    MemState *s = bs->opaque;

    s->calls++;
    s->largest = MAX(s->largest, bytes);
    if (offset % s->align || bytes % s->align || bytes <= 0 ||
        (s->max_transfer && bytes > s->max_transfer) ||
        (qiov && !iov_is_aligned(qiov, qoff, bytes, s->mem_align)) ||
        (!grows && offset + bytes > ALIGN_UP(s->size, s->align))) {
        s->violations++;
    }
}

static void mem_resize(MemState *s, int64_t size)
{
    s->data = g_realloc(s->data, MAX(size, 1));
    if (size > s->size) {
        memset(s->data + s->size, 0, size - s->size);
    }
    s->size = size;
}

static int coroutine_fn mem_co_truncate(BlockDriverState *bs, int64_t offset,
                                        bool exact, PreallocMode prealloc,
                                        GError **errp)
{
    mem_resize(bs->opaque, offset);
    return 0;
}

static int coroutine_fn mem_co_preadv(BlockDriverState *bs, int64_t offset,
                                      int64_t bytes, IOVector *qiov,
                                      size_t qoff, BdrvRequestFlags flags)
{
    MemState *s = bs->opaque;
    int64_t n = offset < s->size ? MIN(bytes, s->size - offset) : 0;

    mem_check(bs, offset, bytes, qiov, qoff, false);
    co_sleep_ns(g_random_int_range(0, 200) * 1000);
    iov_from_buf(qiov, qoff, s->data + offset, n);
    if (n < bytes) {
        iov_memset(qiov, qoff + n, 0, bytes - n);
    }
    return 0;
}

static int coroutine_fn mem_co_pwritev(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, IOVector *qiov,
                                       size_t qoff, BdrvRequestFlags flags)
{
    MemState *s = bs->opaque;
    uint8_t *tmp = g_malloc(bytes);

    mem_check(bs, offset, bytes, qiov, qoff, true);
    /* Take the data now, store it after a pause: a racing RMW would
     * overwrite neighbours with stale bytes here. */
    iov_to_buf(qiov, qoff, tmp, bytes);
    co_sleep_ns(g_random_int_range(0, 200) * 1000);
    if (offset + bytes > s->size) {
        mem_resize(s, offset + bytes);
    }
    memcpy(s->data + offset, tmp, bytes);
    g_free(tmp);
    return 0;
}

static int coroutine_fn mem_co_flush(BlockDriverState *bs)
{
    MemState *s = bs->opaque;

    s->flushes++;
    return 0;
}

static int coroutine_fn mem_co_pwrite_zeroes(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             BdrvRequestFlags flags)
{
    MemState *s = bs->opaque;

    if (!s->zeroes) {
        return -ENOTSUP;
    }
    mem_check(bs, offset, bytes, NULL, 0, false);
    memset(s->data + offset, 0, MIN(bytes, s->size - offset));
    return 0;
}

static const BlockDriver mem_driver = {
    .name = "mem",
    .instance_size = sizeof(MemState),
    .is_protocol = true,
    .options = mem_options,
    .co_open = mem_co_open,
    .co_close = mem_co_close,
    .refresh_limits = mem_refresh_limits,
    .co_preadv = mem_co_preadv,
    .co_pwritev = mem_co_pwritev,
    .co_flush = mem_co_flush,
    .co_pwrite_zeroes = mem_co_pwrite_zeroes,
    .co_truncate = mem_co_truncate,
};

static AioContext *ctx;

typedef struct Fixture {
    BdrvChild *child;
    MemState *s;
    uint8_t *model;
    int64_t size;
    GHashTable *opts;
} Fixture;

static void coroutine_fn co_open(void *opaque)
{
    Fixture *f = opaque;

    f->child = bdrv_co_open_driver_standalone(&mem_driver, NULL, f->opts,
                                              BDRV_O_RDWR, NULL);
}

static void coroutine_fn co_close(void *opaque)
{
    bdrv_co_close_standalone(((Fixture *)opaque)->child);
}

static void fixture_open(Fixture *f, const char *size, const char *align,
                         const char *mem_align, const char *max_transfer)
{
    memset(f, 0, sizeof(*f));
    f->opts = opt_table_new();
    g_hash_table_insert(f->opts, g_strdup("size"), g_strdup(size));
    g_hash_table_insert(f->opts, g_strdup("align"), g_strdup(align));
    g_hash_table_insert(f->opts, g_strdup("mem-align"), g_strdup(mem_align));
    if (max_transfer) {
        g_hash_table_insert(f->opts, g_strdup("max-transfer"),
                            g_strdup(max_transfer));
    }
    aio_co_run_sync(ctx, co_open, f);
    g_assert_nonnull(f->child);
    f->s = f->child->bs->opaque;
    f->size = f->s->size;
    f->model = g_malloc0(f->size);
}

static void fixture_close(Fixture *f)
{
    aio_co_run_sync(ctx, co_close, f);
    g_hash_table_unref(f->opts);
    g_free(f->model);
}

typedef struct RandomOps {
    Fixture *f;
    int n;
} RandomOps;

/* Random unaligned reads and writes at odd buffer addresses. */
static void coroutine_fn co_random_ops(void *opaque)
{
    RandomOps *r = opaque;
    Fixture *f = r->f;
    uint8_t *raw = g_malloc(f->size + 64);
    int i;

    for (i = 0; i < r->n; i++) {
        int64_t off = g_random_int_range(0, f->size - 1);
        int64_t len = g_random_int_range(1, MIN(f->size - off, 20000) + 1);
        uint8_t *buf = raw + g_random_int_range(0, 64);
        int ret;

        if (g_random_boolean()) {
            int64_t j;

            for (j = 0; j < len; j++) {
                buf[j] = g_random_int();
            }
            ret = bdrv_co_pwrite(f->child, off, len, buf, 0);
            g_assert_cmpint(ret, ==, 0);
            memcpy(f->model + off, buf, len);
        } else {
            ret = bdrv_co_pread(f->child, off, len, buf, 0);
            g_assert_cmpint(ret, ==, 0);
            g_assert_cmpmem(buf, len, f->model + off, len);
        }
    }
    g_free(raw);
}

static void test_unaligned_model(void)
{
    static const char *aligns[] = {"1", "512", "4096"};
    int a;

    for (a = 0; a < 3; a++) {
        Fixture f;
        RandomOps r = {.f = &f, .n = 300};

        fixture_open(&f, "256K", aligns[a], aligns[a], NULL);
        aio_co_run_sync(ctx, co_random_ops, &r);
        g_assert_cmpint(f.s->violations, ==, 0);
        g_assert_cmpmem(f.s->data, f.size, f.model, f.size);
        fixture_close(&f);
    }
}

typedef struct Writer {
    Fixture *f;
    int64_t off;
    int64_t len;
    uint8_t val;
    int *done;
} Writer;

static void coroutine_fn co_writer(void *opaque)
{
    Writer *w = opaque;
    uint8_t *buf = g_malloc(w->len);

    memset(buf, w->val, w->len);
    g_assert_cmpint(bdrv_co_pwrite(w->f->child, w->off, w->len, buf, 0), ==, 0);
    g_free(buf);
    (*w->done)++;
}

/*
 * Many concurrent writers of disjoint, unaligned byte ranges inside the
 * same few 4 KiB blocks: each one's read-modify-write would wipe the
 * others' bytes without serialisation.
 */
static void test_concurrent_rmw(void)
{
    Fixture f;
    Writer w[64];
    int i, done = 0;

    fixture_open(&f, "64K", "4096", "4096", NULL);
    for (i = 0; i < 64; i++) {
        w[i] = (Writer){.f = &f,
                        .off = 1000 + i * 131,
                        .len = 131,
                        .val = (uint8_t)(i + 1),
                        .done = &done};
        aio_co_spawn(ctx, co_writer, &w[i]);
    }
    while (done < 64) {
        aio_poll(ctx, true);
    }
    for (i = 0; i < 64; i++) {
        int64_t j;

        for (j = 0; j < w[i].len; j++) {
            g_assert_cmpint(f.s->data[w[i].off + j], ==, w[i].val);
        }
    }
    g_assert_cmpint(f.s->violations, ==, 0);
    fixture_close(&f);
}

/*
 * An unaligned write past the end pads to the alignment and cuts the
 * padding off again; a write further out that completes meanwhile must
 * survive the cut.
 */
static void test_rmw_past_end(void)
{
    int trial;

    for (trial = 0; trial < 50; trial++) {
        Fixture f;
        Writer b, a;
        int64_t i;
        int done = 0;

        fixture_open(&f, "4096", "512", "1", NULL);
        b = (Writer){
            .f = &f, .off = 4196, .len = 100, .val = 0xbb, .done = &done};
        a = (Writer){
            .f = &f, .off = 8192, .len = 4096, .val = 0xaa, .done = &done};
        aio_co_spawn(ctx, co_writer, &b);
        aio_co_spawn(ctx, co_writer, &a);
        while (done < 2) {
            aio_poll(ctx, true);
        }
        g_assert_cmpint(f.s->size, ==, 12288);
        g_assert_cmpint(f.child->bs->total_bytes, ==, 12288);
        for (i = 0; i < 12288; i++) {
            uint8_t want = i >= 8192 ? 0xaa : i >= 4196 && i < 4296 ? 0xbb : 0;

            g_assert_cmpint(f.s->data[i], ==, want);
        }
        g_assert_cmpint(f.s->violations, ==, 0);
        fixture_close(&f);
    }
}

static void coroutine_fn co_big_write(void *opaque)
{
    Fixture *f = opaque;
    uint8_t *buf = g_malloc(100000);

    memset(buf, 0x5a, 100000);
    g_assert_cmpint(bdrv_co_pwrite(f->child, 3, 100000, buf, 0), ==, 0);
    memset(buf, 0, 100000);
    g_assert_cmpint(bdrv_co_pread(f->child, 3, 100000, buf, 0), ==, 0);
    g_assert_true(buf[0] == 0x5a && buf[99999] == 0x5a);
    g_free(buf);
}

static void test_max_transfer(void)
{
    Fixture f;

    fixture_open(&f, "256K", "512", "1", "8K");
    aio_co_run_sync(ctx, co_big_write, &f);
    g_assert_cmpint(f.s->violations, ==, 0);
    g_assert_cmpint(f.s->largest, <=, 8192);
    g_assert_cmpint(f.s->calls, >=, 13);
    fixture_close(&f);
}

static void coroutine_fn co_zeroes(void *opaque)
{
    Fixture *f = opaque;
    uint8_t *buf = g_malloc(f->size);
    int64_t i;

    memset(buf, 0xee, f->size);
    g_assert_cmpint(bdrv_co_pwrite(f->child, 0, f->size, buf, 0), ==, 0);
    g_assert_cmpint(
        bdrv_co_pwrite_zeroes(f->child, 777, 20000, BDRV_REQ_MAY_UNMAP), ==, 0);
    g_assert_cmpint(bdrv_co_pread(f->child, 0, f->size, buf, 0), ==, 0);
    for (i = 0; i < f->size; i++) {
        g_assert_cmpint(buf[i], ==, (i >= 777 && i < 20777) ? 0 : 0xee);
    }
    g_free(buf);
}

static void test_write_zeroes(void)
{
    Fixture f;
    int native;

    for (native = 0; native < 2; native++) {
        fixture_open(&f, "64K", "512", "512", NULL);
        f.s->zeroes = native;
        aio_co_run_sync(ctx, co_zeroes, &f);
        g_assert_cmpint(f.s->violations, ==, 0);
        fixture_close(&f);
    }
}

static void coroutine_fn co_past_end(void *opaque)
{
    Fixture *f = opaque;
    uint8_t buf[4096];

    memset(f->s->data, 0x77, f->size);
    memset(buf, 0xff, sizeof(buf));
    /* A read crossing the end of the node: the tail reads as zeros. */
    g_assert_cmpint(bdrv_co_pread(f->child, f->size - 100, 4096, buf, 0), ==,
                    0);
    g_assert_cmpint(buf[0], ==, 0x77);
    g_assert_cmpint(buf[99], ==, 0x77);
    g_assert_cmpint(buf[100], ==, 0);
    g_assert_cmpint(buf[4095], ==, 0);
}

/* Requests near INT64_MAX are refused before any rounding can overflow. */
static void coroutine_fn co_huge_offsets(void *opaque)
{
    Fixture *f = opaque;
    uint8_t buf[16] = {0};

    g_assert_cmpint(bdrv_co_pread(f->child, INT64_MAX - 10, 5, buf, 0), ==,
                    -EINVAL);
    g_assert_cmpint(bdrv_co_pwrite(f->child, INT64_MAX - 10, 5, buf, 0), ==,
                    -EINVAL);
    g_assert_cmpint(
        bdrv_co_pwrite(f->child, BDRV_MAX_LENGTH - 512, 1024, buf, 0), ==,
        -EINVAL);
    g_assert_cmpint(bdrv_co_pread(f->child, 0, INT64_MAX, buf, 0), ==, -EINVAL);
}

static void test_huge_offsets(void)
{
    Fixture f;

    fixture_open(&f, "4096", "512", "1", NULL);
    aio_co_run_sync(ctx, co_huge_offsets, &f);
    g_assert_cmpint(f.s->calls, ==, 0);
    fixture_close(&f);
}

static void test_read_past_end(void)
{
    Fixture f;

    fixture_open(&f, "10000", "512", "1", NULL);
    aio_co_run_sync(ctx, co_past_end, &f);
    g_assert_cmpint(f.s->violations, ==, 0);
    fixture_close(&f);
}

static void coroutine_fn co_flushes(void *opaque)
{
    Fixture *f = opaque;
    uint8_t buf[512] = {1};

    g_assert_cmpint(bdrv_co_flush(f->child->bs), ==, 0);
    g_assert_cmpint(f->s->flushes, ==, 0); /* nothing written yet */
    g_assert_cmpint(bdrv_co_pwrite(f->child, 0, 512, buf, 0), ==, 0);
    g_assert_cmpint(bdrv_co_flush(f->child->bs), ==, 0);
    g_assert_cmpint(bdrv_co_flush(f->child->bs), ==, 0);
    g_assert_cmpint(f->s->flushes, ==, 1);
    /* FUA without native support: a flush after the write. */
    g_assert_cmpint(bdrv_co_pwrite(f->child, 0, 512, buf, BDRV_REQ_FUA), ==, 0);
    g_assert_cmpint(f->s->flushes, ==, 2);
}

static void coroutine_fn co_flush_only(void *opaque)
{
    Fixture *f = opaque;

    g_assert_cmpint(bdrv_co_flush(f->child->bs), ==, 0);
}

static void test_flush_generations(void)
{
    Fixture f;
    Writer w;
    int before, done = 0;

    fixture_open(&f, "64K", "512", "1", NULL);
    aio_co_run_sync(ctx, co_flushes, &f);

    /*
     * A flush that runs while a write is in the driver may miss it, but
     * then the next flush must not: the write counts as written only
     * once it completes.
     */
    w = (Writer){.f = &f, .off = 4096, .len = 512, .val = 7, .done = &done};
    aio_co_spawn(ctx, co_writer, &w); /* runs until the driver sleeps */
    g_assert_cmpint(done, ==, 0);
    aio_co_spawn(ctx, co_flush_only, &f);
    while (!done) {
        aio_poll(ctx, true);
    }
    before = f.s->flushes;
    aio_co_run_sync(ctx, co_flush_only, &f);
    g_assert_cmpint(f.s->flushes, ==, before + 1);
    fixture_close(&f);
}

int main(int argc, char **argv)
{
    int ret;

    g_test_init(&argc, &argv, NULL);
    ctx = aio_context_new("test-io", NULL);
    aio_context_borrow(ctx);
    g_test_add_func("/io/unaligned-model", test_unaligned_model);
    g_test_add_func("/io/concurrent-rmw", test_concurrent_rmw);
    g_test_add_func("/io/rmw-past-end", test_rmw_past_end);
    g_test_add_func("/io/max-transfer", test_max_transfer);
    g_test_add_func("/io/write-zeroes", test_write_zeroes);
    g_test_add_func("/io/read-past-end", test_read_past_end);
    g_test_add_func("/io/huge-offsets", test_huge_offsets);
    g_test_add_func("/io/flush-generations", test_flush_generations);
    ret = g_test_run();
    thread_pool_shutdown();
    co_pool_drain();
    aio_context_return(NULL);
    aio_context_free(ctx);
    return ret;
}
