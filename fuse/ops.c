/*
 * The FUSE operations: the root directory listing the drives, and the
 * file operations of each drive, turned into BlockBackend requests.
 *
 * Thread model: libfuse calls these ops on the iothread whose queue read
 * the request.  Metadata ops (lookup, getattr, readdir, statfs, open,
 * release, flush) answer at once; they touch only the drive table (under
 * the mount's lock) and values that are safe to read from any thread.
 * Data ops start a coroutine in the drive's home event loop -- directly
 * if that is this thread, through a bottom half otherwise -- and return;
 * the coroutine replies when the I/O is done.  So a queue never waits for
 * I/O and one slow drive never holds up the others.
 *
 * Replies go to the /dev/fuse fd the request came from (the kernel
 * insists): the queue records its fd for the op, the request keeps it,
 * and ifs_ops_writev() (libfuse's custom writev) uses the fd of the
 * request being answered on this thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "ifs.h"
#include "blockcore/log.h"

#define IFS_ROOT_INO FUSE_ROOT_ID
#define IFS_ATTR_TIMEOUT 1.0
#define IFS_BLKSIZE 4096
/* Writes up to this size are copied out of the receive buffer. */
#define IFS_WRITE_COPY_MAX (64 * 1024)
/* reads of this size and more over /dev/fuse use a pooled buffer */
#define IFS_LARGE_READ (64 * 1024)

/* Per thread: where replies of the request being handled go. */
static __thread int ifs_reply_fd = -1;
static __thread IfsRingEnt *ifs_reply_ent;
static __thread IfsBuf *ifs_current_buf;
static __thread bool ifs_buf_taken;

void ifs_ops_set_current(int reply_fd, IfsBuf *buf)
{
    ifs_reply_fd = reply_fd;
    ifs_reply_ent = NULL;
    ifs_current_buf = buf;
    ifs_buf_taken = false;
}

void ifs_ops_set_current_ent(IfsRingEnt *e)
{
    ifs_reply_fd = -1;
    ifs_reply_ent = e;
    ifs_current_buf = NULL;
    ifs_buf_taken = false;
}

bool ifs_ops_took_buffer(void)
{
    return ifs_buf_taken;
}

ssize_t ifs_ops_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    IfsMount *m = userdata;
    bool uring_init;
    ssize_t ret;

    if (ifs_reply_ent) {
        return ifs_ring_reply(ifs_reply_ent, iov, count);
    }
    uring_init = ifs_ring_patch_reply(m->ring, iov, count);
    ret = writev(ifs_reply_fd >= 0 ? ifs_reply_fd : fd, iov, count);
    if (uring_init && ret >= 0) {
        ifs_ring_start(m->ring);
    }
    return ret;
}

typedef enum IfsOp {
    IFS_OP_READ,
    IFS_OP_WRITE,
    IFS_OP_FSYNC,
    IFS_OP_FALLOCATE,
    IFS_OP_TRUNCATE,
    IFS_OP_LSEEK,
} IfsOp;

/* A data request in flight. */
typedef struct IfsRequest {
    fuse_req_t req;
    int reply_fd;
    IfsRingEnt *reply_ent; /* the request came over io_uring */
    IfsMount *mount;
    IfsDrive *drive;
    IfsOp op;
    int64_t offset;
    int64_t length;
    int mode; /* fallocate mode, lseek whence */
    const char *data;
    IfsBuf *buf; /* owns data of large writes */
    void *copy;  /* owns data of small writes */
    /* setattr: */
    int to_set;
    struct stat attr;
} IfsRequest;

static IfsMount *ifs_mount_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

static IfsRequest *ifs_request_new(fuse_req_t req, IfsDrive *d, IfsOp op)
{
    IfsRequest *r = g_new0(IfsRequest, 1);

    r->req = req;
    r->reply_fd = ifs_reply_fd;
    r->reply_ent = ifs_reply_ent;
    r->mount = ifs_mount_of(req);
    r->drive = ifs_drive_ref(d);
    r->op = op;
    ifs_request_started(r->mount);
    return r;
}

