/* badrv.c - the bad_driver check (CPL3): a virtio driver that breaks the
 * rules of virtio 1.2 on purpose, one after another, on the first
 * virtio-rng, for minivmm's --check-driver to find (README.md, "The
 * bad_driver check", lists each step and the rule it breaks).
 *
 * The device may ignore each bad access or answer it with
 * DEVICE_NEEDS_RESET; the check only demands that it reacts to the broken
 * chains (NEEDS_RESET or a used buffer) and works again after a reset and
 * a correct initialisation. It is not meant to pass under QEMU.
 */
#include "virtio.h"

static struct vdrv bd;
static uint8_t bd_buf[2][64] __attribute__((aligned(64)));
static const char *steps[32];
static unsigned nsteps;

#define RD(off) vread32(d, (off))
#define WR(off, v) vwrite32(d, (off), (v))
#define ST_ACK VIRTIO_STATUS_ACKNOWLEDGE
#define ST_DRV (VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER)
#define ST_FOK (ST_DRV | VIRTIO_STATUS_FEATURES_OK)
#define ST_LIVE (ST_FOK | VIRTIO_STATUS_DRIVER_OK)

static void did(const char *step)
{
	if (nsteps < sizeof(steps) / sizeof(steps[0]))
		steps[nsteps++] = step;
}

/* Poll until the device reacts to a broken chain or queue: DEVICE_NEEDS_RESET,
 * or a used buffer. 0, or -1 when nothing happened in time. */
