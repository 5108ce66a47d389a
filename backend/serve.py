"""``ivshmem-virtio serve``: the root-cell daemon, every configured device on its own link.

Each device gets a :class:`DeviceSlot` that keeps one :class:`LinkRunner` alive across the life
of its link: a link that is not there yet (sim hub not started, uio device not bound, cell not
created) is retried every ``retry_interval``; a link that goes away (hub stopped, uio device
removed: udev ``remove``) stops its runner cleanly and goes back to waiting. A pyudev monitor on
the ``uio`` subsystem retries at once when a uio device appears. The other devices never notice.

Resources (disk images, CAN buses, console host sides) are opened once per slot, after the whole
config validated; a runner only borrows them, so a link coming and going never reopens an image,
and a console's pty keeps its path and its socket its client while the cell is re-created (the
console service is unbound from the runner of the lost link and bound to the next one).
SIGHUP re-reads the config and restarts only the devices whose configuration changed (a bad new
config is rejected and the running one kept). SIGTERM stops every runner (in-flight requests
complete and are published), flushes the images, closes the console host sides and leaves.

Two daemons on one link would both write its header: every device holds a lock file per link
(:class:`LinkLock`, ``flock``) while it is configured, and a second ``serve`` naming the same
link stops at start with one line naming the holder.

systemd (``Type=notify``) hears ``READY=1`` once every device made its first attempt, ``STATUS=``
on every change, ``RELOADING=1`` around a reload and ``STOPPING=1`` on shutdown; see
:func:`sd_notify`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import structlog

from ivshmem_virtio import shm
from ivshmem_virtio.errors import ConfigError, IvshmemVirtioError, LinkError
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.log import setup_logging
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.transport.device import Phase

from .bind import DRIVER, list_functions
from .config import ConsoleOptions, DeviceConfig, ServeConfig, load_config
from .devices.blk_service import BlkService
from .resources.image import BlockImage
from .runner import LinkRunner, Service

if TYPE_CHECKING:
    from .devices.can_service import CanBackend, CanLinkService
    from .devices.console_service import ConsoleService

log = structlog.get_logger("ivshmem_virtio.serve")

#: How often a serving slot checks that its link is still there (hub connection, /dev/uioN).
WATCH_INTERVAL = 0.25
#: How long a sim hub handshake may take before the attempt counts as failed.
SIM_TIMEOUT = 2.0
#: How long READY=1 waits for the first attempt of every device.
SETTLE_TIMEOUT = 10.0


def sd_notify(*fields: str) -> bool:
    """Send ``fields`` to systemd's $NOTIFY_SOCKET (a datagram); a no-op outside systemd.

    The protocol is one datagram of newline-separated ``KEY=value`` lines to the AF_UNIX path
    in the variable (``@`` = abstract namespace). Written here to need no extra dependency.
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), addr)
    except OSError as e:
        log.warning("cannot notify systemd", error=str(e))
        return False
    return True


def _monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


# -- CAN buses: devices on the same bus with the same options share one switch ------------------

class CanGroup:
    """One python-can bus and its software switch, shared by the can devices that name it."""

    def __init__(self, bus: str, fd: bool, late_tx_ack: bool) -> None:
        from .can_daemon import can_features
        from .devices.can_service import CanBackend
        from .resources.canbus import CanBusBridge, open_bus

        self.key = (bus, fd, late_tx_ack)
        bridge = CanBusBridge(open_bus(bus, fd=fd), name=bus)
        self.backend: CanBackend = CanBackend(bridge, features=can_features(fd, late_tx_ack))
        self.users = 0
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.backend.start()
            self.started = True

    def close(self) -> None:
        self.backend.close()


def open_console(opts: ConsoleOptions, where: str) -> ConsoleService:
    """A console's host side and service, attached to the running loop; errors name the field.

    What validation could not know (a live process on the socket, a log file that will not
    open, no free pty) is a ConfigError here, before any image is opened.
    """
    from .devices.console import ConsoleModel
    from .devices.console_service import ConsoleService
    from .resources.console_host import HostPort, LogPort, PtyPort, SocketPort

    key = {"pty": "pty", "socket": "socket", "log": "log_file"}[opts.sink]
    port: HostPort
    try:
        if opts.sink == "pty":
            port = PtyPort(opts.cols, opts.rows)
        elif opts.sink == "socket":
            port = SocketPort(opts.path)
        else:
            port = LogPort(opts.path)
    except ConfigError as e:  # "--socket PATH: ..." as the console command says it
        raise ConfigError(f"{where}.{key}: {str(e).split(' ', 1)[-1]}") from None
    except OSError as e:
        raise ConfigError(f"{where}.{key}: {opts.path or 'a new pty'}: {e.strerror}") from None
    service = ConsoleService(port, ConsoleModel(cols=opts.cols, rows=opts.rows))
    service.start()
    return service


