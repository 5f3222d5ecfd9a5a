/*
 * vmdk-sparse.c: hosted sparse extents ("KDMV" header), including the
 * streamOptimized kind whose grains are deflate-compressed and preceded
 * by markers.  The grain lookup and allocation code is shared with the
 * COWD (VMDK3) extents of vmdk-cowd.c, which fill in the same VmdkSparse.
 *
 * Layout (VMware's "Virtual Disk Format 5.0" technote): sector 0 is the
 * header; a grain directory (GD) of 32-bit sector offsets points to grain
 * tables (GT) of numGTEsPerGT 32-bit entries, each the sector offset of
 * one grain, 0 for "not allocated" and 1 for "zeroed" when the
 * zeroed-grain flag is set.  A redundant copy of the directory and tables
 * (RGD) is kept in sync on every update.
 *
 * Writes: an allocation writes the whole grain first (merged with the
 * parent disk's data or zeros) at the end of the file, then sets the
 * grain table entry in the cached table.  Grain tables are cached whole
 * once read (4 bytes per grain: 64 KiB of memory per GiB of disk with
 * 64 KiB grains) and written back, as qcow2's L2 tables are: a flush
 * first makes the extent file durable (so every grain an entry points to
 * is on disk), then writes the changed tables (primary, then redundant);
 * blockcore then flushes the file again.  So a crash or a power loss
 * leaves at worst an unreferenced grain, never an entry pointing at a
 * grain that is not there, and every write acknowledged by a completed
 * fsync is in the image.  A new grain table is written (zeros) before
 * the directory entry that points to it.
 *
 * streamOptimized: a write builds the whole grain (the old grain
 * decompressed, or the parent's data, or zeros), merges the new bytes,
 * compresses it and appends it with its marker where the end-of-stream
 * marker was, followed by a new end-of-stream marker; then the grain
 * table entry is pointed at it.  Appends are serialised (append_lock) so
 * that no end-of-stream sector lands on a grain appended after it;
 * compression and everything else still run in parallel.  Rewriting a grain therefore appends a
 * new copy; the space of the old one is not reclaimed.  Streams whose
 * grain directory is in the footer (VMware-made, "GD at end") are read
 * only: appending would move the footer.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <zlib.h>

#include "blockcore/log.h"
#include "vmdk.h"

#define KDMV_FLAG_NL_DETECT (1u << 0)
#define KDMV_FLAG_RGD (1u << 1)
#define KDMV_FLAG_ZERO_GRAIN (1u << 2)
#define KDMV_FLAG_COMPRESSED (1u << 16)
#define KDMV_FLAG_MARKERS (1u << 17)
#define KDMV_GD_AT_END UINT64_MAX
#define KDMV_COMPRESS_DEFLATE 1
#define KDMV_GTE_ZEROED 1
#define KDMV_MAX_GTES 512

#define VMDK_MAX_GRAIN_SECTORS (UINT64_C(1) << 16) /* 32 MiB grains */
#define VMDK_MAX_GD_ENTRIES (UINT32_C(32) << 20)
#define VMDK_MARKER_EOS 0
#define VMDK_MARKER_FOOTER 3
#define VMDK_GRAIN_MARKER_SIZE 12 /* lba (8), compressed size (4) */

/* Offsets of the fields of the 512-byte KDMV header. */
enum {
    KH_MAGIC = 0,
    KH_VERSION = 4,
    KH_FLAGS = 8,
    KH_CAPACITY = 12,
    KH_GRAIN = 20,
    KH_DESC_OFFSET = 28,
    KH_DESC_SIZE = 36,
    KH_GTES = 44,
    KH_RGD = 48,
    KH_GD = 56,
    KH_OVERHEAD = 64,
    KH_UNCLEAN = 72,
    KH_NL_CHARS = 73, /* '\n', ' ', '\r', '\n' */
    KH_COMPRESS = 77,
};

static uint32_t ld32(const uint8_t *p)
{
    uint32_t v;

    memcpy(&v, p, 4);
    return le32toh(v);
}

static uint64_t ld64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return le64toh(v);
}

static void st32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, 4);
}

static void st64(uint8_t *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, 8);
}

void vmdk_sparse_free(VmdkSparse *sp)
{
    uint32_t i;

    if (!sp) {
        return;
    }
    if (sp->gt) {
        for (i = 0; i < sp->gd_entries; i++) {
            g_free(sp->gt[i]);
        }
    }
    g_free(sp->gt);
    g_free(sp->gt_dirty);
    g_free(sp->gd);
    g_free(sp->rgd);
    g_free(sp->gt_sectors);
    if (sp->appended) {
        g_hash_table_destroy(sp->appended);
    }
    g_free(sp);
}

/* ---- grains appended by this session ------------------------------ */

/* Note that grain @gi is being appended at byte @pos (at or past
 * sp->append_start).  Done as soon as the place is reserved, before the
 * grain table entry can point there.  (The value is @gi + 1: a missing
 * key reads as 0.) */
static void vmdk_appended_add(VmdkSparse *sp, int64_t pos, uint64_t gi)
{
    if (!sp->appended) {
        sp->appended = g_hash_table_new(g_direct_hash, g_direct_equal);
    }
    g_hash_table_replace(sp->appended, GUINT_TO_POINTER(pos / VMDK_SECTOR),
                         GSIZE_TO_POINTER(gi + 1));
}

/* The grain this session appended at @sector, or -1. */
static int64_t vmdk_appended_owner(VmdkSparse *sp, uint32_t sector)
{
    gpointer v = sp->appended ? g_hash_table_lookup(sp->appended,
                                                    GUINT_TO_POINTER(sector))
                              : NULL;

    return (int64_t)GPOINTER_TO_SIZE(v) - 1;
}

/* Forget the grain @gi appended at byte @pos, if it is still noted as
 * @gi's (a failed append, or a compressed grain appended again). */
static void vmdk_appended_remove(VmdkSparse *sp, int64_t pos, uint64_t gi)
{
    if (pos >= sp->append_start &&
        vmdk_appended_owner(sp, pos / VMDK_SECTOR) == (int64_t)gi) {
        g_hash_table_remove(sp->appended, GUINT_TO_POINTER(pos / VMDK_SECTOR));
    }
}

void vmdk_open_error(GError **errp, VmdkExtent *e, const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list ap;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL, "%s: %s",
                bdrv_name(e->file->bs), msg);
}

