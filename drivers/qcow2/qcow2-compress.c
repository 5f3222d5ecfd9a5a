/*
 * qcow2 compressed clusters: reading one and inflating it, with deflate
 * (zlib, raw deflate streams without zlib headers, as QEMU writes them)
 * or zstd.  Decompression runs on the worker pool so a burst of
 * compressed reads does not stall the drive's event loop.
 *
 * A compressed cluster's data starts at an arbitrary byte and runs over
 * whole 512-byte sectors; decompression stops when a cluster of output
 * is complete, whatever follows in the last sector.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"
#include "blockcore/thread-pool.h"

typedef struct DecompressJob {
    int type;
    const uint8_t *in;
    size_t in_len;
    uint8_t *out;
    size_t out_len;
} DecompressJob;

static int inflate_cluster(DecompressJob *job)
{
    z_stream strm;
    int ret;

    memset(&strm, 0, sizeof(strm));
    /* Raw deflate; the largest window decodes any smaller one too. */
    if (inflateInit2(&strm, -15) != Z_OK) {
        return -ENOMEM;
    }
    strm.next_in = (Bytef *)job->in;
    strm.avail_in = job->in_len;
    strm.next_out = job->out;
    strm.avail_out = job->out_len;
    ret = inflate(&strm, Z_FINISH);
    inflateEnd(&strm);
    if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) &&
        strm.avail_out == 0) {
        return 0;
    }
    return -EIO;
}

static int unzstd_cluster(DecompressJob *job)
{
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    ZSTD_inBuffer in = {.src = job->in, .size = job->in_len, .pos = 0};
    ZSTD_outBuffer out = {.dst = job->out, .size = job->out_len, .pos = 0};
    int ret = 0;

    if (!dctx) {
        return -ENOMEM;
    }
    while (out.pos < out.size) {
        size_t in_pos = in.pos, out_pos = out.pos;
        size_t z = ZSTD_decompressStream(dctx, &out, &in);

        if (ZSTD_isError(z)) {
            ret = -EIO;
            break;
        }
        /* No progress: the input ended before a full cluster. */
        if (in.pos == in_pos && out.pos == out_pos) {
            ret = -EIO;
            break;
        }
    }
    ZSTD_freeDCtx(dctx);
    return ret;
}

static int decompress_job(void *opaque)
{
    DecompressJob *job = opaque;

    return job->type == QCOW2_COMPRESS_ZSTD ? unzstd_cluster(job)
                                            : inflate_cluster(job);
}

int coroutine_fn qcow2_co_read_compressed_cluster(Qcow2State *s, uint64_t entry,
                                                  void *out)
{
    int64_t file_len = bdrv_getlength(s->bs->file->bs);
    uint64_t off, bytes, first;
    DecompressJob job;
    Qcow2HostIO io;
    uint8_t *buf;
    int ret;

    qcow2_compressed_range(s, entry, &off, &bytes);
    if ((int64_t)off >= file_len) {
        return qcow2_signal_corruption(s, false, off,
                                       "compressed cluster (L2 entry 0x%" PRIx64
                                       ") lies past the end of the file",
                                       entry);
    }
    if (bytes > 2 * (uint64_t)s->cluster_size + 512) {
        return qcow2_signal_corruption(
            s, false, off, "compressed cluster of %" PRIu64 " bytes is too big",
            bytes);
    }
    buf = bdrv_blockalign(s->bs->file->bs, bytes);
    first = qcow2_start_of_cluster(s, off);
    qcow2_host_io_begin(s, &io, first, off + bytes - first);
    ret = bdrv_co_pread(s->bs->file, off, bytes, buf, 0);
    qcow2_host_io_end(s, &io);
    if (ret < 0) {
        bdrv_vfree(buf);
        return ret;
    }
    job.type = s->compression_type;
    job.in = buf;
    job.in_len = bytes;
    job.out = out;
    job.out_len = s->cluster_size;
    ret = thread_pool_co_run(decompress_job, &job);
    bdrv_vfree(buf);
    if (ret == -EIO) {
        return qcow2_signal_corruption(
            s, false, off, "compressed cluster does not decompress (%s)",
            s->compression_type == QCOW2_COMPRESS_ZSTD ? "zstd" : "deflate");
    }
    return ret;
}
