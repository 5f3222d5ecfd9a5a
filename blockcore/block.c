/*
 * The node graph: creating nodes, opening a format over its protocol
 * node (probing the format if none is named), children and backing
 * chains, and closing.  Open and close run in coroutines of the drive's
 * AioContext because drivers do I/O while opening (reading headers) and
 * closing (marking images clean).
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "driver.h"
#include "log.h"

/* How much of an image the format probes see. */
#define PROBE_BUF_SIZE 4096

const char *bdrv_name(BlockDriverState *bs)
{
    return bs->filename ? bs->filename : "(unnamed)";
}

static BlockDriverState *bdrv_new(const char *filename, const char *drive)
{
    BlockDriverState *bs = g_new0(BlockDriverState, 1);

    bs->filename = g_strdup(filename);
    bs->drive_name = g_strdup(drive);
    bs->ctx = aio_current();
    bs->refcnt = 1;
    LIST_INIT(&bs->tracked_requests);
    co_queue_init(&bs->flush_queue);
    return bs;
}

static void bdrv_free(BlockDriverState *bs)
{
    g_free(bs->filename);
    g_free(bs->drive_name);
    g_free(bs->backing_file);
    g_free(bs->backing_format);
    g_free(bs);
}

static BdrvChild *bdrv_attach_child(BlockDriverState *parent,
                                    BlockDriverState *child, const char *name,
                                    int role)
{
    BdrvChild *c = g_new0(BdrvChild, 1);
    BdrvChild **link;

    c->name = g_strdup(name);
    c->bs = child;
    c->parent = parent;
    c->role = role;
    for (link = &parent->children; *link; link = &(*link)->next) {
    }
    *link = c;
    if (role == BDRV_CHILD_FILE && !parent->file) {
        parent->file = c;
    } else if (role == BDRV_CHILD_BACKING) {
        parent->backing = c;
    }
    return c;
}

/*
 * Limits: the driver's own, with memory alignment at least that of
 * every child so buffers allocated above never need bouncing below.
 */
static void bdrv_refresh_limits(BlockDriverState *bs)
{
    BlockLimits bl = {
        .request_alignment = 1,
        .min_mem_alignment = 1,
        .opt_mem_alignment = (uint32_t)sysconf(_SC_PAGESIZE),
    };
    BdrvChild *c;

    for (c = bs->children; c; c = c->next) {
        if (c->bs->bl.min_mem_alignment > bl.min_mem_alignment) {
            bl.min_mem_alignment = c->bs->bl.min_mem_alignment;
        }
        if (c->bs->bl.opt_mem_alignment > bl.opt_mem_alignment) {
            bl.opt_mem_alignment = c->bs->bl.opt_mem_alignment;
        }
    }
    if (bs->drv->refresh_limits) {
        bs->drv->refresh_limits(bs, &bl);
    }
    if (!bl.request_alignment || !is_power_of_2(bl.request_alignment) ||
        bl.request_alignment > BDRV_MAX_ALIGNMENT) {
        bl.request_alignment = 1;
    }
    if (bl.opt_mem_alignment < bl.min_mem_alignment) {
        bl.opt_mem_alignment = bl.min_mem_alignment;
    }
    bs->bl = bl;
}

/* Options of driver @drv: the keys "<drv>.<key>" of @all, prefix cut. */
static GHashTable *bdrv_driver_options(GHashTable *all, const BlockDriver *drv)
{
    GHashTable *opts = opt_table_new();
    g_autofree char *prefix = g_strdup_printf("%s.", drv->name);
    size_t plen = strlen(prefix);
    GHashTableIter it;
    gpointer k, v;

    if (!all) {
        return opts;
    }
    g_hash_table_iter_init(&it, all);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        if (!strncmp(k, prefix, plen)) {
            g_hash_table_insert(opts, g_strdup((char *)k + plen), g_strdup(v));
        }
    }
    return opts;
}

