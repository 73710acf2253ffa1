"""README's "Writing a device" example is code a reader will copy: run it as written."""

from __future__ import annotations

import re

from guests import ROOT


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