static void ifs_request_free(IfsRequest *r)
{
    IfsMount *m = r->mount;

    if (r->buf) {
        ifs_buf_free(r->buf);
    }
    free(r->copy);
    ifs_drive_unref(r->drive);
    g_free(r);
    ifs_request_finished(m);
}

/* Make this thread's replies go where @r came from. */
static void ifs_reply_to(IfsRequest *r)
{
    ifs_reply_fd = r->reply_fd;
    ifs_reply_ent = r->reply_ent;
}

static void ifs_reply_err(IfsRequest *r, int err)
{
    ifs_reply_to(r);
    fuse_reply_err(r->req, err);
}

static void ifs_fill_root_attr(IfsMount *m, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = IFS_ROOT_INO;
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
    st->st_uid = m->uid;
    st->st_gid = m->gid;
    st->st_blksize = IFS_BLKSIZE;
    st->st_mtim.tv_sec = m->start_ns / 1000000000;
    st->st_mtim.tv_nsec = m->start_ns % 1000000000;
    st->st_atim = st->st_ctim = st->st_mtim;
}

static void ifs_fill_drive_attr(IfsMount *m, IfsDrive *d, struct stat *st)
{
    int64_t len = blk_getlength(d->blk);
    int64_t mt = __atomic_load_n(&d->mtime_ns, __ATOMIC_RELAXED);

    memset(st, 0, sizeof(*st));
    st->st_ino = d->ino;
    st->st_mode = S_IFREG | (d->read_only ? 0444 : 0644);
    st->st_nlink = 1;
    st->st_uid = m->uid;
    st->st_gid = m->gid;
    st->st_size = len;
    st->st_blocks = DIV_ROUND_UP(len, 512);
    st->st_blksize = IFS_BLKSIZE;
    st->st_mtim.tv_sec = mt / 1000000000;
    st->st_mtim.tv_nsec = mt % 1000000000;
    st->st_ctim = st->st_mtim;
    st->st_atim.tv_sec = m->start_ns / 1000000000;
    st->st_atim.tv_nsec = m->start_ns % 1000000000;
}

static void ifs_drive_touch(IfsDrive *d)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    __atomic_store_n(&d->mtime_ns, ts.tv_sec * INT64_C(1000000000) + ts.tv_nsec,
                     __ATOMIC_RELAXED);
}

static void ifs_op_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    /* Big requests (IFS_MAX_REQUEST), 1 MiB readahead. */
    conn->max_write = IFS_MAX_REQUEST;
    conn->max_read = 0;
    conn->max_readahead = 1 * MiB;
    /* The kernel's default of 12 background requests would cap async
     * O_DIRECT at queue depth 12 (shared/DESIGN.md). */
    conn->max_background = 256;
    conn->congestion_threshold = 192;
    conn->want |= FUSE_CAP_ASYNC_READ | FUSE_CAP_ASYNC_DIO;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) {
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    }
    /*
     * Without it the kernel turns open(O_TRUNC) into a setattr(size 0)
     * before the open, and `dd of=DRIVE` (no conv=notrunc) would empty a
     * resizable image and then fail with ENOSPC.  With it O_TRUNC comes
     * to ifs_op_open(), which ignores it as a block device does.
     */
    if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) {
        conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
    }
    conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ |
                    FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
}

static void ifs_op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    IfsMount *m = ifs_mount_of(req);
    struct fuse_entry_param e;
    IfsDrive *d;

    if (parent != IFS_ROOT_INO) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    d = ifs_find_drive_name(m, name);
    if (!d) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = d->ino;
    e.generation = 1;
    e.attr_timeout = IFS_ATTR_TIMEOUT;
    e.entry_timeout = IFS_ATTR_TIMEOUT;
    ifs_fill_drive_attr(m, d, &e.attr);
    ifs_drive_unref(d);
    fuse_reply_entry(req, &e);
}

