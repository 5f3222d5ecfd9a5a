/*
 * A simple worker pool.  Jobs live on the waiting coroutine's stack (the
 * coroutine cannot go away before the job completes), so queueing a job
 * allocates nothing.  Idle workers wait on a condition variable; one is
 * signalled per job, and a new worker is started only when none is idle.
 */
#include "thread-pool.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>

#include "aio.h"
#include "coroutine.h"
#include "log.h"

#define POOL_IDLE_TIMEOUT_S 10

typedef struct PoolJob PoolJob;
struct PoolJob {
    ThreadPoolFunc *fn;
    void *opaque;
    int ret;
    Coroutine *co;
    PoolJob *next;
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t job_cond;  /* signalled when a job is queued */
    pthread_cond_t exit_cond; /* signalled when a worker exits */
    PoolJob *head;            /* protected by lock */
    PoolJob *tail;            /* protected by lock */
    int workers;              /* protected by lock */
    int idle;                 /* protected by lock */
    int max_workers;          /* protected by lock */
    bool stopping;            /* protected by lock */
} pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .job_cond = PTHREAD_COND_INITIALIZER,
    .exit_cond = PTHREAD_COND_INITIALIZER,
    .max_workers = 64,
};

void thread_pool_set_max_workers(int max)
{
    pthread_mutex_lock(&pool.lock);
    pool.max_workers = max > 0 ? max : 1;
    pthread_mutex_unlock(&pool.lock);
}

static void *pool_worker(void *unused)
{
    (void)unused;
    pthread_setname_np(pthread_self(), "imgfs-worker");
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        PoolJob *job;

        while (!pool.head && !pool.stopping) {
            struct timespec ts;
            int ret;

            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += POOL_IDLE_TIMEOUT_S;
            pool.idle++;
            ret = pthread_cond_timedwait(&pool.job_cond, &pool.lock, &ts);
            pool.idle--;
            if (ret == ETIMEDOUT && !pool.head) {
                goto out_exit;
            }
        }
        if (!pool.head) {
            break; /* stopping */
        }
        job = pool.head;
        pool.head = job->next;
        if (!pool.head) {
            pool.tail = NULL;
        }
        pthread_mutex_unlock(&pool.lock);

        job->ret = job->fn(job->opaque);
        aio_co_wake(job->co);

        pthread_mutex_lock(&pool.lock);
    }
out_exit:
    pool.workers--;
    pthread_cond_broadcast(&pool.exit_cond);
    pthread_mutex_unlock(&pool.lock);
    return NULL;
}

int coroutine_fn thread_pool_co_run(ThreadPoolFunc *fn, void *opaque)
{
    PoolJob job = {.fn = fn, .opaque = opaque, .co = co_self()};

    assert(job.co);
    pthread_mutex_lock(&pool.lock);
    if (pool.tail) {
        pool.tail->next = &job;
    } else {
        pool.head = &job;
    }
    pool.tail = &job;
    if (pool.idle > 0) {
        pthread_cond_signal(&pool.job_cond);
    } else if (pool.workers < pool.max_workers) {
        pthread_t t;
        pthread_attr_t attr;

        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, pool_worker, NULL) == 0) {
            pool.workers++;
        } else if (pool.workers == 0) {
            /*
             * No thread would ever take the job: run it here, blocking
             * this event loop, rather than never.  Every job queued
             * before it was started the same way, so it is alone.
             */
            pthread_attr_destroy(&attr);
            assert(pool.head == &job);
            pool.head = pool.tail = NULL;
            pthread_mutex_unlock(&pool.lock);
            log_warning("cannot start a worker thread: running a blocking "
                        "job in the event loop");
            return fn(opaque);
        }
        pthread_attr_destroy(&attr);
    }
    pthread_mutex_unlock(&pool.lock);

    co_yield ();
    return job.ret;
}

void thread_pool_shutdown(void)
{
    pthread_mutex_lock(&pool.lock);
    pool.stopping = true;
    pthread_cond_broadcast(&pool.job_cond);
    while (pool.workers > 0) {
        pthread_cond_wait(&pool.exit_cond, &pool.lock);
    }
    pool.stopping = false;
    pthread_mutex_unlock(&pool.lock);
}
