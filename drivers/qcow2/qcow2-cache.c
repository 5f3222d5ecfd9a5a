/*
 * qcow2 metadata cache: L2 tables and refcount blocks, one cluster each,
 * kept in memory in on-disk byte order with LRU eviction, and written
 * back in the order that keeps the image consistent after a crash.
 *
 * Entries are allocated lazily, so opening a huge image costs nothing;
 * the configured size is a bound, exceeded only while every entry is
 * pinned by a request (a handful at most).  Lookups need no lock: a miss
 * reads the table once while later users of the same table wait for it.
 *
 * Write-back order (see qcow2.h): an L2 change is made only after the
 * refcounts and the data it depends on are in place in memory and on
 * their way to disk, and gets a sequence number.  Writing L2 tables back,
 * qcow2_co_writeback() takes copies of a batch of tables (whose changes
 * are all numbered up to some seq), writes the dirty refcount blocks,
 * flushes the files -- now everything the copied entries point to is
 * durable -- and only then writes the copies.  Tables are never written
 * straight from the cache buffer, which may change while the write is in
 * flight on a worker thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "qcow2.h"

/* Copies of L2 tables made per write-back round: a quarter of the L2
 * cache, at most this. */
#define QCOW2_WRITEBACK_BATCH_BYTES (4 * MiB)

struct Qcow2Cache {
    Qcow2State *s;
    Qcow2MetaType type;
    uint64_t max_entries;
    uint64_t nb_entries; /* in the map */
    uint64_t nb_dirty;
    GHashTable *map;                   /* &entry->offset -> entry */
    TAILQ_HEAD(, Qcow2CacheEntry) lru; /* least recently used first */
};

static BlockDriverState *cache_file(Qcow2Cache *c)
{
    return c->s->bs->file->bs;
}

Qcow2Cache *qcow2_cache_new(Qcow2State *s, Qcow2MetaType type,
                            uint64_t max_bytes)
{
    Qcow2Cache *c = g_new0(Qcow2Cache, 1);

    c->s = s;
    c->type = type;
    c->max_entries = max_bytes / s->cluster_size;
    if (c->max_entries < 2) {
        c->max_entries = 2;
    }
    c->map = g_hash_table_new(g_int64_hash, g_int64_equal);
    TAILQ_INIT(&c->lru);
    return c;
}

uint64_t qcow2_cache_max_bytes(Qcow2Cache *c)
{
    return c->max_entries * c->s->cluster_size;
}

static void cache_entry_free(Qcow2CacheEntry *e)
{
    bdrv_vfree(e->data);
    g_free(e);
}

/* Take @e out of the map and the LRU list; free it unless pinned. */
static void cache_remove(Qcow2Cache *c, Qcow2CacheEntry *e)
{
    g_hash_table_remove(c->map, &e->offset);
    TAILQ_REMOVE(&c->lru, e, lru);
    c->nb_entries--;
    if (e->dirty) {
        e->dirty = false;
        c->nb_dirty--;
    }
    if (e->pins > 0) {
        e->doomed = true;
    } else {
        cache_entry_free(e);
    }
}

void qcow2_cache_free(Qcow2Cache *c)
{
    Qcow2CacheEntry *e;

    if (!c) {
        return;
    }
    while ((e = TAILQ_FIRST(&c->lru))) {
        e->pins = 0;
        cache_remove(c, e);
    }
    g_hash_table_destroy(c->map);
    g_free(c);
}

static bool cache_evictable(Qcow2CacheEntry *e)
{
    return e->pins == 0 && !e->dirty && !e->loading;
}

/* Drop the least recently used clean, unused entry and hand back its
 * buffer for reuse; NULL if there is none. */
static uint8_t *cache_evict_one(Qcow2Cache *c)
{
    Qcow2CacheEntry *e;

    TAILQ_FOREACH(e, &c->lru, lru)
    {
        if (cache_evictable(e)) {
            uint8_t *data = e->data;

            e->data = NULL;
            cache_remove(c, e);
            return data;
        }
    }
    return NULL;
}

/*
 * Make room for one more entry: evict a clean one, or write dirty ones
 * back first; returns the evicted buffer, or NULL.  If everything is
 * pinned the cache grows past its bound for a moment rather than
 * deadlock.  May yield.
 */
static uint8_t *coroutine_fn cache_make_room(Qcow2Cache *c)
{
    Qcow2State *s = c->s;
    uint8_t *data = cache_evict_one(c);
    int ret;

    if (data || c->nb_dirty == 0) {
        return data;
    }
    if (c->type == QCOW2_META_L2) {
        ret = qcow2_co_writeback(s, true, false);
    } else {
        ret = qcow2_co_writeback(s, false, true);
    }
    if (ret < 0 || c->nb_entries < c->max_entries) {
        return NULL; /* write-back failed (reported): over the bound */
    }
    return cache_evict_one(c);
}

