/*
 * qcow2: the declarations shared by the files of the qcow2 driver, grouped
 * by the file that defines them.  Nothing outside drivers/qcow2/ includes
 * this header.
 *
 * The on-disk format is QEMU's (docs/interop/qcow2.rst in QEMU): a header
 * in cluster 0, a two-level mapping (L1 table in memory, L2 tables through
 * a cache) from guest clusters to host clusters, and a two-level refcount
 * structure (refcount table in memory, refcount blocks through a cache).
 *
 * Thread model: a qcow2 node lives in one AioContext; all its coroutines
 * run on that thread, so the state below needs no atomics.  Coroutines
 * yield during I/O, so every multi-step change of shared state happens
 * under one of the locks:
 *
 *   lock        (CoMutex) metadata updates: the allocator and refcounts,
 *               L2 entry changes, the L1 table, the header, the in-flight
 *               allocation list and the pending frees.  Never held
 *               across guest data I/O.  Lookups take no lock.
 *   flush_lock  (CoMutex) writing cached tables back; taken after lock
 *               when both are needed, never the other way round.
 *
 * Crash safety comes from ordering, enforced in qcow2-cache.c:
 *  - a new cluster's refcount reaches the disk before any L2/L1 entry that
 *    points to it (unless lazy refcounts: then the dirty bit covers it);
 *  - guest data (and copy-on-write data) reaches the disk before the L2
 *    entry that points to it;
 *  - a dropped reference reaches the disk before the refcount decrement
 *    (decrements wait in a pending list until a flush made the change
 *    durable), so a crash leaves at most leaked clusters.
 */
#ifndef DRIVERS_QCOW2_QCOW2_H
#define DRIVERS_QCOW2_QCOW2_H

#include <endian.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/queue.h>

#include "blockcore/driver.h"
#include "blockcore/log.h"

/* ---- on-disk constants ---- */

#define QCOW2_MAGIC 0x514649fbU /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_EXTL2_MIN_CLUSTER_BITS 14
#define QCOW2_MAX_L1_BYTES (32 * MiB)
#define QCOW2_MAX_REFTABLE_BYTES (8 * MiB)
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_TABLE (64 * MiB)
#define QCOW2_MAX_BACKING_NAME 1023
/* QEMU's bound on the bitmap directory (65535 bitmaps of 1 KiB). */
#define QCOW2_MAX_BITMAP_DIR (64 * MiB)
#define QCOW2_MAX_HOST_OFFSET ((UINT64_C(1) << 56) - 1)
#define QCOW2_V2_HEADER_LENGTH 72
#define QCOW2_V3_HEADER_LENGTH 104

/* Byte offsets of the header fields. */
enum {
    QCOW2_HDR_MAGIC = 0,
    QCOW2_HDR_VERSION = 4,
    QCOW2_HDR_BACKING_OFFSET = 8,
    QCOW2_HDR_BACKING_SIZE = 16,
    QCOW2_HDR_CLUSTER_BITS = 20,
    QCOW2_HDR_SIZE = 24,
    QCOW2_HDR_CRYPT_METHOD = 32,
    QCOW2_HDR_L1_SIZE = 36,
    QCOW2_HDR_L1_OFFSET = 40,
    QCOW2_HDR_REFTABLE_OFFSET = 48,
    QCOW2_HDR_REFTABLE_CLUSTERS = 56,
    QCOW2_HDR_NB_SNAPSHOTS = 60,
    QCOW2_HDR_SNAPSHOTS_OFFSET = 64,
    QCOW2_HDR_INCOMPATIBLE = 72,
    QCOW2_HDR_COMPATIBLE = 80,
    QCOW2_HDR_AUTOCLEAR = 88,
    QCOW2_HDR_REFCOUNT_ORDER = 96,
    QCOW2_HDR_HEADER_LENGTH = 100,
    QCOW2_HDR_COMPRESSION_TYPE = 104,
};

