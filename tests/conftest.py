"""The rules for tests that need the host's KVM or QEMU.

Where /dev/kvm exists, tests marked ``kvm`` run and fail on error: CI must really
exercise KVM. Only where /dev/kvm is absent are they skipped, with that reason.
Tests marked ``hwvirt`` need a hardware-virtualization KVM: on a host whose KVM
emulates guest kernel code (kvm_pvm) or that has no /dev/kvm they are skipped with the
way to run them, `make test-hwvirt`, which boots them in L1 (nested SVM under QEMU).
Helpers shared by the end-to-end tests live in tests/guests.py.
"""

from __future__ import annotations

import pytest
from guests import HAVE_KVM

from minivmm.hostinfo import kvm_emulates_guest_kernel

HWVIRT_ELSEWHERE = ("needs a hardware-virtualization KVM ({}): `make test-hwvirt` runs it in L1, "
                    "a Linux with nested SVM under QEMU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            item.add_marker(pytest.mark.skip(reason="this host has no /dev/kvm"))
        if "hwvirt" in item.keywords:
            if not HAVE_KVM:
                why = HWVIRT_ELSEWHERE.format("this host has no /dev/kvm")
                item.add_marker(pytest.mark.skip(reason=why))
            elif kvm_emulates_guest_kernel():
                why = HWVIRT_ELSEWHERE.format("this host's is kvm_pvm")
                item.add_marker(pytest.mark.skip(reason=why))

