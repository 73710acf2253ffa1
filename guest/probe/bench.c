/* bench.c - the probe's benchmark mode (CPL3): the check `bench`.
 *
 * Each workload named by probe.bench= runs once, timed with rdtsc at CPL3
 * (native speed on hosts that emulate guest CPL0); nothing in a timed region
 * asks CPL0 for anything (output is buffered and flushed between workloads).
 * One line per workload:
 *   probe: bench <name> n=<ops> cycles=<c> tsc_khz=<k> tsc_src=<src> ...
 * tsc_khz comes from CPUID (0x15, 0x40000010 or 0x16, in that order of
 * trust); 0 with tsc_src=none when the guest cannot tell, and the host
 * converts with its own TSC rate (guest and host share the TSC when KVM does
 * not scale it). Derived rates (ops_per_s, mb_per_s) are printed only when
 * tsc_khz is known.
 *
 * Workloads:
 *   mmio             n reads of MagicValue of the first virtio device, each
 *                    bracketed by rdtsc (per-read min and max reported)
 *   rng              n requests of 16 bytes on the first virtio-rng, one at a
 *                    time: publish, kick (unless the device set
 *                    VIRTQ_USED_F_NO_NOTIFY), poll the used ring; the used
 *                    id and that used idx moved by exactly 1 are checked
 *   blk_rand4k_qd1   n 4 KiB reads at random 4 KiB-aligned sectors, one at a time
 *   blk_rand4k_qd32  n 4 KiB random reads, 32 in flight (refilled as they complete)
 *   blk_seq1m_read   probe.bench_mb 1 MiB reads from sector 0 on (wrapping)
 *   blk_seq1m_write  the same, writes (the image's contents are overwritten)
 *   net_tx64, net_tx1500, net_rr   the first virtio-net (netbench.c)
 * The blk workloads use the first virtio-blk with a queue of up to 256 entries
 * (3 descriptors per request), no EVENT_IDX, no indirect descriptors, and
 * VIRTQ_AVAIL_F_NO_INTERRUPT: completion is found by polling, as for rng.
 * rng and blk lines end in kicks=<QueueNotify writes> (the rest were suppressed
 * by the device's NO_NOTIFY flag).
 */
#include "bench.h"
#include "netbench.h"
#include "virtio.h"

#define VIRTIO_BLK_T_IN  0
#define VIRTIO_BLK_T_OUT 1
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1
#define RAND_BYTES 4096
#define SEQ_BYTES (1u << 20)
#define QD_MAX 32
#define BQ_MAX 256

static struct {
	const char *list; /* probe.bench value, not NUL-terminated */
	size_t list_len;
	uint64_t n, mb;
} bopt = { NULL, 0, 1000, 16 };

int bench_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad)
{
	*bad = !has_val;
	if (netbench_option(k, kl, v, vl, has_val, bad))
		return 1;
	if (str_eq_n(k, kl, "probe.bench")) {
		bopt.list = v;
		bopt.list_len = vl;
	} else if (str_eq_n(k, kl, "probe.bench_n")) {
		*bad = *bad || parse_size(v, vl, &bopt.n) || bopt.n == 0 || bopt.n > (1ULL << 32);
	} else if (str_eq_n(k, kl, "probe.bench_mb")) {
		*bad = *bad || parse_size(v, vl, &bopt.mb) || bopt.mb == 0 || bopt.mb > (1ULL << 20);
	} else {
		return 0;
	}
	return 1;
}

/* ---- the TSC rate ------------------------------------------------------- */

static void cpuid(uint32_t leaf, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			 : "a"(leaf), "c"(0));
}

static uint64_t tsc_khz(const char **src)
{
	uint32_t r[4], max;
	cpuid(0, r);
	max = r[0];
	if (max >= 0x15) {
		cpuid(0x15, r); /* TSC = crystal (ECX Hz) * EBX / EAX */
		if (r[0] && r[1] && r[2]) {
			*src = "cpuid15";
			return (uint64_t)r[2] * r[1] / r[0] / 1000;
		}
	}
	cpuid(0x40000000, r);
	if (r[0] >= 0x40000010 && r[0] < 0x40000100 && (r[1] | r[2] | r[3])) {
		cpuid(0x40000010, r);
		if (r[0]) {
			*src = "cpuid40000010";
			return r[0];
		}
	}
	if (max >= 0x16) {
		cpuid(0x16, r); /* base frequency in MHz: nominal, not measured */
		if (r[0] & 0xffff) {
			*src = "cpuid16";
			return (uint64_t)(r[0] & 0xffff) * 1000;
		}
	}
	*src = "none";
	return 0;
}

static uint64_t khz;
static const char *khz_src;

