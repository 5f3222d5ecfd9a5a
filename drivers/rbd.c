/*
 * rbd: the protocol driver for Ceph RBD images, on librbd's asynchronous
 * API.
 *
 * An image is named either by QEMU's short form, which users paste from
 * their existing VM definitions,
 *
 *     file = rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:KEY=VALUE...]
 *
 * (KEY "conf" is the ceph.conf path, "id" the Ceph user, anything else a
 * librados setting; "\" escapes a ':', '@' or '/'), or by the drive keys
 * rbd.pool, rbd.namespace, rbd.image, rbd.snapshot, rbd.conf, rbd.user and
 * rbd.keyring, with rbd.option.<name> = <value> for librados/librbd
 * settings.  Both may be combined as long as they do not contradict each
 * other.
 *
 * Thread model: connecting (rados_connect, rbd_open) and the other calls
 * that wait for the cluster synchronously (resize, size, diff iteration,
 * close) run on the worker pool.  Reads, writes, flushes, discards and
 * write-zeroes are submitted from the drive's coroutine with rbd_aio_*,
 * which never blocks (librbd's rbd_non_blocking_aio); librbd completes
 * them on its own threads, where drv_rbd_complete() only stores the
 * result and wakes the coroutine with aio_co_wake(), so the coroutine
 * resumes in the drive's event loop.  Everything in DrvRbdState except the
 * librados/librbd handles is touched only from that event loop.
 *
 * Failures are bounded: rbd.timeout (seconds, default 60) becomes
 * librados' client_mount_timeout, rados_mon_op_timeout and
 * rados_osd_op_timeout, so connecting to a cluster that is down fails
 * after that long, and I/O to a cluster that went away fails with EIO.
 * 0 waits forever, as librados does by default.
 *
 * Snapshots are read-only: opening one for writing fails with EROFS and
 * asks for read-only = on (with auto-read-only = on, blockcore then opens
 * it read-only and logs why).  Cache modes map to librbd's cache: cache=none (and
 * directsync) turns rbd_cache off, so every acknowledged write is on the
 * OSDs and FUA is free; the other modes keep librbd's cache with its
 * policy (librbd 16 defaults to writearound: writes go straight to the
 * OSDs, reads are cached; rbd.option.rbd_cache_policy = writeback holds
 * writes until a flush) and tell it to trust our flushes from the start
 * (rbd_cache_writethrough_until_flush = false), because imgfs promises
 * durability on fsync only.  rbd.option.* is applied last and overrides
 * all of this.
 *
 * librbd copies the data of every write (rbd_disable_zero_copy_writes
 * stays true).  Its zero-copy mode would save that copy, but it holds
 * the completion back until the messenger lets go of the buffer, which
 * it never does while the OSD is unreachable: writes to a cluster that
 * went away then hang instead of failing after rbd.timeout.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "blockcore/driver.h"
#include "blockcore/log.h"
#include "blockcore/thread-pool.h"

#define DRV_RBD_DEFAULT_POOL "rbd"
#define DRV_RBD_DEFAULT_TIMEOUT 60 /* seconds */
#define DRV_RBD_MAX_TRANSFER (32 * MiB)
/* diff iteration: objects looked at per block status query */
#define DRV_RBD_STATUS_OBJECTS 64

/* Where the image is and how to reach its cluster. */
typedef struct DrvRbdSpec {
    char *pool;
    char *ns;
    char *image;
    char *snap;
    char *conf;
    char *user;
    char *keyring;
    uint64_t timeout;
    /* librados/librbd settings, in order: name, value, name, value... */
    GPtrArray *settings;
    /* where each setting came from, for messages ("rbd.option.x") */
    GPtrArray *setting_keys;
} DrvRbdSpec;

typedef struct DrvRbdState {
    rados_t cluster;
    rados_ioctx_t io;
    rbd_image_t image;
    /* "rbd:pool/ns/image@snap" for messages */
    char *desc;
    /* "drive 'name': rbd:pool/image" for the log */
    char *who;
    char *pool;
    char *ns;
    char *image_name;
    char *snap;
    double timeout; /* rados_osd_op_timeout in effect, 0: none */
    bool cache;
    uint64_t object_size;
    uint64_t features;
    /* The image size as far as we know it; grown by writes past it. */
    int64_t image_size;
    CoMutex resize_lock;
    /* An I/O error has been logged and no request succeeded since. */
    bool failing;
} DrvRbdState;

static const OptDesc drv_rbd_options[] = {
    {"pool", OPT_STRING, NULL, "pool of the image (default: rbd)"},
    {"namespace", OPT_STRING, NULL, "RADOS namespace in the pool"},
    {"image", OPT_STRING, NULL,
     "image name (instead of file = rbd:POOL/IMAGE)"},
    {"snapshot", OPT_STRING, NULL, "expose this snapshot (read-only)"},
    {"conf", OPT_STRING, NULL,
     "ceph.conf path (default: librados' search path)"},
    {"user", OPT_STRING, NULL, "Ceph user without 'client.' (default: admin)"},
    {"keyring", OPT_STRING, NULL, "keyring path (default: from ceph.conf)"},
    {"timeout", OPT_NUMBER, NULL,
     "seconds until connecting or I/O fails when the cluster does not "
     "answer (default 60; 0: wait forever)"},
    {"option.*", OPT_STRING, NULL,
     "rbd.option.NAME = VALUE: a librados/librbd setting"},
    {NULL},
};

