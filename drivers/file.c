/*
 * file: the protocol driver for host files and host block devices.
 *
 * Every system call that can block on the disk (preadv, pwritev,
 * fdatasync, fallocate, ftruncate, lseek SEEK_DATA) runs on the worker
 * pool; the coroutine yields meanwhile.  With O_DIRECT (cache.direct)
 * the node declares the device's alignment and blockcore makes every
 * request fit it.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "blockcore/driver.h"
#include "blockcore/linux-aio.h"
#include "blockcore/log.h"
#include "blockcore/thread-pool.h"
#include "blockcore/uring.h"

typedef struct FileState {
    int fd;
    AioUring *uring; /* aio=io_uring: this event loop's ring */
    LinuxAio *laio;  /* aio=native: this event loop's AIO context */
    bool is_bdev;
    uint32_t dio_align;     /* O_DIRECT offset/length alignment */
    uint32_t dio_mem_align; /* O_DIRECT buffer alignment */
    bool no_punch_hole;     /* fallocate modes found unsupported */
    bool no_zero_range;
    bool no_seek_data;
    bool locked; /* counted in locked_files */
    dev_t lock_dev;
    ino_t lock_ino;
} FileState;

/* One system call for the worker pool. */
typedef struct FileJob {
    int fd;
    int type;
    int64_t offset;
    int64_t bytes;
    struct iovec *iov;
    int niov;
    int mode;    /* fallocate mode, lseek whence */
    int rwflags; /* pwritev2 flags */
    int64_t result;
} FileJob;

enum {
    FILE_JOB_READ,
    FILE_JOB_WRITE,
    FILE_JOB_FLUSH,
    FILE_JOB_FALLOCATE,
    FILE_JOB_TRUNCATE,
    FILE_JOB_LSEEK,
    FILE_JOB_DISCARD_BDEV,
};

/* Advance an iovec array past @n bytes. */
static void iov_advance(struct iovec **iov, int *niov, size_t n)
{
    while (n > 0 && *niov > 0) {
        if (n >= (*iov)->iov_len) {
            n -= (*iov)->iov_len;
            (*iov)++;
            (*niov)--;
        } else {
            (*iov)->iov_base = (char *)(*iov)->iov_base + n;
            (*iov)->iov_len -= n;
            n = 0;
        }
    }
}

static void iov_zero_rest(struct iovec *iov, int niov)
{
    int i;

    for (i = 0; i < niov; i++) {
        memset(iov[i].iov_base, 0, iov[i].iov_len);
    }
}

static int file_job_rw(FileJob *job)
{
    struct iovec *iov = job->iov;
    int niov = job->niov;
    int64_t done = 0;
    bool short_read = false;

    while (done < job->bytes) {
        ssize_t n;

        if (job->type == FILE_JOB_READ) {
            n = preadv(job->fd, iov, niov, job->offset + done);
        } else {
            n = pwritev2(job->fd, iov, niov, job->offset + done, job->rwflags);
        }
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            /* O_DIRECT refuses to continue a short read at an unaligned
             * end of file: that is the end of the file. */
            if (job->type == FILE_JOB_READ && short_read && errno == EINVAL) {
                iov_zero_rest(iov, niov);
                return 0;
            }
            return -errno;
        }
        if (n == 0) {
            if (job->type == FILE_JOB_READ) {
                iov_zero_rest(iov, niov);
                return 0;
            }
            return -ENOSPC;
        }
        short_read = true;
        done += n;
        iov_advance(&iov, &niov, n);
    }
    return 0;
}

static int file_job_run(void *opaque)
{
    FileJob *job = opaque;

    switch (job->type) {
    case FILE_JOB_READ:
    case FILE_JOB_WRITE:
        return file_job_rw(job);
    case FILE_JOB_FLUSH:
        return fdatasync(job->fd) < 0 ? -errno : 0;
    case FILE_JOB_FALLOCATE:
        return fallocate(job->fd, job->mode, job->offset, job->bytes) < 0
                   ? -errno
                   : 0;
    case FILE_JOB_TRUNCATE:
        return ftruncate(job->fd, job->offset) < 0 ? -errno : 0;
    case FILE_JOB_LSEEK:
        job->result = lseek(job->fd, job->offset, job->mode);
        return job->result < 0 ? -errno : 0;
    case FILE_JOB_DISCARD_BDEV: {
        uint64_t range[2] = {job->offset, job->bytes};

        return ioctl(job->fd, BLKDISCARD, range) < 0 ? -errno : 0;
    }
    }
    return -EINVAL;
}

