/*
 * qcow2: QEMU's copy-on-write image format, versions 2 (compat=0.10) and
 * 3 (compat=1.1).  This file holds the header and its extensions, open
 * and close (including the repair of a dirty image), the feature name
 * table, flush, resize, "imgfs info" and the creation of new images; the
 * other drivers/qcow2/ files hold the mapping, refcounts, cache,
 * compression and snapshots (see qcow2.h).
 *
 * The header is never rewritten as a whole: imgfs patches only the fields
 * it changes (size, L1 and refcount table location, feature bits), so
 * header extensions it does not know, and the backing file name behind
 * them, stay exactly as they were.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <string.h>

#include "qcow2.h"

/* Default cache bounds; the L2 default covers 256 GiB at 64 KiB
 * clusters, and is cut to what the image needs. */
#define QCOW2_DEFAULT_L2_CACHE (32 * MiB)
#define QCOW2_DEFAULT_RB_CACHE (256 * KiB)
#define QCOW2_DEFAULT_CLEAN_INTERVAL 600

static const OptDesc qcow2_options[] = {
    {"l2-cache-size", OPT_SIZE, NULL,
     "memory for L2 tables (default: what the image needs, at most 32M)"},
    {"refcount-cache-size", OPT_SIZE, NULL,
     "memory for refcount blocks (default: 256K, at least 4 clusters)"},
    {"cache-clean-interval", OPT_NUMBER, NULL,
     "free cached tables unused for this many seconds (0: never; 600)"},
    {NULL},
};

/* Names of the features imgfs knows, for images without a name table. */
static const Qcow2Feature qcow2_known_features[] = {
    {0, 0, "dirty bit"},
    {0, 1, "corrupt bit"},
    {0, 2, "external data file"},
    {0, 3, "compression type"},
    {0, 4, "extended L2 entries"},
    {1, 0, "lazy refcounts"},
    {2, 0, "bitmaps"},
    {2, 1, "raw external data"},
};

static const char *const feature_kinds[] = {"incompatible", "compatible",
                                            "autoclear"};

const char *qcow2_feature_name(Qcow2State *s, int type, int bit)
{
    size_t i;

    for (i = 0; s && i < (size_t)s->nb_features; i++) {
        if (s->features[i].type == type && s->features[i].bit == bit &&
            s->features[i].name[0]) {
            return s->features[i].name;
        }
    }
    for (i = 0; i < ARRAY_SIZE(qcow2_known_features); i++) {
        if (qcow2_known_features[i].type == type &&
            qcow2_known_features[i].bit == bit) {
            return qcow2_known_features[i].name;
        }
    }
    return NULL;
}

/* Append the names of the bits of @mask to @out, ", " separated:
 * "'name' (incompatible bit 5)" with @detailed, else "name"; bits
 * without a name as "incompatible bit 5". */
static void feature_list(Qcow2State *s, GString *out, int type, uint64_t mask,
                         bool detailed)
{
    int bit;

    for (bit = 0; bit < 64; bit++) {
        const char *name;

        if (!(mask & (UINT64_C(1) << bit))) {
            continue;
        }
        name = qcow2_feature_name(s, type, bit);
        if (out->len) {
            g_string_append(out, ", ");
        }
        if (name && detailed) {
            g_string_append_printf(out, "'%s' (%s bit %d)", name,
                                   feature_kinds[type], bit);
        } else if (name) {
            g_string_append(out, name);
        } else {
            g_string_append_printf(out, "%s bit %d", feature_kinds[type], bit);
        }
    }
}

static int qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
    uint32_t version;

    (void)filename;
    if (len < 8 || qcow2_get_be32(buf) != QCOW2_MAGIC) {
        return 0;
    }
    version = qcow2_get_be32(buf + 4);
    return (version == 2 || version == 3) ? 100 : 0;
}

/* ---- header updates ---- */

int qcow2_signal_corruption(Qcow2State *s, bool fatal, int64_t offset,
                            const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list ap;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    bdrv_report_corruption(s->bs, offset, "%s", msg);
    if (fatal && !s->broken) {
        s->broken = true;
        if (!s->bs->read_only) {
            log_msg(LOG_LEVEL_ERROR,
                    "%s: marking the image corrupt; further writes are "
                    "refused (repair: qemu-img check -r all)",
                    bdrv_name(s->bs));
            if (co_in_coroutine()) {
                qcow2_co_update_incompatible(s, QCOW2_INCOMPAT_CORRUPT, 0);
            }
        }
    }
    return -EIO;
}

int coroutine_fn qcow2_co_write_header(Qcow2State *s, unsigned field,
                                       const void *buf, unsigned len)
{
    int ret = qcow2_meta_check_write(s, field, len, QCOW2_META_HEADER);

    if (ret < 0) {
        return ret;
    }
    return bdrv_co_pwrite(s->bs->file, field, len, buf, 0);
}

int coroutine_fn qcow2_co_flush_files(Qcow2State *s)
{
    int ret = bdrv_co_flush(s->bs->file->bs);

    if (ret == 0 && qcow2_has_data_file(s)) {
        ret = bdrv_co_flush(s->data_file->bs);
    }
    return ret;
}

int coroutine_fn qcow2_co_update_incompatible(Qcow2State *s, uint64_t set,
                                              uint64_t clear)
{
    uint64_t val = (s->incompatible | set) & ~clear;
    uint8_t be[8];
    int ret;

    if (val == s->incompatible || s->version < 3) {
        return 0;
    }
    qcow2_put_be64(be, val);
    ret = qcow2_co_write_header(s, QCOW2_HDR_INCOMPATIBLE, be, 8);
    if (ret == 0) {
        s->incompatible = val;
        ret = qcow2_co_flush_files(s);
    }
    return ret;
}

