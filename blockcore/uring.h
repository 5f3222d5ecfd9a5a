/*
 * io_uring for the file driver: one ring per event loop, so I/O needs no
 * worker thread -- the coroutine queues a request, the loop submits every
 * request queued during an iteration with one system call, and the
 * completion (the ring's fd turns readable) resumes the coroutine in the
 * same thread.
 *
 * Thread model: a ring belongs to its AioContext; only coroutines of
 * that context use it.
 */
#ifndef BLOCKCORE_URING_H
#define BLOCKCORE_URING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <glib.h>

#include "aio.h"

typedef struct AioUring AioUring;

/* The ring of @ctx, created on first use; NULL and *errp if io_uring is
 * not available.  Owner thread only. */
AioUring *aio_uring_get(AioContext *ctx, GError **errp);

/*
 * Read or write @len bytes at @offset through @iov (which may be
 * modified).  Short transfers are continued; a read reaching the end of
 * the file zero-fills the rest.  Returns 0 or -errno.
 */
int coroutine_fn aio_uring_co_rw(AioUring *u, bool write, int fd,
                                 struct iovec *iov, int niov, int64_t offset,
                                 int64_t len, int rwflags);
int coroutine_fn aio_uring_co_fdatasync(AioUring *u, int fd);
int coroutine_fn aio_uring_co_fallocate(AioUring *u, int fd, int mode,
                                        int64_t offset, int64_t len);

/*
 * A passthrough command (IORING_OP_URING_CMD) of a driver outside
 * blockcore, e.g. FUSE over io_uring.  The caller fills in the fields and
 * owns the memory until @complete runs (in the thread of the ring it was
 * queued on, with the CQE's result).  Rings have 128-byte SQEs where the
 * kernel allows, so @data is the full 80-byte command area.
 */
#define AIO_URING_CMD_DATA 80

typedef struct AioUringCmd AioUringCmd;

/* Private to uring.c: what a ring's SQE points at, in a list. */
typedef struct AioUringLink {
    struct AioUringLink *next; /* waiting for room, or completed */
    bool cmd;                  /* an AioUringCmd, else a file operation */
} AioUringLink;

struct AioUringCmd {
    int fd;
    uint32_t cmd_op;
    uint64_t addr;
    uint32_t len;
    uint8_t data[AIO_URING_CMD_DATA];
    /*
     * Heavy: the kernel does a lot of work in io_uring_enter for it (a
     * large copy).  It goes in an io_uring_enter of its own, after the
     * file operations ready with it, and the thread looks for new work
     * between two heavy commands.
     */
    bool heavy;
    void (*complete)(AioUringCmd *cmd, int res);
    /* private */
    AioUringLink link;
    int res;
};

/* Operations prepared but not yet handed to the kernel. */
unsigned aio_uring_pending(AioUring *u);

/*
 * Register @len bytes at @base with the ring (one buffer per ring):
 * reads and writes of one iovec inside it then skip the page pinning of
 * every request.  The memory stays pinned, and must stay mapped, for the
 * ring's life.  0 or -errno (-ENOMEM past RLIMIT_MEMLOCK without
 * CAP_IPC_LOCK, -EBUSY if the ring has one).  Owner thread only.
 */
int aio_uring_register_buf(AioUring *u, void *base, size_t len);

/* Can this ring carry AioUringCmds (it has 128-byte SQEs)? */
bool aio_uring_has_cmds(AioUring *u);

/* Queue @cmd; it goes to the kernel with this loop iteration's batch
 * (a heavy one perhaps with a later one).  Owner thread only. */
void aio_uring_queue_cmd(AioUring *u, AioUringCmd *cmd);

/* The ring of the calling thread's event loop, if it has one. */
AioUring *aio_uring_current(void);

#endif /* BLOCKCORE_URING_H */
