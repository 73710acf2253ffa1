"""minivmm.kvm.release: a closed VM's descriptor and RAM are released on the releaser
thread, in the order handed over, all of them, with a bound on what may wait."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable

import pytest

from minivmm.kvm import System, release
from minivmm.platform import Platform


def _until(gate: threading.Event) -> Callable[[], None]:
    """A release that holds the releaser until ``gate`` is set."""
    def hold() -> None:
        gate.wait()
    return hold


def test_releases_run_in_order_off_the_callers_thread() -> None:
    seen: list[tuple[int, str]] = []
    def note(i: int) -> None:
        seen.append((i, threading.current_thread().name))

    for i in range(5):
        release.defer(functools.partial(note, i))
    release.wait()
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"minivmm-release"}


def test_a_failing_release_is_an_internal_error_and_the_rest_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    done: list[int] = []

    def broken() -> None:
        raise ValueError("a bug in a release")

    with caplog.at_level(logging.ERROR, "minivmm.kvm.release"):
        release.defer(broken)
        release.defer(lambda: done.append(1))
        release.wait()
    assert done == [1]
    (record,) = caplog.records
    assert "internal error" in record.getMessage() and record.exc_info is not None


def test_a_release_that_hands_over_another_runs_it_at_once() -> None:
    seen: list[str] = []

    def outer() -> None:
        release.defer(lambda: seen.append("inner"))
        seen.append("outer")

    release.defer(outer)
    release.wait()
    # Run in place, not queued behind ``outer`` (with MAX_PENDING waiting behind it,
    # queueing would wait for ``outer`` itself: a deadlock).
    assert seen == ["inner", "outer"]


def test_without_a_thread_a_release_runs_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """At interpreter shutdown no thread can start: the release is done by the caller."""
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    fresh = release._Releaser()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    seen: list[str] = []
    fresh.defer(lambda: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]
    assert fresh.thread is None and not fresh.items
    fresh.wait()  # nothing pending: returns


def test_interrupted_while_waiting_the_release_is_still_done() -> None:
    """A KeyboardInterrupt while the caller waits for room must not lose what it hands
    over (a VM's descriptor): it is released in place, then the interrupt goes on."""
    class Interrupted(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            raise KeyboardInterrupt

    fresh = release._Releaser()
    fresh.cond = Interrupted(threading.Lock())
    fresh.items.extend([lambda: None] * release.MAX_PENDING)  # full, as if busy
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        fresh.defer(lambda: done.append(1))
    assert done == [1] and len(fresh.items) == release.MAX_PENDING


def test_at_most_max_pending_wait() -> None:
    gate = threading.Event()
    release.defer(_until(gate))  # holds the releaser
    for _ in range(release.MAX_PENDING - 1):
        release.defer(lambda: None)
    handed = threading.Event()

    def one_more() -> None:
        release.defer(lambda: None)
        handed.set()

    t = threading.Thread(target=one_more)
    t.start()
    assert not handed.wait(0.2)  # it waits for the oldest to be released
    gate.set()
    t.join(10)
    assert handed.is_set()
    release.wait()


def test_a_forked_child_gets_a_releaser_of_its_own() -> None:
    gate = threading.Event()
    release.defer(_until(gate))  # the parent's releaser is busy while the child forks
    pid = os.fork()
    if pid == 0:  # the child: its releases run although the parent's are stuck
        ok = threading.Event()
        release.defer(ok.set)
        os._exit(0 if ok.wait(10) else 1)
    gate.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    release.wait()


def _kvm_vm_fds() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:kvm-vm"
        except OSError:
            pass
    return n


@pytest.mark.kvm
def test_a_closed_vm_is_destroyed_then_its_ram_unmapped() -> None:
    release.wait()
    before = _kvm_vm_fds()
    order: list[str] = []
    with System() as system:
        vm = system.create_vm()
        assert _kvm_vm_fds() == before + 1
        gate = threading.Event()
        release.defer(_until(gate))  # holds the releaser
        vm.close()
        assert vm.fd == -1
        release.defer(lambda: order.append("after the VM") if _kvm_vm_fds() == before
                      else order.append("VM still open"))
        assert _kvm_vm_fds() == before + 1  # not closed on this thread
        gate.set()
        release.wait()
    assert order == ["after the VM"]
    assert _kvm_vm_fds() == before


@pytest.mark.kvm
def test_a_platform_hands_over_its_vm_then_its_ram() -> None:
    release.wait()
    before = _kvm_vm_fds()
    p = Platform(16 << 20)
    mapping = p.memory.regions[0].mapping
    gate = threading.Event()
    release.defer(_until(gate))
    p.close()  # returns with both handed over
    assert not mapping.closed and _kvm_vm_fds() == before + 1
    gate.set()
    release.wait()
    assert mapping.closed and _kvm_vm_fds() == before
