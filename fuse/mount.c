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
 * With FUSE over io_uring (ring.c) requests arrive as completions in the
 * iothreads' rings instead, and the /dev/fuse queues carry only what the
 * kernel still sends there (FUSE_INIT, FORGET, INTERRUPT).
 * The drive table is protected by IfsMount.lock; drives are reference
 * counted so an open file keeps its drive alive.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glib-unix.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ifs.h"
#include "json.h"
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
#define IFS_BUF_SIZE (4096 + IFS_MAX_REQUEST + 4096)
/* Receive buffers kept for reuse (mmap/munmap of a large buffer per
 * request costs page faults and TLB shootdowns across threads). */
#define IFS_BUF_POOL 64
/* Requests read per wake-up before other work gets a turn. */
#define IFS_QUEUE_BATCH 32
/*
 * Extra queues help only under load.  All queues of a mount share the
 * kernel's one request queue and every idle queue is woken for every
 * request (FUSE wakes its readers without a poll key, so EPOLLEXCLUSIVE
 * does not help); at iodepth 1 the request then often lands on a queue
 * whose thread does not serve the drive and costs a hand-over to the
 * drive's thread, and the wasted wake-ups take CPU time that the program
 * doing the I/O needs.  So a secondary queue (every one but queue 0) that
 * found no backlog (more than one request waiting) in IFS_PARK_WINDOW
 * wake-ups stops watching /dev/fuse; any queue that finds a backlog wakes
 * the parked ones again.
 */
#define IFS_PARK_WINDOW 32

/*
 * Memory for request buffers, on huge page boundaries and, if @huge,
 * asking for transparent huge pages.  A 512 KiB buffer in 4 KiB pages
 * reaches the disk as up to 128 physical segments; a virtio disk without
 * indirect descriptors (Firecracker's has 256 ring slots) then fits one
 * such request at a time, and 1 MiB reads through imgfs ran at 0.7 of
 * the image file's speed.  In huge pages it is one segment.  Memory
 * without huge pages to spare just gets small pages.
 */
char *ifs_map_buffers(size_t size, bool huge)
{
    size_t len = size + IFS_HUGE_PAGE_SIZE;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    char *start;

    if (p == MAP_FAILED) {
        return NULL;
    }
    start = (char *)ALIGN_UP((uintptr_t)p, IFS_HUGE_PAGE_SIZE);
    if (start > p) {
        munmap(p, start - p);
    }
    munmap(start + size, p + len - (start + size));
    if (huge) {
        madvise(start, size, MADV_HUGEPAGE); /* advice: may be unsupported */
    }
    return start;
}

struct IfsBuf {
    char *mem;
    bool in_arena;
    IfsBuf *next;
};

/*
 * The first IFS_BUF_POOL buffers come from one map in huge pages
 * (ifs_map_buffers), as the FUSE ring's do.  Later ones, when that many
 * are in use, come from the heap.
 */
static struct {
    GMutex lock;
    IfsBuf *head;   /* protected by lock */
    int count;      /* protected by lock */
    char *arena;    /* protected by lock; mapped on first use */
    int arena_used; /* protected by lock: buffers handed out from it */
} ifs_buf_pool;

/* Memory for a new buffer from the arena, or NULL.  Pool lock held. */
static char *ifs_buf_arena_take(void)
{
    if (!ifs_buf_pool.arena && ifs_buf_pool.arena_used == 0) {
        ifs_buf_pool.arena = ifs_map_buffers(
            ALIGN_UP((size_t)IFS_BUF_POOL * IFS_BUF_SIZE, IFS_HUGE_PAGE_SIZE),
            true);
        if (!ifs_buf_pool.arena) {
            ifs_buf_pool.arena_used = IFS_BUF_POOL; /* all from the heap */
        }
    }
    if (ifs_buf_pool.arena_used == IFS_BUF_POOL) {
        return NULL;
    }
    return ifs_buf_pool.arena +
           (size_t)ifs_buf_pool.arena_used++ * IFS_BUF_SIZE;
}