/* Is a directory entry usable: 0, or a table entirely inside the file? */
static bool vmdk_gd_entry_ok(VmdkSparse *sp, uint32_t v)
{
    int64_t gt_bytes = (int64_t)sp->gte_per_gt * 4;

    return v == 0 ||
           (v >= 1 && (int64_t)v * VMDK_SECTOR + gt_bytes <= sp->file_len);
}

/* ---- where grains must not be ------------------------------------- */

/* Remember [@start, @end) of the extent file as metadata, @what for the
 * messages.  Callers add at most G_N_ELEMENTS(sp->meta) ranges. */
static void vmdk_meta_add(VmdkSparse *sp, int64_t start, int64_t end,
                          const char *what)
{
    if (end > start && sp->n_meta < (int)G_N_ELEMENTS(sp->meta)) {
        sp->meta[sp->n_meta++] = (VmdkRange){start, end, what};
    }
}

static int vmdk_cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? -1 : x > y;
}

/* Note the grain tables both directories point to (before one of them
 * may be dropped as damaged: its tables are still in the file). */
static int vmdk_meta_collect_gts(VmdkSparse *sp)
{
    uint32_t cap = sp->gd_entries * 2 + 2, n = 0, i, j;
    uint32_t *v = g_try_new(uint32_t, cap);

    if (!v) {
        return -ENOMEM;
    }
    for (i = 0; i < sp->gd_entries; i++) {
        if (sp->gd[i] && vmdk_gd_entry_ok(sp, sp->gd[i])) {
            v[n++] = sp->gd[i];
        }
        if (sp->rgd && sp->rgd[i] && vmdk_gd_entry_ok(sp, sp->rgd[i])) {
            v[n++] = sp->rgd[i];
        }
    }
    qsort(v, n, sizeof(*v), vmdk_cmp_u32);
    for (i = j = 0; i < n; i++) {
        if (j == 0 || v[i] != v[j - 1]) {
            v[j++] = v[i];
        }
    }
    sp->gt_sectors = v;
    sp->n_gt_sectors = j;
    sp->cap_gt_sectors = cap;
    return 0;
}

/* Note a grain table allocated at byte @pos.  Done as soon as the place
 * is reserved: a lookup running meanwhile must not take it for a grain. */
static void vmdk_meta_add_gt(VmdkSparse *sp, int64_t pos)
{
    uint32_t sector = pos / VMDK_SECTOR, lo = 0, hi = sp->n_gt_sectors;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;

        if (sp->gt_sectors[mid] < sector) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < sp->n_gt_sectors && sp->gt_sectors[lo] == sector) {
        return;
    }
    if (sp->n_gt_sectors == sp->cap_gt_sectors) {
        sp->cap_gt_sectors = sp->cap_gt_sectors * 2 + 2;
        sp->gt_sectors = g_renew(uint32_t, sp->gt_sectors, sp->cap_gt_sectors);
    }
    memmove(sp->gt_sectors + lo + 1, sp->gt_sectors + lo,
            (sp->n_gt_sectors - lo) * sizeof(uint32_t));
    sp->gt_sectors[lo] = sector;
    sp->n_gt_sectors++;
}

/* What metadata [@start, @end) of the extent file overlaps, or NULL. */
static const char *vmdk_meta_overlap(VmdkSparse *sp, int64_t start, int64_t end)
{
    int64_t gt_bytes = ALIGN_UP((int64_t)sp->gte_per_gt * 4, VMDK_SECTOR);
    uint32_t lo = 0, hi = sp->n_gt_sectors;
    int i;

    for (i = 0; i < sp->n_meta; i++) {
        if (start < sp->meta[i].end && sp->meta[i].start < end) {
            return sp->meta[i].what;
        }
    }
    /* The tables all have the same size, so their ends are sorted too:
     * find the first one ending after @start. */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;

        if ((int64_t)sp->gt_sectors[mid] * VMDK_SECTOR + gt_bytes <= start) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < sp->n_gt_sectors &&
        (int64_t)sp->gt_sectors[lo] * VMDK_SECTOR < end) {
        return "a grain table";
    }
    return NULL;
}

/* Read a directory of sp->gd_entries entries at @off into host order. */
static int coroutine_fn vmdk_read_gd(VmdkExtent *e, int64_t off, uint32_t **out)
{
    VmdkSparse *sp = e->sp;
    uint32_t *gd = g_try_new(uint32_t, sp->gd_entries ? sp->gd_entries : 1);
    uint32_t i;
    int ret;

    if (!gd) {
        return -ENOMEM;
    }
    ret = bdrv_co_pread(e->file, off, (int64_t)sp->gd_entries * 4, gd, 0);
    if (ret < 0) {
        g_free(gd);
        return ret;
    }
    for (i = 0; i < sp->gd_entries; i++) {
        gd[i] = le32toh(gd[i]);
    }
    *out = gd;
    return 0;
}

/*
 * Load both grain directories and decide which one to use: a directory
 * with an entry pointing outside the file is damaged; the redundant copy
 * replaces a damaged primary.
 */
