/*
 * Statistics accounting.  Interval windows rotate lazily: every update
 * (and every snapshot) first closes the windows whose time is up, so no
 * timer is needed and an idle drive costs nothing.
 */
#include "stats.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "aio.h"

const char *const block_acct_names[BLOCK_ACCT_MAX] = {
    "read",
    "write",
    "flush",
    "discard",
};

const char *const block_hist_bin_names[BLOCK_HIST_BINS] = {
    "<10us", "<100us", "<1ms", "<10ms", "<100ms", "<1s", ">=1s",
};

static int block_hist_bin(int64_t ns)
{
    int64_t limit = 10000;
    int i;

    for (i = 0; i < BLOCK_HIST_BINS - 1; i++, limit *= 10) {
        if (ns < limit) {
            return i;
        }
    }
    return BLOCK_HIST_BINS - 1;
}

void block_stats_init(BlockStats *s, bool account_invalid, bool account_failed,
                      const unsigned *intervals, unsigned nintervals)
{
    int64_t now = aio_clock_ns();
    unsigned i;

    memset(s, 0, sizeof(*s));
    s->account_invalid = account_invalid;
    s->account_failed = account_failed;
    s->nintervals = nintervals;
    s->intervals = g_new0(BlockInterval, nintervals);
    for (i = 0; i < nintervals; i++) {
        s->intervals[i].seconds = intervals[i];
        s->intervals[i].window_start_ns = now;
    }
}

void block_stats_clear(BlockStats *s)
{
    g_free(s->intervals);
    s->intervals = NULL;
    s->nintervals = 0;
}

static void block_stats_rotate(BlockStats *s, int64_t now)
{
    unsigned i;

    for (i = 0; i < s->nintervals; i++) {
        BlockInterval *iv = &s->intervals[i];
        int64_t len = (int64_t)iv->seconds * 1000000000;

        if (now - iv->window_start_ns < len) {
            continue;
        }
        if (now - iv->window_start_ns >= 2 * len) {
            /* A whole window passed without requests. */
            memset(iv->last, 0, sizeof(iv->last));
        } else {
            memcpy(iv->last, iv->cur, sizeof(iv->last));
        }
        iv->have_last = true;
        memset(iv->cur, 0, sizeof(iv->cur));
        iv->window_start_ns += (now - iv->window_start_ns) / len * len;
    }
}

void block_stats_account(BlockStats *s, BlockAcctType type, uint64_t bytes,
                         int64_t latency_ns, int ret)
{
    int64_t now = aio_clock_ns();
    unsigned i;

    if (ret < 0) {
        bool invalid = ret == -EINVAL;

        if (invalid) {
            s->invalid[type]++;
            if (!s->account_invalid) {
                return;
            }
        } else {
            s->failed[type]++;
            if (!s->account_failed) {
                return;
            }
        }
        bytes = 0;
    } else {
        s->ops[type]++;
        s->bytes[type] += bytes;
    }
    if (latency_ns < 0) {
        latency_ns = 0;
    }
    s->total_ns[type] += latency_ns;
    s->histogram[type][block_hist_bin(latency_ns)]++;
    s->last_access_ns = now;

    block_stats_rotate(s, now);
    for (i = 0; i < s->nintervals; i++) {
        BlockWindowStats *w = &s->intervals[i].cur[type];

        if (!w->ops || (uint64_t)latency_ns < w->min_ns) {
            w->min_ns = latency_ns;
        }
        if ((uint64_t)latency_ns > w->max_ns) {
            w->max_ns = latency_ns;
        }
        w->ops++;
        w->bytes += bytes;
        w->total_ns += latency_ns;
    }
}

void block_stats_copy(BlockStats *dst, const BlockStats *src)
{
    *dst = *src;
    dst->intervals =
        g_memdup2(src->intervals, sizeof(BlockInterval) * src->nintervals);
    block_stats_rotate(dst, aio_clock_ns());
}

void block_stats_to_json(const BlockStats *s, GString *out)
{
    int64_t now = aio_clock_ns();
    unsigned i, t, b;

    g_string_append(out, "{");
    for (t = 0; t < BLOCK_ACCT_MAX; t++) {
        g_string_append_printf(
            out,
            "%s\"%s\": {\"ops\": %" PRIu64 ", \"bytes\": %" PRIu64
            ", \"total-time-ns\": %" PRIu64 ", \"failed\": %" PRIu64
            ", \"invalid\": %" PRIu64 ", \"histogram\": {",
            t ? ", " : "", block_acct_names[t], s->ops[t], s->bytes[t],
            s->total_ns[t], s->failed[t], s->invalid[t]);
        for (b = 0; b < BLOCK_HIST_BINS; b++) {
            g_string_append_printf(out, "%s\"%s\": %" PRIu64, b ? ", " : "",
                                   block_hist_bin_names[b], s->histogram[t][b]);
        }
        g_string_append(out, "}}");
    }
    g_string_append_printf(out, ", \"idle-time-ns\": %" PRId64,
                           s->last_access_ns ? now - s->last_access_ns : -1);
    g_string_append_printf(out, ", \"account-invalid\": %s",
                           s->account_invalid ? "true" : "false");
    g_string_append_printf(out, ", \"account-failed\": %s",
                           s->account_failed ? "true" : "false");
    g_string_append(out, ", \"intervals\": [");
    for (i = 0; i < s->nintervals; i++) {
        const BlockInterval *iv = &s->intervals[i];
        const BlockWindowStats *w = iv->have_last ? iv->last : iv->cur;
        double secs =
            iv->have_last ? iv->seconds : (now - iv->window_start_ns) / 1e9;

        if (secs <= 0) {
            secs = 1e-9;
        }
        g_string_append_printf(
            out, "%s{\"interval-seconds\": %u, \"complete\": %s", i ? ", " : "",
            iv->seconds, iv->have_last ? "true" : "false");
        for (t = 0; t < BLOCK_ACCT_MAX; t++) {
            g_string_append_printf(
                out,
                ", \"%s\": {\"ops\": %" PRIu64 ", \"bytes\": %" PRIu64
                ", \"ops-per-second\": %.3f, \"bytes-per-second\": %.1f"
                ", \"avg-latency-ns\": %" PRIu64
                ", \"min-latency-ns\": %" PRIu64
                ", \"max-latency-ns\": %" PRIu64 "}",
                block_acct_names[t], w[t].ops, w[t].bytes, w[t].ops / secs,
                w[t].bytes / secs, w[t].ops ? w[t].total_ns / w[t].ops : 0,
                w[t].min_ns, w[t].max_ns);
        }
        g_string_append(out, "}");
    }
    g_string_append(out, "]}");
}

bool block_stats_parse_intervals(const char *s, unsigned **out, unsigned *n)
{
    g_auto(GStrv) parts = g_strsplit(s, ",", -1);
    unsigned *v = g_new0(unsigned, g_strv_length(parts) + 1);
    unsigned i;

    for (i = 0; parts[i]; i++) {
        char *end;
        unsigned long x;

        g_strstrip(parts[i]);
        if (!g_ascii_isdigit(parts[i][0])) {
            g_free(v);
            return false;
        }
        x = strtoul(parts[i], &end, 10);
        if (*end || x == 0 || x > 7 * 24 * 3600) {
            g_free(v);
            return false;
        }
        v[i] = x;
    }
    *out = v;
    *n = i;
    return true;
}
