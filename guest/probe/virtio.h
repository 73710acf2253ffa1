/* virtio.h - virtio-mmio device table and register access (CPL3).
 *
 * Devices come from the kernel command line, in the syntax of Linux's
 * virtio_mmio driver: virtio_mmio.device=<size>@<base>:<irq>[:<id>]
 * (size and base in memparse syntax, e.g. 4K@0xd0000000:5 or
 * 512@0xfeb00e00:12). Register reads and writes are plain 32-bit MMIO
 * accesses, done at CPL3 (the probe maps 0xC0000000-0xFFFFFFFF user-
 * accessible and uncached). Offsets: virtio 1.2 section 4.2.2.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "probe.h"

#define VIRTIO_MMIO_MAGIC_VALUE   0x000
#define VIRTIO_MMIO_VERSION       0x004
#define VIRTIO_MMIO_DEVICE_ID     0x008
#define VIRTIO_MMIO_VENDOR_ID     0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL     0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM     0x038
#define VIRTIO_MMIO_QUEUE_READY   0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY  0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS        0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW   0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH  0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_QUEUE_RESET   0x0c0
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG        0x100

#define VIRTIO_MAGIC 0x74726976u /* "virt" */

#define MAX_VDEVS 32

struct vdev {
	uint64_t base, size;
	uint32_t irq;
	uint32_t magic, version, device_id, vendor_id; /* read by vdev_probe() */
	int probed;  /* 1 if the ID registers were read */
};

extern struct vdev vdevs[MAX_VDEVS];
extern unsigned nvdevs;

/* Parse one virtio_mmio.device= value into the table; 0 or -1 (malformed,
 * outside the probe's 4 GiB map, or table full). */
int vdev_add(const char *val, size_t len);
/* Read MagicValue/Version/DeviceID/VendorID of every device. */
void vdev_probe_all(void);
/* The nth (0-based) device with the given virtio device ID, or NULL. */
struct vdev *vdev_find(uint32_t device_id, unsigned nth);

static inline uint32_t vread32(const struct vdev *d, uint32_t off)
{
	return *(volatile uint32_t *)(d->base + off);
}

static inline void vwrite32(const struct vdev *d, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(d->base + off) = v;
}

/* ---- the driver (virtio.c): virtio 1.2 sections 2, 3.1.1, 4.2.2 ------- */

/* Device status bits (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED      128

/* InterruptStatus bits (4.2.2). */
#define VIRTIO_ISR_USED   1
#define VIRTIO_ISR_CONFIG 2

/* Device-independent feature bits (6). */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX     29
#define VIRTIO_F_VERSION_1     32
#define BIT(n) ((uint64_t)1 << (n))

/* Device IDs (5). */
#define VIRTIO_ID_BLK     2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG     4

/* Split virtqueue layout (2.7). */
struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};
#define VIRTQ_DESC_F_NEXT     1
#define VIRTQ_DESC_F_WRITE    2
#define VIRTQ_DESC_F_INDIRECT 4

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[]; /* [size], then used_event (EVENT_IDX) */
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[]; /* [size], then avail_event (EVENT_IDX) */
};

/* Queues the probe uses: at most this many entries, at most this many
 * queues per device. Each (device, queue) owns one static 4 KiB page:
 * descriptor table at +0, driver area (avail) at +1024, device area (used)
 * at +2048, an indirect table of VQ_MAX_SIZE descriptors at +3072. */
#define VQ_MAX_SIZE 16
#define VDRV_MAX_QUEUES 2

/* How long a driver waits for a used buffer, in TSC cycles (seconds at
 * any plausible TSC rate; reached only when a device fails to answer). */
#define VQ_TIMEOUT_TSC 10000000000ULL

struct vq {
	uint16_t index, size;
	volatile struct virtq_desc *desc, *indirect;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t avail_idx; /* next avail index the driver publishes */
	uint16_t last_used; /* next used index the driver consumes */
	uint16_t head;      /* head of the chain in flight */
};

struct vdrv {
	struct vdev *dev;
	uint64_t offered, acked;
	unsigned nq;
	int event_idx, indirect;
	struct vq q[VDRV_MAX_QUEUES];
	char err[160]; /* why the last failing call failed */
};

/* One buffer of a chain: guest-physical address (= virtual), length,
 * device-writable or not. */
struct vbuf {
	uint64_t addr;
	uint32_t len;
	int writable;
};

/* x86 is TSO: a compiler barrier orders descriptor/ring stores before the
 * avail idx store, and the used idx load before the used entry loads.
 * A store followed by a load of another location (avail idx, then
 * avail_event) needs a full fence. */
