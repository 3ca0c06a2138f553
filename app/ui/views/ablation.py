"""The Ablation view: every "ablate" run of the project (`neuron-studio ablate`, or New ablation… here) as a
before/after table, overall and per class, with the paired bootstrap interval of the change, the predictions that
changed and the random-unit controls, and the per-class accuracies as bars.

The ablation itself (`app.audit.AblateJob`) runs as a job in a child process through the window's runner; this
view only lays out the stored result (`AblateResult.from_json` of the run's report).
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView, QButtonGroup, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout, QHBoxLayout,
    QHeaderView, QLabel, QLineEdit, QListWidget, QListWidgetItem, QPushButton, QRadioButton, QSpinBox, QSplitter,
    QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from app.audit import AblateOptions, AblateResult
from app.ui.theme import icon, style_plot

BEFORE_COLOUR = "#9a9a9a"
AFTER_COLOUR = "#4e79a7"
CONTROL_COLOUR = "#e15759"
MODES = (("zero", "zero: the units output 0"), ("mean", "mean: each unit outputs its dataset mean"),
         ("constant", "constant: the units output a value you give"))


def _pts(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.1f} pts"


def _acc(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.1%}"


def run_title(run: Any, result: AblateResult | None) -> str:
    """One line per run in the list: what was ablated where, and what it did."""
    if result is None:
        return f"run {run.id} · {run.status} · {(run.error or run.message or '').splitlines()[0][:60]}"
    what = f"query '{result.query}'" if result.query else "chosen units"
    return (f"run {run.id} · {result.layer} · {len(result.units)} units ({what}) · {result.dataset} · "
            f"{_acc(result.accuracy_before)} → {_acc(result.accuracy_after)}")


def summary_text(r: AblateResult) -> str:
    """The lines under the table: the paired interval, changed predictions and the controls, in words."""
    lo, hi = r.difference_ci
    lines = [f"Change {_pts(r.difference)}, 95% paired bootstrap interval {_pts(lo)} … {_pts(hi)} (images "
             f"resampled, each image's before and after kept together); {r.changed} of {r.images} predictions "
             "changed."]
    if r.control:
        c = np.asarray(r.control, dtype=np.float64)
        lines.append(f"Random-unit controls: {len(c)} × {len(r.units)} random units of {r.layer} ablated the same "
                     f"way give accuracy {_acc(c.min())} … {_acc(c.max())} (mean {_acc(c.mean())}); "
                     f"{r.control_as_large:.0%} of them change accuracy as much as this edit"
                     + (" — the edit's effect is not what any units would do." if r.control_as_large == 0 else
                        " — compare before reading the change as specific to these units."))
    caveat = r.control_caveat()
    if caveat:
        lines.append(caveat)
    return "\n".join(lines + [f"Note: {n}" for n in r.notes])


class AblateDialog(QDialog):
    """Layer, units (numbers or a query over labels and names), dataset and mode of a new ablation."""

    def __init__(self, layers: Sequence[tuple[str, int]], datasets: Sequence[str], parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("New ablation")
        self.options: AblateOptions | None = None
        self.layer = QComboBox()
        for name, units in layers:
            self.layer.addItem(f"{name} ({units} units)", name)
        self.by_units = QRadioButton("Units")
        self.by_query = QRadioButton("Query")
        self.by_query.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.by_units)
        group.addButton(self.by_query)
        self.units = QLineEdit()
        self.units.setPlaceholderText("e.g. 3, 17, 40")
        self.query = QLineEdit()
        self.query.setPlaceholderText("words matched in labels, names and descriptions, e.g. glyph")
        self.units.textEdited.connect(lambda _t: self.by_units.setChecked(True))
        self.query.textEdited.connect(lambda _t: self.by_query.setChecked(True))
        self.dataset = QComboBox()
        self.dataset.addItems(list(datasets))
        self.dataset.setToolTip("a labelled dataset (image folders per class): accuracy is measured on it")
        self.mode = QComboBox()
        for mode, text in MODES:
            self.mode.addItem(text, mode)
        self.constant = QDoubleSpinBox()
        self.constant.setRange(-1e6, 1e6)
        self.constant.setDecimals(3)
        self.constant.setEnabled(False)
        self.mode.currentIndexChanged.connect(lambda _i: self.constant.setEnabled(self.mode.currentData()
                                                                                   == "constant"))
        self.controls = QSpinBox()
        self.controls.setRange(0, 100)
        self.controls.setValue(AblateOptions.controls)
        self.controls.setToolTip("random-unit controls: as many random units of the layer, each set ablated once, so "
                                 "that a drop can be told from what any units would do (10 by default: one forward "
                                 "pass each)")
        self.error = QLabel()
        self.error.setStyleSheet("color: #c0392b;")
        self.error.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Layer", self.layer)
        form.addRow(self.by_query, self.query)
        form.addRow(self.by_units, self.units)
        form.addRow("Dataset", self.dataset)
        form.addRow("Mode", self.mode)
        form.addRow("Constant", self.constant)
        form.addRow("Controls", self.controls)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Ablate")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error)
        lay.addWidget(buttons)

    def read(self) -> AblateOptions:
        """The options as typed; a ValueError says what is wrong."""
        if self.layer.currentData() is None:
            raise ValueError("the project has no layer to ablate: add a model first")
        if not self.dataset.currentText():
            raise ValueError("the project has no dataset: add a labelled dataset (a folder per class)")
        units = query = None
        if self.by_units.isChecked():
            try:
                units = sorted({int(u) for u in self.units.text().replace(",", " ").split()})
            except ValueError:
                raise ValueError("units are whole numbers separated by commas, e.g. 3, 17, 40") from None
            if not units:
                raise ValueError("give the units to ablate, e.g. 3, 17, 40 (or a query)")
        else:
            query = self.query.text().strip()
            if not query:
                raise ValueError("give a query (words in the units' labels or names), or the units' numbers")
        return AblateOptions(layer=self.layer.currentData(), dataset=self.dataset.currentText(), units=units,
                             query=query, mode=self.mode.currentData(), constant=float(self.constant.value()),
                             controls=int(self.controls.value()))

    def accept(self) -> None:
        try:
            self.options = self.read()
        except ValueError as exc:
            self.error.setText(str(exc))
            return
        super().accept()


class AblationView(QWidget):
    """`run_job(job, on_done)` submits a job to the window's runner and calls `on_done(handle)` when it ends;
    `reload()` asks the window to re-read the project's runs (it calls `set_runs`)."""

    status = Signal(str)

    def __init__(self, run_job: Callable[[Any, Callable[[Any], None]], Any] | None = None,
                 reload: Callable[[], None] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        import pyqtgraph as pg

        self.run_job = run_job
        self.reload = reload
        self.project_path: str | None = None
        self.runs: list[tuple[Any, AblateResult | None]] = []
        self.result: AblateResult | None = None
        self.handle: Any = None

        self.new_button = QPushButton(icon("extract"), "New ablation…")
        self.new_button.setToolTip("switch units off and measure the classifier with and without them (a job)")
        self.new_button.clicked.connect(self.new_ablation)
        self.info = QLabel("Ablation runs of this project: `neuron-studio ablate`, or New ablation….")
        self.info.setWordWrap(True)
        self.info.setStyleSheet("color: gray;")
        self.run_list = QListWidget()
        self.run_list.setWordWrap(True)
        self.run_list.currentRowChanged.connect(self._show_row)
        self.header = QLabel()
        self.header.setTextFormat(Qt.TextFormat.RichText)
        self.header.setWordWrap(True)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["", "images", "before", "after", "change"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(False)
        self.table.setAlternatingRowColors(True)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setToolTip("accuracy on the dataset with the units (before) and without them (after), overall "
                              "and per class")
        self.stats = QLabel()
        self.stats.setWordWrap(True)
        self.stats.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.setYRange(0, 1)
        self.plot.setLabel("left", "accuracy")
        legend = self.plot.addLegend(offset=(10, 2))
        legend.setColumnCount(2)
        self.plot.getAxis("left").setTicks([[(v, f"{v:.0%}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]])
        self.controls_plot = pg.PlotWidget()
        self.controls_plot.setMenuEnabled(False)
        self.controls_plot.setMouseEnabled(x=False, y=False)
        self.controls_plot.hideButtons()
        self.controls_plot.setMaximumHeight(110)
        self.controls_plot.getAxis("left").setTicks([[]])
        self.controls_plot.getAxis("bottom").enableAutoSIPrefix(False)
        self.controls_plot.setLabel("bottom", "overall accuracy: before (grey), after (blue), random-unit controls "
                                              "(red)")
        self.plot_items: list[Any] = []

        top = QHBoxLayout()
        top.addWidget(self.new_button)
        top.addWidget(self.info, 1)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(QLabel("Runs"))
        ll.addWidget(self.run_list, 1)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.header)
        rl.addWidget(self.table)
        rl.addWidget(self.stats)
        rl.addWidget(self.controls_plot)
        self.plot.setMinimumHeight(170)
        rl.addWidget(self.plot, 1)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([280, 950])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(split, 1)
        self.set_project(None)

    # ---- project, runs, jobs -------------------------------------------------------------------------------
    def set_project(self, path: str | None) -> None:
        self.project_path = str(path) if path else None
        self.new_button.setEnabled(path is not None)
        if path is None:
            self.set_runs([])

    def set_dark(self, dark: bool) -> None:
        style_plot(self.plot, dark)
        style_plot(self.controls_plot, dark)

    def set_runs(self, runs: Sequence[Any]) -> None:
        """The project's "ablate" runs (RunInfo), newest first; the one shown stays shown."""
        keep = self.current_run_id()
        self.runs = []
        for run in sorted((r for r in runs if r.kind == "ablate"), key=lambda r: -r.id):
            result = AblateResult.from_json(run.report) if run.status == "done" and run.report else None
            self.runs.append((run, result))
        self.run_list.blockSignals(True)
        self.run_list.clear()
        for run, result in self.runs:
            item = QListWidgetItem(run_title(run, result))
            item.setToolTip(item.text())
            if result is None:
                item.setForeground(Qt.GlobalColor.gray)
            self.run_list.addItem(item)
        self.run_list.blockSignals(False)
        if not self.runs:
            self.info.setText("No ablation yet. New ablation… switches units off and measures the classifier "
                              "(or `neuron-studio ablate PROJECT --layer L --query WORDS --dataset D`).")
            self.show_result(None)
            return
        self.info.setText(f"{len(self.runs)} ablation run(s). Each compares accuracy with and without the units, "
                          "beside as many random units (the controls).")
        ids = [r.id for r, _ in self.runs]
        self.run_list.setCurrentRow(ids.index(keep) if keep in ids else 0)
        self._show_row(self.run_list.currentRow())

    def current_run_id(self) -> int | None:
        row = self.run_list.currentRow()
        return self.runs[row][0].id if 0 <= row < len(self.runs) else None

    def select_run(self, run_id: int) -> None:
        ids = [r.id for r, _ in self.runs]
        if run_id in ids:
            self.run_list.setCurrentRow(ids.index(run_id))

    def choices(self) -> tuple[list[tuple[str, int]], list[str]]:
        """The default model's layers and the project's datasets, for the dialog (two small queries)."""
        from app.project.store import Project

        with Project.open(self.project_path, readonly=True) as p:
            models = p.models()
            layers = [(r["name"], int(r["units"])) for r in p.layers(models[0]["id"])] if models else []
            datasets = [d["name"] for d in p.datasets()]
        return layers, datasets

    def new_ablation(self) -> Any:
        if self.project_path is None:
            return None
        layers, datasets = self.choices()
        dialog = AblateDialog(layers, datasets, self)
        if dialog.exec() != QDialog.DialogCode.Accepted or dialog.options is None:
            return None
        return self.start(dialog.options)

    def start(self, options: AblateOptions) -> Any:
        """Runs the ablation as a job; its run appears here when it ends."""
        from app.audit import AblateJob

        if self.project_path is None or self.run_job is None:
            return None
        self.new_button.setEnabled(False)
        self.info.setText(f"Ablating in {options.layer} (progress in the Runs panel)…")
        self.handle = self.run_job(AblateJob(self.project_path, options), self._job_done)
        return self.handle

    def _job_done(self, handle: Any) -> None:
        from app.ui.workers import JobState

        self.handle = None
        self.new_button.setEnabled(self.project_path is not None)
        if self.reload is not None:
            self.reload()
        if handle.state is JobState.DONE and handle.result is not None:
            self.select_run(handle.result.run_id)
            self.status.emit(f"ablation: accuracy {_acc(handle.result.accuracy_before)} → "
                             f"{_acc(handle.result.accuracy_after)}")
        elif handle.state is JobState.CANCELLED:
            self.info.setText("The ablation was cancelled.")
        else:
            self.info.setText(f"The ablation failed: {handle.error}")

    # ---- one result ----------------------------------------------------------------------------------------
    def _show_row(self, row: int) -> None:
        if 0 <= row < len(self.runs):
            run, result = self.runs[row]
            self.show_result(result, run)
        else:
            self.show_result(None)

    def show_result(self, r: AblateResult | None, run: Any = None) -> None:
        self.result = r
        if r is None:
            self.header.setText("" if run is None else
                                f"Run {run.id} is {html.escape(run.status)}: "
                                f"{html.escape(run.error or run.message or '')}")
            self.table.setRowCount(0)
            self.stats.setText("")
            self._draw(None)
            return
        how = f"found by the query <i>{html.escape(r.query)}</i>" if r.query else "chosen by number"
        shown = ", ".join(map(str, r.units[:40])) + (" …" if len(r.units) > 40 else "")
        self.header.setText(
            f"<b>{html.escape(r.model)} · {html.escape(r.layer)}</b>: {len(r.units)} unit(s) {how}, "
            f"{html.escape(r.mode)}-ablated, on <b>{html.escape(r.dataset)}</b> ({r.images} images)"
            f"{f', {r.unread} unreadable' if r.unread else ''}<br><span style='color: gray'>units: "
            f"{html.escape(shown)}</span>")
        rows = [("overall", r.images, r.accuracy_before, r.accuracy_after)]
        rows += [(c.name, c.n, c.accuracy_before, c.accuracy_after) for c in r.per_class]
        self.table.setRowCount(len(rows))
        for i, (name, n, before, after) in enumerate(rows):
            values = [name, str(n), _acc(before), _acc(after), _pts(after - before)]
            for col, v in enumerate(values):
                item = QTableWidgetItem(v)
                if col:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if i == 0:
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                if i == 0 and col == 4:
                    lo, hi = r.difference_ci
                    item.setText(f"{_pts(after - before)} [{_pts(lo)}, {_pts(hi)}]")
                    item.setToolTip("95% paired bootstrap interval over images")
                self.table.setItem(i, col, item)
        # as tall as its rows (up to about ten): the bars below take the rest
        shown_rows = min(len(rows), 10)
        self.table.setFixedHeight(self.table.horizontalHeader().height() + 22 * shown_rows + 4)
        self.stats.setText(summary_text(r))
        self._draw(r)

    def _draw(self, r: AblateResult | None) -> None:
        import pyqtgraph as pg

        self.plot.clear()
        self.controls_plot.clear()
        legend = self.plot.plotItem.legend
        if legend is not None:
            legend.clear()
        if r is None or not r.per_class:
            return
        xs = np.arange(len(r.per_class), dtype=np.float64)
        before = np.array([c.accuracy_before for c in r.per_class], dtype=np.float64)
        after = np.array([c.accuracy_after for c in r.per_class], dtype=np.float64)
        b = pg.BarGraphItem(x=xs - 0.2, height=np.nan_to_num(before), width=0.38, brush=BEFORE_COLOUR,
                            pen=pg.mkPen(None))
        a = pg.BarGraphItem(x=xs + 0.2, height=np.nan_to_num(after), width=0.38, brush=AFTER_COLOUR,
                            pen=pg.mkPen(None))
        self.plot.addItem(b)
        self.plot.addItem(a)
        if legend is not None:
            legend.addItem(b, "with the units (before)")
            legend.addItem(a, "units ablated (after)")
        self.plot.getAxis("bottom").setTicks([[(float(x), c.name) for x, c in zip(xs, r.per_class)]])
        self.plot.setXRange(-0.7, len(xs) - 0.3, padding=0)
        self.plot.setYRange(0, 1.3, padding=0)  # the legend sits above the bars, never on them
        self.plot_items = [b, a]
        # the overall accuracy against the controls: is the change outside what random units do?
        cp = self.controls_plot
        if r.control:
            c = np.asarray(r.control, dtype=np.float64)
            jitter = np.linspace(-0.25, 0.25, len(c)) if len(c) > 1 else np.zeros(1)
            cp.addItem(pg.ScatterPlotItem(x=c, y=jitter, size=8, brush=CONTROL_COLOUR, pen=pg.mkPen(None)))
        for value, colour in ((r.accuracy_before, BEFORE_COLOUR), (r.accuracy_after, AFTER_COLOUR)):
            cp.addItem(pg.InfiniteLine(pos=value, angle=90, pen=pg.mkPen(colour, width=3)))
        lo, hi = r.difference_ci
        if math.isfinite(lo) and math.isfinite(hi):
            band = pg.LinearRegionItem(values=(r.accuracy_before + lo, r.accuracy_before + hi), movable=False,
                                       brush=pg.mkBrush(78, 121, 167, 50), pen=pg.mkPen(None))
            cp.addItem(band)
        values = [r.accuracy_before, r.accuracy_after, *r.control]
        low, high = min(values), max(values)
        pad = max(0.02, (high - low) * 0.1)
        cp.setXRange(max(0.0, low - pad), min(1.0, high + pad), padding=0)
        cp.setYRange(-0.5, 0.5, padding=0)
