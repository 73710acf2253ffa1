/* user.c - the CPL3 half of the probe: boot information, options, checks.
 *
 * Runs at CPL3 (native speed on hosts that emulate guest CPL0). Output is
 * buffered in user_out and handed to CPL0 with sys(SYS_WRITE) when the
 * buffer fills and before the probe ends; the probe ends with
 * sys(SYS_EXIT, failed checks) or sys(SYS_TRIPLEFAULT).
 *
 * Output: one fact per line, "probe: <fact>", lines end in "\r\n".
 * Options (kernel command line): probe.expect_mem=<size>,
 * probe.check=<name>[,<name>...] (repeatable), virtio_mmio.device=...
 * and the device-check options probe.blk, probe.blk_sectors,
 * probe.blk_pattern, probe.blk_serial, probe.blk_ro, probe.strict
 * (README.md, "Device checks"; the checks live in vcheck.c and blk.c).
 * Checks: the table `checks` below; a check is a function that prints
 * exactly one line through check_ok() or check_fail().
 */
#include "probe.h"
#include "virtio.h"
#include "net.h"
#include "bench.h"
#include "smp.h"

#define PVH_MAGIC 0x336ec578u
#define E820_RAM 1
#define MAX_MEM 128
#define MAX_CMDLINE 4096
#define MAX_REQ 32

char user_out[USER_OUT_SIZE];
volatile size_t user_out_len;

/* Last in .bss (see probe.ld): must read as zero if the loader zeroed the
 * PT_LOAD segment's memsz beyond filesz. */
static volatile uint8_t bss_canary[512] __attribute__((section(".bss.zz_canary")));

struct memrange {
	uint64_t addr, size;
	uint32_t type;
};

static struct {
	uint32_t kind;
	uint64_t info;
	int info_ok;
	const char *info_err;
	char cmdline[MAX_CMDLINE + 1];
	size_t cmdline_len;
	int cmdline_ok;
	struct memrange mem[MAX_MEM];
	unsigned nmem;
	unsigned nmem_reported; /* as the boot information said, before capping */
} bi;

static struct {
	uint64_t expect_mem;
	int have_expect_mem;
	const char *req[MAX_REQ];
	size_t req_len[MAX_REQ];
	unsigned nreq;
	int bad;             /* malformed probe.* / virtio_mmio.device options */
	char bad_msg[160];
} opt;

static unsigned failed;

/* ---- buffered output ---------------------------------------------------- */

void out_flush(void)
{
	if (user_out_len) {
		sys(SYS_WRITE, (long)user_out, (long)user_out_len);
		user_out_len = 0;
	}
}

static void out_putc(void *ctx, char c)
{
	(void)ctx;
	if (user_out_len >= USER_OUT_SIZE)
		out_flush();
	user_out[user_out_len++] = c;
}

void out(const char *f, ...)
{
	va_list ap;
	va_start(ap, f);
	vfmt(out_putc, NULL, f, ap);
	va_end(ap);
}

/* Bytes 0x20-0x7e as they are, except '\' which becomes "\\"; any other
 * byte becomes "\xNN". So a line stays one line and is reversible. */
static void out_escaped(const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	size_t i;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '\\') {
			out_putc(NULL, '\\');
			out_putc(NULL, '\\');
		} else if (c >= 0x20 && c < 0x7f) {
			out_putc(NULL, (char)c);
		} else {
			out_putc(NULL, '\\');
			out_putc(NULL, 'x');
			out_putc(NULL, hex[c >> 4]);
			out_putc(NULL, hex[c & 15]);
		}
	}
}

static void check_line(const char *name, const char *verdict, const char *f, va_list ap)
{
	out("probe: check %s %s", name, verdict);
	if (f && *f) {
		out_putc(NULL, ' ');
		vfmt(out_putc, NULL, f, ap);
	}
	out("\r\n");
}

void check_ok(const char *name, const char *f, ...)
{
	va_list ap;
	va_start(ap, f);
	check_line(name, "ok", f, ap);
	va_end(ap);
}

void check_fail(const char *name, const char *f, ...)
{
	va_list ap;
	va_start(ap, f);
	check_line(name, "FAIL", f, ap);
	va_end(ap);
	failed++;
}

/* ---- boot information --------------------------------------------------- */

static int phys_ok(uint64_t addr, uint64_t len)
{
	return addr != 0 && addr < MAPPED_LIMIT && len <= MAPPED_LIMIT - addr;
}

