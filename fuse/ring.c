/*
 * FUSE over io_uring (Linux 6.14 and later).
 *
 * On the classic transport each request costs the daemon a read() of
 * /dev/fuse, a writev() for the reply, and the wake-ups in between.  Over
 * io_uring the daemon hands the kernel "ring entries" -- a header buffer
 * and a payload buffer each -- with IORING_OP_URING_CMD.  The kernel
 * copies a request into a free entry and completes the command; the
 * daemon writes the reply into the same entry and sends one
 * COMMIT_AND_FETCH command, which delivers the reply and re-arms the
 * entry.  Those commands travel in the event loop's own ring, beside the
 * image I/O, so serving a request takes no system call of its own: the
 * commit goes out in the same io_uring_enter as the I/O of the next
 * requests.
 *
 * The kernel keeps one queue of entries per possible CPU and puts a
 * request on the queue of the CPU its caller runs on.  Queue q is
 * registered from iothread q % iothreads.  An entry is re-armed from
 * whichever thread replies, which is the thread serving the drive, so
 * after the first request an entry lives in that thread's ring and its
 * requests need no hand-over between threads.
 *
 * libfuse 3.14 predates the protocol, so it keeps decoding requests and
 * encoding replies, and this file does the rest: it adds the
 * FUSE_OVER_IO_URING flag to libfuse's FUSE_INIT reply when the kernel
 * offered it, makes each request contiguous for libfuse (the in-header
 * and the op header are copied in front of the payload, so write data
 * stays in place and page aligned), and turns libfuse's reply (its
 * writev) into a commit.  FORGET and INTERRUPT still arrive through
 * /dev/fuse, which the queues keep reading.
 *
 * The kernel offers the protocol only when the fuse module's enable_uring
 * parameter is on ([imgfs] fuse-uring says what to do when it is off).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include "ifs.h"
#include "blockcore/log.h"
#include "blockcore/uring.h"

#define IFS_URING_PARAM "/sys/module/fuse/parameters/enable_uring"

/* The protocol's constants (include/uapi/linux/fuse.h, 7.42). */
#define IFS_FUSE_OVER_IO_URING_FLAGS2 (1u << (41 - 32))
#define IFS_FUSE_INIT_EXT (1u << 30)
#define IFS_FUSE_MAX_PAGES (1u << 22)
#define IFS_FUSE_DEFAULT_MAX_PAGES 32
#define IFS_URING_CMD_REGISTER 1
#define IFS_URING_CMD_COMMIT_AND_FETCH 2

/* Entries per kernel queue: requests one CPU's callers keep in flight. */
#define IFS_RING_DEPTH 32
#define IFS_PAGE 4096
/* a commit that copies this much is heavy work (AioUringCmd.heavy) */
#define IFS_RING_HEAVY (64 * 1024)
/* request buffers in huge pages up to this many kernel queues */
#define IFS_RING_HUGE_QUEUES 8

struct ifs_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};

struct ifs_uring_req_header {
    char in_out[128]; /* fuse_in_header in, fuse_out_header out */
    char op_in[128];  /* the op's first argument (fuse_read_in, ...) */
    struct ifs_uring_ent_in_out ent;
};

struct ifs_uring_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

G_STATIC_ASSERT(sizeof(struct ifs_uring_req_header) == 288);
G_STATIC_ASSERT(sizeof(struct ifs_uring_cmd_req) <= AIO_URING_CMD_DATA);
G_STATIC_ASSERT(offsetof(struct fuse_init_out, flags2) == 32);

/*
 * One entry's memory is a page holding the kernel's header and, at its
 * end, the contiguous request built for libfuse, followed by the payload
 * buffer:  [header ... in_header op_header][payload ...]
 */
struct IfsRingEnt {
    AioUringCmd cmd; /* first: the command's completion finds the entry */
    IfsRing *ring;
    uint16_t qid;
    struct ifs_uring_req_header *hdr;
    char *payload;
    struct iovec iov[2];
};

