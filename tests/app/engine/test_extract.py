import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.engine.extract import ExtractJob, ExtractOptions, load_project_model
from app.engine.results import LayerResults
from app.jobs import Cancelled, JobProgress
from app.project.store import Project

from .conftest import SIZE, write_coco

LAYERS = ["conv1", "conv2"]


def direct(project_path: Path, layers=LAYERS):
    """The slow, obvious computation the engine must reproduce."""
    from app.sources.datasets import load_rgb, open_dataset

    with Project.open(project_path) as p:
        row = p.model()
        ds = p.dataset()
    model = load_project_model(row, torch.device("cpu"))
    reader = open_dataset(ds["root"], ds["format"])
    tf = model.preprocess.transform()
    outs = {}
    handles = [dict(model.module.named_modules())[n].register_forward_hook(
        lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in layers]
    maps = {n: [] for n in layers}
    valid = []
    for i, im in enumerate(reader.images):
        try:
            x = tf(load_rgb(im.path))[None]
        except Exception:
            continue
        valid.append(i)
        with torch.no_grad():
            model.forward(x)
        for n in layers:
            maps[n].append(outs[n][0].float())
    for h in handles:
        h.remove()
    return reader, valid, {n: torch.stack(v) for n, v in maps.items()}


def run_extract(path, **kw):
    opts = ExtractOptions(layers=LAYERS, batch_size=kw.pop("batch_size", 5), num_workers=0, device="cpu", **kw)
    job = ExtractJob(path, opts)
    return job, job.execute(JobProgress())


def check_against_direct(path):
    reader, valid, maps = direct(path)
    with Project.open(path) as p:
        model_id = p.model()["id"]
        for name, m in maps.items():
            res = LayerResults.load(p, p.layer(model_id, name)["id"])
            n, u = m.shape[:2]
            flat = m.reshape(n, u, -1)
            assert res.valid.tolist() == [i in valid for i in range(len(reader.images))]
            np.testing.assert_allclose(np.asarray(res.pooled_max)[valid], flat.amax(2).numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(res.pooled_mean)[valid], flat.mean(2).numpy(), rtol=1e-5, atol=1e-6)
            allv = flat.transpose(0, 1).reshape(u, -1).double()
            for q in (0.99, 0.995):
                np.testing.assert_allclose(res.quantiles[q], torch.quantile(allv, q, dim=1).numpy(), rtol=1e-5,
                                           atol=1e-6)
            top = flat.amax(2).T.topk(15, dim=1)
            # equal maxima may come in any order: compare scores, and that each index really has its score
            np.testing.assert_allclose(res.topk_scores, top.values.numpy(), rtol=1e-5, atol=1e-6)
            pm = np.asarray(res.pooled_max)
            np.testing.assert_allclose(pm[res.topk_index, np.arange(u)[:, None]], res.topk_scores, rtol=1e-6)
            row = {int(i): r for r, i in enumerate(valid)}
            for unit in range(u):
                for j in range(3):
                    np.testing.assert_allclose(res.topk_maps[unit, j],
                                               m[row[int(res.topk_index[unit, j])], unit].numpy(), atol=2e-3)
            # Network Dissection counts, by explicit per-image set counting
            thr = torch.from_numpy(np.asarray(res.threshold()))
            act = F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=False) > thr[None, :, None, None]
            inter = np.zeros((u, len(reader.concepts)))
            carea = np.zeros(len(reader.concepts))
            for row, i in enumerate(valid):
                cidx, cm = reader.masks(i, (SIZE, SIZE))
                for c, mk in zip(cidx, cm):
                    carea[c] += mk.sum()
                    for unit in range(u):
                        inter[unit, c] += np.logical_and(act[row, unit].numpy(), mk).sum()
            counts = res.mask_counts(p.dataset()["categories"])
            np.testing.assert_array_equal(counts.intersection.numpy(), inter)
            np.testing.assert_array_equal(counts.concept_area.numpy(), carea)
            active_total = act.flatten(2).sum(2).sum(0).double().numpy()
            for k in range(counts.unit_area.shape[1]):
                np.testing.assert_array_equal(counts.unit_area[:, k].numpy(), active_total)
    return reader, valid


