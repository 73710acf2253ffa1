"""The VirtioDevice snapshot hooks' defaults (minivmm.devices.base)."""

from __future__ import annotations

import pytest

from minivmm.devices.rng import RngDevice


def test_default_hooks_save_nothing_and_take_only_nothing() -> None:
    dev = RngDevice()
    try:
        dev.quiesce()
        assert dev.save_state() == {}
        dev.restore_state({})
        with pytest.raises(ValueError, match="rng: the snapshot has device state"):
            dev.restore_state({"pending": 3})
    finally:
        dev.close()
