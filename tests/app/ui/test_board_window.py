"""The board's unit panel, group selection and annotator banner, driven offscreen (what misled annotators)."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402

# the board tests' project and window fixtures, shared rather than copied
from tests.app.ui.test_board import built, click, open_window, project_path, saved  # noqa: E402,F401,F811

pytestmark = pytest.mark.qt


def _row_of_unit(board, unit):
    for row, mid in enumerate(board.pool_model.items()):
        if board.state.map_by_id[mid].unit == unit:
            return row
    raise AssertionError(f"no map of unit {unit} on the first page")


def test_unit_panel_images_belong_to_the_unit_in_its_title(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b, panel = w.board, w.unit_panel
    units = sorted({b.state.map_by_id[m].unit for m in b.pool_model.items()})[:2]
    for u in units + units:  # the second round finds every picture cached: no "ready" signal repaints them
        changed: list[int] = []
        panel.ex_model.dataChanged.connect(lambda *_a: changed.append(1))
        panel.ex_model.modelReset.connect(lambda: changed.append(1))
        click(qtbot, b.pool_view, _row_of_unit(b, u))
        assert panel.title.text().startswith(f"Unit {u} of ")
        keys = [panel._key(r) for r in range(panel.ex_model.rowCount())]
        assert keys and all(k[2] == u for k in keys)
        for r in range(len(keys)):  # what painting the grid asks for
            panel.ex_model.data(panel.ex_model.index(r), Qt.ItemDataRole.DecorationRole)
        qtbot.waitUntil(lambda: all(w.cache.cached(k) for k in keys), timeout=20000)
        # the grid was told to redraw after the switch, and every row's picture is this unit's exemplar
        assert changed
        for r, k in enumerate(keys):
            shown = panel.ex_model.data(panel.ex_model.index(r), Qt.ItemDataRole.DecorationRole)
            assert shown.cacheKey() == w.cache.get(k, lambda: None).cacheKey()
        panel.ex_model.dataChanged.disconnect()
        panel.ex_model.modelReset.disconnect()


def test_groups_are_selected_by_their_header_and_merged_with_m(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    ids = saved(project_path, "ann")["unassigned"]
    g1 = b.new_group(ids[:3], "red")
    g2 = b.new_group(ids[3:5], "blue")
    g3 = b.new_group(ids[5:6], "green")
    p1, p2, p3 = (b._panels[b.group_id(g)] for g in (g1, g2, g3))
    # a click on a header selects the group; it does not open the name for typing
    qtbot.mouseClick(p1.name, Qt.MouseButton.LeftButton)
    assert b.selected_groups() == [p1.gid] and p1.name.isReadOnly()
    qtbot.mouseClick(p3.name, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ControlModifier)
    assert b.selected_groups() == [p1.gid, p3.gid]
    qtbot.keyClick(p3, Qt.Key.Key_M)
    snap = saved(project_path, "ann")
    assert [g["name"] for g in snap["groups"][1:]] == ["red", "blue"]
    assert sorted(snap["groups"][1]["members"]) == sorted(ids[:3] + ids[5:6])
    assert p1.name.text() == "red"  # M did not type into a name
    # a plain click on another header replaces the selection; a click on a map clears it
    qtbot.mouseClick(p2.name, Qt.MouseButton.LeftButton)
    assert b.selected_groups() == [p2.gid]
    click(qtbot, b.pool_view, 0)
    assert b.selected_groups() == []


def test_rename_by_double_click_and_escape_undoes_the_edit(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    ids = saved(project_path, "ann")["unassigned"]
    panel = b._panels[b.group_id(b.new_group(ids[:3], "red"))]
    qtbot.mouseDClick(panel.name, Qt.MouseButton.LeftButton)
    assert not panel.name.isReadOnly() and panel.name.selectedText() == "red"
    qtbot.keyClicks(panel.name, "mistake")
    panel.commit_name()  # what the typing timer does: the edit is saved while typing
    assert saved(project_path, "ann")["groups"][1]["name"] == "mistake"
    qtbot.keyClick(panel.name, Qt.Key.Key_Escape)
    assert panel.name.text() == "red" and panel.name.isReadOnly()
    assert saved(project_path, "ann")["groups"][1]["name"] == "red"
    # F2 on a selected group renames it; Return keeps the new name
    qtbot.mouseClick(panel.name, Qt.MouseButton.LeftButton)
    qtbot.keyClick(panel, Qt.Key.Key_F2)
    assert not panel.name.isReadOnly()
    qtbot.keyClicks(panel.name, "warm colours")
    qtbot.keyClick(panel.name, Qt.Key.Key_Return)
    assert saved(project_path, "ann")["groups"][1]["name"] == "warm colours" and panel.name.isReadOnly()


def test_resuming_asks_who_is_annotating(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    assert w.who.isHidden()  # named explicitly: nothing to ask
    w.set_annotator("bob")
    w.close()
    w = open_window(project_path)  # resumes as the last annotator (bob): asked in plain sight
    assert w.board.state.annotator == "bob" and w.who.isVisible()
    assert "bob" in w.who.text.text()
    switch = next(b for b in w.who.switch_buttons if b.text() == "I am ann")
    qtbot.mouseClick(switch, Qt.MouseButton.LeftButton)  # one click to switch
    assert w.board.state.annotator == "ann" and w.who.isHidden()
    assert w.annotator_combo.currentText() == "ann"


def test_suggestions_are_named_from_their_content_and_edits_say_what_was_saved(qtbot, open_window, project_path):
    from app import naming
    from app.ui.board.side import SuggestionCard

    w = open_window(project_path, annotator="ann")
    b = w.board
    ids = saved(project_path, "ann")["unassigned"][:5]
    units = [b.state.map_by_id[m].unit for m in ids]
    card = SuggestionCard(b, naming.Suggestion(name="Suggestion 2", map_ids=ids, coherence=0.8, hint="red"))
    qtbot.addWidget(card)
    assert card.name.text().startswith("maps of u") and f"u{units[0]}" in card.name.text()  # blind: no labels
    b.set_blind(False)
    card.rename_from_content()
    assert card.name.text() == "red"
    card.name.setText("my own name")  # typed by the annotator: kept
    b.set_blind(True)
    card.rename_from_content()
    assert card.name.text() == "my own name"
    # after an edit the status bar says what was saved, and after an undo what was undone
    b.new_group(ids[:2], "warm")
    assert "Create" in w.saved.text() or "warm" in w.saved.text()
    assert "saved" in w.saved.text() and "2 of" in w.saved.text()
    w.undo_action.trigger()
    assert w.saved.text().startswith("Undone: ")
