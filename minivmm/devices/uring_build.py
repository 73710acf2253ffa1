"""uring_build: the C half of the io_uring accelerator (cffi, API mode, liburing).

Its text only: minivmm.devices.uring has minivmm.accel compile it (once per machine, at
first use, linked with liburing): a blk device whose host has a compiler, cffi and
liburing-dev gets it; any other host runs the synchronous path (minivmm.accel says so
once). The queue walk and the used-ring publish are the engine's C twin,
minivmm.virtio.cwalk (shared with the net accelerator): every guard of ``Queue.pop``,
every guest address checked against the guest memory map before a byte is touched.

The functions:

- ``mv_ring_new(entries, &ring)``: io_uring_queue_init, then a probe that READ and READV
  exist (Linux 5.6); 0 or a negative errno (EPERM or ENOSYS when the
  sysctl kernel.io_uring_disabled or a seccomp filter forbids io_uring).
- ``mv_blk_run(ring, queue, regions, n, disk, out)``: the batch path of
  minivmm.devices.blk_uring (its docstring says what it serves and what it leaves to
  Python).
"""

from __future__ import annotations

from typing import Final

from ..virtio import cwalk

#: the structures Python and C share besides cwalk's, in both the cdef and the source
#: (errs: ERRMAX)
STRUCTS: Final = """
struct mv_disk { int fd; int read_only; uint64_t capacity;
                 int overlay_fd; uint32_t nmap; uint64_t *starts; uint64_t *ends; };
struct mv_err { int kind; int err; uint64_t offset; };
struct mv_out { uint32_t done; uint32_t nerr; uint64_t batches; uint64_t requests;
                struct mv_err errs[256]; };
"""

CDEF: Final = """
struct iovec { void *iov_base; size_t iov_len; };
""" + cwalk.STRUCTS + STRUCTS + """
struct mv_ring;
int mv_ring_new(unsigned entries, struct mv_ring **out);
void mv_ring_free(struct mv_ring *r);
int mv_blk_run(struct mv_ring *r, struct mv_queue *q, const struct mv_region *mem, int nmem,
               const struct mv_disk *disk, struct mv_out *out);
"""

