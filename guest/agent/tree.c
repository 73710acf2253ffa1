/*
 * minivmm-agent: TREE, a file or a directory tree sent to the host
 * (guest/agent/README.md, protocol version 2).
 *
 * Pre-order, depth first: an ENTRY frame for each file, directory, symlink or
 * other node (the host decides what it keeps), the content of a regular file
 * right after its ENTRY as STDOUT frames holding exactly the size it declared.
 * Nothing is followed below the root: every node is opened relative to its
 * directory with O_NOFOLLOW. What cannot be read is skipped with a NOTE.
 */
#include "agent.h"
#include <dirent.h>

#define MAX_DEPTH 200 /* directories below the root, each holding one fd while walked */

struct walk {
	int fd;              /* the host connection */
	char rel[PATH_MAX];  /* the node's path relative to the root ("" for the root) */
	char buf[CHUNK];
};

static void note(struct walk *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(struct walk *w, const char *fmt, ...)
{
	char msg[600];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n >= (int)sizeof(msg))
		n = (int)sizeof(msg) - 1;
	if (send_frame(w->fd, T_NOTE, msg, (uint32_t)n) < 0)
		_exit(1);
}

/* ENTRY: u32 st_mode, u64 size, u32 path length, the path, then (a symlink) its target. */
static void send_entry(struct walk *w, uint32_t mode, uint64_t size, const char *target)
{
	static unsigned char frame[16 + PATH_MAX + PATH_MAX];
	size_t plen = strlen(w->rel), tlen = target ? strlen(target) : 0;
	put_le32(frame, mode);
	put_le32(frame + 4, (uint32_t)size);
	put_le32(frame + 8, (uint32_t)(size >> 32));
	put_le32(frame + 12, (uint32_t)plen);
	memcpy(frame + 16, w->rel, plen);
	if (tlen)
		memcpy(frame + 16 + plen, target, tlen);
	if (send_frame(w->fd, T_ENTRY, frame, (uint32_t)(16 + plen + tlen)) < 0)
		_exit(1);
}

/* A regular file: its ENTRY with the size fstat gives, then exactly that many bytes
 * (a file that shrinks meanwhile ends the request with FAILED: the stream would lie). */
static void send_file(struct walk *w, int in, const struct stat *st)
{
	uint64_t left = (uint64_t)st->st_size;
	send_entry(w, st->st_mode, left, NULL);
	while (left > 0) {
		ssize_t n = read(in, w->buf, left < CHUNK ? (size_t)left : CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail(w->fd, errno, "%s: %s", w->rel, strerror(errno));
		if (n == 0)
			fail(w->fd, EIO, "%s: changed size while read", w->rel);
		if (send_frame(w->fd, T_STDOUT, w->buf, (uint32_t)n) < 0)
			_exit(1);
		left -= (uint64_t)n;
	}
}

static void walk(struct walk *w, int dirfd, const char *name, int depth);

static void walk_dir(struct walk *w, int d, const struct stat *st, int depth)
{
	send_entry(w, st->st_mode, 0, NULL);
	if (depth >= MAX_DEPTH) {
		note(w, "%s: more than %d directories deep: not descended into", w->rel, MAX_DEPTH);
		close(d);
		return;
	}
	DIR *dp = fdopendir(d);
	if (!dp) {
		note(w, "%s: %s", w->rel, strerror(errno));
		close(d);
		return;
	}
	size_t at = strlen(w->rel);
	struct dirent *de;
	for (errno = 0; (de = readdir(dp)); errno = 0) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		size_t n = strlen(de->d_name);
		if (at + (at ? 1 : 0) + n >= sizeof(w->rel)) {
			note(w, "%s/%s: path too long: skipped", w->rel, de->d_name);
			continue;
		}
		if (at)
			w->rel[at] = '/';
		memcpy(w->rel + at + (at ? 1 : 0), de->d_name, n + 1);
		walk(w, dirfd(dp), de->d_name, depth + 1);
		w->rel[at] = 0;
	}
	if (errno)
		note(w, "%s: %s", at ? w->rel : ".", strerror(errno));
	closedir(dp);
}

/* One node, ``name`` in ``dirfd``; its relative path is in w->rel. */
static void walk(struct walk *w, int dirfd, const char *name, int depth)
{
	struct stat st;
	char target[PATH_MAX];
	int follow = depth == 0 ? 0 : AT_SYMLINK_NOFOLLOW; /* the root may be a link */
	if (fstatat(dirfd, name, &st, follow) < 0) {
		if (depth == 0)
			fail(w->fd, errno, "%s: %s", name, strerror(errno));
		note(w, "%s: %s", w->rel, strerror(errno));
		return;
	}
	if (S_ISLNK(st.st_mode)) {
		ssize_t n = readlinkat(dirfd, name, target, sizeof(target) - 1);
		if (n < 0) {
			note(w, "%s: %s", w->rel, strerror(errno));
			return;
		}
		target[n] = 0;
		send_entry(w, st.st_mode, (uint64_t)n, target);
		return;
	}
	if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
		send_entry(w, st.st_mode, 0, NULL); /* the host says what it skips */
		return;
	}
	int flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | (depth ? O_NOFOLLOW : 0) |
		    (S_ISDIR(st.st_mode) ? O_DIRECTORY : 0);
	int in = openat(dirfd, name, flags);
	if (in < 0 || fstat(in, &st) < 0) {
		if (depth == 0)
			fail(w->fd, errno, "%s: %s", name, strerror(errno));
		note(w, "%s: %s", w->rel, strerror(errno));
		if (in >= 0)
			close(in);
		return;
	}
	if (S_ISDIR(st.st_mode)) {
		walk_dir(w, in, &st, depth);
		return;
	}
	if (S_ISREG(st.st_mode))
		send_file(w, in, &st);
	else
		note(w, "%s: changed type while read: skipped", w->rel);
	close(in);
}

void send_tree(int fd, struct frame *f)
{
	static struct walk w;
	if (f->len == 0 || memchr(f->data, 0, f->len))
		fail(fd, EINVAL, "TREE: expected a path without NUL bytes");
	w.fd = fd;
	w.rel[0] = 0;
	walk(&w, AT_FDCWD, f->data, 0);
	send_u32(fd, T_EXITED, 0);
	shutdown(fd, SHUT_WR);
	_exit(0);
}
