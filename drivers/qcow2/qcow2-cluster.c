/*
 * qcow2 cluster mapping: guest offsets to host clusters through the L1
 * table and the cached L2 tables, and the request paths built on it --
 * reads, writes (in place, or allocating with copy-on-write), write
 * zeroes, discard and block status -- plus L2 table allocation and L1
 * updates.
 *
 * Concurrency (see qcow2.h): lookups take no lock, so requests to
 * different clusters run in parallel and an overwrite of an allocated
 * cluster never waits for metadata.  A write that must allocate takes
 * the lock only to reserve host clusters and to register its guest
 * range in s->allocs; the data and copy-on-write I/O run unlocked; then
 * the lock again to link the new clusters into the L2 table.  Anyone
 * else who needs to change the mapping of those guest clusters first
 * waits for the registered allocation.  Data I/O to host clusters found
 * without the lock is registered in s->host_ios, and a freed cluster is
 * not handed out again while such I/O runs.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>

#include "qcow2.h"

/* Frees queued by discards before an internal flush applies them. */
#define QCOW2_PENDING_FREE_LIMIT 4096

/* ---- L2 entries ---- */

static uint64_t l2_get(Qcow2State *s, const uint8_t *table, int64_t i)
{
    return qcow2_get_be64(table + i * s->l2_entry_bytes);
}

static uint64_t l2_get_bitmap(Qcow2State *s, const uint8_t *table, int64_t i)
{
    return s->extended_l2 ? qcow2_get_be64(table + i * 16 + 8) : 0;
}

static void l2_set(Qcow2State *s, uint8_t *table, int64_t i, uint64_t entry,
                   uint64_t bitmap)
{
    qcow2_put_be64(table + i * s->l2_entry_bytes, entry);
    if (s->extended_l2) {
        qcow2_put_be64(table + i * 16 + 8, bitmap);
    }
}

/* Does @entry reserve a host cluster?  (Offset 0 is a real offset in
 * an external data file; COPIED tells it from "unallocated" there.) */
static bool entry_has_host(Qcow2State *s, uint64_t entry)
{
    if (entry & QCOW2_OFLAG_COMPRESSED) {
        return false;
    }
    if (entry & QCOW2_L2E_OFFSET_MASK) {
        return true;
    }
    return qcow2_has_data_file(s) && (entry & QCOW2_OFLAG_COPIED);
}

Qcow2SubclusterType qcow2_subcluster_type(Qcow2State *s, uint64_t entry,
                                          uint64_t bitmap, unsigned sc,
                                          unsigned *run)
{
    bool host = entry_has_host(s, entry);
    uint32_t alloc, zero;
    unsigned j;

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        *run = s->sc_per_cluster - sc;
        return QCOW2_SC_COMPRESSED;
    }
    if (!s->extended_l2) {
        *run = 1;
        if (entry & QCOW2_OFLAG_ZERO) {
            return host ? QCOW2_SC_ZERO_ALLOC : QCOW2_SC_ZERO_PLAIN;
        }
        return host ? QCOW2_SC_NORMAL : QCOW2_SC_UNALLOCATED;
    }
    alloc = bitmap & 0xffffffffu;
    zero = bitmap >> 32;
    *run = 1;
    if ((alloc & zero) || (!host && alloc)) {
        return QCOW2_SC_INVALID;
    }
    for (j = sc + 1; j < 32; j++) {
        if (((alloc >> j) & 1) != ((alloc >> sc) & 1) ||
            ((zero >> j) & 1) != ((zero >> sc) & 1)) {
            break;
        }
    }
    *run = j - sc;
    if (alloc & (1u << sc)) {
        return QCOW2_SC_NORMAL;
    }
    if (zero & (1u << sc)) {
        return host ? QCOW2_SC_ZERO_ALLOC : QCOW2_SC_ZERO_PLAIN;
    }
    return host ? QCOW2_SC_UNALLOCATED_ALLOC : QCOW2_SC_UNALLOCATED;
}

int qcow2_check_l2_offset(Qcow2State *s, uint32_t index, uint64_t l2_offset)
{
    int64_t where = s->l1_offset + (int64_t)index * 8;
    Qcow2MetaType t;

    if (qcow2_offset_into_cluster(s, l2_offset)) {
        return qcow2_signal_corruption(s, false, where,
                                       "L1 entry %u: L2 table offset 0x%" PRIx64
                                       " is not aligned to a cluster",
                                       index, l2_offset);
    }
    if ((int64_t)l2_offset >= bdrv_getlength(s->bs->file->bs)) {
        return qcow2_signal_corruption(s, false, where,
                                       "L1 entry %u: L2 table offset 0x%" PRIx64
                                       " is past the end of the file",
                                       index, l2_offset);
    }
    t = qcow2_meta_type(s, l2_offset);
    if (t != QCOW2_META_L2) {
        return qcow2_signal_corruption(s, false, where,
                                       "L1 entry %u: L2 table at 0x%" PRIx64
                                       " overlaps %s",
                                       index, l2_offset, qcow2_meta_name(t));
    }
    return 0;
}

/*
 * What is wrong with the host range @entry names for guest cluster
 * @guest_cluster, or NULL (free it with g_free).  Every entry that
 * carries a host offset is tested, whatever its subclusters say: a write
 * to a zero or unallocated subcluster goes to that host cluster in place,
 * and replacing the entry frees it, so a misaligned or past-the-end
 * offset must never be trusted -- it names a cluster that belongs to
 * someone else, or grows the file far past its end.  @meta: also test
 * that the range is no metadata (a cluster cannot be both).
 */
