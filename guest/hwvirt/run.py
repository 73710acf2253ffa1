#!/usr/bin/env python3
"""Run one command inside L1: a Debian Linux with a real hardware-virtualization KVM.

    guest/hwvirt/run.py [--timeout S] [--console] [--] COMMAND [ARG...]

L1 is Debian's stock kernel (guest/out/hwvirt/vmlinuz, from `make hwvirt`) under QEMU's
software emulator, with AMD SVM and nested paging emulated (`-cpu qemu64,+svm,+npt`;
CPU models with XSAVE break L2 Linux, REFERENCE.md §7), so kvm_amd in L1 offers a real
/dev/kvm. L1's /init (guest/hwvirt/init-l1) mounts this host's / read-only over 9p
under a tmpfs overlay, chroots into it and runs COMMAND there as root with:

  cwd         the current directory (the same path as here)
  PYTHONPATH  this checkout first, so its minivmm is the one imported
  PATH, LANG  this process's; HOME=/root and TMPDIR=/tmp, both on tmpfs in L1
  MINIVMM_HWVIRT_L1=1

Everything under / is visible (guest/out's links into ~/.cache/minivmm resolve); writes
land in L1's memory and vanish with it. COMMAND's stdout and stderr stream here as
they are produced (a virtio console: QEMU sometimes delivers serial output only at
power-off). Exit status: COMMAND's; on a non-zero one, or when L1 ended without a
status, L1's kernel console follows on stderr. Without a status: 125; after --timeout
seconds (default 1800): 124. SIGINT/SIGTERM stop L1 and exit 128+signal. Usage
errors (a missing artifact or QEMU): one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "guest" / "out" / "hwvirt"
QEMU = "qemu-system-x86_64"
L1_CMDLINE = "console=ttyS0 panic=-1 mitigations=off"


def qemu_command(results: Path, console: Path) -> list[str]:
    """QEMU for L1: one vCPU, 2 GiB, host / and the results directory over 9p, the
    command's output on a virtio console (our stdout), the kernel's on ttyS0 (a file)."""
    return [
        QEMU, "-accel", "tcg", "-cpu", "qemu64,+svm,+npt", "-m", "2G", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(ARTIFACTS / "vmlinuz"),
        "-initrd", str(ARTIFACTS / "initramfs-l1.cpio"),
        "-append", L1_CMDLINE,
        "-chardev", f"file,id=kcon,path={console}", "-serial", "chardev:kcon",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=hwvirt,security_model=none",
        "-device", "virtio-serial-pci",
        "-chardev", "stdio,id=out,signal=off", "-device", "virtconsole,chardev=out",
    ]  # fmt: skip


def command_script(argv: list[str]) -> str:
    """What L1's /init runs (sh, chrooted, as root)."""
    env = {
        "HOME": "/root",
        "TMPDIR": "/tmp",
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "MINIVMM_HWVIRT_L1": "1",
    }
    if "MINIVMM_CACHE" in os.environ:
        env["MINIVMM_CACHE"] = os.environ["MINIVMM_CACHE"]
    lines = [f"cd {shlex.quote(os.getcwd())} || exit 125"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"exec {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


def stream(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Copy QEMU's stdout (the virtio console) to ours until it ends; False on timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(min(left, 1.0)):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return True
            sys.stdout.buffer.write(chunk.replace(b"\r\n", b"\n"))
            sys.stdout.buffer.flush()
    return False


def show_console(console: Path, why: str) -> None:
    text = ""
    if console.exists():
        text = console.read_bytes().decode(errors="replace").replace("\r", "")
    print(f"hwvirt: {why}; L1's console follows\n{text}\nhwvirt: end of L1's console",
          file=sys.stderr)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="guest/hwvirt/run.py",
                                 description="Run COMMAND inside L1 (nested SVM under TCG).")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds (default 1800)")
    ap.add_argument("--console", action="store_true", help="always print L1's console")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("hwvirt: no command given (usage: run.py [--] COMMAND ...)", file=sys.stderr)
        return 2
    if shutil.which(QEMU) is None:
        print(f"hwvirt: {QEMU} not found; install the Debian package qemu-system-x86",
              file=sys.stderr)
        return 2
    for name in ("vmlinuz", "initramfs-l1.cpio"):
        if not (ARTIFACTS / name).exists():
            print(f"hwvirt: {ARTIFACTS / name} missing; run `make hwvirt`", file=sys.stderr)
            return 2

    stopped: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="minivmm-hwvirt-") as tmp:
        results = Path(tmp) / "results"
        results.mkdir()
        (results / "cmd").write_text(command_script(command))
        console = Path(tmp) / "console.txt"
        start = time.monotonic()
        proc = subprocess.Popen(qemu_command(results, console), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE)
        finished = False
        try:
            finished = stream(proc, start + args.timeout)
            if finished:
                proc.wait(60)
        except KeyboardInterrupt:
            pass
        except subprocess.TimeoutExpired:
            finished = False
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        seconds = time.monotonic() - start
        if stopped:
            show_console(console, f"stopped by signal {stopped[0]} after {seconds:.0f} s")
            return 128 + stopped[0]
        if not finished:
            show_console(console, f"no result after {args.timeout:.0f} s")
            return 124
        status_file = results / "status"
        if not status_file.exists():
            show_console(console, f"L1 ended (QEMU status {proc.returncode}) without the "
                                  f"command's status after {seconds:.0f} s")
            return 125
        status = int(status_file.read_text().strip() or "125")
        print(f"hwvirt: exit {status} after {seconds:.0f} s in L1", file=sys.stderr)
        if status != 0 or args.console:
            show_console(console, f"the command's exit status is {status}")
        return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