IfsBuf *ifs_buf_new(void)
{
    IfsBuf *b;
    char *arena_mem = NULL;
    void *mem;

    g_mutex_lock(&ifs_buf_pool.lock);
    b = ifs_buf_pool.head;
    if (b) {
        ifs_buf_pool.head = b->next;
        ifs_buf_pool.count--;
    } else {
        arena_mem = ifs_buf_arena_take();
    }
    g_mutex_unlock(&ifs_buf_pool.lock);
    if (b) {
        return b;
    }
    b = g_new0(IfsBuf, 1);
    if (arena_mem) {
        b->mem = arena_mem;
        b->in_arena = true;
    } else if (posix_memalign(&mem, 4096, IFS_BUF_SIZE) == 0) {
        b->mem = mem;
    } else {
        g_free(b);
        return NULL;
    }
    return b;
}

char *ifs_buf_mem(IfsBuf *b)
{
    return b->mem;
}

void ifs_buf_free(IfsBuf *b)
{
    g_mutex_lock(&ifs_buf_pool.lock);
    /* arena buffers always fit: there are only IFS_BUF_POOL of them */
    if (b->in_arena || ifs_buf_pool.count < IFS_BUF_POOL) {
        b->next = ifs_buf_pool.head;
        ifs_buf_pool.head = b;
        ifs_buf_pool.count++;
        b = NULL;
    }
    g_mutex_unlock(&ifs_buf_pool.lock);
    if (b) {
        free(b->mem);
        g_free(b);
    }
}

/* At exit: free the pooled buffers; the arena stays mapped. */
static void ifs_buf_pool_drain(void)
{
    g_mutex_lock(&ifs_buf_pool.lock);
    while (ifs_buf_pool.head) {
        IfsBuf *b = ifs_buf_pool.head;

        ifs_buf_pool.head = b->next;
        if (!b->in_arena) {
            free(b->mem);
        }
        g_free(b);
    }
    ifs_buf_pool.count = 0;
    g_mutex_unlock(&ifs_buf_pool.lock);
}

struct IfsQueue {
    IfsMount *mount;
    unsigned idx; /* 0: the session's fd; others: clones we own */
    int fd;
    AioContext *ctx;
    IfsBuf *spare;
    bool parked;   /* not watching its fd (atomic: other queues read it) */
    bool stopped;  /* owner thread only */
    unsigned calm; /* wake-ups in a row without a backlog */
};

IfsDrive *ifs_drive_ref(IfsDrive *d)
{
    __atomic_add_fetch(&d->refcnt, 1, __ATOMIC_SEQ_CST);
    return d;
}

static void ifs_drive_free(IfsDrive *d)
{
    if (d->blk) {
        blk_close(d->blk);
    }
    blk_options_clear(&d->opts);
    g_free(d->name);
    g_free(d);
}

static gboolean ifs_drive_free_cb(gpointer opaque)
{
    ifs_drive_free(opaque);
    return G_SOURCE_REMOVE;
}

