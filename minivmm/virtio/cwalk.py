"""cwalk: the split virtqueue's walk and used-ring publish in C, for the C accelerators.

The C twin of :meth:`Queue.pop <minivmm.virtio.queue.Queue.pop>` and
:meth:`Queue.push <minivmm.virtio.queue.Queue.push>`, written once and included by every
accelerator (minivmm.devices.net_accel, minivmm.devices.uring_build), so each guard of
the engine exists once in Python (queue.py) and once in C (here). Nothing here is built
on its own: an accelerator puts :data:`STRUCTS` in its cdef (the structures Python fills)
and :data:`SOURCE` at the top of its C source (after its ``#include``\\ s), and
minivmm.accel compiles the whole.

What :data:`SOURCE` gives the C that includes it (all ``static inline``: an accelerator
that uses only some of them builds without warnings):

- ``struct mv_region`` (one region of the guest memory map: gpa, size, host address) and
  ``mv_guest(mem, n, gpa, len)``: the host address of ``[gpa, gpa + len)`` when one
  region holds it whole, else NULL: every guest address goes through it;
- ``struct mv_queue``: a queue's three rings (host addresses), size, indices and whether
  VIRTIO_F_EVENT_IDX was negotiated, as Python's Queue has them;
- ``mv_avail_idx(q)``: the driver's available index, ordered before what is read after
  it; ``mv_avail_head(q, idx)``: the head at ``next_avail``, or -1 when ``idx`` jumped
  more than the queue's size ahead (virtio 1.2 §2.7.13.3: pop raises
  InvalidAvailRingIndex);
- ``mv_walk(q, mem, n, head, iov, room, &niov, &nread, &rlen, &wlen)``: the chain at
  ``head`` with every guard of pop (virtio 1.2 §2.7.5, §2.7.5.3: head and next below the
  table length, at most one pass over a table (a loop), no nested indirect table, no
  INDIRECT with NEXT, an indirect table's length a non-zero multiple of 16 and at most
  32768 entries, readable before writable, the total length under 2^32, every buffer
  inside the memory map). Its non-empty buffers go into ``iov`` (readable ones first;
  ``nread`` of them), as pop skips a zero-length one. 0; -1 for a chain pop rejects
  (the accelerator leaves it in the ring and Python's pop raises the typed error);
  -2 when ``iov`` has no room for its buffers;
- ``mv_put_used(q, head, len)``: publish one used element and the used index after it
  (virtio 1.2 §2.7.8), as push does.

Python passes host addresses of memory it keeps mapped; the guest may rewrite the rings
and tables under the walk, so each descriptor is copied once and then read from the
copy, and the indices are read with single aligned loads (as ring.py does).
"""

from __future__ import annotations

from typing import Final

STRUCTS: Final = """
struct mv_region { uint64_t gpa; uint64_t size; uint8_t *host; };
struct mv_queue {
    uint8_t *desc; uint8_t *avail; uint8_t *used;
    uint32_t size; uint16_t next_avail; uint16_t next_used; uint32_t event_idx;
};
"""
"""The structures Python fills: in an accelerator's cdef (SOURCE defines them for C)."""

