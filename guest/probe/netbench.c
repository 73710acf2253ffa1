/* netbench.c - the network workloads of the `bench` check (CPL3), on the
 * first virtio-net device (ID 1), whose tap's peer is the host's Linux stack.
 *
 * The driver here is a batching one (the net check's driver in net.c keeps one
 * chain in flight): both queues of up to NQ_MAX entries, every chain one
 * descriptor (the 12-byte virtio_net_hdr_v1 followed by the frame, §5.1.6),
 * features VERSION_1 plus MAC and EVENT_IDX when offered (no MRG_RXBUF: an rx
 * buffer of RX_BUF bytes holds any frame of a 1500-byte MTU, §5.1.6.3.1; no
 * offloads). Completions are found by polling; interrupts are suppressed
 * (used_event kept half a ring-index space ahead with EVENT_IDX, else
 * VIRTQ_AVAIL_F_NO_INTERRUPT). Kicks follow EVENT_IDX's avail_event (else
 * VIRTQ_USED_F_NO_NOTIFY) and are counted. Each workload re-initialises the
 * device and resets it at the end; nothing in a timed region asks CPL0.
 *
 *   net_tx64, net_tx1500  probe.bench_pkts frames of 64 / 1500 bytes (Ethernet
 *       header included, no FCS) to a MAC no host has, EtherType 0x88b5 (IEEE
 *       local experimental): the host's stack counts each on the tap
 *       (rx_packets) and drops it. The tx ring is kept full: as used entries
 *       come back their descriptors are re-posted, then one publish (and a
 *       kick if the device asks for one). Timed from the first publish to the
 *       last used entry. ops_per_s = frames per second.
 *   net_rr  probe.bench_n ICMP echo requests (56-byte payload) to
 *       probe.bench_peer, one at a time, each waited for (its echo reply, found
 *       among the received frames; others are counted as ignored). The host
 *       must know the probe's MAC (a permanent neighbour entry: the probe does
 *       not answer ARP). ops_per_s = round trips per second.
 */
#include "netbench.h"
#include "net.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define NET_HDR_LEN 12
#define NQ_MAX 256
#define RX_BUF 2048
#define RXQ 0
#define TXQ 1
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_BENCH 0x88b5
#define IP_HLEN 20
#define ICMP_HLEN 8
#define RR_PAYLOAD 56
#define RR_FRAME (ETH_HLEN + IP_HLEN + ICMP_HLEN + RR_PAYLOAD)
#define ECHO_ID 0x7062 /* "pb" */
#define TX_MAX 1500

static struct {
	uint64_t pkts;
	uint8_t ip[4], peer[4], peer_mac[6];
	int have_ip, have_peer, have_peer_mac;
} nbopt = { .pkts = 10000 };

struct nq {
	uint16_t sel, size, avail_idx, last_used;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint64_t kicks;
};

static struct {
	struct vdev *dev;
	int event_idx;
	uint8_t mac[6];
	struct nq q[2];
} nd;

static uint8_t nq_mem[2][3][4096] __attribute__((aligned(4096))); /* desc, avail, used */
static uint8_t rx_mem[NQ_MAX][RX_BUF] __attribute__((aligned(64)));
static uint8_t rr_mem[NQ_MAX][128] __attribute__((aligned(64)));
static uint8_t tx_frame[NET_HDR_LEN + TX_MAX] __attribute__((aligned(64)));
static struct vdrv nscr; /* formats error messages */

static int nfail(char *err, size_t errlen)
{
	size_t i;
	for (i = 0; i + 1 < errlen && nscr.err[i]; i++)
		err[i] = nscr.err[i];
	err[i] = 0;
	return -1;
}
#define NFAIL(...) (verr(&nscr, __VA_ARGS__), nfail(err, errlen))

/* ---- options -------------------------------------------------------------- */

static int ip4(const char *v, size_t n, uint8_t ip[4])
{
	size_t i = 0;
	unsigned part, x, digits;
	for (part = 0; part < 4; part++) {
		for (x = 0, digits = 0; i < n && v[i] >= '0' && v[i] <= '9' && digits < 3; i++)
			x = x * 10 + (unsigned)(v[i] - '0'), digits++;
		if (!digits || x > 255 || (part < 3 && (i >= n || v[i++] != '.')))
			return -1;
		ip[part] = (uint8_t)x;
	}
	return i == n ? 0 : -1;
}