#define QCOW2_INCOMPAT_DIRTY (UINT64_C(1) << 0)
#define QCOW2_INCOMPAT_CORRUPT (UINT64_C(1) << 1)
#define QCOW2_INCOMPAT_DATA_FILE (UINT64_C(1) << 2)
#define QCOW2_INCOMPAT_COMPRESSION (UINT64_C(1) << 3)
#define QCOW2_INCOMPAT_EXTL2 (UINT64_C(1) << 4)
#define QCOW2_INCOMPAT_KNOWN                                                   \
    (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT |                           \
     QCOW2_INCOMPAT_DATA_FILE | QCOW2_INCOMPAT_COMPRESSION |                   \
     QCOW2_INCOMPAT_EXTL2)
#define QCOW2_COMPAT_LAZY_REFCOUNTS (UINT64_C(1) << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (UINT64_C(1) << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (UINT64_C(1) << 1)

enum {
    QCOW2_EXT_END = 0,
    QCOW2_EXT_BACKING_FORMAT = 0xe2792aca,
    QCOW2_EXT_FEATURE_TABLE = 0x6803f857,
    QCOW2_EXT_BITMAPS = 0x23852875,
    QCOW2_EXT_CRYPTO = 0x0537be77,
    QCOW2_EXT_DATA_FILE = 0x44415441,
};

enum { QCOW2_COMPRESS_ZLIB = 0, QCOW2_COMPRESS_ZSTD = 1 };

#define QCOW2_OFLAG_COPIED (UINT64_C(1) << 63)
#define QCOW2_OFLAG_COMPRESSED (UINT64_C(1) << 62)
#define QCOW2_OFLAG_ZERO (UINT64_C(1) << 0)
#define QCOW2_L1E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define QCOW2_L1E_RESERVED UINT64_C(0x7f000000000001ff)
#define QCOW2_L2E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define QCOW2_REFT_OFFSET_MASK UINT64_C(0xfffffffffffffe00)

/* What a subcluster (a whole cluster without extended L2) is. */
typedef enum Qcow2SubclusterType {
    QCOW2_SC_UNALLOCATED,       /* reads from the backing file or zeros */
    QCOW2_SC_UNALLOCATED_ALLOC, /* the same, with a host cluster reserved */
    QCOW2_SC_ZERO_PLAIN,        /* reads as zeros, no host cluster */
    QCOW2_SC_ZERO_ALLOC,        /* reads as zeros, host cluster reserved */
    QCOW2_SC_NORMAL,            /* data at the host offset */
    QCOW2_SC_COMPRESSED,        /* compressed data (whole cluster) */
    QCOW2_SC_INVALID,
} Qcow2SubclusterType;

/* Kinds of metadata clusters, for the overlap check. */
typedef enum Qcow2MetaType {
    QCOW2_META_NONE = 0,
    QCOW2_META_HEADER,
    QCOW2_META_L1,
    QCOW2_META_L2,
    QCOW2_META_REFTABLE,
    QCOW2_META_REFBLOCK,
    QCOW2_META_SNAPSHOT_TABLE,
    QCOW2_META_SNAPSHOT_L1,
    QCOW2_META_BITMAP_DIR,
} Qcow2MetaType;

/* ---- state ---- */

typedef struct Qcow2CacheEntry Qcow2CacheEntry;
typedef struct Qcow2Cache Qcow2Cache;

typedef struct Qcow2Snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
} Qcow2Snapshot;

typedef struct Qcow2Feature {
    uint8_t type; /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    char name[47];
} Qcow2Feature;

/* A guest range whose clusters are being allocated (lock protects). */
typedef struct Qcow2Alloc {
    uint64_t start;
    uint64_t end;
    CoQueue waiters; /* requests for the same clusters */
    LIST_ENTRY(Qcow2Alloc) next;
} Qcow2Alloc;

/* A host range with data I/O in flight, looked up without the lock. */
typedef struct Qcow2HostIO {
    uint64_t start;
    uint64_t end;
    LIST_ENTRY(Qcow2HostIO) next;
} Qcow2HostIO;

