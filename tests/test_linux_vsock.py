"""virtio-vsock with a real Linux guest: its AF_VSOCK sockets against host Unix sockets.

The guest's /init is guest/initramfs/vsock-test.c (guest/out/initramfs-vsock.cpio): it
connects to host port 5000 (a Unix listener at ``UDS_5000``) and prints the line it gets
back, then listens on vsock port 1234, echoes one connection and reads another to its
end. The host side here connects through ``UDS`` with Firecracker's ``CONNECT 1234``,
and pushes more data than the guest's and minivmm's credit (256 KiB each) both ways.

On hosts whose KVM emulates guest kernel code this boots guest/out/vmlinux-emulated
(about a minute); elsewhere guest/out/vmlinux.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from guests import guest_artifact
from linuxguest import HARD_TIMEOUT, PLAIN_CMDLINE, kvm_emulates_kernel

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

KERNEL = "vmlinux-emulated" if kvm_emulates_kernel() else "vmlinux"
ECHO_BYTES = 1 << 20  # 4x the guest's receive buffer and minivmm's credit
SINK_BYTES = 600 * 1024
NO_VIOLATIONS = ("minivmm: check-driver: no violations of the virtio 1.2 driver rules "
                 "(1 device watched)")


class Console:
    """minivmm's output (console and stderr), collected by a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.text = ""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._cond:
                self.text += chunk.decode(errors="replace").replace("\r", "")
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while line + "\n" not in self.text:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    pytest.fail(f"no {line!r} on the console; console:\n{self.text[-4000:]}")
                self._cond.wait(min(left, 1))

    def finish(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(10)
        return self.text


def host_listener(path: Path, got: list[bytes]) -> threading.Thread:
    """Port 5000 on the host: read the guest's line, answer one."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(HARD_TIMEOUT)

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(60)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    data += chunk
                got.append(data)
                conn.sendall(b"hello from the host\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def connect(uds: Path, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(uds))
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"minivmm closed the connection after {line!r}"
        line += chunk
    assert re.fullmatch(rb"OK \d+\n", line), line
    return s


def test_linux_guest_vsock(tmp_path: Path) -> None:
    kernel = guest_artifact(KERNEL)
    initrd = guest_artifact("initramfs-vsock.cpio")
    uds = tmp_path / "v.sock"
    got: list[bytes] = []
    listener = host_listener(Path(f"{uds}_5000"), got)
    cmd = [sys.executable, "-m", "minivmm", "run", "--kernel", str(kernel),
           "--initrd", str(initrd), "--mem", "256M", "--vsock", f"cid=7,uds={uds}",
           "--cmdline", PLAIN_CMDLINE, "--stats", "--check-driver"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    console = Console(proc)
    try:
        console.wait_for("vsock-test: listening 1234", HARD_TIMEOUT)
        listener.join(5)
        assert got == [b"hello from the guest\n"]
        assert "vsock-test: host said hello from the host\n" in console.text

        # Echo: write and read at once, more than either side's credit.
        blob = os.urandom(ECHO_BYTES)
        s = connect(uds, 1234)
        def send_all() -> None:
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=send_all, daemon=True)
        writer.start()
        echoed = bytearray()
        while chunk := s.recv(65536):
            echoed += chunk
        writer.join(10)
        s.close()
        assert len(echoed) == len(blob)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
        console.wait_for(f"vsock-test: echoed {ECHO_BYTES} bytes", 120)

        # A guest that only reads: our writes finish once it has read it all.
        s = connect(uds, 1234)
        s.sendall(os.urandom(SINK_BYTES))
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""  # the guest closed: minivmm ends the stream
        s.close()
        console.wait_for(f"vsock-test: sunk {SINK_BYTES} bytes", 120)
        console.wait_for("vsock-test: end", 60)
    finally:
        text = console.finish()
    print(text[-3000:])
    assert "error" not in "".join(ln for ln in text.splitlines() if "vsock-test" in ln)
    # --stats: one "stats: virtio-vsock@0xADDR name: value" line per counter
    stats = [ln for ln in text.splitlines() if ln.startswith("stats: virtio-vsock@")]
    counts = dict(ln.split(" ", 2)[2].split(": ") for ln in stats)
    assert counts["host_connects"] == "2" and counts["guest_connects"] == "1", stats
    assert int(counts["tx_bytes"]) >= ECHO_BYTES and int(counts["rx_bytes"]) >= ECHO_BYTES
    for bad in ("tx_bad_chains", "tx_bad_len", "credit_violations", "protocol_errors",
                "rst_dropped", "tx_unknown_conn"):
        assert counts.get(bad, "0") == "0", stats
    assert not uds.exists()  # minivmm removed its socket
    # Linux's virtio-vsock driver keeps every rule --check-driver knows (a violation is
    # logged as it happens; the summary comes when the VM ends).
    assert "check-driver: " not in text.split(NO_VIOLATIONS)[0], text
    assert NO_VIOLATIONS in text, text[-3000:]
