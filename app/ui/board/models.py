"""List models over thumbnails: one row per item (a pool map id, or a unit's exemplar rank), pictures from the
shared `ThumbnailCache`, drag data in our own MIME type."""
from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from PySide6.QtCore import QAbstractListModel, QMimeData, QModelIndex, QPersistentModelIndex, Qt

from app.ui.board.thumbs import ThumbnailCache

MIME = "application/x-neuron-studio-maps"
ItemRole = Qt.ItemDataRole.UserRole + 1


class ThumbSource(Protocol):
    """What a model asks about its items."""

    cache: ThumbnailCache

    def thumbnail(self, item: int) -> Any: ...  # QPixmap (a placeholder while it is drawn)

    def caption(self, item: int) -> str: ...

    def tooltip(self, item: int) -> str: ...

    def item_of_key(self, key: Hashable) -> int | None: ...


def encode_maps(pool_id: int, map_ids: Sequence[int]) -> QMimeData:
    mime = QMimeData()
    mime.setData(MIME, json.dumps({"pool": pool_id, "maps": [int(m) for m in map_ids]}).encode())
    return mime


def decode_maps(mime: QMimeData) -> tuple[int, list[int]] | None:
    if not mime.hasFormat(MIME):
        return None
    try:
        data = json.loads(bytes(mime.data(MIME)).decode())
        return int(data["pool"]), [int(m) for m in data["maps"]]
    except (ValueError, KeyError, TypeError):
        return None


class ThumbListModel(QAbstractListModel):
    def __init__(self, source: ThumbSource, parent: Any = None, draggable: bool = True, pool_id: int = 0):
        super().__init__(parent)
        self.source = source
        self.draggable = draggable
        self.pool_id = pool_id
        self._items: list[int] = []
        self._row: dict[int, int] = {}
        source.cache.ready.connect(self._on_ready)

    # ---- content -------------------------------------------------------------------------------------------
    def items(self) -> list[int]:
        return list(self._items)

    def set_items(self, items: Sequence[int], pool_id: int | None = None) -> bool:
        items = [int(i) for i in items]
        if pool_id is not None:
            self.pool_id = pool_id
        if items == self._items:
            return False
        self.beginResetModel()
        self._items = items
        self._row = {m: r for r, m in enumerate(items)}
        self.endResetModel()
        return True

    def row_of(self, item: int) -> int | None:
        return self._row.get(item)

    def repaint_all(self) -> None:
        if self._items:
            self.dataChanged.emit(self.index(0), self.index(len(self._items) - 1))

    def _on_ready(self, key: Hashable) -> None:
        item = self.source.item_of_key(key)
        row = self._row.get(item) if item is not None else None
        if row is not None:
            idx = self.index(row)
            self.dataChanged.emit(idx, idx, [Qt.ItemDataRole.DecorationRole])

    # ---- Qt model ------------------------------------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._items)

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._items):
            return None
        item = self._items[index.row()]
        if role == Qt.ItemDataRole.DecorationRole:
            return self.source.thumbnail(item)
        if role == Qt.ItemDataRole.DisplayRole:
            return self.source.caption(item)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.source.tooltip(item)
        if role == ItemRole:
            return item
        return None

    def flags(self, index: QModelIndex | QPersistentModelIndex) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.ItemFlag.ItemIsDropEnabled if self.draggable else Qt.ItemFlag.NoItemFlags
        f = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemNeverHasChildren
        if self.draggable:
            f |= Qt.ItemFlag.ItemIsDragEnabled
        return f

    def mimeTypes(self) -> list[str]:
        return [MIME]

    def mimeData(self, indexes: Sequence[QModelIndex]) -> QMimeData:
        rows = sorted({i.row() for i in indexes if i.isValid()})
        return encode_maps(self.pool_id, [self._items[r] for r in rows])

    def supportedDragActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction | Qt.DropAction.CopyAction

    def supportedDropActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction | Qt.DropAction.CopyAction