static void read_cmdline(uint64_t p)
{
	const char *s = (const char *)p;
	size_t n;
	if (p == 0) { /* no command line: an empty one */
		bi.cmdline_ok = 1;
		return;
	}
	if (!phys_ok(p, 1))
		return;
	for (n = 0; n < MAX_CMDLINE && p + n < MAPPED_LIMIT && s[n]; n++)
		bi.cmdline[n] = s[n];
	bi.cmdline[n] = 0;
	bi.cmdline_len = n;
	bi.cmdline_ok = n < MAX_CMDLINE && p + n < MAPPED_LIMIT;
}

static void add_range(uint64_t addr, uint64_t size, uint32_t type)
{
	bi.nmem_reported++;
	if (bi.nmem < MAX_MEM) {
		bi.mem[bi.nmem].addr = addr;
		bi.mem[bi.nmem].size = size;
		bi.mem[bi.nmem].type = type;
		bi.nmem++;
	}
}

/* struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h). */
static void read_pvh(uint64_t p)
{
	const volatile uint8_t *si = (const volatile uint8_t *)p;
	uint32_t magic, version, entries, i;
	uint64_t memmap;

	if (!phys_ok(p, 56)) {
		bi.info_err = "start_info address outside the first 4 GiB";
		return;
	}
	magic = *(const volatile uint32_t *)(si + 0);
	version = *(const volatile uint32_t *)(si + 4);
	if (magic != PVH_MAGIC) {
		bi.info_err = "hvm_start_info magic is not 0x336ec578";
		return;
	}
	bi.info_ok = 1;
	read_cmdline(*(const volatile uint64_t *)(si + 24));
	if (version < 1)
		return; /* no memory map before version 1 */
	memmap = *(const volatile uint64_t *)(si + 40);
	entries = *(const volatile uint32_t *)(si + 48);
	if (entries && !phys_ok(memmap, (uint64_t)entries * 24))
		return;
	for (i = 0; i < entries; i++) {
		const volatile uint8_t *e = (const volatile uint8_t *)(memmap + 24 * (uint64_t)i);
		add_range(*(const volatile uint64_t *)e, *(const volatile uint64_t *)(e + 8),
			  *(const volatile uint32_t *)(e + 16));
	}
}

/* struct boot_params (Documentation/arch/x86/zero-page.rst). */
static void read_linux64(uint64_t p)
{
	const volatile uint8_t *bp = (const volatile uint8_t *)p;
	uint32_t entries, i;

	if (!phys_ok(p, 4096)) {
		bi.info_err = "boot_params address outside the first 4 GiB";
		return;
	}
	bi.info_ok = 1;
	read_cmdline(*(const volatile uint32_t *)(bp + 0x228) |
		     (uint64_t)*(const volatile uint32_t *)(bp + 0x0c8) << 32);
	entries = bp[0x1e8];
	if (entries > 128)
		entries = 128; /* E820_MAX_ENTRIES_ZEROPAGE */
	for (i = 0; i < entries; i++) {
		const volatile uint8_t *e = bp + 0x2d0 + 20 * i;
		add_range(*(const volatile uint64_t *)e, *(const volatile uint64_t *)(e + 8),
			  *(const volatile uint32_t *)(e + 16));
	}
}

/* ---- options ------------------------------------------------------------ */

static void bad_option(const char *what, const char *s, size_t n)
{
	size_t l = 0, i;
	if (opt.bad++)
		return; /* report the first one */
	for (i = 0; what[i] && l < 60; i++)
		opt.bad_msg[l++] = what[i];
	for (i = 0; i < n && l < sizeof(opt.bad_msg) - 1; i++)
		opt.bad_msg[l++] = (s[i] > 0x20 && s[i] < 0x7f) ? s[i] : '?';
	opt.bad_msg[l] = 0;
}

static void add_checks(const char *v, size_t n)
{
	size_t i = 0, start;
	while (i <= n) {
		start = i;
		while (i < n && v[i] != ',')
			i++;
		if (i > start) {
			if (opt.nreq >= MAX_REQ) {
				bad_option("too many checks: ", v + start, i - start);
			} else {
				opt.req[opt.nreq] = v + start;
				opt.req_len[opt.nreq++] = i - start;
			}
		}
		i++;
	}
}

/* A 0/1 flag value. */
static int parse_flag(const char *v, size_t vl, int *out)
{
	if (vl == 1 && (v[0] == '0' || v[0] == '1')) {
		*out = v[0] - '0';
		return 0;
	}
	return -1;
}

