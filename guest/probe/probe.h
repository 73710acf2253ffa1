/* probe.h - shared definitions of the probe guest (CPL0 and CPL3 halves).
 *
 * The probe runs its set-up and its port I/O at CPL0 (kernel.c, entry.S) and
 * everything else at CPL3 (user.c, virtio.c). CPL3 code asks CPL0 for port
 * I/O with a "syscall": a `ud2` with the request number in RAX and arguments
 * in RDI/RSI (see sys() below). All memory is identity mapped and
 * user-accessible, so both halves share globals.
 */
#ifndef PROBE_H
#define PROBE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* How we were entered (boot_kind). */
#define BOOT_PVH     1 /* Xen PVH: 32-bit entry, EBX = hvm_start_info */
#define BOOT_LINUX64 2 /* Linux 64-bit boot protocol: RSI = boot_params */

/* GDT selectors (entry.S lays out the GDT in this order). */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* 0x18 | RPL 3 */
#define SEL_UCODE 0x23 /* 0x20 | RPL 3 */
#define SEL_TSS   0x28

/* ud2 "syscalls": RAX = number, RDI/RSI = arguments, RAX = result. */
#define SYS_WRITE       1 /* (buf, len): bytes to the 8250 at 0x3f8 */
#define SYS_EXIT        2 /* (code): write code to debug-exit port 0x501 */
#define SYS_TRIPLEFAULT 3 /* (): empty IDT + ud2 at CPL0: triple fault */
#define SYS_IRQ         4 /* (on): on=1: mask the 8259s, set RFLAGS.IF of the
			     CPL3 caller; on=0: clear it */
#define SYS_HALT        5 /* (): cli; hlt forever (how an AP parks) */

/* Debug-exit codes other than the number of failed checks (1..100). */
#define EXIT_MAX_FAILED 100
#define EXIT_FAULT      125 /* a CPU exception the probe did not ask for */
#define EXIT_BADSYS     126 /* a malformed ud2 request */

/* Hardware addresses. */
#define UART_BASE  0x3f8
#define DEBUG_EXIT 0x501

/* The probe maps (identity, 2 MiB pages, user-accessible) this much. */
#define MAPPED_LIMIT 0x100000000ULL

/* Register frame built by the exception stubs in entry.S. */
struct trap_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vec, err;               /* pushed by the stub */
	uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

/* entry.S */
extern uint32_t boot_kind;
extern uint64_t boot_info_ptr;
extern uint64_t boot_tsc;
extern uint64_t gdt[];
extern char isr_stubs[];    /* 256 stubs, 16 bytes apart */
extern char kstack_top[];
extern char ustack_top[];
extern char __image_start[], __image_end[];
void enter_user(void (*entry)(uint32_t, uint64_t), uint32_t a0, uint64_t a1,
		void *stack) __attribute__((noreturn));

/* kernel.c (CPL0) */
void kmain(void) __attribute__((noreturn));
void trap(struct trap_frame *f);

/* user.c (CPL3) */
void user_main(uint32_t kind, uint64_t info) __attribute__((noreturn));
#define USER_OUT_SIZE 4096
extern char user_out[USER_OUT_SIZE];
extern volatile size_t user_out_len; /* flushed by CPL0 on a fault */

/* user.c: output and check reporting, for checks (CPL3 only). A check
 * prints exactly one "probe: check <name> ok|FAIL ..." line. */
void out(const char *f, ...) __attribute__((format(printf, 1, 2)));
void out_flush(void);
void check_ok(const char *name, const char *f, ...) __attribute__((format(printf, 2, 3)));
void check_fail(const char *name, const char *f, ...) __attribute__((format(printf, 2, 3)));
/* 1 if [addr, addr + len) lies inside one usable range of the memory map. */
int mem_usable(uint64_t addr, uint64_t len);

/* lib.c (both) */
typedef void (*putc_fn)(void *ctx, char c);
void vfmt(putc_fn put, void *ctx, const char *f, va_list ap);
size_t strlen(const char *s);
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
int str_eq_n(const char *a, size_t alen, const char *b);
int parse_size(const char *s, size_t len, uint64_t *out);

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* CPL3 -> CPL0 request. Every register but RAX is preserved by the handler. */
static inline long sys(long nr, long a0, long a1)
{
	long ret;
	__asm__ volatile("ud2" : "=a"(ret) : "a"(nr), "D"(a0), "S"(a1) : "memory");
	return ret;
}

#endif
