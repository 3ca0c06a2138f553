"""The panels beside the board: the unit of the current map (exemplars, automatic labels unless blind, the
annotator's name and descriptions), suggested groups, and what the study measured."""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Hashable
from typing import Any

import numpy as np
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QPixmap, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QFormLayout, QFrame, QHBoxLayout, QHeaderView, QInputDialog, QLabel, QLineEdit,
    QListWidget, QListWidgetItem, QPlainTextEdit, QProgressBar, QPushButton, QScrollArea, QSpinBox, QTableWidget,
    QTableWidgetItem, QVBoxLayout, QWidget,
)

from app import imaging, naming
from app.ui.board.models import ThumbListModel
from app.ui.board.views import MapListView

log = logging.getLogger(__name__)

EXEMPLAR_SIZE = 96


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.0%}" if pct else f"{x:.3f}"


def _table(headers: list[str]) -> QTableWidget:
    t = QTableWidget(0, len(headers))
    t.setHorizontalHeaderLabels(headers)
    t.verticalHeader().setVisible(False)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    t.horizontalHeader().setStretchLastSection(True)
    t.setAlternatingRowColors(True)
    return t


def _fill(table: QTableWidget, rows: list[list[Any]]) -> None:
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            item = QTableWidgetItem(str(value))
            if isinstance(value, (int, float)) or (isinstance(value, str) and value[:1].isdigit()):
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(r, c, item)


