/*
 * BlockBackend: the root of a drive's node tree and the only thing the
 * FUSE layer talks to.  It owns the drive's settings (read-only, cache
 * mode), checks requests against the drive's size, turns writethrough
 * mode into FUA writes, counts requests in flight for draining, and
 * keeps a copy of the length that other threads may read.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "block.h"
#include "driver.h"
#include "log.h"

/* block.c */
BlockDriverState *coroutine_fn
bdrv_co_open_root(const char *filename, const char *format, GHashTable *opts,
                  int flags, const char *drive, GError **errp);
void coroutine_fn bdrv_co_close_root(BlockDriverState *bs);

struct BlockBackend {
    char *name;
    AioContext *ctx;
    BdrvChild root;
    BlockBackendOptions opts;
    int64_t length; /* atomic: readable from any thread */
    int in_flight;
    CoQueue drain_queue;
};

static const char *const cache_modes[] = {
    "writeback", "none", "writethrough", "directsync", "unsafe", NULL,
};
enum {
    CACHE_WRITEBACK,
    CACHE_NONE,
    CACHE_WRITETHROUGH,
    CACHE_DIRECTSYNC,
    CACHE_UNSAFE
};

static const OptDesc blk_options[] = {
    {"file", OPT_STRING, NULL,
     "image file (relative to the config file's directory)"},
    {"format", OPT_STRING, NULL, "image format (default: probed)"},
    {"read-only", OPT_BOOL, NULL, "expose the drive read-only"},
    {"cache", OPT_ENUM, cache_modes,
     "writeback (default), none, writethrough, directsync, unsafe"},
    {"cache.direct", OPT_BOOL, NULL, "open image files with O_DIRECT"},
    {"cache.no-flush", OPT_BOOL, NULL, "ignore flush requests (unsafe)"},
    {"write-cache", OPT_BOOL, NULL,
     "off: every write is durable before it is acknowledged"},
    {NULL},
};

const OptDesc *blk_option_table(void)
{
    return blk_options;
}

char *blk_resolve_filename(const char *filename, const char *base_dir)
{
    if (g_path_is_absolute(filename) ||
        bdrv_find_protocol_for(filename) != bdrv_find_driver("file")) {
        return g_strdup(filename);
    }
    return g_build_filename(base_dir, filename, NULL);
}

void blk_options_init(BlockBackendOptions *o)
{
    memset(o, 0, sizeof(*o));
    o->write_cache = true;
    o->discard_unmap = true;
    o->driver_opts = opt_table_new();
    o->given = opt_table_new();
}

void blk_options_clear(BlockBackendOptions *o)
{
    g_free(o->file);
    g_free(o->format);
    if (o->driver_opts) {
        g_hash_table_unref(o->driver_opts);
    }
    if (o->given) {
        g_hash_table_unref(o->given);
    }
    memset(o, 0, sizeof(*o));
}

static bool blk_check_driver_key(const char *key, const char *value,
                                 GError **errp)
{
    const char *dot = strchr(key, '.');
    g_autofree char *drvname = NULL;
    const BlockDriver *drv;
    const OptDesc *desc;

    if (!dot) {
        return false;
    }
    drvname = g_strndup(key, dot - key);
    drv = bdrv_find_driver(drvname);
    if (!drv) {
        return false;
    }
    desc = opt_find(drv->options, dot + 1);
    if (!desc) {
        return false;
    }
    opt_validate(desc, value, errp);
    return true;
}

int blk_options_set(BlockBackendOptions *o, const char *key, const char *value,
                    GError **errp)
{
    const OptDesc *desc = opt_find(blk_options, key);
    GError *local_err = NULL;

    if (!desc) {
        if (!blk_check_driver_key(key, value, &local_err)) {
            return -ENOENT;
        }
        if (local_err) {
            /* The driver says "key 'offset'": name the full key. */
            const char *msg = strstr(local_err->message, ": invalid");

            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s'%s", key, msg ? msg : local_err->message);
            g_error_free(local_err);
            return -EINVAL;
        }
        g_hash_table_replace(o->driver_opts, g_strdup(key), g_strdup(value));
        return 0;
    }
    if (!opt_validate(desc, value, errp)) {
        return -EINVAL;
    }
    g_hash_table_replace(o->given, g_strdup(key), g_strdup(value));

    if (!strcmp(key, "file")) {
        g_free(o->file);
        o->file = g_strdup(value);
    } else if (!strcmp(key, "format")) {
        if (!bdrv_find_driver(value)) {
            g_autoptr(GString) list = g_string_new(NULL);
            const BlockDriver *const *d;

            for (d = bdrv_driver_list(); *d; d++) {
                g_string_append_printf(list, "%s%s", list->len ? ", " : "",
                                       (*d)->name);
            }
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key 'format': invalid value '%s' (this build "
                        "supports: %s)",
                        value, list->str);
            return -EINVAL;
        }
        g_free(o->format);
        o->format = g_strdup(value);
    } else if (!strcmp(key, "read-only")) {
        opt_parse_bool(value, &o->read_only);
    }
    /* cache keys are resolved in blk_options_check (order independent). */
    return 0;
}

