/* Platform definitions for lwIP on Linux/glibc (and other POSIX libcs) and on Windows, used by x2ssh's netstack. */
#ifndef X2SSH_ARCH_CC_H
#define X2SSH_ARCH_CC_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#ifdef _WIN32
/* No endian.h on Windows, and every Windows target (x86, x64, ARM, ARM64) is little-endian. lwIP's arch.h
 * has defined LITTLE_ENDIAN and BIG_ENDIAN before it includes this file. */
#define BYTE_ORDER LITTLE_ENDIAN
#else
#include <endian.h> /* BYTE_ORDER, LITTLE_ENDIAN, BIG_ENDIAN as lwIP expects them */
#endif

#define LWIP_NO_CTYPE_H 0
#define LWIP_ERRNO_STDINCLUDE 1

/* An lwIP assertion is a bug in the stack or in our glue: say where, loudly, then stop. Continuing would
 * corrupt state that every flow shares. */
void ns_platform_assert(const char *msg, int line, const char *file);
#define LWIP_PLATFORM_ASSERT(x) ns_platform_assert((x), __LINE__, __FILE__)
void ns_diag(const char *fmt, ...);
#define LWIP_PLATFORM_DIAG(x) do { ns_diag x; } while (0)

uint32_t ns_rand32(void);
#define LWIP_RAND() ns_rand32()

#endif /* X2SSH_ARCH_CC_H */