static char *host_problem(Qcow2State *s, uint64_t entry, uint64_t guest_cluster,
                          bool meta)
{
    uint64_t host = entry & QCOW2_L2E_OFFSET_MASK;
    int64_t len = bdrv_getlength(s->bs->file->bs);

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        uint64_t off, bytes, pos;

        if (qcow2_has_data_file(s)) {
            return g_strdup(
                "compressed cluster in an image with an external data file");
        }
        qcow2_compressed_range(s, entry, &off, &bytes);
        /* The last sector may run past the end of the file (QEMU does
         * not pad it), but never into a cluster past the end. */
        if ((int64_t)qcow2_start_of_cluster(s, off + bytes - 1) >= len) {
            return g_strdup_printf("compressed cluster at 0x%" PRIx64
                                   " lies past the end of the file",
                                   off);
        }
        for (pos = qcow2_start_of_cluster(s, off); meta && pos < off + bytes;
             pos += s->cluster_size) {
            Qcow2MetaType t = qcow2_meta_type(s, pos);

            if (t != QCOW2_META_NONE) {
                return g_strdup_printf("compressed cluster at 0x%" PRIx64
                                       " overlaps %s",
                                       off, qcow2_meta_name(t));
            }
        }
        return NULL;
    }
    if (!entry_has_host(s, entry)) {
        return NULL;
    }
    if (qcow2_offset_into_cluster(s, host)) {
        return g_strdup_printf("cluster offset 0x%" PRIx64 " is not aligned",
                               host);
    }
    if (qcow2_has_data_file(s)) {
        if (host != guest_cluster) {
            return g_strdup_printf("data file offset 0x%" PRIx64
                                   " differs from the guest offset 0x%" PRIx64,
                                   host, guest_cluster);
        }
        return NULL;
    }
    if ((int64_t)host >= len) {
        return g_strdup_printf(
            "data cluster 0x%" PRIx64 " is past the end of the file", host);
    }
    if (meta && qcow2_meta_type(s, host) != QCOW2_META_NONE) {
        return g_strdup_printf("data cluster 0x%" PRIx64 " overlaps %s", host,
                               qcow2_meta_name(qcow2_meta_type(s, host)));
    }
    return NULL;
}

/* Check the host range of @entry for guest @guest_cluster (@meta: see
 * host_problem()); @where < 0: only tell, do not report. */
static int check_host(Qcow2State *s, uint64_t entry, uint64_t guest_cluster,
                      bool meta, int64_t where)
{
    g_autofree char *why = host_problem(s, entry, guest_cluster, meta);

    if (!why) {
        return 0;
    }
    if (where < 0) {
        return -EIO;
    }
    return qcow2_signal_corruption(s, false, where, "L2 entry: %s", why);
}

/*
 * qcow2_co_get_mapping(), for a read or (@write) for a write.  A write
 * leaves the metadata test to check_data_write(), right before the data
 * goes out: finding guest data about to overwrite metadata is fatal (the
 * image is marked corrupt), where a read merely fails.
 */
static int coroutine_fn get_mapping(Qcow2State *s, uint64_t offset,
                                    int64_t bytes, Qcow2Mapping *m, bool write)
{
    uint64_t l1_index = offset >> (s->cluster_bits + s->l2_bits);
    uint64_t l2_end = (l1_index + 1) * qcow2_l2_coverage(s);
    int64_t max = MIN((uint64_t)bytes, l2_end - offset);
    uint64_t in_cluster = qcow2_offset_into_cluster(s, offset);
    uint64_t cluster = offset - in_cluster;
    int64_t ci = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    uint64_t l2, entry, bitmap, host;
    unsigned sc = in_cluster / s->sc_size, run;
    Qcow2CacheEntry *e;
    Qcow2SubclusterType type;
    int64_t n;
    int ret;

    memset(m, 0, sizeof(*m));
    l2 = l1_index < s->l1_size ? s->l1[l1_index] & QCOW2_L1E_OFFSET_MASK : 0;
    if (!l2) {
        m->type = QCOW2_SC_UNALLOCATED;
        m->bytes = max;
        return 0;
    }
    ret = qcow2_check_l2_offset(s, l1_index, l2);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_cache_get(s->l2_cache, l2, &e);
    if (ret < 0) {
        return ret;
    }
    entry = l2_get(s, e->data, ci);
    bitmap = l2_get_bitmap(s, e->data, ci);
    type = qcow2_subcluster_type(s, entry, bitmap, sc, &run);
    if (type == QCOW2_SC_INVALID) {
        ret = qcow2_signal_corruption(
            s, false, l2 + ci * s->l2_entry_bytes,
            "invalid subcluster bitmap 0x%" PRIx64 " in L2 entry", bitmap);
        goto out;
    }
    ret = check_host(s, entry, cluster, !write, l2 + ci * s->l2_entry_bytes);
    if (ret < 0) {
        goto out;
    }
    m->type = type;
    host = entry & QCOW2_L2E_OFFSET_MASK;
    if (type == QCOW2_SC_COMPRESSED) {
        m->l2_entry = entry;
        m->bytes = MIN(s->cluster_size - (int64_t)in_cluster, max);
        goto out;
    }
    if (type == QCOW2_SC_NORMAL) {
        m->host = host + in_cluster;
        m->copied = entry & QCOW2_OFLAG_COPIED;
    }
    n = (int64_t)(sc + run) * s->sc_size - in_cluster;

    /* Extend over the next clusters while they map alike. */
    while (n < max && sc + run == s->sc_per_cluster) {
        uint64_t entry2, bitmap2;
        Qcow2SubclusterType t2;

        ci++;
        cluster += s->cluster_size;
        entry2 = l2_get(s, e->data, ci);
        bitmap2 = l2_get_bitmap(s, e->data, ci);
        t2 = qcow2_subcluster_type(s, entry2, bitmap2, 0, &run);
        sc = 0;
        if (t2 != type) {
            break;
        }
        if (type == QCOW2_SC_NORMAL &&
            ((entry2 & QCOW2_L2E_OFFSET_MASK) !=
                 host + (cluster - (offset - in_cluster)) ||
             !!(entry2 & QCOW2_OFLAG_COPIED) != m->copied ||
             check_host(s, entry2, cluster, !write, -1) < 0)) {
            break;
        }
        n += (int64_t)run * s->sc_size;
    }
    m->bytes = MIN(n, max);
out:
    qcow2_cache_put(s->l2_cache, e);
    return ret;
}

int coroutine_fn qcow2_co_get_mapping(Qcow2State *s, uint64_t offset,
                                      int64_t bytes, Qcow2Mapping *m)
{
    return get_mapping(s, offset, bytes, m, false);
}

/* ---- in-flight host I/O ---- */

void qcow2_host_io_begin(Qcow2State *s, Qcow2HostIO *io, uint64_t start,
                         uint64_t len)
{
    io->start = start;
    io->end = start + len;
    LIST_INSERT_HEAD(&s->host_ios, io, next);
}

void qcow2_host_io_end(Qcow2State *s, Qcow2HostIO *io)
{
    (void)s;
    LIST_REMOVE(io, next);
}

bool qcow2_host_io_busy(Qcow2State *s, uint64_t start, uint64_t len)
{
    Qcow2HostIO *io;

    LIST_FOREACH (io, &s->host_ios, next) {
        if (io->start < start + len && start < io->end) {
            return true;
        }
    }
    return false;
}

/* ---- reads ---- */

