"""The TExplain translator job on a tiny project: a CNN trained on a planted-cue dataset, a tiny caption LM;
training is cancelled and resumed, the card compares with the LM alone, and the labeler, the CSV export and the CLI
read it back."""
from __future__ import annotations

import csv
import json

import pytest

from app.engine.extract import ExtractJob, ExtractOptions
from app.engine.labeling import LabelJob
from app.jobs import Cancelled, JobProgress
from app.language.translator import TranslatorJob, TranslatorOptions, translator_cards
from app.project.store import Project
from app.workspace import add_dataset, add_model
from labelers.base import MissingInputError
from tests.texplain_helpers import train_word_lm, write_cue_dataset


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from app.demo.train import train_demo_model

    root = tmp_path_factory.mktemp("texplain")
    data = write_cue_dataset(root / "data", n=90)
    caps = [a["caption"] for a in json.loads((data / "annotations" / "captions.json").read_text())["annotations"]]
    train_word_lm(root / "lm", caps, steps=40)
    train_demo_model(data, root / "cnn.safetensors", epochs=3, width=4, batch_size=32, lr=1e-2)
    path = root / "p.nstudio"
    with Project.open_or_create(path) as p:
        add_model(p, "builtin:shapes_cnn", root / "cnn.safetensors", name="cnn")
        add_dataset(p, data, name="cue")
    ExtractJob(path, ExtractOptions(layers=["block4", "fc"], num_workers=0, device="cpu")).execute(JobProgress())
    return path, root / "lm"


def test_train_cancel_resume_card_label_export(project, tmp_path, capsys):
    path, lm = project
    with pytest.raises(MissingInputError, match="translator"):
        LabelJob(path, "texplain", "fc", device="cpu").execute(JobProgress())

    opts = TranslatorOptions(lm=str(lm), steps=60, batch_size=32, prefix_length=2, device="cpu",
                             checkpoint_seconds=0.0)
    progress = JobProgress()

    def cancel_at_step_20(info):
        if info.message.startswith("training") and info.done >= 20:
            progress.cancel()

    progress.listeners.append(cancel_at_step_20)
    progress.min_interval = 0.0
    job = TranslatorJob(path, opts)
    with pytest.raises(Cancelled):
        job.execute(progress)
    with Project.open(path) as p:
        assert p.run(job.run_id).status == "cancelled"
    assert (job.folder / "state.safetensors").exists() and not (job.folder / "card.json").exists()

    again = TranslatorJob(path, opts)
    report = again.execute(JobProgress())
    assert again.run_id == job.run_id  # the same run, resumed
    assert report.layer == "block4" and report.classifier_layer == "fc"  # the input of the final linear layer
    assert report.heldout_loss < report.baseline_loss
    card = json.loads((again.folder / "card.json").read_text())
    assert card["lm"]["fingerprint"] and card["loss_curve"][-1][0] == 60
    assert "without a prefix" in (again.folder / "README.md").read_text()
    assert not (again.folder / "state.safetensors").exists()
    with Project.open(path) as p:
        assert [c["name"] for c in translator_cards(p)] == [again.folder.name]

    out = LabelJob(path, "texplain", "fc", {"sentences": 4}, device="cpu").execute(JobProgress())
    assert out.summary["mode"] == "classes"
    assert [c["name"] for c in out.summary["spurious"]] == ["circle", "square", "cross"]
    LabelJob(path, "texplain", "block4", {"sentences": 4, "top_images": 10}, device="cpu").execute(JobProgress())

    from app.cli import main
    target = tmp_path / "words.csv"
    assert main(["export", str(path), "--format", "texplain-words", "-o", str(target), "-q"]) == 0
    rows = list(csv.DictReader(target.open()))
    assert {r["mode"] for r in rows} == {"class", "unit"}
    assert {r["class"] for r in rows if r["mode"] == "class"} <= {"circle", "square", "cross"}
    assert main(["texplain", "list", str(path)]) == 0
    assert again.folder.name in capsys.readouterr().out


def test_features_come_from_the_extraction_when_it_has_the_layers(project):
    """The translator reads the extraction's pooled means when its layers were extracted on the dataset, and runs
    the model otherwise (block3 was not extracted); both give the same numbers (fc's logits here)."""
    import numpy as np

    from app.engine.results import LayerResults

    path, lm = project
    job = TranslatorJob(path, TranslatorOptions(lm=str(lm), layer="block3", steps=2, batch_size=8, prefix_length=2,
                                                device="cpu"))
    job.execute(JobProgress())
    assert "source" not in json.loads((job.folder / "features.json").read_text())  # the model ran
    with Project.open(path) as p:
        fc = LayerResults.load(p, p.layer(p.model()["id"], "fc")["id"])
        extracted = np.array(fc.pooled_mean)
    np.testing.assert_allclose(np.load(job.folder / "logits.npy"), extracted, rtol=1e-4, atol=1e-5)
    default = TranslatorJob(path, TranslatorOptions(lm=str(lm), steps=2, batch_size=8, prefix_length=2, device="cpu"))
    assert default.execute(JobProgress()).layer == "block4"
    assert json.loads((default.folder / "features.json").read_text())["source"] == "extraction"
