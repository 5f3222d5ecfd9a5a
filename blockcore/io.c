/*
 * The request path between a node's users and its driver: range checks,
 * alignment (bounce buffers and read-modify-write), splitting to
 * max_transfer, serialisation of overlapping read-modify-write cycles,
 * write-zeroes emulation, flush generations and block status.  This is
 * the one place that enforces the promises listed in driver.h.
 *
 * Serialisation: every request is tracked on its node.  A request that
 * does read-modify-write is "serialising" over its range widened to the
 * alignment; any request that overlaps a serialising one (in either
 * direction) waits for it.  So two unaligned writers touching the same
 * sector never lose each other's bytes, and an aligned write cannot slip
 * between the read and the write of a read-modify-write.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "driver.h"
#include "log.h"

typedef enum BdrvReqType {
    BDRV_REQ_TYPE_READ,
    BDRV_REQ_TYPE_WRITE,
    BDRV_REQ_TYPE_ZERO,
    BDRV_REQ_TYPE_DISCARD,
    BDRV_REQ_TYPE_TRUNCATE,
} BdrvReqType;

struct BdrvTrackedRequest {
    BlockDriverState *bs;
    int64_t offset;
    int64_t bytes;
    BdrvReqType type;
    bool serialising;
    int64_t overlap_offset;
    int64_t overlap_bytes;
    Coroutine *co;
    CoQueue wait_queue;
    BdrvTrackedRequest *waiting_for;
    LIST_ENTRY(BdrvTrackedRequest) list;
};

static void tracked_request_begin(BdrvTrackedRequest *req, BlockDriverState *bs,
                                  int64_t offset, int64_t bytes,
                                  BdrvReqType type)
{
    memset(req, 0, sizeof(*req));
    req->bs = bs;
    req->offset = offset;
    req->bytes = bytes;
    req->type = type;
    req->overlap_offset = offset;
    req->overlap_bytes = bytes;
    req->co = co_self();
    co_queue_init(&req->wait_queue);
    LIST_INSERT_HEAD(&bs->tracked_requests, req, list);
    bs->in_flight++;
}

static void tracked_request_end(BdrvTrackedRequest *req)
{
    if (req->serialising) {
        req->bs->serialising_in_flight--;
    }
    LIST_REMOVE(req, list);
    req->bs->in_flight--;
    co_queue_restart_all(&req->wait_queue);
}

static void tracked_request_set_serialising(BdrvTrackedRequest *req,
                                            int64_t align)
{
    int64_t start = ALIGN_DOWN(req->offset, align);
    int64_t end = req->bytes > INT64_MAX - req->offset - align
                      ? INT64_MAX
                      : ALIGN_UP(req->offset + req->bytes, align);

    if (!req->serialising) {
        req->bs->serialising_in_flight++;
    }
    req->serialising = true;
    req->overlap_offset = start;
    req->overlap_bytes = end - start;
}

static void coroutine_fn wait_serialising_requests(BdrvTrackedRequest *self)
{
    BlockDriverState *bs = self->bs;
    bool retry;

    /* The common case, nothing serialising in flight, costs one test. */
    if (!self->serialising && bs->serialising_in_flight == 0) {
        return;
    }
    do {
        BdrvTrackedRequest *req;

        retry = false;
        LIST_FOREACH (req, &bs->tracked_requests, list) {
            if (req == self || (!req->serialising && !self->serialising)) {
                continue;
            }
            if (!ranges_overlap(self->overlap_offset, self->overlap_bytes,
                                req->overlap_offset, req->overlap_bytes)) {
                continue;
            }
            /*
             * Wait only for requests that are running.  One that waits
             * itself rescans when it wakes and then waits for us if it
             * must; waiting for it could close a cycle of waiters.
             */
            if (req->waiting_for) {
                continue;
            }
            self->waiting_for = req;
            co_queue_wait(&req->wait_queue, NULL);
            self->waiting_for = NULL;
            retry = true;
            break;
        }
    } while (retry);
}

static int bdrv_check_range(int64_t offset, int64_t bytes)
{
    if (offset < 0 || bytes < 0 || bytes > BDRV_MAX_LENGTH ||
        offset > BDRV_MAX_LENGTH - bytes) {
        return -EINVAL;
    }
    return 0;
}