int coroutine_fn qcow2_co_mark_dirty(Qcow2State *s)
{
    if (!s->lazy_refcounts || (s->incompatible & QCOW2_INCOMPAT_DIRTY)) {
        return 0;
    }
    return qcow2_co_update_incompatible(s, QCOW2_INCOMPAT_DIRTY, 0);
}

/* ---- open ---- */

static void qcow2_state_free(Qcow2State *s)
{
    qcow2_cache_free(s->l2_cache);
    qcow2_cache_free(s->rb_cache);
    s->l2_cache = s->rb_cache = NULL;
    if (s->clean_timer) {
        aio_timer_free(s->clean_timer);
        s->clean_timer = NULL;
    }
    qcow2_free_snapshots(s);
    g_free(s->l1);
    g_free(s->reftable);
    g_free(s->features);
    g_free(s->data_file_name);
    if (s->meta) {
        g_hash_table_destroy(s->meta);
    }
    if (s->pending_frees) {
        g_array_free(s->pending_frees, TRUE);
    }
    s->l1 = s->reftable = NULL;
    s->features = NULL;
    s->data_file_name = NULL;
    s->meta = NULL;
    s->pending_frees = NULL;
}

/* Fill *@errp with one phrase (it names the image) and return -@err. */
static int set_error(GError **errp, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int set_error(GError **errp, int err, const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list ap;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error_literal(errp, G_FILE_ERROR, g_file_error_from_errno(err), msg);
    return -err;
}

/* Parse the header extensions in the first cluster @hdr. */
static int parse_extensions(Qcow2State *s, const uint8_t *hdr, uint64_t end,
                            GError **errp)
{
    BlockDriverState *bs = s->bs;
    uint64_t pos = s->header_length;

    while (pos + 8 <= end) {
        uint32_t type = qcow2_get_be32(hdr + pos);
        uint32_t len = qcow2_get_be32(hdr + pos + 4);
        const uint8_t *data = hdr + pos + 8;

        if (type == QCOW2_EXT_END) {
            return 0;
        }
        if (len > end - pos - 8) {
            return set_error(errp, EINVAL,
                             "'%s': corrupt image: header extension 0x%x "
                             "runs past the first cluster",
                             bdrv_name(bs), type);
        }
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            g_free(bs->backing_format);
            bs->backing_format = g_strndup((const char *)data, len);
            break;
        case QCOW2_EXT_FEATURE_TABLE: {
            uint32_t i, n = len / 48;

            g_free(s->features);
            s->features = g_new0(Qcow2Feature, n ? n : 1);
            s->nb_features = n;
            for (i = 0; i < n; i++) {
                s->features[i].type = data[i * 48];
                s->features[i].bit = data[i * 48 + 1];
                memcpy(s->features[i].name, data + i * 48 + 2, 46);
                s->features[i].name[46] = 0;
            }
            break;
        }
        case QCOW2_EXT_DATA_FILE:
            g_free(s->data_file_name);
            s->data_file_name = g_strndup((const char *)data, len);
            break;
        case QCOW2_EXT_BITMAPS:
            if (len >= 24) {
                s->has_bitmaps = true;
                s->nb_bitmaps = qcow2_get_be32(data);
                s->bitmap_dir_size = qcow2_get_be64(data + 8);
                s->bitmap_dir_offset = qcow2_get_be64(data + 16);
            }
            break;
        default:
            /* Unknown: ignored here, kept intact on disk. */
            break;
        }
        pos += 8 + ALIGN_UP((uint64_t)len, 8);
    }
    return 0;
}