static int coroutine_fn bdrv_co_open_driver(BlockDriverState *bs,
                                            const BlockDriver *drv,
                                            GHashTable *opts, int flags,
                                            GError **errp)
{
    int ret;

    bs->drv = drv;
    bs->opaque = g_malloc0(drv->instance_size ? drv->instance_size : 1);
    bs->open_flags = flags;
    bs->read_only = !(flags & BDRV_O_RDWR);
    ret = drv->co_open(bs, opts, flags, errp);
    if (ret < 0) {
        g_free(bs->opaque);
        bs->opaque = NULL;
        bs->drv = NULL;
        return ret;
    }
    bdrv_refresh_limits(bs);
    return 0;
}

static void coroutine_fn bdrv_co_unref(BlockDriverState *bs);

/*
 * A drive with no file names its image with a protocol's own keys
 * ("rbd.pool", "rbd.image"): the protocol whose keys it has, or NULL.
 */
static const BlockDriver *bdrv_protocol_from_keys(GHashTable *opts)
{
    const BlockDriver *const *d;
    GHashTableIter it;
    gpointer k;

    if (!opts) {
        return NULL;
    }
    for (d = bdrv_driver_list(); *d; d++) {
        size_t n = strlen((*d)->name);

        if (!(*d)->is_protocol) {
            continue;
        }
        g_hash_table_iter_init(&it, opts);
        while (g_hash_table_iter_next(&it, &k, NULL)) {
            if (!strncmp(k, (*d)->name, n) && ((char *)k)[n] == '.') {
                return *d;
            }
        }
    }
    return NULL;
}

/*
 * Open @filename: a protocol node, and unless @format names a protocol,
 * a format node on top of it (probed when @format is NULL).  @opts are
 * the drive's namespaced driver keys, or NULL for nodes below the top
 * (backing files), which take no driver keys.  @chain_parent and
 * @chain_depth place the nodes in a backing chain before their drivers
 * open, so a driver opening its own backing file sees the whole chain
 * (loop detection, depth limit).
 */
static BlockDriverState *coroutine_fn
bdrv_co_open_node(const char *filename, const char *format, GHashTable *opts,
                  int flags, const char *drive, BlockDriverState *chain_parent,
                  int chain_depth, GError **errp)
{
    const BlockDriver *proto, *fmt = NULL;
    BlockDriverState *pbs, *bs;
    g_autoptr(GHashTable) popts = NULL;
    g_autoptr(GHashTable) fopts = NULL;
    int ret;

    if (format && *format) {
        fmt = bdrv_find_driver(format);
        if (!fmt) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "unknown format '%s'", format);
            return NULL;
        }
    }
    if (fmt && fmt->is_protocol) {
        proto = fmt;
    } else if (!filename) {
        proto = bdrv_protocol_from_keys(opts);
    } else {
        proto = bdrv_find_protocol_for(filename);
    }
    if (!proto) {
        if (!filename) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "no image named: set 'file'");
        } else {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "no protocol driver for '%s'", filename);
        }
        return NULL;
    }

    popts = bdrv_driver_options(opts, proto);
    if (filename) {
        g_hash_table_replace(popts, g_strdup("filename"), g_strdup(filename));
    }
    pbs = bdrv_new(filename, drive);
    pbs->chain_parent = chain_parent;
    pbs->chain_depth = chain_depth;
    ret = bdrv_co_open_driver(pbs, proto, popts, flags, errp);
    if (ret < 0) {
        bdrv_free(pbs);
        return NULL;
    }
    if (fmt == proto || (format && !*format)) {
        return pbs;
    }

    bs = bdrv_new(pbs->filename, drive);
    bs->chain_parent = chain_parent;
    bs->chain_depth = chain_depth;
    bdrv_attach_child(bs, pbs, "file", BDRV_CHILD_FILE);

    if (!fmt) {
        uint8_t *buf = g_malloc0(PROBE_BUF_SIZE);
        int64_t len = bdrv_getlength(pbs);
        int64_t n = len < PROBE_BUF_SIZE ? len : PROBE_BUF_SIZE;
        int score;

        ret = n > 0 ? bdrv_co_pread(bs->file, 0, n, buf, 0) : 0;
        if (ret < 0) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                        "cannot read '%s' to probe its format: %s",
                        bdrv_name(pbs), g_strerror(-ret));
            g_free(buf);
            goto fail;
        }
        fmt = bdrv_probe_format(buf, n, filename, &score);
        g_free(buf);
        if (!fmt) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "cannot tell the format of '%s'", bdrv_name(pbs));
            goto fail;
        }
        flags |= BDRV_O_PROBED;
    }

    fopts = bdrv_driver_options(opts, fmt);
    ret = bdrv_co_open_driver(bs, fmt, fopts, flags, errp);
    if (ret < 0) {
        goto fail;
    }
    return bs;

