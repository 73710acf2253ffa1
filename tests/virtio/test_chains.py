"""Descriptor chains: walking, reading and writing, and every guest mistake in a chain."""

from __future__ import annotations

import struct

import pytest

from minivmm.virtio.errors import (
    ChainLengthOverflow,
    DescriptorChainTooLong,
    DescriptorError,
    DescriptorOutOfMemory,
    IndirectWithNext,
    InvalidAvailRingIndex,
    InvalidDescriptorIndex,
    InvalidIndirectLength,
    InvalidNextIndex,
    NestedIndirect,
    ReadableAfterWritable,
    VirtQueueError,
)
from minivmm.virtio.queue import Queue
from minivmm.virtio.ring import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from minivmm.virtio.testing import FakeDriver, FakeGuestMemory, UsedElem

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def setup(size: int = 8) -> tuple[FakeDriver, Queue]:
    drv = FakeDriver(size=size)
    return drv, drv.make_queue()


def still_works(drv: FakeDriver, q: Queue) -> None:
    """After a bad chain the queue keeps serving good ones."""
    drv.used()
    head = drv.publish([b"ok"], [2])
    with q.pop() as c:  # type: ignore[union-attr]
        c.writer.write(c.reader.read())
    assert drv.used()[-1] == UsedElem(head, 2, b"ok")


# --- good chains -------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_readable_then_writable_parts(indirect: bool) -> None:
    drv, q = setup()
    head = drv.publish([b"abc", b"defgh"], [2, 6], indirect=indirect)
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert (chain.reader.total, chain.writer.total) == (8, 8)
    assert chain.reader.read(2) == b"ab"
    assert chain.reader.read(3) == b"cde"  # across a buffer boundary
    assert chain.reader.read() == b"fgh"
    assert chain.reader.read() == b"" and chain.reader.remaining == 0
    assert chain.writer.write(b"0123") == 4  # across a buffer boundary
    assert chain.writer.write(b"456789") == 4  # short: the buffers are full
    chain.complete()
    assert drv.used() == [UsedElem(head, 8, b"01234567")]
    assert q.pop() is None


def test_readinto_and_read_struct() -> None:
    drv, q = setup()
    hdr = struct.Struct("<IIQ")
    drv.publish([hdr.pack(1, 0, 7)[:5], hdr.pack(1, 0, 7)[5:] + b"tail"], [1])
    with q.pop() as c:  # type: ignore[union-attr]
        assert c.reader.read_struct(hdr) == (1, 0, 7)  # straddles two buffers
        buf = bytearray(10)
        assert c.reader.readinto(buf) == 4 and buf[:4] == b"tail"
        with pytest.raises(EOFError):
            c.reader.read_struct(hdr)
    drv.publish([hdr.pack(2, 0, 9)], [1])
    with q.pop() as c:  # type: ignore[union-attr]
        assert c.reader.read_struct(hdr) == (2, 0, 9)  # one buffer: unpacked in place


def test_views_for_vectored_io() -> None:
    drv, q = setup()
    head = drv.publish([b"h" * 4, b"r" * 10], [3, 5, 1])
    c = q.pop()
    assert c is not None
    assert c.reader.read(2) == b"hh"
    views = c.reader.views()
    assert [bytes(v) for v in views] == [b"hh", b"r" * 10]
    c.reader.consume(5)
    assert c.reader.read() == b"r" * 7
    with pytest.raises(ValueError):
        c.reader.consume(1)
    wv = c.writer.views(6)
    assert [len(v) for v in wv] == [3, 3]
    wv[0][:] = b"abc"
    wv[1][:] = b"def"
    c.writer.advance(6)
    assert c.writer.written == 6 and c.writer.remaining == 3
    assert [len(v) for v in c.writer.views()] == [2, 1]
    c.writer.advance(2)
    c.writer.write(b"!")
    with pytest.raises(ValueError):
        c.writer.advance(1)
    c.complete()
    assert drv.used() == [UsedElem(head, 9, b"abcdef\0\0!")]


def test_chain_returns_itself_exactly_once() -> None:
    drv, q = setup()
    drv.publish([b"x"], [4])
    c = q.pop()
    assert c is not None
    with pytest.raises(RuntimeError), c:
        c.writer.write(b"ab")
        raise RuntimeError("device failure inside the block")
    assert c.done
    assert drv.used() == [UsedElem(c.head, 2, b"ab")]
    with pytest.raises(RuntimeError, match="already returned"):
        c.complete()
    with c:
        pass  # a second with block does not return it again
    assert drv.used() == []


