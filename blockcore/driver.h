/*
 * The driver contract: what a format or protocol driver implements, and
 * the part of the block layer a driver may call.  Users of drives (the
 * FUSE layer) include block.h instead and never see this file.
 *
 * A drive is a tree of nodes (BlockDriverState), each run by one driver.
 * A format node ("raw", "qcow2", "vmdk") reads its image through its
 * child "file" (and possibly "backing" or extent children); a protocol
 * node ("file", "rbd") talks to storage.
 *
 * What blockcore guarantees to every co_* callback:
 *  - it runs in a coroutine in the node's AioContext;
 *  - reads and writes are in range and aligned to bl.request_alignment,
 *    no longer than bl.max_transfer, with buffers aligned to
 *    bl.min_mem_alignment.  Exception: a read of a protocol node may run
 *    past its end up to the next request_alignment boundary; the driver
 *    returns zeros there;
 *  - writes of the same node never overlap a read-modify-write cycle in
 *    flight;
 *  - writes only reach a node opened with BDRV_O_RDWR.
 * So drivers do not re-check any of this.  Missing optional callbacks are
 * emulated (write zeroes) or answered with -ENOTSUP, in io.c only.
 *
 * Errors: every co_* callback returns 0 (or a count) or -errno, never -1
 * with errno.  Open errors also fill *errp with one phrase naming the
 * file and what is wrong.  Corrupt metadata is -EIO plus a message from
 * bdrv_report_corruption(), never an assertion.
 */
#ifndef BLOCKCORE_DRIVER_H
#define BLOCKCORE_DRIVER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include <glib.h>

#include "aio.h"
#include "coroutine.h"
#include "iov.h"
#include "options.h"
#include "util.h"

/*
 * No request reaches past BDRV_MAX_LENGTH, so that rounding any request
 * out to an alignment (at most BDRV_MAX_ALIGNMENT) cannot overflow.
 */
#define BDRV_MAX_ALIGNMENT GiB
#define BDRV_MAX_LENGTH ALIGN_DOWN(INT64_MAX, BDRV_MAX_ALIGNMENT)

typedef struct BlockDriver BlockDriver;
typedef struct BlockDriverState BlockDriverState;
typedef struct BdrvChild BdrvChild;
typedef struct BdrvTrackedRequest BdrvTrackedRequest;

/* Flags of a single request. */
typedef enum BdrvRequestFlags {
    /* write zeroes: the range may be deallocated if it then reads zeros */
    BDRV_REQ_MAY_UNMAP = 1 << 0,
    /* write zeroes: fail with -ENOTSUP instead of writing zero buffers */
    BDRV_REQ_NO_FALLBACK = 1 << 1,
    /* write: the data is on stable storage when the request completes */
    BDRV_REQ_FUA = 1 << 2,
} BdrvRequestFlags;

/* Flags of an open node; children inherit the cache and aio ones. */
enum {
    BDRV_O_RDWR = 1 << 0,
    BDRV_O_NOCACHE = 1 << 1,      /* host files: O_DIRECT */
    BDRV_O_NO_FLUSH = 1 << 2,     /* flushes do nothing (cache=unsafe) */
    BDRV_O_PROBED = 1 << 3,       /* the format was probed, not named */
    BDRV_O_AIO_IO_URING = 1 << 4, /* file: io_uring */
    BDRV_O_AIO_NATIVE = 1 << 5,   /* file: Linux AIO */
    BDRV_O_NO_LOCK = 1 << 6,      /* do not lock image files */
    BDRV_O_FORCE_SHARE = 1 << 7,  /* read-only: tolerate other writers */
    BDRV_O_UNMAP = 1 << 8,        /* discard requests may deallocate */
    BDRV_O_CREATE = 1 << 9,       /* protocol: create or truncate the file */
    BDRV_O_LOCK_STRICT = 1 << 10, /* locking=on: fail if locks unsupported */
};
#define BDRV_O_INHERIT_MASK                                                    \
    (BDRV_O_NOCACHE | BDRV_O_NO_FLUSH | BDRV_O_AIO_IO_URING |                  \
     BDRV_O_AIO_NATIVE | BDRV_O_NO_LOCK | BDRV_O_FORCE_SHARE | BDRV_O_UNMAP |  \
     BDRV_O_LOCK_STRICT)

