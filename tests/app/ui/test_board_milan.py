"""MILAN's descriptions on the naming board: offered beside the unit (never in blind mode), accepted as the
annotator's own description in one undoable step."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402

from app import naming  # noqa: E402
from app.project.store import Project  # noqa: E402
from labelers.base import Label  # noqa: E402
from tests.app.naming_helpers import UNITS  # noqa: E402
from tests.app.ui.test_board import built, click, open_window, project_path  # noqa: E402,F401

pytestmark = pytest.mark.qt


def add_milan(path, layer_id):
    with Project.open(path) as p:
        run = p.create_run(kind="label", key="milan", params={}, layer_id=layer_id, method="milan")
        p.replace_labels(run, layer_id, "milan", [
            Label(unit=u, rank=r, text=f"{t} of unit {u}", score=-r, extra={"log_p_d_given_e": -r - 1.0,
                                                                            "log_p_d": -5.0})
            for u in range(UNITS) for r, t in ((1, "red stripes"), (2, "stripes"))])
        p.finish_run(run, "done")


def test_milan_suggestions_are_accepted_as_descriptions(qtbot, open_window, project_path, built):  # noqa: F811
    add_milan(project_path, built["layer_id"])
    w = open_window(project_path, annotator="ann")
    b = w.board
    click(qtbot, b.pool_view, 0)
    m = b.state.map_by_id[b.pool_model.items()[0]]
    panel = w.unit_panel
    assert panel.suggested.count() == 0 and panel.accept_button.isHidden()  # blind by default: no anchoring
    w.blind_action.setChecked(False)
    assert [panel.suggested.item(i).data(Qt.ItemDataRole.UserRole) for i in range(panel.suggested.count())] == \
        [f"red stripes of unit {m.unit}", f"stripes of unit {m.unit}"]
    assert "log p(d|E) -2" in panel.suggested.item(0).toolTip()
    panel.suggested.setCurrentRow(1)
    qtbot.mouseClick(panel.accept_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(panel.accept_button, Qt.MouseButton.LeftButton)  # twice: still one description
    with Project.open(project_path) as p:
        rows = naming.unit_annotations(p, p.annotator("ann"), m.unit_id)
    assert [(r["kind"], r["text"]) for r in rows] == [("description", f"stripes of unit {m.unit}")]
    assert panel.descriptions.count() == 1
    w.undo_action.trigger()
    assert panel.descriptions.count() == 0
