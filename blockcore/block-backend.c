/*
 * BlockBackend: the root of a drive's node tree and the only thing the
 * FUSE layer talks to.  It owns everything QEMU's -drive says about a
 * drive's behaviour rather than its image: read-only and snapshot modes,
 * the cache mode (writethrough becomes FUA writes), detect-zeroes, the
 * discard policy, the error policy (werror/rerror, with "stop" holding
 * requests until the operator resumes the drive), throttling and
 * statistics.  It checks requests against the drive's size, counts
 * requests in flight for draining, and keeps a copy of the length that
 * other threads may read.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

    /* Error policy "stop": protected by stop_lock for other threads;
     * the queue belongs to the drive's context. */
    GMutex stop_lock;
    bool stopped;
    bool aborting; /* closing: held requests fail instead of retrying */
    char *stop_reason;
    CoQueue resume_queue;

    ThrottleMember throttle;
    bool throttled;
    BlockStats stats;
    char *snapshot_file; /* snapshot=on: the (already unlinked) overlay */
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
static const char *const aio_modes[] = {"threads", "io_uring", "native", NULL};
static const char *const detect_zeroes_modes[] = {"off", "on", "unmap", NULL};
/* "off" and "on" are QEMU's old spellings of ignore and unmap. */
static const char *const discard_modes[] = {"ignore", "unmap", "off", "on",
                                            NULL};
static const char *const werror_modes[] = {"report", "ignore", "enospc", "stop",
                                           NULL};
static const char *const rerror_modes[] = {"report", "ignore", "stop", NULL};
static const char *const locking_modes[] = {"auto", "on", "off", NULL};

#define THROTTLE_OPTS(n)                                                       \
    {"throttling." n, OPT_NUMBER, NULL, "limit (per second)"},                 \
        {"throttling." n "-max", OPT_NUMBER, NULL, "burst limit"},             \
    {                                                                          \
        "throttling." n "-max-length", OPT_NUMBER, NULL,                       \
            "burst length in seconds (default 1)"                              \
    }

static const OptDesc blk_options[] = {
    {"file", OPT_STRING, NULL,
     "image file (relative to the config file's directory)"},
    {"format", OPT_STRING, NULL, "image format (default: probed; help: list)"},
    {"read-only", OPT_BOOL, NULL, "expose the drive read-only"},
    {"auto-read-only", OPT_BOOL, NULL,
     "fall back to read-only if the image is not writable"},
    {"snapshot", OPT_BOOL, NULL,
     "writes go to a temporary overlay, deleted at unmount"},
    {"cache", OPT_ENUM, cache_modes,
     "writeback (default), none, writethrough, directsync, unsafe"},
    {"cache.direct", OPT_BOOL, NULL, "open image files with O_DIRECT"},
    {"cache.no-flush", OPT_BOOL, NULL, "ignore flush requests (unsafe)"},
    {"write-cache", OPT_BOOL, NULL,
     "off: every write is durable before it is acknowledged"},
    {"aio", OPT_ENUM, aio_modes,
     "host file I/O: io_uring (default), threads, native (Linux AIO)"},
    {"detect-zeroes", OPT_ENUM, detect_zeroes_modes,
     "turn writes of zeros into write-zeroes: off (default), on, unmap"},
    {"discard", OPT_ENUM, discard_modes,
     "punching holes deallocates: unmap (default) or ignore"},
    {"werror", OPT_ENUM, werror_modes,
     "on write errors: report (default), ignore, enospc, stop"},
    {"rerror", OPT_ENUM, rerror_modes,
     "on read errors: report (default), ignore, stop"},
    {"locking", OPT_ENUM, locking_modes,
     "lock image files like QEMU: auto (default), on, off"},
    {"force-share", OPT_BOOL, NULL,
     "read-only: open even if another process writes the image"},
    THROTTLE_OPTS("bps-total"),
    THROTTLE_OPTS("bps-read"),
    THROTTLE_OPTS("bps-write"),
    THROTTLE_OPTS("iops-total"),
    THROTTLE_OPTS("iops-read"),
    THROTTLE_OPTS("iops-write"),
    {"throttling.iops-size", OPT_SIZE, NULL,
     "an I/O of N bytes counts as N / iops-size operations"},
    {"throttling.group", OPT_STRING, NULL,
     "drives naming the same group share its limits"},
    {"stats-account-invalid", OPT_BOOL, NULL,
     "count invalid requests in latency statistics (default on)"},
    {"stats-account-failed", OPT_BOOL, NULL,
     "count failed requests in latency statistics (default on)"},
    {"stats-intervals", OPT_STRING, NULL,
     "averaging windows in seconds, e.g. 60,3600"},
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
    o->aio = BLOCK_AIO_IO_URING;
    o->stats_account_invalid = true;
    o->stats_account_failed = true;
    throttle_config_init(&o->throttle);
    o->driver_opts = opt_table_new();
    o->given = opt_table_new();
}

