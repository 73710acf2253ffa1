"""virtio-rng (virtio 1.2 §5.4): an entropy source for the guest.

One queue (requestq). Each chain is a writable buffer the device fills with random bytes
from the host kernel's CSPRNG (the one behind getrandom(2)), read with ``readv`` from
/dev/urandom straight into the guest's buffers: no copy in Python. A request is capped at
:data:`MAX_REQUEST_BYTES` so a guest can't make the VMM do unbounded work per chain; the
used length tells the driver how much it got, as the spec allows.
"""

from __future__ import annotations

import os
from typing import Final

from ..virtio.chain import DescriptorChain
from .base import (
    IOV_MAX,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_ID_RNG,
    ActivationError,
    VirtioDevice,
    bit,
)

QUEUE_SIZE: Final = 256
MAX_REQUEST_BYTES: Final = 64 * 1024
ENTROPY_SOURCE: Final = "/dev/urandom"


class RngDevice(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    name = "rng"
    kernel_option = "CONFIG_HW_RANDOM_VIRTIO"

    def __init__(self) -> None:
        super().__init__(bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC), [QUEUE_SIZE])
        self._source = -1
        #: chains served and bytes given (--stats)
        self.requests = 0
        self.bytes_out = 0

    def config(self) -> bytes:
        return b""  # §5.4.4: no configuration space

    def on_activate(self) -> None:
        try:
            self._source = os.open(ENTROPY_SOURCE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ActivationError(f"rng: cannot open {ENTROPY_SOURCE}: {e.strerror}") from e

    def on_reset(self) -> None:
        if self._source >= 0:
            os.close(self._source)
            self._source = -1

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes_out}

    def process_queue(self, index: int) -> None:
        self.drain(self.queues[0], self._serve)

    def _serve(self, chain: DescriptorChain) -> None:
        w = chain.writer
        views = w.views(min(w.remaining, MAX_REQUEST_BYTES))
        if views:
            try:
                n = os.readv(self._source, views[:IOV_MAX])
            except OSError as e:
                self.log("rng: reading %s failed: %s", ENTROPY_SOURCE, e)
                n = 0
            w.advance(n)
            self.bytes_out += n
        self.requests += 1
