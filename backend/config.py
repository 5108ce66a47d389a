"""The ``serve`` daemon's TOML configuration: parsed and validated in full before anything opens.

A config names global options and a list of devices, each on its own link::

    log_level = "info"            # debug, info, warning, error
    log_json = false
    mode = "adaptive"             # block, poll or adaptive (per-device override allowed)
    spin_us = 200.0               # adaptive: the longest poll window (each link learns its own;
                                  # default 200, can devices 400: TYPE_SPIN_US)
    retry_interval = 2.0          # seconds between attempts to reach a link that is not there

    [[devices]]
    name = "rootfs"               # optional; defaults to the link text
    type = "blk"
    link = "uio:pci=0000:01:0c.0" # or sim:SOCKET, uio:/dev/uioN, uio:auto, uio:protocol=0xC002
    image = "/var/lib/ivshmem-virtio/rootfs.img"
    read_only = false
    serial = "rootfs"
    queue_size = 256

    [[devices]]
    type = "can"
    link = "uio:protocol=0xC024"
    bus = "socketcan:can0"
    fd = false
    late_tx_ack = true

    [[devices]]
    type = "console"
    link = "uio:protocol=0xC003"
    socket = "/run/ivshmem-virtio/cell.sock"  # or pty = true, or log_file = "PATH"
    cols = 80                     # the size the cell sees (a pty's own window overrides it)
    rows = 25

Every error is one :class:`ConfigError` line naming the field (``devices[1].image: ...``), and
validation only looks (``stat``, ``access``): no image is opened, least of all for writing,
until the whole file is known to be good. Devices compare equal when their configuration is
equal, which is what a SIGHUP reload uses to touch only the devices that changed.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.link import SPIN_CAP_US
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import can as C
from ivshmem_virtio.spec import console as K
from ivshmem_virtio.spec import ivshmem as H

#: a device type's longest poll window when neither the device nor the file sets ``spin_us``:
#: a waiter's idle time includes its own wake-up (20-50 us on a VM), so a 200 us cap never
#: learns CAN frames paced every 200 us (docs/decisions.md, "CAN: the backend's poll window")
TYPE_SPIN_US = {"can": 400.0}

DEFAULT_PATH = "/etc/ivshmem-virtio/config.toml"
MODES = ("block", "poll", "adaptive")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEVICE_TYPES = {"blk": B.DEVICE_ID, "can": C.VIRTIO_ID_CAN, "console": K.VIRTIO_ID_CONSOLE}
#: A console's host side: exactly one of these keys names it.
CONSOLE_SINKS = ("pty", "socket", "log_file")

_GLOBAL_KEYS = {"log_level", "log_json", "mode", "spin_us", "retry_interval", "devices"}
_COMMON_KEYS = {"name", "type", "link", "queue_size", "mode", "spin_us"}
_TYPE_KEYS = {"blk": {"image", "read_only", "serial"}, "can": {"bus", "fd", "late_tx_ack"},
              "console": {*CONSOLE_SINKS, "cols", "rows"}}
#: sun_path holds 107 bytes and a NUL; bind_unix binds first in ``DIR/.sockXXXXXXXX/s``.
_SUN_PATH_MAX = 107
_SOCKET_TMP = len("/.sockXXXXXXXX/s")
_PCI_ADDR = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")


@dataclass(frozen=True)
class LinkSpec:
    """Where a device's link is: a sim hub socket, a uio_ivshmem device chosen some way, or a
    vhost-user socket the daemon listens on (a VM's front-end connects to it)."""

    text: str
    kind: str  # "sim", "uio" or "vhost-user"
    path: str = ""  # sim socket, /dev/uioN, or the vhost-user socket
    pci: str = ""  # uio:pci=DDDD:BB:DD.F, normalised to lower case with a domain
    protocol: int | None = None  # uio:auto and uio:protocol=... (always the device's protocol)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class BlkOptions:
    image: str
    read_only: bool = False
    serial: str = ""


@dataclass(frozen=True)
class CanOptions:
    bus: str
    fd: bool = False
    late_tx_ack: bool = True


@dataclass(frozen=True)
class ConsoleOptions:
    """A console's host side: ``sink`` is "pty", "socket" or "log" (``path`` for the last two)."""

    sink: str
    path: str = ""
    cols: int = 80
    rows: int = 25


@dataclass(frozen=True)
class DeviceConfig:
    """One device; frozen and comparable, so a reload can tell what changed."""

    name: str
    type: str
    link: LinkSpec
    queue_size: int
    mode: str
    spin_us: float
    blk: BlkOptions | None = None
    can: CanOptions | None = None
    console: ConsoleOptions | None = None

    @property
    def device_id(self) -> int:
        return DEVICE_TYPES[self.type]

    @property
    def protocol(self) -> int:
        """The ivshmem protocol the root-cell (backend) side of this device's link carries."""
        return H.backend_protocol(self.device_id)


@dataclass(frozen=True)
class ServeConfig:
    log_level: str = "info"
    log_json: bool = False
    retry_interval: float = 2.0
    devices: tuple[DeviceConfig, ...] = ()
    #: what this host lacks but the daemon waits for (images not there yet): ``--check`` says it
    notes: tuple[str, ...] = field(default=(), compare=False)

    def device(self, name: str) -> DeviceConfig | None:
        return next((d for d in self.devices if d.name == name), None)


# -- typed field readers: each raises one line naming the field -------------------------------

def _bool(table: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")
    return value


def _str(table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in table:
        if default is None:
            raise ConfigError(f"{where}{key}: missing (required)")
        return default
    value = table[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}{key}: expected a string, got {value!r}")
    return value


def _number(table: dict[str, Any], key: str, where: str, default: float, lo: float,
            hi: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}{key}: expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}{key}: {value} is outside {lo:g}..{hi:g}")
    return float(value)


def _choice(table: dict[str, Any], key: str, where: str, default: str,
            choices: tuple[str, ...]) -> str:
    value = _str(table, key, where, default)
    if value not in choices:
        raise ConfigError(f"{where}{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _queue_size(table: dict[str, Any], where: str) -> int:
    value = table.get("queue_size", 256)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}queue_size: expected an integer, got {value!r}")
    if value < 8 or value > 32768 or value & (value - 1):
        raise ConfigError(f"{where}queue_size: {value} is not a power of two from 8 to 32768")
    return value


def _unknown_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"{where}{extra[0]}: unknown option (allowed: "
                          f"{', '.join(sorted(allowed))})")


# -- links, images, buses -----------------------------------------------------------------------

def parse_link_spec(text: str, dtype: str, field: str) -> LinkSpec:
    """Parse one ``link``; ``uio:protocol=`` must name the device type's backend protocol."""
    kind, sep, arg = text.partition(":")
    want = H.backend_protocol(DEVICE_TYPES[dtype])
    usage = ("expected sim:SOCKET, uio:/dev/uioN, uio:auto, uio:pci=DDDD:BB:DD.F, "
             "uio:protocol=0xC0NN or vhost-user:SOCKET")
    if not sep or not arg or kind not in ("sim", "uio", "vhost-user"):
        raise ConfigError(f"{field}: {text!r}: {usage}")
    if kind == "sim":
        return LinkSpec(text, "sim", path=arg)
    if kind == "vhost-user":
        if dtype == "console":
            raise ConfigError(f"{field}: a console is served over ivshmem links only")
        return LinkSpec(text, "vhost-user", path=arg)
    if arg == "auto":
        return LinkSpec(text, "uio", protocol=want)
    if arg.startswith("/"):
        return LinkSpec(text, "uio", path=arg)
    key, eq, value = arg.partition("=")
    if eq and key == "pci":
        m = _PCI_ADDR.match(value)
        if not m:
            raise ConfigError(f"{field}: {value!r} is not a PCI address like 0000:01:0c.0")
        domain, bus, slot, fn = m.groups()
        return LinkSpec(text, "uio", pci=f"{domain or '0000'}:{bus}:{slot}.{fn}".lower())
    if eq and key == "protocol":
        try:
            proto = int(value, 0)
        except ValueError:
            raise ConfigError(f"{field}: protocol {value!r} is not a number") from None
        if proto != want:
            raise ConfigError(f"{field}: protocol {proto:#06x} is not the {dtype} backend "
                              f"protocol {want:#06x}")
        return LinkSpec(text, "uio", protocol=proto)
    raise ConfigError(f"{field}: {text!r}: {usage}")


def check_image(path: str, read_only: bool, field: str) -> bool:
    """Can ``path`` serve as a disk? Looks only: nothing is opened here.

    False when nothing is there yet: not an error, the device waits for its image the way it
    waits for its link (a disk created later, a block device that appears with its USB stick),
    so that one missing disk never keeps the daemon from serving the other cells. Anything
    that is there and cannot serve (a directory, too short, no access) is an error.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ConfigError(f"{field}: {path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        if st.st_size < 512:
            raise ConfigError(f"{field}: {path}: smaller than one 512-byte sector")
    elif not stat.S_ISBLK(st.st_mode):
        raise ConfigError(f"{field}: {path}: not a regular file or block device")
    need = os.R_OK if read_only else os.R_OK | os.W_OK
    if not os.access(path, need):
        what = "readable" if read_only else "readable and writable"
        raise ConfigError(f"{field}: {path}: not {what} by this user")
    return True


def check_bus(spec: str, field: str) -> None:
    """``IFACE:CHANNEL`` with an installed python-can interface (the bus is not opened)."""
    iface, sep, channel = spec.partition(":")
    if not sep or not iface or not channel:
        raise ConfigError(f"{field}: {spec!r}: expected IFACE:CHANNEL, e.g. socketcan:can0")
    from can.interfaces import VALID_INTERFACES

    if iface not in VALID_INTERFACES:
        raise ConfigError(f"{field}: {iface!r} is not an installed python-can interface")


def _console_size(table: dict[str, Any], key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
    if not 1 <= value <= 0xFFFF:
        raise ConfigError(f"{where}{key}: {value} is outside 1..65535")
    return value


def check_console_socket(path: str, field: str) -> None:
    """Can a listening socket be made at ``path``? Looks only: nothing is bound here.

    An existing socket file is fine (a stale one is replaced, a live one refused when the
    socket opens); any other file is refused here, since binding would remove it.
    """
    full = os.path.abspath(path)
    if len(os.fsencode(full)) > _SUN_PATH_MAX \
            or len(os.fsencode(os.path.dirname(full))) + _SOCKET_TMP > _SUN_PATH_MAX:
        raise ConfigError(f"{field}: {path}: too long for a UNIX socket path (at most "
                          f"{_SUN_PATH_MAX - _SOCKET_TMP} bytes of directory)")
    _check_parent(path, field)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{field}: {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{field}: {path}: exists and is not a socket")


def check_log_file(path: str, field: str) -> None:
    """Can console output be appended to ``path``? Looks only: nothing is created here."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _check_parent(path, field)
        return
    except OSError as e:
        raise ConfigError(f"{field}: {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{field}: {path}: is a directory")
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{field}: {path}: not writable by this user")


def _check_parent(path: str, field: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{field}: {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {path}: directory {parent} is not writable by this user")


def _console(raw: dict[str, Any], where: str, host: bool) -> ConsoleOptions:
    """One sink of ``pty = true``, ``socket = PATH``, ``log_file = PATH``; cols/rows."""
    named = [k for k in CONSOLE_SINKS if k in raw]
    if not named:
        raise ConfigError(f"{where}type: a console needs one host side: pty = true, "
                          'socket = "PATH" or log_file = "PATH"')
    if len(named) > 1:
        raise ConfigError(f"{where}{named[1]}: a console has one host side; {named[0]} is "
                          "already set")
    key = named[0]
    cols = _console_size(raw, "cols", where, 80)
    rows = _console_size(raw, "rows", where, 25)
    if key == "pty":
        if not _bool(raw, "pty", where, True):
            raise ConfigError(f"{where}pty: false names no host side: use pty = true, "
                              'socket = "PATH" or log_file = "PATH"')
        return ConsoleOptions("pty", "", cols, rows)
    path = _str(raw, key, where)
    if not path:
        raise ConfigError(f"{where}{key}: must not be empty")
    if host:
        (check_console_socket if key == "socket" else check_log_file)(path, f"{where}{key}")
    return ConsoleOptions("socket" if key == "socket" else "log", path, cols, rows)


# -- the whole file -----------------------------------------------------------------------------

def _device(raw: Any, index: int, defaults: dict[str, Any], host: bool = True,
            notes: list[str] | None = None) -> DeviceConfig:
    where = f"devices[{index}]."
    notes = [] if notes is None else notes
    if not isinstance(raw, dict):
        raise ConfigError(f"devices[{index}]: expected a table ([[devices]]), got {raw!r}")
    dtype = _str(raw, "type", where)
    if dtype not in DEVICE_TYPES:
        raise ConfigError(f"{where}type: {dtype!r} is not one of {', '.join(DEVICE_TYPES)}")
    _unknown_keys(raw, _COMMON_KEYS | _TYPE_KEYS[dtype], where)
    link = parse_link_spec(_str(raw, "link", where), dtype, f"{where}link")
    if host and link.kind == "vhost-user":
        check_console_socket(link.path, f"{where}link")
    name = _str(raw, "name", where, link.text)
    if not name.strip():
        raise ConfigError(f"{where}name: must not be empty")
    common: dict[str, Any]  # the DeviceConfig fields every type has
    common = dict(name=name, type=dtype, link=link, queue_size=_queue_size(raw, where),
                  mode=_choice(raw, "mode", where, defaults["mode"], MODES),
                  spin_us=_number(raw, "spin_us", where,
                                  TYPE_SPIN_US.get(dtype, SPIN_CAP_US)
                                  if defaults["spin_us"] is None else defaults["spin_us"],
                                  0, 1e6))
    if dtype == "blk":
        image = _str(raw, "image", where)
        read_only = _bool(raw, "read_only", where, False)
        serial = _str(raw, "serial", where, "")
        if len(serial.encode()) > B.ID_BYTES:
            raise ConfigError(f"{where}serial: {serial!r} is longer than {B.ID_BYTES} bytes")
        if host and not check_image(image, read_only, f"{where}image"):
            notes.append(f"{where}image: {image}: not there yet; the device waits for it")
        return DeviceConfig(**common, blk=BlkOptions(image, read_only, serial))
    if dtype == "console":
        return DeviceConfig(**common, console=_console(raw, where, host))
    bus = _str(raw, "bus", where)
    check_bus(bus, f"{where}bus")
    return DeviceConfig(**common, can=CanOptions(bus, _bool(raw, "fd", where, False),
                                                 _bool(raw, "late_tx_ack", where, True)))


def _cross_checks(devices: list[DeviceConfig], host: bool = True) -> None:
    """What no single device can see: duplicate names, links, images; ambiguous ``auto``."""
    seen_names: dict[str, int] = {}
    seen_links: dict[tuple, int] = {}
    seen_images: dict[tuple[int, int], int] = {}
    # console sockets and log files by absolute path, with the sockets of every link
    seen_paths: dict[str, str] = {os.path.abspath(d.link.path): f"devices[{i}].link"
                                  for i, d in enumerate(devices)
                                  if d.link.kind in ("sim", "vhost-user")}
    for i, d in enumerate(devices):
        where = f"devices[{i}]."
        con = d.console
        if con is not None and con.path:
            key_name = "socket" if con.sink == "socket" else "log_file"
            full = os.path.abspath(con.path)
            if full in seen_paths:
                raise ConfigError(f"{where}{key_name}: {con.path} is also "
                                  f"{seen_paths[full]}")
            seen_paths[full] = f"{where}{key_name}"
        lk = d.link
        key: tuple[str | int | None, ...] = (lk.kind, lk.path, lk.pci, lk.protocol)
        if lk.kind in ("sim", "vhost-user"):  # one socket file, whatever serves on it
            key = ("socket", os.path.abspath(lk.path))
        if lk.kind == "uio" and lk.protocol is not None:
            key = ("uio-protocol", lk.protocol)
        if key in seen_links:
            other = seen_links[key]
            why = ("both pick the only device of that protocol" if key[0] == "uio-protocol"
                   else "the same link")
            raise ConfigError(f"{where}link: {lk.text!r}: {why} as devices[{other}]; "
                              "name the uio device by PCI address instead")
        seen_links[key] = i
        if d.name in seen_names:  # after the links: a default name is the link text
            raise ConfigError(f"{where}name: {d.name!r} is also devices[{seen_names[d.name]}]")
        seen_names[d.name] = i
        if d.blk is not None and (not host or not os.path.exists(d.blk.image)):
            ident = (-2, hash(os.path.normpath(d.blk.image)))  # the file's own view: by path
            if ident in seen_images:
                raise ConfigError(f"{where}image: {d.blk.image} is also served by "
                                  f"devices[{seen_images[ident]}]")
            seen_images[ident] = i
        elif d.blk is not None:
            st = os.stat(d.blk.image)
            ident = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else (-1, st.st_rdev)
            if ident in seen_images:
                raise ConfigError(f"{where}image: {d.blk.image} is also served by "
                                  f"devices[{seen_images[ident]}]")
            seen_images[ident] = i


def parse_config(data: dict[str, Any], host: bool = True) -> ServeConfig:
    """Validate a decoded TOML document into a :class:`ServeConfig`.

    ``host=False`` (``serve --check --file-only``) checks the file alone: every field and value,
    but not whether this machine has the images (a config written for the target's root cell).
    """
    _unknown_keys(data, _GLOBAL_KEYS, "")
    defaults = {"mode": _choice(data, "mode", "", "adaptive", MODES),
                # absent: each device type's own (TYPE_SPIN_US)
                "spin_us": (_number(data, "spin_us", "", SPIN_CAP_US, 0, 1e6)
                            if "spin_us" in data else None)}
    level = _choice(data, "log_level", "", "info", LOG_LEVELS)
    log_json = _bool(data, "log_json", "", False)
    retry = _number(data, "retry_interval", "", 2.0, 0.05, 3600)
    raw_devices = data.get("devices", [])
    if not isinstance(raw_devices, list):
        raise ConfigError("devices: expected a list of [[devices]] tables")
    notes: list[str] = []
    devices = [_device(raw, i, defaults, host, notes) for i, raw in enumerate(raw_devices)]
    _cross_checks(devices, host)
    return ServeConfig(log_level=level, log_json=log_json, retry_interval=retry,
                       devices=tuple(devices), notes=tuple(notes))


def load_config(path: str | Path, host: bool = True) -> ServeConfig:
    """Read and validate ``path``; every problem is one ConfigError line."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not valid UTF-8") from None
    return parse_config(data, host)
