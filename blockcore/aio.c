/*
 * The event loop: epoll for fd handlers, an eventfd for cross-thread
 * wake-ups, a locked list of scheduled bottom halves, a locked list of
 * coroutines to resume, and a sorted list of timers.
 *
 * Wake-ups from other threads are batched: aio_notify() writes the
 * eventfd only when no earlier notification is still unread, and the
 * loop clears that flag before it drains the lists, so no work is ever
 * left behind a missed wake-up.
 */
#include "aio.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "coroutine-int.h"
#include "log.h"

/* how often a context re-judges its load (aio_context_has_idle) */
#define AIO_LOAD_WINDOW_NS 1000000

typedef struct AioHandler AioHandler;

struct AioHandler {
    int fd;
    IOHandler *io_read;
    IOHandler *io_write;
    void *opaque;
    bool deleted;
    AioHandler *next;
};

struct AioBH {
    AioContext *ctx;
    BHFunc *cb;
    void *opaque;
    bool oneshot;
    bool scheduled; /* protected by ctx->lock */
    bool deleted;   /* protected by ctx->lock */
    AioBH *next;    /* protected by ctx->lock while scheduled */
};

struct AioTimer {
    AioContext *ctx;
    BHFunc *cb;
    void *opaque;
    int64_t expire_ns;
    bool pending;
    AioTimer *next;
};

struct AioContext {
    char *name;
    int epfd;
    int evfd;
    int notified; /* atomic: an eventfd write is not yet consumed */

    pthread_mutex_t lock;
    AioBH *bh_head;       /* protected by lock */
    AioBH *bh_tail;       /* protected by lock */
    Coroutine *wake_head; /* protected by lock */
    Coroutine *wake_tail; /* protected by lock */

    /* Owner thread only. */
    AioHandler *handlers;
    AioHandler *zombies; /* deleted while dispatching; freed afterwards */
    bool dispatching;
    AioTimer *timers;

    /* Set while an iothread runs this context (atomic). */
    int thread_running;

    /* Adaptive busy polling before sleeping (owner thread only). */
    int64_t poll_max_ns;
    int64_t poll_ns;

    /* Load (owner thread only): time waiting for events and working in
     * the current window, and whether the last window had idle time. */
    int64_t window_idle_ns;
    int64_t window_busy_ns;
    int64_t wait_end_ns; /* when the last wait ended, 0: none yet */
    bool has_idle;

    void *slots[AIO_SLOT_COUNT];
    void (*slot_destroy[AIO_SLOT_COUNT])(void *);
};

void *aio_context_slot(AioContext *ctx, AioSlot slot)
{
    return ctx->slots[slot];
}

void aio_context_set_slot(AioContext *ctx, AioSlot slot, void *state,
                          void (*destroy)(void *state))
{
    ctx->slots[slot] = state;
    ctx->slot_destroy[slot] = destroy;
}

static __thread AioContext *aio_tls_current;

AioContext *aio_current(void)
{
    return aio_tls_current;
}

AioContext *aio_context_borrow(AioContext *ctx)
{
    AioContext *prev = aio_tls_current;

    aio_tls_current = ctx;
    return prev;
}

void aio_context_return(AioContext *prev)
{
    aio_tls_current = prev;
}

AioContext *aio_context_new(const char *name, GError **errp)
{
    AioContext *ctx = g_new0(AioContext, 1);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};

    ctx->name = g_strdup(name);
    ctx->epfd = epoll_create1(EPOLL_CLOEXEC);
    ctx->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ctx->epfd < 0 || ctx->evfd < 0 ||
        epoll_ctl(ctx->epfd, EPOLL_CTL_ADD, ctx->evfd, &ev) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot create event loop %s: %s", name, g_strerror(errno));
        if (ctx->epfd >= 0) {
            close(ctx->epfd);
        }
        if (ctx->evfd >= 0) {
            close(ctx->evfd);
        }
        g_free(ctx->name);
        g_free(ctx);
        return NULL;
    }
    pthread_mutex_init(&ctx->lock, NULL);
    return ctx;
}

