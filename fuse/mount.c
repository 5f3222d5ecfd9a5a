/*
 * The daemon's lifetime: check the mount point, detach (unless -f), open
 * every drive, mount, serve FUSE queues on the iothreads, and on
 * SIGTERM/SIGINT or an outside unmount stop reading requests, let the
 * ones in flight finish, flush and close every drive, unmount and exit.
 *
 * Thread model: the main thread runs a GMainLoop for signals and the
 * mount's lifetime.  Each iothread runs one AioContext serving one FUSE
 * queue: queue 0 reads the session's /dev/fuse fd, the others read
 * clones of it (FUSE_DEV_IOC_CLONE), so requests are picked up in
 * parallel.  Drives are spread over the iothreads; a request read on one
 * thread for a drive homed on another is handed over by a bottom half.
 * The drive table is protected by IfsMount.lock; drives are reference
 * counted so an open file keeps its drive alive.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glib-unix.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ifs.h"
#include "blockcore/log.h"
#include "blockcore/thread-pool.h"

#ifndef FUSE_DEV_IOC_CLONE
#define FUSE_DEV_IOC_CLONE _IOR(229, 0, uint32_t)
#endif

/*
 * A receive buffer.  A FUSE_WRITE request is a fuse_in_header (40 bytes)
 * and a fuse_write_in (40 bytes) followed by the data; reading it at
 * IFS_BUF_PAD puts the data on a page boundary, so O_DIRECT images take
 * it without a bounce buffer.
 */
#define IFS_WRITE_HEADERS 80
#define IFS_BUF_PAD (4096 - IFS_WRITE_HEADERS)
#define IFS_MAX_WRITE (1 * MiB)
#define IFS_BUF_SIZE (4096 + IFS_MAX_WRITE + 4096)
#define IFS_BUF_CACHE 16
/* Requests read per wake-up before other work gets a turn. */
#define IFS_QUEUE_BATCH 32

struct IfsBuf {
    char *mem;
    IfsBuf *next;
};

static __thread IfsBuf *ifs_buf_cache;
static __thread int ifs_buf_cached;
static pthread_key_t ifs_buf_key;
static pthread_once_t ifs_buf_once = PTHREAD_ONCE_INIT;

static void ifs_buf_cache_drain(void);

static void ifs_buf_thread_exit(void *unused)
{
    (void)unused;
    ifs_buf_cache_drain();
}

static void ifs_buf_init_key(void)
{
    pthread_key_create(&ifs_buf_key, ifs_buf_thread_exit);
}

static IfsBuf *ifs_buf_new(void)
{
    IfsBuf *b = ifs_buf_cache;
    void *mem;

    if (b) {
        ifs_buf_cache = b->next;
        ifs_buf_cached--;
        return b;
    }
    if (posix_memalign(&mem, 4096, IFS_BUF_SIZE)) {
        return NULL;
    }
    b = g_new0(IfsBuf, 1);
    b->mem = mem;
    return b;
}

void ifs_buf_free(IfsBuf *b)
{
    if (ifs_buf_cached < IFS_BUF_CACHE) {
        /* The cache of a thread is freed when the thread exits. */
        pthread_once(&ifs_buf_once, ifs_buf_init_key);
        pthread_setspecific(ifs_buf_key, &ifs_buf_key);
        b->next = ifs_buf_cache;
        ifs_buf_cache = b;
        ifs_buf_cached++;
        return;
    }
    free(b->mem);
    g_free(b);
}

static void ifs_buf_cache_drain(void)
{
    while (ifs_buf_cache) {
        IfsBuf *b = ifs_buf_cache;

        ifs_buf_cache = b->next;
        free(b->mem);
        g_free(b);
    }
    ifs_buf_cached = 0;
}

struct IfsQueue {
    IfsMount *mount;
    int fd;
    bool own_fd;
    AioContext *ctx;
    IfsBuf *spare;
};

