"""The main window: projects, models, datasets, runs, and browsing units. It holds no computation: runs are jobs
of app/engine in QThreads (app/ui/workers.py), queries run on a thread pool, and every view reads the project
through its own connection (one `Project` per thread)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from app.errors import NeuronStudioError
from app.ui import data as uidata
from app.ui.settings import Preferences, RecentProjects, qsettings
from app.ui.theme import Theme, icon
from app.ui.views.ablation import AblationView
from app.ui.views.compare import CompareView
from app.ui.views.jobs_panel import JobsPanel, describe_result
from app.ui.views.language import LanguagePanel
from app.ui.views.layers import LayerTree
from app.ui.views.overview import LayerOverview
from app.ui.views.texplain import TExplainView
from app.ui.views.params import ExtractDialog, LabelDialog
from app.ui.views.sources import AddDatasetDialog, AddModelDialog, guess_model_kind
from app.ui.views.unit import UnitView
from app.ui.views.units import UnitsBrowser
from app.ui.workers import JobHandle, JobManager, JobState, call_in_pool, readable_error, wait_pool

log = logging.getLogger(__name__)

PROJECT_SUFFIX = ".nstudio"
MODEL_SUFFIXES = {".pt", ".pth", ".pt2", ".ts", ".torchscript", ".safetensors", ".bin", ".py"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def is_project(path: Path) -> bool:
    return (path / "project.sqlite").is_file() or (path.is_file() and path.name == "project.sqlite")


def classify_drop(path: Path) -> str:
    """'project', 'model', 'dataset' or '' for a dropped path."""
    if is_project(path):
        return "project"
    if path.is_dir():
        if (path / "config.json").is_file() and any(
            (path / n).exists() for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
        ):
            return "model"
        return "dataset"
    suffix = path.suffix.lower()
    if suffix in MODEL_SUFFIXES:
        return "model"
    if suffix in (".json", ".csv") or suffix in IMAGE_SUFFIXES:
        return "dataset"
    return ""


def job_signature(job: Any) -> tuple:
    """Two jobs with the same signature would write the same run: the window refuses the second while the first
    is queued or running."""
    kind = getattr(job, "kind", type(job).__name__)
    if kind == "extract":
        return ("extract", str(job.project_path), job.model_ref, job.dataset_ref,
                tuple(sorted(job.options.key_fields().items(), key=lambda kv: kv[0]).__repr__()))
    if kind == "label":
        return ("label", str(job.project_path), job.model_ref, job.layer, job.method,
                repr(sorted(job.params.items())))
    return (kind, id(job))


class Welcome(QWidget):
    """What the window shows without a project: start buttons and the recent projects."""

    open_path = Signal(str)

    def __init__(self, window: "MainWindow"):
        super().__init__(window)
        title = QLabel("Neuron Studio")
        title.setStyleSheet("font-size: 26px; font-weight: 700;")
        sub = QLabel("Find out what the units of a vision model respond to, and name them.")
        sub.setStyleSheet("color: gray; font-size: 14px;")
        new = QPushButton(icon("new"), "  New project...")
        new.clicked.connect(lambda: window.new_project())
        opn = QPushButton(icon("open"), "  Open project...")
        opn.clicked.connect(lambda: window.open_project_dialog())
        demo = QPushButton(icon("app"), "  Build and open the demo project")
        demo.setToolTip("Generates a shapes dataset, trains a small CNN and runs every method (a few minutes, offline)")
        demo.clicked.connect(lambda: window.build_demo())
        for b in (new, opn, demo):
            b.setMinimumHeight(34)
        self.recent = QListWidget()
        self.recent.setMaximumWidth(640)
        self.recent.itemActivated.connect(lambda it: self.open_path.emit(it.data(Qt.ItemDataRole.UserRole)))
        hint = QLabel("Or drop a project folder, a model file or an image folder onto this window.")
        hint.setStyleSheet("color: gray;")
        col = QVBoxLayout()
        col.addStretch(1)
        col.addWidget(title)
        col.addWidget(sub)
        col.addSpacing(16)
        row = QHBoxLayout()
        for b in (new, opn, demo):
            row.addWidget(b)
        row.addStretch(1)
        col.addLayout(row)
        col.addSpacing(16)
        col.addWidget(QLabel("Recent projects"))
        col.addWidget(self.recent)
        col.addWidget(hint)
        col.addStretch(2)
        outer = QHBoxLayout(self)
        outer.addStretch(1)
        outer.addLayout(col, 3)
        outer.addStretch(1)

    def set_recent(self, paths: list[str]) -> None:
        self.recent.clear()
        for p in paths:
            item = QListWidgetItem(icon("open"), p)
            item.setData(Qt.ItemDataRole.UserRole, p)
            self.recent.addItem(item)


class MainWindow(QMainWindow):
    project_loaded = Signal()
    layer_loaded = Signal(int)  # layer id, once its table and view are shown

    def __init__(self, prefs: Preferences | None = None, settings: QSettings | None = None,
                 theme: Theme | None = None, in_process: bool = True):
        """`in_process`: runs go in child processes (the window never shares its GIL with them); False runs them
        in threads of this process."""
        super().__init__()
        self.prefs = prefs or Preferences.load()
        self.settings = settings or qsettings()
        self.recent = RecentProjects(self.settings)
        app = QApplication.instance()
        self.theme = theme or Theme(app, self.prefs.appearance)
        self.manager = JobManager(self.prefs.parallel_jobs, self, in_process=in_process)
        self.project: Any = None  # app.project.store.Project of this (the window's) thread
        self.project_path: Path | None = None
        self.reader: Any = None  # app.project.store.SharedReader for the pool's loaders
        self.board: Any = None  # the naming board window, while open
        self.model_id: int | None = None
        self.layer_id: int | None = None
        self.table: uidata.UnitTable | None = None
        self.layer_view: uidata.LayerView | None = None
        self.device_text = "detecting device..."
        self._layer_token = 0
        self._actions_needing_project: list[QAction] = []
        self._icon_actions: list[tuple[QAction, str]] = []

        self.setWindowTitle("Neuron Studio")
        self.setWindowIcon(icon("app", "#3574f0"))
        self.setAcceptDrops(True)
        self.setDockOptions(QMainWindow.DockOption.AnimatedDocks | QMainWindow.DockOption.AllowTabbedDocks)
        self._build_views()
        self._build_actions()
        self._build_status()
        self.theme.changed.connect(self._on_theme)
        self._on_theme(self.theme.dark)
        self.manager.job_changed.connect(lambda _h: self._update_jobs_status())
        self.manager.job_finished.connect(self._on_job_finished)
        self._restore_layout()
        self._set_project_widgets(False)
        self._detect_device()

    # ---- construction --------------------------------------------------------------------------------------
    def _build_views(self) -> None:
        self.welcome = Welcome(self)
        self.welcome.open_path.connect(self.open_project)
        self.welcome.set_recent(self.recent.list())

        self.units = UnitsBrowser()
        self.unit_view = UnitView(self.prefs.thumbnail_size, self.prefs.overlay_mode, self.prefs.overlay_opacity)
        self.unit_view.step_requested.connect(self.step_unit)
        self.unit_view.overlay_changed.connect(self._on_overlay_changed)
        self.units.unit_selected.connect(self._on_unit)
        self.units.layer_changed.connect(self.show_layer)
        self.split = QSplitter(Qt.Orientation.Horizontal)
        self.split.addWidget(self.units)
        self.split.addWidget(self.unit_view)
        self.split.setStretchFactor(0, 2)
        self.split.setStretchFactor(1, 3)
        self.split.setSizes([700, 760])  # the units table needs room for whole labels of two methods
        self.overview = LayerOverview()
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.split, icon("units"), "Units")
        self.tabs.addTab(self.overview, icon("overview"), "Layer overview")
        self.compare_view = CompareView(self._run_compare_job)
        self.compare_view.unit_activated.connect(self.open_unit)
        self.compare_view.status.connect(lambda text: self.statusBar().showMessage(text, 5000))
        self.tabs.addTab(self.compare_view, icon("label"), "Compare")
        self.texplain_view = TExplainView()
        self.tabs.addTab(self.texplain_view, icon("overview"), "TExplain words")
        self.ablation_view = AblationView(self._run_compare_job, self.refresh)
        self.ablation_view.status.connect(lambda text: self.statusBar().showMessage(text, 8000))
        self.tabs.addTab(self.ablation_view, icon("overview"), "Ablation")
        self.stack = QStackedWidget()
        self.stack.addWidget(self.welcome)
        self.stack.addWidget(self.tabs)
        self.setCentralWidget(self.stack)

        # left dock: the model, its module tree, the datasets
        side = QWidget()
        sl = QVBoxLayout(side)
        sl.setContentsMargins(6, 6, 6, 6)
        mrow = QHBoxLayout()
        mrow.addWidget(QLabel("Model"))
        self.model_combo = QComboBox()
        self.model_combo.currentIndexChanged.connect(self._on_model)
        mrow.addWidget(self.model_combo, 1)
        sl.addLayout(mrow)
        self.layer_tree = LayerTree()
        self.layer_tree.layer_chosen.connect(self.show_layer)
        self.layer_tree.checks_changed.connect(self._update_run_buttons)
        sl.addWidget(self.layer_tree, 1)
        self.extract_button = QPushButton(icon("extract"), "Extract ticked layers...")
        self.extract_button.clicked.connect(self.extract_checked)
        self.label_button = QPushButton(icon("label"), "Label units...")
        self.label_button.clicked.connect(self.label_dialog)
        brow = QHBoxLayout()
        brow.addWidget(self.extract_button)
        brow.addWidget(self.label_button)
        sl.addLayout(brow)
        self.datasets_label = QLabel("")
        self.datasets_label.setWordWrap(True)
        self.datasets_label.setStyleSheet("color: gray;")
        sl.addWidget(self.datasets_label)
        self.side_dock = QDockWidget("Model and layers", self)
        self.side_dock.setObjectName("dock_layers")
        self.side_dock.setWidget(side)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.side_dock)

        self.jobs = JobsPanel(self.manager)
        self.jobs.resume_requested.connect(self.resume_run)
        self.jobs_dock = QDockWidget("Runs", self)
        self.jobs_dock.setObjectName("dock_jobs")
        from app.ui.views.runs import RunHistory

        self.run_history = RunHistory()
        self.runs_tabs = QTabWidget()
        self.runs_tabs.setDocumentMode(True)
        self.runs_tabs.addTab(self.jobs, "This session")
        self.runs_tabs.addTab(self.run_history, "History")
        self.jobs_dock.setWidget(self.runs_tabs)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.jobs_dock)
        self.resizeDocks([self.side_dock], [380], Qt.Orientation.Horizontal)
        self.resizeDocks([self.jobs_dock], [130], Qt.Orientation.Vertical)
        self._build_language_dock()

    def _build_language_dock(self) -> None:
        self.language = LanguagePanel()
        self.language.train_requested.connect(self.train_language_model)
        self.language.add_requested.connect(self.add_language_folder)
        self.language_dock = QDockWidget("Language models", self)
        self.language_dock.setObjectName("dock_language")
        self.language_dock.setWidget(self.language)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.language_dock)
        self.tabifyDockWidget(self.jobs_dock, self.language_dock)
        self.jobs_dock.raise_()

    def _action(self, text: str, icon_name: str | None, slot: Any, shortcut: Any = None,
                needs_project: bool = False) -> QAction:
        act = QAction(text, self)
        if icon_name:
            act.setIcon(icon(icon_name))
            self._icon_actions.append((act, icon_name))
        if shortcut is not None:
            if isinstance(shortcut, (list, tuple)):
                act.setShortcuts([QKeySequence(s) for s in shortcut])
            else:
                act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(lambda _checked=False: slot())
        if needs_project:
            self._actions_needing_project.append(act)
        return act

    def _build_actions(self) -> None:
        self.act_new = self._action("&New project...", "new", self.new_project, QKeySequence.StandardKey.New)
        self.act_open = self._action("&Open project...", "open", self.open_project_dialog,
                                     QKeySequence.StandardKey.Open)
        self.act_close = self._action("&Close project", None, self.close_project, needs_project=True)
        self.act_demo = self._action("Build the &demo project", "app", self.build_demo)
        self.act_quit = self._action("&Quit", "quit", self.close, QKeySequence.StandardKey.Quit)
        self.act_add_model = self._action("Add &model...", "model", self.add_model, "Ctrl+M", needs_project=True)
        self.act_add_dataset = self._action("Add &dataset...", "dataset", self.add_dataset, "Ctrl+D",
                                            needs_project=True)
        self.act_extract = self._action("&Extract ticked layers...", "extract", self.extract_checked, "Ctrl+E",
                                        needs_project=True)
        self.act_label = self._action("&Label units...", "label", self.label_dialog, "Ctrl+L", needs_project=True)
        self.act_board = self._action("&Naming board...", "board", self.open_board, "Ctrl+B", needs_project=True)
        self.act_compare = self._action("&Compare with human names", "label", self.compare_labels, "Ctrl+K",
                                        needs_project=True)
        self.act_translator = self._action("Train a TExplain &translator...", "label", self.train_translator,
                                           needs_project=True)
        self.act_next = self._action("&Next unit", "next", lambda: self.step_unit(1), ["N", "Alt+Right"],
                                     needs_project=True)
        self.act_prev = self._action("&Previous unit", "previous", lambda: self.step_unit(-1), ["P", "Alt+Left"],
                                     needs_project=True)
        self.act_find = self._action("&Find units", "search", self._focus_search, QKeySequence.StandardKey.Find,
                                     needs_project=True)
        self.act_about = self._action("&About Neuron Studio", "about", self._about)
        self.act_export = self._action("&Export...", "export", self.export_dialog, "Ctrl+Shift+E",
                                       needs_project=True)
        for a in (self.act_next, self.act_prev, self.act_find):
            a.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            self.addAction(a)

        bar = self.menuBar()
        m = bar.addMenu("&File")
        m.addAction(self.act_new)
        m.addAction(self.act_open)
        self.recent_menu = m.addMenu(icon("recent"), "Open &recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        m.addAction(self.act_demo)
        m.addAction(self.act_close)
        m.addSeparator()
        m.addAction(self.act_export)
        m.addSeparator()
        m.addAction(self.act_quit)
        m = bar.addMenu("&Project")
        for a in (self.act_add_model, self.act_add_dataset, self.act_extract, self.act_label, self.act_translator):
            m.addAction(a)
        m.addSeparator()
        m.addAction(self.act_board)
        m.addAction(self.act_compare)
        m = bar.addMenu("&View")
        m.addAction(self.act_next)
        m.addAction(self.act_prev)
        m.addAction(self.act_find)
        m.addSeparator()
        m.addAction(self.side_dock.toggleViewAction())
        m.addAction(self.jobs_dock.toggleViewAction())
        m.addAction(self.language_dock.toggleViewAction())
        appearance = m.addMenu(icon("appearance"), "&Appearance")
        group = QActionGroup(self)
        self.appearance_actions: dict[str, QAction] = {}
        for key, text in (("system", "Follow the system"), ("light", "Light"), ("dark", "Dark")):
            a = QAction(text, self, checkable=True)
            a.setChecked(self.prefs.appearance == key)
            a.triggered.connect(lambda _c=False, k=key: self.set_appearance(k))
            group.addAction(a)
            appearance.addAction(a)
            self.appearance_actions[key] = a
        m = bar.addMenu("&Help")
        m.addAction(self.act_about)

        tb = QToolBar("Main")
        tb.setObjectName("toolbar_main")
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        for a in (self.act_new, self.act_open):
            tb.addAction(a)
        tb.addSeparator()
        for a in (self.act_add_model, self.act_add_dataset, self.act_extract, self.act_label, self.act_board):
            tb.addAction(a)
        tb.addSeparator()
        tb.addAction(self.act_prev)
        tb.addAction(self.act_next)
        self.addToolBar(tb)
        self.toolbar = tb

    def _build_status(self) -> None:
        sb = self.statusBar()
        self.project_label = QLabel("No project")
        self.jobs_label = QLabel("")
        self.device_icon = QLabel()
        self.device_label = QLabel(self.device_text)
        sb.addWidget(self.project_label, 1)
        sb.addPermanentWidget(self.jobs_label)
        sb.addPermanentWidget(self.device_icon)
        sb.addPermanentWidget(self.device_label)

    def _detect_device(self) -> None:
        pref = self.prefs.device

        def detect() -> str:
            from app.engine.device import describe, pick_device

            text = describe(pick_device(pref))
            # Warm up off the window's thread: the engine and labeler modules (the window builds jobs and forms
            # from them), and the fork server that starts runs' processes with torch already imported; the
            # window's first click on Extract or Label must not be the one that pays for it.
            import app.engine.extract  # noqa: F401
            import app.engine.labeling  # noqa: F401
            import labelers.base as lb
            from app.ui.jobproc import warm_up

            lb.available()
            warm_up()
            return text

        def got(text: str) -> None:
            self.device_text = text
            self.device_label.setText(text)
            self.device_icon.setPixmap(icon("gpu" if text.startswith("GPU") else "cpu").pixmap(16, 16))

        def failed(exc: BaseException) -> None:
            got(f"CPU (device {pref!r} unavailable: {exc})")

        call_in_pool(detect, got, failed, owner=self)

    # ---- appearance and layout -----------------------------------------------------------------------------
    def _on_theme(self, dark: bool) -> None:
        for act, name in self._icon_actions:
            act.setIcon(icon(name))
        self.unit_view.set_dark(dark)
        self.texplain_view.set_dark(dark)
        self.overview.set_dark(dark)
        self.compare_view.set_dark(dark)
        self.ablation_view.set_dark(dark)
        self.language.set_dark(dark)

    def set_appearance(self, appearance: str) -> None:
        self.prefs.appearance = appearance
        self.prefs.save()
        self.theme.apply(appearance)

    def _restore_layout(self) -> None:
        geo = self.settings.value("window/geometry")
        if isinstance(geo, QByteArray) and not geo.isEmpty():
            self.restoreGeometry(geo)
        else:
            self.resize(1500, 920)
        state = self.settings.value("window/state")
        if isinstance(state, QByteArray) and not state.isEmpty():
            self.restoreState(state)
        for key, splitter in (("window/split_units", self.split), ("window/split_unit", self.unit_view.splitter)):
            value = self.settings.value(key)
            if isinstance(value, QByteArray) and not value.isEmpty():
                splitter.restoreState(value)

    def _save_layout(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.setValue("window/split_units", self.split.saveState())
        self.settings.setValue("window/split_unit", self.unit_view.splitter.saveState())
        self.settings.sync()

    def _on_overlay_changed(self, mode: str, opacity: float) -> None:
        self.prefs.overlay_mode = mode
        self.prefs.overlay_opacity = round(opacity, 2)

    # ---- messages ------------------------------------------------------------------------------------------
    def confirm(self, title: str, text: str) -> bool:
        """Ask a yes/no question (tests replace this)."""
        return QMessageBox.question(self, title, text) == QMessageBox.StandardButton.Yes

    def report_error(self, title: str, text: str) -> None:
        """Show a readable problem (tests replace this); never a traceback."""
        log.info("%s: %s", title, text)
        self.statusBar().showMessage(f"{title}: {text}", 15000)
        QMessageBox.warning(self, title, text)

    def _about(self) -> None:
        QMessageBox.about(self, "About Neuron Studio", self.about_text())

    def export_dialog(self) -> Any:
        """File > Export: a format and its options, then the CLI's export job in the Runs panel."""
        if self.project_path is None:
            return None
        from app.ui.views.export_dialog import ExportDialog

        dlg = ExportDialog(Path(self.project_path).parent / "exports", self)
        if dlg.exec() != ExportDialog.DialogCode.Accepted:
            return None
        fmt, path, options = dlg.request()
        return self.submit_export(fmt, path, options)

    def submit_export(self, fmt: str, path: str | Path, options: dict[str, Any] | None = None) -> JobHandle | None:
        from app.export.base import ExportJob

        if self.project_path is None:
            return None
        return self.manager.submit(ExportJob(self.project_path, fmt, path, options or {}))

    def about_text(self) -> str:
        import platform

        from PySide6 import __version__ as pyside_version

        from app import version

        return (f"Neuron Studio {version()}\n"
                "Label the units of vision models, offline.\n\n"
                f"Python {platform.python_version()} · PySide6 {pyside_version}\n"
                "Icons: Material Design Icons via qtawesome.")

    # ---- projects ------------------------------------------------------------------------------------------
    def new_project(self, path: str | Path | None = None) -> bool:
        if path is None:
            start = str(Path(self.prefs.last_folder or Path.home()) / f"study{PROJECT_SUFFIX}")
            chosen, _ = QFileDialog.getSaveFileName(self, "New project folder", start, "",
                                                    options=QFileDialog.Option.DontConfirmOverwrite)
            if not chosen:
                return False
            path = chosen
        from app.project.store import Project

        try:
            Project.create(path).close()
        except NeuronStudioError as exc:
            self.report_error("Cannot create the project", str(exc))
            return False
        return self.open_project(path)

    def open_project_dialog(self) -> bool:
        start = self.prefs.last_folder or str(Path.home())
        chosen = QFileDialog.getExistingDirectory(self, "Open project folder", start)
        return self.open_project(chosen) if chosen else False

    def open_project(self, path: str | Path) -> bool:
        from app.project.store import Project, SharedReader

        path = Path(path)
        if path.is_file() and path.name == "project.sqlite":
            path = path.parent
        try:
            project = Project.open(path)
        except NeuronStudioError as exc:
            self.report_error("Cannot open the project", str(exc))
            if not path.exists():
                self.recent.remove(path)
                self.welcome.set_recent(self.recent.list())
            return False
        if self.project is not None:
            self.close_project()
        self.project = project
        self.reader = SharedReader(path)
        self.project_path = path.resolve()
        self.recent.add(self.project_path)
        self.prefs.last_folder = str(self.project_path.parent)
        self.prefs.save()
        self.setWindowTitle(f"{self.project_path.name} — Neuron Studio")
        self.project_label.setText(str(self.project_path))
        self._set_project_widgets(True)
        self.compare_view.set_project(str(self.project_path))
        self.ablation_view.set_project(str(self.project_path))
        self.refresh()
        self.project_loaded.emit()
        return True

    def open_board(self, **kwargs: Any) -> Any:
        """The naming board on this project, in its own window; one per project, raised when asked again."""
        if self.project_path is None:
            return None
        if self.board is not None:
            self.board.raise_()
            self.board.activateWindow()
            return self.board
        from app.ui.board import open_board

        try:
            board = open_board(self.project_path, self, **kwargs)
        except NeuronStudioError as exc:
            self.report_error("Naming board", str(exc))
            return None
        self.board = board
        # names given on the board show in the units browser once it closes
        board.destroyed.connect(self._board_closed)
        return board

    def _board_closed(self, *_args: Any) -> None:
        self.board = None
        if self.project is not None and self.layer_id is not None:
            self.show_layer(self.layer_id, keep_unit=self.units.current_unit())

    def close_project(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.project is not None:
            self.project.close()
        if self.reader is not None:
            self.reader.close()
        self.project = None
        self.reader = None
        self.project_path = None
        self.model_id = None
        self.layer_id = None
        self.table = None
        self.layer_view = None
        self.units.set_layers([])
        self.units.set_table(None)
        self.unit_view.set_layer(None)
        self.overview.set_data(None)
        self.compare_view.set_project(None)
        self.ablation_view.set_project(None)
        self.texplain_view.set_data(None)
        self.run_history.set_runs([], {})
        self.layer_tree.set_layers([], set())
        self.model_combo.clear()
        self.setWindowTitle("Neuron Studio")
        self.project_label.setText("No project")
        self.welcome.set_recent(self.recent.list())
        self._set_project_widgets(False)

    def _set_project_widgets(self, on: bool) -> None:
        self.stack.setCurrentWidget(self.tabs if on else self.welcome)
        for a in self._actions_needing_project:
            a.setEnabled(on)
        self.side_dock.widget().setEnabled(on)
        self._update_run_buttons()

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        paths = self.recent.list()
        for p in paths:
            a = self.recent_menu.addAction(p)
            a.triggered.connect(lambda _c=False, p=p: self.open_project(p))
        if not paths:
            a = self.recent_menu.addAction("(none)")
            a.setEnabled(False)
        else:
            self.recent_menu.addSeparator()
            clear = self.recent_menu.addAction("Clear the list")
            clear.triggered.connect(lambda: (self.recent.clear(), self.welcome.set_recent([])))

    # ---- what the project holds ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read models, datasets, layers, extracted layers and stopped runs (cheap queries)."""
        if self.project is None:
            return
        p = self.project
        models = p.models()
        keep = self.model_id
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for m in models:
            self.model_combo.addItem(icon("model"), m["name"], m["id"])
        self.model_combo.blockSignals(False)
        if models:
            i = self.model_combo.findData(keep) if keep is not None else 0
            self.model_combo.setCurrentIndex(max(0, i))
            self.model_id = self.model_combo.currentData()
        else:
            self.model_id = None
        datasets = p.datasets()
        if datasets:
            self.datasets_label.setText("Datasets: " + "; ".join(
                f"{d['name']} ({d['num_images']} images, {d['format']}{', masks' if d['has_masks'] else ''})"
                for d in datasets))
        else:
            self.datasets_label.setText("No dataset yet: Project > Add dataset, or drop an image folder here.")
        self._refresh_layers()
        layer_names = {r["id"]: r["name"] for m in p.models() for r in p.layers(m["id"])}
        self.jobs.set_resumable([r for r in p.stopped_runs() if not self._run_is_active(r.id)], layer_names)
        runs = p.runs()
        self.run_history.set_runs(runs, layer_names)
        self.ablation_view.set_runs(runs)
        self._refresh_language()
        self._update_run_buttons()

    def _refresh_language(self) -> None:
        from app.language.registry import list_models

        if self.project is None:
            self.language.set_models([], [])
            return
        from app.language.data import description_split

        names = [d["name"] for d in self.project.datasets()]
        seen, held = description_split(self.project)
        self.language.set_models(list_models(self.project), names, (len(seen), len(held)))

    def train_language_model(self, values: dict[str, Any]) -> JobHandle | None:
        from app.language.train import TrainJob, TrainOptions

        if self.project_path is None:
            return None
        return self.submit(TrainJob(self.project_path, TrainOptions(
            kind=values["kind"], dataset=values.get("dataset"), steps=values.get("steps"), device=self.prefs.device)))

    def add_language_folder(self, values: dict[str, Any]) -> None:
        from app.ui.views.language import add_folder_at
        from app.ui.workers import CallJob

        if self.project_path is None:
            return
        job = CallJob(f"Check and add {values['folder']}", add_folder_at, str(self.project_path), values["folder"],
                      values["kind"], values.get("name"))

        def done(message: Any) -> None:
            self.statusBar().showMessage(str(message), 10000)
            self.refresh()

        self.manager.run_task(job, done, lambda err: self.report_error("Cannot add the folder", err))

    def _run_is_active(self, run_id: int) -> bool:
        return any(h.run_id == run_id for h in self.manager.active())

    def _refresh_layers(self) -> None:
        if self.project is None or self.model_id is None:
            self.layer_tree.set_layers([], set())
            self.units.set_layers([])
            return
        rows = self.project.layers(self.model_id)
        extracted = self.project.extracted_layers(self.model_id)
        checked = self.layer_tree.checked_layers()
        self.layer_tree.set_layers(rows, {r["id"] for r in extracted})
        self.layer_tree.set_checked(checked)
        self.units.set_layers([(r["id"], r["name"], r["units"]) for r in extracted], self.layer_id)
        if extracted and (self.layer_id is None or self.layer_id not in {r["id"] for r in extracted}):
            # the layer this project showed last time, when it is still extracted
            remembered = self.settings.value(self._layer_key()) if self.project_path is not None else None
            names = {r["name"]: r["id"] for r in extracted}
            self.show_layer(names.get(str(remembered), extracted[0]["id"]))
        elif not extracted:
            self.layer_id = None
            self.units.set_table(None)
            self.unit_view.set_layer(None)
            self.overview.set_data(None)
            self.texplain_view.set_data(None)

    def _on_model(self, _i: int) -> None:
        mid = self.model_combo.currentData()
        if mid is not None and mid != self.model_id:
            self.model_id = mid
            self.layer_id = None
            self._refresh_layers()

    def _update_run_buttons(self) -> None:
        has = self.project is not None and self.model_id is not None
        self.extract_button.setEnabled(has and bool(self.layer_tree.checked_layers()))
        self.label_button.setEnabled(has and bool(self.layer_tree.extracted))

    def _update_jobs_status(self) -> None:
        running = len(self.manager.running())
        queued = len(self.manager.active()) - running
        parts = []
        if running:
            h = self.manager.running()[0]
            pct = f" {100 * h.fraction:.0f}%" if h.info else ""
            parts.append(f"{running} running{pct}")
        if queued:
            parts.append(f"{queued} queued")
        self.jobs_label.setText(", ".join(parts))

    # ---- adding models and datasets ------------------------------------------------------------------------
    def _ensure_project(self) -> bool:
        if self.project is not None:
            return True
        if self.confirm("No project open", "Models and datasets belong to a project. Create a new project now?"):
            return self.new_project()
        return False

    def add_model(self, path: str | None = None, kind: str | None = None) -> AddModelDialog | None:
        if not self._ensure_project():
            return None
        dlg = AddModelDialog(self.project_path, self.manager.run_task, self, path=path or "", kind=kind)
        dlg.accepted.connect(lambda: self._model_added(dlg.result_value))
        dlg.open()
        return dlg

    def _model_added(self, added: Any) -> None:
        self.statusBar().showMessage(
            f"Added model {added.name}: {added.layers} modules, {added.extractable} with units. Tick layers to "
            f"extract in the module tree.", 15000)
        self.model_id = added.model_id
        self.refresh()

    def add_dataset(self, path: str | None = None) -> AddDatasetDialog | None:
        if not self._ensure_project():
            return None
        dlg = AddDatasetDialog(self.project_path, self.manager.run_task, self, path=path or "")
        dlg.accepted.connect(lambda: self._dataset_added(dlg.result_value))
        dlg.open()
        return dlg

    def _dataset_added(self, added: Any) -> None:
        self.statusBar().showMessage(
            f"Added dataset {added.name}: {added.images} images, {added.concepts} concepts, "
            f"masks: {'yes' if added.has_masks else 'no'}, {added.captions} captions", 15000)
        skipped = {k: v for k, v in (added.report or {}).items() if v}
        if skipped:
            log.info("dataset %s: while reading annotations: %s", added.name, skipped)
        self.refresh()

    # ---- runs ----------------------------------------------------------------------------------------------
    def train_translator(self, lm: str | None = None) -> JobHandle | None:
        """Queue a TExplain translator for the current model (its layer: the input of the final linear layer),
        on the project's own causal LM, or (when it has none) a folder asked for unless given; the texplain method
        then labels with it."""
        if self.project is None or self.project_path is None:
            return None
        if not lm and self.project.language_model(kind="lm") is None:
            lm = QFileDialog.getExistingDirectory(self, "Frozen causal language model folder (transformers format)",
                                                  str(self.project_path))
            if not lm:
                return None
        from app.language.translator import TranslatorJob, TranslatorOptions

        return self.submit(TranslatorJob(self.project_path, TranslatorOptions(lm=lm, device=self.prefs.device,
                                                                              model=self.model_id)))

    def submit(self, job: Any) -> JobHandle | None:
        sig = job_signature(job)
        for h in self.manager.active():
            if job_signature(h.job) == sig:
                self.statusBar().showMessage(f"'{job.title}' is already queued or running", 8000)
                return None
        handle = self.manager.submit(job)
        self.jobs_dock.show()
        self.jobs_dock.raise_()
        return handle

    def extract_checked(self, options: Any = None, dataset_id: int | None = None,
                        then_label: bool = False) -> JobHandle | None:
        """Queue an extraction of the ticked layers; with `options` given, without asking. With `then_label`,
        every method whose inputs the project has is queued on the layers once the extraction is done."""
        if self.project is None or self.model_id is None:
            return None
        layers = self.layer_tree.checked_layers()
        if not layers:
            self.statusBar().showMessage("Tick the layers to extract in the module tree first", 8000)
            return None
        datasets = self.project.datasets()
        if not datasets:
            self.report_error("No dataset", "Add a dataset to run the model on first (Project > Add dataset).")
            return None
        ray_address: str | None = None  # where the shards run; None: this machine
        shards: int | None = None
        if options is None:
            dlg = ExtractDialog(layers, datasets, self.prefs, self)
            if dlg.exec() != ExtractDialog.DialogCode.Accepted:
                return None
            options, dataset_id, then_label = dlg.options(), dlg.dataset_id(), dlg.then_label.isChecked()
            ray_address, shards = dlg.ray_address(), dlg.shard_count()
            self.prefs.batch_size, self.prefs.device = options.batch_size, options.device
            self.prefs.num_workers = options.num_workers
            self.prefs.save()
        from app.engine.extract import ExtractJob

        job = ExtractJob(self.project_path, options, model=self.model_id,
                         dataset=dataset_id if dataset_id is not None else datasets[0]["id"])
        if ray_address:
            from app.engine.distributed import RayExtractJob

            job = RayExtractJob(self.project_path, options, address=ray_address, shards=shards, model=self.model_id,
                                dataset=dataset_id if dataset_id is not None else datasets[0]["id"])
        handle = self.submit(job)
        if handle is not None and then_label:
            handle.on_done = lambda h, layers=list(options.layers): self._label_after_extraction(h, layers)
        return handle

    def _label_after_extraction(self, handle: JobHandle, layers: list[str]) -> list[JobHandle]:
        import labelers.base as lb

        if handle.state is not JobState.DONE or self.project is None:
            return []
        from app.workspace import methods_quick_first

        why = self.unavailable_methods()
        queued = []
        available = lb.available()
        methods = [(name, available[name]) for name in methods_quick_first()]
        for layer in layers:
            for name, cls in methods:
                if name in why.get(layer, {}) or lb.Input.CLIP_MODEL in cls.inputs:
                    continue  # missing inputs; CLIP-Dissect needs a model folder chosen in Label...
                h = self.submit_label(layer, name)
                if h is not None:
                    queued.append(h)
        return queued

    def unavailable_methods(self) -> dict[str, dict[str, str]]:
        """Per extracted layer, the methods whose inputs the project lacks, with the reason (app/engine/inputs.py,
        the same answer the CLI and the demo get)."""
        from app.engine.inputs import unavailable_methods

        if self.project is None or self.model_id is None:
            return {}
        return unavailable_methods(self.project, self.model_id)

    def label_dialog(self) -> None:
        import labelers.base as lb

        if self.project is None or self.model_id is None:
            return
        extracted = self.project.extracted_layers(self.model_id)
        if not extracted:
            self.report_error("Nothing to label", "Extract a layer first: tick it in the module tree, then Extract.")
            return
        current = next((r["name"] for r in extracted if r["id"] == self.layer_id), None)
        dlg = LabelDialog(lb.available(), [r["name"] for r in extracted], current, self.unavailable_methods(), self)
        if dlg.exec() != LabelDialog.DialogCode.Accepted:
            return
        for req in dlg.requests():
            self.submit_label(req["layer"], req["method"], req["params"], req["clip_model"])

    def submit_label(self, layer: str, method: str, params: dict[str, Any] | None = None,
                     clip_model: str | None = None) -> JobHandle | None:
        from app.engine.labeling import LabelJob

        if self.project_path is None:
            return None
        job = LabelJob(self.project_path, method, layer, params or {}, model=self.model_id, clip_model=clip_model,
                       device=self.prefs.device, num_workers=self.prefs.num_workers)
        return self.submit(job)

    def resume_run(self, run: Any) -> JobHandle | None:
        """Queue a stopped run again with the same inputs: the engine finds it by its key and continues it."""
        import dataclasses

        if self.project is None or self.project_path is None:
            return None
        try:
            if run.kind == "extract":
                from app.engine.extract import ExtractJob, ExtractOptions

                names = {f.name for f in dataclasses.fields(ExtractOptions)}
                params = {k: v for k, v in run.params.items() if k in names}
                params["quantiles"] = tuple(params.get("quantiles", ExtractOptions.quantiles))
                params["device"] = self.prefs.device  # where the run continues is this machine's choice
                job: Any = ExtractJob(self.project_path, ExtractOptions(**params), model=run.model_id,
                                      dataset=run.dataset_id)
            elif run.kind == "label":
                from app.engine.labeling import LabelJob

                layer = self.project.layer_by_id(run.layer_id)["name"]
                params = dict(run.params)
                clip = params.pop("clip_model", None)
                job = LabelJob(self.project_path, run.method, layer, params, model=run.model_id, clip_model=clip,
                               device=self.prefs.device, extraction_run=run.source_run_id)
            elif run.kind == "train_language":
                from app.language.train import TrainJob, TrainOptions

                names = {f.name for f in dataclasses.fields(TrainOptions)}
                opts = TrainOptions(**{k: v for k, v in run.params.items() if k in names})
                opts.device = self.prefs.device
                job = TrainJob(self.project_path, opts)
            elif run.kind == "texplain-train":
                from app.language.translator import TranslatorJob, TranslatorOptions

                names = {f.name for f in dataclasses.fields(TranslatorOptions)}
                params = {k: v for k, v in run.params.items() if k in names}
                params.update(device=self.prefs.device, model=run.model_id, dataset=run.dataset_id)
                job = TranslatorJob(self.project_path, TranslatorOptions(**params))
            else:
                self.report_error("Cannot resume", f"runs of kind {run.kind!r} are resumed from where they started")
                return None
        except (NeuronStudioError, TypeError, KeyError) as exc:
            self.report_error("Cannot resume the run", readable_error(exc))
            return None
        handle = self.submit(job)
        self.refresh()
        return handle

    def _on_job_finished(self, handle: JobHandle) -> None:
        self._update_jobs_status()
        if handle.state is JobState.DONE:
            self.statusBar().showMessage(f"{handle.title}: {describe_result(handle.result)}", 10000)
        elif handle.state is JobState.FAILED:
            self.statusBar().showMessage(f"{handle.title} failed: {handle.error}", 15000)
        kind = getattr(handle.job, "kind", None)
        if kind == "demo" and getattr(handle.job, "only", None) is None:  # the demo's setup (or the whole demo)
            if handle.state is JobState.DONE and handle.result is not None:
                self.open_project(handle.result.project)
                if getattr(handle.job, "setup_only", False):
                    self._queue_demo_steps(handle.job)
            return
        if self.project is None:
            return
        self.refresh()
        if (handle.state is JobState.DONE and kind in ("label", "demo") and getattr(handle.job, "layer", None)
                and self.layer_id is not None):
            layer = self.project.find_layer(self.model_id, handle.job.layer)
            if layer and layer["id"] == self.layer_id:
                self.show_layer(self.layer_id, keep_unit=self.units.current_unit())

    def build_demo(self) -> JobHandle | None:
        from platformdirs import user_data_dir

        out = Path(user_data_dir("neuron-studio", appauthor=False)) / "demo"
        return self.start_demo(out, device=self.prefs.device)

    def start_demo(self, out_dir: str | Path, n_images: int | None = None, epochs: int | None = None,
                   device: str = "auto", rebuild: bool = False, train: bool = False) -> JobHandle | None:
        """Build the demo in jobs: first the dataset, the model and the project (one job; the window then opens the
        project), then every other step of the demo as a job of its own, so results show as each one ends."""
        from app.demo.pipeline import DEFAULT_IMAGES, DemoJob

        job = DemoJob(Path(out_dir), n_images=n_images or DEFAULT_IMAGES, epochs=epochs, device=device,
                      rebuild=rebuild, train=train, setup_only=True)
        return self.submit(job)

    def _queue_demo_steps(self, setup: Any) -> list[JobHandle]:
        from app.demo.pipeline import DemoJob, demo_steps

        handles = []
        for step in demo_steps():
            if step.setup:
                continue
            job = DemoJob(setup.out_dir, n_images=setup.n_images, epochs=setup.epochs, device=setup.device,
                          seed=setup.seed, train=setup.train, only=[step.name])
            job.layer = step.layer  # type: ignore[attr-defined]  # a label step refreshes that layer's table
            h = self.submit(job)
            if h is not None:
                handles.append(h)
        return handles

    # ---- browsing ------------------------------------------------------------------------------------------
    def _layer_key(self) -> str:
        import hashlib

        digest = hashlib.sha1(str(Path(self.project_path or "").resolve()).encode()).hexdigest()[:16]
        return f"projects/{digest}/layer"

    def show_layer(self, layer_id: int, keep_unit: int | None = None) -> None:
        """Load a layer's unit table and extraction on the pool, then show them."""
        if self.reader is None:
            return
        if self.project is not None and self.project_path is not None:
            row = self.project.layer_by_id(layer_id)
            if row is not None:
                self.settings.setValue(self._layer_key(), row["name"])
        self._layer_token += 1
        token = self._layer_token
        self.layer_id = layer_id
        i = self.units.layer_combo.findData(layer_id)
        if i >= 0 and self.units.layer_combo.currentIndex() != i:
            self.units.layer_combo.blockSignals(True)
            self.units.layer_combo.setCurrentIndex(i)
            self.units.layer_combo.blockSignals(False)
        reader = self.reader

        def load() -> tuple[uidata.UnitTable, uidata.LayerView, Any]:
            from app.export.texplain import layer_words

            with reader.use() as project:
                return (uidata.load_unit_table(project, layer_id), uidata.LayerView.load(project, layer_id),
                        layer_words(project, layer_id))

        def got(value: tuple[uidata.UnitTable, uidata.LayerView, Any]) -> None:
            if token != self._layer_token:
                return
            self.table, self.layer_view, words = value
            self.texplain_view.set_data(words)
            self.unit_view.set_layer(self.layer_view)
            self.units.set_table(self.table, keep_unit=keep_unit)
            self.overview.set_data(uidata.layer_overview(self.table))
            self.layer_loaded.emit(layer_id)

        def failed(exc: BaseException) -> None:
            if token == self._layer_token:
                self.report_error("Cannot show the layer", readable_error(exc))

        call_in_pool(load, got, failed, owner=self)

    # ---- automatic versus human labels ---------------------------------------------------------------------
    def _run_compare_job(self, job: Any, on_done: Any) -> JobHandle:
        self.jobs_dock.show()
        return self.manager.submit(job, on_done=on_done)

    def compare_labels(self) -> Any:
        """Show the Compare tab and run the comparison in the background."""
        self.tabs.setCurrentWidget(self.compare_view)
        return self.compare_view.compute()

    def open_unit(self, layer: str, unit: int) -> None:
        """Show `unit` of `layer` (of the compared model) in the units browser and the unit view."""
        if self.project is None:
            return
        comp = self.compare_view.comparison
        try:
            model_id = self.project.model(comp.model if comp is not None else self.model_id)["id"]
            layer_id = self.project.layer(model_id, layer)["id"]
        except NeuronStudioError as exc:
            self.report_error("Cannot open the unit", str(exc))
            return
        if model_id != self.model_id:
            i = self.model_combo.findData(model_id)
            if i >= 0:
                self.model_combo.setCurrentIndex(i)
        self.tabs.setCurrentWidget(self.split)
        self.show_layer(layer_id, keep_unit=unit)

    def _on_unit(self, unit: int) -> None:
        if self.project is None or self.layer_id is None or self.table is None:
            return
        labels = uidata.unit_labels(self.project, self.layer_id, unit)
        k = int(unit)
        name = self.table.names[k] if 0 <= k < len(self.table.names) and self.table.units[k] == unit else ""
        self.unit_view.show_unit(unit, labels, name)
        self.texplain_view.show_unit(unit)
        self.unit_view.set_notes(uidata.unit_notes(self.project, self.layer_id, unit))

    def step_unit(self, delta: int) -> None:
        self.units.step(delta)

    def _focus_search(self) -> None:
        self.tabs.setCurrentWidget(self.split)
        self.units.search.setFocus()
        self.units.search.selectAll()

    # ---- drag and drop -------------------------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        if any(u.isLocalFile() and classify_drop(Path(u.toLocalFile())) for u in urls):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        paths = [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]
        event.acceptProposedAction()
        # Let the drop finish before a dialog opens (a modal dialog inside dropEvent blocks the drag source).
        QTimer.singleShot(0, lambda: self.handle_drop(paths))

    def handle_drop(self, paths: list[Path]) -> None:
        for path in paths:
            kind = classify_drop(path)
            if kind == "project":
                self.open_project(path)
            elif kind == "model":
                self.add_model(str(path), guess_model_kind(path))
            elif kind == "dataset":
                self.add_dataset(str(path))
            else:
                self.statusBar().showMessage(f"{path.name}: not a project, model or dataset", 8000)
            if kind in ("model", "dataset"):
                return  # one dialog at a time

    # ---- closing -------------------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        active = self.manager.active()
        if active:
            n = len(active)
            if not self.confirm("Runs are going", f"{n} run{'s are' if n > 1 else ' is'} still going or queued. "
                                                  "Cancel and quit? A cancelled run can be resumed later."):
                event.ignore()
                return
        if self.board is not None:
            self.board.close()
        self.statusBar().showMessage("Stopping runs...")
        self.manager.shutdown()
        wait_pool()
        self._save_layout()
        self.prefs.save()
        if self.project is not None:
            self.project.close()
            self.project = None
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        event.accept()


def run_app(project: str | Path | None = None, demo: dict[str, Any] | None = None) -> int:
    """Open the window (optionally on a project) and run until it closes; returns the exit code. `demo` (the
    arguments of `MainWindow.start_demo`) builds the demo in the window's jobs."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Neuron Studio")
    app.setOrganizationName("neuron-studio")
    app.setApplicationDisplayName("Neuron Studio")
    window = MainWindow()
    window.show()
    if project is not None:
        # Let the window paint first: opening a big project is then visible progress, not a blank start.
        QTimer.singleShot(0, lambda: window.open_project(project))
    if demo is not None:
        QTimer.singleShot(0, lambda: window.start_demo(**demo))
    return int(app.exec())
