/* floor.c - the exit round-trip floor of this host: a one-instruction guest loop
 * run with nothing but KVM_RUN, from C.
 *
 * Usage: floor [N]   (default 20000 exits per case)
 * Output, one line per case:
 *   floor <case> n=<N> ns_per_exit=<ns> total_ns=<ns>
 *   floor tsc_khz=<KVM_GET_TSC_KHZ of the vCPU, 0 if unavailable>
 *
 * Cases (each a fresh VM with 2 MiB of RAM, 64-bit mode set up directly through
 * KVM_SET_SREGS: identity page tables with user-accessible 2 MiB pages, a GDT with
 * kernel and user segments and a 64-bit TSS (RSP0) loaded in TR, as a real guest
 * running user code has; no IDT, the loop never faults):
 *   cpl3_mmio  at CPL3: `mov [rbx], eax; jmp .-2`, RBX = 0xd0000000 (mapped in the
 *              page tables, no memory slot): every iteration is a KVM_EXIT_MMIO.
 *              This is what the probe's MMIO reads cost minus the VMM's own work,
 *              on hosts that run CPL3 natively and CPL0 in an emulator (kvm_pvm).
 *   cpl3_mmio_read  at CPL3: `mov eax, [rbx]; jmp .-2` (a read, like the probe's).
 *   cpl0_mmio  the write loop at CPL0.
 *   cpl0_pio   at CPL0: `out 0x10, al; jmp .-2` (port I/O at CPL3 raises #GP here).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x200000ULL
#define PML4 0x1000
#define PDPT 0x2000
#define GDT 0x4000
#define TSS 0x5000
#define CODE 0x10000
#define STACK 0x80000
#define PDS 0x6000 /* 4 page directories: the first 4 GiB */
#define MMIO_ADDR 0xd0000000ULL /* where minivmm puts its first virtio-mmio device */

static int kvm_fd;

static void die(const char *what)
{
	fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, uint8_t dpl, int code)
{
	memset(s, 0, sizeof(*s));
	s->selector = sel;
	s->limit = 0xffffffff;
	s->type = type;
	s->present = 1;
	s->dpl = dpl;
	s->s = 1;
	s->l = code;
	s->db = !code;
	s->g = 1;
}

