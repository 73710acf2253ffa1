"""The one loader of the C accelerators (minivmm.accel): built once and cached, and off
without a word above INFO on a host that lacks what a build needs (no compiler, a
missing header or library), a WARNING only for a build that should have worked; once
per process, and a failed build not tried again (the .failed marker). The accelerators
themselves: tests/devices/test_net_accel.py, tests/devices/test_blk_uring.py."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from minivmm import accel

#: tests that try a build need cffi (test_without_cffi is that host's test); those that
#: build need a compiler too: they run wherever there is one (as CI's has)
needs_cffi = pytest.mark.skipif(importlib.util.find_spec("cffi") is None,
                                reason="cffi is not installed: nothing is built here")
needs_cc = pytest.mark.skipif(importlib.util.find_spec("cffi") is None
                              or shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="no cffi or no C compiler: nothing builds here")

CDEF = "int f(int);"
SOURCE = "int f(int x) { return x + 1; }"


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An empty cache and a loader that has said nothing (a new process)."""
    monkeypatch.setenv("MINIVMM_ACCEL_DIR", str(tmp_path / "accel"))
    monkeypatch.delenv(accel.ENV, raising=False)
    monkeypatch.setattr(accel, "_loaded", {})
    monkeypatch.setattr(accel, "_said", set())
    yield


def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_loaded", {})
    monkeypatch.setattr(accel, "_said", set())


def said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "accelerator off" in r.getMessage()]


def name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@needs_cc
def test_builds_once_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    n = name()
    mod = accel.load(n, CDEF, SOURCE)
    assert mod is not None and mod.lib.f(41) == 42
    assert accel.load(n, CDEF, SOURCE) is mod
    assert len(list(accel.cache_dir().glob(f"_minivmm_{n}_*.so"))) == 1
    new_process(monkeypatch)
    monkeypatch.setenv("CC", "false")  # a later process imports it: no compiler needed
    again = accel.load(n, CDEF, SOURCE)
    assert again is not None and again.lib.f(1) == 2


@needs_cc
def test_links_the_libraries_it_names() -> None:
    mod = accel.load(name(), "double sqrt(double);", "#include <math.h>",
                     libraries=("m",))
    assert mod is not None and mod.lib.sqrt(9.0) == 3.0


@needs_cffi
@pytest.mark.parametrize("cc", ["false", "/nonexistent/cc"])
def test_no_compiler_is_said_once_at_info(monkeypatch: pytest.MonkeyPatch, cc: str,
                                          caplog: pytest.LogCaptureFixture,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CC", cc)
    n = name()
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        assert accel.load(n, CDEF, SOURCE) is None
        assert accel.load(n, CDEF, SOURCE) is None
    (line,) = said(caplog)
    assert line.levelno == logging.INFO and "the pure-Python path runs" in line.getMessage()
    assert capfd.readouterr().err == ""  # the build's complaint is not on the terminal
    assert list(accel.cache_dir().glob(f"_minivmm_{n}_*.failed"))
    caplog.clear()
    new_process(monkeypatch)
    monkeypatch.delenv("CC")  # a compiler now, but the marker says: not again
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        assert accel.load(n, CDEF, SOURCE) is None
    (line,) = said(caplog)
    assert line.levelno == logging.INFO and "failed before" in line.getMessage()


@needs_cc
@pytest.mark.parametrize(("source", "libraries", "what"), [
    ("#include <minivmm-absent-header.h>\n" + SOURCE, (), "minivmm-absent-header.h"),
    (SOURCE, ("minivmm_absent_library",), "minivmm_absent_library"),
])
def test_a_missing_header_or_library_is_said_at_info(
        source: str, libraries: tuple[str, ...], what: str,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        assert accel.load(name(), CDEF, source, libraries=libraries) is None
    (line,) = said(caplog)
    assert line.levelno == logging.INFO and what in line.getMessage()


@needs_cc
def test_a_build_that_should_have_worked_warns_once_per_machine(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    n = name()
    broken = "int f(int x) { return x + ; }"
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        assert accel.load(n, CDEF, broken, fallback="the test's path runs") is None
    (line,) = said(caplog)
    assert line.levelno == logging.WARNING and "error" in line.getMessage()
    assert "the test's path runs" in line.getMessage()
    caplog.clear()
    new_process(monkeypatch)
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        assert accel.load(n, CDEF, broken) is None
    (line,) = said(caplog)
    assert line.levelno == logging.INFO  # the marker: said, not warned, again


@pytest.mark.parametrize("value", ["0", "off", "no"])
def test_the_environment_turns_them_off_quietly(monkeypatch: pytest.MonkeyPatch, value: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(accel.ENV, value)
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        assert accel.load(name(), CDEF, SOURCE) is None
    (line,) = said(caplog)
    assert line.levelno == logging.DEBUG
    assert not list(accel.cache_dir().glob("*"))  # nothing built or marked


def test_without_cffi(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cffi", None)  # import cffi raises ImportError
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        assert accel.load(name(), CDEF, SOURCE) is None
    (line,) = said(caplog)
    assert line.levelno == logging.INFO and "cffi is not installed" in line.getMessage()