static int mac48(const char *v, size_t n, uint8_t mac[6])
{
	unsigned i, j;
	if (n != 17)
		return -1;
	for (i = 0; i < 6; i++) {
		unsigned b = 0;
		for (j = 0; j < 2; j++) {
			char c = v[3 * i + j];
			b = b << 4 | (unsigned)(c >= '0' && c <= '9' ? c - '0' :
				c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 99);
		}
		if (b > 255 || (i < 5 && v[3 * i + 2] != ':'))
			return -1;
		mac[i] = (uint8_t)b;
	}
	return 0;
}

int netbench_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad)
{
	if (str_eq_n(k, kl, "probe.bench_pkts"))
		*bad = !has_val || parse_size(v, vl, &nbopt.pkts) || !nbopt.pkts ||
		       nbopt.pkts > (1ULL << 32);
	else if (str_eq_n(k, kl, "probe.bench_ip"))
		*bad = !(nbopt.have_ip = has_val && !ip4(v, vl, nbopt.ip));
	else if (str_eq_n(k, kl, "probe.bench_peer"))
		*bad = !(nbopt.have_peer = has_val && !ip4(v, vl, nbopt.peer));
	else if (str_eq_n(k, kl, "probe.bench_peer_mac"))
		*bad = !(nbopt.have_peer_mac = has_val && !mac48(v, vl, nbopt.peer_mac));
	else
		return 0;
	return 1;
}

/* ---- the driver ----------------------------------------------------------- */

/* §3.1.1 with both queues; 0 or -1 with err set. */
static int nd_init(char *err, size_t errlen)
{
	struct vdev *d = vdev_find(VIRTIO_ID_NET, 0);
	struct vdrv v;
	uint64_t off, want;
	uint32_t s, max, size, qi, i;
	if (!d)
		return NFAIL("net: no virtio-net device (ID 1) among virtio_mmio.device=");
	v.dev = d;
	if ((s = vdrv_reset(&v)) != 0)
		return NFAIL("net: Status 0x%x after reset", s);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	off = vdrv_device_features(d);
	if (!(off & BIT(VIRTIO_F_VERSION_1)))
		return NFAIL("net: VERSION_1 not offered (0x%lx)", off);
	want = BIT(VIRTIO_F_VERSION_1) | (off & (BIT(VIRTIO_NET_F_MAC) | BIT(VIRTIO_F_EVENT_IDX)));
	vdrv_write_features(d, want);
	vwrite32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
		 VIRTIO_STATUS_FEATURES_OK);
	s = vread32(d, VIRTIO_MMIO_STATUS);
	if (!(s & VIRTIO_STATUS_FEATURES_OK))
		return NFAIL("net: FEATURES_OK refused for 0x%lx", want);
	nd.dev = d;
	nd.event_idx = !!(want & BIT(VIRTIO_F_EVENT_IDX));
	memset(nq_mem, 0, sizeof(nq_mem));
	for (qi = 0; qi < 2; qi++) {
		struct nq *q = &nd.q[qi];
		vwrite32(d, VIRTIO_MMIO_QUEUE_SEL, qi);
		if (vread32(d, VIRTIO_MMIO_QUEUE_READY))
			return NFAIL("net: queue %u ready before set-up", qi);
		max = vread32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
		for (size = NQ_MAX; size > max; size >>= 1)
			;
		if (size < 2)
			return NFAIL("net: queue %u: QueueNumMax %u", qi, max);
		q->sel = (uint16_t)qi;
		q->size = (uint16_t)size;
		q->avail_idx = q->last_used = 0;
		q->kicks = 0;
		q->desc = (volatile struct virtq_desc *)nq_mem[qi][0];
		q->avail = (volatile struct virtq_avail *)nq_mem[qi][1];
		q->used = (volatile struct virtq_used *)nq_mem[qi][2];
		if (nd.event_idx)
			q->avail->ring[size] = 0x8000; /* used_event: no interrupts */
		else
			q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
		vwrite32(d, VIRTIO_MMIO_QUEUE_NUM, size);
		vwrite32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)(uint64_t)q->desc);
		vwrite32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
		vwrite32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)q->avail);
		vwrite32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
		vwrite32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)q->used);
		vwrite32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
		vwrite32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	}
	vwrite32(d, VIRTIO_MMIO_STATUS, s | VIRTIO_STATUS_DRIVER_OK);
	if ((s = vread32(d, VIRTIO_MMIO_STATUS)) != 0xf)
		return NFAIL("net: Status 0x%x after DRIVER_OK", s);
	for (i = 0; i < 6; i++) /* §4.2.2.2: byte reads of the u8 mac[] */
		nd.mac[i] = (want & BIT(VIRTIO_NET_F_MAC)) ?
			*(volatile uint8_t *)(d->base + VIRTIO_MMIO_CONFIG + i) : (uint8_t)(i ? 0 : 2);
	return 0;
}