static int coroutine_fn file_co_job(FileJob *job)
{
    return thread_pool_co_run(file_job_run, job);
}

static int64_t file_fd_length(FileState *s)
{
    struct stat st;
    uint64_t size;

    if (s->is_bdev) {
        if (ioctl(s->fd, BLKGETSIZE64, &size) < 0) {
            return -errno;
        }
        return size;
    }
    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return st.st_size;
}

/* The O_DIRECT alignment of the open file. */
static void file_probe_dio_alignment(FileState *s)
{
    struct statx stx;
    int sector;

    s->dio_align = 4096;
    s->dio_mem_align = 4096;
    if (s->is_bdev && ioctl(s->fd, BLKSSZGET, &sector) == 0 && sector > 0) {
        s->dio_align = sector;
        s->dio_mem_align = sector;
        return;
    }
#ifdef STATX_DIOALIGN
    if (statx(s->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
        (stx.stx_mask & STATX_DIOALIGN) && stx.stx_dio_offset_align) {
        s->dio_align = stx.stx_dio_offset_align;
        s->dio_mem_align =
            stx.stx_dio_mem_align > 512 ? stx.stx_dio_mem_align : 512;
    }
#else
    (void)stx;
#endif
}

/*
 * Image locking, compatible with QEMU's: a process holding permission P
 * on an image takes a shared OFD lock on byte 100 + P; one that does not
 * let others have P locks byte 200 + P.  Before using an image we check
 * that nobody refuses what we take (200 + P) and nobody holds what we
 * refuse (100 + P).  imgfs never shares "write" or "resize": a running
 * QEMU and imgfs (or two imgfs) can never both write one image.
 */
enum {
    LOCK_PERM_BASE = 100,
    LOCK_SHARED_BASE = 200,
};
enum {
    PERM_CONSISTENT_READ = 0,
    PERM_WRITE = 1,
    PERM_WRITE_UNCHANGED = 2,
    PERM_RESIZE = 3,
    PERM_COUNT = 4,
};
static const char *const perm_names[PERM_COUNT] = {
    "consistent read",
    "write",
    "write unchanged",
    "resize",
};

static int file_lock_byte(int fd, off_t off)
{
    struct flock fl = {
        .l_type = F_RDLCK,
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
    };

    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* Does another open file hold a lock on byte @off? */
static int file_byte_locked(int fd, off_t off, bool *locked)
{
    struct flock fl = {
        .l_type = F_WRLCK,
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
    };

    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
        return -errno;
    }
    *locked = fl.l_type != F_UNLCK;
    return 0;
}

/*
 * Files this process has locked.  OFD locks cannot tell our own other
 * open files from another process's, so the same file opened twice by
 * one drive (a vmdk descriptor listing two extents of one file) would
 * conflict with itself: such reopens are counted here instead.  Two
 * drives of one mount writing the same image are refused as two
 * processes would be.
 */
typedef struct LockedFile {
    dev_t dev;
    ino_t ino;
    char *drive;
    bool write;
    int count;
} LockedFile;

static int file_lock_bytes(FileState *s, const char *filename, int flags,
                           GError **errp);

static GMutex locked_files_lock;
static GList *locked_files; /* LockedFile *, protected by locked_files_lock */

static LockedFile *locked_file_find(dev_t dev, ino_t ino)
{
    GList *l;

    for (l = locked_files; l; l = l->next) {
        LockedFile *lf = l->data;

        if (lf->dev == dev && lf->ino == ino) {
            return lf;
        }
    }
    return NULL;
}

static void locked_file_put(FileState *s)
{
    LockedFile *lf;

    if (!s->locked) {
        return;
    }
    g_mutex_lock(&locked_files_lock);
    lf = locked_file_find(s->lock_dev, s->lock_ino);
    if (lf && --lf->count == 0) {
        locked_files = g_list_remove(locked_files, lf);
        g_free(lf->drive);
        g_free(lf);
    }
    g_mutex_unlock(&locked_files_lock);
    s->locked = false;
}

static int file_lock_image(FileState *s, const char *filename, int flags,
                           const char *drive, GError **errp)
{
    struct stat st;
    LockedFile *lf;
    int ret;

    if ((flags & BDRV_O_NO_LOCK) || (flags & BDRV_O_FORCE_SHARE) ||
        fstat(s->fd, &st) < 0) {
        return 0;
    }
    g_mutex_lock(&locked_files_lock);
    lf = locked_file_find(st.st_dev, st.st_ino);
    if (lf) {
        bool write = flags & BDRV_O_RDWR;

        if (g_strcmp0(lf->drive, drive) && (write || lf->write)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_PERM,
                        "image '%s' is in use: drive '%s' of this mount "
                        "has it open%s (locking)",
                        filename, lf->drive ? lf->drive : "?",
                        lf->write ? " for writing" : "");
            g_mutex_unlock(&locked_files_lock);
            return -EBUSY;
        }
        lf->count++;
        lf->write |= write;
        g_mutex_unlock(&locked_files_lock);
        s->locked = true;
        s->lock_dev = st.st_dev;
        s->lock_ino = st.st_ino;
        return 0;
    }
    ret = file_lock_bytes(s, filename, flags, errp);
    if (ret == 0) {
        lf = g_new0(LockedFile, 1);
        lf->dev = st.st_dev;
        lf->ino = st.st_ino;
        lf->drive = g_strdup(drive);
        lf->write = flags & BDRV_O_RDWR;
        lf->count = 1;
        locked_files = g_list_prepend(locked_files, lf);
        s->locked = true;
        s->lock_dev = st.st_dev;
        s->lock_ino = st.st_ino;
    }
    g_mutex_unlock(&locked_files_lock);
    return ret;
}