# -- one lock per link ----------------------------------------------------------------------------

def default_lock_dir() -> str:
    """/run for root (as systemd runs us), else the user's runtime dir, else /tmp."""
    if os.geteuid() == 0:
        return "/run/ivshmem-virtio"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "ivshmem-virtio")
    return f"/tmp/ivshmem-virtio-{os.getuid()}"


def link_key(cfg: DeviceConfig) -> str:
    """A file name for what the link names (sim socket and uio node by real path)."""
    lk = cfg.link
    if lk.kind == "sim":
        key = "sim" + os.path.realpath(lk.path)
    elif lk.path:
        key = "uio" + os.path.realpath(lk.path)
    elif lk.pci:
        key = f"uio-pci-{lk.pci}"
    else:
        key = f"uio-protocol-{lk.protocol:#06x}"
    return re.sub(r"[^A-Za-z0-9.:_-]", "_", key)[:200] + ".lock"


class LinkLock:
    """An exclusive ``flock`` on ``DIR/<link>.lock``, holding the owner's pid for the message.

    The file is removed on release; an acquirer re-checks that the path still names the file it
    locked, so a lock never splits across an unlinked and a new file.
    """

    def __init__(self, directory: str, key: str) -> None:
        self.path = os.path.join(directory, key)
        self.fd = -1

    def acquire(self, what: str) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ConfigError(f"{what} is already served by another process (pid "
                                      f"{holder}, lock {self.path})") from None
                raise ConfigError(f"{what}: lock {self.path}: {e.strerror}") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


# -- one device -----------------------------------------------------------------------------------

