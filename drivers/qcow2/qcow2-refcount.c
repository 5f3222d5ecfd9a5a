/*
 * qcow2 refcounts: entries of any width (1 to 64 bits), the cluster
 * allocator, refcount blocks and table growth, deferred frees, the map of
 * metadata clusters behind the overlap check, and the repair of an image
 * left dirty by a crash with lazy refcounts.
 *
 * Structure changes are strictly ordered and flushed at once (they are
 * rare): a new refcount block is written before the table entry that
 * points to it, a new refcount table before the header that names it.
 * Refcount values go through the cache; qcow2-cache.c writes them before
 * the L2 tables that depend on them.  Decrements wait in a pending list
 * (qcow2_free_later) until the change that dropped the reference is on
 * disk, so a crash can leak a cluster but never free one still in use.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "qcow2.h"

/* ---- refcount block entries ---- */

uint64_t qcow2_refblock_get(const Qcow2State *s, const void *block,
                            uint64_t index)
{
    const uint8_t *p = block;

    switch (s->refcount_order) {
    case 0:
    case 1:
    case 2: {
        uint64_t bit = index * s->refcount_bits;

        return (p[bit / 8] >> (bit % 8)) & ((1u << s->refcount_bits) - 1);
    }
    case 3:
        return p[index];
    case 4:
        return qcow2_get_be16(p + index * 2);
    case 5:
        return qcow2_get_be32(p + index * 4);
    default:
        return qcow2_get_be64(p + index * 8);
    }
}

void qcow2_refblock_set(const Qcow2State *s, void *block, uint64_t index,
                        uint64_t value)
{
    uint8_t *p = block;

    switch (s->refcount_order) {
    case 0:
    case 1:
    case 2: {
        uint64_t bit = index * s->refcount_bits;
        uint8_t mask = ((1u << s->refcount_bits) - 1) << (bit % 8);

        p[bit / 8] = (p[bit / 8] & ~mask) | ((value << (bit % 8)) & mask);
        break;
    }
    case 3:
        p[index] = value;
        break;
    case 4:
        qcow2_put_be16(p + index * 2, value);
        break;
    case 5:
        qcow2_put_be32(p + index * 4, value);
        break;
    default:
        qcow2_put_be64(p + index * 8, value);
        break;
    }
}

/* ---- the metadata map (overlap check) ---- */

static gpointer meta_key(int64_t index)
{
    return GSIZE_TO_POINTER((gsize)index);
}

const char *qcow2_meta_name(Qcow2MetaType type)
{
    switch (type) {
    case QCOW2_META_HEADER:
        return "the header";
    case QCOW2_META_L1:
        return "the L1 table";
    case QCOW2_META_L2:
        return "an L2 table";
    case QCOW2_META_REFTABLE:
        return "the refcount table";
    case QCOW2_META_REFBLOCK:
        return "a refcount block";
    case QCOW2_META_SNAPSHOT_TABLE:
        return "the snapshot table";
    case QCOW2_META_SNAPSHOT_L1:
        return "a snapshot's L1 table";
    case QCOW2_META_BITMAP_DIR:
        return "the bitmap directory";
    default:
        return "guest data or free space";
    }
}

void qcow2_meta_add(Qcow2State *s, uint64_t offset, uint64_t bytes,
                    Qcow2MetaType type)
{
    int64_t i, first = qcow2_cluster_index(s, offset);
    int64_t end = DIV_ROUND_UP(offset + bytes, (uint64_t)s->cluster_size);

    for (i = first; i < end; i++) {
        g_hash_table_insert(s->meta, meta_key(i), GINT_TO_POINTER(type));
    }
}

void qcow2_meta_remove(Qcow2State *s, uint64_t offset, uint64_t bytes)
{
    int64_t i, first = qcow2_cluster_index(s, offset);
    int64_t end = DIV_ROUND_UP(offset + bytes, (uint64_t)s->cluster_size);

    for (i = first; i < end; i++) {
        g_hash_table_remove(s->meta, meta_key(i));
    }
}

Qcow2MetaType qcow2_meta_type(Qcow2State *s, uint64_t offset)
{
    return GPOINTER_TO_INT(
        g_hash_table_lookup(s->meta, meta_key(qcow2_cluster_index(s, offset))));
}

int qcow2_meta_check_write(Qcow2State *s, uint64_t offset, uint64_t bytes,
                           Qcow2MetaType type)
{
    uint64_t pos;

    for (pos = qcow2_start_of_cluster(s, offset); pos < offset + bytes;
         pos += s->cluster_size) {
        Qcow2MetaType t = qcow2_meta_type(s, pos);

        if (t != type) {
            return qcow2_signal_corruption(
                s, true, pos,
                "refusing to write %s over %s (metadata overlap check)",
                qcow2_meta_name(type), qcow2_meta_name(t));
        }
    }
    return 0;
}

/* Register a structure read from the header; a clash is an open error. */
static int meta_add_checked(Qcow2State *s, uint64_t offset, uint64_t bytes,
                            Qcow2MetaType type, GError **errp)
{
    uint64_t pos;

    for (pos = qcow2_start_of_cluster(s, offset); pos < offset + bytes;
         pos += s->cluster_size) {
        Qcow2MetaType t = qcow2_meta_type(s, pos);

        if (t != QCOW2_META_NONE && !(t == type && type == QCOW2_META_L2)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "'%s': corrupt image: %s at offset 0x%" PRIx64
                        " overlaps %s",
                        bdrv_name(s->bs), qcow2_meta_name(type), pos,
                        qcow2_meta_name(t));
            return -EIO;
        }
    }
    qcow2_meta_add(s, offset, bytes, type);
    return 0;
}

