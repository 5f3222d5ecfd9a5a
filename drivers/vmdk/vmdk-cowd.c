/*
 * vmdk-cowd.c: COWD sparse extents, the VMDK3 layout of ESX 2/3 delta
 * disks (the VMFSSPARSE extents of "vmfsSparse" descriptors).  Read only:
 * the header is parsed and checked here, grain lookups and reads are the
 * shared code of vmdk-sparse.c (4096 entries per grain table, no
 * redundant directory, no compression, no zeroed-grain entries).
 *
 * Header (little-endian, sector 0):
 *    0  magic "COWD"       4  version (1)      8  flags
 *   12  capacity (sectors) 16  grain size (sectors)
 *   20  grain directory offset (sectors)  24  grain directory entries
 *   28  next free sector   ...  (parent name, generation: not used)
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "vmdk.h"

#define COWD_GTES 4096
#define COWD_MAX_GRAIN_SECTORS (UINT32_C(1) << 16)

static uint32_t cowd_ld32(const uint8_t *p)
{
    uint32_t v;

    memcpy(&v, p, 4);
    return le32toh(v);
}

int coroutine_fn vmdk_cowd_co_open(BlockDriverState *bs, VmdkExtent *e,
                                   const uint8_t *hdr, GError **errp)
{
    VmdkSparse *sp = g_new0(VmdkSparse, 1);
    uint32_t version = cowd_ld32(hdr + 4);
    uint32_t grain = cowd_ld32(hdr + 16);
    uint32_t gd = cowd_ld32(hdr + 20);
    uint64_t covered;

    e->sp = sp;
    co_mutex_init(&sp->meta_lock);
    co_mutex_init(&sp->append_lock);
    sp->file_len = bdrv_getlength(e->file->bs);
    sp->version = version;
    sp->flags = cowd_ld32(hdr + 8);
    sp->capacity = cowd_ld32(hdr + 12);
    sp->gte_per_gt = COWD_GTES;
    sp->gd_entries = cowd_ld32(hdr + 24);
    sp->overhead = VMDK_SECTOR;
    sp->ro_reason = "COWD (VMDK3) extents are read-only in imgfs";

    if (version != 1) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                    "%s: unsupported COWD version %" PRIu32,
                    bdrv_name(e->file->bs), version);
        return -ENOTSUP;
    }
    if (!is_power_of_2(grain) || grain > COWD_MAX_GRAIN_SECTORS) {
        vmdk_open_error(errp, e,
                        "grain size of %" PRIu32
                        " sectors is not a power of two up to %" PRIu32,
                        grain, COWD_MAX_GRAIN_SECTORS);
        return -EINVAL;
    }
    sp->grain_bytes = (uint64_t)grain * VMDK_SECTOR;
    if (sp->capacity == 0) {
        vmdk_open_error(errp, e, "the header gives a capacity of 0");
        return -EINVAL;
    }
    covered = (uint64_t)sp->gd_entries * COWD_GTES * grain;
    if (covered < sp->capacity || sp->gd_entries > (UINT32_C(32) << 20)) {
        vmdk_open_error(errp, e,
                        "%" PRIu32 " grain directory entries do not fit a "
                        "capacity of %" PRIu64 " sectors",
                        sp->gd_entries, sp->capacity);
        return -EINVAL;
    }
    if (gd == 0 || (int64_t)gd * VMDK_SECTOR + (int64_t)sp->gd_entries * 4 >
                       sp->file_len) {
        vmdk_open_error(
            errp, e,
            "grain directory at sector %" PRIu32 " is outside the file", gd);
        return -EINVAL;
    }
    sp->gd_offset = (int64_t)gd * VMDK_SECTOR;
    if (e->bytes < 0) {
        e->bytes = sp->capacity * VMDK_SECTOR;
    } else if ((uint64_t)e->bytes > sp->capacity * VMDK_SECTOR) {
        vmdk_open_error(errp, e,
                        "the descriptor gives the extent %" PRId64
                        " sectors but its header only %" PRIu64,
                        e->bytes / VMDK_SECTOR, sp->capacity);
        return -EINVAL;
    }
    sp->next_alloc = ALIGN_UP(sp->file_len, VMDK_SECTOR);
    sp->append_start = sp->next_alloc;
    return vmdk_sparse_co_load_gd(bs, e, errp);
}
