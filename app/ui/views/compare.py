"""The Compare view: for each unit, every method's label beside every annotator's name and description, coloured
by how much they agree; the summary (each method against each annotator, beside the baselines and the annotators'
ceiling) as bars with their 95% intervals.

The comparison itself (sentence encoder, BERTScore, bootstraps) runs as a job in a child process through the
window's job runner (`app.compare.CompareJob`); this view only lays out its result.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.compare import (
    AGREE_AT,
    FILTERS,
    CompareJob,
    CompareOptions,
    GridRow,
    ProjectComparison,
    grid_filter,
    unit_grid,
)
from app.ui.theme import icon, style_plot
from labelers.compare import KIND_BASELINE, KIND_CEILING, KIND_METHOD, MEASURES

MEASURE_TITLES = {"exact": "exact match", "cosine": "cosine (sentence)", "bertscore": "BERTScore F1"}
KIND_COLOURS = {KIND_METHOD: "#4e79a7", KIND_BASELINE: "#9a9a9a", KIND_CEILING: "#59a14f"}
SORT_ROLE = Qt.ItemDataRole.UserRole + 1


def agreement_colour(score: float) -> QColor | None:
    """Red (0) through amber to green (1), light enough for dark text; None for no score."""
    if score is None or not math.isfinite(score):
        return None
    s = max(0.0, min(1.0, score))
    hue = 120.0 * s  # 0 red, 60 yellow, 120 green
    return QColor.fromHsvF(hue / 360.0, 0.45, 0.97)


class GridModel(QAbstractTableModel):
    """Units x (methods, annotators), then the agreement columns."""

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self.methods: list[str] = []
        self.annotators: list[str] = []
        self.rows: list[GridRow] = []

    def set_grid(self, methods: list[str], annotators: list[str], rows: list[GridRow]) -> None:
        self.beginResetModel()
        self.methods, self.annotators, self.rows = methods, annotators, rows
        self.endResetModel()

    @property
    def text_columns(self) -> list[str]:
        return self.methods + self.annotators

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else 1 + len(self.text_columns) + 3

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.rows)

    def headerData(self, section: int, orientation: Qt.Orientation,  # noqa: N802
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal or role not in (Qt.ItemDataRole.DisplayRole,
                                                                     Qt.ItemDataRole.ToolTipRole):
            return None
        cols = self.text_columns
        if section == 0:
            return "Unit"
        if section <= len(cols):
            name = cols[section - 1]
            if role == Qt.ItemDataRole.ToolTipRole:
                return (f"method {name}: its label, coloured by agreement with the annotators" if section <= len(
                    self.methods) else f"annotator {name}: names and descriptions, coloured by agreement with the "
                                       "other annotators")
            return name
        extra = ("Methods agree", "Humans agree", "Disagreement")
        tips = ("mean agreement between the methods' labels", "mean agreement between the annotators",
                "1 - mean agreement of the methods' labels with the annotators' words")
        k = section - len(cols) - 1
        return tips[k] if role == Qt.ItemDataRole.ToolTipRole else extra[k]

    def _value(self, row: GridRow, col: int) -> tuple[str, float]:
        cols = self.text_columns
        if col == 0:
            return str(row.unit), float(row.unit)
        if col <= len(cols):
            name = cols[col - 1]
            return row.texts.get(name, ""), row.scores.get(name, math.nan)
        v = (row.methods_agree, row.humans_agree, row.disagreement)[col - len(cols) - 1]
        return ("" if not math.isfinite(v) else f"{v:.2f}"), v

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row = self.rows[index.row()]
        text, score = self._value(row, index.column())
        ncols = len(self.text_columns)
        if role == Qt.ItemDataRole.DisplayRole:
            return text
        if role == SORT_ROLE:
            if index.column() == 0:
                return row.unit
            if index.column() <= ncols:
                return text.lower()
            return score if math.isfinite(score) else -1.0
        if role == Qt.ItemDataRole.BackgroundRole and 0 < index.column() <= ncols:
            colour = agreement_colour(score)
            return QBrush(colour) if colour is not None else None
        if role == Qt.ItemDataRole.ForegroundRole and 0 < index.column() <= ncols and math.isfinite(score):
            return QBrush(QColor("#1d2126"))  # the cell colours are light in both themes
        if role == Qt.ItemDataRole.ToolTipRole and 0 < index.column() <= ncols:
            return f"{text}\nagreement {score:.3f}" if math.isfinite(score) else text
        if role == Qt.ItemDataRole.TextAlignmentRole and index.column() > ncols:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class GridFilter(QSortFilterProxyModel):
    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self.which = FILTERS[0]
        self.threshold = 0.5
        self.setSortRole(SORT_ROLE)

    def set_filter(self, which: str, threshold: float) -> None:
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.9: the filter changes between begin and end
            self.beginFilterChange()
            self.which, self.threshold = which, threshold
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self.which, self.threshold = which, threshold
            self.invalidateRowsFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex) -> bool:  # noqa: N802
        model = self.sourceModel()
        return grid_filter(model.rows[source_row], self.which, self.threshold)


class CompareView(QWidget):
    """`run_job(job, on_done)` submits a job to the window's runner and calls `on_done(handle)` when it ends."""

    unit_activated = Signal(str, int)  # layer name, unit
    status = Signal(str)

    def __init__(self, run_job: Callable[[Any, Callable[[Any], None]], Any] | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        import pyqtgraph as pg

        self.run_job = run_job
        self.project_path: str | None = None
        self.comparison: ProjectComparison | None = None
        self.handle: Any = None

        self.compute_button = QPushButton(icon("label"), "Compare")
        self.compute_button.setToolTip("Compare every method's labels with every annotator's names and descriptions "
                                       "(runs in the background)")
        self.compute_button.clicked.connect(self.compute)
        self.layer_combo = QComboBox()
        self.measure_combo = QComboBox()
        for m in MEASURES:
            self.measure_combo.addItem(MEASURE_TITLES[m], m)
        self.measure_combo.setCurrentIndex(MEASURES.index("bertscore"))
        self.annotator_combo = QComboBox()
        self.filter_combo = QComboBox()
        self.filter_combo.addItems(list(FILTERS))
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(AGREE_AT["bertscore"])
        self.threshold.setToolTip("two texts agree when their score on the chosen measure is at least this")
        self.info = QLabel("Compare automatic labels with human names: press Compare.")
        self.info.setWordWrap(True)
        self.info.setStyleSheet("color: gray;")

        top = QHBoxLayout()
        top.addWidget(self.compute_button)
        for text, w in (("Layer", self.layer_combo), ("Measure", self.measure_combo),
                        ("Show", self.filter_combo), ("agree at ≥", self.threshold),
                        ("Chart: annotator", self.annotator_combo)):
            top.addWidget(QLabel(text))
            top.addWidget(w)
        top.addStretch(1)

        self.model = GridModel(self)
        self.proxy = GridFilter(self)
        self.proxy.setSourceModel(self.model)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        # a click on the unit number, or a double click anywhere on its row, opens the unit
        self.table.doubleClicked.connect(lambda index: self.open_row(index.row()))
        self.table.clicked.connect(lambda index: self.open_row(index.row()) if index.column() == 0 else None)

        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.setXRange(0, 1)
        self.plot_items: list[Any] = []
        self.bar_labels: list[str] = []

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.plot)
        split.setSizes([430, 300])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.info)
        lay.addWidget(split, 1)

        self.layer_combo.currentIndexChanged.connect(lambda _i: self._refresh())
        self.measure_combo.currentIndexChanged.connect(self._measure_changed)
        self.annotator_combo.currentIndexChanged.connect(lambda _i: self._draw_chart())
        self.filter_combo.currentIndexChanged.connect(lambda _i: self._apply_filter())
        self.threshold.valueChanged.connect(lambda _v: self._apply_filter())

    # ---- project and job -----------------------------------------------------------------------------------
    def set_project(self, path: str | None) -> None:
        self.project_path = str(path) if path else None
        self.set_comparison(None)
        self.compute_button.setEnabled(path is not None)

    def set_dark(self, dark: bool) -> None:
        style_plot(self.plot, dark)

    def compute(self, options: CompareOptions | None = None) -> Any:
        if self.project_path is None or self.run_job is None:
            return None
        self.compute_button.setEnabled(False)
        self.info.setText("Comparing in the background (progress in the Runs panel)...")
        self.handle = self.run_job(CompareJob(self.project_path, options or CompareOptions()), self._job_done)
        if self.handle is None:  # the same comparison is already running
            self.compute_button.setEnabled(True)
        return self.handle

    def _job_done(self, handle: Any) -> None:
        self.compute_button.setEnabled(self.project_path is not None)
        self.handle = None
        if getattr(handle, "result", None) is not None and getattr(handle.state, "value", "") == "done":
            self.set_comparison(handle.result)
        elif getattr(handle, "error", None):
            self.info.setText(f"The comparison stopped: {handle.error}")
        else:
            self.info.setText("The comparison was cancelled.")

    # ---- showing a result ----------------------------------------------------------------------------------
    @property
    def measure(self) -> str:
        return self.measure_combo.currentData() or "bertscore"

    def set_comparison(self, comp: ProjectComparison | None) -> None:
        self.comparison = comp
        for combo in (self.layer_combo, self.annotator_combo):
            combo.blockSignals(True)
            combo.clear()
        if comp is not None:
            self.layer_combo.addItems(comp.layers)
            annotators = sorted({r.annotator for r in comp.result.rows})
            self.annotator_combo.addItems(annotators)
            res = comp.result
            enc = res.encoder or "none, exact match only"
            self.info.setText(
                f"Model {comp.model}: each method's top label against each annotator's names and descriptions "
                f"(sentence encoder: {enc}). Cells are coloured by agreement (red 0 → green 1); sort by "
                f"Disagreement to see where they part; double-click a unit to open it. Bars: means over units with "
                f"95% bootstrap intervals ({res.n_boot} resamples); grey bars are baselines (most frequent, "
                f"constant, shuffled ×{res.shuffles}), green the annotators' ceiling."
                + ("" if not comp.notes else " " + " ".join(comp.notes)))
        else:
            self.info.setText("Compare automatic labels with human names: press Compare.")
        for combo in (self.layer_combo, self.annotator_combo):
            combo.blockSignals(False)
        self._refresh()

    def _measure_changed(self, _i: int) -> None:
        self.threshold.blockSignals(True)
        self.threshold.setValue(AGREE_AT[self.measure])
        self.threshold.blockSignals(False)
        self._refresh()

    def _refresh(self) -> None:
        comp = self.comparison
        if comp is None or not self.layer_combo.currentText():
            self.model.set_grid([], [], [])
        else:
            self.model.set_grid(*unit_grid(comp, self.layer_combo.currentText(), self.measure))
            self.table.resizeColumnsToContents()
            for c in range(1, self.model.columnCount()):
                self.table.setColumnWidth(c, min(self.table.columnWidth(c), 220))
            self.sort_by_disagreement()
        self._apply_filter()
        self._draw_chart()

    def sort_by_disagreement(self) -> None:
        self.table.sortByColumn(self.model.columnCount() - 1, Qt.SortOrder.DescendingOrder)

    def _apply_filter(self) -> None:
        self.proxy.set_filter(self.filter_combo.currentText(), self.threshold.value())
        self.status.emit(f"{self.proxy.rowCount()} of {self.model.rowCount()} units shown")

    def visible_units(self) -> list[int]:
        return [int(self.proxy.index(r, 0).data(SORT_ROLE)) for r in range(self.proxy.rowCount())]

    def open_row(self, row: int) -> None:
        """Open the unit shown in (proxy) row `row`."""
        if self.comparison is None or not 0 <= row < self.proxy.rowCount():
            return
        unit = int(self.proxy.index(row, 0).data(SORT_ROLE))
        self.unit_activated.emit(self.layer_combo.currentText(), unit)

    # ---- summary chart -------------------------------------------------------------------------------------
    def chart_rows(self) -> list[Any]:
        comp = self.comparison
        if comp is None:
            return []
        layer, annotator = self.layer_combo.currentText(), self.annotator_combo.currentText()
        order = {KIND_METHOD: 0, KIND_CEILING: 1, KIND_BASELINE: 2}
        rows = [r for r in comp.result.rows if r.layer == layer and r.annotator == annotator]
        return sorted(rows, key=lambda r: (order.get(r.kind, 3), r.method))

    def _draw_chart(self) -> None:
        import numpy as np
        import pyqtgraph as pg

        for item in self.plot_items:
            self.plot.removeItem(item)
        self.plot_items = []
        rows = [r for r in self.chart_rows() if math.isfinite(r.measure(self.measure).value)]
        self.bar_labels = [r.method + (f" “{r.label}”" if r.label else "") for r in rows]
        if not rows:
            self.plot.setTitle("")
            return
        m = self.measure
        ys = np.arange(len(rows), dtype=float)[::-1]
        values = np.array([r.measure(m).value for r in rows])
        lows = np.array([r.measure(m).low for r in rows])
        highs = np.array([r.measure(m).high for r in rows])
        for kind, colour in KIND_COLOURS.items():
            sel = np.array([r.kind == kind for r in rows])
            if sel.any():
                bars = pg.BarGraphItem(x0=np.zeros(int(sel.sum())), y=ys[sel], height=0.6, width=values[sel],
                                       brush=colour, pen=pg.mkPen(None))
                self.plot.addItem(bars)
                self.plot_items.append(bars)
        err = pg.ErrorBarItem(x=values, y=ys, left=np.nan_to_num(values - lows), right=np.nan_to_num(highs - values),
                              beam=0.25, pen=pg.mkPen("#333333", width=1.5))
        self.plot.addItem(err)
        self.plot_items.append(err)
        axis = self.plot.getAxis("left")
        axis.setTicks([[(float(y), label[:34]) for y, label in zip(ys, self.bar_labels)]])
        self.plot.setXRange(0, 1, padding=0.02)
        self.plot.setYRange(-0.6, len(rows) - 0.4, padding=0)
        self.plot.setLabel("bottom", f"{MEASURE_TITLES[m]}, mean over units with 95% interval")
        self.plot.setTitle(f"{self.layer_combo.currentText()} · against {self.annotator_combo.currentText()}")
