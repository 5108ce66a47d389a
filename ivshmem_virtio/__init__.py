"""ivshmem-virtio: virtio devices between Jailhouse cells over ivshmem shared memory."""

from .log import library_logging

library_logging()  # silent as a library until the application configures logging
