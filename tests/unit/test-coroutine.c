/*
 * Unit tests for coroutines, the coroutine locks, the event loop (bottom
 * halves, timers, cross-thread wake-ups) and the worker pool.
 */
#include <glib.h>
#include <unistd.h>

#include "blockcore/aio.h"
#include "blockcore/coroutine.h"
#include "blockcore/thread-pool.h"

static AioContext *test_ctx;

static void coroutine_fn co_count_yields(void *opaque)
{
    int *n = opaque;

    (*n)++;
    co_yield ();
    (*n)++;
    co_yield ();
    (*n)++;
}

static void test_enter_yield(void)
{
    int n = 0;
    Coroutine *co = co_create(co_count_yields, &n);

    g_assert_false(co_in_coroutine());
    co_enter(co);
    g_assert_cmpint(n, ==, 1);
    co_enter(co);
    g_assert_cmpint(n, ==, 2);
    co_enter(co);
    g_assert_cmpint(n, ==, 3);
    g_assert_false(co_in_coroutine());
}

typedef struct Nest {
    GString *log;
    Coroutine *inner;
} Nest;

static void coroutine_fn co_inner(void *opaque)
{
    Nest *n = opaque;

    g_string_append(n->log, "i1 ");
    co_yield ();
    g_string_append(n->log, "i2 ");
}

static void coroutine_fn co_outer(void *opaque)
{
    Nest *n = opaque;

    g_string_append(n->log, "o1 ");
    n->inner = co_create(co_inner, n);
    co_enter(n->inner); /* yields back to us, not to main */
    g_string_append(n->log, "o2 ");
    co_yield ();
    g_string_append(n->log, "o3 ");
}

static void test_nested(void)
{
    Nest n = {.log = g_string_new(NULL)};
    Coroutine *outer = co_create(co_outer, &n);

    co_enter(outer);
    g_assert_cmpstr(n.log->str, ==, "o1 i1 o2 ");
    co_enter(n.inner);
    co_enter(outer);
    g_assert_cmpstr(n.log->str, ==, "o1 i1 o2 i2 o3 ");
    g_string_free(n.log, TRUE);
}

static void coroutine_fn co_noop(void *opaque)
{
    (*(int *)opaque)++;
}

/* Many short coroutines: the pool must recycle stacks correctly. */
static void test_many(void)
{
    int i, n = 0;

    for (i = 0; i < 100000; i++) {
        co_enter(co_create(co_noop, &n));
    }
    g_assert_cmpint(n, ==, 100000);
}

/* Deep recursion must fit the stack (qcow2 chains recurse). */
static int coroutine_fn recurse(int depth)
{
    volatile char pad[512];

    pad[0] = (char)depth;
    return depth == 0 ? pad[0] : recurse(depth - 1) + 1;
}

static void coroutine_fn co_deep(void *opaque)
{
    *(int *)opaque = recurse(1000);
}

static void test_deep_stack(void)
{
    int r = -1;

    co_enter(co_create(co_deep, &r));
    g_assert_cmpint(r, ==, 1000);
}

typedef struct MutexTest {
    CoMutex lock;
    int inside;
    int max_inside;
    int done;
    GString *order;
} MutexTest;

static void coroutine_fn co_mutex_user(void *opaque)
{
    MutexTest *t = opaque;
    int i;

    for (i = 0; i < 3; i++) {
        co_mutex_lock(&t->lock);
        t->inside++;
        t->max_inside = MAX(t->max_inside, t->inside);
        co_sleep_ns(100000); /* hold it across a yield */
        t->inside--;
        co_mutex_unlock(&t->lock);
    }
    t->done++;
}

static void test_mutex(void)
{
    MutexTest t = {0};
    int i;

    co_mutex_init(&t.lock);
    for (i = 0; i < 10; i++) {
        aio_co_spawn(test_ctx, co_mutex_user, &t);
    }
    while (t.done < 10) {
        aio_poll(test_ctx, true);
    }
    g_assert_cmpint(t.max_inside, ==, 1);
    g_assert_false(t.lock.locked);
}