/* Read and check the fixed header and its extensions. */
static int coroutine_fn read_header(Qcow2State *s, int flags, GError **errp)
{
    BlockDriverState *bs = s->bs;
    int64_t file_len = bdrv_getlength(bs->file->bs);
    uint8_t *hdr = NULL;
    uint64_t backing_offset, l1_needed, unknown;
    uint32_t backing_size, crypt;
    int64_t n;
    int ret;

    if (file_len < QCOW2_V2_HEADER_LENGTH) {
        return set_error(errp, EINVAL,
                         "'%s' is too short to be a qcow2 image (%" PRId64
                         " bytes)",
                         bdrv_name(bs), file_len);
    }
    hdr = g_malloc0(1 << QCOW2_MAX_CLUSTER_BITS);
    n = MIN(file_len, 4096);
    ret = bdrv_co_pread(bs->file, 0, n, hdr, 0);
    if (ret < 0) {
        set_error(errp, -ret, "cannot read the header of '%s': %s",
                  bdrv_name(bs), g_strerror(-ret));
        goto out;
    }
    if (qcow2_get_be32(hdr) != QCOW2_MAGIC) {
        ret = set_error(errp, EINVAL,
                        "'%s' is not a qcow2 image (bad magic 0x%08x)",
                        bdrv_name(bs), qcow2_get_be32(hdr));
        goto out;
    }
    s->version = qcow2_get_be32(hdr + QCOW2_HDR_VERSION);
    if (s->version != 2 && s->version != 3) {
        ret = set_error(errp, ENOTSUP,
                        "'%s': unsupported qcow2 version %d (imgfs reads 2 "
                        "and 3)",
                        bdrv_name(bs), s->version);
        goto out;
    }
    s->cluster_bits = qcow2_get_be32(hdr + QCOW2_HDR_CLUSTER_BITS);
    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        ret = set_error(errp, EINVAL,
                        "'%s': cluster_bits %u is out of range (512 B to 2 "
                        "MiB clusters)",
                        bdrv_name(bs), s->cluster_bits);
        goto out;
    }
    s->cluster_size = INT64_C(1) << s->cluster_bits;
    n = MIN(file_len, s->cluster_size);
    if (n > 4096) {
        ret = bdrv_co_pread(bs->file, 0, n, hdr, 0);
        if (ret < 0) {
            set_error(errp, -ret, "cannot read the header of '%s': %s",
                      bdrv_name(bs), g_strerror(-ret));
            goto out;
        }
    }
    if (s->version == 2) {
        s->header_length = QCOW2_V2_HEADER_LENGTH;
        s->refcount_order = 4;
    } else {
        s->header_length = qcow2_get_be32(hdr + QCOW2_HDR_HEADER_LENGTH);
        s->incompatible = qcow2_get_be64(hdr + QCOW2_HDR_INCOMPATIBLE);
        s->compatible = qcow2_get_be64(hdr + QCOW2_HDR_COMPATIBLE);
        s->autoclear = qcow2_get_be64(hdr + QCOW2_HDR_AUTOCLEAR);
        s->refcount_order = qcow2_get_be32(hdr + QCOW2_HDR_REFCOUNT_ORDER);
        if (s->header_length < QCOW2_V3_HEADER_LENGTH || s->header_length % 8 ||
            s->header_length > n) {
            ret = set_error(errp, EINVAL,
                            "'%s': corrupt image: invalid header length "
                            "%u",
                            bdrv_name(bs), s->header_length);
            goto out;
        }
        if (s->refcount_order > 6) {
            ret = set_error(errp, EINVAL,
                            "'%s': refcount_order %u is out of range (at "
                            "most 6, 64-bit refcounts)",
                            bdrv_name(bs), s->refcount_order);
            goto out;
        }
        if (s->header_length > QCOW2_HDR_COMPRESSION_TYPE) {
            s->compression_type = hdr[QCOW2_HDR_COMPRESSION_TYPE];
        }
    }
    ret = parse_extensions(s, hdr, n, errp);
    if (ret < 0) {
        goto out;
    }

    unknown = s->incompatible & ~QCOW2_INCOMPAT_KNOWN;
    if (unknown) {
        g_autoptr(GString) list = g_string_new(NULL);

        feature_list(s, list, 0, unknown, true);
        ret = set_error(errp, ENOTSUP,
                        "'%s' uses qcow2 features imgfs does not support: "
                        "%s",
                        bdrv_name(bs), list->str);
        goto out;
    }
    crypt = qcow2_get_be32(hdr + QCOW2_HDR_CRYPT_METHOD);
    if (crypt) {
        ret = set_error(errp, ENOTSUP,
                        "'%s' is encrypted (crypt_method %u): not supported",
                        bdrv_name(bs), crypt);
        goto out;
    }
    if (s->incompatible & QCOW2_INCOMPAT_COMPRESSION) {
        if (s->compression_type != QCOW2_COMPRESS_ZSTD) {
            ret = set_error(errp, ENOTSUP, "'%s': unknown compression type %d",
                            bdrv_name(bs), s->compression_type);
            goto out;
        }
    } else if (s->compression_type != QCOW2_COMPRESS_ZLIB) {
        ret = set_error(errp, EINVAL,
                        "'%s': corrupt image: compression type %d without "
                        "the compression type feature bit",
                        bdrv_name(bs), s->compression_type);
        goto out;
    }
    s->extended_l2 = s->incompatible & QCOW2_INCOMPAT_EXTL2;
    if (s->extended_l2 && s->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS) {
        ret = set_error(errp, EINVAL,
                        "'%s': extended L2 entries need clusters of at "
                        "least 16 KiB",
                        bdrv_name(bs));
        goto out;
    }

    /* Geometry. */
    s->l2_entry_bytes = s->extended_l2 ? 16 : 8;
    s->l2_bits = s->cluster_bits - (s->extended_l2 ? 4 : 3);
    s->l2_entries = INT64_C(1) << s->l2_bits;
    s->sc_per_cluster = s->extended_l2 ? 32 : 1;
    s->sc_size = s->cluster_size / s->sc_per_cluster;
    s->refcount_bits = 1u << s->refcount_order;
    s->refcount_max = s->refcount_bits == 64
                          ? UINT64_MAX
                          : (UINT64_C(1) << s->refcount_bits) - 1;
    s->refblock_bits = s->cluster_bits + 3 - s->refcount_order;
    s->refblock_entries = INT64_C(1) << s->refblock_bits;
    s->lazy_refcounts =
        s->version >= 3 && (s->compatible & QCOW2_COMPAT_LAZY_REFCOUNTS);

    s->size = qcow2_get_be64(hdr + QCOW2_HDR_SIZE);
    s->l1_size = qcow2_get_be32(hdr + QCOW2_HDR_L1_SIZE);
    s->l1_offset = qcow2_get_be64(hdr + QCOW2_HDR_L1_OFFSET);
    s->reftable_offset = qcow2_get_be64(hdr + QCOW2_HDR_REFTABLE_OFFSET);
    s->reftable_clusters = qcow2_get_be32(hdr + QCOW2_HDR_REFTABLE_CLUSTERS);
    s->nb_snapshots = qcow2_get_be32(hdr + QCOW2_HDR_NB_SNAPSHOTS);
    s->snapshots_offset = qcow2_get_be64(hdr + QCOW2_HDR_SNAPSHOTS_OFFSET);

    if (s->size > (UINT64_C(1) << 62)) {
        ret = set_error(errp, EFBIG,
                        "'%s': virtual size %" PRIu64 " is too large",
                        bdrv_name(bs), s->size);
        goto out;
    }
    if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        ret = set_error(errp, EFBIG,
                        "'%s': L1 table is too large (%u entries, at most "
                        "%" PRId64 ")",
                        bdrv_name(bs), s->l1_size, QCOW2_MAX_L1_BYTES / 8);
        goto out;
    }
    l1_needed = DIV_ROUND_UP(s->size, qcow2_l2_coverage(s));
    if (s->l1_size < l1_needed) {
        ret = set_error(errp, EINVAL,
                        "'%s': corrupt image: L1 table (%u entries) too "
                        "small for the virtual size (%" PRIu64 " needed)",
                        bdrv_name(bs), s->l1_size, l1_needed);
        goto out;
    }
    if (s->l1_size &&
        (qcow2_offset_into_cluster(s, s->l1_offset) ||
         !range_within(s->l1_offset, (uint64_t)s->l1_size * 8, file_len))) {
        ret = set_error(errp, EINVAL,
                        "'%s': corrupt image: L1 table at offset 0x%" PRIx64
                        " is %s",
                        bdrv_name(bs), s->l1_offset,
                        qcow2_offset_into_cluster(s, s->l1_offset)
                            ? "not aligned to a cluster"
                            : "past the end of the file");
        goto out;
    }
    if (!s->reftable_clusters ||
        (uint64_t)s->reftable_clusters * s->cluster_size >
            QCOW2_MAX_REFTABLE_BYTES) {
        ret = set_error(errp, EINVAL,
                        "'%s': corrupt image: refcount table of %u clusters",
                        bdrv_name(bs), s->reftable_clusters);
        goto out;
    }
    if (!s->reftable_offset ||
        qcow2_offset_into_cluster(s, s->reftable_offset) ||
        !range_within(s->reftable_offset,
                      (uint64_t)s->reftable_clusters * s->cluster_size,
                      file_len)) {
        ret = set_error(errp, EINVAL,
                        "'%s': corrupt image: refcount table at offset "
                        "0x%" PRIx64 " is %s",
                        bdrv_name(bs), s->reftable_offset,
                        qcow2_offset_into_cluster(s, s->reftable_offset) ||
                                !s->reftable_offset
                            ? "not aligned to a cluster"
                            : "past the end of the file");
        goto out;
    }

    /*
     * Bitmaps are valid only while their autoclear bit is set: a program
     * that does not maintain them clears it when it writes, and may have
     * freed and reused their clusters since.  A stale extension is ignored,
     * as QEMU ignores it, lest those clusters count as metadata (guest
     * writes there would be refused and the image marked corrupt).
     */
    if (s->has_bitmaps && !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
        s->has_bitmaps = false;
        s->nb_bitmaps = 0;
        s->bitmap_dir_size = 0;
        s->bitmap_dir_offset = 0;
    }
    /* The bitmap directory is registered cluster by cluster in the
     * overlap map: a size near 2^64 would loop (and allocate) for ever. */
    if (s->has_bitmaps &&
        (qcow2_offset_into_cluster(s, s->bitmap_dir_offset) ||
         s->bitmap_dir_size > QCOW2_MAX_BITMAP_DIR ||
         !range_within(s->bitmap_dir_offset, s->bitmap_dir_size, file_len))) {
        ret =
            set_error(errp, EINVAL,
                      "'%s': corrupt image: invalid bitmap directory "
                      "(offset 0x%" PRIx64 ", %" PRIu64 " bytes)",
                      bdrv_name(bs), s->bitmap_dir_offset, s->bitmap_dir_size);
        goto out;
    }

    backing_offset = qcow2_get_be64(hdr + QCOW2_HDR_BACKING_OFFSET);
    backing_size = qcow2_get_be32(hdr + QCOW2_HDR_BACKING_SIZE);
    if (backing_offset) {
        if (backing_size > QCOW2_MAX_BACKING_NAME ||
            !range_within(backing_offset, backing_size, n)) {
            ret = set_error(errp, EINVAL,
                            "'%s': corrupt image: invalid backing file name "
                            "(offset 0x%" PRIx64 ", %u bytes)",
                            bdrv_name(bs), backing_offset, backing_size);
            goto out;
        }
        g_free(bs->backing_file);
        bs->backing_file =
            g_strndup((const char *)hdr + backing_offset, backing_size);
    }
    if (s->incompatible & QCOW2_INCOMPAT_DATA_FILE) {
        if (!s->data_file_name || !*s->data_file_name) {
            ret = set_error(errp, EINVAL,
                            "'%s' keeps its data in an external data file "
                            "but does not name it",
                            bdrv_name(bs));
            goto out;
        }
        s->data_file_raw = s->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    }
    (void)flags;
    ret = 0;
