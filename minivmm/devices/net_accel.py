"""The network device's C accelerator: a whole batch of frames per call (minivmm.accel).

The Python path in minivmm.devices.net is the reference and stays complete; this is a
faster twin of its two hot loops for the common case, written so the two cannot
disagree about anything but speed:

- transmit: pop every available chain, ``writev`` it to the tap, publish it used;
- receive (while Python's stash is empty): for each frame the tap has, walk the chains
  that may hold it (the next one; with VIRTIO_NET_F_MRG_RXBUF, chains until 65562 bytes
  or the ring's end, as the stash would hold them), ``readv`` the frame into them (plus
  one spare byte that tells a frame too large for them), write the header's
  ``num_buffers`` (k, the chains it filled), publish those k used. A chain is consumed
  only once a frame is in it: the others, and all of them when the tap has nothing
  (EAGAIN), stay in the ring, so nothing is held between calls (and a snapshot has
  nothing to rewind). Within a call the look-ahead is walked once: the chains a frame
  did not fill stay walked for the next frame, which only tops the window up.

The walk and the used-ring publish are the engine's C twin (minivmm.virtio.cwalk: every
guard of :meth:`Queue.pop <minivmm.virtio.queue.Queue.pop>`, every buffer checked
against the guest's memory map), shared with the block device's io_uring path. It
decides nothing on its own: a chain that fails any guard, or that the device would drop
or log (a transmit chain with writable buffers, shorter than the header, longer than a
frame or over IOV_MAX buffers; a receive chain with readable bytes or under 12 writable
ones), is left unconsumed and the call returns
``DEFER``: Python then pops that one chain, which raises the engine's typed error or
takes the device's logged path, and calls again. So the used ring, the bytes, the
counters and the errors are those of the Python path (tests/devices/test_net_accel.py
checks that with Hypothesis).

A failing readv/writev ends the call with ``IOERR`` and errno (transmit: the chain was
published, as Python's ``with`` block does; receive: it was not consumed), and the
device takes its usual path (link down on EBADFD, counters, a log line). The calls
release the GIL; the device's lock, held around them, keeps resets out.
"""

from __future__ import annotations

from typing import Any, Final

from .. import accel
from ..virtio import cwalk
from ..virtio.queue import Queue

EMPTY: Final = 0  # the available ring is empty
DEFER: Final = 1  # the next chain is for the Python path (not consumed)
IOERR: Final = 2  # readv/writev failed: errno in out.err
AGAIN: Final = 3  # receive: the tap has no frame (EAGAIN)
LIMIT: Final = 4  # the budget of frames is used up
SHORT: Final = 5  # receive: the frame did not fit (out.bytes > the chain's room), dropped
MAX_QUEUE: Final = 32768  # the longest look-ahead: a queue's size (virtio 1.2 §2.7)

_OUT: Final = """
struct mv_out { int status; int err; uint64_t bytes; uint64_t room; uint64_t frames;
                uint64_t payload; };
"""
CDEF: Final = """
struct iovec { void *iov_base; size_t iov_len; ...; };
""" + cwalk.STRUCTS + _OUT + """
int mv_net_tx(struct mv_queue *q, const struct mv_region *mem, int nmem, int fd,
              struct iovec *iov, int iovmax, uint64_t maxframe, uint32_t budget,
              struct mv_out *out);
int mv_net_rx(struct mv_queue *q, const struct mv_region *mem, int nmem, int fd,
              struct iovec *iov, int iovmax, uint32_t budget, int clear_flags,
              uint8_t *spare, uint64_t need, uint32_t *heads, uint64_t *sizes,
              uint32_t *nios, struct mv_out *out);
"""

