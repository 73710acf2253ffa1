/*
 * The agent's frames (guest/agent/README.md): shared by agent.c and proto.c.
 */
#ifndef MINIVMM_AGENT_H
#define MINIVMM_AGENT_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define DEFAULT_PORT 52
#define HDR_LEN 8
#define MAX_FRAME (1u << 20)  /* any request frame */
#define MAX_REQUEST (4u << 20) /* ARG + ENV + CWD bytes together */
#define MAX_ITEMS 4096        /* ARG + ENV frames */
#define CHUNK 32768           /* STDOUT/STDERR frame payload at most */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum {
	T_ARG = 'A', T_ENV = 'E', T_CWD = 'D', T_EXEC = 'X', T_STDIN = 'I', T_KILL = 'K',
	T_STARTED = 'S', T_STDOUT = 'O', T_STDERR = 'R', T_EXITED = 'W', T_SIGNALED = 'G',
	T_FAILED = 'F', T_PUT = 'P', T_GET = 'Q',
	/* protocol version 2 */
	T_TREE = 'T', T_ENTRY = 'Y', T_NOTE = 'N',
};

struct frame {
	int type;
	uint32_t len;
	char *data; /* malloc'd, NUL-terminated, or NULL when len == 0 */
};

void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int write_all(int fd, const void *buf, size_t n);
int read_full(int fd, void *buf, size_t n);
void put_le32(unsigned char *p, uint32_t v);
uint32_t get_le32(const void *p);
int send_frame(int fd, int type, const void *data, uint32_t len);
int send_u32(int fd, int type, uint32_t v);
void fail(int fd, int err, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));
int recv_frame(int fd, struct frame *f, uint32_t max);
void load_modules(void); /* modload.c */
void send_tree(int fd, struct frame *f) __attribute__((noreturn));

#endif
