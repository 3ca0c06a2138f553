"""The window end to end, offscreen, with real widgets: create a project, add a model and a dataset through their
dialogs, run an extraction and labeling runs through the jobs panel, cancel and resume one, browse to a unit and
compare what the table and the unit view show with the project database."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QDialog, QDialogButtonBox

from app.engine.extract import ExtractOptions
from app.engine.results import LayerResults
from app.project.store import Project
from app.ui.workers import JobState
from tests.app.ui.conftest import PREPROCESS, build_project

pytestmark = pytest.mark.qt
LONG = 90_000  # ms: generous for a shared 2-core machine


def _add_model(qtbot, window, model_file, factory="make"):
    dlg = window.add_model()
    dlg.kind.setCurrentIndex(dlg.kind.findData("python"))
    dlg.target.setCurrentText(str(model_file))
    dlg.factory.setText(factory)
    dlg.trust.setChecked(True)
    dlg.pre_box.setChecked(True)
    dlg.resize_.setValue(PREPROCESS["resize"])
    dlg.crop.setValue(PREPROCESS["crop"])
    dlg.mean.setText("0.5,0.5,0.5")
    dlg.std.setText("0.25, 0.25, 0.25")
    dlg.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    return dlg


def _wait_done(qtbot, handle, state=JobState.DONE):
    qtbot.waitUntil(lambda: handle.state.finished, timeout=LONG)
    assert handle.state is state, handle.error


def test_first_session_from_empty_project_to_labeled_unit(qtbot, window, tmp_path, model_file, coco_dir):
    assert window.stack.currentWidget() is window.welcome
    assert window.new_project(tmp_path / "study.nstudio")
    assert window.stack.currentWidget() is window.tabs

    # a model that cannot load: the dialog shows the error's message and stays open
    bad = _add_model(qtbot, window, model_file, factory="no_such_factory")
    qtbot.waitUntil(lambda: bad.error.isVisible() and not bad.checking, timeout=LONG)
    assert "no_such_factory" in bad.error.text()
    assert "Traceback" not in bad.error.text()
    assert bad.isVisible() and bad.result() != QDialog.DialogCode.Accepted
    bad.reject()
    with Project.open(window.project_path) as p:
        assert p.all("SELECT * FROM models") == []

    dlg = _add_model(qtbot, window, model_file)
    qtbot.waitUntil(lambda: dlg.result() == QDialog.DialogCode.Accepted or dlg.error.isVisible(), timeout=LONG)
    assert dlg.result() == QDialog.DialogCode.Accepted, dlg.error.text()
    assert window.model_combo.currentText() == "tiny_net"
    # the module tree shows shapes and unit counts from the project
    item = window.layer_tree.items["features.3"]
    row = item.parent().child(item.row(), 2).text(), item.parent().child(item.row(), 3).text()
    assert row == ("12 x 16 x 16", "12")

    ds = window.add_dataset(str(coco_dir))
    ds.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    qtbot.waitUntil(lambda: ds.result() == QDialog.DialogCode.Accepted or ds.error.isVisible(), timeout=LONG)
    assert ds.result() == QDialog.DialogCode.Accepted, ds.error.text()
    assert "40 images" in window.datasets_label.text()

    # extraction through the jobs panel
    window.layer_tree.set_checked(["features.1", "features.3"])
    assert window.extract_button.isEnabled()
    opts = ExtractOptions(layers=window.layer_tree.checked_layers(), device="cpu", num_workers=0, batch_size=8)
    handle = window.extract_checked(options=opts, dataset_id=None)
    row = window.jobs.rows[handle.id]
    _wait_done(qtbot, handle)
    assert row.bar.value() == 1000 and "40 images" in row.detail.text()
    assert handle.result.images == 40
    qtbot.waitUntil(lambda: window.table is not None, timeout=LONG)

    # two labeling runs queued at once: they run one after the other
    h1 = window.submit_label("features.3", "netdissect")
    h2 = window.submit_label("features.3", "invert")
    assert h2.state is JobState.QUEUED
    assert window.submit_label("features.3", "invert") is None  # the same run twice is refused
    _wait_done(qtbot, h1)
    _wait_done(qtbot, h2)
    assert h1.finished_at <= h2.started_at
    layer_id = window.project.layer(window.model_id, "features.3")["id"]
    window.layer_tree.select_layer(layer_id)  # choosing an extracted layer in the tree shows its units
    qtbot.waitUntil(lambda: window.table is not None and window.table.layer_id == layer_id
                    and {m.method for m in window.table.methods} == {"invert", "netdissect"}, timeout=LONG)

    # browse to a unit and check the table against the database
    with Project.open(window.project_path) as p:
        best = {(r["method"], r["unit"]): r for r in p.labels(layer_id=layer_id, max_rank=1)}
        all_labels = p.labels(layer_id=layer_id)
        results = LayerResults.load(p, layer_id)
        topk_index = np.asarray(results.topk_index)
        thresholds = np.asarray(results.threshold())
        valid = int(results.valid.sum())
    unit = next(u for (m, u) in sorted(best) if m == "netdissect")
    assert window.units.select_unit(unit)
    model, proxy = window.units.model, window.units.proxy
    r = proxy.mapToSource(window.units.view.currentIndex()).row()
    shown = {model.columns[c]: model.data(model.index(r, c)) for c in range(model.columnCount())}
    for col, text in shown.items():
        if col.kind == "label":
            assert text == best[(col.method, unit)]["label"]
        elif col.kind == "score":
            assert math.isclose(float(text), best[(col.method, unit)]["score"], abs_tol=5e-4)
        elif col.kind == "unit":
            assert text == str(unit)

    # the unit view: exemplars, thumbnails, histogram with threshold, ranked labels side by side
    uv = window.unit_view
    assert uv.unit == unit
    assert [t.exemplar.image for t in uv.model.thumbs] == topk_index[unit][: len(uv.model.thumbs)].tolist()
    assert len(uv.model.thumbs) == min(15, valid)
    qtbot.waitUntil(lambda: all(t.base is not None for t in uv.model.thumbs), timeout=LONG)
    assert all(t.overlays["heat"] is not None for t in uv.model.thumbs)
    assert uv.model.thumbs[0].base.width() == PREPROCESS["crop"]
    qtbot.waitUntil(lambda: uv.histogram is not None, timeout=LONG)
    assert int(uv.histogram.counts.sum()) == valid
    assert math.isclose(uv.threshold_line.value(), float(thresholds[unit]), rel_tol=1e-5)
    heads = [uv.labels_table.horizontalHeaderItem(c).text() for c in range(uv.labels_table.columnCount())]
    assert sorted(heads) == ["invert", "netdissect"]
    for c, method in enumerate(heads):
        ranked = [x for x in all_labels if x["method"] == method and x["unit"] == unit]
        for rank, lab in enumerate(ranked):
            assert uv.labels_table.item(rank, c).text().split("  ·  ")[0] == lab["label"]

    # overlays: the opacity slider only repaints; the concept mask mode draws the chosen concept
    uv.opacity_slider.setValue(25)
    assert uv.opacity == 0.25 and window.prefs.overlay_opacity == 0.25
    uv.set_overlay_mode("region")
    assert all(t.overlays["region"] is not None for t in uv.model.thumbs)
    uv.set_overlay_mode("concept")
    assert uv.concept.isVisible()
    qtbot.waitUntil(lambda: all(t.overlays.get("concept") is not None for t in uv.model.thumbs), timeout=LONG)

    # keyboard: next and previous unit follow the table's order
    window.activateWindow()  # shortcuts act in the active window; the dialogs took activation
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window)
    window.units.view.setFocus()
    order = window.units.visible_units()
    i = order.index(unit)
    qtbot.keyClick(window.units.view, Qt.Key.Key_N)
    expected = order[min(i + 1, len(order) - 1)]
    qtbot.waitUntil(lambda: uv.unit == expected)
    qtbot.keyClick(window.units.view, Qt.Key.Key_P)
    qtbot.waitUntil(lambda: uv.unit == unit)

    # text search across every label of every method
    word = best[("netdissect", unit)]["label"]
    window.units.search.setText(word)
    qtbot.waitUntil(lambda: window.units.proxy.search == word.lower(), timeout=5000)
    expected_units = sorted({x["unit"] for x in all_labels if word.lower() in x["label"].lower()})
    assert sorted(window.units.visible_units()) == expected_units
    window.units.search.clear()

    # the layer overview counts Network Dissection's interpretable units from its labels
    ov = window.overview.data
    nd = next(m for m in ov.methods if m.method == "netdissect")
    assert nd.interpretable == sum(1 for (m, u), r in best.items() if m == "netdissect" and r["extra"]["interpretable"])
    assert window.errors == []


def test_cancel_then_resume_from_the_jobs_panel(qtbot, window, tmp_path, model_file, coco_dir):
    proj = build_project(tmp_path, model_file, coco_dir, layers=["features.1"])
    assert window.open_project(proj)
    window.layer_tree.set_checked(["features.3"])
    opts = ExtractOptions(layers=["features.3"], device="cpu", num_workers=0, batch_size=1)
    handle = window.extract_checked(options=opts)
    assert handle.state is JobState.RUNNING
    window.manager.cancel(handle)  # noticed at the job's next progress report
    _wait_done(qtbot, handle, JobState.CANCELLED)
    assert window.jobs.rows[handle.id].cancel_button.isHidden()
    with Project.open(proj) as p:
        run = p.run(handle.job.run_id)
    assert run.status == "cancelled"
    qtbot.waitUntil(lambda: len(window.jobs.resumable_rows) == 1)
    resumable = window.jobs.resumable_rows[0]
    assert resumable.run.id == run.id
    resumable.resume_button.click()
    resumed = window.manager.handles[-1]
    assert resumed is not handle
    _wait_done(qtbot, resumed)
    assert resumed.job.run_id == run.id  # the same run continued, not a new one
    with Project.open(proj) as p:
        assert p.run(run.id).status == "done"
    qtbot.waitUntil(lambda: window.jobs.resumable_rows == [])


def test_closing_with_a_run_going_asks_then_cancels_and_waits(qtbot, window, tmp_path, model_file, coco_dir):
    proj = build_project(tmp_path, model_file, coco_dir, layers=["features.1"])
    assert window.open_project(proj)
    opts = ExtractOptions(layers=["features.3"], device="cpu", num_workers=0, batch_size=1)
    window.layer_tree.set_checked(["features.3"])
    handle = window.extract_checked(options=opts)
    asked = []
    window.confirm = lambda title, text: asked.append(text) or False
    window.close()
    assert asked and "can be resumed" in asked[0]
    assert window.isVisible() and not handle.state.finished or handle.state is JobState.DONE
    window.confirm = lambda title, text: True
    window.close()
    assert not window.isVisible()
    assert handle.state.finished and window.manager._threads == {}
    with Project.open(proj) as p:
        status = p.run(handle.job.run_id).status
    assert status in ("cancelled", "done")  # done only if it finished before the question was answered


def test_open_project_errors_are_messages(qtbot, window, tmp_path):
    assert not window.open_project(tmp_path / "nothing-here")
    title, text = window.errors[-1]
    assert "no Neuron Studio project here" in text and "Traceback" not in text
    assert window.project is None


def test_extract_then_label_queues_every_method_the_inputs_allow(qtbot, window, tmp_path, model_file, coco_dir):
    import labelers.base as lb

    proj = build_project(tmp_path, model_file, coco_dir, layers=["features.1"])
    assert window.open_project(proj)
    window.layer_tree.set_checked(["features.3"])
    opts = ExtractOptions(layers=["features.3"], device="cpu", num_workers=0, batch_size=16)
    handle = window.extract_checked(options=opts, then_label=True)
    _wait_done(qtbot, handle)
    queued = [h for h in window.manager.handles if h is not handle]
    # the tiny project has no language models and no TExplain translator: methods needing them are not queued
    lacking = {lb.Input.CLIP_MODEL, lb.Input.CAPTIONER, lb.Input.CAUSAL_LM, lb.Input.TRANSLATOR}
    expected = {n for n, c in lb.available().items() if not lacking & set(c.inputs)}
    assert {h.job.method for h in queued} == expected  # the tiny COCO set has masks, presence and captions
    assert {h.job.layer for h in queued} == {"features.3"}
    window.manager.cancel_all()  # running them all is the labelers' tests' business
    for h in queued:
        qtbot.waitUntil(lambda h=h: h.state.finished, timeout=LONG)
    # the layer shown last is shown again when the project is opened again
    with Project.open(proj) as p:
        second = p.find_layer(p.models()[0]["id"], "features.3")["id"]
    window.show_layer(second)
    window.close_project()
    assert window.open_project(proj)
    assert window.layer_id == second


def test_naming_board_opens_from_the_window_and_its_names_reach_the_units_table(qtbot, window, tmp_path):
    from tests.app import naming_helpers as nh

    built = nh.build_project(tmp_path)
    assert not window.act_board.isEnabled()  # no project yet
    assert window.open_project(built["project"])
    assert window.act_board.isEnabled()
    window.show_layer(built["layer_id"])
    qtbot.waitUntil(lambda: window.table is not None, timeout=LONG)
    assert window.table.names == [""] * nh.UNITS

    board = window.open_board(annotator="ann")
    assert board is not None and board.isVisible() and board.board.pool_id == built["pool_id"]
    assert window.open_board() is board  # one board per project: asking again raises it
    first = board.board.state.maps[0]
    assert board.board.set_unit_name(first.unit_id, first.unit, "red corner")
    board.close()
    qtbot.waitUntil(lambda: window.board is None, timeout=LONG)
    qtbot.waitUntil(lambda: window.table is not None and window.table.names[first.unit] == "red corner (ann)",
                    timeout=LONG)
    # a second annotator's name shows beside the first, each with its author; the unit view shows both
    from app.project.store import Project

    with Project.open(built["project"]) as p:
        p.set_annotation(annotator_id=p.annotator("bob"), unit_id=first.unit_id, kind="name", text="corner")
        p.set_annotation(annotator_id=p.annotator("bob"), unit_id=first.unit_id, kind="description",
                         text="the top-left corner of red squares")
    window.show_layer(built["layer_id"], keep_unit=first.unit)
    qtbot.waitUntil(lambda: window.table is not None and "corner (bob)" in window.table.names[first.unit],
                    timeout=LONG)
    assert window.table.names[first.unit] == "red corner (ann) · corner (bob)"
    window.units.select_unit(first.unit)
    window._on_unit(first.unit)
    notes = window.unit_view.notes.text()
    assert window.unit_view.notes.isVisible() or not window.isVisible()
    assert "ann:" in notes and "bob:" in notes and "the top-left corner of red squares" in notes
    assert window.errors == []


def test_demo_in_the_window_runs_its_steps_as_jobs(qtbot, window, tmp_path):
    """The window opens at once; the demo's setup is one job, then each step is a job of its own, and the units
    table fills in when the extraction job ends."""
    from app.demo.pipeline import DEMO_LAYERS, demo_steps

    window.prefs.num_workers = 0
    setup = window.start_demo(tmp_path / "demo", n_images=24, epochs=1, device="cpu")
    assert setup.title == "Prepare the demo: dataset, model, project"
    _wait_done(qtbot, setup)
    assert window.project is not None and window.project_path == tmp_path / "demo" / "demo.nstudio"
    steps = [s for s in demo_steps() if not s.setup]
    queued = [h for h in window.manager.handles if h is not setup]
    assert [h.title for h in queued] == [s.name for s in steps]
    extract = queued[0]
    assert extract.title.startswith("extract ")
    _wait_done(qtbot, extract)
    qtbot.waitUntil(lambda: window.units.model.rowCount() > 0, timeout=LONG)
    assert window.units.layer_combo.count() == len(DEMO_LAYERS)
    first_label = queued[1]
    _wait_done(qtbot, first_label)
    assert f"{first_label.title}: done" in window.jobs.rows[first_label.id].detail.text()
    window.manager.cancel_all()
    qtbot.waitUntil(lambda: not window.manager.active(), timeout=LONG)


def test_jobs_panel_shows_the_stage_line_with_its_own_clock(qtbot, window):
    from app.jobs import ProgressInfo
    from app.ui.views.jobs_panel import JobRow
    from app.ui.workers import JobHandle

    class Nothing:
        title = "Build the demo project"

    handle = JobHandle(Nothing())
    handle.state = JobState.RUNNING
    handle.info = ProgressInfo(40, 64, "beam 2/3, units 40/64", 300.0, 12.0, stage="compexp on block3", step=5,
                               steps=29, stage_elapsed=65.0, stage_id=7)
    row = JobRow(handle, window.manager)
    qtbot.addWidget(row)
    assert row.stage.text() == "step 5 of 29: compexp on block3  (01:05 in this stage)"
    assert row.status.text() == "beam 2/3, units 40/64" and row.eta.text() == "00:12 left"
    assert row.bar.format().startswith("40 / 64")
