"""Linux TAP interfaces for virtio-net: open one by name, set its virtio-net header and
offloads (linux/if_tun.h; Documentation/networking/tuntap.rst).

A tap is a network interface whose other end is a file descriptor: each ``read`` returns
one Ethernet frame the host sends to the interface, each ``write`` injects one. With
IFF_VNET_HDR every frame is preceded by a virtio-net header (virtio 1.2 §5.1.6), so the
guest's header goes to the kernel as it is and the kernel's comes back the same way;
TUNSETVNETHDRSZ sets its size to the 12-byte ``virtio_net_hdr_v1`` (the kernel fills
the first 10 bytes and skips ``num_buffers``, which the device writes).

TUNSETIFF attaches the fd to the tap of that name. If none exists and the caller has
CAP_NET_ADMIN, the kernel creates one: non-persistent (it goes away with the fd) and
down, without addresses. A tap made beforehand with ``ip tuntap add dev NAME mode tap
user USER`` is persistent and may be opened by that user without privileges. This
module never changes an interface's addresses or state; that is the administrator's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Final

from ..config import check_ifname
from ..errors import UsageError

TUN_PATH: Final = "/dev/net/tun"
IFNAMSIZ: Final = 16

# ioctl numbers: _IOW('T', nr, int) and _IOR('T', nr, unsigned int)
TUNSETIFF: Final = 0x400454CA
TUNGETFEATURES: Final = 0x800454CF
TUNGETIFF: Final = 0x800454D2
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETVNETHDRSZ: Final = 0x400454D8
TUNSETVNETLE: Final = 0x400454DC

IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000

# TUNSETOFFLOAD bits: what the tap may hand us unfinished (the guest's GUEST_* features)
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_TSO_ECN: Final = 0x08
TUN_F_UFO: Final = 0x10

#: struct ifreq as TUNSETIFF reads it: the name, then the flags (the union is 24 bytes)
IFREQ: Final = struct.Struct("=16sH22x")
_INT: Final = struct.Struct("=i")

EBADFD: Final = errno.EBADFD
"""What a tap fd's read and write return once its interface has been deleted."""


def open_tap(name: str) -> tuple[int, bool]:
    """Attach a non-blocking fd to tap ``name`` with 12-byte virtio-net headers.

    Returns ``(fd, created)``: whether the kernel created the interface just now.
    Raises UsageError with one line naming what is missing."""
    raw = check_ifname(name)
    existed = _exists(name)
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"tap {name}: {TUN_PATH} is missing: load the tun module "
                         "(modprobe tun)", field="network_interfaces") from None
    except PermissionError:
        raise UsageError(f"tap {name}: {TUN_PATH} is not accessible to this user: "
                         "needs root, or a mode that lets it open the file",
                             field="network_interfaces") from None
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as e:
            raise UsageError(_setiff_error(name, existed, e), field="network_interfaces") from None
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, _INT.pack(12))
            fcntl.ioctl(fd, TUNSETVNETLE, _INT.pack(1))  # virtio 1.x headers: little endian
        except OSError as e:
            raise UsageError(f"tap {name}: the kernel refused 12-byte virtio-net "
                             f"headers ({e.strerror}): it is too old for minivmm",
                                 field="network_interfaces") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, not existed


def _exists(name: str) -> bool:
    """Whether an interface of that name exists in this thread's network namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _setiff_error(name: str, existed: bool, e: OSError) -> str:
    if e.errno == errno.EPERM:
        what = "cannot be opened by this user" if existed else "does not exist and creating it"
        return (f"tap {name}: tap {name} {what}: needs root or CAP_NET_ADMIN, or a tap "
                f"created with `ip tuntap add dev {name} mode tap user $USER`")
    if e.errno == errno.EBUSY:
        return f"tap {name}: tap {name} is in use by another program"
    if e.errno == errno.EINVAL and existed:
        return (f"tap {name}: interface {name} exists but is not a tap "
                "(choose another name)")
    return f"tap {name}: cannot attach to tap {name}: {e.strerror}"


def is_attached(fd: int) -> bool:
    """Whether ``fd`` still has its interface (False once someone deleted it)."""
    try:
        fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size))
    except OSError as e:
        return e.errno != EBADFD
    return True


def set_offload(fd: int, flags: int) -> None:
    """TUNSETOFFLOAD: which unfinished packets (partial checksum, TSO, UFO) the tap may
    hand to us; the kernel completes the others before they reach the fd."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def supported_offloads(fd: int) -> int:
    """The TUN_F_* set this kernel accepts on ``fd`` (UFO is the one that may be gone);
    leaves the tap with no offloads."""
    full = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
    for flags in (full, full & ~TUN_F_UFO, TUN_F_CSUM):
        try:
            set_offload(fd, flags)
        except OSError:
            continue
        set_offload(fd, 0)
        return flags
    return 0