int coroutine_fn vmdk_sparse_co_load_gd(BlockDriverState *bs, VmdkExtent *e,
                                        GError **errp)
{
    VmdkSparse *sp = e->sp;
    uint32_t bad_gd = UINT32_MAX, bad_rgd = UINT32_MAX, diff = 0, i;
    int ret;

    ret = vmdk_read_gd(e, sp->gd_offset, &sp->gd);
    if (ret < 0) {
        vmdk_open_error(errp, e, "cannot read the grain directory: %s",
                        g_strerror(-ret));
        return ret;
    }
    if (sp->rgd_offset) {
        ret = vmdk_read_gd(e, sp->rgd_offset, &sp->rgd);
        if (ret < 0) {
            vmdk_open_error(errp, e,
                            "cannot read the redundant grain directory: %s",
                            g_strerror(-ret));
            return ret;
        }
    }

    /* Where grains must not be.  The header's overHead covers the
     * header and, as the writers lay them out, the descriptor, the
     * directories and the first tables; the rest is listed on its own
     * in case overHead is smaller than it should be. */
    vmdk_meta_add(sp, sp->gd_offset,
                  sp->gd_offset + (int64_t)sp->gd_entries * 4,
                  "the grain directory");
    if (sp->rgd) {
        vmdk_meta_add(sp, sp->rgd_offset,
                      sp->rgd_offset + (int64_t)sp->gd_entries * 4,
                      "the redundant grain directory");
    }
    vmdk_meta_add(sp, 0, VMDK_SECTOR, "the header");
    vmdk_meta_add(sp, VMDK_SECTOR, sp->overhead,
                  "the metadata before the first grain (the header's "
                  "overHead)");
    ret = vmdk_meta_collect_gts(sp);
    if (ret < 0) {
        vmdk_open_error(errp, e, "cannot list the grain tables: %s",
                        g_strerror(-ret));
        return ret;
    }

    for (i = 0; i < sp->gd_entries; i++) {
        if (bad_gd == UINT32_MAX && !vmdk_gd_entry_ok(sp, sp->gd[i])) {
            bad_gd = i;
        }
        if (sp->rgd) {
            if (bad_rgd == UINT32_MAX && !vmdk_gd_entry_ok(sp, sp->rgd[i])) {
                bad_rgd = i;
            }
            diff += (sp->gd[i] == 0) != (sp->rgd[i] == 0);
        }
    }
    if (bad_gd != UINT32_MAX) {
        if (!sp->rgd || bad_rgd != UINT32_MAX) {
            vmdk_open_error(errp, e,
                            "grain directory entry %" PRIu32 " (0x%" PRIx32
                            ") points outside the file%s",
                            bad_gd, sp->gd[bad_gd],
                            sp->rgd ? ", and so does the redundant one" : "");
            return -EINVAL;
        }
        log_warning("%s: grain directory at 0x%" PRIx64
                    " is damaged (entry %" PRIu32
                    "); using the redundant grain directory",
                    bdrv_name(e->file->bs), sp->gd_offset, bad_gd);
        /* The redundant tables become the primary ones. */
        g_free(sp->gd);
        sp->gd = sp->rgd;
        sp->rgd = NULL;
        sp->gd_offset = sp->rgd_offset;
        sp->rgd_offset = 0;
        sp->ro_reason =
            sp->ro_reason ? sp->ro_reason : "its grain directory is damaged";
    } else if (sp->rgd && bad_rgd != UINT32_MAX) {
        log_warning("%s: redundant grain directory at 0x%" PRIx64
                    " is damaged (entry %" PRIu32 "); ignoring it",
                    bdrv_name(e->file->bs), sp->rgd_offset, bad_rgd);
        g_free(sp->rgd);
        sp->rgd = NULL;
        sp->rgd_offset = 0;
        sp->ro_reason = sp->ro_reason
                            ? sp->ro_reason
                            : "its redundant grain directory is damaged";
    } else if (diff) {
        log_warning("%s: grain directory and its redundant copy differ in "
                    "%" PRIu32 " entries; using the primary one",
                    bdrv_name(e->file->bs), diff);
    }
    (void)bs;
    sp->gt = g_try_new0(uint32_t *, sp->gd_entries ? sp->gd_entries : 1);
    sp->gt_dirty = g_try_new0(bool, sp->gd_entries ? sp->gd_entries : 1);
    if (!sp->gt || !sp->gt_dirty) {
        return -ENOMEM;
    }
    return 0;
}

