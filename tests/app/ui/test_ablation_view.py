"""The Ablation tab: a stored "ablate" run shown as a before/after table (overall and per class, the paired
interval, changed predictions, random-unit controls) with per-class bars, and a new ablation started from the
window as a job whose run then shows."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from tests.app.ablation_helpers import ablated_project, stored_ablations as _stored  # noqa: E402

pytestmark = pytest.mark.qt


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    return ablated_project(tmp_path_factory.mktemp("ablation"))


def test_a_stored_ablation_shows_as_a_table_and_bars(qtbot, window, ablated):
    assert window.open_project(ablated)
    view = window.ablation_view
    window.tabs.setCurrentWidget(view)
    (run, r), = _stored(ablated)
    assert view.run_list.count() == 1 and view.current_run_id() == run.id
    assert "block4" in view.run_list.item(0).text() and "3 units" in view.run_list.item(0).text()
    t = view.table
    assert [t.item(i, 0).text() for i in range(t.rowCount())] == ["overall", "a", "b", "c"]
    assert t.item(0, 1).text() == str(r.images) == "12"
    assert t.item(0, 2).text() == f"{r.accuracy_before:.1%}" and t.item(0, 3).text() == f"{r.accuracy_after:.1%}"
    lo, hi = r.difference_ci
    assert f"[{100 * lo:+.1f} pts, {100 * hi:+.1f} pts]" in t.item(0, 4).text()
    for i, c in enumerate(r.per_class, start=1):
        assert t.item(i, 2).text() == f"{c.accuracy_before:.1%}" and t.item(i, 3).text() == f"{c.accuracy_after:.1%}"
    assert f"{r.changed} of 12 predictions changed" in view.stats.text()
    assert "3 × 3 random units of block4" in view.stats.text()
    # per-class bars: before and after, one bar per class each, as high as the accuracies
    before, after = view.plot_items
    assert list(before.opts["height"]) == pytest.approx([c.accuracy_before for c in r.per_class])
    assert list(after.opts["height"]) == pytest.approx([c.accuracy_after for c in r.per_class])
    assert not window.errors


def test_a_new_ablation_runs_as_a_job_and_shows(qtbot, window, ablated, tmp_path):
    import shutil

    from app.ui.views.ablation import AblateDialog
    from app.ui.workers import JobState

    proj = tmp_path / "p.nstudio"
    shutil.copytree(ablated, proj)
    assert window.open_project(proj)
    view = window.ablation_view
    layers, datasets = view.choices()
    dialog = AblateDialog(layers, datasets, view)
    qtbot.addWidget(dialog)
    dialog.by_units.setChecked(True)
    dialog.units.setText("1, x")
    dialog.accept()
    assert dialog.options is None and "whole numbers" in dialog.error.text()
    dialog.units.setText("1, 3")
    dialog.layer.setCurrentIndex(dialog.layer.findData("block4"))
    dialog.controls.setValue(2)
    dialog.accept()
    opts = dialog.options
    assert (opts.layer, opts.units, opts.query, opts.dataset, opts.controls) == ("block4", [1, 3], None, "test", 2)
    opts.n_boot = 50
    handle = view.start(opts)
    assert not view.new_button.isEnabled()
    qtbot.waitUntil(lambda: handle.state.finished and view.handle is None, timeout=120000)
    assert handle.state is JobState.DONE, handle.error
    assert view.run_list.count() == 2 and view.current_run_id() == handle.result.run_id
    assert view.result.units == [1, 3] and view.new_button.isEnabled()
    assert view.table.item(0, 2).text() == f"{handle.result.accuracy_before:.1%}"