static void drv_rbd_spec_clear(DrvRbdSpec *sp)
{
    g_free(sp->pool);
    g_free(sp->ns);
    g_free(sp->image);
    g_free(sp->snap);
    g_free(sp->conf);
    g_free(sp->user);
    g_free(sp->keyring);
    if (sp->settings) {
        g_ptr_array_unref(sp->settings);
    }
    if (sp->setting_keys) {
        g_ptr_array_unref(sp->setting_keys);
    }
    memset(sp, 0, sizeof(*sp));
}

static void drv_rbd_spec_add_setting(DrvRbdSpec *sp, const char *name,
                                     const char *value, const char *origin)
{
    g_ptr_array_add(sp->settings, g_strdup(name));
    g_ptr_array_add(sp->settings, g_strdup(value));
    g_ptr_array_add(sp->setting_keys, g_strdup(origin));
}

/*
 * The next token of @p up to an unescaped character of @delims, with
 * escapes removed.  *@p moves past the token (onto the delimiter, or the
 * end).  *@delim receives the delimiter found, or '\0'.
 */
static char *drv_rbd_next_token(const char **p, const char *delims, char *delim)
{
    GString *tok = g_string_new(NULL);
    const char *s = *p;

    for (; *s; s++) {
        if (*s == '\\' && s[1]) {
            s++;
            g_string_append_c(tok, *s);
            continue;
        }
        if (strchr(delims, *s)) {
            break;
        }
        g_string_append_c(tok, *s);
    }
    *delim = *s;
    *p = s;
    return g_string_free(tok, FALSE);
}

/* Store a part of the image's name unless the drive contradicts it. */
static bool drv_rbd_set_part(char **field, char *value, const char *key,
                             const char *filename, GError **errp)
{
    if (!*value) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL, "'%s': empty %s",
                    filename, key + strlen("rbd."));
        g_free(value);
        return false;
    }
    if (*field && strcmp(*field, value) != 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "key '%s' is '%s' but file '%s' says '%s'", key, *field,
                    filename, value);
        g_free(value);
        return false;
    }
    g_free(*field);
    *field = value;
    return true;
}

/*
 * Parse "rbd:pool[/ns]/image[@snap][:key=value...]" into @sp, which holds
 * the explicit rbd.* keys already.
 */
static bool drv_rbd_parse_filename(DrvRbdSpec *sp, const char *filename,
                                   GError **errp)
{
    const char *p = filename + strlen("rbd:");
    g_autoptr(GPtrArray) parts = g_ptr_array_new_with_free_func(g_free);
    char *snap = NULL;
    char d;

    /* The path: up to 3 parts separated by '/', then '@snap'. */
    for (;;) {
        g_ptr_array_add(parts, drv_rbd_next_token(&p, "/@:", &d));
        if (d != '/') {
            break;
        }
        p++;
    }
    if (d == '@') {
        p++;
        snap = drv_rbd_next_token(&p, ":", &d);
    }
    if (parts->len < 2 || parts->len > 3) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "'%s': expected rbd:POOL/IMAGE, "
                    "rbd:POOL/NAMESPACE/IMAGE, optionally @SNAPSHOT and "
                    ":KEY=VALUE settings",
                    filename);
        g_free(snap);
        return false;
    }
    if (!drv_rbd_set_part(&sp->pool, g_strdup(parts->pdata[0]), "rbd.pool",
                          filename, errp) ||
        (parts->len == 3 &&
         !drv_rbd_set_part(&sp->ns, g_strdup(parts->pdata[1]), "rbd.namespace",
                           filename, errp)) ||
        !drv_rbd_set_part(&sp->image, g_strdup(parts->pdata[parts->len - 1]),
                          "rbd.image", filename, errp) ||
        (snap &&
         !drv_rbd_set_part(&sp->snap, snap, "rbd.snapshot", filename, errp))) {
        return false;
    }

    /* Settings: ":key=value" pairs. */
    while (d == ':') {
        g_autofree char *key = NULL;
        g_autofree char *value = NULL;

        p++;
        key = drv_rbd_next_token(&p, "=:", &d);
        if (d != '=' || !*key) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "'%s': setting '%s' is not KEY=VALUE", filename, key);
            return false;
        }
        p++;
        value = drv_rbd_next_token(&p, ":", &d);
        if (!strcmp(key, "conf")) {
            if (!drv_rbd_set_part(&sp->conf, g_steal_pointer(&value),
                                  "rbd.conf", filename, errp)) {
                return false;
            }
        } else if (!strcmp(key, "id")) {
            if (!drv_rbd_set_part(&sp->user, g_steal_pointer(&value),
                                  "rbd.user", filename, errp)) {
                return false;
            }
        } else {
            g_autofree char *origin =
                g_strdup_printf("setting '%s' of file '%s'", key, filename);

            drv_rbd_spec_add_setting(sp, key, value, origin);
        }
    }
    return true;
}

