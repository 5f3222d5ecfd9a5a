/*
 * Coroutine switching.  A new coroutine starts on its own stack through
 * makecontext/swapcontext exactly once; every later switch is a plain
 * _setjmp/_longjmp pair, which saves no signal mask and so costs no
 * system call.  Finished coroutines keep their stack and go to a
 * per-thread pool: the trampoline simply loops and runs the next entry
 * function, so creating a coroutine is usually just a list pop.
 *
 * AddressSanitizer must be told about every stack switch
 * (__sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber),
 * or it reports false stack overflows and use-after-return.
 */
#include "coroutine-int.h"

#include <assert.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include "aio.h"

#if defined(__SANITIZE_ADDRESS__)
#define CO_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CO_ASAN 1
#endif
#endif

#ifdef CO_ASAN
#include <sanitizer/common_interface_defs.h>
#define CO_STACK_SIZE (2 * 1024 * 1024)
#else
#define CO_STACK_SIZE (1024 * 1024)
#endif

#define CO_POOL_MAX 256

enum {
    CO_ACTION_ENTER = 1,
    CO_ACTION_YIELD = 2,
    CO_ACTION_TERMINATE = 3,
};

/* The thread's own stack, seen as a coroutine so switches are uniform. */
static __thread Coroutine co_leader;
static __thread Coroutine *co_current;
static __thread Coroutine *co_pool;
static __thread unsigned co_pool_size;
/* Where a freshly created coroutine jumps back to after setting up. */
static __thread jmp_buf *co_creator_env;

#ifdef CO_ASAN
static __thread const void *co_leader_stack;
static __thread size_t co_leader_stack_size;
#endif

static void co_asan_start(void **fake_stack_save, Coroutine *to)
{
#ifdef CO_ASAN
    const void *bottom = to->stack ? to->stack : co_leader_stack;
    size_t size = to->stack ? to->stack_size : co_leader_stack_size;

    __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
    (void)fake_stack_save;
    (void)to;
#endif
}

static void co_asan_finish(void *fake_stack_save)
{
#ifdef CO_ASAN
    const void *bottom_old;
    size_t size_old;

    __sanitizer_finish_switch_fiber(fake_stack_save, &bottom_old, &size_old);
    if (!co_leader_stack) {
        /* The first switch of a thread always comes from its leader. */
        co_leader_stack = bottom_old;
        co_leader_stack_size = size_old;
    }
#else
    (void)fake_stack_save;
#endif
}

static Coroutine *co_running(void)
{
    return co_current ? co_current : &co_leader;
}

/* Save our context in @from and continue @to; returns how we came back. */
static int co_switch(Coroutine *from, Coroutine *to, int action)
{
    void *fake_stack_save = NULL;
    int ret;

    co_current = to == &co_leader ? NULL : to;
    co_asan_start(action == CO_ACTION_TERMINATE ? NULL : &fake_stack_save, to);
    ret = _setjmp(from->env);
    if (ret == 0) {
        _longjmp(to->env, action);
    }
    co_asan_finish(fake_stack_save);
    return ret;
}

static void co_trampoline(int lo, int hi)
{
    Coroutine *self = (Coroutine *)(uintptr_t)((uint64_t)(uint32_t)lo |
                                               ((uint64_t)(uint32_t)hi << 32));
    void *fake_stack_save = NULL;

    co_asan_finish(NULL);
    /* Record where to resume us, then return to co_create(). */
    if (!_setjmp(self->env)) {
        co_asan_start(&fake_stack_save, self->caller);
        _longjmp(*co_creator_env, 1);
    }
    co_asan_finish(fake_stack_save);

    for (;;) {
        Coroutine *caller;

        self->entry(self->opaque);
        caller = self->caller;
        self->caller = NULL;
        co_switch(self, caller, CO_ACTION_TERMINATE);
    }
}

