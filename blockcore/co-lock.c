/*
 * CoQueue, CoMutex and CoRwLock.  All users of one lock run on the same
 * thread (a drive's coroutines never leave their home event loop), so the
 * state needs no atomics; waking goes through aio_co_wake() so the woken
 * coroutine runs from the event loop, after the waker has yielded.
 */
#include "coroutine-int.h"

#include <assert.h>

#include "aio.h"

void co_queue_init(CoQueue *q)
{
    q->head = q->tail = NULL;
}

static void co_queue_push(CoQueue *q, Coroutine *co)
{
    co->next_waiter = NULL;
    if (q->tail) {
        q->tail->next_waiter = co;
    } else {
        q->head = co;
    }
    q->tail = co;
}

static Coroutine *co_queue_pop(CoQueue *q)
{
    Coroutine *co = q->head;

    if (co) {
        q->head = co->next_waiter;
        if (!q->head) {
            q->tail = NULL;
        }
        co->next_waiter = NULL;
    }
    return co;
}

void coroutine_fn co_queue_wait(CoQueue *q, CoMutex *mutex)
{
    Coroutine *self = co_self();

    assert(self);
    co_queue_push(q, self);
    if (mutex) {
        co_mutex_unlock(mutex);
    }
    co_yield ();
    if (mutex) {
        co_mutex_lock(mutex);
    }
}

bool co_queue_next(CoQueue *q)
{
    Coroutine *co = co_queue_pop(q);

    if (!co) {
        return false;
    }
    aio_co_wake(co);
    return true;
}

void co_queue_restart_all(CoQueue *q)
{
    while (co_queue_next(q)) {
    }
}

bool co_queue_empty(const CoQueue *q)
{
    return q->head == NULL;
}

void co_mutex_init(CoMutex *m)
{
    m->locked = false;
    m->holder = NULL;
    co_queue_init(&m->waiters);
}

bool co_mutex_trylock(CoMutex *m)
{
    if (m->locked) {
        return false;
    }
    m->locked = true;
    m->holder = co_self();
    return true;
}

void coroutine_fn co_mutex_lock(CoMutex *m)
{
    Coroutine *self = co_self();

    assert(self);
    if (!m->locked) {
        m->locked = true;
        m->holder = self;
        return;
    }
    assert(m->holder != self);
    co_queue_push(&m->waiters, self);
    co_yield ();
    /* co_mutex_unlock() handed the lock to us before waking us. */
    assert(m->locked && m->holder == self);
}

void co_mutex_unlock(CoMutex *m)
{
    Coroutine *next;

    assert(m->locked);
    next = co_queue_pop(&m->waiters);
    if (next) {
        m->holder = next;
        aio_co_wake(next);
    } else {
        m->locked = false;
        m->holder = NULL;
    }
}

struct CoRwWaiter {
    Coroutine *co;
    bool write;
    CoRwWaiter *next;
};

void co_rwlock_init(CoRwLock *l)
{
    l->readers = 0;
    l->writer = false;
    l->head = l->tail = NULL;
}

static void coroutine_fn co_rwlock_wait(CoRwLock *l, bool write)
{
    CoRwWaiter w = {.co = co_self(), .write = write};

    if (l->tail) {
        l->tail->next = &w;
    } else {
        l->head = &w;
    }
    l->tail = &w;
    co_yield ();
    /* co_rwlock_grant() gave us the lock and unlinked us. */
}

void coroutine_fn co_rwlock_rdlock(CoRwLock *l)
{
    if (!l->writer && !l->head) {
        l->readers++;
        return;
    }
    co_rwlock_wait(l, false);
}

void coroutine_fn co_rwlock_wrlock(CoRwLock *l)
{
    if (!l->writer && l->readers == 0 && !l->head) {
        l->writer = true;
        return;
    }
    co_rwlock_wait(l, true);
}

/* Hand the lock to as many queued waiters as may hold it, in order. */
static void co_rwlock_grant(CoRwLock *l)
{
    while (l->head) {
        CoRwWaiter *w = l->head;

        if (w->write) {
            if (l->writer || l->readers) {
                return;
            }
            l->writer = true;
        } else {
            if (l->writer) {
                return;
            }
            l->readers++;
        }
        l->head = w->next;
        if (!l->head) {
            l->tail = NULL;
        }
        aio_co_wake(w->co);
        if (w->write) {
            return;
        }
    }
}

void co_rwlock_unlock(CoRwLock *l)
{
    if (l->writer) {
        l->writer = false;
    } else {
        assert(l->readers > 0);
        l->readers--;
    }
    co_rwlock_grant(l);
}
