/*
 * The control interface: a Unix socket per mount speaking JSON lines.
 * Each request is one object {"command": ...}; each reply one object,
 * {"return": ...} or {"error": "..."}.
 *
 *   {"command": "status"}                  drives, state, options, stats
 *   {"command": "resume", "drive": "d0"}   retry held requests (all drives
 *                                          if "drive" is absent)
 *   {"command": "reload"}                  re-read the config file
 *
 * Thread model: the server runs in the main thread's GMainLoop; commands
 * reach the drives through BlockBackend calls that run in each drive's
 * event loop and wait.  The socket is created with mode 0600 in a
 * directory only its owner can enter.
 */
#include <errno.h>
#include <fcntl.h>
#include <glib-unix.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "ifs.h"
#include "json.h"
#include "blockcore/log.h"

#define CONTROL_MAX_LINE (64 * 1024)

struct IfsControl {
    IfsMount *mount;
    char *path;
    int fd;
    guint source;
    GList *clients;
};

typedef struct ControlClient {
    IfsControl *control;
    int fd;
    guint source;
    GString *in;
} ControlClient;

char *ifs_control_default_path(const char *mountpoint)
{
    g_autofree char *abs = g_canonicalize_filename(mountpoint, NULL);
    g_autofree char *hash =
        g_compute_checksum_for_string(G_CHECKSUM_SHA256, abs, -1);
    const char *runtime = geteuid() == 0 ? "/run" : g_get_user_runtime_dir();

    hash[16] = '\0';
    return g_strdup_printf("%s/imgfs/%s.sock", runtime, hash);
}

static void control_client_free(ControlClient *c)
{
    c->control->clients = g_list_remove(c->control->clients, c);
    g_source_remove(c->source);
    close(c->fd);
    g_string_free(c->in, TRUE);
    g_free(c);
}

static void control_status(IfsControl *ctl, GString *out)
{
    IfsMount *m = ctl->mount;
    g_autoptr(GPtrArray) drives = ifs_list_drives(m);
    unsigned i;

    g_string_append(out, "{\"return\": {\"mountpoint\": ");
    json_append_string(out, m->mountpoint);
    g_string_append(out, ", \"config\": ");
    json_append_string(out, m->cfg->abs_path);
    g_string_append_printf(out, ", \"iothreads\": %u, \"pid\": %d", m->nthreads,
                           (int)getpid());
    g_string_append(out, ", \"drives\": [");
    for (i = 0; i < drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(drives, i);

        if (i) {
            g_string_append(out, ", ");
        }
        blk_status_json(d->blk, out);
        /* add what the FUSE side knows */
        g_string_truncate(out, out->len - 1);
        g_string_append_printf(
            out, ", \"open-files\": %d, \"iothread\": \"%s\"}",
            __atomic_load_n(&d->open_count, __ATOMIC_SEQ_CST),
            aio_context_name(d->ctx));
        ifs_drive_unref(d);
    }
    g_string_append(out, "]}}");
}

static void control_resume(IfsControl *ctl, const char *name, GString *out)
{
    g_autoptr(GPtrArray) drives = ifs_list_drives(ctl->mount);
    bool found = false;
    unsigned i, n = 0;

    g_string_append(out, "{\"return\": {\"resumed\": [");
    for (i = 0; i < drives->len; i++) {
        IfsDrive *d = g_ptr_array_index(drives, i);

        if (!name || !strcmp(name, d->name)) {
            found = true;
            if (blk_is_stopped(d->blk, NULL)) {
                blk_resume(d->blk);
                g_string_append(out, n++ ? ", " : "");
                json_append_string(out, d->name);
            }
        }
        ifs_drive_unref(d);
    }
    g_string_append(out, "]}}");
    if (name && !found) {
        g_string_truncate(out, 0);
        g_string_append(out, "{\"error\": ");
        json_append_string(out, "no such drive");
        g_string_append(out, "}");
    }
}

static void control_error(GString *out, const char *msg)
{
    g_string_append(out, "{\"error\": ");
    json_append_string(out, msg);
    g_string_append(out, "}");
}

static void control_handle(IfsControl *ctl, const char *line, GString *out)
{
    g_autoptr(GError) err = NULL;
    JsonValue *req = json_parse(line, &err);
    const char *cmd;

    if (!req || req->type != JSON_OBJECT) {
        control_error(out, err ? err->message : "a request is a JSON object");
        json_free(req);
        return;
    }
    cmd = json_get_str(req, "command", NULL);
    if (!cmd) {
        control_error(out, "missing \"command\"");
    } else if (!strcmp(cmd, "status")) {
        control_status(ctl, out);
    } else if (!strcmp(cmd, "resume")) {
        const JsonValue *drive = json_get(req, "drive");

        if (drive && drive->type != JSON_STRING) {
            control_error(out, "\"drive\" must be a drive's name (a string)");
        } else {
            control_resume(ctl, json_get_str(req, "drive", NULL), out);
        }
    } else if (!strcmp(cmd, "reload")) {
        g_autoptr(GString) report = g_string_new(NULL);

        if (ifs_mount_reload(ctl->mount, report, &err)) {
            g_string_append_printf(out, "{\"return\": %s}", report->str);
        } else {
            control_error(out, err->message);
        }
    } else {
        g_autofree char *msg = g_strdup_printf(
            "unknown command '%s' (status, resume, reload)", cmd);

        control_error(out, msg);
    }
    json_free(req);
}

