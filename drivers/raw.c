/*
 * raw: the format driver for images that are plain bytes, optionally a
 * slice of the file (raw.offset, raw.size), e.g. one partition of a
 * whole-disk image exposed as a drive of its own.
 *
 * Probing safety: an image whose format was probed (no "format = raw"
 * in the config) could be turned into something else by the guest --
 * write a qcow2 header into sector 0 and the next probe opens it as
 * qcow2 with a backing file of the guest's choosing.  So, as QEMU does,
 * a probed raw drive refuses (EPERM) any write that would make its first
 * sector probe as another format.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "blockcore/driver.h"

#define RAW_SECTOR 512

typedef struct RawState {
    uint64_t offset;
    uint64_t size;
    bool has_size;
    bool probed;
    /* Serialises writes that touch the first sector while checking them. */
    CoMutex sector0_lock;
} RawState;

static const OptDesc raw_options[] = {
    {"offset", OPT_SIZE, NULL, "where the drive starts in the file"},
    {"size", OPT_SIZE, NULL, "length of the drive (default: to the end)"},
    {NULL},
};

/*
 * Signatures of image formats that other tools (QEMU with format probing
 * above all) recognise in a first sector, whether or not imgfs has a
 * driver for them: a guest must not be able to plant any of them.
 */
static const char *raw_foreign_format(const uint8_t *buf, size_t len)
{
    static const struct {
        const char *name;
        size_t offset;
        size_t len;
        const char *magic;
    } sigs[] = {
        {"qcow/qcow2", 0, 4, "QFI\xfb"},
        {"qed", 0, 4, "QED\0"},
        {"vmdk", 0, 4, "KDMV"},
        {"vmdk", 0, 4, "COWD"},
        {"vmdk", 0, 21, "# Disk DescriptorFile"},
        {"vdi", 0x40, 4, "\x7f\x10\xda\xbe"},
        {"vhdx", 0, 8, "vhdxfile"},
        {"vpc", 0, 8, "conectix"},
        {"luks", 0, 6, "LUKS\xba\xbe"},
        {"parallels", 0, 16, "WithoutFreeSpace"},
        {"parallels", 0, 16, "WithouFreSpacExt"},
        {"bochs", 0, 22, "Bochs Virtual HD Image"},
        {"cloop", 0, 23, "#!/bin/sh\n#V2.0 Format\n"},
    };
    size_t i;

    for (i = 0; i < G_N_ELEMENTS(sigs); i++) {
        if (len >= sigs[i].offset + sigs[i].len &&
            !memcmp(buf + sigs[i].offset, sigs[i].magic, sigs[i].len)) {
            return sigs[i].name;
        }
    }
    return NULL;
}

static int raw_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)buf;
    (void)len;
    (void)filename;
    return 1; /* anything is a raw image */
}

static int coroutine_fn raw_co_open(BlockDriverState *bs, GHashTable *opts,
                                    int flags, GError **errp)
{
    RawState *s = bs->opaque;
    int64_t file_len = bdrv_getlength(bs->file->bs);

    s->offset = opt_get_size(opts, "offset", 0);
    s->has_size = opt_get_str(opts, "size", NULL) != NULL;
    s->size = opt_get_size(opts, "size", 0);
    s->probed = flags & BDRV_O_PROBED;
    co_mutex_init(&s->sector0_lock);
    /* Requests pass straight through: so can FUA. */
    bs->supported_write_flags = bs->file->bs->supported_write_flags;
    bs->supported_zero_flags = bs->file->bs->supported_zero_flags;

    if (s->offset > (uint64_t)file_len) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "raw.offset %" PRIu64 " is beyond the end of '%s' (%" PRId64
                    " bytes)",
                    s->offset, bdrv_name(bs), file_len);
        return -EINVAL;
    }
    if (s->has_size) {
        if (s->size > (uint64_t)file_len - s->offset) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "raw.offset + raw.size (%" PRIu64 " + %" PRIu64
                        ") is beyond the end of '%s' (%" PRId64 " bytes)",
                        s->offset, s->size, bdrv_name(bs), file_len);
            return -EINVAL;
        }
        bs->total_bytes = s->size;
    } else {
        bs->total_bytes = file_len - s->offset;
    }
    return 0;
}

static int64_t coroutine_fn raw_co_getlength(BlockDriverState *bs)
{
    RawState *s = bs->opaque;
    int64_t len;

    if (s->has_size) {
        return s->size;
    }
    len = bdrv_co_refresh_length(bs->file->bs);
    if (len < 0) {
        return len;
    }
    return len > (int64_t)s->offset ? len - (int64_t)s->offset : 0;
}

static int coroutine_fn raw_co_preadv(BlockDriverState *bs, int64_t offset,
                                      int64_t bytes, IOVector *qiov,
                                      size_t qoff, BdrvRequestFlags flags)
{
    RawState *s = bs->opaque;

    return bdrv_co_preadv(bs->file, offset + s->offset, bytes, qiov, qoff,
                          flags);
}

