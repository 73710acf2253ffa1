/* entry.S - entry points, GDT, page tables, exception stubs, CPL3 entry.
 *
 * Two ways in, one way on:
 *   _start32  Xen PVH (ELF note XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected
 *             mode, paging off, EBX = physical address of hvm_start_info.
 *   _start64  ELF e_entry, Linux 64-bit boot protocol: long mode, the VMM's
 *             identity page tables, RSI = physical address of boot_params.
 * Both load the probe's own GDT and page tables (static, below: no CPL0 loop
 * builds them, since CPL0 code is emulated at ~1 us per instruction on the
 * development hosts) and continue at long_common, which calls kmain().
 *
 * Application processors (the smp check, smp.c) come in through ap_tramp,
 * copied below 1 MiB, and continue at ap_start64 (below).
 */
#include "smp.h"

#define PTE_P   0x001
#define PTE_W   0x002
#define PTE_U   0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS  0x080

	/* Xen PVH entry note (name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY). */
	.section .note.Xen, "a"
	.p2align 2
	.long 4
	.long 4
	.long 18
	.asciz "Xen"
	.long _start32

	.section .text.boot, "ax"
	.code32
	.globl _start32
_start32:
	cli
	movl %ebx, boot_info_ptr
	movl $1, boot_kind              /* BOOT_PVH */
	rdtsc
	movl %eax, boot_tsc
	movl %edx, boot_tsc + 4
	lgdt gdt_desc                   /* 32-bit form: low 4 bytes of the base */
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0x20, %eax                /* CR4.PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx          /* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl $0x80000011, %eax          /* CR0.PG | CR0.ET | CR0.PE */
	movl %eax, %cr0
	ljmp $0x08, $long_common

	.code64
	.globl _start64
_start64:
	cli
	movq %rsi, boot_info_ptr(%rip)
	movl $2, boot_kind(%rip)        /* BOOT_LINUX64 */
	rdtsc
	movl %eax, boot_tsc(%rip)
	movl %edx, boot_tsc + 4(%rip)
	leaq kstack_top(%rip), %rsp
	lgdt gdt_desc(%rip)
	movq $pml4, %rax
	movq %rax, %cr3
	movq %cr4, %rax                 /* keep PAE; drop SMEP/SMAP/PKE (CPL0 */
	andq $~0x700004, %rax           /* touches user pages) and TSD (rdtsc */
					/* at CPL3); keep the rest */
	orq $0x20, %rax
	movq %rax, %cr4
	pushq $0x08
	leaq long_common(%rip), %rax
	pushq %rax
	lretq

long_common:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movq $kstack_top, %rsp
	call kmain
1:	hlt
	jmp 1b

/* An AP, in long mode on the trampoline's GDT (CS = its 64-bit code at 0x18).
 * Loads the probe's GDT, takes a slot (arrival order: the BSP may start
 * several APs at once, and only the AP knows when it has arrived), moves to
 * that slot's CPL0 stack and calls ap_kmain(slot) with CS = 0x08. An AP
 * beyond SMP_MAX_APS has no stack: it parks (the BSP sees the ticket count). */
	.globl ap_start64
ap_start64:
	lgdt gdt_desc(%rip)
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movl $1, %edi
	lock xaddl %edi, ap_ticket(%rip)
	cmpl $SMP_MAX_CPUS - 1, %edi
	jae ap_park
	leal 1(%edi), %eax
	imulq $AP_KSTACK_SIZE, %rax, %rax
	leaq ap_kstacks(%rip), %rsp
	addq %rax, %rsp                 /* top of ap_kstacks[slot] */
	pushq $0x08
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:	call ap_kmain
ap_park:
	cli
	hlt
	jmp ap_park

/* enter_user(entry, a0, a1, stack): iretq to CPL3 at entry(a0, a1), IF=0. */
	.globl enter_user
enter_user:
	pushq $0x1b                     /* SS: user data | 3 */
	pushq %rcx                      /* RSP */
	pushq $0x2                      /* RFLAGS: IF=0, IOPL=0 */
	pushq $0x23                     /* CS: user code | 3 */
	pushq %rdi                      /* RIP */
	movq %rsi, %rdi
	movq %rdx, %rsi
	iretq