void ifs_drive_unref(IfsDrive *d)
{
    if (d && __atomic_sub_fetch(&d->refcnt, 1, __ATOMIC_SEQ_CST) == 0) {
        /* Closing waits for the drive's event loop, which may be this
         * thread: let the main loop do it. */
        g_idle_add(ifs_drive_free_cb, d);
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

IfsDrive *ifs_open_drive_ino(IfsMount *m, fuse_ino_t ino)
{
    IfsDrive *found = NULL;
    unsigned i;

    /* Under the lock, so a reload sees either the drive open or not. */
    g_rw_lock_reader_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        if (d->ino == ino) {
            found = ifs_drive_ref(d);
            __atomic_add_fetch(&d->open_count, 1, __ATOMIC_SEQ_CST);
            break;
        }
    }
    g_rw_lock_reader_unlock(&m->lock);
    return found;
}

void ifs_release_drive(IfsDrive *d)
{
    __atomic_sub_fetch(&d->open_count, 1, __ATOMIC_SEQ_CST);
    ifs_drive_unref(d);
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

GPtrArray *ifs_list_drives(IfsMount *m)
{
    GPtrArray *list = g_ptr_array_new();
    unsigned i;

    g_rw_lock_reader_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        g_ptr_array_add(list, ifs_drive_ref(g_ptr_array_index(m->drives, i)));
    }
    g_rw_lock_reader_unlock(&m->lock);
    return list;
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

static void ifs_queue_readable(void *opaque);

static void ifs_queue_unpark_bh(void *opaque)
{
    IfsQueue *q = opaque;

    if (!q->stopped) {
        q->calm = 0;
        aio_set_fd_handler(q->ctx, q->fd, ifs_queue_readable, NULL, q);
    }
}

/* A queue found more than one request waiting: let the others help. */
static void ifs_queues_unpark(IfsMount *m)
{
    unsigned i;

    for (i = 1; i < m->nthreads; i++) {
        IfsQueue *q = m->queues[i];
        bool parked = true;

        /* a plain load first: under load no queue is parked, and the
         * compare-exchange would bounce the cache line between threads */
        if (q && __atomic_load_n(&q->parked, __ATOMIC_RELAXED) &&
            __atomic_compare_exchange_n(&q->parked, &parked, false, false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            aio_bh_schedule_oneshot(q->ctx, ifs_queue_unpark_bh, q);
        }
    }
}

/* Queue @q's wake-up read @got requests. */
static void ifs_queue_account(IfsQueue *q, int got)
{
    if (got > 1) {
        q->calm = 0;
        ifs_queues_unpark(q->mount);
    } else if (q->idx > 0 && ++q->calm >= IFS_PARK_WINDOW) {
        aio_set_fd_handler(q->ctx, q->fd, NULL, NULL, NULL);
        __atomic_store_n(&q->parked, true, __ATOMIC_SEQ_CST);
    }
}

static void ifs_queue_readable(void *opaque)
{
    IfsQueue *q = opaque;
    int i, got = 0;

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
                ifs_queue_account(q, got);
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
        got++;
        memset(&fbuf, 0, sizeof(fbuf));
        fbuf.mem = q->spare->mem + IFS_BUF_PAD;
        fbuf.size = n;
        ifs_ring_note_request(q->mount->ring, fbuf.mem, n);
        ifs_ops_set_current(q->fd, q->spare);
        fuse_session_process_buf(q->mount->se, &fbuf);
        if (ifs_ops_took_buffer()) {
            q->spare = NULL;
        }
        ifs_ops_set_current(-1, NULL);
    }
    ifs_queue_account(q, got);
}

static void ifs_queue_stop(void *opaque)
{
    IfsQueue *q = opaque;

    q->stopped = true;
    aio_set_fd_handler(q->ctx, q->fd, NULL, NULL, NULL);
    if (q->spare) {
        ifs_buf_free(q->spare);
        q->spare = NULL;
    }
}

static IfsQueue *ifs_queue_new(IfsMount *m, unsigned idx, GError **errp)
{
    IfsQueue *q = g_new0(IfsQueue, 1);
    int session_fd = fuse_session_fd(m->se);

    q->mount = m;
    q->idx = idx;
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
    /* A mount that works says nothing on the caller's terminal: progress
     * goes to syslog already, errors still to stderr until we detach. */
    log_syslog_from_level(LOG_LEVEL_INFO);
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
    log_syslog_from_level(LOG_LEVEL_ERROR);
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
    IfsMount *m = opaque;
    g_autoptr(GString) report = g_string_new(NULL);
    GError *err = NULL;

    if (!ifs_mount_reload(m, report, &err)) {
        log_error("SIGHUP: %s", err->message);
        g_error_free(err);
    }
    return G_SOURCE_CONTINUE;
}

/* Open the drive of @dc; NULL and a logged error if it cannot be. */
static IfsDrive *ifs_drive_open(IfsMount *m, IfsDriveConfig *dc, unsigned index,
                                GError **errp)
{
    IfsDrive *d = g_new0(IfsDrive, 1);
    unsigned t =
        dc->iothread >= 0 ? (unsigned)dc->iothread : index % m->nthreads;

    d->name = g_strdup(dc->name);
    d->mount = m;
    d->ino = m->next_ino++;
    d->ctx = iothread_get_ctx(m->threads[t]);
    d->refcnt = 1;
    d->mtime_ns = m->start_ns;
    d->iothread = dc->iothread;
    blk_options_copy(&d->opts, &dc->opts);
    d->blk = blk_open(dc->name, &dc->opts, d->ctx, errp);
    if (!d->blk) {
        blk_options_clear(&d->opts);
        g_free(d->name);
        g_free(d);
        return NULL;
    }
    /* auto-read-only may have made it read-only */
    d->read_only = blk_is_read_only(d->blk);
    return d;
}

static bool ifs_open_drives(IfsMount *m)
{
    IfsConfig *cfg = m->cfg;
    unsigned i;

    for (i = 0; i < cfg->drives->len; i++) {
        IfsDriveConfig *dc = g_ptr_array_index(cfg->drives, i);
        GError *err = NULL;
        IfsDrive *d = ifs_drive_open(m, dc, i, &err);

        if (!d) {
            log_error("drive '%s': %s", dc->name, err->message);
            g_error_free(err);
            return false;
        }
        g_ptr_array_add(m->drives, d);
    }
    return true;
}

static IfsDriveConfig *ifs_config_find(IfsConfig *cfg, const char *name)
{
    unsigned i;

    for (i = 0; i < cfg->drives->len; i++) {
        IfsDriveConfig *dc = g_ptr_array_index(cfg->drives, i);

        if (!strcmp(dc->name, name)) {
            return dc;
        }
    }
    return NULL;
}

static IfsDrive *ifs_table_find(IfsMount *m, const char *name, unsigned *idx)
{
    unsigned i;

    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        if (!strcmp(d->name, name)) {
            if (idx) {
                *idx = i;
            }
            return d;
        }
    }
    return NULL;
}

static void ifs_report_list(GString *report, const char *key, GPtrArray *names)
{
    unsigned i;

    g_string_append_printf(report, "%s\"%s\": [", report->len > 1 ? ", " : "",
                           key);
    for (i = 0; i < names->len; i++) {
        json_append_string(report, g_ptr_array_index(names, i));
        if (i + 1 < names->len) {
            g_string_append(report, ", ");
        }
    }
    g_string_append(report, "]");
}

/* Tell the kernel a name under the mount point changed. */
static void ifs_invalidate_name(IfsMount *m, const char *name)
{
    fuse_lowlevel_notify_inval_entry(m->se, FUSE_ROOT_ID, name, strlen(name));
}

/* Close the image of a drive that left the table, keeping its settings. */
static void ifs_drive_detach(IfsMount *m, IfsDrive *d)
{
    /* Nothing can find it any more: wait for requests already running. */
    while (__atomic_load_n(&d->refcnt, __ATOMIC_SEQ_CST) > 1) {
        g_usleep(1000);
    }
    blk_close(d->blk);
    d->blk = NULL;
    ifs_invalidate_name(m, d->name);
}

static int ifs_config_index(IfsConfig *cfg, IfsDriveConfig *dc)
{
    unsigned i;

    for (i = 0; i < cfg->drives->len; i++) {
        if (g_ptr_array_index(cfg->drives, i) == dc) {
            return i;
        }
    }
    return 0;
}

/*
 * A reload is a transaction: drives that are deleted or changed (and not
 * open) are closed first -- their images may be what the new drives
 * open -- then the new and changed drives are opened.  If any of those
 * fails, the new ones are closed and the old ones reopened as they were.
 */
bool ifs_mount_reload(IfsMount *m, GString *report, GError **errp)
{
    g_autoptr(GPtrArray) added = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) removed = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) reopened = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) busy = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) unchanged = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) detached = g_ptr_array_new(); /* old IfsDrive */
    g_autoptr(GPtrArray) opened = g_ptr_array_new();   /* new IfsDrive */
    g_autoptr(GHashTable) keep = g_hash_table_new(g_str_hash, g_str_equal);
    IfsConfig *cfg;
    const char *fixed;
    GError *err = NULL;
    unsigned i;

    cfg = ifs_config_load(m->cfg->abs_path, &err);
    if (!cfg) {
        g_propagate_prefixed_error(errp, err, "reload: nothing changed: ");
        return false;
    }
    fixed = cfg->format_help                           ? "'format = help'"
            : cfg->iothreads != m->cfg->iothreads      ? "[imgfs] iothreads"
            : cfg->poll_max_ns != m->cfg->poll_max_ns  ? "[imgfs] poll-max-ns"
            : cfg->fuse_uring != m->cfg->fuse_uring    ? "[imgfs] fuse-uring"
            : g_strcmp0(cfg->control, m->cfg->control) ? "[imgfs] control"
                                                       : NULL;
    if (fixed) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "reload: nothing changed: %s cannot change while mounted",
                    fixed);
        ifs_config_free(cfg);
        return false;
    }

    /* Which drives stay as they are; the open count only grows under the
     * reader lock, so a drive seen closed here stays closed. */
    g_rw_lock_writer_lock(&m->lock);
    for (i = 0; i < m->drives->len;) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);
        IfsDriveConfig *dc = ifs_config_find(cfg, d->name);

        if (dc && blk_options_equal(&d->opts, &dc->opts) &&
            d->iothread == dc->iothread) {
            g_ptr_array_add(unchanged, g_strdup(d->name));
            g_hash_table_add(keep, d->name);
            i++;
        } else if (__atomic_load_n(&d->open_count, __ATOMIC_SEQ_CST) > 0) {
            g_ptr_array_add(busy, g_strdup(d->name));
            g_hash_table_add(keep, d->name);
            i++;
        } else {
            g_ptr_array_add(dc ? reopened : removed, g_strdup(d->name));
            g_ptr_array_add(detached, d);
            g_ptr_array_remove_index(m->drives, i);
        }
    }
    g_rw_lock_writer_unlock(&m->lock);

    for (i = 0; i < detached->len; i++) {
        ifs_drive_detach(m, g_ptr_array_index(detached, i));
    }

    for (i = 0; i < cfg->drives->len; i++) {
        IfsDriveConfig *dc = g_ptr_array_index(cfg->drives, i);
        IfsDrive *d;

        if (g_hash_table_contains(keep, dc->name)) {
            continue;
        }
        d = ifs_drive_open(m, dc, ifs_config_index(cfg, dc), &err);
        if (!d) {
            unsigned k;

            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                        "reload: nothing changed: drive '%s': %s", dc->name,
                        err->message);
            g_clear_error(&err);
            for (k = 0; k < opened->len; k++) {
                ifs_drive_free(g_ptr_array_index(opened, k));
            }
            /* Put the old drives back as they were. */
            for (k = 0; k < detached->len; k++) {
                IfsDrive *od = g_ptr_array_index(detached, k);

                od->blk = blk_open(od->name, &od->opts, od->ctx, &err);
                if (!od->blk) {
                    log_error("reload: drive '%s' could not be restored: %s",
                              od->name, err->message);
                    g_clear_error(&err);
                    ifs_drive_unref(od);
                    continue;
                }
                od->ino = m->next_ino++;
                g_rw_lock_writer_lock(&m->lock);
                g_ptr_array_add(m->drives, od);
                g_rw_lock_writer_unlock(&m->lock);
                ifs_invalidate_name(m, od->name);
            }
            ifs_config_free(cfg);
            return false;
        }
        g_ptr_array_add(opened, d);
        if (!ifs_table_find(m, dc->name, NULL) &&
            !g_ptr_array_find_with_equal_func(reopened, dc->name, g_str_equal,
                                              NULL)) {
            g_ptr_array_add(added, g_strdup(dc->name));
        }
    }

    g_rw_lock_writer_lock(&m->lock);
    for (i = 0; i < opened->len; i++) {
        g_ptr_array_add(m->drives, g_ptr_array_index(opened, i));
    }
    g_rw_lock_writer_unlock(&m->lock);
    for (i = 0; i < opened->len; i++) {
        ifs_invalidate_name(m,
                            ((IfsDrive *)g_ptr_array_index(opened, i))->name);
    }
    for (i = 0; i < detached->len; i++) {
        ifs_drive_unref(g_ptr_array_index(detached, i));
    }

    g_string_append(report, "{");
    ifs_report_list(report, "added", added);
    ifs_report_list(report, "removed", removed);
    ifs_report_list(report, "reopened", reopened);
    ifs_report_list(report, "busy", busy);
    ifs_report_list(report, "unchanged", unchanged);
    g_string_append(report, "}");
    for (i = 0; i < busy->len; i++) {
        log_warning("reload: drive '%s' is open by a program: its new "
                    "settings wait for a reload after it is closed",
                    (char *)g_ptr_array_index(busy, i));
    }
    log_info("reload: %u added, %u removed, %u reopened, %u busy", added->len,
             removed->len, reopened->len, busy->len);
    ifs_config_free(m->cfg);
    m->cfg = cfg;
    return true;
}

