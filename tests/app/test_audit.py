"""Find units by their labels and names, ablate them, and measure what changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.app.naming_helpers import PREPROCESS, SIZE, UNITS, LayerRow, tiny_model


def _imagefolder(root, n_per_class=4):
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


@pytest.fixture()
def project(tmp_path):
    from app.project.store import Project
    from app.sources.datasets import open_dataset
    from labelers.base import Label

    p = Project.create(tmp_path / "p.nstudio")
    model_id = p.add_model(name="tiny", spec="builtin:tiny", kind="builtin", weights_path=None, fingerprint="tiny",
                           preprocess=PREPROCESS, class_names=["a", "b", "c"], layers=[LayerRow("act2", UNITS)])
    layer_id = p.layer(model_id, "act2")["id"]
    p.add_dataset(name="test", reader=open_dataset(_imagefolder(tmp_path / "test")), fingerprint="fp")
    run = p.create_run(kind="label", key="k", params={}, model_id=model_id, layer_id=layer_id, method="compexp")
    p.replace_labels(run, layer_id, "compexp", [
        Label(unit=0, rank=1, text="((glyph OR star) AND (NOT sky))", score=0.3),
        Label(unit=1, rank=1, text="(water AND (NOT glyph))", score=0.3),
        Label(unit=2, rank=1, text="blue sky", score=0.2)])
    p.finish_run(run, "done")
    ann = p.annotator("ana")
    unit_ids = p.unit_ids(layer_id)
    p.set_annotation(annotator_id=ann, unit_id=unit_ids[3], kind="description", text="Small glyphs stamped on images")
    p.set_annotation(annotator_id=ann, unit_id=unit_ids[4], kind="name", text="letters")
    p.close()
    return tmp_path / "p.nstudio"


class FakeEncoder:
    """Hand-set unit vectors: "letters" means the same as "glyph", nothing else does."""

    def sentences(self, texts):
        return np.array([[1.0, 0.0] if t in ("glyph", "letters") else [0.0, 1.0] for t in texts], np.float32)


def test_find_matches_words_and_positive_atoms_but_not_negated_ones(project):
    from app.audit import find_units
    from app.project.store import Project

    with Project.open(project) as p:
        exact = find_units(p, "glyphs")
        meaning = find_units(p, "glyph", encoder=FakeEncoder())
    assert {m.unit: [r.how for r in m.reasons] for m in exact} == {0: ["formula atom"], 3: ["words"]}
    with Project.open(project) as p:  # only another method's labels: the compexp formula no longer counts
        assert {m.unit for m in find_units(p, "glyphs", methods=["netdissect"])} == {3}
    assert 1 not in {m.unit for m in meaning}  # "NOT glyph" never answers a query for glyphs
    assert {m.unit for m in meaning} == {0, 3, 4}
    assert [r.how for r in next(m for m in meaning if m.unit == 4).reasons] == ["meaning"]


def test_find_and_the_units_browser_search_apply_one_word_rule(project):
    """`find` and the search box agree unit for unit, negated atoms included ("NOT glyph" finds only the unit whose
    formula says it does not fire on glyphs)."""
    from app.audit import find_units, unit_terms, query_terms, terms_match
    from app.project.store import Project

    texts = {0: ["((glyph OR star) AND (NOT sky))"], 1: ["(water AND (NOT glyph))"], 2: ["blue sky"],
             3: ["Small glyphs stamped on images"], 4: ["letters"]}
    with Project.open(project) as p:
        for query in ("glyph", "NOT glyph", "-sky", "sky", "water NOT glyph", "blue sky"):
            found = {m.unit for m in find_units(p, query)}
            searched = {u for u, t in texts.items() if terms_match(query_terms(query), unit_terms(t))}
            assert found == searched, query
        assert {m.unit for m in find_units(p, "NOT glyph")} == {1}
        assert {m.unit for m in find_units(p, "sky")} == {2}


def _run(project, tmp_path, **kw):
    from app.audit import AblateJob, AblateOptions
    from app.jobs import JobProgress, run_job

    model = tiny_model()
    opts = AblateOptions(**{"layer": "act2", "dataset": "test", "device": "cpu", "n_boot": 200, "controls": 3, **kw})
    result = run_job(AblateJob(project, opts, model=model), JobProgress())
    return result, model


def _hook_count(net):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def test_ablation_matches_zeroing_by_hand_and_is_stored_as_a_run(project, tmp_path):
    from app.engine.extract import open_project_dataset
    from app.project.store import Project

    result, model = _run(project, tmp_path, units=[1, 3])
    assert _hook_count(model.module) == 0
    with Project.open(project) as p:
        reader = open_project_dataset(p.dataset("test"))
        run = p.runs("ablate")[-1]
    _classes, labels = reader.class_labels()
    tf = model.preprocess.transform()
    x = torch.stack([tf(Image.open(im.path).convert("RGB")) for im in reader.images])
    net = model.module
    with torch.no_grad():
        before = net(x).argmax(1).numpy()
        h = net.act2(net.conv2(net.act1(net.conv1(x))))
        h[:, [1, 3]] = 0
        after = net.fc(torch.flatten(net.pool(h), 1)).argmax(1).numpy()
    assert result.accuracy_before == pytest.approx(float((before == labels).mean()))
    assert result.accuracy_after == pytest.approx(float((after == labels).mean()))
    assert result.changed == int((before != after).sum())
    assert result.units == [1, 3] and len(result.control) == 3
    assert all(len(u) == 2 and not set(u) & {1, 3} for u in result.control_units)
    lo, hi = result.difference_ci
    assert lo <= result.difference <= hi
    assert run.status == "done" and run.report["accuracy_after"] == result.accuracy_after


def test_ablating_nothing_changes_no_prediction_and_query_picks_the_labelled_units(project, tmp_path):
    nothing, _ = _run(project, tmp_path, units=[])
    assert nothing.changed == 0 and nothing.accuracy_after == nothing.accuracy_before
    by_query, _ = _run(project, tmp_path, query="glyph", exact_only=True, mode="constant", constant=0.0)
    assert by_query.units == [0, 3]


def test_controls_of_an_edit_over_half_the_layer_are_random_subsets_of_the_whole_layer(project, tmp_path):
    """4 of the layer's 6 units leave only 2 others: controls are 4 random units of all 6, not one repeated set."""
    result, _ = _run(project, tmp_path, units=[0, 1, 2, 3], controls=6)
    assert all(len(u) == 4 and set(u) <= set(range(6)) for u in result.control_units)
    assert len({tuple(u) for u in result.control_units}) > 1
    assert "shares units with the edit" in result.control_caveat()
    few, _ = _run(project, tmp_path, units=[1, 3], controls=3)
    assert all(not set(u) & {1, 3} for u in few.control_units) and few.control_caveat() == ""


