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

_chosen: tuple[ModuleType | None, str] | None = None
_logged = False


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(PURE_ENV, "").strip() not in ("", "0"):
        return None, f"pure Python ({PURE_ENV} is set)"
    try:
        mod = importlib.import_module("ivshmem_virtio._native._fastpath")
    except ImportError as e:
        return None, f"pure Python (compiled data path not built: {e})"
    return mod, "compiled"


def data_path() -> str:
    """``compiled`` or ``pure Python (why)``: for ``--version`` and the bench's machine block."""
    global _chosen
    if _chosen is None:
        _chosen = _load()
    return _chosen[1]


def native() -> ModuleType | None:
    """The compiled module, or None for the pure path; the first call logs which one runs."""
    global _logged
    path = data_path()
    assert _chosen is not None
    if not _logged:
        _logged = True
        if _chosen[0] is None:
            log.info("blk data path", path=path)
        else:
            log.debug("blk data path", path=path)
    return _chosen[0]


_front: tuple[ModuleType | None, str] | None = None
_front_logged = False


def _load_front() -> tuple[ModuleType | None, str]:
    if os.environ.get(PURE_ENV, "").strip() not in ("", "0"):
        return None, f"pure Python ({PURE_ENV} is set)"
    try:
        mod = importlib.import_module("ivshmem_virtio._native._frontpath")
    except ImportError as e:
        return None, f"pure Python (compiled frontend path not built: {e})"
    return mod, "compiled"


def front_path() -> str:
    """Which blk frontend path runs (``_frontpath``, built from ``vqdrv.c``, or Python): the
    same choice as :func:`data_path`, made for the frontend's own module (each is built or
    skipped on its own)."""
    global _front
    if _front is None:
        _front = _load_front()
    return _front[1]


def front_native() -> ModuleType | None:
    """The compiled frontend module (its ``DriverQueue``), or None for the pure path; the
    first call logs which one runs."""
    global _front_logged
    path = front_path()
    assert _front is not None
    if not _front_logged:
        _front_logged = True
        (log.info if _front[0] is None else log.debug)("blk frontend path", path=path)
    return _front[0]


def reset_for_tests() -> None:
    """Forget the choice (tests switch ``IVSHMEM_VIRTIO_PURE`` within one process)."""
    global _chosen, _logged, _front, _front_logged
    _chosen = None
    _logged = False
    _front = None
    _front_logged = False
