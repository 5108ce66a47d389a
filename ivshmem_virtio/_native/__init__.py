"""Which blk data path runs: the compiled one (``_fastpath``, built from ``vqblk.c``) or Python.

The compiled module is optional (setup.py builds it with ``optional=True``): where no C compiler
or Python headers exist the package still installs and runs the pure-Python path, which is the
reference the compiled one is tested against. ``IVSHMEM_VIRTIO_PURE=1`` forces the pure path
(CI runs the data-path tests both ways). The choice is made once per process, at first use,
and logged then, once.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import structlog

PURE_ENV = "IVSHMEM_VIRTIO_PURE"

log = structlog.get_logger("ivshmem_virtio.native")

class _Choice:
    """One optional compiled module: loaded (or not) once, at first use, and said once."""

    def __init__(self, module: str, what: str) -> None:
        self.module = module  # e.g. "_fastpath", a sibling of this package
        self.what = what  # how the log and the reason name it
        self.reset()

    def reset(self) -> None:
        self._chosen: tuple[ModuleType | None, str] | None = None
        self._logged = False

    def _load(self) -> tuple[ModuleType | None, str]:
        if os.environ.get(PURE_ENV, "").strip() not in ("", "0"):
            return None, f"pure Python ({PURE_ENV} is set)"
        try:
            mod = importlib.import_module(f"ivshmem_virtio._native.{self.module}")
        except ImportError as e:
            return None, f"pure Python (compiled {self.what} not built: {e})"
        return mod, "compiled"

    def path(self) -> str:
        if self._chosen is None:
            self._chosen = self._load()
        return self._chosen[1]

    def native(self) -> ModuleType | None:
        path = self.path()
        assert self._chosen is not None
        if not self._logged:
            self._logged = True
            (log.info if self._chosen[0] is None else log.debug)(f"blk {self.what}", path=path)
        return self._chosen[0]


_BACKEND = _Choice("_fastpath", "data path")
_FRONTEND = _Choice("_frontpath", "frontend path")


def data_path() -> str:
    """``compiled`` or ``pure Python (why)``: for ``--version`` and the bench's machine block."""
    return _BACKEND.path()


def native() -> ModuleType | None:
    """The compiled module, or None for the pure path; the first call logs which one runs."""
    return _BACKEND.native()


def front_path() -> str:
    """Which blk frontend path runs (``_frontpath``, built from ``vqdrv.c``, or Python): the
    same choice as :func:`data_path`, made for the frontend's own module (each is built or
    skipped on its own)."""
    return _FRONTEND.path()


def front_native() -> ModuleType | None:
    """The compiled frontend module (its ``DriverQueue``), or None for the pure path; the
    first call logs which one runs."""
    return _FRONTEND.native()


def reset_for_tests() -> None:
    """Forget the choice (tests switch ``IVSHMEM_VIRTIO_PURE`` within one process)."""
    _BACKEND.reset()
    _FRONTEND.reset()
