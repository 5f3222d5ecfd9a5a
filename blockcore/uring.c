/*
 * The io_uring ring of an event loop.  Requests live on the waiting
 * coroutine's stack.  Submission is deferred to a bottom half so that all
 * the requests started while handling one batch of FUSE requests go to
 * the kernel in one io_uring_enter -- except reads while the loop has
 * idle time and large writes, which go at once; requests that find the
 * submission queue full wait on a list and are queued as completions free
 * space.
 */
#include "uring.h"

#include <errno.h>
#include <limits.h>
#include <liburing.h>
#include <stddef.h>
#include <string.h>

#include "coroutine.h"
#include "log.h"

#define URING_ENTRIES 256

typedef struct UringOp UringOp;

typedef struct AioUringList {
    AioUringLink *head, *tail;
} AioUringList;

/* writes of this many bytes and more are submitted when queued */
#define URING_EAGER_WRITE (64 * 1024)

struct UringOp {
    int opcode;
    bool fixed; /* one iovec in the ring's registered buffer */
    bool eager; /* submitted when queued, not with the loop's batch */
    int fd;
    struct iovec *iov;
    int niov;
    int64_t offset;
    int64_t len; /* bytes left for reads and writes */
    int rwflags;
    int mode;
    bool short_done; /* a short transfer happened */
    bool done;
    int ret;
    Coroutine *co;
    AioUringLink link;
};

#define OP_OF(l) ((UringOp *)((char *)(l)-offsetof(UringOp, link)))
#define CMD_OF(l) ((AioUringCmd *)((char *)(l)-offsetof(AioUringCmd, link)))

struct AioUring {
    AioContext *ctx;
    struct io_uring ring;
    AioBH *submit_bh;
    unsigned queued;    /* prepared but not yet submitted */
    AioUringList wait;  /* found the submission queue full */
    AioUringList heavy; /* heavy commands, one per io_uring_enter */
    char *fixed;        /* the registered buffer (aio_uring_register_buf) */
    size_t fixed_len;
};

static void list_push(AioUringList *list, AioUringLink *l)
{
    l->next = NULL;
    if (list->tail) {
        list->tail->next = l;
    } else {
        list->head = l;
    }
    list->tail = l;
}

static AioUringLink *list_pop(AioUringList *list)
{
    AioUringLink *l = list->head;

    if (l) {
        list->head = l->next;
        if (!list->head) {
            list->tail = NULL;
        }
    }
    return l;
}

static void uring_prep_cmd(struct io_uring_sqe *sqe, AioUringCmd *c)
{
    memset(sqe, 0, 2 * sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = c->fd;
    sqe->cmd_op = c->cmd_op;
    sqe->addr = c->addr;
    sqe->len = c->len;
    memcpy(sqe->cmd, c->data, AIO_URING_CMD_DATA);
}

static void uring_prep(struct io_uring_sqe *sqe, UringOp *op)
{
    switch (op->opcode) {
    case IORING_OP_READV:
        if (op->fixed) {
            io_uring_prep_read_fixed(sqe, op->fd, op->iov->iov_base,
                                     op->iov->iov_len, op->offset, 0);
        } else {
            io_uring_prep_readv(sqe, op->fd, op->iov, op->niov, op->offset);
        }
        break;
    case IORING_OP_WRITEV:
        if (op->fixed) {
            io_uring_prep_write_fixed(sqe, op->fd, op->iov->iov_base,
                                      op->iov->iov_len, op->offset, 0);
        } else {
            io_uring_prep_writev(sqe, op->fd, op->iov, op->niov, op->offset);
        }
        sqe->rw_flags = op->rwflags;
        break;
    case IORING_OP_FSYNC:
        io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
        break;
    case IORING_OP_FALLOCATE:
        io_uring_prep_fallocate(sqe, op->fd, op->mode, op->offset, op->len);
        break;
    }
}

static void uring_prep_link(struct io_uring_sqe *sqe, AioUringLink *l)
{
    if (l->cmd) {
        uring_prep_cmd(sqe, CMD_OF(l));
    } else {
        uring_prep(sqe, OP_OF(l));
    }
    io_uring_sqe_set_data(sqe, l);
}

static void uring_submit(AioUring *u);

/* Queue @l in the ring, or on the wait list if the ring is full. */
static void uring_queue_link(AioUring *u, AioUringLink *l)
{
    struct io_uring_sqe *sqe = NULL;

    if (l->cmd && CMD_OF(l)->heavy) {
        list_push(&u->heavy, l);
    } else if (!u->wait.head && (sqe = io_uring_get_sqe(&u->ring))) {
        uring_prep_link(sqe, l);
        u->queued++;
        if (!l->cmd && OP_OF(l)->eager) {
            uring_submit(u);
            if (!u->queued && !u->wait.head) {
                /* nothing left for the bottom half (which would also
                 * cost the loop a pass); uring_submit reschedules it
                 * for a heavy command it held back */
                return;
            }
        }
    } else {
        list_push(&u->wait, l);
    }
    aio_bh_schedule(u->submit_bh);
}

static void uring_queue(AioUring *u, UringOp *op)
{
    op->link.cmd = false;
    uring_queue_link(u, &op->link);
}

/* Move @list's links into the submission queue, at most @max of them. */
static void uring_fill(AioUring *u, AioUringList *list, unsigned max)
{
    while (list->head && max > 0) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);

        if (!sqe) {
            break;
        }
        uring_prep_link(sqe, list_pop(list));
        u->queued++;
        max--;
    }
}

