/* netbench.h - the network workloads of the probe's `bench` check
 * (netbench.c), called from bench.c.
 *
 * Workloads: net_tx64, net_tx1500 (probe.bench_pkts frames each, guest -> tap),
 * net_rr (probe.bench_n ICMP echo round trips with the host's stack; needs
 * probe.bench_ip=, probe.bench_peer= and probe.bench_peer_mac=).
 */
#ifndef NETBENCH_H
#define NETBENCH_H

#include "probe.h"

/* 1 if k is a network benchmark option (a bad value is reported through *bad). */
int netbench_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad);
/* 1 if w names a network workload. */
int netbench_is(const char *w, size_t wl);
/* Run workload w (n: probe.bench_n, net_rr's round trips): 0 (its line printed), or -1 with err set. */
int netbench_run(const char *w, size_t wl, uint64_t n, char *err, size_t errlen);

/* From bench.c: "probe: bench <name> n=.. cycles=.. tsc_khz=.. tsc_src=.."
 * (+ ops_per_s, ns_per_op when the TSC rate is known), and the rate itself. */
void bench_line_head(const char *name, uint64_t n, uint64_t cycles);
uint64_t bench_tsc_khz(void);

#endif