/* A refcount decrement waiting until the dropped reference is durable. */
typedef struct Qcow2PendingFree {
    uint64_t offset;
    uint64_t clusters;
} Qcow2PendingFree;

typedef struct Qcow2State {
    BlockDriverState *bs;

    /* Geometry, from the header. */
    int version;
    unsigned cluster_bits;
    int64_t cluster_size;
    unsigned l2_bits; /* log2 of the entries of an L2 table */
    int64_t l2_entries;
    unsigned l2_entry_bytes; /* 8, or 16 with extended L2 entries */
    bool extended_l2;
    unsigned sc_per_cluster; /* 32 with extended L2, else 1 */
    int64_t sc_size;
    unsigned refcount_order;
    unsigned refcount_bits;
    uint64_t refcount_max;
    unsigned refblock_bits; /* log2 of the entries of a refcount block */
    int64_t refblock_entries;
    int compression_type;
    uint64_t incompatible;
    uint64_t compatible;
    uint64_t autoclear;
    uint32_t header_length;
    uint64_t size; /* virtual size */

    /* The active L1 table, in host byte order (lock protects changes). */
    uint64_t l1_offset;
    uint32_t l1_size;
    uint64_t *l1;

    /* The refcount table, in host byte order. */
    uint64_t reftable_offset;
    uint32_t reftable_clusters;
    uint64_t reftable_entries;
    uint64_t *reftable;

    /* Internal snapshots (read, kept intact, never rewritten). */
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t snapshots_bytes;
    Qcow2Snapshot *snapshots;

    /* The bitmaps extension (kept; its clusters are counted on repair). */
    bool has_bitmaps;
    uint32_t nb_bitmaps;
    uint64_t bitmap_dir_offset;
    uint64_t bitmap_dir_size;

    Qcow2Feature *features;
    int nb_features;

    /* Where guest data lives: bs->file, or the external data file. */
    BdrvChild *data_file;
    char *data_file_name;
    bool data_file_raw;

    bool lazy_refcounts;
    bool broken; /* an inconsistency was found: writes are refused */

    Qcow2Cache *l2_cache;
    Qcow2Cache *rb_cache;
    /* Every L2 change gets a sequence number; l2_durable_seq: the changes
     * up to it have their refcounts and data on disk (flush_lock). */
    uint64_t l2_mod_seq;
    uint64_t l2_durable_seq;

    CoMutex lock;
    CoMutex flush_lock;
    LIST_HEAD(, Qcow2Alloc) allocs;    /* lock */
    LIST_HEAD(, Qcow2HostIO) host_ios; /* no lock: list ops never yield */
    GArray *pending_frees;             /* Qcow2PendingFree, lock */

    /* Allocator hint: no free cluster below this index (lock). */
    int64_t free_hint;
    /* Host clusters at or past this offset were never written since the
     * open (they were past the end of the file), so they read as zeros.
     * It is also the end of everything allocated (lock). */
    uint64_t fresh_start;
    /* The image file was extended ahead of the allocator (lock). */
    bool preallocated;
    bool no_prealloc;
    /* Cluster index -> Qcow2MetaType of the active metadata. */
    GHashTable *meta;

    /* Options. */
    uint64_t l2_cache_bytes;
    uint64_t rb_cache_bytes;
    uint64_t clean_interval;
    AioTimer *clean_timer;
} Qcow2State;

/* Big-endian fields at any byte address. */
static inline uint64_t qcow2_get_be64(const void *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return be64toh(v);
}

static inline uint32_t qcow2_get_be32(const void *p)
{
    uint32_t v;

    memcpy(&v, p, 4);
    return be32toh(v);
}

static inline uint16_t qcow2_get_be16(const void *p)
{
    uint16_t v;

    memcpy(&v, p, 2);
    return be16toh(v);
}