static int64_t bdrv_max_transfer(BlockDriverState *bs)
{
    int64_t max = bs->bl.max_transfer ? bs->bl.max_transfer : INT64_MAX;
    int64_t align = bs->bl.request_alignment;

    max = ALIGN_DOWN(max, align);
    return max ? max : align;
}

/* Aligned read: zeros past the end, split to max_transfer. */
static int coroutine_fn bdrv_aligned_preadv(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes,
                                            IOVector *qiov, size_t qoff,
                                            BdrvRequestFlags flags)
{
    int64_t total = bs->total_bytes;
    int64_t align = bs->bl.request_alignment;
    int64_t readable, max, done;

    if (offset >= total) {
        iov_memset(qiov, qoff, 0, bytes);
        return 0;
    }
    readable = total - offset;
    if (readable < bytes) {
        readable = ALIGN_UP(readable, align);
        if (readable > bytes) {
            readable = bytes;
        }
        iov_memset(qiov, qoff + readable, 0, bytes - readable);
    } else {
        readable = bytes;
    }

    max = bdrv_max_transfer(bs);
    for (done = 0; done < readable;) {
        int64_t n = readable - done < max ? readable - done : max;
        int ret =
            bs->drv->co_preadv(bs, offset + done, n, qiov, qoff + done, flags);
        if (ret < 0) {
            return ret;
        }
        done += n;
    }
    return 0;
}

static bool bdrv_request_aligned(BlockDriverState *bs, int64_t offset,
                                 int64_t bytes, IOVector *qiov, size_t qoff)
{
    int64_t align = bs->bl.request_alignment;

    return IS_ALIGNED(offset, align) && IS_ALIGNED(bytes, align) &&
           (!qiov ||
            iov_is_aligned(qiov, qoff, bytes, bs->bl.min_mem_alignment));
}

int coroutine_fn bdrv_co_preadv(BdrvChild *child, int64_t offset, int64_t bytes,
                                IOVector *qiov, size_t qiov_offset,
                                BdrvRequestFlags flags)
{
    BlockDriverState *bs = child->bs;
    BdrvTrackedRequest req;
    int64_t align = bs->bl.request_alignment;
    int ret;

    if (!bs->drv) {
        return -ENOMEDIUM;
    }
    ret = bdrv_check_range(offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }

    tracked_request_begin(&req, bs, offset, bytes, BDRV_REQ_TYPE_READ);
    wait_serialising_requests(&req);
    if (bdrv_request_aligned(bs, offset, bytes, qiov, qiov_offset)) {
        ret = bdrv_aligned_preadv(bs, offset, bytes, qiov, qiov_offset, flags);
    } else {
        int64_t start = ALIGN_DOWN(offset, align);
        int64_t len = ALIGN_UP(offset + bytes, align) - start;
        void *buf = bdrv_try_blockalign(bs, len);
        IOVector bounce;

        if (!buf) {
            ret = -ENOMEM;
            goto out;
        }
        iov_init_buf(&bounce, buf, len);
        ret = bdrv_aligned_preadv(bs, start, len, &bounce, 0, flags);
        if (ret == 0) {
            iov_from_buf(qiov, qiov_offset, (char *)buf + (offset - start),
                         bytes);
        }
        bdrv_vfree(buf);
    }
out:
    tracked_request_end(&req);
    return ret;
}

/* Aligned write: split to max_transfer, emulate FUA, track growth. */
static int coroutine_fn bdrv_aligned_pwritev(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             IOVector *qiov, size_t qoff,
                                             BdrvRequestFlags flags)
{
    int64_t max = bdrv_max_transfer(bs);
    int native = flags & bs->supported_write_flags;
    int64_t done;
    int ret = 0;

    for (done = 0; done < bytes;) {
        int64_t n = bytes - done < max ? bytes - done : max;

        ret = bs->drv->co_pwritev(bs, offset + done, n, qiov, qoff + done,
                                  native);
        if (ret < 0) {
            break;
        }
        done += n;
    }
    /*
     * Only now: a flush that started while this write was in flight
     * must not count it as flushed (bdrv_co_flush).  A failed write
     * counts too, part of it may be in a cache.
     */
    bs->write_gen++;
    if (ret < 0) {
        return ret;
    }
    if (bs->drv->is_protocol && offset + bytes > bs->total_bytes) {
        bs->total_bytes = offset + bytes;
    }
    if ((flags & BDRV_REQ_FUA) && !(native & BDRV_REQ_FUA)) {
        ret = bdrv_co_flush(bs);
    }
    return ret;
}

