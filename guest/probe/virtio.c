/* virtio.c - virtio-mmio discovery from the command line (CPL3). */
#include "virtio.h"

struct vdev vdevs[MAX_VDEVS];
unsigned nvdevs;

int vdev_add(const char *val, size_t len)
{
	size_t at, colon, colon2;
	uint64_t size, base, irq;
	struct vdev *d;

	for (at = 0; at < len && val[at] != '@'; at++)
		;
	for (colon = at; colon < len && val[colon] != ':'; colon++)
		;
	for (colon2 = colon + 1; colon2 < len && val[colon2] != ':'; colon2++)
		;
	if (at >= len || colon >= len || nvdevs >= MAX_VDEVS)
		return -1;
	if (parse_size(val, at, &size) || parse_size(val + at + 1, colon - at - 1, &base))
		return -1;
	/* The irq is a plain number; an optional :<id> (platform device id)
	 * follows in Linux's syntax and is accepted and ignored. */
	if (parse_size(val + colon + 1, (colon2 < len ? colon2 : len) - colon - 1, &irq))
		return -1;
	if (size < 0x100 || size > MAPPED_LIMIT || base >= MAPPED_LIMIT ||
	    size > MAPPED_LIMIT - base || (base & 3) || irq > 0xffffffffULL)
		return -1;
	d = &vdevs[nvdevs++];
	d->base = base;
	d->size = size;
	d->irq = (uint32_t)irq;
	d->probed = 0;
	return 0;
}

void vdev_probe_all(void)
{
	unsigned i;
	for (i = 0; i < nvdevs; i++) {
		struct vdev *d = &vdevs[i];
		d->magic = vread32(d, VIRTIO_MMIO_MAGIC_VALUE);
		d->version = vread32(d, VIRTIO_MMIO_VERSION);
		d->device_id = vread32(d, VIRTIO_MMIO_DEVICE_ID);
		d->vendor_id = vread32(d, VIRTIO_MMIO_VENDOR_ID);
		d->probed = 1;
	}
}

struct vdev *vdev_find(uint32_t device_id, unsigned nth)
{
	unsigned i;
	for (i = 0; i < nvdevs; i++)
		if (vdevs[i].probed && vdevs[i].magic == VIRTIO_MAGIC &&
		    vdevs[i].device_id == device_id && nth-- == 0)
			return &vdevs[i];
	return NULL;
}

/* ---- the driver --------------------------------------------------------- */

/* One 4 KiB page per (device, queue); see virtio.h for the layout. */
static uint8_t vq_mem[MAX_VDEVS * VDRV_MAX_QUEUES][4096] __attribute__((aligned(4096)));

struct irq_slot irq_slots[256];

struct sbuf {
	char *b;
	size_t n, cap;
};

static void sbuf_put(void *ctx, char c)
{
	struct sbuf *s = ctx;
	if (s->n + 1 < s->cap)
		s->b[s->n++] = c;
}

int verr(struct vdrv *v, const char *f, ...)
{
	struct sbuf s = { v->err, 0, sizeof(v->err) };
	va_list ap;
	va_start(ap, f);
	vfmt(sbuf_put, &s, f, ap);
	va_end(ap);
	s.b[s.n] = 0;
	return -1;
}

uint32_t vdrv_reset(struct vdrv *v)
{
	vwrite32(v->dev, VIRTIO_MMIO_STATUS, 0);
	return vread32(v->dev, VIRTIO_MMIO_STATUS);
}

uint64_t vdrv_device_features(struct vdev *d)
{
	uint64_t f;
	vwrite32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	f = vread32(d, VIRTIO_MMIO_DEVICE_FEATURES);
	vwrite32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	f |= (uint64_t)vread32(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	return f;
}

void vdrv_write_features(struct vdev *d, uint64_t f)
{
	vwrite32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vwrite32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)f);
	vwrite32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vwrite32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(f >> 32));
}

static void set_status(struct vdrv *v, uint32_t bits)
{
	uint32_t s = vread32(v->dev, VIRTIO_MMIO_STATUS);
	vwrite32(v->dev, VIRTIO_MMIO_STATUS, s | bits);
}

