/*
 * The inside of a coroutine, shared by coroutine.c, co-lock.c and aio.c
 * (which keeps the list of coroutines to wake).  Not for drivers.
 */
#ifndef BLOCKCORE_COROUTINE_INT_H
#define BLOCKCORE_COROUTINE_INT_H

#include <setjmp.h>
#include <stddef.h>

#include "coroutine.h"

struct Coroutine {
    CoroutineEntry *entry;
    void *opaque;
    /* Who entered us: control goes back there on yield or return. */
    Coroutine *caller;
    /* Home context; NULL until first entered. */
    AioContext *ctx;
    jmp_buf env;
    void *stack; /* NULL for a thread's leader (its native stack) */
    size_t stack_size;
    void *mapping; /* mmap()ed area holding the guard page and stack */
    size_t mapping_size;
    /* Link in a CoQueue (a coroutine waits on at most one). */
    Coroutine *next_waiter;
    /* Link in the home context's wake list, and whether it is there. */
    Coroutine *next_wake;
    int wake_pending; /* accessed atomically */
    /* Link in the per-thread pool of idle coroutines. */
    Coroutine *next_free;
};

#endif /* BLOCKCORE_COROUTINE_INT_H */
