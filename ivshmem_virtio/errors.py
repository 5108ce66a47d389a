"""The project's exception hierarchy.

The classes map onto the three fault classes of a virtio device (as Firecracker sorts them): a
configuration error is reported to the operator, a bad request is answered with an error status,
and an impossible ring state marks the device as needing a reset. Peer-triggered errors never
escape the runner.
"""

from __future__ import annotations


class IvshmemVirtioError(Exception):
    """Base class of every error raised by this project."""


class ConfigError(IvshmemVirtioError):
    """Bad configuration given by the operator (command line, config file): exit status 2."""


class LinkError(IvshmemVirtioError):
    """The ivshmem link (uio device or sim hub) cannot be reached or misbehaves."""


class TransportError(IvshmemVirtioError):
    """The virtio-over-ivshmem control protocol failed (peer gone, bad header, timeout)."""


class VhostUserError(TransportError):
    """A vhost-user peer sent a malformed or out-of-place message: the connection is dropped."""


class PeerGone(TransportError):
    """The peer left READY while we were waiting on it."""


class MemoryAccessError(IvshmemVirtioError):
    """An access would fall outside a shared-memory region: the peer gave a bad address."""


class RingError(IvshmemVirtioError):
    """The peer left a virtqueue in an impossible state: the device needs a reset."""


class DeviceError(IvshmemVirtioError):
    """A device request cannot be answered at all (no status byte to write): needs a reset."""
