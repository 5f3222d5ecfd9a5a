/*
 * Linux AIO through the raw system calls (no libaio needed).  Requests
 * live on the waiting coroutine's stack; submission is deferred to a
 * bottom half so a batch of requests costs one io_submit; completions
 * arrive through an eventfd (IOCB_FLAG_RESFD) watched by the event loop.
 */
#include "linux-aio.h"

#include <errno.h>
#include <linux/aio_abi.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "coroutine.h"
#include "log.h"

#define LAIO_ENTRIES 256

typedef struct LaioOp LaioOp;

struct LaioOp {
    struct iocb iocb;
    bool write;
    int fd;
    struct iovec *iov;
    int niov;
    int64_t offset;
    int64_t len;
    int rwflags;
    bool short_done;
    bool done;
    int ret;
    Coroutine *co;
    LaioOp *next;
};

struct LinuxAio {
    AioContext *ctx;
    aio_context_t aio;
    int efd;
    AioBH *submit_bh;
    LaioOp *queue_head; /* waiting for io_submit */
    LaioOp *queue_tail;
    unsigned inflight;
};

static long sys_io_setup(unsigned nr, aio_context_t *ctx)
{
    return syscall(SYS_io_setup, nr, ctx);
}

static long sys_io_destroy(aio_context_t ctx)
{
    return syscall(SYS_io_destroy, ctx);
}

static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
{
    return syscall(SYS_io_submit, ctx, n, iocbs);
}

static long sys_io_getevents(aio_context_t ctx, long min, long max,
                             struct io_event *ev, struct timespec *ts)
{
    return syscall(SYS_io_getevents, ctx, min, max, ev, ts);
}

static void laio_prep(LinuxAio *la, LaioOp *op)
{
    memset(&op->iocb, 0, sizeof(op->iocb));
    op->iocb.aio_data = (uint64_t)(uintptr_t)op;
    op->iocb.aio_lio_opcode = op->write ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
    op->iocb.aio_fildes = op->fd;
    op->iocb.aio_buf = (uint64_t)(uintptr_t)op->iov;
    op->iocb.aio_nbytes = op->niov;
    op->iocb.aio_offset = op->offset;
    op->iocb.aio_rw_flags = op->rwflags;
    op->iocb.aio_flags = IOCB_FLAG_RESFD;
    op->iocb.aio_resfd = la->efd;
}

static void laio_queue(LinuxAio *la, LaioOp *op)
{
    laio_prep(la, op);
    op->next = NULL;
    if (la->queue_tail) {
        la->queue_tail->next = op;
    } else {
        la->queue_head = op;
    }
    la->queue_tail = op;
    aio_bh_schedule(la->submit_bh);
}

static void laio_submit(LinuxAio *la)
{
    struct iocb *batch[64];

    while (la->queue_head && la->inflight < LAIO_ENTRIES) {
        LaioOp *op = la->queue_head;
        long n = 0, ret;

        for (; op && n < (long)G_N_ELEMENTS(batch) &&
               la->inflight + n < LAIO_ENTRIES;
             op = op->next) {
            batch[n++] = &op->iocb;
        }
        ret = sys_io_submit(la->aio, n, batch);
        if (ret < 0) {
            int err = errno;

            if (err == EAGAIN || err == EINTR) {
                /* retried on the next completion, or the next pass if
                 * none is coming */
                if (la->inflight == 0) {
                    aio_bh_schedule(la->submit_bh);
                }
                return;
            }
            /* Fail the first request; the rest are retried. */
            op = la->queue_head;
            la->queue_head = op->next;
            if (!la->queue_head) {
                la->queue_tail = NULL;
            }
            op->ret = -err;
            op->done = true;
            co_enter(op->co);
            continue;
        }
        while (ret-- > 0) {
            la->queue_head = la->queue_head->next;
            la->inflight++;
        }
        if (!la->queue_head) {
            la->queue_tail = NULL;
        }
    }
}

static void laio_submit_bh(void *opaque)
{
    laio_submit(opaque);
}

