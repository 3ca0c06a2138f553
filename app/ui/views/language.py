"""The Language models panel: the project's dual encoders, captioners, language models and sentence encoders, their
model cards and loss curves; buttons to train one (a run in a child process, like extraction) or add a folder
(checked in a child process before anything is written)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

log = logging.getLogger(__name__)

KIND_TEXT = {"clip": "dual encoder (CLIP)", "captioner": "exemplar-set captioner", "lm": "language model",
             "sentence": "sentence encoder"}


def add_folder_at(project_path: str, folder: str, kind: str, name: str | None = None) -> str:
    """Validate and register a folder in the project at `project_path` (run in a child process: it loads the
    model once to check it)."""
    from app.language.registry import add_folder
    from app.project.store import Project

    with Project.open(project_path) as project:
        info = add_folder(project, folder, kind, name=name or None)
    return f"added {info.kind} model {info.name}"


class TrainDialog(QDialog):
    """Which model to train, on which dataset, for how many steps."""

    def __init__(self, datasets: list[str], parent: QWidget | None = None):
        super().__init__(parent)
        from app.language.train import DEFAULT_STEPS

        self.setWindowTitle("Train a language model")
        self.defaults = DEFAULT_STEPS
        form = QFormLayout(self)
        self.kind = QComboBox()
        for k in ("clip", "captioner", "lm"):
            self.kind.addItem(KIND_TEXT[k], k)
        self.dataset = QComboBox()
        self.dataset.addItems(datasets)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.steps.setToolTip("Optimisation steps. The default is sized for a small project on two CPU cores; "
                              "the model card's held-out figures say whether more steps helped.")
        self.kind.currentIndexChanged.connect(self._kind_changed)
        self._kind_changed()
        form.addRow("Model", self.kind)
        form.addRow("Learn from dataset", self.dataset)
        form.addRow("Steps", self.steps)
        note = QLabel("Learns from the dataset's captions, its concept masks (regions named by their concept) and "
                      "the unit descriptions of the project. Runs in the background; cancel and resume from the "
                      "Runs panel.")
        note.setWordWrap(True)
        form.addRow(note)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _kind_changed(self) -> None:
        self.steps.setValue(self.defaults[self.kind.currentData()])

    def values(self) -> dict[str, Any]:
        return {"kind": self.kind.currentData(), "dataset": self.dataset.currentText() or None,
                "steps": self.steps.value()}


class DescriptionsDialog(QDialog):
    """Retrain the captioner with the project's human unit descriptions (naming board, imported MILANNOTATIONS):
    says how many units it learns from and how many are held out, then queues the captioner's training job."""

    def __init__(self, datasets: list[str], seen: int, heldout: int, parent: QWidget | None = None):
        super().__init__(parent)
        from app.language.train import DEFAULT_STEPS

        self.setWindowTitle("Retrain the captioner on the project's descriptions")
        form = QFormLayout(self)
        self.dataset = QComboBox()
        self.dataset.addItems(datasets)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.steps.setValue(DEFAULT_STEPS["captioner"])
        self.steps.setToolTip("Optimisation steps; a fifth of them are on the unit descriptions with their units' "
                              "masked exemplars, the rest on captions and concept regions.")
        form.addRow("Exemplars from dataset", self.dataset)
        form.addRow("Steps", self.steps)
        self.note = QLabel(
            f"{seen + heldout} units have a human description. The captioner learns from {seen} of them; "
            f"{heldout} are held out (a fixed 10% of units, the same on every run) and never trained on, so its "
            "held-out description perplexity, and any comparison on those units, scores text it has not seen. "
            "Only units extracted on the chosen dataset bring exemplars; the model card lists the units it used.")
        self.note.setWordWrap(True)
        form.addRow(self.note)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def values(self) -> dict[str, Any]:
        return {"kind": "captioner", "dataset": self.dataset.currentText() or None, "steps": self.steps.value()}


class AddFolderDialog(QDialog):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Add a language model folder")
        form = QFormLayout(self)
        self.kind = QComboBox()
        for k in ("clip", "captioner", "lm", "sentence"):
            self.kind.addItem(KIND_TEXT[k], k)
        row = QHBoxLayout()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("a folder written by save_pretrained (config, safetensors weights, tokenizer)")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        self.name = QLineEdit()
        self.name.setPlaceholderText("default: the folder's name")
        form.addRow("Kind", self.kind)
        form.addRow("Folder", row)
        form.addRow("Name", self.name)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Language model folder")
        if d:
            self.folder.setText(d)

    def values(self) -> dict[str, Any]:
        return {"kind": self.kind.currentData(), "folder": self.folder.text().strip(),
                "name": self.name.text().strip() or None}