static void ifs_op_getattr(fuse_req_t req, fuse_ino_t ino,
                           struct fuse_file_info *fi)
{
    IfsMount *m = ifs_mount_of(req);
    struct stat st;
    IfsDrive *d;

    (void)fi;
    if (ino == IFS_ROOT_INO) {
        ifs_fill_root_attr(m, &st);
        fuse_reply_attr(req, &st, IFS_ATTR_TIMEOUT);
        return;
    }
    d = ifs_find_drive_ino(m, ino);
    if (!d) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    ifs_fill_drive_attr(m, d, &st);
    ifs_drive_unref(d);
    fuse_reply_attr(req, &st, IFS_ATTR_TIMEOUT);
}

static void ifs_op_open(fuse_req_t req, fuse_ino_t ino,
                        struct fuse_file_info *fi)
{
    IfsMount *m = ifs_mount_of(req);
    IfsDrive *d;

    if (ino == IFS_ROOT_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    d = ifs_open_drive_ino(m, ino);
    if (!d) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY && d->read_only) {
        ifs_release_drive(d);
        fuse_reply_err(req, EROFS);
        return;
    }
    /* O_TRUNC is ignored (FUSE_CAP_ATOMIC_O_TRUNC): the exposed file is a
     * disk, and a program copying an image onto it means to overwrite it.
     * Only an explicit ftruncate resizes. */
    fi->fh = (uint64_t)(uintptr_t)d; /* the reference goes with the file */
    fi->keep_cache = 0;
    /*
     * An O_DIRECT opener (a VMM with cache=none, fio --direct=1) gets the
     * kernel's direct-I/O file path: on the ordinary path every write
     * first asks us for the security.capability xattr (to drop setuid
     * bits; FUSE forbids the kernel to remember the answer), a second
     * round trip per write.  The page cache is bypassed either way.
     */
    fi->direct_io = (fi->flags & O_DIRECT) != 0;
    if (fuse_reply_open(req, fi) == -ENOENT) {
        /* The opener was interrupted: no release will come. */
        ifs_release_drive(d);
    }
}

static void ifs_op_release(fuse_req_t req, fuse_ino_t ino,
                           struct fuse_file_info *fi)
{
    (void)ino;
    ifs_release_drive((IfsDrive *)(uintptr_t)fi->fh);
    fuse_reply_err(req, 0);
}

/*
 * close() sends FLUSH; it is not fsync, and answering it with a disk flush
 * makes every open/close pay one (shared/DESIGN.md).  Data written is
 * already in the image; fsync makes it durable.
 */
static void ifs_op_flush(fuse_req_t req, fuse_ino_t ino,
                         struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);
}

static IfsDrive *ifs_file_drive(struct fuse_file_info *fi)
{
    return (IfsDrive *)(uintptr_t)fi->fh;
}

static void coroutine_fn ifs_co_read(void *opaque)
{
    IfsRequest *r = opaque;
    BlockBackend *blk = r->drive->blk;
    int64_t len = blk_getlength(blk);
    int64_t n = r->length;
    IOVector qiov;
    void *buf, *ring_buf;
    IfsBuf *pooled = NULL;
    int ret;

    if (r->offset >= len) {
        ifs_reply_to(r);
        fuse_reply_buf(r->req, NULL, 0);
        goto out;
    }
    if (n > len - r->offset) {
        n = len - r->offset;
    }
    /* Over io_uring the data goes straight into the reply's buffer. */
    ring_buf = r->reply_ent ? ifs_ring_payload(r->reply_ent, n) : NULL;
    /* Large reads over /dev/fuse use a pooled buffer (huge pages). */
    if (!ring_buf && n >= IFS_LARGE_READ && n <= IFS_MAX_REQUEST) {
        pooled = ifs_buf_new();
    }
    buf = ring_buf ? ring_buf
          : pooled ? ifs_buf_mem(pooled)
                   : blk_blockalign(blk, n);
    iov_init_buf(&qiov, buf, n);
    ret = blk_co_preadv(blk, r->offset, n, &qiov);
    ifs_reply_to(r);
    if (ret < 0) {
        fuse_reply_err(r->req, -ret);
    } else {
        fuse_reply_buf(r->req, buf, n);
    }
    if (pooled) {
        ifs_buf_free(pooled);
    } else if (!ring_buf) {
        free(buf);
    }
out:
    ifs_request_free(r);
}

