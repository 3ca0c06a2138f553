"""The EXEMPLARS input against a direct computation, and MILAN run through the labeling job."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.engine.exemplars import ProjectExemplars
from app.engine.extract import ExtractJob, ExtractOptions, open_project_dataset
from app.engine.labeling import LabelJob
from app.engine.results import LayerResults
from app.errors import JobError
from app.jobs import JobProgress
from app.project.store import Project
from tests.app.engine.conftest import SIZE


@pytest.fixture
def extracted(tiny_project):
    ExtractJob(tiny_project, ExtractOptions(layers=["conv2", "fc"], batch_size=8, num_workers=0, topk=4,
                                            device="cpu")).execute(JobProgress())
    return tiny_project


def provider(project_path, layer):
    with Project.open(project_path) as p:
        model = p.model()
        res = LayerResults.load(p, p.layer(model["id"], layer)["id"])
        reader = open_project_dataset(p.dataset(res.stats["dataset_id"]))
        rows = np.nonzero(res.valid)[0]
        return ProjectExemplars(res, reader, model["preprocess"], rows, cache_images=3), res, reader, model


@pytest.mark.parametrize("layer", ["conv2", "fc"])
def test_exemplar_images_and_masks_equal_a_direct_computation(extracted, layer):
    from app.imaging import model_view, region, upsample_map
    from app.sources.datasets import load_rgb

    ex, res, reader, model = provider(extracted, layer)
    units = [5, 0, 2] if layer == "conv2" else [2, 0, 1]
    got = list(ex.batches(units, 3, 0.99, chunk=2))
    assert [b.units.tolist() for b in got] == [units[:2], units[2:]]
    thr = res.quantiles[0.99]
    seen = set()
    for b in got:
        assert b.images.shape[1:] == (3, SIZE, SIZE, 3) and b.masks.shape[1:] == (3, SIZE, SIZE)
        for i, u in enumerate(b.units.tolist()):
            for j in range(3):
                idx = int(res.topk_index[u, j])
                ok = np.isfinite(res.topk_scores[u, j]) and res.valid[idx]
                assert bool(b.present[i, j]) == ok
                if not ok:
                    continue
                view = np.asarray(model_view(load_rgb(reader.images[idx].path), model["preprocess"]))
                assert np.array_equal(b.images[i, j].numpy(), view)
                mask = region(upsample_map(np.asarray(res.topk_maps[u, j], np.float32), SIZE), thr[u])
                assert np.array_equal(b.masks[i, j].numpy(), mask)
                seen.update(np.unique(mask).tolist())
                assert int(b.image_index[i, j]) == int(np.searchsorted(np.nonzero(res.valid)[0], idx))
    if layer == "conv2":  # regions, not whole or empty pictures
        assert seen == {False, True}
    assert ex._cache and len(ex._cache) <= 3  # the decoded-image cache stays bounded


def test_exemplar_errors_say_what_to_do(extracted):
    ex, *_ = provider(extracted, "conv2")
    with pytest.raises(JobError, match="quantile"):
        next(ex.batches([0], 2, 0.9, 1))
    with pytest.raises(JobError, match="top images per unit"):
        next(ex.batches([0], 10, 0.99, 1))


def test_milan_through_the_labeling_job(extracted, tmp_path):
    from labelers.textmodels import load
    from tests.labelers.tiny_language import make_captioner, make_lm

    cap = make_captioner(tmp_path / "cap", image_size=16)
    lm = make_lm(tmp_path / "lm")
    job = LabelJob(extracted, "milan", "conv2", {"k": 3, "beam": 4, "max_length": 3, "batch": 4, "top_n": 2},
                   device="cpu", captioner=cap, causal_lm=lm)
    rep = job.execute(JobProgress())
    assert rep.units == 6
    with Project.open(extracted) as p:
        rows = p.labels(layer_id=p.layer(p.model()["id"], "conv2")["id"], method="milan")
        run = p.run(job.run_id)
    assert {r["unit"] for r in rows} == set(range(6))
    assert all({"wpmi", "log_p_d_given_e", "log_p_d"} <= set(r["extra"]) for r in rows)
    assert run.status == "done" and run.params["captioner"] == str(cap)
    assert load(cap, "captioner").set_conditioned
    # without a captioner, nothing is started and the message says where one comes from
    with pytest.raises(Exception, match="captioner"):
        LabelJob(extracted, "milan", "fc", device="cpu", causal_lm=lm).execute(JobProgress())


def test_patch_grid_maps_of_a_vision_transformer(tmp_path):
    """A ViT layer's maps are its patch grid (here 2 x 3, not square): upsampled to the view like any map."""
    from types import SimpleNamespace

    from app.imaging import region, upsample_map

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    reader = SimpleNamespace(images=[SimpleNamespace(path=tmp_path / f"{i}.png") for i in range(4)])
    maps = rng.normal(size=(2, 3, 2, 3)).astype(np.float32)
    res = SimpleNamespace(topk_index=np.array([[3, 1, 0], [2, 0, 1]]), topk_maps=maps,
                          topk_scores=np.array([[3.0, 2.0, np.nan], [1.0, 0.5, 0.1]]),
                          quantiles={0.99: np.array([0.2, -0.1], np.float32)}, valid=np.ones(4, bool),
                          layer={"name": "encoder.layer.3"})
    pre = {"resize": 24, "crop": 24, "mean": [0.5] * 3, "std": [0.5] * 3}
    ex = ProjectExemplars(res, reader, pre, np.arange(4))
    (b,) = list(ex.batches([0, 1], 3, 0.99, 8))
    assert b.present.tolist() == [[True, True, False], [True, True, True]]
    for u in range(2):
        for j in range(3):
            want = region(upsample_map(maps[u, j], 24), res.quantiles[0.99][u]) & bool(b.present[u, j])
            assert np.array_equal(b.masks[u, j].numpy(), want)
    assert ex.topk_index.tolist() == [[3, 1, -1], [2, 0, 1]]