void blk_options_clear(BlockBackendOptions *o)
{
    g_free(o->file);
    g_free(o->format);
    g_free(o->throttle_group);
    g_free(o->stats_intervals);
    if (o->driver_opts) {
        g_hash_table_unref(o->driver_opts);
    }
    if (o->given) {
        g_hash_table_unref(o->given);
    }
    memset(o, 0, sizeof(*o));
}

static GHashTable *opt_table_dup(GHashTable *t)
{
    GHashTable *copy = opt_table_new();
    GHashTableIter it;
    gpointer k, v;

    g_hash_table_iter_init(&it, t);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        g_hash_table_insert(copy, g_strdup(k), g_strdup(v));
    }
    return copy;
}

void blk_options_copy(BlockBackendOptions *dst, const BlockBackendOptions *src)
{
    *dst = *src;
    dst->file = g_strdup(src->file);
    dst->format = g_strdup(src->format);
    dst->throttle_group = g_strdup(src->throttle_group);
    dst->stats_intervals = g_memdup2(src->stats_intervals,
                                     sizeof(unsigned) * src->n_stats_intervals);
    dst->driver_opts = opt_table_dup(src->driver_opts);
    dst->given = opt_table_dup(src->given);
}

static bool opt_tables_equal(GHashTable *a, GHashTable *b)
{
    GHashTableIter it;
    gpointer k, v;

    if (g_hash_table_size(a) != g_hash_table_size(b)) {
        return false;
    }
    g_hash_table_iter_init(&it, a);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        const char *w = g_hash_table_lookup(b, k);

        if (!w || strcmp(v, w)) {
            return false;
        }
    }
    return true;
}