bool blk_options_check(const BlockBackendOptions *co, GError **errp)
{
    BlockBackendOptions *o = (BlockBackendOptions *)co;
    const char *v;
    bool b;

    if (!o->file && !g_hash_table_contains(o->driver_opts, "rbd.image")) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_KEY_NOT_FOUND,
                    "key 'file' is missing: name the image file");
        return false;
    }
    v = g_hash_table_lookup(o->given, "cache");
    if (v) {
        switch (opt_parse_enum(v, cache_modes)) {
        case CACHE_WRITEBACK:
            o->cache_direct = false;
            o->write_cache = true;
            break;
        case CACHE_NONE:
            o->cache_direct = true;
            o->write_cache = true;
            break;
        case CACHE_WRITETHROUGH:
            o->cache_direct = false;
            o->write_cache = false;
            break;
        case CACHE_DIRECTSYNC:
            o->cache_direct = true;
            o->write_cache = false;
            break;
        case CACHE_UNSAFE:
            o->cache_direct = false;
            o->cache_no_flush = true;
            break;
        }
    }
    if ((v = g_hash_table_lookup(o->given, "cache.direct")) &&
        opt_parse_bool(v, &b) == 0) {
        o->cache_direct = b;
    }
    if ((v = g_hash_table_lookup(o->given, "cache.no-flush")) &&
        opt_parse_bool(v, &b) == 0) {
        o->cache_no_flush = b;
    }
    if ((v = g_hash_table_lookup(o->given, "write-cache")) &&
        opt_parse_bool(v, &b) == 0) {
        o->write_cache = b;
    }
    return true;
}

typedef struct BlkOpenData {
    BlockBackend *blk;
    GError *err;
    int ret;
} BlkOpenData;

/* Every "<driver>.<key>" must belong to a driver the drive really uses. */
static bool blk_check_unused_keys(BlockBackend *blk, GError **errp)
{
    BlockDriverState *top = blk->root.bs;
    GHashTableIter it;
    gpointer k;

    g_hash_table_iter_init(&it, blk->opts.driver_opts);
    while (g_hash_table_iter_next(&it, &k, NULL)) {
        const char *key = k;
        size_t n = strchr(key, '.') - key;
        bool used =
            !strncmp(top->drv->name, key, n) && strlen(top->drv->name) == n;

        if (top->file) {
            const char *p = top->file->bs->drv->name;

            used |= !strncmp(p, key, n) && strlen(p) == n;
        }
        if (!used) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s' does not apply: the image is %s", key,
                        top->drv->name);
            return false;
        }
    }
    return true;
}

static void coroutine_fn blk_co_open_entry(void *opaque)
{
    BlkOpenData *d = opaque;
    BlockBackend *blk = d->blk;
    BlockBackendOptions *o = &blk->opts;
    BlockDriverState *bs;
    int flags = 0;

    if (!o->read_only) {
        flags |= BDRV_O_RDWR;
    }
    if (o->cache_direct) {
        flags |= BDRV_O_NOCACHE;
    }
    if (o->cache_no_flush) {
        flags |= BDRV_O_NO_FLUSH;
    }
    if (o->discard_unmap) {
        flags |= BDRV_O_UNMAP;
    }
    bs = bdrv_co_open_root(o->file, o->format, o->driver_opts, flags, blk->name,
                           &d->err);
    if (!bs) {
        d->ret = -EINVAL;
        return;
    }
    blk->root.bs = bs;
    if (!blk_check_unused_keys(blk, &d->err)) {
        blk->root.bs = NULL;
        bdrv_co_close_root(bs);
        d->ret = -EINVAL;
        return;
    }
    __atomic_store_n(&blk->length, bdrv_getlength(bs), __ATOMIC_SEQ_CST);
    d->ret = 0;
}