IfsDrive *ifs_drive_ref(IfsDrive *d)
{
    __atomic_add_fetch(&d->refcnt, 1, __ATOMIC_SEQ_CST);
    return d;
}

void ifs_drive_unref(IfsDrive *d)
{
    if (d && __atomic_sub_fetch(&d->refcnt, 1, __ATOMIC_SEQ_CST) == 0) {
        blk_close(d->blk);
        g_free(d->name);
        g_free(d);
    }
}

IfsDrive *ifs_find_drive_ino(IfsMount *m, fuse_ino_t ino)
{
    IfsDrive *found = NULL;
    unsigned i;

    g_rw_lock_reader_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        if (d->ino == ino) {
            found = ifs_drive_ref(d);
            break;
        }
    }
    g_rw_lock_reader_unlock(&m->lock);
    return found;
}

IfsDrive *ifs_find_drive_name(IfsMount *m, const char *name)
{
    IfsDrive *found = NULL;
    unsigned i;

    g_rw_lock_reader_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        if (!strcmp(d->name, name)) {
            found = ifs_drive_ref(d);
            break;
        }
    }
    g_rw_lock_reader_unlock(&m->lock);
    return found;
}

void ifs_request_started(IfsMount *m)
{
    __atomic_add_fetch(&m->inflight, 1, __ATOMIC_SEQ_CST);
}

void ifs_request_finished(IfsMount *m)
{
    if (__atomic_sub_fetch(&m->inflight, 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(&m->exiting, __ATOMIC_SEQ_CST)) {
        g_mutex_lock(&m->drain_lock);
        g_cond_broadcast(&m->drain_cond);
        g_mutex_unlock(&m->drain_lock);
    }
}

static gboolean ifs_quit_cb(gpointer opaque)
{
    IfsMount *m = opaque;

    g_main_loop_quit(m->loop);
    return G_SOURCE_REMOVE;
}

/* The mount is gone (unmounted from outside) or the fd failed. */
static void ifs_queue_dead(IfsQueue *q)
{
    aio_set_fd_handler(q->ctx, q->fd, NULL, NULL, NULL);
    if (!__atomic_load_n(&q->mount->exiting, __ATOMIC_SEQ_CST)) {
        g_idle_add(ifs_quit_cb, q->mount);
    }
}

static void ifs_queue_readable(void *opaque)
{
    IfsQueue *q = opaque;
    int i;

    for (i = 0; i < IFS_QUEUE_BATCH; i++) {
        struct fuse_buf fbuf;
        ssize_t n;

        if (!q->spare) {
            q->spare = ifs_buf_new();
            if (!q->spare) {
                log_error("out of memory for a FUSE request buffer");
                return;
            }
        }
        n = read(q->fd, q->spare->mem + IFS_BUF_PAD,
                 IFS_BUF_SIZE - IFS_BUF_PAD);
        if (n < 0) {
            switch (errno) {
            case EINTR:
            case ENOENT: /* the request was interrupted meanwhile */
                continue;
            case EAGAIN:
                return;
            case ENODEV: /* unmounted */
                ifs_queue_dead(q);
                return;
            default:
                log_error("reading /dev/fuse: %s", strerror(errno));
                ifs_queue_dead(q);
                return;
            }
        }
        if (n == 0) {
            ifs_queue_dead(q);
            return;
        }
        memset(&fbuf, 0, sizeof(fbuf));
        fbuf.mem = q->spare->mem + IFS_BUF_PAD;
        fbuf.size = n;
        ifs_ops_set_current(q->fd, q->spare);
        fuse_session_process_buf(q->mount->se, &fbuf);
        if (ifs_ops_took_buffer()) {
            q->spare = NULL;
        }
        ifs_ops_set_current(-1, NULL);
    }
}

static void ifs_queue_stop(void *opaque)
{
    IfsQueue *q = opaque;

    aio_set_fd_handler(q->ctx, q->fd, NULL, NULL, NULL);
    if (q->spare) {
        ifs_buf_free(q->spare);
        q->spare = NULL;
    }
    ifs_buf_cache_drain();
}

static IfsQueue *ifs_queue_new(IfsMount *m, unsigned idx, GError **errp)
{
    IfsQueue *q = g_new0(IfsQueue, 1);
    int session_fd = fuse_session_fd(m->se);

    q->mount = m;
    q->ctx = iothread_get_ctx(m->threads[idx]);
    if (idx == 0) {
        q->fd = session_fd;
    } else {
        uint32_t master = session_fd;

        q->fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
        if (q->fd < 0 || ioctl(q->fd, FUSE_DEV_IOC_CLONE, &master) < 0) {
            int err = errno;

            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "cannot clone the FUSE device for queue %u: %s", idx,
                        g_strerror(err));
            if (q->fd >= 0) {
                close(q->fd);
            }
            g_free(q);
            return NULL;
        }
        q->own_fd = true;
    }
    fcntl(q->fd, F_SETFL, fcntl(q->fd, F_GETFL) | O_NONBLOCK);
    /* The iothread has not started yet: we may set its handlers. */
    aio_set_fd_handler(q->ctx, q->fd, ifs_queue_readable, NULL, q);
    return q;
}