/* Stubs for vectors 0-255 (exceptions 0-31, interrupts 32-255), 16 bytes
 * apart: push a dummy error code where the CPU pushes none, push the
 * vector, go to trap_common. */
	.p2align 4
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.p2align 4
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp trap_common
	.set vec, vec + 1
	.endr

trap_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	call trap
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq

	.data
	.p2align 3
	.globl boot_kind, boot_info_ptr, boot_tsc
boot_info_ptr:	.quad 0
boot_tsc:	.quad 0
boot_kind:	.long 0

	.p2align 4
	.globl gdt
gdt:
	.quad 0                         /* 0x00 null */
	.quad 0x00af9b000000ffff        /* 0x08 kernel code, 64-bit */
	.quad 0x00cf93000000ffff        /* 0x10 kernel data */
	.quad 0x00cff3000000ffff        /* 0x18 user data, DPL 3 */
	.quad 0x00affb000000ffff        /* 0x20 user code, 64-bit, DPL 3 */
	.quad 0, 0                      /* 0x28 TSS, filled in by kmain() */
	.fill 2 * (SMP_MAX_CPUS - 1), 8, 0 /* 0x38 + 16 * i: AP slot i's TSS (ap_kmain) */
gdt_end:
	.p2align 3
	.word 0, 0, 0
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

/* The AP trampoline. The BSP copies ap_tramp..ap_tramp_end to AP_TRAMP_ADDR
 * and sends SIPI vector AP_TRAMP_ADDR >> 12: the AP starts in real mode at
 * CS:IP = 0x0800:0000 with CR0.CD/NW set. The code runs at that copy, so it
 * names its own bytes as TR(symbol), their address there; DS = 0 makes those
 * addresses usable as 16-bit offsets. Real mode -> 32-bit protected mode on
 * the trampoline's own flat GDT -> PAE, the probe's page tables, EFER.LME,
 * CR0.PG (CD/NW cleared) -> far jump to the 64-bit ap_start64 in the image. */
#define TR(sym) (AP_TRAMP_ADDR + ((sym) - ap_tramp))
	.section .rodata
	.p2align 4
	.globl ap_tramp, ap_tramp_end
	.code16
ap_tramp:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	lgdtl TR(tramp_gdt_desc)
	movl %cr0, %eax
	orl $1, %eax                    /* CR0.PE */
	movl %eax, %cr0
	ljmpl $0x08, $TR(tramp32)

	.code32
tramp32:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0x20, %eax                /* CR4.PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx          /* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl $0x80000011, %eax          /* CR0.PG | CR0.ET | CR0.PE; CD, NW off */
	movl %eax, %cr0
	ljmp $0x18, $ap_start64

	.p2align 3
tramp_gdt:
	.quad 0                         /* 0x00 null */
	.quad 0x00cf9b000000ffff        /* 0x08 code, 32-bit, flat */
	.quad 0x00cf93000000ffff        /* 0x10 data, flat */
	.quad 0x00af9b000000ffff        /* 0x18 code, 64-bit */
tramp_gdt_end:
tramp_gdt_desc:
	.word tramp_gdt_end - tramp_gdt - 1
	.long TR(tramp_gdt)
ap_tramp_end:
	.code64

/* Identity map of the first 4 GiB with 2 MiB pages, every level user-
 * accessible so CPL3 code reaches the image, its buffers, boot data and the
 * MMIO window; the top GiB (0xC0000000-0xFFFFFFFF) is uncached. */
	.section .data.pagetables, "aw"
	.p2align 12
	.globl pml4
pml4:
	.quad pdpt + (PTE_P | PTE_W | PTE_U)
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + (PTE_P | PTE_W | PTE_U)
	.quad pd + 0x1000 + (PTE_P | PTE_W | PTE_U)
	.quad pd + 0x2000 + (PTE_P | PTE_W | PTE_U)
	.quad pd + 0x3000 + (PTE_P | PTE_W | PTE_U)
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 1536
	.quad (i << 21) | (PTE_P | PTE_W | PTE_U | PTE_PS)
	.set i, i + 1
	.endr
	.rept 512
	.quad (i << 21) | (PTE_P | PTE_W | PTE_U | PTE_PS | PTE_PCD | PTE_PWT)
	.set i, i + 1
	.endr

	.section .bss
	.p2align 12
kstack:	.skip 16384
	.globl kstack_top
kstack_top:
ustack:	.skip 32768
	.globl ustack_top
ustack_top:
