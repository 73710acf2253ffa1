"""testing: a fake guest driver and fake guest memory, for device tests with no VM at all.

:class:`FakeDriver` plays the guest's virtio driver: it owns the three rings of one queue
in a :class:`FakeGuestMemory`, publishes chains (direct or indirect) of given readable
bytes and writable sizes, kicks, and reads back what the device put in the used ring,
with the bytes it wrote. It can also break every rule on purpose (raw descriptors, loops,
bad indices and addresses, overflowing lengths, nested or malformed indirect tables,
available-index jumps, misaligned rings), which is how the engine's own tests work::

    drv = FakeDriver(size=16)
    q = drv.make_queue()                  # set_size/addresses/ready/activate, as a transport
    head = drv.publish([b"request"], [64])
    with q.pop() as chain:                # the device side
        chain.writer.write(chain.reader.read().upper())
    assert drv.used() == [UsedElem(head, 7, b"REQUEST")]

Buffers come from a bump allocator over a heap after the rings; it starts again from the
bottom whenever no published chain is outstanding (call :meth:`FakeDriver.used`).
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import ring
from .mem import GuestMemoryLike, GuestRangeError
from .queue import Queue
from .ring import (
    DESC,
    U16,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)

__all__ = ["FakeDriver", "FakeGuestMemory", "FakeRegion", "UsedElem"]

_PAGE = 4096


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


class FakeRegion(NamedTuple):
    """One piece of fake guest RAM (same fields as ``minivmm.memory.Region`` uses)."""

    gpa: int
    size: int
    view: memoryview


class FakeGuestMemory:
    """Guest RAM made of anonymous mappings at given guest-physical ranges, with holes
    between them. Same ``translate`` contract as :class:`minivmm.memory.GuestMemory`
    (and, like it, ``regions``, whose first one the engine may slice directly);
    ``translations`` counts the calls (tests use it to bound the work per operation).
    Mappings are lazily backed: gigabytes cost nothing until touched."""

    def __init__(self, regions: Sequence[tuple[int, int]] = ((0, 4 << 20),)) -> None:
        out: list[FakeRegion] = []
        self._bases: list[tuple[int, int, int]] = []
        prev_end = -1
        for gpa, size in sorted(regions):
            if size <= 0 or gpa < 0 or gpa < prev_end:
                raise ValueError(f"bad or overlapping region 0x{gpa:x}+0x{size:x}")
            prev_end = gpa + size
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
            out.append(FakeRegion(gpa, size, memoryview(m)))
            host = ctypes.addressof(ctypes.c_char.from_buffer(m))
            self._bases.append((host, host + size, gpa))
        self.regions: tuple[FakeRegion, ...] = tuple(out)
        self.translations = 0

    def translate(self, gpa: int, length: int) -> memoryview:
        """``length`` bytes at ``gpa``; GuestRangeError unless all inside one region."""
        self.translations += 1
        end = gpa + length
        if gpa >= 0 and length >= 0:
            for start, size, view in self.regions:
                if start <= gpa and end <= start + size:
                    return view[gpa - start : end - start]
        raise GuestRangeError(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.translate(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.translate(gpa, len(data))[:] = data

    def gpa_of(self, view: memoryview) -> int:
        """The guest-physical address a (non-empty) view starts at; ValueError unless all
        of it lies inside this memory. Tests use it to check what a device was handed."""
        host = ctypes.addressof(ctypes.c_char.from_buffer(view))
        for start, stop, gpa in self._bases:
            if start <= host and host + view.nbytes <= stop:
                return gpa + host - start
        raise ValueError(f"a view of {view.nbytes} bytes at host 0x{host:x} is not guest RAM")


_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class UsedElem(NamedTuple):
    """One used-ring entry as the driver sees it, with the bytes the device wrote."""

    id: int
    len: int
    written: bytes = b""


class _Published(NamedTuple):
    descs: list[int]
    writable: list[tuple[int, int]]


class FakeDriver:
    """The driver side of one split queue, in fake guest memory (see the module doc).

    ``mem`` defaults to a :class:`FakeGuestMemory` holding the rings and a heap of
    ``heap_size`` bytes, then a 64 KiB hole, then a 64 KiB region at ``hole_end`` (for
    buffers that straddle a hole or end past RAM). Any object with ``translate`` works,
    e.g. a real :class:`minivmm.memory.GuestMemory`, if ``base + rings + heap`` fits.
    """

    def __init__(
        self,
        size: int = 256,
        *,
        mem: GuestMemoryLike | None = None,
        base: int = 0,
        heap_size: int = 1 << 20,
        event_idx: bool = False,
    ) -> None:
        self.size = size
        self.event_idx = event_idx
        self.desc_addr = _align(base, ring.DESC_ALIGN)
        self.avail_addr = _align(self.desc_addr + ring.desc_table_size(size), _PAGE)
        self.used_addr = _align(self.avail_addr + ring.avail_ring_size(size), _PAGE)
        self.heap_start = _align(self.used_addr + ring.used_ring_size(size), _PAGE)
        self.heap_end = self.heap_start + heap_size
        self.hole_start = _align(self.heap_end, _PAGE)
        self.hole_end = self.hole_start + (64 << 10)
        if mem is None:
            mem = FakeGuestMemory(((0, self.hole_start), (self.hole_end, 64 << 10)))
        self.mem = mem
        self._heap_next = self.heap_start
        self._free = list(range(size - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._published: dict[int, _Published] = {}
        self._collected: list[UsedElem] = []
        self._avail_idx = 0
        self._last_used = 0
        self._kick_checked = 0
        self.kicks = 0
        self.on_kick: Callable[[], None] | None = None
        """Called by :meth:`kick` (e.g. ``event.set`` or an eventfd write)."""
        self._view(self.desc_addr, ring.desc_table_size(size))[:] = bytes(
            ring.desc_table_size(size)
        )
        self._view(self.avail_addr, ring.avail_ring_size(size))[:] = bytes(
            ring.avail_ring_size(size)
        )
        self._view(self.used_addr, ring.used_ring_size(size))[:] = bytes(
            ring.used_ring_size(size)
        )

    # --- memory --------------------------------------------------------------------------

    def _view(self, gpa: int, length: int) -> memoryview:
        return self.mem.translate(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self._view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self._view(gpa, len(data))[:] = data

    def _u16(self, gpa: int) -> int:
        return int(U16.unpack_from(self._view(gpa, 2))[0])

    def _set_u16(self, gpa: int, value: int) -> None:
        U16.pack_into(self._view(gpa, 2), 0, value & 0xFFFF)

    def alloc(self, length: int, alignment: int = 16) -> int:
        """A heap buffer of ``length`` bytes; MemoryError when the heap is used up."""
        gpa = _align(self._heap_next, alignment)
        if gpa + length > self.heap_end:
            raise MemoryError("fake driver heap is full: collect used chains with used()")
        self._heap_next = gpa + length
        return gpa

    # --- set-up, as a transport would do it ----------------------------------------------

    def configure(self, queue: Queue, *, activate: bool = True) -> Queue:
        """Program ``queue`` like the driver's register writes, then activate it."""
        queue.set_size(self.size)
        queue.set_desc_table_address(self.desc_addr & 0xFFFF_FFFF, self.desc_addr >> 32)
        queue.set_avail_ring_address(self.avail_addr & 0xFFFF_FFFF, self.avail_addr >> 32)
        queue.set_used_ring_address(self.used_addr & 0xFFFF_FFFF, self.used_addr >> 32)
        queue.set_event_idx(self.event_idx)
        queue.set_ready(True)
        if activate:
            queue.activate(self.mem)
        return queue

    def make_queue(self, max_size: int | None = None, index: int = 0) -> Queue:
        """A new :class:`Queue` configured and activated on this driver's rings."""
        return self.configure(Queue(max_size or self.size, index))

    # --- publishing chains ---------------------------------------------------------------

    def publish(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        kick: bool = True,
    ) -> int:
        """Publish one chain: a buffer per readable ``bytes``, then a zeroed buffer per
        writable size; ``indirect`` puts them in an indirect table. Returns the head.
        Kicks (see :meth:`kick_needed`) unless ``kick`` is False."""
        if len(self._free) < len(readable) + len(writable) or not self._published:
            self._collected += self._collect()
        if not self._published:
            self._heap_next = self.heap_start
        bufs = [(self._fill(data), len(data), 0) for data in readable]
        writes = [(self._fill(bytes(n)), n, VIRTQ_DESC_F_WRITE) for n in writable]
        bufs += writes
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        entries = [
            (addr, n, flags | (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0), i + 1)
            for i, (addr, n, flags) in enumerate(bufs)
        ]
        if indirect:
            table, length = self.write_table(entries)
            descs = self._take(1)
            self.set_descriptor(descs[0], table, length, VIRTQ_DESC_F_INDIRECT, 0)
        else:
            descs = self._take(len(entries))
            for i, (addr, n, flags, _) in enumerate(entries):
                nxt = descs[i + 1] if i + 1 < len(descs) else 0
                self.set_descriptor(descs[i], addr, n, flags, nxt)
        head = descs[0]
        self._published[head] = _Published(descs, [(a, n) for a, n, _ in writes])
        self.push_head(head)
        if kick and self.kick_needed():
            self.kick()
        return head

    def _fill(self, data: bytes) -> int:
        gpa = self.alloc(max(len(data), 1))
        self.write(gpa, data)
        return gpa

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            self._collected += self._collect()  # reclaim, as a driver does when short
        if n > len(self._free):
            raise MemoryError(f"fake driver: {n} descriptors wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def write_table(self, entries: Sequence[tuple[int, int, int, int]]) -> tuple[int, int]:
        """Write an indirect table of raw (addr, len, flags, next) entries in the heap;
        returns (address, length in bytes) for an INDIRECT descriptor."""
        gpa = self.alloc(max(len(entries), 1) * ring.DESC_SIZE, ring.DESC_ALIGN)
        for i, entry in enumerate(entries):
            DESC.pack_into(self._view(gpa + i * ring.DESC_SIZE, ring.DESC_SIZE), 0, *entry)
        return gpa, len(entries) * ring.DESC_SIZE

    def push_head(self, head: int) -> None:
        """Put ``head`` (any value) in the next available slot and advance the index."""
        slot = self._avail_idx % self.size
        self._set_u16(self.avail_addr + ring.RING_OFFSET + 2 * slot, head)
        self.set_avail_idx(self._avail_idx + 1)

    # --- notifications -------------------------------------------------------------------

    def kick_needed(self) -> bool:
        """Whether the device asked for a kick for what was published since the last call
        (avail_event with EVENT_IDX, else the NO_NOTIFY flag), as Linux decides it."""
        new, old = self._avail_idx, self._kick_checked
        self._kick_checked = new
        if self.event_idx:
            event = self._u16(self.used_addr + ring.avail_event_offset(self.size))
            return ring.vring_need_event(event, new, old)
        return not self._u16(self.used_addr) & VIRTQ_USED_F_NO_NOTIFY

    def kick(self) -> None:
        """Notify the device (QueueNotify): counts, and calls ``on_kick``."""
        self.kicks += 1
        if self.on_kick is not None:
            self.on_kick()

    def set_used_event(self, value: int) -> None:
        """EVENT_IDX: interrupt me once the used index passes ``value``."""
        self._set_u16(self.avail_addr + ring.used_event_offset(self.size), value)

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self._set_u16(self.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    # --- the used ring -------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self._u16(self.used_addr + ring.IDX_OFFSET)

    def used(self) -> list[UsedElem]:
        """The used entries added since the last call, with the bytes written (the first
        ``len`` bytes of the chain's writable buffers); their descriptors are freed."""
        out, self._collected = self._collected + self._collect(), []
        return out

    def _collect(self) -> list[UsedElem]:
        out = []
        idx = self.used_idx
        while self._last_used != idx:
            slot = self._last_used % self.size
            gpa = self.used_addr + ring.RING_OFFSET + ring.USED_ELEM_SIZE * slot
            head, length = USED_ELEM.unpack_from(self._view(gpa, ring.USED_ELEM_SIZE))
            self._last_used = (self._last_used + 1) & 0xFFFF
            pub = self._published.pop(head, None)
            data = b""
            if pub is not None:
                left = length
                for addr, n in pub.writable:
                    take = min(n, left)
                    data += self.read(addr, take)
                    left -= take
                self._free.extend(reversed(pub.descs))
            out.append(UsedElem(head, length, data))
        return out

    def chain_descriptors(self) -> dict[int, list[int]]:
        """Outstanding chains: head -> the queue's descriptor indices they use."""
        return {head: list(p.descs) for head, p in self._published.items()}

    @property
    def outstanding(self) -> int:
        """Chains published and not yet seen in the used ring."""
        return len(self._published)

    # --- raw access and corruption -------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Store the available index (any value: jumps are how a broken driver looks)."""
        self._avail_idx = value & 0xFFFF
        self._set_u16(self.avail_addr + ring.IDX_OFFSET, self._avail_idx)

    def set_avail_entry(self, slot: int, head: int) -> None:
        self._set_u16(self.avail_addr + ring.RING_OFFSET + 2 * (slot % self.size), head)

    def descriptor(self, index: int, table: int | None = None) -> tuple[int, int, int, int]:
        """(addr, len, flags, next) of entry ``index`` of the table (default: the queue's)."""
        gpa = (self.desc_addr if table is None else table) + index * ring.DESC_SIZE
        addr, length, flags, nxt = DESC.unpack_from(self._view(gpa, ring.DESC_SIZE))
        return addr, length, flags, nxt

    def set_descriptor(
        self, index: int, addr: int, length: int, flags: int, nxt: int, table: int | None = None
    ) -> None:
        """Write a raw descriptor (values masked to their field widths)."""
        gpa = (self.desc_addr if table is None else table) + index * ring.DESC_SIZE
        DESC.pack_into(
            self._view(gpa, ring.DESC_SIZE),
            0,
            addr & (2**64 - 1),
            length & 0xFFFF_FFFF,
            flags & 0xFFFF,
            nxt & 0xFFFF,
        )

    def patch_descriptor(self, index: int, table: int | None = None, **fields: int) -> None:
        """Change some of ``addr``, ``len``, ``flags``, ``next`` of a descriptor."""
        addr, length, flags, nxt = self.descriptor(index, table)
        self.set_descriptor(
            index,
            fields.get("addr", addr),
            fields.get("len", length),
            fields.get("flags", flags),
            fields.get("next", nxt),
            table,
        )

    def make_loop(self, head: int) -> None:
        """Point the last descriptor of the direct chain at ``head`` back to ``head``."""
        index = head
        for _ in range(self.size):
            _, _, flags, nxt = self.descriptor(index)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            index = nxt
        self.patch_descriptor(index, flags=self.descriptor(index)[2] | VIRTQ_DESC_F_NEXT, next=head)

    def misaligned(self, queue: Queue, part: str) -> None:
        """Program ``queue`` with ``part`` ("desc", "avail" or "used") one byte off."""
        self.configure(queue, activate=False)
        queue.set_ready(False)
        addrs = {"desc": self.desc_addr, "avail": self.avail_addr, "used": self.used_addr}
        setter = {
            "desc": queue.set_desc_table_address,
            "avail": queue.set_avail_ring_address,
            "used": queue.set_used_ring_address,
        }[part]
        setter(addrs[part] + 1, None)
        queue.set_ready(True)
