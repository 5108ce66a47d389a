"""One configured device of ``serve``: its resources, and a runner for each life of its link.

A :class:`DeviceSlot` keeps one :class:`LinkRunner` alive across the life of its link: a link
that is not there yet (sim hub not started, uio device not bound, cell not created) is retried
every ``retry_interval``; a link that goes away (hub stopped, uio device removed: udev
``remove``) stops its runner cleanly and goes back to waiting. The other devices never notice.

Resources (disk images, CAN buses, console host sides) are opened once per slot, after the whole
config validated; a runner only borrows them, so a link coming and going never reopens an image,
and a console's pty keeps its path and its socket its client while the cell is re-created (the
console service is unbound from the runner of the lost link and bound to the next one). Devices
on the same CAN bus with the same options share one :class:`CanGroup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import structlog

from ivshmem_virtio.errors import ConfigError, IvshmemVirtioError
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.transport.device import Phase

from .config import ConsoleOptions, DeviceConfig
from .devices.blk_service import BlkService
from .resources.image import BlockImage
from .runner import LinkRunner, Service
from .serve_links import LinkLock, check_link, link_key, resolve_uio

if TYPE_CHECKING:
    from .devices.can_backend import CanBackend
    from .devices.can_service import CanLinkService
    from .devices.console_service import ConsoleService
    from .serve import ServeDaemon

log = structlog.get_logger("ivshmem_virtio.serve")

#: How often a serving slot checks that its link is still there (hub connection, /dev/uioN).
WATCH_INTERVAL = 0.25
#: How long a sim hub handshake may take before the attempt counts as failed.
SIM_TIMEOUT = 2.0


# -- CAN buses: devices on the same bus with the same options share one switch ------------------

class CanGroup:
    """One python-can bus and its software switch, shared by the can devices that name it."""

    def __init__(self, bus: str, fd: bool, late_tx_ack: bool) -> None:
        from .can_daemon import can_features
        from .devices.can_backend import CanBackend
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
                if os.path.exists(cfg.blk.image):  # else the device waits for it (_supervise)
                    self.image = self._open_image(where)
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

    def _open_image(self, where: str) -> BlockImage:
        blk = self.cfg.blk
        assert blk is not None
        try:
            return BlockImage(blk.image, read_only=blk.read_only)
        except ConfigError as e:
            raise ConfigError(f"{where}.image: {str(e).removeprefix('--image ')}") from None

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
            if self.cfg.blk is not None and self.image is None:
                try:  # the image was not there at start: it may be now
                    self.image = self._open_image(self.name)
                except ConfigError as e:
                    last_error = await self._retry_later("image unavailable, retrying", e,
                                                         last_error)
                    continue
            if self.cfg.link.kind == "vhost-user":
                try:
                    await self._serve_vhost_user()
                except OSError as e:  # the socket could not be made
                    last_error = await self._retry_later(
                        "vhost-user socket unavailable, retrying", e, last_error,
                        link=self.cfg.link.text)
                continue
            try:
                dev = await self._open_link()
            except (IvshmemVirtioError, OSError, ValueError) as e:
                last_error = await self._retry_later("link unavailable, retrying", e,
                                                     last_error, link=self.cfg.link.text)
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

    async def _retry_later(self, event: str, error: Exception, last_error: str,
                           **kw: str) -> str:
        """What the device needs is not there: say so once per new reason (not once per
        retry), show the device as waiting, wait a retry interval; returns the reason."""
        if str(error) != last_error:
            log.warning(event, device=self.name, error=str(error),
                        every=self.daemon.config.retry_interval, **kw)
        self._set_state("waiting")
        self.attempted.set()
        await self._pause(self.daemon.config.retry_interval)
        return str(error)

    # -- opening a link -----------------------------------------------------------------------
    async def _open_link(self) -> IvshmemDevice:
        lk = self.cfg.link
        if lk.kind == "sim":
            from ivshmem_virtio.ivshmem.sim import SimIvshmem

            dev: IvshmemDevice = await asyncio.to_thread(SimIvshmem, lk.path, 0, SIM_TIMEOUT)
        else:
            from ivshmem_virtio.ivshmem.uio import UioIvshmem

            node = resolve_uio(lk, self.daemon.sysfs)
            sysfs = Path(self.daemon.sysfs) / "class" / "uio" / Path(node).name
            dev = UioIvshmem(node, sysfs_dir=sysfs)
            self.devnode = node
        try:
            check_link(self.cfg, dev)
        except BaseException:
            dev.close()
            self.devnode = ""
            raise
        return dev

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

    async def _serve_vhost_user(self) -> None:
        """Listen on the device's vhost-user socket until stop: one VM front-end at a time,
        each connection a fresh session of the same service (``backend/vhost_user.py``). A
        socket that cannot be made raises OSError (retried like a link that is not there)."""
        from .vhost_user import VhostUserServer
        from .vhost_user_daemon import NO_BOUNCE_RW

        cfg = self.cfg
        path = cfg.link.path
        service: Service
        bind = None
        if cfg.blk is not None:
            assert self.image is not None
            service = BlkService(self.image, serial=cfg.blk.serial, rw_size=NO_BOUNCE_RW)
        else:
            assert self.group is not None
            self.group.start()
            can = self.group.backend.add_link(f"vhost-user:{path}")
            service, bind = can, can.bind
        server = VhostUserServer(service, path, bind=bind)
        try:
            server.listen()
            self.incarnations += 1
            log.info("link up", device=self.name, type=cfg.type, link=cfg.link.text)
            self._set_state("serving")
            self.attempted.set()
            task = asyncio.create_task(server.serve_forever(), name=f"vhost-user {self.name}")
            stopping = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                self._lost.clear()
        finally:
            server.close()
            await self._release_service(service, None)

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