/*
 * Would the first sector, after writing [@offset, @offset + @bytes) from
 * @qiov, probe as another format?  Reads the current sector to fill in
 * what the write does not cover.
 */
static int coroutine_fn raw_check_sector0(BlockDriverState *bs, int64_t offset,
                                          int64_t bytes, IOVector *qiov,
                                          size_t qoff)
{
    RawState *s = bs->opaque;
    uint8_t *buf = g_malloc0(RAW_SECTOR);
    int64_t n = RAW_SECTOR - offset < bytes ? RAW_SECTOR - offset : bytes;
    int64_t have = bs->total_bytes < RAW_SECTOR ? bs->total_bytes : RAW_SECTOR;
    const BlockDriver *drv;
    int ret = 0;

    if (offset > 0 || n < have) {
        ret = bdrv_co_pread(bs->file, s->offset, have, buf, 0);
    }
    if (ret == 0) {
        iov_to_buf(qiov, qoff, buf + offset, n);
        drv = bdrv_probe_format(buf, RAW_SECTOR, NULL, NULL);
        if ((drv && strcmp(drv->name, "raw") != 0) ||
            raw_foreign_format(buf, RAW_SECTOR)) {
            ret = -EPERM;
        }
    }
    g_free(buf);
    return ret;
}

static int coroutine_fn raw_co_pwritev(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, IOVector *qiov,
                                       size_t qoff, BdrvRequestFlags flags)
{
    RawState *s = bs->opaque;
    int ret;

    if (!s->probed || offset >= RAW_SECTOR || s->offset != 0) {
        return bdrv_co_pwritev(bs->file, offset + s->offset, bytes, qiov, qoff,
                               flags);
    }
    co_mutex_lock(&s->sector0_lock);
    ret = raw_check_sector0(bs, offset, bytes, qiov, qoff);
    if (ret == 0) {
        ret = bdrv_co_pwritev(bs->file, offset, bytes, qiov, qoff, flags);
    }
    co_mutex_unlock(&s->sector0_lock);
    return ret;
}

static int coroutine_fn raw_co_pwrite_zeroes(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             BdrvRequestFlags flags)
{
    RawState *s = bs->opaque;

    /* Zeros never probe as another format. */
    return bdrv_co_pwrite_zeroes(bs->file, offset + s->offset, bytes, flags);
}

static int coroutine_fn raw_co_pdiscard(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes)
{
    RawState *s = bs->opaque;

    return bdrv_co_pdiscard(bs->file, offset + s->offset, bytes);
}

static int coroutine_fn raw_co_truncate(BlockDriverState *bs, int64_t offset,
                                        bool exact, PreallocMode prealloc,
                                        GError **errp)
{
    RawState *s = bs->opaque;

    if (s->has_size) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_PERM,
                    "'%s': a drive with raw.size cannot be resized",
                    bdrv_name(bs));
        return -EPERM;
    }
    return bdrv_co_truncate(bs->file, offset + s->offset, exact, prealloc,
                            errp);
}

static int coroutine_fn raw_co_block_status(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes,
                                            int64_t *pnum, int64_t *map,
                                            BlockDriverState **file)
{
    RawState *s = bs->opaque;

    *pnum = bytes;
    *map = offset + s->offset;
    *file = bs->file->bs;
    return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID;
}

static void coroutine_fn raw_co_get_info(BlockDriverState *bs,
                                         ImageInfoSpec *spec)
{
    RawState *s = bs->opaque;

    if (s->offset || s->has_size) {
        image_info_add(spec, "offset", "%" PRIu64, s->offset);
    }
}

static int64_t coroutine_fn raw_co_get_allocated_size(BlockDriverState *bs)
{
    if (bs->file->bs->drv->co_get_allocated_size) {
        return bs->file->bs->drv->co_get_allocated_size(bs->file->bs);
    }
    return -ENOTSUP;
}

const BlockDriver bdrv_raw = {
    .name = "raw",
    .description = "raw disk image (optionally a slice: raw.offset, raw.size)",
    .instance_size = sizeof(RawState),
    .is_format = true,
    .options = raw_options,
    .probe = raw_probe,
    .co_open = raw_co_open,
    .co_getlength = raw_co_getlength,
    .co_preadv = raw_co_preadv,
    .co_pwritev = raw_co_pwritev,
    .co_pwrite_zeroes = raw_co_pwrite_zeroes,
    .co_pdiscard = raw_co_pdiscard,
    .co_truncate = raw_co_truncate,
    .co_block_status = raw_co_block_status,
    .co_get_info = raw_co_get_info,
    .co_get_allocated_size = raw_co_get_allocated_size,
};
