/*
 * Event loops (AioContext), bottom halves, timers and iothreads.
 *
 * Thread model: an AioContext is run by exactly one thread at a time, the
 * thread that calls aio_poll() on it -- normally its iothread, or the main
 * thread while it opens drives before the iothreads start.  That thread is
 * the only one that may add fd handlers or timers, or enter the
 * context's coroutines.  Other threads (the worker pool, librbd's
 * callbacks, the main thread) talk to it only through the thread-safe
 * calls marked "any thread": aio_bh_schedule(), aio_bh_schedule_oneshot(),
 * aio_co_wake(), aio_notify() and aio_run_sync().
 */
#ifndef BLOCKCORE_AIO_H
#define BLOCKCORE_AIO_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

#include "coroutine.h"
#include "util.h"

typedef struct AioContext AioContext;
typedef struct AioBH AioBH;
typedef struct AioTimer AioTimer;
typedef struct IOThread IOThread;

typedef void IOHandler(void *opaque);
typedef void BHFunc(void *opaque);

AioContext *aio_context_new(const char *name, GError **errp);
/* The context must be idle: no handlers, timers or scheduled work. */
void aio_context_free(AioContext *ctx);
const char *aio_context_name(AioContext *ctx);

/*
 * The context the calling thread is running, or NULL.  An iothread sets it
 * for its lifetime; aio_context_borrow() sets it temporarily.
 */
AioContext *aio_current(void);
/* Run @ctx on the calling thread until aio_context_return(); returns the
 * previously current context. */
AioContext *aio_context_borrow(AioContext *ctx);
void aio_context_return(AioContext *prev);

/*
 * Watch @fd: @io_read/@io_write run when it is readable/writable.  Both
 * NULL removes the handler.  Owner thread only.
 */
void aio_set_fd_handler(AioContext *ctx, int fd, IOHandler *io_read,
                        IOHandler *io_write, void *opaque);

/*
 * One iteration: wait for events (only if @blocking and nothing is
 * pending), then run fd handlers, bottom halves, woken coroutines and
 * expired timers.  Returns true if anything ran.  Owner thread only.
 */
bool aio_poll(AioContext *ctx, bool blocking);

/* Spin up to @max_ns for events before sleeping (0: never).  Owner
 * thread or before the context runs. */
void aio_context_set_poll_max_ns(AioContext *ctx, int64_t max_ns);

/*
 * Did @ctx's loop spend at least a quarter of the last millisecond or so
 * waiting for events?  A context with idle time can trade system calls
 * for latency; a saturated one should batch.  Owner thread only.
 */
bool aio_context_has_idle(AioContext *ctx);

/* Wake a context sleeping in aio_poll().  Any thread. */
void aio_notify(AioContext *ctx);

/* Bottom halves: a callback run once by the context's thread. */
AioBH *aio_bh_new(AioContext *ctx, BHFunc *cb, void *opaque);
/* Any thread.  Scheduling an already scheduled BH does nothing. */
void aio_bh_schedule(AioBH *bh);
/* Owner thread; a scheduled BH is cancelled. */
void aio_bh_delete(AioBH *bh);
/* Any thread: run @cb(@opaque) once in @ctx. */
void aio_bh_schedule_oneshot(AioContext *ctx, BHFunc *cb, void *opaque);

/*
 * Resume @co from its home context's loop.  Any thread.  Waking a
 * coroutine that is not waiting is a bug and aborts.
 */
void aio_co_wake(Coroutine *co);
/* Enter a new coroutine running @entry in @ctx, from any thread. */
void aio_co_spawn(AioContext *ctx, CoroutineEntry *entry, void *opaque);

/* Timers on CLOCK_MONOTONIC, in nanoseconds.  Owner thread only. */
int64_t aio_clock_ns(void);
AioTimer *aio_timer_new(AioContext *ctx, BHFunc *cb, void *opaque);
void aio_timer_mod(AioTimer *t, int64_t expire_ns);
void aio_timer_del(AioTimer *t);
bool aio_timer_pending(AioTimer *t);
void aio_timer_free(AioTimer *t);

/* Sleep the current coroutine for @ns nanoseconds. */
void coroutine_fn co_sleep_ns(int64_t ns);

/*
 * Run @fn(@opaque) in @ctx's thread and wait for it to return.  If @ctx
 * is current or has no running thread, it runs right here.  Any thread
 * except a coroutine of @ctx.
 */
void aio_run_sync(AioContext *ctx, void (*fn)(void *), void *opaque);

/*
 * Run the coroutine function @fn(@opaque) in @ctx and wait until it has
 * returned, polling @ctx here if it is ours or has no thread yet.  Results
 * travel through @opaque.  Not from coroutine context.
 */
void aio_co_run_sync(AioContext *ctx, CoroutineEntry *fn, void *opaque);

/*
 * Per-context state of other modules (the io_uring ring, the Linux AIO
 * context of the file driver), destroyed with the context.  Owner thread
 * only.
 */
typedef enum AioSlot {
    AIO_SLOT_URING,
    AIO_SLOT_LINUX_AIO,
    AIO_SLOT_COUNT,
} AioSlot;

void *aio_context_slot(AioContext *ctx, AioSlot slot);
void aio_context_set_slot(AioContext *ctx, AioSlot slot, void *state,
                          void (*destroy)(void *state));

/* Iothreads: a thread running one AioContext until stopped. */
IOThread *iothread_new(const char *name, GError **errp);
AioContext *iothread_get_ctx(IOThread *t);
/* Start the thread (the context can be prepared before that). */
int iothread_start(IOThread *t, GError **errp);
/* Stop the loop, join the thread and free it with its context. */
void iothread_free(IOThread *t);

#endif /* BLOCKCORE_AIO_H */
