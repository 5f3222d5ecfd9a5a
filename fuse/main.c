/*
 * The imgfs command line: "mount" (the daemon), "info" (what an image is
 * before mounting it), "formats", --help and --version.
 */
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/xattr.h>

#include "ifs.h"
#include "json.h"
#include "blockcore/log.h"
#include "blockcore/thread-pool.h"

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: imgfs mount [-f] [-o FUSE_OPTIONS] CONFIG MOUNTPOINT\n"
            "       imgfs info [--json] [--format FORMAT] IMAGE\n"
            "       imgfs status [--json] MOUNTPOINT\n"
            "       imgfs resume MOUNTPOINT [DRIVE]\n"
            "       imgfs reload MOUNTPOINT\n"
            "       imgfs formats\n"
            "       imgfs --help | --version\n"
            "\n"
            "Expose disk images as flat raw files: every drive of CONFIG\n"
            "appears as MOUNTPOINT/<drive>, readable and writable like a\n"
            "raw image, whatever the image's format and storage.\n"
            "\n"
            "mount options:\n"
            "  -f, --foreground   stay in the foreground (default: detach\n"
            "                     once the mount is ready)\n"
            "  -o OPTIONS         FUSE mount options, e.g. allow_other\n"
            "\n"
            "CONFIG is an INI file: [imgfs] holds daemon settings\n"
            "(iothreads = N); every other [group] is a drive named after\n"
            "the group:\n"
            "  [disk0]\n"
            "  file = images/disk0.img   # relative to the config file\n"
            "  format = raw              # omitted: probed\n"
            "  read-only = off\n"
            "\n"
            "Drive keys:\n");
    for (const OptDesc *d = blk_option_table(); d->name; d++) {
        fprintf(out, "  %-16s %s\n", d->name, d->help);
    }
    fprintf(out, "  <driver>.<key>   driver settings, e.g. raw.offset, "
                 "raw.size\n"
                 "\n"
                 "Stop with: fusermount3 -u MOUNTPOINT (or SIGTERM).\n");
}

static void version(void)
{
    g_autoptr(GString) s = g_string_new(NULL);

    printf("imgfs %s\n", IFS_VERSION);
    blk_list_drivers(s);
    fputs(s->str, stdout);
#if defined(CONFIG_RBD_DISABLED)
    printf("rbd: not built (disabled with -Drbd=disabled)\n");
#elif !defined(CONFIG_RBD)
    printf("rbd: not built (librbd was not found at build time)\n");
#endif
}

/*
 * An option getopt_long() refused (opterr = 0, optstring "+:..."): one
 * line in imgfs's form instead of getopt's own message plus a hint.
 * Returns the exit status.
 */
static int bad_option(const char *cmd, const struct option *longopts, int c,
                      char **argv)
{
    const char *arg = argv[optind - 1];
    g_autofree char *name = g_strndup(arg, strcspn(arg, "="));

    if (c == ':') {
        if (g_str_has_prefix(arg, "--")) {
            log_error("%s: option '%s' needs an argument (try 'imgfs --help')",
                      cmd, name);
        } else {
            log_error("%s: option '-%c' needs an argument (try 'imgfs --help')",
                      cmd, optopt);
        }
        return 2;
    }
    /* "--foreground=1" sets optopt to the option's letter too; a letter
     * refused in a cluster ("-fx") leaves argv[optind - 1] elsewhere. */
    if (optopt && g_str_has_prefix(arg, "--") && strchr(arg, '=')) {
        for (const struct option *o = longopts; o->name; o++) {
            if (o->val == optopt && g_str_has_prefix(o->name, name + 2)) {
                log_error("%s: option '--%s' takes no argument (try "
                          "'imgfs --help')",
                          cmd, o->name);
                return 2;
            }
        }
    }
    if (optopt) {
        log_error("%s: unknown option '-%c' (try 'imgfs --help')", cmd, optopt);
    } else {
        log_error("%s: unknown option '%s' (try 'imgfs --help')", cmd, name);
    }
    return 2;
}

