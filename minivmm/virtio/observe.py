"""observe: watching a queue's data path (a trace, a driver checker), at no cost when off.

A :class:`Queue` carries one unused slot, ``observer``. :func:`observe` turns a queue into
an :class:`ObservedQueue` (same layout, so only its class changes) whose ``pop`` and
``return_chain`` report to a :class:`QueueObserver` around the engine's own code: every
chain popped, every chain the engine rejected (with its typed VirtQueueError, which names
the rule, so no rule is checked twice), and every used element. Accelerators (blk's
io_uring path, net's C loops) leave an observed queue to that Python path
(``Queue.accelerable``). A queue that is never
observed runs the engine's methods untouched: not even a test for "is anybody
watching".

Like the rest of the engine, this module imports nothing of minivmm outside the package.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from .chain import DescriptorChain
from .errors import VirtQueueError
from .mem import Translate, view_of
from .queue import Queue
from .ring import DESC, DESC_SIZE, MAX_QUEUE_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT

__all__ = ["ObservedQueue", "QueueObserver", "descriptors", "observe"]

Descriptor = tuple[int, int, int, int]
"""(addr, len, flags, next) of one descriptor, as the driver wrote it."""


class QueueObserver(Protocol):
    """What an observed queue reports (called on the thread that works the queue)."""

    def chain_popped(self, queue: Queue, chain: DescriptorChain) -> None: ...

    def chain_rejected(self, queue: Queue, error: VirtQueueError) -> None: ...

    def chain_used(self, queue: Queue, head: int, written: int) -> None: ...


class ObservedQueue(Queue):
    """A Queue that reports to ``self.observer`` (see the module docstring)."""

    __slots__ = ()
    observer: QueueObserver
    accelerable: ClassVar[bool] = False  # devices serve it through pop, in Python

    def pop(self) -> DescriptorChain | None:
        stopped = self.broken
        try:
            chain = Queue.pop(self)
        except VirtQueueError as e:
            if e is not stopped:  # a stopped queue raises its error again: reported once
                self.observer.chain_rejected(self, e)
            raise
        if chain is not None:
            self.observer.chain_popped(self, chain)
        return chain

    def return_chain(self, head: int, written: int, generation: int) -> None:
        current = generation == self._generation
        Queue.return_chain(self, head, written, generation)
        if current:  # a chain from before a reset is dropped, not used
            self.observer.chain_used(self, head, written)


def observe(queue: Queue, observer: QueueObserver) -> None:
    """Report ``queue``'s chains to ``observer`` from now on."""
    queue.__class__ = ObservedQueue
    assert isinstance(queue, ObservedQueue)
    queue.observer = observer


def descriptors(queue: Queue, head: int, translate: Translate) -> list[tuple[Descriptor, bool]]:
    """The descriptors of the chain at ``head`` as the driver wrote them, each with whether
    it sits in an indirect table, read again from guest memory (for a trace: the engine
    has walked and checked the chain already). ``translate`` is the guest memory's.
    A descriptor that can't be read ends the list."""
    out: list[tuple[Descriptor, bool]] = []
    size = queue.size
    table = view_of(translate, queue.desc_table_address, size * DESC_SIZE)
    if table is None:
        return out
    index, limit, inside = head, size, False
    while len(out) < size + MAX_QUEUE_SIZE and 0 <= index < limit:
        d: Descriptor = DESC.unpack_from(table, index * DESC_SIZE)
        out.append((d, inside))
        addr, length, flags, nxt = d
        if flags & VIRTQ_DESC_F_INDIRECT and not inside:
            limit = length // DESC_SIZE
            table = view_of(translate, addr, limit * DESC_SIZE)
            if table is None or not limit:
                break
            index, inside = 0, True
            continue
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        index = nxt
    return out
