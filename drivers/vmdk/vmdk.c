/*
 * vmdk.c: the VMware disk format driver -- probing, the descriptor, the
 * extents and the parent disk, and request dispatch.
 *
 * The image named in the config is either a sparse extent with its
 * descriptor embedded (monolithicSparse, streamOptimized), a bare COWD
 * extent, or a descriptor file listing extents (monolithicFlat,
 * twoGbMaxExtent*, vmfs, vmfsSparse, custom layouts).  Every extent keeps
 * its place and its access mode: RDONLY ranges refuse writes with EROFS,
 * NOACCESS ranges fail with EIO, ZERO ranges read zeros and refuse
 * writes.  (QEMU drops non-RW and ZERO extents and so shifts the disk;
 * imgfs does not.)
 *
 * A delta disk names its parent with parentFileNameHint; the parent is
 * opened as the backing node and its CID must equal our parentCID, or
 * the open fails naming both files.  The first write of a session gives
 * the disk a new CID (so children made from it see that it changed) and
 * sets the unclean-shutdown flag of its sparse extents until close.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "blockcore/log.h"
#include "vmdk.h"

#define VMDK_DESC_MAX (1 * MiB)
#define VMDK_NO_PARENT 0xffffffffu

static const char *const vmdk_create_types[] = {
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsSparse",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "vmfsRaw",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
    "fullDevice",
    "partitionedDevice",
    "custom",
    NULL,
};

/* ---- probing ------------------------------------------------------ */

static uint32_t vmdk_ld32(const uint8_t *p)
{
    uint32_t v;

    memcpy(&v, p, 4);
    return le32toh(v);
}

/* Does @buf start like a descriptor: blank and comment lines, then
 * "version=N"? */
static bool vmdk_looks_like_descriptor(const uint8_t *buf, size_t len)
{
    const char *p = (const char *)buf, *end = p + len;

    while (p < end) {
        const char *eol = memchr(p, '\n', end - p);
        const char *q = p;

        if (!eol) {
            eol = end;
        }
        while (q < eol && (*q == ' ' || *q == '\t' || *q == '\r')) {
            q++;
        }
        if (q == eol || *q == '#') {
            p = eol + 1;
            continue;
        }
        return eol - q >= 9 && !strncmp(q, "version=", 8) && q[8] >= '1' &&
               q[8] <= '3';
    }
    return false;
}

static int vmdk_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    if (len >= 4 && (vmdk_ld32(buf) == VMDK_MAGIC_KDMV ||
                     vmdk_ld32(buf) == VMDK_MAGIC_COWD)) {
        return 100;
    }
    return vmdk_looks_like_descriptor(buf, len) ? 100 : 0;
}

/* ---- descriptor ----------------------------------------------------- */

typedef struct VmdkDescExtent {
    VmdkAccess access;
    int64_t sectors;
    char *type;
    char *fname;
    int64_t offset;
    int line;
} VmdkDescExtent;

typedef struct VmdkDesc {
    int version;
    bool has_cid;
    uint32_t cid;
    uint32_t parent_cid;
    char *create_type;
    char *parent_hint;
    GArray *extents; /* VmdkDescExtent */
} VmdkDesc;

static void vmdk_desc_clear(VmdkDesc *d)
{
    guint i;

    if (d->extents) {
        for (i = 0; i < d->extents->len; i++) {
            VmdkDescExtent *x = &g_array_index(d->extents, VmdkDescExtent, i);

            g_free(x->type);
            g_free(x->fname);
        }
        g_array_free(d->extents, true);
    }
    g_free(d->create_type);
    g_free(d->parent_hint);
    memset(d, 0, sizeof(*d));
}

static bool vmdk_parse_u64(const char *s, int base, uint64_t *out)
{
    char *end;

    if (!*s || *s == '-' || *s == '+') {
        return false;
    }
    errno = 0;
    *out = strtoull(s, &end, base);
    return errno == 0 && *end == '\0';
}

/* An extent line: ACCESS SECTORS TYPE ["FILE" [OFFSET]]. */
static bool vmdk_parse_extent_line(char *line, VmdkDescExtent *x)
{
    char *p = line, *word, *end;
    uint64_t v;

    word = p;
    while (*p && *p != ' ' && *p != '\t') {
        p++;
    }
    if (*p) {
        *p++ = '\0';
    }
    if (!strcmp(word, "RW")) {
        x->access = VMDK_ACCESS_RW;
    } else if (!strcmp(word, "RDONLY")) {
        x->access = VMDK_ACCESS_RDONLY;
    } else if (!strcmp(word, "NOACCESS")) {
        x->access = VMDK_ACCESS_NOACCESS;
    } else {
        return false;
    }
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    word = p;
    while (*p && *p != ' ' && *p != '\t') {
        p++;
    }
    if (*p) {
        *p++ = '\0';
    }
    if (!vmdk_parse_u64(word, 10, &v) || v == 0 || v > (UINT64_C(1) << 47)) {
        return false;
    }
    x->sectors = v;
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    word = p;
    while (*p && *p != ' ' && *p != '\t') {
        p++;
    }
    if (*p) {
        *p++ = '\0';
    }
    if (!*word) {
        return false;
    }
    x->type = g_strdup(word);
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    if (*p == '"') {
        end = strchr(p + 1, '"');
        if (!end || end == p + 1) {
            return false;
        }
        x->fname = g_strndup(p + 1, end - p - 1);
        p = end + 1;
        while (*p == ' ' || *p == '\t') {
            p++;
        }
        if (*p) {
            if (!vmdk_parse_u64(p, 10, &v) || v > (UINT64_C(1) << 47)) {
                return false;
            }
            x->offset = v;
        }
    } else if (*p) {
        return false;
    }
    return true;
}

