"""`minivmm exec` on a hardware-virtualization KVM, with the minimal and a stock kernel.

Each test runs the issue's command, ``sh -c 'echo out; echo err >&2; exit 7'`` (after it
writes a file that ``--collect`` brings back), and checks status 7, ``out`` alone on
stdout, ``err`` alone on stderr and the collected file:

* test_exec_minimal_kernel: guest/out/bzImage (virtio-vsock built in) with
  guest/out/initramfs.cpio's busybox for the shell.
* test_exec_stock_kernel: Debian's stock kernel, the one L1 runs (`make hwvirt`), whose
  vsock driver and virtio_mmio are modules: minivmm packs them from the kernel's module
  tree (guest/out/hwvirt/modules/, given with --modules) and the agent loads them before
  it listens; initramfs-stock.cpio's busybox gives the shell. The kernel finds the
  virtio-mmio devices through ACPI. Under --check-driver=strict: its vsock driver breaks
  no rule (the summary follows ``err``; status 7 stays).

Inside L1 the collected file lands in L1's tmpfs (pytest's basetemp), where the test
reads it. The time of each run, process start to exit, is printed (nested TCG: only
its order of magnitude means anything; bench/hwvirt.py measures `exec -- true`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests import ROOT, guest_artifact

from .common import hwvirt_artifact

pytestmark = [pytest.mark.hwvirt, pytest.mark.kvm, pytest.mark.slow]

TIMEOUT = 400.0  # seconds; the stock kernel boots in about a minute in L1
SCRIPT = "echo collected > /tmp/result.txt; echo out; echo err >&2; exit 7"
#: --check-driver's summary: Debian's vsock modules break no virtio 1.2 driver rule
CLEAN = (b"minivmm: check-driver: no violations of the virtio 1.2 driver rules (1 device "
         b"watched)\n")


def run_exec(tmp_path: Path, label: str, *options: str, end: bytes = b"") -> None:
    """``end``: what minivmm adds to stderr after the command's ``err``."""
    collected = tmp_path / "result.txt"
    cmd = [sys.executable, "-m", "minivmm", "exec", *options,
           "--collect", f"/tmp/result.txt:{collected}", "--", "sh", "-c", SCRIPT]
    started = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, cwd=ROOT,
                           timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"minivmm exec ({label}) did not end in {TIMEOUT:.0f} s; stderr:\n"
                    f"{(e.stderr or b'').decode(errors='replace')[-4000:]}")
    seconds = time.monotonic() - started
    print(f"minivmm exec with the {label} kernel: {seconds:.1f} s from start to exit "
          "(nested TCG)")
    why = f"stdout {p.stdout!r}\nstderr:\n{p.stderr.decode(errors='replace')[-4000:]}"
    assert (p.returncode, p.stdout, p.stderr) == (7, b"out\n", b"err\n" + end), why
    assert collected.read_bytes() == b"collected\n"


def test_exec_minimal_kernel(tmp_path: Path) -> None:
    guest_artifact("minivmm-agent")
    run_exec(tmp_path, "minimal", "--kernel", str(guest_artifact("bzImage")),
             "--initrd", str(guest_artifact("initramfs.cpio")))


def test_exec_stock_kernel(tmp_path: Path) -> None:
    guest_artifact("minivmm-agent")
    run_exec(tmp_path, "stock", "--kernel", str(hwvirt_artifact("vmlinuz")),
             "--initrd", str(hwvirt_artifact("initramfs-stock.cpio")),
             "--modules", str(hwvirt_artifact("modules")), "--mem", "512M",
             "--check-driver=strict", end=CLEAN)
