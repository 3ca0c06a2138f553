"""Extraction on a local Ray (2 CPUs): 1, 2 and 4 shards, and a shard whose worker dies, give the very arrays
of a single-process run."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from app.engine.extract import RAY_STATE_FILE, ExtractJob, ExtractOptions
from app.jobs import Cancelled, JobProgress
from app.project.store import Project

from .conftest import SIZE, write_coco

LAYERS = ["conv1", "conv2"]
PRE = {"resize": SIZE, "crop": SIZE, "mean": (0.5,) * 3, "std": (0.25,) * 3}

FACTORY = textwrap.dedent(
    """
    import os
    import torch
    from tests.app.engine.conftest import TinyNet

    CRASH_MARKER = {marker!r}

    def _in_ray_task():
        try:
            import ray
            from ray._private import worker
        except ImportError:
            return False
        return ray.is_initialized() and worker.global_worker.mode == worker.WORKER_MODE

    class Net(TinyNet):
        calls = 0

        def forward(self, x):
            # With a marker path: the first Ray worker to reach its second batch dies there, once.
            self.calls += 1
            if CRASH_MARKER and self.calls == 2 and _in_ray_task() and not os.path.exists(CRASH_MARKER):
                open(CRASH_MARKER, "w").close()
                os._exit(1)
            return super().forward(x)

    def make():
        torch.manual_seed(0)
        return Net()
    """
)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _project(root: Path, data: Path, marker: str = "") -> Path:
    from app.workspace import add_dataset, add_model

    root.mkdir(parents=True)
    factory = root / "net.py"
    factory.write_text(FACTORY.format(marker=marker))
    proj = root / "p.nstudio"
    with Project.create(proj) as p:
        add_model(p, f"python:{factory}:make", None, name="tiny", trust_code=True, preprocess_overrides=PRE)
        add_dataset(p, data, name="coco")
    return proj


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A project not yet extracted (copied per run: a done run with the same key would be reused) and the
    single-process reference run's arrays."""
    base = tmp_path_factory.mktemp("ray")
    data = base / "coco"
    write_coco(data, 22, corrupt=5)
    proj = _project(base / "fresh", data)
    ref = base / "ref"
    shutil.copytree(proj.parent, ref)
    _run(ref / "p.nstudio")
    return proj, data, _arrays(ref / "p.nstudio"), ref


def _run(proj: Path, shards: int | None = None) -> ExtractJob:
    from app.engine.distributed import RayExtractJob

    opts = ExtractOptions(layers=LAYERS, batch_size=4, num_workers=0, device="cpu")
    job = ExtractJob(proj, opts) if shards is None else RayExtractJob(proj, opts, "auto", shards)
    job.execute(JobProgress())
    return job


def _arrays(proj: Path) -> dict[str, np.ndarray]:
    with Project.open(proj) as p:
        run = p.runs("extract")[0]
        assert run.status == "done"
        problems = [(x["key"], x["problem"]) for x in p.image_problems(run.id)]
        d = p.arrays_dir / f"run-{run.id}"
    out = {str(f.relative_to(d)): np.load(f) for f in sorted(d.rglob("*.npy"))}
    assert not list(d.glob("*.safetensors"))  # the checkpoint is gone once the run is done
    out["problems"] = np.array(problems)
    return out


def _assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    assert any(k.endswith("mask_intersection.npy") for k in want)  # both passes ran
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


class CancelAfterFirstMerge(JobProgress):
    """Stops the coordinator as soon as one shard of pass 1 is merged (what a killed coordinator leaves behind:
    the checkpoint is written right after each merge)."""

    def update(self, done, total, message=""):
        if message.startswith("pass 1") and not message.endswith(": 0 of 4 shards"):
            self.cancel()
        super().update(done, total, message)


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_sharded_extraction_equals_one_process(local_ray, fresh, tmp_path, shards):
    proj, _, want, _ = fresh
    shutil.copytree(proj.parent, tmp_path / "run")
    proj = tmp_path / "run" / "p.nstudio"
    if shards == 4:  # and the coordinator stops after one merge, then resumes from the merged shards
        from app.engine.distributed import RayExtractJob

        opts = ExtractOptions(layers=LAYERS, batch_size=4, num_workers=0, device="cpu")
        with pytest.raises(Cancelled):
            RayExtractJob(proj, opts, "auto", 4).execute(CancelAfterFirstMerge())
        with Project.open(proj) as p:
            run = p.runs("extract")[0]
            assert run.status == "cancelled"
            state = p.arrays_dir / f"run-{run.id}" / RAY_STATE_FILE
        from app.project import arrays

        merged = arrays.load_state(state)[1]["merged"]
        assert 1 <= len(merged) < 4
    job = _run(proj, shards=shards)
    _assert_identical(_arrays(proj), want)
    with Project.open(proj) as p:
        assert p.run(job.run_id).done == p.run(job.run_id).total == 44
        assert p.integrity_check() == "ok"


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_retried_and_the_result_is_identical(local_ray, fresh, tmp_path):
    _, data, want, _ = fresh
    marker = tmp_path / "crashed"
    proj = _project(tmp_path / "crash", data, marker=str(marker))
    _run(proj, shards=2)
    assert marker.exists()  # a worker really died
    _assert_identical(_arrays(proj), want)


@pytest.mark.slow
def test_compexp_over_two_workers_equals_one_process(local_ray, fresh, tmp_path):
    from app.engine.distributed import RayLabelJob
    from app.engine.labeling import LabelJob

    ref = fresh[3]
    params = {"max_length": 2, "beam_size": 3}
    got = {}
    for name in ("one", "ray"):
        shutil.copytree(ref, tmp_path / name)
        proj = tmp_path / name / "p.nstudio"
        if name == "one":
            job = LabelJob(proj, "compexp", "conv2", params, device="cpu", num_workers=0, batch_size=4)
        else:
            job = RayLabelJob(proj, "compexp", "conv2", params, device="cpu", num_workers=0, batch_size=4,
                              address="auto", groups=2)
        report = job.execute(JobProgress())
        with Project.open(proj) as p:
            got[name] = sorted((r["unit"], r["rank"], r["label"], r["formula"], r["score"])
                               for r in p.labels(method="compexp"))
    assert report.summary["ray_unit_groups"] == 2
    assert len({u for u, *_ in got["one"]}) >= 3  # units of both groups got labels
    assert got["ray"] == got["one"]
