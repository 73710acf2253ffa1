/* smp.c - the smp check (CPL3): find the CPUs, start every AP, check them.
 *
 * The BSP (here, at CPL3) reads the MP table (Intel MultiProcessor
 * Specification 1.4, §4) for the CPUs' local APIC IDs, or, without one, takes
 * the count from probe.cpus=<n>. It copies the trampoline (entry.S) to
 * AP_TRAMP_ADDR and starts each AP with INIT, SIPI, SIPI (MP spec §B.4)
 * through the xAPIC's ICR, which CPL3 reaches like any MMIO (the probe maps
 * the LAPIC page user-accessible). Each AP runs ap_main() at CPL3: it reports
 * its APIC ID three ways (CPUID.1:EBX[31:24] and CPUID.0Bh:EDX, read at CPL0
 * on its way up, and the LAPIC ID register), computes a known value, adds to a shared counter with
 * locked instructions, reads the ID registers of every virtio-mmio device on
 * the command line (MMIO exits to the VMM, from that vCPU), publishes its
 * report with a release store and a lock-free arrival count, and parks. The
 * BSP waits (TSC-bounded) for all arrivals and checks everything.
 *
 * Parking: an AP asks CPL0 for `cli; hlt` (SYS_HALT). With the LAPIC in the
 * kernel (KVM's irqchip, QEMU), a hlt blocks the vCPU without an exit to the
 * VMM and nothing but INIT/NMI/SMI wakes it, so parked APs cost no host CPU
 * and cannot be disturbed by the interrupts later checks route to the BSP.
 * (A CPL3 `pause` loop would keep up to 63 vCPU threads spinning until the
 * VM ends; hlt cannot run at CPL3.)
 */
#include "probe.h"
#include "smp.h"
#include "virtio.h"

#define LAPIC(off) (*(volatile uint32_t *)(LAPIC_BASE + (off)))
#define LAPIC_ID      0x020
#define LAPIC_ICR_LO  0x300
#define LAPIC_ICR_HI  0x310
#define ICR_INIT      0x00004500u /* delivery mode INIT, level assert, edge */
#define ICR_SIPI      0x00004600u /* delivery mode start-up; | vector */
#define ICR_PENDING   0x00001000u /* delivery status: send pending */
#define ICR_ALL_BUT_SELF 0x000c0000u

/* Delays of the MP spec's start-up sequence (10 ms after INIT, 200 us after
 * each SIPI) in TSC cycles at 5 GHz: longer than needed at any lower rate. */
#define INIT_DELAY_TSC 50000000ULL
#define SIPI_DELAY_TSC 1000000ULL
#define ARRIVE_TIMEOUT_TSC 10000000000ULL /* seconds, even emulated */
#define ICR_TIMEOUT_TSC 100000000ULL
#define SURPLUS_WAIT_TSC 250000000ULL /* after a broadcast start: APs beyond N */

#define WORK_STEPS (1u << 20)
#define COUNTER_ADDS 100000u

struct ap_report {
	uint32_t cpl;       /* CS & 3 in ap_main */
	uint32_t cpuid_id;  /* CPUID.1:EBX[31:24] */
	uint32_t lapic_id;  /* LAPIC ID register [31:24] */
	int32_t x2apic_id;  /* CPUID.0Bh:EDX, -1 without leaf 0Bh */
	uint64_t work;      /* smp_work(lapic_id) */
	uint32_t mmio_reads, mmio_bad;
	uint64_t mmio_bad_base;
	uint32_t mmio_bad_val, mmio_bad_want;
	uint64_t cycles;    /* this AP's TSC across its work */
};

char ap_ustacks[SMP_MAX_APS][AP_USTACK_SIZE] __attribute__((aligned(16)));
static struct ap_report reports[SMP_MAX_APS];
static volatile uint32_t arrived; /* reports[0..arrived) are complete */
static volatile uint64_t counter;

static struct {
	uint64_t cpus;
	int have_cpus;
	int no_mptable; /* probe.smp_mptable=0 */
} sopt;

int smp_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad)
{
	uint64_t x;
	if (str_eq_n(k, kl, "probe.cpus")) {
		*bad = !has_val || parse_size(v, vl, &sopt.cpus) || sopt.cpus == 0 ||
		       sopt.cpus > SMP_MAX_CPUS;
		sopt.have_cpus = !*bad;
	} else if (str_eq_n(k, kl, "probe.smp_mptable")) {
		*bad = !has_val || parse_size(v, vl, &x) || x > 1;
		sopt.no_mptable = !*bad && x == 0;
	} else {
		return 0;
	}
	return 1;
}