/* An existing, empty directory. */
static bool ifs_check_mountpoint(const char *path, GError **errp)
{
    struct stat st;
    struct dirent *de;
    DIR *dir;

    if (stat(path, &st) < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "mount point '%s': %s", path, g_strerror(err));
        return false;
    }
    if (!S_ISDIR(st.st_mode)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOTDIR,
                    "mount point '%s': not an empty directory (it is not a "
                    "directory)",
                    path);
        return false;
    }
    dir = opendir(path);
    if (!dir) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "mount point '%s': %s", path, g_strerror(err));
        return false;
    }
    while ((de = readdir(dir))) {
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            closedir(dir);
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                        "mount point '%s': not an empty directory (it "
                        "contains '%s')",
                        path, de->d_name);
            return false;
        }
    }
    closedir(dir);
    return true;
}

/*
 * Detach: the parent waits until the child reports (one byte on a pipe)
 * that the mount is ready, and exits with the child's verdict, so
 * "imgfs mount" returns only when the files are there -- or with the
 * error the child printed.
 */
static int ifs_daemonize(void)
{
    int p[2];
    pid_t pid;

    if (pipe2(p, O_CLOEXEC) < 0) {
        log_error("cannot daemonize: %s", strerror(errno));
        exit(1);
    }
    pid = fork();
    if (pid < 0) {
        log_error("cannot daemonize: %s", strerror(errno));
        exit(1);
    }
    if (pid > 0) {
        char status = 1;
        int wstatus;

        close(p[1]);
        if (read(p[0], &status, 1) == 1 && status == 0) {
            _exit(0);
        }
        if (waitpid(pid, &wstatus, 0) == pid && WIFEXITED(wstatus) &&
            WEXITSTATUS(wstatus)) {
            _exit(WEXITSTATUS(wstatus));
        }
        _exit(1);
    }
    close(p[0]);
    setsid();
    return p[1];
}

static void ifs_daemonize_done(int fd)
{
    char ok = 0;
    int null = open("/dev/null", O_RDWR);

    if (chdir("/") < 0) {
        /* paths are absolute by now */
    }
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
    }
    log_use_syslog(true);
    if (null >= 0) {
        dup2(null, STDERR_FILENO);
        if (null > STDERR_FILENO) {
            close(null);
        }
    }
    if (write(fd, &ok, 1) < 0) {
        /* the parent is gone: nothing to tell */
    }
    close(fd);
}

static gboolean ifs_signal_cb(gpointer opaque)
{
    IfsMount *m = opaque;

    log_info("signal received: unmounting %s", m->mountpoint);
    g_main_loop_quit(m->loop);
    return G_SOURCE_CONTINUE;
}