out:
    g_free(hdr);
    return ret;
}

static int coroutine_fn read_tables(Qcow2State *s, GError **errp)
{
    BlockDriverState *bs = s->bs;
    uint64_t i;
    int ret;

    s->l1 = g_new0(uint64_t, s->l1_size ? s->l1_size : 1);
    if (s->l1_size) {
        ret = bdrv_co_pread(bs->file, s->l1_offset, (int64_t)s->l1_size * 8,
                            s->l1, 0);
        if (ret < 0) {
            return set_error(errp, -ret, "cannot read the L1 table of '%s': %s",
                             bdrv_name(bs), g_strerror(-ret));
        }
        for (i = 0; i < s->l1_size; i++) {
            s->l1[i] = be64toh(s->l1[i]);
        }
    }
    s->reftable_entries = (uint64_t)s->reftable_clusters * s->cluster_size / 8;
    s->reftable = g_new0(uint64_t, s->reftable_entries);
    ret = bdrv_co_pread(bs->file, s->reftable_offset,
                        (int64_t)s->reftable_entries * 8, s->reftable, 0);
    if (ret < 0) {
        return set_error(errp, -ret,
                         "cannot read the refcount table of '%s': %s",
                         bdrv_name(bs), g_strerror(-ret));
    }
    for (i = 0; i < s->reftable_entries; i++) {
        s->reftable[i] = be64toh(s->reftable[i]) & QCOW2_REFT_OFFSET_MASK;
    }
    return 0;
}