static bool drv_rbd_parse(DrvRbdSpec *sp, GHashTable *opts, GError **errp)
{
    const char *filename = opt_get_str(opts, "filename", NULL);
    g_autoptr(GList) keys = NULL;
    GList *l;

    sp->settings = g_ptr_array_new_with_free_func(g_free);
    sp->setting_keys = g_ptr_array_new_with_free_func(g_free);
    sp->pool = g_strdup(opt_get_str(opts, "pool", NULL));
    sp->ns = g_strdup(opt_get_str(opts, "namespace", NULL));
    sp->image = g_strdup(opt_get_str(opts, "image", NULL));
    sp->snap = g_strdup(opt_get_str(opts, "snapshot", NULL));
    sp->conf = g_strdup(opt_get_str(opts, "conf", NULL));
    sp->user = g_strdup(opt_get_str(opts, "user", NULL));
    sp->keyring = g_strdup(opt_get_str(opts, "keyring", NULL));
    sp->timeout = opt_get_number(opts, "timeout", DRV_RBD_DEFAULT_TIMEOUT);

    if (filename) {
        if (strncmp(filename, "rbd:", 4) != 0) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "'%s' is not an rbd: name", filename);
            return false;
        }
        if (!drv_rbd_parse_filename(sp, filename, errp)) {
            return false;
        }
    }
    if (!sp->image) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "no RBD image named: set rbd.image or "
                    "file = rbd:POOL/IMAGE");
        return false;
    }
    if (!sp->pool) {
        sp->pool = g_strdup(DRV_RBD_DEFAULT_POOL);
    }

    /* rbd.option.* after the file's settings: the drive has the last
     * word.  Sorted, so that the order does not depend on hashing. */
    keys = g_hash_table_get_keys(opts);
    keys = g_list_sort(keys, (GCompareFunc)strcmp);
    for (l = keys; l; l = l->next) {
        const char *k = l->data;

        if (!strncmp(k, "option.", 7)) {
            g_autofree char *origin = g_strdup_printf("key 'rbd.%s'", k);

            drv_rbd_spec_add_setting(sp, k + 7, g_hash_table_lookup(opts, k),
                                     origin);
        }
    }
    return true;
}

static char *drv_rbd_describe(const DrvRbdSpec *sp)
{
    return g_strdup_printf("rbd:%s/%s%s%s%s%s", sp->pool, sp->ns ? sp->ns : "",
                           sp->ns ? "/" : "", sp->image, sp->snap ? "@" : "",
                           sp->snap ? sp->snap : "");
}

/* ---- Opening: everything that waits for the cluster, on a worker. ---- */

typedef struct DrvRbdConnect {
    const DrvRbdSpec *spec;
    bool writable;
    bool cache;
    bool trust_flush;
    /* out */
    rados_t cluster;
    rados_ioctx_t io;
    rbd_image_t image;
    uint64_t size;
    uint64_t object_size;
    uint64_t features;
    /* the timeouts in effect (rbd.option.* may override rbd.timeout) */
    double mount_timeout;
    double op_timeout;
    /* what failed, a complete phrase */
    char *error;
} DrvRbdConnect;

/*
 * Record why connecting failed: @what, then the reason (@ret; a timeout
 * says how long we waited).  Returns @ret.
 */