struct IfsRing {
    IfsMount *mount;
    unsigned nqueues;     /* the kernel's: possible CPUs */
    uint64_t init_unique; /* FUSE_INIT that offered io_uring, 0: none */
    size_t payload_size;
    char *mem;
    size_t mem_size;
    IfsRingEnt *ents;  /* IFS_RING_DEPTH per kernel queue, in qid order */
    unsigned spread;   /* atomic: the next thread to commit from */
    unsigned inflight; /* atomic: requests being served */
    int stopping;      /* atomic */
    int failed;        /* atomic: a command failed (warned once) */
    int unfixed;       /* atomic: a ring could not register the map */
};

/* Highest possible CPU + 1, as the kernel counts its queues. */
static unsigned ifs_possible_cpus(void)
{
    char buf[256];
    unsigned max = 0;
    const char *p = buf;
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");

    if (!f || !fgets(buf, sizeof(buf), f)) {
        if (f) {
            fclose(f);
        }
        return get_nprocs_conf();
    }
    fclose(f);
    /* "0-3,5,7-8": the last number is the highest */
    while (*p) {
        char *end;
        unsigned long v;

        if (!g_ascii_isdigit(*p)) {
            p++;
            continue;
        }
        v = strtoul(p, &end, 10);
        if (v > max) {
            max = v;
        }
        p = end;
    }
    return max + 1;
}

/* The fuse module's enable_uring: 1 on, 0 off, -errno if unknown. */
static int ifs_uring_param(void)
{
    char c = 0;
    int fd = open(IFS_URING_PARAM, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0) {
        return -errno;
    }
    n = read(fd, &c, 1);
    close(fd);
    if (n != 1) {
        return -EIO;
    }
    return c == 'Y' || c == 'y' || c == '1';
}

static int ifs_uring_param_enable(void)
{
    int fd = open(IFS_URING_PARAM, O_WRONLY | O_CLOEXEC);
    int ret = 0;

    if (fd < 0) {
        return -errno;
    }
    if (write(fd, "Y\n", 2) != 2) {
        ret = -errno;
    }
    close(fd);
    return ret;
}

IfsRing *ifs_ring_new(IfsMount *m, GError **errp)
{
    IfsUringMode mode = m->cfg->fuse_uring;
    IfsRing *r;
    int on;
    unsigned i;

    if (mode == IFS_URING_OFF) {
        return NULL;
    }
    on = ifs_uring_param();
    if (on == 0 && mode == IFS_URING_ON) {
        int ret = ifs_uring_param_enable();

        if (ret < 0) {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(-ret),
                        "[imgfs] fuse-uring = on: cannot switch on "
                        "%s: %s",
                        IFS_URING_PARAM, g_strerror(-ret));
            return NULL;
        }
        log_info("switched on FUSE over io_uring (%s)", IFS_URING_PARAM);
        on = 1;
    }
    if (on <= 0) {
        if (mode == IFS_URING_ON) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                        "[imgfs] fuse-uring = on: this kernel has no FUSE "
                        "over io_uring (%s: %s)",
                        IFS_URING_PARAM, g_strerror(-on));
        }
        return NULL;
    }
    for (i = 0; i < m->nthreads; i++) {
        GError *err = NULL;
        AioUring *u = aio_uring_get(iothread_get_ctx(m->threads[i]), &err);

        if (!u || !aio_uring_has_cmds(u)) {
            if (mode == IFS_URING_ON) {
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOSYS,
                            "[imgfs] fuse-uring = on: %s",
                            err ? err->message
                                : "io_uring has no 128-byte SQEs here");
            }
            g_clear_error(&err);
            return NULL;
        }
    }
    r = g_new0(IfsRing, 1);
    r->mount = m;
    r->nqueues = ifs_possible_cpus();
    return r;
}

