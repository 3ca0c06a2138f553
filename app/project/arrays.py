"""Large arrays beside the database: `.npy` files (memory-mapped for the big ones) and safetensors checkpoints.

Small results are written to a temporary name, flushed and renamed, so a reader never sees half a file. Big
per-image arrays are memory-mapped and filled batch by batch; which rows are valid is recorded by the job's
checkpoint, never inferred from the file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.format import open_memmap

from app.errors import disk_full

if TYPE_CHECKING:  # imported where used: opening a project must not load torch
    import torch


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (after a rename, the folder entry is what must reach the disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)
    fsync_path(target.parent)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(exc: BaseException, path: Path, needed: int) -> bool:
    """Whether a failed write ran out of disk. numpy's tofile reports a short write without an errno, and
    safetensors its own error type with the OS text, so the free space decides when the errno is missing."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _NO_SPACE
    if "No space left" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        return shutil.disk_usage(path.parent).free < needed
    except OSError:
        return False


def _discard_tmp(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def reserve(path: Path, nbytes: int) -> None:
    """Give the file at `path` its `nbytes` of disk blocks now. A memory-mapped write into a sparse file on a full
    disk is a SIGBUS that kills the process without a word; a reservation that fails is an ENOSPC we can report."""
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, nbytes)
            return
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise
            # The file system cannot preallocate (EOPNOTSUPP, EINVAL): compare with the free space instead.
        have = os.fstat(fh.fileno()).st_blocks * 512
        if shutil.disk_usage(path.parent).free < nbytes - have:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def create_rows(path: Path, shape: tuple[int, ...], dtype: Any, report_as: Path | None = None) -> np.memmap:
    """A new memory-mapped .npy whose disk space is reserved before any row is written. On a full disk: a
    `DiskFullError` naming the path (`report_as` where `path` is a temporary name) and the size, and no file left."""
    try:
        arr = open_memmap(path, mode="w+", shape=tuple(shape), dtype=dtype)
        reserve(path, os.path.getsize(path))
        return arr
    except OSError as exc:
        _discard_tmp(path)
        if exc.errno in _NO_SPACE:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize + 128
            raise disk_full(report_as or path, nbytes) from None
        raise


def save_npy(path: Path, array: np.ndarray | torch.Tensor) -> None:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        _discard_tmp(tmp)
        if _no_space(exc, path, array.nbytes + 128):
            raise disk_full(path, array.nbytes + 128) from None
        raise
    atomic_replace(tmp, path)


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def open_rows(path: Path, shape: tuple[int, ...], dtype: Any, fill: float | None = np.nan) -> np.memmap:
    """A memory-mapped array filled row by row; created (filled with `fill`) if missing, reopened if present."""
    if path.exists():
        try:  # a file a killed run left may still be sparse: its blocks too are reserved before rows are written
            reserve(path, os.path.getsize(path))
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise disk_full(path, os.path.getsize(path)) from None
            raise
        arr = open_memmap(path, mode="r+")
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise ValueError(f"{path} holds {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}")
        return arr
    tmp = path.with_name(path.name + ".tmp")
    arr = create_rows(tmp, shape, dtype, report_as=path)
    if fill is not None:
        arr[...] = fill
    arr.flush()
    del arr
    atomic_replace(tmp, path)
    return open_memmap(path, mode="r+")


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A checkpoint in safetensors (never a pickle), written atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except Exception as exc:  # safetensors reports a full disk as its own error type, with the errno in the text
        _discard_tmp(tmp)
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        if _no_space(exc, path, needed):
            raise disk_full(path, needed) from None
        raise
    atomic_replace(tmp, path)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    return load_file(str(path)), meta