static int bdrv_check_write(BlockDriverState *bs, int64_t offset, int64_t bytes)
{
    int ret = bdrv_check_range(offset, bytes);

    if (ret < 0) {
        return ret;
    }
    if (!bs->drv) {
        return -ENOMEDIUM;
    }
    if (!(bs->open_flags & BDRV_O_RDWR)) {
        return -EROFS;
    }
    /* Protocol nodes grow; format nodes have a fixed virtual size. */
    if (!bs->drv->is_protocol && offset + bytes > bs->total_bytes) {
        return -EINVAL;
    }
    return 0;
}

/*
 * An unaligned (or badly buffered) write: read the partial head and tail
 * blocks, merge, write the whole aligned range.  @req is serialising.
 */
static int coroutine_fn bdrv_co_pwritev_rmw(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes,
                                            IOVector *qiov, size_t qoff,
                                            BdrvRequestFlags flags)
{
    int64_t align = bs->bl.request_alignment;
    int64_t start = ALIGN_DOWN(offset, align);
    int64_t end = ALIGN_UP(offset + bytes, align);
    int64_t old_total = bs->total_bytes;
    char *buf = bdrv_try_blockalign(bs, end - start);
    bool head = start < offset;
    bool tail = end > offset + bytes;
    IOVector bounce;
    int ret = 0;

    if (!buf) {
        return -ENOMEM;
    }
    if (head) {
        iov_init_buf(&bounce, buf, align);
        ret = bdrv_aligned_preadv(bs, start, align, &bounce, 0, 0);
    }
    /* The tail block, unless it is the head block just read. */
    if (ret == 0 && tail && !(head && end - align == start)) {
        iov_init_buf(&bounce, buf + (end - align - start), align);
        ret = bdrv_aligned_preadv(bs, end - align, align, &bounce, 0, 0);
    }
    if (ret == 0) {
        iov_to_buf(qiov, qoff, buf + (offset - start), bytes);
        iov_init_buf(&bounce, buf, end - start);
        ret = bdrv_aligned_pwritev(bs, start, end - start, &bounce, 0, flags);
    }
    /* Padding must not make a host file longer than what was written. */
    if (ret == 0 && bs->drv->is_protocol && end > offset + bytes &&
        end > old_total && bs->drv->co_truncate) {
        int64_t want = offset + bytes > old_total ? offset + bytes : old_total;

        if (bs->drv->co_truncate(bs, want, true, PREALLOC_OFF, NULL) == 0) {
            bs->total_bytes = want;
        }
    }
    bdrv_vfree(buf);
    return ret;
}

int coroutine_fn bdrv_co_pwritev(BdrvChild *child, int64_t offset,
                                 int64_t bytes, IOVector *qiov,
                                 size_t qiov_offset, BdrvRequestFlags flags)
{
    BlockDriverState *bs = child->bs;
    BdrvTrackedRequest req;
    int64_t align = bs->bl.request_alignment;
    int ret;

    ret = bdrv_check_write(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }

    tracked_request_begin(&req, bs, offset, bytes, BDRV_REQ_TYPE_WRITE);
    if (!IS_ALIGNED(offset, align) || !IS_ALIGNED(bytes, align)) {
        tracked_request_set_serialising(&req, align);
    }
    wait_serialising_requests(&req);
    /*
     * Padding past the end of a protocol node is cut off again after the
     * write (bdrv_co_pwritev_rmw): a write further out that ran meanwhile
     * would be cut off with it, so this one serialises up to the end.
     */
    if (req.serialising && bs->drv->is_protocol &&
        req.overlap_offset + req.overlap_bytes > bs->total_bytes &&
        req.overlap_bytes < INT64_MAX - req.overlap_offset) {
        req.overlap_bytes = INT64_MAX - req.overlap_offset;
        wait_serialising_requests(&req);
    }
    if (bdrv_request_aligned(bs, offset, bytes, qiov, qiov_offset)) {
        ret = bdrv_aligned_pwritev(bs, offset, bytes, qiov, qiov_offset, flags);
    } else {
        ret = bdrv_co_pwritev_rmw(bs, offset, bytes, qiov, qiov_offset, flags);
    }
    tracked_request_end(&req);
    return ret;
}

