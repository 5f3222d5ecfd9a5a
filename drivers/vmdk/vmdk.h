/*
 * vmdk: private header of the VMware disk driver, grouped by the file
 * that defines each part.
 *
 * A VMDK disk is a descriptor (a small text file, or text embedded in a
 * sparse extent) listing extents in order; each extent covers a range of
 * the virtual disk and is one of:
 *  - FLAT, VMFS, VMFSRAW, VMFSRDM: a plain file (at an offset);
 *  - SPARSE: a hosted sparse file ("KDMV" header, grain directory and
 *    grain tables, optionally deflate-compressed grains: streamOptimized);
 *  - VMFSSPARSE: an ESX delta ("COWD" header, the VMDK3 layout);
 *  - ZERO: no file, reads as zeros.
 * Each extent also has an access mode (RW, RDONLY, NOACCESS) that imgfs
 * honours exactly; nothing is ever skipped or shifted.
 *
 * vmdk.c         probing, descriptor parsing, opening extents and the
 *                parent disk, request dispatch to extents, info
 * vmdk-sparse.c  hosted sparse extents: header checks, grain tables,
 *                grain allocation, streamOptimized compressed grains
 * vmdk-cowd.c    COWD (VMDK3) sparse extents, read only
 *
 * Thread model: everything runs in coroutines of the drive's AioContext.
 * Grain table lookups that hit the cache take no lock; loading a grain
 * table and every metadata update take the extent's meta_lock.  A write
 * that allocates a grain (or rewrites a compressed one) registers the
 * grain in the extent's in-flight list first; other writers of the same
 * grain wait for it, writers of other grains run in parallel.
 */
#ifndef DRIVERS_VMDK_VMDK_H
#define DRIVERS_VMDK_VMDK_H

#include <stdbool.h>
#include <stdint.h>

#include "blockcore/driver.h"

#define VMDK_SECTOR 512
/* The largest disk: the block layer's largest (whole sectors). */
#define VMDK_MAX_BYTES BDRV_MAX_LENGTH
#define VMDK_MAGIC_KDMV 0x564d444bu /* "KDMV" read little-endian */
#define VMDK_MAGIC_COWD 0x44574f43u /* "COWD" read little-endian */

typedef enum VmdkAccess {
    VMDK_ACCESS_RW,
    VMDK_ACCESS_RDONLY,
    VMDK_ACCESS_NOACCESS,
} VmdkAccess;

typedef enum VmdkKind {
    VMDK_KIND_FLAT,   /* FLAT, VMFS, VMFSRAW, VMFSRDM */
    VMDK_KIND_ZERO,   /* ZERO */
    VMDK_KIND_SPARSE, /* SPARSE with a KDMV header */
    VMDK_KIND_COWD,   /* VMFSSPARSE, or SPARSE with a COWD header */
} VmdkKind;

/* What a grain table entry says about one grain. */
typedef enum VmdkGrainState {
    VMDK_GRAIN_UNALLOCATED, /* reads from the parent disk, or zeros */
    VMDK_GRAIN_ZERO,        /* a zeroed-grain entry: reads zeros */
    VMDK_GRAIN_DATA,        /* at *host in the extent file */
} VmdkGrainState;

/* A grain whose grain table entry is about to change (vmdk-sparse.c). */
typedef struct VmdkGrainBusy {
    uint64_t grain;
    CoQueue waiters;
    struct VmdkGrainBusy *next;
} VmdkGrainBusy;

/* A byte range [start, end) of an extent file, and what it holds. */
typedef struct VmdkRange {
    int64_t start;
    int64_t end;
    const char *what;
} VmdkRange;

/* The grain directory and tables of a sparse extent (KDMV or COWD). */
typedef struct VmdkSparse {
    uint32_t version;
    uint32_t flags;
    uint64_t capacity;    /* sectors, from the header */
    uint64_t grain_bytes; /* power of two, >= 512 */
    uint32_t gte_per_gt;  /* grain table entries per grain table */
    uint32_t gd_entries;
    int64_t gd_offset;  /* bytes */
    int64_t rgd_offset; /* bytes; 0: no redundant directory */
    int64_t overhead;   /* bytes before the first grain */
    uint32_t *gd;       /* host order; entries are sector offsets */
    uint32_t *rgd;      /* NULL without a redundant directory */
    uint32_t **gt;      /* per directory entry: cached table or NULL */
    /* per directory entry: the cached table has entries not yet written
     * (write-back, see vmdk_sparse_co_flush) */
    bool *gt_dirty;
    bool compressed;     /* deflate grains (streamOptimized) */
    bool markers;        /* grains preceded by markers */
    bool zero_grain;     /* entry 1 means "zeroed grain" */
    bool gd_at_end;      /* stream with its directory in the footer */
    bool unclean;        /* the unclean-shutdown flag was set at open */
    bool marked_unclean; /* we set it for our writes: clear at close */
    /* non-NULL: writes to this extent fail with EROFS, for this reason */
    const char *ro_reason;
    int64_t file_len;   /* extent file length at open */
    int64_t next_alloc; /* where the next grain or table goes (bytes) */
    /* next_alloc at open: what lies from here on was written by this
     * session (a stream's appends start over its end-of-stream marker,
     * before file_len) */
    int64_t append_start;
    /* Grains this session appended at or past append_start: host sector
     * -> grain index + 1.  An entry pointing there is only valid if it
     * is the one this session set: a damaged entry pointing past the end
     * of the file must not start reading (and writing in place over)
     * whatever grain a later append puts there. */
    GHashTable *appended;
    CoMutex meta_lock; /* table loads, table and directory updates */
    /* compressed extents: appends at the end of the stream, which each
     * end with an end-of-stream sector the next append overwrites */
    CoMutex append_lock;
    VmdkGrainBusy *busy; /* grains with an update in flight */
    /* Metadata no grain may overlap, or a write to the grain would go
     * over it: the header and what lies before the first grain (the
     * header's overHead), the embedded descriptor, both directories, a
     * stream's footer... */
    VmdkRange meta[6];
    int n_meta;
    /* ...and every grain table, by sector, sorted, without duplicates:
     * both directories' tables, and the tables allocated since open. */
    uint32_t *gt_sectors;
    uint32_t n_gt_sectors;
    uint32_t cap_gt_sectors;
} VmdkSparse;