int qcow2_meta_build(Qcow2State *s, GError **errp)
{
    uint64_t file_len = bdrv_getlength(s->bs->file->bs);
    uint64_t i;
    int ret;

    s->meta = g_hash_table_new(g_direct_hash, g_direct_equal);
    qcow2_meta_add(s, 0, s->cluster_size, QCOW2_META_HEADER);
    ret = meta_add_checked(s, s->reftable_offset,
                           (uint64_t)s->reftable_clusters * s->cluster_size,
                           QCOW2_META_REFTABLE, errp);
    if (ret == 0 && s->l1_size) {
        ret = meta_add_checked(s, s->l1_offset, (uint64_t)s->l1_size * 8,
                               QCOW2_META_L1, errp);
    }
    if (ret == 0 && s->nb_snapshots) {
        ret = meta_add_checked(s, s->snapshots_offset, s->snapshots_bytes,
                               QCOW2_META_SNAPSHOT_TABLE, errp);
    }
    for (i = 0; ret == 0 && i < s->nb_snapshots; i++) {
        Qcow2Snapshot *sn = &s->snapshots[i];

        if (sn->l1_size) {
            ret = meta_add_checked(s, sn->l1_offset, (uint64_t)sn->l1_size * 8,
                                   QCOW2_META_SNAPSHOT_L1, errp);
        }
    }
    if (ret == 0 && s->has_bitmaps && s->bitmap_dir_size) {
        ret = meta_add_checked(s, s->bitmap_dir_offset, s->bitmap_dir_size,
                               QCOW2_META_BITMAP_DIR, errp);
    }
    for (i = 0; ret == 0 && i < s->reftable_entries; i++) {
        uint64_t off = s->reftable[i];

        if (!off) {
            continue;
        }
        if (qcow2_offset_into_cluster(s, off) || off >= file_len) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "'%s': corrupt image: refcount block %" PRIu64
                        " at offset 0x%" PRIx64 " is %s",
                        bdrv_name(s->bs), i, off,
                        off >= file_len ? "past the end of the file"
                                        : "not aligned to a cluster");
            return -EIO;
        }
        ret = meta_add_checked(s, off, s->cluster_size, QCOW2_META_REFBLOCK,
                               errp);
    }
    if (ret < 0) {
        return ret;
    }
    /* L2 tables: bad ones are reported when a request needs them. */
    for (i = 0; i < s->l1_size; i++) {
        uint64_t l2 = s->l1[i] & QCOW2_L1E_OFFSET_MASK;

        if (l2 && !qcow2_offset_into_cluster(s, l2) && l2 < file_len &&
            qcow2_meta_type(s, l2) == QCOW2_META_NONE) {
            qcow2_meta_add(s, l2, s->cluster_size, QCOW2_META_L2);
        }
    }
    return 0;
}

/* ---- refcounts ---- */

static uint64_t refblock_offset(Qcow2State *s, int64_t block)
{
    if ((uint64_t)block >= s->reftable_entries) {
        return 0;
    }
    return s->reftable[block];
}

int coroutine_fn qcow2_co_update_refcount(Qcow2State *s, uint64_t offset,
                                          uint64_t bytes, int64_t addend)
{
    int64_t first = qcow2_cluster_index(s, offset);
    int64_t last = qcow2_cluster_index(s, offset + bytes - 1);
    Qcow2CacheEntry *e = NULL;
    int64_t cur_block = -1;
    int64_t i;
    int ret = 0;

    if (bytes == 0) {
        return 0;
    }
    for (i = first; i <= last; i++) {
        int64_t block = i >> s->refblock_bits;
        uint64_t idx = i & (s->refblock_entries - 1);
        uint64_t old, val;

        if (block != cur_block) {
            uint64_t off = refblock_offset(s, block);

            if (e) {
                qcow2_cache_put(s->rb_cache, e);
                e = NULL;
            }
            cur_block = block;
            if (!off) {
                ret = qcow2_signal_corruption(
                    s, true, i << s->cluster_bits,
                    "%s the refcount of a cluster that has no refcount block",
                    addend < 0 ? "cannot decrease" : "cannot increase");
                break;
            }
            ret = qcow2_cache_get(s->rb_cache, off, &e);
            if (ret < 0) {
                break;
            }
        }
        old = qcow2_refblock_get(s, e->data, idx);
        if (addend < 0 && old < (uint64_t)-addend) {
            ret = qcow2_signal_corruption(
                s, true, i << s->cluster_bits,
                "refcount of cluster would drop below zero (it is %" PRIu64 ")",
                old);
            break;
        }
        val = old + addend;
        if (addend > 0 && (val > s->refcount_max || val < old)) {
            ret = qcow2_signal_corruption(
                s, true, i << s->cluster_bits,
                "refcount overflow: cluster already has refcount %" PRIu64
                " (refcount_bits=%u)",
                old, s->refcount_bits);
            break;
        }
        qcow2_refblock_set(s, e->data, idx, val);
        qcow2_cache_mark_dirty(s->rb_cache, e);
        if (val == 0) {
            if (i < s->free_hint) {
                s->free_hint = i;
            }
            qcow2_cache_drop(s->l2_cache, (uint64_t)i << s->cluster_bits);
        }
        if (addend > 0 &&
            ((uint64_t)(i + 1) << s->cluster_bits) > s->fresh_start) {
            s->fresh_start = (uint64_t)(i + 1) << s->cluster_bits;
        }
    }
    if (e) {
        qcow2_cache_put(s->rb_cache, e);
    }
    return ret;
}

