"""The naming window: pool and annotator choice, the cluster board, and the unit / suggestions / study panels."""
from __future__ import annotations

import datetime as _dt
import getpass
import html
import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence, QUndoGroup
from PySide6.QtWidgets import (
    QComboBox, QDialog, QDockWidget, QFrame, QHBoxLayout, QInputDialog, QLabel, QMainWindow, QProgressBar,
    QPushButton, QSlider, QStackedWidget, QTabWidget, QToolBar, QVBoxLayout, QWidget,
)

from app import naming
from app.errors import NeuronStudioError
from app.project.store import Project
from app.ui.board.board import ZOOMS, Board
from app.ui.board.dialogs import NewPoolDialog
from app.ui.workers import JobHandle, JobManager, JobState
from app.ui.board.side import StudyPanel, SuggestionsPanel, UnitPanel
from app.ui.board.thumbs import ThumbnailCache

log = logging.getLogger(__name__)

STYLE = """
QFrame#groupPanel, QFrame#unclearPanel, QFrame#suggestionCard {
    border: 1px solid rgba(128, 128, 128, 90); border-radius: 6px; background: rgba(128, 128, 128, 18); }
QFrame#unclearPanel { background: rgba(200, 120, 40, 28); border-style: dashed; }
QFrame#groupPanel[groupSelected="true"], QFrame#unclearPanel[groupSelected="true"] {
    border: 2px solid #f0a020; background: rgba(240, 160, 32, 40); }
QFrame#groupPanel[dropHover="true"], QFrame#unclearPanel[dropHover="true"], QFrame#newGroupZone[dropHover="true"] {
    border: 2px solid #3d8bfd; }
QFrame#newGroupZone { border: 2px dashed rgba(128, 128, 128, 120); border-radius: 6px; color: gray; }
QLabel#groupNumber { background: #3d8bfd; color: white; border-radius: 9px; font-weight: bold; min-height: 18px; }
QFrame#unclearPanel QLabel#groupNumber { background: #c77c2c; }
QLineEdit#groupName { font-weight: bold; background: transparent; }
QLabel#groupCount { color: gray; }
QLabel#poolTitle, QLabel#unitTitle { font-weight: bold; }
QFrame#annotatorBanner { background: #fff3cd; border-bottom: 1px solid #e0b040; }
QFrame#annotatorBanner QLabel { color: #4a3800; font-size: 14px; }
QLabel#keysHelp { color: gray; font-size: 11px; padding: 2px 6px; }
"""


class AnnotatorBanner(QFrame):
    """Who is annotating, asked in plain sight when the board resumed as the last annotator: one click confirms,
    one click switches to another annotator, or names a new one."""

    def __init__(self, window: BoardWindow):
        super().__init__(window)
        self.window_ = window
        self.setObjectName("annotatorBanner")
        self.text = QLabel()
        self.text.setTextFormat(Qt.TextFormat.RichText)
        self.me_button = QPushButton()
        self.me_button.clicked.connect(self.hide)
        self.others = QHBoxLayout()
        self.other_button = QPushButton("Someone else…")
        self.other_button.clicked.connect(self._someone_else)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 6, 10, 6)
        lay.addWidget(self.text)
        lay.addWidget(self.me_button)
        lay.addLayout(self.others)
        lay.addWidget(self.other_button)
        lay.addStretch(1)
        self.switch_buttons: list[QPushButton] = []
        self.hide()

    def ask(self, current: str) -> None:
        self.text.setText(f"Annotating as <b>{html.escape(current)}</b>, who named on this board last. Is that you?")
        self.me_button.setText(f"Yes, I am {current}")
        for b in self.switch_buttons:
            b.deleteLater()
        self.switch_buttons = []
        names = [r["name"] for r in naming.annotators(self.window_.project) if r["name"] != current]
        for name in names[:4]:
            b = QPushButton(f"I am {name}")
            b.clicked.connect(lambda _c=False, n=name: self._switch(n))
            self.others.addWidget(b)
            self.switch_buttons.append(b)
        self.show()

    def _switch(self, name: str) -> None:
        self.window_.set_annotator(name)
        self.hide()

    def _someone_else(self) -> None:
        name, ok = QInputDialog.getText(self, "Who is annotating?", "Your name:")
        if ok and name.strip():
            self._switch(name.strip())