static int coroutine_fn cache_get(Qcow2Cache *c, uint64_t offset, bool read,
                                  Qcow2CacheEntry **pe)
{
    Qcow2State *s = c->s;
    Qcow2CacheEntry *e;
    uint8_t *spare = NULL;
    bool made_room = false;
    int ret = 0;

    for (;;) {
        e = g_hash_table_lookup(c->map, &offset);
        if (e) {
            if (e->loading) {
                co_queue_wait(&e->waiters, NULL);
                continue;
            }
            bdrv_vfree(spare);
            e->pins++;
            e->used = true;
            TAILQ_REMOVE(&c->lru, e, lru);
            TAILQ_INSERT_TAIL(&c->lru, e, lru);
            if (!read) {
                /* A stale copy of a cluster that was freed and is now
                 * reused: the caller starts a new table. */
                memset(e->data, 0, s->cluster_size);
            }
            *pe = e;
            return 0;
        }
        if (!made_room && c->nb_entries >= c->max_entries) {
            /* May yield: someone else may cache @offset meanwhile. */
            spare = cache_make_room(c);
            made_room = true;
            continue;
        }
        break;
    }

    e = g_new0(Qcow2CacheEntry, 1);
    e->offset = offset;
    e->data = spare ? spare : bdrv_blockalign(cache_file(c), s->cluster_size);
    e->pins = 1;
    e->used = true;
    co_queue_init(&e->waiters);
    g_hash_table_insert(c->map, &e->offset, e);
    TAILQ_INSERT_TAIL(&c->lru, e, lru);
    c->nb_entries++;

    if (!read) {
        memset(e->data, 0, s->cluster_size);
        *pe = e;
        return 0;
    }
    e->loading = true;
    ret = bdrv_co_pread(s->bs->file, offset, s->cluster_size, e->data, 0);
    e->loading = false;
    co_queue_restart_all(&e->waiters);
    if (ret < 0) {
        if (!e->doomed) {
            cache_remove(c, e);
        }
        qcow2_cache_put(c, e);
        return ret;
    }
    *pe = e;
    return 0;
}

int coroutine_fn qcow2_cache_get(Qcow2Cache *c, uint64_t offset,
                                 Qcow2CacheEntry **e)
{
    return cache_get(c, offset, true, e);
}

int coroutine_fn qcow2_cache_get_empty(Qcow2Cache *c, uint64_t offset,
                                       Qcow2CacheEntry **e)
{
    return cache_get(c, offset, false, e);
}

void qcow2_cache_put(Qcow2Cache *c, Qcow2CacheEntry *e)
{
    (void)c;
    e->pins--;
    if (e->pins == 0 && e->doomed) {
        cache_entry_free(e);
    }
}

void qcow2_cache_mark_dirty(Qcow2Cache *c, Qcow2CacheEntry *e)
{
    if (e->doomed) {
        return;
    }
    if (!e->dirty) {
        e->dirty = true;
        c->nb_dirty++;
    }
    e->gen++;
    if (c->type == QCOW2_META_L2) {
        e->mod_seq = ++c->s->l2_mod_seq;
    }
}

void qcow2_cache_drop(Qcow2Cache *c, uint64_t offset)
{
    Qcow2CacheEntry *e = g_hash_table_lookup(c->map, &offset);

    if (e) {
        cache_remove(c, e);
    }
}

uint64_t qcow2_cache_nb_dirty(Qcow2Cache *c)
{
    return c->nb_dirty;
}

void qcow2_cache_clean_unused(Qcow2Cache *c)
{
    Qcow2CacheEntry *e, *next;

    for (e = TAILQ_FIRST(&c->lru); e; e = next) {
        next = TAILQ_NEXT(e, lru);
        if (cache_evictable(e) && !e->used) {
            cache_remove(c, e);
        } else {
            e->used = false;
        }
    }
}

/* The dirty entries, pinned so they stay while we yield. */
static GPtrArray *cache_pin_dirty(Qcow2Cache *c)
{
    GPtrArray *list = g_ptr_array_new();
    Qcow2CacheEntry *e;

    if (c->nb_dirty == 0) {
        return list;
    }
    TAILQ_FOREACH(e, &c->lru, lru)
    {
        if (e->dirty) {
            e->pins++;
            g_ptr_array_add(list, e);
        }
    }
    return list;
}

static void cache_unpin_all(Qcow2Cache *c, GPtrArray *list)
{
    guint i;

    for (i = 0; i < list->len; i++) {
        qcow2_cache_put(c, g_ptr_array_index(list, i));
    }
    g_ptr_array_free(list, TRUE);
}

/* Write @buf, a copy of @e taken at generation @gen; mark @e clean if it
 * did not change since. */
static int coroutine_fn cache_write_copy(Qcow2Cache *c, Qcow2CacheEntry *e,
                                         const void *buf, uint64_t gen)
{
    Qcow2State *s = c->s;
    int ret = qcow2_meta_check_write(s, e->offset, s->cluster_size, c->type);

    if (ret == 0) {
        ret = bdrv_co_pwrite(s->bs->file, e->offset, s->cluster_size, buf, 0);
    }
    if (ret < 0) {
        return ret;
    }
    if (e->dirty && !e->doomed && e->gen == gen) {
        e->dirty = false;
        c->nb_dirty--;
    }
    return 0;
}