static int file_lock_bytes(FileState *s, const char *filename, int flags,
                           GError **errp)
{
    unsigned perm = 1u << PERM_CONSISTENT_READ;
    unsigned unshared = (1u << PERM_WRITE) | (1u << PERM_RESIZE);
    int i, ret = 0;
    bool locked;

    if ((flags & BDRV_O_NO_LOCK) || (flags & BDRV_O_FORCE_SHARE)) {
        return 0;
    }
    if (flags & BDRV_O_RDWR) {
        perm |= (1u << PERM_WRITE) | (1u << PERM_RESIZE);
    }
    for (i = 0; i < PERM_COUNT && ret == 0; i++) {
        if (perm & (1u << i)) {
            ret = file_lock_byte(s->fd, LOCK_PERM_BASE + i);
        }
        if (ret == 0 && (unshared & (1u << i))) {
            ret = file_lock_byte(s->fd, LOCK_SHARED_BASE + i);
        }
    }
    if (ret < 0) {
        if (flags & BDRV_O_LOCK_STRICT) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                        "cannot lock '%s' (locking = on): %s", filename,
                        g_strerror(-ret));
            return ret;
        }
        return 0; /* locking = auto: the file system cannot lock */
    }
    for (i = 0; i < PERM_COUNT; i++) {
        if ((perm & (1u << i)) &&
            file_byte_locked(s->fd, LOCK_SHARED_BASE + i, &locked) == 0 &&
            locked) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_PERM,
                        "image '%s' is in use: another process does not "
                        "share its '%s' permission (locking)",
                        filename, perm_names[i]);
            return -EBUSY;
        }
        if ((unshared & (1u << i)) &&
            file_byte_locked(s->fd, LOCK_PERM_BASE + i, &locked) == 0 &&
            locked) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_PERM,
                        "image '%s' is in use: another process holds it "
                        "with '%s' permission (locking)",
                        filename, perm_names[i]);
            return -EBUSY;
        }
    }
    return 0;
}

