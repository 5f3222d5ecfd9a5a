/*
 * Logging for the daemon and the block layer.  Messages are single lines
 * prefixed with "imgfs: ".  Before the daemon detaches they go to stderr;
 * a daemonized imgfs sends them to syslog instead.  Safe to call from any
 * thread; each message is written with one write so lines never interleave.
 */
#ifndef BLOCKCORE_LOG_H
#define BLOCKCORE_LOG_H

#include <stdarg.h>
#include <stdbool.h>

typedef enum LogLevel {
    LOG_LEVEL_ERROR,
    LOG_LEVEL_WARNING,
    LOG_LEVEL_INFO,
    LOG_LEVEL_DEBUG,
} LogLevel;

void log_msg(LogLevel level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void log_msgv(LogLevel level, const char *fmt, va_list ap);

#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warning(...) log_msg(LOG_LEVEL_WARNING, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

/* Route messages of @level and less important ones to syslog, the rest to
 * stderr: LOG_LEVEL_ERROR once daemonized (all to syslog), LOG_LEVEL_DEBUG
 * + 1 (the default) all to stderr. */
void log_syslog_from_level(int level);
/* Messages above @level are dropped.  The default is LOG_LEVEL_INFO. */
void log_set_level(LogLevel level);
bool log_level_enabled(LogLevel level);

#endif /* BLOCKCORE_LOG_H */