static int coroutine_fn read_backing(Qcow2State *s, uint64_t offset,
                                     int64_t bytes, IOVector *qiov, size_t qoff)
{
    BlockDriverState *bs = s->bs;
    int64_t n = 0;
    int ret;

    if (bs->backing) {
        int64_t blen = bdrv_getlength(bs->backing->bs);

        if ((int64_t)offset < blen) {
            n = MIN(bytes, blen - (int64_t)offset);
        }
    }
    if (n > 0) {
        ret = bdrv_co_preadv(bs->backing, offset, n, qiov, qoff, 0);
        if (ret < 0) {
            return ret;
        }
    }
    if (n < bytes) {
        iov_memset(qiov, qoff + n, 0, bytes - n);
    }
    return 0;
}

static int coroutine_fn read_compressed(Qcow2State *s, uint64_t entry,
                                        uint64_t in_cluster, int64_t bytes,
                                        IOVector *qiov, size_t qoff)
{
    uint8_t *buf = g_malloc(s->cluster_size);
    int ret = qcow2_co_read_compressed_cluster(s, entry, buf);

    if (ret == 0) {
        iov_from_buf(qiov, qoff, buf + in_cluster, bytes);
    }
    g_free(buf);
    return ret;
}

int coroutine_fn qcow2_co_preadv(BlockDriverState *bs, int64_t offset,
                                 int64_t bytes, IOVector *qiov, size_t qoff,
                                 BdrvRequestFlags flags)
{
    Qcow2State *s = bs->opaque;
    Qcow2Mapping m;
    Qcow2HostIO io;
    int ret;

    (void)flags;
    while (bytes > 0) {
        ret = qcow2_co_get_mapping(s, offset, bytes, &m);
        if (ret < 0) {
            return ret;
        }
        switch (m.type) {
        case QCOW2_SC_UNALLOCATED:
        case QCOW2_SC_UNALLOCATED_ALLOC:
            ret = read_backing(s, offset, m.bytes, qiov, qoff);
            break;
        case QCOW2_SC_ZERO_PLAIN:
        case QCOW2_SC_ZERO_ALLOC:
            iov_memset(qiov, qoff, 0, m.bytes);
            break;
        case QCOW2_SC_NORMAL:
            qcow2_host_io_begin(s, &io, m.host, m.bytes);
            ret = bdrv_co_preadv(s->data_file, m.host, m.bytes, qiov, qoff, 0);
            qcow2_host_io_end(s, &io);
            break;
        case QCOW2_SC_COMPRESSED:
            ret = read_compressed(s, m.l2_entry,
                                  qcow2_offset_into_cluster(s, offset), m.bytes,
                                  qiov, qoff);
            break;
        default:
            ret = -EIO;
            break;
        }
        if (ret < 0) {
            return ret;
        }
        offset += m.bytes;
        qoff += m.bytes;
        bytes -= m.bytes;
    }
    return 0;
}

/* ---- L1 and L2 tables ---- */

int coroutine_fn qcow2_co_write_l1_entry(Qcow2State *s, uint32_t index)
{
    uint32_t start = index & ~63u;
    uint32_t n = MIN(64u, s->l1_size - start);
    uint64_t buf[64];
    uint64_t off = s->l1_offset + (uint64_t)start * 8;
    uint32_t i;
    int ret;

    for (i = 0; i < n; i++) {
        buf[i] = htobe64(s->l1[start + i]);
    }
    ret = qcow2_meta_check_write(s, off, n * 8, QCOW2_META_L1);
    if (ret < 0) {
        return ret;
    }
    return bdrv_co_pwrite(s->bs->file, off, n * 8, buf, 0);
}

/* Take back a cluster that was allocated but never linked anywhere. */
static void coroutine_fn unalloc(Qcow2State *s, uint64_t offset,
                                 uint64_t clusters)
{
    qcow2_co_update_refcount(s, offset, clusters << s->cluster_bits, -1);
}

/*
 * The L2 table for guest @offset, pinned and owned by the active L1 table
 * alone (refcount 1): a missing table is created, a shared one (internal
 * snapshots) copied.  The new table, and its refcount, reach the disk
 * before the L1 entry that points to it.  Caller holds lock.
 */
static int coroutine_fn get_l2_for_write(Qcow2State *s, uint64_t offset,
                                         Qcow2CacheEntry **pe)
{
    uint64_t l1_index = offset >> (s->cluster_bits + s->l2_bits);
    uint64_t l1e, old, new_off;
    Qcow2CacheEntry *e, *oe;
    int ret;

    if (l1_index >= s->l1_size) {
        return qcow2_signal_corruption(
            s, false, -1, "guest offset 0x%" PRIx64 " is beyond the L1 table",
            offset);
    }
    l1e = s->l1[l1_index];
    old = l1e & QCOW2_L1E_OFFSET_MASK;
    if (old) {
        ret = qcow2_check_l2_offset(s, l1_index, old);
        if (ret < 0) {
            return ret;
        }
        if (l1e & QCOW2_OFLAG_COPIED) {
            return qcow2_cache_get(s->l2_cache, old, pe);
        }
    }

    ret = qcow2_co_alloc_clusters(s, 1, &new_off);
    if (ret < 0) {
        return ret;
    }
    qcow2_meta_add(s, new_off, s->cluster_size, QCOW2_META_L2);
    ret = qcow2_cache_get_empty(s->l2_cache, new_off, &e);
    if (ret < 0) {
        goto fail;
    }
    if (old) {
        ret = qcow2_cache_get(s->l2_cache, old, &oe);
        if (ret < 0) {
            goto fail_put;
        }
        memcpy(e->data, oe->data, s->cluster_size);
        qcow2_cache_put(s->l2_cache, oe);
    }
    /* Its refcount, then the table itself, durable before the L1 entry.
     * Nobody else can reach the new table yet. */
    if (!s->lazy_refcounts) {
        ret = qcow2_co_writeback(s, false, true);
    }
    if (ret == 0) {
        ret = qcow2_co_cache_write_entry(s->l2_cache, e);
    }
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret < 0) {
        goto fail_put;
    }
    s->l1[l1_index] = new_off | QCOW2_OFLAG_COPIED;
    ret = qcow2_co_write_l1_entry(s, l1_index);
    if (ret < 0) {
        s->l1[l1_index] = l1e;
        goto fail_put;
    }
    if (old) {
        /* Still used by a snapshot: only our reference goes. */
        qcow2_meta_remove(s, old, s->cluster_size);
        qcow2_free_later(s, old, 1);
    }
    *pe = e;
    return 0;

