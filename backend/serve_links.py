"""The link a configured device names, as ``serve`` sees it: its lock, where it is, whether it fits.

Two daemons on one link would both write its header: every device holds a lock file per link
(:class:`LinkLock`, ``flock``) while it is configured, and a second ``serve`` naming the same
link stops at start with one line naming the holder. A uio link is looked up in sysfs as things
stand at each attempt (:func:`resolve_uio`), and an opened link is checked before a runner may
use it (:func:`check_link`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re

from ivshmem_virtio.errors import ConfigError, LinkError
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.spec import ivshmem as H

from .bind import DRIVER, list_functions
from .config import DeviceConfig, LinkSpec

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
    elif lk.kind == "vhost-user":
        key = "vhost-user" + os.path.realpath(lk.path)
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


# -- finding and checking a link ------------------------------------------------------------------

def resolve_uio(lk: LinkSpec, sysfs: str) -> str:
    """The /dev/uioN the link ``lk`` names, as things stand right now."""
    if lk.path:
        if not os.path.exists(lk.path):
            raise LinkError(f"{lk.path} does not exist")
        return lk.path
    functions = list_functions(sysfs)
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


def check_link(cfg: DeviceConfig, dev: IvshmemDevice) -> None:
    """An opened link fit to be the backend of ``cfg``: its protocol, peer ID and R/W size."""
    want = cfg.protocol
    if dev.protocol != want:
        raise LinkError(f"{dev.name}: the link's protocol is {dev.protocol:#06x}, a "
                        f"{cfg.type} backend needs {want:#06x}")
    if dev.id != 0 or dev.max_peers != 2:
        raise LinkError(f"{dev.name}: ID {dev.id} of {dev.max_peers} peers; a virtio "
                        "backend is ID 0 on a 2-peer link")
    if dev.rw.size < 2 * H.PAGE_SIZE:
        raise LinkError(f"{dev.name}: R/W section of {dev.rw.size:#x} bytes is smaller "
                        "than two pages")
