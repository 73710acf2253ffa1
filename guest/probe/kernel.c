/* kernel.c - the CPL0 half of the probe: as little as possible.
 *
 * On the development hosts every CPL0 instruction is emulated (~1 us), so
 * CPL0 only fills in the TSS descriptor and the IDT, drops to CPL3, and then
 * serves ud2 requests (port I/O: serial output, debug exit, triple fault).
 * A CPU exception that is not a ud2 request is a failure: it is reported
 * with vector, error code, RIP, CS, RSP, CR2 and the probe exits with
 * EXIT_FAULT.
 */
#include "probe.h"
#include "virtio.h"
#include "smp.h"

struct __attribute__((packed)) tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
};

struct idt_entry {
	uint64_t lo, hi;
};

struct __attribute__((packed)) dtr {
	uint16_t limit;
	uint64_t base;
};

static struct tss64 tss;
static struct tss64 ap_tss[SMP_MAX_APS];
static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct dtr idtr;
static int in_fault;

volatile uint32_t ap_ticket;
char ap_kstacks[SMP_MAX_APS][AP_KSTACK_SIZE] __attribute__((aligned(16)));
struct cpuid_ids bsp_cpuid, ap_cpuid[SMP_MAX_APS];

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* 16550A with its FIFO enabled (FCR written once in kmain): wait for LSR.THRE
 * (transmit FIFO empty) once per 16 bytes, then write up to 16 bytes. */
static void serial_write(const char *s, size_t n)
{
	while (n) {
		size_t chunk = n < 16 ? n : 16;
		while (!(inb(UART_BASE + 5) & 0x20))
			;
		n -= chunk;
		while (chunk--)
			outb(UART_BASE, (uint8_t)*s++);
	}
}