typedef struct VmdkExtent {
    int index;
    VmdkAccess access;
    VmdkKind kind;
    char *type;      /* as written in the descriptor: "SPARSE", "FLAT"... */
    char *fname;     /* as written in the descriptor; NULL for ZERO */
    BdrvChild *file; /* NULL for ZERO and NOACCESS extents */
    bool own_file;   /* a child of ours (not bs->file) */
    int64_t start;   /* virtual offset, bytes */
    int64_t bytes;
    int64_t flat_offset; /* FLAT: where the range starts in the file */
    VmdkSparse *sp;      /* SPARSE and COWD */
    bool ro_logged;
} VmdkExtent;

typedef struct VmdkState {
    char *create_type;
    int desc_version;
    uint32_t cid;
    uint32_t parent_cid;
    char *parent_hint;
    /* Where the descriptor lives, for the CID update of the first write:
     * embedded in bs->file at desc_offset (desc_max bytes), or all of
     * bs->file. */
    bool has_desc;
    bool desc_embedded;
    int64_t desc_offset;
    int64_t desc_max;
    char *desc_text;

    VmdkExtent *extents;
    int n_extents;

    CoMutex dirty_lock;
    bool dirty; /* the first write has updated CID and unclean flags */
} VmdkState;

/* vmdk.c */
extern const BlockDriver bdrv_vmdk;
/* Read what the parent disk has at virtual [@voff, @voff + @bytes);
 * zeros without a parent or past its end. */
int coroutine_fn vmdk_co_read_parent(BlockDriverState *bs, int64_t voff,
                                     int64_t bytes, IOVector *qiov,
                                     size_t qoff);

/* vmdk-sparse.c */
int coroutine_fn vmdk_sparse_co_open(BlockDriverState *bs, VmdkExtent *e,
                                     const uint8_t *hdr, bool image_rw,
                                     GError **errp);
void vmdk_sparse_free(VmdkSparse *sp);
/* Set *errp to "<extent file>: <message>". */
void vmdk_open_error(GError **errp, VmdkExtent *e, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Read the grain directory (and its redundant copy) of e->sp, whose
 * gd_entries, gd_offset, rgd_offset, file_len are set; choose one. */
int coroutine_fn vmdk_sparse_co_load_gd(BlockDriverState *bs, VmdkExtent *e,
                                        GError **errp);
/* Look up the grain at extent offset @off: *host is the grain's byte
 * offset in the extent file for VMDK_GRAIN_DATA. */
int coroutine_fn vmdk_sparse_co_lookup(BlockDriverState *bs, VmdkExtent *e,
                                       int64_t off, uint64_t *host);
int coroutine_fn vmdk_sparse_co_preadv(BlockDriverState *bs, VmdkExtent *e,
                                       int64_t off, int64_t bytes,
                                       IOVector *qiov, size_t qoff);
int coroutine_fn vmdk_sparse_co_pwritev(BlockDriverState *bs, VmdkExtent *e,
                                        int64_t off, int64_t bytes,
                                        IOVector *qiov, size_t qoff);
/* Write the grain table entries set since the last flush, after making
 * the grains they point to durable. */
int coroutine_fn vmdk_sparse_co_flush(BlockDriverState *bs, VmdkExtent *e);
/* Set (@on) or clear the unclean-shutdown flag in the header. */
int coroutine_fn vmdk_sparse_co_set_unclean(BlockDriverState *bs, VmdkExtent *e,
                                            bool on);

/* vmdk-cowd.c */
int coroutine_fn vmdk_cowd_co_open(BlockDriverState *bs, VmdkExtent *e,
                                   const uint8_t *hdr, GError **errp);

#endif /* DRIVERS_VMDK_VMDK_H */
