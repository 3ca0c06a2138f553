"""Exports that cannot be written: the real reason about the target the user chose, a run that records it, and a
killed export finished by the next one."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.errors import DiskFullError, JobError
from app.export import base
from app.project import arrays
from app.project.store import Project
from tests.app.export.conftest import export
from tests.app.export.test_job import KILLED


def _last_export(project: Path):
    with Project.open(project) as p:
        return p.runs("export")[-1]


def test_read_only_tmpfs_reports_the_target_and_records_the_failure(study, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root; the injected EROFS test covers this")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        for fmt, name in (("labels-csv", "labels.csv"), ("concepts", "sets"), ("labels-csv", "new/labels.csv")):
            with pytest.raises(JobError) as err:
                export(study["path"], fmt, ro / name)
            msg = str(err.value)
            assert msg.startswith(f"{ro / name}: cannot write here: the file system is read-only"), msg
            assert base._TMP_TAG not in msg
            run = _last_export(study["path"])
            assert run.status == "failed" and "read-only" in run.error
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_cleanup_error_does_not_hide_the_write_error(study, tmp_path, monkeypatch):
    """The writer fails with EROFS and so does the removal of its temporary file: the user hears about the
    first, and the run is 'failed' with that error, not left running (later 'interrupted') without one."""
    def refused(ctx):
        raise OSError(errno.EROFS, "Read-only file system", str(ctx.path))

    def rm(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setitem(base.EXPORTERS, "ro", base.Exporter("ro", "RO", "file", ".txt", "test", (), refused))
    monkeypatch.setattr(base, "_remove", rm)
    target = tmp_path / "out.txt"
    with pytest.raises(JobError, match="the file system is read-only") as err:
        export(study["path"], "ro", target)
    assert str(err.value).startswith(str(target)) and base._TMP_TAG not in str(err.value)
    run = _last_export(study["path"])
    assert run.status == "failed" and "read-only" in run.error


def test_permission_error_names_the_target_not_the_temporary_file(study, tmp_path, monkeypatch):
    def refused(ctx):
        raise PermissionError(errno.EACCES, "Permission denied", str(ctx.path / "images.csv"))

    monkeypatch.setitem(base.EXPORTERS, "pe", base.Exporter("pe", "PE", "folder", "", "test", (), refused))
    target = tmp_path / "acts"
    with pytest.raises(JobError) as err:
        export(study["path"], "pe", target)
    msg = str(err.value)
    assert msg.startswith(f"{target}: cannot write here: permission denied (in {tmp_path})")
    assert base._TMP_TAG not in msg
    assert err.value.fix and "write access" in err.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "study.nstudio"]


def test_activations_export_on_a_full_disk(study, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(arrays.os, "posix_fallocate", full)
    target = tmp_path / "acts"
    with pytest.raises(DiskFullError) as err:
        export(study["path"], "activations", target)
    assert str(target) in str(err.value) and "are needed" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "study.nstudio"]  # no temporary folder
    run = _last_export(study["path"])
    assert run.status == "failed" and "disk is full" in run.error


@pytest.mark.slow  # a process killed half way
def test_killed_export_is_finished_by_the_next_one(study, tmp_path):
    target = tmp_path / "out" / "sets"
    flag = tmp_path / "flag"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(study["path"]), str(target), str(flag)], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    export(study["path"], "concepts", target)
    with Project.open(study["path"]) as p:
        statuses = [r.status for r in p.runs("export")]
    assert statuses == ["done"], statuses  # the killed run was this export: it is now done, not 'interrupted'
