/* blk.c - the virtio-blk check (CPL3): virtio 1.2 section 5.2.
 *
 * Device: the probe.blk=<n>th virtio-blk (default 0). Sector pattern and
 * the sectors written: README.md ("Device checks").
 */
#include "virtio.h"

static struct vdrv blk_drv;

#define VIRTIO_BLK_F_SEG_MAX  2
#define VIRTIO_BLK_F_RO       5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH    9
#define VIRTIO_BLK_T_IN     0
#define VIRTIO_BLK_T_OUT    1
#define VIRTIO_BLK_T_FLUSH  4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK     0
#define VIRTIO_BLK_S_IOERR  1
#define BLK_ID_BYTES 20
#define BLK_WRITE_SECTORS 8 /* the last 8 sectors are written */
#define GOLDEN 0x9E3779B97F4A7C15ULL

struct blk_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static struct blk_hdr blk_hdr __attribute__((aligned(16)));
static volatile uint8_t blk_status;
static uint64_t blk_data[8 * 64] __attribute__((aligned(4096))); /* 8 sectors */
static unsigned blk_segmax;

/* The pattern: 8-byte little-endian word w (0-63) of sector s holds
 * seed * 0x9E3779B97F4A7C15 + s * 64 + w (mod 2^64). */
static uint64_t pat(uint64_t seed, uint64_t s, unsigned w)
{
	return seed * GOLDEN + s * 64 + w;
}

static void pat_fill(uint64_t seed, uint64_t s0, unsigned n)
{
	unsigned i;
	for (i = 0; i < n * 64; i++)
		blk_data[i] = pat(seed, s0 + i / 64, i % 64);
}

static int pat_check(struct vdrv *v, uint64_t seed, uint64_t s0, unsigned n)
{
	unsigned i;
	for (i = 0; i < n * 64; i++)
		if (blk_data[i] != pat(seed, s0 + i / 64, i % 64))
			return verr(v, "sector %lu word %u is 0x%lx, want 0x%lx (seed %lu)",
				    s0 + i / 64, i % 64, blk_data[i], pat(seed, s0 + i / 64, i % 64),
				    seed);
	return 0;
}

static const char *blk_type_name(uint32_t t)
{
	return t == VIRTIO_BLK_T_IN ? "read" : t == VIRTIO_BLK_T_OUT ? "write" :
	       t == VIRTIO_BLK_T_FLUSH ? "flush" : "get_id";
}

/* One request: header (readable), data as nseg equal segments, status
 * (writable, last). Returns the status byte, or -1 (transport failure, or
 * a used len that is not what the device wrote when want_len >= 0). */
static int blk_req(uint32_t type, uint64_t sector, void *data, uint32_t len, unsigned nseg,
		   int indirect, int64_t want_len)
{
	struct vdrv *v = &blk_drv;
	struct vbuf b[4];
	uint32_t used, i, n = 0;
	int wr = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;

	if (nseg > blk_segmax)
		nseg = blk_segmax;
	blk_hdr.type = type;
	blk_hdr.reserved = 0;
	blk_hdr.sector = sector;
	b[n++] = (struct vbuf){ (uint64_t)&blk_hdr, sizeof(blk_hdr), 0 };
	for (i = 0; len && i < nseg; i++)
		b[n++] = (struct vbuf){ (uint64_t)data + i * (len / nseg),
					i + 1 < nseg ? len / nseg : len - i * (len / nseg), wr };
	b[n++] = (struct vbuf){ (uint64_t)&blk_status, 1, 1 };
	blk_status = 0xff;
	if (vq_request(v, 0, b, n, indirect, &used))
		return -1;
	if (blk_status == 0xff)
		return verr(v, "%s sector %lu: status byte not written", blk_type_name(type),
			    sector);
	if (want_len >= 0 && blk_status == VIRTIO_BLK_S_OK && used != (uint32_t)want_len)
		return verr(v, "%s sector %lu: used len %u, want %ld (bytes written)",
			    blk_type_name(type), sector, used, want_len);
	return blk_status;
}

/* A failed blk_req() result as text: the transport error or the status. */
static const char *stx(int st)
{
	static char b[16];
	if (st < 0)
		return blk_drv.err;
	b[0] = 's', b[1] = 't', b[2] = 'a', b[3] = 't', b[4] = 'u', b[5] = 's', b[6] = ' ';
	b[7] = (char)('0' + st / 100 % 10), b[8] = (char)('0' + st / 10 % 10);
	b[9] = (char)('0' + st % 10), b[10] = 0;
	return b;
}