static int cmd_mount(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"foreground", no_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    g_autoptr(GPtrArray) fuse_opts = g_ptr_array_new();
    IfsConfig *cfg;
    GError *err = NULL;
    bool foreground = false;
    int c, status;

    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "+:fo:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'f':
            foreground = true;
            break;
        case 'o':
            g_ptr_array_add(fuse_opts, optarg);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            return bad_option(argv[0], longopts, c, argv);
        }
    }
    if (argc - optind != 2) {
        log_error("mount needs CONFIG and MOUNTPOINT (try 'imgfs --help')");
        return 2;
    }
    g_ptr_array_add(fuse_opts, NULL);
    cfg = ifs_config_load(argv[optind], &err);
    if (!cfg) {
        log_error("%s", err->message);
        g_error_free(err);
        return 1;
    }
    if (cfg->format_help) {
        g_autoptr(GString) s = g_string_new(NULL);

        blk_list_drivers(s);
        fputs(s->str, stdout);
        ifs_config_free(cfg);
        return 0;
    }
    /* The mount owns the config from here (a reload replaces it). */
    status = ifs_mount_main(cfg, argv[optind + 1], foreground,
                            (char **)fuse_opts->pdata);
    return status;
}

static void json_string(GString *out, const char *s)
{
    g_string_append_c(out, '"');
    for (; s && *s; s++) {
        unsigned char ch = *s;

        if (ch == '"' || ch == '\\') {
            g_string_append_printf(out, "\\%c", ch);
        } else if (ch < 0x20) {
            g_string_append_printf(out, "\\u%04x", ch);
        } else {
            g_string_append_c(out, ch);
        }
    }
    g_string_append_c(out, '"');
}

/* Format specific values that are plain numbers go out as numbers. */
static bool is_json_number(const char *s)
{
    if (!*s) {
        return false;
    }
    for (; *s; s++) {
        if (!g_ascii_isdigit(*s)) {
            return false;
        }
    }
    return true;
}

static void info_json_node(GString *out, GPtrArray *chain, unsigned i)
{
    BlockNodeInfo *n = g_ptr_array_index(chain, i);
    unsigned k;

    g_string_append(out, "{\"filename\": ");
    json_string(out, n->filename);
    g_string_append(out, ", \"format\": ");
    json_string(out, n->format);
    g_string_append_printf(out, ", \"virtual-size\": %" PRId64,
                           n->virtual_size);
    if (n->allocated_bytes >= 0) {
        g_string_append_printf(out, ", \"actual-size\": %" PRId64,
                               n->allocated_bytes);
    }
    if (n->backing_file) {
        g_string_append(out, ", \"backing-filename\": ");
        json_string(out, n->backing_file);
    }
    if (n->backing_format) {
        g_string_append(out, ", \"backing-filename-format\": ");
        json_string(out, n->backing_format);
    }
    if (n->keys->len) {
        g_string_append(out, ", \"format-specific\": {");
        for (k = 0; k < n->keys->len; k++) {
            const char *v = g_ptr_array_index(n->values, k);

            g_string_append(out, k ? ", " : "");
            json_string(out, g_ptr_array_index(n->keys, k));
            g_string_append(out, ": ");
            if (is_json_number(v) || !strcmp(v, "true") ||
                !strcmp(v, "false")) {
                g_string_append(out, v);
            } else {
                json_string(out, v);
            }
        }
        g_string_append(out, "}");
    }
    if (i + 1 < chain->len) {
        g_string_append(out, ", \"backing-image\": ");
        info_json_node(out, chain, i + 1);
    }
    g_string_append(out, "}");
}