void ifs_ring_note_request(IfsRing *r, const void *buf, size_t len)
{
    const struct fuse_in_header *in = buf;
    const struct fuse_init_in *init = (const void *)(in + 1);

    if (!r || len < sizeof(*in) + offsetof(struct fuse_init_in, unused) ||
        in->opcode != FUSE_INIT) {
        return;
    }
    if ((init->flags & IFS_FUSE_INIT_EXT) &&
        (init->flags2 & IFS_FUSE_OVER_IO_URING_FLAGS2)) {
        r->init_unique = in->unique;
    } else {
        log_info("FUSE over io_uring not offered by the kernel: requests "
                 "go through read() on /dev/fuse");
    }
}

bool ifs_ring_patch_reply(IfsRing *r, struct iovec *iov, int count)
{
    struct fuse_out_header *oh;
    struct fuse_init_out *out;
    size_t max_pages, size;

    if (!r || !r->init_unique || count < 2 || iov[0].iov_len < sizeof(*oh)) {
        return false;
    }
    oh = iov[0].iov_base;
    if (oh->unique != r->init_unique) {
        return false;
    }
    r->init_unique = 0;
    if (oh->error || iov[1].iov_len < offsetof(struct fuse_init_out, unused)) {
        return false;
    }
    out = iov[1].iov_base;
    out->flags |= IFS_FUSE_INIT_EXT;
    out->flags2 |= IFS_FUSE_OVER_IO_URING_FLAGS2;
    /* the kernel wants payload buffers that hold its largest request */
    max_pages = (out->flags & IFS_FUSE_MAX_PAGES) ? out->max_pages
                                                  : IFS_FUSE_DEFAULT_MAX_PAGES;
    size = MAX(8192, MAX((size_t)out->max_write, max_pages * IFS_PAGE));
    r->payload_size = ALIGN_UP(size, IFS_PAGE);
    return true;
}

static void ifs_ring_ent_done(AioUringCmd *cmd, int res);

static void ifs_ring_send_bh(void *opaque)
{
    IfsRingEnt *e = opaque;

    aio_uring_queue_cmd(aio_uring_current(), &e->cmd);
}

/*
 * Send @e's command from the ring of iothread @thread, or of the calling
 * iothread if @thread < 0.
 */
static void ifs_ring_send(IfsRingEnt *e, uint32_t op, uint64_t commit_id,
                          int thread)
{
    struct ifs_uring_cmd_req req = {.commit_id = commit_id, .qid = e->qid};
    IfsMount *m = e->ring->mount;
    AioUring *u = aio_uring_current();

    memset(e->cmd.data, 0, sizeof(e->cmd.data));
    memcpy(e->cmd.data, &req, sizeof(req));
    e->cmd.cmd_op = op;
    e->cmd.heavy = op == IFS_URING_CMD_COMMIT_AND_FETCH &&
                   e->hdr->ent.payload_sz >= IFS_RING_HEAVY;
    if (thread < 0 && !(u && aio_uring_has_cmds(u))) {
        thread = 0; /* not an iothread (they all have rings: ifs_ring_new) */
    }
    if (thread < 0 || iothread_get_ctx(m->threads[thread]) == aio_current()) {
        aio_uring_queue_cmd(u, &e->cmd);
    } else {
        aio_bh_schedule_oneshot(iothread_get_ctx(m->threads[thread]),
                                ifs_ring_send_bh, e);
    }
}

/*
 * Register the request buffers with the calling iothread's ring: image
 * reads and writes that use them in place (ifs_co_read, ifs_co_write)
 * then skip pinning their pages, a part of every request's cost.
 */
static void ifs_ring_fix_bh(void *opaque)
{
    IfsRing *r = opaque;
    int ret = aio_uring_register_buf(aio_uring_current(), r->mem, r->mem_size);

    if (ret < 0 && !__atomic_exchange_n(&r->unfixed, 1, __ATOMIC_SEQ_CST)) {
        log_info("FUSE over io_uring: request buffers not registered with "
                 "io_uring (%s): image I/O pins their pages per request",
                 strerror(-ret));
    }
}

/* Register the entries of one kernel queue, @opaque its first. */
static void ifs_ring_register_bh(void *opaque)
{
    IfsRingEnt *first = opaque;
    unsigned i;

    for (i = 0; i < IFS_RING_DEPTH; i++) {
        ifs_ring_send(first + i, IFS_URING_CMD_REGISTER, 0, -1);
    }
}

