/* vcheck.c - the virtio device checks (CPL3), registered in user.c.
 *
 * Each check prints exactly one line through check_ok()/check_fail(); a
 * FAIL line says which step failed and what the device did. Devices:
 * the first virtio-rng (ID 4), the probe.blk=<n>th virtio-blk (ID 2,
 * default 0), the first virtio-console (ID 3). The blk sector pattern and
 * what is written where: README.md ("Device checks").
 */
#include "virtio.h"

struct vopts vopt;

static struct vdrv rng_drv, con_drv;
static uint8_t rng_buf[4][64] __attribute__((aligned(64)));

#define RNG_WANT (BIT(VIRTIO_F_EVENT_IDX) | BIT(VIRTIO_F_INDIRECT_DESC))

static int all_zero(const uint8_t *p, size_t n)
{
	while (n--)
		if (*p++)
			return 0;
	return 1;
}

/* One rng request of n bytes into buf; 0 or -1 (why in v->err). */
static int rng_get(struct vdrv *v, uint8_t *buf, uint32_t n, int indirect, uint32_t *len)
{
	struct vbuf b = { (uint64_t)buf, n, 1 };
	memset(buf, 0, n);
	if (vq_request(v, 0, &b, 1, indirect, len))
		return -1;
	if (*len == 0 || *len > n)
		return verr(v, "used len %u for a %u-byte buffer", *len, n);
	if (*len >= 8 && all_zero(buf, *len))
		return verr(v, "%u bytes, all zero", *len);
	return 0;
}

static struct vdev *need(const char *name, uint32_t id, unsigned nth, const char *what)
{
	struct vdev *d = vdev_find(id, nth);
	if (!d)
		check_fail(name, "no %s device (virtio device ID %u, index %u)", what, id, nth);
	return d;
}

/* ---- rng ------------------------------------------------------------------ */

void check_rng(const char *name)
{
	struct vdev *d = need(name, VIRTIO_ID_RNG, 0, "virtio-rng");
	uint32_t len, total = 0;
	unsigned i, n = 4;
	if (!d)
		return;
	if (vdrv_init(&rng_drv, d, RNG_WANT, 1))
		return check_fail(name, "init: %s", rng_drv.err);
	for (i = 0; i < n; i++) {
		/* The last request goes through an indirect table if negotiated. */
		int ind = rng_drv.indirect && i == n - 1;
		if (rng_get(&rng_drv, rng_buf[i], 64, ind, &len))
			return check_fail(name, "request %u%s: %s", i, ind ? " (indirect)" : "",
					  rng_drv.err);
		total += len;
		if (i && memcmp(rng_buf[i], rng_buf[i - 1], 64) == 0)
			return check_fail(name, "requests %u and %u returned the same bytes",
					  i - 1, i);
	}
	check_ok(name, "requests=%u bytes=%u features=0x%lx queue_size=%u indirect=%d "
		 "event_idx=%d", n, total, rng_drv.acked, rng_drv.q[0].size, rng_drv.indirect,
		 rng_drv.event_idx);
}

/* The snapshot check (snap.c): 64 bytes from the first virtio-rng, on a
 * queue initialised here when init is set, else on the one initialised
 * before (after a restore: the restored queue). 0 or -1 (why in *err). */
int rng_snap(int init, uint8_t *buf, const char **err)
{
	struct vdev *d = vdev_find(VIRTIO_ID_RNG, 0);
	uint32_t len;
	*err = rng_drv.err;
	if (!d)
		return verr(&rng_drv, "no virtio-rng device");
	if (init && vdrv_init(&rng_drv, d, RNG_WANT, 1))
		return -1;
	return rng_get(&rng_drv, buf, 64, 0, &len);
}

/* ---- rng_irq: one request completed by interrupt -------------------------- */

static uint32_t ioapic_read(uint32_t reg)
{
	*(volatile uint32_t *)IOAPIC_BASE = reg;
	return *(volatile uint32_t *)(IOAPIC_BASE + 0x10);
}

