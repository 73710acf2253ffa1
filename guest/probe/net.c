/* net.c - the `net` check: a virtio-net driver at CPL3 (virtio 1.2 §5.1)
 * whose peer is the host's own Linux network stack behind a TAP.
 *
 * Features: VERSION_1, MAC, MRG_RXBUF and STATUS must be offered and are
 * acked (EVENT_IDX and INDIRECT_DESC too when offered); nothing else, so no
 * checksum or segmentation offloads: every packet carries full checksums
 * and the device must hand us flags = 0, gso_type = 0 (§5.1.6.4.1).
 * Every packet in both directions starts with the 12-byte
 * struct virtio_net_hdr_v1 (§5.1.6).
 *
 * Queue 0 (receiveq): every descriptor is its own one-buffer chain of
 * RX_BUF bytes (descriptor i -> rx_mem[i]), all posted up front and
 * re-posted as soon as their bytes are copied out. RX_BUF is small on
 * purpose: an MTU-sized frame (1514 + 12 bytes) then needs three buffers,
 * and the header's num_buffers (§5.1.6.4) must say so.
 * Queue 1 (transmitq): one chain in flight (vq_request of virtio.c).
 *
 * Sequence: ARP request for probe.net_peer -> the host's ARP reply (its MAC),
 * ICMP echo request (56 bytes) -> echo reply (id, seq, payload, checksums),
 * then an echo with probe.net_big bytes whose reply must span several rx
 * buffers. ARP requests for probe.net_ip from the host are answered; any
 * other frame (IPv6 multicast chatter of the tap, ...) is counted and
 * dropped. Waits poll with a TSC bound (VQ_TIMEOUT_TSC).
 */
#include "net.h"
#include "virtio.h"

/* Feature bits (§5.1.3). */
#define VIRTIO_NET_F_MAC       5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS    16
#define VIRTIO_NET_S_LINK_UP   1

/* Config space (§5.1.4): mac[6] at 0, le16 status at 6. */
#define NET_CFG_MAC    0
#define NET_CFG_STATUS 6

#define NET_HDR_LEN 12 /* struct virtio_net_hdr_v1 */
#define ETH_HLEN 14
#define ETH_ZLEN 60    /* minimum frame without FCS */
#define ETH_P_IP  0x0800
#define ETH_P_ARP 0x0806
#define IP_HLEN 20
#define ICMP_HLEN 8
#define ARP_LEN 28

#define RX_BUF 512
#define SMALL_PAYLOAD 56
#define DEFAULT_BIG 1472 /* a 1514-byte frame: the tap's default MTU of 1500 */
#define MAX_BIG 4000
#define ECHO_ID 0x7072   /* "pr" */
#define FRAME_MAX (ETH_HLEN + IP_HLEN + ICMP_HLEN + MAX_BIG)

static struct {
	uint8_t ip[4], peer[4], mac[6];
	int have_ip, have_peer, have_mac;
	uint64_t big;
} nopt = { .big = DEFAULT_BIG };

static struct vdrv net_drv;
static uint8_t rx_mem[VQ_MAX_SIZE][RX_BUF] __attribute__((aligned(64)));
static uint8_t tx_mem[NET_HDR_LEN + FRAME_MAX] __attribute__((aligned(64)));
static uint8_t pkt[VQ_MAX_SIZE * RX_BUF]; /* one received packet, header first */

/* What the check learns. */
static struct {
	uint8_t mac[6], peer_mac[6];
	uint32_t plen, nbuf;   /* last packet: bytes incl. header, buffers used */
	unsigned ignored, arp_answered;
} ns;

/* ---- options -------------------------------------------------------------- */

