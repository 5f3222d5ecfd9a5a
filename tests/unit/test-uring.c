/*
 * Unit tests for an event loop's io_uring (blockcore/uring.c): the order
 * in which file operations and passthrough commands reach the kernel.
 * Light commands keep their place among file operations; a heavy command
 * goes after the file operations that are ready with it, alone in its
 * io_uring_enter, so work that turns up before the next loop iteration
 * goes before the next heavy one.
 *
 * The passthrough command is SIOCINQ on a UDP socket (Linux 6.7), which
 * any ring can carry and which completes inside io_uring_enter, as do
 * reads of a file in the page cache: the completion order is the order
 * of submission.
 *
 * A transfer inside the ring's registered buffer goes through the
 * registered pages, others through their own.
 *
 * A read goes to the kernel when it is queued while the loop has idle
 * time, and with the loop's batch while it is busy: a read of a cached
 * file is done inside io_uring_enter, so its buffer shows which.  A
 * write goes when queued if it is large, busy or idle, and with the
 * batch otherwise.
 *
 * Operations beyond the submission queue's size wait their turn and go
 * out without any new request to push them.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "blockcore/aio.h"
#include "blockcore/coroutine.h"
#include "blockcore/uring.h"

#ifndef SOCKET_URING_OP_SIOCINQ
#define SOCKET_URING_OP_SIOCINQ 0
#endif

static AioContext *ctx;
static AioUring *ring;
static int file_fd = -1;
static int sock_fd = -1;
static GString *order; /* one letter per completion */
static int pending;

static void coroutine_fn co_read(void *opaque)
{
    char letter = GPOINTER_TO_INT(opaque);
    char buf[4096];
    struct iovec iov = {buf, sizeof(buf)};

    g_assert_cmpint(
        aio_uring_co_rw(ring, false, file_fd, &iov, 1, 0, sizeof(buf), 0), ==,
        0);
    g_assert_cmpint(buf[0], ==, 'x');
    g_string_append_c(order, letter);
    pending--;
}

static void start_read(char letter)
{
    pending++;
    co_enter(co_create(co_read, GINT_TO_POINTER(letter)));
}

typedef struct TestCmd {
    AioUringCmd cmd; /* first */
    char letter;
    char then; /* a read to start when this completes, or 0 */
} TestCmd;

static void cmd_done(AioUringCmd *c, int res)
{
    TestCmd *t = (TestCmd *)c;

    g_assert_cmpint(res, ==, 3); /* the datagram waiting in the socket */
    g_string_append_c(order, t->letter);
    pending--;
    if (t->then) {
        start_read(t->then);
    }
}

static void queue_cmd(TestCmd *t, char letter, bool heavy, char then)
{
    memset(t, 0, sizeof(*t));
    t->cmd.fd = sock_fd;
    t->cmd.cmd_op = SOCKET_URING_OP_SIOCINQ;
    t->cmd.heavy = heavy;
    t->cmd.complete = cmd_done;
    t->letter = letter;
    t->then = then;
    pending++;
    aio_uring_queue_cmd(ring, &t->cmd);
}

static void run_until_done(void)
{
    while (pending > 0) {
        aio_poll(ctx, true);
    }
}

static void setup(void)
{
    g_string_truncate(order, 0);
}

/* Light commands and file operations go in the order they were queued. */
static void test_light_in_order(void)
{
    TestCmd a, b;

    setup();
    queue_cmd(&a, 'a', false, 0);
    start_read('r');
    queue_cmd(&b, 'b', false, 0);
    run_until_done();
    g_assert_cmpstr(order->str, ==, "arb");
}

/* A heavy command goes after the file operations ready with it. */
static void test_heavy_after_ops(void)
{
    TestCmd h, a;

    setup();
    queue_cmd(&h, 'H', true, 0);
    queue_cmd(&a, 'a', false, 0);
    start_read('r');
    run_until_done();
    g_assert_cmpstr(order->str, ==, "arH");
}

/*
 * Two heavy commands go in two io_uring_enter calls: a read started when
 * the first completes goes before the second.
 */
static void test_heavy_one_per_enter(void)
{
    TestCmd h, k;

    setup();
    queue_cmd(&h, 'H', true, 'r');
    queue_cmd(&k, 'K', true, 0);
    run_until_done();
    g_assert_cmpstr(order->str, ==, "HrK");
}

typedef struct RwJob {
    bool write;
    int fd;
    void *buf;
    size_t len;
    int ret;
} RwJob;

