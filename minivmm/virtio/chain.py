"""chain: one descriptor chain as a device sees it, read and written like a binary file.

A chain (virtio 1.2 §2.7.5) is a device-readable part followed by a device-writable part.
:meth:`Queue.pop <minivmm.virtio.queue.Queue.pop>` walks and validates the descriptors
once and hands over a :class:`DescriptorChain` holding zero-copy memoryviews of the
buffers: ``chain.reader`` streams the readable part, ``chain.writer`` the writable part.
Neither seeks; both expose their remaining views for ``os.preadv``/``os.pwritev``/
``socket.recvmsg_into`` (then ``consume``/``advance`` record what that did).

The guest may change its buffers while the device reads them: ``read``/``readinto`` copy,
so a device parses headers from its own copy and never reads the same guest field twice.

A chain returns itself to the used ring exactly once, with the writer's position as the
used length: at the end of a ``with`` block (also when the block raises) or by
:meth:`DescriptorChain.complete`. A chain popped before a queue reset is dropped on
completion instead of being written into the re-initialised ring.

This module knows nothing about rings. The queue builds every chain in one place, the end
of the walk in :meth:`Queue.pop <minivmm.virtio.queue.Queue.pop>`, by filling the slots
declared here (no ``__init__``: on the hottest path a Python call per object would cost
more than the rest of the construction), and takes it back through :class:`ChainOwner`.
"""

from __future__ import annotations

import struct
from types import TracebackType
from typing import Any, Protocol, TypeVar

BytesLike = bytes | bytearray | memoryview
"""What ``write`` accepts and ``readinto`` fills."""

__all__ = ["NO_READER", "NO_WRITER", "BytesLike", "ChainOwner", "DescriptorChain", "Reader",
           "Writer"]


class ChainOwner(Protocol):
    """What a chain needs from its queue: a way to return itself to the used ring."""

    def return_chain(self, head: int, written: int, generation: int) -> None: ...


def _copy(views: list[memoryview], i: int, off: int, buf: memoryview, n: int,
          to_guest: bool) -> tuple[int, int]:
    """Copy ``n`` bytes between ``buf`` and the views from (view ``i``, offset ``off``)
    on, into the guest or out of it; returns the new (view, offset). The caller has
    checked that ``n`` bytes remain."""
    done = 0
    while done < n:
        v = views[i]
        take = min(len(v) - off, n - done)
        if to_guest:
            v[off : off + take] = buf[done : done + take]
        else:
            buf[done : done + take] = v[off : off + take]
        done += take
        off += take
        if off == len(v):
            i += 1
            off = 0
    return i, off


class _Stream:
    """What Reader and Writer share: a position in a list of guest buffers."""

    __slots__ = ("_i", "_off", "_views", "remaining", "total")
    # No __init__: Queue.pop fills the slots (see the module docstring).
    _views: list[memoryview]  # the part's buffers, none of them empty
    _i: int  # the current view
    _off: int  # the position inside it
    total: int
    """Bytes in this part of the chain."""
    remaining: int
    """Bytes not read (written) yet."""

    def views(self, n: int = -1) -> list[memoryview]:
        """The part after the position (at most ``n`` bytes) as guest memoryviews, for
        ``pwritev``/``sendmsg`` (Reader) or ``preadv``/``recvmsg_into`` (Writer); the
        position does not move (``consume``/``advance`` after)."""
        if n < 0 or n > self.remaining:
            n = self.remaining
        i = self._i
        views = self._views
        if i < len(views) and self._off == 0 and len(views[i]) == n:
            return [views[i]]  # the common case: exactly the next buffer
        off = self._off
        out: list[memoryview] = []
        while n > 0 and i < len(views):
            v = views[i]
            take = min(len(v) - off, n)
            out.append(v[off : off + take])
            n -= take
            i += 1
            off = 0
        return out

    def _skip(self, n: int) -> None:
        """Move the position past ``n`` bytes, used through :meth:`views`."""
        rem = self.remaining
        if n < 0 or n > rem:
            raise ValueError(f"cannot move past {n} bytes: {rem} remain")
        self.remaining = rem - n
        views = self._views
        i = self._i
        off = self._off + n
        if i < len(views) and off == len(views[i]):  # the common case: a whole buffer
            self._i = i + 1
            self._off = 0
            return
        while i < len(views) and off >= len(views[i]):
            off -= len(views[i])
            i += 1
        self._i = i
        self._off = off