static ssize_t ifs_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    return read(fd, buf, len);
}

/*
 * libfuse prints its own line ("fuse: unknown option(s): ...", "fuse:
 * mount failed: ...") before imgfs reports the failure: two lines where
 * the rule is one.  While the session is set up its errors are kept here
 * and folded into imgfs's message; debug output (-o debug) goes to
 * stderr as libfuse would print it.
 */
static GString *ifs_fuse_log;

static void ifs_fuse_log_keep(enum fuse_log_level level, const char *fmt,
                              va_list ap)
{
    if (level > FUSE_LOG_ERR) {
        vfprintf(stderr, fmt, ap);
        return;
    }
    /* one line may come in pieces: keep the raw text */
    g_string_append_vprintf(ifs_fuse_log, fmt, ap);
}

/* What libfuse said since the last call, as one line ("" for nothing). */
static char *ifs_fuse_log_take(void)
{
    g_auto(GStrv) lines = g_strsplit(ifs_fuse_log->str, "\n", -1);
    g_autoptr(GString) out = g_string_new(NULL);
    int i;

    for (i = 0; lines[i]; i++) {
        g_strstrip(lines[i]);
        if (*lines[i]) {
            g_string_append_printf(out, "%s%s", out->len ? "; " : "", lines[i]);
        }
    }
    g_string_truncate(ifs_fuse_log, 0);
    return g_string_free(g_steal_pointer(&out), FALSE);
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
    ifs_fuse_log = g_string_new(NULL);
    fuse_set_log_func(ifs_fuse_log_keep);
    se = fuse_session_new(&args, &ifs_ops, sizeof(ifs_ops), m);
    if (args.allocated) {
        /* libfuse rewrote the argument vector: its copy is ours to free */
        fuse_opt_free_args(&args);
    }
    if (!se) {
        g_autofree char *said = ifs_fuse_log_take();
        const char *why = g_str_has_prefix(said, "fuse: ") ? said + 6 : said;

        if (*why) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL, "-o: %s", why);
        } else {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "invalid FUSE options (-o)");
        }
        goto out;
    }
    if (fuse_session_mount(se, m->mountpoint) != 0) {
        g_autofree char *said = ifs_fuse_log_take();

        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "cannot mount on '%s'%s%s", m->mountpoint,
                    *said ? ": " : "", said);
        fuse_session_destroy(se);
        se = NULL;
        goto out;
    }
    if (fuse_session_custom_io(se, &io, fuse_session_fd(se)) != 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                    "cannot set up FUSE I/O");
        fuse_session_unmount(se);
        fuse_session_destroy(se);
        se = NULL;
    }