static void coroutine_fn co_rw(void *opaque)
{
    RwJob *j = opaque;
    struct iovec iov = {j->buf, j->len};

    j->ret = aio_uring_co_rw(ring, j->write, j->fd, &iov, 1, 0, j->len, 0);
    pending--;
}

/* Start @j; it runs until it waits for the ring. */
static void start_rw(RwJob *j)
{
    pending++;
    co_enter(co_create(co_rw, j));
}

static int run_rw(bool write, int fd, void *buf, size_t len)
{
    RwJob j = {write, fd, buf, len, 1};

    start_rw(&j);
    run_until_done();
    return j.ret;
}

/* A new temporary file, already unlinked. */
static int open_tmp(void)
{
    char *path = NULL;
    GError *err = NULL;
    int fd = g_file_open_tmp("test-uring-XXXXXX", &path, &err);

    g_assert_no_error(err);
    g_unlink(path);
    g_free(path);
    return fd;
}

/*
 * Reads and writes of one iovec inside the registered buffer use it.
 * The proof: after MADV_DONTNEED the process sees fresh zero pages where
 * the ring keeps the pages it pinned, so a read into the registered
 * buffer stays invisible, while a read into other memory is seen.
 */
static void test_fixed_buffer(void)
{
    size_t size = 16 * 4096;
    char *reg = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *other = g_malloc0(4096), back[4096];
    int out_fd;

    g_assert_true(reg != MAP_FAILED);
    memset(reg, 0, size);
    g_assert_cmpint(aio_uring_register_buf(ring, reg, size), ==, 0);
    g_assert_cmpint(aio_uring_register_buf(ring, reg, size), ==, -EBUSY);

    /* a write from the registered buffer carries its data */
    out_fd = open_tmp();
    memset(reg + 4096, 'w', 4096);
    g_assert_cmpint(run_rw(true, out_fd, reg + 4096, 4096), ==, 0);
    g_assert_cmpint(pread(out_fd, back, sizeof(back), 0), ==, sizeof(back));
    g_assert_cmpint(back[0], ==, 'w');
    g_assert_cmpint(back[4095], ==, 'w');
    close(out_fd);

    g_assert_cmpint(madvise(reg, size, MADV_DONTNEED), ==, 0);
    g_assert_cmpint(run_rw(false, file_fd, reg + 8192, 4096), ==, 0);
    g_assert_cmpint(reg[8192], ==, 0);
    g_assert_cmpint(reg[8192 + 4095], ==, 0);
    g_assert_cmpint(run_rw(false, file_fd, other, 4096), ==, 0);
    g_assert_cmpint(other[0], ==, 'x');
    g_assert_cmpint(other[4095], ==, 'x');
    g_free(other);
    /* the ring keeps the buffer's pages until it goes; no munmap here */
}

static void timer_done(void *opaque)
{
    *(bool *)opaque = true;
}

/* Let the loop wait (idle) for @ms milliseconds. */
static void idle_for(int ms)
{
    bool done = false;
    AioTimer *t = aio_timer_new(ctx, timer_done, &done);

    aio_timer_mod(t, aio_clock_ns() + ms * INT64_C(1000000));
    while (!done) {
        aio_poll(ctx, true);
    }
    aio_timer_free(t);
}

/* Keep the loop busy for @ms milliseconds, looking for events now and
 * then without waiting. */
static void busy_for(int ms)
{
    int64_t end = aio_clock_ns() + ms * INT64_C(1000000);

    while (aio_clock_ns() < end) {
        int64_t spin = aio_clock_ns() + 200000;

        while (aio_clock_ns() < spin) {
        }
        aio_poll(ctx, false);
    }
}

/* Start a read of the cached file into @buf; is it done before the loop
 * runs again? */
static bool read_done_when_queued(char *buf)
{
    RwJob j = {false, file_fd, buf, 4096, 1};
    bool done;

    memset(buf, 0, 4096);
    start_rw(&j);
    done = buf[0] == 'x';
    run_until_done();
    g_assert_cmpint(j.ret, ==, 0);
    g_assert_cmpint(buf[4095], ==, 'x');
    return done;
}

static void test_eager_reads(void)
{
    char *buf = g_malloc(4096);

    /* the first wait also closes a window of earlier tests' work */
    idle_for(2);
    idle_for(3);
    g_assert_true(aio_context_has_idle(ctx));
    g_assert_true(read_done_when_queued(buf));
    busy_for(3);
    g_assert_false(aio_context_has_idle(ctx));
    g_assert_false(read_done_when_queued(buf));
    g_free(buf);
}

/* Start a write of @len bytes; has it gone to the kernel before the loop
 * runs again? */
