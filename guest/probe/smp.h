/* smp.h - the smp check: application processors (APs) started by INIT-SIPI-SIPI.
 *
 * Shared by entry.S (the AP trampoline and 64-bit AP entry), kernel.c (the
 * CPL0 part of an AP's start: TSS, IDT, drop to CPL3, parking) and smp.c
 * (CPL3: the BSP's MP table scan, IPIs and checks; each AP's work).
 */
#ifndef SMP_H
#define SMP_H

#define SMP_MAX_CPUS   64     /* BSP included; ap_kstacks etc. are sized for it */
#define AP_TRAMP_ADDR  0x8000 /* trampoline page: SIPI vector 0x08 (0x08 << 12) */
#define AP_KSTACK_SIZE 4096   /* CPL0 stack per AP (traps, the ud2 requests) */
#define AP_USTACK_SIZE 4096   /* CPL3 stack per AP */
#define SEL_AP_TSS0    0x38   /* AP slot i's TSS descriptor: SEL_AP_TSS0 + 16 * i */

#ifndef __ASSEMBLER__
#include "probe.h"

#define SMP_MAX_APS (SMP_MAX_CPUS - 1)

/* A CPU's APIC ID as CPUID tells it: leaf 1 EBX[31:24] (initial APIC ID)
 * and leaf 0Bh EDX (x2APIC ID, -1 without leaf 0Bh). Read at CPL0: on
 * kvm_pvm hosts a CPL3 cpuid runs natively and reports the host's CPU. */
struct cpuid_ids {
	uint32_t initial;
	int32_t x2apic;
};

static inline void cpuid_ids_read(struct cpuid_ids *c)
{
	uint32_t a, b, cx, d;
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(cx), "=d"(d) : "a"(1), "c"(0));
	c->initial = b >> 24;
	c->x2apic = -1;
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(cx), "=d"(d) : "a"(0), "c"(0));
	if (a < 0xb)
		return;
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(cx), "=d"(d) : "a"(0xb), "c"(0));
	if (b) /* EBX = 0: leaf 0Bh not supported (SDM, CPUID) */
		c->x2apic = (int32_t)d;
}

/* kernel.c fills these at CPL0: the BSP's in kmain(), AP slot i's in ap_kmain(). */
extern struct cpuid_ids bsp_cpuid, ap_cpuid[SMP_MAX_APS];

/* entry.S: the trampoline (real mode -> protected mode -> long mode), copied
 * to AP_TRAMP_ADDR by the BSP; it continues at ap_start64 in the image. */
extern char ap_tramp[], ap_tramp_end[];

/* kernel.c: each AP takes a slot (lock xadd on ap_ticket, in arrival order),
 * runs on ap_kstacks[slot] at CPL0, loads its own TSS and the IDT and drops
 * to CPL3 at ap_main(slot). */
extern volatile uint32_t ap_ticket;
extern char ap_kstacks[SMP_MAX_APS][AP_KSTACK_SIZE];
void ap_kmain(uint32_t slot) __attribute__((noreturn));

/* smp.c (CPL3) */
extern char ap_ustacks[SMP_MAX_APS][AP_USTACK_SIZE];
void ap_main(uint32_t slot, uint64_t unused) __attribute__((noreturn));
void check_smp(const char *name);
/* probe.cpus=<n>; 1 if k is an smp option (then *bad says if its value is bad). */
int smp_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad);
#endif

#endif