SOURCE: Final = r"""
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
""" + STRUCTS + r"""
#define MV_DESC_F_NEXT 1
#define MV_DESC_F_WRITE 2
#define MV_DESC_F_INDIRECT 4
#define MV_MAX_CHAIN 0xFFFFFFFFull          /* a chain's total length (queue.py) */
#define MV_MAX_INDIRECT (32768u * 16u)      /* an indirect table's bytes (§2.7.5.3.1) */

struct mv_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };

static inline uint16_t mv_load16(const uint8_t *p)
{
    return *(const volatile uint16_t *)p;  /* one aligned 16-bit load (ring.py) */
}

static inline void mv_store16(uint8_t *p, uint16_t v)
{
    *(volatile uint16_t *)p = v;
}

/* [gpa, gpa + len) inside one region (len > 0): its host address, else NULL. */
static inline uint8_t *mv_guest(const struct mv_region *m, int n, uint64_t gpa,
                                uint64_t len)
{
    for (int i = 0; i < n; i++)
        if (gpa >= m[i].gpa && gpa - m[i].gpa <= m[i].size
                && len <= m[i].size - (gpa - m[i].gpa))
            return m[i].host + (gpa - m[i].gpa);
    return NULL;
}

/* The available index, read before the entries it publishes. */
static inline uint16_t mv_avail_idx(const struct mv_queue *q)
{
    uint16_t idx = mv_load16(q->avail + 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return idx;
}

/* The head at next_avail given the available index, or -1 for an index that jumped
 * more than the queue's size ahead (pop raises InvalidAvailRingIndex). */
static inline int mv_avail_head(const struct mv_queue *q, uint16_t idx)
{
    if ((uint16_t)(idx - q->next_avail) > q->size)
        return -1;
    return mv_load16(q->avail + 4 + 2 * (uint64_t)(q->next_avail & (q->size - 1)));
}

/* Walk the chain at `head` with every guard of Queue.pop: its non-empty buffers into
 * iov (readable first; *nread of them). 0; -1 for a chain pop rejects (Python pops it
 * and raises the typed error); -2 when iov has no room for them. */
static inline int mv_walk(const struct mv_queue *q, const struct mv_region *mem, int nmem,
                          uint32_t head, struct iovec *iov, unsigned room, unsigned *niov,
                          unsigned *nread, uint64_t *rlen, uint64_t *wlen)
{
    const uint8_t *table = q->desc;
    uint32_t limit = q->size, index = head;
    int indirect = 0, seen_write = 0;
    unsigned n = 0, nr = 0;
    uint64_t r = 0, w = 0;
    struct mv_desc d;

    if (head >= limit)
        return -1;
    for (;;) {
        uint32_t hop;
        for (hop = 0; hop < limit; hop++) {
            memcpy(&d, table + (uint64_t)index * 16, sizeof d);
            __asm__ __volatile__("" ::: "memory");  /* each field read once, from d */
            if (d.flags & MV_DESC_F_INDIRECT)
                break;
            if (d.flags & MV_DESC_F_WRITE) {
                w += d.len;
                seen_write = 1;
            } else if (seen_write) {
                return -1;  /* readable after writable */
            } else {
                r += d.len;
            }
            if (d.len) {
                uint8_t *p = mv_guest(mem, nmem, d.addr, d.len);
                if (p == NULL)
                    return -1;
                if (n == room)
                    return -2;
                iov[n].iov_base = p;
                iov[n].iov_len = d.len;
                n++;
                if (!(d.flags & MV_DESC_F_WRITE))
                    nr = n;
            }
            if (!(d.flags & MV_DESC_F_NEXT)) {
                if (r + w > MV_MAX_CHAIN)
                    return -1;
                *niov = n;
                *nread = nr;
                *rlen = r;
                *wlen = w;
                return 0;
            }
            if (d.next >= limit)
                return -1;
            index = d.next;
        }
        if (hop == limit)
            return -1;  /* more hops than entries: a loop */
        if (indirect || (d.flags & MV_DESC_F_NEXT) || d.len == 0 || (d.len & 15)
                || d.len > MV_MAX_INDIRECT)
            return -1;
        table = mv_guest(mem, nmem, d.addr, d.len);
        if (table == NULL)
            return -1;
        indirect = 1;
        limit = d.len >> 4;
        index = 0;
    }
}

/* Publish (head, len) as the next used element, then the used index after it. */
static inline void mv_put_used(struct mv_queue *q, uint32_t head, uint32_t len)
{
    uint8_t *elem = q->used + 4 + 8 * (uint64_t)(q->next_used & (q->size - 1));
    memcpy(elem, &head, 4);
    memcpy(elem + 4, &len, 4);
    __atomic_thread_fence(__ATOMIC_RELEASE);  /* the element before the index */
    q->next_used++;
    mv_store16(q->used + 2, q->next_used);
}
"""
"""The C text (see the module docstring); it includes what it needs."""
