"""Console sinks, console specs, the raw terminal (on a pty) and the input pump."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import termios
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from minivmm.console import (
    FdSink,
    FileSink,
    InputPump,
    NullSink,
    RawTerminal,
    StdioSink,
    attach_stdin,
    open_sink,
)
from minivmm.devices.legacy.serial import Serial
from minivmm.errors import UsageError

from .helpers_legacy import RecordingLine, RecordingSink

WAIT = 10.0  # generous bound for a thread to react; tests never assert on timings


# -- sinks and parsing ----------------------------------------------------------------


def test_parse_stdio_and_none() -> None:
    assert isinstance(open_sink("stdio"), StdioSink)
    sink = open_sink("none")
    assert isinstance(sink, NullSink)
    sink.write(b"abc")
    assert sink.discarded == 3


def test_file_sink_writes_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"old contents")
    sink = open_sink(f"file:{path}")
    assert isinstance(sink, FileSink)
    sink.write(b"line 1\n")
    sink.write(b"line 2\n")
    sink.close()
    sink.close()
    assert path.read_bytes() == b"line 1\nline 2\n"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "expected stdio, none or file:PATH"),
        ("tty", "got 'tty'"),
        ("file", "expected stdio"),
        ("file:", "needs a path"),
        ("file:/nonexistent-dir-minivmm/x.log", "cannot open for writing"),
        (f"file:{__file__}/x.log", "cannot open for writing"),  # parent is a file
    ],
)
def test_bad_specs_are_one_line_usage_errors(spec: str, words: str) -> None:
    with pytest.raises(UsageError) as info:
        open_sink(spec)
    message = str(info.value)
    assert words in message
    assert "\n" not in message
    assert info.value.field == "console"
    assert info.value.exit_status == 2


def test_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        open_sink(f"file:{tmp_path}")


def test_fd_sink_writes_everything_to_a_nonblocking_pipe() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    payload = bytes(range(256)) * 4096  # 1 MiB: much more than a pipe holds
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    sink = FdSink(w, owned=True)
    sink.write(payload)
    sink.close()
    reader.join(WAIT)
    os.close(r)
    assert bytes(got) == payload


def test_stdio_sink_uses_the_given_fd_and_never_closes_it() -> None:
    r, w = os.pipe()
    sink = StdioSink(w)
    sink.write(b"guest says hi\r\n")
    sink.close()
    os.close(w)
    assert os.read(r, 100) == b"guest says hi\r\n"
    os.close(r)


# -- raw terminal ---------------------------------------------------------------------


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_raw_terminal_sets_raw_mode_and_restores(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    with RawTerminal(slave) as term:
        assert term.active
        iflag, oflag, cflag, lflag, *_, cc = termios.tcgetattr(slave)
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        assert not iflag & (termios.ICRNL | termios.IXON)
        assert oflag & termios.OPOST  # the VMM's own messages still render
        assert cflag & termios.CSIZE == termios.CS8
        assert cc[termios.VMIN] == 1
    assert not term.active
    assert termios.tcgetattr(slave) == before


def test_raw_terminal_restores_on_exception_and_restore_is_idempotent(
    pty: tuple[int, int],
) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    term = RawTerminal(slave)
    with pytest.raises(RuntimeError), term:
        raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before
    term.restore()
    term.restore()
    assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_raw_terminal_ignores_a_non_tty() -> None:
    r, w = os.pipe()
    with RawTerminal(r) as term:
        assert not term.active
    os.close(r)
    os.close(w)


def _child_in_raw_mode(slave: int, tail: str) -> subprocess.Popen[bytes]:
    code = textwrap.dedent(
        f"""
        import sys
        from minivmm.console import RawTerminal
        term = RawTerminal({slave})
        term.enter()
        print("raw", flush=True)
        {tail}
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        pass_fds=(slave,),
    )


