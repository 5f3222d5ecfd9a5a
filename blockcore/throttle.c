/*
 * Throttling arithmetic and the registry of named groups.
 */
#include "throttle.h"

#include <math.h>
#include <string.h>

#include "aio.h"

const char *const throttle_limit_names[THROTTLE_LIMIT_MAX] = {
    "bps-total",  "bps-read",  "bps-write",
    "iops-total", "iops-read", "iops-write",
};

/* A request waiting its turn in a group (on the waiter's stack). */
typedef struct ThrottleWaiter ThrottleWaiter;
struct ThrottleWaiter {
    Coroutine *co;
    ThrottleWaiter *next;
};

typedef struct ThrottleBucket {
    double level;       /* units above empty */
    double burst_level; /* units in the burst-rate bucket */
} ThrottleBucket;

struct ThrottleGroup {
    char *name; /* NULL for a private group */
    int refcnt; /* protected by throttle_groups_lock */
    GMutex lock;
    ThrottleConfig cfg;
    ThrottleBucket buckets[THROTTLE_LIMIT_MAX]; /* protected by lock */
    int64_t last_ns;                            /* protected by lock */
    /* Waiting requests per direction, served in arrival order across
     * the group's members (each member queues at most one at a time). */
    ThrottleWaiter *head[2]; /* protected by lock */
    ThrottleWaiter *tail[2]; /* protected by lock */
};

static GMutex throttle_groups_lock;
static GHashTable *throttle_groups; /* name -> ThrottleGroup */

void throttle_config_init(ThrottleConfig *cfg)
{
    int i;

    memset(cfg, 0, sizeof(*cfg));
    for (i = 0; i < THROTTLE_LIMIT_MAX; i++) {
        cfg->max_length[i] = 1;
    }
}

bool throttle_config_enabled(const ThrottleConfig *cfg)
{
    int i;

    for (i = 0; i < THROTTLE_LIMIT_MAX; i++) {
        if (cfg->avg[i] > 0) {
            return true;
        }
    }
    return false;
}

bool throttle_config_equal(const ThrottleConfig *a, const ThrottleConfig *b)
{
    return !memcmp(a, b, sizeof(*a));
}

bool throttle_config_check(const ThrottleConfig *cfg, GError **errp)
{
    int i;

    for (i = 0; i < THROTTLE_LIMIT_MAX; i++) {
        const char *n = throttle_limit_names[i];

        if (cfg->max[i] > 0 && cfg->avg[i] <= 0) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key 'throttling.%s-max' needs 'throttling.%s'", n, n);
            return false;
        }
        if (cfg->max[i] > 0 && cfg->max[i] < cfg->avg[i]) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key 'throttling.%s-max' must not be below "
                        "'throttling.%s'",
                        n, n);
            return false;
        }
        if (cfg->max_length[i] < 1) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key 'throttling.%s-max-length' must be at least 1", n);
            return false;
        }
    }
    for (i = THROTTLE_BPS_READ; i < THROTTLE_LIMIT_MAX; i++) {
        int total =
            i < THROTTLE_IOPS_TOTAL ? THROTTLE_BPS_TOTAL : THROTTLE_IOPS_TOTAL;

        if (i != total && cfg->avg[i] > 0 && cfg->avg[total] > 0) {
            g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                        "key 'throttling.%s' cannot be combined with "
                        "'throttling.%s'",
                        throttle_limit_names[i], throttle_limit_names[total]);
            return false;
        }
    }
    return true;
}

static ThrottleGroup *throttle_group_new(const char *name,
                                         const ThrottleConfig *cfg)
{
    ThrottleGroup *g = g_new0(ThrottleGroup, 1);

    g->name = g_strdup(name);
    g->refcnt = 1;
    g_mutex_init(&g->lock);
    g->cfg = *cfg;
    g->last_ns = aio_clock_ns();
    return g;
}

void throttle_member_init(ThrottleMember *m, const char *name,
                          const ThrottleConfig *cfg)
{
    ThrottleGroup *g = NULL;

    co_mutex_init(&m->lock[0]);
    co_mutex_init(&m->lock[1]);
    if (!name) {
        m->group = throttle_group_new(NULL, cfg);
        return;
    }
    g_mutex_lock(&throttle_groups_lock);
    if (!throttle_groups) {
        throttle_groups = g_hash_table_new(g_str_hash, g_str_equal);
    }
    g = g_hash_table_lookup(throttle_groups, name);
    if (g) {
        g->refcnt++;
        /* A member naming limits sets them for the whole group. */
        if (throttle_config_enabled(cfg)) {
            g_mutex_lock(&g->lock);
            g->cfg = *cfg;
            g_mutex_unlock(&g->lock);
        }
    } else {
        g = throttle_group_new(name, cfg);
        g_hash_table_insert(throttle_groups, g->name, g);
    }
    g_mutex_unlock(&throttle_groups_lock);
    m->group = g;
}

void throttle_member_destroy(ThrottleMember *m)
{
    ThrottleGroup *g = m->group;
    bool last;

    if (!g) {
        return;
    }
    g_mutex_lock(&throttle_groups_lock);
    last = --g->refcnt == 0;
    if (last && g->name) {
        g_hash_table_remove(throttle_groups, g->name);
    }
    g_mutex_unlock(&throttle_groups_lock);
    if (last) {
        g_mutex_clear(&g->lock);
        g_free(g->name);
        g_free(g);
    }
    m->group = NULL;
}