/* Parse descriptor @text of @name; errors name the file and the line. */
static int vmdk_parse_desc(const char *text, const char *name, VmdkDesc *d,
                           GError **errp)
{
    g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
    bool have_version = false;
    int i;

    memset(d, 0, sizeof(*d));
    d->parent_cid = VMDK_NO_PARENT;
    d->extents = g_array_new(false, true, sizeof(VmdkDescExtent));
    for (i = 0; lines[i]; i++) {
        char *l = g_strstrip(lines[i]);
        char *eq, *key, *val;

        if (!*l || *l == '#') {
            continue;
        }
        eq = strchr(l, '=');
        if (!eq &&
            (g_str_has_prefix(l, "RW") || g_str_has_prefix(l, "RDONLY") ||
             g_str_has_prefix(l, "NOACCESS"))) {
            VmdkDescExtent x = {.line = i + 1};
            g_autofree char *copy = g_strdup(l);

            if (!vmdk_parse_extent_line(l, &x)) {
                g_free(x.type);
                g_free(x.fname);
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                            "%s: descriptor line %d is not a valid extent "
                            "line: %s",
                            name, i + 1, copy);
                return -EINVAL;
            }
            g_array_append_val(d->extents, x);
            continue;
        }
        if (!eq) {
            continue; /* tolerated, like VMware does */
        }
        *eq = '\0';
        key = g_strstrip(l);
        val = g_strstrip(eq + 1);
        if (val[0] == '"' && strlen(val) >= 2 && val[strlen(val) - 1] == '"') {
            val[strlen(val) - 1] = '\0';
            val++;
        }
        if (!strcmp(key, "version")) {
            uint64_t v;

            if (!vmdk_parse_u64(val, 10, &v) || v < 1 || v > 3) {
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                            "%s: unsupported descriptor version '%s'", name,
                            val);
                return -EINVAL;
            }
            d->version = v;
            have_version = true;
        } else if (!strcmp(key, "CID") || !strcmp(key, "parentCID")) {
            uint64_t v;

            if (!vmdk_parse_u64(val, 16, &v) || v > UINT32_MAX) {
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                            "%s: descriptor line %d: bad %s '%s'", name, i + 1,
                            key, val);
                return -EINVAL;
            }
            if (key[0] == 'C') {
                d->cid = v;
                d->has_cid = true;
            } else {
                d->parent_cid = v;
            }
        } else if (!strcmp(key, "createType")) {
            g_free(d->create_type);
            d->create_type = g_strdup(val);
        } else if (!strcmp(key, "parentFileNameHint")) {
            g_free(d->parent_hint);
            d->parent_hint = *val ? g_strdup(val) : NULL;
        }
    }
    if (!have_version) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: descriptor has no version line", name);
        return -EINVAL;
    }
    if (!d->create_type) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: descriptor has no createType", name);
        return -EINVAL;
    }
    if (!strcmp(d->create_type, "seSparse")) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: the seSparse subformat (ESXi 6.5+ snapshots) is not "
                    "supported",
                    name);
        return -ENOTSUP;
    }
    if (!g_strv_contains(vmdk_create_types, d->create_type)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: unsupported createType '%s'", name, d->create_type);
        return -ENOTSUP;
    }
    return 0;
}

/* ---- opening -------------------------------------------------------- */

static const char *vmdk_access_name(VmdkAccess a)
{
    return a == VMDK_ACCESS_RW       ? "RW"
           : a == VMDK_ACCESS_RDONLY ? "RDONLY"
                                     : "NOACCESS";
}

static bool vmdk_is_flat_type(const char *t)
{
    return !strcmp(t, "FLAT") || !strcmp(t, "VMFS") || !strcmp(t, "VMFSRAW") ||
           !strcmp(t, "VMFSRDM");
}

