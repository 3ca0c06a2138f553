"""The Language models panel: lists the project's models with their held-out figures, shows the model card and
the loss curve; training is a picklable run (the window's child-process runner takes it); the window's idea of
which methods can run comes from the input providers."""
from __future__ import annotations

from app.jobs import JobProgress
from tests.app.ui.conftest import build_project


def test_panel_shows_trained_model_card_and_curve(qtbot, window, tmp_path, model_file, coco_dir):
    from app.language.train import TrainJob, TrainOptions
    from app.ui.jobproc import picklable

    proj = build_project(tmp_path, model_file, coco_dir, layers=["features.1"])
    assert window.open_project(proj)
    panel = window.language
    assert panel.table.rowCount() == 0 and "Missing" in panel.status.text()
    assert "clip_dissect" in window.unavailable_methods()["features.1"]

    job = TrainJob(proj, TrainOptions(kind="lm", steps=4, batch_size=8, hidden=32, layers=1, vocab_size=200,
                                      device="cpu"))
    assert picklable(job)
    rep = job.execute(JobProgress())
    window.refresh()
    assert panel.table.rowCount() == 1
    assert panel.table.item(0, 0).text() == rep.name and panel.table.item(0, 3).text() == "yes"
    assert "text perplexity" in panel.table.item(0, 4).text() and "baseline" in panel.table.item(0, 4).text()
    assert rep.name in panel.card.toPlainText() and "Held-out" in panel.card.toPlainText()
    xs, ys = panel.curve.getData()
    assert list(xs) == [1, 2, 3, 4] and len(ys) == 4
    assert window.language_dock.toggleViewAction().text() == "Language models"


def test_retrain_captioner_on_descriptions_is_one_button(qtbot, window, tmp_path, model_file, coco_dir,
                                                         monkeypatch):
    """The button is off until a unit has a human description; it queues the captioner's training job (picklable,
    for the child-process runner) and says how many described units it learns from and holds out."""
    from PySide6.QtWidgets import QDialog

    from app.language.data import description_split, heldout_key
    from app.project.store import Project
    from app.ui.jobproc import picklable
    from app.ui.views import language as language_view

    proj = build_project(tmp_path, model_file, coco_dir, layers=["features.1"])
    assert window.open_project(proj)
    panel = window.language
    assert not panel.retrain_button.isEnabled()
    with Project.open(proj) as p:
        layer = p.layer(p.model()["id"], "features.1")
        who = p.annotator("ann")
        ids = p.unit_ids(layer["id"])
        for i, uid in enumerate(ids):
            p.set_annotation(annotator_id=who, unit_id=uid, kind="description", text=f"red things {i}")
        seen, held = description_split(p)
    assert len(seen) + len(held) == len(ids) and all(heldout_key(u) for u in held)
    window.refresh()
    assert panel.descriptions == (len(seen), len(held))
    assert panel.retrain_button.isEnabled() == bool(seen)

    shown = []

    def accept(dlg):
        shown.append(dlg.note.text())
        return QDialog.DialogCode.Accepted

    monkeypatch.setattr(language_view.DescriptionsDialog, "exec", accept)
    queued = []
    monkeypatch.setattr(window, "submit", lambda job: queued.append(job))
    panel._retrain()
    assert f"learns from {len(seen)} of them; {len(held)} are held out" in shown[0]
    assert len(queued) == 1 and queued[0].options.kind == "captioner" and picklable(queued[0])