/* Options of the device checks (vcheck.c, blk.c); 1 if k is one of them. */
static int device_option(const char *k, size_t kl, const char *v, size_t vl, int has_val)
{
	int bad = !has_val;
	if (str_eq_n(k, kl, "probe.blk_sectors")) {
		bad = bad || parse_size(v, vl, &vopt.blk_sectors);
		vopt.have_blk_sectors = !bad;
	} else if (str_eq_n(k, kl, "probe.blk_pattern")) {
		bad = bad || parse_size(v, vl, &vopt.blk_pattern);
		vopt.have_blk_pattern = !bad;
	} else if (str_eq_n(k, kl, "probe.blk")) {
		bad = bad || parse_size(v, vl, &vopt.blk_index) || vopt.blk_index >= MAX_VDEVS;
	} else if (str_eq_n(k, kl, "probe.blk_serial")) {
		vopt.blk_serial = v;
		vopt.blk_serial_len = vl;
		vopt.have_blk_serial = !bad;
	} else if (str_eq_n(k, kl, "probe.blk_ro")) {
		bad = bad || parse_flag(v, vl, &vopt.blk_ro);
	} else if (str_eq_n(k, kl, "probe.snap_steps")) {
		bad = bad || parse_size(v, vl, &vopt.snap_steps) || vopt.snap_steps == 0 ||
		      vopt.snap_steps > 100000;
	} else if (str_eq_n(k, kl, "probe.strict")) {
		bad = bad || parse_flag(v, vl, &vopt.strict);
	} else if (net_option(k, kl, v, vl, has_val, &bad)) {
		/* net.c */
	} else if (smp_option(k, kl, v, vl, has_val, &bad)) {
		/* smp.c */
	} else {
		return 0;
	}
	if (bad) {
		bad_option("bad value: ", k, kl);
	}
	return 1;
}

static void option(const char *k, size_t kl, const char *v, size_t vl, int has_val)
{
	int bad;
	if (str_eq_n(k, kl, "virtio_mmio.device")) {
		if (!has_val || vdev_add(v, vl))
			bad_option("bad virtio_mmio.device=", v, vl);
	} else if (kl >= 6 && memcmp(k, "probe.", 6) == 0) {
		if (str_eq_n(k, kl, "probe.expect_mem")) {
			if (!has_val || parse_size(v, vl, &opt.expect_mem))
				bad_option("bad probe.expect_mem=", v, vl);
			else
				opt.have_expect_mem = 1;
		} else if (device_option(k, kl, v, vl, has_val)) {
			/* handled */
		} else if (bench_option(k, kl, v, vl, has_val, &bad)) {
			if (bad)
				bad_option("bad value: ", k, kl);
		} else if (str_eq_n(k, kl, "probe.check")) {
			if (!has_val)
				bad_option("probe.check needs a value", "", 0);
			else
				add_checks(v, vl);
		} else {
			bad_option("unknown option ", k, kl);
		}
	}
}

/* Split like Linux's next_arg(): tokens separated by spaces, double quotes
 * group spaces, key=value, quotes around the value are dropped. */
static void parse_cmdline(void)
{
	const char *s = bi.cmdline;
	size_t n = bi.cmdline_len, i = 0;
	while (i < n) {
		size_t start, eq = 0, end;
		int inq = 0, has_val = 0;
		while (i < n && s[i] == ' ')
			i++;
		if (i >= n)
			break;
		start = i;
		for (; i < n && (inq || s[i] != ' '); i++) {
			if (s[i] == '"')
				inq = !inq;
			else if (s[i] == '=' && !has_val) {
				has_val = 1;
				eq = i;
			}
		}
		end = i;
		if (s[start] == '"') /* "key=value" quoted whole */
			start++;
		if (has_val) {
			size_t vs = eq + 1, ve = end;
			if (vs < ve && s[vs] == '"')
				vs++;
			if (ve > vs && s[ve - 1] == '"')
				ve--;
			option(s + start, eq - start, s + vs, ve - vs, 1);
		} else {
			option(s + start, end - start, NULL, 0, 0);
		}
	}
}

/* ---- built-in checks ---------------------------------------------------- */

/* RAM size the memory map describes: the highest end of a usable (type 1)
 * range at or below 4 GiB, plus, if usable RAM exists above 4 GiB, the
 * highest end of it minus 4 GiB (the size of the MMIO hole is not RAM).
 * Reserved holes inside low memory (EBDA 0x9fc00-0x100000 and the like) do
 * not lower it: they are RAM the VMM keeps for itself. */
