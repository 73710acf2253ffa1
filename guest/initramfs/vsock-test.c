/*
 * /init of guest/out/initramfs-vsock.cpio: the guest side of minivmm's
 * virtio-vsock end-to-end test (tests/test_linux_vsock.py). Freestanding like
 * check-init.c (no libc: each system call is expensive on hosts whose KVM
 * emulates guest kernel code).
 *
 *   1. connects to the host (CID 2) port 5000, writes HELLO_LINE, reads one
 *      line back and prints "vsock-test: host said <line>";
 *   2. listens on port 1234, prints "vsock-test: listening 1234", accepts one
 *      connection and echoes it until the host's end of stream, then prints
 *      "vsock-test: echoed <n> bytes";
 *   3. accepts a second connection on port 1234 and reads it to its end
 *      without writing, printing "vsock-test: sunk <n> bytes";
 *   4. prints "vsock-test: end" and reboots (RB_AUTOBOOT; with reboot=t a
 *      triple fault ends the VM).
 * A failing step prints "vsock-test: <step> error <errno>" and goes on.
 *
 * Build: gcc -static -Os -nostdlib -ffreestanding -fno-stack-protector
 *        -fno-pie -no-pie vsock-test.c -o init
 */

#define HELLO_LINE "hello from the guest\n"

#include "freestanding.h"

enum {
	SYS_read = 0, SYS_write = 1, SYS_close = 3, SYS_socket = 41,
	SYS_connect = 42, SYS_accept = 43, SYS_bind = 49, SYS_listen = 50,
	SYS_reboot = 169,
};
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define VMADDR_CID_ANY 0xffffffffU
#define VMADDR_CID_HOST 2
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567

struct sockaddr_vm {
	u16 svm_family;
	u16 svm_reserved1;
	u32 svm_port;
	u32 svm_cid;
	unsigned char svm_flags;
	unsigned char svm_zero[3];
};

static char buf[16384];
static char line[256];
static size_t pos;

static void put(const char *s)
{
	while (*s && pos < sizeof(line) - 1)
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

static void say(const char *what, const char *text)
{
	pos = 0;
	put("vsock-test: ");
	put(what);
	put(text);
	line[pos++] = '\n';
	sys3(SYS_write, 1, line, pos);
}

static void say_n(const char *what, u64 n, const char *unit)
{
	pos = 0;
	put("vsock-test: ");
	put(what);
	put_udec(n);
	put(unit);
	line[pos++] = '\n';
	sys3(SYS_write, 1, line, pos);
}

static long fail(const char *step, long err)
{
	say_n(step, (u64)-err, "");
	return err;
}

static int write_all(long fd, const char *p, long n)
{
	while (n > 0) {
		long k = sys3(SYS_write, fd, p, n);
		if (k <= 0)
			return (int)k;
		p += k;
		n -= k;
	}
	return 1;
}

static struct sockaddr_vm addr(u32 cid, u32 port)
{
	struct sockaddr_vm a;
	memset(&a, 0, sizeof(a));
	a.svm_family = AF_VSOCK;
	a.svm_cid = cid;
	a.svm_port = port;
	return a;
}

static void talk_to_host(void)
{
	struct sockaddr_vm a = addr(VMADDR_CID_HOST, 5000);
	long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	long r, n = 0;

	if (fd < 0) {
		fail("socket error ", fd);
		return;
	}
	r = sys3(SYS_connect, fd, &a, sizeof(a));
	if (r < 0) {
		fail("connect error ", r);
		sys3(SYS_close, fd, 0, 0);
		return;
	}
	write_all(fd, HELLO_LINE, sizeof(HELLO_LINE) - 1);
	while (n < 200) {
		r = sys3(SYS_read, fd, buf + n, 200 - n);
		if (r <= 0)
			break;
		n += r;
		if (buf[n - 1] == '\n')
			break;
	}
	if (n > 0 && buf[n - 1] == '\n')
		n--;
	buf[n] = 0;
	say("host said ", buf);
	sys3(SYS_close, fd, 0, 0);
}

/* Accept one connection on lfd; echo it (or just read it) to its end. */
static void serve(long lfd, int echo)
{
	long fd = sys3(SYS_accept, lfd, 0, 0);
	u64 total = 0;
	long r;

	if (fd < 0) {
		fail("accept error ", fd);
		return;
	}
	for (;;) {
		r = sys3(SYS_read, fd, buf, sizeof(buf));
		if (r < 0) {
			fail("read error ", r);
			break;
		}
		if (r == 0)
			break;
		total += (u64)r;
		if (echo && write_all(fd, buf, r) <= 0) {
			say("write error", "");
			break;
		}
	}
	sys3(SYS_close, fd, 0, 0);
	say_n(echo ? "echoed " : "sunk ", total, " bytes");
}

void _start(void)
{
	struct sockaddr_vm a = addr(VMADDR_CID_ANY, 1234);
	long lfd, r;

	say("begin", "");
	talk_to_host();
	lfd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	r = lfd < 0 ? lfd : sys3(SYS_bind, lfd, &a, sizeof(a));
	if (r >= 0)
		r = sys3(SYS_listen, lfd, 4, 0);
	if (r < 0) {
		fail("listen error ", r);
	} else {
		say("listening 1234", "");
		serve(lfd, 1);
		serve(lfd, 0);
	}
	say("end", "");
	sys6(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
	     LINUX_REBOOT_CMD_RESTART, 0, 0, 0);
	for (;;)
		;
}
