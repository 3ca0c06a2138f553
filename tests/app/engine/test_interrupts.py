"""Ctrl+C (KeyboardInterrupt) during a job is recorded as a cancelled run, as the CLI reports it."""
import pytest

from app.engine.extract import ExtractJob, ExtractOptions
from app.engine.labeling import LabelJob
from app.jobs import JobProgress
from app.project.store import Project


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_extraction_is_a_cancelled_run(tiny_project, monkeypatch):
    monkeypatch.setattr(ExtractJob, "_extract", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        ExtractJob(tiny_project, ExtractOptions(layers=["conv1"], num_workers=0, device="cpu")).execute(JobProgress())
    with Project.open(tiny_project) as p:
        assert [r.status for r in p.runs("extract")] == ["cancelled"]


def test_ctrl_c_during_labeling_is_a_cancelled_run(tiny_project, monkeypatch):
    ExtractJob(tiny_project, ExtractOptions(layers=["conv1"], batch_size=8, num_workers=0,
                                            device="cpu")).execute(JobProgress())
    monkeypatch.setattr(Project, "replace_labels", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        LabelJob(tiny_project, "invert", "conv1", device="cpu", num_workers=0).execute(JobProgress())
    with Project.open(tiny_project) as p:
        assert [r.status for r in p.runs("label")] == ["cancelled"]
