/*
 * Kernel modules the agent needs before it can listen: stock kernels build the
 * vsock driver (and often virtio_mmio) as modules. minivmm exec packs them,
 * dependencies first, into MODULE_DIR of the archive it appends to the initramfs
 * (minivmm/kmod.py) with their order in MODULE_DIR/order, one file name a line.
 *
 * Each is loaded with finit_module(2) (init_module(2) where that is missing);
 * one the kernel has already (EEXIST: loaded, or built in under that name) is
 * fine. A file ending in .zst/.xz/.gz is handed over compressed
 * (MODULE_INIT_COMPRESSED_FILE: kernels with CONFIG_MODULE_DECOMPRESS). A failure
 * is said on the console and the next module is tried: the agent then reports
 * that it cannot listen, which names the real problem.
 */
#include "agent.h"

#ifndef MODULE_INIT_COMPRESSED_FILE
#define MODULE_INIT_COMPRESSED_FILE 4 /* include/uapi/linux/module.h */
#endif
#define MODULE_DIR "/.minivmm/modules"

static int compressed(const char *name)
{
	static const char *const ext[] = { ".zst", ".xz", ".gz", NULL };
	size_t n = strlen(name);
	for (const char *const *e = ext; *e; e++)
		if (n > strlen(*e) && strcmp(name + n - strlen(*e), *e) == 0)
			return 1;
	return 0;
}

/* init_module(2) with the whole file in memory: for kernels before finit_module. */
static int load_from_memory(int fd)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return -1;
	if (st.st_size <= 0 || st.st_size > (64 << 20)) {
		errno = EFBIG;
		return -1;
	}
	char *buf = malloc((size_t)st.st_size);
	if (!buf)
		return -1;
	int ok = read_full(fd, buf, (size_t)st.st_size) == 1 &&
		 syscall(SYS_init_module, buf, (unsigned long)st.st_size, "") == 0;
	int e = errno;
	free(buf);
	errno = e;
	return ok ? 0 : -1;
}

static void load_one(const char *name)
{
	char path[512];
	if (!name[0] || strchr(name, '/') ||
	    snprintf(path, sizeof(path), MODULE_DIR "/%s", name) >= (int)sizeof(path)) {
		say("module list: bad entry %.60s", name);
		return;
	}
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		say("module %s: %s", name, strerror(errno));
		return;
	}
	int flags = compressed(name) ? MODULE_INIT_COMPRESSED_FILE : 0;
	int r = (int)syscall(SYS_finit_module, fd, "", flags);
	if (r < 0 && errno == ENOSYS && !flags) {
		lseek(fd, 0, SEEK_SET);
		r = load_from_memory(fd);
	}
	if (r < 0 && errno != EEXIST)
		say("module %s: %s%s", name, strerror(errno),
		    flags && errno == EINVAL ? " (a compressed module this kernel cannot "
					       "decompress itself)" : "");
	close(fd);
}

void load_modules(void)
{
	FILE *list = fopen(MODULE_DIR "/order", "re");
	char line[256];
	if (!list)
		return; /* nothing packed: the kernel has what the agent needs */
	while (fgets(line, sizeof(line), list)) {
		line[strcspn(line, "\r\n")] = 0;
		load_one(line);
	}
	fclose(list);
}