def test_ablate_refuses_units_out_of_range(project, tmp_path):
    from app.errors import JobError

    with pytest.raises(JobError, match="out of range"):
        _run(project, tmp_path, units=[99])


def shapes_cnn_project(tmp, classes: list[str]):
    """A project made with the CLI: a random ShapesCNN saved as Neuron Studio writes it (with `classes` as its
    class names) and a labelled image folder named "test"."""
    import json

    from safetensors.torch import save_file

    from app.cli import main
    from app.demo.train import ShapesCNN

    torch.manual_seed(0)
    net = ShapesCNN(num_classes=3, width=4).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "w.safetensors"), metadata={
        "neuron_studio.architecture": "shapes_cnn",
        "neuron_studio.arch_kwargs": json.dumps({"num_classes": 3, "width": 4}),
        "neuron_studio.preprocess": json.dumps({"resize": SIZE, "crop": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3}),
        "neuron_studio.classes": json.dumps(classes)})
    proj = tmp / "p.nstudio"
    assert main(["new", str(proj)]) == 0
    assert main(["add-model", str(proj), "builtin:shapes_cnn", "--weights", str(tmp / "w.safetensors"), "-q"]) == 0
    assert main(["add-dataset", str(proj), str(_imagefolder(tmp / "test")), "--name", "test", "-q"]) == 0
    return proj