def test_complete_with_explicit_length() -> None:
    drv, q = setup()
    drv.publish([], [16])
    c = q.pop()
    assert c is not None
    with pytest.raises(ValueError):
        c.complete(17)
    c.complete(16)
    assert drv.used()[0].len == 16


def test_zero_length_buffers_are_accepted() -> None:
    drv, q = setup()
    head = drv.publish([b"", b"a"], [0, 1])
    with q.pop() as c:  # type: ignore[union-attr]
        assert (c.reader.total, c.writer.total) == (1, 1)
        assert len(c.reader.views()) == 1
    assert drv.used()[0].id == head


def test_chain_of_exactly_queue_size_descriptors() -> None:
    drv, q = setup(8)
    drv.publish([b"r"] * 4, [1] * 4)
    c = q.pop()
    assert c is not None and c.reader.total == 4 and c.writer.total == 4


def test_write_flag_on_an_indirect_descriptor_is_ignored() -> None:
    drv, q = setup()
    table, length = drv.write_table([(drv.alloc(4), 4, 0, 0)])
    drv.set_descriptor(0, table, length, INDIRECT | WRITE, 0)
    drv.push_head(0)
    c = q.pop()
    assert c is not None and c.reader.total == 4


def test_pop_iter_returns_all_available() -> None:
    drv, q = setup()
    heads = [drv.publish([bytes([i])]) for i in range(5)]
    assert [c.head for c in q.iter()] == heads


# --- bad chains ----------------------------------------------------------------------------


def test_avail_entry_beyond_queue_size() -> None:
    drv, q = setup(8)
    drv.push_head(300)
    msg = "names descriptor 300, beyond the queue size 8"
    with pytest.raises(InvalidDescriptorIndex, match=msg):
        q.pop()
    still_works(drv, q)


def test_next_beyond_queue_size() -> None:
    drv, q = setup(8)
    head = drv.publish([b"a", b"b"], [], kick=False)
    drv.patch_descriptor(head, next=300)
    msg = rf"descriptor {head} has next=300, beyond the queue size 8"
    with pytest.raises(InvalidNextIndex, match=msg) as e:
        q.pop()
    assert e.value.head == head and e.value.queue == 0
    still_works(drv, q)


@pytest.mark.parametrize("indirect_loop", [False, True])
def test_loops_are_bounded(indirect_loop: bool) -> None:
    drv, q = setup(8)
    if indirect_loop:
        buf = drv.alloc(8)
        table, length = drv.write_table([(buf, 1, NEXT, 1), (buf, 1, NEXT, 2), (buf, 1, NEXT, 0)])
        drv.set_descriptor(0, table, length, INDIRECT, 0)
        drv.push_head(0)
        match = "longer than the 3 entries of its indirect table"
    else:
        head = drv.publish([b"a", b"b", b"c"], [], kick=False)
        drv.make_loop(head)
        match = "longer than the 8 entries of its descriptor table"
    before = drv.mem.translations  # type: ignore[attr-defined]
    with pytest.raises(DescriptorChainTooLong, match=match):
        q.pop()
    assert drv.mem.translations - before <= 9  # type: ignore[attr-defined]
    still_works(drv, q)


def test_self_loop() -> None:
    drv, q = setup(8)
    drv.set_descriptor(3, drv.alloc(1), 1, NEXT, 3)
    drv.push_head(3)
    with pytest.raises(DescriptorChainTooLong):
        q.pop()


def test_nested_indirect() -> None:
    drv, q = setup()
    inner, inner_len = drv.write_table([(drv.alloc(4), 4, 0, 0)])
    outer, outer_len = drv.write_table([(inner, inner_len, INDIRECT, 0)])
    drv.set_descriptor(0, outer, outer_len, INDIRECT, 0)
    drv.push_head(0)
    with pytest.raises(NestedIndirect, match="points to another table"):
        q.pop()
    still_works(drv, q)


@pytest.mark.parametrize("length", [0, 8, 17, 32768 * 16 + 16])
def test_bad_indirect_table_length(length: int) -> None:
    drv, q = setup()
    drv.set_descriptor(0, drv.alloc(64), length, INDIRECT, 0)
    drv.push_head(0)
    with pytest.raises(InvalidIndirectLength, match=f"table of {length} bytes"):
        q.pop()