static bool write_submitted_when_queued(int fd, char *buf, size_t len)
{
    RwJob j = {true, fd, buf, len, 1};
    bool submitted;

    start_rw(&j);
    submitted = aio_uring_pending(ring) == 0;
    run_until_done();
    g_assert_cmpint(j.ret, ==, 0);
    return submitted;
}

static void test_eager_writes(void)
{
    size_t len = 64 * 1024;
    char *buf = g_malloc(len), *back = g_malloc(len);
    int fd = open_tmp();

    memset(buf, 'L', len);
    /* a large write goes at once, even from a busy loop */
    busy_for(3);
    g_assert_false(aio_context_has_idle(ctx));
    g_assert_true(write_submitted_when_queued(fd, buf, len));
    g_assert_cmpint(pread(fd, back, len, 0), ==, len);
    g_assert_cmpmem(back, len, buf, len);
    /* a small one waits for the loop's batch, busy or idle */
    memset(buf, 's', 4096);
    g_assert_false(write_submitted_when_queued(fd, buf, 4096 * 15));
    g_assert_false(write_submitted_when_queued(fd, buf, 4096));
    idle_for(2);
    idle_for(3);
    g_assert_true(aio_context_has_idle(ctx));
    g_assert_false(write_submitted_when_queued(fd, buf, 4096));
    g_assert_cmpint(pread(fd, back, 4096, 0), ==, 4096);
    g_assert_cmpmem(back, 4096, buf, 4096);
    close(fd);
    g_free(back);
    g_free(buf);
}

/*
 * More operations than the submission queue holds, queued in one go:
 * those on the wait list go out in later passes of the loop, with no
 * new request to push them.
 */
static void test_overflow(void)
{
    enum { N = 300 }; /* > URING_ENTRIES */
    RwJob *jobs = g_new0(RwJob, N);
    char *buf = g_malloc0(4096);
    int64_t deadline = aio_clock_ns() + 5 * INT64_C(1000000000);
    int fd = open_tmp(), i;

    for (i = 0; i < N; i++) {
        jobs[i] = (RwJob){true, fd, buf, 4096, 1};
        start_rw(&jobs[i]);
    }
    /* not aio_poll(ctx, true): a stall would hang the test */
    while (pending && aio_clock_ns() < deadline) {
        aio_poll(ctx, false);
    }
    g_assert_cmpint(pending, ==, 0);
    for (i = 0; i < N; i++) {
        g_assert_cmpint(jobs[i].ret, ==, 0);
    }
    close(fd);
    g_free(buf);
    g_free(jobs);
}

static void open_fixtures(void)
{
    struct sockaddr_in addr = {.sin_family = AF_INET};
    socklen_t len = sizeof(addr);
    char data[4096];

    file_fd = open_tmp();
    memset(data, 'x', sizeof(data));
    g_assert_cmpint(write(file_fd, data, sizeof(data)), ==, sizeof(data));

    /* a UDP socket with one 3-byte datagram from itself */
    sock_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    g_assert_cmpint(sock_fd, >=, 0);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    g_assert_cmpint(bind(sock_fd, (struct sockaddr *)&addr, sizeof(addr)), ==,
                    0);
    g_assert_cmpint(getsockname(sock_fd, (struct sockaddr *)&addr, &len), ==,
                    0);
    g_assert_cmpint(
        sendto(sock_fd, "abc", 3, 0, (struct sockaddr *)&addr, sizeof(addr)),
        ==, 3);
}

int main(int argc, char **argv)
{
    GError *err = NULL;
    int ret;

    g_test_init(&argc, &argv, NULL);
    ctx = aio_context_new("test-uring", NULL);
    aio_context_borrow(ctx);
    ring = aio_uring_get(ctx, &err);
    g_assert_no_error(err);
    g_assert_true(aio_uring_has_cmds(ring));
    order = g_string_new(NULL);
    open_fixtures();
    g_test_add_func("/uring/light-in-order", test_light_in_order);
    g_test_add_func("/uring/heavy-after-ops", test_heavy_after_ops);
    g_test_add_func("/uring/heavy-one-per-enter", test_heavy_one_per_enter);
    g_test_add_func("/uring/fixed-buffer", test_fixed_buffer);
    g_test_add_func("/uring/eager-reads", test_eager_reads);
    g_test_add_func("/uring/eager-writes", test_eager_writes);
    g_test_add_func("/uring/overflow", test_overflow);
    ret = g_test_run();
    close(sock_fd);
    close(file_fd);
    g_string_free(order, TRUE);
    co_pool_drain();
    aio_context_return(NULL);
    aio_context_free(ctx);
    return ret;
}
