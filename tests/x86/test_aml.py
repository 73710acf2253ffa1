"""The AML builder: each encoding against ACPI 6.4 §20 and §6.4, and against iasl compiling
the same ASL (iasl tests fail, never skip, where iasl is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivmm.x86 import aml
from minivmm.x86.acpi import sdt


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(the length it encodes, bytes it takes) -- an independent reading of §20.2.4."""
    lead = data[0]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "bits 4-5 of a multi-byte lead byte are reserved"
    value = lead & 0x0F
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@pytest.mark.parametrize(
    ("body", "encoded"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # largest one-byte length: 63 with itself
        (63, b"\x41\x04"),  # 65 = 0x41: low nibble 1, next byte 4
        (4093, b"\x4f\xff"),  # 4095: largest two-byte length
        (4094, b"\x81\x00\x01"),  # 4097
        ((1 << 20) - 4, b"\x8f\xff\xff"),
        ((1 << 20) - 3, b"\xc1\x00\x00\x01"),
        ((1 << 28) - 5, b"\xcf\xff\xff\xff"),
    ],
)
def test_pkg_length_boundaries(body: int, encoded: bytes) -> None:
    assert aml.pkg_length(body) == encoded
    assert decode_pkg_length(encoded) == (body + len(encoded), len(encoded))


@given(st.integers(min_value=0, max_value=(1 << 28) - 5))
def test_pkg_length_counts_itself_and_is_shortest(body: int) -> None:
    enc = aml.pkg_length(body)
    value, size = decode_pkg_length(enc)
    assert size == len(enc) and value == body + size
    limits = {1: 0x3F, 2: (1 << 12) - 1, 3: (1 << 20) - 1, 4: (1 << 28) - 1}
    assert body + size <= limits[size]
    if size > 1:
        assert body + size - 1 > limits[size - 1]  # one byte fewer would not hold it


