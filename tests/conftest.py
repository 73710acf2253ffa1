"""The rules for tests that need the host's KVM or QEMU.

Where /dev/kvm exists, tests marked ``kvm`` run and fail on error: CI must really
exercise KVM. Only where /dev/kvm is absent are they skipped, with that reason.
Helpers shared by the end-to-end tests live in tests/guests.py.
"""

from __future__ import annotations

import pytest
from guests import HAVE_KVM


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            item.add_marker(pytest.mark.skip(reason="this host has no /dev/kvm"))