static void nd_reset(void)
{
	struct vdrv v = { .dev = nd.dev };
	vdrv_reset(&v);
}

static void nq_add(struct nq *q, uint32_t id)
{
	q->avail->ring[q->avail_idx++ % q->size] = (uint16_t)id;
}

/* Publish what nq_add() queued since old; kick if the device wants it (§2.7.10). */
static void nq_publish(struct nq *q, uint16_t old)
{
	vbarrier();
	q->avail->idx = q->avail_idx;
	vmb(); /* the avail idx store before the avail_event / flags load */
	if (nd.event_idx) {
		uint16_t ev = *(volatile uint16_t *)((uint64_t)q->used + 4 + 8u * q->size);
		if ((uint16_t)(q->avail_idx - ev - 1) >= (uint16_t)(q->avail_idx - old))
			return;
	} else if (q->used->flags & VIRTQ_USED_F_NO_NOTIFY) {
		return;
	}
	vwrite32(nd.dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->sel);
	q->kicks++;
}

/* The next used element: 1 (id < size, len set), 0 if none yet, -1 if the
 * device broke the ring (err set). */
static int nq_pop(struct nq *q, uint32_t *id, uint32_t *len, char *err, size_t errlen)
{
	volatile struct virtq_used_elem *e;
	uint16_t ahead = (uint16_t)(q->used->idx - q->last_used);
	if (!ahead)
		return 0;
	if (ahead > q->size)
		return NFAIL("net: queue %u: used idx %u ahead of %u by more than %u", q->sel,
			     q->used->idx, q->last_used, q->size);
	vbarrier(); /* the used idx load before the entry loads */
	e = &q->used->ring[q->last_used++ % q->size];
	*id = e->id;
	*len = e->len;
	if (nd.event_idx)
		q->avail->ring[q->size] = (uint16_t)(q->last_used + 0x8000);
	if (*id >= q->size)
		return NFAIL("net: queue %u: used id %u >= queue size %u", q->sel, *id, q->size);
	return 1;
}

/* ---- net_tx64, net_tx1500 ----------------------------------------------- */

