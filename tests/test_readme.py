"""README's examples are code a reader will copy: run them as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from guests import ROOT, guest_artifact

import minivmm


def test_writing_a_device_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a device") :]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    assert len(blocks) == 2 and "class UpperDevice" in blocks[0]
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    test_upper = namespace["test_upper"]
    assert callable(test_upper)
    test_upper()


@pytest.mark.kvm
def test_python_api_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """README's "Python API" block, as written (it boots the probe from guest/out/)."""
    guest_artifact("probe.elf")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, minivmm.RunResult) and result.status == 0, result


def test_fault_injection_example_runs(tmp_path: Path) -> None:
    """README's "When the host fails" block, as written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### When the host fails") :]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    test = namespace["test_disk_fails_once"]
    assert callable(test)
    test(tmp_path)