static int drv_rbd_fail(DrvRbdConnect *c, int ret, double timeout,
                        const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int drv_rbd_fail(DrvRbdConnect *c, int ret, double timeout,
                        const char *fmt, ...)
{
    g_autofree char *what = NULL;
    va_list ap;

    va_start(ap, fmt);
    what = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (ret == -ETIMEDOUT && timeout > 0) {
        c->error = g_strdup_printf("%s: no answer from the cluster within "
                                   "%g s",
                                   what, timeout);
    } else {
        c->error = g_strdup_printf("%s: %s", what, g_strerror(-ret));
    }
    return ret;
}

static int drv_rbd_conf_set(DrvRbdConnect *c, const char *name,
                            const char *value, const char *origin)
{
    int ret = rados_conf_set(c->cluster, name, value);

    if (ret == -ENOENT) {
        c->error =
            g_strdup_printf("%s: '%s' is not a Ceph setting", origin, name);
        return -EINVAL;
    }
    if (ret < 0) {
        c->error = g_strdup_printf("%s: invalid value '%s' for '%s'", origin,
                                   value, name);
        return -EINVAL;
    }
    return 0;
}

static double drv_rbd_conf_get_double(rados_t cluster, const char *name)
{
    char buf[64];

    if (rados_conf_get(cluster, name, buf, sizeof(buf)) < 0) {
        return 0;
    }
    return g_ascii_strtod(buf, NULL);
}

static int drv_rbd_connect_job(void *opaque)
{
    DrvRbdConnect *c = opaque;
    const DrvRbdSpec *sp = c->spec;
    const char *user = sp->user ? sp->user : "admin";
    const char *conf = sp->conf ? sp->conf : "the default ceph.conf";
    g_autofree char *timeout = g_strdup_printf("%" PRIu64, sp->timeout);
    static const char *const timeouts[] = {
        "client_mount_timeout",
        "rados_mon_op_timeout",
        "rados_osd_op_timeout",
    };
    unsigned i;
    int ret;

    ret = rados_create(&c->cluster, sp->user);
    if (ret < 0) {
        c->cluster = NULL;
        return drv_rbd_fail(c, ret, 0,
                            "cannot create a Ceph client for "
                            "user '%s' (rbd.user)",
                            user);
    }
    ret = rados_conf_read_file(c->cluster, sp->conf);
    if (ret < 0 && sp->conf) {
        return drv_rbd_fail(c, ret, 0,
                            "cannot read ceph.conf '%s' "
                            "(rbd.conf)",
                            sp->conf);
    }
    /* No conf named and none found: rbd.option.mon_host and friends may
     * still be enough. */
    if (sp->keyring) {
        ret = drv_rbd_conf_set(c, "keyring", sp->keyring, "key 'rbd.keyring'");
        if (ret < 0) {
            return ret;
        }
    }
    for (i = 0; i < ARRAY_SIZE(timeouts); i++) {
        ret = drv_rbd_conf_set(c, timeouts[i], timeout, "key 'rbd.timeout'");
        if (ret < 0) {
            return ret;
        }
    }
    ret = drv_rbd_conf_set(c, "rbd_cache", c->cache ? "true" : "false",
                           "cache mode");
    if (ret == 0 && c->cache && c->trust_flush) {
        ret = drv_rbd_conf_set(c, "rbd_cache_writethrough_until_flush", "false",
                               "cache mode");
    }
    if (ret < 0) {
        return ret;
    }
    for (i = 0; i < sp->settings->len; i += 2) {
        ret = drv_rbd_conf_set(c, sp->settings->pdata[i],
                               sp->settings->pdata[i + 1],
                               sp->setting_keys->pdata[i / 2]);
        if (ret < 0) {
            return ret;
        }
    }
    c->mount_timeout =
        drv_rbd_conf_get_double(c->cluster, "client_mount_timeout");
    c->op_timeout = drv_rbd_conf_get_double(c->cluster, "rados_osd_op_timeout");

    ret = rados_connect(c->cluster);
    if (ret == -ENOENT) {
        return drv_rbd_fail(c, ret, 0,
                            "cannot connect to the Ceph cluster "
                            "(%s): no key for client.%s (rbd.user, "
                            "rbd.keyring)",
                            conf, user);
    }
    if (ret == -EACCES || ret == -EPERM) {
        return drv_rbd_fail(c, ret, 0,
                            "cannot connect to the Ceph cluster "
                            "(%s): client.%s was refused "
                            "(rbd.user, rbd.keyring)",
                            conf, user);
    }
    if (ret < 0) {
        return drv_rbd_fail(c, ret, c->mount_timeout,
                            "cannot connect to the Ceph cluster (%s)", conf);
    }
    ret = rados_ioctx_create(c->cluster, sp->pool, &c->io);
    if (ret < 0) {
        c->io = NULL;
        if (ret == -ENOENT) {
            c->error = g_strdup_printf("pool '%s' does not exist", sp->pool);
            return ret;
        }
        return drv_rbd_fail(c, ret, c->op_timeout, "cannot open pool '%s'",
                            sp->pool);
    }
    rados_ioctx_set_namespace(c->io, sp->ns ? sp->ns : "");

    if (c->writable) {
        ret = rbd_open(c->io, sp->image, &c->image, sp->snap);
    } else {
        ret = rbd_open_read_only(c->io, sp->image, &c->image, sp->snap);
    }
    if (ret < 0) {
        c->image = NULL;
        if (ret == -ENOENT && sp->snap) {
            c->error = g_strdup_printf("image '%s' or its snapshot '%s' "
                                       "does not exist",
                                       sp->image, sp->snap);
        } else if (ret == -ENOENT) {
            c->error = g_strdup_printf("image '%s' does not exist in pool "
                                       "'%s'%s%s",
                                       sp->image, sp->pool,
                                       sp->ns ? ", namespace " : "",
                                       sp->ns ? sp->ns : "");
        } else {
            drv_rbd_fail(c, ret, c->op_timeout, "cannot open image '%s'",
                         sp->image);
        }
        return ret;
    }
    ret = rbd_get_size(c->image, &c->size);
    if (ret == 0) {
        rbd_image_info_t info;

        ret = rbd_stat(c->image, &info, sizeof(info));
        c->object_size = info.obj_size;
    }
    if (ret == 0) {
        ret = rbd_get_features(c->image, &c->features);
    }
    if (ret < 0) {
        return drv_rbd_fail(c, ret, c->op_timeout,
                            "cannot read the size of image '%s'", sp->image);
    }
    return 0;
}

/* Tear down what drv_rbd_connect_job built; blocks, so on a worker. */
typedef struct DrvRbdHandles {
    rados_t cluster;
    rados_ioctx_t io;
    rbd_image_t image;
} DrvRbdHandles;

static int drv_rbd_disconnect_job(void *opaque)
{
    DrvRbdHandles *h = opaque;
    int ret = 0;

    if (h->image) {
        ret = rbd_close(h->image);
    }
    if (h->io) {
        rados_ioctx_destroy(h->io);
    }
    if (h->cluster) {
        rados_shutdown(h->cluster);
    }
    return ret;
}

static int coroutine_fn drv_rbd_co_open(BlockDriverState *bs, GHashTable *opts,
                                        int flags, GError **errp)
{
    DrvRbdState *s = bs->opaque;
    DrvRbdSpec sp = {0};
    DrvRbdConnect c = {0};
    g_autofree char *desc = NULL;
    int ret;

    if (!drv_rbd_parse(&sp, opts, errp)) {
        drv_rbd_spec_clear(&sp);
        return -EINVAL;
    }
    desc = drv_rbd_describe(&sp);
    if (sp.snap && (flags & BDRV_O_RDWR)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_ROFS,
                    "%s: snapshots are read-only: set read-only = on (or "
                    "auto-read-only = on)",
                    desc);
        drv_rbd_spec_clear(&sp);
        return -EROFS;
    }
    if (flags & BDRV_O_CREATE) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: imgfs cannot create RBD images (use 'rbd create')",
                    desc);
        drv_rbd_spec_clear(&sp);
        return -ENOTSUP;
    }

    c.spec = &sp;
    c.writable = flags & BDRV_O_RDWR;
    c.cache = !(flags & BDRV_O_NOCACHE);
    c.trust_flush = true;
    ret = thread_pool_co_run(drv_rbd_connect_job, &c);
    if (ret < 0) {
        DrvRbdHandles h = {c.cluster, c.io, c.image};

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret), "%s: %s",
                    desc, c.error ? c.error : g_strerror(-ret));
        g_free(c.error);
        thread_pool_co_run(drv_rbd_disconnect_job, &h);
        drv_rbd_spec_clear(&sp);
        return ret;
    }

    s->cluster = c.cluster;
    s->io = c.io;
    s->image = c.image;
    s->desc = g_steal_pointer(&desc);
    s->who = bs->drive_name
                 ? g_strdup_printf("drive '%s': %s", bs->drive_name, s->desc)
                 : g_strdup(s->desc);
    s->pool = g_steal_pointer(&sp.pool);
    s->ns = g_steal_pointer(&sp.ns);
    s->image_name = g_steal_pointer(&sp.image);
    s->snap = g_steal_pointer(&sp.snap);
    s->timeout = c.op_timeout;
    s->cache = c.cache;
    s->object_size = c.object_size ? c.object_size : 4 * MiB;
    s->features = c.features;
    s->image_size = c.size;
    co_mutex_init(&s->resize_lock);
    drv_rbd_spec_clear(&sp);

    /* A drive named by rbd.* keys only: name it for messages. */
    if (!bs->filename) {
        bs->filename = g_strdup(s->desc);
    }
    bs->total_bytes = s->image_size;
    /* Without librbd's cache an acknowledged write is on the OSDs. */
    bs->supported_write_flags = s->cache ? 0 : BDRV_REQ_FUA;
    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP;
    return 0;
}