fail_put:
    qcow2_cache_put(s->l2_cache, e);
    qcow2_cache_drop(s->l2_cache, new_off);
fail:
    qcow2_meta_remove(s, new_off, s->cluster_size);
    unalloc(s, new_off, 1);
    return ret;
}

int coroutine_fn qcow2_co_grow_l1(Qcow2State *s, uint64_t min_size)
{
    uint64_t cs = s->cluster_size;
    uint64_t bytes = ALIGN_UP(min_size * 8, cs);
    uint64_t new_off, old_off = s->l1_offset, old_size = s->l1_size;
    uint64_t *be, *l1;
    uint8_t hdr[12];
    uint64_t i;
    int ret;

    if (min_size <= s->l1_size) {
        return 0;
    }
    if (min_size * 8 > QCOW2_MAX_L1_BYTES) {
        return -EFBIG;
    }
    ret = qcow2_co_alloc_clusters(s, bytes / cs, &new_off);
    if (ret < 0) {
        return ret;
    }
    be = bdrv_blockalign(s->bs->file->bs, bytes);
    memset(be, 0, bytes);
    for (i = 0; i < s->l1_size; i++) {
        be[i] = htobe64(s->l1[i]);
    }
    qcow2_meta_add(s, new_off, bytes, QCOW2_META_L1);
    ret = bdrv_co_pwrite(s->bs->file, new_off, bytes, be, 0);
    bdrv_vfree(be);
    /* Refcounts first even with lazy refcounts: a resize does not set
     * the dirty bit. */
    if (ret == 0) {
        ret = qcow2_co_writeback(s, false, true);
    }
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret == 0) {
        qcow2_put_be32(hdr, min_size);
        qcow2_put_be64(hdr + 4, new_off);
        ret = qcow2_co_write_header(s, QCOW2_HDR_L1_SIZE, hdr, 12);
    }
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret < 0) {
        qcow2_meta_remove(s, new_off, bytes);
        unalloc(s, new_off, bytes / cs);
        return ret;
    }
    l1 = g_new0(uint64_t, bytes / 8);
    memcpy(l1, s->l1, s->l1_size * 8);
    g_free(s->l1);
    s->l1 = l1;
    s->l1_size = min_size;
    s->l1_offset = new_off;
    if (old_size) {
        qcow2_meta_remove(s, old_off, old_size * 8);
        qcow2_free_later(s, old_off, DIV_ROUND_UP(old_size * 8, cs));
    }
    return 0;
}

/* ---- writes ---- */

/* How far ahead of the allocator the image file is extended. */
#define QCOW2_PREALLOC_MIN (16 * MiB)
#define QCOW2_PREALLOC_MAX (256 * MiB)

void coroutine_fn qcow2_co_prealloc_ahead(Qcow2State *s, uint64_t end)
{
    int64_t len = bdrv_getlength(s->bs->file->bs);
    uint64_t chunk, target;

    if (s->no_prealloc || (int64_t)end <= len) {
        return;
    }
    chunk = MIN(MAX((uint64_t)QCOW2_PREALLOC_MIN, (uint64_t)len / 8),
                (uint64_t)QCOW2_PREALLOC_MAX);
    target = ALIGN_UP(end + chunk, (uint64_t)s->cluster_size);
    /* Past the end of a file, write zeroes extends it (fallocate). */
    if (bdrv_co_pwrite_zeroes(s->bs->file, len, target - len, 0) < 0) {
        s->no_prealloc = true; /* a block device, or no fallocate */
        return;
    }
    s->preallocated = true;
}

/* A zero-filled, read-only buffer of the largest cluster size. */
static void *zero_area;
static pthread_once_t zero_area_once = PTHREAD_ONCE_INIT;

static void zero_area_init(void)
{
    zero_area = mmap(NULL, 1 << QCOW2_MAX_CLUSTER_BITS, PROT_READ,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (zero_area == MAP_FAILED) {
        zero_area = g_malloc0(1 << QCOW2_MAX_CLUSTER_BITS);
    }
}

static void *qcow2_zeros(void)
{
    pthread_once(&zero_area_once, zero_area_init);
    return zero_area;
}

/* Wait, dropping the lock, for an allocation overlapping [start, end). */
static bool coroutine_fn wait_allocs(Qcow2State *s, uint64_t start,
                                     uint64_t end)
{
    Qcow2Alloc *a;

    LIST_FOREACH (a, &s->allocs, next) {
        if (a->start < end && start < a->end) {
            co_queue_wait(&a->waiters, &s->lock);
            return true;
        }
    }
    return false;
}

static bool alloc_overlaps(Qcow2State *s, uint64_t start, uint64_t end)
{
    Qcow2Alloc *a;

    LIST_FOREACH (a, &s->allocs, next) {
        if (a->start < end && start < a->end) {
            return true;
        }
    }
    return false;
}

typedef enum {
    CL_INPLACE, /* allocated, ours alone: write in place */
    CL_REUSE,   /* keeps its host cluster, but the L2 entry must change */
    CL_NEW,     /* needs a new host cluster */
} ClusterKind;

/* How a write of [@w0, @w1) into a cluster with @entry is done. */
static ClusterKind classify(Qcow2State *s, uint64_t entry, uint64_t bitmap,
                            uint64_t w0, uint64_t w1)
{
    bool owned = qcow2_has_data_file(s) || (entry & QCOW2_OFLAG_COPIED);
    unsigned sc, run;

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        return CL_NEW;
    }
    if (!entry_has_host(s, entry)) {
        return qcow2_has_data_file(s) ? CL_REUSE : CL_NEW;
    }
    if (!owned) {
        return CL_NEW;
    }
    for (sc = w0 / s->sc_size; sc <= (w1 - 1) / s->sc_size; sc += run) {
        if (qcow2_subcluster_type(s, entry, bitmap, sc, &run) !=
            QCOW2_SC_NORMAL) {
            return CL_REUSE;
        }
    }
    return CL_INPLACE;
}

typedef enum {
    P_DATA, /* guest data from the request */
    P_OLD,  /* what the guest reads there now (copy-on-write) */
    P_BUF,  /* P_OLD, read into buf */
    P_ZERO, /* zeros */
    P_SKIP, /* not written */
} PieceKind;

typedef struct Piece {
    uint64_t host;
    uint64_t guest;
    uint64_t len;
    PieceKind kind;
    void *buf;
} Piece;