int coroutine_fn bdrv_co_pread(BdrvChild *child, int64_t offset, int64_t bytes,
                               void *buf, BdrvRequestFlags flags)
{
    IOVector qiov;

    iov_init_buf(&qiov, buf, bytes);
    return bdrv_co_preadv(child, offset, bytes, &qiov, 0, flags);
}

int coroutine_fn bdrv_co_pwrite(BdrvChild *child, int64_t offset, int64_t bytes,
                                const void *buf, BdrvRequestFlags flags)
{
    IOVector qiov;

    iov_init_buf(&qiov, (void *)buf, bytes);
    return bdrv_co_pwritev(child, offset, bytes, &qiov, 0, flags);
}

/* A shared, never written buffer of zeros for zero-write emulation. */
#define ZERO_BUF_SIZE (1 * MiB)
static void *zero_buf;
static pthread_once_t zero_buf_once = PTHREAD_ONCE_INIT;

static void zero_buf_init(void)
{
    if (posix_memalign(&zero_buf, 4096, ZERO_BUF_SIZE)) {
        abort();
    }
    memset(zero_buf, 0, ZERO_BUF_SIZE);
}

static void *bdrv_zero_buffer(void)
{
    pthread_once(&zero_buf_once, zero_buf_init);
    return zero_buf;
}

/* Write explicit zeros over an arbitrary range (with read-modify-write). */
static int coroutine_fn bdrv_co_write_zero_buffers(BdrvChild *child,
                                                   int64_t offset,
                                                   int64_t bytes,
                                                   BdrvRequestFlags flags)
{
    void *zeros = bdrv_zero_buffer();
    int ret = 0;

    while (bytes > 0 && ret == 0) {
        int64_t n = bytes < ZERO_BUF_SIZE ? bytes : ZERO_BUF_SIZE;

        ret = bdrv_co_pwrite(child, offset, n, zeros, flags & BDRV_REQ_FUA);
        offset += n;
        bytes -= n;
    }
    return ret;
}

static int coroutine_fn bdrv_co_pwrite_zeroes_aligned(BlockDriverState *bs,
                                                      int64_t offset,
                                                      int64_t bytes,
                                                      BdrvRequestFlags flags)
{
    BdrvTrackedRequest req;
    int64_t done = 0;
    int ret = -ENOTSUP;

    tracked_request_begin(&req, bs, offset, bytes, BDRV_REQ_TYPE_ZERO);
    wait_serialising_requests(&req);

    if (bs->drv->co_pwrite_zeroes) {
        int64_t max =
            bs->bl.max_pwrite_zeroes ? bs->bl.max_pwrite_zeroes : INT64_MAX;
        int64_t align = bs->bl.request_alignment;

        max = ALIGN_DOWN(max, align);
        if (!max) {
            max = align;
        }
        while (done < bytes) {
            int64_t n = bytes - done < max ? bytes - done : max;

            ret = bs->drv->co_pwrite_zeroes(
                bs, offset + done, n,
                flags & (BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK));
            if (ret < 0) {
                break;
            }
            done += n;
        }
        bs->write_gen++; /* when done, as in bdrv_aligned_pwritev */
    }
    if (ret == -ENOTSUP && !(flags & BDRV_REQ_NO_FALLBACK)) {
        int64_t max = bdrv_max_transfer(bs);
        IOVector qiov;

        if (max > ZERO_BUF_SIZE) {
            max = ZERO_BUF_SIZE;
        }
        ret = 0;
        while (done < bytes && ret == 0) {
            int64_t n = bytes - done < max ? bytes - done : max;

            iov_init_buf(&qiov, bdrv_zero_buffer(), n);
            ret = bdrv_aligned_pwritev(bs, offset + done, n, &qiov, 0,
                                       flags & BDRV_REQ_FUA);
            done += n;
        }
    } else if (ret == 0 && (flags & BDRV_REQ_FUA)) {
        ret = bdrv_co_flush(bs);
    }
    if (ret == 0 && bs->drv->is_protocol && offset + bytes > bs->total_bytes) {
        bs->total_bytes = offset + bytes;
    }
    tracked_request_end(&req);
    return ret;
}

