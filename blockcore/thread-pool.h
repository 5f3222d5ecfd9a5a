/*
 * The worker pool: blocking system calls (preadv, fdatasync, fallocate,
 * lseek on a file system that may read metadata) run here so that no
 * event loop ever blocks.
 *
 * Thread model: workers are shared by all event loops.  A job is queued by
 * a coroutine, which yields; the worker runs the job and wakes the
 * coroutine through aio_co_wake(), so the coroutine resumes in its own
 * event loop.  Workers are started on demand up to a limit and exit after
 * some idle time.
 */
#ifndef BLOCKCORE_THREAD_POOL_H
#define BLOCKCORE_THREAD_POOL_H

#include "util.h"

/* Runs in a worker thread; returns 0/length or -errno. */
typedef int ThreadPoolFunc(void *opaque);

/* Run @fn(@opaque) in a worker and return its result.  Coroutine only. */
int coroutine_fn thread_pool_co_run(ThreadPoolFunc *fn, void *opaque);

/* Upper bound on worker threads (default 64). */
void thread_pool_set_max_workers(int max);

/* Stop and join all workers; the pool restarts on the next job. */
void thread_pool_shutdown(void);

#endif /* BLOCKCORE_THREAD_POOL_H */