static void add_piece(GArray *pieces, PieceKind kind, uint64_t host,
                      uint64_t guest, uint64_t len)
{
    Piece p = {.host = host, .guest = guest, .len = len, .kind = kind};

    if (len == 0) {
        return;
    }
    if (pieces->len) {
        Piece *last = &g_array_index(pieces, Piece, pieces->len - 1);

        if (last->kind == kind && last->host + last->len == host &&
            last->guest + last->len == guest) {
            last->len += len;
            return;
        }
    }
    g_array_append_val(pieces, p);
}

/*
 * Plan the write of [@w0, @w1) into the guest cluster @guest at host
 * cluster @host: which parts are new data, which must be copied from
 * what the guest reads now, which stay.  Returns the new subcluster
 * bitmap (extended L2).  @same_host: the host cluster is the old one.
 */
static uint64_t plan_cluster(Qcow2State *s, GArray *pieces, uint64_t guest,
                             uint64_t host, uint64_t w0, uint64_t w1,
                             uint64_t entry, uint64_t bitmap, bool same_host)
{
    bool compressed = entry & QCOW2_OFLAG_COMPRESSED;
    uint32_t alloc = compressed ? 0 : (uint32_t)bitmap;
    uint32_t zero = compressed ? 0 : (uint32_t)(bitmap >> 32);
    uint32_t new_alloc = same_host ? alloc : 0;
    uint32_t new_zero = same_host ? zero : 0;
    uint64_t scs = s->sc_size;
    unsigned sc;

    if (!s->extended_l2) {
        add_piece(pieces, P_OLD, host, guest, w0);
        add_piece(pieces, P_DATA, host + w0, guest + w0, w1 - w0);
        add_piece(pieces, P_OLD, host + w1, guest + w1, s->cluster_size - w1);
        return 0;
    }
    for (sc = 0; sc < 32; sc++) {
        uint64_t a = sc * scs, b = a + scs;
        uint32_t bit = 1u << sc;
        bool had_data = compressed || (alloc & bit);

        if (b <= w0 || a >= w1) {
            if (!same_host && had_data) {
                add_piece(pieces, P_OLD, host + a, guest + a, scs);
                new_alloc |= bit;
            } else {
                add_piece(pieces, P_SKIP, host + a, guest + a, scs);
                if (!same_host && (zero & bit)) {
                    new_zero |= bit;
                }
            }
            continue;
        }
        {
            uint64_t lo = MAX(a, w0), hi = MIN(b, w1);
            PieceKind rest = (same_host && had_data) ? P_SKIP : P_OLD;

            add_piece(pieces, rest, host + a, guest + a, lo - a);
            add_piece(pieces, P_DATA, host + lo, guest + lo, hi - lo);
            add_piece(pieces, rest, host + hi, guest + hi, b - hi);
        }
        new_alloc |= bit;
        new_zero &= ~bit;
    }
    return new_alloc | ((uint64_t)new_zero << 32);
}

/* Does the guest read zeros in [@guest, +@len) now? */
static int coroutine_fn reads_as_zero(Qcow2State *s, uint64_t guest,
                                      uint64_t len, bool *zero)
{
    BlockDriverState *bs = s->bs;
    int64_t blen = bs->backing ? bdrv_getlength(bs->backing->bs) : 0;
    Qcow2Mapping m;
    int ret;

    *zero = false;
    while (len > 0) {
        ret = qcow2_co_get_mapping(s, guest, len, &m);
        if (ret < 0) {
            return ret;
        }
        switch (m.type) {
        case QCOW2_SC_ZERO_PLAIN:
        case QCOW2_SC_ZERO_ALLOC:
            break;
        case QCOW2_SC_UNALLOCATED:
        case QCOW2_SC_UNALLOCATED_ALLOC:
            if ((int64_t)guest < blen) {
                return 0;
            }
            break;
        default:
            return 0;
        }
        guest += m.bytes;
        len -= m.bytes;
    }
    *zero = true;
    return 0;
}