bool blk_options_equal(const BlockBackendOptions *a,
                       const BlockBackendOptions *b)
{
    return !g_strcmp0(a->file, b->file) && !g_strcmp0(a->format, b->format) &&
           opt_tables_equal(a->given, b->given) &&
           opt_tables_equal(a->driver_opts, b->driver_opts);
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

static bool blk_set_throttle_key(BlockBackendOptions *o, const char *key,
                                 const char *value)
{
    const char *name = key + strlen("throttling.");
    uint64_t n;
    int i;

    if (!strcmp(name, "group")) {
        g_free(o->throttle_group);
        o->throttle_group = g_strdup(value);
        return true;
    }
    if (!strcmp(name, "iops-size")) {
        opt_parse_size(value, &o->throttle.iops_size);
        return true;
    }
    opt_parse_number(value, &n);
    for (i = 0; i < THROTTLE_LIMIT_MAX; i++) {
        size_t len = strlen(throttle_limit_names[i]);

        if (strncmp(name, throttle_limit_names[i], len)) {
            continue;
        }
        if (!name[len]) {
            o->throttle.avg[i] = n;
            return true;
        }
        if (!strcmp(name + len, "-max")) {
            o->throttle.max[i] = n;
            return true;
        }
        if (!strcmp(name + len, "-max-length")) {
            o->throttle.max_length[i] = n;
            return true;
        }
    }
    return false;
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

    if (!strcmp(key, "file")) {
        g_free(o->file);
        o->file = g_strdup(value);
    } else if (!strcmp(key, "format")) {
        if (strcmp(value, "help") && !bdrv_find_driver(value)) {
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
    } else if (!strcmp(key, "auto-read-only")) {
        opt_parse_bool(value, &o->auto_read_only);
    } else if (!strcmp(key, "snapshot")) {
        opt_parse_bool(value, &o->snapshot);
    } else if (!strcmp(key, "aio")) {
        o->aio = opt_parse_enum(value, aio_modes);
    } else if (!strcmp(key, "detect-zeroes")) {
        o->detect_zeroes = opt_parse_enum(value, detect_zeroes_modes);
    } else if (!strcmp(key, "discard")) {
        o->discard_unmap = opt_parse_enum(value, discard_modes) % 2 == 1;
    } else if (!strcmp(key, "werror")) {
        o->werror = opt_parse_enum(value, werror_modes);
    } else if (!strcmp(key, "rerror")) {
        static const BlockErrorPolicy map[] = {
            BLOCK_ERROR_REPORT, BLOCK_ERROR_IGNORE, BLOCK_ERROR_STOP};

        o->rerror = map[opt_parse_enum(value, rerror_modes)];
    } else if (!strcmp(key, "locking")) {
        o->locking = opt_parse_enum(value, locking_modes);
    } else if (!strcmp(key, "force-share")) {
        opt_parse_bool(value, &o->force_share);
    } else if (!strcmp(key, "stats-account-invalid")) {
        opt_parse_bool(value, &o->stats_account_invalid);
    } else if (!strcmp(key, "stats-account-failed")) {
        opt_parse_bool(value, &o->stats_account_failed);
    } else if (!strcmp(key, "stats-intervals")) {
        unsigned *v, n;

        if (!block_stats_parse_intervals(value, &v, &n)) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key 'stats-intervals': invalid value '%s' (use "
                        "seconds separated by commas, e.g. 60,3600)",
                        value);
            return -EINVAL;
        }
        g_free(o->stats_intervals);
        o->stats_intervals = v;
        o->n_stats_intervals = n;
    } else if (g_str_has_prefix(key, "throttling.")) {
        blk_set_throttle_key(o, key, value);
    }
    /* cache keys are resolved in blk_options_check (order independent). */
    g_hash_table_replace(o->given, g_strdup(key), g_strdup(value));
    return 0;
}

bool blk_options_check(BlockBackendOptions *o, GError **errp)
{
    const char *v;
    bool b;

    if (!o->file && !g_hash_table_contains(o->driver_opts, "rbd.image")) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_KEY_NOT_FOUND,
                    "key 'file' is missing: name the image file");
        return false;
    }
    o->cache_direct = false;
    o->cache_no_flush = false;
    o->write_cache = true;
    v = g_hash_table_lookup(o->given, "cache");
    if (v) {
        switch (opt_parse_enum(v, cache_modes)) {
        case CACHE_NONE:
            o->cache_direct = true;
            break;
        case CACHE_WRITETHROUGH:
            o->write_cache = false;
            break;
        case CACHE_DIRECTSYNC:
            o->cache_direct = true;
            o->write_cache = false;
            break;
        case CACHE_UNSAFE:
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
    if (o->aio == BLOCK_AIO_NATIVE && !o->cache_direct) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "key 'aio': native needs the image opened with O_DIRECT "
                    "(cache = none or directsync, or cache.direct = on)");
        return false;
    }
    if (o->force_share && !o->read_only) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "key 'force-share': only a read-only drive may share its "
                    "image with writers (add read-only = on)");
        return false;
    }
    if (o->snapshot && (g_hash_table_contains(o->driver_opts, "raw.offset") ||
                        g_hash_table_contains(o->driver_opts, "raw.size"))) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "key 'snapshot': cannot be combined with raw.offset or "
                    "raw.size");
        return false;
    }
    return throttle_config_check(&o->throttle, errp);
}

/* ---- open and close ---- */

typedef struct BlkOpenData {
    BlockBackend *blk;
    GError *err;
    int ret;
} BlkOpenData;

static bool blk_key_matches_driver(const char *key, size_t n,
                                   BlockDriverState *bs)
{
    return bs && strlen(bs->drv->name) == n && !strncmp(bs->drv->name, key, n);
}

/* Every "<driver>.<key>" must belong to a driver the drive really uses. */
static bool blk_check_unused_keys(BlockBackend *blk, BlockDriverState *top,
                                  GError **errp)
{
    GHashTableIter it;
    gpointer k;

    g_hash_table_iter_init(&it, blk->opts.driver_opts);
    while (g_hash_table_iter_next(&it, &k, NULL)) {
        const char *key = k;
        size_t n = strchr(key, '.') - key;
        bool used =
            blk_key_matches_driver(key, n, top) ||
            blk_key_matches_driver(key, n, top->file ? top->file->bs : NULL);

        if (!used) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key '%s' does not apply: the image is %s", key,
                        top->drv->name);
            return false;
        }
    }
    return true;
}