int vq_setup(struct vdrv *v, unsigned qi)
{
	struct vdev *d = v->dev;
	struct vq *q = &v->q[qi];
	uint8_t *mem = vq_mem[(d - vdevs) * VDRV_MAX_QUEUES + qi];
	uint32_t max, ready, size;

	vwrite32(d, VIRTIO_MMIO_QUEUE_SEL, qi);
	ready = vread32(d, VIRTIO_MMIO_QUEUE_READY);
	if (ready != 0)
		return verr(v, "queue %u: QueueReady reads %u before set-up (want 0)", qi, ready);
	max = vread32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0)
		return verr(v, "queue %u: QueueNumMax is 0 (queue not available)", qi);
	if (max > 32768)
		return verr(v, "queue %u: QueueNumMax %u > 32768", qi, max);
	/* The largest power of two within both limits (2.7: split rings). */
	for (size = VQ_MAX_SIZE; size > max; size >>= 1)
		;
	memset(mem, 0, 4096);
	q->index = (uint16_t)qi;
	q->size = (uint16_t)size;
	q->desc = (volatile struct virtq_desc *)mem;
	q->avail = (volatile struct virtq_avail *)(mem + 1024);
	q->used = (volatile struct virtq_used *)(mem + 2048);
	q->indirect = (volatile struct virtq_desc *)(mem + 3072);
	q->avail_idx = 0;
	q->last_used = 0;
	vwrite32(d, VIRTIO_MMIO_QUEUE_NUM, size);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)(uint64_t)q->desc);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)((uint64_t)q->desc >> 32));
	vwrite32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)q->avail);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)((uint64_t)q->avail >> 32));
	vwrite32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)q->used);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)((uint64_t)q->used >> 32));
	vwrite32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	ready = vread32(d, VIRTIO_MMIO_QUEUE_READY);
	if (ready != 1)
		return verr(v, "queue %u: QueueReady reads %u after writing 1", qi, ready);
	return 0;
}

int vdrv_init(struct vdrv *v, struct vdev *d, uint64_t want, unsigned nq)
{
	uint32_t s;
	unsigned i;

	v->dev = d;
	v->nq = nq;
	v->err[0] = 0;
	v->acked = 0;
	/* 3.1.1 step 1: reset; the device must read 0 afterwards (2.4.1). */
	s = vdrv_reset(v);
	if (s != 0)
		return verr(v, "Status reads 0x%x after reset (want 0)", s);
	set_status(v, VIRTIO_STATUS_ACKNOWLEDGE);                 /* step 2 */
	set_status(v, VIRTIO_STATUS_DRIVER);                      /* step 3 */
	v->offered = vdrv_device_features(d);                     /* step 4 */
	if (!(v->offered & BIT(VIRTIO_F_VERSION_1)))
		return verr(v, "VIRTIO_F_VERSION_1 not offered (features 0x%lx)", v->offered);
	v->acked = v->offered & (want | BIT(VIRTIO_F_VERSION_1));
	v->event_idx = !!(v->acked & BIT(VIRTIO_F_EVENT_IDX));
	v->indirect = !!(v->acked & BIT(VIRTIO_F_INDIRECT_DESC));
	vdrv_write_features(d, v->acked);
	set_status(v, VIRTIO_STATUS_FEATURES_OK);                 /* step 5 */
	s = vread32(d, VIRTIO_MMIO_STATUS);                       /* step 6 */
	if (!(s & VIRTIO_STATUS_FEATURES_OK))
		return verr(v, "device refused FEATURES_OK for features 0x%lx (offered 0x%lx, "
			    "Status 0x%x)", v->acked, v->offered, s);
	for (i = 0; i < nq; i++)                                  /* step 7 */
		if (vq_setup(v, i))
			return -1;
	set_status(v, VIRTIO_STATUS_DRIVER_OK);                   /* step 8 */
	s = vread32(d, VIRTIO_MMIO_STATUS);
	if (s != (VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
		  VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK))
		return verr(v, "Status reads 0x%x after DRIVER_OK (want 0xf)", s);
	return 0;
}

