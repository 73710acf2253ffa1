"""Linux ioctl request numbers, derived from the _IO/_IOR/_IOW/_IOWR encoding.

A request number packs four fields (include/uapi/asm-generic/ioctl.h):

    bits 31-30  direction (none, write = user to kernel, read = kernel to user)
    bits 29-16  size of the argument structure
    bits 15-8   type (0xAE for KVM)
    bits 7-0    number
"""

from __future__ import annotations

import ctypes
from typing import Final

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2

_Sized = type[ctypes._SimpleCData] | type[ctypes.Structure] | type[ctypes.Array]  # type: ignore[type-arg]


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, argtype: _Sized) -> int:
    return _IOC(IOC_READ, type_, nr, ctypes.sizeof(argtype))


def _IOW(type_: int, nr: int, argtype: _Sized) -> int:
    return _IOC(IOC_WRITE, type_, nr, ctypes.sizeof(argtype))


def _IOWR(type_: int, nr: int, argtype: _Sized) -> int:
    return _IOC(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(argtype))
