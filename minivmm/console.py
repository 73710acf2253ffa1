"""The console: where the guest's serial output goes, and how the user's keys reach it.

Three pieces, all independent of KVM:

* Sinks, chosen by ``--console`` and opened by ``open_sink``: ``stdio`` (the VMM's
  standard output, written with os.write, no Python buffering), ``file:PATH`` (a new
  file, replacing an old one) and ``none`` (discarded). Each has ``write(bytes)``,
  ``writev(views)`` (the guest's buffers, uncopied) and ``close()``; writes from
  several threads (the UART on a vCPU, virtio-console on the device thread) never
  interleave.
* ``PipeFeeder``: console input on its way to virtio-console, through a pipe the device
  reads. Writes never block: what the pipe can't take waits in a bounded backlog.
* ``RawTerminal``: while it is entered, a terminal on standard input is in raw mode (no
  echo, no line editing, no signals from keys: Ctrl-C goes to the guest). It is always
  put back: on leaving the ``with`` block, on an exception, at interpreter exit (atexit),
  and on SIGTERM/SIGHUP/SIGQUIT when nobody else handles them (the handler restores the
  terminal, then lets the signal kill the process as it would have). Only SIGKILL can
  leave the terminal raw; ``stty sane`` repairs it.
* ``InputPump``: a daemon thread reading standard input and passing the bytes to a
  callback (the UART's ``enqueue_input``, or a PipeFeeder's ``feed``). On a terminal,
  Ctrl-A is an escape key, as in QEMU: Ctrl-A x ends the VM (``on_quit``), Ctrl-A Ctrl-A
  sends one Ctrl-A, Ctrl-A h prints this list on stderr; Ctrl-A followed by anything
  else sends both keys. The pump stops at end of input (``on_eof``), after Ctrl-A x, and
  on ``stop()``, which wakes its select through a self-pipe. It never blocks on the
  guest: while a feeder has a backlog the pump waits for the pipe to drain, reading a
  terminal on meanwhile (so the escape keys always work) but not a pipe or a file (their
  writer waits instead).

``attach_stdin(spec, machine)`` wires the last two to a VM for ``--console stdio``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import selectors
import signal
import stat
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any, Final, Protocol

from .config import CONSOLES
from .errors import UsageError

log = logging.getLogger(__name__)

# -- sinks ---------------------------------------------------------------------------


class ConsoleSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def writev(self, views: list[memoryview]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """``--console none``: output is counted and discarded."""

    def __init__(self) -> None:
        self.discarded = 0

    def write(self, data: bytes) -> None:
        self.discarded += len(data)

    def writev(self, views: list[memoryview]) -> None:
        self.discarded += sum(map(len, views))

    def close(self) -> None:
        pass


class FdSink:
    """Writes every byte to a file descriptor, in order, however the fd behaves."""

    def __init__(self, fd: int, *, owned: bool) -> None:
        self.fd = fd
        self._owned = owned
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        self.writev([memoryview(data)])

    def writev(self, views: list[memoryview]) -> None:
        """Every byte of ``views``, in order, however short the writes are."""
        with self._lock:
            i = 0
            while i < len(views) and self.fd >= 0:
                try:
                    n = os.writev(self.fd, views[i : i + 1024])
                except BlockingIOError:  # someone made the fd non-blocking
                    select.select([], [self.fd], [])
                    continue
                while i < len(views) and n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                if n:
                    views = [*views[:i], views[i][n:], *views[i + 1 :]]

    def close(self) -> None:
        with self._lock:
            if self._owned and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class StdioSink(FdSink):
    """``--console stdio``: the VMM's standard output (never closed by the sink)."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            try:
                sys.stdout.flush()
                fd = sys.stdout.fileno()
            except (OSError, ValueError, AttributeError):
                fd = 1
        super().__init__(fd, owned=False)