void ifs_ring_start(IfsRing *r)
{
    IfsMount *m = r->mount;
    size_t slot;
    unsigned i, n;
    /* huge pages, and so registered buffers (see below) */
    bool huge = r->nqueues <= IFS_RING_HUGE_QUEUES;

    n = r->nqueues * IFS_RING_DEPTH;
    slot = IFS_PAGE + r->payload_size;
    r->mem_size = ALIGN_UP(slot * n, IFS_HUGE_PAGE_SIZE);
    /*
     * Huge pages (ifs_map_buffers) make the whole map resident once 4k
     * requests have used every entry (32 x 516 KiB per CPU queue), where
     * small pages would leave most of it untouched.  So only up to
     * IFS_RING_HUGE_QUEUES queues (132 MiB) get them: on a large host
     * with I/O from every CPU small pages cost less.
     */
    r->mem = ifs_map_buffers(r->mem_size, huge);
    if (!r->mem) {
        /* The kernel waits for the entries it was promised: a daemon
         * that cannot serve them cannot serve at all. */
        log_error("FUSE over io_uring: cannot map %zu MiB of request "
                  "buffers: %s",
                  r->mem_size >> 20, strerror(errno));
        exit(1);
    }
    r->ents = g_new0(IfsRingEnt, n);
    for (i = 0; i < n; i++) {
        IfsRingEnt *e = &r->ents[i];

        e->ring = r;
        e->qid = i / IFS_RING_DEPTH;
        e->hdr = (void *)(r->mem + i * slot);
        e->payload = r->mem + i * slot + IFS_PAGE;
        e->iov[0].iov_base = e->hdr;
        e->iov[0].iov_len = sizeof(*e->hdr);
        e->iov[1].iov_base = e->payload;
        e->iov[1].iov_len = r->payload_size;
        e->cmd.fd = fuse_session_fd(m->se);
        e->cmd.addr = (uintptr_t)e->iov;
        e->cmd.len = 2;
        e->cmd.complete = ifs_ring_ent_done;
    }
    log_info("FUSE over io_uring: %u queues of %d requests, %zu KiB each",
             r->nqueues, IFS_RING_DEPTH, r->payload_size >> 10);
    /*
     * Registering pins the whole map at once, so only a map in huge pages
     * gets it (resident after the first requests anyway); before any
     * entry, since a thread runs its bottom halves in order.
     */
    for (i = 0; huge && i < m->nthreads; i++) {
        aio_bh_schedule_oneshot(iothread_get_ctx(m->threads[i]),
                                ifs_ring_fix_bh, r);
    }
    for (i = 0; i < r->nqueues; i++) {
        aio_bh_schedule_oneshot(iothread_get_ctx(m->threads[i % m->nthreads]),
                                ifs_ring_register_bh,
                                &r->ents[i * IFS_RING_DEPTH]);
    }
}

/* A malformed request: answer it with EIO so the caller is not stuck. */
static void ifs_ring_reject(IfsRingEnt *e, uint64_t unique)
{
    struct fuse_out_header oh = {
        .len = sizeof(oh), .error = -EIO, .unique = unique};

    memcpy(e->hdr->in_out, &oh, sizeof(oh));
    e->hdr->ent.payload_sz = 0;
    ifs_ring_send(e, IFS_URING_CMD_COMMIT_AND_FETCH, e->hdr->ent.commit_id, -1);
}

