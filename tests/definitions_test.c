/* Prints every shared number as the C side sees it (provider/definitions.h through wire.h),
 * one "GROUP NAME value" line each, and each status with wire_status_name(). */
#include <stdio.h>

#include "wire.h"

#define PRINT(group) \
    static void print_##group(const char *name, unsigned long value) \
    { \
        printf(#group " %s %lu\n", name, value); \
    }
PRINT(OPCODE)
PRINT(STATUS)
PRINT(KEY_SOURCE)
PRINT(KEY_TYPE)
PRINT(SCHEME)
PRINT(HASH)
PRINT(CURVE)
PRINT(USAGE)
PRINT(PADDING)
PRINT(DECRYPT_FLAG)

int main(void)
{
#define X_OPCODE(n, v) print_OPCODE(#n, v);
#define X_STATUS(n, v) print_STATUS(#n, v);
#define X_KEY_SOURCE(n, v) print_KEY_SOURCE(#n, v);
#define X_KEY_TYPE(n, v) print_KEY_TYPE(#n, v);
#define X_SCHEME(n, v) print_SCHEME(#n, v);
#define X_HASH(n, v) print_HASH(#n, v);
#define X_CURVE(n, v) print_CURVE(#n, v);
#define X_USAGE(n, v) print_USAGE(#n, v);
#define X_PADDING(n, v) print_PADDING(#n, v);
#define X_DECRYPT_FLAG(n, v) print_DECRYPT_FLAG(#n, v);
#define X_STATUS_NAME(n, v) printf("NAME %d %s\n", v, wire_status_name(WIRE_STATUS_##n));
    WIRE_OPCODE_LIST(X_OPCODE)
    WIRE_STATUS_LIST(X_STATUS)
    WIRE_KEY_SOURCE_LIST(X_KEY_SOURCE)
    WIRE_KEY_TYPE_LIST(X_KEY_TYPE)
    WIRE_SCHEME_LIST(X_SCHEME)
    WIRE_HASH_LIST(X_HASH)
    WIRE_CURVE_LIST(X_CURVE)
    WIRE_USAGE_LIST(X_USAGE)
    WIRE_PADDING_LIST(X_PADDING)
    WIRE_DECRYPT_FLAG_LIST(X_DECRYPT_FLAG)
    WIRE_STATUS_LIST(X_STATUS_NAME)
#define X_CONSTANT(n) printf("CONST " #n " %lu\n", (unsigned long)WIRE_##n);
    WIRE_CONSTANT_LIST(X_CONSTANT)
    return 0;
}