# ==== the unit of the current map ==============================================================================
class UnitPanel(QWidget):
    """Exemplars of the unit whose map was clicked last, its automatic labels (hidden in blind mode so they do
    not anchor the annotator), and this annotator's name and free-text descriptions of it."""

    def __init__(self, board: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.board = board
        self.cache = board.cache
        self.layer_id: int | None = None
        self.unit: int | None = None
        self.unit_id: int | None = None
        self.exemplars: list[naming.Exemplar] = []
        self.preprocess: dict[str, Any] = {}
        self.title = QLabel("Click a map to see its unit")
        self.title.setObjectName("unitTitle")
        self.title.setWordWrap(True)
        self.ex_model = ThumbListModel(self, self, draggable=False)
        self.ex_view = MapListView(None, None)
        self.ex_view.setModel(self.ex_model)
        self.ex_view.setDragEnabled(False)
        self.ex_view.set_icon_size(EXEMPLAR_SIZE)
        self.ex_view.setFixedHeight(3 * (EXEMPLAR_SIZE + 22) + 8)  # all 8 exemplars, three to a row
        self.auto = QLabel()
        self.auto.setObjectName("autoLabels")
        self.auto.setWordWrap(True)
        self.auto.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.name = QLineEdit()
        self.name.setPlaceholderText("your short name for this unit")
        self.descriptions = QListWidget()
        self.descriptions.setWordWrap(True)
        self.descriptions.itemDoubleClicked.connect(lambda _i: self.edit_selected())
        self.editor = QPlainTextEdit()
        self.editor.setPlaceholderText("Describe in your own words what this unit responds to. It is saved as "
                                       "you type; Ctrl+Return starts the next description.")
        self.editor.setFixedHeight(70)
        self.add_button = QPushButton("Done · next description")
        self.add_button.clicked.connect(self.add)
        self.edit_button = QPushButton("Edit")
        self.edit_button.clicked.connect(self.edit_selected)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self.delete_selected)
        # MILAN's candidate sentences for the unit; accepting one makes it this annotator's description (undoable)
        self.suggested_label = QLabel("Suggested descriptions (MILAN)")
        self.suggested = QListWidget()
        self.suggested.setWordWrap(True)
        self.suggested.setMaximumHeight(110)
        self.suggested.itemDoubleClicked.connect(lambda _i: self.accept_suggested())
        self.accept_button = QPushButton("Accept as my description")
        self.accept_button.setToolTip("adds the selected suggestion to your descriptions of this unit; edit it "
                                      "afterwards if it is almost right")
        self.accept_button.clicked.connect(self.accept_suggested)
        QShortcut(QKeySequence("Ctrl+Return"), self.editor, self.add,
                  context=Qt.ShortcutContext.WidgetShortcut)
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addStretch(1)
        buttons.addWidget(self.edit_button)
        buttons.addWidget(self.delete_button)
        form = QFormLayout()
        form.addRow("Name", self.name)
        lay = QVBoxLayout(self)
        lay.addWidget(self.title)
        lay.addWidget(self.ex_view)
        lay.addWidget(self.auto)
        lay.addLayout(form)
        lay.addWidget(self.suggested_label)
        lay.addWidget(self.suggested)
        lay.addWidget(self.accept_button)
        lay.addWidget(QLabel("Descriptions"))
        lay.addWidget(self.descriptions, 1)
        lay.addWidget(self.editor)
        lay.addLayout(buttons)
        self._committed_name = ""
        self._name_timer = QTimer(self)
        self._name_timer.setSingleShot(True)
        self._name_timer.setInterval(700)
        self._name_timer.timeout.connect(self.commit_name)
        self.name.textEdited.connect(lambda _t: self._name_timer.start())
        self.name.editingFinished.connect(self.commit_name)
        # The description being typed is saved a moment after typing stops (a new annotation, then edits of
        # it), so a kill loses at most that moment.
        self.draft_id: int | None = None
        self._draft_text = ""
        self._draft_timer = QTimer(self)
        self._draft_timer.setSingleShot(True)
        self._draft_timer.setInterval(700)
        self._draft_timer.timeout.connect(self.commit_draft)
        self.editor.textChanged.connect(self._draft_changed)
        self._set_enabled(False)

    def _set_enabled(self, on: bool) -> None:
        for w in (self.name, self.descriptions, self.editor, self.add_button, self.edit_button,
                  self.delete_button, self.suggested, self.accept_button):
            w.setEnabled(on)

    # ---- showing a unit ------------------------------------------------------------------------------------
    def show_map(self, m: naming.PoolMap) -> None:
        state = self.board.state
        if state is None:
            return
        self.show_unit(state.pool.layer_id, m.unit, m.unit_id)

    def show_unit(self, layer_id: int, unit: int, unit_id: int) -> None:
        if (layer_id, unit) == (self.layer_id, self.unit):
            return
        self.commit_name()
        self.finish_draft()
        self.layer_id, self.unit, self.unit_id = layer_id, unit, unit_id
        project = self.board.project
        layer = project.layer_by_id(layer_id)
        self.preprocess = dict(project.model(layer["model_id"])["preprocess"])
        try:
            self.exemplars = naming.unit_exemplars(project, layer_id, unit, k=8)
        except Exception as exc:  # no extraction any more: the descriptions still work
            log.info("no exemplars for unit %s: %s", unit, exc)
            self.exemplars = []
        self.title.setText(f"Unit {unit} of {layer['name']}: its top {len(self.exemplars)} images")
        # The rows are ranks 0..k-1 for every unit: an unchanged row list must still repaint, or the grid keeps
        # showing the previous unit's pictures under this unit's title.
        if not self.ex_model.set_items(list(range(len(self.exemplars)))):
            self.ex_model.repaint_all()
        self._set_enabled(True)
        self.refresh()

    def refresh(self) -> None:
        """Reloads this annotator's name and descriptions of the unit (after an edit, an undo, a switch)."""
        self.refresh_labels()
        if self.unit_id is None:
            return
        project = self.board.project
        ann = self.board.annotator_id
        name = naming.unit_name(project, ann, self.unit_id) or ""
        self._committed_name = name
        if not self.name.hasFocus():
            self.name.setText(name)
        self.descriptions.clear()
        rows = naming.unit_annotations(project, ann, self.unit_id)
        if self.draft_id is not None and self.board.annotation_id(self.draft_id) not in {a["id"] for a in rows}:
            self.draft_id = None  # undone: the text left in the editor becomes a new description if typed on
        for a in rows:
            if a["kind"] != "description":
                continue
            item = QListWidgetItem(a["text"])
            item.setData(Qt.ItemDataRole.UserRole, a["id"])
            item.setToolTip(f"written {a['created_at'][:16].replace('T', ' ')}"
                            + (f", edited {a['updated_at'][:16].replace('T', ' ')}"
                               if a["updated_at"] != a["created_at"] else ""))
            self.descriptions.addItem(item)

    def refresh_labels(self) -> None:
        self.refresh_suggested()
        if self.unit is None or self.layer_id is None:
            self.auto.setText("")
            return
        if self.board.blind:
            self.auto.setText("Automatic labels are hidden (blind mode), so they do not anchor your naming.")
            return
        labels = naming.automatic_labels(self.board.project, self.layer_id, self.unit, max_rank=3)
        if not labels:
            self.auto.setText("No automatic labels for this unit yet.")
            return
        by_method: dict[str, list[str]] = {}
        for lab in labels:
            by_method.setdefault(lab["method"], []).append(f"{lab['label']} ({lab['score']:.3g})")
        self.auto.setText("Automatic labels: " + "; ".join(f"{m}: {', '.join(v)}" for m, v in by_method.items()))

    def refresh_suggested(self) -> None:
        """MILAN's candidates for the unit; hidden in blind mode, like every automatic label."""
        current = self.suggested.currentItem()
        keep = (self.suggested.property("unit"), current.data(Qt.ItemDataRole.UserRole)) if current else None
        self.suggested.clear()
        self.suggested.setProperty("unit", (self.layer_id, self.unit))
        got = []
        if self.unit is not None and self.layer_id is not None and not self.board.blind:
            got = naming.description_suggestions(self.board.project, self.layer_id, self.unit)
        for s in got:
            item = QListWidgetItem(f"{s.text}  ({s.score:.2f})")
            item.setData(Qt.ItemDataRole.UserRole, s.text)
            parts = f"wpmi {s.score:.3g}"
            if s.log_p_given_e is not None and s.log_p is not None:
                parts += f" = log p(d|E) {s.log_p_given_e:.3g} - lambda x log p(d) {s.log_p:.3g}"
            item.setToolTip(f"rank {s.rank}: {parts}")
            self.suggested.addItem(item)
        for w in (self.suggested_label, self.suggested, self.accept_button):
            w.setVisible(bool(got))
        if got:  # the same unit keeps its selection across refreshes (an accept refreshes the panel)
            texts = [g.text for g in got]
            same = keep is not None and keep[0] == (self.layer_id, self.unit) and keep[1] in texts
            self.suggested.setCurrentRow(texts.index(keep[1]) if same else 0)

    def accept_suggested(self) -> None:
        item = self.suggested.currentItem()
        if item is None or self.unit_id is None or self.unit is None:
            return
        text = str(item.data(Qt.ItemDataRole.UserRole))
        have = {self.descriptions.item(i).text() for i in range(self.descriptions.count())}
        if text not in have:  # accepting twice must not write the same description twice
            self.finish_draft()
            self.board.add_description(self.unit_id, self.unit, text)

    # ---- thumbnails of exemplars ---------------------------------------------------------------------------
    def _key(self, rank: int) -> tuple:
        return ("exemplar", self.layer_id, self.unit, rank, self.board.mode, EXEMPLAR_SIZE)

    def thumbnail(self, rank: int) -> QPixmap:
        ex, pre, mode = self.exemplars[rank], self.preprocess, self.board.mode

        def render() -> Any:
            from app.sources.datasets import load_rgb

            return imaging.exemplar_picture(load_rgb(ex.path), ex.map, ex.threshold, pre, mode, EXEMPLAR_SIZE)

        pix = self.cache.get(self._key(rank), render)
        return pix if pix is not None else self.cache.placeholder(EXEMPLAR_SIZE)

    def item_of_key(self, key: Hashable) -> int | None:
        if isinstance(key, tuple) and len(key) == 6 and key[0] == "exemplar" and key[1:3] == (self.layer_id,
                                                                                               self.unit):
            return key[3] if key[4] == self.board.mode else None
        return None

    def caption(self, rank: int) -> str:
        return f"#{rank + 1}"

    def tooltip(self, rank: int) -> str:
        ex = self.exemplars[rank]
        return f"{ex.path.name}\npeak activation {ex.score:.3g}"

    # ---- edits ---------------------------------------------------------------------------------------------
    def commit_name(self) -> None:
        self._name_timer.stop()
        if self.unit_id is None:
            return
        text = " ".join(self.name.text().split())
        if text != self._committed_name:
            self._committed_name = text
            self.board.set_unit_name(self.unit_id, self.unit, text)

    def _draft_changed(self) -> None:
        if self.editor.toPlainText().strip() != self._draft_text:
            self._draft_timer.start()

    def commit_draft(self) -> None:
        self._draft_timer.stop()
        text = self.editor.toPlainText().strip()
        if self.unit_id is None or not text or text == self._draft_text:
            return
        self._draft_text = text
        if self.draft_id is None:
            self.draft_id = self.board.add_description(self.unit_id, self.unit, text)
        else:
            self.board.edit_description(self.draft_id, text)

    def finish_draft(self) -> None:
        self.commit_draft()
        self.draft_id = None
        self._draft_text = ""
        self.editor.blockSignals(True)
        self.editor.clear()
        self.editor.blockSignals(False)

    def add(self) -> None:
        """Done with this description: it is saved; the editor is ready for the next one."""
        self.finish_draft()

    def _selected_id(self) -> int | None:
        item = self.descriptions.currentItem()
        return None if item is None else int(item.data(Qt.ItemDataRole.UserRole))

    def edit_selected(self) -> None:
        aid = self._selected_id()
        if aid is None:
            return
        old = self.descriptions.currentItem().text()
        text, ok = QInputDialog.getMultiLineText(self, "Edit description", "Description", old)
        if ok and text.strip() and text.strip() != old:
            self.board.edit_description(aid, text.strip())

    def delete_selected(self) -> None:
        aid = self._selected_id()
        if aid is not None:
            self.board.delete_description(aid)