static int seterr(char *err, size_t errlen, const char *s)
{
	size_t i;
	for (i = 0; i + 1 < errlen && s[i]; i++)
		err[i] = s[i];
	err[i] = 0;
	return -1;
}

uint64_t bench_tsc_khz(void)
{
	return khz;
}

/* "n=.. cycles=.. tsc_khz=.. tsc_src=.." and, with a known rate, ops/s. */
void bench_line_head(const char *name, uint64_t n, uint64_t cycles)
{
	out("probe: bench %s n=%lu cycles=%lu tsc_khz=%lu tsc_src=%s", name, n, cycles, khz,
	    khz_src);
	if (khz && cycles)
		out(" ops_per_s=%lu ns_per_op=%lu", n * khz * 1000 / cycles,
		    cycles * 1000000 / khz / n);
}

/* xorshift64*: the random sectors (same sequence in every run). */
static uint64_t rng_state = 0x2545F4914F6CDD1DULL;
static uint64_t prng(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DULL;
}

/* ---- mmio --------------------------------------------------------------- */

static int bench_mmio(const char *name, char *err, size_t errlen)
{
	const struct vdev *d = nvdevs ? &vdevs[0] : NULL;
	uint64_t i, t0, t1, a, b, dt, lo = ~0ULL, hi = 0;
	uint32_t bad = 0;
	if (!d)
		return seterr(err, errlen, "mmio: no virtio device");
	t0 = rdtsc();
	for (i = 0; i < bopt.n; i++) {
		a = rdtsc();
		bad |= vread32(d, VIRTIO_MMIO_MAGIC_VALUE) ^ VIRTIO_MAGIC;
		b = rdtsc();
		dt = b - a;
		if (dt < lo)
			lo = dt;
		if (dt > hi)
			hi = dt;
	}
	t1 = rdtsc();
	if (bad)
		return seterr(err, errlen, "mmio: MagicValue read wrong");
	bench_line_head(name, bopt.n, t1 - t0);
	out(" min=%lu max=%lu base=0x%lx\r\n", lo, hi, d->base);
	return 0;
}

/* ---- rng ---------------------------------------------------------------- */

static struct vdrv rng_drv;
static uint8_t rng_buf[16] __attribute__((aligned(16)));