static Coroutine *co_new_stack(void)
{
    Coroutine *co = calloc(1, sizeof(*co));
    size_t page = sysconf(_SC_PAGESIZE);
    ucontext_t uc, old_uc;
    jmp_buf old_env;
    jmp_buf *saved_creator = co_creator_env;
    void *fake_stack_save = NULL;

    if (!co) {
        abort();
    }
    co->mapping_size = CO_STACK_SIZE + page;
    co->mapping = mmap(NULL, co->mapping_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (co->mapping == MAP_FAILED) {
        fprintf(stderr, "imgfs: out of memory for a coroutine stack\n");
        abort();
    }
    /* Guard page: a stack overflow faults instead of corrupting memory. */
    mprotect(co->mapping, page, PROT_NONE);
    co->stack = (char *)co->mapping + page;
    co->stack_size = CO_STACK_SIZE;

    if (getcontext(&uc) < 0) {
        abort();
    }
    uc.uc_link = NULL;
    uc.uc_stack.ss_sp = co->stack;
    uc.uc_stack.ss_size = co->stack_size;
    uc.uc_stack.ss_flags = 0;
    makecontext(&uc, (void (*)(void))co_trampoline, 2,
                (int)(uint32_t)(uintptr_t)co,
                (int)(uint32_t)((uint64_t)(uintptr_t)co >> 32));

    /* Run the trampoline until it has saved its jmp_buf, then come back. */
    co->caller = co_running();
    co_creator_env = &old_env;
    if (!_setjmp(old_env)) {
        co_asan_start(&fake_stack_save, co);
        swapcontext(&old_uc, &uc);
    }
    co_asan_finish(fake_stack_save);
    co_creator_env = saved_creator;
    co->caller = NULL;
    return co;
}

static void co_free_stack(Coroutine *co)
{
    munmap(co->mapping, co->mapping_size);
    free(co);
}

static pthread_key_t co_pool_key;
static pthread_once_t co_pool_once = PTHREAD_ONCE_INIT;

static void co_pool_thread_exit(void *unused)
{
    (void)unused;
    co_pool_drain();
}

static void co_pool_init_key(void)
{
    pthread_key_create(&co_pool_key, co_pool_thread_exit);
}

void co_pool_drain(void)
{
    while (co_pool) {
        Coroutine *co = co_pool;

        co_pool = co->next_free;
        co_free_stack(co);
    }
    co_pool_size = 0;
}

Coroutine *co_create(CoroutineEntry *entry, void *opaque)
{
    Coroutine *co = co_pool;

    if (co) {
        co_pool = co->next_free;
        co_pool_size--;
    } else {
        pthread_once(&co_pool_once, co_pool_init_key);
        /* Any non-NULL value makes the destructor run at thread exit. */
        pthread_setspecific(co_pool_key, &co_pool_key);
        co = co_new_stack();
    }
    co->entry = entry;
    co->opaque = opaque;
    co->ctx = NULL;
    co->caller = NULL;
    co->next_waiter = NULL;
    co->next_wake = NULL;
    co->next_free = NULL;
    co->wake_pending = 0;
    return co;
}

static void co_release(Coroutine *co)
{
    if (co_pool_size < CO_POOL_MAX) {
        co->next_free = co_pool;
        co_pool = co;
        co_pool_size++;
    } else {
        co_free_stack(co);
    }
}

void co_enter(Coroutine *co)
{
    Coroutine *self = co_running();
    int ret;

    if (co->caller) {
        fprintf(stderr, "imgfs: co_enter: coroutine is already running\n");
        abort();
    }
    if (!co->ctx) {
        co->ctx = aio_current();
    }
    co->caller = self;
    ret = co_switch(self, co, CO_ACTION_ENTER);
    if (ret == CO_ACTION_TERMINATE) {
        co_release(co);
    }
}

void coroutine_fn co_yield (void)
{
    Coroutine *self = co_current;
    Coroutine *to;

    assert(self);
    to = self->caller;
    self->caller = NULL;
    co_switch(self, to, CO_ACTION_YIELD);
}

Coroutine *co_self(void)
{
    return co_current;
}

bool co_in_coroutine(void)
{
    return co_current != NULL;
}

AioContext *co_get_ctx(Coroutine *co)
{
    return co->ctx;
}