/* xorshift64 from a seed the APIC ID picks: the BSP recomputes it. */
static uint64_t smp_work(uint32_t id)
{
	uint64_t x = (id + 1) * 0x9E3779B97F4A7C15ULL;
	uint32_t i;
	for (i = 0; i < WORK_STEPS; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	return x;
}

/* ---- the AP side (CPL3) ------------------------------------------------- */

void ap_main(uint32_t slot, uint64_t unused)
{
	struct ap_report *r = &reports[slot];
	uint64_t t0 = rdtsc();
	uint32_t i, k;
	uint16_t cs;

	(void)unused;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	r->cpl = cs & 3;
	r->cpuid_id = ap_cpuid[slot].initial; /* read at CPL0 (smp.h) */
	r->x2apic_id = ap_cpuid[slot].x2apic;
	r->lapic_id = LAPIC(LAPIC_ID) >> 24;
	r->work = smp_work(r->lapic_id);
	for (i = 0; i < COUNTER_ADDS; i++)
		__atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
	/* Device access: each virtio-mmio device's ID registers, as the BSP read them. */
	for (i = 0; i < nvdevs; i++) {
		static const uint32_t regs[3] = { VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_VERSION,
						  VIRTIO_MMIO_DEVICE_ID };
		const struct vdev *d = &vdevs[i];
		uint32_t want[3] = { d->magic, d->version, d->device_id };
		for (k = 0; k < 3; k++) {
			uint32_t v = vread32(d, regs[k]);
			r->mmio_reads++;
			if (v != want[k] && !r->mmio_bad++) {
				r->mmio_bad_base = d->base + regs[k];
				r->mmio_bad_val = v;
				r->mmio_bad_want = want[k];
			}
		}
	}
	r->cycles = rdtsc() - t0;
	/* The report is complete before the count says so (release; the BSP
	 * reads the count with acquire). */
	__atomic_fetch_add(&arrived, 1, __ATOMIC_RELEASE);
	sys(SYS_HALT, 0, 0);
	for (;;)
		;
}

/* ---- the MP table (MP spec 1.4 §4) -------------------------------------- */

struct mp_cpus {
	uint8_t id[SMP_MAX_CPUS];
	unsigned n;
	int bsp; /* index into id of the entry flagged BP, -1 none */
};

static int sum8(const volatile uint8_t *p, size_t n)
{
	uint8_t s = 0;
	while (n--)
		s += *p++;
	return s;
}

/* The floating pointer structure: 16-byte aligned "_MP_" with a good checksum
 * in the first KiB of the EBDA (segment at 0x40e), the last KiB of base
 * memory, or 0xf0000-0xfffff (§4). */
static const volatile uint8_t *mp_find(void)
{
	uint64_t bda = 0x40e; /* hidden from gcc, which flags reads below 4 KiB */
	uint64_t ebda;
	__asm__("" : "+r"(bda));
	ebda = (uint64_t)*(const volatile uint16_t *)bda << 4;
	uint64_t where[3][2] = { { ebda, 1024 }, { 0x9fc00, 1024 }, { 0xf0000, 0x10000 } };
	unsigned w;
	uint64_t a;
	for (w = 0; w < 3; w++) {
		if (w == 0 && (ebda < 0x80000 || ebda >= 0xa0000))
			continue;
		for (a = where[w][0]; a + 16 <= where[w][0] + where[w][1]; a += 16) {
			const volatile uint8_t *p = (const volatile uint8_t *)a;
			if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' &&
			    p[8] == 1 && sum8(p, 16) == 0)
				return p;
		}
	}
	return NULL;
}

