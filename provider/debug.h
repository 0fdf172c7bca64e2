/* Debug output (TPMBROKER_DEBUG=1 or `debug = 1`): one line per event on stderr. Depends
 * on nothing else in the provider, so the client and the provider both use it. */
#ifndef TPMBROKER_DEBUG_H
#define TPMBROKER_DEBUG_H

void tpmb_debug_enable(void);
int tpmb_debug_on(void);
void tpmb_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
