"""minivmm.pytest_plugin without a VM: options, markers, scopes, failure reports.

Each test runs a small pytest session with pytester. minivmm.Guest is replaced by
FakeGuest (a "boot" writes a console file and is recorded, a snapshot names the guest it
was taken of, a restore is a recorded clone), so what is tested is the plugin's own
logic: which configuration each test gets, when a guest is booted, cloned and stopped,
the usage errors, and what a failing test's report carries. Real boots:
tests/test_pytest_plugin_vm.py.
"""

from __future__ import annotations

import os
import textwrap
import types
from pathlib import Path
from typing import ClassVar

import pytest

import minivmm.guest
from minivmm.config import VmConfig
from minivmm.guest import GuestRunError
from minivmm.snapshot import SnapshotError

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "minivmm.pytest_plugin")


class FakeGuest:
    """Stands in for minivmm.Guest: records its boots and clones; mem=64M fails to boot,
    cmdline "unsaveable" fails to snapshot, and die() leaves a guest whose VM has
    ended. A clone's ``base`` is the guest it was cloned from, its ``others`` the
    stand-ins that were running when it was restored."""

    boots: ClassVar[list[FakeGuest]] = []
    clones: ClassVar[list[FakeGuest]] = []

    def __init__(self, config: VmConfig, *, agent: Path | None = None,
                 boot_timeout: float = 300.0) -> None:
        self.config, self.agent, self.boot_timeout = config, agent, boot_timeout
        self.console = Path(config.console.removeprefix("file:"))
        self.console.write_text("".join(f"boot line {i}\n" for i in range(100)))
        self.closed = False
        self.vm = types.SimpleNamespace(stopper=types.SimpleNamespace(result=None))
        self.base: FakeGuest | None = None
        self.others: list[FakeGuest] = []
        FakeGuest.boots.append(self)
        if config.mem == 64 << 20:
            with self.console.open("a") as f:
                f.write("Kernel panic - not syncing: fake\n")
            self.closed = True  # as Guest stops a guest that did not come up
            raise GuestRunError("the agent did not start", "Kernel panic - not syncing: fake")

    def snapshot(self, path: Path) -> Path:
        assert not self.closed and self.base is None
        if self.config.cmdline == "unsaveable":
            raise SnapshotError(f"{path}: fake: the disk's overlay is too large")
        path.mkdir()
        (path / "base").write_text(str(FakeGuest.boots.index(self)))
        return path

    @classmethod
    def restore(cls, path: Path) -> FakeGuest:
        base = cls.boots[int((path / "base").read_text())]
        clone = cls.__new__(cls)
        clone.config, clone.agent, clone.boot_timeout = (base.config, base.agent,
                                                         base.boot_timeout)
        clone.console = path.parent / f"clone-{len(cls.clones)}.log"
        clone.console.write_text(f"clone line {len(cls.clones)}\n")
        clone.closed, clone.base = False, base
        clone.vm = types.SimpleNamespace(stopper=types.SimpleNamespace(result=None))
        clone.others = [g for g in cls.boots + cls.clones if not g.closed]
        cls.clones.append(clone)
        return clone

    def console_log(self) -> str:
        return self.console.read_text()

    def die(self) -> None:
        with self.console.open("a") as f:
            f.write("BUG: kernel NULL pointer dereference, address: 0\n")
        self.vm.stopper.result = types.SimpleNamespace(reason="error", detail="triple fault")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester) -> type[FakeGuest]:
    monkeypatch.setattr(minivmm.guest, "Guest", FakeGuest)
    monkeypatch.setattr(FakeGuest, "boots", [])
    monkeypatch.setattr(FakeGuest, "clones", [])
    (pytester.path / "k").mkdir()
    for name in ("vmlinux", "other", "initrd.cpio"):
        (pytester.path / "k" / name).write_bytes(b"x")
    return FakeGuest


def ini(pytester: pytest.Pytester, **options: str) -> None:
    lines = "".join(f"minivmm_{k} = {v}\n" for k, v in options.items())
    pytester.makeini("[pytest]\n" + lines)