static __attribute__((noreturn)) void debug_exit(uint8_t code)
{
	outb(DEBUG_EXIT, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static __attribute__((noreturn)) void triple_fault(void)
{
	static const struct dtr empty = { 0, 0 };
	__asm__ volatile("lidt %0; ud2" : : "m"(empty));
	for (;;)
		;
}

struct kbuf {
	char b[256];
	size_t n;
};

static void kput(void *ctx, char c)
{
	struct kbuf *k = ctx;
	if (k->n < sizeof(k->b))
		k->b[k->n++] = c;
}

static void kprintf(const char *f, ...)
{
	struct kbuf k;
	va_list ap;
	k.n = 0;
	va_start(ap, f);
	vfmt(kput, &k, f, ap);
	va_end(ap);
	serial_write(k.b, k.n);
}

static __attribute__((noreturn)) void fault(struct trap_frame *f, const char *what,
					    uint8_t code)
{
	uint64_t cr2;
	if (in_fault++)
		debug_exit(code);
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	/* Whatever CPL3 had buffered but not yet printed goes out first. */
	if (user_out_len <= USER_OUT_SIZE)
		serial_write(user_out, user_out_len);
	kprintf("\r\nprobe: fault %s vector=%lu error=0x%lx rip=0x%lx cs=0x%lx "
		"rsp=0x%lx cr2=0x%lx rax=0x%lx\r\n",
		what, f->vec, f->err, f->rip, f->cs, f->rsp, cr2, f->rax);
	kprintf("probe: result fail fault\r\n");
	debug_exit(code);
}

static int user_range_ok(uint64_t p, uint64_t n)
{
	uint64_t lo = (uint64_t)__image_start, hi = (uint64_t)__image_end;
	return p >= lo && p <= hi && n <= hi - p;
}

/* A device interrupt (vectors 32-255; IOAPIC/LAPIC set up by CPL3): for a
 * vector with a virtio device in irq_slots, read InterruptStatus, write
 * it to InterruptACK and read it again; then EOI. 0xff is the LAPIC's
 * spurious vector (no EOI). */
static void irq(uint64_t vec)
{
	struct irq_slot *s = &irq_slots[vec];
	if (vec == 0xff)
		return;
	if (s->base) {
		volatile uint32_t *r = (volatile uint32_t *)s->base;
		uint32_t isr = r[VIRTIO_MMIO_INTERRUPT_STATUS / 4];
		r[VIRTIO_MMIO_INTERRUPT_ACK / 4] = isr;
		s->isr = isr;
		s->isr_after = r[VIRTIO_MMIO_INTERRUPT_STATUS / 4];
	}
	s->count++;
	*(volatile uint32_t *)(LAPIC_BASE + 0xb0) = 0; /* EOI */
}

void trap(struct trap_frame *f)
{
	if (f->vec >= 32) {
		irq(f->vec);
		return;
	}
	if (f->vec == 6 && (f->cs & 3) == 3 && user_range_ok(f->rip, 2)) {
		const uint8_t *ip = (const uint8_t *)f->rip;
		if (ip[0] == 0x0f && ip[1] == 0x0b) {
			switch (f->rax) {
			case SYS_WRITE:
				if (!user_range_ok(f->rdi, f->rsi))
					fault(f, "syscall-bad-buffer", EXIT_BADSYS);
				serial_write((const char *)f->rdi, f->rsi);
				f->rax = 0;
				f->rip += 2;
				return;
			case SYS_EXIT:
				debug_exit((uint8_t)f->rdi);
			case SYS_TRIPLEFAULT:
				triple_fault();
			case SYS_HALT:
				for (;;) /* only NMI/INIT/SMI end a hlt with IF=0 */
					__asm__ volatile("cli; hlt");
			case SYS_IRQ:
				if (f->rdi) {
					outb(0x21, 0xff); /* mask both 8259s: only */
					outb(0xa1, 0xff); /* IOAPIC vectors arrive */
					f->rflags |= 0x200;
				} else {
					f->rflags &= ~0x200ULL;
				}
				f->rax = 0;
				f->rip += 2;
				return;
			default:
				fault(f, "syscall-bad-number", EXIT_BADSYS);
			}
		}
	}
	fault(f, "exception", EXIT_FAULT);
}

/* This CPU's TSS: t at GDT selector sel, CPL0 stack rsp0, no I/O bitmap. */
static void tss_load(struct tss64 *t, uint16_t sel, void *rsp0)
{
	uint64_t base = (uint64_t)t;
	t->rsp[0] = (uint64_t)rsp0;
	t->iomap_base = sizeof(*t);
	gdt[sel / 8] = (sizeof(*t) - 1) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
		       ((base >> 24 & 0xff) << 56);
	gdt[sel / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(sel));
}

/* An AP (from ap_start64, on the top of ap_kstacks[slot]): its own TSS (so
 * traps from its CPL3 land on its own stack), the shared IDT, then CPL3. */
void ap_kmain(uint32_t slot)
{
	tss_load(&ap_tss[slot], SEL_AP_TSS0 + 16 * slot, ap_kstacks[slot] + AP_KSTACK_SIZE);
	cpuid_ids_read(&ap_cpuid[slot]);
	__asm__ volatile("lidt %0" : : "m"(idtr));
	enter_user(ap_main, slot, 0, ap_ustacks[slot] + AP_USTACK_SIZE);
}

void kmain(void)
{
	uint64_t h = (uint64_t)isr_stubs;
	int i;

	tss_load(&tss, SEL_TSS, kstack_top);
	cpuid_ids_read(&bsp_cpuid); /* for the smp check */

	/* 64-bit interrupt gates, DPL 0 (so `int n` from CPL3 is a #GP). */
	for (i = 0; i < 256; i++, h += 16) {
		idt[i].lo = (h & 0xffff) | ((uint64_t)SEL_KCODE << 16) | (0x8eULL << 40) |
			    ((h >> 16 & 0xffff) << 48);
		idt[i].hi = h >> 32;
	}
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (uint64_t)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr));

	outb(UART_BASE + 2, 0x07); /* FCR: enable and clear the FIFOs */

	enter_user(user_main, boot_kind, boot_info_ptr, ustack_top);
}