BlockBackend *blk_open(const char *name, const BlockBackendOptions *opts,
                       AioContext *ctx, GError **errp)
{
    BlockBackend *blk = g_new0(BlockBackend, 1);
    BlkOpenData d = {.blk = blk};

    blk->name = g_strdup(name);
    blk->ctx = ctx;
    blk->opts = *opts;
    blk->opts.file = g_strdup(opts->file);
    blk->opts.format = g_strdup(opts->format);
    blk->opts.driver_opts = g_hash_table_ref(opts->driver_opts);
    blk->opts.given = g_hash_table_ref(opts->given);
    blk->root.name = "root";
    co_queue_init(&blk->drain_queue);

    aio_co_run_sync(ctx, blk_co_open_entry, &d);
    if (d.ret < 0) {
        g_propagate_error(errp, d.err);
        blk_options_clear(&blk->opts);
        g_free(blk->name);
        g_free(blk);
        return NULL;
    }
    return blk;
}

typedef struct BlkCloseData {
    BlockBackend *blk;
    int ret;
} BlkCloseData;

static void coroutine_fn blk_co_close_entry(void *opaque)
{
    BlkCloseData *d = opaque;
    BlockBackend *blk = d->blk;

    blk_co_drain(blk);
    d->ret = bdrv_co_flush(blk->root.bs);
    bdrv_co_close_root(blk->root.bs);
    blk->root.bs = NULL;
}

int blk_close(BlockBackend *blk)
{
    BlkCloseData d = {.blk = blk};

    if (!blk) {
        return 0;
    }
    aio_co_run_sync(blk->ctx, blk_co_close_entry, &d);
    if (d.ret < 0) {
        log_error("drive '%s': flush on close failed: %s", blk->name,
                  g_strerror(-d.ret));
    }
    blk_options_clear(&blk->opts);
    g_free(blk->name);
    g_free(blk);
    return d.ret;
}

const char *blk_name(BlockBackend *blk)
{
    return blk->name;
}

AioContext *blk_get_aio_context(BlockBackend *blk)
{
    return blk->ctx;
}

bool blk_is_read_only(BlockBackend *blk)
{
    return blk->opts.read_only;
}

int64_t blk_getlength(BlockBackend *blk)
{
    return __atomic_load_n(&blk->length, __ATOMIC_SEQ_CST);
}

size_t blk_mem_alignment(BlockBackend *blk)
{
    return blk->root.bs->bl.opt_mem_alignment;
}

void *blk_blockalign(BlockBackend *blk, size_t size)
{
    return bdrv_blockalign(blk->root.bs, size);
}

static void blk_inc_in_flight(BlockBackend *blk)
{
    blk->in_flight++;
}

static void blk_dec_in_flight(BlockBackend *blk)
{
    if (--blk->in_flight == 0) {
        co_queue_restart_all(&blk->drain_queue);
    }
}

void coroutine_fn blk_co_drain(BlockBackend *blk)
{
    while (blk->in_flight > 0) {
        co_queue_wait(&blk->drain_queue, NULL);
    }
}

static int blk_check_range(BlockBackend *blk, int64_t offset, int64_t bytes)
{
    if (offset < 0 || bytes < 0 || offset > INT64_MAX - bytes) {
        return -EINVAL;
    }
    if (offset + bytes > blk_getlength(blk)) {
        return -ENOSPC;
    }
    return 0;
}

int coroutine_fn blk_co_preadv(BlockBackend *blk, int64_t offset, int64_t bytes,
                               IOVector *qiov)
{
    int ret = blk_check_range(blk, offset, bytes);

    if (ret < 0) {
        return -EINVAL;
    }
    blk_inc_in_flight(blk);
    ret = bdrv_co_preadv(&blk->root, offset, bytes, qiov, 0, 0);
    blk_dec_in_flight(blk);
    return ret;
}