static void ifs_op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                        struct fuse_file_info *fi)
{
    IfsDrive *d = ifs_file_drive(fi);
    IfsRequest *r;

    (void)ino;
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    r = ifs_request_new(req, d, IFS_OP_READ);
    r->offset = off;
    r->length = size;
    aio_co_spawn(d->ctx, ifs_co_read, r);
}

static void coroutine_fn ifs_co_write(void *opaque)
{
    IfsRequest *r = opaque;
    BlockBackend *blk = r->drive->blk;
    int64_t len = blk_getlength(blk);
    int64_t n = r->length;
    IOVector qiov;
    int ret;

    if (n == 0) {
        ifs_reply_to(r);
        fuse_reply_write(r->req, 0);
        goto out;
    }
    /* A write running past the end is short, like on a block device; one
     * starting past it gets ENOSPC from the drive (an invalid request in
     * its statistics). */
    if (r->offset < len && n > len - r->offset) {
        n = len - r->offset;
    }
    iov_init_buf(&qiov, (void *)r->data, n);
    ret = blk_co_pwritev(blk, r->offset, n, &qiov);
    if (ret == 0) {
        ifs_drive_touch(r->drive);
    }
    ifs_reply_to(r);
    if (ret < 0) {
        fuse_reply_err(r->req, -ret);
    } else {
        fuse_reply_write(r->req, n);
    }
out:
    ifs_request_free(r);
}

static void ifs_op_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
                         size_t size, off_t off, struct fuse_file_info *fi)
{
    IfsDrive *d = ifs_file_drive(fi);
    IfsRequest *r;

    (void)ino;
    if (d->read_only) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    r = ifs_request_new(req, d, IFS_OP_WRITE);
    r->offset = off;
    r->length = size;
    if (ifs_reply_ent) {
        /* The ring entry keeps the data until we reply. */
        r->data = buf;
    } else if (size <= IFS_WRITE_COPY_MAX) {
        /* Small: copy, and the queue keeps its receive buffer. */
        if (posix_memalign(&r->copy, 4096, size ? size : 1)) {
            ifs_request_free(r);
            fuse_reply_err(req, ENOMEM);
            return;
        }
        memcpy(r->copy, buf, size);
        r->data = r->copy;
    } else {
        /* Large: keep the receive buffer until we reply. */
        r->data = buf;
        r->buf = ifs_current_buf;
        ifs_buf_taken = true;
    }
    aio_co_spawn(d->ctx, ifs_co_write, r);
}

static void coroutine_fn ifs_co_fsync(void *opaque)
{
    IfsRequest *r = opaque;
    int ret = blk_co_flush(r->drive->blk);

    ifs_reply_err(r, -ret);
    ifs_request_free(r);
}

static void ifs_op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                         struct fuse_file_info *fi)
{
    IfsDrive *d = ifs_file_drive(fi);

    (void)ino;
    (void)datasync;
    aio_co_spawn(d->ctx, ifs_co_fsync, ifs_request_new(req, d, IFS_OP_FSYNC));
}

static int coroutine_fn ifs_co_grow(IfsRequest *r, int64_t size)
{
    GError *err = NULL;
    int ret = blk_co_truncate(r->drive->blk, size, &err);

    if (ret < 0) {
        log_warning("drive '%s': resize to %" G_GINT64_FORMAT " failed: %s",
                    r->drive->name, size, err ? err->message : "");
        g_clear_error(&err);
    }
    return ret;
}

