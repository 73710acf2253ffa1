/*
 * What the freestanding /init programs (check-init.c, vsock-test.c) share:
 * fixed-width types, a raw x86-64 system call, and the two functions gcc may
 * call even with -ffreestanding. No libc: each system call is expensive on
 * hosts whose KVM emulates guest kernel code (REFERENCE.md §1).
 */
#ifndef MINIVMM_FREESTANDING_H
#define MINIVMM_FREESTANDING_H

typedef unsigned long size_t;
typedef long ssize_t;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

/* gcc may emit calls to these even when freestanding. */
void *memset(void *d, int c, size_t n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

#endif
