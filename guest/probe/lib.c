/* lib.c - freestanding helpers used by both halves: a small printf core,
 * string and memory functions (gcc may emit calls to memcpy/memset), and
 * Linux's memparse() number syntax. */
#include "probe.h"

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

void *memcpy(void *d, const void *s, size_t n)
{
	char *dp = d;
	const char *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memset(void *d, int c, size_t n)
{
	char *dp = d;
	while (n--)
		*dp++ = (char)c;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

/* 1 if the (not NUL-terminated) a[0..alen) equals the C string b. */
int str_eq_n(const char *a, size_t alen, const char *b)
{
	size_t bl = strlen(b);
	return alen == bl && memcmp(a, b, bl) == 0;
}

/* Linux memparse(): an unsigned number in C syntax (0x.. hex, 0.. octal,
 * decimal) with an optional K/M/G/T/P/E suffix (either case), nothing
 * after it. Returns 0 on success, -1 on a malformed number or overflow. */
int parse_size(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0, base = 10;
	size_t i = 0, digits = 0;
	int shift = 0;

	if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	} else if (len >= 2 && s[0] == '0') {
		base = 8;
		i = 1;
	}
	for (; i < len; i++, digits++) {
		char c = s[i];
		uint64_t d;
		if (c >= '0' && c <= '9')
			d = (uint64_t)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (uint64_t)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (uint64_t)(c - 'A' + 10);
		else
			break;
		if (d >= base || v > (UINT64_MAX - d) / base)
			return -1;
		v = v * base + d;
	}
	if (digits == 0 && !(base == 8))
		return -1;
	if (i < len) {
		switch (s[i]) {
		case 'e': case 'E': shift += 10; /* fall through */
		case 'p': case 'P': shift += 10; /* fall through */
		case 't': case 'T': shift += 10; /* fall through */
		case 'g': case 'G': shift += 10; /* fall through */
		case 'm': case 'M': shift += 10; /* fall through */
		case 'k': case 'K': shift += 10; break;
		default: return -1;
		}
		if (++i != len)
			return -1;
		if (v > (UINT64_MAX >> shift))
			return -1;
		v <<= shift;
	}
	*out = v;
	return 0;
}

static void put_num(putc_fn put, void *ctx, uint64_t v, unsigned base, int width,
		    char pad, int neg)
{
	char tmp[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		tmp[n++] = '-';
	while (width-- > n)
		put(ctx, pad);
	while (n)
		put(ctx, tmp[--n]);
}

/* printf subset: %s %c %d %u %x %p %%, flag '0', a width, lengths l/ll/z. */
void vfmt(putc_fn put, void *ctx, const char *f, va_list ap)
{
	for (; *f; f++) {
		int width = 0, lng = 0;
		char pad = ' ';
		if (*f != '%') {
			put(ctx, *f);
			continue;
		}
		f++;
		if (*f == '0') {
			pad = '0';
			f++;
		}
		while (*f >= '0' && *f <= '9')
			width = width * 10 + (*f++ - '0');
		while (*f == 'l' || *f == 'z') {
			lng = 1;
			f++;
		}
		switch (*f) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			while (*s)
				put(ctx, *s++);
			break;
		}
		case 'c':
			put(ctx, (char)va_arg(ap, int));
			break;
		case 'd': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			put_num(put, ctx, v < 0 ? (uint64_t)-v : (uint64_t)v, 10, width, pad,
				v < 0);
			break;
		}
		case 'u':
			put_num(put, ctx, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10,
				width, pad, 0);
			break;
		case 'x':
			put_num(put, ctx, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16,
				width, pad, 0);
			break;
		case 'p':
			put(ctx, '0');
			put(ctx, 'x');
			put_num(put, ctx, (uint64_t)va_arg(ap, void *), 16, width, pad, 0);
			break;
		case '%':
			put(ctx, '%');
			break;
		default:
			if (!*f)
				return;
			put(ctx, '%');
			put(ctx, *f);
		}
	}
}
