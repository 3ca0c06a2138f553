"""Large arrays beside the database: `.npy` files (memory-mapped for the big ones) and safetensors checkpoints.

Small results are written to a temporary name, flushed and renamed, so a reader never sees half a file. Big
per-image arrays are memory-mapped and filled batch by batch; which rows are valid is recorded by the job's
checkpoint, never inferred from the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.format import open_memmap

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


def save_npy(path: Path, array: np.ndarray | torch.Tensor) -> None:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))
        fh.flush()
        os.fsync(fh.fileno())
    atomic_replace(tmp, path)


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def open_rows(path: Path, shape: tuple[int, ...], dtype: Any, fill: float | None = np.nan) -> np.memmap:
    """A memory-mapped array filled row by row; created (filled with `fill`) if missing, reopened if present."""
    if path.exists():
        arr = open_memmap(path, mode="r+")
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise ValueError(f"{path} holds {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}")
        return arr
    tmp = path.with_name(path.name + ".tmp")
    arr = open_memmap(tmp, mode="w+", shape=tuple(shape), dtype=dtype)
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
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    atomic_replace(tmp, path)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    return load_file(str(path)), meta
