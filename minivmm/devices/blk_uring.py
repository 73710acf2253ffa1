"""blk_uring: the block device's batch path: a wake-up's requests in one C call, the reads
through one io_uring.

Per wake-up (a kick), :meth:`BatchPath.drain` calls the C loop ``mv_blk_run``
(minivmm.devices.uring_build) until the ring is empty. The C loop walks the available
chains itself, with every guard of :meth:`Queue.pop <minivmm.virtio.queue.Queue.pop>`
and every buffer checked against the guest memory map, and serves the common requests,
IN and OUT of the shape Linux sends (the header in the first readable buffer, sector
multiples on the disk, the status the chain's last byte). Each read becomes one SQE
whose user_data is its slot in the batch (not the head: a hostile driver may publish one
head twice); they are submitted and waited for with one ``io_uring_enter``, and each
completion writes that request's status and its used element (head and length: which
request finished, in completion order). A write is done at once with ``pwritev`` from
the same loop: io_uring would hand a buffered write to a worker thread wherever the
filesystem cannot write without blocking (ext4 on the development host), a thread hop
that costs more than the copy into the page cache. One interrupt per wake-up; no Python
runs per request. C also suppresses kicks while it walks and asks for them again when the
ring is empty (with the fence and the second look of Queue.enable_notification); before
that, if the driver turned interrupts off for what was just answered (it polls the used
ring), C watches the available ring for up to 5 µs, so its next request needs no kick.

A cow disk (blkimage.CowImage): C reads each request from the overlay or the image as
the overlay's sector map says (a copy of it, refreshed whenever Python has served a
request, since only Python changes it); a read with sectors in both, and every write
(it maps sectors), is left to Python.

Anything else is left in the ring (DEFER) and Python pops it and serves it with the
synchronous path's code (``BlockDevice._serve``), after everything before it has
completed: a chain that fails a guard raises the engine's typed error there, a bad
request gets its status and log line, and FLUSH's fdatasync comes after every earlier
write completed (virtio 1.2 §5.2.6.1) because nothing is in flight when C returns.

Ordering, as the synchronous path (one request after the other) defines it: writes are
done in order as they come, and a write overlapping a read in flight first waits until
the reads before it have completed, so every read sees exactly the writes before it.

A failed request fails only itself: a negative result is its S_IOERR; a short transfer
is finished synchronously from where it stopped (end of file is S_IOERR, as in the
synchronous path); C reports each error and Python logs it as the synchronous path
would. If io_uring itself fails (a submit error other than EINTR/EAGAIN), C finishes
the batch synchronously and the device drops the ring for good (one log line).
"""

from __future__ import annotations

import errno
import os
from array import array
from typing import TYPE_CHECKING, Any, Final

from ..virtio.queue import Queue
from .blk import ImageEnded
from .blkimage import CowImage
from .uring import Ring

if TYPE_CHECKING:
    from .blk import BlockDevice

# What mv_blk_run returns, and the kinds of its error records (uring_build.SOURCE)
EMPTY: Final = 0
DEFER: Final = 1
LIMIT: Final = 2
RINGFAIL: Final = 3
ERRORS: Final = 16  # or-ed in: out.errs holds errors to log
E_ERRNO: Final = 0
E_ENDED: Final = 1
E_NOBYTES: Final = 2


def _address(ffi: Any, view: memoryview) -> Any:
    """The host address of a guest-memory view, as a ``uint8_t *``, holding no export of
    the view (an export would keep the memory from being unmapped, and cffi's buffers
    in garbage cycles with memoryviews are not safe to collect). The address stays
    valid while the guest memory is mapped: from activation to reset or close, which
    call :meth:`BatchPath.release`."""
    with ffi.from_buffer(view) as buf:
        return ffi.cast("uint8_t *", ffi.cast("uintptr_t", buf))


