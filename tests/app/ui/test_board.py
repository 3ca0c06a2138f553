"""The cluster board driven offscreen: groups built by drag and drop and by keyboard, undo and redo, a suggestion
accepted, two annotators, unit descriptions with blind mode, and a killed process whose board comes back exactly
in a fresh one. After every edit the test reads the project database with its own connection."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import QPointF, Qt  # noqa: E402
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app import naming  # noqa: E402
from app.project.store import Project  # noqa: E402
from app.ui.workers import JobState  # noqa: E402
from labelers import agreement  # noqa: E402
from tests.app.naming_helpers import LAYER, TOPK, UNITS, build_project  # noqa: E402

pytestmark = pytest.mark.qt
ROOT = Path(__file__).resolve().parents[3]
N_MAPS = UNITS * TOPK


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("board"))


@pytest.fixture
def project_path(built, tmp_path):
    dst = tmp_path / "proj.nstudio"
    shutil.copytree(built["project"], dst)
    return dst


@pytest.fixture
def open_window(qtbot):
    from app.ui.board import BoardWindow

    def make(path, **kwargs):
        w = BoardWindow(path, **kwargs)
        qtbot.addWidget(w)
        w.show()
        return w

    yield make


def saved(path, annotator, pool_id=1):
    """The board as committed, read with a separate connection."""
    with Project.open(path) as p:
        ann = p.annotator(annotator)
        return naming.BoardState.load(p, pool_id, ann).snapshot()


def shown_matches_saved(board, path):
    snap = saved(path, board.state.annotator, board.pool_id)
    shown = board.displayed()
    assert [(g["name"], g["unclear"], g["members"]) for g in shown["groups"]] == \
        [(g["name"], g["unclear"], g["members"]) for g in snap["groups"]]
    start = board.page * board.page_size
    assert shown["pool"] == snap["unassigned"][start:start + board.page_size]
    return snap


def drop(widget, mime):
    """A drag entering `widget` and dropped on it, as Qt delivers them (the drop source is another view)."""
    pos = QPointF(widget.rect().center())
    actions = Qt.DropAction.MoveAction | Qt.DropAction.CopyAction
    args = (actions, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    try:  # PySide6 6.12 takes a QPointF (the QPoint form is deprecated there); earlier versions a QPoint
        enter = QDragEnterEvent(pos, *args)
    except TypeError:
        enter = QDragEnterEvent(pos.toPoint(), *args)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted()
    try:
        move = QDragMoveEvent(pos, *args)
    except TypeError:
        move = QDragMoveEvent(pos.toPoint(), *args)
    QApplication.sendEvent(widget, move)
    event = QDropEvent(pos, *args)
    QApplication.sendEvent(widget, event)
    assert event.isAccepted()
    # Copy, never Move: the source view must not delete rows itself (the board reloads from the database)
    assert event.dropAction() == Qt.DropAction.CopyAction


def drag_rows(view, rows):
    model = view.model()
    return model.mimeData([model.index(r) for r in rows])


def click(qtbot, view, row, modifier=Qt.KeyboardModifier.NoModifier):
    rect = view.visualRect(view.model().index(row))
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, modifier, rect.center())


def test_groups_by_drag_and_drop(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    assert b.displayed()["title"] == f"Pool · {N_MAPS} of {N_MAPS} maps unassigned"
    first = b.pool_model.items()[:3]
    drop(b.new_zone, drag_rows(b.pool_view, [0, 1, 2]))
    snap = shown_matches_saved(b, project_path)
    concept = snap["groups"][1]
    assert concept["name"] == "Concept 1" and sorted(concept["members"]) == sorted(first)
    panel = b._panels[concept["id"]]
    # a double-click on the name opens it for typing
    qtbot.mouseDClick(panel.name, Qt.MouseButton.LeftButton)
    qtbot.keyClicks(panel.name, "red squares")
    qtbot.keyClick(panel.name, Qt.Key.Key_Return)
    assert saved(project_path, "ann")["groups"][1]["name"] == "red squares"
    # two more maps from the pool into the group's grid
    more = b.pool_model.items()[:2]
    drop(panel.view.viewport(), drag_rows(b.pool_view, [0, 1]))
    snap = shown_matches_saved(b, project_path)
    assert set(snap["groups"][1]["members"]) == set(first) | set(more)
    # one from the group onto the unclear panel's header, one back into the pool
    unclear = b._panels[snap["groups"][0]["id"]]
    drop(unclear, drag_rows(panel.view, [0]))
    drop(b.pool_view.viewport(), drag_rows(panel.view, [0]))
    snap = shown_matches_saved(b, project_path)
    assert len(snap["groups"][0]["members"]) == 1 and len(snap["groups"][1]["members"]) == 3
    assert len(snap["unassigned"]) == N_MAPS - 4
    # the edits are undoable one by one
    for _ in range(3):
        w.undo_action.trigger()
    snap = shown_matches_saved(b, project_path)
    assert sorted(snap["groups"][1]["members"]) == sorted(first) and snap["groups"][1]["name"] == "red squares"


def test_groups_by_keyboard_with_undo_and_redo(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    v = b.pool_view
    history = [saved(project_path, "ann")]

    def step():
        history.append(shown_matches_saved(b, project_path))

    # click, shift+click: three maps; N makes a group and puts the cursor in its name
    click(qtbot, v, 0)
    click(qtbot, v, 2, Qt.KeyboardModifier.ShiftModifier)
    assert len(b.selected_ids()) == 3
    qtbot.keyClick(v, Qt.Key.Key_N)
    step()
    gid1 = history[-1]["groups"][1]["id"]
    name = b._panels[gid1].name
    assert name.selectedText() == "Concept 1"
    qtbot.keyClicks(name, "red")
    qtbot.keyClick(name, Qt.Key.Key_Return)
    step()
    assert history[-1]["groups"][1]["name"] == "red"
    # ctrl+click two, press 1: into the first group
    click(qtbot, v, 0)
    click(qtbot, v, 3, Qt.KeyboardModifier.ControlModifier)
    picked = b.selected_ids()
    qtbot.keyClick(v, Qt.Key.Key_1)
    step()
    assert set(picked) <= set(history[-1]["groups"][1]["members"])
    # 0: unclear
    click(qtbot, v, 0)
    qtbot.keyClick(v, Qt.Key.Key_0)
    step()
    assert len(history[-1]["groups"][0]["members"]) == 1
    # another group of two, then select a map in each group and press M: merged into the first
    click(qtbot, v, 0)
    click(qtbot, v, 1, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClick(v, Qt.Key.Key_N)
    step()
    gid2 = history[-1]["groups"][2]["id"]
    v1, v2 = b._panels[gid1].view, b._panels[gid2].view
    click(qtbot, v1, 0)
    click(qtbot, v2, 0, Qt.KeyboardModifier.ControlModifier)
    assert len(b.selected_ids()) == 2  # selections across grids
    qtbot.keyClick(v2, Qt.Key.Key_M)
    step()
    assert [g["name"] for g in history[-1]["groups"]] == ["Unclear / not a concept", "red"]
    assert len(history[-1]["groups"][1]["members"]) == 7
    # N inside a group with part of it selected: a split
    v1 = b._panels[gid1].view
    click(qtbot, v1, 0)
    click(qtbot, v1, 1, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(v1, Qt.Key.Key_N)
    step()
    assert [len(g["members"]) for g in history[-1]["groups"][1:]] == [5, 2]
    assert "Split" in b.stack.undoText()
    # Delete: back to the pool
    v3 = b._panels[history[-1]["groups"][2]["id"]].view
    click(qtbot, v3, 0)
    qtbot.keyClick(v3, Qt.Key.Key_Delete)
    step()
    # Ctrl+Z all the way back, every state exactly as it was; Ctrl+Shift+Z all the way forward
    for expected in reversed(history[:-1]):
        qtbot.keyClick(b.pool_view, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
        assert shown_matches_saved(b, project_path) == expected
    assert not b.stack.canUndo()
    for expected in history[1:]:
        qtbot.keyClick(b.pool_view, Qt.Key.Key_Z,
                       Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
        assert shown_matches_saved(b, project_path) == expected
    # a number without such a group says so and changes nothing
    click(qtbot, b.pool_view, 0)
    qtbot.keyClick(b.pool_view, Qt.Key.Key_7)
    assert shown_matches_saved(b, project_path) == history[-1]


def test_rubber_band_selection(qtbot, open_window, project_path):
    from PySide6.QtCore import QEvent, QRect
    from PySide6.QtGui import QMouseEvent

    w = open_window(project_path, annotator="ann")
    b = w.board
    b.page_size = 8
    b.set_zoom(96)  # the whole grid in view, with empty space below it to start the band from
    b.reload()
    v = b.pool_view
    vp = v.viewport()
    rects = [v.visualRect(v.model().index(r)) for r in range(8)]
    # from empty space below the grid up to the middle of the second map: a rectangle over the first maps
    start = QPointF(max(r.right() for r in rects) + 5, max(r.bottom() for r in rects) + 10)
    end = QPointF(rects[1].center())
    assert not v.indexAt(start.toPoint()).isValid()
    qtbot.mousePress(vp, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start.toPoint())
    for t in (0.5, 1.0):
        p = start + (end - start) * t
        QApplication.sendEvent(vp, QMouseEvent(QEvent.Type.MouseMove, p, vp.mapToGlobal(p), Qt.MouseButton.NoButton,
                                               Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier))
    qtbot.mouseRelease(vp, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, end.toPoint())
    band = QRect(start.toPoint(), end.toPoint()).normalized()
    expected = [b.pool_model.items()[r] for r, rect in enumerate(rects) if rect.intersects(band)]
    assert 1 < len(expected) < 8 and sorted(b.selected_ids()) == sorted(expected)
    qtbot.keyClick(v, Qt.Key.Key_N)
    assert sorted(saved(project_path, "ann")["groups"][1]["members"]) == sorted(expected)


def test_delete_group_and_zoom_and_pages(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    b.page_size = 10
    b.reload()
    unassigned = saved(project_path, "ann")["unassigned"]
    assert b.pool_model.items() == unassigned[:10]
    qtbot.keyClick(b.pool_view, Qt.Key.Key_PageDown)
    assert b.pool_model.items() == unassigned[10:20] and b.page_label.text() == "page 2 of 3"
    qtbot.keyClick(b.pool_view, Qt.Key.Key_PageUp)
    assert b.pool_model.items() == unassigned[:10]
    gid = b.new_group(unassigned[:4], "wheels")
    before = saved(project_path, "ann")
    b.delete_group(gid)
    assert [g["name"] for g in saved(project_path, "ann")["groups"]] == ["Unclear / not a concept"]
    w.undo_action.trigger()
    assert saved(project_path, "ann") == before
    w.redo_action.trigger()
    w.undo_action.trigger()
    assert shown_matches_saved(b, project_path) == before
    # zoom: Ctrl+= grows the thumbnails, which are drawn lazily and then shown
    size = b.zoom
    qtbot.keyClick(b.pool_view, Qt.Key.Key_Equal, Qt.KeyboardModifier.ControlModifier)
    assert b.zoom > size and b.pool_view.iconSize().width() == b.zoom
    assert w.zoom_slider.value() == list(naming_zooms()).index(b.zoom)
    first = b.pool_model.items()[0]
    b.pool_model.index(0).data(Qt.ItemDataRole.DecorationRole)
    qtbot.waitUntil(lambda: w.cache.cached(b._key(first)), timeout=20000)
    pix = b.pool_model.index(0).data(Qt.ItemDataRole.DecorationRole)
    assert pix.width() == b.zoom and not w.cache.errors
    w.mode_combo.setCurrentIndex(w.mode_combo.findData("crop"))
    assert b.mode == "crop"


def naming_zooms():
    from app.ui.board.board import ZOOMS

    return ZOOMS


def test_accept_a_suggestion(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    panel = w.suggestions
    panel.count.setValue(2)
    qtbot.mouseClick(panel.suggest_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(panel.cards) == 2, timeout=60000)
    assert saved(project_path, "ann")["groups"][1:] == []  # nothing written by suggesting
    card = panel.cards[0]
    members = card.members()
    assert sum(len(c.members()) for c in panel.cards) == N_MAPS
    card.name.setText("red things")
    card.view.select_items([members[-1]])
    card.remove_button.click()
    assert card.members() == members[:-1]
    qtbot.mouseClick(card.accept_button, Qt.MouseButton.LeftButton)
    snap = shown_matches_saved(b, project_path)
    assert snap["groups"][1]["name"] == "red things"
    assert sorted(snap["groups"][1]["members"]) == sorted(members[:-1])
    assert b.stack.undoText() == "Accept suggestion 'red things'"
    # the other card lost nothing; rejecting it writes nothing
    other = panel.cards[0]
    qtbot.mouseClick(other.reject_button, Qt.MouseButton.LeftButton)
    assert panel.cards == [] and saved(project_path, "ann") == snap
    w.undo_action.trigger()
    assert saved(project_path, "ann")["groups"][1:] == []


def test_two_annotators_and_the_study_panel(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    ids = saved(project_path, "ann")["unassigned"]
    b.new_group(ids[:6], "red")
    b.new_group(ids[6:10], "disc")
    b.move_maps(ids[10:12], b.state.unclear.id)
    ann_board = saved(project_path, "ann")
    w.set_annotator("bob")
    assert b.state.annotator == "bob" and b.displayed()["pool"][:3] == ids[:3]
    assert [g["name"] for g in b.displayed()["groups"]] == ["Unclear / not a concept"]
    assert not b.stack.canUndo()  # bob's session has its own history
    b.new_group(ids[:4], "round")
    b.new_group(ids[4:10], "square")
    bob_board = saved(project_path, "bob")
    w.undo_action.trigger()
    w.redo_action.trigger()
    assert saved(project_path, "ann") == ann_board  # bob's undo never touches ann's board
    w.set_annotator("ann")
    assert shown_matches_saved(b, project_path) == ann_board
    assert b.stack.count() == 3
    # the study panel: adequacy, concept-by-unit, agreement with intervals; checked against labelers.agreement
    w.tabs.setCurrentWidget(w.study)
    computed(qtbot, w.study)
    with Project.open(project_path) as p:
        boards, units = naming.board_partitions(p, 1)
    a, c = boards
    assert [w.study.adequacy.item(r, 0).text() for r in range(2)] == ["ann", "bob"]
    assert w.study.adequacy.item(0, 2).text() == "10" and w.study.adequacy.item(0, 3).text() == "2"
    assert w.study.adequacy.item(0, 5).text().startswith(f"{10 / N_MAPS:.0%} [")
    assert w.study.agreement.item(0, 0).text() == "ann – bob"
    iv = agreement.pair_intervals(a, c, units, n_boot=w.study.n_boot, shuffles=w.study.shuffles)
    ari = w.study.agreement.item(0, 2).text()
    assert ari.startswith(f"{agreement.adjusted_rand(a, c):.3f} [")
    low, high = (float(x) for x in ari.split("[")[1].split("]")[0].split(","))
    assert low <= agreement.adjusted_rand(a, c) + 0.01 and high >= agreement.adjusted_rand(a, c) - 0.01
    assert w.study.agreement.item(0, 3).text() != "–"  # the chance range
    assert w.study.agreement.item(0, 4).text().startswith(f"{agreement.pairwise_agreement(a, c):.0%} [")
    both, _, _ = agreement.comparable_labels(a, c)
    assert iv.units == len(set(units[both].tolist())) > 1  # units, not maps, are resampled
    assert w.study.summary_table.item(0, 0).text() == "annotators with each other"
    assert w.study.summary_table.item(0, 2).text() == "units"  # two annotators: nothing to resample but units
    corr = agreement.concept_units(a, units)
    assert w.study.concepts.rowCount() == 2 and w.study.concepts.item(0, 0).text() == "red"
    assert w.study.concepts.item(0, 3).text() == f"{corr.concepts[0].effective_units:.3f}"
    matches = agreement.match_concepts(a, c).matches
    assert w.study.matches.rowCount() == len(matches)
    assert (w.study.matches.item(0, 0).text(), w.study.matches.item(0, 1).text()) == (matches[0].a_name,
                                                                                       matches[0].b_name)
    # blind mode leaves automatic labels out of the comparison; switching it off brings them in
    assert w.study.agreement.rowCount() == 1
    w.set_blind(False)
    w.study.refresh()
    computed(qtbot, w.study)
    assert w.study.agreement.rowCount() == 3
    assert [w.study.summary_table.item(r, 2).text() for r in range(w.study.summary_table.rowCount())] == [
        "units", "annotators"]  # a method with two annotators: annotators resampled
    assert bob_board["annotator"] == "bob"


def computed(qtbot, panel, timeout=60000):
    """Waits for the study job the panel started (in a child process) to be shown."""
    qtbot.waitUntil(lambda: panel.handle is None and panel.report is not None, timeout=timeout)
    assert panel.status.text().startswith("95% intervals"), panel.status.text()


def test_study_runs_as_a_job_with_progress_and_cancel(qtbot, open_window, project_path, monkeypatch):
    """The study report is computed in a run process, never in the window's; the tab says what it computes and
    can be cancelled, keeping the last result."""
    from app.naming import study

    def broken(*_args, **_kwargs):
        raise AssertionError("the study was computed in the window's process")

    w = open_window(project_path, annotator="ann")
    b = w.board
    ids = saved(project_path, "ann")["unassigned"]
    b.new_group(ids[:8], "red")
    w.set_annotator("bob")
    b.new_group(ids[:4], "round")
    monkeypatch.setattr(study, "study_report", broken)
    w.tabs.setCurrentWidget(w.study)
    panel = w.study
    panel.stop()
    panel.refresh()
    assert panel.busy and panel.cancel_button.isVisibleTo(panel) and panel.status.text().startswith("Computing")
    computed(qtbot, panel)
    first = panel.report
    assert len(first.intervals) == 1 and first.n_boot == panel.n_boot
    # a long bootstrap, cancelled: the tables keep the last result
    panel.n_boot = 400000
    panel.refresh()
    qtbot.waitUntil(lambda: panel.handle is not None and panel.handle.info is not None, timeout=60000)
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: panel.handle is None, timeout=60000)
    assert panel.report is first
    assert panel.status.text().startswith("Cancelled"), panel.status.text()
    assert panel.recompute_button.isVisibleTo(panel) and not panel.cancel_button.isVisibleTo(panel)


def test_unit_descriptions_and_blind_mode(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    click(qtbot, b.pool_view, 0)
    m = b.state.map_by_id[b.pool_model.items()[0]]
    panel = w.unit_panel
    assert panel.unit == m.unit and panel.title.text().startswith(f"Unit {m.unit} of {LAYER}")
    assert panel.ex_model.rowCount() == TOPK
    assert "hidden" in panel.auto.text() and "netdissect" not in panel.auto.text()
    assert "netdissect" not in b.tooltip(m.id)
    w.blind_action.setChecked(False)
    expected = "red" if m.unit % 2 == 0 else "disc"
    assert "netdissect: " + expected in panel.auto.text() and expected in b.tooltip(m.id)
    w.blind_action.setChecked(True)
    assert "hidden" in panel.auto.text()
    qtbot.keyClicks(panel.name, "corner detector")
    qtbot.keyClick(panel.name, Qt.Key.Key_Return)
    qtbot.keyClicks(panel.editor, "fires on the top edge")
    panel.commit_draft()  # what the typing timer does
    qtbot.keyClicks(panel.editor, " of red squares")
    qtbot.mouseClick(panel.add_button, Qt.MouseButton.LeftButton)  # done: saved, editor cleared
    with Project.open(project_path) as p:
        ann = p.annotator("ann")
        rows = naming.unit_annotations(p, ann, m.unit_id)
    assert [(r["kind"], r["text"]) for r in rows] == [("name", "corner detector"),
                                                       ("description", "fires on the top edge of red squares")]
    assert panel.descriptions.count() == 1 and panel.editor.toPlainText() == ""
    assert b.stack.undoText() == f"Describe unit {m.unit}"  # typing and editing it is one undo step
    w.undo_action.trigger()
    assert panel.descriptions.count() == 0
    w.redo_action.trigger()
    assert panel.descriptions.item(0).text() == "fires on the top edge of red squares"
    panel.descriptions.setCurrentRow(0)
    qtbot.mouseClick(panel.delete_button, Qt.MouseButton.LeftButton)
    assert panel.descriptions.count() == 0
    w.undo_action.trigger()
    assert panel.descriptions.count() == 1


def test_new_pool_from_the_window(qtbot, open_window, project_path):
    from app.ui.board.dialogs import NewPoolDialog, parse_ranges

    assert parse_ranges("all") is None and parse_ranges("0-2, 5 7") == [0, 1, 2, 5, 7]
    with pytest.raises(ValueError):
        parse_ranges("3-1")
    w = open_window(project_path, annotator="ann")
    dlg = NewPoolDialog(w.project, w)
    dlg.units.setText("1-2")
    dlg.per_unit.setValue(3)
    dlg.features.setChecked(False)
    spec = dlg.spec()
    assert (spec.kind, spec.units, spec.per_unit, spec.features) == ("unit", [1, 2], 3, False)
    dlg.kind.setCurrentIndex(1)
    assert dlg.spec().kind == "decision"
    handle = w.build_pool(spec)
    qtbot.waitUntil(lambda: w.board.pool_id == 2 and handle.thread is None, timeout=60000)
    assert handle.state is JobState.DONE
    assert w.pool_combo.count() == 2 and len(w.board.state.maps) == 6
    assert {m.unit for m in w.board.state.maps} == {1, 2}
    # suggestions need region features: the panel offers to compute them
    qtbot.mouseClick(w.suggestions.suggest_button, Qt.MouseButton.LeftButton)
    assert w.suggestions.features_button.isVisibleTo(w.suggestions)


KILLED = textwrap.dedent("""
    import json, os, sys, time
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication

    app = QApplication([])
    from app.ui.board import BoardWindow

    w = BoardWindow(sys.argv[1], annotator="kim")
    w.show()
    b = w.board
    b.pool_view.select_items(b.pool_model.items()[:3])
    QTest.keyClick(b.pool_view, Qt.Key.Key_N)
    panel = b._panels[b.state.concepts[-1].id]
    QTest.keyClicks(panel.name, "stripes")  # no Enter: saved by the typing timer
    QTest.qWait(1500)
    b.pool_view.select_items(b.pool_model.items()[:2])
    QTest.keyClick(b.pool_view, Qt.Key.Key_0)
    b.pool_view.select_items(b.pool_model.items()[:1])
    QTest.keyClick(b.pool_view, Qt.Key.Key_1)
    m = b.state.map_by_id[b.pool_model.items()[0]]
    b.current_map.emit(m)
    QTest.keyClicks(w.unit_panel.editor, "dark diagonal stripes")  # no Done: saved by the typing timer
    QTest.qWait(1500)
    app.processEvents()
    print(json.dumps(b.displayed() | {"unit_id": m.unit_id}), flush=True)
    time.sleep(300)
