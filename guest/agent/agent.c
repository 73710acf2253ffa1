/*
 * minivmm-agent: runs commands for the host over virtio-vsock
 * (protocol: guest/agent/README.md).
 *
 * As PID 1 (minivmm exec puts it at /init) it first mounts /proc, /sys,
 * /dev (devtmpfs) and /tmp and sets PATH; started by another init it only
 * serves. It listens on vsock port 52 (or the port given as its one
 * argument; as PID 1, by minivmm_agent_port=N on the kernel command line),
 * tells the host so (one connection to the host's port 52), and serves each
 * connection in a handler process forked in advance (a spare waits in
 * accept()), so a bad request ends that handler only; the
 * handler starts the command with posix_spawnp in a session of its own.
 * PID 1 ignores SIGCHLD, so the kernel reaps its children and every orphan
 * re-parented to it.
 *
 * Build: guest/agent/build.sh OUTDIR (gcc -static -O2 agent.c proto.c modload.c tree.c)
 */
#include "agent.h"

/* -- one request ------------------------------------------------------------ */

struct request {
	char **argv, **envp, *cwd;
	size_t argc, envc, bytes;
};

static void add_item(int fd, char ***list, size_t *n, char *s)
{
	char **l = realloc(*list, (*n + 2) * sizeof(char *));
	if (!l)
		fail(fd, ENOMEM, "out of memory");
	l[(*n)++] = s;
	l[*n] = NULL;
	*list = l;
}

static int env_has(char **envp, size_t envc, const char *kv)
{
	size_t k = strcspn(kv, "=");
	for (size_t i = 0; i < envc; i++)
		if (strncmp(envp[i], kv, k) == 0 && envp[i][k] == '=')
			return 1;
	return 0;
}

/* -- files ------------------------------------------------------------------ */

static void send_ok(int fd)
{
	send_u32(fd, T_EXITED, 0);
	shutdown(fd, SHUT_WR);
	_exit(0);
}

/* PUT: u32 mode, then the path; the content follows in STDIN frames, an empty one
 * ends it. The file is created or truncated (mode & 07777 when created). */
static void put_file(int fd, struct frame *f)
{
	static char path[4096];
	uint32_t mode;
	if (f->len < 5 || f->len - 4 >= sizeof(path) || memchr(f->data + 4, 0, f->len - 4))
		fail(fd, EINVAL, "PUT: expected a mode and a path without NUL bytes");
	mode = get_le32(f->data);
	memcpy(path, f->data + 4, f->len - 4);
	path[f->len - 4] = 0;
	int out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, (mode_t)(mode & 07777));
	if (out < 0)
		fail(fd, errno, "%s: %s", path, strerror(errno));
	for (;;) {
		struct frame d;
		if (!recv_frame(fd, &d, MAX_FRAME))
			_exit(1); /* the host went away: a partial file stays */
		if (d.type != T_STDIN)
			fail(fd, EINVAL, "PUT: unexpected frame type 0x%02x", d.type);
		if (d.len == 0)
			break;
		if (write_all(out, d.data, d.len) < 0)
			fail(fd, errno, "%s: %s", path, strerror(errno));
		free(d.data);
	}
	if (close(out) < 0)
		fail(fd, errno, "%s: %s", path, strerror(errno));
	send_ok(fd);
}