static gboolean ifs_sighup_cb(gpointer opaque)
{
    (void)opaque;
    log_info("SIGHUP ignored: configuration reload is not available");
    return G_SOURCE_CONTINUE;
}

static bool ifs_open_drives(IfsMount *m)
{
    IfsConfig *cfg = m->cfg;
    unsigned i;

    for (i = 0; i < cfg->drives->len; i++) {
        IfsDriveConfig *dc = g_ptr_array_index(cfg->drives, i);
        IfsDrive *d = g_new0(IfsDrive, 1);
        GError *err = NULL;

        d->name = g_strdup(dc->name);
        d->ino = FUSE_ROOT_ID + 1 + i;
        d->ctx = iothread_get_ctx(m->threads[i % m->nthreads]);
        d->read_only = dc->opts.read_only;
        d->refcnt = 1;
        d->mtime_ns = m->start_ns;
        d->blk = blk_open(dc->name, &dc->opts, d->ctx, &err);
        if (!d->blk) {
            log_error("drive '%s': %s", dc->name, err->message);
            g_error_free(err);
            g_free(d->name);
            g_free(d);
            return false;
        }
        g_ptr_array_add(m->drives, d);
    }
    return true;
}

static ssize_t ifs_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    return read(fd, buf, len);
}

static struct fuse_session *ifs_session_new(IfsMount *m, GError **errp)
{
    /* Replies go through our writev so they reach the right queue. */
    static const struct fuse_custom_io io = {
        .writev = ifs_ops_writev,
        .read = ifs_read,
    };
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    struct fuse_args args;
    struct fuse_session *se;
    char **o;

    g_ptr_array_add(argv, "imgfs");
    g_ptr_array_add(argv, "-o");
    g_ptr_array_add(argv, "fsname=imgfs,subtype=imgfs,default_permissions");
    for (o = m->fuse_opts; o && *o; o++) {
        g_ptr_array_add(argv, "-o");
        g_ptr_array_add(argv, *o);
    }
    args.argc = argv->len;
    args.argv = (char **)argv->pdata;
    args.allocated = 0;
    se = fuse_session_new(&args, &ifs_ops, sizeof(ifs_ops), m);
    if (args.allocated) {
        /* libfuse rewrote the argument vector: its copy is ours to free */
        fuse_opt_free_args(&args);
    }
    if (!se) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "invalid FUSE options (-o)");
        return NULL;
    }
    if (fuse_session_mount(se, m->mountpoint) != 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "cannot mount on '%s'", m->mountpoint);
        fuse_session_destroy(se);
        return NULL;
    }
    if (fuse_session_custom_io(se, &io, fuse_session_fd(se)) != 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "cannot set up FUSE I/O");
        fuse_session_unmount(se);
        fuse_session_destroy(se);
        return NULL;
    }
    return se;
}

/* Stop serving, finish requests in flight, close drives, unmount. */
static int ifs_shutdown(IfsMount *m)
{
    int status = 0;
    unsigned i;

    for (i = 0; i < m->nthreads && m->queues; i++) {
        if (m->queues[i]) {
            aio_run_sync(m->queues[i]->ctx, ifs_queue_stop, m->queues[i]);
        }
    }
    __atomic_store_n(&m->exiting, 1, __ATOMIC_SEQ_CST);
    g_mutex_lock(&m->drain_lock);
    while (__atomic_load_n(&m->inflight, __ATOMIC_SEQ_CST) > 0) {
        g_cond_wait_until(&m->drain_cond, &m->drain_lock,
                          g_get_monotonic_time() + G_TIME_SPAN_SECOND);
    }
    g_mutex_unlock(&m->drain_lock);

    g_rw_lock_writer_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        /* Open files may still hold references: close the image now. */
        if (blk_close(d->blk) < 0) {
            status = 1;
        }
        d->blk = NULL;
        g_free(d->name);
        g_free(d);
    }
    g_ptr_array_set_size(m->drives, 0);
    g_rw_lock_writer_unlock(&m->lock);

    for (i = 0; i < m->nthreads; i++) {
        iothread_free(m->threads[i]);
        if (m->queues && m->queues[i]) {
            if (m->queues[i]->own_fd) {
                close(m->queues[i]->fd);
            }
            g_free(m->queues[i]);
        }
    }
    if (m->se) {
        fuse_session_unmount(m->se);
        fuse_session_destroy(m->se);
    }
    thread_pool_shutdown();
    return status;
}