static int bench_tx(const char *name, uint32_t flen, char *err, size_t errlen)
{
	static const uint8_t nobody[6] = { 0x02, 0, 0, 0, 0, 0x01 };
	struct nq *q = &nd.q[TXQ];
	uint64_t n = nbopt.pkts, sub = 0, done = 0, t0, t1, tw, khz;
	uint32_t i, id, len;
	uint16_t old;
	int r = 0;
	if (nd_init(err, errlen))
		return -1;
	memset(tx_frame, 0, NET_HDR_LEN); /* flags 0, GSO_NONE, num_buffers 0 */
	memcpy(tx_frame + NET_HDR_LEN, nobody, 6);
	memcpy(tx_frame + NET_HDR_LEN + 6, nd.mac, 6);
	tx_frame[NET_HDR_LEN + 12] = ETH_P_BENCH >> 8;
	tx_frame[NET_HDR_LEN + 13] = ETH_P_BENCH & 0xff;
	for (i = ETH_HLEN; i < flen; i++)
		tx_frame[NET_HDR_LEN + i] = (uint8_t)i;
	for (i = 0; i < q->size; i++) { /* read-only for the device: one frame for all */
		q->desc[i].addr = (uint64_t)tx_frame;
		q->desc[i].len = NET_HDR_LEN + flen;
		q->desc[i].flags = 0;
		q->desc[i].next = 0;
	}
	t0 = rdtsc();
	old = q->avail_idx;
	for (i = 0; i < q->size && sub < n; i++, sub++)
		nq_add(q, i);
	nq_publish(q, old);
	tw = t0;
	while (done < n) {
		old = q->avail_idx;
		while ((r = nq_pop(q, &id, &len, err, errlen)) > 0) {
			done++;
			if (sub < n) {
				nq_add(q, id);
				sub++;
			}
		}
		if (r < 0)
			return -1;
		if (q->avail_idx != old) {
			nq_publish(q, old);
			tw = rdtsc();
		} else if (rdtsc() - tw > VQ_TIMEOUT_TSC) {
			return NFAIL("%s: no used buffer for %lu TSC cycles (%lu of %lu sent)", name,
				     (uint64_t)VQ_TIMEOUT_TSC, done, n);
		}
	}
	t1 = rdtsc();
	nd_reset();
	khz = bench_tsc_khz();
	bench_line_head(name, n, t1 - t0);
	if (khz)
		out(" mb_per_s=%lu", n * flen * khz / 1000 / (t1 - t0) / 1000);
	out(" frame=%u bytes=%lu kicks=%lu queue_size=%u event_idx=%d\r\n", flen, n * flen,
	    q->kicks, q->size, nd.event_idx);
	return 0;
}

/* ---- net_rr ----------------------------------------------------------------- */

static unsigned csum(const uint8_t *p, size_t n) /* RFC 1071 */
{
	uint32_t s = 0;
	size_t i;
	for (i = 0; i + 1 < n; i += 2)
		s += (uint32_t)p[i] << 8 | p[i + 1];
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return ~s & 0xffff;
}

static void put16(uint8_t *p, unsigned v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

/* The echo request seq in buf (header + frame). */
static void echo_build(uint8_t *buf, unsigned seq)
{
	uint8_t *f = buf + NET_HDR_LEN, *ip = f + ETH_HLEN, *ic = ip + IP_HLEN;
	unsigned i;
	memset(buf, 0, NET_HDR_LEN);
	memcpy(f, nbopt.peer_mac, 6);
	memcpy(f + 6, nd.mac, 6);
	put16(f + 12, ETH_P_IP);
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, IP_HLEN + ICMP_HLEN + RR_PAYLOAD);
	put16(ip + 4, seq);
	put16(ip + 6, 0);
	ip[8] = 64;
	ip[9] = 1; /* ICMP */
	put16(ip + 10, 0);
	memcpy(ip + 12, nbopt.ip, 4);
	memcpy(ip + 16, nbopt.peer, 4);
	put16(ip + 10, csum(ip, IP_HLEN));
	ic[0] = 8;
	ic[1] = 0;
	put16(ic + 2, 0);
	put16(ic + 4, ECHO_ID);
	put16(ic + 6, seq);
	for (i = 0; i < RR_PAYLOAD; i++)
		ic[ICMP_HLEN + i] = (uint8_t)(i + seq);
	put16(ic + 2, csum(ic, ICMP_HLEN + RR_PAYLOAD));
}

/* 1 if rx buffer b (len bytes) is the echo reply for seq. */
static int echo_reply(const uint8_t *b, uint32_t len, unsigned seq)
{
	const uint8_t *f = b + NET_HDR_LEN, *ip = f + ETH_HLEN, *ic = ip + IP_HLEN;
	if (len < NET_HDR_LEN + RR_FRAME || f[12] != ETH_P_IP >> 8 || f[13] != (ETH_P_IP & 0xff) ||
	    ip[0] != 0x45 || ip[9] != 1 || memcmp(ip + 12, nbopt.peer, 4) ||
	    memcmp(ip + 16, nbopt.ip, 4))
		return 0;
	return ic[0] == 0 && ic[4] == ECHO_ID >> 8 && ic[5] == (ECHO_ID & 0xff) &&
	       ic[6] == (uint8_t)(seq >> 8) && ic[7] == (uint8_t)seq;
}