/* Answers of co_block_status. */
#define BDRV_BLOCK_DATA 0x01         /* reads come from *file at *map */
#define BDRV_BLOCK_ZERO 0x02         /* reads as zeros */
#define BDRV_BLOCK_OFFSET_VALID 0x04 /* *map and *file are set */
#define BDRV_BLOCK_RAW 0x08          /* ask *file about *map instead */
#define BDRV_BLOCK_ALLOCATED 0x10    /* set by blockcore: this layer */
#define BDRV_BLOCK_EOF 0x20          /* the range reaches the end */

typedef enum PreallocMode {
    PREALLOC_OFF,
    PREALLOC_METADATA,
    PREALLOC_FALLOC,
    PREALLOC_FULL,
} PreallocMode;

typedef struct BlockLimits {
    /* Offsets and lengths of reads and writes are multiples of this. */
    uint32_t request_alignment;
    /* Buffer addresses and iovec lengths are multiples of this. */
    uint32_t min_mem_alignment;
    /* Alignment for buffers allocated for this node (>= min). */
    uint32_t opt_mem_alignment;
    /* Longest read or write handed to the driver; 0: no limit. */
    int64_t max_transfer;
    /* Preferred granularity of write zeroes and discard; 0: any. */
    uint32_t pwrite_zeroes_alignment;
    int64_t max_pwrite_zeroes;
    uint32_t pdiscard_alignment;
    int64_t max_pdiscard;
} BlockLimits;

enum BdrvChildRole {
    BDRV_CHILD_FILE,    /* the image file a format node reads */
    BDRV_CHILD_BACKING, /* the backing image (read-only) */
    BDRV_CHILD_DATA,    /* an external data file */
    BDRV_CHILD_EXTENT,  /* one of several extents (vmdk) */
};

struct BdrvChild {
    char *name;
    BlockDriverState *bs;
    BlockDriverState *parent;
    int role;
    BdrvChild *next;
};

/* What "imgfs info" shows; filled by blockcore and the drivers. */
typedef struct ImageInfoSpec {
    /* Extra key/value pairs, in order: "cluster-size" -> "65536"... */
    GPtrArray *keys;   /* char * */
    GPtrArray *values; /* char * */
} ImageInfoSpec;