/* Errors of a resize as a file system would report them. */
static int ifs_resize_errno(int ret)
{
    return ret == -ENOTSUP ? EPERM : -ret;
}

static void coroutine_fn ifs_co_fallocate(void *opaque)
{
    IfsRequest *r = opaque;
    BlockBackend *blk = r->drive->blk;
    int64_t len = blk_getlength(blk);
    int64_t end = r->offset + r->length;
    bool keep_size = r->mode & FALLOC_FL_KEEP_SIZE;
    int ret = 0;

    if (r->mode & FALLOC_FL_PUNCH_HOLE) {
        /* Deallocate where the image can; it reads as zeros anyway. */
        if (r->offset < len) {
            ret = blk_co_pwrite_zeroes(
                blk, r->offset, (end < len ? end : len) - r->offset, true);
        }
    } else {
        if (end > len && !keep_size) {
            ret = ifs_co_grow(r, end);
            if (ret < 0) {
                ifs_reply_err(r, ifs_resize_errno(ret));
                goto out;
            }
            len = blk_getlength(blk);
        }
        if ((r->mode & FALLOC_FL_ZERO_RANGE) && r->offset < len) {
            ret = blk_co_pwrite_zeroes(
                blk, r->offset, (end < len ? end : len) - r->offset, false);
        }
    }
    if (ret == 0) {
        ifs_drive_touch(r->drive);
    }
    ifs_reply_err(r, -ret);
out:
    ifs_request_free(r);
}

static void ifs_op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode,
                             off_t offset, off_t length,
                             struct fuse_file_info *fi)
{
    IfsDrive *d = ifs_file_drive(fi);
    const int supported =
        FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
    IfsRequest *r;

    (void)ino;
    if (mode & ~supported) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if ((mode & FALLOC_FL_PUNCH_HOLE) &&
        (!(mode & FALLOC_FL_KEEP_SIZE) || (mode & FALLOC_FL_ZERO_RANGE))) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if (offset < 0 || length <= 0 || offset > INT64_MAX - length) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (d->read_only) {
        fuse_reply_err(req, EROFS);
        return;
    }
    r = ifs_request_new(req, d, IFS_OP_FALLOCATE);
    r->offset = offset;
    r->length = length;
    r->mode = mode;
    aio_co_spawn(d->ctx, ifs_co_fallocate, r);
}

static void coroutine_fn ifs_co_setattr(void *opaque)
{
    IfsRequest *r = opaque;
    IfsMount *m = r->mount;
    struct stat st;

    /* truncate to the current size is a no-op on a file: so it is on a
     * drive that cannot be resized (a raw slice, a block device). */
    if ((r->to_set & FUSE_SET_ATTR_SIZE) &&
        r->attr.st_size != blk_getlength(r->drive->blk)) {
        int ret = ifs_co_grow(r, r->attr.st_size);

        if (ret < 0) {
            ifs_reply_err(r, ifs_resize_errno(ret));
            goto out;
        }
        ifs_drive_touch(r->drive);
    }
    if (r->to_set & FUSE_SET_ATTR_MTIME) {
        struct timespec ts = r->attr.st_mtim;

        if (r->to_set & FUSE_SET_ATTR_MTIME_NOW) {
            clock_gettime(CLOCK_REALTIME, &ts);
        }
        __atomic_store_n(&r->drive->mtime_ns,
                         ts.tv_sec * INT64_C(1000000000) + ts.tv_nsec,
                         __ATOMIC_RELAXED);
    }
    ifs_fill_drive_attr(m, r->drive, &st);
    ifs_reply_to(r);
    fuse_reply_attr(r->req, &st, IFS_ATTR_TIMEOUT);
out:
    ifs_request_free(r);
}