int coroutine_fn vmdk_sparse_co_open(BlockDriverState *bs, VmdkExtent *e,
                                     const uint8_t *hdr0, bool image_rw,
                                     GError **errp)
{
    VmdkSparse *sp = g_new0(VmdkSparse, 1);
    uint8_t footer[1536];
    const uint8_t *hdr = hdr0;
    uint64_t grain_sectors, gd, rgd, per_gd, gd_entries;
    uint16_t algo;
    int ret;

    e->sp = sp;
    sp->file_len = bdrv_getlength(e->file->bs);
    co_mutex_init(&sp->meta_lock);
    co_mutex_init(&sp->append_lock);

    if (ld64(hdr + KH_GD) == KDMV_GD_AT_END) {
        /* A stream: the footer (a copy of the header with the real
         * directory offset) sits before the end-of-stream marker. */
        if (sp->file_len < 2048) {
            vmdk_open_error(errp, e, "stream is too short for a footer");
            return -EINVAL;
        }
        ret = bdrv_co_pread(e->file, sp->file_len - 1536, 1536, footer, 0);
        if (ret < 0) {
            vmdk_open_error(errp, e, "cannot read the footer: %s",
                            g_strerror(-ret));
            return ret;
        }
        if (ld32(footer + 8) != 0 || ld32(footer + 12) != VMDK_MARKER_FOOTER ||
            ld32(footer + 512) != VMDK_MAGIC_KDMV || ld64(footer + 1024) ||
            ld32(footer + 1032) || ld32(footer + 1036) != VMDK_MARKER_EOS) {
            vmdk_open_error(errp, e,
                            "grain directory is at the end of the stream but "
                            "there is no valid footer before its end");
            return -EINVAL;
        }
        hdr = footer + 512;
        sp->gd_at_end = true;
        vmdk_meta_add(sp, sp->file_len - 1536, sp->file_len, "the footer");
        sp->ro_reason = "it is a stream whose grain directory is in its footer";
    }

    sp->version = ld32(hdr + KH_VERSION);
    sp->flags = ld32(hdr + KH_FLAGS);
    sp->capacity = ld64(hdr + KH_CAPACITY);
    grain_sectors = ld64(hdr + KH_GRAIN);
    sp->gte_per_gt = ld32(hdr + KH_GTES);
    rgd = ld64(hdr + KH_RGD);
    gd = ld64(hdr + KH_GD);
    sp->overhead = ld64(hdr + KH_OVERHEAD) * VMDK_SECTOR;
    algo = hdr[KH_COMPRESS] | (hdr[KH_COMPRESS + 1] << 8);

    if (sp->version < 1 || sp->version > 3) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: unsupported VMDK sparse extent version %" PRIu32,
                    bdrv_name(e->file->bs), sp->version);
        return -ENOTSUP;
    }
    if ((sp->flags & KDMV_FLAG_NL_DETECT) &&
        memcmp(hdr + KH_NL_CHARS, "\n \r\n", 4) != 0) {
        vmdk_open_error(errp, e,
                        "the newline-detection bytes are %02x %02x %02x %02x "
                        "instead of 0a 20 0d 0a: the file was damaged by a "
                        "text-mode (ASCII) transfer",
                        hdr[KH_NL_CHARS], hdr[KH_NL_CHARS + 1],
                        hdr[KH_NL_CHARS + 2], hdr[KH_NL_CHARS + 3]);
        return -EINVAL;
    }
    if (algo > KDMV_COMPRESS_DEFLATE) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: unsupported grain compression algorithm %u",
                    bdrv_name(e->file->bs), algo);
        return -ENOTSUP;
    }
    sp->compressed = algo == KDMV_COMPRESS_DEFLATE;
    if ((sp->flags & KDMV_FLAG_COMPRESSED) && !sp->compressed) {
        vmdk_open_error(errp, e,
                        "the compressed-grains flag is set but no "
                        "compression algorithm is named");
        return -EINVAL;
    }
    sp->markers = sp->flags & KDMV_FLAG_MARKERS;
    sp->zero_grain = sp->flags & KDMV_FLAG_ZERO_GRAIN;
    if (!is_power_of_2(grain_sectors) ||
        grain_sectors > VMDK_MAX_GRAIN_SECTORS) {
        vmdk_open_error(errp, e,
                        "grain size of %" PRIu64
                        " sectors is not a power of two up to %" PRIu64,
                        grain_sectors, VMDK_MAX_GRAIN_SECTORS);
        return -EINVAL;
    }
    sp->grain_bytes = grain_sectors * VMDK_SECTOR;
    if (sp->gte_per_gt < 1 || sp->gte_per_gt > KDMV_MAX_GTES) {
        vmdk_open_error(errp, e,
                        "%" PRIu32 " grain table entries per grain table is "
                        "outside 1..%d",
                        sp->gte_per_gt, KDMV_MAX_GTES);
        return -EINVAL;
    }
    if (sp->capacity == 0) {
        vmdk_open_error(errp, e, "the header gives a capacity of 0");
        return -EINVAL;
    }
    per_gd = grain_sectors * sp->gte_per_gt;
    gd_entries = sp->capacity / per_gd + (sp->capacity % per_gd != 0);
    if (gd_entries > VMDK_MAX_GD_ENTRIES) {
        vmdk_open_error(errp, e,
                        "capacity of %" PRIu64 " sectors needs too large a "
                        "grain directory (%" PRIu64 " entries)",
                        sp->capacity, gd_entries);
        return -EFBIG;
    }
    sp->gd_entries = gd_entries;
    if (e->bytes < 0) {
        e->bytes = sp->capacity * VMDK_SECTOR;
    } else if ((uint64_t)e->bytes > sp->capacity * VMDK_SECTOR) {
        vmdk_open_error(errp, e,
                        "the descriptor gives the extent %" PRId64
                        " sectors but its header only %" PRIu64,
                        e->bytes / VMDK_SECTOR, sp->capacity);
        return -EINVAL;
    }
    if (gd == 0 || gd > (uint64_t)sp->file_len / VMDK_SECTOR ||
        gd * VMDK_SECTOR + gd_entries * 4 > (uint64_t)sp->file_len) {
        vmdk_open_error(errp, e,
                        "grain directory at sector %" PRIu64 " (%" PRIu64
                        " entries) is outside the file",
                        gd, gd_entries);
        return -EINVAL;
    }
    sp->gd_offset = gd * VMDK_SECTOR;
    if ((sp->flags & KDMV_FLAG_RGD) && rgd) {
        if (rgd > (uint64_t)sp->file_len / VMDK_SECTOR ||
            rgd * VMDK_SECTOR + gd_entries * 4 > (uint64_t)sp->file_len) {
            vmdk_open_error(errp, e,
                            "redundant grain directory at sector %" PRIu64
                            " is outside the file",
                            rgd);
            return -EINVAL;
        }
        sp->rgd_offset = rgd * VMDK_SECTOR;
    }
    {
        uint64_t doff = ld64(hdr + KH_DESC_OFFSET);
        uint64_t dsize = ld64(hdr + KH_DESC_SIZE);
        uint64_t max = (uint64_t)sp->file_len / VMDK_SECTOR;

        /* (Not checked here otherwise: only a monolithic image's
         * descriptor is read from its extent.) */
        if (doff && doff < max && dsize) {
            vmdk_meta_add(sp, doff * VMDK_SECTOR,
                          (dsize < max - doff ? doff + dsize : max) *
                              VMDK_SECTOR,
                          "the embedded descriptor");
        }
    }
    if (sp->overhead > sp->file_len) {
        vmdk_open_error(errp, e,
                        "file is truncated: %" PRId64
                        " bytes, but grains start at %" PRId64,
                        sp->file_len, sp->overhead);
        return -EINVAL;
    }
    if (sp->compressed && !sp->markers) {
        sp->ro_reason = "its compressed grains have no markers";
    }
    if (sp->version == 3 && !sp->compressed) {
        sp->ro_reason = "it is a version 3 (changed block tracking) extent";
    }
    if (hdr0[KH_UNCLEAN]) {
        sp->unclean = true;
        log_warning("%s: the unclean-shutdown flag is set: the image was not "
                    "closed cleanly (run 'qemu-img check' on it)",
                    bdrv_name(e->file->bs));
    }

    ret = vmdk_sparse_co_load_gd(bs, e, errp);
    if (ret < 0) {
        return ret;
    }

    sp->next_alloc = ALIGN_UP(sp->file_len, VMDK_SECTOR);
    if (sp->compressed && sp->file_len >= 2 * VMDK_SECTOR && !sp->gd_at_end) {
        uint8_t eos[16];

        /* Appended grains replace a trailing end-of-stream marker. */
        ret = bdrv_co_pread(e->file, sp->file_len - VMDK_SECTOR, 16, eos, 0);
        if (ret == 0 && buffer_is_zero(eos, 16) &&
            sp->file_len - VMDK_SECTOR >= sp->overhead) {
            sp->next_alloc = sp->file_len - VMDK_SECTOR;
        }
    }
    sp->append_start = sp->next_alloc;
    (void)image_rw;
    return 0;
}

/* ---- grain tables ------------------------------------------------- */

static int coroutine_fn vmdk_gt_load_locked(BlockDriverState *bs, VmdkExtent *e,
                                            uint32_t gdi)
{
    VmdkSparse *sp = e->sp;
    uint32_t *gt;
    uint32_t i;
    int ret;

    if (sp->gt[gdi] || sp->gd[gdi] == 0) {
        return 0;
    }
    gt = g_try_new(uint32_t, sp->gte_per_gt);
    if (!gt) {
        return -ENOMEM;
    }
    ret = bdrv_co_pread(e->file, (int64_t)sp->gd[gdi] * VMDK_SECTOR,
                        (int64_t)sp->gte_per_gt * 4, gt, 0);
    if (ret < 0) {
        g_free(gt);
        return ret;
    }
    for (i = 0; i < sp->gte_per_gt; i++) {
        gt[i] = le32toh(gt[i]);
    }
    sp->gt[gdi] = gt;
    (void)bs;
    return 0;
}