static void ioapic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)IOAPIC_BASE = reg;
	*(volatile uint32_t *)(IOAPIC_BASE + 0x10) = v;
}

#define LAPIC(off) (*(volatile uint32_t *)(LAPIC_BASE + (off)))

void check_rng_irq(const char *name)
{
	struct vdev *d = need(name, VIRTIO_ID_RNG, 0, "virtio-rng");
	struct vq *q = &rng_drv.q[0];
	struct vbuf b;
	uint32_t maxpin, vec, apic_id, isr_cpl3, id, len, count;
	uint16_t old;
	uint64_t t0;
	int moved;

	if (!d)
		return;
	maxpin = ioapic_read(1) >> 16 & 0xff; /* IOAPICVER: max redirection entry */
	if (d->irq > maxpin)
		return check_fail(name, "irq %u beyond the IOAPIC's pins 0-%u", d->irq, maxpin);
	vec = IRQ_VECTOR_BASE + d->irq;
	if (vec >= 0xff)
		return check_fail(name, "irq %u: no vector for it", d->irq);
	if (vdrv_init(&rng_drv, d, RNG_WANT, 1))
		return check_fail(name, "init: %s", rng_drv.err);
	/* A fresh device has nothing pending; an edge needs a low line first. */
	isr_cpl3 = vread32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (isr_cpl3)
		return check_fail(name, "InterruptStatus 0x%x after init (want 0)", isr_cpl3);

	apic_id = LAPIC(0x20) >> 24;
	LAPIC(0x80) = 0;     /* TPR: accept every priority */
	LAPIC(0xf0) = 0x1ff; /* SVR: software enable, spurious vector 0xff */
	irq_slots[vec].count = 0;
	irq_slots[vec].isr = irq_slots[vec].isr_after = 0xdead;
	irq_slots[vec].base = d->base;
	/* Redirection entry: fixed delivery, physical destination, active
	 * high, edge-triggered (as Linux uses virtio-mmio irqs), unmasked. */
	ioapic_write(0x10 + 2 * d->irq + 1, apic_id << 24);
	ioapic_write(0x10 + 2 * d->irq, vec);
	sys(SYS_IRQ, 1, 0); /* IF=1 at CPL3 from here */

	b.addr = (uint64_t)rng_buf[0];
	b.len = 64;
	b.writable = 1;
	memset(rng_buf[0], 0, 64);
	old = q->avail_idx;
	vq_publish(&rng_drv, 0, &b, 1, 0);
	vq_kick(&rng_drv, 0, old);
	t0 = rdtsc();
	while (!(moved = q->used->idx != q->last_used) || irq_slots[vec].count == 0) {
		/* After the ring moved, the interrupt gets a shorter grace period. */
		if (rdtsc() - t0 > (moved ? VQ_TIMEOUT_TSC / 10 : VQ_TIMEOUT_TSC))
			break;
	}
	sys(SYS_IRQ, 0, 0); /* IF=0 */
	ioapic_write(0x10 + 2 * d->irq, 0x10000 | vec); /* masked again */
	irq_slots[vec].base = 0;
	count = irq_slots[vec].count;
	moved = q->used->idx != q->last_used;
	isr_cpl3 = vread32(d, VIRTIO_MMIO_INTERRUPT_STATUS);

	if (!moved && !count)
		return check_fail(name, "no used buffer and no interrupt (vector 0x%x, Status 0x%x)",
				  vec, vread32(d, VIRTIO_MMIO_STATUS));
	if (!count)
		return check_fail(name, "no interrupt: the used ring moved but vector 0x%x never "
				  "came (InterruptStatus 0x%x)", vec, isr_cpl3);
	if (!moved)
		return check_fail(name, "interrupt (InterruptStatus 0x%x) but no used buffer",
				  irq_slots[vec].isr);
	if (!(irq_slots[vec].isr & VIRTIO_ISR_USED))
		return check_fail(name, "InterruptStatus 0x%x in the handler: bit 0 (used "
				  "buffer) clear", irq_slots[vec].isr);
	if (irq_slots[vec].isr_after != 0)
		return check_fail(name, "InterruptStatus 0x%x after InterruptACK (want 0)",
				  irq_slots[vec].isr_after);
	if (isr_cpl3 != 0)
		return check_fail(name, "InterruptStatus 0x%x after the handler (want 0)",
				  isr_cpl3);
	if (vq_wait(&rng_drv, 0, &id, &len))
		return check_fail(name, "%s", rng_drv.err);
	if (id != q->head || len == 0 || len > 64)
		return check_fail(name, "used id %u len %u (want id %u, len 1-64)", id, len,
				  q->head);
	if (len >= 8 && all_zero(rng_buf[0], len))
		return check_fail(name, "%u bytes, all zero", len);
	check_ok(name, "irq=%u vector=0x%x interrupts=%u isr=0x%x bytes=%u", d->irq, vec, count,
		 irq_slots[vec].isr, len);
}

