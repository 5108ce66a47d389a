"""The root-cell ends of a virtio-console: a pty, a UNIX socket, a log file, or stdio.

Each port moves bytes with non-blocking file descriptors on the daemon's event loop and never
waits: a write the host side cannot take now returns short, and the port calls the console's
``host_writable`` once it can take more; input is read only while the console has room for it
(``pause_input``/``resume_input``), so a cell that never reads holds the host side back
instead of growing a buffer.

A port outlives the links it serves: ``serve`` opens it once per configured device (the pty's
path, the socket's client stay while the cell is re-created) and closes it only on shutdown or
when a reload changes the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import sys
import termios
import tty
from typing import TYPE_CHECKING, Protocol

import structlog

from ivshmem_virtio.errors import ConfigError

if TYPE_CHECKING:
    from ..devices.console_service import ConsoleService

log = structlog.get_logger("ivshmem_virtio.backend.console")

READ_CHUNK = 4096
WINSIZE = struct.Struct("HHHH")  # struct winsize: rows, cols, xpixel, ypixel
RESIZE_POLL_S = 0.25  # a pty has no resize signal on the master side: look this often


class HostPort(Protocol):
    """What the console service needs from its host side."""

    def start(self, console: ConsoleService) -> None: ...
    def write(self, data: memoryview) -> int: ...
    def pause_input(self) -> None: ...
    def resume_input(self) -> None: ...
    def close(self) -> None: ...
    def describe(self) -> str: ...


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def winsize(fd: int) -> tuple[int, int] | None:
    """(cols, rows) of a terminal, or None."""
    try:
        rows, cols, _x, _y = WINSIZE.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return cols, rows


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, WINSIZE.pack(rows, cols, 0, 0))


class FdPort:
    """A port over one input fd and one output fd (either may be absent)."""

    def __init__(self, in_fd: int | None, out_fd: int | None) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.console: ConsoleService | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._paused = False
        self._writer = False

    def start(self, console: ConsoleService) -> None:
        self.console = console
        self.loop = asyncio.get_running_loop()
        self._watch_input()

    def _watch_input(self) -> None:
        if self.loop is not None and self.in_fd is not None and not self._reading \
                and not self._paused:
            self.loop.add_reader(self.in_fd, self._readable)
            self._reading = True

    def _unwatch_input(self) -> None:
        if self._reading and self.loop is not None and self.in_fd is not None:
            self.loop.remove_reader(self.in_fd)
        self._reading = False

    def pause_input(self) -> None:
        self._paused = True
        self._unwatch_input()

    def resume_input(self) -> None:
        self._paused = False
        self._watch_input()

    def _readable(self) -> None:
        console = self.console
        assert console is not None and self.in_fd is not None
        room = console.model.input_room()
        if room <= 0:
            self.pause_input()
            return
        try:
            data = os.read(self.in_fd, min(room, READ_CHUNK))
        except BlockingIOError:
            return
        except OSError as e:
            self.input_closed(str(e))
            return
        if not data:
            self.input_closed("end of input")
            return
        console.host_input(data)

    def input_closed(self, why: str) -> None:
        """The input side ended: stop watching it (output still flows)."""
        log.info("console input closed", port=self.describe(), reason=why)
        self._unwatch_input()
        self.in_fd = None

    def write(self, data: memoryview) -> int:
        fd = self.out_fd
        if fd is None:
            return 0
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.output_failed(str(e))
            return 0
        if n < len(data):
            self._wait_writable()
        return n

    def _wait_writable(self) -> None:
        if not self._writer and self.loop is not None and self.out_fd is not None:
            self.loop.add_writer(self.out_fd, self._writable)
            self._writer = True

    def _writable(self) -> None:
        if self._writer and self.loop is not None and self.out_fd is not None:
            self.loop.remove_writer(self.out_fd)
        self._writer = False
        if self.console is not None:
            self.console.host_writable()

    def output_failed(self, why: str) -> None:
        """Nobody can take output any more: keep it (the console holds the cell back)."""
        log.warning("console output failed, holding it", port=self.describe(), reason=why)
        if self._writer and self.loop is not None and self.out_fd is not None:
            self.loop.remove_writer(self.out_fd)
        self._writer = False
        self.out_fd = None

    def close(self) -> None:
        self._unwatch_input()
        if self._writer and self.loop is not None and self.out_fd is not None:
            self.loop.remove_writer(self.out_fd)
        self._writer = False

    def describe(self) -> str:
        return "fd"


class PtyPort(FdPort):
    """A new pseudo-terminal, as QEMU's ``-serial pty``: users attach to :attr:`path`.

    The daemon keeps the slave open itself, so the master never sees a hang-up between users
    and output written while nobody is attached waits in the pty (then in the console) for the
    next one. The slave is raw (no echo, no line editing): the cell's tty does that. The window
    size a user sets on the pty (a terminal program does on attach and on resize) becomes the
    console's cols/rows.
    """

    def __init__(self, cols: int = 80, rows: int = 25) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        set_winsize(master, cols, rows)
        _set_nonblocking(master)
        super().__init__(master, master)
        self.master = master
        self.slave = slave
        self.path = os.ttyname(slave)
        self._size = (cols, rows)
        self._timer: asyncio.TimerHandle | None = None

    def start(self, console: ConsoleService) -> None:
        super().start(console)
        self._poll_size()

    def _poll_size(self) -> None:
        size = winsize(self.master)
        if size is not None and size != self._size and self.console is not None:
            self._size = size
            self.console.host_resized(*size)
        if self.loop is not None:
            self._timer = self.loop.call_later(RESIZE_POLL_S, self._poll_size)

    def input_closed(self, why: str) -> None:
        # EIO without a slave holder cannot happen (we hold one); anything else: stop reading
        log.warning("pty input failed", port=self.path, reason=why)
        self._unwatch_input()

    def close(self) -> None:
        super().close()
        if self._timer is not None:
            self._timer.cancel()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def describe(self) -> str:
        return self.path


class LogPort(FdPort):
    """Output appended to a file; no input. A regular file always takes what is written."""

    def __init__(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise ConfigError(f"--log-file {path}: {e.strerror}") from None
        super().__init__(None, fd)
        self.path = path
        self._fd = fd

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def describe(self) -> str:
        return self.path


def _reopen(fd: int, flags: int) -> int:
    """A private open file description of ``fd`` (so O_NONBLOCK does not reach the shell that
    shares it), or a dup when that is impossible (a socket)."""
    try:
        new = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    except OSError:
        new = os.dup(fd)
    _set_nonblocking(new)
    return new


class StdioPort(FdPort):
    """The daemon's own stdin/stdout, as QEMU's ``-serial stdio``.

    A terminal on stdin is made raw except for signals (Ctrl-C still stops the daemon) and
    restored on close; its window size is the console's, followed on SIGWINCH.
    """

    def __init__(self) -> None:
        in_fd = _reopen(sys.stdin.fileno(), os.O_RDONLY)
        out_fd = _reopen(sys.stdout.fileno(), os.O_WRONLY)
        super().__init__(in_fd, out_fd)
        self._fds = (in_fd, out_fd)
        self._saved: list | None = None
        self._tty = os.isatty(in_fd)

    def start(self, console: ConsoleService) -> None:
        if self._tty:
            self._saved = termios.tcgetattr(self._fds[0])
            tty.setraw(self._fds[0])
            attrs = termios.tcgetattr(self._fds[0])
            attrs[3] |= termios.ISIG  # lflag: Ctrl-C and Ctrl-\ still reach the daemon
            attrs[1] |= termios.OPOST | termios.ONLCR  # our own log lines stay readable
            termios.tcsetattr(self._fds[0], termios.TCSANOW, attrs)
        super().start(console)
        if self._tty:
            self._resized()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGWINCH, self._resized)

    def _resized(self) -> None:
        size = winsize(self._fds[0])
        if size is not None and self.console is not None:
            self.console.host_resized(*size)

    def close(self) -> None:
        super().close()
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._fds[0], termios.TCSADRAIN, self._saved)
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_signal_handler(signal.SIGWINCH)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def describe(self) -> str:
        return "stdio"


class SocketPort(FdPort):
    """A UNIX socket (0600): what a client writes goes to the cell, the cell's output comes back.

    One client at a time; a further one is closed at once (one rate-limited line). While no
    client is connected, output waits (bounded: the console then holds the cell back) and goes
    to the next client.
    """

    def __init__(self, path: str) -> None:
        from ivshmem_virtio.ivshmem.hub import bind_unix

        self.path = path
        self.listener = bind_unix(path, 0o600, what="console")
        self.listener.setblocking(False)
        super().__init__(None, None)
        self.client: socket.socket | None = None
        self.refused = 0

    def start(self, console: ConsoleService) -> None:
        super().start(console)
        assert self.loop is not None
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.client is not None:
            self.refused += 1
            log.warning("console client refused: one is attached", socket=self.path,
                        refused=self.refused)
            conn.close()
            return
        conn.setblocking(False)
        self.client = conn
        self.in_fd = self.out_fd = conn.fileno()
        log.info("console client attached", socket=self.path)
        self._watch_input()
        if self.console is not None:
            self.console.host_writable()  # output that waited for a client

    def _drop_client(self, why: str) -> None:
        if self.client is None:
            return
        self._unwatch_input()
        if self._writer and self.loop is not None and self.out_fd is not None:
            self.loop.remove_writer(self.out_fd)
        self._writer = False
        self.client.close()
        self.client = None
        self.in_fd = self.out_fd = None
        log.info("console client left", socket=self.path, reason=why)

    def input_closed(self, why: str) -> None:
        self._drop_client(why)

    def output_failed(self, why: str) -> None:
        self._drop_client(why)

    def write(self, data: memoryview) -> int:
        if self.client is None:
            return 0
        return super().write(data)

    def close(self) -> None:
        self._drop_client("shutdown")
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def describe(self) -> str:
        return self.path