/* The cached grain table for directory entry @gdi (NULL: none). */
static int coroutine_fn vmdk_gt_get(BlockDriverState *bs, VmdkExtent *e,
                                    uint32_t gdi, uint32_t **gt)
{
    VmdkSparse *sp = e->sp;
    int ret = 0;

    if (likely(sp->gt[gdi] != NULL) || sp->gd[gdi] == 0) {
        *gt = sp->gt[gdi];
        return 0;
    }
    co_mutex_lock(&sp->meta_lock);
    ret = vmdk_gt_load_locked(bs, e, gdi);
    co_mutex_unlock(&sp->meta_lock);
    *gt = sp->gt[gdi];
    return ret;
}

/* Bytes of the disk covered by grain @gi of extent @e. */
static int64_t vmdk_grain_len(VmdkExtent *e, uint64_t gi)
{
    int64_t start = gi * e->sp->grain_bytes;
    int64_t n = e->bytes - start;

    return n < (int64_t)e->sp->grain_bytes ? n : (int64_t)e->sp->grain_bytes;
}

int coroutine_fn vmdk_sparse_co_lookup(BlockDriverState *bs, VmdkExtent *e,
                                       int64_t off, uint64_t *host)
{
    VmdkSparse *sp = e->sp;
    uint64_t gi = (uint64_t)off / sp->grain_bytes;
    uint32_t gdi = gi / sp->gte_per_gt;
    uint32_t ti = gi % sp->gte_per_gt;
    uint32_t *gt, v;
    const char *what;
    int ret;

    ret = vmdk_gt_get(bs, e, gdi, &gt);
    if (ret < 0) {
        return ret;
    }
    if (!gt || gt[ti] == 0) {
        return VMDK_GRAIN_UNALLOCATED;
    }
    v = gt[ti];
    if (v == KDMV_GTE_ZEROED) {
        if (sp->zero_grain) {
            return VMDK_GRAIN_ZERO;
        }
        return bdrv_report_corruption(
            e->file->bs, (int64_t)sp->gd[gdi] * VMDK_SECTOR + ti * 4,
            "grain table entry %" PRIu32 " is 1 (a zeroed-grain entry) but "
            "the zeroed-grain flag is not set",
            ti);
    }
    /* Past what the file held at open, only the grains this session
     * appended are valid, each for the grain it was appended for: an
     * entry pointing there otherwise was damaged before, and would make
     * another grain's data this grain's (and a write to it go over
     * that grain). */
    if ((int64_t)v * VMDK_SECTOR >= sp->append_start) {
        int64_t owner = vmdk_appended_owner(sp, v);

        if (owner < 0) {
            return bdrv_report_corruption(
                e->file->bs, (int64_t)sp->gd[gdi] * VMDK_SECTOR + ti * 4,
                "grain %" PRIu64 " at sector %" PRIu32 " is past the end of "
                "the file (%" PRId64 " bytes at open)",
                gi, v, sp->append_start);
        }
        if ((uint64_t)owner != gi) {
            return bdrv_report_corruption(
                e->file->bs, (int64_t)sp->gd[gdi] * VMDK_SECTOR + ti * 4,
                "grain %" PRIu64 " at sector %" PRIu32 " is past the end of "
                "the file (%" PRId64 " bytes at open), where grain %" PRIu64
                " has been written since",
                gi, v, sp->append_start, (uint64_t)owner);
        }
    }
    /* A grain over the extent's own metadata would be served as data,
     * and a write to it would go in place over that metadata.  (Of a
     * compressed grain, only the marker's sector is known here.) */
    what = vmdk_meta_overlap(
        sp, (int64_t)v * VMDK_SECTOR,
        (int64_t)v * VMDK_SECTOR +
            (sp->compressed ? VMDK_SECTOR : vmdk_grain_len(e, gi)));
    if (what) {
        return bdrv_report_corruption(
            e->file->bs, (int64_t)sp->gd[gdi] * VMDK_SECTOR + ti * 4,
            "grain %" PRIu64 " at sector %" PRIu32 " overlaps %s", gi, v, what);
    }
    *host = (uint64_t)v * VMDK_SECTOR;
    return VMDK_GRAIN_DATA;
}

/* ---- compressed grains -------------------------------------------- */

/* Inflate @in into @out (zlib stream, or raw deflate as a fallback). */
static int vmdk_inflate(const uint8_t *in, size_t in_len, uint8_t *out,
                        size_t out_len, size_t *produced)
{
    int wbits[2] = {15, -15};
    int i;

    for (i = 0; i < 2; i++) {
        z_stream zs = {0};
        int zr;

        if (inflateInit2(&zs, wbits[i]) != Z_OK) {
            return -ENOMEM;
        }
        zs.next_in = (uint8_t *)in;
        zs.avail_in = in_len;
        zs.next_out = out;
        zs.avail_out = out_len;
        zr = inflate(&zs, Z_FINISH);
        *produced = out_len - zs.avail_out;
        inflateEnd(&zs);
        if (zr == Z_STREAM_END) {
            return 0;
        }
        if (zr != Z_DATA_ERROR || i == 1) {
            break;
        }
    }
    return -EIO;
}

/* Read and inflate the compressed grain @gi at @host into @buf (the
 * grain's full length). */