class DeviceSlot:
    """One configured device: its resource, and a runner for each life of its link."""

    def __init__(self, cfg: DeviceConfig, daemon: ServeDaemon) -> None:
        self.cfg = cfg
        self.daemon = daemon
        self.image: BlockImage | None = None
        self.group: CanGroup | None = None
        self.console: ConsoleService | None = None
        self.lock: LinkLock | None = None
        self.runner: LinkRunner | None = None
        self.devnode = ""  # the /dev/uioN currently served (uio links)
        self.state = "new"  # new, waiting, serving, stopped
        self.incarnations = 0
        self.attempted = asyncio.Event()  # the first attempt to reach the link is over
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()

    @property
    def name(self) -> str:
        return self.cfg.name

    # -- resources (opened once, before any link) ---------------------------------------------
    def open_resources(self, index: int) -> None:
        """Open the image, join the bus or open the console's host side; a failure is a
        ConfigError naming the field."""
        cfg = self.cfg
        where = f"devices[{index}]"
        lock = LinkLock(self.daemon.lock_dir, link_key(cfg))
        lock.acquire(f"{where}.link: {cfg.link.text}")
        self.lock = lock
        try:
            if cfg.blk is not None:
                try:
                    self.image = BlockImage(cfg.blk.image, read_only=cfg.blk.read_only)
                except ConfigError as e:
                    raise ConfigError(f"{where}.image: {str(e).removeprefix('--image ')}") \
                        from None
            elif cfg.can is not None:
                try:
                    self.group = self.daemon.can_group(cfg.can.bus, cfg.can.fd,
                                                       cfg.can.late_tx_ack)
                except ConfigError as e:
                    raise ConfigError(f"{where}.bus: {str(e).removeprefix('--bus ')}") from None
                self.group.users += 1
            elif cfg.console is not None:
                self.console = open_console(cfg.console, where)
                log.info("console host side", device=self.name, sink=cfg.console.sink,
                         path=self.console.port.describe())
        except BaseException:
            self.release_lock()
            raise

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon_resources(self) -> None:
        """Undo :meth:`open_resources` when a startup fails: nothing was served, nothing to
        flush (an image is closed, not flushed)."""
        if self.image is not None:
            self.image.close()
            self.image = None
        if self.group is not None:
            group, self.group = self.group, None
            self.daemon.release_can_group(group)
        if self.console is not None:
            self.console.close()
            self.console = None
        self.release_lock()

    async def close_resources(self) -> None:
        if self.console is not None:
            console, self.console = self.console, None
            console.flush_output()
            unread = console.model.output_len
            console.close()
            if unread:
                log.warning("console output never read", device=self.name, bytes=unread)
        if self.image is not None:
            image, self.image = self.image, None
            try:
                if not image.read_only:
                    await asyncio.to_thread(image.flush)
            except OSError as e:
                log.error("flush failed", device=self.name, error=str(e))
            finally:
                image.close()
        if self.group is not None:
            group, self.group = self.group, None
            self.daemon.release_can_group(group)
        self.release_lock()

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"device {self.name}")

    async def stop(self) -> None:
        """Stop serving: the runner finishes in-flight requests, then the image is flushed."""
        self._stopping = True
        self._wake.set()
        self._lost.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.close_resources()
        self.state = "stopped"

    def retry_now(self) -> None:
        """A uio device appeared: try again without waiting for the retry timer."""
        self._wake.set()

    def link_removed(self, devnode: str) -> None:
        if self.devnode and devnode == self.devnode:
            self._lost.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _supervise(self) -> None:
        last_error = ""
        while not self._stopping:
            try:
                dev = await self._open_link()
            except (IvshmemVirtioError, OSError, ValueError) as e:
                if str(e) != last_error:  # one line per new reason, not one per retry
                    log.warning("link unavailable, retrying", device=self.name,
                                link=self.cfg.link.text, error=str(e),
                                every=self.daemon.config.retry_interval)
                    last_error = str(e)
                self._set_state("waiting")
                self.attempted.set()
                await self._pause(self.daemon.config.retry_interval)
                continue
            last_error = ""
            failed = True
            try:
                if not self._stopping:  # stop() came while the link was opening
                    failed = await self._serve(dev)
            except Exception as e:  # noqa: BLE001 - one device's bug must not end the daemon
                log.error("device failed", device=self.name, link=dev.name, error=repr(e))
            finally:
                dev.close()
                self.devnode = ""
                self._lost.clear()
                self.attempted.set()
            if not self._stopping:
                self._set_state("waiting")
                # a runner that crashed waits a full interval; a link that went away retries soon
                await self._pause(self.daemon.config.retry_interval if failed else 0.1)

    # -- opening a link -----------------------------------------------------------------------
    async def _open_link(self) -> IvshmemDevice:
        lk = self.cfg.link
        if lk.kind == "sim":
            from ivshmem_virtio.ivshmem.sim import SimIvshmem

            dev: IvshmemDevice = await asyncio.to_thread(SimIvshmem, lk.path, 0, SIM_TIMEOUT)
        else:
            from ivshmem_virtio.ivshmem.uio import UioIvshmem

            node = self._resolve_uio()
            sysfs = Path(self.daemon.sysfs) / "class" / "uio" / Path(node).name
            dev = UioIvshmem(node, sysfs_dir=sysfs)
            self.devnode = node
        try:
            self._check_link(dev)
        except BaseException:
            dev.close()
            self.devnode = ""
            raise
        return dev

    def _resolve_uio(self) -> str:
        """The /dev/uioN this device's link names, as things stand right now."""
        lk = self.cfg.link
        if lk.path:
            if not os.path.exists(lk.path):
                raise LinkError(f"{lk.path} does not exist")
            return lk.path
        functions = list_functions(self.daemon.sysfs)
        if lk.pci:
            match = [f for f in functions if f.pci == lk.pci]
            if not match:
                raise LinkError(f"no ivshmem PCI function {lk.pci} (hypervisor not enabled, or "
                                "the root cell config lacks it)")
            if not match[0].uio:
                raise LinkError(f"{lk.pci} is not bound to {DRIVER} (driver: "
                                f"{match[0].driver or 'none'}); run `ivshmem-virtio bind`")
            return match[0].uio
        match = [f for f in functions if f.protocol == lk.protocol and f.uio]
        if not match:
            raise LinkError(f"no {DRIVER} device with protocol {lk.protocol:#06x}; "
                            "run `ivshmem-virtio bind` and check `ivshmem-virtio bind --list`")
        if len(match) > 1:
            raise LinkError(f"{len(match)} {DRIVER} devices carry protocol {lk.protocol:#06x} "
                            f"({', '.join(f.pci for f in match)}): name one with uio:pci=")
        return match[0].uio

    def _check_link(self, dev: IvshmemDevice) -> None:
        want = self.cfg.protocol
        if dev.protocol != want:
            raise LinkError(f"{dev.name}: the link's protocol is {dev.protocol:#06x}, a "
                            f"{self.cfg.type} backend needs {want:#06x}")
        if dev.id != 0 or dev.max_peers != 2:
            raise LinkError(f"{dev.name}: ID {dev.id} of {dev.max_peers} peers; a virtio "
                            "backend is ID 0 on a 2-peer link")
        if dev.rw.size < 2 * H.PAGE_SIZE:
            raise LinkError(f"{dev.name}: R/W section of {dev.rw.size:#x} bytes is smaller "
                            "than two pages")

    def _link_lost(self, dev: IvshmemDevice) -> bool:
        if self._lost.is_set():
            return True
        hub_fileno = getattr(dev, "hub_fileno", None)
        if hub_fileno is not None:
            # SimIvshmem lists its hub socket among the interrupt fds only while the hub is
            # there: without the hub the link is gone (the cell was destroyed)
            return hub_fileno() not in dev.interrupt_fds()
        return bool(self.devnode) and not os.path.exists(self.devnode)

    # -- serving one life of the link ---------------------------------------------------------
    def _service(self, dev: IvshmemDevice) -> Service:
        cfg = self.cfg
        if cfg.blk is not None:
            assert self.image is not None
            return BlkService(self.image, serial=cfg.blk.serial, rw_size=dev.rw.size)
        if cfg.console is not None:
            assert self.console is not None
            return self.console
        assert self.group is not None
        self.group.start()
        return self.group.backend.add_link(cfg.name)

    async def _serve(self, dev: IvshmemDevice) -> bool:
        """Run one runner until the link goes or we stop; True if it failed on its own."""
        cfg = self.cfg
        service = self._service(dev)
        try:
            if cfg.console is not None:
                from .devices.console_service import ConsoleRunner

                runner: LinkRunner = ConsoleRunner(  # binds the service to this life's runner
                    dev, cast("ConsoleService", service), mode=cfg.mode, spin_us=cfg.spin_us,
                    queue_size=cfg.queue_size, workers=1)
            else:
                runner = LinkRunner(dev, service, mode=cfg.mode, spin_us=cfg.spin_us,
                                    queue_size=cfg.queue_size, workers=2 if cfg.blk else 1)
        except BaseException:
            await self._release_service(service, None)
            raise
        if cfg.can is not None:
            cast("CanLinkService", service).bind(runner)
        self.runner = runner
        task = asyncio.create_task(runner.run(), name=f"runner {self.name}")
        self.incarnations += 1
        log.info("link up", device=self.name, type=cfg.type, link=dev.name,
                 vectors=dev.vectors, rw_size=hex(dev.rw.size))
        self._set_state("serving")
        failed = False
        try:
            await self._settle(runner, task)
            self.attempted.set()
            while not task.done() and not self._stopping and not self._link_lost(dev):
                lost = asyncio.ensure_future(self._lost.wait())
                await asyncio.wait([task, lost], timeout=WATCH_INTERVAL)
                lost.cancel()
        finally:
            runner.stop()
            try:
                await task
            except Exception as e:  # noqa: BLE001 - a dead runner must not take the daemon
                failed = True
                log.error("device runner failed", device=self.name, link=dev.name,
                          error=repr(e))
            self.runner = None
            await self._release_service(service, runner)
        if not self._stopping:
            log.warning("link lost, waiting for it to come back", device=self.name,
                        link=dev.name)
        return failed

    async def _settle(self, runner: LinkRunner, task: asyncio.Task) -> None:
        """Wait (briefly) until the backend wrote READY, so systemd's READY=1 means it."""
        deadline = time.monotonic() + 1.0
        while (runner.transport.phase is Phase.WAIT_PEER_RESET and not task.done()
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)

    async def _release_service(self, service: Service, runner: LinkRunner | None) -> None:
        """The end of one life of the link: the slot's resource stays open for the next."""
        if self.cfg.console is not None:
            if runner is not None:  # unbound, not closed: the host side waits for the cell
                cast("ConsoleService", service).unbind(runner)
        elif self.cfg.blk is not None:
            if self.image is not None and not self.image.read_only:
                try:
                    await asyncio.to_thread(self.image.flush)
                except OSError as e:
                    log.error("flush failed", device=self.name, error=str(e))
        else:
            service.close()  # a can link: detaches it from the switch, the bus stays

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.daemon.status_changed()