/* Resolve the P_OLD pieces: zeros, nothing (fresh host), or a read. */
static int coroutine_fn fill_old_pieces(Qcow2State *s, GArray *pieces,
                                        bool fresh)
{
    guint i;
    int ret;

    for (i = 0; i < pieces->len; i++) {
        Piece *p = &g_array_index(pieces, Piece, i);
        IOVector v;
        bool zero;

        if (p->kind != P_OLD) {
            continue;
        }
        ret = reads_as_zero(s, p->guest, p->len, &zero);
        if (ret < 0) {
            return ret;
        }
        if (zero) {
            p->kind = fresh ? P_SKIP : P_ZERO;
            continue;
        }
        p->buf = bdrv_blockalign(s->data_file->bs, p->len);
        p->kind = P_BUF;
        iov_init_buf(&v, p->buf, p->len);
        ret = qcow2_co_preadv(s->bs, p->guest, p->len, &v, 0, 0);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/*
 * Before guest (or copy-on-write) data goes to [@host, +@bytes): an L2
 * entry that points at metadata must not let the guest overwrite it.  As
 * for metadata writes, the overlap check reports it, marks the image
 * corrupt and refuses further writes.  The lookup needs no lock; the
 * report takes it, since it updates the header.
 */
static int coroutine_fn check_data_write(Qcow2State *s, uint64_t host,
                                         uint64_t bytes)
{
    uint64_t pos;
    int ret = 0;

    if (qcow2_has_data_file(s)) {
        return 0; /* the data file holds no metadata */
    }
    for (pos = qcow2_start_of_cluster(s, host); pos < host + bytes;
         pos += s->cluster_size) {
        if (qcow2_meta_type(s, pos) != QCOW2_META_NONE) {
            break;
        }
    }
    if (pos >= host + bytes) {
        return 0;
    }
    co_mutex_lock(&s->lock);
    for (; pos < host + bytes; pos += s->cluster_size) {
        Qcow2MetaType t = qcow2_meta_type(s, pos);

        if (t != QCOW2_META_NONE) {
            ret = qcow2_signal_corruption(
                s, true, pos,
                "refusing to write guest data over %s (metadata overlap "
                "check)",
                qcow2_meta_name(t));
            break;
        }
    }
    co_mutex_unlock(&s->lock);
    return ret;
}

/* Write the pieces: every run of adjacent written pieces in one go. */
static int coroutine_fn write_pieces(Qcow2State *s, GArray *pieces,
                                     uint64_t offset, IOVector *qiov,
                                     size_t qoff)
{
    guint i = 0;
    int ret = 0;

    while (i < pieces->len && ret == 0) {
        Piece *p = &g_array_index(pieces, Piece, i);
        uint64_t start, len = 0;
        IOVector v;

        if (p->kind == P_SKIP) {
            i++;
            continue;
        }
        start = p->host;
        iov_init(&v);
        for (; i < pieces->len; i++) {
            p = &g_array_index(pieces, Piece, i);
            if (p->kind == P_SKIP || p->host != start + len) {
                break;
            }
            switch (p->kind) {
            case P_DATA:
                iov_concat(&v, qiov, qoff + (p->guest - offset), p->len);
                break;
            case P_BUF:
                iov_add(&v, p->buf, p->len);
                break;
            default:
                iov_add(&v, qcow2_zeros(), p->len);
                break;
            }
            len += p->len;
        }
        ret = check_data_write(s, start, len);
        if (ret == 0) {
            ret = bdrv_co_pwritev(s->data_file, start, len, &v, 0, 0);
        }
        iov_destroy(&v);
    }
    return ret;
}

static void free_pieces(GArray *pieces)
{
    guint i;

    for (i = 0; i < pieces->len; i++) {
        bdrv_vfree(g_array_index(pieces, Piece, i).buf);
    }
    g_array_free(pieces, TRUE);
}

/*
 * May the host range of @entry, being replaced, be freed?  A bogus entry
 * (misaligned, past the end, a compressed range outside the file) names
 * clusters that are free or someone else's: freeing them would let the
 * allocator hand out a cluster still in use.  Reported, never freed.
 */
static int check_release(Qcow2State *s, uint64_t entry)
{
    g_autofree char *why = NULL;

    if (qcow2_has_data_file(s) && !(entry & QCOW2_OFLAG_COMPRESSED)) {
        return 0; /* nothing is freed in a data file */
    }
    why = host_problem(s, entry, 0, true);
    if (!why) {
        return 0;
    }
    return qcow2_signal_corruption(
        s, false, -1, "L2 entry 0x%" PRIx64 ": %s; not freeing its clusters",
        entry, why);
}

/* Drop the reference an old L2 entry held (replaced by a new cluster). */
static void release_entry(Qcow2State *s, uint64_t entry)
{
    if (check_release(s, entry) < 0) {
        return;
    }
    if (entry & QCOW2_OFLAG_COMPRESSED) {
        uint64_t off, bytes, first;

        qcow2_compressed_range(s, entry, &off, &bytes);
        first = qcow2_start_of_cluster(s, off);
        qcow2_free_later(s, first,
                         (qcow2_start_of_cluster(s, off + bytes - 1) - first) /
                                 s->cluster_size +
                             1);
    } else if (entry_has_host(s, entry) && !qcow2_has_data_file(s)) {
        qcow2_free_later(s, entry & QCOW2_L2E_OFFSET_MASK, 1);
    }
}

/*
 * A write of [@offset, +@bytes) whose first cluster cannot be written in
 * place.  Handles that cluster and, when they need a new host cluster
 * too, the following ones of the same L2 table.  Returns the bytes
 * written, 0 to make the caller look up the mapping again, or -errno.
 */
static int64_t coroutine_fn write_alloc(Qcow2State *s, uint64_t offset,
                                        int64_t bytes, IOVector *qiov,
                                        size_t qoff)
{
    uint64_t cs = s->cluster_size;
    uint64_t c_start = qcow2_start_of_cluster(s, offset);
    uint64_t l2_end =
        (c_start / qcow2_l2_coverage(s) + 1) * qcow2_l2_coverage(s);
    uint64_t end = MIN(offset + bytes, l2_end);
    int64_t ci = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    uint64_t *old_entries = NULL, *old_bitmaps = NULL;
    uint64_t host, run_end, fresh_limit;
    Qcow2CacheEntry *e;
    Qcow2Alloc alloc;
    ClusterKind kind;
    GArray *pieces = NULL;
    uint64_t *new_bitmaps = NULL;
    bool same_host, fresh;
    int64_t k, j;
    int64_t ret;

    co_mutex_lock(&s->lock);
    while (wait_allocs(s, c_start, c_start + cs)) {
    }
    if (s->broken) {
        ret = -EIO;
        goto out_unlock;
    }
    ret = qcow2_co_mark_dirty(s);
    if (ret < 0) {
        goto out_unlock;
    }
    ret = get_l2_for_write(s, offset, &e);
    if (ret < 0) {
        goto out_unlock;
    }
    kind = classify(s, l2_get(s, e->data, ci), l2_get_bitmap(s, e->data, ci),
                    offset - c_start, MIN(end, c_start + cs) - c_start);
    if (kind == CL_INPLACE) {
        /* Someone allocated it meanwhile. */
        qcow2_cache_put(s->l2_cache, e);
        ret = 0;
        goto out_unlock;
    }
    same_host = kind == CL_REUSE;

    /* Following clusters that are written whole and need the same. */
    for (k = 1; c_start + k * cs < end && k < qcow2_max_alloc_clusters(s);
         k++) {
        uint64_t g = c_start + k * cs;
        ClusterKind k2;

        if (alloc_overlaps(s, g, g + cs)) {
            break;
        }
        k2 = classify(s, l2_get(s, e->data, ci + k),
                      l2_get_bitmap(s, e->data, ci + k), 0, MIN(end - g, cs));
        if (k2 != kind || (kind == CL_REUSE && !qcow2_has_data_file(s))) {
            break;
        }
        /* Only the first entry went through the lookup's check: a bogus
         * one ends the run, so that its own write reports it. */
        if (check_host(s, l2_get(s, e->data, ci + k), g, true, -1) < 0) {
            break;
        }
    }
    run_end = MIN(end, c_start + k * cs);

    fresh_limit = s->fresh_start;
    if (qcow2_has_data_file(s)) {
        host = c_start;
    } else if (same_host) {
        host = l2_get(s, e->data, ci) & QCOW2_L2E_OFFSET_MASK;
    } else {
        ret = qcow2_co_alloc_clusters(s, k, &host);
        if (ret < 0) {
            qcow2_cache_put(s->l2_cache, e);
            goto out_unlock;
        }
    }
    fresh = !same_host && !qcow2_has_data_file(s) && host >= fresh_limit;

    old_entries = g_new(uint64_t, k);
    old_bitmaps = g_new(uint64_t, k);
    new_bitmaps = g_new(uint64_t, k);
    for (j = 0; j < k; j++) {
        old_entries[j] = l2_get(s, e->data, ci + j);
        old_bitmaps[j] = l2_get_bitmap(s, e->data, ci + j);
    }
    qcow2_cache_put(s->l2_cache, e);
    alloc.start = c_start;
    alloc.end = c_start + k * cs;
    co_queue_init(&alloc.waiters);
    LIST_INSERT_HEAD(&s->allocs, &alloc, next);
    co_mutex_unlock(&s->lock);

    /* Unlocked: copy-on-write data and the guest data. */
    pieces = g_array_new(FALSE, FALSE, sizeof(Piece));
    for (j = 0; j < k; j++) {
        uint64_t g = c_start + j * cs;
        uint64_t w0 = MAX(offset, g) - g;
        uint64_t w1 = MIN(run_end, g + cs) - g;

        new_bitmaps[j] =
            plan_cluster(s, pieces, g, host + j * cs, w0, w1, old_entries[j],
                         old_bitmaps[j], same_host);
    }
    ret = fill_old_pieces(s, pieces, fresh);
    if (ret == 0) {
        ret = write_pieces(s, pieces, offset, qiov, qoff);
    }

    co_mutex_lock(&s->lock);
    if (ret == 0) {
        ret = get_l2_for_write(s, c_start, &e);
    }
    if (ret < 0) {
        if (!same_host && !qcow2_has_data_file(s)) {
            unalloc(s, host, k);
        }
        goto out_done;
    }
    for (j = 0; j < k; j++) {
        uint64_t h = host + j * cs;
        uint64_t entry = (same_host && !qcow2_has_data_file(s)
                              ? old_entries[j] & QCOW2_L2E_OFFSET_MASK
                              : h) |
                         QCOW2_OFLAG_COPIED;

        l2_set(s, e->data, ci + j, entry, new_bitmaps[j]);
        if (!same_host) {
            release_entry(s, old_entries[j]);
        }
    }
    qcow2_cache_mark_dirty(s->l2_cache, e);
    qcow2_cache_put(s->l2_cache, e);
    ret = run_end - offset;

out_done:
    LIST_REMOVE(&alloc, next);
    co_queue_restart_all(&alloc.waiters);
out_unlock:
    co_mutex_unlock(&s->lock);
    if (pieces) {
        free_pieces(pieces);
    }
    g_free(old_entries);
    g_free(old_bitmaps);
    g_free(new_bitmaps);
    return ret;
}

int coroutine_fn qcow2_co_pwritev(BlockDriverState *bs, int64_t offset,
                                  int64_t bytes, IOVector *qiov, size_t qoff,
                                  BdrvRequestFlags flags)
{
    Qcow2State *s = bs->opaque;
    Qcow2Mapping m;
    Qcow2HostIO io;
    int64_t n;
    int ret;

    (void)flags;
    while (bytes > 0) {
        if (s->broken) {
            return -EIO;
        }
        ret = get_mapping(s, offset, bytes, &m, true);
        if (ret < 0) {
            return ret;
        }
        if (m.type == QCOW2_SC_NORMAL && (m.copied || qcow2_has_data_file(s))) {
            n = m.bytes;
            ret = check_data_write(s, m.host, n);
            if (ret < 0) {
                return ret;
            }
            qcow2_host_io_begin(s, &io, m.host, n);
            ret = bdrv_co_pwritev(s->data_file, m.host, n, qiov, qoff, 0);
            qcow2_host_io_end(s, &io);
            if (ret < 0) {
                return ret;
            }
        } else {
            n = write_alloc(s, offset, bytes, qiov, qoff);
            if (n < 0) {
                return n;
            }
        }
        offset += n;
        qoff += n;
        bytes -= n;
    }
    return 0;
}

/* ---- write zeroes and discard ---- */

typedef enum { Z_ZERO, Z_ZERO_UNMAP, Z_DISCARD } ZeroMode;

/* New L2 entry and bitmap for zeroing/discarding [@a, @b) of a cluster;
 * -ENOTSUP if only a full rewrite can do it. */
static int zero_entry(Qcow2State *s, ZeroMode mode, bool backed, uint64_t a,
                      uint64_t b, uint64_t *entry, uint64_t *bitmap,
                      bool *release, bool *punch)
{
    uint64_t old = *entry;
    bool has_host = entry_has_host(s, old);
    bool owned =
        has_host && (qcow2_has_data_file(s) || (old & QCOW2_OFLAG_COPIED));
    bool full = a == 0 && b == (uint64_t)s->cluster_size;
    bool keep = mode == Z_ZERO && owned;

    *release = false;
    *punch = false;
    if (!s->extended_l2) {
        if (keep) {
            *entry = (old & QCOW2_L2E_OFFSET_MASK) | QCOW2_OFLAG_COPIED |
                     QCOW2_OFLAG_ZERO;
            return 0;
        }
        *release = has_host || (old & QCOW2_OFLAG_COMPRESSED);
        *punch = owned;
        if (mode == Z_ZERO || (backed && s->version >= 3)) {
            *entry = QCOW2_OFLAG_ZERO;
        } else {
            *entry = 0;
        }
        return 0;
    }
    {
        uint32_t mask = 0, alloc, zero;
        unsigned sc;

        for (sc = a / s->sc_size; sc < b / s->sc_size; sc++) {
            mask |= 1u << sc;
        }
        if (old & QCOW2_OFLAG_COMPRESSED) {
            if (!full) {
                return -ENOTSUP;
            }
            *release = true;
            *entry = 0;
            *bitmap =
                (mode == Z_ZERO || backed) ? UINT64_C(0xffffffff) << 32 : 0;
            return 0;
        }
        alloc = (uint32_t)*bitmap;
        zero = (uint32_t)(*bitmap >> 32);
        if (full && !keep) {
            *release = has_host;
            *punch = owned;
            *entry = 0;
            alloc = 0;
            zero = (mode == Z_ZERO || backed) ? 0xffffffffu : 0;
        } else {
            alloc &= ~mask;
            if (mode == Z_ZERO || backed) {
                zero |= mask;
            } else {
                zero &= ~mask;
            }
            if (has_host && !owned) {
                /* Shared with a snapshot: it cannot stay half ours. */
                return -ENOTSUP;
            }
        }
        *bitmap = alloc | ((uint64_t)zero << 32);
    }
    return 0;
}

typedef struct Punch {
    Qcow2HostIO io;
    BdrvChild *child;
} Punch;

static int coroutine_fn zero_range(Qcow2State *s, uint64_t offset,
                                   uint64_t bytes, ZeroMode mode)
{
    BlockDriverState *bs = s->bs;
    int64_t blen = bs->backing ? bdrv_getlength(bs->backing->bs) : 0;
    bool may_punch = bs->open_flags & BDRV_O_UNMAP;
    GArray *punches = g_array_new(FALSE, FALSE, sizeof(Punch *));
    uint64_t cs = s->cluster_size;
    guint i;
    int ret = 0;

    if (s->data_file_raw && mode != Z_DISCARD) {
        g_array_free(punches, TRUE);
        return -ENOTSUP;
    }
    if (s->version < 3 && mode != Z_DISCARD &&
        (mode == Z_ZERO || (int64_t)offset < blen)) {
        g_array_free(punches, TRUE);
        return -ENOTSUP;
    }

    co_mutex_lock(&s->lock);
    if (s->broken) {
        ret = -EIO;
        goto out_unlock;
    }
    ret = qcow2_co_mark_dirty(s);
    while (ret == 0 && bytes > 0) {
        uint64_t l1_index = offset >> (s->cluster_bits + s->l2_bits);
        uint64_t l2_end = (l1_index + 1) * qcow2_l2_coverage(s);
        uint64_t chunk = MIN(bytes, l2_end - offset);
        uint64_t pos;
        Qcow2CacheEntry *e;

        if (wait_allocs(s, qcow2_start_of_cluster(s, offset),
                        ALIGN_UP(offset + chunk, cs))) {
            continue;
        }
        if (!(s->l1[l1_index] & QCOW2_L1E_OFFSET_MASK) &&
            (mode == Z_DISCARD || (int64_t)offset >= blen)) {
            /* No table: it already reads as zeros (or is discarded). */
            offset += chunk;
            bytes -= chunk;
            continue;
        }
        ret = get_l2_for_write(s, offset, &e);
        if (ret < 0) {
            break;
        }
        for (pos = offset; pos < offset + chunk;) {
            uint64_t g = qcow2_start_of_cluster(s, pos);
            uint64_t a = pos - g;
            uint64_t b = MIN(offset + chunk - g, cs);
            int64_t ci = (g >> s->cluster_bits) & (s->l2_entries - 1);
            uint64_t entry = l2_get(s, e->data, ci);
            uint64_t bitmap = l2_get_bitmap(s, e->data, ci);
            uint64_t old = entry;
            bool release, punch;

            ret = zero_entry(s, mode, (int64_t)(g + a) < blen, a, b, &entry,
                             &bitmap, &release, &punch);
            if (ret < 0) {
                break;
            }
            /* A bogus old entry: neither free nor punch what it names
             * (it is someone else's), and leave it as it is. */
            if (release) {
                ret = check_release(s, old);
                if (ret < 0) {
                    break;
                }
            }
            l2_set(s, e->data, ci, entry, bitmap);
            if (release) {
                release_entry(s, old);
            }
            if (punch && may_punch && mode != Z_ZERO) {
                Punch *p = g_new0(Punch, 1);
                uint64_t host = old & QCOW2_L2E_OFFSET_MASK;

                p->child = s->data_file;
                qcow2_host_io_begin(s, &p->io, host, cs);
                g_array_append_val(punches, p);
            }
            pos = g + b;
        }
        qcow2_cache_mark_dirty(s->l2_cache, e);
        qcow2_cache_put(s->l2_cache, e);
        offset += chunk;
        bytes -= chunk;
    }
out_unlock:
    co_mutex_unlock(&s->lock);

    for (i = 0; i < punches->len; i++) {
        Punch *p = g_array_index(punches, Punch *, i);

        /* Advisory: the cluster reads as zeros through the L2 entry. */
        bdrv_co_pdiscard(p->child, p->io.start, p->io.end - p->io.start);
        qcow2_host_io_end(s, &p->io);
        g_free(p);
    }
    g_array_free(punches, TRUE);
    if (ret == 0 && s->pending_frees->len > QCOW2_PENDING_FREE_LIMIT) {
        ret = qcow2_co_flush_all(s, false);
    }
    return ret;
}

int coroutine_fn qcow2_co_pwrite_zeroes(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes, BdrvRequestFlags flags)
{
    return zero_range(bs->opaque, offset, bytes,
                      (flags & BDRV_REQ_MAY_UNMAP) ? Z_ZERO_UNMAP : Z_ZERO);
}

int coroutine_fn qcow2_co_pdiscard(BlockDriverState *bs, int64_t offset,
                                   int64_t bytes)
{
    return zero_range(bs->opaque, offset, bytes, Z_DISCARD);
}

/* ---- status and shrinking ---- */

int coroutine_fn qcow2_co_block_status(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, int64_t *pnum,
                                       int64_t *map, BlockDriverState **file)
{
    Qcow2State *s = bs->opaque;
    Qcow2Mapping m;
    int ret = qcow2_co_get_mapping(s, offset, bytes, &m);

    if (ret < 0) {
        return ret;
    }
    *pnum = m.bytes;
    switch (m.type) {
    case QCOW2_SC_ZERO_PLAIN:
    case QCOW2_SC_ZERO_ALLOC:
        return BDRV_BLOCK_ZERO;
    case QCOW2_SC_NORMAL:
        *map = m.host;
        *file = s->data_file->bs;
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
    case QCOW2_SC_COMPRESSED:
        return BDRV_BLOCK_DATA;
    default:
        return 0;
    }
}

int coroutine_fn qcow2_co_tail_in_use(Qcow2State *s, uint64_t offset,
                                      uint64_t *where)
{
    uint64_t g = ALIGN_UP(offset, (uint64_t)s->cluster_size);

    while (g < s->size) {
        uint64_t l1_index = g >> (s->cluster_bits + s->l2_bits);
        uint64_t l2_end = (l1_index + 1) * qcow2_l2_coverage(s);
        uint64_t l2 =
            l1_index < s->l1_size ? s->l1[l1_index] & QCOW2_L1E_OFFSET_MASK : 0;
        Qcow2CacheEntry *e;
        int ret;

        if (!l2) {
            g = l2_end;
            continue;
        }
        ret = qcow2_check_l2_offset(s, l1_index, l2);
        if (ret == 0) {
            ret = qcow2_cache_get(s->l2_cache, l2, &e);
        }
        if (ret < 0) {
            return ret;
        }
        for (; g < l2_end && g < s->size; g += s->cluster_size) {
            int64_t ci = (g >> s->cluster_bits) & (s->l2_entries - 1);
            uint64_t entry = l2_get(s, e->data, ci);

            if ((entry & QCOW2_OFLAG_COMPRESSED) || entry_has_host(s, entry) ||
                (uint32_t)l2_get_bitmap(s, e->data, ci)) {
                qcow2_cache_put(s->l2_cache, e);
                *where = g;
                return 1;
            }
        }
        qcow2_cache_put(s->l2_cache, e);
    }
    return 0;
}