def test_indirect_with_next() -> None:
    drv, q = setup()
    table, length = drv.write_table([(drv.alloc(4), 4, 0, 0)])
    drv.set_descriptor(0, table, length, INDIRECT | NEXT, 1)
    drv.set_descriptor(1, drv.alloc(4), 4, 0, 0)
    drv.push_head(0)
    with pytest.raises(IndirectWithNext):
        q.pop()


def test_indirect_next_beyond_table() -> None:
    drv, q = setup()
    buf = drv.alloc(4)
    table, length = drv.write_table([(buf, 4, NEXT, 1), (buf, 4, NEXT, 2)])
    drv.set_descriptor(0, table, length, INDIRECT, 0)
    drv.push_head(0)
    msg = "indirect table has next=2, beyond the table length 2"
    with pytest.raises(InvalidNextIndex, match=msg):
        q.pop()


@pytest.mark.parametrize("indirect", [False, True])
def test_readable_after_writable(indirect: bool) -> None:
    drv, q = setup()
    buf = drv.alloc(8)
    if indirect:
        table, length = drv.write_table([(buf, 4, NEXT | WRITE, 1), (buf, 4, 0, 0)])
        drv.set_descriptor(0, table, length, INDIRECT, 0)
    else:
        drv.set_descriptor(0, buf, 0, NEXT | WRITE, 1)  # even a zero-length one
        drv.set_descriptor(1, buf, 4, 0, 0)
    drv.push_head(0)
    with pytest.raises(ReadableAfterWritable, match="device-readable but follows a writable"):
        q.pop()
    still_works(drv, q)


def test_direct_writable_then_indirect_readable() -> None:
    drv, q = setup()
    buf = drv.alloc(8)
    table, length = drv.write_table([(buf, 4, 0, 0)])
    drv.set_descriptor(0, buf, 4, NEXT | WRITE, 1)
    drv.set_descriptor(1, table, length, INDIRECT, 0)
    drv.push_head(0)
    with pytest.raises(ReadableAfterWritable):
        q.pop()


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_longer_than_4gib(indirect: bool) -> None:
    big = 0x8000_0000
    mem = FakeGuestMemory(((0, big + (4 << 20)),))  # lazily backed: nothing is touched
    drv = FakeDriver(size=8, mem=mem, base=big)
    q = drv.make_queue()
    entries = [(0, big, NEXT, 1), (0, big, 0, 0)]
    if indirect:
        table, length = drv.write_table(entries)
        drv.set_descriptor(0, table, length, INDIRECT, 0)
    else:
        for i, e in enumerate(entries):
            drv.set_descriptor(i, *e)
    drv.push_head(0)
    with pytest.raises(ChainLengthOverflow, match="add up to 4294967296 bytes"):
        q.pop()
    drv.set_descriptor(1, 0, big - 1, 0, 0)  # 2^32 - 1 in total is allowed
    drv.set_descriptor(0, 0, big, NEXT, 1)
    drv.push_head(0)
    c = q.pop()
    assert c is not None and c.reader.total == 2**32 - 1