static void uring_submit(AioUring *u)
{
    bool refused = false;
    int ret;

    uring_fill(u, &u->wait, UINT_MAX);
    /*
     * One heavy command, last: the kernel runs the submission queue in
     * order, so the file operations reach the disk before the copy, and
     * the next heavy command waits for the next loop iteration, which
     * takes new requests first and lets other tasks (the callers being
     * woken) have this CPU in between.
     */
    uring_fill(u, &u->heavy, 1);
    if (u->queued) {
        ret = io_uring_submit(&u->ring);
        if (ret >= 0) {
            /* the kernel stops at an entry it cannot take; the rest wait */
            refused = ret < (int)u->queued;
            u->queued -= refused ? ret : (int)u->queued;
        } else if (ret == -EAGAIN || ret == -EBUSY || ret == -EINTR) {
            refused = true;
        } else {
            log_error("io_uring submit: %s", strerror(-ret));
        }
    }
    /*
     * Left behind: a heavy command (one per pass), links that did not fit
     * the submission queue, or entries the kernel did not take this time
     * (EAGAIN, EBUSY: completions free its resources).  Nothing else may
     * come to submit them, so the next pass does.
     */
    if (u->heavy.head || u->wait.head || refused) {
        aio_bh_schedule(u->submit_bh);
    }
}

static void uring_submit_bh(void *opaque)
{
    uring_submit(opaque);
}

static void iov_skip(UringOp *op, size_t n)
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

/* Is @op finished with @res, or does it continue (short transfer)? */
static bool uring_op_complete(AioUring *u, UringOp *op, int res)
{
    bool rw = op->opcode == IORING_OP_READV || op->opcode == IORING_OP_WRITEV;
    int i;

    if (res == -EINTR || res == -EAGAIN) {
        uring_queue(u, op);
        return false;
    }
    if (!rw) {
        op->ret = res < 0 ? res : 0;
        return true;
    }
    if (res < 0) {
        /* O_DIRECT refuses to continue a short read at an unaligned end
         * of file: that is the end of the file. */
        if (res == -EINVAL && op->short_done && op->opcode == IORING_OP_READV) {
            res = 0;
        } else {
            op->ret = res;
            return true;
        }
    }
    if (res == 0) {
        if (op->opcode == IORING_OP_READV) {
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
        iov_skip(op, res);
        uring_queue(u, op);
        return false;
    }
    op->ret = 0;
    return true;
}

static void uring_completion(void *opaque)
{
    AioUring *u = opaque;
    AioUringLink *done = NULL, **tail = &done;
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;

    io_uring_for_each_cqe(&u->ring, head, cqe)
    {
        AioUringLink *l = io_uring_cqe_get_data(cqe);

        n++;
        if (l->cmd) {
            CMD_OF(l)->res = cqe->res;
        } else if (!uring_op_complete(u, OP_OF(l), cqe->res)) {
            continue; /* queued again to finish */
        }
        l->next = NULL;
        *tail = l;
        tail = &l->next;
    }
    io_uring_cq_advance(&u->ring, n);

    /* Resume the coroutines after the ring is consistent again. */
    while (done) {
        AioUringLink *l = done;

        done = l->next;
        if (l->cmd) {
            CMD_OF(l)->complete(CMD_OF(l), CMD_OF(l)->res);
        } else {
            OP_OF(l)->done = true;
            co_enter(OP_OF(l)->co);
        }
    }
}

static void uring_destroy(void *opaque)
{
    AioUring *u = opaque;

    aio_set_fd_handler(u->ctx, u->ring.ring_fd, NULL, NULL, NULL);
    aio_bh_delete(u->submit_bh);
    io_uring_queue_exit(&u->ring);
    g_free(u);
}

AioUring *aio_uring_get(AioContext *ctx, GError **errp)
{
    static const unsigned flags[] = {
        IORING_SETUP_SQE128 | IORING_SETUP_COOP_TASKRUN,
        IORING_SETUP_SQE128,
        0,
    };
    AioUring *u = aio_context_slot(ctx, AIO_SLOT_URING);
    unsigned i;
    int ret;

    if (u) {
        return u;
    }
    u = g_new0(AioUring, 1);
    /*
     * 128-byte SQEs carry passthrough commands (FUSE over io_uring).
     * COOP_TASKRUN: completions are not announced with an interrupt of a
     * running thread; ours always enters the kernel soon (io_uring_enter
     * or epoll), which runs them, and a sleeping one is still woken.
     */
    for (i = 0; i < G_N_ELEMENTS(flags); i++) {
        ret = io_uring_queue_init(URING_ENTRIES, &u->ring, flags[i]);
        if (ret != -EINVAL) {
            break;
        }
    }
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "io_uring is not available: %s", g_strerror(-ret));
        g_free(u);
        return NULL;
    }
    u->ctx = ctx;
    u->submit_bh = aio_bh_new(ctx, uring_submit_bh, u);
    aio_set_fd_handler(ctx, u->ring.ring_fd, uring_completion, NULL, u);
    aio_context_set_slot(ctx, AIO_SLOT_URING, u, uring_destroy);
    return u;
}

