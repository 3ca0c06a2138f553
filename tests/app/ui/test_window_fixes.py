"""Window fixes that misled users: word search that respects negation, p-value formatting, and more."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from app.ui.data import MethodColumn, UnitTable  # noqa: E402


def _table(labels: list[str], names: list[str] | None = None) -> UnitTable:
    n = len(labels)
    names = names or [""] * n
    col = MethodColumn("compexp", 1, labels, np.ones(n), np.full(n, np.nan), [""] * n, np.ones(n, bool),
                       np.ones(n, bool), False, "", "")
    hay = [f"{nm} | {t}" for nm, t in zip(names, labels)]
    return UnitTable(1, "layer", np.arange(n), np.arange(n) + 10, names, [col], hay)


def test_search_matches_words_and_respects_negation():
    t = _table(["star", "(circle AND NOT star)", "stars", "starfish", "NOT (star OR moon)", "red star"],
               ["", "", "", "", "", "Sky Watcher"])
    hits = lambda q: list(np.flatnonzero(t.matching(q)))  # noqa: E731
    assert hits("star") == [0, 2, 5]  # not the negated atoms, not 'starfish'
    assert hits("stars") == [0, 2, 5]  # plural and singular are one word
    assert hits("NOT star") == [1, 4] and hits("-star") == [1, 4]
    assert hits("circle NOT star") == [1]
    assert hits("moon") == [] and hits("not moon") == [4]
    assert hits("sky watcher") == [5] and hits("red star") == [5]
    assert hits("sta") == []


def test_p_values_read_as_floors_not_subnormal_digits():
    from app.formatting import format_p

    assert format_p(3.5e-318) == "< 1e-300" and format_p(0.0) == "< 1e-300"
    assert format_p(2.345e-7) == "2.3e-7" and format_p(0.0123) == "0.012"
    assert format_p(0.5) == "0.500" and format_p(None) == "" and format_p(float("nan")) == ""


def test_label_dialog_does_not_tick_what_cannot_run_and_clears_its_error(qtbot, tmp_path):
    from PySide6.QtCore import Qt

    import labelers.base as lb
    from app.ui.views.params import LabelDialog

    methods = lb.available()
    if "clip_dissect" not in methods:
        pytest.skip("no CLIP-Dissect in this build")
    why = {"layer1": {"netdissect": "Needs mask counts, which comes from a dataset with masks.",
                      "clip_dissect": "Needs clip model, which this project does not have."}}
    dlg = LabelDialog(methods, ["layer1"], "layer1", why)
    qtbot.addWidget(dlg)
    item = {dlg.method_list.item(i).data(Qt.ItemDataRole.UserRole): dlg.method_list.item(i)
            for i in range(dlg.method_list.count())}
    assert item["clip_dissect"].checkState() == Qt.CheckState.Unchecked  # no dual encoder, no folder chosen yet
    assert "CLIP model folder" in dlg.page_of["clip_dissect"].warning.text()
    assert not item["netdissect"].flags() & Qt.ItemFlag.ItemIsUserCheckable  # cannot be ticked at all
    assert all(r["method"] != "clip_dissect" for r in dlg.requests())  # the first Queue does not fail
    # nothing ticked: Queue says why; a change of choice clears the message
    dlg.set_checked([])
    dlg._accept()
    assert dlg.error.text()
    # choosing a folder makes it runnable and ticks it, and clears the error; emptying the field undoes that
    dlg.page_of["clip_dissect"].clip.setText(str(tmp_path))
    assert item["clip_dissect"].checkState() == Qt.CheckState.Checked and dlg.error.text() == ""
    assert not dlg.page_of["clip_dissect"].warning.isVisible()
    dlg.page_of["clip_dissect"].clip.setText("")
    assert item["clip_dissect"].checkState() == Qt.CheckState.Unchecked
    # a project with its own dual encoder: ticked, and an empty folder means the project's own
    dlg2 = LabelDialog(methods, ["layer1"], "layer1", {"layer1": {}})
    qtbot.addWidget(dlg2)
    it2 = {dlg2.method_list.item(i).data(Qt.ItemDataRole.UserRole): dlg2.method_list.item(i)
           for i in range(dlg2.method_list.count())}
    assert it2["clip_dissect"].checkState() == Qt.CheckState.Checked
    assert next(r for r in dlg2.requests() if r["method"] == "clip_dissect")["clip_model"] is None


def test_layer_overview_colours_are_one_per_category_across_layers(qtbot):
    from app.ui.data import LayerOverviewData, MethodOverview
    from app.ui.views.overview import LayerOverview

    def data(layer, cats):
        m = MethodOverview("netdissect", "interpretable", "IoU", 10, len(cats), {c: k + 1 for k, c in enumerate(cats)})
        return LayerOverviewData(layer, 10, [m], list(cats))

    w = LayerOverview()
    qtbot.addWidget(w)
    w.set_data(data("block1", ["scene", "object", "texture"]))
    first = dict(w.legend_colours)
    w.set_data(data("block4", ["object", "color", "scene", "my own"]))
    second = dict(w.legend_colours)
    assert first["scene"] == second["scene"] and first["object"] == second["object"]
    assert len(set(second.values())) == len(second)  # distinct within a chart
    assert "■" in w.legend.text() and w.legend.parent() is w  # drawn beside the plot, never over its bars


def test_board_and_unit_view_default_to_the_same_legible_overlay(tmp_path):
    from app import imaging
    from app.ui.board.board import Board
    from app.ui.settings import Preferences
    from app.ui.views.unit import OVERLAYS

    assert imaging.RENDER_MODES[0] == "outline" == OVERLAYS[0][0]
    assert Preferences(path=tmp_path / "p.json").overlay_mode == "outline"
    assert Board.__init__.__code__.co_consts and "outline" in Board.__init__.__code__.co_consts


def test_about_names_the_version(window):
    from app import version

    assert version() and f"Neuron Studio {version()}" in window.about_text()


def _project_with_runs(path):
    from app.project.store import Project
    from tests.app.ui.test_views import FakeLayer

    with Project.create(path) as p:
        mid = p.add_model(name="m", spec="builtin:x", kind="builtin", weights_path=None, fingerprint="f",
                          preprocess={"crop": 8}, class_names=None, layers=[FakeLayer("block4", 4)])
        lid = p.layer(mid, "block4")["id"]
        for k, (method, status) in enumerate([("netdissect", "done"), ("invert", "failed"), ("compexp", "cancelled"),
                                              ("textsum", "done")]):
            run = p.create_run(kind="label", key=f"k{k}", params={}, model_id=mid, layer_id=lid, method=method)
            p.update_run(run, done=3, total=10)  # stopped runs resume only after progress
            p.finish_run(run, status, seconds=75.0 if status == "done" else 2.0,
                         error="boom" if status == "failed" else None)
    return path


def test_runs_history_lists_every_run_with_its_layer_and_filters(window, tmp_path):
    path = _project_with_runs(tmp_path / "runs.nstudio")
    assert window.open_project(path)
    h = window.run_history
    assert h.table.rowCount() == 4 and h.count.text() == "4 of 4 runs"
    cols = {name: i for i, name in enumerate(("run", "kind", "method", "layer", "status", "started", "duration"))}
    rows = [[h.table.item(r, c).text() for c in range(7)] for r in range(4)]
    assert [r[cols["method"]] for r in rows] == ["textsum", "compexp", "invert", "netdissect"]  # newest first
    assert all(r[cols["layer"]] == "block4" for r in rows)
    assert rows[0][cols["duration"]] == "1 min 15 s"
    h.set_filter("finished")
    assert [r.method for r in h.shown()] == ["textsum", "netdissect"]
    h.set_filter("failed")
    assert [r.method for r in h.shown()] == ["invert"]
    h.set_filter("stopped")
    assert [r.method for r in h.shown()] == ["compexp"] and h.table.rowCount() == 1
    # the stopped run names its layer in the session tab too
    stopped = [r.label.text() for r in window.jobs.resumable_rows]
    assert any("(compexp) on block4" in t for t in stopped)


def test_export_dialog_offers_the_cli_formats_and_runs_the_export_as_a_job(window, tmp_path, qtbot):
    from app.export.base import list_formats
    from app.ui.views.export_dialog import ExportDialog
    from app.ui.workers import JobState

    path = _project_with_runs(tmp_path / "runs.nstudio")
    assert window.open_project(path)
    dlg = ExportDialog(tmp_path / "exports")
    qtbot.addWidget(dlg)
    assert [dlg.list.item(i).data(256) for i in range(dlg.list.count())] == [e.name for e in list_formats()]
    page = dlg.choose("labels-csv")
    assert page.output.text().endswith("labels-csv.csv")
    page.output.setText("")
    dlg._accept()
    assert "Write to" in dlg.error.text() and dlg.result() == 0  # said why, did not close
    out = tmp_path / "exports" / "labels.csv"
    page.output.setText(str(out))
    fmt, where, options = dlg.request()
    handle = window.submit_export(fmt, where, options)
    qtbot.waitUntil(lambda: handle.state in (JobState.DONE, JobState.FAILED), timeout=60000)
    assert handle.state is JobState.DONE, handle.error
    assert out.exists() and out.read_text().splitlines()[0].startswith("model,layer,unit")
    assert "export" in window.act_export.text().lower()


def test_exemplar_grid_fills_its_width(qtbot):
    from app.ui.views.unit import UnitView

    uv = UnitView(thumb_size=150)
    qtbot.addWidget(uv)
    uv.show()
    uv.resize(731, 700)
    spacing = uv.grid.spacing()

    def fills():
        cell = uv.thumb_size + 8 + 2 * spacing
        width = uv.grid.viewport().width() - spacing
        cols = width // cell
        return uv.thumb_size >= uv.base_thumb_size and cols >= 1 and width - cols * cell < cols + 1

    qtbot.waitUntil(fills, timeout=3000)  # no empty band on the right, whatever the width settles at
    assert uv._render_size() in (uv.base_thumb_size, 2 * uv.base_thumb_size) or uv.view is None
    assert not uv.labels_table.wordWrap()


def test_board_fits_a_1000_pixel_screen(qtbot, tmp_path):
    from app.ui.board import BoardWindow
    from tests.app.naming_helpers import build_project

    built = build_project(tmp_path)
    w = BoardWindow(built["project"], annotator="ann")
    qtbot.addWidget(w)
    w.show()
    assert w.minimumSizeHint().height() <= 940 and w.height() <= 940