static int blk_open_flags(const BlockBackendOptions *o)
{
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
    if (o->aio == BLOCK_AIO_IO_URING) {
        flags |= BDRV_O_AIO_IO_URING;
    } else if (o->aio == BLOCK_AIO_NATIVE) {
        flags |= BDRV_O_AIO_NATIVE;
    }
    if (o->locking == BLOCK_LOCKING_OFF) {
        flags |= BDRV_O_NO_LOCK;
    } else if (o->locking == BLOCK_LOCKING_ON) {
        flags |= BDRV_O_LOCK_STRICT;
    }
    if (o->force_share) {
        flags |= BDRV_O_FORCE_SHARE;
    }
    return flags;
}

/*
 * snapshot=on: read the image's size and format, create a qcow2 overlay
 * backed by it in the temporary directory, open the overlay (which opens
 * the image read-only as its backing file) and unlink it at once, so it
 * disappears at unmount -- or at a crash.
 */
static BlockDriverState *coroutine_fn
blk_co_open_snapshot(BlockBackend *blk, int flags, GError **errp)
{
    BlockBackendOptions *o = &blk->opts;
    const BlockDriver *qcow2 = bdrv_find_driver("qcow2");
    g_autofree char *base_name = NULL;
    g_autofree char *base_format = NULL;
    g_autofree char *path = NULL;
    BlockDriverState *base, *bs;
    BdrvChild *file;
    int64_t size;
    int fd, ret;

    if (!qcow2 || !qcow2->co_create) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "snapshot = on needs the qcow2 driver, which this build "
                    "lacks");
        return NULL;
    }
    base = bdrv_co_open_root(o->file, o->format, o->driver_opts,
                             flags & ~BDRV_O_RDWR, blk->name, errp);
    if (!base) {
        return NULL;
    }
    size = bdrv_getlength(base);
    base_name = g_strdup(bdrv_name(base));
    base_format = g_strdup(base->drv->name);
    if (!blk_check_unused_keys(blk, base, errp)) {
        bdrv_co_close_root(base);
        return NULL;
    }
    bdrv_co_close_root(base);

    path = g_build_filename(g_get_tmp_dir(), "imgfs-snapshot-XXXXXX", NULL);
    fd = g_mkstemp(path);
    if (fd < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot create the snapshot overlay in %s: %s",
                    g_get_tmp_dir(), g_strerror(err));
        return NULL;
    }
    close(fd);
    file = bdrv_co_open_standalone(path, "", BDRV_O_RDWR, errp);
    if (!file) {
        unlink(path);
        return NULL;
    }
    ret = qcow2->co_create(file, size, base_name, base_format, errp);
    bdrv_co_close_standalone(file);
    if (ret < 0) {
        unlink(path);
        return NULL;
    }
    bs = bdrv_co_open_root(path, "qcow2", NULL,
                           (flags | BDRV_O_RDWR) & ~BDRV_O_NOCACHE, blk->name,
                           errp);
    unlink(path);
    if (bs) {
        blk->snapshot_file = g_steal_pointer(&path);
    }
    return bs;
}

static bool blk_not_writable(int err)
{
    return err == G_FILE_ERROR_ACCES || err == G_FILE_ERROR_ROFS ||
           err == G_FILE_ERROR_PERM;
}