bool aio_uring_has_cmds(AioUring *u)
{
    return u->ring.flags & IORING_SETUP_SQE128;
}

void aio_uring_queue_cmd(AioUring *u, AioUringCmd *c)
{
    c->link.cmd = true;
    uring_queue_link(u, &c->link);
}

AioUring *aio_uring_current(void)
{
    AioContext *ctx = aio_current();

    return ctx ? aio_context_slot(ctx, AIO_SLOT_URING) : NULL;
}

static int coroutine_fn uring_co_run(AioUring *u, UringOp *op)
{
    op->co = co_self();
    uring_queue(u, op);
    while (!op->done) {
        co_yield ();
    }
    return op->ret;
}

/*
 * Does @iov lie inside the registered buffer?  A transfer there needs no
 * page pinning (the kernel pinned it once); a short one continues in it.
 */
static bool uring_in_fixed(AioUring *u, const struct iovec *iov)
{
    char *base = iov->iov_base;

    if (!u->fixed || base < u->fixed || iov->iov_len > u->fixed_len) {
        return false;
    }
    return (size_t)(base - u->fixed) <= u->fixed_len - iov->iov_len;
}

int coroutine_fn aio_uring_co_rw(AioUring *u, bool write, int fd,
                                 struct iovec *iov, int niov, int64_t offset,
                                 int64_t len, int rwflags)
{
    UringOp op = {
        .opcode = write ? IORING_OP_WRITEV : IORING_OP_READV,
        .fd = fd,
        .iov = iov,
        .niov = niov,
        .offset = offset,
        .len = len,
        .rwflags = rwflags,
        /*
         * A read goes to the kernel at once while the loop has idle
         * time: the disk gets it before the rest of this iteration's
         * work.  A busy loop batches (an io_uring_enter, and often a
         * virtio kick, per read cost 16% on page-cache reads), and so do
         * small writes, which lost 5-11% either way.  A large write goes
         * at once: beside its transfer a system call is cheap, and the
         * disk works on it while the loop takes in the next requests'
         * data (+5% on 1 MiB writes at iodepth 4).
         */
        .eager =
            write ? len >= URING_EAGER_WRITE : aio_context_has_idle(u->ctx),
    };

    op.fixed = niov == 1 && uring_in_fixed(u, iov);
    return uring_co_run(u, &op);
}

int coroutine_fn aio_uring_co_fdatasync(AioUring *u, int fd)
{
    UringOp op = {.opcode = IORING_OP_FSYNC, .fd = fd};

    return uring_co_run(u, &op);
}

int coroutine_fn aio_uring_co_fallocate(AioUring *u, int fd, int mode,
                                        int64_t offset, int64_t len)
{
    UringOp op = {
        .opcode = IORING_OP_FALLOCATE,
        .fd = fd,
        .mode = mode,
        .offset = offset,
        .len = len,
    };

    return uring_co_run(u, &op);
}

unsigned aio_uring_pending(AioUring *u)
{
    return u->queued;
}

int aio_uring_register_buf(AioUring *u, void *base, size_t len)
{
    struct iovec iov = {.iov_base = base, .iov_len = len};
    int ret;

    if (u->fixed) {
        return -EBUSY;
    }
    ret = io_uring_register_buffers(&u->ring, &iov, 1);
    if (ret < 0) {
        return ret;
    }
    u->fixed = base;
    u->fixed_len = len;
    return 0;
}
