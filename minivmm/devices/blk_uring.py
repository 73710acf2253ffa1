"""blk_uring: the block device's batch path: a wake-up's requests through one io_uring.

Per wake-up (a kick), :meth:`BatchPath.drain` pops every available chain, checks each
with the same code as the synchronous path (``BlockDevice._parse``), and turns each
read or write into one SQE whose user_data is its index in this batch's ``pending``
list (not the head: a hostile driver may publish one head twice). Then one
``io_uring_enter`` submits them all and waits for all of them; each completion says
which request finished, and that chain gets its status and goes to the used ring.
Completion order is the kernel's; one interrupt per wake-up.

Ordering, as the synchronous path (one request after the other) defines it:
- a request that overlaps one in flight, where either writes, first waits for
  everything in flight (a *barrier*), so a read after a write of the same sectors in
  one batch sees the new data;
- FLUSH, DISCARD and WRITE_ZEROES are barriers too, then done synchronously: FLUSH's
  fdatasync comes after every earlier write completed (virtio 1.2 §5.2.6.1);
- a chain that fails its checks is answered at once (its status), without waiting for
  the batch; GET_ID is answered at once.

A failed request fails only itself: a negative result is its S_IOERR; a short transfer
is finished synchronously from where it stopped (``preadv``/``pwritev``: end of file is
S_IOERR, as in the synchronous path). If io_uring itself fails under a batch (a submit
error other than EINTR), the device drops the ring for good, logs it once, and redoes
every request of the batch that had not completed synchronously (a read or a write of
the same bytes again is harmless).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Final

from ..virtio.chain import DescriptorChain
from ..virtio.queue import Queue
from .base import IOV_MAX
from .blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkRequestError,
    NoStatusByte,
    read_into,
    write_from,
)
from .uring import ENTRIES, Ring, RingError

if TYPE_CHECKING:
    from .blk import BlockDevice

_IN: Final = VIRTIO_BLK_T_IN
_OUT: Final = VIRTIO_BLK_T_OUT
assert (_IN, _OUT) == (0, 1)  # the type doubles as the write flag of mv_prep
_MAX_INFLIGHT: Final = ENTRIES  # the completion queue (2x) can never overflow


class BatchPath:
    """The io_uring path of one BlockDevice (see the module docstring)."""

    __slots__ = ("_completed", "_dev", "_pending", "_ring", "_writes", "batches", "requests")

    def __init__(self, dev: BlockDevice, ring: Ring) -> None:
        self._dev = dev
        self._ring: Ring | None = ring
        #: this batch's requests by user_data: (chain, write, offset, length, iovecs)
        self._pending: list[tuple[DescriptorChain, int, int, int, Any]] = []
        self._writes = 0  # writes among them
        self._completed = 0  # chains returned to the used ring in this drain
        self.batches = 0  #: io_uring batches run (--stats)
        self.requests = 0  #: reads and writes they carried

    @property
    def active(self) -> bool:
        return self._ring is not None

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def drain(self, queue: Queue) -> None:
        """Serve every available chain of ``queue``; one interrupt at the end (also when
        a broken chain stops the loop: its VirtQueueError goes on to ``contain``)."""
        dev = self._dev
        ring = self._ring
        assert ring is not None
        ffi = ring.ffi
        prep = ring.lib.mv_prep
        ptr = ring.ptr
        from_buffer = ffi.from_buffer
        fd = dev._fd
        parse = dev._parse
        pending = self._pending
        self._completed = 0
        try:
            for chain in dev.available(queue):
                w = chain.writer
                if w.total == 0:
                    dev.log("blk: %s; returned unanswered", NoStatusByte())
                    self._answer(chain, -1)
                    continue
                r = chain.reader
                try:
                    kind, offset = parse(r, w)
                    if kind == _IN:
                        length = w.remaining - 1
                        views = w.views(length)
                    elif kind == _OUT:
                        length = r.remaining
                        views = r.views()
                    else:
                        if kind != VIRTIO_BLK_T_GET_ID:  # it touches the image: a barrier
                            self._finish()
                        dev._other(kind, r, w)
                        self._answer(chain, VIRTIO_BLK_S_OK)
                        continue
                except BlkRequestError as e:
                    dev.log("blk: %s", e)
                    self._answer(chain, e.status)
                    continue
                except OSError as e:
                    dev.log("blk: I/O error on %s: %s", dev.path, e)
                    self._answer(chain, VIRTIO_BLK_S_IOERR)
                    continue
                if not length:
                    self._answer(chain, VIRTIO_BLK_S_OK)
                    continue
                write = kind  # _OUT == 1, _IN == 0
                if pending and (write or self._writes) and self._overlaps(write, offset,
                                                                          length):
                    self._finish()
                if len(views) > IOV_MAX:  # a huge indirect table: the synchronous way
                    self._finish()
                    self._sync(chain, write, offset, length)
                    continue
                ud = len(pending)
                if len(views) == 1:
                    iov = None
                    rc = prep(ptr, write, fd, offset, from_buffer(views[0]), length, ud)
                else:
                    iov = ffi.new("struct iovec[]", len(views))
                    for i, v in enumerate(views):
                        iov[i].iov_base = from_buffer(v)
                        iov[i].iov_len = len(v)
                    rc = ring.lib.mv_prepv(ptr, write, fd, offset, iov, len(views), ud)
                pending.append((chain, write, offset, length, iov))
                self._writes += write
                if rc < 0:
                    raise RingError(-rc, os.strerror(-rc))
                if ud + 1 >= _MAX_INFLIGHT:
                    self._finish()
        except RingError as e:
            self._give_up(e)
        finally:
            try:
                if self._pending and self._ring is not None:
                    self._finish()
            except RingError as e:
                self._give_up(e)
            finally:
                if self._completed:
                    dev.signal_used(queue)
        if self._ring is None:  # given up under this batch: the rest the synchronous way
            dev.drain(queue, dev._serve)

    def _overlaps(self, write: int, offset: int, length: int) -> bool:
        end = offset + length
        for _, w, off, n, _ in self._pending:
            if (write or w) and off < end and offset < off + n:
                return True
        return False

    def _finish(self) -> None:
        """The barrier: submit what is prepared, wait until every pending request
        completed, answer each. Raises RingError if io_uring failed."""
        pending = self._pending
        if not pending:
            return
        ring = self._ring
        assert ring is not None
        run = ring.lib.mv_run
        ptr = ring.ptr
        uds = ring.user_data
        res = ring.res
        outstanding = len(pending)
        self.batches += 1
        self.requests += outstanding
        done = [False] * outstanding
        while outstanding:
            got = run(ptr, outstanding, uds, res, len(res))
            if got < 0:
                if got == -errno.EINTR or got == -errno.EAGAIN:
                    continue
                # Leave the unfinished ones in pending for _give_up.
                self._pending = [p for p, d in zip(pending, done, strict=True) if not d]
                raise RingError(-got, os.strerror(-got))
            for i in range(got):
                ud = uds[i]
                if not 0 <= ud < len(done) or done[ud]:
                    continue  # cannot happen: user_data is ours
                done[ud] = True
                outstanding -= 1
                self._complete(pending[ud], res[i])
        pending.clear()
        self._writes = 0

    def _complete(self, rec: tuple[DescriptorChain, int, int, int, Any], res: int) -> None:
        chain, write, offset, length, _ = rec
        if res == length:
            if not write:
                chain.writer.advance(length)
            self._answer(chain, 0)
            return
        if res < 0:
            dev = self._dev
            dev.log("blk: I/O error on %s: %s", dev.path, OSError(-res, os.strerror(-res)))
            self._answer(chain, 1)
            return
        # A short transfer: the rest the synchronous way, from where it stopped.
        if write:
            chain.reader.consume(res)
        else:
            chain.writer.advance(res)
        self._sync(chain, write, offset + res, length - res)

    def _sync(self, chain: DescriptorChain, write: int, offset: int, length: int) -> None:
        dev = self._dev
        try:
            if write:
                write_from(dev._fd, chain.reader, offset)
            else:
                read_into(dev._fd, chain.writer, offset)
            status = 0
        except BlkRequestError as e:
            dev.log("blk: %s", e)
            status = e.status
        except OSError as e:
            dev.log("blk: I/O error on %s: %s", dev.path, e)
            status = VIRTIO_BLK_S_IOERR
        self._answer(chain, status)

    def _answer(self, chain: DescriptorChain, status: int) -> None:
        """The status byte (the chain's last; none for -1) and the used ring."""
        if status >= 0:
            w = chain.writer
            if w.remaining > 1:
                w.advance(w.remaining - 1)
            w.write(_STATUS[status])
        chain.complete()
        self._completed += 1

    def _give_up(self, e: RingError) -> None:
        """io_uring failed: drop it for good and redo this batch's unfinished requests
        synchronously."""
        dev = self._dev
        dev.log("blk: io_uring failed (%s); %s goes on with synchronous I/O", e, dev.path)
        self.close()
        pending, self._pending = self._pending, []
        self._writes = 0
        for chain, write, offset, length, _ in pending:
            if chain.done:
                continue
            self._sync(chain, write, offset, length)


_STATUS: Final = (b"\x00", b"\x01", b"\x02")