static void qcow2_clean_timer_cb(void *opaque)
{
    Qcow2State *s = opaque;

    qcow2_cache_clean_unused(s->l2_cache);
    qcow2_cache_clean_unused(s->rb_cache);
    aio_timer_mod(s->clean_timer,
                  aio_clock_ns() + s->clean_interval * INT64_C(1000000000));
}

static void setup_caches(Qcow2State *s, GHashTable *opts)
{
    uint64_t cs = s->cluster_size;
    uint64_t need = ALIGN_UP(
        DIV_ROUND_UP(s->size, (uint64_t)cs) * s->l2_entry_bytes, (uint64_t)cs);

    s->l2_cache_bytes = opt_get_size(opts, "l2-cache-size", 0);
    if (!s->l2_cache_bytes) {
        s->l2_cache_bytes = MIN(need, (uint64_t)QCOW2_DEFAULT_L2_CACHE);
    }
    s->rb_cache_bytes = opt_get_size(opts, "refcount-cache-size", 0);
    if (!s->rb_cache_bytes) {
        s->rb_cache_bytes = MAX((uint64_t)QCOW2_DEFAULT_RB_CACHE, 4 * cs);
    }
    s->l2_cache = qcow2_cache_new(s, QCOW2_META_L2, s->l2_cache_bytes);
    s->rb_cache = qcow2_cache_new(s, QCOW2_META_REFBLOCK, s->rb_cache_bytes);
    s->l2_cache_bytes = qcow2_cache_max_bytes(s->l2_cache);
    s->rb_cache_bytes = qcow2_cache_max_bytes(s->rb_cache);

    s->clean_interval = opt_get_number(opts, "cache-clean-interval",
                                       QCOW2_DEFAULT_CLEAN_INTERVAL);
    if (s->clean_interval && s->bs->ctx) {
        s->clean_timer = aio_timer_new(s->bs->ctx, qcow2_clean_timer_cb, s);
        aio_timer_mod(s->clean_timer,
                      aio_clock_ns() + s->clean_interval * INT64_C(1000000000));
    }
}

static int coroutine_fn qcow2_co_open(BlockDriverState *bs, GHashTable *opts,
                                      int flags, GError **errp)
{
    Qcow2State *s = bs->opaque;
    GError *local_err = NULL;
    int ret;

    s->bs = bs;
    s->data_file = bs->file;
    co_mutex_init(&s->lock);
    co_mutex_init(&s->flush_lock);
    LIST_INIT(&s->allocs);
    LIST_INIT(&s->host_ios);
    s->pending_frees = g_array_new(FALSE, FALSE, sizeof(Qcow2PendingFree));

    ret = read_header(s, flags, errp);
    if (ret < 0) {
        goto fail;
    }
    if ((flags & BDRV_O_RDWR) && (s->incompatible & QCOW2_INCOMPAT_CORRUPT)) {
        log_msg(LOG_LEVEL_WARNING,
                "%s: the image is marked corrupt: opening it read-only "
                "(repair: qemu-img check -r all)",
                bdrv_name(bs));
        flags &= ~BDRV_O_RDWR;
        bs->open_flags &= ~BDRV_O_RDWR;
        bs->read_only = true;
    }
    ret = read_tables(s, errp);
    if (ret == 0) {
        ret = qcow2_co_read_snapshots(s, errp);
    }
    if (ret == 0) {
        ret = qcow2_meta_build(s, errp);
    }
    if (ret < 0) {
        goto fail;
    }
    setup_caches(s, opts);
    s->fresh_start =
        ALIGN_UP((uint64_t)bdrv_getlength(bs->file->bs), s->cluster_size);

    if (s->incompatible & QCOW2_INCOMPAT_DATA_FILE) {
        g_autofree char *path = bdrv_resolve_relative(bs, s->data_file_name);
        BdrvChild *c = bdrv_co_open_child(bs, "data-file", BDRV_CHILD_DATA,
                                          path, "", -1, &local_err);

        if (!c) {
            ret = set_error(errp, EINVAL,
                            "'%s': cannot open its external data file: %s",
                            bdrv_name(bs), local_err->message);
            g_error_free(local_err);
            goto fail;
        }
        s->data_file = c;
    }
    ret = bdrv_co_open_backing(bs, errp);
    if (ret < 0) {
        goto fail;
    }

    if (flags & BDRV_O_RDWR) {
        uint64_t keep = QCOW2_AUTOCLEAR_DATA_FILE_RAW;

        if (s->incompatible & QCOW2_INCOMPAT_DIRTY) {
            ret = qcow2_co_repair(s, errp);
            if (ret < 0) {
                goto fail;
            }
        }
        if (!qcow2_has_data_file(s)) {
            keep = 0;
        }
        if (s->version >= 3 && (s->autoclear & ~keep)) {
            /* Bits of features imgfs does not maintain (bitmaps...):
             * clear them before the first write, as the format says. */
            uint8_t be[8];

            qcow2_put_be64(be, s->autoclear & keep);
            ret = qcow2_co_write_header(s, QCOW2_HDR_AUTOCLEAR, be, 8);
            if (ret == 0) {
                ret = qcow2_co_flush_files(s);
            }
            if (ret < 0) {
                set_error(errp, -ret, "cannot update the header of '%s': %s",
                          bdrv_name(bs), g_strerror(-ret));
                goto fail;
            }
            s->autoclear &= keep;
        }
    }
    bs->total_bytes = s->size;
    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP;
    return 0;

fail:
    qcow2_state_free(s);
    return ret;
}

