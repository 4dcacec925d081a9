/* Error codes and outcomes, their names and messages, the library's version,
 * and each thread's detail of its last failure. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

const char *idem_strerror(int err)
{
    switch (err) {
#define IDEM_ERROR_MSG_(name, value, msg) case IDEM_##name: return msg;
    IDEM_ERROR_MAP(IDEM_ERROR_MSG_)
#undef IDEM_ERROR_MSG_
    }
    return "unknown error";
}

const char *idem_error_name(int err)
{
    switch (err) {
#define IDEM_ERROR_NAME_(name, value, msg) case IDEM_##name: return "IDEM_" #name;
    IDEM_ERROR_MAP(IDEM_ERROR_NAME_)
#undef IDEM_ERROR_NAME_
    }
    return "IDEM_UNKNOWN";
}

const char *idem_outcome_name(int outcome)
{
    switch (outcome) {
    case 0: return "NONE";
#define IDEM_OUTCOME_NAME_(name, value) case IDEM_##name: return #name;
    IDEM_OUTCOME_MAP(IDEM_OUTCOME_NAME_)
#undef IDEM_OUTCOME_NAME_
    }
    return "UNKNOWN";
}

/* meson's project version, given by meson.build. */
const char *idem_version(void)
{
    return IDEM_VERSION_STRING;
}

/* A message is never truncated. A thread that cannot allocate one falls
 * back to the code's fixed message. */
static _Thread_local char  *last_msg;
static _Thread_local const char *last_static = "";

/* A thread's buffer is freed when the thread exits. */
static pthread_key_t  msg_key;
static pthread_once_t msg_key_once = PTHREAD_ONCE_INIT;

/* A destructor of the user's that runs after this one may still call in. */
static void msg_free(void *p)
{
    if (p == last_msg) {
        last_msg = NULL;
        last_static = "";
    }
    free(p);
}
static void msg_key_make(void) { (void)pthread_key_create(&msg_key, msg_free); }

const char *idem_last_error(void)
{
    return last_static ? last_static : last_msg;
}

int idem_error_setv(int err, const char *fmt, va_list ap)
{
    /* Format into a new buffer, so an argument may be the current message. */
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    char *msg = n < 0 ? NULL : malloc((size_t)n + 1);
    if (!msg) {
        last_static = idem_strerror(err);
        return err;
    }
    vsnprintf(msg, (size_t)n + 1, fmt, ap);
    free(last_msg);
    last_msg = msg;
    (void)pthread_once(&msg_key_once, msg_key_make);
    (void)pthread_setspecific(msg_key, last_msg);
    last_static = NULL;
    return err;
}

int idem_error_set(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    idem_error_setv(err, fmt, ap);
    va_end(ap);
    return err;
}

void idem__error_clear(void)
{
    last_static = "";
}