static void coroutine_fn drv_rbd_co_close(BlockDriverState *bs)
{
    DrvRbdState *s = bs->opaque;
    DrvRbdHandles h = {s->cluster, s->io, s->image};
    int ret = thread_pool_co_run(drv_rbd_disconnect_job, &h);

    if (ret < 0) {
        log_error("%s: closing the image failed: %s", s->who, g_strerror(-ret));
    }
    g_free(s->desc);
    g_free(s->who);
    g_free(s->pool);
    g_free(s->ns);
    g_free(s->image_name);
    g_free(s->snap);
}

static void drv_rbd_refresh_limits(BlockDriverState *bs, BlockLimits *bl)
{
    DrvRbdState *s = bs->opaque;
    int64_t big = ALIGN_DOWN(1 * GiB, (int64_t)s->object_size);

    bl->max_transfer = DRV_RBD_MAX_TRANSFER;
    bl->max_pdiscard = big ? big : 1 * GiB;
    bl->max_pwrite_zeroes = bl->max_pdiscard;
}

/* ---- Requests ---- */

typedef enum DrvRbdOp {
    DRV_RBD_READ,
    DRV_RBD_WRITE,
    DRV_RBD_FLUSH,
    DRV_RBD_DISCARD,
    DRV_RBD_ZEROES,
} DrvRbdOp;

static const char *const drv_rbd_op_names[] = {
    [DRV_RBD_READ] = "read",           [DRV_RBD_WRITE] = "write",
    [DRV_RBD_FLUSH] = "flush",         [DRV_RBD_DISCARD] = "discard",
    [DRV_RBD_ZEROES] = "write zeroes",
};

/* Lives on the waiting coroutine's stack. */
typedef struct DrvRbdReq {
    Coroutine *co;
    ssize_t ret;
} DrvRbdReq;