static void coroutine_fn qcow2_co_close(BlockDriverState *bs)
{
    Qcow2State *s = bs->opaque;
    int ret;

    if ((bs->open_flags & BDRV_O_RDWR) && !s->broken) {
        ret = qcow2_co_flush_all(s, true);
        if (ret == 0 && s->lazy_refcounts) {
            ret = qcow2_co_update_incompatible(s, 0, QCOW2_INCOMPAT_DIRTY);
        }
        if (ret == 0 && s->preallocated &&
            bdrv_getlength(bs->file->bs) > (int64_t)s->fresh_start) {
            /* Give back the space preallocated and not used. */
            ret = bdrv_co_truncate(bs->file, s->fresh_start, true, PREALLOC_OFF,
                                   NULL);
        }
        if (ret < 0) {
            log_msg(LOG_LEVEL_ERROR, "%s: closing the image: %s", bdrv_name(bs),
                    g_strerror(-ret));
        }
    }
    qcow2_state_free(s);
}

static void qcow2_refresh_limits(BlockDriverState *bs, BlockLimits *bl)
{
    Qcow2State *s = bs->opaque;

    bl->pwrite_zeroes_alignment = s->sc_size;
    bl->pdiscard_alignment = s->cluster_size;
}

static int64_t coroutine_fn qcow2_co_getlength(BlockDriverState *bs)
{
    Qcow2State *s = bs->opaque;

    return s->size;
}

static int coroutine_fn qcow2_co_flush(BlockDriverState *bs)
{
    Qcow2State *s = bs->opaque;

    if (s->broken) {
        /* Metadata changes that will never be written: the data they
         * point to is not safe. */
        return qcow2_cache_nb_dirty(s->l2_cache) ||
                       qcow2_cache_nb_dirty(s->rb_cache)
                   ? -EIO
                   : 0;
    }
    return qcow2_co_flush_all(s, false);
}

/* ---- resize ---- */

/* After growing from @old: make [@old, @new) read as zeros where stale
 * data (of an earlier shrink) or a longer backing file would show. */
static int coroutine_fn zero_grown_tail(Qcow2State *s, uint64_t old,
                                        uint64_t new)
{
    BlockDriverState *bs = s->bs;
    uint64_t cs = s->cluster_size;
    uint64_t end = old % cs ? MIN(ALIGN_UP(old, cs), new) : old;
    uint64_t zero_end = old;
    int ret;

    if (bs->backing) {
        uint64_t blen = bdrv_getlength(bs->backing->bs);

        if (blen > old) {
            zero_end = MIN(blen, new);
        }
    }
    /* The partial cluster at the old end, with explicit zeros. */
    while (old < end) {
        uint64_t n = end - old;
        IOVector v;
        void *zeros = g_malloc0(n);

        iov_init_buf(&v, zeros, n);
        ret = qcow2_co_pwritev(bs, old, n, &v, 0, 0);
        g_free(zeros);
        if (ret < 0) {
            return ret;
        }
        old = end;
    }
    if (zero_end <= old) {
        return 0;
    }
    zero_end = MIN(ALIGN_UP(zero_end, cs), ALIGN_UP(new, cs));
    ret = qcow2_co_pwrite_zeroes(bs, old, zero_end - old, 0);
    if (ret == -ENOTSUP) {
        /* Version 2: no zero flag, so write zeros. */
        void *zeros = g_malloc0(MiB);

        ret = 0;
        while (old < MIN(zero_end, new) && ret == 0) {
            uint64_t n = MIN(MIN(zero_end, new) - old, (uint64_t)MiB);
            IOVector v;

            iov_init_buf(&v, zeros, n);
            ret = qcow2_co_pwritev(bs, old, n, &v, 0, 0);
            old += n;
        }
        g_free(zeros);
    }
    return ret;
}

