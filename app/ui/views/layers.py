"""The layer picker: the model's module tree with each module's type, output shape and unit count. Modules with
units can be ticked for extraction; extracted ones are marked, and choosing one shows its units."""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QFont, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import QHeaderView, QLineEdit, QTreeView, QVBoxLayout, QWidget

from app.ui.theme import icon

LAYER_ID_ROLE = Qt.ItemDataRole.UserRole + 1
LAYER_NAME_ROLE = Qt.ItemDataRole.UserRole + 2
COLUMNS = ("Module", "Type", "Output shape", "Units")


def format_shape(shape: Any) -> str:
    return " x ".join(str(s) for s in shape) if shape else ""


class LayerTree(QWidget):
    layer_chosen = Signal(int)  # layer id of an extracted layer
    checks_changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = QStandardItemModel(0, len(COLUMNS), self)
        self.model.setHorizontalHeaderLabels(list(COLUMNS))
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setRecursiveFilteringEnabled(True)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter modules (name or type)")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self._on_filter)
        self.view = QTreeView()
        self.view.setModel(self.proxy)
        self.view.setUniformRowHeights(True)
        self.view.setAlternatingRowColors(True)
        header = self.view.header()
        header.setStretchLastSection(False)
        # module names first: they are what the user picks by; the type column gives way
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.ResizeToContents)
        header.setMinimumSectionSize(40)
        self.view.selectionModel().currentChanged.connect(self._on_current)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.filter)
        lay.addWidget(self.view, 1)
        self.items: dict[str, QStandardItem] = {}
        self.extracted: set[int] = set()
        self.model.itemChanged.connect(lambda _i: self.checks_changed.emit())

    def _on_filter(self, text: str) -> None:
        self.proxy.setFilterFixedString(text)
        if text:
            self.view.expandAll()

    def set_layers(self, rows: list[dict[str, Any]], extracted: set[int]) -> None:
        """`rows` are the project's layers rows of one model, in module order."""
        self.model.removeRows(0, self.model.rowCount())
        self.items = {}
        self.extracted = set(extracted)
        bold = QFont()
        bold.setBold(True)
        for r in rows:
            name = r["name"]
            parent_name, _, leaf = name.rpartition(".")
            parent = self._ensure(parent_name) if parent_name else self.model.invisibleRootItem()
            items = self._row_items(leaf or "(model output)", r)
            if r["units"] > 0:
                items[0].setCheckable(True)
                items[0].setCheckState(Qt.CheckState.Unchecked)
            if r["id"] in self.extracted:
                items[0].setIcon(icon("extracted", "#2e9d57"))
                items[0].setToolTip(f"{name}: extracted; select it to browse its units")
                for it in items:
                    it.setFont(bold)
            existing = self.items.get(name) if name else None
            if existing is not None:  # a placeholder made for a child: fill it in place
                prow = existing.parent() or self.model.invisibleRootItem()
                row = existing.row()
                for c, it in enumerate(items[1:], start=1):
                    prow.setChild(row, c, it)
                for role in (LAYER_ID_ROLE, LAYER_NAME_ROLE):
                    existing.setData(items[0].data(role), role)
                existing.setCheckable(items[0].isCheckable())
                if items[0].isCheckable():
                    existing.setCheckState(Qt.CheckState.Unchecked)
                existing.setIcon(items[0].icon())
                existing.setFont(items[0].font())
                existing.setToolTip(items[0].toolTip())
            else:
                parent.appendRow(items)
                self.items[name] = items[0]
        self.view.expandToDepth(0)

    def _row_items(self, leaf: str, r: dict[str, Any]) -> list[QStandardItem]:
        items = [QStandardItem(leaf), QStandardItem(r["type"]), QStandardItem(format_shape(r["shape"])),
                 QStandardItem(str(r["units"]) if r["units"] else "")]
        items[0].setData(r["id"], LAYER_ID_ROLE)
        items[0].setData(r["name"], LAYER_NAME_ROLE)
        items[0].setToolTip(r["name"])
        items[3].setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        for it in items:
            it.setEditable(False)
        return items

    def _ensure(self, name: str) -> QStandardItem:
        if name in self.items:
            return self.items[name]
        parent_name, _, leaf = name.rpartition(".")
        parent = self._ensure(parent_name) if parent_name else self.model.invisibleRootItem()
        items = [QStandardItem(leaf)] + [QStandardItem("") for _ in COLUMNS[1:]]
        for it in items:
            it.setEditable(False)
        items[0].setData(name, LAYER_NAME_ROLE)
        parent.appendRow(items)
        self.items[name] = items[0]
        return items[0]

    def _on_current(self, current: QModelIndex, _previous: QModelIndex) -> None:
        src = self.proxy.mapToSource(current.siblingAtColumn(0))
        item = self.model.itemFromIndex(src)
        if item is None:
            return
        layer_id = item.data(LAYER_ID_ROLE)
        if layer_id is not None and int(layer_id) in self.extracted:
            self.layer_chosen.emit(int(layer_id))

    def checked_layers(self) -> list[str]:
        return [name for name, it in self.items.items()
                if it.isCheckable() and it.checkState() == Qt.CheckState.Checked]

    def set_checked(self, names: list[str], checked: bool = True) -> None:
        state = Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked
        for n in names:
            it = self.items.get(n)
            if it is not None and it.isCheckable():
                it.setCheckState(state)

    def select_layer(self, layer_id: int) -> None:
        for it in self.items.values():
            if it.data(LAYER_ID_ROLE) == layer_id:
                idx = self.proxy.mapFromSource(it.index())
                self.view.setCurrentIndex(idx)
                self.view.scrollTo(idx)
                return
