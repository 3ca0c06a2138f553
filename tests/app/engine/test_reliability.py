"""Reliability regressions of the extraction job: results reused only for the files they were made from, mask
problems reported, full disks and bad polygons turned into messages."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.engine.extract import ExtractJob, ExtractOptions
from app.jobs import JobProgress
from app.project.store import Project
from tests.app.engine.conftest import SIZE, write_coco

LAYERS = ["conv1", "conv2"]


def extract(path, dataset=None, **kw):
    opts = ExtractOptions(layers=LAYERS, batch_size=8, num_workers=0, device="cpu", **kw)
    job = ExtractJob(path, opts, dataset=dataset)
    return job, job.execute(JobProgress())


def test_same_names_other_pixels_is_not_reused(tiny_project, tmp_path):
    """Dataset B has A's file names and annotations but other pixels: it gets its own run."""
    from app.workspace import add_dataset

    other = tmp_path / "coco-b"
    write_coco(other, 24, seed=7, corrupt=5)
    with Project.open(tiny_project) as p:
        add_dataset(p, other, name="b")
    job_a, _ = extract(tiny_project, dataset="coco")
    job_b, _ = extract(tiny_project, dataset="b")
    assert job_b.run_id != job_a.run_id
    with Project.open(tiny_project) as p:
        assert p.run(job_b.run_id).dataset_id == p.dataset("b")["id"]


def test_changed_files_are_not_reused(tiny_project, tmp_path):
    job1, _ = extract(tiny_project, max_images=6)
    job_same, _ = extract(tiny_project, max_images=6)
    assert job_same.run_id == job1.run_id  # nothing changed: reused
    with Project.open(tiny_project) as p:
        root = Path(p.dataset()["root"])
    img = root / "images" / "0001.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(img)
    os.utime(img, ns=(1, 1))
    job2, _ = extract(tiny_project, max_images=6)
    assert job2.run_id != job1.run_id
    # the annotations' bytes count too, even where names and sizes stay the same
    ann = root / "annotations" / "instances.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["area"] = data["annotations"][0]["area"] + 1.0
    ann.write_text(json.dumps(data))
    job3, _ = extract(tiny_project, max_images=6)
    assert job3.run_id not in (job1.run_id, job2.run_id)


def test_full_disk_during_extraction_fails_the_run_with_the_message(tiny_project, monkeypatch):
    from app.errors import DiskFullError
    from app.project import arrays

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(arrays.os, "posix_fallocate", full)
    with pytest.raises(DiskFullError) as err:
        extract(tiny_project)
    assert "pooled_max.npy: the disk is full" in str(err.value)
    with Project.open(tiny_project) as p:
        run = p.runs("extract")[-1]
        assert run.status == "failed" and "disk is full" in run.error
        assert not list(p.arrays_dir.rglob("*.tmp"))
    monkeypatch.undo()
    job, rep = extract(tiny_project)  # with space again, the same command finishes the same run
    assert job.run_id == run.id and rep.images == 23