int coroutine_fn bdrv_co_pwrite_zeroes(BdrvChild *child, int64_t offset,
                                       int64_t bytes, BdrvRequestFlags flags)
{
    BlockDriverState *bs = child->bs;
    int64_t align, end, head_end, tail_start;
    int ret;

    ret = bdrv_check_write(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    align = bs->bl.request_alignment;
    if (bs->bl.pwrite_zeroes_alignment > align) {
        align = bs->bl.pwrite_zeroes_alignment;
    }
    end = offset + bytes;
    head_end = ALIGN_UP(offset, align);
    if (head_end > end) {
        head_end = end;
    }
    tail_start = ALIGN_DOWN(end, align);
    if (tail_start < head_end) {
        tail_start = head_end;
    }

    /* Unaligned edges: explicit zeros (read-modify-write if needed). */
    if (head_end > offset) {
        if (flags & BDRV_REQ_NO_FALLBACK) {
            return -ENOTSUP;
        }
        ret =
            bdrv_co_write_zero_buffers(child, offset, head_end - offset, flags);
        if (ret < 0) {
            return ret;
        }
    }
    if (tail_start > head_end) {
        ret = bdrv_co_pwrite_zeroes_aligned(bs, head_end, tail_start - head_end,
                                            flags);
        if (ret < 0) {
            return ret;
        }
    }
    if (end > tail_start) {
        if (flags & BDRV_REQ_NO_FALLBACK) {
            return -ENOTSUP;
        }
        ret = bdrv_co_write_zero_buffers(child, tail_start, end - tail_start,
                                         flags);
    }
    return ret;
}

int coroutine_fn bdrv_co_pdiscard(BdrvChild *child, int64_t offset,
                                  int64_t bytes)
{
    BlockDriverState *bs = child->bs;
    BdrvTrackedRequest req;
    int64_t align, start, end, max;
    int ret;

    ret = bdrv_check_write(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    if (!bs->drv->co_pdiscard) {
        return -ENOTSUP;
    }
    align = bs->bl.request_alignment;
    if (bs->bl.pdiscard_alignment > align) {
        align = bs->bl.pdiscard_alignment;
    }
    /* Discard is advisory: skip the unaligned edges. */
    start = ALIGN_UP(offset, align);
    end = ALIGN_DOWN(offset + bytes, align);
    if (end <= start) {
        return 0;
    }
    max = bs->bl.max_pdiscard ? ALIGN_DOWN(bs->bl.max_pdiscard, align) : 0;
    if (!max) {
        max = INT64_MAX;
    }

    tracked_request_begin(&req, bs, start, end - start, BDRV_REQ_TYPE_DISCARD);
    wait_serialising_requests(&req);
    while (start < end) {
        int64_t n = end - start < max ? end - start : max;

        ret = bs->drv->co_pdiscard(bs, start, n);
        if (ret < 0) {
            break;
        }
        start += n;
    }
    bs->write_gen++; /* when done, as in bdrv_aligned_pwritev */
    tracked_request_end(&req);
    return ret;
}

int coroutine_fn bdrv_co_flush(BlockDriverState *bs)
{
    uint64_t gen;
    BdrvChild *c;
    int ret = 0;

    if (!bs->drv || !(bs->open_flags & BDRV_O_RDWR)) {
        return 0;
    }
    gen = bs->write_gen;
    bs->in_flight++;
    while (bs->flush_running) {
        co_queue_wait(&bs->flush_queue, NULL);
    }
    bs->flush_running = true;

    if (bs->flushed_gen != gen && bs->drv->co_flush &&
        !(bs->drv->is_protocol && (bs->open_flags & BDRV_O_NO_FLUSH))) {
        ret = bs->drv->co_flush(bs);
    }
    for (c = bs->children; c; c = c->next) {
        int r;

        if (c->role == BDRV_CHILD_BACKING) {
            continue;
        }
        r = bdrv_co_flush(c->bs);
        if (ret == 0) {
            ret = r;
        }
    }
    if (ret == 0 && gen > bs->flushed_gen) {
        bs->flushed_gen = gen;
    }

    bs->flush_running = false;
    co_queue_next(&bs->flush_queue);
    bs->in_flight--;
    return ret;
}

int coroutine_fn bdrv_co_truncate(BdrvChild *child, int64_t offset, bool exact,
                                  PreallocMode prealloc, GError **errp)
{
    BlockDriverState *bs = child->bs;
    BdrvTrackedRequest req;
    int64_t start;
    int ret;

    if (offset < 0 || offset > BDRV_MAX_LENGTH) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "size %" PRId64 " out of range", offset);
        return -EINVAL;
    }
    if (!bs->drv) {
        return -ENOMEDIUM;
    }
    if (!(bs->open_flags & BDRV_O_RDWR)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_ROFS, "'%s' is read-only",
                    bdrv_name(bs));
        return -EROFS;
    }
    if (!bs->drv->co_truncate) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_PERM,
                    "%s images cannot be resized", bs->drv->name);
        return -ENOTSUP;
    }
    start = offset < bs->total_bytes ? offset : bs->total_bytes;
    tracked_request_begin(&req, bs, start, INT64_MAX - start,
                          BDRV_REQ_TYPE_TRUNCATE);
    tracked_request_set_serialising(&req, 1);
    wait_serialising_requests(&req);

    ret = bs->drv->co_truncate(bs, offset, exact, prealloc, errp);
    bs->write_gen++; /* when done, as in bdrv_aligned_pwritev */
    if (ret == 0) {
        int64_t len =
            bs->drv->co_getlength ? bs->drv->co_getlength(bs) : offset;

        bs->total_bytes = len >= 0 ? len : offset;
    }
    tracked_request_end(&req);
    return ret;
}

