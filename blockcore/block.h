/*
 * The block layer as its users see it: a BlockBackend per drive, opened
 * from typed options, with coroutine I/O entry points.  The FUSE layer
 * includes only this header (plus aio.h/coroutine.h); drivers include
 * driver.h.
 *
 * Thread model: a BlockBackend lives in one AioContext (its drive's home
 * event loop).  blk_co_* run in coroutines of that context; blk_open and
 * blk_close may be called from any thread and run their work there.
 * blk_getlength and blk_is_read_only are safe from any thread.
 */
#ifndef BLOCKCORE_BLOCK_H
#define BLOCKCORE_BLOCK_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

#include "aio.h"
#include "coroutine.h"
#include "iov.h"
#include "options.h"
#include "stats.h"
#include "throttle.h"

typedef struct BlockBackend BlockBackend;

typedef enum BlockAioMode {
    BLOCK_AIO_THREADS,
    BLOCK_AIO_IO_URING,
    BLOCK_AIO_NATIVE,
} BlockAioMode;

typedef enum BlockDetectZeroes {
    BLOCK_DETECT_ZEROES_OFF,
    BLOCK_DETECT_ZEROES_ON,
    BLOCK_DETECT_ZEROES_UNMAP,
} BlockDetectZeroes;

/* What a failed request does (werror, rerror). */
typedef enum BlockErrorPolicy {
    BLOCK_ERROR_REPORT, /* fail the request */
    BLOCK_ERROR_IGNORE, /* pretend it succeeded */
    BLOCK_ERROR_ENOSPC, /* stop on ENOSPC, report other errors */
    BLOCK_ERROR_STOP,   /* hold it and later requests until resumed */
} BlockErrorPolicy;

typedef enum BlockLocking {
    BLOCK_LOCKING_AUTO,
    BLOCK_LOCKING_ON,
    BLOCK_LOCKING_OFF,
} BlockLocking;

/* A drive's settings, as parsed from its config group. */
typedef struct BlockBackendOptions {
    char *file;   /* image file name or protocol URI; may be NULL if the
                     protocol's own keys name the image (rbd.image) */
    char *format; /* NULL: probe the content */
    bool read_only;
    bool auto_read_only; /* fall back to read-only if not writable */
    bool snapshot;       /* writes go to a temporary overlay */
    bool cache_direct;   /* open host files with O_DIRECT */
    bool cache_no_flush; /* ignore flushes (cache=unsafe) */
    bool write_cache;    /* false: every write is durable when acknowledged */
    BlockAioMode aio;
    bool discard_unmap; /* discard=unmap: punching holes deallocates */
    BlockDetectZeroes detect_zeroes;
    BlockErrorPolicy werror;
    BlockErrorPolicy rerror;
    BlockLocking locking;
    bool force_share; /* read-only: tolerate other writers (qemu-img -U) */
    ThrottleConfig throttle;
    char *throttle_group;
    bool stats_account_invalid;
    bool stats_account_failed;
    unsigned *stats_intervals; /* seconds */
    unsigned n_stats_intervals;
    /* Driver keys: "raw.offset" -> "1M".  Owned. */
    GHashTable *driver_opts;
    /* The generic keys given, as written. */
    GHashTable *given;
} BlockBackendOptions;

void blk_options_init(BlockBackendOptions *o);
void blk_options_clear(BlockBackendOptions *o);
/*
 * Apply one config key.  Returns 0; -ENOENT for a key nobody knows
 * (*errp untouched, so the caller can word it); -EINVAL for a bad value
 * (*errp says "key 'K': invalid ...").
 */
int blk_options_set(BlockBackendOptions *o, const char *key, const char *value,
                    GError **errp);
/* Whole-drive checks once every key is set (e.g. a file is named);
 * resolves the cache keys. */
bool blk_options_check(BlockBackendOptions *o, GError **errp);
/* Copy of @src (for per-drive defaults taken from a global group). */
void blk_options_copy(BlockBackendOptions *dst, const BlockBackendOptions *src);
/* Do two drive settings differ in anything that needs a reopen? */
bool blk_options_equal(const BlockBackendOptions *a,
                       const BlockBackendOptions *b);