/* Write refcount table entry @index from memory. */
static int coroutine_fn write_reftable_entry(Qcow2State *s, uint64_t index)
{
    uint64_t off = s->reftable_offset + index * 8;
    uint64_t be = htobe64(s->reftable[index]);
    int ret = qcow2_meta_check_write(s, off, 8, QCOW2_META_REFTABLE);

    if (ret < 0) {
        return ret;
    }
    return bdrv_co_pwrite(s->bs->file, off, 8, &be, 0);
}

/* A new, written refcount block at @off with @ones clusters of its
 * range (from index @first) counted once. */
static int coroutine_fn write_new_refblock(Qcow2State *s, uint64_t off,
                                           uint64_t first, uint64_t ones)
{
    Qcow2CacheEntry *e;
    uint64_t j;
    int ret;

    if (qcow2_meta_type(s, off) != QCOW2_META_NONE) {
        return qcow2_signal_corruption(
            s, true, off, "a new refcount block would overwrite %s",
            qcow2_meta_name(qcow2_meta_type(s, off)));
    }
    ret = qcow2_cache_get_empty(s->rb_cache, off, &e);
    if (ret < 0) {
        return ret;
    }
    for (j = 0; j < ones; j++) {
        qcow2_refblock_set(s, e->data, first + j, 1);
    }
    qcow2_meta_add(s, off, s->cluster_size, QCOW2_META_REFBLOCK);
    ret = qcow2_co_cache_write_entry(s->rb_cache, e);
    qcow2_cache_put(s->rb_cache, e);
    if (ret < 0) {
        qcow2_meta_remove(s, off, s->cluster_size);
        qcow2_cache_drop(s->rb_cache, off);
    }
    return ret;
}

/*
 * Grow the refcount table so that it has an entry for block @need.  The
 * new table and the refcount blocks describing it go right past what the
 * old table covers (all free, since nothing there has a refcount).
 */
static int coroutine_fn grow_reftable(Qcow2State *s, uint64_t need)
{
    uint64_t epb = s->refblock_entries;
    uint64_t cs = s->cluster_size;
    uint64_t area = s->reftable_entries * epb; /* first uncovered cluster */
    uint64_t want = MAX(need + 1, s->reftable_entries * 3 / 2 + 1);
    uint64_t nb = 1, k, total, j, old_off, old_clusters;
    uint64_t *table = NULL;
    uint64_t *be = NULL;
    uint8_t hdr[12];
    int ret;

    for (;;) {
        uint64_t nb2;

        k = DIV_ROUND_UP(want * 8, cs);
        nb2 = DIV_ROUND_UP(nb + k, epb);
        if (k * cs / 8 < s->reftable_entries + nb2) {
            want = s->reftable_entries + nb2;
            continue;
        }
        if (nb2 == nb) {
            break;
        }
        nb = nb2;
    }
    total = nb + k;
    if (k * cs > QCOW2_MAX_REFTABLE_BYTES ||
        (area + total) > (QCOW2_MAX_HOST_OFFSET >> s->cluster_bits)) {
        log_msg(LOG_LEVEL_ERROR,
                "%s: the refcount table cannot grow further (image full)",
                bdrv_name(s->bs));
        return -ENOSPC;
    }

    qcow2_co_prealloc_ahead(s, (area + total) * cs);
    /* The blocks: each counts the new clusters in its range. */
    for (j = 0; j < nb; j++) {
        uint64_t range = area + j * epb;
        uint64_t ones = MIN(epb, area + total - range);

        ret = write_new_refblock(s, (area + j) * cs, 0, ones);
        if (ret < 0) {
            return ret;
        }
    }
    table = g_new0(uint64_t, k * cs / 8);
    memcpy(table, s->reftable, s->reftable_entries * 8);
    for (j = 0; j < nb; j++) {
        table[s->reftable_entries + j] = (area + j) * cs;
    }
    be = bdrv_blockalign(s->bs->file->bs, k * cs);
    for (j = 0; j < k * cs / 8; j++) {
        be[j] = htobe64(table[j]);
    }
    qcow2_meta_add(s, (area + nb) * cs, k * cs, QCOW2_META_REFTABLE);
    ret = bdrv_co_pwrite(s->bs->file, (area + nb) * cs, k * cs, be, 0);
    bdrv_vfree(be);
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret == 0) {
        qcow2_put_be64(hdr, (area + nb) * cs);
        qcow2_put_be32(hdr + 8, k);
        ret = qcow2_co_write_header(s, QCOW2_HDR_REFTABLE_OFFSET, hdr, 12);
    }
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret < 0) {
        /* The old table stays in use; the new clusters are leaked. */
        qcow2_meta_remove(s, (area + nb) * cs, k * cs);
        g_free(table);
        return ret;
    }
    old_off = s->reftable_offset;
    old_clusters = s->reftable_clusters;
    g_free(s->reftable);
    s->reftable = table;
    s->reftable_offset = (area + nb) * cs;
    s->reftable_clusters = k;
    s->reftable_entries = k * cs / 8;
    qcow2_meta_remove(s, old_off, old_clusters * cs);
    qcow2_free_later(s, old_off, old_clusters);
    if ((area + total) * cs > s->fresh_start) {
        s->fresh_start = (area + total) * cs;
    }
    return 0;
}

