/*
 * I/O throttling: byte and operation rate limits per drive, with bursts,
 * shared by the drives of a throttling group.
 *
 * Each limit is a leaky bucket: a request adds its cost (bytes, or
 * operations) to the bucket's level, which drains at the limit's rate; a
 * request waits while a bucket it uses is above its capacity.  A limit
 * with a burst ("-max", for "-max-length" seconds) has a larger capacity
 * and a second bucket that caps the rate during the burst at "-max".
 *
 * Thread model: a group may be shared by drives in different event loops,
 * so its buckets are under a mutex held only for arithmetic.  A throttled
 * request waits with co_sleep_ns() in its own event loop: no thread ever
 * blocks.
 */
#ifndef BLOCKCORE_THROTTLE_H
#define BLOCKCORE_THROTTLE_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

#include "coroutine.h"

typedef enum ThrottleLimit {
    THROTTLE_BPS_TOTAL,
    THROTTLE_BPS_READ,
    THROTTLE_BPS_WRITE,
    THROTTLE_IOPS_TOTAL,
    THROTTLE_IOPS_READ,
    THROTTLE_IOPS_WRITE,
    THROTTLE_LIMIT_MAX,
} ThrottleLimit;

extern const char *const throttle_limit_names[THROTTLE_LIMIT_MAX];

typedef struct ThrottleConfig {
    double avg[THROTTLE_LIMIT_MAX];        /* units per second; 0: none */
    double max[THROTTLE_LIMIT_MAX];        /* burst rate; 0: none */
    double max_length[THROTTLE_LIMIT_MAX]; /* burst seconds (default 1) */
    uint64_t iops_size; /* an operation counts size/iops_size times */
} ThrottleConfig;

typedef struct ThrottleGroup ThrottleGroup;

typedef struct ThrottleMember {
    ThrottleGroup *group;
    CoMutex lock[2]; /* [is_write]: requests are served in order */
} ThrottleMember;

void throttle_config_init(ThrottleConfig *cfg);
bool throttle_config_enabled(const ThrottleConfig *cfg);
bool throttle_config_equal(const ThrottleConfig *a, const ThrottleConfig *b);
/* Check consistency (max >= avg, max needs avg...); *errp names the key. */
bool throttle_config_check(const ThrottleConfig *cfg, GError **errp);

/* Join group @name (NULL: a private group) with @cfg. */
void throttle_member_init(ThrottleMember *m, const char *name,
                          const ThrottleConfig *cfg);
void throttle_member_destroy(ThrottleMember *m);
bool throttle_member_enabled(ThrottleMember *m);

/* Wait until a request of @bytes may go, and charge it. */
void coroutine_fn throttle_co_wait(ThrottleMember *m, bool is_write,
                                   uint64_t bytes);

#endif /* BLOCKCORE_THROTTLE_H */