class LanguagePanel(QWidget):
    """Lists the models; shows the selected one's card and loss curve. The window connects the two requests."""

    train_requested = Signal(dict)  # TrainDialog.values()
    add_requested = Signal(dict)  # AddFolderDialog.values()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        import pyqtgraph as pg

        self.datasets: list[str] = []
        self.models: list[Any] = []
        self.descriptions: tuple[int, int] = (0, 0)  # units with a human description: trained on, held out
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        top = QHBoxLayout()
        self.train_button = QPushButton("Train...")
        self.train_button.setToolTip("Train a dual encoder, a captioner or a language model on this project's text")
        self.train_button.clicked.connect(self._train)
        self.add_button = QPushButton("Add folder...")
        self.add_button.setToolTip("Use a local transformers folder (CLIP, captioner, GPT-2-like LM, sentence "
                                   "encoder); it is checked before anything is written")
        self.add_button.clicked.connect(self._add)
        self.retrain_button = QPushButton("Retrain captioner on descriptions...")
        self.retrain_button.setToolTip("Train the exemplar-set captioner again, now with the unit descriptions people "
                                       "wrote on the naming board or imported (held-out units never trained on)")
        self.retrain_button.clicked.connect(self._retrain)
        top.addWidget(self.train_button)
        top.addWidget(self.retrain_button)
        top.addWidget(self.add_button)
        top.addStretch(1)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addLayout(top)
        lay.addWidget(self.status)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["Name", "Kind", "Source", "In use", "Held-out"])
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._show_selected)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        below = QSplitter(Qt.Orientation.Horizontal)
        self.card = QTextBrowser()
        self.card.setOpenExternalLinks(False)
        self.plot = pg.PlotWidget()
        self.plot.setLabel("bottom", "step")
        self.plot.setLabel("left", "training loss")
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        self.curve = self.plot.plot([], [], pen=pg.mkPen("#3574f0", width=2))
        below.addWidget(self.card)
        below.addWidget(self.plot)
        below.setStretchFactor(0, 3)
        below.setStretchFactor(1, 2)
        split.addWidget(below)
        split.setStretchFactor(1, 2)
        lay.addWidget(split, 1)
        self.set_models([], [])

    def set_dark(self, dark: bool) -> None:
        from app.ui.theme import style_plot

        style_plot(self.plot, dark)

    def set_models(self, models: list[Any], datasets: list[str], descriptions: tuple[int, int] = (0, 0)) -> None:
        """`models` are app.language.registry.LanguageModelInfo; `descriptions` the number of described units
        the captioner would train on and hold out (app.language.data.description_split)."""
        keep = self.selected_name()
        self.models, self.datasets = list(models), list(datasets)
        self.descriptions = (int(descriptions[0]), int(descriptions[1]))
        self.train_button.setEnabled(bool(datasets))
        self.retrain_button.setEnabled(bool(datasets) and self.descriptions[0] > 0)
        self.retrain_button.setToolTip(
            f"Train the captioner again with the descriptions of {self.descriptions[0]} units "
            f"({self.descriptions[1]} more held out)" if self.descriptions[0] else
            "No unit has a human description to learn from yet: describe units on the naming board or import "
            "MILANNOTATIONS")
        self.table.setRowCount(len(self.models))
        for i, m in enumerate(self.models):
            held = m.card.get("heldout") or {}
            base = m.card.get("baselines") or {}
            text = "; ".join(f"{k.replace('_', ' ')} {v:.3g}" + (f" (baseline {base[k]:.3g})" if k in base else "")
                             for k, v in held.items() if isinstance(v, float))
            cells = [m.name, KIND_TEXT.get(m.kind, m.kind), m.source + ("" if m.exists else " (folder missing)"),
                     "yes" if m.in_use else "", text]
            for j, c in enumerate(cells):
                item = QTableWidgetItem(c)
                item.setToolTip(c)
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()
        kinds = {m.kind for m in self.models}
        missing = [KIND_TEXT[k] for k in ("clip", "captioner", "lm") if k not in kinds]
        self.status.setText(
            ("Missing: " + ", ".join(missing) + ". Methods that need them say so in the labeling dialog."
             if missing else "Labelers use the model marked 'in use' of each kind (the newest)."))
        row = next((i for i, m in enumerate(self.models) if m.name == keep), 0 if self.models else -1)
        if row >= 0:
            self.table.selectRow(row)
        self._show_selected()

    def selected_name(self) -> str | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows or rows[0].row() >= len(self.models):
            return None
        return self.models[rows[0].row()].name

    def _show_selected(self) -> None:
        name = self.selected_name()
        m = next((x for x in self.models if x.name == name), None)
        if m is None:
            self.card.setMarkdown("No language model yet. **Train...** learns one from this project's captions and "
                                  "concept masks; **Add folder...** uses a local transformers folder.")
            self.curve.setData([], [])
            return
        folder = Path(m.path)
        readme = folder / "README.md"
        try:
            text = readme.read_text(encoding="utf-8") if readme.exists() else ""
        except OSError as exc:
            text = f"The model card cannot be read: {exc}"
        if not text:
            text = f"# {m.name}\n\nA {KIND_TEXT.get(m.kind, m.kind)} brought from `{folder}`."
        if not m.exists:
            text = f"**The folder {folder} is gone**: put it back, or add the model again.\n\n" + text
        self.card.setMarkdown(text)
        curve: list = []
        try:
            curve = json.loads((folder / "card.json").read_text(encoding="utf-8")).get("loss_curve") or []
        except (OSError, ValueError):
            pass
        self.curve.setData([p[0] for p in curve], [p[1] for p in curve])
        self.plot.enableAutoRange()

    def _train(self) -> None:
        dlg = TrainDialog(self.datasets, self)
        if dlg.exec() == QDialog.DialogCode.Accepted:
            self.train_requested.emit(dlg.values())

    def _retrain(self) -> None:
        dlg = DescriptionsDialog(self.datasets, *self.descriptions, parent=self)
        if dlg.exec() == QDialog.DialogCode.Accepted:
            self.train_requested.emit(dlg.values())

    def _add(self) -> None:
        dlg = AddFolderDialog(self)
        if dlg.exec() == QDialog.DialogCode.Accepted and dlg.values()["folder"]:
            self.add_requested.emit(dlg.values())