static int coroutine_fn file_co_open(BlockDriverState *bs, GHashTable *opts,
                                     int flags, GError **errp)
{
    FileState *s = bs->opaque;
    const char *filename = opt_get_str(opts, "filename", NULL);
    int oflags = O_CLOEXEC;
    struct stat st;
    int64_t len;

    if (!filename || !*filename) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "no image file given");
        return -EINVAL;
    }
    oflags |= (flags & BDRV_O_RDWR) ? O_RDWR : O_RDONLY;
    if (flags & BDRV_O_NOCACHE) {
        oflags |= O_DIRECT;
    }
    if (flags & BDRV_O_CREATE) {
        oflags |= O_CREAT | O_TRUNC;
    }
    s->fd = open(filename, oflags, 0644);
    if (s->fd < 0) {
        int err = errno;

        if (err == EINVAL && (flags & BDRV_O_NOCACHE)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "cannot open '%s' with O_DIRECT (cache=none): the "
                        "file system does not support it",
                        filename);
        } else if ((err == EACCES || err == EROFS || err == EPERM) &&
                   (flags & BDRV_O_RDWR)) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "cannot open '%s' for writing: %s", filename,
                        g_strerror(err));
        } else {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "cannot open '%s': %s", filename, g_strerror(err));
        }
        return -err;
    }
    if (fstat(s->fd, &st) < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot stat '%s': %s", filename, g_strerror(err));
        close(s->fd);
        return -err;
    }
    if (S_ISBLK(st.st_mode)) {
        s->is_bdev = true;
    } else if (!S_ISREG(st.st_mode)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "'%s' is not a regular file or block device", filename);
        close(s->fd);
        return -EINVAL;
    }
    len = file_fd_length(s);
    if (len < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-len),
                    "cannot get the size of '%s': %s", filename,
                    g_strerror(-len));
        close(s->fd);
        return (int)len;
    }
    bs->total_bytes = len;
    if (file_lock_image(s, filename, flags, bs->drive_name, errp) < 0) {
        close(s->fd);
        return -EBUSY;
    }
    if (flags & BDRV_O_NOCACHE) {
        file_probe_dio_alignment(s);
    }
    bs->supported_write_flags = BDRV_REQ_FUA;
    if (flags & BDRV_O_AIO_IO_URING) {
        GError *err = NULL;

        s->uring = aio_uring_get(bs->ctx, &err);
        if (!s->uring) {
            log_warning("%s: %s; using aio=threads", filename, err->message);
            g_error_free(err);
        }
    } else if (flags & BDRV_O_AIO_NATIVE) {
        s->laio = linux_aio_get(bs->ctx, errp);
        if (!s->laio) {
            locked_file_put(s);
            close(s->fd);
            return -ENOTSUP;
        }
    }
    return 0;
}

static void coroutine_fn file_co_close(BlockDriverState *bs)
{
    FileState *s = bs->opaque;

    locked_file_put(s);
    close(s->fd);
}

static void file_refresh_limits(BlockDriverState *bs, BlockLimits *bl)
{
    FileState *s = bs->opaque;

    if (bs->open_flags & BDRV_O_NOCACHE) {
        bl->request_alignment = s->dio_align;
        bl->min_mem_alignment = s->dio_mem_align;
        if (bl->opt_mem_alignment < s->dio_mem_align) {
            bl->opt_mem_alignment = s->dio_mem_align;
        }
    }
    bl->max_transfer = 1 * GiB;
}

static int64_t coroutine_fn file_co_getlength(BlockDriverState *bs)
{
    return file_fd_length(bs->opaque);
}

static int coroutine_fn file_co_rw(BlockDriverState *bs, int type,
                                   int64_t offset, int64_t bytes,
                                   IOVector *qiov, size_t qoff, int rwflags)
{
    FileState *s = bs->opaque;
    IOVector part;
    FileJob job = {
        .fd = s->fd,
        .type = type,
        .offset = offset,
        .bytes = bytes,
        .rwflags = rwflags,
    };
    int ret;

    /* The I/O edits its iovec array while it advances: use a copy. */
    iov_init(&part);
    iov_concat(&part, qiov, qoff, bytes);
    if (s->uring) {
        ret = aio_uring_co_rw(s->uring, type == FILE_JOB_WRITE, s->fd, part.iov,
                              part.niov, offset, bytes, rwflags);
    } else if (s->laio) {
        ret = linux_aio_co_rw(s->laio, type == FILE_JOB_WRITE, s->fd, part.iov,
                              part.niov, offset, bytes, rwflags);
    } else {
        job.iov = part.iov;
        job.niov = part.niov;
        ret = file_co_job(&job);
    }
    iov_destroy(&part);
    return ret;
}

