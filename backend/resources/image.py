"""The disk behind a virtio-blk device: a raw image file or a block device.

Data moves with ``os.preadv``/``os.pwritev`` straight between the disk and views of shared
memory, with no intermediate copy. Discard and write-zeroes use hole punching / zero ranges
(``fallocate``) on files and BLKDISCARD / BLKZEROOUT on block devices, with a plain zero-write
fallback where the filesystem or device refuses.

An open image is locked as QEMU locks its images: a writable one exclusively, a read-only one
shared, with an open-file-description lock (``F_OFD_SETLK``, Linux >= 3.15) on the whole file.
The lock belongs to the open file, not the process, so it also holds between two images opened
by one ``serve`` daemon, and it goes away with the fd, even on SIGKILL (docs/reliability.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence

from ivshmem_virtio.errors import ConfigError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux's value, for Pythons built without it

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_ZERO = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def lock_image(fd: int, path: str, read_only: bool) -> None:
    """Take the whole-file OFD lock: shared (F_RDLCK) read-only, exclusive (F_WRLCK) writable.

    Never waits: a second writer, or a writer beside readers, is refused at once with one line,
    since two backends writing one disk (or one writing under another's reads) corrupt it.
    """
    kind = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    # struct flock: l_type, l_whence, l_start, l_len (0: to the end, however it grows),
    # l_pid (0 for OFD locks), padding to the C struct's size
    flock = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, flock)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            mode = "read-only" if read_only else "read-write"
            raise ConfigError(f"--image {path}: locked by another process that has it open "
                              f"(cannot open it {mode}; is another backend serving it?)") from None
        # no OFD locks on this kernel (< 3.15: EINVAL) or file system (ENOLCK, EOPNOTSUPP):
        # served unlocked, as QEMU does where it cannot lock
        if e.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise ConfigError(f"--image {path}: cannot lock: {e.strerror}") from None


class BlockImage:
    """An open disk image; every method raises ``OSError`` on I/O failure."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise ConfigError(f"--image {path}: {e.strerror}") from e
        self.path = path
        self.read_only = read_only
        try:
            lock_image(self.fd, path, read_only)
        except BaseException:
            os.close(self.fd)
            raise
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if self.is_block_device:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("<Q", buf)[0]
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            raise ConfigError(f"--image {path}: not a regular file or block device")
        if self.size < 512:
            os.close(self.fd)
            raise ConfigError(f"--image {path}: smaller than one 512-byte sector")
        self.can_punch = not self.is_block_device
        self.can_zero_range = not self.is_block_device

    @property
    def sectors(self) -> int:
        return self.size // 512

    def readv(self, views: Sequence[memoryview], offset: int) -> int:
        return os.preadv(self.fd, views, offset)

    def writev(self, views: Sequence[memoryview], offset: int) -> int:
        return os.pwritev(self.fd, views, offset)

    def flush(self) -> None:
        """Data on stable storage before this returns (the FLUSH contract)."""
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Give the blocks back where the storage supports it; a hint, so failures are quiet."""
        try:
            if self.is_block_device:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            elif self.can_punch:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            self.can_punch = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read back as zeros, deallocating it when allowed."""
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
        else:
            modes = []
            if unmap and self.can_punch:
                modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            if self.can_zero_range:
                modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
            for mode in modes:
                try:
                    _fallocate(self.fd, mode, offset, length)
                    return
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    if mode & FALLOC_FL_PUNCH_HOLE:
                        self.can_punch = False
                    else:
                        self.can_zero_range = False
        end = offset + length
        while offset < end:  # the fallback every storage supports
            n = min(len(_ZERO), end - offset)
            offset += os.pwrite(self.fd, memoryview(_ZERO)[:n], offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
