"""ring: the raw split-ring layout of virtio 1.2 §2.7 (split virtqueues), and nothing else.

A split queue of size N is three driver-allocated areas in guest memory:

    descriptor table  16*N bytes, align 16   N x {addr u64, len u32, flags u16, next u16}
    available ring   6+2*N bytes, align 2    flags u16, idx u16, ring[N] u16, used_event u16
    used ring        6+8*N bytes, align 4    flags u16, idx u16, ring[N] {id u32, len u32},
                                             avail_event u16

All fields are little-endian. Sizes and offsets are computed here once; the queue layer
keeps memoryviews of the three areas and uses the precompiled ``struct.Struct`` objects
below on them. Packed rings (§2.8) would be a sibling of this module.

Memory ordering with a driver running on another CPU
----------------------------------------------------
The driver writes a descriptor, then the available-ring entry, then (after a write
barrier) the available ``idx``; the device must read them in the opposite order. The
device writes the used element, then the used ``idx``. What makes this safe here:

* Each index load or store is one aligned 16-bit access, so it is never torn: the queue
  reads and writes the rings' u16 fields through ``memoryview.cast("H")`` item access,
  which CPython compiles to a two-byte ``memcpy``, one ``movzwl``/``movw`` on x86. The
  rings are aligned (2 and 4) and the fields sit at even offsets. ``struct.pack_into``
  must NOT be used for them: it zero-fills its target before storing (``memset`` in
  ``s_pack_internal``), so a driver on another CPU can read a used idx of 0 in between
  (seen for real: a probe guest reading a used idx that jumped backwards).
* Loads are not reordered with other loads and stores not with other stores on x86 (TSO),
  and each ``struct`` call is an opaque C call that the compiler cannot move other memory
  accesses across (a compiler barrier). So "read avail idx, then ring entries and
  descriptors" and "write used element, then used idx" need nothing more here. In C, or
  on a weakly-ordered host (arm64), the first needs a read barrier (Linux ``virt_rmb``)
  and the second a write barrier (``virt_wmb``).
* A store followed by a load of another location (publish used idx, then read
  ``used_event``; write ``avail_event``, then re-read avail idx) may be reordered even on
  x86: Linux uses a full ``virt_mb`` there. :func:`full_fence` provides one.
"""

from __future__ import annotations

import struct
import threading

# Descriptor flags (§2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Available ring flags (§2.7.6) and used ring flags (§2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
"""The largest split queue (§2.7: "Queue Size ... maximum 32768")."""

DESC_SIZE = 16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
AVAIL_ELEM_SIZE = 2
USED_ELEM_SIZE = 8
RING_HEADER = 4  # flags u16 + idx u16, in both the available and used rings
FLAGS_OFFSET = 0
IDX_OFFSET = 2
RING_OFFSET = 4

DESC = struct.Struct("<QIHH")
"""One descriptor: addr, len, flags, next."""
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
"""One used element: id (the chain's head), len (bytes written)."""
USED_ELEM_LEN_SHIFT = 32
"""The queue stores a used element as one u64, ``id | len << USED_ELEM_LEN_SHIFT``,
through a ``memoryview.cast("Q")`` of the ring's elements: the same bytes as USED_ELEM on
a little-endian host, which the "H" and "Q" views here assume (x86, as KVM for x86 is)."""


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return RING_HEADER + AVAIL_ELEM_SIZE * size + 2


def used_ring_size(size: int) -> int:
    """flags, idx, ring[size], avail_event."""
    return RING_HEADER + USED_ELEM_SIZE * size + 2


def used_event_offset(size: int) -> int:
    """Offset of ``used_event`` in the available ring (VIRTIO_F_EVENT_IDX)."""
    return RING_HEADER + AVAIL_ELEM_SIZE * size


def avail_event_offset(size: int) -> int:
    """Offset of ``avail_event`` in the used ring (VIRTIO_F_EVENT_IDX)."""
    return RING_HEADER + USED_ELEM_SIZE * size


def is_valid_size(size: int, max_size: int) -> bool:
    """A queue size is a power of two in [1, min(max_size, 32768)]."""
    return 0 < size <= min(max_size, MAX_QUEUE_SIZE) and size & (size - 1) == 0


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Linux's ``vring_need_event``: did the index move from ``old`` to ``new`` past
    ``event`` (all mod 2^16)? The other side asked to be told once ``event`` is passed."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier (store-load ordering), as Linux ``virt_mb``.

    Taking an uncontended lock executes a ``lock``-prefixed read-modify-write, which is a
    full barrier on x86. On a weakly-ordered host this is not guaranteed to be a full
    fence; there a real ``dmb ish`` (through cffi) would be needed.
    """
    with _fence_lock:
        pass
