"""The Linux guests' side of the tests: boot to a console marker, read the check report.

guest/out/initramfs-check.cpio's /init (guest/initramfs/check-init.c) prints
``minivmm-check: begin``, one ``minivmm-check: <key> <value>`` line per fact, then
``minivmm-check: end`` and reboots. :func:`run_until` runs a VMM, watches its console
for a marker and stops it there (the final reboot may end in an emulation failure on
hosts whose KVM emulates guest kernel code); :func:`assert_check_report` asserts on every
line. Both the QEMU oracle (test_linux_qemu.py) and minivmm (test_linux_emulated.py) use
them, so the two are held to the same report.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "guest" / "out"
HARD_TIMEOUT = 240.0  # seconds, whole boot

# REFERENCE.md §1: what a Linux needs on a host whose KVM emulates CPL0 code.
EMULATED_HOST_CMDLINE = (
    "console=ttyS0 reboot=t panic=-1 noxsave mitigations=off nokaslr "
    "clearcpuid=popcnt,smap,smep,umip,fsgsbase,pcid,invpcid,rdrand,rdseed,"
    "rdtscp,rdpid,cx16,pku,114 rodata=off tsc=reliable no_timer_check quiet"
)
PLAIN_CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"
HVC0_LINE = "minivmm-check: hello on hvc0"
DISK_SIZE = 1 << 20
VIRTIO_IDS = {2: "virtio_blk", 3: "virtio_console", 4: "virtio_rng"}


def kvm_emulates_kernel() -> bool:
    """True on kvm_pvm hosts (same test as `make guest`)."""
    script = REPO / "guest" / "kvm-emulates-kernel.sh"
    return subprocess.run([str(script)], check=False).returncode == 0


def make_disk(path: Path) -> Path:
    path.write_bytes(bytes((i * 7 + i // 251) & 0xFF for i in range(DISK_SIZE)))
    return path


def run_until(cmd: list[str], marker: str, timeout: float) -> tuple[str, float]:
    """Run a VMM, return (console output, seconds to marker); stop it (SIGTERM, then
    SIGKILL) once the marker line is out."""
    text, _, elapsed = run_until_stopped(cmd, marker, timeout)
    return text, elapsed


def run_until_stopped(cmd: list[str], marker: str, timeout: float) -> tuple[str, str, float]:
    """run_until, also returning what the VMM printed after the marker until it ended
    (its end-of-run report: --check-driver's summary, --stats)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    out = bytearray()
    elapsed = -1.0
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := start + timeout - time.monotonic()) > 0:
                if not sel.select(left):
                    continue
                chunk = proc.stdout.read()
                if not chunk:  # the VMM exited
                    break
                out += chunk
                if f"{marker}\n".encode() in out.replace(b"\r", b""):
                    elapsed = time.monotonic() - start
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.set_blocking(proc.stdout.fileno(), True)
        tail = proc.stdout.read().decode(errors="replace").replace("\r", "")
        proc.stdout.close()
    text = out.decode(errors="replace").replace("\r", "")
    if elapsed < 0:
        why = "the VMM exited" if time.monotonic() - start < timeout else f"{timeout:.0f} s passed"
        pytest.fail(f"no {marker!r} on the console ({why}); console:\n{text[-4000:]}")
    return text, tail, elapsed


def split_consoles(console: str) -> str:
    """Both consoles print to stdout: drop the text /init wrote to hvc0. The tty sends it
    and its newline's "\\r\\n" (ONLCR) as two writes, so two chains, and ttyS0's output
    lags in the guest's UART buffer: a ttyS0 line may come out between the two. So the
    text goes without its newline (check_lines skips the blank line that leaves)."""
    assert HVC0_LINE in console, console
    return console.replace(HVC0_LINE, "", 1)


def check_lines(console: str) -> dict[str, list[str]]:
    """The check /init's report: key -> values, in order."""
    lines = [ln for ln in console.splitlines() if ln.startswith("minivmm-check: ")]
    assert lines and lines[0] == "minivmm-check: begin", console
    assert lines[-1] == "minivmm-check: end", console
    report: dict[str, list[str]] = {}
    for ln in lines[1:-1]:
        key, _, value = ln.removeprefix("minivmm-check: ").partition(" ")
        report.setdefault(key, []).append(value)
    return report


def assert_check_report(console: str, *, cmdline: str, disk: Path, hvc0_text: str,
                        cpus: int = 1) -> None:
    """Every line of the report: the command line (with three virtio_mmio.device=
    entries), the memory of a 256 MiB guest, the vCPUs online, blk/console/rng found and
    bound to their drivers, the disk's size and CRC-32, 16 hwrng bytes, and the hvc0
    line."""
    report = check_lines(console)
    assert report["cpus-online"] == ["0" if cpus == 1 else f"0-{cpus - 1}"]
    (got_cmdline,) = report["cmdline"]
    assert cmdline in got_cmdline
    assert len(re.findall(r"virtio_mmio\.device=\S+", got_cmdline)) == 3

    (mem,) = report["memtotal-kib"]
    assert 200 * 1024 < int(mem) <= 256 * 1024

    devices = {}
    for value in report["virtio"]:
        m = re.fullmatch(r"(virtio\d+) device-id (\d+) driver (\S+)", value)
        assert m, value
        devices[int(m[2])] = m[3]
    assert devices == VIRTIO_IDS  # every device found and bound to its driver
    assert report["virtio-count"] == ["3"]

    data = disk.read_bytes()
    assert report["vda-size"] == [str(len(data))]
    assert report["vda-crc32"] == [f"{zlib.crc32(data[:65536]):08x} bytes 65536"]

    (rng,) = report["hwrng"]
    assert re.fullmatch(r"[0-9a-f]{32}", rng), rng
    assert rng != "0" * 32

    assert report["hvc0"] == [f"wrote {len(HVC0_LINE) + 1} bytes"]
    assert HVC0_LINE in hvc0_text

    # Nothing else reported (a failed mount would print a "mount" line).
    assert set(report) == {
        "cmdline", "memtotal-kib", "cpus-online", "virtio", "virtio-count",
        "vda-size", "vda-crc32", "hwrng", "hvc0",
    }  # fmt: skip
