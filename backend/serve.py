"""``ivshmem-virtio serve``: the root-cell daemon, every configured device on its own link.

The daemon (:class:`ServeDaemon`) owns one :class:`~ivshmem_virtio.backend.device_slot.DeviceSlot`
per configured device (its resources and a runner for each life of its link: ``device_slot.py``;
the link's lock file and lookup: ``serve_links.py``), the CAN groups the slots share, a pyudev
monitor on the ``uio`` subsystem that retries at once when a uio device appears, reloads and the
systemd notifications. One device's link coming and going, or its runner failing, is that
slot's business: the other devices never notice.

SIGHUP re-reads the config and restarts only the devices whose configuration changed (a bad new
config is rejected and the running one kept). SIGTERM stops every runner (in-flight requests
complete and are published), flushes the images, closes the console host sides and leaves.

systemd (``Type=notify``) hears ``READY=1`` once every device made its first attempt, ``STATUS=``
on every change, ``RELOADING=1`` around a reload and ``STOPPING=1`` on shutdown; see
:func:`sd_notify`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable

import structlog

from ivshmem_virtio import shm
from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.log import setup_logging

from .config import DeviceConfig, ServeConfig, load_config
from .device_slot import CanGroup, DeviceSlot
from .serve_links import default_lock_dir

log = structlog.get_logger("ivshmem_virtio.serve")

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
        for note in config.notes:
            print(f"note: {note}")
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
