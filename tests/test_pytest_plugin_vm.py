"""minivmm.pytest_plugin with real guests: a user's test module, a failure's report, xdist,
clones.

Each pytester run is a fresh pytest process (the plugin loaded by -p, as the entry point
would load it) whose tests boot Linux guests: five boots in all, about 40 s each on a
host whose KVM emulates guest kernel code (guest/out/vmlinux-emulated there,
guest/out/vmlinux elsewhere), where a clone's first command takes ~16 s more. The
plugin's logic without VMs: tests/test_pytest_plugin.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guests import GUEST_OUT, guest_artifact
from linuxguest import HARD_TIMEOUT, kvm_emulates_kernel

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.kvm, pytest.mark.slow]

KERNEL = "vmlinux-emulated" if kvm_emulates_kernel() else "vmlinux"
PANIC_CMDLINE = "console=ttyS0 reboot=t panic=-1 rdinit=/no/such/init"


def user_project(pytester: pytest.Pytester, boot_timeout: float = HARD_TIMEOUT) -> None:
    """An ini file as a user writes it, its paths relative to it (guest/out linked in)."""
    for name in (KERNEL, "initramfs.cpio", "minivmm-agent"):
        guest_artifact(name)
    (pytester.path / "out").symlink_to(GUEST_OUT)
    pytester.makeini(f"""
        [pytest]
        minivmm_kernel = out/{KERNEL}
        minivmm_initrd = out/initramfs.cpio
        minivmm_mem = 256M
        minivmm_boot_timeout = {boot_timeout:g}
    """)


def test_a_user_module_passes_fails_with_the_console_and_a_panic_is_named(
        pytester: pytest.Pytester) -> None:
    user_project(pytester)
    pytester.makepyfile(test_user=f"""
        import pytest

        def test_hi(guest):
            r = guest.run(["sh", "-c", "echo hi"])
            assert r.stdout == b"hi\\n"

        def test_fails(guest):
            assert guest.run(["sh", "-c", "exit 3"]).returncode == 0

        @pytest.mark.minivmm(cmdline="{PANIC_CMDLINE}")
        def test_panics(guest):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "minivmm.pytest_plugin",
                                           timeout=3 * HARD_TIMEOUT)
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines([  # pytest prints errors before failures
        "*_ ERROR at setup of test_panics _*",
        # the error names the crash (at the end of its one line)
        "*GuestBootError: minivmm: the guest did not boot: *(Kernel panic - not syncing: *)",
        "*- minivmm console (last 50 lines) -*",
        "*- minivmm crash -*",
        "Kernel panic - not syncing:*",
        "*_ test_fails _*",
        "E       AssertionError: assert 3 == 0",
        "*- minivmm console (last 50 lines) -*",
        "minivmm-agent: listening on vsock port 52",
        "*- minivmm crash -*",
        "no crash line on the console",
    ])


def test_under_xdist_each_worker_boots_its_own_guest(pytester: pytest.Pytester,
                                                     tmp_path: Path) -> None:
    # Two boots at once: on a kvm_pvm host with 2 busy cores each took ~260 s (one alone
    # ~110 s on the same busy host, ~35 s idle), hence the long bound.
    user_project(pytester, boot_timeout=4 * HARD_TIMEOUT)
    pytester.makepyfile(test_two=f"""
        import os
        from pathlib import Path

        def record(guest):
            boot_id = guest.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
            worker = os.environ["PYTEST_XDIST_WORKER"]
            Path({str(tmp_path)!r}, worker).write_bytes(boot_id)

        def test_one(guest):
            record(guest)

        def test_two(guest):
            record(guest)
            assert False, "a failure reported through the controller"
    """)
    result = pytester.runpytest_subprocess("-p", "minivmm.pytest_plugin", "-n", "2",
                                           timeout=5 * HARD_TIMEOUT)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*a failure reported through the controller*",
        "*- minivmm console (last 50 lines) -*",
        "minivmm-agent: listening on vsock port 52",
    ])
    boots = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(boots) == {"gw0", "gw1"}
    assert boots["gw0"] != boots["gw1"]  # two guests, not one shared


def test_each_clone_test_sees_only_its_own_writes(pytester: pytest.Pytester,
                                                  tmp_path: Path) -> None:
    # One boot (the plugin's count, which each test records): both tests get clones of
    # its snapshot, the second does not see the first's file, and its deliberate failure
    # shows the clone's console after the base's.
    user_project(pytester)
    pytester.makepyfile(test_clones=f"""
        from pathlib import Path
        from minivmm.pytest_plugin import STATE

        def write_and_list(clone, name, pytestconfig):
            Path({str(tmp_path)!r}, name).write_text(str(pytestconfig.stash[STATE].boots))
            r = clone.run(["sh", "-c", f"mkdir -p /tmp/marks; echo {{name}} > /tmp/marks/{{name}}; "
                           "ls /tmp/marks"], check=True)
            return r.stdout.decode().split()

        def test_first(guest_clone, pytestconfig):
            assert write_and_list(guest_clone, "first", pytestconfig) == ["first"]

        def test_second(guest_clone, pytestconfig):
            assert write_and_list(guest_clone, "second", pytestconfig) == ["second"]
            assert False, "the second clone's deliberate failure"
    """)
    result = pytester.runpytest_subprocess("-p", "minivmm.pytest_plugin",
                                           timeout=3 * HARD_TIMEOUT)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "E       AssertionError: the second clone's deliberate failure",
        "*- minivmm clone console (last 50 lines) -*",
        "minivmm-agent: listening on vsock port 52",
        "----- minivmm: the snapshot; this test's clone from here on -----",
        "*- minivmm clone crash -*",
        "no crash line on the console",
    ])
    boots = [(tmp_path / n).read_text() for n in ("first", "second")]
    assert boots == ["1", "1"]  # clones of one guest