int ifs_mount_main(IfsConfig *cfg, const char *mountpoint, bool foreground,
                   char **fuse_opts)
{
    IfsMount *m = g_new0(IfsMount, 1);
    GError *err = NULL;
    struct timespec now;
    char *abs;
    int notify_fd = -1;
    int status = 1;
    unsigned i;

    m->cfg = cfg;
    m->foreground = foreground;
    m->fuse_opts = fuse_opts;
    m->drives = g_ptr_array_new();
    m->uid = getuid();
    m->gid = getgid();
    g_rw_lock_init(&m->lock);
    g_mutex_init(&m->drain_lock);
    g_cond_init(&m->drain_cond);
    clock_gettime(CLOCK_REALTIME, &now);
    m->start_ns = now.tv_sec * INT64_C(1000000000) + now.tv_nsec;

    if (!ifs_check_mountpoint(mountpoint, &err)) {
        log_error("%s", err->message);
        g_error_free(err);
        goto out_free;
    }
    abs = realpath(mountpoint, NULL);
    m->mountpoint = g_strdup(abs ? abs : mountpoint);
    free(abs);

    if (!foreground) {
        notify_fd = ifs_daemonize();
    }

    m->nthreads = cfg->iothreads;
    m->threads = g_new0(IOThread *, m->nthreads);
    for (i = 0; i < m->nthreads; i++) {
        g_autofree char *name = g_strdup_printf("imgfs-io%u", i);

        m->threads[i] = iothread_new(name, &err);
        if (!m->threads[i]) {
            log_error("%s", err->message);
            g_error_free(err);
            goto out_shutdown;
        }
    }
    if (!ifs_open_drives(m)) {
        goto out_shutdown;
    }
    m->se = ifs_session_new(m, &err);
    if (!m->se) {
        log_error("%s", err->message);
        g_error_free(err);
        goto out_shutdown;
    }
    m->queues = g_new0(IfsQueue *, m->nthreads);
    for (i = 0; i < m->nthreads; i++) {
        m->queues[i] = ifs_queue_new(m, i, &err);
        if (!m->queues[i]) {
            log_error("%s", err->message);
            g_error_free(err);
            goto out_shutdown;
        }
    }
    for (i = 0; i < m->nthreads; i++) {
        if (iothread_start(m->threads[i], &err) < 0) {
            log_error("%s", err->message);
            g_error_free(err);
            goto out_shutdown;
        }
    }

    m->loop = g_main_loop_new(NULL, FALSE);
    g_unix_signal_add(SIGTERM, ifs_signal_cb, m);
    g_unix_signal_add(SIGINT, ifs_signal_cb, m);
    g_unix_signal_add(SIGHUP, ifs_sighup_cb, m);
    signal(SIGPIPE, SIG_IGN);

    if (notify_fd >= 0) {
        ifs_daemonize_done(notify_fd);
        notify_fd = -1;
    }
    g_main_loop_run(m->loop);
    status = 0;

out_shutdown:
    if (ifs_shutdown(m) != 0) {
        status = 1;
    }
    if (m->loop) {
        g_main_loop_unref(m->loop);
    }
    g_free(m->queues);
    g_free(m->threads);
out_free:
    g_ptr_array_unref(m->drives);
    g_rw_lock_clear(&m->lock);
    g_mutex_clear(&m->drain_lock);
    g_cond_clear(&m->drain_cond);
    g_free(m->mountpoint);
    g_free(m);
    if (notify_fd >= 0) {
        close(notify_fd); /* the parent sees EOF and reports failure */
    }
    return status;
}