static void coroutine_fn blk_co_open_entry(void *opaque)
{
    BlkOpenData *d = opaque;
    BlockBackend *blk = d->blk;
    BlockBackendOptions *o = &blk->opts;
    int flags = blk_open_flags(o);
    BlockDriverState *bs;

    if (o->snapshot && !o->read_only) {
        bs = blk_co_open_snapshot(blk, flags, &d->err);
    } else {
        bs = bdrv_co_open_root(o->file, o->format, o->driver_opts, flags,
                               blk->name, &d->err);
        if (!bs && o->auto_read_only && !o->read_only &&
            blk_not_writable(d->err->code)) {
            log_warning("drive '%s': %s; opened read-only (auto-read-only)",
                        blk->name, d->err->message);
            g_clear_error(&d->err);
            o->read_only = true;
            bs = bdrv_co_open_root(o->file, o->format, o->driver_opts,
                                   flags & ~BDRV_O_RDWR, blk->name, &d->err);
        }
        if (bs && !blk_check_unused_keys(blk, bs, &d->err)) {
            bdrv_co_close_root(bs);
            bs = NULL;
        }
    }
    if (!bs) {
        d->ret = -EINVAL;
        return;
    }
    blk->root.bs = bs;
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
    blk_options_copy(&blk->opts, opts);
    blk->root.name = "root";
    co_queue_init(&blk->drain_queue);
    co_queue_init(&blk->resume_queue);
    g_mutex_init(&blk->stop_lock);
    block_stats_init(&blk->stats, opts->stats_account_invalid,
                     opts->stats_account_failed, opts->stats_intervals,
                     opts->n_stats_intervals);
    blk->throttled =
        throttle_config_enabled(&opts->throttle) || opts->throttle_group;
    if (blk->throttled) {
        throttle_member_init(&blk->throttle, opts->throttle_group,
                             &opts->throttle);
    }

    aio_co_run_sync(ctx, blk_co_open_entry, &d);
    if (d.ret < 0) {
        g_propagate_error(errp, d.err);
        if (blk->throttled) {
            throttle_member_destroy(&blk->throttle);
        }
        block_stats_clear(&blk->stats);
        blk_options_clear(&blk->opts);
        g_mutex_clear(&blk->stop_lock);
        g_free(blk->snapshot_file);
        g_free(blk->name);
        g_free(blk);
        return NULL;
    }
    return blk;
}

static void blk_abort_held_in_ctx(void *opaque)
{
    BlockBackend *blk = opaque;

    g_mutex_lock(&blk->stop_lock);
    blk->aborting = true;
    blk->stopped = false;
    g_mutex_unlock(&blk->stop_lock);
    co_queue_restart_all(&blk->resume_queue);
}

void blk_abort_held(BlockBackend *blk)
{
    aio_run_sync(blk->ctx, blk_abort_held_in_ctx, blk);
}

typedef struct BlkCloseData {
    BlockBackend *blk;
    int ret;
} BlkCloseData;