/* The enabled processors of the configuration table; NULL or why not. */
static const char *mp_read(const volatile uint8_t *fp, struct mp_cpus *m, uint64_t *table)
{
	const volatile uint8_t *t, *e, *end;
	uint32_t phys = *(const volatile uint32_t *)(fp + 4);
	uint16_t len;

	m->n = 0;
	m->bsp = -1;
	*table = phys;
	if (fp[11])
		return "default configuration (feature byte 1 != 0) not supported";
	if (phys == 0 || phys >= 0x100000 - 44)
		return "configuration table pointer not in the first MiB";
	t = (const volatile uint8_t *)(uint64_t)phys;
	if (t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P')
		return "configuration table signature is not PCMP";
	len = *(const volatile uint16_t *)(t + 4);
	if (len < 44 || phys + len > 0x100000)
		return "configuration table length out of range";
	if (sum8(t, len))
		return "configuration table checksum";
	if (*(const volatile uint32_t *)(t + 36) != LAPIC_BASE)
		return "local APIC address is not 0xfee00000";
	e = t + 44;
	end = t + len;
	/* Walk the entries to the end of the base table, as Linux does: the
	 * entry count (offset 34) is 0 in qboot's tables (QEMU microvm). */
	while (e < end) {
		unsigned size = e[0] == 0 ? 20 : 8;
		if (e[0] > 4 || e + size > end)
			return "an entry runs past the table or has an unknown type";
		if (e[0] == 0 && (e[3] & 1)) { /* processor, enabled */
			unsigned j;
			if (m->n == SMP_MAX_CPUS)
				return "more than 64 enabled processors";
			/* A directed INIT to 0xff would reach every CPU, the BSP too;
			 * a second INIT to one ID would restart a running AP. */
			if (e[1] == 0xff)
				return "a processor has APIC ID 0xff (broadcast)";
			for (j = 0; j < m->n; j++)
				if (m->id[j] == e[1])
					return "an APIC ID is listed twice";
			if (e[3] & 2)
				m->bsp = (int)m->n;
			m->id[m->n++] = e[1];
		}
		e += size;
	}
	if (m->n == 0)
		return "no enabled processor";
	return NULL;
}

/* ---- the BSP side (CPL3) ------------------------------------------------ */

static void tsc_wait(uint64_t cycles)
{
	uint64_t t0 = rdtsc();
	while (rdtsc() - t0 < cycles)
		__asm__ volatile("pause");
}

/* Send an IPI (destination APIC ID in ICR[63:56] first: writing ICR low
 * sends); 0, or -1 if delivery status stays pending. */
static int ipi(uint32_t dest, uint32_t icr)
{
	uint64_t t0;
	LAPIC(LAPIC_ICR_HI) = dest << 24;
	LAPIC(LAPIC_ICR_LO) = icr;
	t0 = rdtsc();
	while (LAPIC(LAPIC_ICR_LO) & ICR_PENDING)
		if (rdtsc() - t0 > ICR_TIMEOUT_TSC)
			return -1;
	return 0;
}

/* INIT, 10 ms, SIPI, 200 us, SIPI, 200 us (MP spec §B.4): the second SIPI
 * is ignored by an AP the first one started. */
static int start_ap(uint32_t dest, uint32_t shorthand)
{
	uint32_t sipi = ICR_SIPI | shorthand | (AP_TRAMP_ADDR >> 12);
	if (ipi(dest, ICR_INIT | shorthand))
		return -1;
	tsc_wait(INIT_DELAY_TSC);
	if (ipi(dest, sipi))
		return -1;
	tsc_wait(SIPI_DELAY_TSC);
	if (ipi(dest, sipi))
		return -1;
	tsc_wait(SIPI_DELAY_TSC);
	return 0;
}

static int find_id(const uint8_t *ids, unsigned n, uint32_t id)
{
	unsigned i;
	for (i = 0; i < n; i++)
		if (ids[i] == id)
			return (int)i;
	return -1;
}

/* What an AP reported, checked; NULL or why not. */
static const char *ap_verdict(const struct ap_report *r)
{
	if (r->cpl != 3)
		return "ran at CPL != 3";
	if (r->cpuid_id != r->lapic_id)
		return "CPUID.1 APIC ID differs from the LAPIC ID register";
	if (r->x2apic_id >= 0 && (uint32_t)r->x2apic_id != r->lapic_id)
		return "CPUID.0Bh x2APIC ID differs from the LAPIC ID register";
	if (r->work != smp_work(r->lapic_id))
		return "computed a wrong value";
	if (r->mmio_bad)
		return "read a virtio ID register differently from the BSP";
	return NULL;
}

void check_smp(const char *name)
{
	const volatile uint8_t *fp = sopt.no_mptable ? NULL : mp_find();
	struct mp_cpus mp;
	uint8_t ids[SMP_MAX_CPUS];
	const char *why = NULL, *src;
	uint64_t table = 0, t0, waited;
	uint32_t bsp_id, n, i, got, tickets, aps;
	int bad_ap = -1;

	bsp_id = LAPIC(LAPIC_ID) >> 24;
	if (bsp_cpuid.initial != bsp_id ||
	    (bsp_cpuid.x2apic >= 0 && (uint32_t)bsp_cpuid.x2apic != bsp_id))
		return check_fail(name, "BSP: LAPIC ID %u, CPUID.1 APIC ID %u, CPUID.0Bh x2APIC ID %d",
				  bsp_id, bsp_cpuid.initial, bsp_cpuid.x2apic);
	if (fp) {
		src = "mptable";
		if ((why = mp_read(fp, &mp, &table)))
			return check_fail(name, "MP table at 0x%lx (config 0x%lx): %s",
					  (uint64_t)fp, table, why);
		if (sopt.have_cpus && sopt.cpus != mp.n)
			return check_fail(name, "the MP table lists %u CPUs, probe.cpus=%lu", mp.n,
					  sopt.cpus);
		if (mp.bsp < 0 || mp.id[mp.bsp] != bsp_id)
			return check_fail(name, "the MP table's BP entry is not APIC ID %u (the BSP)",
					  bsp_id);
		n = mp.n;
	} else if (sopt.have_cpus) {
		src = "cmdline"; /* no MP table: start all-but-self, count arrivals */
		n = (uint32_t)sopt.cpus;
	} else {
		return check_fail(name, "%s and no probe.cpus=",
				  sopt.no_mptable ? "probe.smp_mptable=0" : "no MP table");
	}
	aps = n - 1;

	t0 = rdtsc();
	if (aps) {
		size_t len = (size_t)(ap_tramp_end - ap_tramp);
		if (!mem_usable(AP_TRAMP_ADDR, 4096))
			return check_fail(name, "trampoline page 0x%x is not usable RAM in the e820 map",
					  AP_TRAMP_ADDR);
		memcpy((void *)AP_TRAMP_ADDR, ap_tramp, len);
		__asm__ volatile("mfence" ::: "memory");
		if (fp) {
			for (i = 0; i < mp.n; i++)
				if (i != (uint32_t)mp.bsp && start_ap(mp.id[i], 0))
					return check_fail(name, "ICR stays pending (APIC ID %u)",
							  mp.id[i]);
		} else if (start_ap(0, ICR_ALL_BUT_SELF)) {
			return check_fail(name, "ICR stays pending (all-but-self)");
		}
	}
	while ((got = __atomic_load_n(&arrived, __ATOMIC_ACQUIRE)) < aps &&
	       rdtsc() - t0 < ARRIVE_TIMEOUT_TSC)
		__asm__ volatile("pause");
	waited = rdtsc() - t0;
	if (!fp && aps && got == aps) /* a broadcast also starts APs beyond N: */
		tsc_wait(SURPLUS_WAIT_TSC); /* give them time to show */
	got = __atomic_load_n(&arrived, __ATOMIC_ACQUIRE);
	tickets = ap_ticket;
	if (got > SMP_MAX_APS)
		got = SMP_MAX_APS;

	/* ids: the BSP, then each AP in arrival order; printed sorted. */
	ids[0] = (uint8_t)bsp_id;
	for (i = 0; i < got && i + 1 < SMP_MAX_CPUS; i++)
		ids[i + 1] = (uint8_t)reports[i].lapic_id;
	out("probe: smp cpus=%u ids=", got + 1);
	for (uint32_t v = 0, first = 1; v < 256; v++)
		if (find_id(ids, got + 1, v) >= 0) {
			out("%s%u", first ? "" : ",", v);
			first = 0;
		}
	out(" source=%s bsp=%u\r\n", src, bsp_id);
	for (i = 0; i < got; i++) {
		const struct ap_report *r = &reports[i];
		const char *v = ap_verdict(r);
		out("probe: smp ap slot=%u apic_id=%u cpuid_id=%u x2apic_id=%d cpl=%u work=0x%lx "
		    "mmio_reads=%u cycles=%lu%s%s\r\n",
		    i, r->lapic_id, r->cpuid_id, r->x2apic_id, r->cpl, r->work, r->mmio_reads,
		    r->cycles, v ? " FAIL " : "", v ? v : "");
		if (v && bad_ap < 0)
			bad_ap = (int)i;
	}

	if (got < aps)
		return check_fail(name, "%u of %u APs arrived within %lu TSC cycles (%u started)",
				  got, aps, waited, tickets);
	if (got > aps || tickets != aps)
		return check_fail(name, "%u APs started, %u arrived, %u expected", tickets, got, aps);
	for (i = 0; i < n; i++) {
		int j = find_id(ids, n, ids[i]);
		if (j != (int)i)
			return check_fail(name, "APIC ID %u reported twice", ids[i]);
		if (fp && find_id(mp.id, mp.n, ids[i]) < 0)
			return check_fail(name, "APIC ID %u is not in the MP table", ids[i]);
	}
	if (bad_ap >= 0) {
		const struct ap_report *r = &reports[bad_ap];
		if (r->mmio_bad)
			return check_fail(name, "AP %u: MMIO read at 0x%lx gave 0x%x, the BSP read 0x%x",
					  r->lapic_id, r->mmio_bad_base, r->mmio_bad_val,
					  r->mmio_bad_want);
		return check_fail(name, "AP %u %s", r->lapic_id, ap_verdict(r));
	}
	if (counter != (uint64_t)aps * COUNTER_ADDS)
		return check_fail(name, "shared counter %lu, want %lu", counter,
				  (uint64_t)aps * COUNTER_ADDS);
	check_ok(name, "cpus=%u aps=%u source=%s counter=%lu mmio_devices=%u wait_cycles=%lu", n,
		 aps, src, counter, nvdevs, waited);
}