class FileSink(FdSink):
    """``--console file:PATH``: PATH is created or truncated; OSError if it can't be."""

    def __init__(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        super().__init__(os.open(path, flags, 0o644), owned=True)
        self.path = path


def open_sink(spec: str) -> ConsoleSink:
    """Open the sink a console spec names; UsageError (field "console") for a bad one."""
    if spec == "stdio":
        return StdioSink()
    if spec == "none":
        return NullSink()
    if not spec.startswith("file:"):
        raise UsageError(f"expected {CONSOLES}, got {spec!r}", field="console")
    path = spec[len("file:") :]
    if not path:
        raise UsageError("file: needs a path, e.g. file:console.log", field="console")
    if os.path.isdir(path):
        raise UsageError(f"file:{path}: is a directory; name a file inside it",
                         field="console")
    try:
        return FileSink(path)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(f"file:{path}: cannot open for writing ({reason}); check the "
                         "directory exists and is writable", field="console") from None


# -- input into a pipe ----------------------------------------------------------------


class PipeFeeder:
    """Console input for virtio-console: a pipe whose read end the device reads.

    ``feed()`` never blocks: it writes what the pipe takes and keeps the rest in a
    backlog of at most ``limit`` bytes (beyond that, input is dropped with a warning: a
    user typing into a guest that reads nothing). ``flush()`` moves the backlog on when
    the pipe has room; InputPump calls it when ``write_fd`` is writable."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.write_fd, False)
        self.limit = limit
        self._backlog = bytearray()
        self._lock = threading.Lock()
        self.dropped = 0

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def feed(self, data: bytes) -> None:
        with self._lock:
            room = self.limit - len(self._backlog)
            if len(data) > room:
                self.dropped += len(data) - room
                log.warning("console input: the guest is not reading; %d bytes dropped",
                            len(data) - room)
                data = data[:room]
            self._backlog += data
            self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        while self._backlog and self.write_fd >= 0:
            try:
                n = os.write(self.write_fd, self._backlog)
            except (BlockingIOError, BrokenPipeError):
                return
            del self._backlog[:n]

    def close(self) -> None:
        with self._lock:
            for fd in (self.read_fd, self.write_fd):
                if fd >= 0:
                    os.close(fd)
            self.read_fd = self.write_fd = -1


# -- raw terminal --------------------------------------------------------------------

_RESTORE_SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def raw_attributes(attrs: list[Any]) -> list[Any]:
    """Raw mode as cfmakeraw, but keeping output post-processing (OPOST), so the
    VMM's own messages still start at column 0."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class RawTerminal:
    """Puts the terminal on ``fd`` (default: stdin) in raw mode; a no-op if it is not a tty."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            try:
                fd = sys.stdin.fileno()
            except (OSError, ValueError, AttributeError):
                fd = -1
        self.fd = fd
        self._saved: list[Any] | None = None
        self._handlers: dict[int, Any] = {}

    @property
    def active(self) -> bool:
        """Whether the terminal is in raw mode now (and will be restored)."""
        return self._saved is not None

    def enter(self) -> bool:
        """Switch to raw mode; False (and nothing done) if ``fd`` is not a terminal."""
        if self._saved is not None:
            return True
        if self.fd < 0 or not os.isatty(self.fd):
            return False
        saved = termios.tcgetattr(self.fd)
        self._saved = saved
        atexit.register(self.restore)
        self._install_signal_handlers()
        termios.tcsetattr(self.fd, termios.TCSANOW, raw_attributes(saved))
        return True

    def restore(self) -> None:
        """Put the saved attributes back; safe to call any number of times."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(self.fd, termios.TCSANOW, saved)
        atexit.unregister(self.restore)
        for signum, previous in self._handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
        self._handlers.clear()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; atexit still restores
        for signum in _RESTORE_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.restore()  # also puts back the default action
        os.kill(os.getpid(), signum)

    def __enter__(self) -> RawTerminal:
        self.enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


# -- input pump ----------------------------------------------------------------------

ESCAPE_KEY: Final = 0x01  # Ctrl-A
QUIT_KEY: Final = ord("x")
ESCAPE_HELP: Final = (
    b"\r\nminivmm console keys:\r\n"
    b"  Ctrl-A x       end the VM\r\n"
    b"  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n"
    b"  Ctrl-A h       this help\r\n"
)
_READ_SIZE: Final = 4096


class InputPump:
    """Reads ``fd`` on a daemon thread and hands the bytes to ``on_input``.

    ``escape`` (default: whether ``fd`` is a terminal) turns on the Ctrl-A keys. The
    callbacks run on the pump thread: ``on_quit`` after Ctrl-A x, ``on_eof`` at end of
    input or a read error; the pump has stopped reading when either is called.
    """

    def __init__(
        self,
        on_input: Callable[[bytes], object],
        on_quit: Callable[[], None],
        *,
        fd: int = 0,
        escape: bool | None = None,
        on_eof: Callable[[], None] | None = None,
        help_fd: int = 2,
    ) -> None:
        self.fd = fd
        self._on_input = on_input
        self._on_quit = on_quit
        self._on_eof = on_eof
        self._help_fd = help_fd
        self._escape = escape
        self._escape_pending = False
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None

    def start(self) -> bool:
        """Start the thread; False if ``fd`` is not open (nothing to read)."""
        if self._thread is not None:
            return True
        try:
            mode = os.fstat(self.fd).st_mode
        except OSError:
            return False
        if self._escape is None:
            self._escape = stat.S_ISCHR(mode) and os.isatty(self.fd)
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, name="minivmm-stdin", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the thread to end and wait for it; safe to call repeatedly or from it."""
        thread, wake = self._thread, self._wake
        if thread is None or wake is None:
            return
        with contextlib.suppress(OSError):
            os.write(wake[1], b"\0")
        if thread is threading.current_thread():
            return
        thread.join(timeout)
        if not thread.is_alive():
            self._thread = self._wake = None
            os.close(wake[0])
            os.close(wake[1])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        assert self._wake is not None
        feeder = getattr(self._on_input, "__self__", None)
        if not isinstance(feeder, PipeFeeder):
            feeder = None
        with selectors.PollSelector() as sel:  # poll, unlike epoll, accepts regular files
            sel.register(self.fd, selectors.EVENT_READ)
            sel.register(self._wake[0], selectors.EVENT_READ)
            reading, waiting, ended = True, False, False
            while True:
                # While the guest does not take input, wait for the pipe to drain; go on
                # reading a terminal (for the escape keys), not a pipe or a file. At the
                # end of input, what waits is still handed on before on_eof.
                backlog = feeder is not None and feeder.backlog > 0
                if ended and not backlog:
                    if self._on_eof is not None:
                        self._on_eof()
                    return
                if backlog != waiting and feeder is not None:
                    waiting = backlog
                    if waiting:
                        sel.register(feeder.write_fd, selectors.EVENT_WRITE)
                    else:
                        sel.unregister(feeder.write_fd)
                want_read = not ended and (not waiting or bool(self._escape))
                if want_read != reading:
                    reading = want_read
                    if reading:
                        sel.register(self.fd, selectors.EVENT_READ)
                    else:
                        sel.unregister(self.fd)
                ready = {key.fd for key, _ in sel.select()}
                if self._wake[0] in ready:
                    return
                if feeder is not None and feeder.write_fd in ready:
                    feeder.flush()
                if self.fd not in ready:
                    continue
                size = _READ_SIZE
                if feeder is not None and not self._escape:  # never more than fits
                    size = max(1, min(size, feeder.limit - feeder.backlog))
                try:
                    data = os.read(self.fd, size)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:  # e.g. EIO: the terminal hung up
                    log.debug("console input: %s", e)
                    data = b""
                if not data:
                    ended = True
                    continue
                out, quit_ = self._filter(data) if self._escape else (data, False)
                if out:
                    self._on_input(out)
                if quit_:
                    self._on_quit()
                    return

    def _filter(self, data: bytes) -> tuple[bytes, bool]:
        """Apply the Ctrl-A keys: (bytes for the guest, whether Ctrl-A x was typed)."""
        if not self._escape_pending and ESCAPE_KEY not in data:
            return data, False
        out = bytearray()
        for byte in data:
            if not self._escape_pending:
                if byte == ESCAPE_KEY:
                    self._escape_pending = True
                else:
                    out.append(byte)
                continue
            self._escape_pending = False
            if byte == QUIT_KEY:
                return bytes(out), True
            if byte in (ord("h"), ord("?")):
                with contextlib.suppress(OSError):
                    os.write(self._help_fd, ESCAPE_HELP)
            elif byte == ESCAPE_KEY:
                out.append(ESCAPE_KEY)
            else:
                out += bytes((ESCAPE_KEY, byte))
        return bytes(out), False


# -- wiring ---------------------------------------------------------------------------


class ConsoleMachine(Protocol):
    """What ``attach_stdin`` needs from the VM (minivmm.Vm has it)."""

    @property
    def console_input(self) -> Callable[[bytes], object] | None: ...

    def request_stop(self, status: int, reason: str, detail: str = "") -> None: ...


@contextlib.contextmanager
def attach_stdin(spec: str, machine: ConsoleMachine, *, fd: int | None = None) -> Iterator[None]:
    """With ``--console stdio``: raw terminal + input pump into the guest's console (the
    UART, or virtio-console) while inside.

    Ctrl-A x ends the VM with status 0 (reason "console"). End of input leaves the guest
    running without input. Other consoles take no input. On leaving, the pump is
    stopped and the terminal restored, whatever happened inside.
    """
    feed = machine.console_input
    if spec != "stdio" or feed is None:
        yield
        return
    if fd is None:
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError, AttributeError):
            yield
            return
    pump = InputPump(
        feed,
        lambda: machine.request_stop(0, "console", "Ctrl-A x typed on the console"),
        fd=fd,
    )
    with RawTerminal(fd):
        pump.start()
        try:
            yield
        finally:
            pump.stop()