static void ifs_op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                           int to_set, struct fuse_file_info *fi)
{
    IfsMount *m = ifs_mount_of(req);
    IfsDrive *d;
    IfsRequest *r;

    (void)fi;
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (ino == IFS_ROOT_INO) {
        struct stat st;

        if (to_set & FUSE_SET_ATTR_SIZE) {
            fuse_reply_err(req, EISDIR);
            return;
        }
        ifs_fill_root_attr(m, &st);
        fuse_reply_attr(req, &st, IFS_ATTR_TIMEOUT);
        return;
    }
    d = ifs_find_drive_ino(m, ino);
    if (!d) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if ((to_set & FUSE_SET_ATTR_SIZE) && d->read_only) {
        ifs_drive_unref(d);
        fuse_reply_err(req, EROFS);
        return;
    }
    r = ifs_request_new(req, d, IFS_OP_TRUNCATE);
    ifs_drive_unref(d);
    r->attr = *attr;
    r->to_set = to_set;
    aio_co_spawn(r->drive->ctx, ifs_co_setattr, r);
}

static void coroutine_fn ifs_co_lseek(void *opaque)
{
    IfsRequest *r = opaque;
    BlockBackend *blk = r->drive->blk;
    int64_t len = blk_getlength(blk);
    int64_t pos = r->offset;

    if (pos >= len) {
        ifs_reply_err(r, ENXIO);
        goto out;
    }
    while (pos < len) {
        int64_t pnum;
        bool zero;
        int ret = blk_co_zero_status(blk, pos, len - pos, &pnum, &zero);

        if (ret < 0) {
            ifs_reply_err(r, -ret);
            goto out;
        }
        if ((r->mode == SEEK_DATA && !zero) || (r->mode == SEEK_HOLE && zero)) {
            break;
        }
        pos += pnum;
    }
    if (pos >= len) {
        if (r->mode == SEEK_DATA) {
            ifs_reply_err(r, ENXIO);
            goto out;
        }
        pos = len; /* the implicit hole at the end */
    }
    ifs_reply_to(r);
    fuse_reply_lseek(r->req, pos);
out:
    ifs_request_free(r);
}

static void ifs_op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                         struct fuse_file_info *fi)
{
    IfsDrive *d = ifs_file_drive(fi);
    IfsRequest *r;

    (void)ino;
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (off < 0) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    r = ifs_request_new(req, d, IFS_OP_LSEEK);
    r->offset = off;
    r->mode = whence;
    aio_co_spawn(d->ctx, ifs_co_lseek, r);
}

static void ifs_op_opendir(fuse_req_t req, fuse_ino_t ino,
                           struct fuse_file_info *fi)
{
    if (ino != IFS_ROOT_INO) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    fuse_reply_open(req, fi);
}

static void ifs_op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size,
                           off_t off, struct fuse_file_info *fi)
{
    IfsMount *m = ifs_mount_of(req);
    char *buf = g_malloc(size);
    size_t used = 0;
    off_t idx;

    (void)fi;
    if (ino != IFS_ROOT_INO) {
        g_free(buf);
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    g_rw_lock_reader_lock(&m->lock);
    /* Entries: ".", "..", then the drives; the offset is the index + 1. */
    for (idx = off; idx < (off_t)m->drives->len + 2; idx++) {
        struct stat st;
        const char *name;
        size_t n;

        memset(&st, 0, sizeof(st));
        if (idx < 2) {
            name = idx == 0 ? "." : "..";
            st.st_ino = IFS_ROOT_INO;
            st.st_mode = S_IFDIR;
        } else {
            IfsDrive *d = g_ptr_array_index(m->drives, idx - 2);

            name = d->name;
            st.st_ino = d->ino;
            st.st_mode = S_IFREG;
        }
        n = fuse_add_direntry(req, buf + used, size - used, name, &st, idx + 1);
        if (n > size - used) {
            break;
        }
        used += n;
    }
    g_rw_lock_reader_unlock(&m->lock);
    fuse_reply_buf(req, buf, used);
    g_free(buf);
}

static void ifs_op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    IfsMount *m = ifs_mount_of(req);
    struct statvfs sv;
    uint64_t total = 0;
    unsigned i;

    (void)ino;
    g_rw_lock_reader_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        total += DIV_ROUND_UP(blk_getlength(d->blk), IFS_BLKSIZE);
    }
    memset(&sv, 0, sizeof(sv));
    sv.f_bsize = IFS_BLKSIZE;
    sv.f_frsize = IFS_BLKSIZE;
    sv.f_blocks = total;
    sv.f_files = m->drives->len + 1;
    sv.f_namemax = 255;
    g_rw_lock_reader_unlock(&m->lock);
    fuse_reply_statfs(req, &sv);
}

