/*
 * Per-drive I/O statistics: counts, bytes and total time per kind of
 * request, failed and invalid requests, a latency histogram, and averages
 * over configurable time windows (stats-intervals).
 *
 * Thread model: updated by the drive's event loop only; readers take a
 * copy through block_stats_snapshot() run in that loop.
 */
#ifndef BLOCKCORE_STATS_H
#define BLOCKCORE_STATS_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

typedef enum BlockAcctType {
    BLOCK_ACCT_READ,
    BLOCK_ACCT_WRITE,
    BLOCK_ACCT_FLUSH,
    BLOCK_ACCT_DISCARD, /* punch hole / write zeroes */
    BLOCK_ACCT_MAX,
} BlockAcctType;

/* Latency histogram bins: < 10us, < 100us, < 1ms, < 10ms, < 100ms, < 1s,
 * >= 1s. */
#define BLOCK_HIST_BINS 7

typedef struct BlockWindowStats {
    uint64_t ops;
    uint64_t bytes;
    uint64_t total_ns;
    uint64_t min_ns;
    uint64_t max_ns;
} BlockWindowStats;

typedef struct BlockInterval {
    unsigned seconds;
    int64_t window_start_ns;
    BlockWindowStats cur[BLOCK_ACCT_MAX];
    BlockWindowStats last[BLOCK_ACCT_MAX]; /* the last complete window */
    bool have_last;
} BlockInterval;

typedef struct BlockStats {
    bool account_invalid;
    bool account_failed;
    uint64_t ops[BLOCK_ACCT_MAX];
    uint64_t bytes[BLOCK_ACCT_MAX];
    uint64_t total_ns[BLOCK_ACCT_MAX];
    uint64_t failed[BLOCK_ACCT_MAX];
    uint64_t invalid[BLOCK_ACCT_MAX];
    uint64_t histogram[BLOCK_ACCT_MAX][BLOCK_HIST_BINS];
    int64_t last_access_ns; /* CLOCK_MONOTONIC, 0: never */
    unsigned nintervals;
    BlockInterval *intervals;
} BlockStats;

extern const char *const block_acct_names[BLOCK_ACCT_MAX];
extern const char *const block_hist_bin_names[BLOCK_HIST_BINS];

void block_stats_init(BlockStats *s, bool account_invalid, bool account_failed,
                      const unsigned *intervals, unsigned nintervals);
void block_stats_clear(BlockStats *s);
/* A request of @type finished after @latency_ns with result @ret (0,
 * -EINVAL for an invalid request, other -errno for a failure). */
void block_stats_account(BlockStats *s, BlockAcctType type, uint64_t bytes,
                         int64_t latency_ns, int ret);
/* A deep copy (intervals included) for readers on other threads. */
void block_stats_copy(BlockStats *dst, const BlockStats *src);
/* Append the statistics as a JSON object. */
void block_stats_to_json(const BlockStats *s, GString *out);

/* Parse "60,3600" into seconds; false if malformed. */
bool block_stats_parse_intervals(const char *s, unsigned **out, unsigned *n);

#endif /* BLOCKCORE_STATS_H */