def test_raw_terminal_restored_when_killed_by_sigterm(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    child = _child_in_raw_mode(slave, "sys.stdin.read()")
    assert child.stdout is not None
    assert child.stdout.readline() == b"raw\n"
    assert termios.tcgetattr(slave) != before
    child.send_signal(signal.SIGTERM)
    assert child.wait(WAIT) == -signal.SIGTERM  # still dies of the signal
    assert termios.tcgetattr(slave) == before


def test_raw_terminal_restored_at_interpreter_exit(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    child = _child_in_raw_mode(slave, "sys.exit(3)")
    assert child.wait(WAIT) == 3
    assert termios.tcgetattr(slave) == before


# -- input pump -----------------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.data = bytearray()
        self.quit = threading.Event()
        self.eof = threading.Event()
        self.changed = threading.Condition()

    def on_input(self, data: bytes) -> None:
        with self.changed:
            self.data += data
            self.changed.notify_all()

    def wait_for(self, expected: bytes) -> bytes:
        with self.changed:
            self.changed.wait_for(lambda: len(self.data) >= len(expected), WAIT)
            return bytes(self.data)

    def pump(self, fd: int, escape: bool | None = None) -> InputPump:
        return InputPump(
            self.on_input,
            self.quit.set,
            fd=fd,
            escape=escape,
            on_eof=self.eof.set,
            help_fd=fd,
        )


def test_pump_passes_pipe_input_through_and_stops_at_eof() -> None:
    r, w = os.pipe()
    c = Collector()
    pump = c.pump(r)
    assert pump.start()
    os.write(w, b"echo hello\n\x01x")  # a pipe: no escape keys, Ctrl-A x is data
    assert c.wait_for(b"echo hello\n\x01x") == b"echo hello\n\x01x"
    os.close(w)
    assert c.eof.wait(WAIT)
    pump.stop()
    assert not pump.running
    assert not c.quit.is_set()
    os.close(r)


def test_pump_stop_wakes_a_blocked_reader() -> None:
    r, w = os.pipe()
    c = Collector()
    pump = c.pump(r)
    pump.start()
    pump.stop()
    assert not pump.running
    pump.stop()
    assert not c.eof.is_set()
    os.close(r)
    os.close(w)


def test_pump_reads_a_regular_file_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"scripted input\n")
    fd = os.open(path, os.O_RDONLY)
    c = Collector()
    pump = c.pump(fd)
    pump.start()
    assert c.eof.wait(WAIT)
    pump.stop()
    os.close(fd)
    assert bytes(c.data) == b"scripted input\n"


def test_pump_on_a_closed_fd_does_not_start() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert not Collector().pump(r).start()


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"ab\x01\x01cd"], b"ab\x01cd"),  # Ctrl-A Ctrl-A sends one Ctrl-A
        ([b"ab\x01zcd"], b"ab\x01zcd"),  # Ctrl-A + other key: both go through
        ([b"ab\x01", b"\x01", b"cd"], b"ab\x01cd"),  # escape split across reads
    ],
)
def test_pump_escape_keys(chunks: list[bytes], expected: bytes) -> None:
    r, w = os.pipe()
    c = Collector()
    pump = c.pump(r, escape=True)
    pump.start()
    for chunk in chunks:
        os.write(w, chunk)
    assert c.wait_for(expected) == expected
    pump.stop()
    assert not c.quit.is_set()
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("chunks", [[b"ls\r\x01xignored"], [b"ls\r\x01", b"x"]])
def test_pump_ctrl_a_x_quits(chunks: list[bytes]) -> None:
    r, w = os.pipe()
    c = Collector()
    pump = c.pump(r, escape=True)
    pump.start()
    for chunk in chunks:
        os.write(w, chunk)
    assert c.quit.wait(WAIT)
    pump.stop()
    assert not pump.running
    assert bytes(c.data) == b"ls\r"
    assert not c.eof.is_set()
    os.close(r)
    os.close(w)


def test_pump_on_a_raw_pty_uses_escape_keys_by_default(pty: tuple[int, int]) -> None:
    master, slave = pty
    c = Collector()
    with RawTerminal(slave):
        pump = InputPump(c.on_input, c.quit.set, fd=slave, help_fd=slave)
        pump.start()
        os.write(master, b"a\x03b\x01h")  # Ctrl-C is data in raw mode; Ctrl-A h: help
        assert c.wait_for(b"a\x03b") == b"a\x03b"
        help_text = b""
        while b"this help" not in help_text:
            help_text += os.read(master, 1024)
        os.write(master, b"\x01x")
        assert c.quit.wait(WAIT)
        pump.stop()
    assert bytes(c.data) == b"a\x03b"


# -- attach_stdin ---------------------------------------------------------------------


class FakeMachine:
    def __init__(self) -> None:
        self.serial: Serial | None = Serial(RecordingLine(), RecordingSink())
        self.console_input = self.serial.enqueue_input
        self.stops: list[tuple[int, str, str]] = []
        self.stopped = threading.Event()

    def request_stop(self, status: int, reason: str, detail: str = "") -> None:
        self.stops.append((status, reason, detail))
        self.stopped.set()


def test_attach_stdin_feeds_the_uart_and_ctrl_a_x_stops(pty: tuple[int, int]) -> None:
    master, slave = pty
    before = termios.tcgetattr(slave)
    machine = FakeMachine()
    assert machine.serial is not None
    with attach_stdin("stdio", machine, fd=slave):
        assert termios.tcgetattr(slave) != before
        os.write(master, b"uname\r")
        os.write(master, b"\x01x")
        assert machine.stopped.wait(WAIT)
    assert termios.tcgetattr(slave) == before
    assert machine.stops[0][:2] == (0, "console")
    assert _drain(machine.serial) == b"uname\r"


def _drain(uart: Serial) -> bytes:
    out = bytearray()
    while uart.pending_input:
        buf = bytearray(1)
        uart.read(0, memoryview(buf))
        out += buf
    return bytes(out)


def test_attach_stdin_restores_the_terminal_on_error(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    with pytest.raises(KeyError), attach_stdin("stdio", FakeMachine(), fd=slave):
        raise KeyError("vm failed")
    assert termios.tcgetattr(slave) == before


@pytest.mark.parametrize("spec", ["none", "file:/tmp/x"])
def test_attach_stdin_takes_no_input_for_other_consoles(spec: str, pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    machine = FakeMachine()
    with attach_stdin(spec, machine, fd=slave):
        assert termios.tcgetattr(slave) == before
    assert machine.stops == []