typedef struct RwTest {
    CoRwLock lock;
    int readers;
    int writers;
    int max_readers;
    bool violated;
    int done;
} RwTest;

static void coroutine_fn co_reader(void *opaque)
{
    RwTest *t = opaque;

    co_rwlock_rdlock(&t->lock);
    t->readers++;
    t->max_readers = MAX(t->max_readers, t->readers);
    if (t->writers) {
        t->violated = true;
    }
    co_sleep_ns(200000);
    t->readers--;
    co_rwlock_unlock(&t->lock);
    t->done++;
}

static void coroutine_fn co_writer(void *opaque)
{
    RwTest *t = opaque;

    co_rwlock_wrlock(&t->lock);
    t->writers++;
    if (t->writers > 1 || t->readers) {
        t->violated = true;
    }
    co_sleep_ns(200000);
    t->writers--;
    co_rwlock_unlock(&t->lock);
    t->done++;
}

static void test_rwlock(void)
{
    RwTest t = {0};
    int i;

    co_rwlock_init(&t.lock);
    for (i = 0; i < 12; i++) {
        aio_co_spawn(test_ctx, i % 4 == 3 ? co_writer : co_reader, &t);
    }
    while (t.done < 12) {
        aio_poll(test_ctx, true);
    }
    g_assert_false(t.violated);
    g_assert_cmpint(t.max_readers, >, 1);
}

typedef struct QueueTest {
    CoQueue q;
    GString *log;
    int done;
} QueueTest;

static void coroutine_fn co_waiter(void *opaque)
{
    QueueTest *t = opaque;

    co_queue_wait(&t->q, NULL);
    g_string_append_printf(t->log, "%d ", t->done++);
}

static void test_queue(void)
{
    QueueTest t = {.log = g_string_new(NULL)};
    int i;

    co_queue_init(&t.q);
    for (i = 0; i < 3; i++) {
        aio_co_spawn(test_ctx, co_waiter, &t);
    }
    g_assert_false(co_queue_empty(&t.q));
    g_assert_true(co_queue_next(&t.q));
    while (aio_poll(test_ctx, false)) {
    }
    g_assert_cmpint(t.done, ==, 1);
    co_queue_restart_all(&t.q);
    while (aio_poll(test_ctx, false)) {
    }
    g_assert_cmpint(t.done, ==, 3);
    g_assert_true(co_queue_empty(&t.q));
    g_assert_false(co_queue_next(&t.q));
    g_string_free(t.log, TRUE);
}

static int job_square(void *opaque)
{
    int *v = opaque;

    usleep(1000);
    return *v * *v;
}

typedef struct PoolTest {
    int in;
    int out;
    int *done;
} PoolTest;

static void coroutine_fn co_pool_user(void *opaque)
{
    PoolTest *p = opaque;

    p->out = thread_pool_co_run(job_square, &p->in);
    (*p->done)++;
}

/* Jobs complete on worker threads and wake coroutines in our loop. */
static void test_thread_pool(void)
{
    PoolTest p[64];
    int i, done = 0;

    for (i = 0; i < 64; i++) {
        p[i].in = i;
        p[i].done = &done;
        aio_co_spawn(test_ctx, co_pool_user, &p[i]);
    }
    while (done < 64) {
        aio_poll(test_ctx, true);
    }
    for (i = 0; i < 64; i++) {
        g_assert_cmpint(p[i].out, ==, i * i);
    }
}

static void bh_count(void *opaque)
{
    __atomic_add_fetch((int *)opaque, 1, __ATOMIC_SEQ_CST);
}

static gpointer bh_thread(gpointer opaque)
{
    int i;

    for (i = 0; i < 1000; i++) {
        aio_bh_schedule_oneshot(test_ctx, bh_count, opaque);
    }
    return NULL;
}

