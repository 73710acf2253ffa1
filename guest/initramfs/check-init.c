/*
 * /init of guest/out/initramfs-check.cpio: report what the kernel found,
 * then reboot. Written for hosts whose KVM emulates guest kernel code
 * (REFERENCE.md §1), where each system call costs ~1.6 ms and each freshly
 * touched page ~9 ms: so no libc (its start-up alone makes a dozen system
 * calls), one 4 KiB buffer reused for every read, output written once per
 * report line.
 *
 * Build: gcc -static -Os -nostdlib -ffreestanding -fno-stack-protector
 *        -fno-pie -no-pie check-init.c -o init
 *
 * Output on the console (stdout = /dev/console), one line each, in order:
 *   minivmm-check: begin
 *   minivmm-check: cmdline <contents of /proc/cmdline>
 *   minivmm-check: memtotal-kib <MemTotal from /proc/meminfo>
 *   minivmm-check: cpus-online <contents of /sys/devices/system/cpu/online, e.g. 0-1>
 *   minivmm-check: rtc0 since-epoch <seconds>   (only if the kernel has an RTC driver)
 *   minivmm-check: virtio <name> device-id <decimal id> driver <driver|none>
 *                                     (one line per /sys/bus/virtio/devices entry)
 *   minivmm-check: virtio-count <n>
 *   minivmm-check: vda-size <bytes>
 *   minivmm-check: vda-crc32 <8 hex digits> bytes <n>
 *                  (CRC-32/ISO-HDLC, as zlib.crc32, over the first
 *                   min(64 KiB, size) bytes of /dev/vda)
 *   minivmm-check: hwrng <32 hex digits>         (16 bytes of /dev/hwrng)
 *   minivmm-check: hvc0 wrote <n> bytes          (HVC0_LINE to /dev/hvc0)
 *   minivmm-check: end
 * A step that fails prints "minivmm-check: <step> error <errno>" (or
 * "absent" for a missing device) instead, and the report goes on.
 * Then reboot(RB_AUTOBOOT); with `reboot=t` that is a triple fault. Built with
 * -DCHECK_POWER_OFF it powers off instead (RB_POWER_OFF: ACPI S5, where the kernel
 * has ACPI; tests/test_linux_acpi.py).
 */

#define HVC0_LINE "minivmm-check: hello on hvc0\n"

#include "freestanding.h"

/* x86-64 system call numbers and constants (asm/unistd_64.h, uapi). */
enum {
	SYS_read = 0, SYS_write = 1, SYS_close = 3, SYS_ioctl = 16,
	SYS_nanosleep = 35, SYS_reboot = 169, SYS_mount = 165,
	SYS_getdents64 = 217, SYS_openat = 257, SYS_readlinkat = 267,
};
#define AT_FDCWD (-100)
#define O_RDONLY 0
#define O_WRONLY 1
#define O_DIRECTORY 0200000
#define O_CLOEXEC 02000000
#define BLKGETSIZE64 0x80081272UL /* _IOR(0x12, 114, size_t) */
#define ENOENT 2
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567 /* RB_AUTOBOOT */
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321FEDC /* RB_POWER_OFF */
#ifdef CHECK_POWER_OFF
#define CHECK_END_CMD LINUX_REBOOT_CMD_POWER_OFF
#else
#define CHECK_END_CMD LINUX_REBOOT_CMD_RESTART
#endif

static size_t slen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

static char buf[4096];   /* file contents, directory entries */
static char line[4096];  /* the report line being built */
static size_t pos;
static int have_console; /* a virtio device with ID 3 was listed */

static void put(const char *s)
{
	while (*s && pos < sizeof(line) - 1)
		line[pos++] = *s++;
}

static void put_n(const char *s, size_t n)
{
	while (n-- && pos < sizeof(line) - 1)
		line[pos++] = *s++;
}

static void put_udec(u64 v)
{
	char t[24];
	int i = sizeof(t);
	t[--i] = 0;
	do
		t[--i] = (char)('0' + v % 10);
	while ((v /= 10) && i);
	put(t + i);
}

static void put_hex(u64 v, int digits)
{
	static const char hex[] = "0123456789abcdef";
	while (digits--)
		line[pos < sizeof(line) - 1 ? pos++ : pos] = hex[(v >> (4 * digits)) & 15];
}

