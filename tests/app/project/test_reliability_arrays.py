"""A full disk while arrays are written: the project's own message with the path and the space needed, no
SIGBUS, nothing half-written left behind."""
from __future__ import annotations

import collections
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.errors import DiskFullError
from app.project import arrays

ROOT = Path(__file__).resolve().parents[3]
shutil_usage = collections.namedtuple("usage", "total used free")


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "256k"):
    """A tmpfs of `size` mounted at `where` (root only); skips where it cannot be mounted."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected-ENOSPC tests cover this")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


CHILD = """
import sys
from pathlib import Path
import numpy as np, torch
from app.errors import DiskFullError
from app.project import arrays
where = Path(sys.argv[1])
for what in ("rows", "npy", "state"):
    try:
        if what == "rows":
            a = arrays.open_rows(where / "pooled.npy", (1000, 1000), np.float32)
            a[...] = 1.0
            a.flush()
        elif what == "npy":
            arrays.save_npy(where / "q.npy", np.ones((1000, 1000), np.float32))
        else:
            arrays.save_state(where / "state.safetensors", {"x": torch.ones(1000, 1000)}, {"stage": 1})
    except DiskFullError as exc:
        print(what, exc)
    print(what, "left:", sorted(p.name for p in where.iterdir()), flush=True)
"""


@pytest.mark.slow  # a process that imports torch (a SIGBUS would end pytest itself)
def test_full_tmpfs_is_a_message_not_a_sigbus(tmp_path):
    with small_tmpfs(tmp_path / "mnt") as mnt:
        res = subprocess.run([sys.executable, "-c", CHILD, str(mnt)], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert res.returncode == 0, (res.returncode, res.stderr[-2000:])  # a memory-mapped write was SIGBUS (-7)
        assert "Traceback" not in res.stderr
        lines = res.stdout.splitlines()
        for what, name in (("rows", "pooled.npy"), ("npy", "q.npy"), ("state", "state.safetensors")):
            said = next(x for x in lines if x.startswith(f"{what} {mnt}"))
            assert f"{mnt / name}: the disk is full; 3.8 MB are needed" in said
            assert f"{what} left: []" in lines  # no *.tmp left behind


@pytest.fixture
def no_space(monkeypatch):
    """ENOSPC injected where arrays reserve their blocks (for machines where a tmpfs cannot be mounted)."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(arrays.os, "posix_fallocate", full)


def test_open_rows_reserves_space_before_mapping(tmp_path, no_space):
    with pytest.raises(DiskFullError) as err:
        arrays.open_rows(tmp_path / "pooled.npy", (100, 10), np.float32)
    assert f"{tmp_path / 'pooled.npy'}: the disk is full; 4.0 KB are needed" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_preallocation_falls_back_to_free_space(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(arrays.os, "posix_fallocate", unsupported)
    a = arrays.open_rows(tmp_path / "ok.npy", (4, 3), np.float32)
    assert a.shape == (4, 3) and np.isnan(a).all()
    monkeypatch.setattr(arrays.shutil, "disk_usage", lambda p: shutil_usage(total=100, used=90, free=10))
    with pytest.raises(DiskFullError):
        arrays.open_rows(tmp_path / "big.npy", (1000, 10), np.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npy"]


def test_save_state_on_full_disk_leaves_no_tmp(tmp_path, monkeypatch):
    import safetensors.torch as st

    def full(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(DiskFullError):
        arrays.save_state(tmp_path / "state.safetensors", {"x": torch.ones(3)}, {})
    assert list(tmp_path.iterdir()) == []


def test_reopened_rows_are_reserved_too(tmp_path, monkeypatch):
    arrays.open_rows(tmp_path / "rows.npy", (100, 10), np.float32)
    calls = []
    monkeypatch.setattr(arrays.os, "posix_fallocate", lambda fd, off, n: calls.append(n))
    arrays.open_rows(tmp_path / "rows.npy", (100, 10), np.float32)
    assert calls and calls[0] >= 4000
