/*
 * Internals of the imgfs daemon (the FUSE side): the parsed config, the
 * mount with its drives and FUSE queues, and the entry points main.c
 * uses.  Everything here speaks BlockBackend (blockcore/block.h) and
 * never knows an image format.
 */
#ifndef IFS_H
#define IFS_H

#define FUSE_USE_VERSION 34

#include <fuse_lowlevel.h>
#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#include "blockcore/aio.h"
#include "blockcore/block.h"

#define IFS_VERSION "0.1.0"

/*
 * The largest read or write request the kernel sends.  The kernel splits
 * bigger transfers; the pieces of a 1 MiB read or write travel in
 * parallel, so the copies FUSE makes of them overlap each other and the
 * disk: 1 MiB sequential transfers at queue depth 4 ran 10-20% (reads)
 * and up to 50% (writes) faster than with 1 MiB requests here.
 */
#define IFS_MAX_REQUEST (512 * 1024)

/* Extended attribute of the mount's root naming its control socket. */
#define IFS_CONTROL_XATTR "user.imgfs.control"

/* ---- config.c ---- */

typedef struct IfsDriveConfig {
    char *name;
    int line;     /* of the [group] header */
    int iothread; /* index of the event loop serving it; -1: spread */
    BlockBackendOptions opts;
} IfsDriveConfig;

/* [imgfs] fuse-uring: how requests travel from the kernel */
typedef enum IfsUringMode {
    IFS_URING_AUTO, /* io_uring if the fuse module allows it, else read() */
    IFS_URING_ON,   /* io_uring, switching the module parameter on */
    IFS_URING_OFF,  /* read()/writev() on /dev/fuse */
} IfsUringMode;

typedef struct IfsConfig {
    char *path;     /* as given, for messages */
    char *abs_path; /* absolute, for reloads after the daemon detached */
    char *dir;      /* absolute directory of the config file */
    unsigned iothreads;
    int64_t poll_max_ns; /* iothreads' busy polling window */
    char *control;       /* control socket path, NULL: the default */
    IfsUringMode fuse_uring;
    bool format_help;  /* some drive says "format = help" */
    GPtrArray *drives; /* IfsDriveConfig *, in file order */
} IfsConfig;

/*
 * Read and check a config file completely.  Errors are one line:
 * "config.ini:7: drive 'disk0': unknown key 'colour'".
 */
IfsConfig *ifs_config_load(const char *path, GError **errp);
void ifs_config_free(IfsConfig *cfg);

/* ---- mount.c ---- */

typedef struct IfsMount IfsMount;
typedef struct IfsQueue IfsQueue;
typedef struct IfsRing IfsRing;
typedef struct IfsRingEnt IfsRingEnt;

typedef struct IfsDrive {
    char *name;
    fuse_ino_t ino;
    BlockBackend *blk;
    AioContext *ctx;
    bool read_only;
    int refcnt;       /* atomic: the drive table, open files, requests */
    int open_count;   /* atomic: open files */
    int64_t mtime_ns; /* atomic: last write, for getattr */
    IfsMount *mount;
    /* As configured, to tell what a reload changes. */
    BlockBackendOptions opts;
    int iothread;
} IfsDrive;

typedef struct IfsControl IfsControl;

struct IfsMount {
    IfsConfig *cfg;
    char *mountpoint;
    bool foreground;
    char **fuse_opts; /* -o values from the command line */
    struct fuse_session *se;

    GRWLock lock;      /* protects drives */
    GPtrArray *drives; /* IfsDrive *, protected by lock */

    unsigned nthreads;
    IOThread **threads;
    IfsQueue **queues;

    int inflight; /* atomic: FUSE requests being served */
    int exiting;  /* atomic: stop serving, drain */
    GMutex drain_lock;
    GCond drain_cond;
    GMainLoop *loop;

    uid_t uid;
    gid_t gid;
    int64_t start_ns; /* CLOCK_REALTIME at mount */
    fuse_ino_t next_ino;
    IfsControl *control;
    char *control_path;
    IfsRing *ring; /* FUSE over io_uring, NULL: not used */
};

/* Mount, serve until unmounted or signalled, clean up.  Returns the
 * process exit status. */
int ifs_mount_main(IfsConfig *cfg, const char *mountpoint, bool foreground,
                   char **fuse_opts);