void aio_context_free(AioContext *ctx)
{
    AioBH *bh, *next;
    int i;

    if (!ctx) {
        return;
    }
    for (i = 0; i < AIO_SLOT_COUNT; i++) {
        if (ctx->slots[i] && ctx->slot_destroy[i]) {
            ctx->slot_destroy[i](ctx->slots[i]);
        }
        ctx->slots[i] = NULL;
    }
    /* Oneshot or deleted BHs that never ran. */
    for (bh = ctx->bh_head; bh; bh = next) {
        next = bh->next;
        if (bh->oneshot || bh->deleted) {
            g_free(bh);
        }
    }
    while (ctx->handlers) {
        AioHandler *h = ctx->handlers;

        ctx->handlers = h->next;
        g_free(h);
    }
    close(ctx->epfd);
    close(ctx->evfd);
    pthread_mutex_destroy(&ctx->lock);
    g_free(ctx->name);
    g_free(ctx);
}

const char *aio_context_name(AioContext *ctx)
{
    return ctx->name;
}

void aio_notify(AioContext *ctx)
{
    uint64_t one = 1;

    /* The owner looks at its lists before it sleeps: no wake-up needed. */
    if (aio_tls_current == ctx) {
        return;
    }
    if (!__atomic_exchange_n(&ctx->notified, 1, __ATOMIC_SEQ_CST)) {
        if (write(ctx->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN) {
            log_error("event loop %s: cannot notify: %s", ctx->name,
                      strerror(errno));
        }
    }
}

static void aio_consume_notify(AioContext *ctx)
{
    uint64_t val;

    if (read(ctx->evfd, &val, sizeof(val)) < 0 && errno != EAGAIN) {
        log_error("event loop %s: eventfd read: %s", ctx->name,
                  strerror(errno));
    }
    __atomic_store_n(&ctx->notified, 0, __ATOMIC_SEQ_CST);
}

void aio_set_fd_handler(AioContext *ctx, int fd, IOHandler *io_read,
                        IOHandler *io_write, void *opaque)
{
    AioHandler *h, **link;
    struct epoll_event ev;

    for (link = &ctx->handlers; *link; link = &(*link)->next) {
        if ((*link)->fd == fd) {
            break;
        }
    }
    h = *link;

    if (!io_read && !io_write) {
        if (!h) {
            return;
        }
        epoll_ctl(ctx->epfd, EPOLL_CTL_DEL, fd, NULL);
        *link = h->next;
        h->deleted = true;
        if (ctx->dispatching) {
            h->next = ctx->zombies;
            ctx->zombies = h;
        } else {
            g_free(h);
        }
        return;
    }

    ev.events = (io_read ? EPOLLIN : 0) | (io_write ? EPOLLOUT : 0);
    if (h) {
        h->io_read = io_read;
        h->io_write = io_write;
        h->opaque = opaque;
        ev.data.ptr = h;
        epoll_ctl(ctx->epfd, EPOLL_CTL_MOD, fd, &ev);
        return;
    }
    h = g_new0(AioHandler, 1);
    h->fd = fd;
    h->io_read = io_read;
    h->io_write = io_write;
    h->opaque = opaque;
    ev.data.ptr = h;
    if (epoll_ctl(ctx->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        log_error("event loop %s: cannot watch fd %d: %s", ctx->name, fd,
                  strerror(errno));
        g_free(h);
        return;
    }
    h->next = ctx->handlers;
    ctx->handlers = h;
}

AioBH *aio_bh_new(AioContext *ctx, BHFunc *cb, void *opaque)
{
    AioBH *bh = g_new0(AioBH, 1);

    bh->ctx = ctx;
    bh->cb = cb;
    bh->opaque = opaque;
    return bh;
}

void aio_bh_schedule(AioBH *bh)
{
    AioContext *ctx = bh->ctx;

    pthread_mutex_lock(&ctx->lock);
    if (bh->scheduled) {
        pthread_mutex_unlock(&ctx->lock);
        return;
    }
    bh->scheduled = true;
    bh->next = NULL;
    if (ctx->bh_tail) {
        ctx->bh_tail->next = bh;
    } else {
        ctx->bh_head = bh;
    }
    ctx->bh_tail = bh;
    pthread_mutex_unlock(&ctx->lock);
    aio_notify(ctx);
}

void aio_bh_delete(AioBH *bh)
{
    AioContext *ctx = bh->ctx;
    bool free_now;

    pthread_mutex_lock(&ctx->lock);
    free_now = !bh->scheduled;
    bh->deleted = true;
    pthread_mutex_unlock(&ctx->lock);
    if (free_now) {
        g_free(bh);
    }
}

void aio_bh_schedule_oneshot(AioContext *ctx, BHFunc *cb, void *opaque)
{
    AioBH *bh = aio_bh_new(ctx, cb, opaque);

    bh->oneshot = true;
    aio_bh_schedule(bh);
}

static bool aio_bh_poll(AioContext *ctx)
{
    AioBH *bh;
    Coroutine *co;
    bool progress = false;

    pthread_mutex_lock(&ctx->lock);
    bh = ctx->bh_head;
    ctx->bh_head = ctx->bh_tail = NULL;
    co = ctx->wake_head;
    ctx->wake_head = ctx->wake_tail = NULL;
    pthread_mutex_unlock(&ctx->lock);

    while (bh) {
        AioBH *next;
        bool deleted;

        /* Keep "scheduled" set until here, so a concurrent
         * aio_bh_schedule() cannot relink a BH still on our list. */
        pthread_mutex_lock(&ctx->lock);
        next = bh->next;
        bh->scheduled = false;
        deleted = bh->deleted;
        pthread_mutex_unlock(&ctx->lock);
        if (deleted) {
            g_free(bh);
        } else if (bh->oneshot) {
            bh->cb(bh->opaque);
            g_free(bh);
        } else {
            bh->cb(bh->opaque); /* may aio_bh_delete() it: not used after */
        }
        progress = true;
        bh = next;
    }

    while (co) {
        Coroutine *next = co->next_wake;

        co->next_wake = NULL;
        __atomic_store_n(&co->wake_pending, 0, __ATOMIC_SEQ_CST);
        co_enter(co);
        progress = true;
        co = next;
    }
    return progress;
}

void aio_co_wake(Coroutine *co)
{
    AioContext *ctx = co->ctx;

    if (__atomic_exchange_n(&co->wake_pending, 1, __ATOMIC_SEQ_CST)) {
        fprintf(stderr, "imgfs: coroutine woken twice\n");
        abort();
    }
    pthread_mutex_lock(&ctx->lock);
    co->next_wake = NULL;
    if (ctx->wake_tail) {
        ctx->wake_tail->next_wake = co;
    } else {
        ctx->wake_head = co;
    }
    ctx->wake_tail = co;
    pthread_mutex_unlock(&ctx->lock);
    aio_notify(ctx);
}

typedef struct CoSpawn {
    CoroutineEntry *entry;
    void *opaque;
} CoSpawn;

static void aio_co_spawn_bh(void *opaque)
{
    CoSpawn *s = opaque;
    Coroutine *co = co_create(s->entry, s->opaque);

    g_free(s);
    co_enter(co);
}

void aio_co_spawn(AioContext *ctx, CoroutineEntry *entry, void *opaque)
{
    CoSpawn *s;

    if (aio_current() == ctx) {
        co_enter(co_create(entry, opaque));
        return;
    }
    s = g_new(CoSpawn, 1);
    s->entry = entry;
    s->opaque = opaque;
    aio_bh_schedule_oneshot(ctx, aio_co_spawn_bh, s);
}

int64_t aio_clock_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * INT64_C(1000000000) + ts.tv_nsec;
}

AioTimer *aio_timer_new(AioContext *ctx, BHFunc *cb, void *opaque)
{
    AioTimer *t = g_new0(AioTimer, 1);

    t->ctx = ctx;
    t->cb = cb;
    t->opaque = opaque;
    return t;
}

void aio_timer_del(AioTimer *t)
{
    AioTimer **link;

    if (!t->pending) {
        return;
    }
    for (link = &t->ctx->timers; *link; link = &(*link)->next) {
        if (*link == t) {
            *link = t->next;
            break;
        }
    }
    t->pending = false;
}

void aio_timer_mod(AioTimer *t, int64_t expire_ns)
{
    AioTimer **link;

    aio_timer_del(t);
    t->expire_ns = expire_ns;
    for (link = &t->ctx->timers; *link; link = &(*link)->next) {
        if ((*link)->expire_ns > expire_ns) {
            break;
        }
    }
    t->next = *link;
    *link = t;
    t->pending = true;
}

bool aio_timer_pending(AioTimer *t)
{
    return t->pending;
}

void aio_timer_free(AioTimer *t)
{
    if (t) {
        aio_timer_del(t);
        g_free(t);
    }
}

static bool aio_timers_run(AioContext *ctx)
{
    bool progress = false;
    int64_t now;

    if (!ctx->timers) {
        return false;
    }
    now = aio_clock_ns();
    while (ctx->timers && ctx->timers->expire_ns <= now) {
        AioTimer *t = ctx->timers;

        ctx->timers = t->next;
        t->pending = false;
        t->cb(t->opaque);
        progress = true;
    }
    return progress;
}

static void co_sleep_cb(void *opaque)
{
    aio_co_wake(opaque);
}

void coroutine_fn co_sleep_ns(int64_t ns)
{
    Coroutine *self = co_self();
    AioTimer *t = aio_timer_new(co_get_ctx(self), co_sleep_cb, self);

    aio_timer_mod(t, aio_clock_ns() + ns);
    co_yield ();
    aio_timer_free(t);
}

void aio_context_set_poll_max_ns(AioContext *ctx, int64_t max_ns)
{
    ctx->poll_max_ns = max_ns > 0 ? max_ns : 0;
    ctx->poll_ns = 0;
}

/*
 * Wait for events, first spinning for up to poll_ns: a request or a
 * completion that arrives within microseconds then costs no sleep and no
 * wake-up.  The window adapts like QEMU's iothreads: it grows while events
 * arrive a little after it ends and shrinks when waits are long.
 */
static int aio_poll_wait(AioContext *ctx, struct epoll_event *events, int max,
                         struct timespec *tsp, int64_t start, int64_t *end)
{
    int64_t block_ns;
    int n = 0;

    if (ctx->poll_ns > 0) {
        do {
            n = epoll_wait(ctx->epfd, events, max, 0);
        } while (n == 0 && aio_clock_ns() - start < ctx->poll_ns);
    }
    if (n == 0) {
        n = epoll_pwait2(ctx->epfd, events, max, tsp, NULL);
    }
    *end = aio_clock_ns();
    block_ns = *end - start;
    if (block_ns <= ctx->poll_ns) {
        /* polling was enough */
    } else if (block_ns > ctx->poll_max_ns) {
        ctx->poll_ns = ctx->poll_ns > 8000 ? ctx->poll_ns / 2 : 0;
    } else if (ctx->poll_ns < ctx->poll_max_ns) {
        ctx->poll_ns = ctx->poll_ns ? ctx->poll_ns * 2 : 4000;
        if (ctx->poll_ns > ctx->poll_max_ns) {
            ctx->poll_ns = ctx->poll_max_ns;
        }
    }
    return n;
}

/*
 * Account a wait from @start to @end (and the work since the previous
 * one).  Every AIO_LOAD_WINDOW_NS the window closes: the context "has
 * idle time" if it spent at least a quarter of it waiting.
 */
static void aio_account_load(AioContext *ctx, int64_t start, int64_t end)
{
    int64_t total;

    if (ctx->wait_end_ns) {
        ctx->window_busy_ns += start - ctx->wait_end_ns;
    }
    ctx->window_idle_ns += end - start;
    ctx->wait_end_ns = end;
    total = ctx->window_idle_ns + ctx->window_busy_ns;
    if (total >= AIO_LOAD_WINDOW_NS) {
        ctx->has_idle = ctx->window_idle_ns * 4 >= total;
        ctx->window_idle_ns = ctx->window_busy_ns = 0;
    }
}

bool aio_context_has_idle(AioContext *ctx)
{
    return ctx->has_idle;
}

bool aio_poll(AioContext *ctx, bool blocking)
{
    struct epoll_event events[64];
    int64_t start, end;
    struct timespec ts, *tsp = &ts;
    bool progress = false;
    int64_t wait_ns = 0;
    int n, i;

    if (blocking) {
        bool pending;

        pthread_mutex_lock(&ctx->lock);
        pending = ctx->bh_head || ctx->wake_head;
        pthread_mutex_unlock(&ctx->lock);
        if (!pending) {
            if (ctx->timers) {
                wait_ns = ctx->timers->expire_ns - aio_clock_ns();
                if (wait_ns < 0) {
                    wait_ns = 0;
                }
            } else {
                wait_ns = -1;
            }
        }
    }
    if (wait_ns < 0) {
        tsp = NULL;
    } else {
        ts.tv_sec = wait_ns / 1000000000;
        ts.tv_nsec = wait_ns % 1000000000;
    }

    start = aio_clock_ns();
    if (wait_ns != 0 && ctx->poll_max_ns > 0) {
        n = aio_poll_wait(ctx, events, ARRAY_SIZE(events), tsp, start, &end);
    } else {
        n = epoll_pwait2(ctx->epfd, events, ARRAY_SIZE(events), tsp, NULL);
        end = aio_clock_ns();
    }
    aio_account_load(ctx, start, end);
    if (n < 0 && errno != EINTR) {
        log_error("event loop %s: epoll: %s", ctx->name, strerror(errno));
    }

    ctx->dispatching = true;
    for (i = 0; i < n; i++) {
        AioHandler *h = events[i].data.ptr;
        uint32_t ev = events[i].events;

        if (!h) {
            aio_consume_notify(ctx);
            continue;
        }
        if (!h->deleted && h->io_read &&
            (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
            h->io_read(h->opaque);
            progress = true;
        }
        if (!h->deleted && h->io_write &&
            (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))) {
            h->io_write(h->opaque);
            progress = true;
        }
    }
    ctx->dispatching = false;
    while (ctx->zombies) {
        AioHandler *h = ctx->zombies;

        ctx->zombies = h->next;
        g_free(h);
    }

    progress |= aio_bh_poll(ctx);
    progress |= aio_timers_run(ctx);
    return progress;
}

typedef struct RunSync {
    void (*fn)(void *);
    void *opaque;
    bool done;
    GMutex lock;
    GCond cond;
} RunSync;

static void aio_run_sync_bh(void *opaque)
{
    RunSync *rs = opaque;

    rs->fn(rs->opaque);
    g_mutex_lock(&rs->lock);
    rs->done = true;
    g_cond_signal(&rs->cond);
    g_mutex_unlock(&rs->lock);
}

static bool aio_context_has_thread(AioContext *ctx)
{
    return __atomic_load_n(&ctx->thread_running, __ATOMIC_SEQ_CST);
}

void aio_run_sync(AioContext *ctx, void (*fn)(void *), void *opaque)
{
    RunSync rs = {.fn = fn, .opaque = opaque};
    AioContext *prev;

    if (aio_current() == ctx) {
        fn(opaque);
        return;
    }
    if (!aio_context_has_thread(ctx)) {
        prev = aio_context_borrow(ctx);
        fn(opaque);
        aio_context_return(prev);
        return;
    }
    g_mutex_init(&rs.lock);
    g_cond_init(&rs.cond);
    aio_bh_schedule_oneshot(ctx, aio_run_sync_bh, &rs);
    g_mutex_lock(&rs.lock);
    while (!rs.done) {
        g_cond_wait(&rs.cond, &rs.lock);
    }
    g_mutex_unlock(&rs.lock);
    g_mutex_clear(&rs.lock);
    g_cond_clear(&rs.cond);
}

typedef struct CoRunSync {
    CoroutineEntry *fn;
    void *opaque;
    bool done;
    bool cross_thread;
    GMutex lock;
    GCond cond;
} CoRunSync;

static void coroutine_fn aio_co_run_sync_entry(void *opaque)
{
    CoRunSync *s = opaque;

    s->fn(s->opaque);
    if (s->cross_thread) {
        g_mutex_lock(&s->lock);
        s->done = true;
        g_cond_signal(&s->cond);
        g_mutex_unlock(&s->lock);
    } else {
        s->done = true;
    }
}

void aio_co_run_sync(AioContext *ctx, CoroutineEntry *fn, void *opaque)
{
    CoRunSync s = {.fn = fn, .opaque = opaque};

    g_assert(!co_in_coroutine());
    if (aio_current() == ctx || !aio_context_has_thread(ctx)) {
        AioContext *prev = aio_context_borrow(ctx);

        co_enter(co_create(aio_co_run_sync_entry, &s));
        while (!s.done) {
            aio_poll(ctx, true);
        }
        aio_context_return(prev);
        return;
    }
    s.cross_thread = true;
    g_mutex_init(&s.lock);
    g_cond_init(&s.cond);
    aio_co_spawn(ctx, aio_co_run_sync_entry, &s);
    g_mutex_lock(&s.lock);
    while (!s.done) {
        g_cond_wait(&s.cond, &s.lock);
    }
    g_mutex_unlock(&s.lock);
    g_mutex_clear(&s.lock);
    g_cond_clear(&s.cond);
}

struct IOThread {
    char *name;
    AioContext *ctx;
    pthread_t thread;
    bool started;
    int stopping; /* atomic */
};

IOThread *iothread_new(const char *name, GError **errp)
{
    IOThread *t = g_new0(IOThread, 1);

    t->name = g_strdup(name);
    t->ctx = aio_context_new(name, errp);
    if (!t->ctx) {
        g_free(t->name);
        g_free(t);
        return NULL;
    }
    return t;
}

AioContext *iothread_get_ctx(IOThread *t)
{
    return t->ctx;
}

static void *iothread_run(void *opaque)
{
    IOThread *t = opaque;
    char tname[16];

    g_strlcpy(tname, t->name, sizeof(tname));
    pthread_setname_np(pthread_self(), tname);
    aio_context_borrow(t->ctx);
    while (!__atomic_load_n(&t->stopping, __ATOMIC_SEQ_CST)) {
        aio_poll(t->ctx, true);
    }
    /* Finish whatever was scheduled before the stop request. */
    while (aio_poll(t->ctx, false)) {
    }
    __atomic_store_n(&t->ctx->thread_running, 0, __ATOMIC_SEQ_CST);
    aio_context_borrow(NULL);
    co_pool_drain();
    return NULL;
}

int iothread_start(IOThread *t, GError **errp)
{
    int ret;

    __atomic_store_n(&t->ctx->thread_running, 1, __ATOMIC_SEQ_CST);
    ret = pthread_create(&t->thread, NULL, iothread_run, t);
    if (ret) {
        __atomic_store_n(&t->ctx->thread_running, 0, __ATOMIC_SEQ_CST);
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(ret),
                    "cannot start %s: %s", t->name, g_strerror(ret));
        return -ret;
    }
    t->started = true;
    return 0;
}

void iothread_free(IOThread *t)
{
    if (!t) {
        return;
    }
    if (t->started) {
        __atomic_store_n(&t->stopping, 1, __ATOMIC_SEQ_CST);
        aio_notify(t->ctx);
        pthread_join(t->thread, NULL);
    }
    aio_context_free(t->ctx);
    g_free(t->name);
    g_free(t);
}