int coroutine_fn blk_co_pwritev(BlockBackend *blk, int64_t offset,
                                int64_t bytes, IOVector *qiov)
{
    int ret;

    if (blk->opts.read_only) {
        return -EROFS;
    }
    ret = blk_check_range(blk, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    blk_inc_in_flight(blk);
    ret = bdrv_co_pwritev(&blk->root, offset, bytes, qiov, 0,
                          blk->opts.write_cache ? 0 : BDRV_REQ_FUA);
    blk_dec_in_flight(blk);
    return ret;
}

int coroutine_fn blk_co_pwrite_zeroes(BlockBackend *blk, int64_t offset,
                                      int64_t bytes, bool unmap)
{
    BdrvRequestFlags flags = 0;
    int ret;

    if (blk->opts.read_only) {
        return -EROFS;
    }
    ret = blk_check_range(blk, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (unmap && blk->opts.discard_unmap) {
        flags |= BDRV_REQ_MAY_UNMAP;
    }
    if (!blk->opts.write_cache) {
        flags |= BDRV_REQ_FUA;
    }
    blk_inc_in_flight(blk);
    ret = bdrv_co_pwrite_zeroes(&blk->root, offset, bytes, flags);
    blk_dec_in_flight(blk);
    return ret;
}

int coroutine_fn blk_co_flush(BlockBackend *blk)
{
    int ret;

    blk_inc_in_flight(blk);
    ret = bdrv_co_flush(blk->root.bs);
    blk_dec_in_flight(blk);
    return ret;
}

int coroutine_fn blk_co_truncate(BlockBackend *blk, int64_t size, GError **errp)
{
    int ret;

    if (blk->opts.read_only) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_ROFS,
                    "drive '%s' is read-only", blk->name);
        return -EROFS;
    }
    blk_inc_in_flight(blk);
    ret = bdrv_co_truncate(&blk->root, size, true, PREALLOC_OFF, errp);
    if (ret == 0 && !blk->opts.write_cache) {
        ret = bdrv_co_flush(blk->root.bs);
    }
    __atomic_store_n(&blk->length, bdrv_getlength(blk->root.bs),
                     __ATOMIC_SEQ_CST);
    blk_dec_in_flight(blk);
    return ret;
}

int coroutine_fn blk_co_zero_status(BlockBackend *blk, int64_t offset,
                                    int64_t bytes, int64_t *pnum, bool *is_zero)
{
    int ret;

    blk_inc_in_flight(blk);
    ret = bdrv_co_block_status_above(blk->root.bs, offset, bytes, pnum);
    blk_dec_in_flight(blk);
    if (ret < 0) {
        return ret;
    }
    if (*pnum <= 0) {
        *pnum = bytes;
    }
    *is_zero = ret & BDRV_BLOCK_ZERO;
    return 0;
}

static void block_node_info_free(gpointer p)
{
    BlockNodeInfo *info = p;

    g_free(info->filename);
    g_free(info->format);
    g_free(info->backing_file);
    g_free(info->backing_format);
    g_ptr_array_unref(info->keys);
    g_ptr_array_unref(info->values);
    g_free(info);
}

typedef struct BlkChainData {
    BlockBackend *blk;
    GPtrArray *chain;
} BlkChainData;

static void coroutine_fn blk_co_query_chain(void *opaque)
{
    BlkChainData *d = opaque;
    BlockDriverState *bs = d->blk->root.bs;

    for (; bs; bs = bs->backing ? bs->backing->bs : NULL) {
        BlockNodeInfo *info = g_new0(BlockNodeInfo, 1);
        ImageInfoSpec spec;

        info->filename = g_strdup(bdrv_name(bs));
        info->format = g_strdup(bs->drv->name);
        info->virtual_size = bdrv_getlength(bs);
        info->allocated_bytes = -1;
        if (bs->drv->co_get_allocated_size) {
            info->allocated_bytes = bs->drv->co_get_allocated_size(bs);
            if (info->allocated_bytes < 0) {
                info->allocated_bytes = -1;
            }
        }
        info->backing_file = g_strdup(bs->backing_file);
        info->backing_format = g_strdup(bs->backing_format);
        info->read_only = !(bs->open_flags & BDRV_O_RDWR);
        info->keys = g_ptr_array_new_with_free_func(g_free);
        info->values = g_ptr_array_new_with_free_func(g_free);
        spec.keys = info->keys;
        spec.values = info->values;
        if (bs->drv->co_get_info) {
            bs->drv->co_get_info(bs, &spec);
        }
        g_ptr_array_add(d->chain, info);
    }
}

GPtrArray *blk_query_chain(BlockBackend *blk)
{
    BlkChainData d = {
        .blk = blk,
        .chain = g_ptr_array_new_with_free_func(block_node_info_free),
    };

    aio_co_run_sync(blk->ctx, blk_co_query_chain, &d);
    return d.chain;
}

void blk_list_drivers(GString *out)
{
    const BlockDriver *const *d;

    g_string_append(out, "formats:\n");
    for (d = bdrv_driver_list(); *d; d++) {
        if ((*d)->is_format) {
            g_string_append_printf(out, "  %-8s %s\n", (*d)->name,
                                   (*d)->description);
        }
    }
    g_string_append(out, "protocols:\n");
    for (d = bdrv_driver_list(); *d; d++) {
        if ((*d)->is_protocol) {
            g_string_append_printf(out, "  %-8s %s\n", (*d)->name,
                                   (*d)->description);
        }
    }
}
