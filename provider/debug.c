/* Debug output; see debug.h. */
#include <stdarg.h>
#include <stdio.h>

#include "debug.h"

static int debug_enabled;

void tpmb_debug_enable(void)
{
    debug_enabled = 1;
}

int tpmb_debug_on(void)
{
    return debug_enabled;
}

void tpmb_debug(const char *fmt, ...)
{
    va_list ap;

    if (!debug_enabled)
        return;
    va_start(ap, fmt);
    fputs("tpmbroker: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