/* Open the sparse extent @e (file open, first sector in @hdr). */
static int coroutine_fn vmdk_co_open_sparse(BlockDriverState *bs, VmdkExtent *e,
                                            const uint8_t *hdr, size_t hlen,
                                            GError **errp)
{
    uint32_t magic = hlen >= 4 ? vmdk_ld32(hdr) : 0;

    if (magic == VMDK_MAGIC_KDMV && hlen >= VMDK_SECTOR) {
        e->kind = VMDK_KIND_SPARSE;
        return vmdk_sparse_co_open(bs, e, hdr, !bs->read_only, errp);
    }
    if (magic == VMDK_MAGIC_COWD && hlen >= VMDK_SECTOR) {
        e->kind = VMDK_KIND_COWD;
        return vmdk_cowd_co_open(bs, e, hdr, errp);
    }
    if (hlen >= 8 && vmdk_ld32(hdr) == 0xcafebabeu && vmdk_ld32(hdr + 4) == 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: seSparse extents (ESXi 6.5+ snapshots) are not "
                    "supported",
                    bdrv_name(e->file->bs));
        return -ENOTSUP;
    }
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "%s: not a sparse VMDK extent (no KDMV or COWD header)",
                bdrv_name(e->file->bs));
    return -EINVAL;
}

/* Open extent @e from descriptor line @x. */
static int coroutine_fn vmdk_co_open_extent(BlockDriverState *bs, VmdkExtent *e,
                                            VmdkDescExtent *x,
                                            const char *desc_name,
                                            GError **errp)
{
    g_autofree char *path = NULL;
    uint8_t hdr[VMDK_SECTOR];
    GError *local_err = NULL;
    g_autofree char *child = g_strdup_printf("extent%d", e->index);
    bool flat = vmdk_is_flat_type(x->type);
    bool sparse = !strcmp(x->type, "SPARSE") || !strcmp(x->type, "VMFSSPARSE");
    int64_t len, hlen;
    int flags;
    int ret;

    e->access = x->access;
    e->type = g_strdup(x->type);
    e->fname = g_strdup(x->fname);
    e->bytes = x->sectors * VMDK_SECTOR;
    e->flat_offset = x->offset * VMDK_SECTOR;

    if (!strcmp(x->type, "ZERO")) {
        e->kind = VMDK_KIND_ZERO;
        return 0;
    }
    if (!strcmp(x->type, "SESPARSE")) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: extent %d (%s) is a seSparse extent (ESXi 6.5+ "
                    "snapshots), which is not supported",
                    desc_name, e->index, x->fname ? x->fname : "");
        return -ENOTSUP;
    }
    if (!flat && !sparse) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: descriptor line %d: unsupported extent type '%s'",
                    desc_name, x->line, x->type);
        return -ENOTSUP;
    }
    if (!x->fname) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: descriptor line %d: %s extent without a file name",
                    desc_name, x->line, x->type);
        return -EINVAL;
    }
    e->kind = flat ? VMDK_KIND_FLAT : VMDK_KIND_SPARSE;
    if (e->access == VMDK_ACCESS_NOACCESS) {
        return 0; /* never touched: the file need not even exist */
    }

    path = bdrv_resolve_relative(bs, x->fname);
    flags = bs->open_flags & BDRV_O_INHERIT_MASK;
    if (e->access == VMDK_ACCESS_RW) {
        flags |= bs->open_flags & BDRV_O_RDWR;
    }
    e->file = bdrv_co_open_child(bs, child, BDRV_CHILD_EXTENT, path, "", flags,
                                 &local_err);
    if (!e->file) {
        g_set_error(errp, G_FILE_ERROR, local_err->code, "%s: extent %d: %s",
                    desc_name, e->index, local_err->message);
        g_error_free(local_err);
        return -ENOENT;
    }
    e->own_file = true;
    len = bdrv_getlength(e->file->bs);

    if (flat) {
        if (len < e->flat_offset + e->bytes) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: flat extent is %" PRId64 " bytes, shorter than "
                        "the %" PRId64 " bytes (at offset %" PRId64
                        ") the descriptor gives it",
                        bdrv_name(e->file->bs), len, e->bytes, e->flat_offset);
            return -EINVAL;
        }
        return 0;
    }
    if (x->offset) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: descriptor line %d: a %s extent takes no offset",
                    desc_name, x->line, x->type);
        return -EINVAL;
    }
    hlen = len < VMDK_SECTOR ? len : VMDK_SECTOR;
    memset(hdr, 0, sizeof(hdr));
    ret = hlen > 0 ? bdrv_co_pread(e->file, 0, hlen, hdr, 0) : 0;
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "%s: cannot read the header: %s", bdrv_name(e->file->bs),
                    g_strerror(-ret));
        return ret;
    }
    return vmdk_co_open_sparse(bs, e, hdr, hlen, errp);
}

