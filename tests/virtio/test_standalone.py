"""The virtqueue engine stands alone: it imports nothing of minivmm outside minivmm.virtio.

It is meant to be usable without the VMM (issue 10): its errors have their own root and
guest memory is a protocol (``translate`` raising a ``LookupError``), not an import.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import minivmm.virtio
from minivmm.memory import GuestMemory, GuestMemoryError
from minivmm.virtio import ring
from minivmm.virtio.errors import DescriptorOutOfMemory, VirtQueueError
from minivmm.virtio.testing import FakeDriver

PACKAGE = Path(minivmm.virtio.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))
ROOT = PACKAGE.parent.parent


def test_importing_the_engine_loads_no_other_minivmm_module() -> None:
    code = (
        "import json, sys\n"
        "import minivmm.virtio, minivmm.virtio.testing, minivmm.virtio.util\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('minivmm'))\n"
        "print(json.dumps([minivmm.virtio.__file__, loaded]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(ROOT)}, cwd=ROOT,
    ).stdout
    where, loaded = json.loads(out)
    assert Path(where).parent == PACKAGE  # the engine under test, not an installed copy
    assert "minivmm.virtio.queue" in loaded  # the check itself sees the engine
    outside = [m for m in loaded if m != "minivmm" and not m.startswith("minivmm.virtio")]
    assert outside == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_engine_module_imports_the_vmm(path: Path) -> None:
    """Also imports inside functions, which the subprocess check would not see."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level > 1 or (node.level == 0 and name.split(".")[0] == "minivmm"
                                  and not name.startswith("minivmm.virtio")):
                bad.append(f"line {node.lineno}: from {'.' * node.level}{name}")
        elif isinstance(node, ast.Import):
            bad += [f"line {node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "minivmm"
                    and not a.name.startswith("minivmm.virtio")]
    assert bad == []


def test_the_engine_has_its_own_error_root() -> None:
    assert VirtQueueError.__mro__[1:] == (Exception, BaseException, object)


def test_minivmm_guest_memory_keeps_the_engine_contract() -> None:
    """The engine catches ``LookupError`` from ``translate``: minivmm's GuestMemory raises
    one, and a buffer outside its RAM is the engine's typed guest error, nothing else."""
    assert issubclass(GuestMemoryError, LookupError)
    mem = GuestMemory(16 << 20, hugepages=False)
    drv = FakeDriver(8, mem=mem)
    q = drv.make_queue()
    for addr in (mem.size - 8, 1 << 40, 2**64 - 16):  # straddling the end, beyond, near 2^64
        drv.set_descriptor(0, addr, 16, ring.VIRTQ_DESC_F_WRITE, 0)
        drv.push_head(0)
        with pytest.raises(DescriptorOutOfMemory):
            q.pop()
    assert q.broken is None