class Reader(_Stream):
    """The device-readable part of a chain, as a read-only binary stream."""

    __slots__ = ()

    consume = _Stream._skip
    """Move past ``n`` bytes read through :meth:`views` (``ValueError`` beyond the end)."""

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left if ``n`` < 0), copied out of guest memory.
        The guest chose the length: cap ``n`` for anything but small headers."""
        rem = self.remaining
        if n < 0 or n > rem:
            n = rem
        i = self._i
        views = self._views
        if i < len(views):
            v = views[i]
            off = self._off
            end = off + n
            lv = len(v)
            if end < lv:  # the common cases: inside the current buffer, or up to its end
                self._off = end
            elif end == lv:
                self._i = i + 1
                self._off = 0
            else:
                buf = bytearray(n)
                self.readinto(buf)
                return bytes(buf)
            self.remaining = rem - n
            return v[off:end].tobytes()
        return b""

    def read_struct(self, fmt: struct.Struct) -> tuple[Any, ...]:
        """Read ``fmt.size`` bytes and unpack them: one copy, straight from guest memory
        (e.g. a virtio-blk request header). ``EOFError`` if fewer bytes remain."""
        n = fmt.size
        rem = self.remaining
        if n > rem:
            raise EOFError(f"{n}-byte {fmt.format!r} wanted, {rem} bytes left in the chain")
        if not n:
            return fmt.unpack(b"")  # a zero-size struct
        i = self._i
        v = self._views[i]  # bytes remain, so a (non-empty) view does
        off = self._off
        end = off + n
        lv = len(v)
        if end < lv:
            self._off = end
        elif end == lv:
            self._i = i + 1
            self._off = 0
        else:
            return fmt.unpack(self.read(n))
        self.remaining = rem - n
        return fmt.unpack_from(v, off)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` from the chain; returns the number of bytes copied."""
        dst = memoryview(buffer).cast("B")
        want = min(len(dst), self.remaining)
        self._i, self._off = _copy(self._views, self._i, self._off, dst, want, False)
        self.remaining -= want
        return want


class Writer(_Stream):
    """The device-writable part of a chain, as a write-only binary stream.

    ``written`` (the position) is what the used ring reports to the driver."""

    __slots__ = ()

    advance = _Stream._skip
    """Record ``n`` bytes written through :meth:`views` (``ValueError`` beyond the end)."""

    @property
    def written(self) -> int:
        """Bytes written so far: the position, and the used length the driver will see."""
        return self.total - self.remaining

    def write(self, data: BytesLike) -> int:
        """Copy as much of ``data`` as fits; returns the number of bytes written (check it:
        a short count means the driver's buffers were too small)."""
        if type(data) is not bytes:
            data = memoryview(data)
            if data.format != "B" or data.ndim != 1:
                data = data.cast("B")
        n = len(data)
        views = self._views
        i = self._i
        rem = self.remaining
        if n and n <= rem:  # then views[i] exists: bytes remain
            v = views[i]
            off = self._off
            end = off + n
            lv = len(v)
            if end <= lv:  # the common case: inside the current buffer
                v[off:end] = data
                if end == lv:
                    self._i = i + 1
                    self._off = 0
                else:
                    self._off = end
                self.remaining = rem - n
                return n
        n = min(n, rem)
        self._i, self._off = _copy(views, i, self._off, memoryview(data), n, True)
        self.remaining = rem - n
        return n


_S = TypeVar("_S", Reader, Writer)


class DescriptorChain:
    """One available chain: ``head``, ``reader``, ``writer``; returns itself once.

    Built by the queue's ``pop``, not by calling the class."""

    __slots__ = ("_generation", "_owner", "head", "reader", "writer")
    _owner: ChainOwner | None  # None once returned to the used ring
    _generation: int
    head: int
    """The head descriptor index: the id the used ring reports."""
    reader: Reader
    writer: Writer

    @property
    def done(self) -> bool:
        """True once the chain has been returned to the used ring."""
        return self._owner is None

    def complete(self, written: int | None = None) -> None:
        """Return the chain to the used ring with ``written`` bytes (default: the writer's
        position). Raises ``RuntimeError`` if it was already returned."""
        owner = self._owner
        if owner is None:
            raise RuntimeError(f"chain {self.head} was already returned to the used ring")
        w = self.writer
        if written is None:
            written = w.total - w.remaining
        elif not 0 <= written <= w.total:
            raise ValueError(f"written={written} is outside 0..{w.total}")
        self._owner = None
        owner.return_chain(self.head, written, self._generation)

    def __enter__(self) -> DescriptorChain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        owner = self._owner
        if owner is not None:
            self._owner = None
            w = self.writer
            owner.return_chain(self.head, w.total - w.remaining, self._generation)

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} readable={self.reader.total} "
            f"writable={self.writer.total}{' done' if self._owner is None else ''}>"
        )


def _empty(stream: type[_S]) -> _S:
    s = stream()
    s._views = []
    s._i = s._off = s.total = s.remaining = 0
    return s


NO_READER = _empty(Reader)
"""The Reader of every chain with no readable bytes. A stream over no bytes has no state any
method can change (every position is 0 and stays 0), so one is shared: that spares an
object per chain on the paths with one part only (virtio-rng, net transmit)."""
NO_WRITER = _empty(Writer)
"""The Writer of every chain with no writable bytes (shared, as NO_READER)."""
