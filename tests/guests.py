"""Guests for the end-to-end tests: the probe's output parser and tiny hand-written ELFs.

probe.elf (guest/probe) reports one fact per line as ``probe: <fact>``; :class:`ProbeRun`
reads those lines back. :func:`tiny_elf` assembles a few instructions into an ELF with no
PVH note, which minivmm enters in 64-bit mode: for the cases the probe does not cover
(a guest that never ends, an instruction KVM cannot run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_OUT = ROOT / "guest" / "out"
HAVE_KVM = os.path.exists("/dev/kvm")
QEMU = shutil.which("qemu-system-x86_64")

def guest_artifact(name: str) -> Path:
    """A file from `make guest`; building it is part of the test set-up, so a missing
    artifact is an error (run `make guest`), not a skip."""
    path = GUEST_OUT / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make guest` first")
    return path


def run_minivmm(*args: str, timeout: float = 120, input: bytes | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """`python -m minivmm ...` as a user would run it; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "minivmm", *args], capture_output=True, text=True,
        timeout=timeout, input=input.decode() if input is not None else None,
        cwd=ROOT, errors="replace",
    )


LINE = re.compile(r"^probe: (.*?)\r?$", re.MULTILINE)
KV = re.compile(r"(\w+)=(\S+)")


@dataclass
class ProbeRun:
    status: int
    out: str
    err: str = ""

    @property
    def lines(self) -> list[str]:
        return LINE.findall(self.out)

    def one(self, prefix: str) -> str:
        found = [line for line in self.lines if line.startswith(prefix)]
        assert len(found) == 1, f"want one line starting {prefix!r}:\n{self.out}\n{self.err}"
        return found[0]

    def fields(self, prefix: str) -> dict[str, str]:
        return dict(KV.findall(self.one(prefix)))

    def e820(self) -> list[tuple[int, int, int]]:
        out = []
        for line in self.lines:
            if line.startswith("e820 "):
                f = dict(KV.findall(line))
                out.append((int(f["addr"], 16), int(f["size"], 16), int(f["type"])))
        return out

    @property
    def raw(self) -> str:
        return self.out + self.err

    def check(self, name: str) -> str:
        """The whole line ``check <name> ok ...`` or ``check <name> FAIL ...``."""
        return self.one(f"check {name} ")

    def result(self, name: str) -> str:
        """What follows ``check <name> ``: ``ok ...`` or ``FAIL ...``."""
        return self.check(name).removeprefix(f"check {name} ")

    def assert_pass(self) -> None:
        assert self.status == 0 and "result pass" in self.lines, (
            f"probe did not pass (status {self.status}):\n{self.out}\n{self.err}")


def debug_exit_status(v: int) -> int:
    """QEMU's exit status for a debug-exit write of v (minivmm's is v itself)."""
    return (v << 1) | 1


def qemu_probe(elf: Path, append: str, *, mem: str = "128M", extra: Sequence[str] = (),
               prefix: Sequence[str] = (), timeout: float = 120) -> ProbeRun:
    """The probe under QEMU's microvm (REFERENCE.md §2 flags), with isa-debug-exit at
    0x501; ``extra`` adds devices, ``prefix`` goes before the command (a netns exec).
    Without /dev/kvm, QEMU's TCG runs it instead."""
    assert QEMU is not None, "qemu-system-x86_64 is not installed"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        accel = ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    else:
        accel = ["-accel", "tcg", "-cpu", "max"]
    cmd = [*prefix, QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
           "-global", "virtio-mmio.force-legacy=false", *accel, "-m", mem, "-nodefaults",
           "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
           "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-kernel", str(elf),
           "-append", append, *extra]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    return ProbeRun(p.returncode, p.stdout.decode("latin-1").replace("\r", ""),
                    p.stderr.decode("latin-1"))


_LDS = """
ENTRY(_start)
SECTIONS {
  . = 0x200000;
  .text : { *(.text) }
}
"""


def tiny_elf(directory: Path, name: str, asm: str) -> Path:
    """An x86-64 ELF at 2 MiB whose entry runs ``asm`` (AT&T syntax) in 64-bit mode."""
    src = directory / f"{name}.s"
    src.write_text(f".code64\n.text\n.globl _start\n_start:\n{asm}\n")
    (directory / f"{name}.lds").write_text(_LDS)
    obj = directory / f"{name}.o"
    elf = directory / name
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-static", "-nostdlib", "-z",
                    "max-page-size=0x1000", "-T", str(directory / f"{name}.lds"),
                    "-o", str(elf), str(obj)], check=True)
    return elf