static int coroutine_fn vmdk_read_compressed(VmdkExtent *e, uint64_t gi,
                                             uint64_t host, uint8_t *buf)
{
    VmdkSparse *sp = e->sp;
    int64_t want = vmdk_grain_len(e, gi);
    int64_t limit =
        sp->next_alloc > sp->file_len ? sp->next_alloc : sp->file_len;
    size_t data_off = 0, produced = 0;
    int64_t clen, rlen;
    uint8_t *raw;
    int ret;

    /* A grain the file had at open ends where the file's data did: not
     * in the grains this session appended after it (nor over the
     * end-of-stream marker they replace).  (Without markers, nothing is
     * ever appended: the extent is read only.) */
    if (sp->markers && (int64_t)host < sp->append_start) {
        limit =
            sp->append_start < sp->file_len ? sp->append_start : sp->file_len;
    }
    if (sp->markers) {
        uint8_t m[VMDK_SECTOR];

        ret = bdrv_co_pread(e->file, host, VMDK_SECTOR, m, 0);
        if (ret < 0) {
            return ret;
        }
        /* The marker names the grain it holds: an entry pointing at
         * another grain's would serve (and, rewritten, drop) its data. */
        if (ld64(m) != gi * (sp->grain_bytes / VMDK_SECTOR)) {
            return bdrv_report_corruption(
                e->file->bs, host,
                "grain marker at sector %" PRIu64 " is for sector %" PRIu64
                ", not for grain %" PRIu64 " (sector %" PRIu64 ")",
                host / VMDK_SECTOR, ld64(m), gi,
                gi * (sp->grain_bytes / VMDK_SECTOR));
        }
        clen = ld32(m + 8);
        if (clen == 0 || clen > (int64_t)(2 * sp->grain_bytes + 4096) ||
            (int64_t)host + VMDK_GRAIN_MARKER_SIZE + clen > limit) {
            return bdrv_report_corruption(e->file->bs, host,
                                          "grain marker of grain %" PRIu64
                                          " gives a bad compressed "
                                          "size (%" PRId64 " bytes)",
                                          gi, clen);
        }
        data_off = VMDK_GRAIN_MARKER_SIZE;
        rlen = ALIGN_UP(data_off + clen, VMDK_SECTOR);
    } else {
        clen = 2 * sp->grain_bytes + 4096;
        if ((int64_t)host + clen > limit) {
            clen = limit - host;
        }
        rlen = ALIGN_UP(clen, VMDK_SECTOR);
    }
    raw = g_try_malloc(rlen);
    if (!raw) {
        return -ENOMEM;
    }
    ret = bdrv_co_pread(e->file, host, rlen, raw, 0);
    if (ret == 0) {
        ret =
            vmdk_inflate(raw + data_off, clen, buf, sp->grain_bytes, &produced);
        if (ret == -EIO || (ret == 0 && (int64_t)produced < want)) {
            ret =
                bdrv_report_corruption(e->file->bs, host,
                                       "compressed grain %" PRIu64
                                       " does not inflate to %" PRId64 " bytes",
                                       gi, want);
        }
    }
    g_free(raw);
    return ret;
}

/* ---- reads -------------------------------------------------------- */

int coroutine_fn vmdk_sparse_co_preadv(BlockDriverState *bs, VmdkExtent *e,
                                       int64_t off, int64_t bytes,
                                       IOVector *qiov, size_t qoff)
{
    VmdkSparse *sp = e->sp;
    int ret;

    while (bytes > 0) {
        int64_t in = off % sp->grain_bytes;
        int64_t n = sp->grain_bytes - in < (uint64_t)bytes
                        ? (int64_t)sp->grain_bytes - in
                        : bytes;
        uint64_t host = 0;
        int st = vmdk_sparse_co_lookup(bs, e, off, &host);

        if (st < 0) {
            return st;
        }
        if (st == VMDK_GRAIN_UNALLOCATED) {
            ret = vmdk_co_read_parent(bs, e->start + off, n, qiov, qoff);
        } else if (st == VMDK_GRAIN_ZERO) {
            iov_memset(qiov, qoff, 0, n);
            ret = 0;
        } else if (sp->compressed) {
            uint64_t gi = off / sp->grain_bytes;
            uint8_t *buf = g_try_malloc(sp->grain_bytes);

            if (!buf) {
                return -ENOMEM;
            }
            ret = vmdk_read_compressed(e, gi, host, buf);
            if (ret == 0) {
                iov_from_buf(qiov, qoff, buf + in, n);
            }
            g_free(buf);
        } else {
            /* Merge the following grains while they are contiguous. */
            while (n < bytes) {
                uint64_t next = 0;
                int64_t m = bytes - n < (int64_t)sp->grain_bytes
                                ? bytes - n
                                : (int64_t)sp->grain_bytes;
                int st2 = vmdk_sparse_co_lookup(bs, e, off + n, &next);

                if (st2 != VMDK_GRAIN_DATA || next != host + in + n) {
                    break;
                }
                n += m;
            }
            ret = bdrv_co_preadv(e->file, host + in, n, qiov, qoff, 0);
        }
        if (ret < 0) {
            return ret;
        }
        off += n;
        qoff += n;
        bytes -= n;
    }
    return 0;
}

/* ---- metadata updates --------------------------------------------- */

/*
 * Reserve @len bytes at the end of the extent file.  Uncompressed grains
 * and tables are aligned to 4 KiB (or the grain size if smaller) so that
 * O_DIRECT access to them needs no read-modify-write.
 */
static int64_t vmdk_reserve(VmdkSparse *sp, int64_t len)
{
    int64_t align = sp->compressed           ? VMDK_SECTOR
                    : sp->grain_bytes < 4096 ? (int64_t)sp->grain_bytes
                                             : 4096;
    int64_t pos = ALIGN_UP(sp->next_alloc, align);

    if ((pos + len) / VMDK_SECTOR > UINT32_MAX) {
        return -ENOSPC; /* sector offsets are 32 bits: 2 TiB per extent */
    }
    sp->next_alloc = pos + len;
    return pos;
}

/* Write the sector of a directory or table holding entry @idx of the
 * host-order array @tab (at file offset @base) after setting it to @v. */
static int coroutine_fn vmdk_write_entry(VmdkExtent *e, int64_t base,
                                         const uint32_t *tab, uint32_t n_tab,
                                         uint32_t idx, uint32_t v)
{
    uint32_t first = idx / 128 * 128;
    uint32_t cnt = n_tab - first < 128 ? n_tab - first : 128;
    uint8_t sec[VMDK_SECTOR];
    uint32_t i;

    for (i = 0; i < cnt; i++) {
        st32(sec + 4 * i, first + i == idx ? v : tab[first + i]);
    }
    return bdrv_co_pwrite(e->file, base + (int64_t)first * 4, cnt * 4, sec, 0);
}

/* Give directory entry @gdi a new, empty grain table (and a redundant
 * one).  Caller holds meta_lock. */