static int bench_rng(const char *name, char *err, size_t errlen)
{
	struct vdrv *v = &rng_drv;
	struct vdev *d = vdev_find(VIRTIO_ID_RNG, 0);
	struct vbuf b = { (uint64_t)rng_buf, sizeof(rng_buf), 1 };
	struct vq *q = &v->q[0];
	uint64_t i, t0, t1, bytes = 0, kicks = 0;
	uint32_t len, id;
	if (!d)
		return seterr(err, errlen, "rng: no virtio-rng");
	if (vdrv_init(v, d, 0, 1))
		return seterr(err, errlen, v->err);
	q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	t0 = rdtsc();
	for (i = 0; i < bopt.n; i++) {
		uint16_t before = q->last_used;
		vq_publish(v, 0, &b, 1, 0);
		vmb(); /* the avail idx store before the used flags load */
		if (!(q->used->flags & VIRTQ_USED_F_NO_NOTIFY)) {
			vwrite32(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
			kicks++;
		}
		if (vq_wait(v, 0, &id, &len))
			break;
		if (id != 0 || (uint16_t)(q->used->idx - before) != 1) {
			verr(v, "request %lu: used id %u, used idx %u (want %u)", i, id,
			     q->used->idx, (uint16_t)(before + 1));
			break;
		}
		bytes += len;
	}
	t1 = rdtsc();
	vdrv_reset(v);
	if (i < bopt.n)
		return seterr(err, errlen, v->err);
	bench_line_head(name, bopt.n, t1 - t0);
	out(" bytes=%lu kicks=%lu\r\n", bytes, kicks);
	return 0;
}

/* ---- blk: a driver with QD_MAX requests in flight ----------------------- */

struct blk_hdr {
	uint32_t type, reserved;
	uint64_t sector;
};

static struct {
	struct vdev *dev;
	uint16_t size, avail_idx, last_used, depth;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint64_t capacity, kicks;
} bq;

static uint8_t bq_mem[3][4096] __attribute__((aligned(4096))); /* desc, avail, used */
static struct blk_hdr bq_hdr[QD_MAX] __attribute__((aligned(16)));
static volatile uint8_t bq_status[QD_MAX];
static uint8_t bq_data[SEQ_BYTES] __attribute__((aligned(4096)));

static int blk_fail(char *err, size_t errlen, const char *what, uint32_t v)
{
	static struct vdrv tmp;
	verr(&tmp, "%s (0x%x)", what, v);
	return seterr(err, errlen, tmp.err);
}

/* virtio 1.2 §3.1.1 with one queue of up to BQ_MAX entries; VERSION_1 only. */
static int bq_init(char *err, size_t errlen)
{
	struct vdev *d = vdev_find(VIRTIO_ID_BLK, 0);
	struct vdrv v;
	uint32_t s, max, size;
	uint64_t off;
	if (!d)
		return blk_fail(err, errlen, "blk: no virtio-blk device", 0);
	v.dev = d;
	if ((s = vdrv_reset(&v)) != 0)
		return blk_fail(err, errlen, "blk: Status after reset", s);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	off = vdrv_device_features(d);
	if (!(off & BIT(VIRTIO_F_VERSION_1)))
		return blk_fail(err, errlen, "blk: VERSION_1 not offered", (uint32_t)off);
	vdrv_write_features(d, BIT(VIRTIO_F_VERSION_1));
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
		 VIRTIO_STATUS_FEATURES_OK);
	s = vread32(d, VIRTIO_MMIO_STATUS);
	if (!(s & VIRTIO_STATUS_FEATURES_OK))
		return blk_fail(err, errlen, "blk: FEATURES_OK refused", s);
	vwrite32(d, VIRTIO_MMIO_QUEUE_SEL, 0);
	max = vread32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	for (size = BQ_MAX; size > max; size >>= 1)
		;
	if (size < 4)
		return blk_fail(err, errlen, "blk: QueueNumMax too small", max);
	memset(bq_mem, 0, sizeof(bq_mem));
	bq.dev = d;
	bq.size = (uint16_t)size;
	bq.depth = (uint16_t)(size / 3 < QD_MAX ? size / 3 : QD_MAX);
	bq.desc = (volatile struct virtq_desc *)bq_mem[0];
	bq.avail = (volatile struct virtq_avail *)bq_mem[1];
	bq.used = (volatile struct virtq_used *)bq_mem[2];
	bq.avail_idx = bq.last_used = 0;
	bq.kicks = 0;
	bq.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	vwrite32(d, VIRTIO_MMIO_QUEUE_NUM, size);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)(uint64_t)bq.desc);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)bq.avail);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)bq.used);
	vwrite32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
	vwrite32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	vwrite32(d, VIRTIO_MMIO_STATUS, s | VIRTIO_STATUS_DRIVER_OK);
	s = vread32(d, VIRTIO_MMIO_STATUS);
	if (s != 0xf)
		return blk_fail(err, errlen, "blk: Status after DRIVER_OK", s);
	bq.capacity = vcfg_read64(d, 0);
	if (bq.capacity < SEQ_BYTES / 512)
		return blk_fail(err, errlen, "blk: disk smaller than 1 MiB, sectors",
				(uint32_t)bq.capacity);
	return 0;
}

/* Put request slot s (descriptors 3s..3s+2) in the avail ring; not published. */
static void bq_add(unsigned s, uint32_t type, uint64_t sector, uint8_t *data, uint32_t len)
{
	volatile struct virtq_desc *t = &bq.desc[3 * s];
	bq_hdr[s].type = type;
	bq_hdr[s].reserved = 0;
	bq_hdr[s].sector = sector;
	bq_status[s] = 0xff;
	t[0].addr = (uint64_t)&bq_hdr[s];
	t[0].len = sizeof(struct blk_hdr);
	t[0].flags = VIRTQ_DESC_F_NEXT;
	t[0].next = (uint16_t)(3 * s + 1);
	t[1].addr = (uint64_t)data;
	t[1].len = len;
	t[1].flags = (uint16_t)(VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0));
	t[1].next = (uint16_t)(3 * s + 2);
	t[2].addr = (uint64_t)&bq_status[s];
	t[2].len = 1;
	t[2].flags = VIRTQ_DESC_F_WRITE;
	t[2].next = 0;
	bq.avail->ring[bq.avail_idx++ % bq.size] = (uint16_t)(3 * s);
}