def test_extraction_matches_direct_computation(tiny_project):
    job, rep = run_extract(tiny_project)
    assert rep.images == 23 and rep.skipped == 1 and rep.mask_counts and rep.quantile_exact
    reader, valid = check_against_direct(tiny_project)
    with Project.open(tiny_project) as p:
        problems = p.image_problems(job.run_id)
        assert [x["key"] for x in problems] == [reader.images[5].key]
        assert "0005.png" in problems[0]["problem"]
        assert p.run(job.run_id).status == "done"
        assert p.integrity_check() == "ok"
    # the same extraction again is recognised as done, not recomputed
    job2, rep2 = run_extract(tiny_project)
    assert job2.run_id == job.run_id


def test_cancel_then_resume_gives_identical_results(tiny_project):
    class CancelAfter(JobProgress):
        def __init__(self, n):
            super().__init__()
            self.calls = 0
            self.n = n

        def update(self, done, total, message=""):
            self.calls += 1
            if self.calls == self.n:
                self.cancel()
            super().update(done, total, message)

    opts = ExtractOptions(layers=LAYERS, batch_size=3, num_workers=0, device="cpu", checkpoint_seconds=0)
    job = ExtractJob(tiny_project, opts)
    with pytest.raises(Cancelled):
        job.execute(CancelAfter(4))
    with Project.open(tiny_project) as p:
        assert p.run(job.run_id).status == "cancelled"
    job2 = ExtractJob(tiny_project, opts)
    job2.execute(JobProgress())
    assert job2.run_id == job.run_id
    check_against_direct(tiny_project)


SLOW_FACTORY = textwrap.dedent(
    """
    import time
    import torch
    from tests.app.engine.conftest import TinyNet

    class Slow(TinyNet):
        def forward(self, x):
            time.sleep(0.15)
            return super().forward(x)

    def make():
        torch.manual_seed(0)
        return Slow()
    """
)


def test_kill_mid_extraction_then_resume(tmp_path):
    """A real SIGKILL in the middle of pass 1: the project stays consistent and the rerun finishes it exactly."""
    from app.workspace import add_dataset, add_model

    data = tmp_path / "coco"
    write_coco(data, 24, corrupt=5)
    factory = tmp_path / "slow_model.py"
    factory.write_text(SLOW_FACTORY)
    torch.manual_seed(0)
    proj = tmp_path / "p.nstudio"
    with Project.create(proj) as p:
        add_model(p, f"python:{factory}:make", None, name="slow", trust_code=True,
                  preprocess_overrides={"resize": SIZE, "crop": SIZE, "mean": (0.5,) * 3, "std": (0.25,) * 3})
        add_dataset(p, data, name="coco")
    root = Path(__file__).resolve().parents[3]
    code = (
        "import sys; from app.engine.extract import ExtractJob, ExtractOptions; from app.jobs import JobProgress;"
        f"ExtractJob(sys.argv[1], ExtractOptions(layers={LAYERS!r}, batch_size=2, num_workers=0, device='cpu',"
        " checkpoint_seconds=0)).execute(JobProgress())"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(proj)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        with Project.open(proj) as p:
            runs = p.runs("extract")
            done = runs[0].done if runs else 0
        if done >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= done < 48, done
    with Project.open(proj) as p:
        assert p.integrity_check() == "ok"
        run = p.runs("extract")[0]
        assert run.status == "interrupted"
        assert p.layer_stats(p.layer(p.model()["id"], "conv1")["id"]) is None
    job, rep = run_extract(proj, batch_size=4)
    assert job.run_id == run.id and rep.images == 23
    check_against_direct(proj)


def test_pass2_on_pass1_batches_equals_decoding_again(tiny_project, tmp_path, monkeypatch):
    """Pass 2 runs on the batches pass 1 kept (images decoded once) or, past the budget, decodes them again: the
    stored arrays are the same either way."""
    import shutil

    import app.sources.datasets as datasets

    again = tmp_path / "again.nstudio"
    shutil.copytree(tiny_project, again)
    decoded = []
    real = datasets.load_rgb
    monkeypatch.setattr(datasets, "load_rgb", lambda path: decoded.append(path) or real(path))
    job_kept, _ = run_extract(tiny_project)
    kept_decodes = len(decoded)
    decoded.clear()
    job_again, _ = run_extract(again, reuse_mb=0)
    assert kept_decodes == 24 and len(decoded) == 48  # every image once, or once per pass
    a = tiny_project / "arrays" / f"run-{job_kept.run_id}"
    b = again / "arrays" / f"run-{job_again.run_id}"
    files = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.npy"))
    for f in files:
        assert np.array_equal(np.load(a / f), np.load(b / f), equal_nan=True), f
