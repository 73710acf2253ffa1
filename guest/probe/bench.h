/* bench.h - the probe's benchmark mode (bench.c), run as the check `bench`.
 *
 * Options: probe.bench=<workload>[,<workload>...] (mmio, rng, blk_rand4k_qd1,
 * blk_rand4k_qd32, blk_seq1m_read, blk_seq1m_write), probe.bench_n=<n>
 * (iterations of mmio, rng and the random blk workloads), probe.bench_mb=<n>
 * (MiB moved by each sequential blk workload). Output: one line per workload,
 * "probe: bench <name> n=<n> cycles=<c> tsc_khz=<k> tsc_src=<src> ...".
 */
#ifndef BENCH_H
#define BENCH_H

#include <stddef.h>

/* 1 if k is a benchmark option (a bad value is reported through *bad). */
int bench_option(const char *k, size_t kl, const char *v, size_t vl, int has_val, int *bad);
void check_bench(const char *name);

#endif
