"""A RAM disk: a virtio-blk device (virtio 1.2 §5.2) whose sectors live in the VMM's memory.

An example of a device defined outside minivmm, run in a real VM with ``--device``. The
guest's ordinary virtio-blk driver (Linux's ``CONFIG_VIRTIO_BLK``, the probe's ``blk``
check) uses it: a scratch disk that starts zeroed, or as a copy of an image file, and
whose writes vanish when the VM ends (the image file is never written)::

    python -m minivmm run --kernel bzImage --device examples.ramdisk:RamDisk,size=64M
    python -m minivmm run --kernel bzImage \\
        --device examples.ramdisk:RamDisk,image=rootfs.ext4,serial=scratch

(from the repository root; from elsewhere, put this directory on PYTHONPATH and write
``ramdisk:RamDisk``). The options are ``__init__``'s keyword arguments, converted by
their annotations (VirtioDevice.from_options): ``size`` in bytes (``64M``), ``image``,
``ro``, ``serial``. Run it as a script to see the device answer a read without a VM::

    PYTHONPATH=. python examples/ramdisk.py

It does the three requests a driver needs (§5.2.6): IN (read), OUT (write) and GET_ID.
Anything else gets VIRTIO_BLK_S_UNSUPP; a malformed request or one outside the disk gets
VIRTIO_BLK_S_IOERR and a rate-limited log line, and the device keeps working. Every
length and sector comes from the guest and is checked before it is used.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Final

from minivmm.devices.base import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_ID_BLOCK,
    VirtioDevice,
    bit,
)
from minivmm.errors import UsageError
from minivmm.virtio.chain import DescriptorChain, Reader, Writer

SECTOR: Final = 512
VIRTIO_BLK_F_RO: Final = 5  # §5.2.3
VIRTIO_BLK_T_IN: Final = 0  # §5.2.6
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_GET_ID: Final = 8
S_OK, S_IOERR, S_UNSUPP = b"\x00", b"\x01", b"\x02"
ID_BYTES: Final = 20
HEADER: Final = struct.Struct("<IIQ")  # struct virtio_blk_req: type, reserved, sector


class RamDisk(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    name = "ramdisk"
    #: what minivmm names when a Linux guest never initialises the device
    kernel_option = "CONFIG_VIRTIO_BLK"

    def __init__(self, size: int = 0, *, image: Path | None = None, ro: bool = False,
                 serial: str = "") -> None:
        try:
            data = image.read_bytes() if image is not None else b""
        except OSError as e:
            raise UsageError(f"image={image}: cannot read it ({e.strerror})") from None
        size = size or len(data)
        if size <= 0 or size % SECTOR:
            raise UsageError(f"size={size}: give a size in bytes, a multiple of {SECTOR} "
                             "(e.g. size=64M), or an image")
        if len(data) > size:
            raise UsageError(f"image={image} holds {len(data)} bytes, more than size={size}")
        if len(serial.encode()) > ID_BYTES:
            raise UsageError(f"serial={serial!r}: at most {ID_BYTES} bytes")
        super().__init__(bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
                         | (bit(VIRTIO_BLK_F_RO) if ro else 0), queue_sizes=[128])
        self._ram = mmap.mmap(-1, size)  # anonymous: pages cost nothing until written
        self._ram[: len(data)] = data
        self._view = memoryview(self._ram)
        self.read_only = ro
        self.capacity = size // SECTOR
        self._id = serial.encode().ljust(ID_BYTES, b"\0")
        self.reads = self.writes = self.errors = 0

    def config(self) -> bytes:
        return struct.pack("<Q", self.capacity)  # §5.2.4: capacity, in 512-byte sectors

    def process_queue(self, index: int) -> None:
        self.drain(self.queues[0], self._serve)

    def _serve(self, chain: DescriptorChain) -> None:
        w = chain.writer
        if w.total == 0:  # nowhere to put the status: return it unanswered
            self.log("ramdisk: request %d has no writable status byte", chain.head)
            return
        status = self._request(chain.reader, w)
        if status != S_OK:
            self.errors += 1
        if w.remaining > 1:  # the status is the last writable byte (§5.2.6)
            w.advance(w.remaining - 1)
        w.write(status)

    def _request(self, r: Reader, w: Writer) -> bytes:
        if r.remaining < HEADER.size:
            return self._bad("a request shorter than its header")
        kind, _, sector = r.read_struct(HEADER)  # a copy: the guest can't change it now
        if kind == VIRTIO_BLK_T_IN and not r.remaining:
            data = self._range(sector, w.remaining - 1)
            if data is None:
                return S_IOERR
            w.write(data)
            self.reads += 1
            return S_OK
        if kind == VIRTIO_BLK_T_OUT and w.remaining == 1:
            if self.read_only:
                return self._bad("a write to a read-only disk")  # §5.2.6.2
            data = self._range(sector, r.remaining)
            if data is None:
                return S_IOERR
            r.readinto(data)
            self.writes += 1
            return S_OK
        if kind == VIRTIO_BLK_T_GET_ID and not r.remaining:
            w.write(self._id[: w.remaining - 1])
            return S_OK
        if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_GET_ID):
            return self._bad(f"a type {kind} request with its buffers the wrong way round")
        return S_UNSUPP

    def _range(self, sector: int, length: int) -> memoryview | None:
        """The disk's bytes a request of ``length`` bytes at ``sector`` covers, or None
        (logged) when it is not whole sectors inside the disk."""
        if length % SECTOR or sector + length // SECTOR > self.capacity:
            self._bad(f"{length} bytes at sector {sector}: not whole sectors inside the "
                      f"disk ({self.capacity} sectors)")
            return None
        return self._view[sector * SECTOR : sector * SECTOR + length]

    def _bad(self, what: str) -> bytes:
        self.log("ramdisk: %s; answered IOERR", what)
        return S_IOERR

    def stats(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "errors": self.errors}

    def close(self) -> None:
        super().close()
        self._view.release()
        self._ram.close()


if __name__ == "__main__":
    # A read of sector 0 through the real virtio-mmio transport and a fake driver.
    from minivmm.transport.testing import DeviceHarness

    disk = RamDisk.from_options({"size": "1M", "serial": "example"})
    h = DeviceHarness(disk)
    h.initialise()
    drv = h.drivers[0]
    drv.publish([HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)], [SECTOR, 1])
    (used,) = drv.used()
    print(f"capacity {disk.capacity} sectors; read sector 0: {len(used.written) - 1} "
          f"bytes, status {used.written[-1]}")
    h.close()
