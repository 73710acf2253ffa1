"""A small AML (ACPI Machine Language) builder: just what minivmm's DSDT needs.

AML is the byte code of a DSDT (ACPI 6.4 §20, "ACPI Machine Language Specification"). This
module builds it from Python objects that read like the ASL they stand for::

    Device("VR00", [
        Name("_HID", "LNRO0005"),
        Name("_UID", 0),
        Name("_CRS", ResourceTemplate([
            Memory32Fixed(0xD000_0000, 0x1000),
            Interrupt(5),
        ])),
    ])

Each object's ``encode()`` returns its AML bytes. Values are Python ints (encoded in the
fewest bytes, §20.2.3 "Data Objects Encoding"), Python strs (AML strings), :class:`EisaId`,
:class:`Package` and :class:`ResourceTemplate`. Resource descriptors follow ACPI 6.4 §6.4
("Resource Data Types for ACPI").

What it does not do: no parsing, no field/region objects, no expressions beyond
``Return``; nothing minivmm does not emit. iasl (acpica-tools) checks the output in tests.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, NamedTuple, Protocol

# Opcodes (§20.3 "AML Byte Stream Byte Values").
ZERO_OP: Final = 0x00
ONE_OP: Final = 0x01
NAME_OP: Final = 0x08
BYTE_PREFIX: Final = 0x0A
WORD_PREFIX: Final = 0x0B
DWORD_PREFIX: Final = 0x0C
STRING_PREFIX: Final = 0x0D
QWORD_PREFIX: Final = 0x0E
SCOPE_OP: Final = 0x10
BUFFER_OP: Final = 0x11
PACKAGE_OP: Final = 0x12
METHOD_OP: Final = 0x14
DUAL_NAME_PREFIX: Final = 0x2E
MULTI_NAME_PREFIX: Final = 0x2F
EXT_OP_PREFIX: Final = 0x5B
DEVICE_OP: Final = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR: Final = 0x5C  # '\'
PARENT_PREFIX: Final = 0x5E  # '^'
RETURN_OP: Final = 0xA4
NULL_NAME: Final = 0x00

PKG_LENGTH_MAX: Final = (1 << 28) - 1  # §20.2.4: 4 bits + 3 bytes
_NAME_LEAD: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS: Final = _NAME_LEAD | frozenset("0123456789")
_HEX_DIGITS: Final = frozenset("0123456789ABCDEF")


class Aml(Protocol):
    """Anything that encodes itself as AML."""

    def encode(self) -> bytes: ...


# ---- §20.2.4 Package Length Encoding --------------------------------------------------


def pkg_length(body_len: int) -> bytes:
    """The PkgLength for a body of ``body_len`` bytes; the length it encodes counts the
    PkgLength bytes themselves (§20.2.4).

    One byte (bits 0-5) holds lengths up to 63. Otherwise bits 6-7 of the lead byte give the
    number of bytes that follow (1-3), the lead byte's bits 0-3 hold the length's low
    nibble and each following byte the next 8 bits.
    """
    if body_len < 0:
        raise ValueError(f"negative package length {body_len}")
    if body_len + 1 <= 0x3F:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"package of {body_len} bytes is longer than AML allows ({PKG_LENGTH_MAX})")


def _with_pkg_length(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


# ---- §20.2.2 Name Objects Encoding --------------------------------------------------------


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' (as ASL does)."""
    if not 1 <= len(seg) <= 4 or seg[0] not in _NAME_LEAD or not set(seg) <= _NAME_CHARS:
        raise ValueError(f"{seg!r} is not an AML name segment (1-4 of A-Z 0-9 _, no digit first)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional root ('\\') or parent ('^') prefixes, then dot-separated
    segments (``"\\_SB.VR00"``, ``"_HID"``, ``"^PCI0"``, ``"\\"``)."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix += bytes([PARENT_PREFIX])
            rest = rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# ---- §20.2.3 Data Objects Encoding -------------------------------------------------------


def integer(value: int) -> bytes:
    """An integer constant in its shortest form: ZeroOp, OneOp, or a Byte/Word/DWord/QWord
    prefix with the value."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integers are unsigned 64-bit, not {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return struct.pack("<BB", BYTE_PREFIX, value)
    if value <= 0xFFFF:
        return struct.pack("<BH", WORD_PREFIX, value)
    if value <= 0xFFFF_FFFF:
        return struct.pack("<BI", DWORD_PREFIX, value)
    return struct.pack("<BQ", QWORD_PREFIX, value)


def string(text: str) -> bytes:
    """A String: StringPrefix, ASCII characters 0x01-0x7F, NUL."""
    data = text.encode("ascii")
    if b"\0" in data:
        raise ValueError(f"AML strings cannot contain NUL: {text!r}")
    return bytes([STRING_PREFIX]) + data + b"\0"


class EisaId(NamedTuple):
    """ASL's EISAID("PNP0501"): three letters and four hex digits compressed into a
    32-bit integer (5 bits per letter, 'A' = 1), stored big-endian."""

    text: str

    def value(self) -> int:
        t = self.text
        if len(t) != 7 or not t[:3].isascii() or not t[:3].isupper() or not t[:3].isalpha():
            raise ValueError(f"EISA id {t!r} is not three capital letters and four hex digits")
        if not set(t[3:]) <= _HEX_DIGITS:
            raise ValueError(f"EISA id {t!r}: {t[3:]!r} is not four hex digits")
        product = int(t[3:], 16)
        vendor = ((ord(t[0]) - 0x40) << 10) | ((ord(t[1]) - 0x40) << 5) | (ord(t[2]) - 0x40)
        return int.from_bytes(struct.pack(">HH", vendor, product), "little")

    def encode(self) -> bytes:
        return integer(self.value())


def encode_value(value: int | str | Aml) -> bytes:
    """A DataRefObject: an int, a str, or anything with ``encode()``."""
    if isinstance(value, bool):
        raise TypeError("AML has no booleans: pass 0 or 1")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return value.encode()


class Package(NamedTuple):
    """Package(){...}: PackageOp PkgLength NumElements PackageElementList."""

    elements: Sequence[int | str | Aml]

    def encode(self) -> bytes:
        if len(self.elements) > 255:
            raise ValueError("a Package holds at most 255 elements (use VarPackage)")
        body = bytes([len(self.elements)]) + b"".join(encode_value(e) for e in self.elements)
        return bytes([PACKAGE_OP]) + _with_pkg_length(body)


class Buffer(NamedTuple):
    """Buffer(){...}: BufferOp PkgLength BufferSize ByteList."""

    data: bytes

    def encode(self) -> bytes:
        return bytes([BUFFER_OP]) + _with_pkg_length(integer(len(self.data)) + self.data)


# ---- §20.2.5 Term Objects Encoding: named objects --------------------------------------


class Name(NamedTuple):
    """Name(name, value): NameOp NameString DataRefObject."""

    name: str
    value: int | str | Aml

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.name) + encode_value(self.value)


class Scope(NamedTuple):
    """Scope(name){...}: ScopeOp PkgLength NameString TermList."""

    name: str
    children: Sequence[Aml]

    def encode(self) -> bytes:
        body = name_string(self.name) + b"".join(c.encode() for c in self.children)
        return bytes([SCOPE_OP]) + _with_pkg_length(body)


class Device(NamedTuple):
    """Device(name){...}: ExtOpPrefix DeviceOp PkgLength NameString TermList."""

    name: str
    children: Sequence[Aml]

    def encode(self) -> bytes:
        body = name_string(self.name) + b"".join(c.encode() for c in self.children)
        return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _with_pkg_length(body)


class Return(NamedTuple):
    """Return(value): ReturnOp ArgObject."""

    value: int | str | Aml

    def encode(self) -> bytes:
        return bytes([RETURN_OP]) + encode_value(self.value)


class Method(NamedTuple):
    """Method(name, args, Serialized|NotSerialized){...}: MethodOp PkgLength NameString
    MethodFlags TermList (flags: bits 0-2 argument count, bit 3 serialized)."""

    name: str
    body: Sequence[Aml]
    args: int = 0
    serialized: bool = False

    def encode(self) -> bytes:
        if not 0 <= self.args <= 7:
            raise ValueError(f"a method takes 0-7 arguments, not {self.args}")
        flags = self.args | (0x08 if self.serialized else 0)
        body = name_string(self.name) + bytes([flags]) + b"".join(t.encode() for t in self.body)
        return bytes([METHOD_OP]) + _with_pkg_length(body)


# ---- §6.4 Resource Data Types ---------------------------------------------------------------

# Small items: one byte of tag, type 0, name in bits 3-6, length in bits 0-2 (§6.4.2).
_SMALL_IRQ: Final = 0x04
_SMALL_IO: Final = 0x08
_SMALL_END: Final = 0x0F
# Large items: tag byte with bit 7 set, then a 16-bit length (§6.4.3).
_LARGE_MEMORY32_FIXED: Final = 0x86
_LARGE_EXTENDED_IRQ: Final = 0x89


def _small(name: int, body: bytes) -> bytes:
    return bytes([(name << 3) | len(body)]) + body


def _large(tag: int, body: bytes) -> bytes:
    return struct.pack("<BH", tag, len(body)) + body


def _check(what: str, value: int, bits: int) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value:#x} does not fit in {bits} bits")
    return value


class Memory32Fixed(NamedTuple):
    """Memory32Fixed(ReadWrite|ReadOnly, base, length) (§6.4.3.4)."""

    base: int
    length: int
    writable: bool = True

    def encode(self) -> bytes:
        base = _check("Memory32Fixed base", self.base, 32)
        length = _check("Memory32Fixed length", self.length, 32)
        return _large(_LARGE_MEMORY32_FIXED, struct.pack("<BII", int(self.writable), base, length))


class Interrupt(NamedTuple):
    """Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared)
    {irqs} -- the Extended Interrupt Descriptor (§6.4.3.6)."""

    irqs: int | Sequence[int]
    edge: bool = True
    active_low: bool = False
    shared: bool = False

    def encode(self) -> bytes:
        irqs = [self.irqs] if isinstance(self.irqs, int) else list(self.irqs)
        for irq in irqs:
            _check("interrupt", irq, 32)
        if not 1 <= len(irqs) <= 255:
            raise ValueError("an Interrupt descriptor lists 1-255 interrupts")
        flags = 0x01  # bit 0: resource consumer
        flags |= 0x02 if self.edge else 0
        flags |= 0x04 if self.active_low else 0
        flags |= 0x08 if self.shared else 0
        body = struct.pack("<BB", flags, len(irqs)) + struct.pack(f"<{len(irqs)}I", *irqs)
        return _large(_LARGE_EXTENDED_IRQ, body)


class IrqNoFlags(NamedTuple):
    """IRQNoFlags(){irq}: the 2-byte IRQ descriptor, meaning an ISA interrupt -- edge
    triggered, active high, exclusive (§6.4.2.1)."""

    irq: int

    def encode(self) -> bytes:
        if not 0 <= self.irq <= 15:
            raise ValueError(f"IRQNoFlags takes an ISA IRQ 0-15, not {self.irq}")
        return _small(_SMALL_IRQ, struct.pack("<H", 1 << self.irq))


class Io(NamedTuple):
    """IO(Decode16, base, base, alignment, length): a fixed range of I/O ports (§6.4.2.5)."""

    base: int
    length: int
    alignment: int = 1

    def encode(self) -> bytes:
        decode16 = 0x01
        base = _check("IO base", self.base, 16)
        alignment = _check("IO alignment", self.alignment, 8)
        length = _check("IO length", self.length, 8)
        return _small(_SMALL_IO, struct.pack("<BHHBB", decode16, base, base, alignment, length))


class ResourceTemplate(NamedTuple):
    """ResourceTemplate(){...}: a Buffer of descriptors closed by an End Tag whose checksum
    byte is 0 ("treated as if the checksum operation succeeded", §6.4.2.9)."""

    descriptors: Sequence[Aml]

    def encode(self) -> bytes:
        data = b"".join(d.encode() for d in self.descriptors) + _small(_SMALL_END, b"\0")
        return Buffer(data).encode()
