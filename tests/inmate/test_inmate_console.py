"""The C inmate's log and command line over virtio-console (issue 18 item 3).

Real processes: two sim hubs (the virtio-can link and the console link), ``ivshmem-virtio
console --socket`` as the console's back end, and the hosted inmate with ``--console`` on the
second hub; the MCP2515 simulator runs in this process (its wire is a python-can ``virtual``
channel). No virtio-can back end: the fast-reply rule answers on the wire without one, which is
the CAN path that must keep working while the console is used (and abused).

Every process is started with a deadline and ended by its pid; sockets live in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ivshmem_virtio.spec import console as con_wire

from .test_virtio_inmate import BITRATE, OSC, RULE, Inmate, Wire, inmate_binary, start_hub

__all__ = ["inmate_binary"]  # the fixture, used by name

CON_PROTOCOLS = (f"{con_wire.IVSHMEM_PROTOCOL_CONSOLE_BACKEND:#06x},"
                 f"{con_wire.IVSHMEM_PROTOCOL_CONSOLE_FRONTEND:#06x}")


class Terminal:
    """The user at the console's UNIX socket: what was typed, what came back."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.got = b""

    @classmethod
    def after_another(cls, path: Path, timeout: float = 10.0) -> Terminal:
        """Connect once the back end has seen the previous client go: until then it closes a
        second client at once (one client at a time), which is not what a test is about."""
        deadline = time.monotonic() + timeout
        while True:
            term = cls(path)
            r, _, _ = select.select([term.sock], [], [], 0.5)
            if not r:
                return term  # accepted, nothing queued yet
            try:
                chunk = term.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                term.got += chunk  # accepted: queued output already on its way
                return term
            term.close()
            assert time.monotonic() < deadline, "the console kept refusing a new client"
            time.sleep(0.1)

    def type(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, want: bytes | re.Pattern[bytes], timeout: float = 15.0,
                   start: int = 0) -> int:
        """Read until ``want`` shows in the output after ``start``; returns where it ends."""
        end = time.monotonic() + timeout
        while True:
            if isinstance(want, bytes):
                at = self.got.find(want, start)
                if at >= 0:
                    return at + len(want)
            else:
                m = want.search(self.got, start)
                if m:
                    return m.end()
            left = end - time.monotonic()
            assert left > 0, f"{want!r} not seen; output after {start}: {self.got[start:]!r}"
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                chunk = self.sock.recv(65536)
                assert chunk, f"console closed before {want!r}; got {self.got[start:]!r}"
                self.got += chunk

    def command(self, line: bytes, last: bytes, timeout: float = 15.0) -> bytes:
        """Type ``line`` + CR and return the output from its echo to ``last`` (inclusive)."""
        start = len(self.got)
        self.type(line + b"\r")
        echo_end = self.read_until(line + b"\r\n", timeout, start)
        end = self.read_until(last, timeout, echo_end)
        return self.got[echo_end:end]

    def close(self) -> None:
        self.sock.close()


@dataclass
class ConsoleCell:
    work: Path
    wire: Wire
    inmate: Inmate
    backend: object  # Child
    path: Path       # the console's UNIX socket


@contextlib.contextmanager
def console_cell(work: Path, binary: Path, procs) -> Iterator[ConsoleCell]:  # noqa: ANN001
    """CAN hub, console hub + back end, the wire with its chip, the inmate on both links."""
    wire_: Wire | None = None
    inmate: Inmate | None = None
    hub = start_hub(work, "l0")  # the virtio-can link (no back end on it)
    try:
        con_sock = str(work / "con.sock")
        procs.hub(con_sock, "--rw-size", "0x40000", protocols=CON_PROTOCOLS)
        path = work / "console.sock"
        backend = procs.start("console", "console", "--link", f"sim:{con_sock}", "--socket",
                              str(path), "--mode", "block", wait="backend ready")
        wire_ = Wire(work / "spi.sock")
        inmate = Inmate(binary, ["--spi", str(work / "spi.sock"), "--link",
                                 str(work / "l0.sock"), "--osc", str(OSC), "--bitrate",
                                 str(BITRATE), "--rule", RULE, "--max-ms", "120000",
                                 "--console", con_sock], work / "inmate.log")
        inmate.expect("READY")
        inmate.event("CONSOLE_LINK_UP")
        yield ConsoleCell(work, wire_, inmate, backend, path)
    finally:
        if inmate is not None:
            assert inmate.stop() == 0, inmate.stderr()
        hub.stop(10)
        if wire_ is not None:
            wire_.close()


def fast_reply_works(c: ConsoleCell, seen_before: int) -> None:
    c.wire.send(0x100, b"\x11")
    seen = c.wire.wait_count(seen_before + 1)
    assert (seen[-1].arbitration_id, bytes(seen[-1].data)) == (0x101, b"\x22\x11")


