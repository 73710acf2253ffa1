/* snap.c - the snapshot check (CPL3): a deterministic counting loop for a
 * VMM to snapshot part way, with device work on both sides of it and, with
 * a disk, block writes all through it.
 *
 * Before the loop: one virtio-rng request (if there is an rng device) and,
 * with probe.blk_pattern=<seed> and a virtio-blk device, a write of sector
 * SNAP_SECTOR with the pattern of seed+2 and a FLUSH. The loop:
 * probe.snap_steps (default 40) steps of SNAP_WORK rounds of a 64-bit
 * mixing function, each step printing its number and the running value, a
 * line at a time; with the disk, each step also writes SNAP_WRITES sectors
 * (one request each, spread over the step's work) from SNAP_BASE on, each
 * sector once, with seed+3's pattern. After it: another rng request on the
 * same queue, sector SNAP_SECTOR and every sector the loop wrote read back
 * through the same queue and compared. In a VM restored from a snapshot taken
 * during the loop these use the restored transport and rings: a request lost
 * at the snapshot times out, one completed twice breaks the used index check
 * (virtio.c), one not written leaves the wrong bytes. The step lines depend
 * only on the step, so a restored VM prints exactly the lines the original
 * printed after the snapshot; the ok line carries a digest of the second rng
 * request (restored clones each get their own).
 */
#include "virtio.h"

#define SNAP_STEPS 40
#define SNAP_SECTOR 16 /* no other check reads or writes it, nor 64 on */
#define SNAP_BASE 64
#define SNAP_WRITES 32 /* per step */
#define SNAP_WORK (1u << 23)

static uint8_t snap_rng[64] __attribute__((aligned(64)));

static uint32_t fnv1a(const uint8_t *p, size_t n)
{
	uint32_t h = 2166136261u;
	while (n--)
		h = (h ^ *p++) * 16777619u;
	return h;
}

/* Read back what was written (see above); 0 or -1 (why in *err). */
static int blk_after(uint64_t steps, const char **err)
{
	uint64_t s, seed = vopt.blk_pattern, end = SNAP_BASE + steps * SNAP_WRITES;
	if (blk_snap_read(SNAP_SECTOR, 1, seed + 2, err))
		return -1;
	for (s = SNAP_BASE; s < end; s += 8)
		if (blk_snap_read(s, end - s < 8 ? (unsigned)(end - s) : 8, seed + 3, err))
			return -1;
	return 0;
}

void check_snapshot(const char *name)
{
	uint64_t steps = vopt.snap_steps ? vopt.snap_steps : SNAP_STEPS;
	uint64_t h = 0x9E3779B97F4A7C15ULL, i, cap = 0, seed = vopt.blk_pattern;
	uint32_t j;
	const char *err;
	int rng = vdev_find(VIRTIO_ID_RNG, 0) != NULL;
	int blk = vopt.have_blk_pattern &&
		  vdev_find(VIRTIO_ID_BLK, (unsigned)vopt.blk_index) != NULL;
	char rngtxt[12] = "absent";

	if (rng && rng_snap(1, snap_rng, &err))
		return check_fail(name, "rng before: %s", err);
	if (blk && blk_snap_init(&cap, &err))
		return check_fail(name, "blk init: %s", err);
	if (blk && cap < SNAP_BASE + steps * SNAP_WRITES)
		return check_fail(name, "the disk has %lu sectors, the loop writes up to %lu", cap,
				  SNAP_BASE + steps * SNAP_WRITES);
	if (blk && blk_snap_write(SNAP_SECTOR, seed + 2, 1, &err))
		return check_fail(name, "blk write before: %s", err);
	out("probe: snapshot start steps=%lu rng=%s blk=%s\r\n", steps, rng ? "yes" : "no",
	    blk ? "yes" : "no");
	out_flush();
	for (i = 1; i <= steps; i++) {
		for (j = 0; j < SNAP_WORK; j++) {
			h = (h ^ (h >> 29)) * 0xBF58476D1CE4E5B9ULL + i;
			if (blk && j % (SNAP_WORK / SNAP_WRITES) == 0) {
				uint64_t s = SNAP_BASE + (i - 1) * SNAP_WRITES +
					     j / (SNAP_WORK / SNAP_WRITES);
				if (blk_snap_write(s, seed + 3, 0, &err))
					return check_fail(name, "blk write in step %lu: %s", i, err);
			}
		}
		out("probe: snapshot step %lu/%lu h=0x%lx\r\n", i, steps, h);
		out_flush();
	}
	if (rng) {
		if (rng_snap(0, snap_rng, &err))
			return check_fail(name, "rng after: %s", err);
		static const char hex[] = "0123456789abcdef";
		uint32_t d = fnv1a(snap_rng, sizeof(snap_rng));
		for (j = 0; j < 8; j++)
			rngtxt[j] = hex[(d >> (28 - 4 * j)) & 15];
		rngtxt[8] = 0;
	}
	if (blk && blk_after(steps, &err))
		return check_fail(name, "blk read after: %s", err);
	check_ok(name, "steps=%lu h=0x%lx rng=%s blk=%s", steps, h, rngtxt,
		 blk ? "ok" : "absent");
}
