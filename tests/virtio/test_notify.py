"""Notification suppression (flags and VIRTIO_F_EVENT_IDX) and the util helpers."""

from __future__ import annotations

import asyncio
import os

import pytest

from minivmm.virtio.chain import DescriptorChain
from minivmm.virtio.queue import Queue
from minivmm.virtio.ring import vring_need_event
from minivmm.virtio.testing import FakeDriver
from minivmm.virtio.util import BufferedNotify, ChainStream


def serve_all(q: Queue) -> int:
    n = 0
    for c in q.iter():
        with c:
            c.writer.write(c.reader.read())
        n += 1
    return n


def test_vring_need_event_matches_linux() -> None:
    assert vring_need_event(0, 1, 0)  # crossing the event index
    assert not vring_need_event(5, 3, 0)  # not there yet
    assert vring_need_event(65535, 1, 65534)  # across the 2^16 wrap
    assert not vring_need_event(0, 5, 5)  # nothing new


def test_flags_without_event_idx() -> None:
    drv = FakeDriver(size=8)
    q = drv.make_queue()
    drv.publish([b"a"], [1])
    assert drv.kicks == 1
    serve_all(q)
    assert q.needs_notification()
    drv.set_no_interrupt(True)
    assert not q.needs_notification()
    q.disable_notification()
    drv.publish([b"b"], [1])
    assert drv.kicks == 1  # the device said NO_NOTIFY
    assert q.enable_notification()  # and a buffer came meanwhile
    serve_all(q)
    assert not q.enable_notification()
    drv.publish([b"c"], [1])
    assert drv.kicks == 2


def test_event_idx_interrupts() -> None:
    drv = FakeDriver(size=8, event_idx=True)
    q = drv.make_queue()
    drv.set_used_event(0)
    drv.publish([b"a"], [1])
    serve_all(q)
    assert q.needs_notification()  # the first check always interrupts
    drv.publish([b"b"], [1])
    serve_all(q)  # used 1 -> 2; the driver asked for an interrupt when passing 0
    assert not q.needs_notification()
    drv.set_used_event(2)
    drv.publish([b"c"], [1])
    serve_all(q)  # used 2 -> 3 passes 2
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing new since


def test_event_idx_kicks() -> None:
    drv = FakeDriver(size=8, event_idx=True)
    q = drv.make_queue()
    assert not q.enable_notification()  # avail_event = 0
    drv.publish([b"a"], [1])
    assert drv.kicks == 1  # avail idx 0 -> 1 passes avail_event 0
    drv.publish([b"b"], [1])
    assert drv.kicks == 1  # the device has not asked again
    q.disable_notification()  # nothing to write with EVENT_IDX
    assert serve_all(q) == 2
    assert not q.enable_notification()  # avail_event = 2
    drv.publish([b"c"], [1])
    assert drv.kicks == 2


def test_event_idx_enable_reports_buffers_that_came_meanwhile() -> None:
    drv = FakeDriver(size=8, event_idx=True)
    q = drv.make_queue()
    drv.publish([b"a"], [1], kick=False)
    assert q.enable_notification()


def test_buffered_notify_batches() -> None:
    drv = FakeDriver(size=16)
    q = drv.make_queue()
    fired: list[int] = []
    notify = BufferedNotify(q, lambda: fired.append(q.next_used))
    assert not notify.flush()  # nothing returned yet
    for i in range(5):
        drv.publish([bytes([i])], [1])
    with notify:
        assert serve_all(q) == 5
        assert notify.pending
    assert fired == [5] and not notify.pending
    assert not notify.flush()
    drv.set_no_interrupt(True)
    drv.publish([b"x"], [1])
    serve_all(q)
    assert not notify.flush() and fired == [5] and notify.interrupts == 1


def test_buffered_notify_with_event_idx() -> None:
    drv = FakeDriver(size=16, event_idx=True)
    q = drv.make_queue()
    fired: list[int] = []
    notify = BufferedNotify(q, lambda: fired.append(q.next_used))
    drv.set_used_event(3)  # "interrupt me when used idx passes 3"
    for _ in range(3):
        drv.publish([b"x"], [1])
        serve_all(q)
        notify.flush()
    assert fired == [1]  # the first flush always interrupts; 2 and 3 don't pass 3
    drv.publish([b"x"], [1])
    serve_all(q)
    notify.flush()
    assert fired == [1, 4]


async def _consume(stream: ChainStream, out: list[bytes], stop_after: int) -> None:
    async for chain in stream:
        with chain:
            out.append(chain.reader.read())
        if len(out) == stop_after:
            stream.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_chain_stream_with_asyncio_event(event_idx: bool) -> None:
    async def main() -> list[bytes]:
        drv = FakeDriver(size=8, event_idx=event_idx)
        q = drv.make_queue()
        kick = asyncio.Event()
        drv.on_kick = kick.set
        out: list[bytes] = []
        task = asyncio.create_task(_consume(ChainStream(q, kick), out, 6))
        for i in range(6):
            await asyncio.sleep(0)
            drv.publish([b"m%d" % i], [1])
            if i % 2:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(task, 5)
        assert len(drv.used()) == 6
        return out

    assert asyncio.run(main()) == [b"m%d" % i for i in range(6)]


def test_chain_stream_with_eventfd() -> None:
    async def main() -> list[bytes]:
        drv = FakeDriver(size=8, event_idx=True)
        q = drv.make_queue()
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        drv.on_kick = lambda: os.eventfd_write(fd, 1)
        out: list[bytes] = []
        try:
            task = asyncio.create_task(_consume(ChainStream(q, fd), out, 4))
            for i in range(4):
                await asyncio.sleep(0.01)
                drv.publish([b"e%d" % i], [1])
            await asyncio.wait_for(task, 5)
        finally:
            os.close(fd)
        return out

    assert asyncio.run(main()) == [b"e%d" % i for i in range(4)]


def test_chain_stream_close_ends_a_waiting_iteration() -> None:
    async def main() -> list[DescriptorChain]:
        drv = FakeDriver(size=8)
        q = drv.make_queue()
        stream = ChainStream(q, asyncio.Event())
        got: list[DescriptorChain] = []

        async def run() -> None:
            got.extend([c async for c in stream])

        task = asyncio.create_task(run())
        await asyncio.sleep(0.01)
        stream.close()
        await asyncio.wait_for(task, 5)
        return got

    assert asyncio.run(main()) == []