int coroutine_fn bdrv_co_block_status(BlockDriverState *bs, int64_t offset,
                                      int64_t bytes, int64_t *pnum,
                                      int64_t *map, BlockDriverState **file)
{
    int64_t total = bs->total_bytes;
    int64_t align, aligned_off, aligned_bytes, lpnum = 0, lmap = 0;
    BlockDriverState *lfile = NULL;
    int ret;

    *pnum = 0;
    *map = 0;
    *file = NULL;
    if (!bs->drv) {
        return -ENOMEDIUM;
    }
    if (offset < 0 || bytes <= 0) {
        return -EINVAL;
    }
    if (offset >= total) {
        return BDRV_BLOCK_EOF;
    }
    if (bytes > total - offset) {
        bytes = total - offset;
    }

    if (!bs->drv->co_block_status) {
        *pnum = bytes;
        ret = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
        if (bs->drv->is_protocol) {
            ret |= BDRV_BLOCK_OFFSET_VALID;
            *map = offset;
            *file = bs;
        }
        goto out;
    }

    align = bs->bl.request_alignment;
    aligned_off = ALIGN_DOWN(offset, align);
    aligned_bytes = ALIGN_UP(offset + bytes, align) - aligned_off;
    ret = bs->drv->co_block_status(bs, aligned_off, aligned_bytes, &lpnum,
                                   &lmap, &lfile);
    if (ret < 0) {
        return ret;
    }
    if (lpnum <= offset - aligned_off) {
        /* A driver answering less than one block: treat it as data. */
        lpnum = offset - aligned_off + 1;
        ret = BDRV_BLOCK_DATA;
        lfile = NULL;
    }
    *pnum = aligned_off + lpnum - offset;
    if (*pnum > bytes) {
        *pnum = bytes;
    }
    if (ret & BDRV_BLOCK_OFFSET_VALID) {
        *map = lmap + (offset - aligned_off);
        *file = lfile;
    }

    if (ret & BDRV_BLOCK_RAW) {
        int64_t n;

        if (!lfile || !(ret & BDRV_BLOCK_OFFSET_VALID)) {
            return -EIO;
        }
        ret = bdrv_co_block_status(lfile, *map, *pnum, &n, map, file);
        if (ret < 0) {
            return ret;
        }
        if (n == 0) {
            /* Past the end of the file: reads as zeros. */
            ret = BDRV_BLOCK_ZERO;
        } else {
            *pnum = n;
        }
        ret = (ret & ~BDRV_BLOCK_EOF) | BDRV_BLOCK_ALLOCATED;
        goto out;
    }

    if (ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO)) {
        ret |= BDRV_BLOCK_ALLOCATED;
    }
    /* Data mapped into a sparse file may really be a hole there. */
    if ((ret & BDRV_BLOCK_DATA) && !(ret & BDRV_BLOCK_ZERO) &&
        (ret & BDRV_BLOCK_OFFSET_VALID) && *file && *file != bs) {
        int64_t fpnum, fmap;
        BlockDriverState *ffile;
        int fret =
            bdrv_co_block_status(*file, *map, *pnum, &fpnum, &fmap, &ffile);

        if (fret >= 0 && fpnum > 0 && (fret & BDRV_BLOCK_ZERO)) {
            *pnum = fpnum;
            ret |= BDRV_BLOCK_ZERO;
        }
    }