SOURCE: Final = r"""
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/uio.h>
""" + cwalk.SOURCE + _OUT + r"""
#define HDR 12              /* sizeof(struct virtio_net_hdr_v1) (virtio 1.2 5.1.6) */
#define NUM_BUFFERS 10
enum { EMPTY, DEFER, IOERR, AGAIN, LIMIT, SHORT };

/* The next available head, or -1 (out->status set: EMPTY, or DEFER for an index jump
 * that pop turns into InvalidAvailRingIndex). *idx: the available index last read. */
static int next_head(const struct mv_queue *q, uint16_t *idx, struct mv_out *out)
{
    int head;
    if (q->next_avail == *idx) {
        *idx = mv_avail_idx(q);
        if (q->next_avail == *idx) {
            out->status = EMPTY;
            return -1;
        }
    }
    head = mv_avail_head(q, *idx);
    if (head < 0)
        out->status = DEFER;
    return head;
}

int mv_net_tx(struct mv_queue *q, const struct mv_region *mem, int nmem, int fd,
              struct iovec *iov, int iovmax, uint64_t maxframe, uint32_t budget,
              struct mv_out *out)
{
    uint16_t idx = q->next_avail;
    out->frames = out->payload = 0;
    out->status = LIMIT;
    while (out->frames < budget) {
        int head = next_head(q, &idx, out);
        unsigned niov, nread;
        uint64_t rlen, wlen;
        if (head < 0)
            break;
        if (mv_walk(q, mem, nmem, (uint32_t)head, iov, (unsigned)iovmax, &niov, &nread,
                    &rlen, &wlen) < 0 || wlen
                || rlen < HDR || rlen > maxframe) {
            out->status = DEFER;
            break;
        }
        q->next_avail++;
        ssize_t n = writev(fd, iov, (int)niov);
        mv_put_used(q, (uint32_t)head, 0);
        if (n < 0) {
            out->status = IOERR;
            out->err = errno;
            out->bytes = rlen;
            break;
        }
        out->frames++;
        out->payload += rlen - HDR;
    }
    return out->status;
}

/* Store `len` bytes at `off` of what iov covers (a header split across buffers). */
static void poke(struct iovec *iov, unsigned niov, uint64_t off, const uint8_t *src, int len)
{
    for (unsigned i = 0; i < niov && len > 0; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        while (len > 0 && off < iov[i].iov_len) {
            ((uint8_t *)iov[i].iov_base)[off++] = *src++;
            len--;
        }
        off = 0;
    }
}

/* Receive: for each frame, look ahead at the chains that would hold it (one, or with
 * MRG_RXBUF chains until `need` bytes or the ring's end, as Python's stash holds them),
 * readv into all of them plus the spare byte, then consume the k chains the frame
 * filled (num_buffers = k, 5.1.6.4); the others stay in the ring for the next frame.
 * The look-ahead is a window walked once per call: heads/sizes/nios[0..k) are its
 * chains (nios: their iovec counts), iov[base .. base + niov) their buffers; a frame
 * takes chains off its front and the next one tops it up at its end. */
int mv_net_rx(struct mv_queue *q, const struct mv_region *mem, int nmem, int fd,
              struct iovec *iov, int iovmax, uint32_t budget, int clear_flags,
              uint8_t *spare, uint64_t need, uint32_t *heads, uint64_t *sizes,
              uint32_t *nios, struct mv_out *out)
{
    static const uint8_t zero[1] = {0};
    uint16_t idx = q->next_avail;
    struct mv_queue look = *q;  /* next_avail: the next chain to walk into the window */
    uint32_t k = 0, used, i;
    uint64_t room = 0, left;
    unsigned base = 0, niov = 0;
    out->frames = out->payload = 0;
    out->status = LIMIT;
    while (out->frames < budget) {
        out->status = LIMIT;
        while (room < need && k < q->size) {
            int head = next_head(&look, &idx, out);
            unsigned n, nread;
            uint64_t rlen, wlen;
            int w;
            if (head < 0)
                break;
            /* iovmax - 1: room for the spare byte */
            w = mv_walk(&look, mem, nmem, (uint32_t)head, iov + base + niov,
                        (unsigned)iovmax - 1 - base - niov, &n, &nread, &rlen, &wlen);
            if (w == -2 && base > 0) {  /* the window's buffers to the array's start */
                memmove(iov, iov + base, niov * sizeof(*iov));
                base = 0;
                continue;
            }
            if (w < 0 || rlen || wlen < HDR) {
                out->status = DEFER;
                return DEFER;
            }
            heads[k] = (uint32_t)head;
            sizes[k] = wlen;
            nios[k] = n;
            k++;
            niov += n;
            room += wlen;
            look.next_avail++;
        }
        if (out->status == DEFER)
            return DEFER;  /* an index jump: pop raises it before any read */
        if (k == 0)
            break;  /* EMPTY */
        out->status = LIMIT;  /* the ring's end before `need`: read into what there is */
        struct iovec *win = iov + base;
        win[niov].iov_base = spare;
        win[niov].iov_len = 1;
        ssize_t n = readv(fd, win, (int)niov + 1);
        if (n < 0) {
            out->status = errno == EAGAIN ? AGAIN : IOERR;
            out->err = errno;
            break;
        }
        if ((uint64_t)n > room || n < HDR) {
            out->status = SHORT;  /* dropped; the chains stay for the next frame */
            out->bytes = n;
            out->room = room;
            break;
        }
        for (used = 0, left = n; left > 0; used++)
            left -= left > sizes[used] ? sizes[used] : left;
        uint8_t count[2] = {(uint8_t)used, (uint8_t)(used >> 8)};
        poke(win, niov, NUM_BUFFERS, count, 2);
        if (clear_flags)
            poke(win, niov, 0, zero, 1);
        unsigned taken = 0;
        for (i = 0, left = n; i < used; i++) {
            uint64_t part = left > sizes[i] ? sizes[i] : left;
            q->next_avail++;
            mv_put_used(q, heads[i], (uint32_t)part);
            left -= part;
            room -= sizes[i];
            taken += nios[i];
        }
        k -= used;  /* the rest of the window stays walked for the next frame */
        memmove(heads, heads + used, k * sizeof(*heads));
        memmove(sizes, sizes + used, k * sizeof(*sizes));
        memmove(nios, nios + used, k * sizeof(*nios));
        base += taken;
        niov -= taken;
        out->frames++;
        out->payload += n - HDR;
    }
    return out->status;
}
"""