/* ---- console ---------------------------------------------------------------- */

static const char hello[] = "probe: hello from virtio-console\n";

void check_console(const char *name)
{
	struct vdev *d = need(name, VIRTIO_ID_CONSOLE, 0, "virtio-console");
	static char txbuf[64] __attribute__((aligned(64)));
	struct vbuf b;
	uint32_t len;
	if (!d)
		return;
	/* Port 0 only: no MULTIPORT; queue 0 receiveq, queue 1 transmitq. */
	if (vdrv_init(&con_drv, d, BIT(VIRTIO_F_EVENT_IDX) | BIT(VIRTIO_F_INDIRECT_DESC), 2))
		return check_fail(name, "init: %s", con_drv.err);
	memcpy(txbuf, hello, sizeof(hello) - 1);
	b.addr = (uint64_t)txbuf;
	b.len = sizeof(hello) - 1;
	b.writable = 0;
	if (vq_request(&con_drv, 1, &b, 1, 0, &len))
		return check_fail(name, "transmitq: %s", con_drv.err);
	if (len != 0)
		return check_fail(name, "transmitq: used len %u for a read-only buffer (want 0)",
				  len);
	check_ok(name, "bytes=%u", b.len);
}

/* ---- features_refused --------------------------------------------------------
 * 2.2.1: a device accepts a valid subset of its features or fails to set
 * FEATURES_OK; 2.2.2: a driver never acks a feature it was not offered.
 * Case "unoffered": ack VERSION_1 plus a bit the device did not offer
 * (bit 31 if free, else the lowest free bit). A device may refuse
 * (FEATURES_OK reads back clear) or accept and ignore the bit (QEMU masks
 * unoffered bits silently); with probe.strict=1 only refusal
 * passes. Case "no_version_1": ack nothing, VERSION_1 included (6.1: the
 * device MAY fail to operate); reported only. Either way the device must
 * then reset to 0 and work after a correct negotiation. */

static const char *negotiate(struct vdev *d, uint64_t f, uint32_t *status)
{
	vwrite32(d, VIRTIO_MMIO_STATUS, 0);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	(void)vdrv_device_features(d);
	vdrv_write_features(d, f);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
		 VIRTIO_STATUS_FEATURES_OK);
	*status = vread32(d, VIRTIO_MMIO_STATUS);
	return (*status & VIRTIO_STATUS_FEATURES_OK) ? "accepted" : "refused";
}

