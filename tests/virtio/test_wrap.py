"""Indices wrap at 2^16: more than 70,000 chains through one queue."""

from __future__ import annotations

import pytest

from minivmm.virtio.testing import FakeDriver
from minivmm.virtio.util import BufferedNotify

CHAINS = 70_000


@pytest.mark.parametrize(("size", "batch", "event_idx"), [(256, 100, True), (2, 1, False)])
def test_more_than_65536_chains(size: int, batch: int, event_idx: bool) -> None:
    drv = FakeDriver(size=size, event_idx=event_idx)
    q = drv.make_queue()
    interrupts = []
    notify = BufferedNotify(q, lambda: interrupts.append(q.next_used))
    drv.set_used_event(0)
    sent = 0
    received = 0
    while sent < CHAINS:
        expected = {}
        for i in range(batch):
            payload = (sent + i).to_bytes(4, "little")
            head = drv.publish([payload], [4], indirect=(sent + i) % 3 == 0)
            expected[head] = payload
        sent += batch
        for chain in q.iter():
            with chain:
                data = chain.reader.read()
                chain.writer.write(bytes(reversed(data)))
        notify.flush()
        q.enable_notification()
        used = drv.used()
        assert len(used) == batch
        for elem in used:
            assert elem.len == 4 and elem.written == bytes(reversed(expected.pop(elem.id)))
        received += len(used)
        drv.set_used_event(drv.used_idx)
    assert received == sent >= CHAINS
    assert q.next_avail == q.next_used == drv.used_idx == sent % 65536
    assert q.broken is None and drv.outstanding == 0
    assert len(interrupts) > 1
    assert interrupts[-1] == sent % 65536  # still interrupting after the wrap