static int bench_rr(const char *name, uint64_t n, char *err, size_t errlen)
{
	struct nq *rx = &nd.q[RXQ], *tx = &nd.q[TXQ];
	uint64_t k, t0, t1, ignored = 0;
	uint32_t i, id, len;
	uint16_t old;
	int r;
	if (!nbopt.have_ip || !nbopt.have_peer || !nbopt.have_peer_mac)
		return NFAIL("%s needs probe.bench_ip=, probe.bench_peer= and probe.bench_peer_mac=",
			     name);
	if (nd_init(err, errlen))
		return -1;
	for (i = 0; i < rx->size; i++) {
		rx->desc[i].addr = (uint64_t)rx_mem[i];
		rx->desc[i].len = RX_BUF;
		rx->desc[i].flags = VIRTQ_DESC_F_WRITE;
		rx->desc[i].next = 0;
		nq_add(rx, i);
	}
	nq_publish(rx, 0);
	for (i = 0; i < tx->size; i++) {
		tx->desc[i].addr = (uint64_t)rr_mem[i];
		tx->desc[i].len = NET_HDR_LEN + RR_FRAME;
		tx->desc[i].flags = 0;
		tx->desc[i].next = 0;
	}
	t0 = rdtsc();
	for (k = 0; k < n; k++) {
		unsigned seq = (unsigned)(k & 0xffff);
		uint64_t tw = rdtsc();
		int got = 0;
		while ((r = nq_pop(tx, &id, &len, err, errlen)) > 0) /* reap sent requests */
			;
		if (r < 0)
			return -1;
		if ((uint16_t)(tx->avail_idx - tx->last_used) >= tx->size)
			return NFAIL("%s: transmitq full: %u requests not returned", name, tx->size);
		old = tx->avail_idx;
		echo_build(rr_mem[old % tx->size], seq);
		nq_add(tx, old % tx->size);
		nq_publish(tx, old);
		while (!got) {
			old = rx->avail_idx;
			while (!got && (r = nq_pop(rx, &id, &len, err, errlen)) > 0) {
				if (len > RX_BUF)
					return NFAIL("%s: used len %u > buffer %u", name, len, RX_BUF);
				got = echo_reply(rx_mem[id], len, seq);
				ignored += !got;
				nq_add(rx, id);
			}
			if (r < 0)
				return -1;
			if (rx->avail_idx != old)
				nq_publish(rx, old);
			if (!got && rdtsc() - tw > VQ_TIMEOUT_TSC)
				return NFAIL("%s: no echo reply %lu from %u.%u.%u.%u within %lu TSC "
					     "cycles (%lu other frames)", name, k, nbopt.peer[0],
					     nbopt.peer[1], nbopt.peer[2], nbopt.peer[3],
					     (uint64_t)VQ_TIMEOUT_TSC, ignored);
		}
	}
	t1 = rdtsc();
	nd_reset();
	bench_line_head(name, n, t1 - t0);
	out(" payload=%u tx_kicks=%lu rx_kicks=%lu ignored=%lu queue_size=%u event_idx=%d\r\n",
	    RR_PAYLOAD, tx->kicks, rx->kicks, ignored, rx->size, nd.event_idx);
	return 0;
}

/* ---- entry points ----------------------------------------------------------- */

int netbench_is(const char *w, size_t wl)
{
	return wl > 4 && memcmp(w, "net_", 4) == 0;
}

int netbench_run(const char *w, size_t wl, uint64_t n, char *err, size_t errlen)
{
	if (str_eq_n(w, wl, "net_tx64"))
		return bench_tx("net_tx64", 64, err, errlen);
	if (str_eq_n(w, wl, "net_tx1500"))
		return bench_tx("net_tx1500", TX_MAX, err, errlen);
	if (str_eq_n(w, wl, "net_rr"))
		return bench_rr("net_rr", n, err, errlen);
	return NFAIL("unknown network workload");
}
