"""uring_build: the C half of the io_uring accelerator (cffi, API mode, liburing).

Compiled once per machine, at first use, into the cache (see :func:`build`): a blk
device whose host has a compiler, cffi and liburing-dev gets it; any other host runs
the synchronous path (minivmm.devices.uring says so once). Nothing here reads guest
memory: Python hands every buffer over as a pointer into a memoryview the virtqueue
engine has already bounds-checked against the guest memory map, so the C code has no
guest address to check.

The functions, each one step of the batch path (minivmm.devices.blk_uring):

- ``mv_ring_new(entries, &ring)``: io_uring_queue_init, then a probe that READ, WRITE,
  READV and WRITEV exist (Linux 5.6); 0 or a negative errno (EPERM or ENOSYS when the
  sysctl kernel.io_uring_disabled or a seccomp filter forbids io_uring).
- ``mv_prep(ring, write, fd, offset, buf, len, user_data)`` and ``mv_prepv(..., iov, n,
  user_data)``: one read or write SQE (submitting the full queue first if it is full).
- ``mv_run(ring, wait_nr, user_data[], res[], max)``: submit everything prepared, wait
  for ``wait_nr`` completions, and copy out and consume up to ``max`` of them: one
  io_uring_enter per batch. Returns the count, or a negative errno from the submit.
"""

from __future__ import annotations

import hashlib
from typing import Final

CDEF: Final = """
struct iovec { void *iov_base; size_t iov_len; };
struct mv_ring;
int mv_ring_new(unsigned entries, struct mv_ring **out);
void mv_ring_free(struct mv_ring *r);
int mv_prep(struct mv_ring *r, int write, int fd, uint64_t offset, void *buf, uint32_t len,
            uint64_t user_data);
int mv_prepv(struct mv_ring *r, int write, int fd, uint64_t offset, const struct iovec *iov,
             unsigned n, uint64_t user_data);
int mv_run(struct mv_ring *r, unsigned wait_nr, uint64_t *user_data, int32_t *res,
           unsigned max);
"""

SOURCE: Final = r"""
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <liburing.h>

struct mv_ring { struct io_uring ring; };

static const int mv_ops[] = { IORING_OP_READ, IORING_OP_WRITE, IORING_OP_READV,
                              IORING_OP_WRITEV };

int mv_ring_new(unsigned entries, struct mv_ring **out)
{
    struct mv_ring *r = calloc(1, sizeof *r);
    if (r == NULL)
        return -ENOMEM;
    int e = io_uring_queue_init(entries, &r->ring, 0);
    if (e < 0) {
        free(r);
        return e;
    }
    struct io_uring_probe *p = io_uring_get_probe_ring(&r->ring);
    int ok = p != NULL;
    for (unsigned i = 0; ok && i < sizeof mv_ops / sizeof mv_ops[0]; i++)
        ok = io_uring_opcode_supported(p, mv_ops[i]);
    if (p != NULL)
        io_uring_free_probe(p);
    if (!ok) {
        io_uring_queue_exit(&r->ring);
        free(r);
        return -EOPNOTSUPP;
    }
    *out = r;
    return 0;
}

void mv_ring_free(struct mv_ring *r)
{
    io_uring_queue_exit(&r->ring);
    free(r);
}

static struct io_uring_sqe *mv_sqe(struct mv_ring *r)
{
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (s == NULL && io_uring_submit(&r->ring) >= 0)
        s = io_uring_get_sqe(&r->ring);
    return s;
}

int mv_prep(struct mv_ring *r, int write, int fd, uint64_t offset, void *buf, uint32_t len,
            uint64_t user_data)
{
    struct io_uring_sqe *s = mv_sqe(r);
    if (s == NULL)
        return -EBUSY;
    if (write)
        io_uring_prep_write(s, fd, buf, len, offset);
    else
        io_uring_prep_read(s, fd, buf, len, offset);
    s->user_data = user_data;
    return 0;
}

int mv_prepv(struct mv_ring *r, int write, int fd, uint64_t offset, const struct iovec *iov,
             unsigned n, uint64_t user_data)
{
    struct io_uring_sqe *s = mv_sqe(r);
    if (s == NULL)
        return -EBUSY;
    if (write)
        io_uring_prep_writev(s, fd, iov, n, offset);
    else
        io_uring_prep_readv(s, fd, iov, n, offset);
    s->user_data = user_data;
    return 0;
}

int mv_run(struct mv_ring *r, unsigned wait_nr, uint64_t *user_data, int32_t *res,
           unsigned max)
{
    int e = io_uring_submit_and_wait(&r->ring, wait_nr);
    if (e < 0 && e != -EINTR)
        return e;
    unsigned n = 0;
    unsigned head;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (n == max)
            break;
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return (int)n;
}
"""


def module_name() -> str:
    """The extension's name, unique per source: a changed source is a new file."""
    digest = hashlib.sha256((CDEF + SOURCE).encode()).hexdigest()[:12]
    return f"_minivmm_uring_{digest}"


def build(tmpdir: str) -> str:
    """Compile the extension in ``tmpdir``; returns the path of the shared object.
    Raises ImportError (no cffi) or whatever cffi raises for a failed compile."""
    import importlib

    ffi = importlib.import_module("cffi").FFI()
    ffi.cdef(CDEF)
    ffi.set_source(module_name(), SOURCE, libraries=["uring"],
                   extra_compile_args=["-O2"])
    return str(ffi.compile(tmpdir=tmpdir, verbose=False))
