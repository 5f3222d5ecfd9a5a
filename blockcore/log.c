/*
 * Logging sink: one formatted line per call, to stderr or syslog.  The
 * line is built in a local buffer and written with a single write(2), so
 * messages from different threads never interleave mid-line.
 */
#include "log.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

static void log_open_syslog(void)
{
    openlog("imgfs", LOG_PID, LOG_DAEMON);
}

/* messages of this level and less important go to syslog */
static int log_syslog_from = LOG_LEVEL_DEBUG + 1; /* atomic */
static LogLevel log_max_level = LOG_LEVEL_INFO;

void log_syslog_from_level(int level)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;

    if (level <= LOG_LEVEL_DEBUG) {
        pthread_once(&once, log_open_syslog);
    }
    __atomic_store_n(&log_syslog_from, level, __ATOMIC_RELEASE);
}

void log_set_level(LogLevel level)
{
    log_max_level = level;
}

bool log_level_enabled(LogLevel level)
{
    return level <= log_max_level;
}

void log_msgv(LogLevel level, const char *fmt, va_list ap)
{
    static const int syslog_prio[] = {
        [LOG_LEVEL_ERROR] = LOG_ERR,
        [LOG_LEVEL_WARNING] = LOG_WARNING,
        [LOG_LEVEL_INFO] = LOG_INFO,
        [LOG_LEVEL_DEBUG] = LOG_DEBUG,
    };
    char line[1024];
    int n;

    if (!log_level_enabled(level)) {
        return;
    }
    if ((int)level >= __atomic_load_n(&log_syslog_from, __ATOMIC_ACQUIRE)) {
        vsyslog(syslog_prio[level], fmt, ap);
        return;
    }
    n = snprintf(line, sizeof(line), "imgfs: ");
    n += vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
    if (n > (int)sizeof(line) - 2) {
        n = sizeof(line) - 2;
    }
    line[n++] = '\n';
    if (write(STDERR_FILENO, line, n) < 0) {
        /* nowhere left to report it */
    }
}

void log_msg(LogLevel level, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    log_msgv(level, fmt, ap);
    va_end(ap);
}