static int coroutine_fn qcow2_co_truncate(BlockDriverState *bs, int64_t offset,
                                          bool exact, PreallocMode prealloc,
                                          GError **errp)
{
    Qcow2State *s = bs->opaque;
    uint64_t old = s->size, where;
    uint8_t be[8];
    int ret;

    (void)exact;
    if (prealloc != PREALLOC_OFF) {
        return set_error(errp, ENOTSUP,
                         "'%s': preallocation is not supported when "
                         "resizing",
                         bdrv_name(bs));
    }
    if (s->broken) {
        return set_error(errp, EIO, "'%s' is corrupt: not resizing",
                         bdrv_name(bs));
    }
    if (offset % 512) {
        return set_error(errp, EINVAL,
                         "'%s': the size of a qcow2 image must be a "
                         "multiple of 512 bytes (not %" PRId64 ")",
                         bdrv_name(bs), offset);
    }
    if ((uint64_t)offset == old) {
        return 0;
    }
    co_mutex_lock(&s->lock);
    if ((uint64_t)offset < old) {
        if (s->nb_snapshots) {
            ret = set_error(errp, ENOTSUP,
                            "cannot shrink '%s': it has internal snapshots",
                            bdrv_name(bs));
            goto out_unlock;
        }
        ret = qcow2_co_tail_in_use(s, offset, &where);
        if (ret > 0) {
            ret = set_error(errp, ENOTSUP,
                            "cannot shrink '%s' to %" PRId64
                            " bytes: guest data at offset %" PRIu64
                            " would be lost (discard it first)",
                            bdrv_name(bs), offset, where);
        }
        if (ret < 0) {
            goto out_unlock;
        }
    } else {
        uint64_t need = DIV_ROUND_UP((uint64_t)offset, qcow2_l2_coverage(s));

        if (need > s->l1_size) {
            ret = qcow2_co_grow_l1(s, need);
            if (ret < 0) {
                set_error(errp, -ret, "cannot grow the L1 table of '%s': %s",
                          bdrv_name(bs), g_strerror(-ret));
                goto out_unlock;
            }
        }
    }
    qcow2_put_be64(be, offset);
    ret = qcow2_co_write_header(s, QCOW2_HDR_SIZE, be, 8);
    if (ret == 0) {
        ret = qcow2_co_flush_files(s);
    }
    if (ret < 0) {
        set_error(errp, -ret, "cannot update the size of '%s': %s",
                  bdrv_name(bs), g_strerror(-ret));
        goto out_unlock;
    }
    s->size = offset;
    co_mutex_unlock(&s->lock);

    if (s->data_file_raw) {
        ret = bdrv_co_truncate(s->data_file, offset, false, PREALLOC_OFF, errp);
        if (ret < 0) {
            return ret;
        }
    }
    if ((uint64_t)offset > old) {
        ret = zero_grown_tail(s, old, offset);
        if (ret < 0) {
            return set_error(errp, -ret, "'%s': cannot zero the grown area: %s",
                             bdrv_name(bs), g_strerror(-ret));
        }
    }
    return 0;

out_unlock:
    co_mutex_unlock(&s->lock);
    return ret;
}

/* ---- imgfs info ---- */

static int64_t coroutine_fn allocated_of(BlockDriverState *bs);

static void coroutine_fn qcow2_co_get_info(BlockDriverState *bs,
                                           ImageInfoSpec *spec)
{
    Qcow2State *s = bs->opaque;
    GString *features = g_string_new(NULL);
    uint64_t fields[3] = {s->incompatible, s->compatible, s->autoclear};
    int type;

    image_info_add(spec, "compat", "%s", s->version == 2 ? "0.10" : "1.1");
    image_info_add(spec, "cluster-size", "%" PRId64, s->cluster_size);
    image_info_add(spec, "refcount-bits", "%u", s->refcount_bits);
    image_info_add(spec, "compression-type", "%s",
                   s->compression_type == QCOW2_COMPRESS_ZSTD ? "zstd"
                                                              : "zlib");
    image_info_add(spec, "extended-l2", "%s",
                   s->extended_l2 ? "true" : "false");
    image_info_add(spec, "lazy-refcounts", "%s",
                   s->lazy_refcounts ? "true" : "false");
    image_info_add(spec, "corrupt", "%s",
                   (s->incompatible & QCOW2_INCOMPAT_CORRUPT) ? "true"
                                                              : "false");
    image_info_add(spec, "dirty-flag", "%s",
                   (s->incompatible & QCOW2_INCOMPAT_DIRTY) ? "true" : "false");
    if (s->data_file_name) {
        int64_t n = allocated_of(s->data_file->bs);

        image_info_add(spec, "data-file", "%s", s->data_file_name);
        image_info_add(spec, "data-file-raw", "%s",
                       s->data_file_raw ? "true" : "false");
        if (n >= 0) {
            image_info_add(spec, "data-file-actual-size", "%" PRId64, n);
        }
    }
    image_info_add(spec, "snapshots", "%u", s->nb_snapshots);
    if (s->nb_snapshots) {
        GString *names = g_string_new(NULL);
        uint32_t i;

        for (i = 0; i < s->nb_snapshots; i++) {
            g_string_append_printf(names, "%s%s", i ? ", " : "",
                                   s->snapshots[i].name);
        }
        image_info_add(spec, "snapshot-names", "%s", names->str);
        g_string_free(names, TRUE);
    }
    for (type = 0; type < 3; type++) {
        feature_list(s, features, type, fields[type], false);
    }
    image_info_add(spec, "features", "%s",
                   features->len ? features->str : "none");
    g_string_free(features, TRUE);
    image_info_add(spec, "l2-cache-size", "%" PRIu64, s->l2_cache_bytes);
    image_info_add(spec, "refcount-cache-size", "%" PRIu64, s->rb_cache_bytes);
}

/* Host bytes of @bs's storage, or -ENOTSUP. */
static int64_t coroutine_fn allocated_of(BlockDriverState *bs)
{
    if (!bs->drv->co_get_allocated_size) {
        return -ENOTSUP;
    }
    return bs->drv->co_get_allocated_size(bs);
}

/* The image file; an external data file is shown apart by co_get_info
 * (as qemu-img info does). */
static int64_t coroutine_fn qcow2_co_get_allocated_size(BlockDriverState *bs)
{
    return allocated_of(bs->file->bs);
}

/* ---- creation ---- */