static void coroutine_fn blk_co_close_entry(void *opaque)
{
    BlkCloseData *d = opaque;
    BlockBackend *blk = d->blk;

    /* Held requests cannot be retried any more: let them fail. */
    blk_abort_held_in_ctx(blk);
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
    if (blk->throttled) {
        throttle_member_destroy(&blk->throttle);
    }
    block_stats_clear(&blk->stats);
    blk_options_clear(&blk->opts);
    g_mutex_clear(&blk->stop_lock);
    g_free(blk->stop_reason);
    g_free(blk->snapshot_file);
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

/* ---- requests ---- */

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

bool blk_is_stopped(BlockBackend *blk, char **reason)
{
    bool stopped;

    g_mutex_lock(&blk->stop_lock);
    stopped = blk->stopped;
    if (reason) {
        *reason = stopped ? g_strdup(blk->stop_reason) : NULL;
    }
    g_mutex_unlock(&blk->stop_lock);
    return stopped;
}

static void blk_resume_in_ctx(void *opaque)
{
    BlockBackend *blk = opaque;

    g_mutex_lock(&blk->stop_lock);
    if (blk->stopped) {
        log_info("drive '%s': resumed", blk->name);
    }
    blk->stopped = false;
    g_free(blk->stop_reason);
    blk->stop_reason = NULL;
    g_mutex_unlock(&blk->stop_lock);
    co_queue_restart_all(&blk->resume_queue);
}

void blk_resume(BlockBackend *blk)
{
    aio_run_sync(blk->ctx, blk_resume_in_ctx, blk);
}

/* A stopped drive holds every request until resumed. */
static void coroutine_fn blk_co_wait_while_stopped(BlockBackend *blk)
{
    while (blk->stopped) {
        co_queue_wait(&blk->resume_queue, NULL);
    }
}

typedef enum BlkReqType {
    BLK_READ,
    BLK_WRITE,
    BLK_ZEROES,
    BLK_FLUSH,
} BlkReqType;

typedef struct BlkRequest {
    BlkReqType type;
    int64_t offset;
    int64_t bytes;
    IOVector *qiov;
    bool unmap;
} BlkRequest;

static int coroutine_fn blk_co_dispatch(BlockBackend *blk, BlkRequest *r)
{
    BdrvRequestFlags flags = blk->opts.write_cache ? 0 : BDRV_REQ_FUA;
    int ret;

    switch (r->type) {
    case BLK_READ:
        return bdrv_co_preadv(&blk->root, r->offset, r->bytes, r->qiov, 0, 0);
    case BLK_WRITE:
        if (blk->opts.detect_zeroes != BLOCK_DETECT_ZEROES_OFF &&
            iov_is_zero(r->qiov, 0, r->bytes)) {
            if (blk->opts.detect_zeroes == BLOCK_DETECT_ZEROES_UNMAP &&
                blk->opts.discard_unmap) {
                flags |= BDRV_REQ_MAY_UNMAP;
            }
            return bdrv_co_pwrite_zeroes(&blk->root, r->offset, r->bytes,
                                         flags);
        }
        return bdrv_co_pwritev(&blk->root, r->offset, r->bytes, r->qiov, 0,
                               flags);
    case BLK_ZEROES:
        if (r->unmap && blk->opts.discard_unmap) {
            flags |= BDRV_REQ_MAY_UNMAP;
        }
        return bdrv_co_pwrite_zeroes(&blk->root, r->offset, r->bytes, flags);
    case BLK_FLUSH:
        ret = bdrv_co_flush(blk->root.bs);
        return ret;
    }
    return -EINVAL;
}

static BlockErrorPolicy blk_error_policy(BlockBackend *blk, BlkRequest *r,
                                         int ret)
{
    BlockErrorPolicy p =
        r->type == BLK_READ ? blk->opts.rerror : blk->opts.werror;

    if (p == BLOCK_ERROR_ENOSPC) {
        p = ret == -ENOSPC ? BLOCK_ERROR_STOP : BLOCK_ERROR_REPORT;
    }
    return p;
}

static void blk_stop(BlockBackend *blk, BlkRequest *r, int ret)
{
    static const char *const what[] = {"read", "write", "write", "flush"};

    g_mutex_lock(&blk->stop_lock);
    if (!blk->stopped && !blk->aborting) {
        blk->stopped = true;
        g_free(blk->stop_reason);
        blk->stop_reason =
            g_strdup_printf("%s error: %s", what[r->type], g_strerror(-ret));
        log_warning("drive '%s': stopped by a %s; held until "
                    "'imgfs resume'",
                    blk->name, blk->stop_reason);
    }
    g_mutex_unlock(&blk->stop_lock);
}

/*
 * Every request: wait while the drive is stopped, throttle, run, apply
 * the error policy (retrying after a resume for "stop"), account.
 */
static int coroutine_fn blk_co_request(BlockBackend *blk, BlkRequest *r)
{
    static const BlockAcctType acct[] = {BLOCK_ACCT_READ, BLOCK_ACCT_WRITE,
                                         BLOCK_ACCT_WRITE, BLOCK_ACCT_FLUSH};
    int64_t start = aio_clock_ns();
    BlockAcctType type = acct[r->type];
    int ret;

    /* Punching a hole is a discard; zeroing a range (keeping it
     * allocated) is a write, as QEMU counts it. */
    if (r->type == BLK_ZEROES && r->unmap) {
        type = BLOCK_ACCT_DISCARD;
    }

    blk_inc_in_flight(blk);
    blk_co_wait_while_stopped(blk);
    if (blk->throttled && r->type != BLK_FLUSH) {
        throttle_co_wait(&blk->throttle, r->type != BLK_READ, r->bytes);
    }
    for (;;) {
        ret = blk_co_dispatch(blk, r);
        if (ret >= 0) {
            break;
        }
        switch (blk_error_policy(blk, r, ret)) {
        case BLOCK_ERROR_IGNORE:
            /* Never hand out what the buffer held before. */
            if (r->type == BLK_READ) {
                iov_memset(r->qiov, 0, 0, r->bytes);
            }
            ret = 0;
            break;
        case BLOCK_ERROR_STOP:
            blk_stop(blk, r, ret);
            blk_co_wait_while_stopped(blk);
            if (blk->aborting) {
                break; /* closing: fail with the error */
            }
            continue;
        default:
            break;
        }
        break;
    }
    block_stats_account(&blk->stats, type, r->type == BLK_FLUSH ? 0 : r->bytes,
                        aio_clock_ns() - start, ret);
    blk_dec_in_flight(blk);
    return ret;
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

/* An invalid request still counts in the statistics. */
static int blk_invalid(BlockBackend *blk, BlockAcctType type, int ret)
{
    block_stats_account(&blk->stats, type, 0, 0, -EINVAL);
    return ret;
}

int coroutine_fn blk_co_preadv(BlockBackend *blk, int64_t offset, int64_t bytes,
                               IOVector *qiov)
{
    BlkRequest r = {BLK_READ, offset, bytes, qiov, false};

    if (blk_check_range(blk, offset, bytes) < 0) {
        return blk_invalid(blk, BLOCK_ACCT_READ, -EINVAL);
    }
    return blk_co_request(blk, &r);
}

int coroutine_fn blk_co_pwritev(BlockBackend *blk, int64_t offset,
                                int64_t bytes, IOVector *qiov)
{
    BlkRequest r = {BLK_WRITE, offset, bytes, qiov, false};
    int ret;

    if (blk->opts.read_only) {
        return blk_invalid(blk, BLOCK_ACCT_WRITE, -EROFS);
    }
    ret = blk_check_range(blk, offset, bytes);
    if (ret < 0) {
        return blk_invalid(blk, BLOCK_ACCT_WRITE, ret);
    }
    return blk_co_request(blk, &r);
}

int coroutine_fn blk_co_pwrite_zeroes(BlockBackend *blk, int64_t offset,
                                      int64_t bytes, bool unmap)
{
    BlkRequest r = {BLK_ZEROES, offset, bytes, NULL, unmap};
    int ret;

    if (blk->opts.read_only) {
        return blk_invalid(blk, BLOCK_ACCT_DISCARD, -EROFS);
    }
    ret = blk_check_range(blk, offset, bytes);
    if (ret < 0) {
        return blk_invalid(blk, BLOCK_ACCT_DISCARD, ret);
    }
    return blk_co_request(blk, &r);
}

int coroutine_fn blk_co_flush(BlockBackend *blk)
{
    BlkRequest r = {BLK_FLUSH, 0, 0, NULL, false};

    return blk_co_request(blk, &r);
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
    blk_co_wait_while_stopped(blk);
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

/* ---- queries ---- */

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

static GPtrArray *coroutine_fn blk_co_chain(BlockBackend *blk)
{
    GPtrArray *chain = g_ptr_array_new_with_free_func(block_node_info_free);
    BlockDriverState *bs = blk->root.bs;

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
        g_ptr_array_add(chain, info);
    }
    return chain;
}

typedef struct BlkChainData {
    BlockBackend *blk;
    GPtrArray *chain;
} BlkChainData;

static void coroutine_fn blk_co_query_chain(void *opaque)
{
    BlkChainData *d = opaque;

    d->chain = blk_co_chain(d->blk);
}

GPtrArray *blk_query_chain(BlockBackend *blk)
{
    BlkChainData d = {.blk = blk};

    aio_co_run_sync(blk->ctx, blk_co_query_chain, &d);
    return d.chain;
}

static void json_str(GString *out, const char *s)
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

static const char *json_bool(bool b)
{
    return b ? "true" : "false";
}

typedef struct BlkStatusData {
    BlockBackend *blk;
    GString *out;
} BlkStatusData;

static void coroutine_fn blk_co_status(void *opaque)
{
    BlkStatusData *d = opaque;
    BlockBackend *blk = d->blk;
    BlockBackendOptions *o = &blk->opts;
    GString *out = d->out;
    g_autoptr(GPtrArray) chain = blk_co_chain(blk);
    BlockStats stats;
    unsigned i, k;
    int t;

    g_string_append(out, "{\"name\": ");
    json_str(out, blk->name);
    g_mutex_lock(&blk->stop_lock);
    g_string_append_printf(out, ", \"state\": \"%s\"",
                           blk->stopped ? "stopped" : "running");
    if (blk->stopped) {
        g_string_append(out, ", \"stop-reason\": ");
        json_str(out, blk->stop_reason);
    }
    g_mutex_unlock(&blk->stop_lock);
    g_string_append_printf(out, ", \"size\": %" PRId64, blk_getlength(blk));
    g_string_append_printf(out, ", \"in-flight\": %d", blk->in_flight);

    g_string_append_printf(
        out,
        ", \"options\": {\"read-only\": %s, \"snapshot\": %s, "
        "\"cache\": {\"direct\": %s, \"no-flush\": %s, \"writeback\": %s}, "
        "\"aio\": \"%s\", \"detect-zeroes\": \"%s\", \"discard\": \"%s\", "
        "\"werror\": \"%s\", \"rerror\": \"%s\", \"locking\": \"%s\", "
        "\"force-share\": %s, \"stats-account-invalid\": %s, "
        "\"stats-account-failed\": %s",
        json_bool(o->read_only), json_bool(o->snapshot),
        json_bool(o->cache_direct), json_bool(o->cache_no_flush),
        json_bool(o->write_cache), aio_modes[o->aio],
        detect_zeroes_modes[o->detect_zeroes], discard_modes[o->discard_unmap],
        werror_modes[o->werror], werror_modes[o->rerror],
        locking_modes[o->locking], json_bool(o->force_share),
        json_bool(o->stats_account_invalid),
        json_bool(o->stats_account_failed));
    g_string_append(out, ", \"throttling\": {");
    for (t = 0, k = 0; t < THROTTLE_LIMIT_MAX; t++) {
        if (o->throttle.avg[t] > 0) {
            g_string_append_printf(out, "%s\"%s\": %.0f", k++ ? ", " : "",
                                   throttle_limit_names[t], o->throttle.avg[t]);
        }
        if (o->throttle.max[t] > 0) {
            g_string_append_printf(out,
                                   "%s\"%s-max\": %.0f, \"%s-max-length\": "
                                   "%.0f",
                                   k++ ? ", " : "", throttle_limit_names[t],
                                   o->throttle.max[t], throttle_limit_names[t],
                                   o->throttle.max_length[t]);
        }
    }
    if (o->throttle.iops_size) {
        g_string_append_printf(out, "%s\"iops-size\": %" PRIu64,
                               k++ ? ", " : "", o->throttle.iops_size);
    }
    if (o->throttle_group) {
        g_string_append_printf(out, "%s\"group\": ", k++ ? ", " : "");
        json_str(out, o->throttle_group);
    }
    g_string_append(out, "}");
    g_string_append(out, ", \"given\": {");
    {
        g_autoptr(GList) keys = g_hash_table_get_keys(o->given);
        GList *l;

        keys = g_list_sort(keys, (GCompareFunc)strcmp);
        for (l = keys, k = 0; l; l = l->next, k++) {
            g_string_append(out, k ? ", " : "");
            json_str(out, l->data);
            g_string_append(out, ": ");
            json_str(out, g_hash_table_lookup(o->given, l->data));
        }
    }
    g_string_append(out, "}}");

    g_string_append(out, ", \"chain\": [");
    for (i = 0; i < chain->len; i++) {
        BlockNodeInfo *n = g_ptr_array_index(chain, i);

        g_string_append(out, i ? ", {\"filename\": " : "{\"filename\": ");
        json_str(out, n->filename);
        g_string_append(out, ", \"format\": ");
        json_str(out, n->format);
        g_string_append_printf(
            out, ", \"virtual-size\": %" PRId64 ", \"read-only\": %s",
            n->virtual_size, json_bool(n->read_only));
        if (n->backing_file) {
            g_string_append(out, ", \"backing-file\": ");
            json_str(out, n->backing_file);
        }
        g_string_append(out, "}");
    }
    g_string_append(out, "]");

    block_stats_copy(&stats, &blk->stats);
    g_string_append(out, ", \"stats\": ");
    block_stats_to_json(&stats, out);
    block_stats_clear(&stats);
    g_string_append(out, "}");
}

void blk_status_json(BlockBackend *blk, GString *out)
{
    BlkStatusData d = {.blk = blk, .out = out};

    aio_co_run_sync(blk->ctx, blk_co_status, &d);
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