/* One case: returns ns per exit, or -1 if the guest did something else. */
static double run_case(const char *name, const uint8_t *code, size_t code_len, int cpl,
		       uint32_t want_exit, long n, uint32_t *tsc_khz)
{
	int vm, vcpu, mmap_size;
	uint8_t *mem;
	struct kvm_run *run;
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	uint64_t *pml4, *pdpt, *pd, t0 = 0, t1;
	long i;
	int j, r;

	vm = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL); /* needed on VT-x, harmless elsewhere */
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	region = (struct kvm_userspace_memory_region){ 0, 0, 0, MEM_SIZE, (uint64_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	/* Identity map of the first 4 GiB, as the probe has it: 2 MiB pages, present,
	 * writable, user; 0xC0000000-0xFFFFFFFF uncached (PCD|PWT). */
	pml4 = (uint64_t *)(mem + PML4);
	pdpt = (uint64_t *)(mem + PDPT);
	pd = (uint64_t *)(mem + PDS);
	pml4[0] = PDPT | 7;
	for (j = 0; j < 4; j++)
		pdpt[j] = (PDS + 0x1000 * (uint64_t)j) | 7;
	for (j = 0; j < 2048; j++)
		pd[j] = ((uint64_t)j << 21) | 0x87 | (j >= 1536 ? 0x18 : 0);
	memcpy(mem + CODE, code, code_len);
	/* GDT: null, kernel code 0x08, kernel data 0x10, user data 0x18, user code 0x20,
	 * TSS 0x28 (16 bytes); TSS.RSP0 = STACK. */
	{
		uint64_t *g = (uint64_t *)(mem + GDT);
		uint64_t base = TSS, limit = 0x67;
		g[1] = 0x00af9b000000ffffULL;
		g[2] = 0x00cf93000000ffffULL;
		g[3] = 0x00cff3000000ffffULL;
		g[4] = 0x00affb000000ffffULL;
		g[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x8bULL << 40) |
		       (((base >> 24) & 0xff) << 56);
		g[6] = base >> 32;
		*(uint64_t *)(mem + TSS + 4) = STACK;
		*(uint16_t *)(mem + TSS + 0x66) = 0x68; /* no I/O bitmap */
	}

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap vcpu");
	if (tsc_khz) {
		r = ioctl(vcpu, KVM_GET_TSC_KHZ, 0);
		*tsc_khz = r > 0 ? (uint32_t)r : 0;
	}
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	seg(&sregs.cs, cpl ? 0x23 : 0x08, 0xb, (uint8_t)cpl, 1);
	seg(&sregs.ds, cpl ? 0x1b : 0x10, 0x3, (uint8_t)cpl, 0);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = GDT;
	sregs.gdt.limit = 7 * 8 - 1;
	memset(&sregs.tr, 0, sizeof(sregs.tr));
	sregs.tr.selector = 0x28;
	sregs.tr.base = TSS;
	sregs.tr.limit = 0x67;
	sregs.tr.type = 0xb;
	sregs.tr.present = 1;
	sregs.cr3 = PML4;
	sregs.cr4 = 1u << 5;                             /* PAE */
	sregs.cr0 = 1u | (1u << 4) | (1u << 31);         /* PE, ET, PG */
	sregs.efer = (1u << 8) | (1u << 10);             /* LME, LMA */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE;
	regs.rsp = STACK;
	regs.rbx = MMIO_ADDR;
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	/* Warm up, then time n round trips. */
	for (i = -1000; i < n; i++) {
		if (i == 0)
			t0 = now_ns();
		if (ioctl(vcpu, KVM_RUN, 0) < 0 && errno != EINTR)
			die("KVM_RUN");
		if (run->exit_reason != want_exit) {
			fprintf(stderr, "floor: %s: exit reason %u, want %u (after %ld)\n", name,
				run->exit_reason, want_exit, i);
			close(vcpu);
			close(vm);
			munmap(mem, MEM_SIZE);
			return -1;
		}
	}
	t1 = now_ns();
	printf("floor %s n=%ld ns_per_exit=%.1f total_ns=%llu\n", name, n,
	       (double)(t1 - t0) / (double)n, (unsigned long long)(t1 - t0));
	fflush(stdout);
	munmap(run, (size_t)mmap_size);
	close(vcpu);
	close(vm);
	munmap(mem, MEM_SIZE);
	return (double)(t1 - t0) / (double)n;
}

int main(int argc, char **argv)
{
	static const uint8_t mmio_loop[] = { 0x89, 0x03, 0xeb, 0xfc }; /* mov [rbx],eax; jmp */
	static const uint8_t mmio_read_loop[] = { 0x8b, 0x03, 0xeb, 0xfc }; /* mov eax,[rbx] */
	static const uint8_t pio_loop[] = { 0xe6, 0x10, 0xeb, 0xfc };  /* out 0x10,al; jmp */
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 20000;
	uint32_t khz = 0;
	int bad = 0;

	if (n <= 0) {
		fprintf(stderr, "floor: usage: floor [N>0]\n");
		return 2;
	}
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("/dev/kvm");
	bad |= run_case("cpl3_mmio", mmio_loop, sizeof(mmio_loop), 3, KVM_EXIT_MMIO, n, &khz) < 0;
	bad |= run_case("cpl3_mmio_read", mmio_read_loop, sizeof(mmio_read_loop), 3,
			KVM_EXIT_MMIO, n, NULL) < 0;
	bad |= run_case("cpl0_mmio", mmio_loop, sizeof(mmio_loop), 0, KVM_EXIT_MMIO, n, NULL) < 0;
	bad |= run_case("cpl0_pio", pio_loop, sizeof(pio_loop), 0, KVM_EXIT_IO, n, NULL) < 0;
	printf("floor tsc_khz=%u\n", khz);
	return bad;
}