/* Read n sectors at s and compare with the pattern of seed (if given). */
static int blk_read(uint64_t s, unsigned n, unsigned nseg, int indirect, int have_seed,
		    uint64_t seed)
{
	int st;
	memset(blk_data, 0, n * 512);
	st = blk_req(VIRTIO_BLK_T_IN, s, blk_data, n * 512, nseg, indirect, n * 512 + 1);
	if (st < 0)
		return -1;
	if (st != VIRTIO_BLK_S_OK)
		return verr(&blk_drv, "read sectors %lu-%lu (%u segments%s): status %d, want 0",
			    s, s + n - 1, nseg, indirect ? ", indirect" : "", st);
	return have_seed ? pat_check(&blk_drv, seed, s, n) : 0;
}

static void printable(char *dst, const uint8_t *src, size_t n)
{
	size_t i;
	for (i = 0; i < n && src[i]; i++)
		dst[i] = (src[i] > 0x20 && src[i] < 0x7f) ? (char)src[i] : '?';
	dst[i] = 0;
}

void check_blk(const char *name)
{
	struct vdrv *v = &blk_drv;
	struct vdev *d = vdev_find(VIRTIO_ID_BLK, (unsigned)vopt.blk_index);
	uint64_t cap, seed = vopt.blk_pattern, want;
	int ro, hp = vopt.have_blk_pattern, st, flush;
	unsigned reads = 0, written = 0;
	static uint8_t id[BLK_ID_BYTES + 1] __attribute__((aligned(8)));
	char idtxt[BLK_ID_BYTES + 1];
	size_t idlen;

	if (!d)
		return check_fail(name, "no virtio-blk device (virtio device ID 2) with index %lu",
				  vopt.blk_index);
	want = BIT(VIRTIO_BLK_F_RO) | BIT(VIRTIO_BLK_F_FLUSH) | BIT(VIRTIO_BLK_F_SEG_MAX) |
	       BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_F_EVENT_IDX) | BIT(VIRTIO_F_INDIRECT_DESC);
	if (vdrv_init(v, d, want, 1))
		return check_fail(name, "init: %s", v->err);
	blk_segmax = 2;
	if ((v->acked & BIT(VIRTIO_BLK_F_SEG_MAX)) && vcfg_read32(d, 12) < 2)
		blk_segmax = 1;
	if (blk_segmax == 0)
		blk_segmax = 1;
	cap = vcfg_read64(d, 0);
	if (vopt.have_blk_sectors && cap != vopt.blk_sectors)
		return check_fail(name, "capacity %lu sectors, probe.blk_sectors=%lu", cap,
				  vopt.blk_sectors);
	if (cap < 32)
		return check_fail(name, "capacity %lu sectors: the check needs at least 32", cap);
	ro = !!(v->acked & BIT(VIRTIO_BLK_F_RO));
	if (ro != vopt.blk_ro)
		return check_fail(name, "device %s VIRTIO_BLK_F_RO but probe.blk_ro=%d",
				  ro ? "offers" : "does not offer", vopt.blk_ro);

	/* Reads: one sector as a 3-descriptor chain, 8 sectors in 2 data
	 * segments, 4 through an indirect table, the last sector. */
	if (blk_read(0, 1, 1, 0, hp, seed) || blk_read(1, 8, 2, 0, hp, seed) ||
	    (v->indirect && (reads++, blk_read(9, 4, 2, 1, hp, seed))) ||
	    blk_read(cap / 2, 1, 1, 0, hp, seed) || blk_read(cap - 1, 1, 1, 0, hp, seed))
		return check_fail(name, "%s", v->err);
	reads += 4;

	/* Writes: with a pattern, the last 8 sectors get the pattern of
	 * seed + 1 (the host checks them after exit); a read-only disk must
	 * refuse a write to sector 0 with IOERR and keep its data. */
	if (ro) {
		pat_fill(seed + 1, 0, 1);
		st = blk_req(VIRTIO_BLK_T_OUT, 0, blk_data, 512, 1, 0, 1);
		if (st != VIRTIO_BLK_S_IOERR)
			return check_fail(name, "write to a read-only disk: %s, want 1 (IOERR)",
					  stx(st));
		if (blk_read(0, 1, 1, 0, hp, seed))
			return check_fail(name, "after the refused write: %s", v->err);
	} else if (hp) {
		uint64_t s0 = cap - BLK_WRITE_SECTORS;
		pat_fill(seed + 1, s0, BLK_WRITE_SECTORS);
		st = blk_req(VIRTIO_BLK_T_OUT, s0, blk_data, BLK_WRITE_SECTORS * 512, 2, 0, 1);
		if (st != VIRTIO_BLK_S_OK)
			return check_fail(name, "write sectors %lu-%lu: %s", s0, cap - 1,
					  stx(st));
		written = BLK_WRITE_SECTORS;
		if (blk_read(s0, BLK_WRITE_SECTORS, 1, 0, 1, seed + 1) ||
		    blk_read(s0 - 1, 1, 1, 0, 1, seed))
			return check_fail(name, "read after write: %s", v->err);
	}

	/* FLUSH when offered. */
	flush = !!(v->acked & BIT(VIRTIO_BLK_F_FLUSH));
	if (flush) {
		st = blk_req(VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, 0, 1);
		if (st != VIRTIO_BLK_S_OK)
			return check_fail(name, "flush: %s", stx(st));
	}

	/* GET_ID: 20 bytes, NUL-padded if shorter. */
	memset(id, 0, sizeof(id));
	st = blk_req(VIRTIO_BLK_T_GET_ID, 0, id, BLK_ID_BYTES, 1, 0, -1);
	if (st != VIRTIO_BLK_S_OK)
		return check_fail(name, "get_id: %s", stx(st));
	printable(idtxt, id, BLK_ID_BYTES);
	for (idlen = 0; idlen < BLK_ID_BYTES && id[idlen]; idlen++)
		;
	if (vopt.have_blk_serial) {
		size_t n = vopt.blk_serial_len < BLK_ID_BYTES ? vopt.blk_serial_len : BLK_ID_BYTES;
		if (idlen != n || memcmp(id, vopt.blk_serial, n) != 0)
			return check_fail(name, "get_id: \"%s\" (%zu bytes), want probe.blk_serial "
					  "(first %zu bytes)", idtxt, idlen, n);
	}

	/* Past the end: a read at sector = capacity and a read that crosses
	 * the end must both get IOERR; then the device must still work. */
	st = blk_req(VIRTIO_BLK_T_IN, cap, blk_data, 512, 1, 0, -1);
	if (st != VIRTIO_BLK_S_IOERR)
		return check_fail(name, "read at sector %lu (= capacity): %s, want 1 (IOERR)",
				  cap, stx(st));
	st = blk_req(VIRTIO_BLK_T_IN, cap - 1, blk_data, 1024, 1, 0, -1);
	if (st != VIRTIO_BLK_S_IOERR)
		return check_fail(name, "read of sectors %lu-%lu (crosses the end): %s, want 1 "
				  "(IOERR)", cap - 1, cap, stx(st));
	if (blk_read(0, 1, 1, 0, hp, seed))
		return check_fail(name, "after the IOERRs: %s", v->err);
	reads++;
	check_ok(name, "capacity=%lu features=0x%lx ro=%d reads=%u written=%u flush=%s id=%s",
		 cap, v->acked, ro, reads, written, flush ? "yes" : "no", idlen ? idtxt : "-");
}