/* The root answers "user.imgfs.control": where the control socket is. */
static void ifs_op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name,
                            size_t size)
{
    IfsMount *m = ifs_mount_of(req);
    size_t len;

    if (ino != IFS_ROOT_INO || strcmp(name, IFS_CONTROL_XATTR) ||
        !m->control_path) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    len = strlen(m->control_path);
    if (size == 0) {
        fuse_reply_xattr(req, len);
    } else if (size < len) {
        fuse_reply_err(req, ERANGE);
    } else {
        fuse_reply_buf(req, m->control_path, len);
    }
}

/*
 * size 0 asks for the length of the list (cp -a, libattr), and the kernel
 * wants that answer in a fuse_getxattr_out: an empty buffer instead gave
 * EIO over /dev/fuse and EINVAL over io_uring.
 */
static void ifs_op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    static const char names[] = IFS_CONTROL_XATTR;

    if (ino != IFS_ROOT_INO) {
        if (size == 0) {
            fuse_reply_xattr(req, 0);
        } else {
            fuse_reply_buf(req, NULL, 0);
        }
    } else if (size == 0) {
        fuse_reply_xattr(req, sizeof(names));
    } else if (size < sizeof(names)) {
        fuse_reply_err(req, ERANGE);
    } else {
        fuse_reply_buf(req, names, sizeof(names));
    }
}

/* The directory is the config file's: no new files here. */
static void ifs_op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name,
                         mode_t mode, dev_t rdev)
{
    (void)parent;
    (void)name;
    (void)mode;
    (void)rdev;
    fuse_reply_err(req, EPERM);
}

static void ifs_op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name,
                         mode_t mode)
{
    (void)parent;
    (void)name;
    (void)mode;
    fuse_reply_err(req, EPERM);
}

static void ifs_op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    (void)parent;
    (void)name;
    fuse_reply_err(req, EPERM);
}

static void ifs_op_rename(fuse_req_t req, fuse_ino_t parent, const char *name,
                          fuse_ino_t newparent, const char *newname,
                          unsigned int flags)
{
    (void)parent;
    (void)name;
    (void)newparent;
    (void)newname;
    (void)flags;
    fuse_reply_err(req, EPERM);
}

static void ifs_op_create(fuse_req_t req, fuse_ino_t parent, const char *name,
                          mode_t mode, struct fuse_file_info *fi)
{
    (void)parent;
    (void)name;
    (void)mode;
    (void)fi;
    fuse_reply_err(req, EPERM);
}

const struct fuse_lowlevel_ops ifs_ops = {
    .init = ifs_op_init,
    .lookup = ifs_op_lookup,
    .getattr = ifs_op_getattr,
    .setattr = ifs_op_setattr,
    .open = ifs_op_open,
    .release = ifs_op_release,
    .flush = ifs_op_flush,
    .read = ifs_op_read,
    .write = ifs_op_write,
    .fsync = ifs_op_fsync,
    .fallocate = ifs_op_fallocate,
    .lseek = ifs_op_lseek,
    .opendir = ifs_op_opendir,
    .readdir = ifs_op_readdir,
    .statfs = ifs_op_statfs,
    .mknod = ifs_op_mknod,
    .mkdir = ifs_op_mkdir,
    .unlink = ifs_op_unlink,
    .rmdir = ifs_op_unlink,
    .rename = ifs_op_rename,
    .create = ifs_op_create,
    .getxattr = ifs_op_getxattr,
    .listxattr = ifs_op_listxattr,
};