/* Read the text of a descriptor: @len bytes at @off, up to a NUL. */
static int coroutine_fn vmdk_co_read_text(BlockDriverState *bs, int64_t off,
                                          int64_t len, char **out,
                                          GError **errp)
{
    char *buf;
    int ret;

    if (len > VMDK_DESC_MAX) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: descriptor of %" PRId64 " bytes is larger than %d",
                    bdrv_name(bs), len, (int)VMDK_DESC_MAX);
        return -EFBIG;
    }
    buf = g_malloc0(len + 1);
    ret = len ? bdrv_co_pread(bs->file, off, len, buf, 0) : 0;
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "%s: cannot read the descriptor: %s", bdrv_name(bs),
                    g_strerror(-ret));
        g_free(buf);
        return ret;
    }
    *out = buf;
    return 0;
}

/* Free everything the open allocated (the children are blockcore's). */
static void vmdk_free_state(VmdkState *s)
{
    int i;

    g_clear_pointer(&s->create_type, g_free);
    g_clear_pointer(&s->parent_hint, g_free);
    g_clear_pointer(&s->desc_text, g_free);

    for (i = 0; i < s->n_extents; i++) {
        VmdkExtent *e = &s->extents[i];

        vmdk_sparse_free(e->sp);
        g_free(e->type);
        g_free(e->fname);
    }
    g_free(s->extents);
    s->extents = NULL;
    s->n_extents = 0;
}

/* The parent of a delta disk: open it and compare CIDs. */
static int coroutine_fn vmdk_co_open_parent(BlockDriverState *bs, GError **errp)
{
    VmdkState *s = bs->opaque;
    BlockDriverState *pbs;
    VmdkState *ps;
    int ret;

    if (!s->parent_hint) {
        if (s->parent_cid != VMDK_NO_PARENT) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: delta disk (parentCID=%08" PRIx32
                        ") without a parentFileNameHint",
                        bdrv_name(bs), s->parent_cid);
            return -EINVAL;
        }
        return 0;
    }
    g_free(bs->backing_file);
    g_free(bs->backing_format);
    bs->backing_file = g_strdup(s->parent_hint);
    bs->backing_format = g_strdup("vmdk");
    ret = bdrv_co_open_backing(bs, errp);
    if (ret < 0) {
        return ret;
    }
    pbs = bs->backing->bs;
    ps = pbs->opaque;
    if (s->parent_cid != VMDK_NO_PARENT && ps->cid != s->parent_cid) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s expects its parent to have CID %08" PRIx32
                    ", but the parent %s has CID %08" PRIx32
                    ": the parent changed after the delta disk was made",
                    bdrv_name(bs), s->parent_cid, bdrv_name(pbs), ps->cid);
        return -EINVAL;
    }
    return 0;
}

static void vmdk_take_desc(VmdkState *s, VmdkDesc *d)
{
    s->desc_version = d->version;
    s->cid = d->cid;
    s->parent_cid = d->parent_cid;
    s->create_type = d->create_type;
    d->create_type = NULL;
    s->parent_hint = d->parent_hint;
    d->parent_hint = NULL;
}