# ==== suggested groups =========================================================================================
class SuggestionCard(QFrame):
    accepted = Signal(object)  # self
    rejected = Signal(object)

    def __init__(self, board: Any, suggestion: naming.Suggestion, parent: QWidget | None = None):
        super().__init__(parent)
        self.board = board
        self.suggestion = suggestion
        self.setObjectName("suggestionCard")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.name = QLineEdit(self.content_name())
        self.name.setObjectName("groupName")
        self._auto_name = self.name.text()  # replaced when blind mode changes, unless the annotator typed one
        self.info = QLabel()
        self.info.setObjectName("groupCount")
        self.model = ThumbListModel(board, self, pool_id=board.pool_id)
        self.view = MapListView(None, None)
        self.view.setModel(self.model)
        self.view.set_icon_size(56)
        self.view.setFixedHeight(2 * (56 + 22) + 8)
        self.accept_button = QPushButton("Accept")
        self.accept_button.setDefault(True)
        self.accept_button.clicked.connect(lambda: self.accepted.emit(self))
        self.reject_button = QPushButton("Reject")
        self.reject_button.clicked.connect(lambda: self.rejected.emit(self))
        self.remove_button = QPushButton("Leave out selected")
        self.remove_button.setToolTip("take the selected maps out of this suggestion before accepting it")
        self.remove_button.clicked.connect(self.remove_selected)
        head = QHBoxLayout()
        head.addWidget(self.name, 1)
        head.addWidget(self.info)
        buttons = QHBoxLayout()
        buttons.addWidget(self.accept_button)
        buttons.addWidget(self.reject_button)
        buttons.addStretch(1)
        buttons.addWidget(self.remove_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(head)
        lay.addWidget(self.view)
        lay.addLayout(buttons)
        self.set_members(suggestion.map_ids)

    def members(self) -> list[int]:
        return self.model.items() if hasattr(self, "model") else list(self.suggestion.map_ids)

    def content_name(self) -> str:
        """A name from what the suggestion holds: its commonest automatic label (not in blind mode, where labels
        must not anchor), else the units most of its maps come from."""
        if not self.board.blind and self.suggestion.hint:
            return self.suggestion.hint
        by_id = getattr(self.board, "_by_id", {})
        units = Counter(by_id[m].unit for m in self.members() if m in by_id)
        if not units:
            return self.suggestion.name
        top = [f"u{u}" for u, _n in units.most_common(3)]
        more = len(units) - len(top)
        return "maps of " + ", ".join(top) + (f" +{more} units" if more > 0 else "")

    def rename_from_content(self) -> None:
        if self.name.text() == self._auto_name:
            self._auto_name = self.content_name()
            self.name.setText(self._auto_name)

    def set_members(self, ids: list[int]) -> None:
        self.model.set_items(ids, self.board.pool_id)
        hint = "" if self.board.blind or not self.suggestion.hint else f" · auto: {self.suggestion.hint}"
        self.info.setText(f"{len(ids)} maps · coherence {self.suggestion.coherence:.2f}{hint}")

    def remove_selected(self) -> None:
        gone = set(self.view.selected_items())
        self.set_members([m for m in self.members() if m not in gone])


class SuggestionsPanel(QWidget):
    """Suggested groups: clusters of the unassigned maps, to accept (possibly renamed and trimmed) or reject.
    Nothing is written until a suggestion is accepted."""

    requested = Signal(str, int)  # method, number of groups (0: chosen by silhouette)
    features_requested = Signal()

    def __init__(self, board: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.board = board
        self.method = QComboBox()
        self.method.addItem("k-means", "kmeans")
        self.method.addItem("agglomerative (Ward)", "agglomerative")
        self.count = QSpinBox()
        self.count.setRange(0, 40)
        self.count.setSpecialValueText("auto")
        self.count.setToolTip("number of groups; auto picks the best silhouette")
        self.suggest_button = QPushButton("Suggest groups")
        self.suggest_button.clicked.connect(self.request)
        self.accept_all_button = QPushButton("Accept all")
        self.accept_all_button.clicked.connect(self.accept_all)
        self.clear_button = QPushButton("Reject all")
        self.clear_button.clicked.connect(self.clear)
        self.features_button = QPushButton("Compute region features")
        self.features_button.clicked.connect(self.features_requested.emit)
        self.features_button.hide()
        self.status = QLabel("Clusters the unassigned maps by the layer's activations over each map's region.")
        self.status.setWordWrap(True)
        self.cards_host = QWidget()
        self.cards_layout = QVBoxLayout(self.cards_host)
        self.cards_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.cards_host)
        row = QHBoxLayout()
        row.addWidget(self.method)
        row.addWidget(self.count)
        row.addWidget(self.suggest_button)
        row2 = QHBoxLayout()
        row2.addWidget(self.accept_all_button)
        row2.addWidget(self.clear_button)
        row2.addStretch(1)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.status)
        lay.addWidget(self.features_button)
        lay.addLayout(row2)
        lay.addWidget(scroll, 1)
        self.cards: list[SuggestionCard] = []

    def request(self) -> None:
        self.status.setText("Clustering…")
        self.suggest_button.setEnabled(False)
        self.requested.emit(self.method.currentData(), self.count.value())

    def failed(self, message: str, needs_features: bool = False) -> None:
        self.suggest_button.setEnabled(True)
        self.status.setText(message)
        self.features_button.setVisible(needs_features)

    def show_suggestions(self, suggestions: list[naming.Suggestion]) -> None:
        self.clear()
        self.suggest_button.setEnabled(True)
        self.features_button.hide()
        for s in suggestions:
            card = SuggestionCard(self.board, s, self.cards_host)
            card.accepted.connect(self.accept)
            card.rejected.connect(self.reject)
            self.cards_layout.insertWidget(self.cards_layout.count() - 1, card)
            self.cards.append(card)
        self.status.setText(f"{len(suggestions)} suggested groups of the unassigned maps." if suggestions
                            else "No suggestion: too few unassigned maps.")

    def accept(self, card: SuggestionCard) -> None:
        ids = card.members()
        if ids and self.board.accept_suggestion(card.name.text().strip(), ids) is not None:
            self._remove(card)

    def reject(self, card: SuggestionCard) -> None:
        self._remove(card)

    def accept_all(self) -> None:
        for card in list(self.cards):
            self.accept(card)

    def clear(self) -> None:
        for card in list(self.cards):
            self._remove(card)

    def _remove(self, card: SuggestionCard) -> None:
        if card not in self.cards:  # accepting may already have pruned it (all its maps got placed)
            return
        self.cards.remove(card)
        card.hide()
        card.deleteLater()

    def prune(self) -> None:
        """After an edit: maps placed meanwhile leave the suggestions (accepting moves unassigned maps only)."""
        state = self.board.state
        if state is None:
            self.clear()
            return
        free = set(state.unassigned)
        for card in list(self.cards):
            members = [m for m in card.members() if m in free]
            if not members:
                self._remove(card)
            elif members != card.members():
                card.set_members(members)

    def refresh_hints(self) -> None:
        for card in self.cards:
            card.set_members(card.members())
            card.rename_from_content()


