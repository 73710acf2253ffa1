"""The shared virtqueue engine: the device side of virtio split virtqueues.

Every minivmm virtio device talks to its guest driver through this package. It needs no
KVM and imports nothing of minivmm outside this package (tests/virtio/test_standalone.py
checks it): it works on any guest-memory object with ``translate(gpa, length) ->
memoryview`` that raises a ``LookupError`` for a range outside guest RAM, and its errors
have their own root, :class:`VirtQueueError`.

Layers, each a module, each using only those before it:

    errors   one base class, VirtQueueError, and one subclass per guest mistake
    mem      the guest-memory protocol; guest-physical ranges -> memoryviews, checked
    ring     the raw split-ring layout (virtio 1.2 §2.7): sizes, offsets, flags, structs,
             and the memory-ordering argument for single 16-bit index accesses
    chain    Reader and Writer (file-like streams over a chain's readable, then
             writable, buffers; zero-copy views for preadv/pwritev) and DescriptorChain,
             which returns itself to the used ring once (a ``with`` block)
    queue    Queue: configuration from the transport, pop (one walk that validates a
             chain, its descriptor table and an indirect table alike, and the one place
             chains are built), return_chain (the one used-ring publisher, behind
             add_used and every chain's completion), EVENT_IDX notification suppression
    util     BufferedNotify (batched interrupts) and ChainStream (asyncio chains)
    observe  ObservedQueue: reports chains popped, rejected and used to an observer (a
             trace, a driver checker); a queue nobody observes runs the code above untouched
    testing  FakeGuestMemory and FakeDriver: the guest side, for tests with no VM,
             able to break every rule on purpose

Features: VIRTIO_F_VERSION_1 split rings, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC.

What it does NOT do: packed rings (§2.8; they would sit next to ``ring``), any transport
(virtio-mmio registers, feature negotiation, device status, interrupts, ioeventfd: the
transport calls Queue's setters and ``activate``), any device logic, and threads: a
Queue is used by one thread at a time.

The guest is hostile: every index, address and length it controls is checked, and a
bad one raises a VirtQueueError subclass, never an IndexError, a hang or an access
outside guest memory.
"""

from .chain import DescriptorChain, Reader, Writer
from .errors import VirtQueueError
from .queue import Queue

__all__ = ["DescriptorChain", "Queue", "Reader", "VirtQueueError", "Writer"]