static void ifs_ring_ent_done(AioUringCmd *cmd, int res)
{
    IfsRingEnt *e = (IfsRingEnt *)cmd;
    IfsRing *r = e->ring;
    struct fuse_in_header *in = (void *)e->hdr->in_out;
    uint32_t psz = e->hdr->ent.payload_sz;
    struct fuse_buf fbuf;
    size_t oplen;
    char *start;

    if (res < 0) {
        /* -ENOTCONN/-ECANCELED: unmounted or shutting down */
        if (res != -ENOTCONN && res != -ECANCELED &&
            !__atomic_exchange_n(&r->failed, 1, __ATOMIC_SEQ_CST)) {
            log_warning("FUSE over io_uring: queue %u: %s (requests fall "
                        "back to /dev/fuse)",
                        e->qid, strerror(-res));
        }
        return;
    }
    if (__atomic_load_n(&r->stopping, __ATOMIC_SEQ_CST)) {
        /* Keep it: the kernel ends the request when the mount goes,
         * as it does with requests left unread on /dev/fuse. */
        return;
    }
    if (in->len < sizeof(*in) + psz || psz > r->payload_size ||
        in->len - sizeof(*in) - psz > sizeof(e->hdr->op_in)) {
        log_warning("FUSE over io_uring: malformed request (opcode %u, "
                    "length %u, payload %u)",
                    in->opcode, in->len, psz);
        ifs_ring_reject(e, in->unique);
        return;
    }
    __atomic_fetch_add(&r->inflight, 1, __ATOMIC_RELAXED);
    oplen = in->len - sizeof(*in) - psz;
    start = e->payload - sizeof(*in) - oplen;
    memcpy(start, in, sizeof(*in));
    memcpy(start + sizeof(*in), e->hdr->op_in, oplen);
    memset(&fbuf, 0, sizeof(fbuf));
    fbuf.mem = start;
    fbuf.size = in->len;
    ifs_ops_set_current_ent(e);
    fuse_session_process_buf(r->mount->se, &fbuf);
    ifs_ops_set_current(-1, NULL);
}

ssize_t ifs_ring_reply(IfsRingEnt *e, const struct iovec *iov, int count)
{
    IfsRing *r = e->ring;
    struct fuse_out_header oh;
    size_t psz = 0;
    int i, thread = -1;
    /* requests being served, this one included */
    unsigned busy = __atomic_fetch_sub(&r->inflight, 1, __ATOMIC_RELAXED);

    if (count < 1 || iov[0].iov_len != sizeof(oh)) {
        errno = EINVAL;
        return -1;
    }
    memcpy(&oh, iov[0].iov_base, sizeof(oh));
    for (i = 1; i < count; i++) {
        if (iov[i].iov_len > r->payload_size - psz) {
            oh.error = -EIO;
            psz = 0;
            break;
        }
        /* a read that went straight into the payload is there already */
        if (iov[i].iov_base != e->payload + psz) {
            memcpy(e->payload + psz, iov[i].iov_base, iov[i].iov_len);
        }
        psz += iov[i].iov_len;
    }
    oh.len = sizeof(oh) + psz;
    memcpy(e->hdr->in_out, &oh, sizeof(oh));
    e->hdr->ent.payload_sz = psz;
    /*
     * A commit is kernel work in the thread that sends it: the reply's
     * data is copied to the caller, the caller is woken, the entry's next
     * request is copied in (later, by the thread whose ring then holds
     * the entry).  With requests backing up, commits take turns over the
     * iothreads, so that work runs on every CPU while the drive's thread
     * keeps submitting I/O.  One request at a time stays on the thread
     * that served it: a hand-over would only add latency.
     */
    if (busy > 1 && r->mount->nthreads > 1) {
        thread = __atomic_fetch_add(&r->spread, 1, __ATOMIC_RELAXED) %
                 r->mount->nthreads;
    }
    ifs_ring_send(e, IFS_URING_CMD_COMMIT_AND_FETCH, e->hdr->ent.commit_id,
                  thread);
    return oh.len;
}

void *ifs_ring_payload(IfsRingEnt *e, size_t size)
{
    return size <= e->ring->payload_size ? e->payload : NULL;
}

void ifs_ring_stop(IfsRing *r)
{
    if (r) {
        __atomic_store_n(&r->stopping, 1, __ATOMIC_SEQ_CST);
    }
}

void ifs_ring_free(IfsRing *r)
{
    if (!r) {
        return;
    }
    if (r->mem) {
        munmap(r->mem, r->mem_size);
    }
    g_free(r->ents);
    g_free(r);
}