void check_features_refused(const char *name)
{
	struct vdev *d = need(name, VIRTIO_ID_RNG, 0, "virtio-rng");
	uint64_t offered;
	uint32_t s1, s2, s, len;
	const char *unoffered, *nov1;
	unsigned bit = 31;
	if (!d)
		return;
	vwrite32(d, VIRTIO_MMIO_STATUS, 0);
	offered = vdrv_device_features(d);
	while (offered & BIT(bit))
		bit = bit == 31 ? 0 : bit + 1;
	if (bit > 63)
		return check_fail(name, "device offers all 64 feature bits");
	unoffered = negotiate(d, BIT(VIRTIO_F_VERSION_1) | BIT(bit), &s1);
	if (vopt.strict && (s1 & VIRTIO_STATUS_FEATURES_OK))
		return check_fail(name, "FEATURES_OK accepted with unoffered feature bit %u "
				  "(features 0x%lx offered 0x%lx, Status 0x%x)", bit,
				  BIT(VIRTIO_F_VERSION_1) | BIT(bit), offered, s1);
	nov1 = negotiate(d, 0, &s2);
	vwrite32(d, VIRTIO_MMIO_STATUS, 0);
	s = vread32(d, VIRTIO_MMIO_STATUS);
	if (s != 0)
		return check_fail(name, "Status 0x%x after reset (want 0)", s);
	if (vdrv_init(&rng_drv, d, RNG_WANT, 1))
		return check_fail(name, "correct negotiation afterwards: %s", rng_drv.err);
	if (rng_get(&rng_drv, rng_buf[0], 32, 0, &len))
		return check_fail(name, "request afterwards: %s", rng_drv.err);
	check_ok(name, "bit=%u unoffered=%s status=0x%x no_version_1=%s status=0x%x after=ok",
		 bit, unoffered, s1, nov1, s2);
}

/* ---- bad_chain -----------------------------------------------------------------
 * Three malformed chains on the rng queue, each on a freshly initialised
 * device: "next_oob" (NEXT with next = queue size), "addr_oob" (a buffer
 * at 2^46, outside guest RAM) and "loop" (descriptors 0 -> 1 -> 0). The
 * device must answer each with DEVICE_NEEDS_RESET (plus, since DRIVER_OK
 * is set, a configuration-change interrupt: InterruptStatus bit 1, 2.1.2)
 * or with a used buffer of length 0 (an error answer: nothing written).
 * A used length > 0 or no reaction fails, except for addr_oob without
 * probe.strict=1: QEMU maps an address outside RAM as unbacked I/O memory,
 * drops the data and uses the buffer with its full length ("used_dropped"). After each, reset and a correct
 * request must work, and so must a read of sector 0 on the first
 * virtio-blk if there is one. */

#define BAD_ADDR (1ULL << 46)

static void fmt_used_len(char *err, size_t n, uint32_t len)
{
	struct vdrv tmp;
	verr(&tmp, "used buffer with len %u (the device used a malformed chain)", len);
	memcpy(err, tmp.err, n - 1);
	err[n - 1] = 0;
}

