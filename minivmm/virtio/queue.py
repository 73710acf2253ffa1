"""queue: the device side of one split virtqueue (virtio 1.2 §2.7).

Life of a queue, driven by the transport from the driver's register writes:

    q = Queue(max_size=256, index=0)          # QueueNumMax
    q.set_size(n)                             # QueueNum
    q.set_desc_table_address(low, high)       # QueueDescLow/High
    q.set_avail_ring_address(low, high)       # QueueDriverLow/High
    q.set_used_ring_address(low, high)        # QueueDeviceLow/High
    q.set_event_idx(acked VIRTIO_F_EVENT_IDX) # at FEATURES_OK
    q.set_ready(True)                         # QueueReady = 1
    q.activate(mem)                           # at DRIVER_OK: raises a typed VirtQueueError
                                              # (size, alignment, rings in memory)
    ...                                       # the device pops chains
    q.reset()                                 # Status = 0 or QueueReset

``is_valid(mem)`` is the same check as ``activate`` answered as a bool, with no effect;
``config_error(mem)`` names what is wrong with the configuration (a VirtQueueError).
Configuration writes while the queue is ready are ignored (virtio-mmio, §4.2.2).

:meth:`Queue.pop` walks and validates one chain (direct or indirect, §2.7.5.3) and returns
a :class:`~minivmm.virtio.chain.DescriptorChain`, or None when the ring is empty. A bad
chain raises a :class:`~minivmm.virtio.errors.DescriptorError` (or
``InvalidDescriptorIndex``); that available entry is consumed and the queue keeps working.
An available index that jumps by more than the queue size raises
:class:`~minivmm.virtio.errors.InvalidAvailRingIndex` and *stops* the queue: ``broken``
holds the error and every later ``pop`` raises it again, until ``reset``. The transport
should then set DEVICE_NEEDS_RESET.

Work per ``pop`` is bounded: at most ``size`` descriptors in the table, plus at most the
table length (at most 32768) inside one indirect table. The used index is the device's own
counter (``next_used``), never read back from guest memory. Indices wrap at 2^16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

from . import ring
from .chain import NO_READER, NO_WRITER, DescriptorChain, Reader, Writer
from .errors import (
    ChainLengthOverflow,
    DescriptorChainTooLong,
    DescriptorOutOfMemory,
    IndirectWithNext,
    InvalidAvailRingIndex,
    InvalidDescriptorIndex,
    InvalidIndirectLength,
    InvalidNextIndex,
    InvalidQueueSize,
    MisalignedRing,
    NestedIndirect,
    QueueNotReady,
    ReadableAfterWritable,
    RingOutsideMemory,
    VirtQueueError,
)
from .mem import NO_WINDOW, GuestMemoryLike, low_window, view_of
from .ring import (
    DESC,
    USED_ELEM_LEN_SHIFT,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    full_fence,
)

__all__ = ["Queue"]

_MAX_CHAIN_BYTES = 0xFFFF_FFFF
_MAX_INDIRECT_BYTES = ring.MAX_QUEUE_SIZE * ring.DESC_SIZE
_INDIRECT_TABLE = "indirect table"
# Positions in the rings viewed as u16 arrays (byte offset / 2).
_FLAGS = ring.FLAGS_OFFSET // 2
_IDX = ring.IDX_OFFSET // 2
_RING = ring.RING_OFFSET // 2
_unpack_desc = DESC.unpack_from


_NO_USED_ELEMS = memoryview(b"")
_KIND = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT


def _no_memory(gpa: int, length: int) -> memoryview:
    """``translate`` of an inactive queue: nothing is guest memory."""
    raise LookupError(gpa, length)


def _split(value: int, low: int | None, high: int | None) -> int:
    if low is not None:
        value = (value & ~0xFFFF_FFFF) | (low & 0xFFFF_FFFF)
    if high is not None:
        value = (value & 0xFFFF_FFFF) | ((high & 0xFFFF_FFFF) << 32)
    return value


class Queue:
    """One split virtqueue, device side. ``index`` only names the queue in messages."""

    __slots__ = (
        "_avail",
        "_avail_addr",
        "_avail_event_off",
        "_avail_view",
        "_cached_avail_idx",
        "_desc_addr",
        "_event_idx",
        "_generation",
        "_mask",
        "_max_size",
        "_next_avail",
        "_next_used",
        "_ready",
        "_rings",
        "_signalled_used",
        "_size",
        "_translate",
        "_used16",
        "_used_addr",
        "_used_elems",
        "_used_event_off",
        "_walk",
        "broken",
        "index",
        "observer",  # unset unless observed (minivmm.virtio.observe)
    )
    #: whether an accelerator (C code working the rings through :meth:`rings`) may serve
    #: this queue; False for an observed queue, whose chains must go through ``pop`` and
    #: the used-ring publisher in Python, where --trace and --check-driver see them
    accelerable: ClassVar[bool] = True

    def __init__(self, max_size: int, index: int = 0) -> None:
        if not ring.is_valid_size(max_size, ring.MAX_QUEUE_SIZE):
            raise ValueError(f"max_size {max_size} is not a power of two in 1..32768")
        self._max_size = max_size
        self.index = index
        self._generation = 0
        self.reset()

    # --- configuration (the transport) --------------------------------------------------

    def reset(self) -> None:
        """Back to the state after device reset (§2.1.2); chains still held are dropped."""
        self._generation += 1
        self._size = self._max_size
        self._desc_addr = 0
        self._avail_addr = 0
        self._used_addr = 0
        self._event_idx = False
        self._ready = False
        self._next_avail = 0
        self._next_used = 0
        self.broken: VirtQueueError | None = None
        """The error that stopped the queue (InvalidAvailRingIndex), or None."""
        self._deactivate()

    def _deactivate(self) -> None:
        self._translate: Callable[[int, int], memoryview] = _no_memory
        # What the walk needs, in one tuple (one load in ``pop``): the descriptor table,
        # the low RAM window (buffers ending at or below its length are sliced from it
        # directly), that length, the bound on the walk in the table, the ring's index
        # mask (size - 1) and the generation (fixed from one activation to the next
        # deactivation, which every generation change goes with).
        self._walk: tuple[memoryview, memoryview, int, range, int, int] = (
            NO_WINDOW, NO_WINDOW, 0, range(0), 0, self._generation)
        self._avail: memoryview | None = None  # None whenever pop must not run
        self._avail_view: memoryview | None = None
        self._rings: tuple[memoryview, memoryview, memoryview] | None = None
        # Empty while inactive; only written through a chain of the current generation
        # (every deactivation starts a new one) or ``add_used``, which checks first.
        self._used_elems = _NO_USED_ELEMS
        self._used16 = _NO_USED_ELEMS
        self._mask = 0
        self._cached_avail_idx = self._next_avail
        self._signalled_used: int | None = None
        self._used_event_off = 0
        self._avail_event_off = 0

    @property
    def max_size(self) -> int:
        """QueueNumMax: the largest size the driver may choose."""
        return self._max_size

    @property
    def size(self) -> int:
        """QueueNum: the size the driver chose (max_size until it writes one)."""
        return self._size

    def set_size(self, size: int) -> None:
        """QueueNum write. Any value is stored; ``activate`` rejects a bad one."""
        if not self._ready:
            self._size = size

    @property
    def desc_table_address(self) -> int:
        return self._desc_addr

    @property
    def avail_ring_address(self) -> int:
        return self._avail_addr

    @property
    def used_ring_address(self) -> int:
        return self._used_addr

    def set_desc_table_address(self, low: int | None = None, high: int | None = None) -> None:
        """QueueDescLow/High write: either 32-bit half of the descriptor table address."""
        if not self._ready:
            self._desc_addr = _split(self._desc_addr, low, high)

    def set_avail_ring_address(self, low: int | None = None, high: int | None = None) -> None:
        """QueueDriverLow/High write: the available ring address."""
        if not self._ready:
            self._avail_addr = _split(self._avail_addr, low, high)

    def set_used_ring_address(self, low: int | None = None, high: int | None = None) -> None:
        """QueueDeviceLow/High write: the used ring address."""
        if not self._ready:
            self._used_addr = _split(self._used_addr, low, high)

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    def set_event_idx(self, enabled: bool) -> None:
        """Whether the driver acked VIRTIO_F_EVENT_IDX (set at FEATURES_OK)."""
        if not self._ready:
            self._event_idx = enabled

    def set_ready(self, ready: bool) -> None:
        """QueueReady write. Setting 0 deactivates the queue (its chains are dropped)."""
        if ready == self._ready:
            return
        self._ready = ready
        if not ready:
            self._generation += 1
            self._deactivate()

    def is_ready(self) -> bool:
        """QueueReady as the driver last wrote it."""
        return self._ready

    def _check(self, mem: GuestMemoryLike) -> tuple[memoryview, memoryview, memoryview]:
        if not self._ready:
            raise QueueNotReady(self.index)
        return self._check_config(mem)

    def _check_config(self, mem: GuestMemoryLike) -> tuple[memoryview, memoryview, memoryview]:
        size = self._size
        if not ring.is_valid_size(size, self._max_size):
            raise InvalidQueueSize(self.index, size, self._max_size)
        parts = (
            ("descriptor table", self._desc_addr, ring.DESC_ALIGN, ring.desc_table_size(size)),
            ("available ring", self._avail_addr, ring.AVAIL_ALIGN, ring.avail_ring_size(size)),
            ("used ring", self._used_addr, ring.USED_ALIGN, ring.used_ring_size(size)),
        )
        for part, addr, align, _ in parts:
            if addr % align:
                raise MisalignedRing(self.index, part, addr, align)
        views = []
        for part, addr, _, length in parts:
            view = view_of(mem.translate, addr, length)
            if view is None or view.readonly:
                raise RingOutsideMemory(self.index, part, addr, length)
            views.append(view)
        desc, avail, used = views
        return desc, avail, used

    def is_valid(self, mem: GuestMemoryLike) -> bool:
        """Whether ``activate(mem)`` would succeed (no side effects)."""
        return self._ready and self.config_error(mem) is None

    def config_error(self, mem: GuestMemoryLike) -> VirtQueueError | None:
        """What is wrong with the size and ring addresses the driver wrote, ready or not:
        InvalidQueueSize, MisalignedRing or RingOutsideMemory; None if nothing."""
        try:
            self._check_config(mem)
        except VirtQueueError as e:
            return e
        return None

    def activate(self, mem: GuestMemoryLike) -> None:
        """Validate the configuration and start serving the rings (at DRIVER_OK).

        Raises QueueNotReady, InvalidQueueSize, MisalignedRing or RingOutsideMemory."""
        desc, avail, used = self._check(mem)
        self._translate = mem.translate
        low = low_window(mem)
        self._walk = (desc, low, len(low), range(self._size), self._size - 1, self._generation)
        # The available ring is only ever read as u16s, and the used ring's flags, idx and
        # avail_event are u16s: both go through "H" views, one aligned 16-bit access per
        # index (see ring.py on why struct.pack_into must not be used for them).
        avail16 = avail.cast("H")
        self._avail_view = avail16
        self._avail = None if self.broken else avail16  # a stopped queue stays stopped
        # The used ring's elements as u64 words, id | len << 32 (ring.py): one store each.
        self._used_elems = used[ring.RING_OFFSET : ring.avail_event_offset(self._size)].cast("Q")
        self._used16 = used.cast("H")
        self._mask = self._size - 1
        self._cached_avail_idx = self._next_avail
        self._signalled_used = None
        self._used_event_off = ring.used_event_offset(self._size) // 2
        self._avail_event_off = ring.avail_event_offset(self._size) // 2
        self._rings = (desc, avail, used)

    def is_active(self) -> bool:
        """True between a successful ``activate`` and ``reset``/``set_ready(False)``."""
        return self._avail_view is not None

    # --- indices (state save/restore) ---------------------------------------------------

    @property
    def next_avail(self) -> int:
        """The available-ring index of the next chain the device will pop."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        self._next_avail = value & 0xFFFF
        self._cached_avail_idx = self._next_avail

    @property
    def next_used(self) -> int:
        """The device's used index: the value it last published in the used ring."""
        return self._next_used

    @next_used.setter
    def next_used(self, value: int) -> None:
        self._next_used = value & 0xFFFF
        self._signalled_used = None

    def _views(self) -> tuple[memoryview, memoryview]:
        """The available ring and the used ring, as arrays of u16 ("H" views)."""
        if self._avail_view is None:
            raise QueueNotReady(self.index)
        return self._avail_view, self._used16

    def avail_idx(self) -> int:
        """The driver's available index, read from guest memory now."""
        return int(self._views()[0][_IDX])

    def used_idx(self) -> int:
        """The used index as guest memory holds it (diagnostics; the engine never reads it)."""
        return int(self._views()[1][_IDX])

    # --- the data path -------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises a VirtQueueError for a bad chain
        (consumed) or a stopped queue (``broken``, raised again on every call)."""
        avail = self._avail
        if avail is None:
            raise self.broken or QueueNotReady(self.index)
        na = self._next_avail
        if na == self._cached_avail_idx:
            # The avail idx load comes before the ring-entry loads (see ring.py on ordering).
            idx = avail[_IDX]
            if idx == na:
                return None
            if (idx - na) & 0xFFFF > self._size:
                self.broken = InvalidAvailRingIndex(self.index, idx, na, self._size)
                self._avail = None
                raise self.broken
            self._cached_avail_idx = idx
        table, low, low_end, hops, mask, generation = self._walk
        slot = na & mask
        head = avail[_RING + slot]
        self._next_avail = (na + 1) & 0xFFFF
        limit = mask + 1
        if head >= limit:
            raise InvalidDescriptorIndex(self.index, slot, head, limit)

        # Walk the chain (§2.7.5): one loop for the descriptor table and, when a descriptor
        # points to an indirect table (§2.7.5.3), for that table: the loop then goes on in
        # it, from its entry 0, with its own length as the bound on the walk and on ``next``.
        # Each descriptor is unpacked once into Python ints, so the guest changing it
        # meanwhile cannot make two checks see different values. At most ``limit``
        # descriptors per table: a longer chain has a loop.
        where = ""  # "" for the descriptor table, else _INDIRECT_TABLE (error messages)
        unpack = _unpack_desc
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        seen_write = False
        index = head
        while True:
            for _ in hops:
                addr, length, flags, nxt = unpack(table, index << 4)
                kind = flags & _KIND
                if kind == VIRTQ_DESC_F_WRITE:
                    wlen += length
                    seen_write = True
                    if length:
                        end = addr + length
                        if end <= low_end:  # inside the directly sliceable window
                            writable.append(low[addr:end])
                        else:
                            writable.append(self._buffer(head, index, addr, length, where))
                elif kind:
                    break  # a table (WRITE is ignored, §2.7.5.3.1): go on in it (below)
                elif seen_write:
                    raise ReadableAfterWritable(self.index, head, index, where)
                else:
                    rlen += length
                    if length:
                        end = addr + length
                        if end <= low_end:
                            readable.append(low[addr:end])
                        else:
                            readable.append(self._buffer(head, index, addr, length, where))
                if not flags & VIRTQ_DESC_F_NEXT:
                    if rlen + wlen > _MAX_CHAIN_BYTES:
                        raise ChainLengthOverflow(self.index, head, rlen + wlen)
                    # The one place a chain is built: slots filled in place (chain.py).
                    if rlen:
                        r = Reader()
                        r._views = readable
                        r._i = r._off = 0
                        r.total = r.remaining = rlen
                    else:
                        r = NO_READER
                    if wlen:
                        w = Writer()
                        w._views = writable
                        w._i = w._off = 0
                        w.total = w.remaining = wlen
                    else:
                        w = NO_WRITER
                    c = DescriptorChain()
                    c._owner = self
                    c._generation = generation
                    c.head = head
                    c.reader = r
                    c.writer = w
                    return c
                if nxt >= limit:
                    raise InvalidNextIndex(self.index, head, index, nxt, limit, where)
                index = nxt
            else:
                raise DescriptorChainTooLong(self.index, head, limit, where)
            # Descriptor ``index`` points to an indirect table: it ends the direct chain (no
            # NEXT) and the table holds no further tables (§2.7.5.3.1).
            if where:
                raise NestedIndirect(self.index, head, index)
            if flags & VIRTQ_DESC_F_NEXT:
                raise IndirectWithNext(self.index, head, index)
            if length == 0 or length & 15 or length > _MAX_INDIRECT_BYTES:
                raise InvalidIndirectLength(self.index, head, index, length)
            end = addr + length
            if end <= low_end:
                table = low[addr:end]
            else:
                table = self._buffer(head, index, addr, length, where)
            where = _INDIRECT_TABLE
            limit = length >> 4
            hops = range(limit)
            index = 0

    def _buffer(self, head: int, index: int, addr: int, length: int, where: str) -> memoryview:
        """A buffer (or table) through ``translate``, checked: DescriptorOutOfMemory."""
        view = view_of(self._translate, addr, length)
        if view is None:
            raise DescriptorOutOfMemory(self.index, head, index, addr, length, where)
        return view

    # --- accelerators (C code that serves chains itself) ---------------------------------

    def rings(self) -> tuple[memoryview, memoryview, memoryview]:
        """The descriptor table, the available ring and the used ring as byte views, for
        an accelerator (minivmm.accel) that walks and publishes chains in C. It must keep
        every guard of :meth:`pop` and leave a chain it would not accept to ``pop`` (which
        raises the typed error), and report its progress with :meth:`advance`. The same
        tuple object is returned until the queue is deactivated (a cache key). Raises as
        ``pop`` does on a stopped or inactive queue."""
        if self._avail is None or self._rings is None:
            raise self.broken or QueueNotReady(self.index)
        return self._rings

    def advance(self, next_avail: int, next_used: int) -> None:
        """Record what an accelerator did: the available index it consumed up to and the
        used index it published (both already in guest memory). Unlike the setters of
        ``next_avail``/``next_used`` this keeps the notification state: the chains it
        published are interrupted for, or not, by the next ``needs_notification``."""
        self._next_avail = next_avail & 0xFFFF
        self._cached_avail_idx = self._next_avail
        self._next_used = next_used & 0xFFFF

    def iter(self) -> Iterator[DescriptorChain]:
        """Pop chains until the ring is empty (errors propagate as from ``pop``)."""
        while (chain := self.pop()) is not None:
            yield chain

    def add_used(self, head: int, length: int) -> None:
        """Publish one used element (``head``, bytes written) and the new used index.

        Devices normally let the chain do this (``with chain:``). ``ValueError`` for a
        head >= size or a length outside u32: those are device bugs, not guest errors."""
        if self._avail_view is None:
            raise QueueNotReady(self.index)
        if not 0 <= head < self._size or not 0 <= length <= _MAX_CHAIN_BYTES:
            raise ValueError(f"add_used({head}, {length}) on queue {self.index}: out of range")
        self.return_chain(head, length, self._generation)

    def return_chain(self, head: int, written: int, generation: int) -> None:
        """The used-ring publisher (every used element goes through here): called by a
        chain when it completes, and by ``add_used``. A chain from before a reset (another
        ``generation``) is dropped."""
        if generation != self._generation:
            return
        nu = self._next_used
        # The element store comes before the index store (see ring.py on ordering).
        self._used_elems[nu & self._mask] = head | written << USED_ELEM_LEN_SHIFT
        nu = (nu + 1) & 0xFFFF
        self._used16[_IDX] = nu
        self._next_used = nu

    # --- notifications (§2.7.7, §2.7.10; VIRTIO_F_EVENT_IDX) ----------------------------

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer interrupt now, for the used entries
        published since the last call (Linux ``vring_need_event`` with EVENT_IDX, else
        the NO_INTERRUPT flag). Call it after a batch of ``add_used``."""
        avail, _ = self._views()
        full_fence()  # the used idx store must be visible before used_event is read
        if self._event_idx:
            new = self._next_used
            old = self._signalled_used
            self._signalled_used = new
            if old is None:
                return True
            event = avail[self._used_event_off]
            return ring.vring_need_event(event, new, old)
        return not avail[_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> bool:
        """Ask the driver to kick on new buffers. Returns True if buffers arrived
        meanwhile (pop them before sleeping, or they may never be kicked)."""
        return self.kick_past(self._next_avail)

    def kick_past(self, avail_idx: int) -> bool:
        """Ask the driver to kick when its available index goes past ``avail_idx`` (e.g.
        when it adds one buffer to a ring the device has not emptied): with EVENT_IDX
        avail_event = ``avail_idx`` (§2.7.10), else the NO_NOTIFY flag is cleared.
        Returns True if it already has (it may not have kicked for that)."""
        avail, used = self._views()
        if self._event_idx:
            used[self._avail_event_off] = avail_idx & 0xFFFF
        else:
            used[_FLAGS] = 0
        full_fence()  # the store above must be visible before avail idx is read
        return bool(avail[_IDX] != avail_idx & 0xFFFF)

    def disable_notification(self) -> None:
        """Tell the driver kicks are not needed (a hint: it may kick anyway). With
        EVENT_IDX there is nothing to write: avail_event stays behind."""
        _, used = self._views()
        if not self._event_idx:
            used[_FLAGS] = VIRTQ_USED_F_NO_NOTIFY

    def __repr__(self) -> str:
        state = "broken" if self.broken else "active" if self.is_active() else "inactive"
        return (
            f"<Queue {self.index} size={self._size} {state} "
            f"next_avail={self._next_avail} next_used={self._next_used}>"
        )