# -- the daemon -----------------------------------------------------------------------------------

class ServeDaemon:
    """Owns the slots, the CAN groups, the udev monitor, reloads and systemd notifications."""

    def __init__(self, config_path: str, config: ServeConfig, sysfs: str = "/sys",
                 lock_dir: str | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.sysfs = sysfs
        self.lock_dir = lock_dir or default_lock_dir()
        self.slots: dict[str, DeviceSlot] = {}
        self.can_groups: dict[tuple[str, bool, bool], CanGroup] = {}
        self._monitor: UioMonitor | None = None
        self._reload_lock = asyncio.Lock()
        self._last_status = ""
        self.reloads = 0

    # -- CAN groups -----------------------------------------------------------------------------
    def can_group(self, bus: str, fd: bool, late_tx_ack: bool) -> CanGroup:
        key = (bus, fd, late_tx_ack)
        group = self.can_groups.get(key)
        if group is None:
            group = self.can_groups[key] = CanGroup(bus, fd, late_tx_ack)
        return group

    def release_can_group(self, group: CanGroup) -> None:
        group.users -= 1
        if group.users <= 0 and self.can_groups.get(group.key) is group:
            del self.can_groups[group.key]
            group.close()

    # -- start, stop ----------------------------------------------------------------------------
    def _new_slots(self, devices: tuple[DeviceConfig, ...] | list[DeviceConfig],
                   strict: bool) -> list[DeviceSlot]:
        """Open the resources of ``devices``; ``strict`` (startup): all or nothing."""
        opened: list[DeviceSlot] = []
        index = {d.name: i for i, d in enumerate(self.config.devices)}
        # buses first: a bus that will not open must not leave an image opened for writing
        for cfg in sorted(devices, key=lambda d: d.blk is not None):
            slot = DeviceSlot(cfg, self)
            try:
                slot.open_resources(index.get(cfg.name, 0))
            except ConfigError as e:
                if strict:
                    for s in opened:
                        s.abandon_resources()
                    raise
                log.error("device not started", device=cfg.name, error=str(e))
                continue
            opened.append(slot)
        return opened

    async def start(self) -> None:
        async with self._reload_lock:  # a SIGHUP this early waits for the start to finish
            slots = self._new_slots(self.config.devices, strict=True)
            for slot in slots:
                self.slots[slot.name] = slot
                slot.start()
            self._watch_uio()
            if not slots:
                log.warning("no devices configured", config=self.config_path)
            log.info("serve started", config=self.config_path, devices=[s.name for s in slots])
            await self._settle(slots)
        sd_notify("READY=1", self._status())
        log.info("serve ready", devices=len(self.slots), serving=self._serving())

    async def _settle(self, slots: list[DeviceSlot]) -> None:
        if slots:
            waits = [asyncio.ensure_future(s.attempted.wait()) for s in slots]
            _done, pending = await asyncio.wait(waits, timeout=SETTLE_TIMEOUT)
            for p in pending:
                p.cancel()

    async def shutdown(self) -> None:
        sd_notify("STOPPING=1", "STATUS=stopping: completing in-flight requests")
        log.info("stopping", devices=len(self.slots))
        await asyncio.gather(*(s.stop() for s in self.slots.values()))
        self.slots.clear()
        for group in list(self.can_groups.values()):
            group.close()
        self.can_groups.clear()
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    # -- reload ---------------------------------------------------------------------------------
    async def reload(self) -> None:
        """SIGHUP: re-read the config; restart only the devices whose configuration changed."""
        async with self._reload_lock:
            sd_notify("RELOADING=1", _monotonic_usec(), "STATUS=reloading the configuration")
            try:
                new = load_config(self.config_path)
            except ConfigError as e:
                log.error("reload rejected, keeping the running config", error=str(e))
                sd_notify("READY=1", f"STATUS=reload rejected: {e}")
                return
            old = {d.name: d for d in self.config.devices}
            fresh = {d.name: d for d in new.devices}
            removed = [n for n in old if n not in fresh]
            changed = [n for n in old if n in fresh and old[n] != fresh[n]]
            added = [n for n in fresh if n not in old]
            await asyncio.gather(*(self.slots.pop(n).stop() for n in removed + changed
                                   if n in self.slots))
            if (new.log_level, new.log_json) != (self.config.log_level, self.config.log_json):
                setup_logging(json=new.log_json, level=new.log_level)
            self.config = new
            slots = self._new_slots([fresh[n] for n in changed + added], strict=False)
            for slot in slots:
                self.slots[slot.name] = slot
                slot.start()
            self._watch_uio()
            await self._settle(slots)
            self.reloads += 1
            log.info("config reloaded", added=added, changed=changed, removed=removed,
                     unchanged=len(fresh) - len(added) - len(changed))
            sd_notify("READY=1", self._status())

    # -- uio devices coming and going -----------------------------------------------------------
    def _watch_uio(self) -> None:
        if self._monitor is not None or not any(
                s.cfg.link.kind == "uio" for s in self.slots.values()):
            return
        try:
            self._monitor = UioMonitor(self._uio_event)
        except Exception as e:  # noqa: BLE001 - no udev (container): the retry timer still works
            log.warning("no udev monitor; uio devices are found by periodic retry",
                        error=str(e))

    def _uio_event(self, action: str, devnode: str) -> None:
        log.info("uio event", action=action, device=devnode)
        for slot in self.slots.values():
            if slot.cfg.link.kind != "uio":
                continue
            if action == "remove":
                slot.link_removed(devnode)
            else:
                slot.retry_now()

    # -- status ---------------------------------------------------------------------------------
    def _serving(self) -> int:
        return sum(1 for s in self.slots.values() if s.state == "serving")

    def _status(self) -> str:
        waiting = sorted(s.name for s in self.slots.values() if s.state != "serving")
        text = f"STATUS=serving {self._serving()}/{len(self.slots)} devices"
        return text + (f"; waiting for {', '.join(waiting)}" if waiting else "")

    def status_changed(self) -> None:
        status = self._status()
        if status != self._last_status:
            self._last_status = status
            sd_notify(status)


class UioMonitor:
    """pyudev netlink monitor on the ``uio`` subsystem, read from the event loop."""

    def __init__(self, on_event: Callable[[str, str], None]) -> None:
        import pyudev

        self.on_event = on_event
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        self.monitor.filter_by("uio")
        self.monitor.start()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.monitor.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            device = self.monitor.poll(timeout=0)
            if device is None:
                return
            self.on_event(device.action or "", device.device_node or f"/dev/{device.sys_name}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.monitor.fileno())


async def run_serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """The ``serve`` subcommand: validate everything, open resources, serve until a signal."""
    file_only = getattr(args, "file_only", False)
    if file_only and not args.check:
        raise ConfigError("--file-only goes with --check")
    config = load_config(args.config, host=not file_only)
    if args.check:
        print(f"{args.config}: OK, {len(config.devices)} device(s): "
              + ", ".join(f"{d.name} ({d.type} on {d.link})" for d in config.devices)
              + ("; images not checked (--file-only)" if file_only else ""))
        return 0
    setup_logging(json=config.log_json, level=config.log_level)
    if not shm.BARRIERS_EXACT:  # no way to order the ring accesses on this CPU
        raise ConfigError(shm.BARRIER_HELP)
    daemon = ServeDaemon(args.config, config, sysfs=args.sysfs,
                         lock_dir=getattr(args, "lock_dir", None))
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()

    def on_hup() -> None:
        task = asyncio.create_task(daemon.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await daemon.start()  # a resource that will not open: ConfigError, nothing to stop
    except BaseException:
        loop.remove_signal_handler(signal.SIGHUP)
        raise
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            with contextlib.suppress(Exception):
                await task
        await daemon.shutdown()
    log.info("stopped")
    return 0
