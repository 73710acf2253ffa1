"""Writing a snapshot over an older one: the new one replaces it whole, or, when the last
rename fails, the old one is back at its path and nothing is left beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minivmm import snapshot


def _snap(path: Path, text: str) -> Path:
    path.mkdir()
    (path / snapshot.MANIFEST).write_text(text)
    return path


def test_a_new_snapshot_replaces_the_old_one(tmp_path: Path) -> None:
    target = _snap(tmp_path / "s", "old")
    snapshot._replace_dir(_snap(tmp_path / "tmp", "new"), target)
    assert (target / snapshot.MANIFEST).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_failed_rename_puts_the_old_snapshot_back(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = _snap(tmp_path / "s", "old")
    tmp = _snap(tmp_path / "tmp", "new")
    real = os.rename

    def rename(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(src) == tmp:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        snapshot._replace_dir(tmp, target)
    assert (target / snapshot.MANIFEST).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "tmp"]  # tmp: the caller's