/* GET: the path; the content comes back in STDOUT frames, then EXITED 0. */
static void get_file(int fd, struct frame *f)
{
	static char buf[CHUNK];
	struct stat st;
	if (f->len == 0 || memchr(f->data, 0, f->len))
		fail(fd, EINVAL, "GET: expected a path without NUL bytes");
	int in = open(f->data, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		fail(fd, errno, "%s: %s", f->data, strerror(errno));
	if (fstat(in, &st) == 0 && S_ISDIR(st.st_mode))
		fail(fd, EISDIR, "%s: %s", f->data, strerror(EISDIR));
	for (;;) {
		ssize_t n = read(in, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail(fd, errno, "%s: %s", f->data, strerror(errno));
		if (n == 0)
			break;
		if (send_frame(fd, T_STDOUT, buf, (uint32_t)n) < 0)
			_exit(1);
	}
	send_ok(fd);
}

static void read_request(int fd, struct request *rq)
{
	struct frame f;
	memset(rq, 0, sizeof(*rq));
	for (;;) {
		if (!recv_frame(fd, &f, MAX_FRAME))
			_exit(0);
		rq->bytes += f.len;
		if (rq->bytes > MAX_REQUEST || rq->argc + rq->envc >= MAX_ITEMS)
			fail(fd, E2BIG, "request larger than %u bytes or %u items", MAX_REQUEST, MAX_ITEMS);
		if ((f.type == T_ARG || f.type == T_ENV || f.type == T_CWD) &&
		    memchr(f.data, 0, f.len))
			fail(fd, EINVAL, "frame '%c' holds a NUL byte", f.type);
		switch (f.type) {
		case T_ARG:
			add_item(fd, &rq->argv, &rq->argc, f.data);
			break;
		case T_ENV:
			if (!strchr(f.data, '=') || f.data[0] == '=')
				fail(fd, EINVAL, "ENV frame without NAME=: %.60s", f.data);
			add_item(fd, &rq->envp, &rq->envc, f.data);
			break;
		case T_CWD:
			free(rq->cwd);
			rq->cwd = f.data;
			break;
		case T_PUT:
		case T_GET:
		case T_TREE:
			if (rq->argc || rq->envc || rq->cwd)
				fail(fd, EINVAL, "'%c' must be a request's first frame", f.type);
			if (f.type == T_PUT)
				put_file(fd, &f);
			if (f.type == T_TREE)
				send_tree(fd, &f);
			get_file(fd, &f);
			break;
		case T_EXEC:
			free(f.data);
			if (rq->argc == 0 || rq->argv[0][0] == 0)
				fail(fd, EINVAL, "EXEC without a command (no ARG frame)");
			return;
		default:
			fail(fd, EINVAL, "unexpected frame type 0x%02x before EXEC", f.type);
		}
	}
}

static void defaults(int fd, struct request *rq)
{
	static char *const dflt[] = { "PATH=" DEFAULT_PATH, "HOME=/root", "TERM=dumb", NULL };
	size_t user = rq->envc;
	for (char *const *d = dflt; *d; d++)
		if (!env_has(rq->envp, user, *d))
			add_item(fd, &rq->envp, &rq->envc, *d);
	if (!rq->cwd)
		rq->cwd = "/";
}

static void send_output(int fd, int type, int *pipefd, char *buf)
{
	ssize_t n = read(*pipefd, buf, CHUNK);
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (n <= 0) {
		close(*pipefd);
		*pipefd = -1;
		return;
	}
	if (send_frame(fd, type, buf, (uint32_t)n) < 0)
		_exit(1);
}

extern char **environ;

static void serve(int fd)
{
	static char buf[CHUNK];
	struct request rq;
	int in[2], out[2], err[2];
	char *pending = NULL; /* stdin not yet written to the command */
	uint32_t pending_len = 0, pending_off = 0;
	int sock_open = 1, exited = 0, status = 0;

	signal(SIGCHLD, SIG_DFL);
	signal(SIGPIPE, SIG_IGN);
	read_request(fd, &rq);
	defaults(fd, &rq);
	if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC))
		fail(fd, errno, "pipe: %s", strerror(errno));
	/* This process serves one request: its directory and environment become the
	 * command's (posix_spawnp searches the PATH of ours). posix_spawn (vfork-like)
	 * costs far less than fork where kernel code is slow, and reports a failed exec. */
	if (chdir(rq.cwd) < 0)
		fail(fd, errno, "cd %s: %s", rq.cwd, strerror(errno));
	environ = rq.envp;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t none, all;
	sigemptyset(&none);
	sigfillset(&all);
	if (posix_spawn_file_actions_init(&fa) || posix_spawnattr_init(&at) ||
	    posix_spawn_file_actions_adddup2(&fa, in[0], 0) ||
	    posix_spawn_file_actions_adddup2(&fa, out[1], 1) ||
	    posix_spawn_file_actions_adddup2(&fa, err[1], 2) ||
	    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
					  POSIX_SPAWN_SETSIGDEF) ||
	    posix_spawnattr_setsigmask(&at, &none) || posix_spawnattr_setsigdefault(&at, &all))
		fail(fd, ENOMEM, "posix_spawn set-up failed");
	pid_t pid;
	int e = posix_spawnp(&pid, rq.argv[0], &fa, &at, rq.argv, rq.envp);
	if (e)
		fail(fd, e, "%s: %s", rq.argv[0], strerror(e));
	close(in[0]);
	close(out[1]);
	close(err[1]);
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0)
		fail(fd, errno, "pidfd_open: %s", strerror(errno));
	fcntl(in[1], F_SETFL, O_NONBLOCK);
	if (send_u32(fd, T_STARTED, (uint32_t)pid) < 0)
		goto gone;
	int sin = in[1], sout = out[0], serr = err[0];
	while (!exited) {
		struct pollfd p[5];
		int n = 0, i_sock = -1, i_in = -1, i_out = -1, i_err = -1;
		if (sock_open && !pending) { i_sock = n; p[n++] = (struct pollfd){ fd, POLLIN, 0 }; }
		if (pending) { i_in = n; p[n++] = (struct pollfd){ sin, POLLOUT, 0 }; }
		if (sout >= 0) { i_out = n; p[n++] = (struct pollfd){ sout, POLLIN, 0 }; }
		if (serr >= 0) { i_err = n; p[n++] = (struct pollfd){ serr, POLLIN, 0 }; }
		int i_pid = n;
		p[n++] = (struct pollfd){ pidfd, POLLIN, 0 };
		if (poll(p, (nfds_t)n, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail(fd, errno, "poll: %s", strerror(errno));
		}
		if (i_out >= 0 && p[i_out].revents)
			send_output(fd, T_STDOUT, &sout, buf);
		if (i_err >= 0 && p[i_err].revents)
			send_output(fd, T_STDERR, &serr, buf);
		if (i_in >= 0 && p[i_in].revents) {
			ssize_t k = write(sin, pending + pending_off, pending_len - pending_off);
			if (k < 0 && errno != EAGAIN && errno != EINTR) {
				/* the command closed its stdin: drop what it will never read */
				pending_off = pending_len;
			} else if (k > 0) {
				pending_off += (uint32_t)k;
			}
			if (pending_off == pending_len) {
				free(pending);
				pending = NULL;
			}
		}
		if (i_sock >= 0 && p[i_sock].revents) {
			struct frame f;
			if (!recv_frame(fd, &f, MAX_FRAME))
				goto gone;
			if (f.type == T_STDIN && f.len == 0) {
				free(f.data);
				if (sin >= 0) { close(sin); sin = -1; }
			} else if (f.type == T_STDIN) {
				if (sin >= 0) {
					pending = f.data;
					pending_len = f.len;
					pending_off = 0;
				} else {
					free(f.data);
				}
			} else if (f.type == T_KILL && f.len == 4) {
				uint32_t sig = get_le32(f.data);
				if (sig > 0 && sig < 65)
					kill(-pid, (int)sig);
				free(f.data);
			} else {
				free(f.data); /* unknown once running: ignored */
			}
		}
		if (p[i_pid].revents && waitpid(pid, &status, WNOHANG) == pid)
			exited = 1;
	}
	/* The command ended: hand on what its pipes still hold (not what a
	 * background process it left may write later), then its status. */
	for (int *pf = &sout; pf; pf = pf == &sout ? &serr : NULL) {
		fcntl(*pf, F_SETFL, O_NONBLOCK);
		while (*pf >= 0) {
			ssize_t k = read(*pf, buf, CHUNK);
			if (k <= 0)
				break;
			if (send_frame(fd, pf == &sout ? T_STDOUT : T_STDERR, buf, (uint32_t)k) < 0)
				_exit(1);
		}
	}
	if (WIFSIGNALED(status))
		send_u32(fd, T_SIGNALED, (uint32_t)WTERMSIG(status));
	else
		send_u32(fd, T_EXITED, (uint32_t)WEXITSTATUS(status));
	shutdown(fd, SHUT_WR);
	_exit(0);
gone: /* the host went away: so does the command */
	kill(-pid, SIGKILL);
	waitpid(pid, NULL, 0);
	_exit(1);
}

