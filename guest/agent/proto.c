/*
 * minivmm-agent: reading and writing frames (guest/agent/README.md), and
 * FAILED, which ends a handler.
 */
#include "agent.h"

void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n = snprintf(line, sizeof(line), "minivmm-agent: ");
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	if (write(2, line, (size_t)n) < 0) { /* nowhere else to say it */ }
}

/* -- frames ----------------------------------------------------------------- */

int write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n > 0) {
		ssize_t k = write(fd, p, n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* 1: all n bytes; 0: end of stream before the first byte; -1: error or short. */
int read_full(int fd, void *buf, size_t n)
{
	char *p = buf;
	size_t got = 0;
	while (got < n) {
		ssize_t k = read(fd, p + got, n - got);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return -1;
		if (k == 0)
			return got == 0 ? 0 : -1;
		got += (size_t)k;
	}
	return 1;
}

void put_le32(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

uint32_t get_le32(const void *p)
{
	const unsigned char *b = p;
	return b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

int send_frame(int fd, int type, const void *data, uint32_t len)
{
	unsigned char hdr[HDR_LEN] = { (unsigned char)type, 0, 0, 0 };
	put_le32(hdr + 4, len);
	if (write_all(fd, hdr, HDR_LEN) < 0)
		return -1;
	return len ? write_all(fd, data, len) : 0;
}

int send_u32(int fd, int type, uint32_t v)
{
	unsigned char b[4];
	put_le32(b, v);
	return send_frame(fd, type, b, 4);
}

/* FAILED: u32 errno (0 when none applies), then a message; then the handler ends. */
void fail(int fd, int err, const char *fmt, ...)
{
	char msg[4 + 400];
	va_list ap;
	put_le32((unsigned char *)msg, (uint32_t)err);
	va_start(ap, fmt);
	int n = vsnprintf(msg + 4, sizeof(msg) - 4, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > (int)sizeof(msg) - 5)
		n = (int)sizeof(msg) - 5;
	send_frame(fd, T_FAILED, msg, (uint32_t)(4 + n));
	/* Closing with unread input would reset the connection, and the host might lose
	 * the FAILED frame: read what the host still sends (bounded) first. */
	shutdown(fd, SHUT_WR);
	static char sink[65536];
	for (int left = 64; left > 0; left--) {
		struct pollfd p = { fd, POLLIN, 0 };
		if (poll(&p, 1, 1000) <= 0 || read(fd, sink, sizeof(sink)) <= 0)
			break;
	}
	_exit(1);
}

/* 1: a frame; 0: the host closed the connection; the handler ends on errors. */
int recv_frame(int fd, struct frame *f, uint32_t max)
{
	unsigned char hdr[HDR_LEN];
	int r = read_full(fd, hdr, HDR_LEN);
	if (r <= 0) {
		if (r < 0)
			_exit(1);
		return 0;
	}
	f->type = hdr[0];
	f->len = get_le32(hdr + 4);
	if (hdr[1] | hdr[2] | hdr[3])
		fail(fd, EINVAL, "frame header: reserved bytes not zero");
	if (f->len > max)
		fail(fd, E2BIG, "frame '%c': %u bytes, at most %u", f->type, f->len, max);
	f->data = malloc((size_t)f->len + 1);
	if (!f->data)
		fail(fd, ENOMEM, "out of memory");
	if (f->len && read_full(fd, f->data, f->len) <= 0)
		_exit(1);
	f->data[f->len] = 0;
	return 1;
}