/* librbd's thread: hand the result to the drive's event loop. */
static void drv_rbd_complete(rbd_completion_t c, void *arg)
{
    DrvRbdReq *req = arg;

    req->ret = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    aio_co_wake(req->co); /* req may be gone after this */
}

/*
 * The errno a user sees.  A cluster that does not answer, or that has
 * blocklisted us, is an I/O error of the drive; the first one after a
 * success is logged with the real reason.
 */
static int drv_rbd_result(BlockDriverState *bs, DrvRbdOp op, int64_t offset,
                          int64_t bytes, int ret)
{
    DrvRbdState *s = bs->opaque;

    if (ret >= 0) {
        /* A flush with nothing to write proves nothing about the cluster. */
        if (s->failing && op != DRV_RBD_FLUSH) {
            log_info("%s: I/O works again", s->who);
            s->failing = false;
        }
        return ret;
    }
    switch (ret) {
    case -EINVAL:
    case -ENOSPC:
    case -EDQUOT:
    case -EROFS:
    case -ENOMEM:
    case -ENOTSUP:
        return ret;
    }
    if (!s->failing) {
        const char *why = g_strerror(-ret);

        g_autofree char *timed_out = NULL;

        if (ret == -ETIMEDOUT && s->timeout > 0) {
            timed_out = g_strdup_printf("no answer from the cluster within "
                                        "%g s",
                                        s->timeout);
            why = timed_out;
        } else if (ret == -ESHUTDOWN) {
            why = "this client was blocklisted by the cluster";
        }
        log_error("%s: %s of %" PRId64 " bytes at %" PRId64 " failed: %s (%s)",
                  s->who, drv_rbd_op_names[op], bytes, offset, why,
                  g_strerror(-ret));
        s->failing = true;
    }
    return -EIO;
}

static int coroutine_fn drv_rbd_co_submit(BlockDriverState *bs, DrvRbdOp op,
                                          int64_t offset, int64_t bytes,
                                          IOVector *qiov, size_t qoff,
                                          int zero_flags)
{
    DrvRbdState *s = bs->opaque;
    DrvRbdReq req = {.co = co_self()};
    IOVector part;
    void *bounce = NULL;
    rbd_completion_t c;
    int ret;

    iov_init(&part);
    if (qiov) {
        iov_concat(&part, qiov, qoff, bytes);
        if (part.niov > IOV_MAX) {
            /* librbd refuses longer vectors: go through one buffer. */
            bounce = g_malloc(bytes);
            if (op == DRV_RBD_WRITE) {
                iov_to_buf(qiov, qoff, bounce, bytes);
            }
            iov_reset(&part);
            iov_add(&part, bounce, bytes);
        }
    }
    ret = rbd_aio_create_completion(&req, drv_rbd_complete, &c);
    if (ret < 0) {
        goto out;
    }
    switch (op) {
    case DRV_RBD_READ:
        ret = rbd_aio_readv(s->image, part.iov, part.niov, offset, c);
        break;
    case DRV_RBD_WRITE:
        ret = rbd_aio_writev(s->image, part.iov, part.niov, offset, c);
        break;
    case DRV_RBD_FLUSH:
        ret = rbd_aio_flush(s->image, c);
        break;
    case DRV_RBD_DISCARD:
        ret = rbd_aio_discard(s->image, offset, bytes, c);
        break;
    case DRV_RBD_ZEROES:
        ret = rbd_aio_write_zeroes(s->image, offset, bytes, c, zero_flags, 0);
        break;
    }
    if (ret < 0) {
        rbd_aio_release(c);
        goto out;
    }
    co_yield ();
    ret = req.ret < 0 ? (int)req.ret : 0;
    if (op == DRV_RBD_READ && ret == 0 && req.ret < bytes) {
        /* Short read: the rest reads as zeros. */
        iov_memset(&part, req.ret, 0, bytes - req.ret);
    }
    if (bounce && op == DRV_RBD_READ && ret == 0) {
        iov_from_buf(qiov, qoff, bounce, bytes);
    }
out:
    iov_destroy(&part);
    g_free(bounce);
    return drv_rbd_result(bs, op, offset, bytes, ret);
}

/* librbd calls the progress callback unconditionally: never pass NULL. */
static int drv_rbd_no_progress(uint64_t done, uint64_t total, void *opaque)
{
    (void)done;
    (void)total;
    (void)opaque;
    return 0;
}

static int drv_rbd_resize_job(void *opaque)
{
    struct {
        rbd_image_t image;
        uint64_t size;
    } *job = opaque;

    return rbd_resize2(job->image, job->size, true, drv_rbd_no_progress, NULL);
}

static int coroutine_fn drv_rbd_co_resize(DrvRbdState *s, uint64_t size)
{
    struct {
        rbd_image_t image;
        uint64_t size;
    } job = {s->image, size};

    return thread_pool_co_run(drv_rbd_resize_job, &job);
}

/*
 * Writes past the end grow the image first (RBD images do not grow by
 * themselves), as a format on top -- a qcow2 stored in RBD -- expects of
 * its protocol node.
 */