/* Create refcount block @block, placed at the first cluster of its own
 * range (free: nothing in a range without a block has a refcount). */
static int coroutine_fn create_refblock(Qcow2State *s, uint64_t block)
{
    uint64_t off;
    int ret;

    if (block >= s->reftable_entries) {
        ret = grow_reftable(s, block);
        if (ret < 0 || s->reftable[block]) {
            return ret;
        }
    }
    off = block << (s->refblock_bits + s->cluster_bits);
    if (off > QCOW2_MAX_HOST_OFFSET - s->cluster_size) {
        return -ENOSPC;
    }
    qcow2_co_prealloc_ahead(s, off + s->cluster_size);
    ret = write_new_refblock(s, off, 0, 1);
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret < 0) {
        return ret;
    }
    s->reftable[block] = off;
    ret = write_reftable_entry(s, block);
    if (ret < 0) {
        s->reftable[block] = 0;
        return ret;
    }
    if (off + s->cluster_size > s->fresh_start) {
        s->fresh_start = off + s->cluster_size;
    }
    return 0;
}

/* Find @n contiguous free clusters from the hint; *@gap: the first free
 * cluster seen (maybe in a run too short), for the next hint. */
static int coroutine_fn find_free(Qcow2State *s, int64_t n, int64_t *found,
                                  int64_t *gap)
{
    int64_t start = s->free_hint, run = 0;
    int64_t limit = QCOW2_MAX_HOST_OFFSET >> s->cluster_bits;
    int64_t cur_block = -1;
    Qcow2CacheEntry *e = NULL;
    int ret = 0;

    *gap = -1;
    while (run < n) {
        int64_t c = start + run;
        int64_t block = c >> s->refblock_bits;
        uint64_t rc = 0;

        if (c >= limit) {
            ret = -ENOSPC;
            break;
        }
        if (block != cur_block) {
            uint64_t off = refblock_offset(s, block);

            if (e) {
                qcow2_cache_put(s->rb_cache, e);
                e = NULL;
            }
            cur_block = block;
            if (off) {
                ret = qcow2_cache_get(s->rb_cache, off, &e);
                if (ret < 0) {
                    break;
                }
            }
        }
        if (e) {
            rc = qcow2_refblock_get(s, e->data, c & (s->refblock_entries - 1));
        }
        if (rc == 0 && qcow2_meta_type(s, (uint64_t)c << s->cluster_bits)) {
            ret = qcow2_signal_corruption(
                s, true, (uint64_t)c << s->cluster_bits, "%s has refcount 0",
                qcow2_meta_name(
                    qcow2_meta_type(s, (uint64_t)c << s->cluster_bits)));
            break;
        }
        if (rc == 0) {
            if (*gap < 0) {
                *gap = c;
            }
            run++;
        } else {
            start = c + 1;
            run = 0;
        }
    }
    if (e) {
        qcow2_cache_put(s->rb_cache, e);
    }
    *found = start;
    return ret;
}

/*
 * @n contiguous clusters, too many to fit beside the refcount blocks that
 * sit at the start of every refcount range: placed at the start of the
 * first range past everything allocated, followed by new refcount blocks
 * that count them and themselves.  Caller holds lock.
 */
static int coroutine_fn alloc_large(Qcow2State *s, uint64_t n, uint64_t *offset)
{
    uint64_t epb = s->refblock_entries, cs = s->cluster_size;
    uint64_t area, first, nb, total, j;
    int ret;

    for (;;) {
        area = ALIGN_UP(DIV_ROUND_UP(s->fresh_start, cs), epb);
        for (nb = 1; DIV_ROUND_UP(n + nb, epb) != nb;) {
            nb = DIV_ROUND_UP(n + nb, epb);
        }
        first = area / epb;
        if (first + nb <= s->reftable_entries) {
            break;
        }
        ret = grow_reftable(s, first + nb - 1); /* moves fresh_start */
        if (ret < 0) {
            return ret;
        }
    }
    total = n + nb;
    if (area + total > (QCOW2_MAX_HOST_OFFSET >> s->cluster_bits)) {
        return -ENOSPC;
    }
    for (j = 0; j < nb; j++) {
        if (s->reftable[first + j]) {
            return qcow2_signal_corruption(
                s, true, s->reftable[first + j],
                "refcount block for clusters past the end of the image");
        }
    }
    qcow2_co_prealloc_ahead(s, (area + total) * cs);
    for (j = 0; j < nb; j++) {
        uint64_t range = area + j * epb;

        ret = write_new_refblock(s, (area + n + j) * cs, 0,
                                 MIN(epb, area + total - range));
        if (ret < 0) {
            return ret;
        }
    }
    ret = qcow2_co_flush_files(s);
    for (j = 0; ret == 0 && j < nb; j++) {
        s->reftable[first + j] = (area + n + j) * cs;
        ret = write_reftable_entry(s, first + j);
    }
    if (ret < 0) {
        return ret;
    }
    s->fresh_start = (area + total) * cs;
    *offset = area * cs;
    return 0;
}