static bool control_send(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN) {
                struct pollfd p = {.fd = fd, .events = POLLOUT};

                if (poll(&p, 1, 5000) <= 0) {
                    return false;
                }
                continue;
            }
            return false;
        }
        buf += n;
        len -= n;
    }
    return true;
}

static gboolean control_client_cb(gint fd, GIOCondition cond, gpointer opaque)
{
    ControlClient *c = opaque;
    char buf[4096];
    ssize_t n;
    char *nl;

    n = recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        return G_SOURCE_CONTINUE;
    }
    if (n <= 0) {
        control_client_free(c);
        return G_SOURCE_REMOVE;
    }
    g_string_append_len(c->in, buf, n);
    while ((nl = memchr(c->in->str, '\n', c->in->len))) {
        g_autoptr(GString) out = g_string_new(NULL);
        g_autofree char *line = g_strndup(c->in->str, nl - c->in->str);

        g_string_erase(c->in, 0, nl - c->in->str + 1);
        if (!*g_strstrip(line)) {
            continue;
        }
        control_handle(c->control, line, out);
        g_string_append_c(out, '\n');
        if (!control_send(fd, out->str, out->len)) {
            control_client_free(c);
            return G_SOURCE_REMOVE;
        }
    }
    if (c->in->len > CONTROL_MAX_LINE) {
        control_client_free(c);
        return G_SOURCE_REMOVE;
    }
    (void)cond;
    return G_SOURCE_CONTINUE;
}

static gboolean control_accept_cb(gint fd, GIOCondition cond, gpointer opaque)
{
    IfsControl *ctl = opaque;
    ControlClient *c;
    int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

    (void)cond;
    if (cfd < 0) {
        return G_SOURCE_CONTINUE;
    }
    c = g_new0(ControlClient, 1);
    c->control = ctl;
    c->fd = cfd;
    c->in = g_string_new(NULL);
    c->source =
        g_unix_fd_add(cfd, G_IO_IN | G_IO_HUP | G_IO_ERR, control_client_cb, c);
    ctl->clients = g_list_prepend(ctl->clients, c);
    return G_SOURCE_CONTINUE;
}

IfsControl *ifs_control_start(IfsMount *m, const char *path, GError **errp)
{
    IfsControl *ctl;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    g_autofree char *dir = g_path_get_dirname(path);
    int fd;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NAMETOOLONG,
                    "control socket path '%s' is too long", path);
        return NULL;
    }
    if (g_mkdir_with_parents(dir, 0700) < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "control socket directory '%s': %s", dir, g_strerror(err));
        return NULL;
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "control socket: %s", g_strerror(err));
        return NULL;
    }
    /* A socket left by a daemon that died: nobody answers on it. */
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
        close(fd);
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                    "control socket '%s' is in use by another imgfs", path);
        return NULL;
    }
    unlink(path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        chmod(path, 0600) < 0 || listen(fd, 16) < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "control socket '%s': %s", path, g_strerror(err));
        close(fd);
        return NULL;
    }
    ctl = g_new0(IfsControl, 1);
    ctl->mount = m;
    ctl->path = g_strdup(path);
    ctl->fd = fd;
    ctl->source = g_unix_fd_add(fd, G_IO_IN, control_accept_cb, ctl);
    return ctl;
}

void ifs_control_stop(IfsControl *ctl)
{
    if (!ctl) {
        return;
    }
    while (ctl->clients) {
        control_client_free(ctl->clients->data);
    }
    g_source_remove(ctl->source);
    close(ctl->fd);
    unlink(ctl->path);
    g_free(ctl->path);
    g_free(ctl);
}

char *ifs_control_call(const char *path, const char *request, GError **errp)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    g_autoptr(GString) in = g_string_new(NULL);
    g_autofree char *line = g_strdup_printf("%s\n", request);
    int fd;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NAMETOOLONG,
                    "control socket path '%s' is too long", path);
        return NULL;
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot reach the imgfs control socket '%s': %s", path,
                    g_strerror(err));
        if (fd >= 0) {
            close(fd);
        }
        return NULL;
    }
    if (!control_send(fd, line, strlen(line))) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_IO, "cannot send to '%s'",
                    path);
        close(fd);
        return NULL;
    }
    while (!memchr(in->str, '\n', in->len)) {
        char buf[65536];
        ssize_t n = recv(fd, buf, sizeof(buf), 0);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_IO,
                        "no answer from '%s'", path);
            close(fd);
            return NULL;
        }
        g_string_append_len(in, buf, n);
    }
    close(fd);
    return g_strndup(in->str, strchr(in->str, '\n') - in->str);
}