static void info_human(GPtrArray *chain)
{
    unsigned i, k;

    for (i = 0; i < chain->len; i++) {
        BlockNodeInfo *n = g_ptr_array_index(chain, i);
        g_autofree char *vs =
            g_format_size_full(n->virtual_size, G_FORMAT_SIZE_IEC_UNITS);
        const char *indent = i ? "  " : "";

        if (i) {
            printf("\nbacking image %u:\n", i);
        }
        printf("%simage: %s\n", indent, n->filename);
        printf("%sformat: %s\n", indent, n->format);
        printf("%svirtual size: %s (%" PRId64 " bytes)\n", indent, vs,
               n->virtual_size);
        if (n->allocated_bytes >= 0) {
            g_autofree char *as =
                g_format_size_full(n->allocated_bytes, G_FORMAT_SIZE_IEC_UNITS);

            printf("%sdisk size: %s\n", indent, as);
        }
        for (k = 0; k < n->keys->len; k++) {
            printf("%s%s: %s\n", indent, (char *)g_ptr_array_index(n->keys, k),
                   (char *)g_ptr_array_index(n->values, k));
        }
        if (n->backing_file) {
            printf("%sbacking file: %s", indent, n->backing_file);
            if (n->backing_format) {
                printf(" (format: %s)", n->backing_format);
            }
            printf("\n");
        }
    }
}

static int cmd_info(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"json", no_argument, NULL, 'j'},
        {"format", required_argument, NULL, 'F'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    BlockBackendOptions opts;
    g_autofree char *cwd = g_get_current_dir();
    const char *format = NULL;
    GError *err = NULL;
    BlockBackend *blk;
    AioContext *ctx;
    GPtrArray *chain;
    bool json = false;
    int c;

    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "+:jF:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'j':
            json = true;
            break;
        case 'F':
            format = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            return bad_option(argv[0], longopts, c, argv);
        }
    }
    if (argc - optind != 1) {
        log_error("info needs one IMAGE (try 'imgfs --help')");
        return 2;
    }

    blk_options_init(&opts);
    if (blk_options_set(&opts, "file", argv[optind], &err) < 0 ||
        (format && blk_options_set(&opts, "format", format, &err) < 0) ||
        blk_options_set(&opts, "read-only", "on", &err) < 0 ||
        !blk_options_check(&opts, &err)) {
        log_error("%s", err ? err->message : "bad arguments");
        g_clear_error(&err);
        blk_options_clear(&opts);
        return 1;
    }
    {
        char *abs = blk_resolve_filename(opts.file, cwd);

        g_free(opts.file);
        opts.file = abs;
    }
    ctx = aio_context_new("info", &err);
    blk = ctx ? blk_open(argv[optind], &opts, ctx, &err) : NULL;
    blk_options_clear(&opts);
    if (!blk) {
        log_error("%s", err->message);
        g_error_free(err);
        aio_context_free(ctx);
        return 1;
    }
    chain = blk_query_chain(blk);
    if (json) {
        g_autoptr(GString) out = g_string_new(NULL);

        info_json_node(out, chain, 0);
        printf("%s\n", out->str);
    } else {
        info_human(chain);
    }
    g_ptr_array_unref(chain);
    blk_close(blk);
    aio_context_free(ctx);
    thread_pool_shutdown();
    return 0;
}

/* The control socket of a mount: what its root says, or the default. */
static char *control_path_of(const char *mountpoint)
{
    char buf[4096];
    ssize_t n = lgetxattr(mountpoint, IFS_CONTROL_XATTR, buf, sizeof(buf) - 1);

    if (n > 0) {
        buf[n] = '\0';
        return g_strdup(buf);
    }
    return ifs_control_default_path(mountpoint);
}

/* Send @request to the daemon of @mountpoint; its "return" or NULL. */
static JsonValue *control_request(const char *mountpoint, const char *request,
                                  JsonValue **reply)
{
    g_autofree char *path = control_path_of(mountpoint);
    g_autofree char *line = NULL;
    GError *err = NULL;
    JsonValue *r, *ret;

    line = ifs_control_call(path, request, &err);
    if (!line) {
        log_error("%s: %s (is imgfs mounted there?)", mountpoint, err->message);
        g_error_free(err);
        return NULL;
    }
    r = json_parse(line, &err);
    if (!r) {
        log_error("%s: bad answer from imgfs: %s", mountpoint, err->message);
        g_error_free(err);
        return NULL;
    }
    if (json_get_str(r, "error", NULL)) {
        log_error("%s", json_get_str(r, "error", NULL));
        json_free(r);
        return NULL;
    }
    ret = json_get(r, "return");
    if (!ret) {
        log_error("%s: bad answer from imgfs", mountpoint);
        json_free(r);
        return NULL;
    }
    *reply = r;
    return ret;
}