def load() -> Any | None:
    """The compiled module (``ffi``, ``lib``), or None: the Python path then runs."""
    return accel.load("net", CDEF, SOURCE)


class Rings:
    """One queue's rings and the guest memory map as the C functions take them, rebuilt
    when the queue's ring views change (a reactivation)."""

    def __init__(self, mod: Any, regions: Any, iov_max: int) -> None:
        ffi = mod.ffi
        self.ffi = ffi
        self.lib = mod.lib
        self._keep = [ffi.from_buffer(r.view, require_writable=True) for r in regions]
        self.nmem = len(self._keep)
        self.mem = ffi.new("struct mv_region[]", max(1, self.nmem))
        for m, r, buf in zip(self.mem, regions, self._keep, strict=False):
            m.gpa = r.gpa
            m.size = len(r.view)
            m.host = ffi.cast("uint8_t *", buf)
        self.iov_max = iov_max
        self.iov = ffi.new("struct iovec[]", iov_max)
        self.out = ffi.new("struct mv_out *")
        self.spare = ffi.new("uint8_t[1]")
        self.ring = ffi.new("struct mv_queue *")
        self.heads = ffi.new("uint32_t[]", MAX_QUEUE)
        self.sizes = ffi.new("uint64_t[]", MAX_QUEUE)
        self.nios = ffi.new("uint32_t[]", MAX_QUEUE)
        self._views: tuple[memoryview, memoryview, memoryview] | None = None
        self._ring_bufs: list[Any] = []

    def bind(self, q: Queue) -> Any:
        """The ring struct for ``q``'s rings (rebuilt when they change: a reactivation),
        with its indices."""
        views = q.rings()
        ring = self.ring
        if views is not self._views:
            ffi = self.ffi
            self._ring_bufs = [ffi.from_buffer(v, require_writable=True) for v in views]
            ring.desc, ring.avail, ring.used = (ffi.cast("uint8_t *", b)
                                                for b in self._ring_bufs)
            ring.size = q.size
            self._views = views
        ring.next_avail = q.next_avail
        ring.next_used = q.next_used
        return ring

    def transmit(self, q: Queue, fd: int, max_frame: int) -> int:
        """mv_net_tx: its status; ``out.frames`` and ``out.payload`` say what was sent."""
        return self._run(self.lib.mv_net_tx, q, fd, max_frame, q.size)

    def receive(self, q: Queue, fd: int, budget: int, clear_flags: bool, need: int) -> int:
        """mv_net_rx for at most ``budget`` frames, holding ``need`` bytes of buffers per
        frame: its status; ``out.frames`` and ``out.payload`` say what was delivered."""
        return self._run(self.lib.mv_net_rx, q, fd, budget, clear_flags, self.spare, need,
                         self.heads, self.sizes, self.nios)

    def _run(self, fn: Any, q: Queue, fd: int, *args: Any) -> int:
        ring = self.bind(q)
        status: int = fn(ring, self.mem, self.nmem, fd, self.iov, self.iov_max, *args,
                         self.out)
        q.advance(ring.next_avail, ring.next_used)
        return status

    def release(self) -> None:
        """Drop every reference into guest memory (reset, close)."""
        self._views = None
        self._ring_bufs = []
        self._keep = []
        self.nmem = 0