static int reacted(struct vdev *d, struct vq *q)
{
	uint64_t t0 = rdtsc();
	while (rdtsc() - t0 < VQ_TIMEOUT_TSC / 5) {
		if (RD(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET)
			return 0;
		if (q && q->used->idx != q->last_used)
			return 0;
	}
	return -1;
}

/* Make head `head` available once more (ring entry, idx) and notify queue 0. */
static void offer(struct vdev *d, struct vq *q, uint16_t head)
{
	q->avail->ring[q->avail_idx % q->size] = head;
	vbarrier();
	q->avail->idx = ++q->avail_idx;
	WR(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

/* Registers and status, one bad access each, on a device being set up. */
static int bad_registers(struct vdev *d)
{
	uint64_t offered;
	unsigned bit;

	WR(VIRTIO_MMIO_STATUS, 0);
	(void)*(volatile uint16_t *)(d->base + VIRTIO_MMIO_STATUS);
	did("width");
	WR(VIRTIO_MMIO_MAGIC_VALUE, 0);
	did("read_only");
	(void)RD(VIRTIO_MMIO_QUEUE_SEL);
	did("write_only");
	(void)RD(0x0e0);
	did("unknown_register");
	WR(VIRTIO_MMIO_STATUS, ST_FOK); /* ACKNOWLEDGE and DRIVER skipped */
	did("status_order");
	WR(VIRTIO_MMIO_STATUS, ST_ACK);
	WR(VIRTIO_MMIO_STATUS, ST_DRV);
	(void)RD(VIRTIO_MMIO_DEVICE_FEATURES); /* DeviceFeaturesSel never written */
	did("features_select");
	*(volatile uint32_t *)(d->base + VIRTIO_MMIO_CONFIG) = 0;
	did("config_write_early");
	offered = vdrv_device_features(d);
	for (bit = 31; bit < 32 && (offered & BIT(bit)); bit--)
		;
	if (bit > 31)
		return -1; /* every bit of page 0 offered */
	WR(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	WR(VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)BIT(bit));
	did("feature_not_offered");
	WR(VIRTIO_MMIO_DRIVER_FEATURES, 0);
	WR(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	WR(VIRTIO_MMIO_DRIVER_FEATURES, 0);
	WR(VIRTIO_MMIO_STATUS, ST_FOK); /* VERSION_1 offered, not accepted */
	did("no_version_1");
	WR(VIRTIO_MMIO_DRIVER_FEATURES, 1); /* page 1: VERSION_1 */
	WR(VIRTIO_MMIO_STATUS, ST_FOK);     /* accepted; Status not read back */
	WR(VIRTIO_MMIO_DRIVER_FEATURES, 1);
	did("features_late");
	return 0;
}

/* A live device: queue 0 without INDIRECT_DESC, then broken on purpose. */
static const char *bad_live(struct vdev *d)
{
	struct vq *q = &bd.q[0];
	struct vbuf b = { (uint64_t)bd_buf[0], 16, 1 };
	uint32_t id, len;
	uint64_t t0;

	bd.dev = d;
	bd.nq = 1;
	bd.acked = BIT(VIRTIO_F_VERSION_1);
	bd.event_idx = bd.indirect = 0;
	if (vq_setup(&bd, 0))
		return bd.err;
	WR(VIRTIO_MMIO_QUEUE_NUM, 8);
	did("queue_while_ready");
	WR(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	did("notify_early");
	WR(VIRTIO_MMIO_STATUS, ST_LIVE);
	did("features_ok_unread");
	if (RD(VIRTIO_MMIO_STATUS) != ST_LIVE)
		return "DRIVER_OK refused";
	WR(VIRTIO_MMIO_INTERRUPT_ACK, 4);
	did("ack_bits");
	/* Head 0 twice in the available ring: the second while the device holds it. */
	q->desc[0].addr = (uint64_t)bd_buf[0];
	q->desc[0].len = 16;
	q->desc[0].flags = VIRTQ_DESC_F_WRITE;
	q->desc[0].next = 0;
	q->avail->ring[q->avail_idx % q->size] = 0;
	q->avail->ring[(q->avail_idx + 1) % q->size] = 0;
	vbarrier();
	q->avail_idx += 2;
	q->avail->idx = q->avail_idx;
	WR(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	t0 = rdtsc();
	while ((uint16_t)(q->used->idx - q->last_used) < 2)
		if (rdtsc() - t0 > VQ_TIMEOUT_TSC)
			return "chain made available twice: not used";
	q->last_used = q->used->idx;
	did("chain_reused");
	vq_publish(&bd, 0, &b, 1, 1); /* an indirect table, INDIRECT_DESC not acked */
	WR(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	if (vq_wait(&bd, 0, &id, &len))
		return bd.err;
	did("indirect_unnegotiated");
	WR(VIRTIO_MMIO_STATUS, ST_LIVE | VIRTIO_STATUS_FAILED);
	WR(VIRTIO_MMIO_STATUS, ST_ACK); /* re-initialising without a reset */
	did("status_after_failed");
	return 0;
}

/* Broken chains and queues, each on a freshly initialised device. */
enum { LOOP, NEXT_OOB, HEAD_OOB, NESTED, READ_AFTER_WRITE, INDIRECT_NEXT, AVAIL_JUMP,
       MISALIGNED, QUEUE_SIZE, NKINDS };
static const char *const kinds[NKINDS] = {
	"loop", "next_oob", "head_oob", "nested_indirect", "readable_after_writable",
	"indirect_next", "avail_jump", "ring_misaligned", "queue_size",
};

static const char *bad_queue(struct vdev *d, unsigned kind)
{
	struct vq *q = &bd.q[0];
	volatile struct virtq_desc *t;
	uint32_t desc;

	if (kind == MISALIGNED || kind == QUEUE_SIZE) {
		/* Set-up by hand, up to QueueReady = 1 with one bad value. */
		WR(VIRTIO_MMIO_STATUS, 0);
		WR(VIRTIO_MMIO_STATUS, ST_ACK);
		WR(VIRTIO_MMIO_STATUS, ST_DRV);
		vdrv_write_features(d, BIT(VIRTIO_F_VERSION_1));
		WR(VIRTIO_MMIO_STATUS, ST_FOK);
		(void)RD(VIRTIO_MMIO_STATUS);
		desc = (uint32_t)(uint64_t)bd_buf[1];
		WR(VIRTIO_MMIO_QUEUE_SEL, 0);
		WR(VIRTIO_MMIO_QUEUE_NUM, kind == QUEUE_SIZE ? 3 : 4);
		WR(VIRTIO_MMIO_QUEUE_DESC_LOW, kind == MISALIGNED ? desc + 8 : desc);
		WR(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
		WR(VIRTIO_MMIO_QUEUE_DRIVER_LOW, desc);
		WR(VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
		WR(VIRTIO_MMIO_QUEUE_DEVICE_LOW, desc);
		WR(VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
		WR(VIRTIO_MMIO_QUEUE_READY, 1);
		return reacted(d, 0) ? "no reaction" : 0;
	}
	if (vdrv_init(&bd, d, BIT(VIRTIO_F_INDIRECT_DESC), 1))
		return bd.err;
	if (!bd.indirect && (kind == NESTED || kind == INDIRECT_NEXT))
		return "INDIRECT_DESC not offered";
	t = q->desc;
	t[0].addr = (uint64_t)bd_buf[0];
	t[0].len = 16;
	t[0].flags = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
	t[0].next = 1;
	t[1].addr = (uint64_t)bd_buf[1];
	t[1].len = 16;
	t[1].flags = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
	t[1].next = 0; /* LOOP: 0 -> 1 -> 0 */
	if (kind == NEXT_OOB)
		t[0].next = q->size;
	if (kind == READ_AFTER_WRITE)
		t[1].flags = 0;
	if (kind == NESTED || kind == INDIRECT_NEXT) {
		t[0].addr = (uint64_t)q->indirect;
		t[0].flags = VIRTQ_DESC_F_INDIRECT | (kind == INDIRECT_NEXT ? VIRTQ_DESC_F_NEXT : 0);
		q->indirect[0].addr = (uint64_t)q->indirect;
		q->indirect[0].len = 16;
		q->indirect[0].flags = VIRTQ_DESC_F_INDIRECT;
		q->indirect[0].next = 0;
		t[1].flags = VIRTQ_DESC_F_WRITE;
	}
	if (kind == AVAIL_JUMP) {
		q->avail_idx += q->size + 1;
		q->avail->idx = q->avail_idx;
		WR(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	} else {
		offer(d, q, kind == HEAD_OOB ? q->size : 0);
	}
	return reacted(d, q) ? "no reaction" : 0;
}

void check_bad_driver(const char *name)
{
	struct vdev *d = vdev_find(VIRTIO_ID_RNG, 0);
	const char *err;
	char list[400];
	size_t n = 0;
	unsigned i, k;
	uint32_t len;
	struct vbuf b = { (uint64_t)bd_buf[0], 32, 1 };

	if (!d)
		return check_fail(name, "no virtio-rng device (virtio device ID %u)", VIRTIO_ID_RNG);
	nsteps = 0;
	if (bad_registers(d))
		return check_fail(name, "the device offers feature bits 0-31 all");
	err = bad_live(d);
	if (err)
		return check_fail(name, "live device: %s", err);
	for (k = 0; k < NKINDS; k++) {
		err = bad_queue(d, k);
		if (err)
			return check_fail(name, "%s: %s (Status 0x%x)", kinds[k], err,
					  RD(VIRTIO_MMIO_STATUS));
		did(kinds[k]);
	}
	if (vdrv_init(&bd, d, 0, 1) || vq_request(&bd, 0, &b, 1, 0, &len))
		return check_fail(name, "a correct driver afterwards: %s", bd.err);
	for (i = 0; i < nsteps; i++) {
		const char *s = steps[i];
		if (i)
			list[n++] = ',';
		while (*s && n < sizeof(list) - 2)
			list[n++] = *s++;
	}
	list[n] = 0;
	check_ok(name, "committed=%u steps=%s after=ok", nsteps, list);
}