def test_pkg_length_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="longer than AML allows"):
        aml.pkg_length((1 << 28) - 4)
    with pytest.raises(ValueError):
        aml.pkg_length(-1)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x1_0000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
        (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
    ],
)
def test_integers_take_the_fewest_bytes(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integers_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        aml.integer(value)


def test_booleans_are_refused() -> None:
    with pytest.raises(TypeError):
        aml.Name("_STA", True).encode()


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("_HID", b"_HID"),
        ("S5", b"S5__"),
        ("\\_SB", b"\\_SB_"),
        ("\\", b"\\\x00"),
        ("", b"\x00"),  # NullName
        ("\\_SB.VR00", b"\\\x2e_SB_VR00"),
        ("A.B.C", b"\x2f\x03A___B___C___"),
        ("^^PCI0", b"^^PCI0"),
    ],
)
def test_name_strings(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["TOOLONG", "0ABC", "a", "AB-C", "\\_SB..X"])
def test_bad_name_segments(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(bad)


def test_strings() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.string("") == b"\x0d\x00"
    with pytest.raises(ValueError):
        aml.string("a\0b")
    with pytest.raises(UnicodeEncodeError):
        aml.string("é")


@pytest.mark.parametrize(
    ("text", "value"),
    [("PNP0501", 0x0105D041), ("PNP0B00", 0x000BD041), ("PNP0303", 0x0303D041)],
)
def test_eisa_ids(text: str, value: int) -> None:
    assert aml.EisaId(text).value() == value
    assert aml.EisaId(text).encode() == aml.integer(value)


@pytest.mark.parametrize("bad", ["PNP050", "pnp0501", "PN10501", "PNP050G", "PNP0x12",
                                 "PNP+123", "PNP05a1"])
def test_bad_eisa_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.EisaId(bad).value()


def test_resource_descriptors() -> None:
    assert aml.Memory32Fixed(0xD000_0000, 0x1000).encode() == (
        b"\x86\x09\x00\x01" + b"\x00\x00\x00\xd0" + b"\x00\x10\x00\x00")
    assert aml.Memory32Fixed(0x1000, 0x10, writable=False).encode()[3] == 0
    # Extended interrupt: consumer (bit 0), edge (bit 1); level/low/shared clear those bits.
    assert aml.Interrupt(5).encode() == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.Interrupt([5, 40], edge=False, active_low=True, shared=True).encode() == (
        b"\x89\x0a\x00\x0d\x02\x05\x00\x00\x00\x28\x00\x00\x00")
    assert aml.IrqNoFlags(4).encode() == b"\x22\x10\x00"
    assert aml.Io(0x3F8, 8).encode() == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.ResourceTemplate([]).encode() == b"\x11\x05\x0a\x02\x79\x00"
    with pytest.raises(ValueError):
        aml.IrqNoFlags(16).encode()
    with pytest.raises(ValueError):
        aml.Interrupt([]).encode()
    with pytest.raises(ValueError):
        aml.Interrupt(1 << 32).encode()
    with pytest.raises(ValueError):
        aml.Memory32Fixed(0xFFFF_F000, 1 << 32).encode()
    with pytest.raises(ValueError):
        aml.Io(0x10000, 1).encode()
    with pytest.raises(ValueError):
        aml.Io(0x60, 256).encode()


def test_objects() -> None:
    assert aml.Name("_UID", 2).encode() == b"\x08_UID\x0a\x02"
    assert aml.Package([5, 0]).encode() == b"\x12\x05\x02\x0a\x05\x00"
    assert aml.Device("VR00", [aml.Name("_UID", 0)]).encode() == (
        b"\x5b\x82\x0b" + b"VR00" + b"\x08_UID\x00")
    assert aml.Scope("\\_SB", []).encode() == b"\x10\x06\\_SB_"
    assert aml.Method("_STA", [aml.Return(0x0F)]).encode() == (
        b"\x14\x09_STA\x00\xa4\x0a\x0f")
    assert aml.Method("M", [], args=2, serialized=True).encode() == b"\x14\x06M___\x0a"
    with pytest.raises(ValueError):
        aml.Method("M", [], args=8).encode()
    with pytest.raises(ValueError):
        aml.Package(list(range(256))).encode()


# ---- against iasl ----------------------------------------------------------------------

ASL = """DefinitionBlock ("", "DSDT", 2, "MNVMM ", "MINIVMM ", 1)
{
    Scope (\\_SB)
    {
        Device (COM1)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, One)
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )
                IRQNoFlags () {4}
            })
        }
        Device (VR00)
        {
            Name (_HID, "LNRO0005")
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, , , ) {5}
                Interrupt (ResourceConsumer, Level, ActiveLow, Shared, , , ) {6, 70000}
            })
            Method (_STA, 0, NotSerialized)
            {
                Return (0x0F)
            }
        }
        Name (BIG, Package () { 0x1234, 0x12345678, 0x123456789A, "text" })
    }
    Name (\\_S5, Package () { 5, Zero })
}
"""

BUILT: list[aml.Aml] = [
    aml.Scope("\\_SB", [
        aml.Device("COM1", [
            aml.Name("_HID", aml.EisaId("PNP0501")),
            aml.Name("_UID", 1),
            aml.Name("_CRS", aml.ResourceTemplate([aml.Io(0x3F8, 8), aml.IrqNoFlags(4)])),
        ]),
        aml.Device("VR00", [
            aml.Name("_HID", "LNRO0005"),
            aml.Name("_UID", 0),
            aml.Name("_CRS", aml.ResourceTemplate([
                aml.Memory32Fixed(0xD000_0000, 0x1000),
                aml.Interrupt(5),
                aml.Interrupt([6, 70000], edge=False, active_low=True, shared=True),
            ])),
            aml.Method("_STA", [aml.Return(0x0F)]),
        ]),
        aml.Name("BIG", aml.Package([0x1234, 0x12345678, 0x12_3456_789A, "text"])),
    ]),
    aml.Name("\\_S5", aml.Package([5, 0])),
]


def iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        pytest.skip("iasl is not installed (Debian package acpica-tools)")
    return path


def test_builder_matches_iasl(tmp_path: Path) -> None:
    """iasl, optimisations off, compiles the equivalent ASL to the same AML bytes."""
    src = tmp_path / "t.asl"
    src.write_text(ASL)
    out = subprocess.run([iasl(), "-oa", "-p", str(tmp_path / "t"), str(src)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 Errors, 0 Warnings, 0 Remarks" in out.stdout
    compiled = (tmp_path / "t.aml").read_bytes()
    ours = sdt(b"DSDT", 2, b"".join(t.encode() for t in BUILT))
    assert ours[36:] == compiled[36:]  # the header names a different compiler
    assert len(ours) == len(compiled)
