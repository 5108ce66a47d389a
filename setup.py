"""Build the optional compiled blk data path (ivshmem_virtio/_native: the backend's _fastpath,
the frontend's _frontpath); everything else is in
pyproject.toml. ``optional=True``: without a C compiler or Python headers the build of the
extension is skipped with a warning and the package installs and runs in pure Python."""

from setuptools import Extension, setup

_DIR = "ivshmem_virtio/_native"


def _native(module: str, core: str) -> Extension:
    """``_native.<module>``: its binding plus its core (``<core>.c``, ``<core>.h``), one set of
    flags for both extensions."""
    return Extension(
        f"ivshmem_virtio._native.{module}",
        sources=[f"{_DIR}/{module}.c", f"{_DIR}/{core}.c"],
        depends=[f"{_DIR}/{core}.h", f"{_DIR}/shmio.h"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
        optional=True,
    )


setup(ext_modules=[_native("_fastpath", "vqblk"), _native("_frontpath", "vqdrv")])