/* Bottom halves scheduled from other threads all run, exactly once. */
static void test_bh_cross_thread(void)
{
    int n = 0;
    GThread *t1 = g_thread_new("bh1", bh_thread, &n);
    GThread *t2 = g_thread_new("bh2", bh_thread, &n);

    while (__atomic_load_n(&n, __ATOMIC_SEQ_CST) < 2000) {
        aio_poll(test_ctx, true);
    }
    g_thread_join(t1);
    g_thread_join(t2);
    while (aio_poll(test_ctx, false)) {
    }
    g_assert_cmpint(n, ==, 2000);
}

static void test_bh_delete(void)
{
    int n = 0;
    AioBH *bh = aio_bh_new(test_ctx, bh_count, &n);

    aio_bh_schedule(bh);
    aio_bh_schedule(bh); /* coalesced */
    while (aio_poll(test_ctx, false)) {
    }
    g_assert_cmpint(n, ==, 1);
    aio_bh_schedule(bh);
    aio_bh_delete(bh); /* cancelled */
    while (aio_poll(test_ctx, false)) {
    }
    g_assert_cmpint(n, ==, 1);
}

static void timer_cb(void *opaque)
{
    g_string_append_c(opaque, 'x');
}

static void test_timers(void)
{
    GString *log = g_string_new(NULL);
    AioTimer *a = aio_timer_new(test_ctx, timer_cb, log);
    int64_t t0 = aio_clock_ns();

    aio_timer_mod(a, t0 + 20 * 1000 * 1000);
    while (log->len == 0) {
        aio_poll(test_ctx, true);
    }
    g_assert_cmpint(aio_clock_ns() - t0, >=, 20 * 1000 * 1000);
    aio_timer_mod(a, aio_clock_ns() + 1000 * 1000 * 1000);
    aio_timer_del(a);
    g_assert_false(aio_timer_pending(a));
    aio_timer_free(a);
    g_string_free(log, TRUE);
}

typedef struct SyncTest {
    AioContext *expect;
    bool ran_in_ctx;
} SyncTest;

static void coroutine_fn co_check_ctx(void *opaque)
{
    SyncTest *s = opaque;

    co_sleep_ns(1000000);
    s->ran_in_ctx =
        aio_current() == s->expect && co_get_ctx(co_self()) == s->expect;
}

/* aio_co_run_sync into a running iothread from the main thread. */
static void test_iothread_run_sync(void)
{
    IOThread *t = iothread_new("test-io", NULL);
    SyncTest s;

    g_assert_nonnull(t);
    g_assert_cmpint(iothread_start(t, NULL), ==, 0);
    s.expect = iothread_get_ctx(t);
    s.ran_in_ctx = false;
    aio_co_run_sync(s.expect, co_check_ctx, &s);
    g_assert_true(s.ran_in_ctx);
    iothread_free(t);
}

int main(int argc, char **argv)
{
    int ret;

    g_test_init(&argc, &argv, NULL);
    test_ctx = aio_context_new("test", NULL);
    aio_context_borrow(test_ctx);
    g_test_add_func("/coroutine/enter-yield", test_enter_yield);
    g_test_add_func("/coroutine/nested", test_nested);
    g_test_add_func("/coroutine/many", test_many);
    g_test_add_func("/coroutine/deep-stack", test_deep_stack);
    g_test_add_func("/coroutine/mutex", test_mutex);
    g_test_add_func("/coroutine/rwlock", test_rwlock);
    g_test_add_func("/coroutine/queue", test_queue);
    g_test_add_func("/aio/thread-pool", test_thread_pool);
    g_test_add_func("/aio/bh-cross-thread", test_bh_cross_thread);
    g_test_add_func("/aio/bh-delete", test_bh_delete);
    g_test_add_func("/aio/timers", test_timers);
    g_test_add_func("/aio/iothread-run-sync", test_iothread_run_sync);
    ret = g_test_run();
    thread_pool_shutdown();
    co_pool_drain();
    aio_context_return(NULL);
    aio_context_free(test_ctx);
    return ret;
}