static char *human_size(double bytes)
{
    return g_format_size_full((guint64)bytes, G_FORMAT_SIZE_IEC_UNITS);
}

static void status_print_drive(JsonValue *d)
{
    JsonValue *opts = json_get(d, "options");
    JsonValue *stats = json_get(d, "stats");
    JsonValue *chain = json_get(d, "chain");
    JsonValue *thr = json_get(opts, "throttling");
    g_autofree char *size = human_size(json_get_num(d, "size", 0));
    static const char *const kinds[] = {"read", "write", "flush", "discard"};
    unsigned i;

    printf("%-16s %-8s %10s  %s\n", json_get_str(d, "name", "?"),
           json_get_str(d, "state", "?"), size,
           json_get_bool(opts, "read-only", false) ? "read-only"
                                                   : "read-write");
    if (json_get_str(d, "stop-reason", NULL)) {
        printf("  stopped by:  %s (resume with 'imgfs resume')\n",
               json_get_str(d, "stop-reason", NULL));
    }
    for (i = 0; chain && i < chain->items->len; i++) {
        JsonValue *n = g_ptr_array_index(chain->items, i);

        printf("  %-11s  %s (%s)\n",
               i ? "backing:" : "image:", json_get_str(n, "filename", "?"),
               json_get_str(n, "format", "?"));
    }
    printf(
        "  options:     cache.direct=%s cache.no-flush=%s write-cache=%s "
        "aio=%s detect-zeroes=%s discard=%s werror=%s rerror=%s "
        "locking=%s%s%s\n",
        json_get_bool(json_get(opts, "cache"), "direct", false) ? "on" : "off",
        json_get_bool(json_get(opts, "cache"), "no-flush", false) ? "on"
                                                                  : "off",
        json_get_bool(json_get(opts, "cache"), "writeback", true) ? "on"
                                                                  : "off",
        json_get_str(opts, "aio", "?"),
        json_get_str(opts, "detect-zeroes", "?"),
        json_get_str(opts, "discard", "?"), json_get_str(opts, "werror", "?"),
        json_get_str(opts, "rerror", "?"), json_get_str(opts, "locking", "?"),
        json_get_bool(opts, "snapshot", false) ? " snapshot=on" : "",
        json_get_bool(opts, "force-share", false) ? " force-share=on" : "");
    if (thr && thr->items->len) {
        g_autoptr(GString) t = g_string_new(NULL);

        json_write(thr, t);
        printf("  throttling:  %s\n", t->str);
    }
    for (i = 0; i < G_N_ELEMENTS(kinds); i++) {
        JsonValue *k = json_get(stats, kinds[i]);
        double ops = json_get_num(k, "ops", 0);
        double ns = json_get_num(k, "total-time-ns", 0);
        g_autofree char *bytes = human_size(json_get_num(k, "bytes", 0));

        printf("  %-8s     %.0f ops, %s, avg %.1f us, %.0f failed, %.0f "
               "invalid\n",
               kinds[i], ops, bytes, ops ? ns / ops / 1000 : 0,
               json_get_num(k, "failed", 0), json_get_num(k, "invalid", 0));
    }
}