/* The generic keys and their descriptions, for --help. */
const OptDesc *blk_option_table(void);
/* A local file name relative to @base_dir made absolute; URIs of other
 * protocols ("rbd:pool/img") are returned unchanged. */
char *blk_resolve_filename(const char *filename, const char *base_dir);

/*
 * Open a drive.  Runs the open in @ctx (borrowing it if no thread runs
 * it yet) and waits.  Errors read "cannot open 'FILE': reason".
 */
BlockBackend *blk_open(const char *name, const BlockBackendOptions *opts,
                       AioContext *ctx, GError **errp);
/* Flush and close; returns the flush result (0 or -errno). */
int blk_close(BlockBackend *blk);

const char *blk_name(BlockBackend *blk);
AioContext *blk_get_aio_context(BlockBackend *blk);
bool blk_is_read_only(BlockBackend *blk);
int64_t blk_getlength(BlockBackend *blk);
/* Memory alignment for buffers given to this backend. */
size_t blk_mem_alignment(BlockBackend *blk);
void *blk_blockalign(BlockBackend *blk, size_t size);

/*
 * I/O.  Offsets and lengths are in bytes; nothing needs to be aligned.
 * Return 0 or -errno.  Requests past the end fail: reads with -EINVAL,
 * writes with -ENOSPC.
 */
int coroutine_fn blk_co_preadv(BlockBackend *blk, int64_t offset, int64_t bytes,
                               IOVector *qiov);
int coroutine_fn blk_co_pwritev(BlockBackend *blk, int64_t offset,
                                int64_t bytes, IOVector *qiov);
/* @unmap: the range may be deallocated (it still reads as zeros). */
int coroutine_fn blk_co_pwrite_zeroes(BlockBackend *blk, int64_t offset,
                                      int64_t bytes, bool unmap);
int coroutine_fn blk_co_flush(BlockBackend *blk);
int coroutine_fn blk_co_truncate(BlockBackend *blk, int64_t size,
                                 GError **errp);
/*
 * Is [@offset, ...) known to read as zeros?  Sets *@pnum to the length of
 * the run with the same answer (> 0) and *@is_zero.  @offset must be
 * below the length.
 */
int coroutine_fn blk_co_zero_status(BlockBackend *blk, int64_t offset,
                                    int64_t bytes, int64_t *pnum,
                                    bool *is_zero);

/* Wait until no request of this backend is in flight. */
void coroutine_fn blk_co_drain(BlockBackend *blk);

/* Stopped by an error (werror/rerror = stop)?  Any thread.  *reason is
 * a copy to g_free(). */
bool blk_is_stopped(BlockBackend *blk, char **reason);
/* Retry the held requests.  Any thread. */
void blk_resume(BlockBackend *blk);
/* Fail the held requests and stop holding (at unmount).  Any thread. */
void blk_abort_held(BlockBackend *blk);
/*
 * Everything "imgfs status" shows about the drive, as a JSON object:
 * state, options in effect, image chain, statistics.  Any thread (runs
 * in the drive's context and waits).
 */
void blk_status_json(BlockBackend *blk, GString *out);

/* One node of a drive's image chain, for "imgfs info" and status. */
typedef struct BlockNodeInfo {
    char *filename;
    char *format;
    int64_t virtual_size;
    int64_t allocated_bytes; /* -1: unknown */
    char *backing_file;      /* as recorded in the image, or NULL */
    char *backing_format;
    bool read_only;
    GPtrArray *keys;   /* format specific: char * */
    GPtrArray *values; /* char * */
} BlockNodeInfo;

/* The chain from the top image down its backing files; free with
 * g_ptr_array_unref.  Runs in the backend's context and waits. */
GPtrArray *blk_query_chain(BlockBackend *blk);

/* "imgfs formats": the drivers built in. */
void blk_list_drivers(GString *out);

#endif /* BLOCKCORE_BLOCK_H */