static uint64_t map_ram(void)
{
	uint64_t low = 0, high = 0;
	unsigned i;
	for (i = 0; i < bi.nmem; i++) {
		uint64_t end = bi.mem[i].addr + bi.mem[i].size;
		if (bi.mem[i].type != E820_RAM)
			continue;
		if (end <= MAPPED_LIMIT) {
			if (end > low)
				low = end;
		} else if (end > high) {
			high = end;
		}
	}
	return low + (high ? high - MAPPED_LIMIT : 0);
}

/* 1 if [addr, addr + len) lies inside one usable (type 1) range. */
int mem_usable(uint64_t addr, uint64_t len)
{
	unsigned i;
	for (i = 0; i < bi.nmem; i++)
		if (bi.mem[i].type == E820_RAM && bi.mem[i].addr <= addr &&
		    addr + len <= bi.mem[i].addr + bi.mem[i].size)
			return 1;
	return 0;
}

static void check_boot(const char *name)
{
	if (!bi.info_ok)
		check_fail(name, "%s", bi.info_err ? bi.info_err : "no boot information");
	else if (!bi.cmdline_ok)
		check_fail(name, "command line not readable or longer than %u bytes",
			   MAX_CMDLINE - 1);
	else
		check_ok(name, NULL);
}

static void check_memmap(const char *name)
{
	uint64_t lo = (uint64_t)__image_start, hi = (uint64_t)__image_end;
	unsigned i, j, usable = 0, holds_image = 0;
	if (bi.nmem == 0)
		return check_fail(name, "no memory map");
	if (bi.nmem_reported > bi.nmem)
		return check_fail(name, "more than %u entries", MAX_MEM);
	for (i = 0; i < bi.nmem; i++) {
		const struct memrange *a = &bi.mem[i];
		if (a->size == 0)
			continue; /* qboot's PVH map ends with an all-zero entry */
		if (a->addr + a->size < a->addr)
			return check_fail(name, "entry %u wraps around", i);
		if (a->type == E820_RAM) {
			usable++;
			if (a->addr <= lo && a->addr + a->size >= hi)
				holds_image = 1;
		}
		for (j = 0; j < i; j++) {
			const struct memrange *b = &bi.mem[j];
			if (b->size && a->addr < b->addr + b->size && b->addr < a->addr + a->size)
				return check_fail(name, "entries %u and %u overlap", j, i);
		}
	}
	if (!usable)
		return check_fail(name, "no usable range");
	if (!holds_image)
		return check_fail(name, "image 0x%lx-0x%lx not inside a usable range", lo, hi);
	check_ok(name, NULL);
}

static void check_bss(const char *name)
{
	unsigned i;
	for (i = 0; i < sizeof(bss_canary); i++)
		if (bss_canary[i])
			return check_fail(name, "byte at 0x%lx is 0x%x, not zero",
					  (uint64_t)&bss_canary[i], bss_canary[i]);
	check_ok(name, NULL);
}

static void check_options(const char *name)
{
	if (opt.bad)
		check_fail(name, "%s", opt.bad_msg);
	else
		check_ok(name, NULL);
}

static void check_expect_mem(const char *name)
{
	uint64_t ram = map_ram();
	if (ram == opt.expect_mem)
		check_ok(name, "ram=%lu", ram);
	else
		check_fail(name, "ram=%lu expected=%lu", ram, opt.expect_mem);
}

/* ---- checks named by probe.check= -------------------------------------- */

static void check_cpl3(const char *name)
{
	uint16_t cs;
	uint64_t n = 10000000, t0, t1;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	if ((cs & 3) != 3)
		return check_fail(name, "running at CPL %u", cs & 3);
	t0 = rdtsc();
	__asm__ volatile("1: dec %0; jnz 1b" : "+r"(n));
	t1 = rdtsc();
	check_ok(name, "iterations=10000000 cycles=%lu", t1 - t0);
}

static void check_virtio(const char *name)
{
	unsigned i;
	if (nvdevs == 0)
		return check_fail(name, "no virtio_mmio.device= on the command line");
	for (i = 0; i < nvdevs; i++) {
		const struct vdev *d = &vdevs[i];
		if (d->magic != VIRTIO_MAGIC)
			return check_fail(name, "base=0x%lx magic=0x%x", d->base, d->magic);
		if (d->version != 2)
			return check_fail(name, "base=0x%lx version=%u (want 2)", d->base,
					  d->version);
		if (d->device_id == 0)
			return check_fail(name, "base=0x%lx has no device", d->base);
	}
	check_ok(name, "devices=%u", nvdevs);
}

/* Negative self-test: port I/O at CPL3 raises #GP, which the probe must
 * report as a fault (vector 13) and end with EXIT_FAULT, not loop. */
