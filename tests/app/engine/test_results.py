"""Which images an extraction read comes from its record of image problems, never from the activation values."""
import numpy as np
import pytest

import labelers.base as lb
from app.engine.extract import ExtractJob, ExtractOptions
from app.engine.labeling import LabelJob
from app.engine.results import LayerResults
from app.jobs import JobProgress
from app.project.store import Project


@pytest.fixture
def extracted(tiny_project):
    ExtractJob(tiny_project, ExtractOptions(layers=["conv2"], batch_size=8, num_workers=0,
                                            device="cpu")).execute(JobProgress())
    return tiny_project


def _results(path):
    with Project.open(path) as p:
        return LayerResults.load(p, p.layer(p.model()["id"], "conv2")["id"])


def test_a_nan_in_unit_zero_keeps_the_image(extracted):
    res = _results(extracted)
    assert res.valid.tolist() == [i != 5 for i in range(24)]  # image 5 is the corrupt one
    pooled = np.load(res.dir / "pooled_max.npy", mmap_mode="r+")
    pooled[3, 0] = np.nan  # what fp16 autocast can leave in one unit of one image
    pooled.flush()
    del pooled
    res = _results(extracted)
    assert bool(res.valid[3]) and not bool(res.valid[5])
    job = LabelJob(extracted, "invert", "conv2", device="cpu", num_workers=0)
    with Project.open(extracted) as p:
        layer = p.layer(p.model()["id"], "conv2")
        inputs = job._inputs(p, lb.get("invert"), res, layer, p.model(), p.dataset(), "cpu")
    assert inputs.pooled_max.shape[0] == 23  # every image that was read, the one with a NaN included


def test_methods_that_need_no_pooled_activations_do_not_load_them(extracted):
    res = _results(extracted)
    job = LabelJob(extracted, "netdissect", "conv2", device="cpu", num_workers=0)
    with Project.open(extracted) as p:
        layer = p.layer(p.model()["id"], "conv2")
        inputs = job._inputs(p, lb.get("netdissect"), res, layer, p.model(), p.dataset(), "cpu")
        assert inputs.pooled_max is None and inputs.pooled_mean is None
        assert inputs.mask_counts is not None
        inputs = job._inputs(p, lb.get("invert"), res, layer, p.model(), p.dataset(), "cpu")
        assert inputs.pooled_max is not None and inputs.pooled_mean is not None