SOURCE: Final = r"""
#if !defined(__x86_64__)
/* The notification flags, event indices and the watch below assume x86's TSO (and
 * its pause); minivmm.devices.uring does not try to build this elsewhere. */
#error "the io_uring accelerator is for x86-64 hosts"
#endif
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <liburing.h>
""" + cwalk.SOURCE + r"""

enum { EMPTY, DEFER, LIMIT, RINGFAIL, ERRORS = 16 };
enum { E_ERRNO, E_ENDED, E_NOBYTES };
#define SLOTS 256           /* requests in flight at most: the SQ size */
#define POOL 4096           /* iovecs for one batch's data buffers */
#define ERRMAX 256          /* struct mv_out.errs */
#define USED_F_NO_NOTIFY 1
#define AVAIL_F_NO_INTERRUPT 1
#define POLL_NS 5000        /* how long to watch for the next request after answering */
#define T_IN 0
#define T_OUT 1
#define SECTOR 512

""" + STRUCTS + r"""
_Static_assert(sizeof ((struct mv_out *)0)->errs == ERRMAX * sizeof (struct mv_err), "errs");
struct slot { uint32_t head, used_len, niov, write; int fd; uint64_t offset, length;
              uint8_t *status; struct iovec *iov; };
struct mv_ring { struct io_uring ring; struct slot slots[SLOTS]; struct iovec pool[POOL];
                 unsigned n, pool_used, failed; };

static const int mv_ops[] = { IORING_OP_READ, IORING_OP_READV };

int mv_ring_new(unsigned entries, struct mv_ring **out)
{
    if (entries > SLOTS)
        return -EINVAL;
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

static void error(struct mv_out *out, int kind, int err, uint64_t offset)
{
    if (out->nerr < ERRMAX) {
        out->errs[out->nerr].kind = kind;
        out->errs[out->nerr].err = err;
        out->errs[out->nerr].offset = offset;
        out->nerr++;
    }
}

/* Finish a request synchronously from byte `done` on (a short transfer, or the ring
 * failed): as blk.read_into/write_from do. 0 or the status. */
static int finish_sync(const struct mv_disk *disk, struct slot *s, uint64_t done,
                       struct mv_out *out)
{
    struct iovec rest[IOV_MAX];
    while (done < s->length) {
        unsigned n = 0;
        uint64_t skip = done;
        for (unsigned i = 0; i < s->niov && n < IOV_MAX; i++) {
            if (skip >= s->iov[i].iov_len) {
                skip -= s->iov[i].iov_len;
                continue;
            }
            rest[n].iov_base = (uint8_t *)s->iov[i].iov_base + skip;
            rest[n].iov_len = s->iov[i].iov_len - skip;
            skip = 0;
            n++;
        }
        ssize_t got = s->write ? pwritev(s->fd, rest, n, s->offset + done)
                               : preadv(s->fd, rest, n, s->offset + done);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            error(out, E_ERRNO, errno, 0);
            return 1;
        }
        if (got == 0) {
            error(out, s->write ? E_NOBYTES : E_ENDED, 0, s->offset + done);
            return 1;
        }
        done += (uint64_t)got;
    }
    return 0;
}

static void answer(struct mv_queue *q, struct slot *s, int status, struct mv_out *out)
{
    *s->status = (uint8_t)status;
    mv_put_used(q, s->head, s->used_len);
    out->done++;
}

/* Submit what is prepared, wait for all of it, answer each request as it completes. */
static void complete(struct mv_ring *r, struct mv_queue *q, const struct mv_disk *disk,
                     struct mv_out *out)
{
    unsigned left = r->n;
    uint8_t finished[SLOTS] = {0};
    r->pool_used = 0;  /* the iovecs of what is in flight stay valid until this returns */
    if (left == 0)
        return;
    out->batches++;
    out->requests += left;
    while (left && !r->failed) {
        int e = io_uring_submit_and_wait(&r->ring, left);
        if (e < 0 && e != -EINTR && e != -EAGAIN) {
            r->failed = (unsigned)-e;
            break;
        }
        unsigned head, seen = 0;
        struct io_uring_cqe *cqe;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            seen++;
            uint64_t i = cqe->user_data;
            if (i >= r->n || finished[i])
                continue;  /* cannot happen: user_data is ours */
            struct slot *s = &r->slots[i];
            int res = cqe->res, status = 0;
            if (res < 0) {
                error(out, E_ERRNO, -res, 0);
                status = 1;
            } else if ((uint64_t)res < s->length) {
                status = finish_sync(disk, s, (uint64_t)res, out);
            }
            finished[i] = 1;
            left--;
            answer(q, s, status, out);
        }
        io_uring_cq_advance(&r->ring, seen);
    }
    if (r->failed) {
        /* io_uring broke under the batch: what did not complete, the synchronous way
         * (a read or write of the same bytes again is harmless). */
        for (unsigned i = 0; i < r->n; i++)
            if (!finished[i])
                answer(q, &r->slots[i], finish_sync(disk, &r->slots[i], 0, out), out);
    }
    r->n = 0;
}

/* The file that holds sectors [sector, sector + count) whole: the disk's file; for a
 * copy-on-write disk the overlay or the image, as its sector map (sorted, disjoint
 * ranges [starts[i], ends[i])) says, or -1 when the range has sectors in both. */
static int file_of(const struct mv_disk *disk, uint64_t sector, uint64_t count)
{
    if (disk->overlay_fd < 0 || disk->nmap == 0)
        return disk->fd;
    uint32_t lo = 0, hi = disk->nmap;  /* the first range starting after `sector` */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (disk->starts[mid] <= sector)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo > 0 && sector < disk->ends[lo - 1])
        return sector + count <= disk->ends[lo - 1] ? disk->overlay_fd : -1;
    if (lo < disk->nmap && disk->starts[lo] < sector + count)
        return -1;
    return disk->fd;
}

/* Whether the driver wants an interrupt for the used entries published since `old`
 * (Queue.needs_notification's rule, virtio 1.2 §2.7.10, without recording anything):
 * then the device returns at once, so that Python interrupts it, instead of watching
 * the ring while the driver waits for that interrupt. */
static int wants_interrupt(const struct mv_queue *q, uint16_t old)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* the used index before used_event */
    if (q->event_idx) {
        uint16_t event = mv_load16(q->avail + 4 + 2 * (uint64_t)q->size);
        uint16_t new = q->next_used;
        return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
    }
    return !(mv_load16(q->avail) & AVAIL_F_NO_INTERRUPT);
}

/* Watch the available index for up to POLL_NS; 1 if the driver published meanwhile. */
static int poll(const struct mv_queue *q)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 1;; i++) {
        if (mv_load16(q->avail + 2) != q->next_avail)
            return 1;
        __builtin_ia32_pause();
        if (i % 32 == 0) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) > POLL_NS)
                return 0;
        }
    }
}

/* Whether [off, off + len) meets a read in flight (only reads are: writes go inline). */
static int overlaps(const struct mv_ring *r, uint64_t off, uint64_t len)
{
    for (unsigned i = 0; i < r->n; i++) {
        const struct slot *s = &r->slots[i];
        if (s->offset < off + len && off < s->offset + s->length)
            return 1;
    }
    return 0;
}

/* Serve the available chains the common way: IN and OUT requests of the shape Linux
 * sends (header in its first readable buffer, data sector-sized and on the disk, the
 * status the chain's last byte), through io_uring, one batch at a time. Stops at the
 * first chain it leaves to Python (DEFER: not consumed), at an empty ring (EMPTY, with
 * notifications asked for again, as Queue.enable_notification does them), or
 * after 256 answers (LIMIT); nothing is in flight when it returns. ERRORS is or-ed in
 * when out->errs holds errors for Python to log. */
int mv_blk_run(struct mv_ring *r, struct mv_queue *q, const struct mv_region *mem, int nmem,
               const struct mv_disk *disk, struct mv_out *out)
{
    int status = EMPTY;
    uint32_t polled = 0;  /* out->done when the ring was last watched */
    uint16_t first_used = q->next_used;
    out->done = 0;
    out->nerr = 0;
    if (r->failed)
        return RINGFAIL;  /* cannot happen: Python drops a failed ring */
    if (!q->event_idx)
        mv_store16(q->used, USED_F_NO_NOTIFY);  /* kicks are not needed while we walk */
    for (;;) {
        if (r->failed)
            break;
        if (out->done + r->n >= ERRMAX) {
            status = LIMIT;
            break;
        }
        uint16_t idx = mv_avail_idx(q);
        if (idx == q->next_avail && (r->n || out->done != polled)) {
            /* Answer what is in flight, then watch the ring for a moment before asking
             * for kicks again: a driver waiting on those answers publishes its next
             * request within microseconds, and it is served without a kick (an exit,
             * 10-40 us here). */
            complete(r, q, disk, out);
            polled = out->done;
            if (!wants_interrupt(q, first_used) && poll(q))
                continue;  /* a driver that polls too (interrupts off) sent its next one */
        }
        if (idx == q->next_avail) {
            /* Empty: ask for kicks again (avail_event with EVENT_IDX, else the flag),
             * then look once more: a request that came meanwhile may not be kicked
             * (Queue.enable_notification, virtio 1.2 §2.7.10). */
            if (q->event_idx)
                mv_store16(q->used + 4 + 8 * (uint64_t)q->size, q->next_avail);
            else
                mv_store16(q->used, 0);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (mv_load16(q->avail + 2) == q->next_avail)
                break;
            if (!q->event_idx)
                mv_store16(q->used, USED_F_NO_NOTIFY);
            continue;
        }
        int avail = mv_avail_head(q, idx);
        if (avail < 0) {
            status = DEFER;
            break;
        }
        uint32_t head = (uint32_t)avail;
        struct iovec *iov = r->pool + r->pool_used;
        unsigned niov, nread;
        uint64_t rlen, wlen;
        int w = mv_walk(q, mem, nmem, head, iov, POOL - r->pool_used, &niov, &nread, &rlen,
                     &wlen);
        if (w == -2 && r->n) {
            complete(r, q, disk, out);
            continue;
        }
        if (w < 0 || nread == 0 || iov[0].iov_len < 16) {
            status = DEFER;
            break;
        }
        uint32_t type;
        uint64_t sector;
        memcpy(&type, iov[0].iov_base, 4);
        memcpy(&sector, (uint8_t *)iov[0].iov_base + 8, 8);
        struct slot *s = &r->slots[r->n];
        uint64_t length;
        if (type == T_IN && rlen == 16 && wlen > 1) {
            length = wlen - 1;
            struct iovec *last = &iov[niov - 1];
            s->status = (uint8_t *)last->iov_base + last->iov_len - 1;
            s->iov = iov + nread;
            s->niov = niov - nread;
            if (--last->iov_len == 0)
                s->niov--;
            s->used_len = (uint32_t)wlen;
        } else if (type == T_OUT && !disk->read_only && disk->overlay_fd < 0 && wlen == 1
                   && rlen > 16
                   && nread == niov - 1) {
            length = rlen - 16;
            s->status = iov[niov - 1].iov_base;
            s->iov = iov;
            s->niov = nread;
            iov[0].iov_base = (uint8_t *)iov[0].iov_base + 16;
            if ((iov[0].iov_len -= 16) == 0) {
                s->iov++;
                s->niov--;
            }
            s->used_len = 1;
        } else {
            status = DEFER;
            break;
        }
        if (length % SECTOR || sector > disk->capacity
                || length / SECTOR > disk->capacity - sector || s->niov > IOV_MAX) {
            status = DEFER;
            break;
        }
        s->fd = file_of(disk, sector, length / SECTOR);
        if (s->fd < 0) {
            status = DEFER;
            break;
        }
        s->head = head;
        s->write = type == T_OUT;
        s->offset = sector * SECTOR;
        s->length = length;
        if (s->write && r->n && overlaps(r, s->offset, length)) {
            /* a write over reads in flight: they complete first, as one request after
             * the other. Its slot (past r->n) and iovecs are not touched by that. */
            complete(r, q, disk, out);
            if (r->failed)
                break;
        }
        if (s->write) {
            /* Buffered writes go inline, in order: io_uring hands them to a worker
             * thread (iou-wrk) wherever the filesystem cannot write without blocking
             * (ext4 here), and that hop costs more than the copy into the page cache. */
            answer(q, s, finish_sync(disk, s, 0, out), out);
            out->requests++;
            q->next_avail++;
            continue;
        }
        struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
        if (sqe == NULL) {
            complete(r, q, disk, out);  /* cannot happen: SLOTS == the SQ size */
            status = DEFER;
            break;
        }
        if (s->niov == 1)
            io_uring_prep_read(sqe, s->fd, s->iov[0].iov_base, (unsigned)length, s->offset);
        else
            io_uring_prep_readv(sqe, s->fd, s->iov, s->niov, s->offset);
        sqe->user_data = r->n;
        r->n++;
        r->pool_used = (unsigned)(iov - r->pool) + niov;
        q->next_avail++;
        if (r->n == SLOTS)
            complete(r, q, disk, out);
    }
    complete(r, q, disk, out);
    return (r->failed ? RINGFAIL : status) | (out->nerr ? ERRORS : 0);
}
"""