static int coroutine_fn drv_rbd_co_grow(BlockDriverState *bs, int64_t end)
{
    DrvRbdState *s = bs->opaque;
    int ret = 0;

    co_mutex_lock(&s->resize_lock);
    if (end > s->image_size) {
        ret = drv_rbd_co_resize(s, end);
        if (ret == 0) {
            s->image_size = end;
        } else {
            log_error("%s: cannot grow the image to %" PRId64 " bytes: %s",
                      s->who, end, g_strerror(-ret));
        }
    }
    co_mutex_unlock(&s->resize_lock);
    return ret;
}

static int coroutine_fn drv_rbd_co_preadv(BlockDriverState *bs, int64_t offset,
                                          int64_t bytes, IOVector *qiov,
                                          size_t qoff, BdrvRequestFlags flags)
{
    (void)flags;
    return drv_rbd_co_submit(bs, DRV_RBD_READ, offset, bytes, qiov, qoff, 0);
}

static int coroutine_fn drv_rbd_co_pwritev(BlockDriverState *bs, int64_t offset,
                                           int64_t bytes, IOVector *qiov,
                                           size_t qoff, BdrvRequestFlags flags)
{
    DrvRbdState *s = bs->opaque;
    int ret;

    /* FUA needs nothing more: only offered when rbd_cache is off. */
    (void)flags;
    if (offset + bytes > s->image_size) {
        ret = drv_rbd_co_grow(bs, offset + bytes);
        if (ret < 0) {
            return drv_rbd_result(bs, DRV_RBD_WRITE, offset, bytes, ret);
        }
    }
    return drv_rbd_co_submit(bs, DRV_RBD_WRITE, offset, bytes, qiov, qoff, 0);
}

static int coroutine_fn drv_rbd_co_flush(BlockDriverState *bs)
{
    return drv_rbd_co_submit(bs, DRV_RBD_FLUSH, 0, 0, NULL, 0, 0);
}

static int coroutine_fn drv_rbd_co_pdiscard(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes)
{
    return drv_rbd_co_submit(bs, DRV_RBD_DISCARD, offset, bytes, NULL, 0, 0);
}

static int coroutine_fn drv_rbd_co_pwrite_zeroes(BlockDriverState *bs,
                                                 int64_t offset, int64_t bytes,
                                                 BdrvRequestFlags flags)
{
    DrvRbdState *s = bs->opaque;
    int zero_flags = 0;
    int ret;

    if (!(flags & BDRV_REQ_MAY_UNMAP)) {
        /* The range must stay allocated. */
        zero_flags |= RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
    }
    if (offset + bytes > s->image_size) {
        ret = drv_rbd_co_grow(bs, offset + bytes);
        if (ret < 0) {
            return drv_rbd_result(bs, DRV_RBD_ZEROES, offset, bytes, ret);
        }
    }
    return drv_rbd_co_submit(bs, DRV_RBD_ZEROES, offset, bytes, NULL, 0,
                             zero_flags);
}

static int coroutine_fn drv_rbd_co_truncate(BlockDriverState *bs,
                                            int64_t offset, bool exact,
                                            PreallocMode prealloc,
                                            GError **errp)
{
    DrvRbdState *s = bs->opaque;
    int ret;

    (void)exact;
    if (prealloc != PREALLOC_OFF) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "%s: RBD images cannot be preallocated", s->desc);
        return -ENOTSUP;
    }
    co_mutex_lock(&s->resize_lock);
    ret = drv_rbd_co_resize(s, offset);
    if (ret == 0) {
        s->image_size = offset;
    }
    co_mutex_unlock(&s->resize_lock);
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "%s: cannot resize to %" PRId64 " bytes: %s", s->desc,
                    offset, g_strerror(-ret));
    }
    return ret;
}

typedef struct DrvRbdSizeJob {
    rbd_image_t image;
    uint64_t size;
} DrvRbdSizeJob;

static int drv_rbd_size_job(void *opaque)
{
    DrvRbdSizeJob *job = opaque;

    /* May refresh the image header when another client resized it. */
    return rbd_get_size(job->image, &job->size);
}

static int64_t coroutine_fn drv_rbd_co_getlength(BlockDriverState *bs)
{
    DrvRbdState *s = bs->opaque;
    DrvRbdSizeJob job = {.image = s->image};
    int ret = thread_pool_co_run(drv_rbd_size_job, &job);

    if (ret < 0) {
        return ret;
    }
    s->image_size = job.size;
    return job.size;
}

/* ---- Block status from librbd's diff iteration ---- */

typedef struct DrvRbdExtent {
    uint64_t offset;
    uint64_t length;
} DrvRbdExtent;

typedef struct DrvRbdDiffJob {
    rbd_image_t image;
    uint64_t offset;
    uint64_t length;
    GMutex lock;
    GArray *extents; /* DrvRbdExtent, protected by lock */
} DrvRbdDiffJob;

