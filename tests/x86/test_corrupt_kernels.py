"""Random truncations and byte mutations of valid kernels: the loader either loads them
or refuses with a UsageError -- never struct.error, ELFError, IndexError, GuestMemoryError."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm.errors import UsageError
from minivmm.memory import GuestMemory
from minivmm.x86.loader import load_kernel

from .synthetic_kernels import ElfBuilder, make_bzimage

_counter = itertools.count()


@functools.cache
def _mem() -> GuestMemory:
    return GuestMemory(32 << 20)


def _mutations(size: int, hot_end: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    index = st.one_of(st.integers(0, hot_end - 1), st.integers(0, size - 1))
    return st.lists(st.tuples(index, st.integers(0, 255)), max_size=8)


def _try(path: Path, data: bytes, cut: int | None, muts: list[tuple[int, int]]) -> None:
    buf = bytearray(data)
    for i, v in muts:
        buf[i] = v
    if cut is not None:
        del buf[cut:]
    path.write_bytes(buf)
    initrd = path.with_suffix(".initrd")
    initrd.write_bytes(b"initrd")
    try:
        info = load_kernel(_mem(), path, initrd=initrd, cmdline="console=ttyS0")
    except UsageError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert _mem().contains(info.entry, 1)


BZIMAGE = make_bzimage()
SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(
    cut=st.one_of(st.none(), st.integers(0, len(BZIMAGE))),
    muts=_mutations(len(BZIMAGE), 0x270),
)
def test_corrupt_bzimage(tmp_path: Path, cut: int | None, muts: list[tuple[int, int]]) -> None:
    _try(tmp_path / f"bz{next(_counter)}", BZIMAGE, cut, muts)


@SETTINGS
@given(data=st.data())
def test_corrupt_elf(build_elf: ElfBuilder, tmp_path: Path, data: st.DataObject) -> None:
    elf = build_elf().read_bytes()
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(elf))))
    muts = data.draw(_mutations(len(elf), 0x200))  # ELF header + program headers
    _try(tmp_path / f"elf{next(_counter)}", elf, cut, muts)