fail:
    bs->drv = NULL;
    bdrv_co_unref(bs);
    return NULL;
}

static void coroutine_fn bdrv_co_unref(BlockDriverState *bs)
{
    BdrvChild *c;

    if (!bs || --bs->refcnt > 0) {
        return;
    }
    if (bs->drv) {
        if (bs->open_flags & BDRV_O_RDWR) {
            int ret = bdrv_co_flush(bs);

            if (ret < 0) {
                log_error("%s: flush before close failed: %s", bdrv_name(bs),
                          strerror(-ret));
            }
        }
        if (bs->drv->co_close) {
            bs->drv->co_close(bs);
        }
    }
    while ((c = bs->children)) {
        bs->children = c->next;
        bdrv_co_unref(c->bs);
        g_free(c->name);
        g_free(c);
    }
    g_free(bs->opaque);
    bdrv_free(bs);
}

void coroutine_fn bdrv_co_unref_child(BlockDriverState *parent,
                                      BdrvChild *child)
{
    BdrvChild **link;

    for (link = &parent->children; *link; link = &(*link)->next) {
        if (*link == child) {
            *link = child->next;
            break;
        }
    }
    if (parent->file == child) {
        parent->file = NULL;
    }
    if (parent->backing == child) {
        parent->backing = NULL;
    }
    bdrv_co_unref(child->bs);
    g_free(child->name);
    g_free(child);
}

BdrvChild *coroutine_fn bdrv_co_open_child(BlockDriverState *parent,
                                           const char *name, int role,
                                           const char *filename,
                                           const char *format, int flags,
                                           GError **errp)
{
    BlockDriverState *bs;
    BdrvChild *c;
    int depth;

    if (flags < 0) {
        flags = parent->open_flags & BDRV_O_INHERIT_MASK;
        if (role != BDRV_CHILD_BACKING) {
            flags |= parent->open_flags & BDRV_O_RDWR;
        }
    }
    depth = parent->chain_depth + (role == BDRV_CHILD_BACKING);
    bs = bdrv_co_open_node(filename, format, NULL, flags, parent->drive_name,
                           parent, depth, errp);
    if (!bs) {
        return NULL;
    }
    c = bdrv_attach_child(parent, bs, name, role);
    bdrv_refresh_limits(parent);
    return c;
}

char *bdrv_resolve_relative(BlockDriverState *bs, const char *name)
{
    g_autofree char *dir = NULL;

    if (g_path_is_absolute(name) || !bs->filename ||
        bdrv_find_protocol_for(name) != bdrv_find_protocol_for("/") ||
        bdrv_find_protocol_for(bs->filename) != bdrv_find_protocol_for("/")) {
        return g_strdup(name);
    }
    dir = g_path_get_dirname(bs->filename);
    return g_build_filename(dir, name, NULL);
}

/* Same file?  Local files compare by device and inode. */
static bool bdrv_same_image(const char *a, const char *b)
{
    struct stat sa, sb;

    if (!a || !b) {
        return false;
    }
    if (stat(a, &sa) == 0 && stat(b, &sb) == 0) {
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    }
    return !strcmp(a, b);
}

