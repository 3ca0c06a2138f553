import pytest

import labelers.base as lb
from app.engine.extract import ExtractJob, ExtractOptions
from app.engine.labeling import LabelJob
from app.jobs import JobProgress
from app.project.store import Project


@pytest.fixture
def extracted(tiny_project):
    ExtractJob(tiny_project, ExtractOptions(layers=["conv1", "conv2"], batch_size=8, num_workers=0,
                                            device="cpu")).execute(JobProgress())
    return tiny_project


@pytest.mark.parametrize("method", ["netdissect", "compexp", "invert", "textsum"])
def test_each_method_labels_every_unit_and_is_stored(extracted, method):
    job = LabelJob(extracted, method, "conv2", device="cpu", num_workers=0)
    rep = job.execute(JobProgress())
    assert rep.units == 6 and rep.labels > 0
    with Project.open(extracted) as p:
        rows = p.labels(layer_id=p.layer(p.model()["id"], "conv2")["id"], method=method)
        units = {r["unit"] for r in rows}
        assert units and units <= set(range(6))
        if method == "invert":  # every unit has an AUC; mask methods skip units with no overlap at all
            assert units == set(range(6))
        assert all(r["rank"] >= 1 and r["run_id"] == job.run_id for r in rows)
        run = p.run(job.run_id)
        assert run.status == "done" and run.source_run_id is not None
        if method == "invert":
            assert all(r["p_value"] is not None for r in rows)
        if method in ("netdissect", "compexp"):
            concepts = {c["name"] for c in p.concepts(p.dataset()["id"])}
            assert all(set(r["label"].replace("(", " ").replace(")", " ").split()) - {"AND", "OR", "NOT"} <= concepts
                       for r in rows)


def test_rerun_replaces_labels_of_the_same_key(extracted):
    a = LabelJob(extracted, "netdissect", "conv1", device="cpu")
    a.execute(JobProgress())
    b = LabelJob(extracted, "netdissect", "conv1", {"top_n": 2}, device="cpu")
    b.execute(JobProgress())
    with Project.open(extracted) as p:
        rows = p.labels(layer_id=p.layer(p.model()["id"], "conv1")["id"], method="netdissect")
        assert {r["run_id"] for r in rows} == {b.run_id}  # the newest run is what is shown
        assert max(r["rank"] for r in rows) == 2


def test_missing_input_names_what_is_missing(extracted):
    with pytest.raises(lb.MissingInputError, match="--clip"):
        LabelJob(extracted, "clip_dissect", "conv1", device="cpu").execute(JobProgress())
    with Project.open(extracted) as p:
        assert p.runs("label") == []  # nothing was started, so nothing is left to resume or clean up


def test_unknown_method_and_bad_parameter(extracted):
    with pytest.raises(lb.LabelerError, match="no labeling method named"):
        LabelJob(extracted, "nope", "conv1").execute(JobProgress())
    with pytest.raises(lb.LabelerError, match="beam_size"):
        LabelJob(extracted, "compexp", "conv1", {"beam_size": "many"}).execute(JobProgress())