static int coroutine_fn vmdk_co_open(BlockDriverState *bs, GHashTable *opts,
                                     int flags, GError **errp)
{
    VmdkState *s = bs->opaque;
    int64_t len = bdrv_getlength(bs->file->bs);
    uint8_t hdr[VMDK_SECTOR];
    VmdkDesc d = {0};
    GError *local_err = NULL;
    uint32_t magic;
    int64_t total = 0;
    int ret, i;

    (void)opts;
    (void)flags;
    co_mutex_init(&s->dirty_lock);
    s->parent_cid = VMDK_NO_PARENT;
    memset(hdr, 0, sizeof(hdr));
    if (len < 4) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: file is too small to be a VMDK image", bdrv_name(bs));
        return -EINVAL;
    }
    ret = bdrv_co_pread(bs->file, 0, len < VMDK_SECTOR ? len : VMDK_SECTOR, hdr,
                        0);
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "%s: cannot read the header: %s", bdrv_name(bs),
                    g_strerror(-ret));
        return ret;
    }
    magic = vmdk_ld32(hdr);

    if (magic == VMDK_MAGIC_KDMV || magic == VMDK_MAGIC_COWD) {
        /* One sparse extent, the image file itself. */
        VmdkExtent *e;
        uint64_t doff = 0, dsize = 0;

        if (magic == VMDK_MAGIC_KDMV && len >= VMDK_SECTOR) {
            memcpy(&doff, hdr + 28, 8);
            memcpy(&dsize, hdr + 36, 8);
            doff = le64toh(doff);
            dsize = le64toh(dsize);
        }
        if (doff && dsize) {
            if (doff > (uint64_t)len / VMDK_SECTOR ||
                dsize > (uint64_t)VMDK_DESC_MAX / VMDK_SECTOR ||
                (doff + dsize) * VMDK_SECTOR > (uint64_t)len) {
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                            "%s: embedded descriptor (sector %" PRIu64
                            ", %" PRIu64 " sectors) is outside the file",
                            bdrv_name(bs), doff, dsize);
                return -EINVAL;
            }
            s->desc_offset = doff * VMDK_SECTOR;
            s->desc_max = dsize * VMDK_SECTOR;
            ret = vmdk_co_read_text(bs, s->desc_offset, s->desc_max,
                                    &s->desc_text, errp);
            if (ret < 0) {
                return ret;
            }
            ret = vmdk_parse_desc(s->desc_text, bdrv_name(bs), &d, errp);
            if (ret < 0) {
                goto fail;
            }
            vmdk_take_desc(s, &d);
            s->has_desc = d.has_cid;
            s->desc_embedded = true;
        }
        s->n_extents = 1;
        s->extents = g_new0(VmdkExtent, 1);
        e = &s->extents[0];
        e->file = bs->file;
        e->bytes = -1;
        e->access = VMDK_ACCESS_RW;
        e->type = g_strdup(magic == VMDK_MAGIC_COWD ? "VMFSSPARSE" : "SPARSE");
        if (d.extents && d.extents->len == 1) {
            VmdkDescExtent *x = &g_array_index(d.extents, VmdkDescExtent, 0);

            e->access = x->access;
            e->fname = g_strdup(x->fname);
        }
        if (e->access == VMDK_ACCESS_NOACCESS) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: its only extent is NOACCESS", bdrv_name(bs));
            ret = -EINVAL;
            goto fail;
        }
        if (len < VMDK_SECTOR) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: truncated header", bdrv_name(bs));
            ret = -EINVAL;
            goto fail;
        }
        ret = vmdk_co_open_sparse(bs, e, hdr, VMDK_SECTOR, errp);
        if (ret < 0) {
            goto fail;
        }
        if (!s->create_type) {
            s->create_type = g_strdup(magic == VMDK_MAGIC_COWD ? "vmfsSparse"
                                      : e->sp->compressed ? "streamOptimized"
                                                          : "monolithicSparse");
        }
    } else {
        ret = vmdk_co_read_text(bs, 0, len, &s->desc_text, errp);
        if (ret < 0) {
            return ret;
        }
        if (!vmdk_looks_like_descriptor((uint8_t *)s->desc_text,
                                        strlen(s->desc_text))) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: not a VMDK image (no sparse header and no "
                        "descriptor)",
                        bdrv_name(bs));
            ret = -EINVAL;
            goto fail;
        }
        ret = vmdk_parse_desc(s->desc_text, bdrv_name(bs), &d, errp);
        if (ret < 0) {
            goto fail;
        }
        vmdk_take_desc(s, &d);
        s->has_desc = d.has_cid;
        s->desc_max = VMDK_DESC_MAX;
        if (d.extents->len == 0) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: descriptor lists no extents", bdrv_name(bs));
            ret = -EINVAL;
            goto fail;
        }
        s->extents = g_new0(VmdkExtent, d.extents->len);
        for (i = 0; i < (int)d.extents->len; i++) {
            VmdkExtent *e = &s->extents[i];

            s->n_extents = i + 1;
            e->index = i;
            ret = vmdk_co_open_extent(
                bs, e, &g_array_index(d.extents, VmdkDescExtent, i),
                bdrv_name(bs), &local_err);
            if (ret < 0) {
                /* Errors about an extent file also name the descriptor. */
                if (!strstr(local_err->message, bdrv_name(bs))) {
                    g_prefix_error(&local_err, "%s: extent %d: ", bdrv_name(bs),
                                   i);
                }
                g_propagate_error(errp, local_err);
                goto fail;
            }
        }
    }

    for (i = 0; i < s->n_extents; i++) {
        /* Each extent is at most 2^56 bytes, but a descriptor may list
         * any number of them. */
        if (s->extents[i].bytes > VMDK_MAX_BYTES - total) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "%s: extents add up to more than %" PRId64 " bytes",
                        bdrv_name(bs), VMDK_MAX_BYTES);
            ret = -EFBIG;
            goto fail;
        }
        s->extents[i].start = total;
        total += s->extents[i].bytes;
    }
    bs->total_bytes = total;
    vmdk_desc_clear(&d);

    ret = vmdk_co_open_parent(bs, errp);
    if (ret < 0) {
        vmdk_free_state(s);
        return ret;
    }
    return 0;

fail:
    vmdk_desc_clear(&d);
    vmdk_free_state(s);
    return ret;
}

/* Write back the grain tables of the sparse extents; blockcore flushes
 * the extent files afterwards. */
static int coroutine_fn vmdk_co_flush(BlockDriverState *bs)
{
    VmdkState *s = bs->opaque;
    int ret = 0, i;

    for (i = 0; i < s->n_extents; i++) {
        VmdkExtent *e = &s->extents[i];

        if (e->sp && e->file) {
            int r = vmdk_sparse_co_flush(bs, e);

            if (ret == 0) {
                ret = r;
            }
        }
    }
    return ret;
}