out:
    if (se && ifs_fuse_log->len) {
        /* a complaint that did not stop the mount, e.g. a warning */
        g_autofree char *said = ifs_fuse_log_take();

        log_warning("%s", said);
    }
    /* from here libfuse prints its messages itself again */
    fuse_set_log_func(NULL);
    g_string_free(g_steal_pointer(&ifs_fuse_log), TRUE);
    return se;
}

/* Stop serving, finish requests in flight, close drives, unmount. */
static int ifs_shutdown(IfsMount *m)
{
    int status = 0;
    unsigned i;

    ifs_ring_stop(m->ring);
    for (i = 0; i < m->nthreads && m->queues; i++) {
        if (m->queues[i]) {
            aio_run_sync(m->queues[i]->ctx, ifs_queue_stop, m->queues[i]);
        }
    }
    __atomic_store_n(&m->exiting, 1, __ATOMIC_SEQ_CST);
    /* Requests held by werror/rerror=stop would never finish. */
    g_rw_lock_reader_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        blk_abort_held(d->blk);
    }
    g_rw_lock_reader_unlock(&m->lock);
    g_mutex_lock(&m->drain_lock);
    while (__atomic_load_n(&m->inflight, __ATOMIC_SEQ_CST) > 0) {
        g_cond_wait_until(&m->drain_cond, &m->drain_lock,
                          g_get_monotonic_time() + G_TIME_SPAN_SECOND);
    }
    g_mutex_unlock(&m->drain_lock);

    if (m->control) {
        ifs_control_stop(m->control);
        m->control = NULL;
    }
    /* Drives closed by a reload wait in the main loop's queue. */
    while (g_main_context_iteration(NULL, FALSE)) {
    }
    g_rw_lock_writer_lock(&m->lock);
    for (i = 0; i < m->drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(m->drives, i);

        /* Open files may still hold references: close the image now. */
        if (blk_close(d->blk) < 0) {
            status = 1;
        }
        d->blk = NULL;
        blk_options_clear(&d->opts);
        g_free(d->name);
        g_free(d);
    }
    g_ptr_array_set_size(m->drives, 0);
    g_rw_lock_writer_unlock(&m->lock);

    for (i = 0; i < m->nthreads; i++) {
        iothread_free(m->threads[i]);
        if (m->queues && m->queues[i]) {
            if (m->queues[i]->idx > 0) {
                close(m->queues[i]->fd);
            }
            g_free(m->queues[i]);
        }
    }
    /* The rings are closed: the kernel no longer touches the entries. */
    ifs_ring_free(m->ring);
    m->ring = NULL;
    if (m->se) {
        fuse_session_unmount(m->se);
        fuse_session_destroy(m->se);
    }
    thread_pool_shutdown();
    ifs_buf_pool_drain();
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
    m->next_ino = FUSE_ROOT_ID + 1;

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
        aio_context_set_poll_max_ns(iothread_get_ctx(m->threads[i]),
                                    cfg->poll_max_ns);
    }
    m->ring = ifs_ring_new(m, &err);
    if (err) {
        log_error("%s", err->message);
        g_error_free(err);
        goto out_shutdown;
    }
    if (!ifs_open_drives(m)) {
        goto out_shutdown;
    }
    /* The socket answers as soon as the mount appears (requests wait in
     * its backlog until the main loop runs). */
    m->control_path = cfg->control ? g_strdup(cfg->control)
                                   : ifs_control_default_path(m->mountpoint);
    m->control = ifs_control_start(m, m->control_path, &err);
    if (!m->control) {
        log_error("%s", err->message);
        g_error_free(err);
        goto out_shutdown;
    }
    /*
     * From the mount on, a signal must unmount: caught now, it is handled
     * once the main loop runs (killed by it in between, the daemon would
     * leave a dead mount behind).
     */
    m->loop = g_main_loop_new(NULL, FALSE);
    g_unix_signal_add(SIGTERM, ifs_signal_cb, m);
    g_unix_signal_add(SIGINT, ifs_signal_cb, m);
    g_unix_signal_add(SIGHUP, ifs_sighup_cb, m);
    signal(SIGPIPE, SIG_IGN);
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
    g_free(m->control_path);
    ifs_config_free(m->cfg);
    g_free(m);
    if (notify_fd >= 0) {
        close(notify_fd); /* the parent sees EOF and reports failure */
    }
    return status;
}