def test_cli_ablate_json_and_save_on_a_builtin_model(tmp_path, capsys):
    """The whole command on a real project: a random ShapesCNN saved as Neuron Studio writes it."""
    import json

    from app.cli import main

    proj = str(shapes_cnn_project(tmp_path, ["c", "b", "a"]))  # not the folders' sorted order: matched by name
    capsys.readouterr()
    assert main(["ablate", proj, "--layer", "block4", "--units", "0,2", "--dataset", "test", "--controls", "2",
                 "--bootstrap", "50", "--device", "cpu", "--save", str(tmp_path / "edited.safetensors"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units"] == [0, 2] and len(out["control"]) == 2 and out["images"] == 12
    assert {"accuracy_before", "accuracy_after", "changed", "difference_ci", "per_class"} <= set(out)
    assert any("folded into fc" in n for n in out["notes"])
    assert main(["ablate", proj, "--layer", "block4", "--units", "0,x", "--dataset", "test"]) == 2

    # a constant reaching block4's padded convolution cannot be folded: saved as a wrapper, applied on load
    assert main(["ablate", proj, "--layer", "block3", "--units", "1", "--mode", "constant", "--constant", "1.5",
                 "--dataset", "test", "--controls", "0", "--bootstrap", "10", "--device", "cpu", "--save",
                 str(tmp_path / "wrapped.safetensors"), "--json"]) == 0
    assert any("as a wrapper" in n for n in json.loads(capsys.readouterr().out)["notes"])
    from app.sources import instrument
    from app.sources.models import load_model

    edited = load_model("builtin:shapes_cnn", tmp_path / "wrapped.safetensors")
    original = load_model("builtin:shapes_cnn", tmp_path / "w.safetensors")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), instrument.ablate(original.module, "block3", [1], values=1.5):
        want = original.forward(x)
    with torch.no_grad():
        assert not torch.allclose(original.forward(x), want)
        torch.testing.assert_close(edited.forward(x), want)


def test_cancel_stops_the_job_records_it_and_leaves_no_hooks(project, tmp_path):
    from app.audit import AblateJob, AblateOptions
    from app.jobs import JobProgress, run_job
    from app.project.store import Project
    from labelers.base import Cancelled

    model = tiny_model()
    progress = JobProgress()
    progress.min_interval = 0.0
    progress.listeners.append(lambda info: progress.cancel() if info.done > 0 else None)
    opts = AblateOptions(layer="act2", dataset="test", units=[1], device="cpu", batch_size=4, controls=1)
    with pytest.raises(Cancelled):
        run_job(AblateJob(project, opts, model=model), progress)
    assert _hook_count(model.module) == 0
    with Project.open(project) as p:
        assert p.runs("ablate")[-1].status == "cancelled"


@pytest.fixture()
def csv_project(project, tmp_path):
    """The project plus a labels.csv dataset: images in train/ and val/ folders, one-hot columns a, b, c named as
    the model's classes (one image has none: not scored) and a 0/1 column `flag`."""
    from app.project.store import Project
    from app.sources.datasets import open_dataset

    root = tmp_path / "csv"
    rng = np.random.default_rng(1)
    rows = ["image,a,b,c,flag"]
    for i in range(10):
        rel = f"{'val' if i < 4 else 'train'}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / rel)
        onehot = [0, 0, 0] if i == 9 else [int(i % 3 == c) for c in range(3)]
        rows.append(f"{rel},{','.join(map(str, onehot))},{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with Project.open(project) as p:
        p.add_dataset(name="csv", reader=open_dataset(root), fingerprint="csv")
    return project


def test_labels_csv_targets_and_split_score_the_right_images(csv_project, tmp_path):
    from app.errors import DatasetError

    model = tiny_model()
    tf = model.preprocess.transform()
    x = torch.stack([tf(Image.open(tmp_path / "csv" / f"{'val' if i < 4 else 'train'}/{i}.png").convert("RGB"))
                     for i in range(10)])
    with torch.no_grad():
        pred = model.module(x).argmax(1).numpy()
    classes = np.array([i % 3 for i in range(10)])

    onehot, _ = _run(csv_project, tmp_path, units=[], dataset="csv")  # the columns named after the model's classes
    assert onehot.images == 9 and onehot.accuracy_before == pytest.approx(float((pred[:9] == classes[:9]).mean()))
    assert any("not scored" in n for n in onehot.notes)
    val, _ = _run(csv_project, tmp_path, units=[], dataset="csv", split="val")
    assert val.images == 4 and val.accuracy_before == pytest.approx(float((pred[:4] == classes[:4]).mean()))
    flag, _ = _run(csv_project, tmp_path, units=[], dataset="csv", target="flag")  # binary: 0/1 is the output
    assert flag.images == 10 and [c.name for c in flag.per_class] == ["not flag", "flag"]
    assert flag.accuracy_before == pytest.approx(float((pred == np.arange(10) % 2).mean()))

    with pytest.raises(DatasetError, match="no labels.csv column nope.*a, b, c, flag"):
        _run(csv_project, tmp_path, units=[], dataset="csv", target="nope")
    with pytest.raises(DatasetError, match="no image of dataset csv lies in a folder named 'test'.*train, val"):
        _run(csv_project, tmp_path, units=[], dataset="csv", split="test")
    with pytest.raises(DatasetError, match="--target names labels.csv columns"):
        _run(csv_project, tmp_path, units=[], dataset="test", target="a")