def test_ini_options_make_the_config_paths_relative_to_the_inifile(
        pytester: pytest.Pytester, fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", initrd="k/initrd.cpio", mem="300M", cpus="2",
        cmdline="console=ttyS0 quiet", boot_timeout="77", agent="k/other")
    pytester.mkdir("sub")
    pytester.makepyfile(**{"sub/test_one": "def test_one(guest):\n    pass\n"})
    pytester.chdir()
    result = pytester.runpytest_inprocess(*PLUGIN, "sub", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sub/test_one.py::test_one PASSED*"])  # no [id] added
    (g,) = fake.boots
    assert g.config.kernel == pytester.path / "k" / "vmlinux"
    assert g.config.initrd == pytester.path / "k" / "initrd.cpio"
    assert (g.config.mem, g.config.cpus, g.config.cmdline) == (300 << 20, 2,
                                                                "console=ttyS0 quiet")
    assert (g.boot_timeout, g.agent) == (77.0, pytester.path / "k" / "other")
    assert g.closed


def test_markers_override_closest_first_and_session_scope_shares_equal_configs(
        pytester: pytest.Pytester, fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", mem="300M")
    pytester.makepyfile(test_marks="""
        import pytest

        pytestmark = pytest.mark.minivmm(cpus=2)

        def test_a(guest):
            assert (guest.config.mem, guest.config.cpus) == (300 << 20, 2)

        def test_b(guest):
            assert (guest.config.mem, guest.config.cpus) == (300 << 20, 2)

        @pytest.mark.minivmm(mem="400M", kernel="k/other")
        class TestClass:
            @pytest.mark.minivmm(mem="500M")
            def test_c(self, guest):
                assert guest.config.mem == 500 << 20
                assert guest.config.kernel.name == "other"
                assert guest.config.cpus == 2
    """)
    pytester.makepyfile(test_plain="""
        def test_d(guest):
            assert (guest.config.mem, guest.config.cpus) == (300 << 20, 1)
    """)
    result = pytester.runpytest_inprocess(*PLUGIN)
    result.assert_outcomes(passed=4)
    # a and b share one guest; c and d differ from the one before them
    assert [g.config.mem >> 20 for g in fake.boots] == [300, 500, 300]
    assert all(g.closed for g in fake.boots)


@pytest.mark.parametrize(("scope", "boots"), [("session", 1), ("module", 2), ("function", 3)])
def test_scopes(pytester: pytest.Pytester, fake: type[FakeGuest], scope: str,
                boots: int) -> None:
    ini(pytester, kernel="k/vmlinux", scope=scope)
    pytester.makepyfile(test_one="def test_a(guest): pass\ndef test_b(guest): pass\n",
                        test_two="def test_c(guest): pass\n")
    pytester.runpytest_inprocess(*PLUGIN).assert_outcomes(passed=3)
    assert len(fake.boots) == boots


def test_a_module_scoped_user_fixture_may_use_a_module_scoped_guest(
        pytester: pytest.Pytester, fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", scope="module")
    pytester.makepyfile("""
        import pytest

        @pytest.fixture(scope="module")
        def prepared(guest):
            return guest

        def test_a(prepared, guest):
            assert prepared is guest

        def test_b(prepared, guest):
            assert prepared is guest
    """)
    pytester.runpytest_inprocess(*PLUGIN).assert_outcomes(passed=2)
    assert len(fake.boots) == 1


def test_a_failing_test_reports_the_console_tail_and_the_crash(
        pytester: pytest.Pytester, fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", console_lines="5")
    pytester.makepyfile("""
        def test_fails(guest):
            guest.die()
            assert False, "the test's own failure"

        def test_after_a_dead_guest(guest):
            assert guest.vm.stopper.result is None
    """)
    result = pytester.runpytest_inprocess(*PLUGIN)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*the test's own failure*",
        "*- minivmm console (last 5 lines) -*",
        "boot line 96",
        "boot line 99",
        "BUG: kernel NULL pointer dereference, address: 0",
        "*- minivmm crash -*",
        "BUG: kernel NULL pointer dereference, address: 0",
        "the guest ended: error: triple fault",
    ])
    assert "boot line 95" not in result.stdout.str()
    assert len(fake.boots) == 2  # the dead guest was replaced, not handed on


def test_a_passing_test_reports_nothing(pytester: pytest.Pytester,
                                        fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux")
    pytester.makepyfile("def test_ok(guest): pass\n")
    result = pytester.runpytest_inprocess(*PLUGIN, "-rA")
    result.assert_outcomes(passed=1)
    assert "minivmm console" not in result.stdout.str()


def test_a_guest_that_does_not_boot_errors_with_its_console_once(
        pytester: pytest.Pytester, fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", mem="64M")
    pytester.makepyfile("def test_a(guest): pass\ndef test_b(guest): pass\n")
    result = pytester.runpytest_inprocess(*PLUGIN)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*GuestBootError: minivmm: the guest did not boot: the agent did not start "
        "(Kernel panic - not syncing: fake)",
        "*- minivmm console (last 50 lines) -*",
        "*- minivmm crash -*",
        "Kernel panic - not syncing: fake",
    ])
    assert len(fake.boots) == 1  # the second test gets the same error, not another boot


BAD = [
    ({}, "", "test_x.py::test_x: the guest fixture: no kernel: set the ini option "
     "minivmm_kernel (a path relative to the inifile) or @pytest.mark.minivmm(kernel=...)"),
    ({"kernel": "k/nothing"}, "", "test_x.py::test_x: ini option minivmm_kernel: "
     "{path}/k/nothing: no such file"),
    ({"kernel": "k/vmlinux", "mem": "lots"}, "", "test_x.py::test_x: ini option minivmm_mem: "
     "*lots*"),
    ({"kernel": "k/vmlinux", "cpus": "two"}, "", "test_x.py::test_x: ini option minivmm_cpus: "
     "'two' is not a number"),
    ({"kernel": "k/vmlinux", "boot_timeout": "0"}, "", "test_x.py::test_x: ini option "
     "minivmm_boot_timeout: '0': give seconds > 0"),
    ({"kernel": "k/vmlinux"}, "bogus=1", "test_x.py::test_x: @pytest.mark.minivmm(bogus=...): "
     "unknown keyword; use acpi, boot_timeout, *, cmdline, *"),
    ({"kernel": "k/vmlinux"}, "'k/vmlinux'", "test_x.py::test_x: @pytest.mark.minivmm: takes "
     "keywords only (kernel=..., mem=...), not 'k/vmlinux'"),
    ({"kernel": "k/vmlinux"}, "cpus=999", "test_x.py::test_x: @pytest.mark.minivmm(cpus=...): "
     "999 vCPUs: give 1 to *"),
    ({"kernel": "k/vmlinux"}, "initrd='k/none'", "test_x.py::test_x: "
     "@pytest.mark.minivmm(initrd=...): {path}/k/none: no such file"),
    ({"kernel": "k/vmlinux", "scope": "class"}, "", "ERROR: ini option minivmm_scope = 'class': "
     "use session, module or function"),
    ({"kernel": "k/vmlinux", "console_lines": "all"}, "", "ERROR: ini option "
     "minivmm_console_lines = 'all': give a number of lines (0: none)"),
]


@pytest.mark.parametrize(("options", "mark", "message"), BAD)
def test_bad_options_are_one_line_usage_errors(pytester: pytest.Pytester,
                                               fake: type[FakeGuest], options: dict[str, str],
                                               mark: str, message: str) -> None:
    ini(pytester, **options)
    decorator = f"@pytest.mark.minivmm({mark})\n" if mark else ""
    pytester.makepyfile(test_x=f"import pytest\n{decorator}def test_x(guest): pass\n")
    result = pytester.runpytest_inprocess(*PLUGIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    want = message.format(path=pytester.path)
    result.stderr.fnmatch_lines([want if want.startswith("ERROR") else "ERROR: " + want])
    assert fake.boots == []


def test_a_guest_fixture_of_your_own_is_left_alone(pytester: pytest.Pytester,
                                                   fake: type[FakeGuest]) -> None:
    # No minivmm_kernel anywhere: only tests that get the plugin's guest need one.
    pytester.makepyfile(test_own="""
        import pytest

        @pytest.fixture
        def guest():
            return "mine"

        def test_own(guest):
            assert guest == "mine"
    """)
    pytester.makepyfile(test_none="def test_none(): pass\n")
    pytester.runpytest_inprocess(*PLUGIN).assert_outcomes(passed=2)


def test_an_override_that_extends_the_plugins_guest(pytester: pytest.Pytester,
                                                    fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux")
    pytester.makeconftest("""
        import pytest

        @pytest.fixture
        def guest(guest):
            guest.extended = True
            return guest
    """)
    pytester.makepyfile("def test_x(guest):\n    assert guest.extended\n")
    pytester.runpytest_inprocess(*PLUGIN).assert_outcomes(passed=1)
    assert len(fake.boots) == 1


def test_the_entry_point_and_p_together_register_it_once(pytester: pytest.Pytester,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    # A distribution with minivmm's entry point (as the installed package has it), and
    # -p and pytest_plugins naming the module too: one registration, no error.
    dist = tmp_path / "site" / "minivmm_fake-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: minivmm-fake\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [pytest11]
        minivmm.pytest_plugin = minivmm.pytest_plugin
    """))
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), str(root)]))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile("""
        import minivmm.pytest_plugin as plugin

        def test_registered_once(pytestconfig):
            plugins = pytestconfig.pluginmanager.get_plugins()
            assert [p for p in plugins if p is plugin] == [plugin]
            assert pytestconfig.getini("minivmm_scope") == "session"
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)  # the entry point alone
    pytester.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)
    pytester.makeconftest('pytest_plugins = ["minivmm.pytest_plugin"]\n')
    pytester.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


# --- guest_clone ----------------------------------------------------------------------------


def test_each_test_gets_its_own_clone_of_one_boot(pytester: pytest.Pytester,
                                                   fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", mem="300M")
    pytester.makepyfile(test_clones="""
        def test_a(guest_clone):
            assert guest_clone.base is not None and guest_clone.base.closed

        def test_b(guest_clone):
            pass

        def test_c(guest_clone):
            pass
    """)
    result = pytester.runpytest_inprocess(*PLUGIN, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["test_clones.py::test_a PASSED*"])  # no [id] added
    (base,) = fake.boots  # one boot, snapshotted, stopped before the first clone ran
    assert base.closed and base.config.mem == 300 << 20
    assert len(fake.clones) == 3 and all(c.base is base for c in fake.clones)
    assert all(c.closed for c in fake.clones)
    assert all(c.others == [] for c in fake.clones)  # each the only guest running


def test_clones_follow_the_markers_and_each_configuration_boots_once(
        pytester: pytest.Pytester, fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", mem="300M")
    pytester.makepyfile(test_marks="""
        import pytest

        def test_a(guest_clone):
            assert guest_clone.config.mem == 300 << 20

        @pytest.mark.minivmm(mem="500M")
        def test_b(guest_clone):
            assert guest_clone.config.mem == 500 << 20

        def test_c(guest_clone):
            assert guest_clone.config.mem == 300 << 20

        def test_d(guest, guest_clone):
            assert guest.base is None and guest_clone.base is not guest
    """)
    result = pytester.runpytest_inprocess(*PLUGIN)
    result.assert_outcomes(passed=4)
    # a's base, b's base, d's guest: c and d's clone reuse a's snapshot
    assert [g.config.mem >> 20 for g in fake.boots] == [300, 500, 300]
    assert [c.base for c in fake.clones] == [fake.boots[i] for i in (0, 1, 0, 0)]
    assert fake.clones[3].others == [fake.boots[2]]  # d's guest beside d's clone


def test_a_failing_clone_test_reports_the_bases_console_then_the_clones(
        pytester: pytest.Pytester, fake: type[FakeGuest]) -> None:
    ini(pytester, kernel="k/vmlinux", console_lines="5")
    pytester.makepyfile("""
        def test_fails(guest_clone):
            guest_clone.die()
            assert False, "the clone's test failed"

        def test_next_gets_a_live_clone(guest_clone):
            assert guest_clone.vm.stopper.result is None

        def test_both(guest, guest_clone):
            assert False, "with a guest and a clone"
    """)
    result = pytester.runpytest_inprocess(*PLUGIN)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*the clone's test failed*",
        "*- minivmm clone console (last 5 lines) -*",
        "boot line 98",
        "boot line 99",
        "----- minivmm: the snapshot; this test's clone from here on -----",
        "clone line 0",
        "BUG: kernel NULL pointer dereference, address: 0",
        "*- minivmm clone crash -*",
        "BUG: kernel NULL pointer dereference, address: 0",
        "the guest ended: error: triple fault",
        "*with a guest and a clone*",
        "*- minivmm console (last 5 lines) -*",
        "boot line 99",
        "*- minivmm crash -*",
        "no crash line on the console",
        "*- minivmm clone console (last 5 lines) -*",
        "boot line 99",
        "----- minivmm: the snapshot; this test's clone from here on -----",
        "clone line 2",
        "*- minivmm clone crash -*",
        "no crash line on the console",
    ])
    assert len(fake.boots) == 2  # the base and test_both's guest: a dead clone is no reboot
    assert all(c.closed for c in fake.clones)


@pytest.mark.parametrize(("options", "error"), [
    ({"mem": "64M"}, "*GuestBootError: minivmm: the guest did not boot: the agent did not "
     "start (Kernel panic - not syncing: fake)"),
    ({"cmdline": "unsaveable"}, "*GuestBootError: minivmm: the guest could not be saved: "
     "*: fake: the disk's overlay is too large"),
])
def test_a_base_that_cannot_be_made_errors_its_tests_after_one_boot(
        pytester: pytest.Pytester, fake: type[FakeGuest], options: dict[str, str],
        error: str) -> None:
    ini(pytester, kernel="k/vmlinux", **options)
    pytester.makepyfile("def test_a(guest_clone): pass\ndef test_b(guest_clone): pass\n")
    result = pytester.runpytest_inprocess(*PLUGIN)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([error, "*- minivmm clone console (last 50 lines) -*",
                                 "boot line 99", "*- minivmm clone crash -*"])
    assert "- minivmm console" not in result.stdout.str()
    assert len(fake.boots) == 1 and fake.boots[0].closed and fake.clones == []


def test_a_clone_without_a_kernel_is_a_usage_error(pytester: pytest.Pytester,
                                                   fake: type[FakeGuest]) -> None:
    pytester.makepyfile(test_x="def test_x(guest_clone): pass\n")
    result = pytester.runpytest_inprocess(*PLUGIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: test_x.py::test_x: the guest fixture: no kernel: *"])
    assert fake.boots == []


def test_under_xdist_each_worker_clones_its_own_base(pytester: pytest.Pytester,
                                                     fake: type[FakeGuest],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers are processes of their own: the stand-in goes in through a conftest.
    here = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(here.parent)]))
    ini(pytester, kernel="k/vmlinux")
    pytester.makeconftest("""
        import minivmm.guest
        from test_pytest_plugin import FakeGuest

        minivmm.guest.Guest = FakeGuest
    """)
    pytester.makepyfile(test_many="""
        import os
        import pytest
        from test_pytest_plugin import FakeGuest

        @pytest.mark.parametrize("n", range(6))
        def test_n(guest_clone, n):
            assert FakeGuest.boots == [guest_clone.base]  # this worker's one base
            print(f"test {n} ran on {os.environ['PYTEST_XDIST_WORKER']}")
            assert False, "report"
    """)
    result = pytester.runpytest_subprocess(*PLUGIN, "-n", "2")
    result.assert_outcomes(failed=6)
    out = result.stdout.str()
    workers = {line.split()[-1] for line in out.splitlines() if line.startswith("test ")}
    assert workers == {"gw0", "gw1"}
    assert out.count("- minivmm clone console (last 50 lines) -") == 6
