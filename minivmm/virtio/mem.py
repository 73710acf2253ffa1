"""mem: from guest-physical ranges the driver published to host memoryviews.

The engine reaches guest memory only through an object with a ``translate`` method (the
:class:`GuestMemoryLike` protocol, which :class:`minivmm.memory.GuestMemory` and
:class:`~minivmm.virtio.testing.FakeGuestMemory` implement): a ``memoryview`` of exactly
``length`` bytes at ``gpa``, or a ``LookupError`` (any subclass, e.g.
:class:`GuestRangeError` here or ``minivmm.memory.GuestMemoryError``) when any byte lies
outside guest RAM. The engine imports no memory implementation: ``LookupError`` is the
whole contract.

:func:`view_of` is the one rule for "is this range guest memory": it adds the overflow
checks (a guest address is a u64; ``gpa + length`` must not pass 2^64) and the length
check, and answers None for anything outside. The queue turns a None into its typed
errors (:class:`~.errors.RingOutsideMemory`, :class:`~.errors.DescriptorOutOfMemory`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = [
    "NO_WINDOW",
    "U64_LIMIT",
    "GuestMemoryLike",
    "GuestRangeError",
    "in_u64",
    "low_window",
    "view_of",
]

U64_LIMIT = 1 << 64


class GuestRangeError(LookupError):
    """A guest-physical range that is not (entirely) backed by guest RAM: what a
    ``translate`` raises (any ``LookupError`` will do; this one names the range)."""

    def __init__(self, gpa: int, length: int) -> None:
        super().__init__(f"guest range 0x{gpa:x}+0x{length:x} is not inside guest memory")
        self.gpa = gpa
        self.length = length


class GuestMemoryLike(Protocol):
    """What the engine needs from guest memory (``GuestMemory`` and ``FakeGuestMemory``)."""

    def translate(self, gpa: int, length: int) -> memoryview:
        """``length`` bytes at ``gpa`` (zero-copy), or raise a ``LookupError``."""
        ...


def in_u64(gpa: int, length: int) -> bool:
    """True when ``[gpa, gpa + length)`` is a range of the 64-bit guest-physical space."""
    return gpa >= 0 and length >= 0 and gpa + length <= U64_LIMIT


Translate = Callable[[int, int], memoryview]


def view_of(translate: Translate, gpa: int, length: int) -> memoryview | None:
    """The view of ``[gpa, gpa + length)`` through ``translate``, or None when the range
    is not entirely inside guest memory (or not inside the u64 space)."""
    if not in_u64(gpa, length):
        return None
    try:
        view = translate(gpa, length)
    except LookupError:
        return None
    return view if len(view) == length else None


NO_WINDOW = memoryview(b"")
"""The window of a memory that offers none: empty, so no buffer (length >= 1) fits."""


def low_window(mem: GuestMemoryLike) -> memoryview:
    """A writable view of the guest RAM that starts at guest-physical 0, if ``mem`` offers
    one (``mem.regions[0]`` with ``gpa == 0`` and a ``view``, as ``GuestMemory`` has), else
    :data:`NO_WINDOW`.

    The descriptor walk slices it directly for buffers entirely below its end, which
    saves a method call per descriptor; everything else goes through ``translate``.
    Its caller must check ``gpa + length <= len(window)`` first (and ``length > 0``):
    slicing a memoryview past its end silently shortens the slice instead of failing."""
    regions = getattr(mem, "regions", None)
    try:
        first = regions[0]  # type: ignore[index]
        view = first.view
        if first.gpa == 0 and isinstance(view, memoryview) and not view.readonly:
            return view.cast("B") if view.format != "B" else view
    except (TypeError, IndexError, AttributeError):
        pass
    return NO_WINDOW