static int drv_rbd_diff_cb(uint64_t offset, size_t length, int exists,
                           void *opaque)
{
    DrvRbdDiffJob *job = opaque;
    DrvRbdExtent e = {offset, length};

    if (exists && length) {
        g_mutex_lock(&job->lock);
        g_array_append_val(job->extents, e);
        g_mutex_unlock(&job->lock);
    }
    return 0;
}

static int drv_rbd_diff_job(void *opaque)
{
    DrvRbdDiffJob *job = opaque;

    /* Whole objects: cheap with fast-diff, one OSD op per object
     * without; the parent's data counts as ours. */
    return rbd_diff_iterate2(job->image, NULL, job->offset, job->length, 1, 1,
                             drv_rbd_diff_cb, job);
}

static gint drv_rbd_extent_cmp(gconstpointer a, gconstpointer b)
{
    const DrvRbdExtent *x = a, *y = b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int coroutine_fn drv_rbd_co_block_status(BlockDriverState *bs,
                                                int64_t offset, int64_t bytes,
                                                int64_t *pnum, int64_t *map,
                                                BlockDriverState **file)
{
    DrvRbdState *s = bs->opaque;
    int64_t window = (int64_t)s->object_size * DRV_RBD_STATUS_OBJECTS;
    int64_t end, data_end = -1, next_data = -1;
    DrvRbdDiffJob job = {.image = s->image, .offset = offset};
    unsigned i;
    int ret;

    if (bytes > window) {
        bytes = window;
    }
    if (offset + bytes > s->image_size) {
        bytes = s->image_size > offset ? s->image_size - offset : 0;
    }
    *map = offset;
    *file = bs;
    *pnum = bytes;
    if (bytes <= 0) {
        return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID;
    }
    end = offset + bytes;
    job.length = bytes;
    job.extents = g_array_new(FALSE, FALSE, sizeof(DrvRbdExtent));
    g_mutex_init(&job.lock);
    ret = thread_pool_co_run(drv_rbd_diff_job, &job);
    g_mutex_clear(&job.lock);
    if (ret < 0) {
        g_array_unref(job.extents);
        return drv_rbd_result(bs, DRV_RBD_READ, offset, bytes, ret);
    }
    g_array_sort(job.extents, drv_rbd_extent_cmp);

    /* Data at @offset: how far it runs.  A hole: where data starts. */
    for (i = 0; i < job.extents->len; i++) {
        DrvRbdExtent *e = &g_array_index(job.extents, DrvRbdExtent, i);
        int64_t e_start = e->offset;
        int64_t e_end = e->offset + e->length;

        if (e_end <= offset) {
            continue;
        }
        if (data_end < 0 && next_data < 0) {
            if (e_start <= offset) {
                data_end = e_end;
            } else {
                next_data = e_start;
                break;
            }
        } else if (data_end >= 0 && e_start <= data_end) {
            if (e_end > data_end) {
                data_end = e_end;
            }
        } else {
            break;
        }
    }
    g_array_unref(job.extents);

    if (data_end >= 0) {
        *pnum = (data_end < end ? data_end : end) - offset;
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
    }
    if (next_data >= 0 && next_data < end) {
        *pnum = next_data - offset;
    }
    return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID;
}

static void coroutine_fn drv_rbd_co_get_info(BlockDriverState *bs,
                                             ImageInfoSpec *spec)
{
    DrvRbdState *s = bs->opaque;
    char features[256];
    size_t len = sizeof(features);

    image_info_add(spec, "pool", "%s", s->pool);
    if (s->ns) {
        image_info_add(spec, "namespace", "%s", s->ns);
    }
    image_info_add(spec, "image-name", "%s", s->image_name);
    if (s->snap) {
        image_info_add(spec, "snapshot", "%s", s->snap);
    }
    image_info_add(spec, "object-size", "%" PRIu64, s->object_size);
    if (rbd_features_to_string(s->features, features, &len) == 0) {
        image_info_add(spec, "features", "%s", features);
    }
    image_info_add(spec, "rbd-cache", "%s", s->cache ? "true" : "false");
    image_info_add(spec, "timeout", "%g", s->timeout);
}

const BlockDriver bdrv_rbd = {
    .name = "rbd",
    .description = "Ceph RBD images (rbd:POOL/IMAGE[@SNAP] or rbd.* keys)",
    .protocol_prefix = "rbd",
    .instance_size = sizeof(DrvRbdState),
    .is_protocol = true,
    .options = drv_rbd_options,
    .co_open = drv_rbd_co_open,
    .co_close = drv_rbd_co_close,
    .refresh_limits = drv_rbd_refresh_limits,
    .co_getlength = drv_rbd_co_getlength,
    .co_preadv = drv_rbd_co_preadv,
    .co_pwritev = drv_rbd_co_pwritev,
    .co_flush = drv_rbd_co_flush,
    .co_pwrite_zeroes = drv_rbd_co_pwrite_zeroes,
    .co_pdiscard = drv_rbd_co_pdiscard,
    .co_truncate = drv_rbd_co_truncate,
    .co_block_status = drv_rbd_co_block_status,
    .co_get_info = drv_rbd_co_get_info,
};