out:
    if (offset + *pnum >= total) {
        ret |= BDRV_BLOCK_EOF;
    }
    return ret;
}

int coroutine_fn bdrv_co_block_status_above(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes,
                                            int64_t *pnum)
{
    BlockDriverState *file, *backing;
    int64_t map;
    int ret;

    ret = bdrv_co_block_status(bs, offset, bytes, pnum, &map, &file);
    if (ret < 0) {
        return ret;
    }
    if (*pnum == 0) {
        /* Past this node's end: reads as zeros for our caller. */
        *pnum = bytes;
        return BDRV_BLOCK_ZERO;
    }
    if (ret & BDRV_BLOCK_ALLOCATED) {
        return ret;
    }
    if (!bs->backing) {
        return ret | BDRV_BLOCK_ZERO;
    }
    backing = bs->backing->bs;
    if (offset >= backing->total_bytes) {
        return BDRV_BLOCK_ZERO;
    }
    return bdrv_co_block_status_above(backing, offset, *pnum, pnum);
}

int64_t bdrv_getlength(BlockDriverState *bs)
{
    return bs->total_bytes;
}

int64_t coroutine_fn bdrv_co_refresh_length(BlockDriverState *bs)
{
    if (bs->drv && bs->drv->co_getlength) {
        int64_t len = bs->drv->co_getlength(bs);

        if (len >= 0) {
            bs->total_bytes = len;
        }
        return len;
    }
    return bs->total_bytes;
}

void *bdrv_try_blockalign(BlockDriverState *bs, size_t size)
{
    size_t align = bs->bl.opt_mem_alignment;
    void *p;

    if (align < sizeof(void *)) {
        align = sizeof(void *);
    }
    if (posix_memalign(&p, align, size ? size : 1)) {
        return NULL;
    }
    return p;
}

void *bdrv_blockalign(BlockDriverState *bs, size_t size)
{
    void *p = bdrv_try_blockalign(bs, size);

    if (!p) {
        log_error("out of memory allocating %zu bytes", size);
        abort();
    }
    return p;
}

void bdrv_vfree(void *p)
{
    free(p);
}

#define CORRUPTION_REPORT_LIMIT 20

int bdrv_report_corruption(BlockDriverState *bs, int64_t offset,
                           const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    g_autofree char *prefix = NULL;
    va_list ap;
    int n = __atomic_fetch_add(&bs->corruption_reports, 1, __ATOMIC_RELAXED);

    if (n > CORRUPTION_REPORT_LIMIT) {
        return -EIO;
    }
    prefix = bs->drive_name ? g_strdup_printf("drive '%s': ", bs->drive_name)
                            : g_strdup("");
    if (n == CORRUPTION_REPORT_LIMIT) {
        log_error("%s%s: further corruption reports suppressed", prefix,
                  bdrv_name(bs));
        return -EIO;
    }
    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (offset >= 0) {
        log_error("%s%s: corrupt image at offset 0x%" PRIx64 ": %s", prefix,
                  bdrv_name(bs), (uint64_t)offset, msg);
    } else {
        log_error("%s%s: corrupt image: %s", prefix, bdrv_name(bs), msg);
    }
    return -EIO;
}
