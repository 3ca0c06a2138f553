from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import imaging
from app.errors import JobError
from app.export import base
from app.project.store import Project
from labelers.base import Cancelled
from tests.app.export.conftest import CountingProgress, export

ALL_FORMATS = ("labels-csv", "labels-jsonl", "labels-parquet", "annotations-csv", "annotations-jsonl",
               "annotations-parquet", "concepts", "coco", "milan", "activations", "html", "netdissect-tally",
               "clip-dissect-csv", "invert-csv", "milan-csv", "texplain-words")


def target_for(out_dir: Path, fmt: str) -> Path:
    return out_dir / f"export-{fmt}{base.get_exporter(fmt).suffix}"


def test_registry_lists_every_format():
    names = [e.name for e in base.list_formats()]
    assert sorted(names) == sorted(ALL_FORMATS)
    assert set(base.EXPORTERS) == set(ALL_FORMATS)
    assert "labels-csv" in base.formats_help() and "--option quantile=" in base.formats_help()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_cancelled_half_way_leaves_nothing(study, tmp_path, fmt):
    out = tmp_path / "out"
    counter = CountingProgress()
    full = target_for(out, fmt)
    report = export(study["path"], fmt, full, counter)
    assert full.exists() and counter.calls >= 2, f"{fmt} reports progress only {counter.calls} times"
    assert report.run_id is not None
    target = out / "sub" / full.name  # in a folder that does not exist yet: it must not stay behind either
    with pytest.raises(Cancelled):
        export(study["path"], fmt, target, CountingProgress(cancel_at=max(2, counter.calls // 2 + 1)))
    assert not (out / "sub").exists()
    assert sorted(p.name for p in out.iterdir()) == [full.name]  # no temporary file beside the target
    with Project.open(study["path"]) as p:
        runs = p.runs("export")
    assert [r.status for r in runs][-2:] == ["done", "cancelled"]
    assert runs[-2].report["summary"] == report.summary and runs[-2].params["format"] == fmt


@pytest.mark.parametrize("fmt", ["labels-parquet", "concepts"])
def test_cancel_keeps_the_previous_export(study, tmp_path, fmt):
    target = target_for(tmp_path, fmt)
    export(study["path"], fmt, target)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(Cancelled):
        export(study["path"], fmt, target, CountingProgress(cancel_at=2))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_failing_writer_leaves_nothing(study, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = imaging.crop_region

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(imaging, "crop_region", broken)
    with pytest.raises(OSError, match="disk full"):
        export(study["path"], "concepts", tmp_path / "sets", quantile="0.99")
    assert calls["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "study.nstudio"]

    def half(ctx):
        with open(ctx.path, "w") as fh:
            fh.write("half a table")
        raise ValueError("the writer broke")

    monkeypatch.setitem(base.EXPORTERS, "half", base.Exporter("half", "Half", "file", ".txt", "test", (), half))
    with pytest.raises(ValueError, match="writer broke"):
        export(study["path"], "half", tmp_path / "out" / "half.txt")
    assert not (tmp_path / "out").exists()
    with Project.open(study["path"]) as p:
        failed = p.runs("export")[-1]
    assert failed.status == "failed" and "writer broke" in failed.error


def test_targets_and_options_are_checked(study, tmp_path):
    with pytest.raises(JobError, match="no export format named 'xlsx'"):
        export(study["path"], "xlsx", tmp_path / "x.xlsx")
    with pytest.raises(JobError, match="has no option colour"):
        export(study["path"], "html", tmp_path / "r.html", colour="red")
    with pytest.raises(JobError, match="thumb"):
        export(study["path"], "html", tmp_path / "r.html", thumb="huge")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(JobError, match="holds other files"):
        export(study["path"], "concepts", tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(JobError, match="folder is in the way"):
        export(study["path"], "labels-csv", tmp_path / "mine")
    # a previous export of ours is replaced whole
    export(study["path"], "concepts", tmp_path / "sets", sources="names")
    export(study["path"], "concepts", tmp_path / "sets", sources="groups")
    meta = [json.loads(x) for x in (tmp_path / "sets" / "metadata.jsonl").read_text().splitlines()]
    assert {m["concept"] for m in meta} == {"stripes"}
    assert not (tmp_path / "sets" / "red_blob").exists()
    assert json.loads((tmp_path / "sets" / base.MARKER).read_text())["format"] == "concepts"


KILLED = """
import sys, time
from pathlib import Path
from app.export.base import ExportJob

class Slow:
    calls = 0
    def update(self, done, total, message=""):
        Slow.calls += 1
        if Slow.calls == 2:
            Path(sys.argv[3]).write_text("half way")
            time.sleep(60)

ExportJob(sys.argv[1], "concepts", sys.argv[2], {}).execute(Slow())
"""


def test_an_export_killed_half_way_leaves_no_file(study, tmp_path):
    target = tmp_path / "out" / "sets"
    flag = tmp_path / "flag"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(study["path"]), str(target), str(flag)], env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        left = [p for p in target.parent.iterdir()]
        assert len(left) == 1 and left[0].name.startswith(".sets.nstudio-tmp-")  # work in progress, hidden
        assert (left[0] / "metadata.jsonl").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    assert not target.exists()
    # the next export to the same place removes what the killed one left, then writes the file
    export(study["path"], "concepts", target)
    assert [p.name for p in target.parent.iterdir()] == ["sets"]