IfsDrive *ifs_drive_ref(IfsDrive *d);
/* Drop a reference; the last one closes the drive from the main loop. */
void ifs_drive_unref(IfsDrive *d);
/* Look up a drive (with a reference) by inode or name. */
IfsDrive *ifs_find_drive_ino(IfsMount *m, fuse_ino_t ino);
IfsDrive *ifs_find_drive_name(IfsMount *m, const char *name);
/* Look up a drive for open(): a reference and one more open file. */
IfsDrive *ifs_open_drive_ino(IfsMount *m, fuse_ino_t ino);
void ifs_release_drive(IfsDrive *d);
/* The drives, each with a reference (unref them, free the array). */
GPtrArray *ifs_list_drives(IfsMount *m);

/*
 * Re-read the config file: add new drives, remove deleted ones, reopen
 * changed ones that no program has open.  Main thread.  Returns false
 * (and changes nothing) if the new config is bad; @report describes what
 * happened as a JSON object.
 */
bool ifs_mount_reload(IfsMount *m, GString *report, GError **errp);

/* ---- control.c ---- */

/* Where the control socket of a mount point is when not configured. */
char *ifs_control_default_path(const char *mountpoint);
/* Listen on the mount's control socket (main loop). */
IfsControl *ifs_control_start(IfsMount *m, const char *path, GError **errp);
void ifs_control_stop(IfsControl *c);
/* Client: send one request line, return the reply line. */
char *ifs_control_call(const char *path, const char *request, GError **errp);

/* x86-64's and arm64's (with 4 KiB pages) transparent huge page */
#define IFS_HUGE_PAGE_SIZE (2 * 1024 * 1024)
/* Request buffer memory, huge page aligned, in huge pages if @huge. */
char *ifs_map_buffers(size_t size, bool huge);

/*
 * A buffer of IFS_MAX_REQUEST + 8 KiB, page aligned, from a pool: it
 * receives a request from /dev/fuse (the write payload lands page
 * aligned), or holds a large read's data.
 */
typedef struct IfsBuf IfsBuf;
IfsBuf *ifs_buf_new(void);
char *ifs_buf_mem(IfsBuf *b);
void ifs_buf_free(IfsBuf *b);

/* ---- ring.c: FUSE over io_uring ---- */

/*
 * Prepare the io_uring transport as [imgfs] fuse-uring says: NULL if it
 * is off or (auto) unavailable; NULL and *errp if it is on and cannot
 * be.  Creates the iothreads' rings: call before they start.
 */
IfsRing *ifs_ring_new(IfsMount *m, GError **errp);
/* Every request read from /dev/fuse passes here (FUSE_INIT matters). */
void ifs_ring_note_request(IfsRing *r, const void *buf, size_t len);
/* Every reply written to /dev/fuse passes here: true if it is the
 * FUSE_INIT reply, now accepting io_uring. */
bool ifs_ring_patch_reply(IfsRing *r, struct iovec *iov, int count);
/* Once that reply is written: hand the kernel its ring entries. */
void ifs_ring_start(IfsRing *r);
/* Serve no new requests (shutdown). */
void ifs_ring_stop(IfsRing *r);
/* After the iothreads (and their rings) are gone. */
void ifs_ring_free(IfsRing *r);
/* libfuse's reply to the request in @e: commit it, fetch the next. */
ssize_t ifs_ring_reply(IfsRingEnt *e, const struct iovec *iov, int count);
/* @e's payload buffer if a reply of @size bytes fits there, else NULL. */
void *ifs_ring_payload(IfsRingEnt *e, size_t size);

/* ---- ops.c ---- */

extern const struct fuse_lowlevel_ops ifs_ops;

/* Set by the queue that read the current request (this thread). */
void ifs_ops_set_current(int reply_fd, IfsBuf *buf);
/* Set by the ring for a request that arrived in ring entry @e. */
void ifs_ops_set_current_ent(IfsRingEnt *e);
/* Did the op keep the receive buffer (a write in flight)? */
bool ifs_ops_took_buffer(void);
/* Writes a reply to the queue its request came from. */
ssize_t ifs_ops_writev(int fd, struct iovec *iov, int count, void *userdata);

/* Called by ops.c when a request completes. */
void ifs_request_finished(IfsMount *m);
void ifs_request_started(IfsMount *m);

#endif /* IFS_H */