static void laio_iov_skip(LaioOp *op, size_t n)
{
    while (n > 0 && op->niov > 0) {
        if (n >= op->iov->iov_len) {
            n -= op->iov->iov_len;
            op->iov++;
            op->niov--;
        } else {
            op->iov->iov_base = (char *)op->iov->iov_base + n;
            op->iov->iov_len -= n;
            n = 0;
        }
    }
}

/* Finished, or continued after a short transfer? */
static bool laio_complete(LinuxAio *la, LaioOp *op, long res)
{
    int i;

    if (res == -EINTR || res == -EAGAIN) {
        laio_queue(la, op);
        return false;
    }
    if (res < 0) {
        if (res == -EINVAL && op->short_done && !op->write) {
            res = 0; /* unaligned end of file after a short read */
        } else {
            op->ret = res;
            return true;
        }
    }
    if (res == 0) {
        if (!op->write) {
            for (i = 0; i < op->niov; i++) {
                memset(op->iov[i].iov_base, 0, op->iov[i].iov_len);
            }
            op->ret = 0;
        } else {
            op->ret = -ENOSPC;
        }
        return true;
    }
    if (res < op->len) {
        op->short_done = true;
        op->len -= res;
        op->offset += res;
        laio_iov_skip(op, res);
        laio_queue(la, op);
        return false;
    }
    op->ret = 0;
    return true;
}

static void laio_completion(void *opaque)
{
    LinuxAio *la = opaque;
    struct io_event events[64];
    struct timespec zero = {0, 0};
    uint64_t count;
    long n, i;

    if (read(la->efd, &count, sizeof(count)) < 0 && errno != EAGAIN) {
        log_error("linux-aio eventfd: %s", strerror(errno));
    }
    do {
        LaioOp *done = NULL, **tail = &done;

        n = sys_io_getevents(la->aio, 0, G_N_ELEMENTS(events), events, &zero);
        for (i = 0; i < n; i++) {
            LaioOp *op = (LaioOp *)(uintptr_t)events[i].data;

            la->inflight--;
            if (laio_complete(la, op, (long)events[i].res)) {
                op->next = NULL;
                *tail = op;
                tail = &op->next;
            }
        }
        while (done) {
            LaioOp *op = done;

            done = op->next;
            op->done = true;
            co_enter(op->co);
        }
    } while (n == (long)G_N_ELEMENTS(events));
    if (la->queue_head) {
        laio_submit(la);
    }
}

static void laio_destroy(void *opaque)
{
    LinuxAio *la = opaque;

    aio_set_fd_handler(la->ctx, la->efd, NULL, NULL, NULL);
    aio_bh_delete(la->submit_bh);
    sys_io_destroy(la->aio);
    close(la->efd);
    g_free(la);
}

LinuxAio *linux_aio_get(AioContext *ctx, GError **errp)
{
    LinuxAio *la = aio_context_slot(ctx, AIO_SLOT_LINUX_AIO);

    if (la) {
        return la;
    }
    la = g_new0(LinuxAio, 1);
    la->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (la->efd < 0 || sys_io_setup(LAIO_ENTRIES, &la->aio) < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "Linux AIO is not available: %s", g_strerror(err));
        if (la->efd >= 0) {
            close(la->efd);
        }
        g_free(la);
        return NULL;
    }
    la->ctx = ctx;
    la->submit_bh = aio_bh_new(ctx, laio_submit_bh, la);
    aio_set_fd_handler(ctx, la->efd, laio_completion, NULL, la);
    aio_context_set_slot(ctx, AIO_SLOT_LINUX_AIO, la, laio_destroy);
    return la;
}

int coroutine_fn linux_aio_co_rw(LinuxAio *la, bool write, int fd,
                                 struct iovec *iov, int niov, int64_t offset,
                                 int64_t len, int rwflags)
{
    LaioOp op = {
        .write = write,
        .fd = fd,
        .iov = iov,
        .niov = niov,
        .offset = offset,
        .len = len,
        .rwflags = rwflags,
        .co = co_self(),
    };

    laio_queue(la, &op);
    while (!op.done) {
        co_yield ();
    }
    return op.ret;
}