int coroutine_fn qcow2_co_cache_write_entry(Qcow2Cache *c, Qcow2CacheEntry *e)
{
    return cache_write_copy(c, e, e->data, e->gen);
}

/* Write every dirty refcount block (flush_lock held). */
static int coroutine_fn cache_write_all(Qcow2Cache *c)
{
    Qcow2State *s = c->s;
    GPtrArray *list = cache_pin_dirty(c);
    uint8_t *buf;
    guint i;
    int ret = 0;

    if (list->len == 0) {
        g_ptr_array_free(list, TRUE);
        return 0;
    }
    buf = bdrv_blockalign(cache_file(c), s->cluster_size);
    for (i = 0; i < list->len && ret == 0; i++) {
        Qcow2CacheEntry *e = g_ptr_array_index(list, i);
        uint64_t gen = e->gen;

        if (!e->dirty || e->doomed) {
            continue;
        }
        memcpy(buf, e->data, s->cluster_size);
        ret = cache_write_copy(c, e, buf, gen);
    }
    bdrv_vfree(buf);
    cache_unpin_all(c, list);
    return ret;
}

/* Write the L2 tables dirty now, in batches (flush_lock held). */
static int coroutine_fn cache_writeback_l2(Qcow2State *s)
{
    Qcow2Cache *c = s->l2_cache;
    GPtrArray *list = cache_pin_dirty(c);
    guint batch = MIN((uint64_t)QCOW2_WRITEBACK_BATCH_BYTES,
                      c->max_entries * s->cluster_size / 4) /
                  s->cluster_size;
    uint8_t **bufs;
    uint64_t *gens;
    Qcow2CacheEntry **ents;
    guint i, next = 0;
    int ret = 0;

    if (list->len == 0) {
        g_ptr_array_free(list, TRUE);
        return 0;
    }
    if (batch == 0) {
        batch = 1;
    }
    if (batch > list->len) {
        batch = list->len;
    }
    bufs = g_new0(uint8_t *, batch);
    gens = g_new0(uint64_t, batch);
    ents = g_new0(Qcow2CacheEntry *, batch);
    for (i = 0; i < batch; i++) {
        bufs[i] = bdrv_blockalign(cache_file(c), s->cluster_size);
    }

    while (next < list->len && ret == 0) {
        uint64_t seq = s->l2_mod_seq;
        guint n = 0;

        /* Copies first, without yielding: they hold changes <= seq. */
        while (next < list->len && n < batch) {
            Qcow2CacheEntry *e = g_ptr_array_index(list, next++);

            if (!e->dirty || e->doomed) {
                continue;
            }
            memcpy(bufs[n], e->data, s->cluster_size);
            gens[n] = e->gen;
            ents[n] = e;
            n++;
        }
        if (n == 0) {
            break;
        }
        if (seq > s->l2_durable_seq) {
            if (!s->lazy_refcounts) {
                ret = cache_write_all(s->rb_cache);
            }
            if (ret == 0) {
                ret = qcow2_co_flush_files(s);
            }
            if (ret < 0) {
                break;
            }
            s->l2_durable_seq = seq;
        }
        for (i = 0; i < n && ret == 0; i++) {
            ret = cache_write_copy(c, ents[i], bufs[i], gens[i]);
        }
    }

    for (i = 0; i < batch; i++) {
        bdrv_vfree(bufs[i]);
    }
    g_free(bufs);
    g_free(gens);
    g_free(ents);
    cache_unpin_all(c, list);
    return ret;
}

int coroutine_fn qcow2_co_writeback(Qcow2State *s, bool l2, bool all)
{
    int ret = 0;

    co_mutex_lock(&s->flush_lock);
    if (!l2 || !s->lazy_refcounts || all) {
        ret = cache_write_all(s->rb_cache);
    }
    if (ret == 0 && l2) {
        ret = cache_writeback_l2(s);
    }
    if (ret == 0 && all) {
        /* Lazy refcounts: the blocks dirtied meanwhile, too. */
        ret = cache_write_all(s->rb_cache);
    }
    co_mutex_unlock(&s->flush_lock);
    if (ret < 0) {
        log_msg(LOG_LEVEL_ERROR, "%s: writing qcow2 metadata failed: %s",
                bdrv_name(s->bs), g_strerror(-ret));
    }
    return ret;
}

int coroutine_fn qcow2_co_flush_all(Qcow2State *s, bool all)
{
    unsigned nfree = s->pending_frees->len;
    int ret;

    ret = qcow2_co_writeback(s, true, all);
    if (ret < 0) {
        return ret;
    }
    if (nfree == 0 && !all) {
        return 0;
    }
    /* The L2 changes that dropped references are durable after this. */
    ret = qcow2_co_flush_files(s);
    if (ret < 0) {
        return ret;
    }
    if (nfree) {
        co_mutex_lock(&s->lock);
        ret = qcow2_co_apply_frees(s, all ? s->pending_frees->len : nfree);
        co_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
    }
    if (all) {
        ret = qcow2_co_writeback(s, true, true);
        if (ret == 0) {
            ret = qcow2_co_flush_files(s);
        }
    }
    return ret;
}