# ==== what the study measured ==================================================================================
AGREEMENT_HELP = (
    "ARI (adjusted Rand index): 1 = the same grouping, 0 = what random groupings of the same group sizes give, "
    "below 0 = worse than chance. Above about 0.6 two people see much the same concepts; 0.2–0.6 is partial "
    "agreement; near 0 they group differently. [low, high] is the 95% bootstrap interval over units: whole units "
    "are resampled with all their maps, since the maps of one unit are not independent. 'Chance ARI' is the range "
    "95% of shuffles fall in when one board's groups are shuffled over the maps (group sizes kept): an ARI whose "
    "interval lies above it is better than chance (✓). Pairs agree: the share of map pairs both put together or "
    "both apart; read it against 'by chance' (many small groups make both high). Matched: concepts paired one to "
    "one by their shared maps.")
SUMMARY_HELP = (
    "Mean ARI of the annotators with each other, and of each method with the annotators. With 3 or more annotators "
    "(2 for a method) the interval resamples annotators — how another group of annotators would agree; with fewer "
    "it is the one comparison's interval over units. 'chance up to': the highest 97.5th percentile of chance among "
    "the comparisons averaged.")


def _fit_rows(table: QTableWidget, most: int = 12) -> None:
    """A table as tall as its rows (at least two, at most `most`; it scrolls beyond): the tab scrolls as a whole
    instead of leaving blank space under short tables."""
    rows = max(2, min(most, table.rowCount()))
    table.setFixedHeight(table.horizontalHeader().sizeHint().height() + 22 * rows + 2 * table.frameWidth() + 2)


