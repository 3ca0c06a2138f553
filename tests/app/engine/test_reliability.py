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


def _break_masks_of(project: Path, image_number: int) -> str:
    """Give one image an RLE whose counts do not add up to its size: it reads, but its masks cannot be decoded."""
    with Project.open(project) as p:
        root = Path(p.dataset()["root"])
    ann = root / "annotations" / "instances.json"
    data = json.loads(ann.read_text())
    for a in data["annotations"]:
        if a["image_id"] == image_number + 1:
            a["segmentation"] = {"size": [SIZE, SIZE], "counts": [10, 5]}
    ann.write_text(json.dumps(data))
    return f"images/{image_number:04d}.png"


def test_mask_problems_are_printed_with_the_skipped_images(tiny_project, capsys, monkeypatch):
    from app.cli import main

    monkeypatch.setenv("TQDM_DISABLE", "1")
    key = _break_masks_of(tiny_project, 3)
    assert main(["extract", str(tiny_project), "--layers", "conv1", "--workers", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "(1 skipped, masks of 1 left out)" in out  # was "(1 skipped)" with the mask problem unsaid
    assert "skipped images/0005.png: " in out
    said = next(line for line in out.splitlines() if "masks left out for" in line)
    assert key in said and "instances.json" in said and "counts add up to 15 pixels" in said
    from app.engine.summary import report_problems

    with Project.open(tiny_project) as p:
        run = p.runs("extract")[-1]
        assert run.message.endswith("masks of 1 left out")
        assert any(key == x["key"] and "masks left out" in x["problem"] for x in p.image_problems(run.id))


def test_window_shows_every_problem_of_the_run(tiny_project):
    pytest.importorskip("PySide6")
    from app.ui.views.jobs_panel import describe_result

    _break_masks_of(tiny_project, 3)
    _, rep = extract(tiny_project)
    text = describe_result(rep, problems=True).splitlines()
    assert "masks of 1 left out" in text[0]
    assert any(line.startswith("skipped images/0005.png") for line in text[1:])
    assert any(line.startswith("masks left out for images/0003.png") for line in text[1:])


def test_resumed_run_reports_its_speed_and_finishes_done_equal_total(tiny_project):
    class CancelAt(JobProgress):
        def update(self, done, total, message=""):
            if done > total // 2:  # in the second pass
                self.cancel()
            super().update(done, total, message)

    opts = ExtractOptions(layers=LAYERS, batch_size=3, num_workers=0, device="cpu", checkpoint_seconds=3600)
    job = ExtractJob(tiny_project, opts)
    with pytest.raises(Exception):
        job.execute(CancelAt())
    job2 = ExtractJob(tiny_project, opts)
    rep = job2.execute(JobProgress())
    assert job2.run_id == job.run_id and rep.resumed
    assert np.isfinite(rep.images_per_second) and rep.images_per_second > 0  # was 0.0 images/s
    with Project.open(tiny_project) as p:
        run = p.run(job.run_id)
    assert run.status == "done" and run.done == run.total == 48


def test_mistyped_layer_gets_the_nearest_names_and_no_empty_one(tiny_project):
    from app.errors import ProjectError

    with Project.open(tiny_project) as p:
        model_id = p.model()["id"]
        with pytest.raises(ProjectError) as err:
            p.layer(model_id, "conv3")
        assert err.value.fix.startswith(("did you mean conv2 or conv1?", "did you mean conv1 or conv2?"))
        with pytest.raises(ProjectError) as err:
            p.layer(model_id, "zzz")
        fix = err.value.fix
        assert fix.startswith("pick one of: ") and ": ," not in fix and ", ," not in fix
        assert "conv1" in fix and "(output)" not in fix  # the whole model has no name to type: not offered


def test_json_errors_do_not_say_at_at(tmp_path):
    from app.errors import DatasetError
    from app.sources.datasets import open_dataset

    root = tmp_path / "c"
    write_coco(root, 2)
    ann = root / "annotations" / "instances.json"
    ann.write_text('{"images": [], "categories": "unterminated')
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    assert "at at" not in str(err.value) and "unterminated string starting at line 1, column" in str(err.value)