int coroutine_fn bdrv_co_open_backing(BlockDriverState *bs, GError **errp)
{
    g_autofree char *path = NULL;
    BlockDriverState *p;
    GError *local_err = NULL;
    BdrvChild *c;

    if (!bs->backing_file || !*bs->backing_file) {
        return 0;
    }
    path = bdrv_resolve_relative(bs, bs->backing_file);
    if (bs->chain_depth + 1 >= BDRV_MAX_CHAIN_DEPTH) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "backing chain of '%s' is longer than %d images",
                    bdrv_name(bs), BDRV_MAX_CHAIN_DEPTH);
        return -ELOOP;
    }
    for (p = bs; p; p = p->chain_parent) {
        if (bdrv_same_image(p->filename, path)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_LOOP,
                        "backing chain loop: '%s' has backing file '%s', "
                        "which is already in its chain",
                        bdrv_name(bs), path);
            return -ELOOP;
        }
    }
    c = bdrv_co_open_child(bs, "backing", BDRV_CHILD_BACKING, path,
                           bs->backing_format, -1, &local_err);
    if (!c) {
        /* An error deeper in the chain already names the image whose
         * backing file failed: one prefix per level would bury the
         * reason of a long chain past the end of the log line. */
        if (g_str_has_prefix(local_err->message, "backing file of ")) {
            g_propagate_error(errp, local_err);
        } else {
            g_set_error(errp, G_FILE_ERROR, local_err->code,
                        "backing file of '%s': %s", bdrv_name(bs),
                        local_err->message);
            g_error_free(local_err);
        }
        return -EINVAL;
    }
    return 0;
}

void image_info_add(ImageInfoSpec *spec, const char *key, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_ptr_array_add(spec->keys, g_strdup(key));
    g_ptr_array_add(spec->values, g_strdup_vprintf(fmt, ap));
    va_end(ap);
}

static BdrvChild *bdrv_standalone_child(BlockDriverState *bs)
{
    BdrvChild *c = g_new0(BdrvChild, 1);

    c->name = g_strdup("standalone");
    c->bs = bs;
    c->role = BDRV_CHILD_FILE;
    return c;
}

BdrvChild *coroutine_fn bdrv_co_open_standalone(const char *filename,
                                                const char *format, int flags,
                                                GError **errp)
{
    BlockDriverState *bs =
        bdrv_co_open_node(filename, format, NULL, flags, NULL, NULL, 0, errp);

    return bs ? bdrv_standalone_child(bs) : NULL;
}

BdrvChild *coroutine_fn bdrv_co_open_driver_standalone(const BlockDriver *drv,
                                                       const char *filename,
                                                       GHashTable *opts,
                                                       int flags, GError **errp)
{
    BlockDriverState *bs = bdrv_new(filename, NULL);
    g_autoptr(GHashTable) o = opt_table_new();
    GHashTableIter it;
    gpointer k, v;

    if (opts) {
        g_hash_table_iter_init(&it, opts);
        while (g_hash_table_iter_next(&it, &k, &v)) {
            g_hash_table_insert(o, g_strdup(k), g_strdup(v));
        }
    }
    if (filename) {
        g_hash_table_replace(o, g_strdup("filename"), g_strdup(filename));
    }
    if (bdrv_co_open_driver(bs, drv, o, flags, errp) < 0) {
        bdrv_free(bs);
        return NULL;
    }
    return bdrv_standalone_child(bs);
}

void coroutine_fn bdrv_co_close_standalone(BdrvChild *child)
{
    if (child) {
        bdrv_co_unref(child->bs);
        g_free(child->name);
        g_free(child);
    }
}

/* Entry points used by block-backend.c */
BlockDriverState *coroutine_fn
bdrv_co_open_root(const char *filename, const char *format, GHashTable *opts,
                  int flags, const char *drive, GError **errp);
void coroutine_fn bdrv_co_close_root(BlockDriverState *bs);

BlockDriverState *coroutine_fn
bdrv_co_open_root(const char *filename, const char *format, GHashTable *opts,
                  int flags, const char *drive, GError **errp)
{
    return bdrv_co_open_node(filename, format, opts, flags, drive, NULL, 0,
                             errp);
}

void coroutine_fn bdrv_co_close_root(BlockDriverState *bs)
{
    bdrv_co_unref(bs);
}
