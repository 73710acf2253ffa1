"""The KVM ioctl layer: ctypes structures, request numbers, System / Vm / Vcpu."""

from .api import KvmError, System, Vcpu, Vm, ioctl

__all__ = ["KvmError", "System", "Vcpu", "Vm", "ioctl"]
