"""The application layer: the ``ivshmem-virtio`` command line and the demos.

It sits above everything else (the core, the backend, the frontends and the benchmarks) and is
the only package that imports them all; nothing imports it back (tests/test_layering.py).
"""
