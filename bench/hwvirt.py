"""Linux boot time, minivmm next to QEMU's microvm, on a hardware-virtualization KVM.

    python -m bench --hwvirt [--reps N] [--exec]   where the KVM is (see below)
    python -m bench.hwvirt [--reps N] [--exec]     here, on this host's /dev/kvm

The same kernel (guest/out/vmlinux, PVH entry, or --kernel bzImage) and initramfs
(guest/out/initramfs.cpio, busybox) with the same command line under both VMMs, 256
MiB, interleaved (the VMM that goes first alternates per repetition); per run, from
just before the spawn: seconds to /init's first line ("minivmm-guest: init") and to
the process's end (the guest reboots with reboot=t: a triple fault ends both VMMs).
Printed: medians and ranges, and the ratio minivmm / QEMU.

--exec measures `minivmm exec -- true` instead (README "CI boot tests"): the minimal
bzImage (vsock built in) and initramfs.cpio, seconds from just before the spawn to the
process's end, median and range. QEMU has no counterpart of it (a QEMU guest agent
over vhost-vsock needs a host vsock stack L1 does not load), so there is no ratio: the
figure is labelled with where it was taken, and in L1 (nested TCG) it is a trend only.

`python -m bench --hwvirt` runs this here when this host's KVM is hardware
virtualization, and otherwise inside L1, the nested-SVM Linux of the hardware-
virtualization test tier (guest/hwvirt/run.py; `make hwvirt` first). There both VMMs
run on an emulated CPU: absolute times mean nothing, the ratio is a trend to watch.
Exit status: 0, 1 when a run failed, 2 for a missing artifact or QEMU.
"""

from __future__ import annotations

import argparse
import os
import selectors
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .vmms import QEMU, REPO

OUT = REPO / "guest" / "out"
CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"
MARK = b"minivmm-guest: init"
TIMEOUT = 300.0