static inline void qcow2_put_be64(void *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static inline void qcow2_put_be16(void *p, uint16_t v)
{
    v = htobe16(v);
    memcpy(p, &v, 2);
}

static inline void qcow2_put_be32(void *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}

static inline uint64_t qcow2_offset_into_cluster(const Qcow2State *s,
                                                 uint64_t offset)
{
    return offset & (s->cluster_size - 1);
}

static inline uint64_t qcow2_start_of_cluster(const Qcow2State *s,
                                              uint64_t offset)
{
    return offset & ~(uint64_t)(s->cluster_size - 1);
}

static inline int64_t qcow2_cluster_index(const Qcow2State *s, uint64_t offset)
{
    return offset >> s->cluster_bits;
}

/* Guest bytes mapped by one L2 table. */
static inline uint64_t qcow2_l2_coverage(const Qcow2State *s)
{
    return (uint64_t)s->l2_entries << s->cluster_bits;
}

static inline bool qcow2_has_data_file(const Qcow2State *s)
{
    return s->data_file != s->bs->file;
}

/* ---- qcow2.c ---- */

/*
 * Log corrupt metadata at @offset (naming drive and image) and return
 * -EIO.  @fatal: the inconsistency could make writes damage the image, so
 * further writes are refused and a writable image gets its corrupt bit.
 */
int qcow2_signal_corruption(Qcow2State *s, bool fatal, int64_t offset,
                            const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Write @len bytes of the header at @field (big-endian bytes in @buf). */
int coroutine_fn qcow2_co_write_header(Qcow2State *s, unsigned field,
                                       const void *buf, unsigned len);
/* Set or clear incompatible feature bits in the header, then flush. */
int coroutine_fn qcow2_co_update_incompatible(Qcow2State *s, uint64_t set,
                                              uint64_t clear);
/* With lazy refcounts: set the dirty bit before the first metadata
 * change.  Caller holds lock. */
int coroutine_fn qcow2_co_mark_dirty(Qcow2State *s);
/* Flush the image file (and the external data file). */
int coroutine_fn qcow2_co_flush_files(Qcow2State *s);
/* The name of feature @bit of @type from the image's table or ours. */
const char *qcow2_feature_name(Qcow2State *s, int type, int bit);

/* ---- qcow2-cluster.c ---- */

/* One run of guest bytes that map alike, from qcow2_co_get_mapping(). */
typedef struct Qcow2Mapping {
    Qcow2SubclusterType type;
    int64_t bytes;     /* length of the run */
    uint64_t host;     /* NORMAL: host offset of the first byte */
    bool copied;       /* NORMAL: refcount 1, may be written in place */
    uint64_t l2_entry; /* COMPRESSED: the L2 entry */
} Qcow2Mapping;

/* What [@offset, @offset + @bytes) maps to: the first run (at most up to
 * the end of its L2 table).  No lock needed. */
int coroutine_fn qcow2_co_get_mapping(Qcow2State *s, uint64_t offset,
                                      int64_t bytes, Qcow2Mapping *m);
int coroutine_fn qcow2_co_preadv(BlockDriverState *bs, int64_t offset,
                                 int64_t bytes, IOVector *qiov, size_t qoff,
                                 BdrvRequestFlags flags);
int coroutine_fn qcow2_co_pwritev(BlockDriverState *bs, int64_t offset,
                                  int64_t bytes, IOVector *qiov, size_t qoff,
                                  BdrvRequestFlags flags);
int coroutine_fn qcow2_co_pwrite_zeroes(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes, BdrvRequestFlags flags);
int coroutine_fn qcow2_co_pdiscard(BlockDriverState *bs, int64_t offset,
                                   int64_t bytes);
int coroutine_fn qcow2_co_block_status(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, int64_t *pnum,
                                       int64_t *map, BlockDriverState **file);
/* Write the (512-byte aligned part of the) L1 table holding @index. */
int coroutine_fn qcow2_co_write_l1_entry(Qcow2State *s, uint32_t index);
/* Make the active L1 table at least @min_size entries.  Caller holds
 * lock. */
int coroutine_fn qcow2_co_grow_l1(Qcow2State *s, uint64_t min_size);
/* Is any guest cluster at or past @offset holding data?  Sets *@where to
 * the first one.  Caller holds lock. */
int coroutine_fn qcow2_co_tail_in_use(Qcow2State *s, uint64_t offset,
                                      uint64_t *where);
/* Validate an L2 table offset taken from L1 entry @index. */
int qcow2_check_l2_offset(Qcow2State *s, uint32_t index, uint64_t l2_offset);
/* Classify subcluster @sc of an L2 entry (@bitmap: extended L2 only);
 * *@run: how many subclusters from @sc share the type. */
Qcow2SubclusterType qcow2_subcluster_type(Qcow2State *s, uint64_t entry,
                                          uint64_t bitmap, unsigned sc,
                                          unsigned *run);
/* In-flight data I/O on host clusters (see the thread model). */
void qcow2_host_io_begin(Qcow2State *s, Qcow2HostIO *io, uint64_t start,
                         uint64_t len);
void qcow2_host_io_end(Qcow2State *s, Qcow2HostIO *io);
bool qcow2_host_io_busy(Qcow2State *s, uint64_t start, uint64_t len);

/*
 * Extend the image file past @end ahead of the allocator, so that no
 * write ever extends it: writes into allocated space within the file's
 * size run in parallel on Linux file systems (extending ones do not),
 * and an unaligned write past the end would be padded, then truncated
 * back by the request path, racing with other writes there.  Caller
 * holds lock.
 */
void coroutine_fn qcow2_co_prealloc_ahead(Qcow2State *s, uint64_t end);

/* ---- qcow2-refcount.c ---- */

/* Add @addend to the refcount of every cluster of [@offset, +@bytes).
 * Caller holds lock. */
int coroutine_fn qcow2_co_update_refcount(Qcow2State *s, uint64_t offset,
                                          uint64_t bytes, int64_t addend);
/* The most clusters the allocator hands out in one run from free space
 * (larger requests go past the end of the image). */
static inline int64_t qcow2_max_alloc_clusters(const Qcow2State *s)
{
    return s->refblock_entries / 2;
}
/* Allocate @n contiguous clusters (refcount 1); *@offset: the first.
 * Caller holds lock. */
int coroutine_fn qcow2_co_alloc_clusters(Qcow2State *s, int64_t n,
                                         uint64_t *offset);
/* Drop one reference to @clusters clusters at @offset once the change
 * that dropped it is durable (see the thread model).  Caller holds
 * lock. */
void qcow2_free_later(Qcow2State *s, uint64_t offset, uint64_t clusters);
/* Apply the first @count pending frees whose host range is idle.
 * Caller holds lock. */
int coroutine_fn qcow2_co_apply_frees(Qcow2State *s, unsigned count);
/* The host clusters a compressed L2 entry occupies. */
void qcow2_compressed_range(Qcow2State *s, uint64_t entry, uint64_t *offset,
                            uint64_t *bytes);
/* Refcount block entry access, any width from 1 to 64 bits. */
uint64_t qcow2_refblock_get(const Qcow2State *s, const void *block,
                            uint64_t index);
void qcow2_refblock_set(const Qcow2State *s, void *block, uint64_t index,
                        uint64_t value);

/* The overlap check: which active metadata owns each cluster. */
void qcow2_meta_add(Qcow2State *s, uint64_t offset, uint64_t bytes,
                    Qcow2MetaType type);
void qcow2_meta_remove(Qcow2State *s, uint64_t offset, uint64_t bytes);
Qcow2MetaType qcow2_meta_type(Qcow2State *s, uint64_t offset);
/* Before writing metadata of @type over [@offset, +@bytes): -EIO (and
 * the image is marked corrupt) if another structure lives there. */
int qcow2_meta_check_write(Qcow2State *s, uint64_t offset, uint64_t bytes,
                           Qcow2MetaType type);
/* Build the map from the header, L1, refcount and snapshot tables. */
int qcow2_meta_build(Qcow2State *s, GError **errp);
const char *qcow2_meta_name(Qcow2MetaType type);

/* Rebuild every refcount from the metadata and fix the COPIED flags: the
 * repair of an image left dirty (lazy refcounts) by a crash. */
int coroutine_fn qcow2_co_repair(Qcow2State *s, GError **errp);

/* ---- qcow2-cache.c ---- */

struct Qcow2CacheEntry {
    uint64_t offset; /* host offset of the table: the key */
    uint8_t *data;   /* one cluster in on-disk byte order */
    int pins;        /* users holding the entry (no eviction) */
    bool dirty;
    bool loading;     /* being read from disk: wait on .waiters */
    bool doomed;      /* dropped while pinned: freed by the last put */
    bool used;        /* touched since the last clean-interval sweep */
    uint64_t gen;     /* bumped on every change */
    uint64_t mod_seq; /* L2: the s->l2_mod_seq of the last change */
    CoQueue waiters;
    TAILQ_ENTRY(Qcow2CacheEntry) lru;
};

/* @max_bytes of @type tables (QCOW2_META_L2 or QCOW2_META_REFBLOCK). */
Qcow2Cache *qcow2_cache_new(Qcow2State *s, Qcow2MetaType type,
                            uint64_t max_bytes);
void qcow2_cache_free(Qcow2Cache *c);
/* The table at @offset, pinned; read from disk unless cached.  Release
 * with qcow2_cache_put(). */
int coroutine_fn qcow2_cache_get(Qcow2Cache *c, uint64_t offset,
                                 Qcow2CacheEntry **e);
/* A new table at @offset, zero-filled and pinned, not read from disk. */
int coroutine_fn qcow2_cache_get_empty(Qcow2Cache *c, uint64_t offset,
                                       Qcow2CacheEntry **e);
void qcow2_cache_put(Qcow2Cache *c, Qcow2CacheEntry *e);
/* The caller changed @e (caller holds lock). */
void qcow2_cache_mark_dirty(Qcow2Cache *c, Qcow2CacheEntry *e);
/* Forget the table at @offset (its cluster was freed), dirty or not. */
void qcow2_cache_drop(Qcow2Cache *c, uint64_t offset);
/* How many tables have changes not yet written. */
uint64_t qcow2_cache_nb_dirty(Qcow2Cache *c);
/* Drop clean entries not used since the last call. */
void qcow2_cache_clean_unused(Qcow2Cache *c);
uint64_t qcow2_cache_max_bytes(Qcow2Cache *c);

/*
 * Write cached tables back in crash-safe order: dirty refcount blocks
 * (skipped with lazy refcounts unless @all), and with @l2 then a flush
 * and the dirty L2 tables.  Does not flush at the end.
 */
int coroutine_fn qcow2_co_writeback(Qcow2State *s, bool l2, bool all);
/* Write one table now (e.g. a new L2 table before the L1 entry that
 * points to it); the caller has ordered its prerequisites. */
int coroutine_fn qcow2_co_cache_write_entry(Qcow2Cache *c, Qcow2CacheEntry *e);
/*
 * Everything cached to disk, durable, and pending frees applied: the
 * guest's fsync, and the close (@all).
 */
int coroutine_fn qcow2_co_flush_all(Qcow2State *s, bool all);

/* ---- qcow2-compress.c ---- */

/* Read the compressed cluster of @entry and decompress it into @out (one
 * cluster).  No lock needed. */
int coroutine_fn qcow2_co_read_compressed_cluster(Qcow2State *s, uint64_t entry,
                                                  void *out);

/* ---- qcow2-snapshot.c ---- */

/* Read and check the snapshot table (open). */
int coroutine_fn qcow2_co_read_snapshots(Qcow2State *s, GError **errp);
void qcow2_free_snapshots(Qcow2State *s);

#endif /* DRIVERS_QCOW2_QCOW2_H */