bool throttle_member_enabled(ThrottleMember *m)
{
    bool on;

    if (!m->group) {
        return false;
    }
    g_mutex_lock(&m->group->lock);
    on = throttle_config_enabled(&m->group->cfg);
    g_mutex_unlock(&m->group->lock);
    return on;
}

/* Does limit @i apply to a read (@is_write false) or a write? */
static bool throttle_applies(int i, bool is_write)
{
    switch (i) {
    case THROTTLE_BPS_READ:
    case THROTTLE_IOPS_READ:
        return !is_write;
    case THROTTLE_BPS_WRITE:
    case THROTTLE_IOPS_WRITE:
        return is_write;
    default:
        return true;
    }
}

static bool throttle_is_iops(int i)
{
    return i >= THROTTLE_IOPS_TOTAL;
}

/*
 * Capacity of the main bucket: a burst of (max - avg) for max_length
 * seconds, or a tenth of a second of the average rate when there is no
 * burst.  The burst bucket holds a tenth of a second at the burst rate.
 */
static double throttle_capacity(const ThrottleConfig *cfg, int i)
{
    if (cfg->max[i] > 0) {
        return (cfg->max[i] - cfg->avg[i]) * cfg->max_length[i] +
               cfg->avg[i] / 10;
    }
    return cfg->avg[i] / 10;
}

static void throttle_leak(ThrottleGroup *g, int64_t now)
{
    double secs = (now - g->last_ns) / 1e9;
    int i;

    if (secs <= 0) {
        return;
    }
    for (i = 0; i < THROTTLE_LIMIT_MAX; i++) {
        ThrottleBucket *b = &g->buckets[i];

        b->level = fmax(0, b->level - g->cfg.avg[i] * secs);
        b->burst_level = fmax(0, b->burst_level - g->cfg.max[i] * secs);
    }
    g->last_ns = now;
}

/* Nanoseconds until a request may go (0: now). */
static int64_t throttle_compute_wait(ThrottleGroup *g, bool is_write)
{
    double wait = 0;
    int i;

    for (i = 0; i < THROTTLE_LIMIT_MAX; i++) {
        ThrottleBucket *b = &g->buckets[i];
        double cap;

        if (g->cfg.avg[i] <= 0 || !throttle_applies(i, is_write)) {
            continue;
        }
        cap = throttle_capacity(&g->cfg, i);
        if (b->level > cap) {
            wait = fmax(wait, (b->level - cap) / g->cfg.avg[i]);
        }
        if (g->cfg.max[i] > 0 && b->burst_level > g->cfg.max[i] / 10) {
            wait = fmax(wait,
                        (b->burst_level - g->cfg.max[i] / 10) / g->cfg.max[i]);
        }
    }
    return wait > 0 ? (int64_t)ceil(wait * 1e9) : 0;
}

static void throttle_charge(ThrottleGroup *g, bool is_write, uint64_t bytes)
{
    double ops = 1;
    int i;

    if (g->cfg.iops_size && bytes > g->cfg.iops_size) {
        ops = (double)bytes / g->cfg.iops_size;
    }
    for (i = 0; i < THROTTLE_LIMIT_MAX; i++) {
        double units = throttle_is_iops(i) ? ops : (double)bytes;

        if (g->cfg.avg[i] <= 0 || !throttle_applies(i, is_write)) {
            continue;
        }
        g->buckets[i].level += units;
        if (g->cfg.max[i] > 0) {
            g->buckets[i].burst_level += units;
        }
    }
}

/*
 * A request waits for its member's turn (the member lock keeps one
 * member's requests in order), then for the group's: requests of all
 * members queue in arrival order, and only the first one sleeps until
 * the buckets allow it.  So members of a group take turns instead of
 * the quickest to wake taking everything.  A member in another event
 * loop is woken with aio_co_wake(), which is thread-safe.
 */
void coroutine_fn throttle_co_wait(ThrottleMember *m, bool is_write,
                                   uint64_t bytes)
{
    ThrottleGroup *g = m->group;
    ThrottleWaiter self = {.co = co_self()};

    if (!g) {
        return;
    }
    co_mutex_lock(&m->lock[is_write]);
    g_mutex_lock(&g->lock);
    if (!throttle_config_enabled(&g->cfg)) {
        goto out_unlock;
    }
    throttle_leak(g, aio_clock_ns());
    if (!g->head[is_write] && throttle_compute_wait(g, is_write) == 0) {
        throttle_charge(g, is_write, bytes);
        goto out_unlock;
    }

    /* Queue up; the request ahead wakes us when we are first. */
    if (g->tail[is_write]) {
        g->tail[is_write]->next = &self;
        g->tail[is_write] = &self;
        g_mutex_unlock(&g->lock);
        co_yield ();
        g_mutex_lock(&g->lock);
    } else {
        g->head[is_write] = g->tail[is_write] = &self;
    }
    for (;;) {
        int64_t wait;

        throttle_leak(g, aio_clock_ns());
        wait = throttle_compute_wait(g, is_write);
        if (wait == 0 || !throttle_config_enabled(&g->cfg)) {
            break;
        }
        g_mutex_unlock(&g->lock);
        co_sleep_ns(wait);
        g_mutex_lock(&g->lock);
    }
    throttle_charge(g, is_write, bytes);
    g->head[is_write] = self.next;
    if (!self.next) {
        g->tail[is_write] = NULL;
    } else {
        aio_co_wake(self.next->co);
    }

out_unlock:
    g_mutex_unlock(&g->lock);
    co_mutex_unlock(&m->lock[is_write]);
}