""")


def test_kill_and_reopen_restores_the_board(qtbot, open_window, project_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(project_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        shown_before = json.loads(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [(g["name"], len(g["members"])) for g in shown_before["groups"]] == [
        ("Unclear / not a concept", 2), ("stripes", 4)]
    # a fresh window on the same project resumes the last annotator's board exactly as it was on screen
    unit_id = shown_before.pop("unit_id")
    w = open_window(project_path)
    assert w.board.state.annotator == "kim"
    assert w.board.displayed() == shown_before
    with Project.open(project_path) as p:
        rows = naming.unit_annotations(p, p.annotator("kim"), unit_id)
    assert [(r["kind"], r["text"]) for r in rows] == [("description", "dark diagonal stripes")]


def test_board_jobs_run_in_a_child_process(qtbot, open_window, project_path, monkeypatch):
    """The model runs in a run process, never in the window's: a pool built with the window's own copy of the
    code broken still comes out."""
    from app.naming import compute

    def broken(*_args, **_kwargs):
        raise AssertionError("the pool was built in the window's process")

    monkeypatch.setattr(compute, "build_pool", broken)
    w = open_window(project_path, annotator="ann")
    handle = w.build_pool(naming.PoolSpec(kind="unit", layer=LAYER, units=[0], per_unit=2, features=False))
    qtbot.waitUntil(lambda: handle.state.finished and handle.thread is None, timeout=60000)
    assert handle.state is JobState.DONE, handle.error
    assert w.board.pool_id == handle.result and len(w.board.state.maps) == 2



def test_group_panels_flow_into_columns_when_the_window_is_wide(qtbot, open_window, project_path):
    w = open_window(project_path, annotator="ann")
    b = w.board
    ids = saved(project_path, "ann")["unassigned"]
    for k in range(5):
        b.new_group(ids[3 * k:3 * k + 3], f"g{k}")

    def columns() -> int:
        QApplication.processEvents()
        return len({p.x() for p in b._panels.values()})

    def fits() -> bool:
        right = max(p.geometry().right() for p in b._panels.values())
        return right < b.groups_scroll.viewport().width()

    w.resize(1100, 900)
    qtbot.waitUntil(lambda: columns() == 1)
    assert fits()
    w.resize(1600, 900)  # the board's default width: its groups pane holds more than one panel
    qtbot.waitUntil(lambda: columns() >= 2)
    assert fits() and not b.groups_scroll.horizontalScrollBar().isVisible()
    w.resize(2400, 1000)
    qtbot.waitUntil(lambda: columns() >= 3)
    assert fits()
    # every panel shows the same number of thumbnails per row, and the new-group zone matches them
    assert {p.columns for p in b._panels.values()} == {b.columns}
    assert abs(b.new_zone.width() - next(iter(b._panels.values())).width()) < 40
