"""Start-up imports only what the path being run needs (issue 15).

Each check runs a fresh ``python -S`` (no site: the environment's .pth files -- an
editable-install finder, a certifi hook -- import pathlib, importlib.resources and more
before minivmm is reached, and would hide our own imports) with the repository on
PYTHONPATH, and reads ``sys.modules`` at the end.

The deny-list for the command line's own module and for ``--help`` and usage errors:

    elftools           pyelftools, 15-25 ms: only an ELF kernel needs it, at load time
    ctypes             the KVM ioctl layer's FFI (and libffi): parsing options needs none
    minivmm.<machine>  vm, platform, vcpu, kvm, memory, x86, devices, transport, virtio,
                       console, eventloop, config, firecracker, hostinfo: the machine is
                       imported by `minivmm run` once the options are known to be good
    dataclasses        with inspect, ast, dis: ~5 ms, for the configuration's classes
    logging            with traceback, linecache, tokenize: ~5 ms, configured by a command
    typing             ~2.5 ms: annotations are strings, TYPE_CHECKING needs no typing
    pathlib            with urllib.parse and ipaddress: ~3 ms, for paths not yet opened
    json, threading, selectors, termios, subprocess, tempfile, mmap, struct:
                       what the machine or a --config file uses, never the parser
    hypothesis, pytest, cffi: test or accelerator dependencies, never the product's start-up
    hashlib            2-3 ms with OpenSSL: a snapshot's CPUID digest, computed when asked
    importlib.metadata the plugins' entry-point scan: only for a --device not built in
    minivmm.snapshot, .trace, .check: --restore/--snapshot-on-signal, --trace, --check-driver
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from guests import HAVE_KVM, ROOT
from x86.synthetic_kernels import make_bzimage

DENY_PREFIXES = (
    "elftools", "ctypes", "dataclasses", "inspect", "logging", "typing", "pathlib", "json",
    "threading", "selectors", "termios", "subprocess", "tempfile", "mmap", "struct",
    "hypothesis", "pytest", "cffi", "hashlib", "importlib.metadata",
    "minivmm.snapshot", "minivmm.trace", "minivmm.check", "minivmm.exec",
    "minivmm.vm", "minivmm.platform", "minivmm.vcpu", "minivmm.kvm", "minivmm.memory",
    "minivmm.x86", "minivmm.devices", "minivmm.transport", "minivmm.virtio",
    "minivmm.console", "minivmm.eventloop", "minivmm.config", "minivmm.firecracker",
    "minivmm.hostinfo", "minivmm.stop", "minivmm.bus",
)

# Refuses any import of pyelftools in the process it runs in, so that a path that
# imports it fails loudly (exit 1: minivmm's one line saying pyelftools is missing)
# instead of passing.
NO_ELFTOOLS = """
import sys

class NoElftools:
    def find_spec(self, name, path=None, target=None):
        if name == "elftools" or name.startswith("elftools."):
            raise ImportError("test_startup: elftools imported")
        return None