static const char *bad_chain_one(unsigned kind, char *err, size_t errn)
{
	struct vq *q = &rng_drv.q[0];
	uint16_t old = q->avail_idx;
	uint64_t t0;
	uint32_t s = 0, isr;
	q->desc[0].addr = kind == 1 ? BAD_ADDR : (uint64_t)rng_buf[0];
	q->desc[0].len = 32;
	q->desc[0].flags = VIRTQ_DESC_F_WRITE | (kind != 1 ? VIRTQ_DESC_F_NEXT : 0);
	q->desc[0].next = kind == 0 ? q->size : 1;
	q->desc[1].addr = (uint64_t)rng_buf[1];
	q->desc[1].len = 32;
	q->desc[1].flags = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
	q->desc[1].next = 0;
	q->head = 0;
	q->avail->ring[q->avail_idx % q->size] = 0;
	vbarrier();
	q->avail->idx = ++q->avail_idx;
	vq_kick(&rng_drv, 0, old);
	t0 = rdtsc();
	for (;;) {
		if (q->used->idx != q->last_used) {
			uint32_t len = q->used->ring[q->last_used % q->size].len;
			if (len == 0)
				return "used_len0";
			/* Only a buffer outside RAM may be "written" (QEMU treats
			 * the address as unbacked I/O memory and drops the data),
			 * and only without probe.strict=1. */
			if (kind == 1 && !vopt.strict)
				return "used_dropped";
			fmt_used_len(err, errn, len);
			return NULL;
		}
		s = vread32(rng_drv.dev, VIRTIO_MMIO_STATUS);
		if (s & VIRTIO_STATUS_NEEDS_RESET)
			break;
		if (rdtsc() - t0 > VQ_TIMEOUT_TSC / 5) {
			memcpy(err, "no reaction", 12);
			return NULL;
		}
	}
	isr = vread32(rng_drv.dev, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (!(isr & VIRTIO_ISR_CONFIG)) {
		memcpy(err, "NEEDS_RESET without InterruptStatus bit 1", 42);
		return NULL;
	}
	return "needs_reset";
}

void check_bad_chain(const char *name)
{
	static const char *const kinds[3] = { "next_oob", "addr_oob", "loop" };
	struct vdev *d = need(name, VIRTIO_ID_RNG, 0, "virtio-rng");
	const char *res[3], *berr = "";
	char err[64];
	unsigned k;
	uint32_t len, s;
	int b;
	if (!d)
		return;
	for (k = 0; k < 3; k++) {
		if (vdrv_init(&rng_drv, d, 0, 1))
			return check_fail(name, "init before %s: %s", kinds[k], rng_drv.err);
		res[k] = bad_chain_one(k, err, sizeof(err));
		if (!res[k])
			return check_fail(name, "%s: %s (Status 0x%x, InterruptStatus 0x%x)",
					  kinds[k], err, vread32(d, VIRTIO_MMIO_STATUS),
					  vread32(d, VIRTIO_MMIO_INTERRUPT_STATUS));
		s = vdrv_reset(&rng_drv);
		if (s != 0)
			return check_fail(name, "%s: Status 0x%x after reset (want 0)", kinds[k], s);
		if (vdrv_init(&rng_drv, d, RNG_WANT, 1) ||
		    rng_get(&rng_drv, rng_buf[2], 32, 0, &len))
			return check_fail(name, "%s: after reset: %s", kinds[k], rng_drv.err);
	}
	b = blk_smoke(&berr);
	if (b < 0)
		return check_fail(name, "virtio-blk afterwards: %s", berr);
	check_ok(name, "next_oob=%s addr_oob=%s loop=%s after=ok blk=%s", res[0], res[1], res[2],
		 b ? "absent" : "ok");
}

/* ---- reset ----------------------------------------------------------------------
 * 4.2.2.1: on reset the device clears InterruptStatus and every
 * QueueReady; Status reads 0 (2.4.1). Then re-initialise and use it: the
 * device must restart at used idx 0 on the new (zeroed) rings. */
void check_reset(const char *name)
{
	struct vdev *d = need(name, VIRTIO_ID_RNG, 0, "virtio-rng");
	uint32_t len, s, ready, isr, isr_before;
	unsigned i;
	if (!d)
		return;
	if (vdrv_init(&rng_drv, d, RNG_WANT, 1))
		return check_fail(name, "init: %s", rng_drv.err);
	for (i = 0; i < 2; i++)
		if (rng_get(&rng_drv, rng_buf[i], 64, 0, &len))
			return check_fail(name, "request %u before reset: %s", i, rng_drv.err);
	isr_before = vread32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
	s = vdrv_reset(&rng_drv);
	if (s != 0)
		return check_fail(name, "Status 0x%x after reset (want 0)", s);
	vwrite32(d, VIRTIO_MMIO_QUEUE_SEL, 0);
	ready = vread32(d, VIRTIO_MMIO_QUEUE_READY);
	if (ready != 0)
		return check_fail(name, "QueueReady %u for queue 0 after reset (want 0)", ready);
	isr = vread32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (isr != 0)
		return check_fail(name, "InterruptStatus 0x%x after reset (want 0)", isr);
	if (vdrv_init(&rng_drv, d, RNG_WANT, 1))
		return check_fail(name, "re-init: %s", rng_drv.err);
	for (i = 0; i < 2; i++)
		if (rng_get(&rng_drv, rng_buf[2 + i], 64, 0, &len))
			return check_fail(name, "request %u after reset: %s", i, rng_drv.err);
	check_ok(name, "isr_before=0x%x requests_after=2", isr_before);
}