static int cmd_status(int argc, char **argv)
{
    bool json = false;
    JsonValue *reply = NULL, *ret;
    int i, first = 1;

    for (i = 1; i < argc && argv[i][0] == '-'; i++, first++) {
        if (!strcmp(argv[i], "--json")) {
            json = true;
        } else {
            log_error("status: unknown option '%s'", argv[i]);
            return 2;
        }
    }
    if (argc - first != 1) {
        log_error("status needs MOUNTPOINT (try 'imgfs --help')");
        return 2;
    }
    ret = control_request(argv[first], "{\"command\": \"status\"}", &reply);
    if (!ret) {
        return 1;
    }
    if (json) {
        g_autoptr(GString) out = g_string_new(NULL);

        json_write(ret, out);
        printf("%s\n", out->str);
    } else {
        JsonValue *drives = json_get(ret, "drives");
        unsigned k;

        printf("mount point %s (config %s, pid %.0f, %.0f iothreads)\n",
               json_get_str(ret, "mountpoint", "?"),
               json_get_str(ret, "config", "?"), json_get_num(ret, "pid", 0),
               json_get_num(ret, "iothreads", 0));
        for (k = 0; drives && k < drives->items->len; k++) {
            printf("\n");
            status_print_drive(g_ptr_array_index(drives->items, k));
        }
    }
    json_free(reply);
    return 0;
}

static void print_name_list(const char *label, JsonValue *list)
{
    unsigned i;

    if (!list || !list->items->len) {
        return;
    }
    printf("%s:", label);
    for (i = 0; i < list->items->len; i++) {
        JsonValue *v = g_ptr_array_index(list->items, i);

        printf(" %s", v->type == JSON_STRING ? v->string : "?");
    }
    printf("\n");
}

static int cmd_resume(int argc, char **argv)
{
    g_autoptr(GString) req = g_string_new("{\"command\": \"resume\"");
    JsonValue *reply = NULL, *ret;

    if (argc < 2 || argc > 3) {
        log_error("resume needs MOUNTPOINT [DRIVE] (try 'imgfs --help')");
        return 2;
    }
    if (argc == 3) {
        g_string_append(req, ", \"drive\": ");
        json_append_string(req, argv[2]);
    }
    g_string_append(req, "}");
    ret = control_request(argv[1], req->str, &reply);
    if (!ret) {
        return 1;
    }
    if (json_get(ret, "resumed") && json_get(ret, "resumed")->items->len) {
        print_name_list("resumed", json_get(ret, "resumed"));
    } else {
        printf("no drive was stopped\n");
    }
    json_free(reply);
    return 0;
}

static int cmd_reload(int argc, char **argv)
{
    JsonValue *reply = NULL, *ret;
    JsonValue *busy;

    if (argc != 2) {
        log_error("reload needs MOUNTPOINT (try 'imgfs --help')");
        return 2;
    }
    ret = control_request(argv[1], "{\"command\": \"reload\"}", &reply);
    if (!ret) {
        return 1;
    }
    print_name_list("added", json_get(ret, "added"));
    print_name_list("removed", json_get(ret, "removed"));
    print_name_list("reopened", json_get(ret, "reopened"));
    busy = json_get(ret, "busy");
    print_name_list("busy (open by a program, not changed)", busy);
    print_name_list("unchanged", json_get(ret, "unchanged"));
    json_free(reply);
    return 0;
}

int main(int argc, char **argv)
{
    /*
     * Request buffers come and go by the thousand per second: keep freed
     * memory instead of returning it (madvise and page faults per
     * request otherwise), and serve the 1 MiB buffers from the heap.
     */
    mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);

    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
        version();
        return 0;
    }
    if (!strcmp(argv[1], "mount")) {
        return cmd_mount(argc - 1, argv + 1);
    }
    if (!strcmp(argv[1], "info")) {
        return cmd_info(argc - 1, argv + 1);
    }
    if (!strcmp(argv[1], "status")) {
        return cmd_status(argc - 1, argv + 1);
    }
    if (!strcmp(argv[1], "resume")) {
        return cmd_resume(argc - 1, argv + 1);
    }
    if (!strcmp(argv[1], "reload")) {
        return cmd_reload(argc - 1, argv + 1);
    }
    if (!strcmp(argv[1], "formats")) {
        g_autoptr(GString) s = g_string_new(NULL);

        blk_list_drivers(s);
        fputs(s->str, stdout);
        return 0;
    }
    log_error("unknown command '%s' (try 'imgfs --help')", argv[1]);
    return 2;
}
