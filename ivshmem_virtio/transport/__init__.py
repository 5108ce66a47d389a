"""virtio over ivshmem (virtio-ivshmem.md §3): the device role and the driver role."""
