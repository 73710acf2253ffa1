"""mem: from guest-physical ranges the driver published to host memoryviews.

The engine reaches guest memory only through an object with the ``translate`` method of
:class:`minivmm.memory.GuestMemory` (the :class:`GuestMemoryLike` protocol): a
``memoryview`` of exactly ``length`` bytes at ``gpa``, or
:class:`minivmm.memory.GuestMemoryError` when any byte lies outside guest RAM. This module
adds the overflow checks (a guest address is a u64; ``gpa + length`` must not pass 2^64)
and turns the memory error into the engine's typed errors. The descriptor walk in
:mod:`.queue` calls ``translate`` directly for speed, with the same checks inline.
"""

from __future__ import annotations

from typing import Protocol

from ..memory import GuestMemoryError
from .errors import RingOutsideMemory

__all__ = [
    "U64_LIMIT",
    "GuestMemoryError",
    "GuestMemoryLike",
    "in_u64",
    "low_window",
    "translate_ring",
]

U64_LIMIT = 1 << 64


class GuestMemoryLike(Protocol):
    """What the engine needs from guest memory (``GuestMemory`` and ``FakeGuestMemory``)."""

    def translate(self, gpa: int, length: int) -> memoryview:
        """``length`` bytes at ``gpa`` (zero-copy), or raise ``GuestMemoryError``."""
        ...


def in_u64(gpa: int, length: int) -> bool:
    """True when ``[gpa, gpa + length)`` is a range of the 64-bit guest-physical space."""
    return gpa >= 0 and length >= 0 and gpa + length <= U64_LIMIT


def low_window(mem: GuestMemoryLike) -> memoryview | None:
    """A writable view of the guest RAM that starts at guest-physical 0, if ``mem`` offers
    one (``mem.regions[0]`` with ``gpa == 0`` and a ``view``, as ``GuestMemory`` has).

    The descriptor walk slices it directly for buffers entirely below its end, which
    saves a method call per descriptor; everything else goes through ``translate``.
    Its caller must check ``gpa + length <= len(window)`` first: slicing a memoryview
    past its end silently shortens the slice instead of failing."""
    regions = getattr(mem, "regions", None)
    try:
        first = regions[0]  # type: ignore[index]
        view = first.view
        if first.gpa == 0 and isinstance(view, memoryview) and not view.readonly:
            return view.cast("B") if view.format != "B" else view
    except (TypeError, IndexError, AttributeError):
        pass
    return None


def translate_ring(
    mem: GuestMemoryLike, queue: int, part: str, gpa: int, length: int
) -> memoryview:
    """The view of one ring part, or :class:`RingOutsideMemory`."""
    if not in_u64(gpa, length):
        raise RingOutsideMemory(queue, part, gpa, length)
    try:
        view = mem.translate(gpa, length)
    except GuestMemoryError:
        raise RingOutsideMemory(queue, part, gpa, length) from None
    if len(view) != length or view.readonly:
        raise RingOutsideMemory(queue, part, gpa, length)
    return view