def out_of_memory_cases(drv: FakeDriver) -> list[tuple[int, int]]:
    return [
        (drv.hole_start - 4, 8),  # straddles the end of RAM into the hole
        (drv.hole_start + 16, 4),  # inside the hole
        (drv.hole_end - 4, 8),  # straddles the hole into the second region
        (drv.hole_end + (64 << 10) - 4, 8),  # past the end of the second region
        (2**64 - 4, 8),  # wraps past 2^64
        (2**64 - 1, 1),  # the last byte of the address space
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("where", ["direct", "indirect", "table"])
def test_buffers_outside_guest_memory(case: int, where: str) -> None:
    drv, q = setup()
    addr, length = out_of_memory_cases(drv)[case]
    if where == "direct":
        drv.set_descriptor(0, addr, length, 0, 0)
    elif where == "indirect":
        table, tlen = drv.write_table([(addr, length, 0, 0)])
        drv.set_descriptor(0, table, tlen, INDIRECT, 0)
    else:
        drv.set_descriptor(0, addr - addr % 16, 32, INDIRECT, 0)
    drv.push_head(0)
    with pytest.raises(DescriptorOutOfMemory, match="not entirely inside guest memory"):
        q.pop()
    still_works(drv, q)


def test_buffer_in_second_region_is_fine() -> None:
    drv, q = setup()
    drv.write(drv.hole_end, b"far")
    drv.set_descriptor(0, drv.hole_end, 3, 0, 0)
    drv.push_head(0)
    with q.pop() as c:  # type: ignore[union-attr]
        assert c.reader.read() == b"far"


def test_avail_idx_jump_stops_the_queue_until_reset() -> None:
    drv, q = setup(8)
    drv.publish([b"a"], [1])
    drv.set_avail_idx(drv.avail_idx + 8)  # 9 new entries in a queue of 8
    with pytest.raises(InvalidAvailRingIndex, match="9 new entries in a queue of size 8") as e:
        q.pop()
    assert q.broken is e.value
    with pytest.raises(InvalidAvailRingIndex):
        q.pop()  # stays stopped
    drv.set_avail_idx(1)
    with pytest.raises(InvalidAvailRingIndex):
        q.pop()  # even if the driver takes it back
    q.reset()
    assert q.broken is None
    drv2 = FakeDriver(size=8)
    drv2.configure(q)
    still_works(drv2, q)


def test_avail_idx_moving_by_exactly_the_size_is_fine() -> None:
    drv, q = setup(8)
    for i in range(8):
        drv.publish([bytes([i])], [], kick=False)
    assert len(list(q.iter())) == 8


def test_used_idx_is_never_read_back() -> None:
    drv, q = setup(8)
    drv.publish([b"a"], [1])
    drv.write(drv.used_addr + 2, b"\x34\x12")  # a driver scribbling on the used idx
    with q.pop():  # type: ignore[union-attr]
        pass
    assert q.next_used == 1 and drv.used_idx == 1


def test_every_error_is_a_virtqueue_error_with_a_queue_number() -> None:
    drv = FakeDriver(size=8)
    q = drv.configure(Queue(8, index=3))
    drv.push_head(9)
    with pytest.raises(VirtQueueError, match=r"^queue 3: "):
        q.pop()
    drv.set_descriptor(0, 1 << 50, 4, 0, 0)
    drv.push_head(0)
    msg = r"^queue 3: chain at head 0: descriptor 0 points to 0x4000000000000\+0x4,"
    with pytest.raises(DescriptorError, match=msg):
        q.pop()


def test_one_part_chains_share_an_empty_stream_that_nothing_can_change() -> None:
    """A chain with no readable (writable) bytes gets the shared NO_READER (NO_WRITER):
    every method of it, used as a device would on any chain, leaves it empty for the
    next chain (or the shared object would carry one chain's position into another)."""
    drv, q = setup()
    zero = struct.Struct("")
    drv.publish([], [8])
    drv.publish([b"data"], [])
    drv.publish([], [8])
    drv.publish([b"more"], [])
    first_w, first_r = q.pop(), q.pop()
    assert first_w is not None and first_r is not None
    with first_w as w_only, first_r as r_only:
        r, w = w_only.reader, r_only.writer
        assert r.read() == b"" and r.read(5) == b"" and r.readinto(bytearray(4)) == 0
        assert r.read_struct(zero) == () and r.views() == [] and r.views(3) == []
        r.consume(0)
        with pytest.raises(EOFError):
            r.read_struct(struct.Struct("<I"))
        with pytest.raises(ValueError):
            r.consume(1)
        assert w.write(b"xyz") == 0 and w.write(bytearray(2)) == 0 and w.write(b"") == 0
        assert w.views() == [] and w.written == 0
        w.advance(0)
        with pytest.raises(ValueError):
            w.advance(1)
        w_only.writer.write(b"12345678")
        r_only.reader.read()
    second_w, second_r = q.pop(), q.pop()
    assert second_w is not None and second_r is not None
    assert second_w.reader is r and second_r.writer is w  # shared, and still empty:
    for stream in (r, w):
        assert (stream.total, stream.remaining, stream._i, stream._off, stream._views) == (
            0, 0, 0, 0, [])
    assert second_r.reader.read() == b"more"
    second_w.complete()
    second_r.complete()
    assert [e.len for e in drv.used()] == [0, 8, 0, 0]  # ``with a, b`` returns b first