void image_info_add(ImageInfoSpec *spec, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

struct BlockDriver {
    /* The format or protocol name used in config files ("qcow2"). */
    const char *name;
    /* One line for "imgfs formats". */
    const char *description;
    /* Filenames "<prefix>:..." select this protocol ("rbd"). */
    const char *protocol_prefix;
    /* Size of the driver's state, bs->opaque. */
    size_t instance_size;
    bool is_format;
    bool is_protocol;
    /* May this format have a backing file? */
    bool supports_backing;
    /* The keys this driver accepts as "<name>.<key>"; ends with {0}. */
    const OptDesc *options;

    /*
     * Formats: how sure is the driver that @buf (the first @len bytes of
     * the image; @len is less than 4096 only for shorter images) is its
     * format?  0: not at all, 1: can read anything (raw), 100: magic and
     * header matched.
     */
    int (*probe)(const uint8_t *buf, size_t len, const char *filename);

    /*
     * Open the node.  For a format, bs->file is already open (the
     * protocol node of the image).  @options holds the driver's own keys
     * without the "<name>." prefix; @flags the BDRV_O_* flags.  Must set
     * bs->total_bytes.  On error: -errno and *errp set.
     */
    int coroutine_fn (*co_open)(BlockDriverState *bs, GHashTable *options,
                                int flags, GError **errp);

    /*
     * Release the driver's state.  blockcore has already flushed the node
     * (and will close the children afterwards).  May still do I/O, e.g.
     * to mark an image clean.
     */
    void coroutine_fn (*co_close)(BlockDriverState *bs);

    /* Fill in limits that differ from the defaults (all alignments 1,
     * no maximum); called after co_open. */
    void (*refresh_limits)(BlockDriverState *bs, BlockLimits *bl);

    /* Current length in bytes, when the driver can re-read it. */
    int64_t coroutine_fn (*co_getlength)(BlockDriverState *bs);

    /* Read @bytes at @offset into @qiov starting at @qiov_offset. */
    int coroutine_fn (*co_preadv)(BlockDriverState *bs, int64_t offset,
                                  int64_t bytes, IOVector *qiov,
                                  size_t qiov_offset, BdrvRequestFlags flags);

    /* Write; @flags may contain BDRV_REQ_FUA if supported_write_flags
     * says so, otherwise blockcore flushes after the write. */
    int coroutine_fn (*co_pwritev)(BlockDriverState *bs, int64_t offset,
                                   int64_t bytes, IOVector *qiov,
                                   size_t qiov_offset, BdrvRequestFlags flags);

    /*
     * Format: write cached metadata to the children.  Protocol: make
     * everything written so far durable.  blockcore flushes the children
     * after a format's co_flush.  Optional.
     */
    int coroutine_fn (*co_flush)(BlockDriverState *bs);

    /* Make the range read as zeros (MAY_UNMAP: deallocation allowed).
     * -ENOTSUP makes blockcore write zero buffers.  Optional. */
    int coroutine_fn (*co_pwrite_zeroes)(BlockDriverState *bs, int64_t offset,
                                         int64_t bytes, BdrvRequestFlags flags);

    /* Deallocate if possible; contents afterwards are undefined.
     * Optional (blockcore answers -ENOTSUP). */
    int coroutine_fn (*co_pdiscard)(BlockDriverState *bs, int64_t offset,
                                    int64_t bytes);

    /* Resize to @offset.  @exact: the size must be exactly @offset (else
     * a larger size is acceptable).  Must update nothing in blockcore:
     * blockcore sets total_bytes afterwards.  Optional (-ENOTSUP). */
    int coroutine_fn (*co_truncate)(BlockDriverState *bs, int64_t offset,
                                    bool exact, PreallocMode prealloc,
                                    GError **errp);

    /*
     * Describe [@offset, @offset + @bytes): return BDRV_BLOCK_* flags for
     * the first *@pnum bytes (at least one byte, at most @bytes).  DATA or
     * ZERO mean allocated in this node; neither means "ask the backing
     * file".  With OFFSET_VALID, *@map is the offset in *@file.  With
     * RAW, blockcore asks *@file about *@map.  Optional: everything is
     * then data.
     */
    int coroutine_fn (*co_block_status)(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes, int64_t *pnum,
                                        int64_t *map, BlockDriverState **file);

    /* Add format specific lines to "imgfs info".  Optional. */
    void coroutine_fn (*co_get_info)(BlockDriverState *bs, ImageInfoSpec *spec);

    /* Bytes of host storage the node uses, or -ENOTSUP.  Optional. */
    int64_t coroutine_fn (*co_get_allocated_size)(BlockDriverState *bs);

    /*
     * Formats imgfs can create (e.g. the temporary overlay of
     * snapshot=on): write a new, empty image of @size bytes into @file (an
     * open, empty, writable protocol node), with an optional backing file
     * and its format.  Optional.
     */
    int coroutine_fn (*co_create)(BdrvChild *file, int64_t size,
                                  const char *backing_file,
                                  const char *backing_format, GError **errp);
};

typedef LIST_HEAD(, BdrvTrackedRequest) BdrvTrackedList;

struct BlockDriverState {
    const BlockDriver *drv;
    void *opaque;
    AioContext *ctx;

    /* The image as named (absolute for local files) and its driver's
     * view of it, for messages. */
    char *filename;
    /* The drive this node belongs to (for messages), may be NULL. */
    char *drive_name;
    int open_flags;
    bool read_only;
    /* Virtual size (formats) or storage size (protocols). */
    int64_t total_bytes;
    BlockLimits bl;
    /* Write flags the driver implements natively (BDRV_REQ_FUA...). */
    int supported_write_flags;
    int supported_zero_flags;

    BdrvChild *file;
    BdrvChild *backing;
    BdrvChild *children; /* all children, linked by ->next */
    /* The backing file name and format as recorded in the image. */
    char *backing_file;
    char *backing_format;
    /* Depth in a backing chain: 0 for the top image. */
    int chain_depth;
    BlockDriverState *chain_parent;

    int refcnt;

    /* Request tracking (io.c). */
    BdrvTrackedList tracked_requests;
    int in_flight;
    int serialising_in_flight;
    uint64_t write_gen;   /* bumped as each write completes */
    uint64_t flushed_gen; /* write_gen at the last completed flush */
    bool flush_running;
    CoQueue flush_queue;

    int corruption_reports; /* atomic; limits log noise */
};

/* Driver table (drivers.c). */
const BlockDriver *bdrv_find_driver(const char *name);
const BlockDriver *bdrv_find_protocol_for(const char *filename);
/* NULL-terminated list of all drivers built in. */
const BlockDriver *const *bdrv_driver_list(void);
/* The best format for an image starting with @buf; NULL if none. */
const BlockDriver *bdrv_probe_format(const uint8_t *buf, size_t len,
                                     const char *filename, int *score);

/*
 * Open a child node for @parent: the image @filename with format
 * @format (NULL: probe; "" or the protocol name: protocol node only).
 * Flags are inherited from the parent unless @flags overrides
 * (pass -1 to inherit everything but BDRV_O_RDWR from the parent, which
 * is kept only for BDRV_CHILD_FILE/DATA/EXTENT children).
 */
BdrvChild *coroutine_fn bdrv_co_open_child(BlockDriverState *parent,
                                           const char *name, int role,
                                           const char *filename,
                                           const char *format, int flags,
                                           GError **errp);
/*
 * Open the backing file @bs->backing_file (relative names resolve against
 * the directory of @bs's image) with format @bs->backing_format (NULL:
 * probe), read-only, and attach it as bs->backing.  Detects loops and
 * chains deeper than BDRV_MAX_CHAIN_DEPTH.
 */
#define BDRV_MAX_CHAIN_DEPTH 64
int coroutine_fn bdrv_co_open_backing(BlockDriverState *bs, GError **errp);
/*
 * A node tree with no parent (for creating images, and for tests): open
 * @filename with @format as above, or with the driver @drv directly
 * (then @filename goes to it as option "filename").  Close with
 * bdrv_co_close_standalone().
 */
BdrvChild *coroutine_fn bdrv_co_open_standalone(const char *filename,
                                                const char *format, int flags,
                                                GError **errp);
BdrvChild *coroutine_fn
bdrv_co_open_driver_standalone(const BlockDriver *drv, const char *filename,
                               GHashTable *opts, int flags, GError **errp);
void coroutine_fn bdrv_co_close_standalone(BdrvChild *child);
/* Close and free a child node. */
void coroutine_fn bdrv_co_unref_child(BlockDriverState *parent,
                                      BdrvChild *child);
/* Resolve @name relative to the directory of @bs's file. */
char *bdrv_resolve_relative(BlockDriverState *bs, const char *name);

/* I/O on a child (io.c).  Same rules as the driver callbacks. */
int coroutine_fn bdrv_co_preadv(BdrvChild *child, int64_t offset, int64_t bytes,
                                IOVector *qiov, size_t qiov_offset,
                                BdrvRequestFlags flags);
int coroutine_fn bdrv_co_pwritev(BdrvChild *child, int64_t offset,
                                 int64_t bytes, IOVector *qiov,
                                 size_t qiov_offset, BdrvRequestFlags flags);
int coroutine_fn bdrv_co_pread(BdrvChild *child, int64_t offset, int64_t bytes,
                               void *buf, BdrvRequestFlags flags);
int coroutine_fn bdrv_co_pwrite(BdrvChild *child, int64_t offset, int64_t bytes,
                                const void *buf, BdrvRequestFlags flags);
int coroutine_fn bdrv_co_pwrite_zeroes(BdrvChild *child, int64_t offset,
                                       int64_t bytes, BdrvRequestFlags flags);
int coroutine_fn bdrv_co_pdiscard(BdrvChild *child, int64_t offset,
                                  int64_t bytes);
int coroutine_fn bdrv_co_flush(BlockDriverState *bs);
int coroutine_fn bdrv_co_truncate(BdrvChild *child, int64_t offset, bool exact,
                                  PreallocMode prealloc, GError **errp);
int coroutine_fn bdrv_co_block_status(BlockDriverState *bs, int64_t offset,
                                      int64_t bytes, int64_t *pnum,
                                      int64_t *map, BlockDriverState **file);
/*
 * Status through the backing chain: like bdrv_co_block_status, but an
 * unallocated range is looked up in the backing files (BDRV_BLOCK_ZERO
 * past their end or when there are none).
 */
int coroutine_fn bdrv_co_block_status_above(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes,
                                            int64_t *pnum);
int64_t bdrv_getlength(BlockDriverState *bs);
/* Re-read the length from the driver (protocols change size). */
int64_t coroutine_fn bdrv_co_refresh_length(BlockDriverState *bs);

/* Buffers aligned for I/O on @bs; free with bdrv_vfree(). */
void *bdrv_blockalign(BlockDriverState *bs, size_t size);
void *bdrv_try_blockalign(BlockDriverState *bs, size_t size);
void bdrv_vfree(void *p);

/*
 * Log that @bs has corrupt metadata at @offset (-1: unknown), e.g.
 * "imgfs: disk0: /img/a.qcow2: corrupt L2 table at 0x50000: ...".
 * Returns -EIO for convenience.
 */
int bdrv_report_corruption(BlockDriverState *bs, int64_t offset,
                           const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Human readable name of the node for messages: its filename. */
const char *bdrv_name(BlockDriverState *bs);

#endif /* BLOCKCORE_DRIVER_H */