sys.meta_path.insert(0, NoElftools())
"""


def python_s(code: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def modules_after(code: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """The modules loaded once ``code`` ran (its last stdout line is sys.modules)."""
    p = python_s(code + "\nprint(sorted(sys.modules))\n")
    assert p.stdout.strip(), p.stderr
    last = p.stdout.strip().splitlines()[-1]
    names: list[str] = ast.literal_eval(last)
    return names, p


def denied(names: list[str]) -> list[str]:
    return [n for n in names if any(n == d or n.startswith(d + ".") for d in DENY_PREFIXES)]


def test_importing_the_cli_imports_nothing_on_the_deny_list() -> None:
    names, _ = modules_after("import minivmm.cli, sys")
    assert "minivmm.cli" in names
    assert denied(names) == []


@pytest.mark.parametrize("argv", [
    ["--help"], ["run", "--help"], ["--version"],
    ["run", "--kernl", "x"],  # an unknown option
    ["run"],  # no kernel
    [],  # no command
], ids=lambda a: " ".join(a) or "no-args")
def test_help_and_usage_errors_import_nothing_on_the_deny_list(argv: list[str]) -> None:
    names, p = modules_after(
        "import sys\nfrom minivmm.cli import main\n"
        f"try:\n    status = main({argv!r})\nexcept SystemExit as e:\n    status = e.code\n"
        "print('status', status)")
    assert f"status {2 if argv[-1:] not in (['--help'], ['--version']) else 0}" in p.stdout
    assert denied(names) == []


def test_the_deny_list_catches_a_machine_import() -> None:
    """The check above can fail: importing the VM trips it."""
    names, _ = modules_after("import minivmm.cli, minivmm.vm, sys")
    assert {"minivmm.vm", "minivmm.kvm", "ctypes", "dataclasses"} <= set(denied(names))


def _exit_42_bzimage(path: Path) -> Path:
    """A synthetic bzImage whose 64-bit entry (load address + 0x200, boot.rst) writes 42
    to the debug-exit port and halts."""
    image = bytearray(make_bzimage(setup_sects=4))
    code = bytes([
        0x66, 0xBA, 0x01, 0x05,  # mov $0x501, %dx
        0xB0, 42,  # mov $42, %al
        0xEE,  # out %al, (%dx)
        0xF4,  # hlt
        0xEB, 0xFD,  # jmp hlt
    ])
    entry = 5 * 512 + 0x200  # after the boot sector and 4 setup sectors
    image[entry:entry + len(code)] = code
    path.write_bytes(bytes(image))
    return path


def _run_without_elftools(kernel: Path) -> subprocess.CompletedProcess[str]:
    argv = ["run", "--kernel", str(kernel), "--console", "none", "--acpi", "off"]
    return python_s(NO_ELFTOOLS + "from minivmm.cli import main\n"
                    f"status = main({argv!r})\n"
                    "print(sorted(sys.modules))\nsys.exit(status)\n", timeout=120)


#: what a run without ACPI, virtio devices or a --config file must not import
NOT_CONFIGURED = ("elftools", "minivmm.x86.acpi", "minivmm.x86.aml",
                  "minivmm.devices.legacy.acpi_pm", "minivmm.virtio", "minivmm.devices.base",
                  "minivmm.transport.mmio", "minivmm.firecracker", "json")


@pytest.mark.kvm
@pytest.mark.skipif(not HAVE_KVM, reason="no /dev/kvm")
def test_a_bzimage_run_never_imports_elftools(tmp_path: Path) -> None:
    """Nor, with --acpi off and no virtio devices, the ACPI tables or the virtqueue
    engine: a VM imports what it has."""
    p = _run_without_elftools(_exit_42_bzimage(tmp_path / "bzImage"))
    assert p.returncode == 42, p.stderr
    names: list[str] = ast.literal_eval(p.stdout.strip().splitlines()[-1])
    assert "minivmm.vm" in names and "minivmm.x86.loader" in names
    assert [n for n in names if n.startswith(NOT_CONFIGURED)] == []


@pytest.mark.kvm
@pytest.mark.skipif(not HAVE_KVM, reason="no /dev/kvm")
def test_an_elf_run_does_import_elftools_so_the_hook_works() -> None:
    """Also: an ELF kernel without pyelftools is one line naming the fix."""
    from guests import guest_artifact

    p = _run_without_elftools(guest_artifact("probe.elf"))
    assert p.returncode == 1
    assert "needs pyelftools, which is not installed: pip install pyelftools" in p.stderr
    assert "Traceback" not in p.stderr


#: what a run with a built-in virtio device (rng) and ACPI must not import:
#: the plugins' entry-point scan, what only a snapshot, --trace or --check-driver uses,
#: hashlib (the CPUID digest is computed when a snapshot asks), pyelftools (a bzImage)
RUN_NEVER = ("elftools", "hashlib", "importlib.metadata", "json", "minivmm.snapshot",
             "minivmm.trace", "minivmm.check", "minivmm.transport.observe",
             "minivmm.exec", "minivmm.agent", "minivmm.guest", "minivmm.firecracker")


@pytest.mark.kvm
@pytest.mark.skipif(not HAVE_KVM, reason="no /dev/kvm")
def test_a_run_with_a_builtin_device_imports_only_what_it_uses(tmp_path: Path) -> None:
    argv = ["run", "--kernel", str(_exit_42_bzimage(tmp_path / "bzImage")), "--console",
            "none", "--rng"]
    p = python_s("import sys\nfrom minivmm.cli import main\n"
                 f"status = main({argv!r})\n"
                 "print(sorted(sys.modules))\nsys.exit(status)\n", timeout=120)
    assert p.returncode == 42, p.stderr
    names: list[str] = ast.literal_eval(p.stdout.strip().splitlines()[-1])
    assert {"minivmm.devices.rng", "minivmm.x86.acpi"} <= set(names)
    assert [n for n in names if n.startswith(RUN_NEVER)] == []


@pytest.mark.kvm
@pytest.mark.skipif(not HAVE_KVM, reason="no /dev/kvm")
def test_an_elf_run_imports_only_pyelftools_structures() -> None:
    """An ELF kernel is read through pyelftools' ELF structures: not its ELFFile, whose
    import (DWARF, relocations, dynamic sections) costs ~10 ms more and reads nothing a
    kernel needs."""
    from guests import guest_artifact

    argv = ["run", "--kernel", str(guest_artifact("probe.elf")), "--console", "none",
            "--cmdline", "probe.check=cpl3"]
    import elftools

    site = str(Path(elftools.__file__).parent.parent)  # pyelftools' directory, no .pth
    p = python_s(f"import sys\nsys.path.append({site!r})\nfrom minivmm.cli import main\n"
                 f"status = main({argv!r})\n"
                 "print(sorted(sys.modules))\nsys.exit(status)\n", timeout=120)
    assert p.returncode == 0, p.stderr
    names: list[str] = ast.literal_eval(p.stdout.strip().splitlines()[-1])
    assert "elftools.elf.structs" in names
    assert [n for n in names if n.startswith(("elftools.elf.elffile", "elftools.dwarf",
                                              "elftools.ehabi"))] == []