unsigned vq_publish(struct vdrv *v, unsigned qi, const struct vbuf *b, unsigned n,
		    int indirect)
{
	struct vq *q = &v->q[qi];
	volatile struct virtq_desc *t = indirect ? q->indirect : q->desc;
	unsigned i;

	/* One chain in flight at a time: it always starts at descriptor 0. */
	for (i = 0; i < n; i++) {
		t[i].addr = b[i].addr;
		t[i].len = b[i].len;
		t[i].flags = (uint16_t)((b[i].writable ? VIRTQ_DESC_F_WRITE : 0) |
					(i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		t[i].next = (uint16_t)(i + 1 < n ? i + 1 : 0);
	}
	if (indirect) {
		q->desc[0].addr = (uint64_t)q->indirect;
		q->desc[0].len = n * sizeof(struct virtq_desc);
		q->desc[0].flags = VIRTQ_DESC_F_INDIRECT;
		q->desc[0].next = 0;
	}
	q->head = 0;
	q->avail->ring[q->avail_idx % q->size] = 0;
	if (v->event_idx) /* used_event: interrupt for the next used buffer */
		q->avail->ring[q->size] = q->last_used;
	vbarrier(); /* descriptors and ring entry before the idx store (2.7.13) */
	q->avail->idx = ++q->avail_idx;
	return 0;
}

void vq_kick(struct vdrv *v, unsigned qi, uint16_t old_idx)
{
	struct vq *q = &v->q[qi];
	if (v->event_idx) {
		/* 2.7.10: notify iff avail_event lies in [old_idx, new_idx). */
		uint16_t ev, new_idx = q->avail_idx;
		vmb(); /* the avail idx store before the avail_event load */
		ev = *(volatile uint16_t *)((volatile uint8_t *)q->used + 4 + 8 * q->size);
		if ((uint16_t)(new_idx - ev - 1) >= (uint16_t)(new_idx - old_idx))
			return;
	} else {
		vmb();
		if (q->used->flags & 1) /* VIRTQ_USED_F_NO_NOTIFY */
			return;
	}
	vwrite32(v->dev, VIRTIO_MMIO_QUEUE_NOTIFY, qi);
}

int vq_wait(struct vdrv *v, unsigned qi, uint32_t *id, uint32_t *len)
{
	struct vq *q = &v->q[qi];
	uint64_t t0 = rdtsc();
	volatile struct virtq_used_elem *e;
	while (q->used->idx == q->last_used)
		if (rdtsc() - t0 > VQ_TIMEOUT_TSC)
			return verr(v, "queue %u: no used buffer (used idx stays %u, Status 0x%x)",
				    qi, q->last_used, vread32(v->dev, VIRTIO_MMIO_STATUS));
	vbarrier(); /* the used idx load before the used entry loads */
	e = &q->used->ring[q->last_used % q->size];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	if (v->event_idx)
		q->avail->ring[q->size] = q->last_used;
	return 0;
}

int vq_request(struct vdrv *v, unsigned qi, const struct vbuf *b, unsigned n, int indirect,
	       uint32_t *len)
{
	struct vq *q = &v->q[qi];
	uint16_t old = q->avail_idx, used_before = q->last_used;
	uint32_t id;
	vq_publish(v, qi, b, n, indirect);
	vq_kick(v, qi, old);
	if (vq_wait(v, qi, &id, len))
		return -1;
	if (id != q->head)
		return verr(v, "queue %u: used id %u, want head %u", qi, id, q->head);
	if ((uint16_t)(q->used->idx - used_before) != 1)
		return verr(v, "queue %u: used idx moved by %u for one chain", qi,
			    (uint16_t)(q->used->idx - used_before));
	return 0;
}

uint32_t vcfg_read32(struct vdev *d, uint32_t off)
{
	return vread32(d, VIRTIO_MMIO_CONFIG + off);
}

uint64_t vcfg_read64(struct vdev *d, uint32_t off)
{
	uint32_t g0, g1, lo, hi;
	do {
		g0 = vread32(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = vcfg_read32(d, off);
		hi = vcfg_read32(d, off + 4);
		g1 = vread32(d, VIRTIO_MMIO_CONFIG_GENERATION);
	} while (g0 != g1);
	return (uint64_t)hi << 32 | lo;
}
