/* net.h - the probe's virtio-net check (net.c), a driver at CPL3.
 *
 * Options: probe.net_ip=<a.b.c.d> (the probe's IPv4 address),
 * probe.net_peer=<a.b.c.d> (the host's address on the tap), optional
 * probe.net_mac=<xx:xx:xx:xx:xx:xx> (expected config MAC) and
 * probe.net_big=<n> (ICMP payload of the echo whose reply must span
 * several rx buffers; default 1472, 0 = skip). README.md, "net".
 */
#ifndef NET_H
#define NET_H

#include "probe.h"

#define VIRTIO_ID_NET 1

/* If k is one of the net options: parse v (has_val: a value was given),
 * set *bad on a malformed or missing value, return 1. Otherwise 0. */
int net_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad);

void check_net(const char *name);

#endif