/* -- PID 1 and the listener ------------------------------------------------- */

static void mount_one(const char *src, const char *dir, const char *type, unsigned long fl,
		      const char *opts)
{
	mkdir(dir, 0755);
	if (mount(src, dir, type, fl, opts) < 0 && errno != EBUSY)
		say("mount %s on %s: %s", type, dir, strerror(errno));
}

static void as_init(void)
{
	mount_one("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_one("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount_one("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	setenv("PATH", DEFAULT_PATH, 1);
	setenv("HOME", "/root", 1);
	signal(SIGCHLD, SIG_IGN); /* the kernel reaps children and orphans */
	load_modules(); /* a stock kernel's vsock driver (modload.c) */
}

/* Tell the host we listen: one connection to its (CID 2) same port, closed at once.
 * minivmm exec listens there (its vsock UDS_PORT); refused when nobody does. */
static void ready(unsigned long port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_port = (unsigned)port,
				 .svm_cid = VMADDR_CID_HOST };
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
		shutdown(fd, SHUT_RDWR);
	if (fd >= 0)
		close(fd);
}

/* A listening socket: vsock PORT, or (for tests on the host) a Unix socket PATH. */
static int listen_on(const char *where, unsigned long port)
{
	int fd;
	if (where) {
		struct sockaddr_un u = { .sun_family = AF_UNIX };
		if (strlen(where) >= sizeof(u.sun_path)) {
			errno = ENAMETOOLONG;
			return -1;
		}
		strcpy(u.sun_path, where);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && bind(fd, (struct sockaddr *)&u, sizeof(u)) == 0 && listen(fd, 16) == 0)
			return fd;
	} else {
		struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_port = (unsigned)port,
					 .svm_cid = VMADDR_CID_ANY };
		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(fd, 16) == 0)
			return fd;
	}
	int e = errno;
	if (fd >= 0)
		close(fd);
	errno = e;
	return -1;
}

