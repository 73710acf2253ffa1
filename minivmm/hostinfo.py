"""Facts about the host that change what minivmm does or says.

The one that matters most: whether this host's KVM runs guest kernel code natively
(Intel VT-x / AMD-V) or emulates it (the kvm_pvm shadow-paging backend, found on some
cloud and CI machines), where guest CPL0 code runs at about one instruction per
microsecond and a Linux kernel needs guest-side changes to boot at all.
"""

from __future__ import annotations

import mmap
import os
from functools import cache
from pathlib import Path

EMULATED_HOST_HINT = (
    "this host's KVM (kvm_pvm) emulates guest kernel code, so a stock Linux guest boots "
    "very slowly or fails here; use a kernel from `make guest-emulated` (see README, "
    "'Hosts without hardware virtualization')"
)


@cache
def kvm_module() -> str:
    """'kvm_intel', 'kvm_amd', 'kvm_pvm' or '' (unknown)."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    try:
        modules = Path("/proc/modules").read_text()
    except OSError:
        modules = ""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if name in modules:
            return name
    return ""


@cache
def kvm_emulates_guest_kernel() -> bool:
    """True when guest CPL0 code is emulated (no VT-x/AMD-V behind /dev/kvm)."""
    if kvm_module() == "kvm_pvm":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" not in flags and " svm" not in flags and kvm_module() == ""


def looks_like_linux(kernel: Path) -> bool:
    """A bzImage, or an ELF that carries Linux's version banner."""
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x210)
            if head[0x202:0x206] == b"HdrS":
                return True
            if not head.startswith(b"\x7fELF"):
                return False
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                return m.find(b"Linux version ") >= 0
    except (OSError, ValueError):
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