static void begin(const char *what)
{
	pos = 0;
	put("minivmm-check: ");
	put(what);
}

static void end_line(void)
{
	line[pos++] = '\n';
	sys3(SYS_write, 1, line, pos);
}

static void fail(const char *what, long err)
{
	begin(what);
	if (err == -ENOENT) {
		put(" absent");
	} else {
		put(" error ");
		put_udec((u64)-err);
	}
	end_line();
}

/* Read up to sizeof(buf)-1 bytes of a file into buf, NUL-terminated. */
static long read_file(const char *path)
{
	long fd = sys3(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
	long n;

	if (fd < 0)
		return fd;
	n = sys3(SYS_read, fd, buf, sizeof(buf) - 1);
	sys3(SYS_close, fd, 0, 0);
	buf[n < 0 ? 0 : n] = 0;
	return n;
}

static void report_cmdline(void)
{
	long n = read_file("/proc/cmdline");
	if (n < 0)
		return fail("cmdline", n);
	while (n > 0 && buf[n - 1] == '\n')
		n--;
	begin("cmdline ");
	put_n(buf, (size_t)n);
	end_line();
}

static void report_memtotal(void)
{
	long n = read_file("/proc/meminfo");
	const char *p = buf;
	u64 kib = 0;

	if (n < 0)
		return fail("memtotal-kib", n);
	/* First line: "MemTotal:       253008 kB" */
	while (*p && (*p < '0' || *p > '9') && *p != '\n')
		p++;
	while (*p >= '0' && *p <= '9')
		kib = kib * 10 + (u64)(*p++ - '0');
	begin("memtotal-kib ");
	put_udec(kib);
	end_line();
}

static void report_cpus(void)
{
	long n = read_file("/sys/devices/system/cpu/online");
	if (n < 0)
		return fail("cpus-online", n);
	while (n > 0 && buf[n - 1] == '\n')
		n--;
	begin("cpus-online ");
	put_n(buf, (size_t)n);
	end_line();
}

static void report_rtc(void)
{
	long n = read_file("/sys/class/rtc/rtc0/since_epoch");
	if (n < 0)
		return; /* no RTC driver (the minimal kernel): nothing to report */
	while (n > 0 && buf[n - 1] == '\n')
		n--;
	begin("rtc0 since-epoch ");
	put_n(buf, (size_t)n);
	end_line();
}

struct dirent64 {
	u64 d_ino;
	u64 d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

static void report_one_virtio(const char *name)
{
	static char path[256];
	static char link[256];
	long n;
	u64 id = 0;
	const char *p, *drv;

	pos = 0;
	put("/sys/bus/virtio/devices/");
	put(name);
	put("/device");
	line[pos] = 0;
	memcpy(path, line, pos + 1);
	n = read_file(path);
	/* sysfs prints the ID as 0x%04x */
	for (p = buf + 2; n > 2 && *p && *p != '\n'; p++)
		id = id * 16 + (u64)(*p <= '9' ? *p - '0' : (*p | 32) - 'a' + 10);

	memcpy(path + slen(path) - 6, "driver", 7);
	n = sys6(SYS_readlinkat, AT_FDCWD, (long)path, (long)link,
		 sizeof(link) - 1, 0, 0);
	drv = "none";
	if (n > 0) {
		link[n] = 0;
		drv = link;
		for (p = link; *p; p++)
			if (*p == '/')
				drv = p + 1;
	}

	if (id == 3)
		have_console = 1;
	begin("virtio ");
	put(name);
	put(" device-id ");
	put_udec(id);
	put(" driver ");
	put(drv);
	end_line();
}

static void report_virtio(void)
{
	static char dents[2048];
	static char names[16][32];
	long fd = sys3(SYS_openat, AT_FDCWD, "/sys/bus/virtio/devices",
		       O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int count = 0;
	long n, off;

	if (fd < 0) {
		fail("virtio-count", fd);
		return;
	}
	/* Collect names first: report_one_virtio reuses buf. */
	while ((n = sys3(SYS_getdents64, fd, dents, sizeof(dents))) > 0) {
		for (off = 0; off < n;) {
			struct dirent64 *d = (struct dirent64 *)(dents + off);
			off += d->d_reclen;
			if (d->d_name[0] == '.' || count == 16 || slen(d->d_name) >= 32)
				continue;
			memcpy(names[count++], d->d_name, slen(d->d_name) + 1);
		}
	}
	sys3(SYS_close, fd, 0, 0);
	for (int i = 0; i < count; i++)
		report_one_virtio(names[i]);
	begin("virtio-count ");
	put_udec((u64)count);
	end_line();
}

static u32 crc32_update(u32 crc, const unsigned char *p, size_t n)
{
	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320u & -(crc & 1));
	}
	return crc;
}

static void report_vda(void)
{
	long fd = sys3(SYS_openat, AT_FDCWD, "/dev/vda", O_RDONLY | O_CLOEXEC);
	u64 size = 0;
	u32 crc = 0xffffffffu;
	long total = 0, n, err;

	if (fd < 0) {
		fail("vda-size", fd);
		return;
	}
	err = sys3(SYS_ioctl, fd, BLKGETSIZE64, &size);
	if (err < 0) {
		fail("vda-size", err);
	} else {
		begin("vda-size ");
		put_udec(size);
		end_line();
	}
	while (total < 65536 &&
	       (n = sys3(SYS_read, fd, buf, sizeof(buf))) > 0) {
		if (n > 65536 - total)
			n = 65536 - total;
		crc = crc32_update(crc, (unsigned char *)buf, (size_t)n);
		total += n;
	}
	sys3(SYS_close, fd, 0, 0);
	if (n < 0 && total == 0)
		return fail("vda-crc32", n);
	begin("vda-crc32 ");
	put_hex(crc ^ 0xffffffffu, 8);
	put(" bytes ");
	put_udec((u64)total);
	end_line();
}

static void report_hwrng(void)
{
	long fd = sys3(SYS_openat, AT_FDCWD, "/dev/hwrng", O_RDONLY | O_CLOEXEC);
	long got = 0, n = 0;

	if (fd < 0)
		return fail("hwrng", fd);
	while (got < 16 && (n = sys3(SYS_read, fd, buf + got, 16 - got)) > 0)
		got += n;
	sys3(SYS_close, fd, 0, 0);
	if (got < 16)
		return fail("hwrng", n < 0 ? n : -5 /* EIO: short read */);
	begin("hwrng ");
	for (int i = 0; i < 16; i++)
		put_hex((unsigned char)buf[i], 2);
	end_line();
}

static void report_hvc0(void)
{
	/* The port appears once the host announces it on the control queue. */
	struct { long s, ns; } tenth = { 0, 100000000 };
	long fd = -ENOENT, n;

	for (int tries = 0; tries < (have_console ? 30 : 1); tries++) {
		fd = sys3(SYS_openat, AT_FDCWD, "/dev/hvc0", O_WRONLY | O_CLOEXEC);
		if (fd != -ENOENT)
			break;
		sys3(SYS_nanosleep, &tenth, 0, 0);
	}
	if (fd < 0)
		return fail("hvc0", fd);
	n = sys3(SYS_write, fd, HVC0_LINE, sizeof(HVC0_LINE) - 1);
	sys3(SYS_close, fd, 0, 0);
	if (n < 0)
		return fail("hvc0", n);
	begin("hvc0 wrote ");
	put_udec((u64)n);
	put(" bytes");
	end_line();
}

static void mount_fs(const char *type, const char *dir)
{
	long err = sys6(SYS_mount, (long)type, (long)dir, (long)type, 0, 0, 0);
	if (err < 0 && err != -16 /* EBUSY: already mounted */) {
		begin("mount ");
		put(dir);
		put(" error ");
		put_udec((u64)-err);
		end_line();
	}
}

void __attribute__((noreturn, used)) check_main(void)
{
	begin("begin");
	end_line();
	mount_fs("proc", "/proc");
	mount_fs("sysfs", "/sys");
	mount_fs("devtmpfs", "/dev");
	report_cmdline();
	report_memtotal();
	report_cpus();
	report_rtc();
	report_virtio();
	report_vda();
	report_hwrng();
	report_hvc0();
	begin("end");
	end_line();
	sys6(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
	     CHECK_END_CMD, 0, 0, 0);
	for (;;)
		sys3(SYS_nanosleep, 0, 0, 0);
}

/* Entry: the kernel leaves argc at (%rsp); align the stack for the call. */
__asm__(".globl _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	and $-16, %rsp\n"
	"	call check_main\n"
	"	hlt\n");