#define vbarrier() __asm__ volatile("" ::: "memory")
#define vmb() __asm__ volatile("mfence" ::: "memory")

/* Record why something failed (printf subset of lib.c) in v->err; -1. */
int verr(struct vdrv *v, const char *f, ...) __attribute__((format(printf, 2, 3)));

/* Reset (Status = 0) and read Status back. */
uint32_t vdrv_reset(struct vdrv *v);
/* Both 32-bit pages of DeviceFeatures. */
uint64_t vdrv_device_features(struct vdev *d);
/* Write DriverFeatures (both pages). */
void vdrv_write_features(struct vdev *d, uint64_t f);
/* The initialisation of 3.1.1 on the transport of 4.2.2.3.2: reset,
 * ACKNOWLEDGE, DRIVER, features (want & offered; VERSION_1 must be offered;
 * EVENT_IDX and INDIRECT_DESC taken when offered and wanted), FEATURES_OK
 * and its read-back, queues 0..nq-1 set up and ready, DRIVER_OK. 0, or -1
 * with the reason in v->err. */
int vdrv_init(struct vdrv *v, struct vdev *d, uint64_t want, unsigned nq);
/* Set up queue qi (QueueSel ... QueueReady = 1) on ring memory zeroed here. */
int vq_setup(struct vdrv *v, unsigned qi);
/* Publish a chain (readable buffers first) as direct descriptors 0..n-1,
 * or, with indirect, as one descriptor pointing to a table of n. No
 * notification. Returns the head index. */
unsigned vq_publish(struct vdrv *v, unsigned qi, const struct vbuf *b, unsigned n,
		    int indirect);
/* Notify the device of queue qi if it wants it (EVENT_IDX: avail_event). */
void vq_kick(struct vdrv *v, unsigned qi, uint16_t old_idx);
/* Wait (polling, bounded) for the next used element. 0, or -1 on timeout. */
int vq_wait(struct vdrv *v, unsigned qi, uint32_t *id, uint32_t *len);
/* Publish, kick, wait, and check the used id is our head. 0 or -1. */
int vq_request(struct vdrv *v, unsigned qi, const struct vbuf *b, unsigned n,
	       int indirect, uint32_t *len);
/* Device config space: 32-bit read, and 64-bit read as two 32-bit reads
 * under an unchanged ConfigGeneration (4.2.2.2). */
uint32_t vcfg_read32(struct vdev *d, uint32_t off);
uint64_t vcfg_read64(struct vdev *d, uint32_t off);

/* ---- interrupts (kernel.c handles vectors 32-255 at CPL0) -------------- */

#define IOAPIC_BASE 0xfec00000ULL
#define LAPIC_BASE  0xfee00000ULL
#define IRQ_VECTOR_BASE 0x30 /* device irq n -> vector 0x30 + n */

/* Filled in by CPL3 (base), updated by the CPL0 handler: for a device
 * vector, read InterruptStatus, write it to InterruptACK, read it again,
 * send the LAPIC EOI. */
struct irq_slot {
	volatile uint64_t base;     /* virtio-mmio base, 0: just EOI */
	volatile uint32_t count;    /* interrupts taken */
	volatile uint32_t isr;      /* InterruptStatus before the ACK (last) */
	volatile uint32_t isr_after; /* InterruptStatus after the ACK (last) */
};
extern struct irq_slot irq_slots[256];

/* ---- options of the device checks (user.c parses, vcheck.c reads) ------ */
struct vopts {
	uint64_t blk_sectors, blk_pattern, blk_index;
	int have_blk_sectors, have_blk_pattern, blk_ro, strict;
	uint64_t snap_steps; /* the snapshot check's steps (0: the default) */
	const char *blk_serial; /* not NUL-terminated */
	size_t blk_serial_len;
	int have_blk_serial;
};
extern struct vopts vopt;

/* vcheck.c: the device checks */
void check_rng(const char *name);
void check_rng_irq(const char *name);
void check_blk(const char *name);
int blk_smoke(const char **err);
void check_console(const char *name);
void check_features_refused(const char *name);
void check_bad_chain(const char *name);
void check_reset(const char *name);
/* badrv.c: a driver that breaks the rules on purpose (for --check-driver) */
void check_bad_driver(const char *name);

/* snap.c: the snapshot check, and the device steps it uses (vcheck.c, blk.c) */
void check_snapshot(const char *name);
int rng_snap(int init, uint8_t *buf, const char **err);
int blk_snap_init(uint64_t *cap, const char **err);
int blk_snap_write(uint64_t sector, uint64_t seed, int flush, const char **err);
int blk_snap_read(uint64_t sector, unsigned n, uint64_t seed, const char **err);

#endif