static int coroutine_fn file_co_preadv(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, IOVector *qiov,
                                       size_t qoff, BdrvRequestFlags flags)
{
    (void)flags;
    return file_co_rw(bs, FILE_JOB_READ, offset, bytes, qiov, qoff, 0);
}

static int coroutine_fn file_co_pwritev(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes, IOVector *qiov,
                                        size_t qoff, BdrvRequestFlags flags)
{
    int rwflags = 0;

    if ((flags & BDRV_REQ_FUA) && !(bs->open_flags & BDRV_O_NO_FLUSH)) {
        rwflags |= RWF_DSYNC;
    }
    return file_co_rw(bs, FILE_JOB_WRITE, offset, bytes, qiov, qoff, rwflags);
}

static int coroutine_fn file_co_flush(BlockDriverState *bs)
{
    FileState *s = bs->opaque;
    FileJob job = {.fd = s->fd, .type = FILE_JOB_FLUSH};

    if (s->uring) {
        return aio_uring_co_fdatasync(s->uring, s->fd);
    }
    return file_co_job(&job);
}

static int coroutine_fn file_co_fallocate(FileState *s, int mode,
                                          int64_t offset, int64_t bytes)
{
    FileJob job = {
        .fd = s->fd,
        .type = FILE_JOB_FALLOCATE,
        .mode = mode,
        .offset = offset,
        .bytes = bytes,
    };

    if (s->uring) {
        return aio_uring_co_fallocate(s->uring, s->fd, mode, offset, bytes);
    }
    return file_co_job(&job);
}

static bool file_unsupported(int ret)
{
    return ret == -EOPNOTSUPP || ret == -ENOTSUP || ret == -ENOSYS ||
           ret == -EINVAL;
}

static int coroutine_fn file_co_pwrite_zeroes(BlockDriverState *bs,
                                              int64_t offset, int64_t bytes,
                                              BdrvRequestFlags flags)
{
    FileState *s = bs->opaque;
    int ret;

    if (offset + bytes > bs->total_bytes && !s->is_bdev) {
        /* Beyond the end: zeroing while extending. */
        if (!s->no_zero_range) {
            ret = file_co_fallocate(s, FALLOC_FL_ZERO_RANGE, offset, bytes);
            if (!file_unsupported(ret)) {
                return ret;
            }
            s->no_zero_range = true;
        }
        if (offset >= bs->total_bytes) {
            FileJob job = {.fd = s->fd,
                           .type = FILE_JOB_TRUNCATE,
                           .offset = offset + bytes};

            return file_co_job(&job);
        }
        return -ENOTSUP;
    }
    if ((flags & BDRV_REQ_MAY_UNMAP) && !s->no_punch_hole) {
        ret = file_co_fallocate(s, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                offset, bytes);
        if (!file_unsupported(ret)) {
            return ret;
        }
        s->no_punch_hole = true;
    }
    if (!s->no_zero_range) {
        ret = file_co_fallocate(s, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                offset, bytes);
        if (!file_unsupported(ret)) {
            return ret;
        }
        s->no_zero_range = true;
    }
    return -ENOTSUP;
}

static int coroutine_fn file_co_pdiscard(BlockDriverState *bs, int64_t offset,
                                         int64_t bytes)
{
    FileState *s = bs->opaque;
    int ret;

    if (s->is_bdev) {
        FileJob job = {.fd = s->fd,
                       .type = FILE_JOB_DISCARD_BDEV,
                       .offset = offset,
                       .bytes = bytes};

        ret = file_co_job(&job);
    } else {
        if (s->no_punch_hole) {
            return -ENOTSUP;
        }
        ret = file_co_fallocate(s, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                offset, bytes);
    }
    return file_unsupported(ret) ? -ENOTSUP : ret;
}