/*
 * A new version 3 image: 64 KiB clusters, 16-bit refcounts.  Cluster 0
 * header (+ backing format and feature name extensions, backing name),
 * 1 refcount table, 2 refcount block, 3.. L1 table.
 */
static int coroutine_fn qcow2_co_create(BdrvChild *file, int64_t size,
                                        const char *backing_file,
                                        const char *backing_format,
                                        GError **errp)
{
    const int64_t cs = 64 * KiB;
    const unsigned bits = 16;
    uint64_t l1_size, l1_clusters, nclusters, pos, i;
    size_t blen = backing_file ? strlen(backing_file) : 0;
    uint8_t *buf;
    int ret;

    if (size < 0 || size % 512) {
        return set_error(errp, EINVAL,
                         "cannot create a qcow2 image of %" PRId64
                         " bytes: the size must be a multiple of 512",
                         size);
    }
    if (blen > QCOW2_MAX_BACKING_NAME) {
        return set_error(errp, ENAMETOOLONG,
                         "backing file name is too long (%zu bytes)", blen);
    }
    l1_size = DIV_ROUND_UP((uint64_t)size, (uint64_t)cs * (cs / 8));
    if (l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        return set_error(errp, EFBIG,
                         "cannot create a qcow2 image of %" PRId64
                         " bytes: too large",
                         size);
    }
    l1_clusters = DIV_ROUND_UP(l1_size * 8, (uint64_t)cs);
    nclusters = 3 + l1_clusters;
    buf = bdrv_blockalign(file->bs, nclusters * cs);
    memset(buf, 0, nclusters * cs);

    qcow2_put_be32(buf + QCOW2_HDR_MAGIC, QCOW2_MAGIC);
    qcow2_put_be32(buf + QCOW2_HDR_VERSION, 3);
    qcow2_put_be32(buf + QCOW2_HDR_CLUSTER_BITS, bits);
    qcow2_put_be64(buf + QCOW2_HDR_SIZE, size);
    qcow2_put_be32(buf + QCOW2_HDR_L1_SIZE, l1_size);
    qcow2_put_be64(buf + QCOW2_HDR_L1_OFFSET, 3 * cs);
    qcow2_put_be64(buf + QCOW2_HDR_REFTABLE_OFFSET, cs);
    qcow2_put_be32(buf + QCOW2_HDR_REFTABLE_CLUSTERS, 1);
    qcow2_put_be32(buf + QCOW2_HDR_REFCOUNT_ORDER, 4);
    qcow2_put_be32(buf + QCOW2_HDR_HEADER_LENGTH, 112);

    pos = 112;
    if (backing_format && *backing_format) {
        size_t flen = strlen(backing_format);

        if (flen > 64) {
            bdrv_vfree(buf);
            return set_error(errp, EINVAL, "backing format name too long");
        }
        qcow2_put_be32(buf + pos, QCOW2_EXT_BACKING_FORMAT);
        qcow2_put_be32(buf + pos + 4, flen);
        memcpy(buf + pos + 8, backing_format, flen);
        pos += 8 + ALIGN_UP(flen, 8);
    }
    qcow2_put_be32(buf + pos, QCOW2_EXT_FEATURE_TABLE);
    qcow2_put_be32(buf + pos + 4, ARRAY_SIZE(qcow2_known_features) * 48);
    pos += 8;
    for (i = 0; i < ARRAY_SIZE(qcow2_known_features); i++) {
        buf[pos] = qcow2_known_features[i].type;
        buf[pos + 1] = qcow2_known_features[i].bit;
        strncpy((char *)buf + pos + 2, qcow2_known_features[i].name, 46);
        pos += 48;
    }
    pos += 8; /* end of extensions */
    if (blen) {
        qcow2_put_be64(buf + QCOW2_HDR_BACKING_OFFSET, pos);
        qcow2_put_be32(buf + QCOW2_HDR_BACKING_SIZE, blen);
        memcpy(buf + pos, backing_file, blen);
    }

    qcow2_put_be64(buf + cs, 2 * cs); /* refcount table: one block */
    for (i = 0; i < nclusters; i++) {
        qcow2_put_be16(buf + 2 * cs + i * 2, 1);
    }
    ret = bdrv_co_pwrite(file, 0, nclusters * cs, buf, 0);
    bdrv_vfree(buf);
    if (ret == 0) {
        ret = bdrv_co_flush(file->bs);
    }
    if (ret < 0) {
        return set_error(errp, -ret, "cannot write the new image '%s': %s",
                         bdrv_name(file->bs), g_strerror(-ret));
    }
    return 0;
}

const BlockDriver bdrv_qcow2 = {
    .name = "qcow2",
    .description = "QEMU copy-on-write images, versions 2 and 3",
    .instance_size = sizeof(Qcow2State),
    .is_format = true,
    .supports_backing = true,
    .options = qcow2_options,
    .probe = qcow2_probe,
    .co_open = qcow2_co_open,
    .co_close = qcow2_co_close,
    .refresh_limits = qcow2_refresh_limits,
    .co_getlength = qcow2_co_getlength,
    .co_preadv = qcow2_co_preadv,
    .co_pwritev = qcow2_co_pwritev,
    .co_flush = qcow2_co_flush,
    .co_pwrite_zeroes = qcow2_co_pwrite_zeroes,
    .co_pdiscard = qcow2_co_pdiscard,
    .co_truncate = qcow2_co_truncate,
    .co_block_status = qcow2_co_block_status,
    .co_get_info = qcow2_co_get_info,
    .co_get_allocated_size = qcow2_co_get_allocated_size,
    .co_create = qcow2_co_create,
};