def _iv(iv: Any, pct: bool = False) -> str:
    """"0.420 [0.33, 0.51]": the value with its 95% interval, or the value alone when there is none."""
    if iv is None or not math.isfinite(iv.value):
        return "–"
    if not iv.known:
        return _fmt(iv.value, pct)
    if pct:
        return f"{iv.value:.0%} [{iv.low:.0%}, {iv.high:.0%}]"
    return f"{iv.value:.3f} [{iv.low:.2f}, {iv.high:.2f}]"


def _range(iv: Any, pct: bool = False) -> str:
    if iv is None or not iv.known:
        return "–"
    return f"{iv.low:.0%} – {iv.high:.0%}" if pct else f"{iv.low:+.2f} – {iv.high:+.2f}"


class StudyPanel(QWidget):
    """Adequacy per annotator, the concept-by-unit table of this annotator, and agreement between annotators
    (and with automatic labels) on this pool, each with its 95% interval and chance baseline.

    The report is computed by `naming.StudyJob` on the window's job runner (a child process): the bootstrap takes
    a while on a large pool, and the board stays usable meanwhile. The tables keep the last result until the new
    one arrives; the line above them names the step being computed and offers Cancel."""

    def __init__(self, board: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.board = board
        self.jobs: Any = None  # the window's JobManager (set_jobs)
        self.handle: Any = None  # the study job in flight, if any
        self.n_boot = naming.N_BOOT
        self.shuffles = naming.N_SHUFFLES
        self.report: naming.StudyReport | None = None
        self.unclear = QComboBox()
        self.unclear.addItem("unclear counts as a group", "group")
        self.unclear.addItem("unclear maps as singletons", "singletons")
        self.unclear.addItem("leave unclear maps out", "exclude")
        self.unclear.currentIndexChanged.connect(lambda _i: self.refresh())
        self.status = QLabel()
        self.status.setObjectName("studyStatus")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setMaximumHeight(14)
        self.progress.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("stop computing; the tables keep the last result")
        self.cancel_button.clicked.connect(self.cancel)
        self.recompute_button = QPushButton("Recompute")
        self.recompute_button.clicked.connect(self.refresh)
        self.adequacy = _table(["annotator", "maps", "named", "unclear", "open", "adequacy [95% CI]"])
        self.adequacy.setToolTip("adequacy: the share of the pool's maps that received a concept (named); open "
                                 "maps are not placed yet. The interval resamples units (with all their maps).")
        self.concepts = _table(["concept", "maps", "top share", "eff. units", "carried by", "units (maps)"])
        self.concepts.setToolTip("top share: the share of a concept's maps from its most frequent unit; eff. "
                                 "units: exp(entropy) of its maps over units (1 = a single unit)")
        self.agreement = _table(["annotators", "maps", "ARI [95% CI]", "chance ARI", "pairs agree [95% CI]",
                                 "by chance", "matched"])
        self.agreement.setToolTip("over the maps both placed: adjusted Rand index with its 95% interval over units "
                                  "(resampled with all their maps), the range 95% of shuffled boards reach, the "
                                  "share of map pairs on which both agree, and concepts matched by overlap")
        for col, tip in ((2, "adjusted Rand index; [95% bootstrap interval, units resampled]; ✓ = the whole "
                             "interval is above the chance range"),
                         (3, "95% of ARIs with one board's groups shuffled over the maps fall in this range: "
                             "the chance baseline"),
                         (4, "share of map pairs both put together or both apart; [95% interval over units]"),
                         (5, "what independent groupings with these group sizes agree on: the chance baseline "
                             "of 'pairs agree'")):
            self.agreement.horizontalHeaderItem(col).setToolTip(tip)
        self.agreement.itemSelectionChanged.connect(self._show_matches)
        self.matches = _table(["concept", "matches", "Jaccard", "shared"])
        self.summary_table = _table(["mean ARI of", "value [95% CI]", "resampled", "comparisons", "chance up to"])
        self.summary_table.setToolTip(SUMMARY_HELP)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.agreement_title = QLabel("Agreement on this pool")
        self.explain = QLabel(AGREEMENT_HELP)
        self.explain.setObjectName("studyHelp")
        self.explain.setWordWrap(True)
        self.explain.setStyleSheet("color: gray; font-size: 11px;")
        self.summary_help = QLabel(SUMMARY_HELP)
        self.summary_help.setWordWrap(True)
        self.summary_help.setStyleSheet("color: gray; font-size: 11px;")
        busy = QHBoxLayout()
        busy.addWidget(self.status, 1)
        busy.addWidget(self.progress)
        busy.addWidget(self.cancel_button)
        busy.addWidget(self.recompute_button)
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.addWidget(self.unclear)
        lay.addLayout(busy)
        # what the study is about first (agreement, with its intervals and chance), then adequacy and concepts
        lay.addWidget(self.summary)
        lay.addWidget(self.summary_table)
        lay.addWidget(self.summary_help)
        lay.addWidget(self.agreement_title)
        lay.addWidget(self.agreement)
        lay.addWidget(self.explain)
        lay.addWidget(self.matches)
        lay.addWidget(QLabel("Adequacy: maps that received a concept"))
        lay.addWidget(self.adequacy)
        self.concepts_title = QLabel("Concepts and units")
        lay.addWidget(self.concepts_title)
        lay.addWidget(self.concepts)
        lay.addStretch(1)
        for t in (self.summary_table, self.adequacy, self.concepts, self.agreement, self.matches):
            t.verticalHeader().setDefaultSectionSize(22)
            _fit_rows(t)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self._set_busy(False)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self.refresh)

    def set_jobs(self, jobs: Any) -> None:
        self.jobs = jobs

    @property
    def busy(self) -> bool:
        return self.handle is not None

    def schedule(self) -> None:
        if self.isVisible():
            self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)
        self._timer.start()

    def _set_busy(self, on: bool) -> None:
        self.progress.setVisible(on)
        self.cancel_button.setVisible(on)
        self.recompute_button.setVisible(not on and self.board.state is not None)

    def refresh(self) -> None:
        """Starts computing the report of the current pool (cancelling one still computing for older boards)."""
        board = self.board
        if board.state is None or self.jobs is None:
            return
        if self.handle is not None:
            self.jobs.cancel(self.handle)
        job = naming.StudyJob(board.project.path, board.pool_id, automatic=not board.blind,
                              unclear=self.unclear.currentData(), n_boot=self.n_boot, shuffles=self.shuffles)
        key = (board.pool_id, board.state.annotator, board.blind)
        self.handle = self.jobs.submit(job, on_done=lambda h, k=key: self._done(h, k))
        self.handle.changed.connect(lambda h=self.handle: self._progressed(h))
        self.progress.setRange(0, 0)
        self.status.setText("Computing the study with 95% intervals…" if self.report is None else
                            "Updating (the tables show the last result)…")
        self._set_busy(True)

    def _progressed(self, handle: Any) -> None:
        if handle is not self.handle or handle.info is None:
            return
        info = handle.info
        if info.total:
            self.progress.setRange(0, info.total)
            self.progress.setValue(info.done)
        eta = handle.eta_text
        self.status.setText(f"Computing: {info.message}" + (f" ({eta})" if eta else ""))

    def cancel(self) -> None:
        if self.handle is not None:
            self.jobs.cancel(self.handle)

    def _done(self, handle: Any, key: tuple) -> None:
        if handle is not self.handle:
            return  # an older request, cancelled or overtaken
        self.handle = None
        self._set_busy(False)
        from app.ui.workers import JobState

        board = self.board
        if handle.state is JobState.DONE:
            if board.state is None or key != (board.pool_id, board.state.annotator, board.blind):
                return
            self.show_report(handle.result)
            self.status.setText(f"95% intervals from {handle.result.n_boot} bootstrap resamples; chance from "
                                f"{handle.result.shuffles} shuffles.")
        elif handle.state is JobState.CANCELLED:
            self.status.setText("Cancelled: the tables show the last result. Recompute to start again.")
        else:
            self.status.setText(f"The study could not be computed: {handle.error}")

    def show_report(self, rep: naming.StudyReport) -> None:
        board = self.board
        self.report = rep
        ad_ci = rep.adequacy_ci or [None] * len(rep.adequacy)
        _fill(self.adequacy, [[a.annotator, a.maps, a.concept, a.unclear, a.unassigned,
                               _iv(ci, True) if ci is not None else _fmt(a.adequacy, True)]
                              for a, ci in zip(rep.adequacy, ad_ci)])
        me = board.state.annotator if board.state is not None else ""
        corr = rep.correspondence.get(me)
        self.concepts_title.setText(f"Concepts of {me} and the units their maps come from")
        rows = []
        for c in corr.concepts if corr else []:
            units = ", ".join(f"u{u}×{n}" for u, n in zip(c.units[:6], c.counts[:6]))
            units += " …" if len(c.units) > 6 else ""
            verdict = "one unit" if c.single_unit else f"{c.effective_units:.1f} units"
            rows.append([c.name, c.size, _fmt(c.top_share, True), _fmt(c.effective_units), verdict, units])
        _fill(self.concepts, rows)
        ivs = rep.intervals or [None] * len(rep.comparisons)
        rows = []
        for c, iv in zip(rep.comparisons, ivs):
            if iv is None:
                rows.append([f"{c.a} – {c.b}", c.maps, _fmt(c.adjusted_rand), "–", _fmt(c.pairs.agreement, True),
                             _fmt(c.pairs.chance_agreement, True), len(c.matching.matches)])
            else:
                mark = " ✓" if iv.above_chance else ""
                rows.append([f"{c.a} – {c.b}", c.maps, _iv(iv.adjusted_rand) + mark, _range(iv.chance_ari),
                             _iv(iv.agreement, True), _fmt(c.pairs.chance_agreement, True),
                             len(c.matching.matches)])
        _fill(self.agreement, rows)
        _fill(self.summary_table, [[r.who, _iv(r.ari) + (" ✓" if r.ari.known and r.ari.low > r.chance_high else ""),
                                    f"{r.resampled}", r.pairs, f"{r.chance_high:+.2f}"] for r in rep.summary])
        humans = len(rep.adequacy)
        with_auto = sum(1 for c in rep.comparisons if c.b.startswith("auto: "))
        self.agreement_title.setText(
            f"Agreement on this pool: {len(rep.comparisons) - with_auto} between annotators, "
            + (f"{with_auto} with automatic labels (auto: rows)" if not board.blind else
               "automatic labels hidden in blind mode"))
        if humans >= 2:
            sub = rep.adjusted_rand[:humans, :humans]
            mean = sub[np.triu_indices(humans, 1)].mean()
            self.summary.setText(f"Mean adjusted Rand index over {humans} annotators: {mean:.3f} "
                                 "(0 = chance, 1 = the same grouping)")
        elif humans == 1:
            self.summary.setText("Agreement needs a second annotator on this pool.")
        else:
            self.summary.setText("Nobody has grouped maps of this pool yet.")
        if rep.comparisons:
            self.agreement.selectRow(0)
        self._show_matches()
        for t in (self.summary_table, self.adequacy, self.concepts, self.agreement, self.matches):
            _fit_rows(t)

    def _show_matches(self) -> None:
        if self.report is None:
            return
        rows = self.agreement.selectionModel().selectedRows()
        if not rows or rows[0].row() >= len(self.report.comparisons):
            _fill(self.matches, [])
            return
        c = self.report.comparisons[rows[0].row()]
        self.matches.setHorizontalHeaderLabels([c.a, c.b, "Jaccard", "shared"])
        _fill(self.matches, [[m.a_name, m.b_name, _fmt(m.jaccard), m.shared] for m in c.matching.matches])