static int coroutine_fn file_co_truncate(BlockDriverState *bs, int64_t offset,
                                         bool exact, PreallocMode prealloc,
                                         GError **errp)
{
    FileState *s = bs->opaque;
    int64_t old = bs->total_bytes;
    FileJob job = {.fd = s->fd, .type = FILE_JOB_TRUNCATE, .offset = offset};
    int ret;

    if (s->is_bdev) {
        if (offset > old || (exact && offset != old)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "cannot resize block device '%s'", bdrv_name(bs));
            return -EINVAL;
        }
        return 0;
    }
    ret = file_co_job(&job);
    if (ret < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                    "cannot resize '%s': %s", bdrv_name(bs), g_strerror(-ret));
        return ret;
    }
    if (offset > old &&
        (prealloc == PREALLOC_FALLOC || prealloc == PREALLOC_FULL)) {
        ret = file_co_fallocate(s, 0, old, offset - old);
        if (ret < 0 && prealloc == PREALLOC_FULL) {
            IOVector qiov;
            void *zeros = g_malloc0(MiB);
            int64_t pos;

            ret = 0;
            for (pos = old; pos < offset && ret == 0; pos += MiB) {
                int64_t n = offset - pos < MiB ? offset - pos : MiB;

                iov_init_buf(&qiov, zeros, n);
                ret = file_co_rw(bs, FILE_JOB_WRITE, pos, n, &qiov, 0, 0);
            }
            g_free(zeros);
        }
        if (ret < 0) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                        "cannot preallocate '%s': %s", bdrv_name(bs),
                        g_strerror(-ret));
            return ret;
        }
    }
    return 0;
}

static int coroutine_fn file_co_lseek(FileState *s, int64_t offset, int whence,
                                      int64_t *result)
{
    FileJob job = {
        .fd = s->fd,
        .type = FILE_JOB_LSEEK,
        .offset = offset,
        .mode = whence,
    };
    int ret = file_co_job(&job);

    *result = job.result;
    return ret;
}

static int coroutine_fn file_co_block_status(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             int64_t *pnum, int64_t *map,
                                             BlockDriverState **file)
{
    FileState *s = bs->opaque;
    int64_t data, hole;
    int ret;

    *map = offset;
    *file = bs;
    *pnum = bytes;
    if (s->is_bdev || s->no_seek_data) {
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
    }
    ret = file_co_lseek(s, offset, SEEK_DATA, &data);
    if (ret == -ENXIO) {
        /* A hole up to the end of the file. */
        return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID;
    }
    if (ret < 0) {
        if (ret == -EINVAL || ret == -ENOTSUP || ret == -EOPNOTSUPP) {
            s->no_seek_data = true;
        }
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
    }
    if (data > offset) {
        if (data - offset < bytes) {
            *pnum = data - offset;
        }
        return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID;
    }
    ret = file_co_lseek(s, offset, SEEK_HOLE, &hole);
    if (ret == 0 && hole > offset && hole - offset < bytes) {
        *pnum = hole - offset;
    }
    return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
}

static int64_t coroutine_fn file_co_get_allocated_size(BlockDriverState *bs)
{
    FileState *s = bs->opaque;
    struct stat st;

    if (s->is_bdev) {
        return file_fd_length(s);
    }
    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_blocks * 512;
}

const BlockDriver bdrv_file = {
    .name = "file",
    .description = "host files and block devices",
    .instance_size = sizeof(FileState),
    .is_protocol = true,
    .co_open = file_co_open,
    .co_close = file_co_close,
    .refresh_limits = file_refresh_limits,
    .co_getlength = file_co_getlength,
    .co_preadv = file_co_preadv,
    .co_pwritev = file_co_pwritev,
    .co_flush = file_co_flush,
    .co_pwrite_zeroes = file_co_pwrite_zeroes,
    .co_pdiscard = file_co_pdiscard,
    .co_truncate = file_co_truncate,
    .co_block_status = file_co_block_status,
    .co_get_allocated_size = file_co_get_allocated_size,
};
