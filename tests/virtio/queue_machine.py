"""A Hypothesis state machine: a FakeDriver that sometimes cheats, and a device popping.

Random driver operations (publishing direct and indirect chains, notifications) are
interleaved with random corruption of the descriptor table, indirect tables, the
available ring and its index, and queue resets. Invariants, checked on every step:

* only VirtQueueError subclasses escape the engine (anything else fails the test);
* every head the device returns was made available (and is < size), and lands in the
  used ring as the device's own index says;
* every buffer view handed to the device lies inside the fake guest memory and has the
  length its descriptor gave; the engine never writes the descriptor table or the
  available ring;
* work per call is bounded: a pop translates at most size + 1 + 32768 ranges.

Used by test_stateful.py (CI-sized) and fuzz_queue.py (long runs).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from minivmm.virtio import ring
from minivmm.virtio.chain import DescriptorChain
from minivmm.virtio.errors import VirtQueueError
from minivmm.virtio.queue import Queue
from minivmm.virtio.testing import FakeDriver, FakeGuestMemory


class NoWindow:
    """Guest memory with only ``translate``: every buffer goes through it (and counts)."""

    def __init__(self, mem: FakeGuestMemory) -> None:
        self.inner = mem

    def translate(self, gpa: int, length: int) -> memoryview:
        return self.inner.translate(gpa, length)


U64 = 2**64


def interesting_addrs(drv: FakeDriver) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(drv.heap_start, drv.heap_end),
        st.sampled_from(
            [0, drv.desc_addr, drv.avail_addr, drv.used_addr, drv.hole_start - 8,
             drv.hole_start, drv.hole_end - 8, drv.hole_end, drv.hole_end + (64 << 10) - 4,
             U64 - 1, U64 - 16, 1 << 40]
        ),
        st.integers(0, U64 - 1),
    )


LENGTHS = st.one_of(
    st.integers(0, 64), st.sampled_from([16, 32, 48, 2**31, 2**32 - 1, 2**32 - 16, 1 << 20])
)
MAX_POP_TRANSLATIONS_EXTRA = 1 + ring.MAX_QUEUE_SIZE

#: Called with the name of each pop outcome, besides Hypothesis's ``event`` (fuzz_queue.py
#: counts them).
outcome_observers: list[Callable[[str], None]] = []


def outcome(name: str) -> None:
    event(name)
    for observe in outcome_observers:
        observe(name)


class QueueMachine(RuleBasedStateMachine):
    drv: FakeDriver
    fake: FakeGuestMemory
    q: Queue

    @initialize(
        size=st.sampled_from([2, 4, 8, 16]),
        event_idx=st.booleans(),
        window=st.booleans(),
    )
    def setup(self, size: int, event_idx: bool, window: bool) -> None:
        self.size = size
        self.event_idx = event_idx
        self.window = window
        self.q = Queue(16, index=1)
        self.held: list[tuple[DescriptorChain, int]] = []  # chain, generation it came from
        self.generation = 0
        self._new_driver()

    def _new_driver(self) -> None:
        drv = FakeDriver(size=self.size, event_idx=self.event_idx, heap_size=256 << 10)
        self.fake = drv.mem  # type: ignore[assignment]
        if not self.window:
            drv.mem = NoWindow(self.fake)
        self.drv = drv
        self.offered: set[int] = set()
        drv.configure(self.q)
        self.generation += 1
        self.snapshot()

    def snapshot(self) -> None:
        """What only the driver may change: the descriptor table and the available ring."""
        self.shadow = (
            self.drv.read(self.drv.desc_addr, ring.desc_table_size(self.size)),
            self.drv.read(self.drv.avail_addr, ring.avail_ring_size(self.size)),
        )

    def offer_all_slots(self) -> None:
        for slot in range(self.size):
            gpa = self.drv.avail_addr + ring.RING_OFFSET + 2 * slot
            self.offered.add(int.from_bytes(self.drv.read(gpa, 2), "little"))

    # --- the driver, playing by the rules ---------------------------------------------------

    @rule(
        readable=st.lists(st.binary(min_size=0, max_size=40), max_size=3),
        writable=st.lists(st.integers(0, 40), max_size=3),
        indirect=st.booleans(),
        count=st.integers(1, 3),
    )
    def publish_some(
        self, readable: list[bytes], writable: list[int], indirect: bool, count: int
    ) -> None:
        for _ in range(count):
            self.publish(readable, writable, indirect)

    def publish(self, readable: list[bytes], writable: list[int], indirect: bool) -> None:
        if not readable and not writable:
            writable = [8]
        if len(readable) + len(writable) > self.size:
            indirect = True
        try:
            head = self.drv.publish(readable, writable, indirect=indirect)
        except MemoryError:
            return  # the fake driver is out of descriptors or heap: a no-op
        self.offered.add(head)
        self.snapshot()

    @rule(value=st.integers(0, 0xFFFF), no_interrupt=st.booleans())
    def driver_notification_fields(self, value: int, no_interrupt: bool) -> None:
        self.drv.set_used_event(value)
        self.drv.set_no_interrupt(no_interrupt)
        self.snapshot()

    @rule()
    def driver_collects(self) -> None:
        self.drv.used()

    # --- the driver, cheating -------------------------------------------------------------

    @rule(
        data=st.data(),
        chains=st.integers(1, 3),
        kind=st.one_of(st.none(), st.integers(0, 4)),
        payload=st.binary(max_size=24),
    )
    def round_trip(
        self, data: st.DataObject, chains: int, kind: int | None, payload: bytes
    ) -> None:
        """Publish a few chains, maybe cheat once, then let the device drain the ring."""
        for _ in range(chains):
            self.publish(
                data.draw(st.lists(st.binary(max_size=24), max_size=2)),
                data.draw(st.lists(st.integers(0, 24), min_size=1, max_size=2)),
                data.draw(st.booleans()),
            )
        if kind is not None:
            self.cheat(data, kind)
        for _ in range(self.size + 1):
            if not self.device_pop(16, payload, False):
                break

    @rule(data=st.data(), kind=st.integers(0, 4))
    def cheat(self, data: st.DataObject, kind: int) -> None:
        """One random rule-breaking write (one rule, so honest steps stay the majority)."""
        [
            self.corrupt_descriptor,
            self.corrupt_indirect_table,
            self.corrupt_avail_entry,
            self.move_avail_idx,
            self.scribble_on_rings,
        ][kind](data)

    def corrupt_descriptor(self, data: st.DataObject) -> None:
        live = sorted(i for descs in self.drv.chain_descriptors().values() for i in descs)
        if live and data.draw(st.integers(0, 4)) != 0:
            index = data.draw(st.sampled_from(live))  # usually one the device will walk
        else:
            index = data.draw(st.integers(0, self.size - 1))
        addr, length, flags, nxt = self.drv.descriptor(index)
        field = data.draw(st.sampled_from(["addr", "len", "flags", "next", "all"]))
        if field in ("addr", "all"):
            addr = data.draw(interesting_addrs(self.drv))
        if field in ("len", "all"):
            length = data.draw(LENGTHS)
        if field in ("flags", "all"):
            flags = data.draw(st.integers(0, 7))
        if field in ("next", "all"):
            nxt = data.draw(st.one_of(st.integers(0, self.size + 1), st.integers(0, 0xFFFF)))
        self.drv.set_descriptor(index, addr, length, flags, nxt)
        self.snapshot()

    def corrupt_indirect_table(self, data: st.DataObject) -> None:
        """Rewrite an entry of a table some descriptor points to (if it is in the heap)."""
        for index in range(self.size):
            addr, length, flags, _ = self.drv.descriptor(index)
            if flags & ring.VIRTQ_DESC_F_INDIRECT and length >= 16 and (
                self.drv.heap_start <= addr and addr + length <= self.drv.heap_end
            ):
                entry = data.draw(st.integers(0, length // 16 - 1))
                self.drv.set_descriptor(
                    entry,
                    data.draw(interesting_addrs(self.drv)),
                    data.draw(LENGTHS),
                    data.draw(st.integers(0, 7)),
                    data.draw(st.integers(0, length // 16 + 1)),
                    table=addr,
                )
                return

    def corrupt_avail_entry(self, data: st.DataObject) -> None:
        slot = data.draw(st.integers(0, 15))
        head = data.draw(st.one_of(st.integers(0, self.size), st.integers(0, 0xFFFF)))
        self.drv.set_avail_entry(slot, head)
        self.offered.add(head)
        self.snapshot()

    def move_avail_idx(self, data: st.DataObject) -> None:
        small = st.integers(1, self.size + 1)
        delta = data.draw(st.one_of(small, small, st.integers(1, 40), st.integers(0x7FF0, 0xFFFF)))
        self.offer_all_slots()
        self.drv.set_avail_idx(self.drv.avail_idx + delta)
        self.snapshot()

    def scribble_on_rings(self, draw: st.DataObject) -> None:
        offset = draw.draw(st.integers(0, 1 << 16))
        data = draw.draw(st.binary(min_size=1, max_size=8))
        """Random bytes anywhere in the three rings (the used ring included)."""
        span = self.drv.heap_start - self.drv.desc_addr - len(data)
        self.drv.write(self.drv.desc_addr + offset % span, data)
        self.offer_all_slots()
        self.snapshot()

    @rule()
    def reset(self) -> None:
        self.q.reset()
        self._new_driver()

    # --- the device -------------------------------------------------------------------------

    def _check_views(self, chain: DescriptorChain) -> bool:
        """Views inside guest RAM, as long as their descriptors say; returns whether a
        writable one overlaps the descriptor table or available ring (a driver may
        ask for that, and then the device legitimately writes there)."""
        overlap = False
        for part in (chain.reader, chain.writer):
            views = part.views()
            assert sum(v.nbytes for v in views) == part.remaining == part.total
            for v in views:
                gpa = self.fake.gpa_of(v)  # raises unless inside guest RAM
                if part is chain.writer:
                    overlap |= gpa < self.drv.used_addr and gpa + v.nbytes > self.drv.desc_addr
        return overlap

    @rule(
        count=st.integers(1, 4),
        reads=st.integers(0, 50),
        payload=st.binary(max_size=50),
        hold=st.booleans(),
    )
    def device_serves(self, count: int, reads: int, payload: bytes, hold: bool) -> None:
        for _ in range(count):
            if not self.device_pop(reads, payload, hold and count == 1):
                break

    def device_pop(self, reads: int, payload: bytes, hold: bool) -> bool:
        """One pop; False when the ring was empty or the queue is stopped."""
        before = self.fake.translations
        try:
            chain = self.q.pop()
        except VirtQueueError as e:
            outcome(f"pop raised {type(e).__name__}")
            return self.q.broken is None
        finally:
            assert self.fake.translations - before <= self.size + MAX_POP_TRANSLATIONS_EXTRA
        if chain is None:
            outcome("pop: ring empty")
            return False
        outcome("pop: a chain")
        assert 0 <= chain.head < self.size and chain.head in self.offered
        overlap = self._check_views(chain)
        chain.reader.read(reads)
        chain.writer.write(payload)
        if overlap:
            self.snapshot()
        if hold:
            self.held.append((chain, self.generation))
        else:
            self._complete(chain, self.generation)
        return True

    @rule(data=st.data())
    def device_completes_held(self, data: st.DataObject) -> None:
        if self.held:
            chain, generation = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
            self._complete(chain, generation)

    def _complete(self, chain: DescriptorChain, generation: int) -> None:
        used_before = self.q.next_used if self.q.is_active() else None
        with chain:
            pass
        if generation != self.generation or used_before is None:
            assert self.q.next_used == used_before or used_before is None  # dropped
            return
        slot = used_before % self.size
        gpa = self.drv.used_addr + ring.RING_OFFSET + ring.USED_ELEM_SIZE * slot
        head, length = ring.USED_ELEM.unpack(self.drv.read(gpa, 8))
        assert (head, length) == (chain.head, chain.writer.written)
        assert self.drv.used_idx == self.q.next_used == (used_before + 1) & 0xFFFF

    @rule()
    def device_notifications(self) -> None:
        try:
            self.q.needs_notification()
            self.q.disable_notification()
            self.q.enable_notification()
        except VirtQueueError:
            pass

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def device_wrote_nothing_the_driver_owns(self) -> None:
        if hasattr(self, "shadow"):
            desc, avail = self.shadow
            assert self.drv.read(self.drv.desc_addr, len(desc)) == desc
            assert self.drv.read(self.drv.avail_addr, len(avail)) == avail

    @invariant()
    def broken_only_by_an_index_jump(self) -> None:
        if hasattr(self, "q") and self.q.broken is not None:
            assert type(self.q.broken).__name__ == "InvalidAvailRingIndex"
            try:
                self.q.pop()
            except VirtQueueError as e:
                assert e is self.q.broken  # stays stopped
            else:
                raise AssertionError("a broken queue popped a chain")

