/*
 * Small helpers shared by every part of imgfs: the coroutine_fn marker,
 * alignment arithmetic, container_of and branch hints.  Nothing here
 * allocates or depends on another module.
 */
#ifndef BLOCKCORE_UTIL_H
#define BLOCKCORE_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Marks a function that may yield: it must only be called from coroutine
 * context.  Such functions carry "_co_" in their name as well.
 */
#define coroutine_fn

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define container_of(ptr, type, member)                                        \
    ((type *)((char *)(ptr)-offsetof(type, member)))

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#define MIN_NON_ZERO(a, b)                                                     \
    ((a) == 0 ? (b) : ((b) == 0 ? (a) : ((a) < (b) ? (a) : (b))))

/* Alignment helpers; @m need not be a power of two unless stated. */
#define ALIGN_DOWN(n, m) ((n) / (m) * (m))
#define ALIGN_UP(n, m) ALIGN_DOWN((n) + (m)-1, (m))
#define IS_ALIGNED(n, m) (((n) % (m)) == 0)
#define DIV_ROUND_UP(n, d) (((n) + (d)-1) / (d))

static inline bool is_power_of_2(uint64_t v)
{
    return v && !(v & (v - 1));
}

/* Both ranges are [off, off + len).  Empty ranges never overlap. */
static inline bool ranges_overlap(int64_t off1, int64_t len1, int64_t off2,
                                  int64_t len2)
{
    return len1 > 0 && len2 > 0 && off1 < off2 + len2 && off2 < off1 + len1;
}

/*
 * Does [off, off + len) lie within [0, size)?  Compared without adding,
 * so that an offset or length read from a damaged image near 2^64 cannot
 * wrap the end around and pass.
 */
static inline bool range_within(uint64_t off, uint64_t len, uint64_t size)
{
    return off <= size && len <= size - off;
}

#define KiB (INT64_C(1) << 10)
#define MiB (INT64_C(1) << 20)
#define GiB (INT64_C(1) << 30)
#define TiB (INT64_C(1) << 40)

#endif /* BLOCKCORE_UTIL_H */