def test_log_and_commands_over_the_console(tmp_path: Path, inmate_binary: Path,  # noqa: F811
                                           procs) -> None:  # noqa: ANN001
    with console_cell(tmp_path, inmate_binary, procs) as c:
        term = Terminal(c.path)
        try:
            # the start-up log, written before the console was up, arrives in order
            term.read_until(re.compile(rb"mcp2515: osc 16000000 Hz, 500000 bit/s[^\n]*\r\n"))
            term.read_until(b"rule 0: 100:11->101:22$0\r\n")
            term.read_until(b"virtio-console: LINK_UP features=")
            # a fast reply while the console is attached
            fast_reply_works(c, 0)
            out = term.command(b"stats", re.compile(rb"console: link=live[^\n]*\r\n"))
            assert re.search(rb"can: state=ERROR_ACTIVE rx=1 tx=1 fast_replies=1 ", out), out
            assert re.search(rb"rules: count=1 seen=1 matched=1 replied=1 ", out), out
            assert b"virtio-can: link=down" in out, out  # no virtio-can back end here
            assert re.search(rb"log: lines=\d+ dropped=0 ", out), out
            out = term.command(b"rules", b"replied=1\r\n")
            assert out == b"rules: 1\r\n  0: 100:11->101:22$0 matched=1 replied=1\r\n", out
            # an unknown command: exactly one line, then the next command is answered
            out = term.command(b"bogus  arg", b"\r\n")
            assert out == b"error: unknown command 'bogus' (try help)\r\n", out
            out = term.command(b"help", b"or none\r\n")
            assert out.startswith(b"commands: help | stats | rules | log on"), out
            # the editor: backspace erases (echo "\b \b"), ^U drops the line, LF alone ends one
            start = len(term.got)
            term.type(b"rulex\x7fs\n")
            term.read_until(b"rulex\b \bs\r\nrules: 1\r\n", start=start)
            start = len(term.got)
            term.type(b"stats\x15rules\r\n")  # CRLF is one line end, not two
            end = term.read_until(b"^U\r\nrules\r\nrules: 1\r\n", start=start)
            term.read_until(b"replied=1\r\n", start=end)
            # periodic stats on the console
            start = len(term.got)
            out = term.command(b"log on 1", b"log: stats every 1 s\r\n")
            term.read_until(b"console: link=live", timeout=10, start=start + len(out))
            term.command(b"log off", b"log: stats off\r\n")
            fast_reply_works(c, 1)
        finally:
            term.close()
        stats = c.inmate.stats()
        assert stats["console"] == "live" and stats["replied"] == "2", stats


def test_hostile_input_and_nobody_reading(tmp_path: Path, inmate_binary: Path,  # noqa: F811
                                          procs) -> None:  # noqa: ANN001
    with console_cell(tmp_path, inmate_binary, procs) as c:
        term = Terminal(c.path)
        try:
            term.read_until(b"virtio-console: LINK_UP")
            # a 10 KiB line: refused with one line, nothing of it run
            start = len(term.got)
            term.type(b"stats" + b"x" * 10240 + b"\r")
            refused = b"error: line longer than 80 characters, ignored\r\n"
            end = term.read_until(refused, timeout=30, start=start)
            # the echo stops at 80 characters; nothing but the one error line follows
            assert term.got[start:end] == b"stats" + b"x" * 75 + b"\r\n" + refused
            # binary garbage (control bytes, non-ASCII) then a line: still a working shell
            junk = bytes(b for b in range(256) if b not in b"\r\n\x03\x15\x08\x7f") * 64
            term.type(junk + b"\x15")  # ^U: whatever the junk left on the line goes
            out = term.command(b"rules", b"replied=0\r\n", timeout=30)
            assert out.endswith(b"rules: 1\r\n  0: 100:11->101:22$0 matched=0 replied=0\r\n")
            fast_reply_works(c, 0)
        finally:
            term.close()
        # nobody reads: the flood of answers fills the back end and then the inmate's ring,
        # which drops lines (counted) while the CAN side goes on
        flood = Terminal(c.path)
        stop = threading.Event()

        def type_forever() -> None:
            flood.sock.settimeout(0.5)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError, OSError):
                    flood.sock.send(b"stats\n" * 100)

        typist = threading.Thread(target=type_forever, daemon=True)
        typist.start()
        try:
            deadline = time.monotonic() + 60
            while int(c.inmate.stats()["log_dropped"]) == 0:
                assert time.monotonic() < deadline, "the log ring never dropped a line"
                time.sleep(0.2)
            fast_reply_works(c, 1)
            stats = c.inmate.stats()
            assert stats["replied"] == "2" and stats["console"] == "live", stats
        finally:
            stop.set()
            typist.join(10)
            flood.close()
        # a new reader gets the console back: what was still queued, the note of the lines
        # the inmate dropped, and answers that show the drop counter
        term = Terminal.after_another(c.path)
        try:
            term.type(b"\x15\rstats\r")
            term.read_until(re.compile(rb"\[log: \d+ lines dropped\]\r\n"), timeout=60)
            term.read_until(re.compile(rb"log: lines=\d+ dropped=[1-9]\d* "), timeout=60)
        finally:
            term.close()