static void coroutine_fn vmdk_co_close(BlockDriverState *bs)
{
    VmdkState *s = bs->opaque;
    int i;

    for (i = 0; i < s->n_extents; i++) {
        VmdkExtent *e = &s->extents[i];

        if (e->sp && e->sp->marked_unclean) {
            int ret = vmdk_sparse_co_set_unclean(bs, e, false);

            if (ret < 0) {
                log_error("%s: cannot clear the unclean-shutdown flag: %s",
                          bdrv_name(e->file->bs), strerror(-ret));
            }
        }
    }
    vmdk_free_state(s);
}

static void vmdk_refresh_limits(BlockDriverState *bs, BlockLimits *bl)
{
    (void)bs;
    bl->request_alignment = VMDK_SECTOR;
}

/* ---- requests ------------------------------------------------------- */

/* Index of the extent holding virtual offset @off (< total_bytes). */
static int vmdk_find_extent(VmdkState *s, int64_t off)
{
    int lo = 0, hi = s->n_extents - 1;

    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;

        if (s->extents[mid].start <= off) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

int coroutine_fn vmdk_co_read_parent(BlockDriverState *bs, int64_t voff,
                                     int64_t bytes, IOVector *qiov, size_t qoff)
{
    int64_t plen, n;
    int ret;

    if (!bs->backing) {
        iov_memset(qiov, qoff, 0, bytes);
        return 0;
    }
    plen = bdrv_getlength(bs->backing->bs);
    n = voff >= plen ? 0 : (plen - voff < bytes ? plen - voff : bytes);
    if (n > 0) {
        ret = bdrv_co_preadv(bs->backing, voff, n, qiov, qoff, 0);
        if (ret < 0) {
            return ret;
        }
    }
    if (n < bytes) {
        iov_memset(qiov, qoff + n, 0, bytes - n);
    }
    return 0;
}

static int coroutine_fn vmdk_co_preadv(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, IOVector *qiov,
                                       size_t qoff, BdrvRequestFlags flags)
{
    VmdkState *s = bs->opaque;
    int i = vmdk_find_extent(s, offset);
    int ret = 0;

    (void)flags;
    while (bytes > 0 && ret == 0) {
        VmdkExtent *e = &s->extents[i++];
        int64_t rel = offset - e->start;
        int64_t n = e->bytes - rel < bytes ? e->bytes - rel : bytes;

        if (e->access == VMDK_ACCESS_NOACCESS) {
            return -EIO;
        }
        switch (e->kind) {
        case VMDK_KIND_ZERO:
            iov_memset(qiov, qoff, 0, n);
            break;
        case VMDK_KIND_FLAT:
            ret =
                bdrv_co_preadv(e->file, e->flat_offset + rel, n, qiov, qoff, 0);
            break;
        case VMDK_KIND_SPARSE:
        case VMDK_KIND_COWD:
            ret = vmdk_sparse_co_preadv(bs, e, rel, n, qiov, qoff);
            break;
        }
        offset += n;
        qoff += n;
        bytes -= n;
    }
    return ret;
}

/* Replace the CID in the descriptor text with @cid. */
static char *vmdk_desc_with_cid(const char *text, uint32_t cid)
{
    g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
    int i;

    for (i = 0; lines[i]; i++) {
        const char *p = lines[i];

        while (*p == ' ' || *p == '\t') {
            p++;
        }
        if (g_str_has_prefix(p, "CID") &&
            (p[3] == '=' || p[3] == ' ' || p[3] == '\t')) {
            bool cr = g_str_has_suffix(p, "\r");

            g_free(lines[i]);
            lines[i] =
                g_strdup_printf("CID=%08" PRIx32 "%s", cid, cr ? "\r" : "");
            break;
        }
    }
    return g_strjoinv("\n", lines);
}

/* Write the descriptor with a new CID. */
static int coroutine_fn vmdk_co_update_cid(BlockDriverState *bs)
{
    VmdkState *s = bs->opaque;
    uint32_t cid;
    g_autofree char *text = NULL;
    int64_t old_len = strlen(s->desc_text), new_len, wlen;
    char *buf;
    int ret;

    do {
        cid = g_random_int();
    } while (cid == s->cid || cid == VMDK_NO_PARENT);
    text = vmdk_desc_with_cid(s->desc_text, cid);
    new_len = strlen(text);
    wlen = new_len > old_len ? new_len : old_len;
    if (s->desc_embedded) {
        wlen = ALIGN_UP(wlen, VMDK_SECTOR);
    }
    if (wlen > s->desc_max) {
        log_warning("%s: no room to update the descriptor's CID",
                    bdrv_name(bs));
        return 0;
    }
    buf = g_malloc0(wlen);
    memcpy(buf, text, new_len);
    ret = bdrv_co_pwrite(bs->file, s->desc_offset, wlen, buf, 0);
    g_free(buf);
    if (ret == 0 && !s->desc_embedded && new_len < old_len) {
        ret = bdrv_co_truncate(bs->file, new_len, true, PREALLOC_OFF, NULL);
    }
    if (ret == 0) {
        g_free(s->desc_text);
        s->desc_text = g_steal_pointer(&text);
        s->cid = cid;
    }
    return ret;
}

/*
 * Before the first write: set the unclean-shutdown flag of the sparse
 * extents and give the disk a new CID, durably, so that a crash leaves
 * a disk marked as changed and not cleanly closed.
 */
static int coroutine_fn vmdk_co_mark_dirty(BlockDriverState *bs)
{
    VmdkState *s = bs->opaque;
    int ret = 0, i;

    co_mutex_lock(&s->dirty_lock);
    if (s->dirty) {
        goto out;
    }
    for (i = 0; i < s->n_extents && ret == 0; i++) {
        VmdkExtent *e = &s->extents[i];

        if (e->kind == VMDK_KIND_SPARSE && e->access == VMDK_ACCESS_RW &&
            !e->sp->ro_reason && !e->sp->unclean) {
            ret = vmdk_sparse_co_set_unclean(bs, e, true);
            e->sp->marked_unclean = ret == 0;
        }
    }
    if (ret == 0 && s->has_desc) {
        ret = vmdk_co_update_cid(bs);
        if (ret == 0) {
            ret = bdrv_co_flush(bs->file->bs);
        }
    }
    if (ret == 0) {
        s->dirty = true;
    }
out:
    co_mutex_unlock(&s->dirty_lock);
    return ret;
}

/* May [@offset, @offset + @bytes) be written?  0 or -errno. */
static int vmdk_check_writable(BlockDriverState *bs, int64_t offset,
                               int64_t bytes)
{
    VmdkState *s = bs->opaque;
    int i = vmdk_find_extent(s, offset);

    for (; i < s->n_extents && s->extents[i].start < offset + bytes; i++) {
        VmdkExtent *e = &s->extents[i];
        const char *why = NULL;
        int err = -EROFS;

        if (e->access == VMDK_ACCESS_NOACCESS) {
            return -EIO;
        }
        if (e->access == VMDK_ACCESS_RDONLY) {
            why = "it is RDONLY";
        } else if (e->kind == VMDK_KIND_ZERO) {
            why = "it is a ZERO extent";
        } else if (e->sp && e->sp->ro_reason) {
            why = e->sp->ro_reason;
        }
        if (why) {
            if (!e->ro_logged) {
                e->ro_logged = true;
                log_info("%s: writes to extent %d (%s) fail with EROFS: %s",
                         bdrv_name(bs), i, e->fname ? e->fname : e->type, why);
            }
            return err;
        }
    }
    return 0;
}

static int coroutine_fn vmdk_co_pwritev(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes, IOVector *qiov,
                                        size_t qoff, BdrvRequestFlags flags)
{
    VmdkState *s = bs->opaque;
    int i;
    int ret;

    (void)flags;
    ret = vmdk_check_writable(bs, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (unlikely(!s->dirty)) {
        ret = vmdk_co_mark_dirty(bs);
        if (ret < 0) {
            return ret;
        }
    }
    i = vmdk_find_extent(s, offset);
    while (bytes > 0 && ret == 0) {
        VmdkExtent *e = &s->extents[i++];
        int64_t rel = offset - e->start;
        int64_t n = e->bytes - rel < bytes ? e->bytes - rel : bytes;

        if (e->kind == VMDK_KIND_FLAT) {
            ret = bdrv_co_pwritev(e->file, e->flat_offset + rel, n, qiov, qoff,
                                  0);
        } else {
            ret = vmdk_sparse_co_pwritev(bs, e, rel, n, qiov, qoff);
        }
        offset += n;
        qoff += n;
        bytes -= n;
    }
    return ret;
}

static int coroutine_fn vmdk_co_block_status(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             int64_t *pnum, int64_t *map,
                                             BlockDriverState **file)
{
    VmdkState *s = bs->opaque;
    VmdkExtent *e = &s->extents[vmdk_find_extent(s, offset)];
    int64_t rel = offset - e->start;
    int64_t n = e->bytes - rel < bytes ? e->bytes - rel : bytes;
    uint64_t host = 0;
    int st;

    *pnum = n;
    switch (e->kind) {
    case VMDK_KIND_ZERO:
        return BDRV_BLOCK_ZERO;
    case VMDK_KIND_FLAT:
        if (!e->file) {
            return BDRV_BLOCK_DATA;
        }
        *map = e->flat_offset + rel;
        *file = e->file->bs;
        return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID;
    case VMDK_KIND_SPARSE:
    case VMDK_KIND_COWD:
        break;
    }
    if (!e->file) {
        return BDRV_BLOCK_DATA;
    }
    {
        int64_t in = rel % e->sp->grain_bytes;

        if ((int64_t)e->sp->grain_bytes - in < n) {
            *pnum = e->sp->grain_bytes - in;
        }
    }
    st = vmdk_sparse_co_lookup(bs, e, rel, &host);
    if (st < 0) {
        return st;
    }
    if (st == VMDK_GRAIN_UNALLOCATED) {
        return 0;
    }
    if (st == VMDK_GRAIN_ZERO) {
        return BDRV_BLOCK_ZERO;
    }
    if (e->sp->compressed) {
        return BDRV_BLOCK_DATA;
    }
    *map = host + rel % e->sp->grain_bytes;
    *file = e->file->bs;
    return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
}

/* ---- information ---------------------------------------------------- */

static const char *vmdk_kind_name(VmdkExtent *e)
{
    switch (e->kind) {
    case VMDK_KIND_FLAT:
        return "flat";
    case VMDK_KIND_ZERO:
        return "zero";
    case VMDK_KIND_SPARSE:
        return e->sp && e->sp->compressed ? "sparse (compressed)" : "sparse";
    case VMDK_KIND_COWD:
        return "COWD sparse";
    }
    return "?";
}

static void coroutine_fn vmdk_co_get_info(BlockDriverState *bs,
                                          ImageInfoSpec *spec)
{
    VmdkState *s = bs->opaque;
    int i;

    image_info_add(spec, "create-type", "%s", s->create_type);
    if (s->has_desc) {
        image_info_add(spec, "cid", "%08" PRIx32, s->cid);
        image_info_add(spec, "parent-cid", "%08" PRIx32, s->parent_cid);
    }
    if (s->parent_hint) {
        image_info_add(spec, "parent-filename-hint", "%s", s->parent_hint);
    }
    image_info_add(spec, "extents", "%d", s->n_extents);
    for (i = 0; i < s->n_extents; i++) {
        VmdkExtent *e = &s->extents[i];
        g_autofree char *k = NULL;

#define VMDK_KEY(name) (g_free(k), k = g_strdup_printf("extent.%d." name, i))
        image_info_add(spec, VMDK_KEY("type"), "%s", e->type);
        image_info_add(spec, VMDK_KEY("access"), "%s",
                       vmdk_access_name(e->access));
        image_info_add(spec, VMDK_KEY("kind"), "%s", vmdk_kind_name(e));
        image_info_add(spec, VMDK_KEY("virtual-size"), "%" PRId64, e->bytes);
        if (e->fname || e->file) {
            image_info_add(spec, VMDK_KEY("file"), "%s",
                           e->file ? bdrv_name(e->file->bs) : e->fname);
        }
        if (e->kind == VMDK_KIND_FLAT) {
            image_info_add(spec, VMDK_KEY("offset"), "%" PRId64,
                           e->flat_offset);
        }
        if (e->sp) {
            image_info_add(spec, VMDK_KEY("version"), "%" PRIu32,
                           e->sp->version);
            image_info_add(spec, VMDK_KEY("grain-size"), "%" PRIu64,
                           e->sp->grain_bytes);
            image_info_add(spec, VMDK_KEY("compressed"), "%s",
                           e->sp->compressed ? "true" : "false");
            image_info_add(spec, VMDK_KEY("redundant-gd"), "%s",
                           e->sp->rgd ? "true" : "false");
            image_info_add(spec, VMDK_KEY("unclean-shutdown"), "%s",
                           e->sp->unclean ? "true" : "false");
        }
#undef VMDK_KEY
    }
}

static int64_t coroutine_fn vmdk_co_get_allocated_size(BlockDriverState *bs)
{
    VmdkState *s = bs->opaque;
    BlockDriverState *f = bs->file->bs;
    int64_t total = 0, n;
    int i;

    if (!f->drv->co_get_allocated_size) {
        return -ENOTSUP;
    }
    n = f->drv->co_get_allocated_size(f);
    if (n < 0) {
        return n;
    }
    total += n;
    for (i = 0; i < s->n_extents; i++) {
        VmdkExtent *e = &s->extents[i];

        if (!e->own_file || !e->file) {
            continue;
        }
        f = e->file->bs;
        if (!f->drv->co_get_allocated_size) {
            return -ENOTSUP;
        }
        n = f->drv->co_get_allocated_size(f);
        if (n < 0) {
            return n;
        }
        total += n;
    }
    return total;
}

const BlockDriver bdrv_vmdk = {
    .name = "vmdk",
    .description = "VMware disks: sparse, flat, streamOptimized, vmfs, "
                   "COWD, multi-extent, delta",
    .instance_size = sizeof(VmdkState),
    .is_format = true,
    .supports_backing = true,
    .probe = vmdk_probe,
    .co_open = vmdk_co_open,
    .co_close = vmdk_co_close,
    .refresh_limits = vmdk_refresh_limits,
    .co_preadv = vmdk_co_preadv,
    .co_pwritev = vmdk_co_pwritev,
    .co_flush = vmdk_co_flush,
    .co_block_status = vmdk_co_block_status,
    .co_get_info = vmdk_co_get_info,
    .co_get_allocated_size = vmdk_co_get_allocated_size,
};