static int coroutine_fn vmdk_alloc_gt_locked(VmdkExtent *e, uint32_t gdi)
{
    VmdkSparse *sp = e->sp;
    int64_t gt_bytes = ALIGN_UP((int64_t)sp->gte_per_gt * 4, VMDK_SECTOR);
    int64_t len = gt_bytes + (sp->compressed ? VMDK_SECTOR : 0);
    uint8_t *zeros = g_malloc0(len);
    int64_t pos, rpos = 0;
    int ret;

    if (sp->compressed) {
        co_mutex_lock(&sp->append_lock);
    }
    pos = vmdk_reserve(sp, gt_bytes);
    if (pos >= 0) {
        vmdk_meta_add_gt(sp, pos);
    }
    /* A stream keeps ending in an end-of-stream marker (a zero sector). */
    ret = pos < 0 ? pos : bdrv_co_pwrite(e->file, pos, len, zeros, 0);
    if (ret == 0 && sp->rgd) {
        rpos = vmdk_reserve(sp, gt_bytes);
        if (rpos >= 0) {
            vmdk_meta_add_gt(sp, rpos);
        }
        ret = rpos < 0 ? rpos : bdrv_co_pwrite(e->file, rpos, len, zeros, 0);
    }
    if (sp->compressed) {
        co_mutex_unlock(&sp->append_lock);
    }
    g_free(zeros);
    if (ret < 0) {
        return ret;
    }
    if (sp->rgd) {
        ret = vmdk_write_entry(e, sp->rgd_offset, sp->rgd, sp->gd_entries, gdi,
                               rpos / VMDK_SECTOR);
        if (ret < 0) {
            return ret;
        }
        sp->rgd[gdi] = rpos / VMDK_SECTOR;
    }
    ret = vmdk_write_entry(e, sp->gd_offset, sp->gd, sp->gd_entries, gdi,
                           pos / VMDK_SECTOR);
    if (ret < 0) {
        return ret;
    }
    sp->gd[gdi] = pos / VMDK_SECTOR;
    sp->gt[gdi] = g_new0(uint32_t, sp->gte_per_gt);
    return 0;
}

/* Point grain @gi at sector @v: grain table, then its redundant copy. */
static int coroutine_fn vmdk_set_gte(BlockDriverState *bs, VmdkExtent *e,
                                     uint64_t gi, uint32_t v)
{
    VmdkSparse *sp = e->sp;
    uint32_t gdi = gi / sp->gte_per_gt;
    uint32_t ti = gi % sp->gte_per_gt;
    int ret;

    co_mutex_lock(&sp->meta_lock);
    ret = vmdk_gt_load_locked(bs, e, gdi);
    if (ret == 0 && sp->gd[gdi] == 0) {
        ret = vmdk_alloc_gt_locked(e, gdi);
    }
    if (ret == 0) {
        sp->gt[gdi][ti] = v;
        sp->gt_dirty[gdi] = true;
    }
    co_mutex_unlock(&sp->meta_lock);
    return ret;
}

/* Write @n entries of table @tab (host order) at @pos, little-endian. */
static int coroutine_fn vmdk_write_table(VmdkExtent *e, int64_t pos,
                                         const uint32_t *tab, uint32_t n)
{
    int64_t len = ALIGN_UP((int64_t)n * 4, VMDK_SECTOR);
    uint8_t *buf = g_malloc0(len);
    uint32_t i;
    int ret;

    for (i = 0; i < n; i++) {
        st32(buf + 4 * i, tab[i]);
    }
    ret = bdrv_co_pwrite(e->file, pos, len, buf, 0);
    g_free(buf);
    return ret;
}

int coroutine_fn vmdk_sparse_co_flush(BlockDriverState *bs, VmdkExtent *e)
{
    VmdkSparse *sp = e->sp;
    uint32_t **copies = NULL;
    uint32_t gdi, n = 0;
    int ret = 0;

    (void)bs;
    /* What the tables say now: entries set later belong to a later
     * flush, whose data flush covers their grains. */
    co_mutex_lock(&sp->meta_lock);
    for (gdi = 0; gdi < sp->gd_entries; gdi++) {
        if (sp->gt_dirty[gdi]) {
            if (!copies) {
                copies = g_new0(uint32_t *, sp->gd_entries);
            }
            copies[gdi] = g_memdup2(sp->gt[gdi],
                                    (gsize)sp->gte_per_gt * sizeof(uint32_t));
            sp->gt_dirty[gdi] = false;
            n++;
        }
    }
    co_mutex_unlock(&sp->meta_lock);
    if (!n) {
        return 0;
    }

    /* The grains first, then the entries that point to them. */
    ret = bdrv_co_flush(e->file->bs);
    for (gdi = 0; gdi < sp->gd_entries; gdi++) {
        if (!copies[gdi]) {
            continue;
        }
        if (ret == 0) {
            ret = vmdk_write_table(e, (int64_t)sp->gd[gdi] * VMDK_SECTOR,
                                   copies[gdi], sp->gte_per_gt);
        }
        if (ret == 0 && sp->rgd && sp->rgd[gdi]) {
            ret = vmdk_write_table(e, (int64_t)sp->rgd[gdi] * VMDK_SECTOR,
                                   copies[gdi], sp->gte_per_gt);
        }
        if (ret < 0) {
            /* Not written: the next flush tries again. */
            sp->gt_dirty[gdi] = true;
        }
        g_free(copies[gdi]);
    }
    g_free(copies);
    if (ret < 0) {
        log_error("%s: cannot write grain tables: %s", bdrv_name(e->file->bs),
                  strerror(-ret));
    }
    return ret;
}

/* The contents grain @gi has now (@st, @host from the lookup). */
static int coroutine_fn vmdk_grain_contents(BlockDriverState *bs, VmdkExtent *e,
                                            uint64_t gi, int st, uint64_t host,
                                            uint8_t *buf)
{
    int64_t len = vmdk_grain_len(e, gi);
    IOVector qiov;

    memset(buf, 0, e->sp->grain_bytes);
    if (st == VMDK_GRAIN_DATA) {
        return vmdk_read_compressed(e, gi, host, buf);
    }
    if (st == VMDK_GRAIN_UNALLOCATED) {
        iov_init_buf(&qiov, buf, len);
        return vmdk_co_read_parent(bs, e->start + gi * e->sp->grain_bytes, len,
                                   &qiov, 0);
    }
    return 0;
}

/* Write @n bytes at @in of grain @gi, which is not allocated (or is a
 * compressed grain, which is always rewritten whole). */
