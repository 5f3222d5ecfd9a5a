/*
 * qcow2 internal snapshots: the snapshot table is read and checked when
 * the image opens, and then kept exactly as it is -- imgfs never creates,
 * deletes or applies snapshots and never rewrites the table.
 *
 * What keeps the snapshots intact is elsewhere: clusters and L2 tables
 * a snapshot shares with the active image have a refcount above one and
 * no COPIED flag, so a write copies them first (qcow2-cluster.c), and
 * shrinking an image with snapshots is refused (qcow2.c).
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "qcow2.h"

/* Extra data bytes of a snapshot table entry we accept (QEMU's bound). */
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024

void qcow2_free_snapshots(Qcow2State *s)
{
    uint32_t i;

    for (i = 0; s->snapshots && i < s->nb_snapshots; i++) {
        g_free(s->snapshots[i].id);
        g_free(s->snapshots[i].name);
    }
    g_free(s->snapshots);
    s->snapshots = NULL;
}

int coroutine_fn qcow2_co_read_snapshots(Qcow2State *s, GError **errp)
{
    int64_t file_len = bdrv_getlength(s->bs->file->bs);
    uint64_t pos = s->snapshots_offset;
    uint8_t fixed[40];
    uint32_t i;
    int ret;

    if (!s->nb_snapshots) {
        return 0;
    }
    if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "'%s': corrupt image: %u snapshots (at most %d)",
                    bdrv_name(s->bs), s->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
        return -EINVAL;
    }
    if (qcow2_offset_into_cluster(s, s->snapshots_offset) ||
        (int64_t)s->snapshots_offset >= file_len) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "'%s': corrupt image: snapshot table offset 0x%" PRIx64
                    " is misaligned or past the end of the file",
                    bdrv_name(s->bs), s->snapshots_offset);
        return -EINVAL;
    }
    s->snapshots = g_new0(Qcow2Snapshot, s->nb_snapshots);
    for (i = 0; i < s->nb_snapshots; i++) {
        Qcow2Snapshot *sn = &s->snapshots[i];
        uint32_t extra;
        uint16_t id_len, name_len;
        uint8_t *var;

        if (pos + sizeof(fixed) - s->snapshots_offset >
                QCOW2_MAX_SNAPSHOT_TABLE ||
            (int64_t)(pos + sizeof(fixed)) > file_len) {
            goto too_big;
        }
        ret = bdrv_co_pread(s->bs->file, pos, sizeof(fixed), fixed, 0);
        if (ret < 0) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                        "'%s': cannot read the snapshot table: %s",
                        bdrv_name(s->bs), g_strerror(-ret));
            return ret;
        }
        sn->l1_offset = qcow2_get_be64(fixed);
        sn->l1_size = qcow2_get_be32(fixed + 8);
        id_len = qcow2_get_be16(fixed + 12);
        name_len = qcow2_get_be16(fixed + 14);
        extra = qcow2_get_be32(fixed + 36);
        if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "'%s': corrupt image: snapshot %u has %u bytes of "
                        "extra data",
                        bdrv_name(s->bs), i, extra);
            return -EINVAL;
        }
        pos += sizeof(fixed);
        /* Past the end, the read gives zeros and the overlap map would
         * claim clusters the allocator is about to append. */
        if (pos + extra + id_len + name_len - s->snapshots_offset >
                QCOW2_MAX_SNAPSHOT_TABLE ||
            !range_within(pos, (uint64_t)extra + id_len + name_len, file_len)) {
            goto too_big;
        }
        var = g_malloc(extra + id_len + name_len + 1);
        ret =
            bdrv_co_pread(s->bs->file, pos, extra + id_len + name_len, var, 0);
        if (ret < 0) {
            g_free(var);
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                        "'%s': cannot read the snapshot table: %s",
                        bdrv_name(s->bs), g_strerror(-ret));
            return ret;
        }
        sn->id = g_strndup((char *)var + extra, id_len);
        sn->name = g_strndup((char *)var + extra + id_len, name_len);
        g_free(var);
        pos = ALIGN_UP(pos + extra + id_len + name_len, 8);

        if (qcow2_offset_into_cluster(s, sn->l1_offset) ||
            (uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_BYTES ||
            (sn->l1_size &&
             !range_within(sn->l1_offset, (uint64_t)sn->l1_size * 8,
                           file_len))) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "'%s': corrupt image: the L1 table of snapshot '%s' "
                        "(offset 0x%" PRIx64 ", %u entries) is invalid",
                        bdrv_name(s->bs), sn->name, sn->l1_offset, sn->l1_size);
            return -EINVAL;
        }
    }
    s->snapshots_bytes = pos - s->snapshots_offset;
    return 0;

too_big:
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "'%s': corrupt image: the snapshot table runs past the end "
                "of the file or is too large",
                bdrv_name(s->bs));
    return -EINVAL;
}