def argv(vmm: str, kernel: Path, initrd: Path) -> list[str]:
    if vmm == "minivmm":
        return [sys.executable, "-m", "minivmm", "run", "--kernel", str(kernel),
                "--initrd", str(initrd), "--mem", "256M", "--cmdline", CMDLINE]
    assert QEMU is not None
    return [QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
            "-global", "virtio-mmio.force-legacy=false", "-accel", "kvm", "-cpu", "host",
            "-m", "256M", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", CMDLINE]


def boot(cmd: list[str]) -> tuple[float, float]:
    """(seconds to MARK, seconds to the process's end); RuntimeError if either is missing
    or the status is not 0."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=REPO)
    assert proc.stdout is not None
    out = bytearray()
    to_init = -1.0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := start + TIMEOUT - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if to_init < 0 and MARK in out:
                to_init = time.monotonic() - start
    try:
        status = proc.wait(max(1.0, start + TIMEOUT - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = None
    to_end = time.monotonic() - start
    proc.stdout.close()
    if to_init < 0 or status != 0:
        tail = out.decode(errors="replace")[-2000:]
        seen = "seen" if to_init >= 0 else "missing"
        raise RuntimeError(f"{cmd[0]}: status {status}, init line {seen}:\n{tail}")
    return to_init, to_end


def exec_true(kernel: Path, initrd: Path) -> float:
    """Seconds from spawning `minivmm exec ... -- true` to its end; RuntimeError unless
    it exits 0."""
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "minivmm", "exec", "--kernel", str(kernel),
                        "--initrd", str(initrd), "--", "true"], stdin=subprocess.DEVNULL,
                       capture_output=True, cwd=REPO, timeout=TIMEOUT, check=False)
    seconds = time.monotonic() - start
    if p.returncode != 0:
        raise RuntimeError(f"minivmm exec: status {p.returncode}:\n"
                           f"{p.stderr.decode(errors='replace')[-2000:]}")
    return seconds


def exec_bench(reps: int) -> int:
    kernel, initrd = OUT / "bzImage", OUT / "initramfs.cpio"
    for f in (kernel, initrd, OUT / "minivmm-agent"):
        if not f.exists():
            print(f"bench: {f} missing; run `make guest`", file=sys.stderr)
            return 2
    times = []
    for i in range(reps):
        try:
            times.append(exec_true(kernel, initrd))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"bench: exec {i + 1} failed: {e}", file=sys.stderr)
            return 1
        print(f"rep {i + 1} minivmm exec -- true {times[-1]:6.2f} s", flush=True)
    where = ("nested TCG: L1 under QEMU's emulator" if os.environ.get("MINIVMM_HWVIRT_L1")
             else "this host's KVM")
    print(f"\n`minivmm exec -- true` (bzImage + initramfs.cpio), process start to exit, "
          f"{reps} runs, median [min-max] ({where}):\n  {spread(times)}")
    return 0


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} s  [{min(xs):.2f}-{max(xs):.2f}]"


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hwvirt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="boots per VMM (default 5)")
    p.add_argument("--kernel", default="vmlinux", choices=["vmlinux", "bzImage"],
                   help="guest/out/ kernel (default vmlinux)")
    p.add_argument("--exec", action="store_true",
                   help="measure `minivmm exec -- true` with the minimal bzImage instead")
    a = p.parse_args(args)
    if a.reps < 1:
        p.error("--reps must be at least 1")
    if a.exec:
        return exec_bench(a.reps)
    kernel, initrd = OUT / a.kernel, OUT / "initramfs.cpio"
    for f in (kernel, initrd):
        if not f.exists():
            print(f"bench: {f} missing; run `make guest`", file=sys.stderr)
            return 2
    if QEMU is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: needs qemu-system-x86_64 and a usable /dev/kvm", file=sys.stderr)
        return 2
    times: dict[str, dict[str, list[float]]] = {v: {"init": [], "end": []}
                                                for v in ("minivmm", "qemu")}
    for i in range(a.reps):
        order = ["minivmm", "qemu"] if i % 2 == 0 else ["qemu", "minivmm"]
        for vmm in order:
            try:
                to_init, to_end = boot(argv(vmm, kernel, initrd))
            except RuntimeError as e:
                print(f"bench: {vmm} boot {i + 1} failed: {e}", file=sys.stderr)
                return 1
            times[vmm]["init"].append(to_init)
            times[vmm]["end"].append(to_end)
            print(f"rep {i + 1} {vmm:8s} /init {to_init:6.2f} s  exit {to_end:6.2f} s",
                  flush=True)
    print(f"\nLinux boot ({a.kernel} + initramfs.cpio, 256 MiB), {a.reps} interleaved "
          f"boots each, median [min-max]:")
    print(f"  {'':14s} {'to /init':24s} to exit")
    for vmm, label in (("minivmm", "minivmm"), ("qemu", "QEMU microvm")):
        print(f"  {label:14s} {spread(times[vmm]['init'])}  {spread(times[vmm]['end'])}")
    r_init = statistics.median(times["minivmm"]["init"]) / statistics.median(times["qemu"]["init"])
    r_end = statistics.median(times["minivmm"]["end"]) / statistics.median(times["qemu"]["end"])
    print(f"  ratio minivmm/QEMU: to /init {r_init:.2f}, to exit {r_end:.2f}")
    return 0


def in_l1(args: list[str]) -> int:
    """`python -m bench --hwvirt`: here on a hardware-virtualization KVM, else in L1."""
    from minivmm.hostinfo import kvm_emulates_guest_kernel

    if os.path.exists("/dev/kvm") and not kvm_emulates_guest_kernel():
        return main(args)
    runner = REPO / "guest" / "hwvirt" / "run.py"
    print("bench: this host's KVM is not hardware virtualization: running in L1 "
          "(guest/hwvirt/run.py)", flush=True)
    return subprocess.run([sys.executable, str(runner), "--", sys.executable, "-m",
                           "bench.hwvirt", *args], cwd=REPO, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
