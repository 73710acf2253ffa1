"""The virtqueue engine's errors: one base class, one subclass per thing a guest can do wrong.

Every message says what the guest driver did, naming the queue and, where there is one,
the descriptor, so a rate-limited log line is enough to debug a broken driver. A device
that catches :class:`VirtQueueError` should set DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2)
or, for a single bad chain, answer it with an error status.

Programming errors of the device itself (returning a chain twice, a head that was never
popped) are ``ValueError``/``RuntimeError``, not guest errors.

:class:`VirtQueueError` is the engine's own root, deliberately not part of any VMM's error
tree: the engine is usable on its own and imports nothing outside this package. A VMM
decides what a guest protocol error means for it (minivmm: DEVICE_NEEDS_RESET and a
rate-limited log line, never an error shown to its user).
"""

from __future__ import annotations


class VirtQueueError(Exception):
    """Base class: the guest driver broke a rule of the split virtqueue (virtio 1.2 §2.7)."""

    def __init__(self, queue: int, message: str) -> None:
        super().__init__(f"queue {queue}: {message}")
        self.queue = queue


# --- queue configuration (checked when the transport activates the queue) ----------------


class InvalidQueueSize(VirtQueueError):
    """QueueNum is zero, not a power of two, above QueueNumMax or above 32768 (§2.7)."""

    def __init__(self, queue: int, size: int, max_size: int) -> None:
        super().__init__(
            queue,
            f"driver set queue size {size}; it must be a power of two between 1 and "
            f"{max_size} (the device's maximum)",
        )
        self.size = size


class MisalignedRing(VirtQueueError):
    """A ring address is not aligned as §2.7 requires (desc 16, avail 2, used 4)."""

    def __init__(self, queue: int, part: str, address: int, alignment: int) -> None:
        super().__init__(
            queue, f"driver put the {part} at 0x{address:x}, not aligned to {alignment} bytes"
        )
        self.address = address


class RingOutsideMemory(VirtQueueError):
    """A ring (descriptor table, available or used ring) is not entirely in guest RAM."""

    def __init__(self, queue: int, part: str, address: int, length: int) -> None:
        super().__init__(
            queue,
            f"driver put the {part} at 0x{address:x}+0x{length:x}, "
            "which is not entirely inside guest memory",
        )
        self.address = address


class QueueNotReady(VirtQueueError):
    """The device used a queue the driver has not made ready (or that was reset)."""

    def __init__(self, queue: int) -> None:
        super().__init__(queue, "used before the driver set QueueReady and the device activated it")


class InvalidAvailRingIndex(VirtQueueError):
    """The available index moved by more than the queue size: the queue is stopped."""

    def __init__(self, queue: int, avail_idx: int, next_avail: int, size: int) -> None:
        super().__init__(
            queue,
            f"driver moved the available index to {avail_idx} while the device was at "
            f"{next_avail}: {(avail_idx - next_avail) & 0xFFFF} new entries in a queue of "
            f"size {size}; the queue is stopped until reset",
        )
        self.avail_idx = avail_idx


# --- one descriptor chain (the chain is consumed; the queue keeps working) ---------------


class DescriptorError(VirtQueueError):
    """Base class of the errors in one descriptor chain.

    ``head`` is the chain's head index (always < queue size), so a device may return the
    chain to the used ring with length 0 if it wants the driver to get it back."""

    def __init__(self, queue: int, head: int, message: str) -> None:
        super().__init__(queue, f"chain at head {head}: {message}")
        self.head = head


def _where(index: int, table: str) -> str:
    return f"descriptor {index}" if table == "" else f"descriptor {index} of the {table}"


class InvalidDescriptorIndex(VirtQueueError):
    """An available-ring entry names a descriptor >= queue size."""

    def __init__(self, queue: int, slot: int, head: int, size: int) -> None:
        super().__init__(
            queue,
            f"available ring slot {slot} names descriptor {head}, beyond the queue size {size}",
        )
        self.head = head


class InvalidNextIndex(DescriptorError):
    """A descriptor's next field is >= the size of its table."""

    def __init__(
        self, queue: int, head: int, index: int, nxt: int, limit: int, table: str = ""
    ) -> None:
        bound = f"the queue size {limit}" if table == "" else f"the table length {limit}"
        super().__init__(queue, head, f"{_where(index, table)} has next={nxt}, beyond {bound}")


class DescriptorChainTooLong(DescriptorError):
    """More descriptors than the table holds: the chain loops (§2.7.5.2)."""

    def __init__(self, queue: int, head: int, limit: int, table: str = "") -> None:
        where = "descriptor table" if table == "" else table
        super().__init__(
            queue, head, f"chain is longer than the {limit} entries of its {where} (a loop)"
        )


class NestedIndirect(DescriptorError):
    """An indirect table contains an INDIRECT descriptor (§2.7.5.3.1)."""

    def __init__(self, queue: int, head: int, index: int) -> None:
        super().__init__(
            queue, head, f"descriptor {index} of an indirect table points to another table"
        )


class InvalidIndirectLength(DescriptorError):
    """An indirect table's length is zero, not a multiple of 16, or above 32768 entries."""

    def __init__(self, queue: int, head: int, index: int, length: int) -> None:
        super().__init__(
            queue,
            head,
            f"descriptor {index} points to an indirect table of {length} bytes; it must be a "
            "non-zero multiple of 16 of at most 32768 entries",
        )


class IndirectWithNext(DescriptorError):
    """A descriptor has both INDIRECT and NEXT set (§2.7.5.3.1 forbids it)."""

    def __init__(self, queue: int, head: int, index: int) -> None:
        super().__init__(queue, head, f"descriptor {index} has both INDIRECT and NEXT set")


class ChainLengthOverflow(DescriptorError):
    """The chain's buffers add up to more than 2^32 - 1 bytes (§2.7.4)."""

    def __init__(self, queue: int, head: int, total: int) -> None:
        super().__init__(queue, head, f"buffers add up to {total} bytes, over 2^32 - 1")


class DescriptorOutOfMemory(DescriptorError):
    """A buffer (or indirect table) is not entirely inside guest memory, or wraps 2^64."""

    def __init__(
        self, queue: int, head: int, index: int, address: int, length: int, table: str = ""
    ) -> None:
        super().__init__(
            queue,
            head,
            f"{_where(index, table)} points to 0x{address:x}+0x{length:x}, "
            "which is not entirely inside guest memory",
        )
        self.address = address
        self.length = length


class ReadableAfterWritable(DescriptorError):
    """A device-readable descriptor follows a device-writable one (§2.7.4.2)."""

    def __init__(self, queue: int, head: int, index: int, table: str = "") -> None:
        super().__init__(
            queue, head, f"{_where(index, table)} is device-readable but follows a writable one"
        )
