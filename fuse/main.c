/*
 * The imgfs command line: "mount" (the daemon), "info" (what an image is
 * before mounting it), "formats", --help and --version.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ifs.h"
#include "blockcore/log.h"
#include "blockcore/thread-pool.h"

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: imgfs mount [-f] [-o FUSE_OPTIONS] CONFIG MOUNTPOINT\n"
            "       imgfs info [--json] [--format FORMAT] IMAGE\n"
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
#ifndef CONFIG_RBD
    printf("rbd: not built (librbd was not found at build time)\n");
#endif
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
    while ((c = getopt_long(argc, argv, "+fo:h", longopts, NULL)) != -1) {
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
            fprintf(stderr, "Try 'imgfs --help'.\n");
            return 2;
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
    status = ifs_mount_main(cfg, argv[optind + 1], foreground,
                            (char **)fuse_opts->pdata);
    ifs_config_free(cfg);
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
    while ((c = getopt_long(argc, argv, "+jF:h", longopts, NULL)) != -1) {
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
            fprintf(stderr, "Try 'imgfs --help'.\n");
            return 2;
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

int main(int argc, char **argv)
{
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
    if (!strcmp(argv[1], "formats")) {
        g_autoptr(GString) s = g_string_new(NULL);

        blk_list_drivers(s);
        fputs(s->str, stdout);
        return 0;
    }
    log_error("unknown command '%s' (try 'imgfs --help')", argv[1]);
    return 2;
}