class BoardWindow(QMainWindow):
    """Interactive naming on one project. Usable standalone or opened from the main window (`open_board`)."""

    def __init__(self, project_path: str | Path, parent: QWidget | None = None, *, annotator: str | None = None,
                 pool_id: int | None = None):
        super().__init__(parent)
        if parent is not None:
            self.setWindowFlag(Qt.WindowType.Window, True)
        self.project = Project.open(project_path)
        self.setStyleSheet(STYLE)
        self.cache = ThumbnailCache(self)
        self.undo_group = QUndoGroup(self)
        self.board = Board(self.project, self.cache, self.undo_group, self)
        self.unit_panel = UnitPanel(self.board)
        self.suggestions = SuggestionsPanel(self.board)
        self.study = StudyPanel(self.board)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.unit_panel, "Unit")
        self.tabs.addTab(self.suggestions, "Suggestions")
        self.tabs.addTab(self.study, "Study")
        dock = QDockWidget("Unit · suggestions · study", self)
        dock.setObjectName("namingDock")
        dock.setWidget(self.tabs)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        self.resizeDocks([dock], [430], Qt.Orientation.Horizontal)
        self.empty = QWidget()
        self.empty_label = QLabel()
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setWordWrap(True)
        empty_button = QPushButton("New pool…")
        empty_button.clicked.connect(self.new_pool)
        el = QVBoxLayout(self.empty)
        el.addStretch(1)
        el.addWidget(self.empty_label)
        el.addWidget(empty_button, 0, Qt.AlignmentFlag.AlignCenter)
        el.addStretch(1)
        self.central = QStackedWidget()
        self.central.addWidget(self.empty)
        self.central.addWidget(self.board)
        self.who = AnnotatorBanner(self)
        host = QWidget()
        host_lay = QVBoxLayout(host)
        host_lay.setContentsMargins(0, 0, 0, 0)
        host_lay.setSpacing(0)
        host_lay.addWidget(self.who)
        host_lay.addWidget(self.central, 1)
        self.setCentralWidget(host)
        self._build_toolbar()
        self.saved = QLabel()
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.hide()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.hide()
        self.cancel_button.clicked.connect(self.cancel_jobs)
        self.statusBar().addPermanentWidget(self.progress)
        self.statusBar().addPermanentWidget(self.cancel_button)
        self.statusBar().addPermanentWidget(self.saved)
        # The window's runner: each job in a child process, so building a pool or clustering never pauses the board.
        self.jobs = JobManager(parallel=2, parent=self)
        self.jobs.job_changed.connect(self._progressed)
        self.study.set_jobs(self.jobs)

        self.board.message.connect(lambda m: self.statusBar().showMessage(m, 10000))
        self.board.edited.connect(self._on_edited)
        self.board.loaded.connect(self._on_loaded)
        self.board.current_map.connect(self.unit_panel.show_map)
        self.suggestions.requested.connect(self._suggest)
        self.suggestions.features_requested.connect(self._compute_features)

        ann = self.project.annotator(annotator) if annotator else naming.latest_annotator(self.project)
        if ann is None:
            ann = self.project.annotator(getpass.getuser() or "annotator")
        self.refresh_annotators(ann)
        if annotator is None:
            # Resumed as whoever named last: maybe someone else at this computer. Ask in plain sight.
            self.who.ask(self.annotator_combo.currentText())
        self.refresh_pools(pool_id if pool_id is not None else naming.latest_pool(self.project, ann))
        self._open_current()
        # within the screen, frame and task bar included: a 1000 px tall screen shows the whole board
        avail = self.screen().availableGeometry() if self.screen() is not None else None
        self.resize(min(1600, int(avail.width() * 0.95)) if avail else 1600,
                    min(900, int(avail.height() * 0.9)) if avail else 900)

    # ---- toolbar -------------------------------------------------------------------------------------------
    def _build_toolbar(self) -> None:
        bar = QToolBar("Board")
        bar.setObjectName("boardToolbar")
        bar.setMovable(False)
        self.addToolBar(bar)
        self.pool_combo = QComboBox()
        self.pool_combo.setMinimumContentsLength(28)
        self.pool_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.pool_combo.activated.connect(lambda _i: self._open_current())
        self.annotator_combo = QComboBox()
        self.annotator_combo.setMinimumContentsLength(10)
        self.annotator_combo.activated.connect(self._annotator_chosen)
        self.mode_combo = QComboBox()
        for mode, label in (("outline", "outline (own colours)"), ("heat", "heat map"), ("region", "region"),
                            ("crop", "crop of region")):
            self.mode_combo.addItem(label, mode)
        self.mode_combo.currentIndexChanged.connect(lambda _i: self._mode_changed())
        self.zoom_slider = QSlider(Qt.Orientation.Horizontal)
        self.zoom_slider.setRange(0, len(ZOOMS) - 1)
        self.zoom_slider.setValue(ZOOMS.index(self.board.zoom))
        self.zoom_slider.setFixedWidth(110)
        self.zoom_slider.setToolTip("thumbnail size (Ctrl+wheel, Ctrl+=, Ctrl+-)")
        self.zoom_slider.valueChanged.connect(lambda i: self.board.set_zoom(ZOOMS[i]))
        self.blind_action = QAction("Blind mode", self)
        self.blind_action.setCheckable(True)
        self.blind_action.setChecked(True)
        self.blind_action.setToolTip("hide automatic labels so they do not anchor your naming")
        self.blind_action.toggled.connect(self.set_blind)
        # Own actions rather than QUndoGroup.createUndoAction: a fixed label keeps the toolbar from jumping; what
        # would be undone goes to the tooltip.
        self.undo_action = QAction("Undo", self)
        self.undo_action.setShortcut(QKeySequence.StandardKey.Undo)
        self.undo_action.triggered.connect(self.undo_group.undo)
        self.undo_action.setEnabled(False)
        self.undo_group.canUndoChanged.connect(self.undo_action.setEnabled)
        self.undo_group.undoTextChanged.connect(lambda t: self.undo_action.setToolTip(f"Undo {t} (Ctrl+Z)"))
        self.redo_action = QAction("Redo", self)
        self.redo_action.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        self.redo_action.triggered.connect(self.undo_group.redo)
        self.redo_action.setEnabled(False)
        self.undo_group.canRedoChanged.connect(self.redo_action.setEnabled)
        self.undo_group.redoTextChanged.connect(lambda t: self.redo_action.setToolTip(f"Redo {t} (Ctrl+Shift+Z)"))
        new_pool = QAction("New pool…", self)
        new_pool.triggered.connect(self.new_pool)
        bar.addWidget(QLabel(" Pool "))
        bar.addWidget(self.pool_combo)
        bar.addAction(new_pool)
        bar.addSeparator()
        bar.addWidget(QLabel(" Annotator "))
        bar.addWidget(self.annotator_combo)
        bar.addSeparator()
        bar.addWidget(QLabel(" Show "))
        bar.addWidget(self.mode_combo)
        bar.addWidget(QLabel(" Zoom "))
        bar.addWidget(self.zoom_slider)
        bar.addAction(self.blind_action)
        bar.addSeparator()
        bar.addAction(self.undo_action)
        bar.addAction(self.redo_action)
        for action in (self.undo_action, self.redo_action):
            self.addAction(action)
        self.board.zoom_changed.connect(self._zoom_changed)

    def _zoom_changed(self, size: int) -> None:
        if size in ZOOMS and self.zoom_slider.value() != ZOOMS.index(size):
            self.zoom_slider.blockSignals(True)
            self.zoom_slider.setValue(ZOOMS.index(size))
            self.zoom_slider.blockSignals(False)

    # ---- annotators and pools ------------------------------------------------------------------------------
    def refresh_annotators(self, select: int | None = None) -> None:
        current = select if select is not None else self.annotator_combo.currentData()
        self.annotator_combo.blockSignals(True)
        self.annotator_combo.clear()
        for row in naming.annotators(self.project):
            self.annotator_combo.addItem(row["name"], row["id"])
        self.annotator_combo.addItem("New annotator…", -1)
        i = self.annotator_combo.findData(current)
        self.annotator_combo.setCurrentIndex(max(0, i))
        self.annotator_combo.blockSignals(False)

    def refresh_pools(self, select: int | None = None) -> None:
        current = select if select is not None else self.pool_combo.currentData()
        self.pool_combo.blockSignals(True)
        self.pool_combo.clear()
        for p in naming.pools(self.project):
            self.pool_combo.addItem(f"{p.name} · {p.size} maps ({p.kind}-centric)", p.id)
        i = self.pool_combo.findData(current)
        self.pool_combo.setCurrentIndex(i if i >= 0 else self.pool_combo.count() - 1)
        self.pool_combo.blockSignals(False)

    def _annotator_chosen(self, index: int) -> None:
        self.who.hide()
        if self.annotator_combo.itemData(index) == -1:
            name, ok = QInputDialog.getText(self, "New annotator", "Name of the annotator:")
            if ok and name.strip():
                self.set_annotator(name.strip())
            else:
                self.refresh_annotators(self.board.annotator_id or None)
            return
        self._open_current()

    def set_annotator(self, name: str) -> int:
        """Switches the board to this annotator's session (creating the profile the first time)."""
        try:
            ann = self.project.annotator(name)
        except NeuronStudioError as exc:
            self.statusBar().showMessage(str(exc), 10000)
            return self.board.annotator_id
        self.refresh_annotators(ann)
        self._open_current()
        return ann

    def set_pool(self, pool_id: int) -> None:
        self.refresh_pools(pool_id)
        self._open_current()

    def commit_typing(self) -> None:
        """Saves names and a description being typed now, into the board they were typed on."""
        self.unit_panel.commit_name()
        self.unit_panel.finish_draft()
        for panel in list(self.board._panels.values()):
            panel.commit_name()

    def _open_current(self) -> None:
        pool_id = self.pool_combo.currentData()
        ann = self.annotator_combo.currentData()
        if self.board.state is not None:
            self.commit_typing()
        if pool_id is None or ann is None or ann == -1:
            has_layers = bool(self.project.extracted_layers())
            self.empty_label.setText(
                "No pool of activation maps yet. Build one from an extracted layer: the top exemplars of its units, "
                "or the maps behind each image's prediction." if has_layers else
                "No layer of this project has been extracted yet. Extract one first "
                "(`neuron-studio extract`), then build a pool here.")
            self.central.setCurrentWidget(self.empty)
            self.board.close_board()
            return
        try:
            self.board.open(int(pool_id), int(ann))
        except NeuronStudioError as exc:
            self.statusBar().showMessage(str(exc), 15000)
            self.empty_label.setText(str(exc))
            self.central.setCurrentWidget(self.empty)
            return
        self.central.setCurrentWidget(self.board)

    def _on_loaded(self) -> None:
        state = self.board.state
        if state is None:
            return
        self.setWindowTitle(f"Naming · {state.pool.name} · {state.annotator} — {self.project.path.name}")
        self.suggestions.clear()
        self.unit_panel.refresh()
        self.study.schedule()
        self.saved.setText("All edits are saved as you make them")

    def _on_edited(self) -> None:
        state = self.board.state
        named = sum(len(g.members) for g in state.concepts) if state else 0
        total = len(state.maps) if state else 0
        self.saved.setText(f"{self.board.last_edit} · saved {_dt.datetime.now().strftime('%H:%M:%S')} · "
                           f"{named} of {total} maps named · Ctrl+Z undoes")
        self.unit_panel.refresh()
        self.suggestions.prune()
        self.study.schedule()

    def _mode_changed(self) -> None:
        self.board.set_mode(self.mode_combo.currentData())
        self.unit_panel.ex_model.repaint_all()
        for card in self.suggestions.cards:
            card.model.repaint_all()

    def set_blind(self, blind: bool) -> None:
        self.board.set_blind(blind)
        if self.blind_action.isChecked() != blind:
            self.blind_action.setChecked(blind)
        self.unit_panel.refresh_labels()
        self.suggestions.refresh_hints()
        self.study.schedule()

    # ---- background work -----------------------------------------------------------------------------------
    def _start(self, job: Any, on_success: Any, on_failure: Any) -> JobHandle:
        def finished(handle: JobHandle) -> None:
            if not [h for h in self.jobs.active() if not self._own_progress(h)]:
                self.progress.hide()
                self.cancel_button.hide()
            if handle.state is JobState.DONE:
                on_success(handle.result)
            elif handle.state is JobState.CANCELLED:
                on_failure("cancelled")
            else:
                on_failure(handle.error or "failed")

        self.progress.setRange(0, 0)
        self.progress.setFormat(job.title)
        self.progress.show()
        self.cancel_button.show()
        return self.jobs.submit(job, on_done=finished)

    @staticmethod
    def _own_progress(handle: JobHandle) -> bool:
        """The study tab shows its job's progress itself, not in the status bar."""
        return isinstance(handle.job, naming.StudyJob)

    def _progressed(self, handle: JobHandle) -> None:
        info = handle.info
        if info is None or handle.state is not JobState.RUNNING or self._own_progress(handle):
            return
        if info.total:
            self.progress.setRange(0, info.total)
            self.progress.setValue(info.done)
        self.progress.setFormat(f"{info.message} %p%")

    def cancel_jobs(self) -> None:
        self.jobs.cancel_all()

    def wait_jobs(self, msecs: int = 60000) -> None:
        self.jobs.wait_all(msecs / 1000)

    def new_pool(self) -> None:
        dialog = NewPoolDialog(self.project, self)
        if dialog.exec() != QDialog.DialogCode.Accepted or dialog.result_spec is None:
            return
        self.build_pool(dialog.result_spec)

    def build_pool(self, spec: naming.PoolSpec) -> Any:
        def done(pool_id: int) -> None:
            self.statusBar().showMessage(f"Pool {pool_id} is ready", 8000)
            self.set_pool(int(pool_id))

        return self._start(naming.PoolJob(self.project.path, spec), done,
                           lambda m: self.statusBar().showMessage(f"The pool was not built: {m}", 15000))

    def _suggest(self, method: str, n_groups: int) -> None:
        state = self.board.state
        if state is None:
            self.suggestions.failed("Open a pool first.")
            return
        pool = naming.pool_info(self.project, state.pool.id)
        if not pool.has_features:
            self.suggestions.failed("This pool has no region features yet; computing them runs the model once "
                                    "over the pool's images.", needs_features=True)
            return
        pool_id, ann = state.pool.id, self.board.annotator_id

        def done(suggestions: list[naming.Suggestion]) -> None:
            if self.board.state is not None and (self.board.pool_id, self.board.annotator_id) == (pool_id, ann):
                self.suggestions.show_suggestions(suggestions)
                self.suggestions.prune()
                self.tabs.setCurrentWidget(self.suggestions)

        self._start(naming.SuggestJob(self.project.path, pool_id, ann, n_groups or None, method), done,
                    self.suggestions.failed)

    def _compute_features(self) -> None:
        state = self.board.state
        if state is None:
            return

        def done(_r: Any) -> None:
            self.suggestions.failed("Region features are ready.")
            self.suggestions.request()

        self._start(naming.FeaturesJob(self.project.path, state.pool.id), done, self.suggestions.failed)

    # ---- closing -------------------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        self.commit_typing()
        self.jobs.shutdown(30)
        self.cache.shutdown()
        # a refresh still queued (the study tab's timer) must not reach the closed database
        self.study.stop()
        self.board.close_board()
        self.project.close()
        super().closeEvent(event)


def open_board(project_path: str | Path, parent: QWidget | None = None, **kwargs: Any) -> BoardWindow:
    """Opens the naming board on a project in its own window (what the main window calls)."""
    window = BoardWindow(project_path, parent, **kwargs)
    window.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
    window.show()
    window.raise_()
    window.activateWindow()
    return window