static int parse_ip4(const char *v, size_t n, uint8_t ip[4])
{
	size_t i = 0;
	unsigned part;
	for (part = 0; part < 4; part++) {
		unsigned x = 0, digits = 0;
		for (; i < n && v[i] >= '0' && v[i] <= '9' && digits < 3; i++, digits++)
			x = x * 10 + (unsigned)(v[i] - '0');
		if (digits == 0 || x > 255)
			return -1;
		ip[part] = (uint8_t)x;
		if (part < 3 && (i >= n || v[i++] != '.'))
			return -1;
	}
	return i == n ? 0 : -1;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int parse_mac(const char *v, size_t n, uint8_t mac[6])
{
	unsigned i;
	if (n != 17)
		return -1;
	for (i = 0; i < 6; i++) {
		int hi = hexval(v[3 * i]), lo = hexval(v[3 * i + 1]);
		if (hi < 0 || lo < 0 || (i < 5 && v[3 * i + 2] != ':'))
			return -1;
		mac[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

int net_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad)
{
	if (str_eq_n(k, kl, "probe.net_ip")) {
		nopt.have_ip = has_val && !parse_ip4(v, vl, nopt.ip);
		*bad = *bad || !nopt.have_ip;
	} else if (str_eq_n(k, kl, "probe.net_peer")) {
		nopt.have_peer = has_val && !parse_ip4(v, vl, nopt.peer);
		*bad = *bad || !nopt.have_peer;
	} else if (str_eq_n(k, kl, "probe.net_mac")) {
		nopt.have_mac = has_val && !parse_mac(v, vl, nopt.mac);
		*bad = *bad || !nopt.have_mac;
	} else if (str_eq_n(k, kl, "probe.net_big")) {
		*bad = *bad || !has_val || parse_size(v, vl, &nopt.big) || nopt.big > MAX_BIG;
	} else {
		return 0;
	}
	return 1;
}

/* ---- byte order and checksums ------------------------------------------- */

static void put16(uint8_t *p, unsigned v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static unsigned get16(const uint8_t *p)
{
	return (unsigned)p[0] << 8 | p[1];
}

/* Internet checksum (RFC 1071); over data holding its checksum it gives 0. */
static unsigned inet_csum(const uint8_t *p, size_t n)
{
	uint32_t s = 0;
	size_t i;
	for (i = 0; i + 1 < n; i += 2)
		s += (uint32_t)p[i] << 8 | p[i + 1];
	if (n & 1)
		s += (uint32_t)p[n - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return ~s & 0xffff;
}

static uint8_t payload_byte(unsigned seq, unsigned i)
{
	return (uint8_t)(i * 7 + seq * 13 + 1);
}

/* ---- receive -------------------------------------------------------------- */

static void rx_post(struct vq *q, uint32_t id)
{
	q->avail->ring[q->avail_idx % q->size] = (uint16_t)id;
	vbarrier(); /* ring entry before the idx store (§2.7.13) */
	q->avail->idx = ++q->avail_idx;
}

static int rx_setup(struct vdrv *v)
{
	struct vq *q = &v->q[0];
	uint16_t old = q->avail_idx;
	unsigned i;
	for (i = 0; i < q->size; i++) {
		q->desc[i].addr = (uint64_t)rx_mem[i];
		q->desc[i].len = RX_BUF;
		q->desc[i].flags = VIRTQ_DESC_F_WRITE;
		q->desc[i].next = 0;
		rx_post(q, i);
	}
	vq_kick(v, 0, old);
	return 0;
}

/* Next used rx buffer: 0, 1 on timeout (t0 + VQ_TIMEOUT_TSC), -1 on a bad
 * used element (reason in v->err). */
static int rx_pop(struct vdrv *v, uint64_t t0, uint32_t *id, uint32_t *len)
{
	struct vq *q = &v->q[0];
	volatile struct virtq_used_elem *e;
	uint16_t ahead;
	while ((ahead = (uint16_t)(q->used->idx - q->last_used)) == 0)
		if (rdtsc() - t0 > VQ_TIMEOUT_TSC)
			return 1;
	if (ahead > q->size)
		return verr(v, "receiveq: used idx %u is %u ahead of %u (queue size %u)",
			    q->used->idx, ahead, q->last_used, q->size);
	vbarrier(); /* the used idx load before the used entry loads */
	e = &q->used->ring[q->last_used % q->size];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	if (v->event_idx)
		q->avail->ring[q->size] = q->last_used;
	if (*id >= q->size)
		return verr(v, "receiveq: used id %u >= queue size %u", *id, q->size);
	if (*len > RX_BUF)
		return verr(v, "receiveq: used len %u > buffer length %u", *len, RX_BUF);
	return 0;
}

/* One packet (header + frame) into pkt: ns.plen, ns.nbuf. 0, 1 on
 * timeout, -1 on a device error. Buffers are re-posted after the copy. */
static int rx_packet(struct vdrv *v, uint64_t t0)
{
	struct vq *q = &v->q[0];
	uint16_t old = q->avail_idx;
	uint32_t id, len, nb, i;
	int r = rx_pop(v, t0, &id, &len);
	if (r)
		return r;
	if (len < NET_HDR_LEN)
		return verr(v, "receiveq: used len %u < the %u-byte header", len, NET_HDR_LEN);
	memcpy(pkt, rx_mem[id], len);
	ns.plen = len;
	rx_post(q, id);
	nb = pkt[10] | (uint32_t)pkt[11] << 8;
	if (nb == 0 || nb > q->size)
		return verr(v, "receiveq: num_buffers %u (queue size %u)", nb, q->size);
	for (i = 1; i < nb; i++) {
		r = rx_pop(v, rdtsc(), &id, &len);
		if (r > 0)
			return verr(v, "receiveq: num_buffers %u but only %u buffers used", nb, i);
		if (r)
			return r;
		memcpy(pkt + ns.plen, rx_mem[id], len);
		ns.plen += len;
		rx_post(q, id);
	}
	ns.nbuf = nb;
	vq_kick(v, 0, old);
	/* §5.1.6.4.1: no GUEST_CSUM / GUEST_* GSO negotiated. */
	if (pkt[0] != 0 || pkt[1] != 0)
		return verr(v, "receiveq: header flags 0x%x gso_type %u (want 0, 0: no offloads "
			    "negotiated)", pkt[0], pkt[1]);
	return 0;
}

/* ---- transmit ------------------------------------------------------------- */

/* Send the frame in tx_mem + NET_HDR_LEN (padded to ETH_ZLEN). split: the
 * header and the frame as two descriptors (through an indirect table if
 * negotiated), else one buffer. */
static int tx_frame(struct vdrv *v, uint32_t flen, int split)
{
	struct vbuf b[2];
	uint32_t len;
	if (flen < ETH_ZLEN) {
		memset(tx_mem + NET_HDR_LEN + flen, 0, ETH_ZLEN - flen);
		flen = ETH_ZLEN;
	}
	memset(tx_mem, 0, NET_HDR_LEN); /* flags, gso_type NONE, num_buffers 0 */
	if (split) {
		b[0] = (struct vbuf){ (uint64_t)tx_mem, NET_HDR_LEN, 0 };
		b[1] = (struct vbuf){ (uint64_t)tx_mem + NET_HDR_LEN, flen, 0 };
		return vq_request(v, 1, b, 2, v->indirect, &len);
	}
	b[0] = (struct vbuf){ (uint64_t)tx_mem, NET_HDR_LEN + flen, 0 };
	return vq_request(v, 1, b, 1, 0, &len);
}

static uint8_t *eth_start(const uint8_t *dst, unsigned type)
{
	uint8_t *f = tx_mem + NET_HDR_LEN;
	memcpy(f, dst, 6);
	memcpy(f + 6, ns.mac, 6);
	put16(f + 12, type);
	return f + ETH_HLEN;
}

static int tx_arp(struct vdrv *v, unsigned op, const uint8_t *tha, const uint8_t *tpa)
{
	static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	uint8_t *a = eth_start(op == 1 ? bcast : tha, ETH_P_ARP);
	put16(a, 1);             /* htype Ethernet */
	put16(a + 2, ETH_P_IP);  /* ptype */
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, ns.mac, 6);
	memcpy(a + 14, nopt.ip, 4);
	if (op == 1)
		memset(a + 18, 0, 6);
	else
		memcpy(a + 18, tha, 6);
	memcpy(a + 24, tpa, 4);
	return tx_frame(v, ETH_HLEN + ARP_LEN, 0);
}

static int tx_echo(struct vdrv *v, unsigned seq, unsigned n)
{
	uint8_t *ip = eth_start(ns.peer_mac, ETH_P_IP), *ic = ip + IP_HLEN;
	unsigned i;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, IP_HLEN + ICMP_HLEN + n);
	put16(ip + 4, seq);      /* identification */
	put16(ip + 6, 0);        /* no fragments */
	ip[8] = 64;              /* ttl */
	ip[9] = 1;               /* ICMP */
	put16(ip + 10, 0);
	memcpy(ip + 12, nopt.ip, 4);
	memcpy(ip + 16, nopt.peer, 4);
	put16(ip + 10, inet_csum(ip, IP_HLEN));
	ic[0] = 8;               /* echo request */
	ic[1] = 0;
	put16(ic + 2, 0);
	put16(ic + 4, ECHO_ID);
	put16(ic + 6, seq);
	for (i = 0; i < n; i++)
		ic[ICMP_HLEN + i] = payload_byte(seq, i);
	put16(ic + 2, inet_csum(ic, ICMP_HLEN + n));
	return tx_frame(v, ETH_HLEN + IP_HLEN + ICMP_HLEN + n, 1);
}

/* ---- waiting for a reply -------------------------------------------------- */

#define WANT_ARP  1
#define WANT_ECHO 2

/* Receive until a frame of the wanted kind arrives (then it is in pkt,
 * the frame at pkt + NET_HDR_LEN): an ARP reply from the peer for our
 * address, or an IPv4 ICMP packet from the peer to us with our echo id and
 * seq. Answers ARP requests for our address; counts everything else. */
static int rx_wait(struct vdrv *v, int want, unsigned seq)
{
	uint64_t t0 = rdtsc();
	for (;;) {
		const uint8_t *f = pkt + NET_HDR_LEN, *p = f + ETH_HLEN;
		uint32_t flen;
		unsigned type;
		int r = rx_packet(v, t0);
		if (r > 0)
			return verr(v, "no %s from %u.%u.%u.%u within %lu TSC cycles (%u other "
				    "frames seen)", want == WANT_ARP ? "ARP reply" : "echo reply",
				    nopt.peer[0], nopt.peer[1], nopt.peer[2], nopt.peer[3],
				    (uint64_t)VQ_TIMEOUT_TSC, ns.ignored);
		if (r)
			return r;
		flen = ns.plen - NET_HDR_LEN;
		type = flen >= ETH_HLEN ? get16(f + 12) : 0;
		if (type == ETH_P_ARP && flen >= ETH_HLEN + ARP_LEN && get16(p) == 1 &&
		    get16(p + 2) == ETH_P_IP && p[4] == 6 && p[5] == 4 &&
		    memcmp(p + 24, nopt.ip, 4) == 0) {
			if (get16(p + 6) == 2 && want == WANT_ARP &&
			    memcmp(p + 14, nopt.peer, 4) == 0)
				return 0;
			if (get16(p + 6) == 1) {
				uint8_t sha[6], spa[4];
				memcpy(sha, p + 8, 6);
				memcpy(spa, p + 14, 4);
				if (tx_arp(v, 2, sha, spa))
					return -1;
				ns.arp_answered++;
				continue;
			}
		}
		if (type == ETH_P_IP && want == WANT_ECHO && flen >= ETH_HLEN + IP_HLEN &&
		    (p[0] >> 4) == 4 && p[9] == 1 && memcmp(p + 12, nopt.peer, 4) == 0 &&
		    memcmp(p + 16, nopt.ip, 4) == 0) {
			const uint8_t *ic = p + (p[0] & 15) * 4;
			if ((get16(p + 6) & 0x3fff) != 0)
				return verr(v, "echo reply is an IP fragment (flags/offset 0x%x): "
					    "probe.net_big exceeds the tap's MTU", get16(p + 6));
			if (ic + ICMP_HLEN <= f + flen && get16(ic + 4) == ECHO_ID &&
			    get16(ic + 6) == seq)
				return 0;
		}
		ns.ignored++;
	}
}

/* The echo reply in pkt for tx_echo(seq, n): headers, checksums, payload. */
static int check_echo_reply(struct vdrv *v, unsigned seq, unsigned n)
{
	const uint8_t *f = pkt + NET_HDR_LEN, *ip = f + ETH_HLEN, *ic;
	uint32_t flen = ns.plen - NET_HDR_LEN, ihl = (ip[0] & 15) * 4u, tot = get16(ip + 2);
	unsigned i;
	if (memcmp(f, ns.mac, 6) != 0 || memcmp(f + 6, ns.peer_mac, 6) != 0)
		return verr(v, "echo reply seq %u: Ethernet addresses are not peer -> us", seq);
	if (ihl < IP_HLEN || tot != ihl + ICMP_HLEN + n || ETH_HLEN + tot > flen)
		return verr(v, "echo reply seq %u: IPv4 header length %u total %u in a %u-byte "
			    "frame (payload %u)", seq, ihl, tot, flen, n);
	if (inet_csum(ip, ihl) != 0)
		return verr(v, "echo reply seq %u: bad IPv4 header checksum 0x%x", seq,
			    get16(ip + 10));
	ic = ip + ihl;
	if (inet_csum(ic, tot - ihl) != 0)
		return verr(v, "echo reply seq %u: bad ICMP checksum 0x%x", seq, get16(ic + 2));
	if (ic[0] != 0 || ic[1] != 0)
		return verr(v, "echo reply seq %u: ICMP type %u code %u (want 0 0)", seq, ic[0],
			    ic[1]);
	for (i = 0; i < n; i++)
		if (ic[ICMP_HLEN + i] != payload_byte(seq, i))
			return verr(v, "echo reply seq %u: payload byte %u is 0x%x, sent 0x%x", seq,
				    i, ic[ICMP_HLEN + i], payload_byte(seq, i));
	return 0;
}

/* ---- the check ------------------------------------------------------------ */

#define NET_NEED (BIT(VIRTIO_NET_F_MAC) | BIT(VIRTIO_NET_F_MRG_RXBUF) | BIT(VIRTIO_NET_F_STATUS))

static void read_config(struct vdev *d, uint8_t mac[6], unsigned *status)
{
	volatile uint8_t *c = (volatile uint8_t *)(d->base + VIRTIO_MMIO_CONFIG);
	uint32_t g0, g1;
	unsigned i;
	do { /* §4.2.2.2: byte accesses for u8 fields, 16-bit for le16 */
		g0 = vread32(d, VIRTIO_MMIO_CONFIG_GENERATION);
		for (i = 0; i < 6; i++)
			mac[i] = c[NET_CFG_MAC + i];
		*status = *(volatile uint16_t *)(c + NET_CFG_STATUS);
		g1 = vread32(d, VIRTIO_MMIO_CONFIG_GENERATION);
	} while (g0 != g1);
}

#define MACFMT "%02x:%02x:%02x:%02x:%02x:%02x"
#define MACARG(m) (m)[0], (m)[1], (m)[2], (m)[3], (m)[4], (m)[5]

void check_net(const char *name)
{
	struct vdrv *v = &net_drv;
	struct vdev *d = vdev_find(VIRTIO_ID_NET, 0);
	uint64_t want = NET_NEED | BIT(VIRTIO_F_EVENT_IDX) | BIT(VIRTIO_F_INDIRECT_DESC);
	uint64_t t0, rtt;
	unsigned status, big_bufs = 0, need;

	if (!nopt.have_ip || !nopt.have_peer)
		return check_fail(name, "needs probe.net_ip= and probe.net_peer=");
	if (!d)
		return check_fail(name, "no virtio-net device (ID 1) among virtio_mmio.device=");
	if (vdrv_init(v, d, want, 2))
		return check_fail(name, "%s", v->err);
	if ((v->acked & NET_NEED) != NET_NEED)
		return check_fail(name, "features 0x%lx lack MAC, MRG_RXBUF or STATUS (need 0x%lx)",
				  v->offered, (uint64_t)NET_NEED);
	read_config(d, ns.mac, &status);
	if (nopt.have_mac && memcmp(ns.mac, nopt.mac, 6) != 0)
		return check_fail(name, "config mac " MACFMT ", expected " MACFMT, MACARG(ns.mac),
				  MACARG(nopt.mac));
	if (ns.mac[0] & 1)
		return check_fail(name, "config mac " MACFMT " is a multicast address",
				  MACARG(ns.mac));
	if (!(status & VIRTIO_NET_S_LINK_UP))
		return check_fail(name, "config status 0x%x: link down", status);
	need = (NET_HDR_LEN + ETH_HLEN + IP_HLEN + ICMP_HLEN + (unsigned)nopt.big + RX_BUF - 1) /
	       RX_BUF;
	if (v->q[0].size < need + 1)
		return check_fail(name, "receiveq size %u: too small for %u buffers of %u bytes",
				  v->q[0].size, need + 1, RX_BUF);
	rx_setup(v);

	if (tx_arp(v, 1, NULL, nopt.peer) || rx_wait(v, WANT_ARP, 0))
		return check_fail(name, "arp: %s", v->err);
	memcpy(ns.peer_mac, pkt + NET_HDR_LEN + ETH_HLEN + 8, 6);

	t0 = rdtsc();
	if (tx_echo(v, 1, SMALL_PAYLOAD) || rx_wait(v, WANT_ECHO, 1))
		return check_fail(name, "ping: %s", v->err);
	rtt = rdtsc() - t0;
	if (check_echo_reply(v, 1, SMALL_PAYLOAD))
		return check_fail(name, "ping: %s", v->err);

	if (nopt.big) {
		if (tx_echo(v, 2, (unsigned)nopt.big) || rx_wait(v, WANT_ECHO, 2) ||
		    check_echo_reply(v, 2, (unsigned)nopt.big))
			return check_fail(name, "big ping (%lu bytes): %s", nopt.big, v->err);
		big_bufs = ns.nbuf;
	}
	check_ok(name, "mac=" MACFMT " peer_mac=" MACFMT " rtt_cycles=%lu num_buffers=%u "
		 "big=%lu rx_buf=%u queue_size=%u features=0x%lx event_idx=%d indirect=%d "
		 "arp_answered=%u ignored=%u",
		 MACARG(ns.mac), MACARG(ns.peer_mac), rtt, big_bufs, nopt.big, RX_BUF,
		 v->q[0].size, v->acked, v->event_idx, v->indirect, ns.arp_answered, ns.ignored);
}