int coroutine_fn qcow2_co_alloc_clusters(Qcow2State *s, int64_t n,
                                         uint64_t *offset)
{
    int64_t idx, gap;
    int ret;

    if (n > qcow2_max_alloc_clusters(s)) {
        return alloc_large(s, n, offset);
    }
    for (;;) {
        uint64_t b, first_block, last_block;
        bool created = false;

        ret = find_free(s, n, &idx, &gap);
        if (ret < 0) {
            return ret;
        }
        first_block = idx >> s->refblock_bits;
        last_block = (idx + n - 1) >> s->refblock_bits;
        for (b = first_block; b <= last_block; b++) {
            if (!refblock_offset(s, b)) {
                ret = create_refblock(s, b);
                if (ret < 0) {
                    return ret;
                }
                created = true;
            }
        }
        if (!created) {
            break;
        }
        /* The new blocks took clusters: look again. */
    }
    ret = qcow2_co_update_refcount(s, (uint64_t)idx << s->cluster_bits,
                                   (uint64_t)n << s->cluster_bits, 1);
    if (ret < 0) {
        return ret;
    }
    s->free_hint = (gap >= 0 && gap < idx) ? gap : idx + n;
    *offset = (uint64_t)idx << s->cluster_bits;
    qcow2_co_prealloc_ahead(s, *offset + ((uint64_t)n << s->cluster_bits));
    return 0;
}

void qcow2_free_later(Qcow2State *s, uint64_t offset, uint64_t clusters)
{
    Qcow2PendingFree f = {.offset = offset, .clusters = clusters};

    if (clusters) {
        g_array_append_val(s->pending_frees, f);
    }
}

int coroutine_fn qcow2_co_apply_frees(Qcow2State *s, unsigned count)
{
    GArray *a = s->pending_frees;
    unsigned i, kept = 0;
    int ret = 0;

    if (count > a->len) {
        count = a->len;
    }
    for (i = 0; i < count; i++) {
        Qcow2PendingFree f = g_array_index(a, Qcow2PendingFree, i);
        uint64_t bytes = f.clusters << s->cluster_bits;

        if (ret < 0 || s->broken || qcow2_host_io_busy(s, f.offset, bytes)) {
            /* Still read or written by a request: next time. */
            if (!s->broken) {
                g_array_index(a, Qcow2PendingFree, kept++) = f;
            }
            continue;
        }
        ret = qcow2_co_update_refcount(s, f.offset, bytes, -1);
    }
    /* Keep the entries queued after @count, behind the kept ones. */
    if (kept < count) {
        memmove(&g_array_index(a, Qcow2PendingFree, kept),
                &g_array_index(a, Qcow2PendingFree, count),
                (a->len - count) * sizeof(Qcow2PendingFree));
        g_array_set_size(a, a->len - (count - kept));
    }
    return ret;
}

void qcow2_compressed_range(Qcow2State *s, uint64_t entry, uint64_t *offset,
                            uint64_t *bytes)
{
    unsigned x = 62 - (s->cluster_bits - 8);
    uint64_t off = entry & ((UINT64_C(1) << x) - 1);
    uint64_t sectors =
        ((entry >> x) & ((UINT64_C(1) << (s->cluster_bits - 8)) - 1)) + 1;

    *offset = off;
    *bytes = (off & ~UINT64_C(511)) + sectors * 512 - off;
}

/* ---- repair ---- */

typedef struct Repair {
    Qcow2State *s;
    uint32_t *refs; /* references found, per cluster */
    uint64_t nb;    /* clusters in refs */
    uint64_t limit; /* no metadata points at or past this cluster */
    uint8_t *buf;   /* one cluster */
} Repair;

/* Count one reference to each cluster of [@offset, +@bytes). */
static int repair_inc(Repair *r, uint64_t offset, uint64_t bytes,
                      const char *what)
{
    Qcow2State *s = r->s;
    uint64_t i, first, last;

    if (bytes == 0) {
        return 0;
    }
    first = qcow2_cluster_index(s, offset);
    last = qcow2_cluster_index(s, offset + bytes - 1);
    if (last >= r->limit) {
        return qcow2_signal_corruption(
            s, false, offset, "%s lies past the end of the file", what);
    }
    if (last >= r->nb) {
        uint64_t n = MAX(last + 1, r->nb * 2);

        r->refs = g_renew(uint32_t, r->refs, n);
        memset(r->refs + r->nb, 0, (n - r->nb) * sizeof(uint32_t));
        r->nb = n;
    }
    for (i = first; i <= last; i++) {
        if (r->refs[i] < UINT32_MAX) {
            r->refs[i]++;
        }
    }
    return 0;
}

static void repair_dec(Repair *r, uint64_t offset, uint64_t bytes)
{
    uint64_t i = qcow2_cluster_index(r->s, offset);
    uint64_t last = qcow2_cluster_index(r->s, offset + bytes - 1);

    for (; bytes && i <= last && i < r->nb; i++) {
        if (r->refs[i]) {
            r->refs[i]--;
        }
    }
}

