"""The errors minivmm reports to its user: one tree, three branches.

::

    MinivmmError                 exit status 1 unless a subclass says otherwise
    ├── UsageError               bad user input (a file, an option, a config field): exit 2
    ├── GuestError               the guest did something that ends the VM
    ├── HostError                the host or its KVM failed or lacks something
    │   └── (minivmm.kvm.KvmError: an ioctl failed)
    └── InternalError            a bug in minivmm: please report it

Each carries a message meant for a person, naming the problem and how to fix it. Lower
layers do not speak in command-line options: a :class:`UsageError` names the
configuration ``field`` it is about (``"mem"``, ``"kernel"``, ``"drives"`` ...), and the
front end that read the value (the command line, a JSON config file, the Python API)
puts its own name for it in front of the message (``--mem``, ``machine-config.mem_size_mib``).

Guest *protocol* mistakes that a device survives (a broken virtqueue, a malformed block
request) are not errors of this tree: the virtqueue engine has its own root
(:class:`minivmm.virtio.errors.VirtQueueError`), and devices answer them with an error
status or DEVICE_NEEDS_RESET while the VM keeps running.
"""

from __future__ import annotations


class MinivmmError(Exception):
    """Root of every error minivmm reports to its user."""

    exit_status = 1


class UsageError(MinivmmError):
    """Bad user input: a missing file, a malformed value (exit status 2).

    ``field`` names the configuration field the message is about, or is None when the
    message already says everything (e.g. a command-line parsing error)."""

    exit_status = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def for_option(self, names: dict[str, str]) -> str:
        """The message with the front end's name for ``field`` in front of it."""
        name = names.get(self.field or "", "")
        return f"{name}: {self.message}" if name else self.message


class GuestError(MinivmmError):
    """The guest ended the VM by failing (a KVM emulation failure, a crash event)."""


class HostError(MinivmmError):
    """The host cannot run the VM: /dev/kvm missing or lacking a capability, no memory."""


class InternalError(MinivmmError):
    """A bug in minivmm. The message says what failed; the log has the traceback."""

    REPORT = "this is a bug in minivmm: please report it, with the output of --debug"