/* Used by bad_chain: one read of sector 0 on a freshly initialised blk
 * device (the first one); 0, 1 (no blk device) or -1 (why in *err). */
int blk_smoke(const char **err)
{
	struct vdev *d = vdev_find(VIRTIO_ID_BLK, 0);
	if (!d)
		return 1;
	*err = blk_drv.err;
	if (vdrv_init(&blk_drv, d, 0, 1))
		return -1;
	blk_segmax = 1;
	return blk_read(0, 1, 1, 0, 0, 0) ? -1 : 0;
}

/* The snapshot check (snap.c). blk_snap_init: initialise the blk device (0
 * or -1, why in *err) and its capacity in *cap. blk_snap_write: write one
 * sector with seed's pattern, then FLUSH if asked (and offered), on the queue
 * initialised before (after a restore: the restored queue). blk_snap_read:
 * read n <= 8 sectors back and compare. */
int blk_snap_init(uint64_t *cap, const char **err)
{
	struct vdev *d = vdev_find(VIRTIO_ID_BLK, (unsigned)vopt.blk_index);
	*err = blk_drv.err;
	if (!d)
		return verr(&blk_drv, "no virtio-blk device");
	if (vdrv_init(&blk_drv, d, BIT(VIRTIO_BLK_F_FLUSH), 1))
		return -1;
	blk_segmax = 1;
	*cap = vcfg_read64(d, 0);
	return 0;
}

int blk_snap_write(uint64_t sector, uint64_t seed, int flush, const char **err)
{
	int st;
	*err = blk_drv.err;
	pat_fill(seed, sector, 1);
	st = blk_req(VIRTIO_BLK_T_OUT, sector, blk_data, 512, 1, 0, -1);
	if (st)
		return st < 0 ? -1 : verr(&blk_drv, "write sector %lu: status %d", sector, st);
	if (flush && (blk_drv.acked & BIT(VIRTIO_BLK_F_FLUSH))) {
		st = blk_req(VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 1, 0, -1);
		if (st)
			return st < 0 ? -1 : verr(&blk_drv, "flush: status %d", st);
	}
	return 0;
}

int blk_snap_read(uint64_t sector, unsigned n, uint64_t seed, const char **err)
{
	*err = blk_drv.err;
	return blk_read(sector, n, 1, 0, 1, seed);
}