/* Count an L2 table and everything it maps. */
static int coroutine_fn repair_l2(Repair *r, uint64_t l2_offset)
{
    Qcow2State *s = r->s;
    int64_t j;
    int ret;

    if (qcow2_offset_into_cluster(s, l2_offset)) {
        return qcow2_signal_corruption(s, false, l2_offset,
                                       "L2 table not aligned to a cluster");
    }
    ret = repair_inc(r, l2_offset, s->cluster_size, "an L2 table");
    if (ret < 0) {
        return ret;
    }
    ret = bdrv_co_pread(s->bs->file, l2_offset, s->cluster_size, r->buf, 0);
    if (ret < 0) {
        return ret;
    }
    for (j = 0; j < s->l2_entries; j++) {
        uint64_t entry = qcow2_get_be64(r->buf + j * s->l2_entry_bytes);
        uint64_t off, bytes;

        if (entry & QCOW2_OFLAG_COMPRESSED) {
            qcow2_compressed_range(s, entry, &off, &bytes);
            ret =
                repair_inc(r, qcow2_start_of_cluster(s, off),
                           qcow2_start_of_cluster(s, off + bytes - 1) +
                               s->cluster_size - qcow2_start_of_cluster(s, off),
                           "a compressed cluster");
        } else {
            off = entry & QCOW2_L2E_OFFSET_MASK;
            if (!off || qcow2_has_data_file(s)) {
                continue;
            }
            if (qcow2_offset_into_cluster(s, off)) {
                return qcow2_signal_corruption(
                    s, false, l2_offset + j * s->l2_entry_bytes,
                    "L2 entry with a misaligned cluster offset 0x%" PRIx64,
                    off);
            }
            ret = repair_inc(r, off, s->cluster_size, "a data cluster");
        }
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

static int coroutine_fn repair_l1(Repair *r, const uint64_t *l1,
                                  uint32_t l1_size)
{
    uint32_t i;
    int ret;

    for (i = 0; i < l1_size; i++) {
        uint64_t l2 = l1[i] & QCOW2_L1E_OFFSET_MASK;

        if (l2) {
            ret = repair_l2(r, l2);
            if (ret < 0) {
                return ret;
            }
        }
    }
    return 0;
}

static int coroutine_fn repair_snapshots(Repair *r)
{
    Qcow2State *s = r->s;
    uint32_t i, j;
    int ret;

    if (!s->nb_snapshots) {
        return 0;
    }
    ret = repair_inc(r, s->snapshots_offset, s->snapshots_bytes,
                     "the snapshot table");
    for (i = 0; ret == 0 && i < s->nb_snapshots; i++) {
        Qcow2Snapshot *sn = &s->snapshots[i];
        uint64_t *l1;

        if (!sn->l1_size) {
            continue;
        }
        ret = repair_inc(r, sn->l1_offset, (uint64_t)sn->l1_size * 8,
                         "a snapshot L1 table");
        if (ret < 0) {
            break;
        }
        l1 = g_new(uint64_t, sn->l1_size);
        ret = bdrv_co_pread(s->bs->file, sn->l1_offset,
                            (int64_t)sn->l1_size * 8, l1, 0);
        for (j = 0; ret == 0 && j < sn->l1_size; j++) {
            l1[j] = be64toh(l1[j]);
        }
        if (ret == 0) {
            ret = repair_l1(r, l1, sn->l1_size);
        }
        g_free(l1);
    }
    return ret;
}

/* The bitmaps extension: directory, bitmap tables, bitmap data. */
static int coroutine_fn repair_bitmaps(Repair *r)
{
    Qcow2State *s = r->s;
    uint8_t *dir;
    uint64_t pos = 0;
    uint32_t i;
    int ret;

    if (!s->has_bitmaps || !s->bitmap_dir_size ||
        s->bitmap_dir_size > QCOW2_MAX_BITMAP_DIR) {
        return 0;
    }
    ret = repair_inc(r, s->bitmap_dir_offset, s->bitmap_dir_size,
                     "the bitmap directory");
    if (ret < 0) {
        return ret;
    }
    dir = g_malloc(s->bitmap_dir_size);
    ret = bdrv_co_pread(s->bs->file, s->bitmap_dir_offset, s->bitmap_dir_size,
                        dir, 0);
    for (i = 0; ret == 0 && i < s->nb_bitmaps; i++) {
        uint64_t table_off, *table;
        uint32_t table_size, extra;
        uint16_t name_size;
        uint32_t j;

        if (pos + 24 > s->bitmap_dir_size) {
            break;
        }
        table_off = qcow2_get_be64(dir + pos);
        table_size = qcow2_get_be32(dir + pos + 8);
        name_size = qcow2_get_be16(dir + pos + 18);
        extra = qcow2_get_be32(dir + pos + 20);
        pos += ALIGN_UP(24 + (uint64_t)extra + name_size, 8);
        if (!table_off || table_size > 64 * MiB / 8) {
            continue;
        }
        ret = repair_inc(r, table_off, (uint64_t)table_size * 8,
                         "a bitmap table");
        if (ret < 0) {
            break;
        }
        table = g_new(uint64_t, table_size ? table_size : 1);
        ret = bdrv_co_pread(s->bs->file, table_off, (int64_t)table_size * 8,
                            table, 0);
        for (j = 0; ret == 0 && j < table_size; j++) {
            uint64_t off = be64toh(table[j]) & QCOW2_L2E_OFFSET_MASK;

            if (off) {
                ret = repair_inc(r, off, s->cluster_size, "bitmap data");
            }
        }
        g_free(table);
    }
    g_free(dir);
    return ret;
}

static bool repair_range_used(Repair *r, uint64_t block)
{
    uint64_t i = block << r->s->refblock_bits;
    uint64_t end = MIN(r->nb, i + r->s->refblock_entries);

    for (; i < end; i++) {
        if (r->refs[i]) {
            return true;
        }
    }
    return false;
}

static uint64_t repair_last_used(Repair *r)
{
    uint64_t i = r->nb;

    while (i > 0 && !r->refs[i - 1]) {
        i--;
    }
    return i; /* one past the last used cluster */
}

/*
 * Place missing refcount blocks (and a bigger refcount table if needed)
 * past everything in use; loops until the structure covers itself.
 */
static int repair_layout(Repair *r, uint64_t **table, uint64_t *entries,
                         uint64_t *new_table_off, uint64_t *new_table_k)
{
    Qcow2State *s = r->s;
    uint64_t cs = s->cluster_size;
    uint64_t pos = MAX(repair_last_used(r), r->limit);
    bool changed = true;

    while (changed) {
        uint64_t need = DIV_ROUND_UP(repair_last_used(r), s->refblock_entries);
        uint64_t b;

        changed = false;
        if (need > *entries) {
            uint64_t k = DIV_ROUND_UP((need + need / 4 + 8) * 8, cs);

            if (k * cs > QCOW2_MAX_REFTABLE_BYTES) {
                return -ENOSPC;
            }
            if (*new_table_off) {
                repair_dec(r, *new_table_off, *new_table_k * cs);
            } else {
                repair_dec(r, s->reftable_offset,
                           (uint64_t)s->reftable_clusters * cs);
            }
            r->limit = MAX(r->limit, pos + k);
            *new_table_off = pos * cs;
            *new_table_k = k;
            repair_inc(r, pos * cs, k * cs, "the refcount table");
            pos += k;
            *table = g_renew(uint64_t, *table, k * cs / 8);
            memset(*table + *entries, 0, (k * cs / 8 - *entries) * 8);
            *entries = k * cs / 8;
            changed = true;
            continue;
        }
        for (b = 0; b < need; b++) {
            if (!(*table)[b] && repair_range_used(r, b)) {
                r->limit = MAX(r->limit, pos + 1);
                (*table)[b] = pos * cs;
                repair_inc(r, pos * cs, cs, "a refcount block");
                pos++;
                changed = true;
            }
        }
    }
    return 0;
}

/* Set or clear COPIED in the active L1 and L2 tables to match. */
static int coroutine_fn repair_copied_flags(Repair *r)
{
    Qcow2State *s = r->s;
    bool l1_changed = false;
    uint32_t i;
    int64_t j;
    int ret;

    for (i = 0; i < s->l1_size; i++) {
        uint64_t l2 = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
        bool changed = false;

        if (!l2) {
            continue;
        }
        if ((r->refs[qcow2_cluster_index(s, l2)] == 1) !=
            !!(s->l1[i] & QCOW2_OFLAG_COPIED)) {
            s->l1[i] ^= QCOW2_OFLAG_COPIED;
            l1_changed = true;
        }
        ret = bdrv_co_pread(s->bs->file, l2, s->cluster_size, r->buf, 0);
        if (ret < 0) {
            return ret;
        }
        for (j = 0; j < s->l2_entries; j++) {
            uint64_t entry = qcow2_get_be64(r->buf + j * s->l2_entry_bytes);
            uint64_t host;
            bool want;

            if (entry & QCOW2_OFLAG_COMPRESSED) {
                want = false;
            } else {
                host = entry & QCOW2_L2E_OFFSET_MASK;
                if (qcow2_has_data_file(s) || !host) {
                    continue;
                }
                want = r->refs[qcow2_cluster_index(s, host)] == 1;
            }
            if (want != !!(entry & QCOW2_OFLAG_COPIED)) {
                qcow2_put_be64(r->buf + j * s->l2_entry_bytes,
                               entry ^ QCOW2_OFLAG_COPIED);
                changed = true;
            }
        }
        if (changed) {
            ret = qcow2_meta_check_write(s, l2, s->cluster_size, QCOW2_META_L2);
            if (ret == 0) {
                ret =
                    bdrv_co_pwrite(s->bs->file, l2, s->cluster_size, r->buf, 0);
            }
            if (ret < 0) {
                return ret;
            }
        }
    }
    if (l1_changed) {
        for (i = 0; i < s->l1_size; i += 64) {
            ret = qcow2_co_write_l1_entry(s, i);
            if (ret < 0) {
                return ret;
            }
        }
    }
    return 0;
}

int coroutine_fn qcow2_co_repair(Qcow2State *s, GError **errp)
{
    uint64_t cs = s->cluster_size;
    uint64_t file_len = bdrv_getlength(s->bs->file->bs);
    Repair r = {.s = s};
    uint64_t *table = NULL, entries = s->reftable_entries;
    uint64_t new_table_off = 0, new_table_k = 0;
    uint64_t b, i;
    uint8_t *old;
    int ret;

    log_msg(LOG_LEVEL_WARNING,
            "%s: image was not closed cleanly (dirty bit set): repairing "
            "refcounts",
            bdrv_name(s->bs));
    r.limit = DIV_ROUND_UP(file_len, cs);
    r.nb = r.limit + 1;
    r.refs = g_new0(uint32_t, r.nb);
    r.buf = bdrv_blockalign(s->bs->file->bs, cs);
    old = bdrv_blockalign(s->bs->file->bs, cs);
    table = g_new0(uint64_t, entries);
    memcpy(table, s->reftable, entries * 8);

    ret = repair_inc(&r, 0, cs, "the header");
    if (ret == 0) {
        ret = repair_inc(&r, s->l1_offset, (uint64_t)s->l1_size * 8,
                         "the L1 table");
    }
    if (ret == 0) {
        ret = repair_l1(&r, s->l1, s->l1_size);
    }
    if (ret == 0) {
        ret = repair_snapshots(&r);
    }
    if (ret == 0) {
        ret = repair_bitmaps(&r);
    }
    if (ret == 0) {
        ret = repair_inc(&r, s->reftable_offset,
                         (uint64_t)s->reftable_clusters * cs,
                         "the refcount table");
    }
    for (b = 0; ret == 0 && b < s->reftable_entries; b++) {
        if (s->reftable[b]) {
            ret = repair_inc(&r, s->reftable[b], cs, "a refcount block");
        }
    }
    if (ret == 0) {
        ret = repair_layout(&r, &table, &entries, &new_table_off, &new_table_k);
    }
    for (i = 0; ret == 0 && i < r.nb; i++) {
        if (r.refs[i] > s->refcount_max) {
            ret = qcow2_signal_corruption(
                s, false, i * cs,
                "cluster is referenced %u times, more than refcount_bits=%u "
                "can count",
                r.refs[i], s->refcount_bits);
        }
    }
    if (ret < 0) {
        goto out;
    }

    /* Refcount blocks: rewrite those that differ. */
    for (b = 0; b < entries && ret == 0; b++) {
        uint64_t off = table[b];
        bool existed = b < s->reftable_entries && s->reftable[b] == off;
        uint64_t j;

        if (!off) {
            continue;
        }
        memset(r.buf, 0, cs);
        for (j = 0; j < (uint64_t)s->refblock_entries; j++) {
            uint64_t c = (b << s->refblock_bits) + j;

            if (c < r.nb && r.refs[c]) {
                qcow2_refblock_set(s, r.buf, j, r.refs[c]);
            }
        }
        if (existed) {
            ret = bdrv_co_pread(s->bs->file, off, cs, old, 0);
            if (ret < 0 || !memcmp(old, r.buf, cs)) {
                continue;
            }
        } else {
            qcow2_meta_add(s, off, cs, QCOW2_META_REFBLOCK);
        }
        ret = qcow2_meta_check_write(s, off, cs, QCOW2_META_REFBLOCK);
        if (ret == 0) {
            ret = bdrv_co_pwrite(s->bs->file, off, cs, r.buf, 0);
        }
    }
    if (ret < 0) {
        goto out;
    }
    if (new_table_off) {
        uint64_t *be = bdrv_blockalign(s->bs->file->bs, new_table_k * cs);
        uint8_t hdr[12];

        for (i = 0; i < entries; i++) {
            be[i] = htobe64(table[i]);
        }
        qcow2_meta_add(s, new_table_off, new_table_k * cs, QCOW2_META_REFTABLE);
        ret =
            bdrv_co_pwrite(s->bs->file, new_table_off, new_table_k * cs, be, 0);
        bdrv_vfree(be);
        if (ret == 0) {
            ret = qcow2_co_flush_files(s);
        }
        if (ret == 0) {
            qcow2_put_be64(hdr, new_table_off);
            qcow2_put_be32(hdr + 8, new_table_k);
            ret = qcow2_co_write_header(s, QCOW2_HDR_REFTABLE_OFFSET, hdr, 12);
        }
        if (ret < 0) {
            goto out;
        }
        qcow2_meta_remove(s, s->reftable_offset,
                          (uint64_t)s->reftable_clusters * cs);
        s->reftable_offset = new_table_off;
        s->reftable_clusters = new_table_k;
    }
    g_free(s->reftable);
    s->reftable = table;
    s->reftable_entries = entries;
    table = NULL;

    ret = repair_copied_flags(&r);
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret == 0) {
        ret = qcow2_co_update_incompatible(s, 0, QCOW2_INCOMPAT_DIRTY);
    }
    s->free_hint = 0;
    if (s->fresh_start < (uint64_t)r.nb * cs) {
        s->fresh_start = (uint64_t)r.nb * cs;
    }

out:
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_IO,
                    "'%s': the image was not closed cleanly and its refcounts "
                    "cannot be repaired (%s); try 'qemu-img check -r all'",
                    bdrv_name(s->bs), g_strerror(-ret));
    }
    g_free(table);
    g_free(r.refs);
    bdrv_vfree(r.buf);
    bdrv_vfree(old);
    return ret;
}
