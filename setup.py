"""Build the optional compiled blk data path (ivshmem_virtio/_native: the backend's _fastpath,
the frontend's _frontpath); everything else is in
pyproject.toml. ``optional=True``: without a C compiler or Python headers the build of the
extension is skipped with a warning and the package installs and runs in pure Python."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ivshmem_virtio._native._fastpath",
            sources=["ivshmem_virtio/_native/_fastpath.c", "ivshmem_virtio/_native/vqblk.c"],
            depends=["ivshmem_virtio/_native/vqblk.h", "ivshmem_virtio/_native/shmio.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension(
            "ivshmem_virtio._native._frontpath",
            sources=["ivshmem_virtio/_native/_frontpath.c", "ivshmem_virtio/_native/vqdrv.c"],
            depends=["ivshmem_virtio/_native/vqdrv.h", "ivshmem_virtio/_native/shmio.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
            optional=True,
        ),
    ]
)
