"""Watching a virtio-mmio device from the driver's side: one hook for the trace
(``--trace virtio``, minivmm.trace) and the driver checker (``--check-driver``,
minivmm.check), costing nothing when neither is on.

:func:`observe` turns a built :class:`~minivmm.transport.mmio.MmioTransport` into an
:class:`ObservedTransport` by changing its class (and its interrupt's, and its queues'
through minivmm.virtio.observe); an unobserved transport runs the plain methods, with no
"is anybody watching" test on the exit path. The observed methods call the plain ones and
report to an :class:`Observer`:

    read(t, offset, size, value)            after every register or config read
    write(t, offset, size, value)           before every write (the state it meets)
    written(t, offset, size, value, old)    after it (``old``: Status before the write)
    needs_reset(t, reason)                  DEVICE_NEEDS_RESET set, and why
    interrupt(t, bits)                      InterruptStatus bits about to be raised (irqfd)
    chain_popped / chain_rejected / chain_used (t, queue, ...)   the queue engine's

Observers get the transport itself and read its state (``status``, the selectors, the
device's queues and features); ``t.label`` names the device (``rng@0xd0000000``). Calls
come from vCPU threads and the device thread: an observer locks what it shares.

Queue notifications of an observed device are not caught by KVM ioeventfds (the
placement skips them): they exit to minivmm as QueueNotify writes, so an observer sees
them in order with the other register accesses, at the cost of an exit per kick.
"""

from __future__ import annotations

from ..devices.base import VirtioDevice
from ..virtio.chain import DescriptorChain
from ..virtio.errors import VirtQueueError
from ..virtio.observe import observe as observe_queue
from ..virtio.queue import Queue
from .mmio import IrqfdInterrupt, MmioTransport

__all__ = ["ObservedTransport", "Observer", "Observers", "observe"]


class Observer:
    """The events of one observed transport; each does nothing here (override some)."""

    def read(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        pass

    def write(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        pass

    def written(self, t: ObservedTransport, offset: int, size: int, value: int,
                old_status: int) -> None:
        pass

    def needs_reset(self, t: ObservedTransport, reason: str) -> None:
        pass

    def interrupt(self, t: ObservedTransport, bits: int) -> None:
        pass

    def chain_popped(self, t: ObservedTransport, queue: Queue, chain: DescriptorChain) -> None:
        pass

    def chain_rejected(self, t: ObservedTransport, queue: Queue, error: VirtQueueError) -> None:
        pass

    def chain_used(self, t: ObservedTransport, queue: Queue, head: int, written: int) -> None:
        pass

    def close(self) -> None:
        """The VM ended: flush what is buffered."""


class Observers(Observer):
    """Several observers as one, called in order (the tracer before the checker, so that
    a trace shows a violation right after the access that committed it)."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers

    def read(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        for o in self.observers:
            o.read(t, offset, size, value)

    def write(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        for o in self.observers:
            o.write(t, offset, size, value)

    def written(self, t: ObservedTransport, offset: int, size: int, value: int,
                old_status: int) -> None:
        for o in self.observers:
            o.written(t, offset, size, value, old_status)

    def needs_reset(self, t: ObservedTransport, reason: str) -> None:
        for o in self.observers:
            o.needs_reset(t, reason)

    def interrupt(self, t: ObservedTransport, bits: int) -> None:
        for o in self.observers:
            o.interrupt(t, bits)

    def chain_popped(self, t: ObservedTransport, queue: Queue, chain: DescriptorChain) -> None:
        for o in self.observers:
            o.chain_popped(t, queue, chain)

    def chain_rejected(self, t: ObservedTransport, queue: Queue, error: VirtQueueError) -> None:
        for o in self.observers:
            o.chain_rejected(t, queue, error)

    def chain_used(self, t: ObservedTransport, queue: Queue, head: int, written: int) -> None:
        for o in self.observers:
            o.chain_used(t, queue, head, written)

    def close(self) -> None:
        for o in self.observers:
            o.close()


class ObservedTransport(MmioTransport):
    """An MmioTransport that reports to ``observer`` (made by :func:`observe`)."""

    observer: Observer
    label: str

    def tell(self, event: str, *args: object) -> None:
        """Report ``event`` to the observer. A failing observer is logged (rate-limited)
        and ignored: watching never changes what the guest sees."""
        try:
            getattr(self.observer, event)(self, *args)
        except Exception as e:
            self.log("%s: the %s observer failed on %s: %s: %s", self.label,
                     type(self.observer).__name__, event, type(e).__name__, e)

    def read(self, offset: int, data: memoryview) -> None:
        MmioTransport.read(self, offset, data)
        self.tell("read", offset, len(data), int.from_bytes(data, "little"))

    def write(self, offset: int, data: memoryview) -> None:
        value = int.from_bytes(data, "little")
        old = self.status
        self.tell("write", offset, len(data), value)
        MmioTransport.write(self, offset, data)
        self.tell("written", offset, len(data), value, old)

    def set_needs_reset(self, reason: str) -> None:
        MmioTransport.set_needs_reset(self, reason)
        self.tell("needs_reset", reason)


class _ObservedInterrupt(IrqfdInterrupt):
    transport: ObservedTransport

    def _raise(self, bits: int) -> None:
        # Told first: the guest's handler (another thread) may read InterruptStatus as
        # soon as the irqfd is signalled, and a trace keeps cause before effect.
        self.transport.tell("interrupt", bits)
        IrqfdInterrupt._raise(self, bits)


class _QueueEvents:
    """The engine's QueueObserver for one transport: adds the transport to each event."""

    __slots__ = ("t",)

    def __init__(self, t: ObservedTransport) -> None:
        self.t = t

    def chain_popped(self, queue: Queue, chain: DescriptorChain) -> None:
        self.t.tell("chain_popped", queue, chain)

    def chain_rejected(self, queue: Queue, error: VirtQueueError) -> None:
        self.t.tell("chain_rejected", queue, error)

    def chain_used(self, queue: Queue, head: int, written: int) -> None:
        self.t.tell("chain_used", queue, head, written)


def observe(transport: MmioTransport, observer: Observer, label: str = "") -> ObservedTransport:
    """Report everything ``transport`` and its device's queues do to ``observer`` from
    now on; ``label`` names the device in what observers print (default: its name)."""
    transport.__class__ = ObservedTransport
    assert isinstance(transport, ObservedTransport)
    transport.observer = observer
    transport.label = label or transport.device.name
    device: VirtioDevice = transport.device
    device.on_needs_reset = transport.set_needs_reset  # now the observed method
    interrupt = transport.interrupt
    interrupt.__class__ = _ObservedInterrupt
    assert isinstance(interrupt, _ObservedInterrupt)
    interrupt.transport = transport
    events = _QueueEvents(transport)
    for q in device.queues:
        observe_queue(q, events)
    return transport
