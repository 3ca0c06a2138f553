"""The board's widgets: a thumbnail grid (QListView in icon mode, uniform sizes) that drags and drops maps, the
group panel around it, the pool panel with pages, the drop zone that makes a new group, and a flow layout."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QEvent, QPoint, QRect, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QDrag, QKeyEvent, QMouseEvent, QPainter, QPixmap, QWheelEvent
from PySide6.QtWidgets import (
    QAbstractItemView, QFrame, QHBoxLayout, QLabel, QLayout, QLayoutItem, QLineEdit, QListView, QMenu,
    QSizePolicy, QToolButton, QVBoxLayout, QWidget, QWidgetItem,
)

from app.ui.board.models import ItemRole, ThumbListModel, decode_maps

CAPTION_HEIGHT = 16


class FlowLayout(QLayout):
    """Children left to right, wrapping (the Qt flow layout example)."""

    def __init__(self, parent: QWidget | None = None, spacing: int = 8):
        super().__init__(parent)
        self._items: list[QLayoutItem] = []
        self._spacing = spacing
        self.spacing_px = spacing
        self.setContentsMargins(6, 6, 6, 6)

    def addItem(self, item: QLayoutItem) -> None:
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int) -> QLayoutItem | None:
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int) -> QLayoutItem | None:
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def insert_widget(self, index: int, widget: QWidget) -> None:
        self.addChildWidget(widget)
        self._items.insert(index, QWidgetItem(widget))
        self.invalidate()

    def expandingDirections(self) -> Qt.Orientation:
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._do_layout(QRect(0, 0, width, 0), True)

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._do_layout(rect, False)

    def sizeHint(self) -> QSize:
        return self.minimumSize()

    def minimumSize(self) -> QSize:
        size = QSize()
        for item in self._items:
            size = size.expandedTo(item.minimumSize())
        m = self.contentsMargins()
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    def _do_layout(self, rect: QRect, test_only: bool) -> int:
        m = self.contentsMargins()
        area = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        x, y, line_height = area.x(), area.y(), 0
        for item in self._items:
            if item.widget() is not None and item.widget().isHidden():
                continue
            hint = item.sizeHint()
            next_x = x + hint.width() + self._spacing
            if next_x - self._spacing > area.right() and line_height > 0:
                x = area.x()
                y += line_height + self._spacing
                next_x = x + hint.width() + self._spacing
                line_height = 0
            if not test_only:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x = next_x
            line_height = max(line_height, hint.height())
        return y + line_height - rect.y() + m.bottom()


class MapListView(QListView):
    """A grid of thumbnails. Keys go to the board first (number keys, N, Delete...); maps dropped here go to
    `drop_target` through `on_drop(map_ids, target)`."""

    plain_press = Signal(object)  # self: a click without Ctrl/Shift, other grids drop their selection
    current_item = Signal(int)

    def __init__(self, board: Any, drop_target: Callable[[], Any] | None, parent: QWidget | None = None):
        super().__init__(parent)
        self.board = board
        self.drop_target = drop_target
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setMovement(QListView.Movement.Static)  # after IconMode, which sets Free
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setFlow(QListView.Flow.LeftToRight)
        self.setWrapping(True)
        self.setUniformItemSizes(True)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setSelectionRectVisible(True)
        self.setDragEnabled(True)
        self.setAcceptDrops(drop_target is not None)
        self.viewport().setAcceptDrops(drop_target is not None)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DragDrop)
        self.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.setDropIndicatorShown(False)
        self.setSpacing(2)
        self.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def set_icon_size(self, size: int) -> None:
        self.setIconSize(QSize(size, size))
        self.setGridSize(QSize(size + 8, size + CAPTION_HEIGHT + 6))

    def selected_items(self) -> list[int]:
        rows = sorted(i.row() for i in self.selectionModel().selectedIndexes())
        return [self.model().index(r, 0).data(ItemRole) for r in rows]

    def select_items(self, items: list[int]) -> None:
        model = self.model()
        sel = self.selectionModel()
        sel.clearSelection()
        for it in items:
            row = model.row_of(it) if isinstance(model, ThumbListModel) else None
            if row is not None:
                idx = model.index(row)
                sel.select(idx, sel.SelectionFlag.Select)
                sel.setCurrentIndex(idx, sel.SelectionFlag.NoUpdate)

    # ---- mouse and keys ------------------------------------------------------------------------------------
    def mousePressEvent(self, event: QMouseEvent) -> None:
        if not event.modifiers() & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier):
            self.plain_press.emit(self)
        super().mousePressEvent(event)
        idx = self.indexAt(event.position().toPoint())
        if idx.isValid():
            self.current_item.emit(int(idx.data(ItemRole)))

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if self.board is not None and self.board.handle_key(event):
            event.accept()
            return
        super().keyPressEvent(event)

    def currentChanged(self, current: Any, previous: Any) -> None:
        super().currentChanged(current, previous)
        if current.isValid():
            self.current_item.emit(int(current.data(ItemRole)))

    def wheelEvent(self, event: QWheelEvent) -> None:
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier and self.board is not None:
            self.board.zoom_step(1 if event.angleDelta().y() > 0 else -1)
            event.accept()
            return
        super().wheelEvent(event)

    # ---- drag and drop -------------------------------------------------------------------------------------
    def startDrag(self, supported: Qt.DropAction) -> None:
        indexes = self.selectionModel().selectedIndexes()
        if not indexes:
            return
        drag = QDrag(self)
        drag.setMimeData(self.model().mimeData(indexes))
        drag.setPixmap(self._drag_pixmap(indexes))
        # Copy: the source never removes rows itself; the board reloads what the database says after the drop.
        drag.exec(Qt.DropAction.CopyAction | Qt.DropAction.MoveAction, Qt.DropAction.MoveAction)

    def _drag_pixmap(self, indexes: list[Any]) -> QPixmap:
        icon = indexes[0].data(Qt.ItemDataRole.DecorationRole)
        side = min(72, self.iconSize().width())
        pix = QPixmap(side + 12, side + 12)
        pix.fill(Qt.GlobalColor.transparent)
        p = QPainter(pix)
        if isinstance(icon, QPixmap):
            p.drawPixmap(0, 0, icon.scaled(side, side))
        if len(indexes) > 1:
            p.setBrush(QColor(220, 60, 60))
            p.setPen(Qt.PenStyle.NoPen)
            p.drawEllipse(side - 12, side - 12, 24, 24)
            p.setPen(QColor("white"))
            p.drawText(QRect(side - 12, side - 12, 24, 24), Qt.AlignmentFlag.AlignCenter, str(len(indexes)))
        p.end()
        return pix

    def dragEnterEvent(self, event: Any) -> None:
        if self.drop_target is not None and decode_maps(event.mimeData()) is not None:
            event.setDropAction(Qt.DropAction.MoveAction)
            event.accept()
        else:
            event.ignore()

    def dragMoveEvent(self, event: Any) -> None:
        self.dragEnterEvent(event)

    def dropEvent(self, event: Any) -> None:
        data = decode_maps(event.mimeData())
        if self.drop_target is None or data is None:
            event.ignore()
            return
        event.setDropAction(Qt.DropAction.CopyAction)
        event.accept()
        self.board.drop_maps(data[0], data[1], self.drop_target())


class DropFrame(QFrame):
    """A frame that takes dropped maps (group headers and the new-group zone)."""

    def __init__(self, board: Any, drop_target: Callable[[], Any], parent: QWidget | None = None):
        super().__init__(parent)
        self.board = board
        self.drop_target = drop_target
        self.setAcceptDrops(True)

    def dragEnterEvent(self, event: Any) -> None:
        if decode_maps(event.mimeData()) is not None:
            event.setDropAction(Qt.DropAction.MoveAction)
            event.accept()
            self.setProperty("dropHover", True)
            self.style().polish(self)
        else:
            event.ignore()

    def dragMoveEvent(self, event: Any) -> None:
        self.dragEnterEvent(event)

    def dragLeaveEvent(self, event: Any) -> None:
        self.setProperty("dropHover", False)
        self.style().polish(self)

    def dropEvent(self, event: Any) -> None:
        self.setProperty("dropHover", False)
        self.style().polish(self)
        data = decode_maps(event.mimeData())
        if data is None:
            event.ignore()
            return
        event.setDropAction(Qt.DropAction.CopyAction)
        event.accept()
        self.board.drop_maps(data[0], data[1], self.drop_target())

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if not self.board.handle_key(event):
            super().keyPressEvent(event)


class GroupPanel(DropFrame):
    """A labeled panel of thumbnails: number, name, member count, and a menu.

    A click on the header selects the group (Ctrl+click adds it to the selection), so M can merge the selected
    groups; the name is edited only on purpose (double-click, F2, the menu, or right after N), is saved as you
    type, and Escape puts back the name it had when the edit began."""

    COLUMNS = 3  # thumbnails per row when the board is not told otherwise (`set_columns`)
    selection_changed = Signal()

    def __init__(self, board: Any, gid: int, unclear: bool, parent: QWidget | None = None):
        super().__init__(board, lambda: self.gid, parent)
        self.gid = gid
        self.unclear = unclear
        self.setObjectName("unclearPanel" if unclear else "groupPanel")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.columns = self.COLUMNS
        self.number = QLabel()
        self.number.setObjectName("groupNumber")
        self.number.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.number.setFixedWidth(22)
        self.name = QLineEdit()
        self.name.setObjectName("groupName")
        self.name.setFrame(False)
        self.name.setReadOnly(True)
        self.name.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.name.setCursor(Qt.CursorShape.PointingHandCursor)
        self.name.setPlaceholderText("name this concept")
        self.name.setToolTip("click to select this group (Ctrl+click: several, then M merges them); "
                             "double-click or F2 to rename")
        self.selected = False
        self._name_before_edit: str | None = None
        self.setFocusPolicy(Qt.FocusPolicy.ClickFocus)
        self.count = QLabel()
        self.count.setObjectName("groupCount")
        self.menu_button = QToolButton()
        self.menu_button.setText("⋯")
        self.menu_button.setAutoRaise(True)
        self.menu_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.menu = QMenu(self)
        self.menu.aboutToShow.connect(self._fill_menu)
        self.menu_button.setMenu(self.menu)
        head = QHBoxLayout()
        head.setContentsMargins(4, 2, 2, 0)
        head.setSpacing(4)
        head.addWidget(self.number)
        head.addWidget(self.name, 1)
        head.addWidget(self.count)
        head.addWidget(self.menu_button)
        self.model = ThumbListModel(board, self, pool_id=board.pool_id)
        self.view = MapListView(board, lambda: self.gid)
        self.view.setModel(self.model)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(3, 3, 3, 3)
        lay.setSpacing(2)
        lay.addLayout(head)
        lay.addWidget(self.view)
        self._committed_name = ""
        self._name_timer = QTimer(self)
        self._name_timer.setSingleShot(True)
        self._name_timer.setInterval(700)  # saved a moment after typing stops: a kill loses at most that
        self._name_timer.timeout.connect(self.commit_name)
        self.name.textEdited.connect(lambda _t: self._name_timer.start())
        self.name.editingFinished.connect(self.commit_name)
        self.name.returnPressed.connect(self._rename_done)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        for w in (self.name, self.number, self.count):
            w.installEventFilter(self)

    # ---- selecting the group and renaming it ---------------------------------------------------------------
    def eventFilter(self, obj: Any, event: Any) -> bool:
        kind = event.type()
        editing = self._name_before_edit is not None
        if obj is self.name and editing:
            if kind == QEvent.Type.KeyPress and event.key() == Qt.Key.Key_Escape:
                self.cancel_rename()
                return True
            if kind == QEvent.Type.FocusOut:
                self.commit_name()
                self._end_rename()
            return False
        if kind == QEvent.Type.MouseButtonDblClick and not self.unclear:
            self.start_rename()
            return True
        if kind == QEvent.Type.MouseButtonPress and event.button() == Qt.MouseButton.LeftButton:
            additive = bool(event.modifiers() & (Qt.KeyboardModifier.ControlModifier
                                                 | Qt.KeyboardModifier.ShiftModifier))
            self.board.select_group(self.gid, additive)
            self.setFocus()
            return True
        return False

    def set_selected(self, on: bool) -> None:
        if on != self.selected:
            self.selected = on
            self.setProperty("groupSelected", on)
            self.style().unpolish(self)
            self.style().polish(self)
            self.selection_changed.emit()

    def start_rename(self) -> None:
        if self.unclear:
            return
        if self._name_before_edit is None:
            self._name_before_edit = self._committed_name
        self.name.setReadOnly(False)
        self.name.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.name.setCursor(Qt.CursorShape.IBeamCursor)
        self.name.setFocus()
        self.name.selectAll()

    def _end_rename(self) -> None:
        self._name_before_edit = None
        self.name.setReadOnly(True)
        self.name.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.name.setCursor(Qt.CursorShape.PointingHandCursor)
        self.name.setCursorPosition(0)

    def cancel_rename(self) -> None:
        """Escape: the name goes back to what it was when the edit began (undoing what was saved meanwhile)."""
        before = self._name_before_edit
        self._name_timer.stop()
        self._end_rename()
        if before is None:
            return
        self.name.setText(before)
        if before != self._committed_name:
            self._committed_name = before
            self.board.rename_group(self.gid, before)
        self.view.setFocus()

    def _rename_done(self) -> None:
        self.commit_name()
        self._end_rename()
        self.view.setFocus()

    def set_group(self, name: str, number: int | None, members: list[int], pool_id: int) -> None:
        self.number.setText("0" if self.unclear else (str(number) if number is not None and number <= 9 else ""))
        self.number.setToolTip("press this number to move the selection here" if self.number.text() else "")
        if name != self._committed_name:
            self._committed_name = name
            if not self.name.hasFocus() or self.unclear:
                self.name.setText(name)
                self.name.setCursorPosition(0)  # a long name shows its beginning, not its end
        self.count.setText(str(len(members)))
        self.model.set_items(members, pool_id)
        self._fit()

    def commit_name(self) -> None:
        self._name_timer.stop()
        text = " ".join(self.name.text().split())
        if self.unclear or not text or text == self._committed_name:
            return
        self._committed_name = text
        self.board.rename_group(self.gid, text)

    def set_icon_size(self, size: int) -> None:
        self.view.set_icon_size(size)
        self._fit()

    def set_columns(self, columns: int) -> None:
        if columns != self.columns:
            self.columns = max(1, columns)
            self._fit()

    def _view_width(self, columns: int) -> int:
        return columns * self.view.gridSize().width() + 2 * self.view.frameWidth() + 6 + 14

    def width_for(self, columns: int) -> int:
        """The panel's width with `columns` thumbnails per row (what the board packs panels by)."""
        return self.width() - self.view.width() + self._view_width(columns)

    def _fit(self) -> None:
        grid = self.view.gridSize()
        n = max(1, self.model.rowCount())
        rows = min(3, max(1, -(-n // self.columns)))
        frame = 2 * self.view.frameWidth() + 6
        self.view.setFixedSize(self._view_width(self.columns), rows * grid.height() + frame)
        self.setFixedSize(self.sizeHint())

    def _fill_menu(self) -> None:
        self.menu.clear()
        if not self.unclear:
            self.menu.addAction("Rename", self.start_rename)
            merge = self.menu.addMenu("Merge into this")
            for gid, label in self.board.other_groups(self.gid):
                merge.addAction(label, lambda g=gid: self.board.merge_groups(self.gid, [g]))
            merge.setEnabled(not merge.isEmpty())
            split = self.menu.addAction("Split the selection off", lambda: self.board.split_selection(self.gid))
            split.setEnabled(bool(self.view.selected_items()))
        self.menu.addAction("Select all", self.view.selectAll)
        self.menu.addAction("Move all back to the pool", lambda: self.board.move_maps(self.model.items(), None))
        if not self.unclear:
            self.menu.addSeparator()
            self.menu.addAction("Delete group", lambda: self.board.delete_group(self.gid))


class NewGroupZone(DropFrame):
    def __init__(self, board: Any, parent: QWidget | None = None):
        super().__init__(board, lambda: "new", parent)
        self.setObjectName("newGroupZone")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        label = QLabel("+ New group\ndrop maps here, or select and press N")
        label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        label.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(label)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        self.board.new_group_from_selection()

    def set_icon_size(self, size: int, columns: int = GroupPanel.COLUMNS) -> None:
        self.setFixedSize(columns * (size + 8) + 30, size + CAPTION_HEIGHT + 48)