int main(int argc, char **argv)
{
	unsigned long port = DEFAULT_PORT;
	const char *unix_path = NULL;
	/* As PID 1 the arguments are the kernel's (its command line's unknown words):
	 * the port comes from minivmm_agent_port=N there (an environment variable). */
	const char *arg = getpid() == 1 ? getenv("minivmm_agent_port") : argc == 2 ? argv[1] : NULL;
	if (getpid() != 1 && argc > 2) {
		say("usage: %s [VSOCK-PORT | /UNIX-SOCKET-PATH]", argv[0]);
		return 2;
	}
	if (arg && arg[0] == '/') {
		unix_path = arg;
	} else if (arg) {
		char *end;
		port = strtoul(arg, &end, 10);
		if (*end || port == 0 || port > 0xffffffffUL) {
			say("bad port %s; using %d", arg, DEFAULT_PORT);
			if (getpid() != 1)
				return 2;
			port = DEFAULT_PORT;
		}
	}
	if (getpid() == 1)
		as_init();
	else
		signal(SIGCHLD, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	int lfd;
	while ((lfd = listen_on(unix_path, port)) < 0) {
		if (unix_path) {
			say("%s: %s", unix_path, strerror(errno));
			return 1;
		}
		say("vsock port %lu: %s (no virtio-vsock yet?); retrying", port, strerror(errno));
		sleep(1);
	}
	if (unix_path) {
		say("listening on %s", unix_path);
	} else {
		say("listening on vsock port %lu", port);
		ready(port);
	}
	/* A spare handler waits in accept(): forking the next one happens while the
	 * previous request runs, not on its path. */
	pid_t agent_pid = getpid();
	for (;;) {
		int sync[2];
		char c;
		if (pipe2(sync, O_CLOEXEC) < 0) {
			say("pipe: %s", strerror(errno));
			sleep(1);
			continue;
		}
		pid_t pid = fork();
		if (pid == 0) {
			int fd;
			close(sync[0]);
			/* A spare ends with the agent (not PID 1: run from a user's init, or on a
			 * host in tests); a request already accepted is served to its end. */
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() != agent_pid)
				_exit(0);
			while ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) < 0)
				if (errno != EINTR)
					usleep(10000);
			prctl(PR_SET_PDEATHSIG, 0);
			close(lfd);
			if (write(sync[1], "a", 1) < 0) { /* the parent forks the next one anyway */ }
			close(sync[1]);
			serve(fd);
		}
		close(sync[1]);
		if (pid < 0) {
			say("fork: %s", strerror(errno));
			sleep(1);
		} else if (read(sync[0], &c, 1) != 1) {
			usleep(100000); /* the spare died before accepting: don't spin */
		}
		close(sync[0]);
	}
}
