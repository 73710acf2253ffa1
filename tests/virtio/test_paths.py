"""The walk's two paths agree on hostile input.

``Queue.pop`` slices buffers straight out of the low RAM window, and unpacks indirect
tables in place there, when they lie entirely inside it (the fast path); everything else
goes through ``translate`` (the slow path). A queue on a memory with no window takes the
slow path for everything. Here both queues walk the same random, mostly broken rings and
must give the same result for every pop: the same chain (head, buffers by guest address
and length, totals) or the same error, message included. The used ring they both write
must hold the same elements too.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minivmm.virtio import ring
from minivmm.virtio.errors import VirtQueueError
from minivmm.virtio.queue import Queue
from minivmm.virtio.testing import FakeDriver, FakeGuestMemory

from .queue_machine import LENGTHS, NoWindow

NEXT, WRITE, INDIRECT = ring.VIRTQ_DESC_F_NEXT, ring.VIRTQ_DESC_F_WRITE, ring.VIRTQ_DESC_F_INDIRECT
U64 = 2**64
HEAP = 64 << 10

Outcome = tuple[object, ...] | None


def outcome(q: Queue, fake: FakeGuestMemory) -> Outcome:
    """What one pop did, in terms that do not depend on the path; the chain is returned
    with half its writable bytes written, so the used rings can be compared too."""
    try:
        chain = q.pop()
    except VirtQueueError as e:
        return (type(e).__name__, str(e))
    if chain is None:
        return None
    with chain:
        r, w = chain.reader, chain.writer
        bufs = (
            [(fake.gpa_of(v), len(v)) for v in r.views()],
            [(fake.gpa_of(v), len(v)) for v in w.views()],
        )
        w.advance(w.total // 2)
    return (chain.head, r.total, w.total, *bufs)


def two_queues(drv: FakeDriver) -> tuple[Queue, Queue, FakeGuestMemory]:
    fake = drv.mem
    assert isinstance(fake, FakeGuestMemory)
    fast = drv.make_queue()
    drv.mem = NoWindow(fake)
    slow = drv.make_queue()
    drv.mem = fake
    return fast, slow, fake


@st.composite
def hostile_rings(draw: st.DrawFn) -> tuple[FakeDriver, int]:
    """A driver whose descriptor table, indirect tables and available ring are random,
    mostly near-valid: addresses in the heap, at region edges or anywhere in the u64
    space; tables in the heap at aligned or unaligned addresses."""
    size = draw(st.sampled_from([1, 2, 4, 8]))
    drv = FakeDriver(size=size, heap_size=HEAP)
    tables: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.integers(1, 6))
        gpa = drv.heap_start + draw(st.integers(0, HEAP - 16 * n))  # any alignment
        tables.append((gpa, 16 * n))
    addrs = st.one_of(
        st.integers(drv.heap_start, drv.heap_end),
        st.sampled_from(
            [0, drv.desc_addr, drv.hole_start - 16, drv.hole_start - 1, drv.hole_start,
             drv.hole_end - 8, drv.hole_end, drv.hole_end + (64 << 10) - 16, U64 - 1, U64 - 16]
        ),
        st.integers(0, U64 - 1),
        st.sampled_from([gpa for gpa, _ in tables] or [drv.heap_start]),
    )
    lengths = st.one_of(LENGTHS, st.sampled_from([n for _, n in tables] or [16]))
    flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
    ends = [drv.hole_start, drv.hole_end + (64 << 10), U64]  # where RAM or the space ends
    edge = st.builds(  # a range ending just before, at or just past one of those ends
        lambda end, k, d: (end - k, k + d),
        st.sampled_from(ends), st.integers(1, 48), st.integers(-1, 1),
    )
    ranges = st.one_of(st.tuples(addrs, lengths), edge)
    small = st.tuples(st.integers(drv.heap_start, drv.heap_end - 64), st.integers(0, 64))

    def mostly(sane: st.SearchStrategy[int], wild: st.SearchStrategy[int]) -> int:
        """Usually a value that lets the walk go on, so that later checks run too."""
        return draw(sane if draw(st.integers(0, 7)) else wild)

    def entry(limit: int) -> tuple[int, int, int, int]:
        nxt = mostly(st.integers(0, limit - 1), st.integers(0, 0xFFFF))
        f = mostly(st.sampled_from([0, NEXT, WRITE, WRITE | NEXT, INDIRECT]), flags)
        addr, length = draw(ranges if draw(st.booleans()) else small)
        return addr, length, f, nxt

    for index in range(size):
        drv.set_descriptor(index, *entry(size))
    for gpa, n in tables:
        for i in range(n // 16):
            drv.set_descriptor(i, *entry(n // 16), table=gpa)
    for slot in range(size):
        drv.set_avail_entry(slot, mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)))
    pops = draw(st.integers(1, 2 * size))
    drv.set_avail_idx(mostly(st.just(pops), st.integers(0, 0xFFFF)))
    return drv, pops


@settings(max_examples=400, deadline=None)
@given(hostile_rings())
def test_fast_and_slow_paths_agree(rings: tuple[FakeDriver, int]) -> None:
    drv, pops = rings
    fast, slow, fake = two_queues(drv)
    for _ in range(pops):
        a = outcome(fast, fake)
        used_after_fast = drv.read(drv.used_addr, ring.used_ring_size(drv.size))
        b = outcome(slow, fake)
        assert a == b
        assert drv.read(drv.used_addr, ring.used_ring_size(drv.size)) == used_after_fast
    assert (fast.next_avail, fast.next_used) == (slow.next_avail, slow.next_used)


@settings(max_examples=100, deadline=None)
@given(
    readable=st.lists(st.binary(min_size=1, max_size=40), max_size=3),
    writable=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    indirect=st.booleans(),
    misalign=st.integers(0, 15),
)
def test_honest_chains_agree_and_take_the_fast_path(
    readable: list[bytes], writable: list[int], indirect: bool, misalign: int
) -> None:
    """Valid chains (indirect tables at any alignment) come out the same both ways, and
    the window queue really takes the fast path: no ``translate`` call at all."""
    drv = FakeDriver(size=8, heap_size=HEAP)
    drv.alloc(misalign, 1)  # so the next table or buffer is not 16-aligned
    fast, slow, fake = two_queues(drv)
    bufs = [(drv.alloc(len(b), 1), len(b), 0) for b in readable]
    bufs += [(drv.alloc(n, 1), n, WRITE) for n in writable]
    for (gpa, _, _), data in zip(bufs, readable, strict=False):
        drv.write(gpa, data)
    entries = [
        (gpa, n, f | (NEXT if i + 1 < len(bufs) else 0), i + 1)
        for i, (gpa, n, f) in enumerate(bufs)
    ]
    if indirect:
        drv.alloc(misalign, 1)
        table = drv.alloc(16 * len(entries), 1)
        for i, e in enumerate(entries):
            drv.set_descriptor(i, *e, table=table)
        drv.set_descriptor(0, table, 16 * len(entries), INDIRECT, 0)
    else:
        for i, e in enumerate(entries):
            drv.set_descriptor(i, *e)
    drv.set_avail_entry(0, 0)
    drv.set_avail_idx(1)
    before = fake.translations
    a = outcome(fast, fake)
    assert fake.translations == before
    b = outcome(slow, fake)
    assert fake.translations > before
    assert a == b
    assert a is not None and a[0] == 0
    assert a[1] == sum(len(x) for x in readable) and a[2] == sum(writable)
