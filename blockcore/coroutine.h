/*
 * Coroutines and the locks that coroutines use.
 *
 * A coroutine is a function with its own stack that can give up the CPU
 * (co_yield) and be resumed later (co_enter) on the same thread.  Every
 * request in imgfs runs in one: the FUSE layer creates it, the block layer
 * and the drivers yield while I/O is in flight, and the event loop resumes
 * it when the I/O completes.
 *
 * Thread model: a coroutine belongs to the AioContext that was current on
 * the thread where it was first entered (its home context) and never runs
 * anywhere else.  Only aio_co_wake() may be called from another thread;
 * everything else here must be called on the coroutine's home thread.
 * The locks (CoMutex, CoRwLock, CoQueue) are therefore plain data with no
 * atomics: all their users run on one thread.
 */
#ifndef BLOCKCORE_COROUTINE_H
#define BLOCKCORE_COROUTINE_H

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

typedef struct Coroutine Coroutine;
typedef struct AioContext AioContext;
typedef void coroutine_fn CoroutineEntry(void *opaque);

/* Allocate a coroutine that will run @entry(@opaque) when first entered. */
Coroutine *co_create(CoroutineEntry *entry, void *opaque);

/*
 * Run @co until it yields or returns.  When it returns, its resources go
 * back to the per-thread pool.  May be called from a coroutine (the
 * entered coroutine then yields back to the caller).  @co must not be
 * running already.
 */
void co_enter(Coroutine *co);

/* Give control back to whoever entered the current coroutine. */
void coroutine_fn co_yield (void);

/* The running coroutine, or NULL outside coroutine context. */
Coroutine *co_self(void);
bool co_in_coroutine(void);

/* The AioContext that resumes @co (set when it is first entered). */
AioContext *co_get_ctx(Coroutine *co);

/* Free the calling thread's pool of idle coroutines (at thread exit). */
void co_pool_drain(void);

/*
 * CoQueue: coroutines waiting for something.  A woken coroutine is
 * resumed from its event loop, not immediately, so a waker never runs
 * another coroutine's code on its own stack.
 */
typedef struct CoQueue {
    Coroutine *head;
    Coroutine *tail;
} CoQueue;

typedef struct CoMutex CoMutex;

void co_queue_init(CoQueue *q);
/* Wait until woken.  If @mutex is given it is released while waiting. */
void coroutine_fn co_queue_wait(CoQueue *q, CoMutex *mutex);
/* Wake the first waiter; returns false if there was none. */
bool co_queue_next(CoQueue *q);
void co_queue_restart_all(CoQueue *q);
bool co_queue_empty(const CoQueue *q);

/* A mutex for coroutines: lock hand-over is FIFO. */
struct CoMutex {
    bool locked;
    Coroutine *holder;
    CoQueue waiters;
};

void co_mutex_init(CoMutex *m);
void coroutine_fn co_mutex_lock(CoMutex *m);
void co_mutex_unlock(CoMutex *m);
bool co_mutex_trylock(CoMutex *m);

/* A FIFO-fair reader/writer lock for coroutines. */
typedef struct CoRwWaiter CoRwWaiter;
typedef struct CoRwLock {
    int readers;
    bool writer;
    CoRwWaiter *head;
    CoRwWaiter *tail;
} CoRwLock;

void co_rwlock_init(CoRwLock *l);
void coroutine_fn co_rwlock_rdlock(CoRwLock *l);
void coroutine_fn co_rwlock_wrlock(CoRwLock *l);
void co_rwlock_unlock(CoRwLock *l);

#endif /* BLOCKCORE_COROUTINE_H */