/* Publish what bq_add() queued and notify unless the device said not to. */
static void bq_kick(void)
{
	vbarrier();
	bq.avail->idx = bq.avail_idx;
	vmb();
	if (!(bq.used->flags & VIRTQ_USED_F_NO_NOTIFY)) {
		vwrite32(bq.dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
		bq.kicks++;
	}
}

/* Wait for at least one used element. 0, or -1 on timeout. */
static int bq_wait(void)
{
	uint64_t t0 = rdtsc();
	while (bq.used->idx == bq.last_used)
		if (rdtsc() - t0 > VQ_TIMEOUT_TSC)
			return -1;
	vbarrier();
	return 0;
}

static uint64_t rand_sector(void)
{
	return (prng() % (bq.capacity / 8)) * 8; /* 4 KiB aligned, inside the disk */
}

/* n requests, up to depth in flight. 0, or -1 with err set. */
static int bq_run(uint64_t n, unsigned depth, uint32_t type, uint32_t len, int seq,
		  char *err, size_t errlen)
{
	uint64_t submitted = 0, done = 0, seq_sector = 0;
	unsigned s;
	for (s = 0; s < depth && submitted < n; s++, submitted++) {
		uint64_t sec = seq ? seq_sector : rand_sector();
		if (seq && (seq_sector += len / 512) + len / 512 > bq.capacity)
			seq_sector = 0;
		bq_add(s, type, sec, seq ? bq_data : bq_data + s * RAND_BYTES, len);
	}
	bq_kick();
	while (done < n) {
		int added = 0;
		if (bq_wait())
			return blk_fail(err, errlen, "blk: no used buffer, done", (uint32_t)done);
		while (bq.used->idx != bq.last_used) {
			volatile struct virtq_used_elem *e = &bq.used->ring[bq.last_used++ % bq.size];
			uint32_t id = e->id;
			s = id / 3;
			if (id % 3 || s >= depth)
				return blk_fail(err, errlen, "blk: bad used id", id);
			if (bq_status[s] != 0)
				return blk_fail(err, errlen, "blk: request status", bq_status[s]);
			done++;
			if (submitted < n) {
				uint64_t sec = seq ? seq_sector : rand_sector();
				if (seq && (seq_sector += len / 512) + len / 512 > bq.capacity)
					seq_sector = 0;
				bq_add(s, type, sec, seq ? bq_data : bq_data + s * RAND_BYTES, len);
				submitted++;
				added = 1;
			}
		}
		if (added)
			bq_kick();
	}
	return 0;
}

static int bench_blk(const char *name, unsigned depth, uint32_t type, int seq, char *err,
		     size_t errlen)
{
	uint32_t len = seq ? SEQ_BYTES : RAND_BYTES;
	uint64_t n = seq ? bopt.mb : bopt.n, t0, t1;
	if (bq_init(err, errlen))
		return -1;
	if (depth > bq.depth)
		depth = bq.depth;
	t0 = rdtsc();
	if (bq_run(n, depth, type, len, seq, err, errlen))
		return -1;
	t1 = rdtsc();
	vdrv_reset(&(struct vdrv){ .dev = bq.dev });
	bench_line_head(name, n, t1 - t0);
	if (khz)
		out(" mb_per_s=%lu", n * len * khz / 1000 / (t1 - t0) / 1000);
	out(" qd=%u bytes=%lu capacity=%lu kicks=%lu\r\n", depth, n * len, bq.capacity, bq.kicks);
	return 0;
}

/* ---- the check ---------------------------------------------------------- */

static int run_one(const char *w, size_t wl, char *err, size_t errlen)
{
	if (str_eq_n(w, wl, "mmio"))
		return bench_mmio("mmio", err, errlen);
	if (str_eq_n(w, wl, "rng"))
		return bench_rng("rng", err, errlen);
	if (str_eq_n(w, wl, "blk_rand4k_qd1"))
		return bench_blk("blk_rand4k_qd1", 1, VIRTIO_BLK_T_IN, 0, err, errlen);
	if (str_eq_n(w, wl, "blk_rand4k_qd32"))
		return bench_blk("blk_rand4k_qd32", QD_MAX, VIRTIO_BLK_T_IN, 0, err, errlen);
	if (str_eq_n(w, wl, "blk_seq1m_read"))
		return bench_blk("blk_seq1m_read", 1, VIRTIO_BLK_T_IN, 1, err, errlen);
	if (str_eq_n(w, wl, "blk_seq1m_write"))
		return bench_blk("blk_seq1m_write", 1, VIRTIO_BLK_T_OUT, 1, err, errlen);
	if (netbench_is(w, wl))
		return netbench_run(w, wl, bopt.n, err, errlen);
	return seterr(err, errlen, "unknown workload");
}

void check_bench(const char *name)
{
	const char *l = bopt.list;
	size_t n = bopt.list_len, i = 0, start;
	unsigned runs = 0;
	char err[120];
	if (!l || !n)
		return check_fail(name, "no workloads: give probe.bench=<name>[,<name>...]");
	khz = tsc_khz(&khz_src);
	while (i <= n) {
		start = i;
		while (i < n && l[i] != ',')
			i++;
		if (i > start) {
			out_flush(); /* CPL0 work stays out of the timed regions */
			err[0] = 0;
			if (run_one(l + start, i - start, err, sizeof(err)))
				return check_fail(name, "%s", err);
			runs++;
		}
		i++;
	}
	check_ok(name, "workloads=%u tsc_khz=%lu tsc_src=%s", runs, khz, khz_src);
}
