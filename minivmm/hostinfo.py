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


#: What a Linux guest needs on a host whose KVM emulates guest kernel code, beyond the
#: kernel changes of guest/linux/patches (see README, "Hosts without hardware
#: virtualization"): no XSAVE (the emulator fails on xrstor), CPU features the emulator
#: can't run cleared inside the guest (CPUID masks have no effect under kvm_pvm), and
#: fewer emulated instructions at boot (no mitigations, KASLR, rodata or TSC checks).
EMULATED_HOST_CMDLINE = (
    "noxsave mitigations=off nokaslr clearcpuid=popcnt,smap,smep,umip,fsgsbase,pcid,"
    "invpcid,rdrand,rdseed,rdtscp,rdpid,cx16,pku,114 rodata=off tsc=reliable no_timer_check"
)


def host_quirks_cmdline(mode: str, kernel: Path, cmdline: str) -> str:
    """The options ``--host-quirks MODE`` adds to ``cmdline`` for ``kernel`` ('' if none):
    with 'auto', EMULATED_HOST_CMDLINE's options the command line lacks, for a Linux
    kernel on a host that emulates guest kernel code; never otherwise."""
    if mode != "auto" or not kvm_emulates_guest_kernel() or not looks_like_linux(kernel):
        return ""
    have = {opt.split("=", 1)[0] for opt in cmdline.split()}
    return " ".join(o for o in EMULATED_HOST_CMDLINE.split() if o.split("=", 1)[0] not in have)


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