static int coroutine_fn vmdk_rewrite_grain(BlockDriverState *bs, VmdkExtent *e,
                                           uint64_t gi, int st, uint64_t host,
                                           int64_t in, int64_t n,
                                           IOVector *qiov, size_t qoff)
{
    VmdkSparse *sp = e->sp;
    int64_t glen = vmdk_grain_len(e, gi);
    uint8_t *buf = NULL, *out = NULL;
    int64_t pos = -1, len;
    int ret;

    if (!sp->compressed && in == 0 && n == (int64_t)sp->grain_bytes) {
        /* A whole grain: straight from the request. */
        pos = vmdk_reserve(sp, sp->grain_bytes);
        if (pos < 0) {
            return pos;
        }
        vmdk_appended_add(sp, pos, gi);
        ret = bdrv_co_pwritev(e->file, pos, n, qiov, qoff, 0);
        goto set_entry;
    }

    buf = bdrv_try_blockalign(e->file->bs, sp->grain_bytes);
    if (!buf) {
        return -ENOMEM;
    }
    if (!sp->compressed && st == VMDK_GRAIN_DATA) {
        /* Cannot happen: allocated plain grains are written in place. */
        bdrv_vfree(buf);
        return -EIO;
    }
    ret = vmdk_grain_contents(bs, e, gi, st, host, buf);
    if (ret < 0) {
        goto out;
    }
    iov_to_buf(qiov, qoff, buf + in, n);

    if (!sp->compressed) {
        pos = vmdk_reserve(sp, sp->grain_bytes);
        if (pos < 0) {
            ret = pos;
            goto out;
        }
        vmdk_appended_add(sp, pos, gi);
        ret = bdrv_co_pwrite(e->file, pos, sp->grain_bytes, buf, 0);
    } else {
        uLongf clen = compressBound(glen);

        /* marker, deflated grain, padding, end-of-stream marker */
        out = g_try_malloc0(
            ALIGN_UP(VMDK_GRAIN_MARKER_SIZE + clen, VMDK_SECTOR) + VMDK_SECTOR);
        if (!out) {
            ret = -ENOMEM;
            goto out;
        }
        if (compress2(out + VMDK_GRAIN_MARKER_SIZE, &clen, buf, glen,
                      Z_DEFAULT_COMPRESSION) != Z_OK) {
            ret = -EIO;
            goto out;
        }
        st64(out, gi * (sp->grain_bytes / VMDK_SECTOR));
        st32(out + 8, clen);
        len = ALIGN_UP(VMDK_GRAIN_MARKER_SIZE + clen, VMDK_SECTOR);
        memset(out + VMDK_GRAIN_MARKER_SIZE + clen, 0,
               len + VMDK_SECTOR - VMDK_GRAIN_MARKER_SIZE - clen);
        /* One append at a time: each overwrites the end-of-stream
         * sector the previous one wrote. */
        co_mutex_lock(&sp->append_lock);
        pos = vmdk_reserve(sp, len);
        if (pos >= 0) {
            vmdk_appended_add(sp, pos, gi);
        }
        ret = pos < 0 ? (int)pos
                      : bdrv_co_pwrite(e->file, pos, len + VMDK_SECTOR, out, 0);
        co_mutex_unlock(&sp->append_lock);
        if (ret < 0) {
            goto set_entry;
        }
    }

set_entry:
    if (ret == 0) {
        ret = vmdk_set_gte(bs, e, gi, pos / VMDK_SECTOR);
    }
    if (ret == 0 && st == VMDK_GRAIN_DATA) {
        /* A compressed grain appended again: its old copy is dead. */
        vmdk_appended_remove(sp, host, gi);
    } else if (ret < 0 && pos >= 0) {
        /* No entry points at the failed append. */
        vmdk_appended_remove(sp, pos, gi);
    }
out:
    bdrv_vfree(buf);
    g_free(out);
    return ret;
}

static VmdkGrainBusy *vmdk_find_busy(VmdkSparse *sp, uint64_t gi)
{
    VmdkGrainBusy *b;

    for (b = sp->busy; b; b = b->next) {
        if (b->grain == gi) {
            return b;
        }
    }
    return NULL;
}

int coroutine_fn vmdk_sparse_co_pwritev(BlockDriverState *bs, VmdkExtent *e,
                                        int64_t off, int64_t bytes,
                                        IOVector *qiov, size_t qoff)
{
    VmdkSparse *sp = e->sp;
    int ret;

    while (bytes > 0) {
        uint64_t gi = off / sp->grain_bytes;
        int64_t in = off % sp->grain_bytes;
        int64_t n = sp->grain_bytes - in < (uint64_t)bytes
                        ? (int64_t)sp->grain_bytes - in
                        : bytes;
        VmdkGrainBusy busy, **link;
        uint64_t host = 0;
        int st;

        st = vmdk_sparse_co_lookup(bs, e, off, &host);
        if (st < 0) {
            return st;
        }
        if (st == VMDK_GRAIN_DATA && !sp->compressed) {
            /* Allocated: in place, merging contiguous grains. */
            while (n < bytes) {
                uint64_t next = 0;
                int64_t m = bytes - n < (int64_t)sp->grain_bytes
                                ? bytes - n
                                : (int64_t)sp->grain_bytes;
                int st2 = vmdk_sparse_co_lookup(bs, e, off + n, &next);

                if (st2 != VMDK_GRAIN_DATA || next != host + in + n) {
                    break;
                }
                n += m;
            }
            ret = bdrv_co_pwritev(e->file, host + in, n, qiov, qoff, 0);
        } else {
            VmdkGrainBusy *other = vmdk_find_busy(sp, gi);

            if (other) {
                /* Someone is allocating this grain: look again after. */
                co_queue_wait(&other->waiters, NULL);
                continue;
            }
            busy.grain = gi;
            co_queue_init(&busy.waiters);
            busy.next = sp->busy;
            sp->busy = &busy;
            ret = vmdk_rewrite_grain(bs, e, gi, st, host, in, n, qiov, qoff);
            for (link = &sp->busy; *link != &busy; link = &(*link)->next) {
            }
            *link = busy.next;
            co_queue_restart_all(&busy.waiters);
        }
        if (ret < 0) {
            return ret;
        }
        off += n;
        qoff += n;
        bytes -= n;
    }
    return 0;
}

int coroutine_fn vmdk_sparse_co_set_unclean(BlockDriverState *bs, VmdkExtent *e,
                                            bool on)
{
    uint8_t v = on;
    int ret;

    ret = bdrv_co_pwrite(e->file, KH_UNCLEAN, 1, &v, 0);
    if (ret == 0) {
        ret = bdrv_co_flush(e->file->bs);
    }
    (void)bs;
    return ret;
}