static void check_fault(const char *name)
{
	__asm__ volatile("outb %%al, $0x80" : : "a"(0));
	check_fail(name, "port I/O at CPL3 did not fault");
}

#define CHECK_FINAL 1 /* runs after the result line instead of the exit */

struct check {
	const char *name;
	void (*run)(const char *name);
	unsigned flags;
};

/* Add a check here; it runs when probe.check= names it. */
static const struct check checks[] = {
	{ "cpl3", check_cpl3, 0 },
	{ "virtio", check_virtio, 0 },
	{ "fault", check_fault, 0 },
	{ "rng", check_rng, 0 },
	{ "rng_irq", check_rng_irq, 0 },
	{ "blk", check_blk, 0 },
	{ "console", check_console, 0 },
	{ "features_refused", check_features_refused, 0 },
	{ "bad_chain", check_bad_chain, 0 },
	{ "reset", check_reset, 0 },
	{ "bad_driver", check_bad_driver, 0 },
	{ "net", check_net, 0 },
	{ "bench", check_bench, 0 },
	{ "smp", check_smp, 0 },
	{ "snapshot", check_snapshot, 0 },
	{ "triplefault", NULL, CHECK_FINAL },
};

static const struct check *find_check(const char *s, size_t n)
{
	size_t i;
	for (i = 0; i < sizeof(checks) / sizeof(checks[0]); i++)
		if (str_eq_n(s, n, checks[i].name))
			return &checks[i];
	return NULL;
}

/* ---- main --------------------------------------------------------------- */

void user_main(uint32_t kind, uint64_t info)
{
	int final_triplefault = 0;
	unsigned i, j, nram = 0;
	uint64_t total = 0;

	user_out_len = 0;
	bi.kind = kind;
	bi.info = info;
	if (kind == BOOT_PVH)
		read_pvh(info);
	else if (kind == BOOT_LINUX64)
		read_linux64(info);
	if (bi.cmdline_ok)
		parse_cmdline();

	out("probe: boot=%s\r\n", kind == BOOT_PVH ? "pvh" : "linux64");
	out("probe: cmdline=");
	out_escaped(bi.cmdline, bi.cmdline_len);
	out("\r\n");
	for (i = 0; i < bi.nmem; i++) {
		const struct memrange *m = &bi.mem[i];
		out("probe: e820 addr=0x%lx size=0x%lx type=%u\r\n", m->addr, m->size, m->type);
		if (m->type == E820_RAM) {
			nram++;
			total += m->size;
		}
	}
	out("probe: mem total=%lu ranges=%u entries=%u ram=%lu\r\n", total, nram, bi.nmem,
	    map_ram());
	out_flush(); /* an MMIO access below could fault: show what we know */
	vdev_probe_all();
	for (i = 0; i < nvdevs; i++) {
		const struct vdev *d = &vdevs[i];
		out("probe: virtio dev base=0x%lx size=%lu irq=%u magic=0x%x version=%u "
		    "device=%u vendor=0x%x\r\n",
		    d->base, d->size, d->irq, d->magic, d->version, d->device_id, d->vendor_id);
	}

	check_boot("boot");
	check_memmap("memmap");
	check_bss("bss");
	check_options("options");
	if (opt.have_expect_mem)
		check_expect_mem("expect_mem");
	for (i = 0; i < opt.nreq; i++) {
		const struct check *c = find_check(opt.req[i], opt.req_len[i]);
		for (j = 0; j < i; j++) /* each check once */
			if (opt.req_len[j] == opt.req_len[i] &&
			    memcmp(opt.req[j], opt.req[i], opt.req_len[i]) == 0)
				break;
		if (j < i)
			continue;
		if (!c) {
			out("probe: check ");
			out_escaped(opt.req[i], opt.req_len[i]);
			out(" FAIL unknown check\r\n");
			failed++;
		} else if (c->flags & CHECK_FINAL) {
			final_triplefault = 1;
		} else {
			out_flush(); /* a check that faults still shows what came before */
			c->run(c->name);
		}
	}

	out("probe: time tsc=%lu\r\n", rdtsc() - boot_tsc);
	if (failed)
		out("probe: result fail %u\r\n", failed);
	else
		out("probe: result pass\r\n");
	if (final_triplefault) {
		out("probe: triplefault\r\n");
		out_flush();
		sys(SYS_TRIPLEFAULT, 0, 0);
	}
	out_flush();
	sys(SYS_EXIT, failed > EXIT_MAX_FAILED ? EXIT_MAX_FAILED : (long)failed, 0);
	for (;;)
		;
}
