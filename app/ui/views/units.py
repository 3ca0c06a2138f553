"""The units browser: every unit of a layer in a model/view table (one row per unit, nothing per row but data),
sorted by numpy in the model and filtered by a QSortFilterProxyModel over precomputed lower-case label text, so
it stays fast at 10,000 units and more."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelectionModel,
    QModelIndex,
    QSortFilterProxyModel,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.formatting import format_p
from app.ui.data import UnitTable
from app.ui.theme import STATE_COLORS, icon

UNIT_ROLE = Qt.ItemDataRole.UserRole + 10


@dataclass(frozen=True)
class Column:
    kind: str  # unit | name | label | score | p
    method: str = ""

    @property
    def header(self) -> str:
        # score and p columns sit right of their method's label column; the tooltip names the method
        return {"unit": "Unit", "name": "Name", "label": self.method, "score": "score", "p": "p"}[self.kind]


def format_score(v: float) -> str:
    if not math.isfinite(v):
        return ""
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    return f"{v:.3f}"




class UnitsTableModel(QAbstractTableModel):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.table: UnitTable | None = None
        self.columns: list[Column] = []
        self.order = np.zeros(0, dtype=np.int64)  # row -> index into the table's arrays
        self.sort_column = 0
        self.sort_order = Qt.SortOrder.AscendingOrder
        self._good = QBrush(QColor(STATE_COLORS["done"]))
        self._bold = QFont()
        self._bold.setBold(True)

    def set_table(self, table: UnitTable | None) -> None:
        self.beginResetModel()
        self.table = table
        self.columns = []
        if table is not None:
            self.columns = [Column("unit"), Column("name")]
            # a method that labeled no unit of this layer gets no columns (the unit view and overview still show it)
            for m in (m for m in table.methods if m.has_label.any()):
                self.columns += [Column("label", m.method), Column("score", m.method)]
                if m.has_p:
                    self.columns.append(Column("p", m.method))
            self.order = np.arange(len(table), dtype=np.int64)
        else:
            self.order = np.zeros(0, dtype=np.int64)
        self.endResetModel()
        if table is not None and (self.sort_column != 0 or self.sort_order != Qt.SortOrder.AscendingOrder):
            if self.sort_column < len(self.columns):
                self.sort(self.sort_column, self.sort_order)

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() or self.table is None else len(self.order)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and 0 <= section < len(self.columns):
            col = self.columns[section]
            if role == Qt.ItemDataRole.DisplayRole:
                return col.header
            if role == Qt.ItemDataRole.ToolTipRole and col.method and self.table is not None:
                m = self.table.method(col.method)
                if m is not None:
                    what = {"label": "best label per unit", "score": "score of the best label",
                            "p": "p-value of the best label"}[col.kind]
                    return f"{col.method} (run {m.run_id}): {what}; green = {m.criterion_help}"
        return None

    def unit_at(self, row: int) -> int:
        assert self.table is not None
        return int(self.table.units[self.order[row]])

    def row_of_unit(self, unit: int) -> int | None:
        if self.table is None:
            return None
        hits = np.nonzero(self.table.units[self.order] == unit)[0]
        return int(hits[0]) if len(hits) else None

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or self.table is None:
            return None
        t = self.table
        k = int(self.order[index.row()])
        col = self.columns[index.column()]
        if role == UNIT_ROLE:
            return int(t.units[k])
        if role == Qt.ItemDataRole.ToolTipRole and col.kind == "name" and t.names[k]:
            return t.names[k]  # every annotator's name, whole, with its author
        if role == Qt.ItemDataRole.DisplayRole:
            if col.kind == "unit":
                return str(int(t.units[k]))
            if col.kind == "name":
                return t.names[k]
            m = t.method(col.method)
            if m is None:
                return None
            if col.kind == "label":
                return m.text[k]
            if col.kind == "score":
                return format_score(float(m.score[k]))
            return format_p(float(m.p_value[k]))
        if role == Qt.ItemDataRole.TextAlignmentRole:
            if col.kind in ("unit", "score", "p"):
                return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            return None
        if col.method and role in (Qt.ItemDataRole.ForegroundRole, Qt.ItemDataRole.ToolTipRole):
            m = t.method(col.method)
            if m is None:
                return None
            if role == Qt.ItemDataRole.ForegroundRole:
                return self._good if (m.criterion and m.interpretable[k] and col.kind == "label") else None
            if m.has_label[k]:
                tip = f"{m.text[k]}"
                if m.category[k]:
                    tip += f"  [{m.category[k]}]"
                tip += f"\nscore {format_score(float(m.score[k]))}"
                if math.isfinite(m.p_value[k]):
                    tip += f", p {format_p(float(m.p_value[k]))}"
                if m.criterion:
                    tip += "\ninterpretable" if m.interpretable[k] else "\nnot interpretable"
                return tip
        if role == Qt.ItemDataRole.FontRole and col.kind == "name" and t.names[k]:
            return self._bold
        return None

    def _sort_keys(self, column: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, missing) for a column, index-aligned with the table arrays; missing values sort last."""
        assert self.table is not None
        t = self.table
        col = self.columns[column]
        if col.kind == "unit":
            return t.units, np.zeros(len(t), dtype=bool)
        if col.kind == "name":
            vals = np.asarray([s.lower() for s in t.names], dtype=str) if len(t) else np.zeros(0, dtype=str)
            return vals, vals == ""
        m = t.method(col.method)
        assert m is not None
        if col.kind == "label":
            vals = np.asarray([s.lower() for s in m.text], dtype=str) if len(t) else np.zeros(0, dtype=str)
            return vals, vals == ""
        vals = m.score if col.kind == "score" else m.p_value
        return vals, ~np.isfinite(vals)

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        self.sort_column, self.sort_order = column, order
        if self.table is None or not 0 <= column < len(self.columns):
            return
        vals, missing = self._sort_keys(column)
        if vals.dtype.kind in "US":
            # rank strings once so that descending order is a negation of integers
            _, ranks = np.unique(vals, return_inverse=True)
            key = ranks.astype(np.float64)
        else:
            key = np.where(missing, 0.0, vals.astype(np.float64))
        if order == Qt.SortOrder.DescendingOrder:
            key = -key
        # primary: missing last; secondary: the key; ties keep unit order (lexsort is stable)
        new_order = np.lexsort((np.arange(len(key)), key, missing))
        self.layoutAboutToBeChanged.emit()
        old_order = self.order
        persistent = self.persistentIndexList()
        inverse = np.empty_like(new_order)
        inverse[new_order] = np.arange(len(new_order))
        self.order = new_order.astype(np.int64)
        new_indexes = []
        for idx in persistent:
            if idx.isValid() and idx.row() < len(old_order):
                new_indexes.append(self.index(int(inverse[old_order[idx.row()]]), idx.column()))
            else:
                new_indexes.append(QModelIndex())
        self.changePersistentIndexList(persistent, new_indexes)
        self.layoutChanged.emit()


