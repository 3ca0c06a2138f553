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
