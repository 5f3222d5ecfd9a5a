/*
 * Linux AIO (io_submit) for the file driver's aio=native mode: one AIO
 * context per event loop, completions signalled through an eventfd that
 * the loop watches.  Like QEMU's, it needs O_DIRECT files (buffered AIO
 * would block in io_submit).
 *
 * Thread model: an AIO context belongs to its AioContext; only coroutines
 * of that context use it.
 */
#ifndef BLOCKCORE_LINUX_AIO_H
#define BLOCKCORE_LINUX_AIO_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <glib.h>

#include "aio.h"

typedef struct LinuxAio LinuxAio;

/* The Linux AIO context of @ctx, created on first use.  Owner thread. */
LinuxAio *linux_aio_get(AioContext *ctx, GError **errp);

/* Like aio_uring_co_rw(): full transfers, zeros past the end of file. */
int coroutine_fn linux_aio_co_rw(LinuxAio *la, bool write, int fd,
                                 struct iovec *iov, int niov, int64_t offset,
                                 int64_t len, int rwflags);

#endif /* BLOCKCORE_LINUX_AIO_H */