class UnitsProxy(QSortFilterProxyModel):
    """Filters by a text search across every label of every method and the unit's name (all words must match, as
    words: see `UnitTable.matching`).
    Sorting is handed to the source model, where numpy does it."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._accept: np.ndarray | None = None  # bool per table index; None = accept all
        self.search = ""

    def src(self) -> UnitsTableModel:
        return self.sourceModel()  # type: ignore[return-value]

    def set_search(self, text: str) -> None:
        search = text.strip()
        table = self.src().table
        if not search or table is None:
            accept = None
        else:
            accept = table.matching(search)
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.9: the filter changes between begin and end
            self.beginFilterChange()
            self.search, self._accept = search, accept
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self.search, self._accept = search, accept
            self.invalidateRowsFilter()

    def refresh_search(self) -> None:
        self.set_search(self.search)

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex) -> bool:  # noqa: N802
        if self._accept is None:
            return True
        return bool(self._accept[self.src().order[source_row]])

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        self.src().sort(column, order)


class UnitsBrowser(QWidget):
    unit_selected = Signal(int)
    layer_changed = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = UnitsTableModel(self)
        self.proxy = UnitsProxy(self)
        self.proxy.setSourceModel(self.model)
        self.layer_combo = QComboBox()
        self.layer_combo.setMinimumWidth(160)
        self.layer_combo.currentIndexChanged.connect(self._on_layer)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search labels and names (whole words, all must match)")
        self.search.setToolTip("Words match whole words of any label or name, plurals included (circles finds "
                               "circle). A formula's negated atoms match only NOT word (or -word): star does "
                               "not find 'circle AND NOT star'.")
        self.search.setClearButtonEnabled(True)
        self.search.addAction(icon("search"), QLineEdit.ActionPosition.LeadingPosition)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self._apply_search)
        self.search.textChanged.connect(lambda _t: self._debounce.start())
        self.count = QLabel("")
        self.view = QTableView()
        self.view.setModel(self.proxy)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setSortingEnabled(True)
        self.view.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.view.setAlternatingRowColors(True)
        self.view.setWordWrap(False)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.view.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        self.view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.view.horizontalHeader().setHighlightSections(False)
        self.view.selectionModel().currentRowChanged.connect(self._on_current)
        head = QHBoxLayout()
        head.addWidget(QLabel("Layer"))
        head.addWidget(self.layer_combo)
        head.addWidget(self.search, 1)
        head.addWidget(self.count)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(head)
        lay.addWidget(self.view, 1)

    # ---- layers --------------------------------------------------------------------------------------------
    def set_layers(self, layers: list[tuple[int, str, int]], current: int | None = None) -> None:
        """(layer id, name, units) of the extracted layers."""
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for lid, name, units in layers:
            self.layer_combo.addItem(f"{name}  ({units} units)", lid)
        if current is not None:
            i = self.layer_combo.findData(current)
            if i >= 0:
                self.layer_combo.setCurrentIndex(i)
        self.layer_combo.blockSignals(False)

    def current_layer(self) -> int | None:
        return self.layer_combo.currentData()

    def _on_layer(self, _i: int) -> None:
        lid = self.layer_combo.currentData()
        if lid is not None:
            self.layer_changed.emit(int(lid))

    # ---- table ---------------------------------------------------------------------------------------------
    def set_table(self, table: UnitTable | None, keep_unit: int | None = None) -> None:
        self.model.set_table(table)
        self.proxy.refresh_search()
        header = self.view.horizontalHeader()
        widths = {"unit": 52, "name": 130, "label": 170, "score": 66, "p": 64}
        for c, col in enumerate(self.model.columns):
            header.resizeSection(c, widths[col.kind])
        # the Name column only when someone named a unit of this layer
        has_names = table is not None and any(table.names)
        for c, col in enumerate(self.model.columns):
            if col.kind == "name":
                self.view.setColumnHidden(c, not has_names)
        self.view.horizontalHeader().setSortIndicator(self.model.sort_column, self.model.sort_order)
        self._update_count()
        if table is not None and len(table):
            target = keep_unit if keep_unit is not None else int(table.units[0])
            if not self.select_unit(target):
                self.select_row(0)

    def _apply_search(self) -> None:
        current = self.current_unit()
        self.proxy.set_search(self.search.text())
        self._update_count()
        if current is not None and not self.select_unit(current) and self.proxy.rowCount():
            self.select_row(0)

    def _update_count(self) -> None:
        total = self.model.rowCount()
        shown = self.proxy.rowCount()
        self.count.setText(f"{shown} of {total} units" if shown != total else f"{total} units")

    def _on_current(self, current: QModelIndex, _prev: QModelIndex) -> None:
        if current.isValid():
            self.unit_selected.emit(int(self.proxy.data(current, UNIT_ROLE)))

    def current_unit(self) -> int | None:
        idx = self.view.currentIndex()
        return int(self.proxy.data(idx, UNIT_ROLE)) if idx.isValid() else None

    def select_row(self, row: int) -> bool:
        if not 0 <= row < self.proxy.rowCount():
            return False
        idx = self.proxy.index(row, 0)
        self.view.selectionModel().setCurrentIndex(
            idx, QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows)
        self.view.scrollTo(idx)
        return True

    def select_unit(self, unit: int) -> bool:
        row = self.model.row_of_unit(unit)
        if row is None:
            return False
        pidx = self.proxy.mapFromSource(self.model.index(row, 0))
        if not pidx.isValid():
            return False
        return self.select_row(pidx.row())

    def step(self, delta: int) -> bool:
        """Next (+1) or previous (-1) unit in the table's current order and filter."""
        idx = self.view.currentIndex()
        row = idx.row() + delta if idx.isValid() else 0
        return self.select_row(max(0, min(self.proxy.rowCount() - 1, row))) if self.proxy.rowCount() else False

    def visible_units(self) -> list[int]:
        return [int(self.proxy.data(self.proxy.index(r, 0), UNIT_ROLE)) for r in range(self.proxy.rowCount())]