class BatchPath:
    """The io_uring path of one BlockDevice (see the module docstring)."""

    __slots__ = ("_cow", "_dev", "_disk", "_ends", "_key", "_map_cap", "_mem", "_nmem",
                 "_out", "_q", "_ring", "_starts")

    def __init__(self, dev: BlockDevice, ring: Ring) -> None:
        self._dev = dev
        self._ring: Ring | None = ring
        ffi = ring.ffi
        self._q = ffi.new("struct mv_queue *")
        self._out = ffi.new("struct mv_out *")
        self._disk = ffi.new("struct mv_disk *")
        image = dev.image
        self._disk.fd = image.image_fd  # raw: read and written; cow: read only
        #: a cow disk: C reads from the overlay or the image as the sector map says and
        #: leaves writes (which change the map) to Python
        self._cow = image if isinstance(image, CowImage) else None
        self._disk.overlay_fd = self._cow.overlay_fd if self._cow is not None else -1
        self._starts: Any = None
        self._ends: Any = None
        self._map_cap = 0
        self._disk.read_only = int(dev.read_only)
        self._disk.capacity = dev.capacity
        self._key: tuple[object, object] | None = None  # (rings, memory) last set up
        self._mem: Any = None
        self._nmem = 0

    @property
    def active(self) -> bool:
        return self._ring is not None

    def close(self) -> None:
        self.release()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def release(self) -> None:
        """Forget the guest memory's addresses (set up again at the next drain): the
        device's reset and close call this, before the memory may be unmapped."""
        self._mem = None
        self._key = None

    def _setup(self, queue: Queue, ring: Ring) -> bool:
        """Point the C side at the queue's rings and the guest memory map (again only
        when either changed). False when the memory offers no map: the C loop needs
        the regions (gpa, writable view) that GuestMemory and FakeGuestMemory have."""
        rings = queue.rings()
        memory = self._dev.memory
        if self._key is not None and self._key[0] is rings and self._key[1] is memory:
            return self._mem is not None
        self._key = (rings, memory)
        self._mem = None
        regions = getattr(memory, "regions", None)
        views = [getattr(r, "view", None) for r in regions or ()]
        if not views or not all(isinstance(v, memoryview) and not v.readonly and v.nbytes
                                for v in views):
            return False
        ffi = ring.ffi
        q = self._q
        q.desc, q.avail, q.used = (_address(ffi, v) for v in rings)
        q.size = queue.size
        q.event_idx = int(queue.event_idx)
        mem = ffi.new("struct mv_region[]", len(views))
        for i, (r, v) in enumerate(zip(regions or (), views, strict=True)):
            mem[i].gpa = r.gpa
            mem[i].size = v.nbytes  # type: ignore[union-attr]
            mem[i].host = _address(ffi, v)  # type: ignore[arg-type]
        self._mem = mem
        self._nmem = len(views)
        return True

    def drain(self, queue: Queue) -> None:
        """Serve every available chain of ``queue``; one interrupt at the end (also when
        a broken chain stops the loop: its VirtQueueError goes on to ``contain``)."""
        dev = self._dev
        ring = self._ring
        assert ring is not None
        if not self._setup(queue, ring):
            dev.drain(queue, dev._serve)
            return
        run = ring.lib.mv_blk_run
        ptr = ring.ptr
        q = self._q
        out = self._out
        mem = self._mem
        nmem = self._nmem
        disk = self._disk
        first_used = queue.next_used
        cow = self._cow
        if cow is not None:
            self._sync_map(cow, ring)
        try:  # C suppresses kicks while it walks, and asks for them again when empty
            while True:
                q.next_avail = queue.next_avail
                q.next_used = queue.next_used
                rc = run(ptr, q, mem, nmem, disk, out)
                queue.advance(q.next_avail, q.next_used)
                if rc & ERRORS:
                    self._log_errors(out)
                    rc &= ~ERRORS
                if rc == EMPTY:
                    break
                if rc == DEFER:
                    chain = queue.pop()  # a bad chain raises its typed error here
                    if chain is None:  # only a guest rewriting its ring under us does it
                        queue.enable_notification()
                        break
                    with chain:
                        dev._serve(chain)
                    if cow is not None:  # a write, discard or write-zeroes maps sectors
                        self._sync_map(cow, ring)
                elif rc == RINGFAIL:
                    break
        finally:
            if queue.next_used != first_used:  # something was answered
                dev.signal_used(queue)
        if rc == RINGFAIL:
            dev.log("blk: io_uring failed under a batch; %s goes on with synchronous I/O",
                    dev.path)
            self.close()
            dev.drain(queue, dev._serve)

    def _sync_map(self, cow: CowImage, ring: Ring) -> None:
        """Give C the cow disk's sector map as it is now (two u64 arrays, copied at C
        speed: a few µs for a thousand ranges)."""
        starts, ends = cow.map.starts, cow.map.ends
        n = len(starts)
        disk = self._disk
        if n > self._map_cap:
            ffi = ring.ffi
            self._map_cap = max(64, 2 * n)
            self._starts = ffi.new("uint64_t[]", self._map_cap)
            self._ends = ffi.new("uint64_t[]", self._map_cap)
            disk.starts = self._starts
            disk.ends = self._ends
        if n:
            ring.ffi.memmove(self._starts, array("Q", starts), 8 * n)
            ring.ffi.memmove(self._ends, array("Q", ends), 8 * n)
        disk.nmap = n

    @property
    def batches(self) -> int:
        """io_uring batches run so far (--stats)."""
        return int(self._out.batches)

    @property
    def requests(self) -> int:
        """The reads and writes they carried."""
        return int(self._out.requests)

    def _log_errors(self, out: Any) -> None:
        dev = self._dev
        for i in range(out.nerr):
            e = out.errs[i]
            if e.kind == E_ENDED:
                dev.log("blk: %s", ImageEnded(e.offset))
                continue
            err = OSError(errno.EIO, "the image took no bytes") if e.kind == E_NOBYTES else (
                OSError(e.err, os.strerror(e.err)))
            dev.log("blk: I/O error on %s: %s", dev.path, err)
