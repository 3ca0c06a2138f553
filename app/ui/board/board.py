"""The cluster board: the pool of unassigned maps (paged) beside the annotator's groups as labeled panels.

The board is a view of the committed state: every edit is an undoable command (commands.py) that writes through
`app.naming` in one transaction, after which the board reloads `BoardState` from the database and redraws. What
is on screen is therefore always what is in the project file.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from typing import Any

from PySide6.QtCore import QEvent, Qt, QTimer, Signal
from PySide6.QtGui import QKeyEvent, QPixmap, QUndoGroup, QUndoStack
from PySide6.QtWidgets import (
    QFrame, QHBoxLayout, QLabel, QScrollArea, QSplitter, QToolButton, QVBoxLayout, QWidget,
)

from app import imaging, naming
from app.errors import NeuronStudioError
from app.project.store import Project
from app.ui.board import commands as cmd
from app.ui.board.models import ThumbListModel
from app.ui.board.thumbs import ThumbnailCache
from app.ui.board.views import FlowLayout, GroupPanel, MapListView, NewGroupZone

log = logging.getLogger(__name__)

ZOOMS = (48, 64, 80, 96, 120, 144, 176, 216, 256)
KEYS_HELP = ("1–9 move to that group · 0 unclear · N new group (split within a group) · click a group's header to "
             "select it, Ctrl+click more, M merges them · double-click a name or F2 to rename, Esc undoes the edit · "
             "Del back to the pool · PgDn/PgUp page · Ctrl+Z / Ctrl+Shift+Z undo/redo · Ctrl+wheel or Ctrl+± zoom")


class Board(QWidget):
    edited = Signal()  # an edit was committed and is shown
    loaded = Signal()  # another board (pool, annotator) is shown
    current_map = Signal(object)  # naming.PoolMap
    message = Signal(str)
    zoom_changed = Signal(int)

    def __init__(self, project: Project, cache: ThumbnailCache, undo_group: QUndoGroup,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.project = project
        self.cache = cache
        self.undo_group = undo_group
        self.pool_id = 0
        self.annotator_id = 0
        self.state: naming.BoardState | None = None
        self.pictures: naming.MapPictures | None = None
        self.mode = "outline"  # the image's own colours: a heat map hides what the region shows
        self.zoom = 120
        self.page = 0
        self.page_size = 40
        self.blind = True
        self.last_edit = ""  # what the last edit (or undo) did, in words, for the status bar
        self._stacks: dict[tuple[int, int], QUndoStack] = {}
        self._group_alias: dict[int, int] = {}
        self._annotation_alias: dict[int, int] = {}
        self._panels: dict[int, GroupPanel] = {}
        self._order: list[int] = []
        self._by_id: dict[int, naming.PoolMap] = {}
        self._at: dict[int, int] = {}  # position -> map id
        self._auto: dict[int, list[str]] = {}
        self._build()

    # ---- layout --------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.pool_model = ThumbListModel(self, self)
        self.pool_view = MapListView(self, lambda: None)
        self.pool_view.setObjectName("poolView")
        self.pool_view.setModel(self.pool_model)
        self.pool_title = QLabel()
        self.pool_title.setObjectName("poolTitle")
        self.page_label = QLabel()
        self.prev_button = QToolButton()
        self.prev_button.setText("◀")
        self.prev_button.setToolTip("Previous page (PgUp)")
        self.prev_button.clicked.connect(self.prev_page)
        self.next_button = QToolButton()
        self.next_button.setText("▶")
        self.next_button.setToolTip("Next page (PgDn)")
        self.next_button.clicked.connect(self.next_page)
        head = QHBoxLayout()
        head.setContentsMargins(6, 4, 6, 0)
        head.addWidget(self.pool_title, 1)
        head.addWidget(self.prev_button)
        head.addWidget(self.page_label)
        head.addWidget(self.next_button)
        pool_box = QFrame()
        pool_box.setObjectName("poolPanel")
        pool_lay = QVBoxLayout(pool_box)
        pool_lay.setContentsMargins(2, 2, 2, 2)
        pool_lay.addLayout(head)
        pool_lay.addWidget(self.pool_view, 1)

        self.groups_host = QWidget()
        self.groups_host.setObjectName("groupsHost")
        self.flow = FlowLayout(self.groups_host, spacing=10)
        self.new_zone = NewGroupZone(self)
        self.flow.addWidget(self.new_zone)
        self.groups_scroll = QScrollArea()
        self.groups_scroll.setWidgetResizable(True)
        self.groups_scroll.setWidget(self.groups_host)
        self.groups_scroll.viewport().installEventFilter(self)
        self.columns = GroupPanel.COLUMNS  # thumbnails per row in every group panel (`_fit_columns`)
        self.groups_title = QLabel()
        self.groups_title.setObjectName("poolTitle")
        groups_box = QFrame()
        groups_lay = QVBoxLayout(groups_box)
        groups_lay.setContentsMargins(2, 2, 2, 2)
        groups_lay.addWidget(self.groups_title)
        groups_lay.addWidget(self.groups_scroll, 1)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(pool_box)
        self.splitter.addWidget(groups_box)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 2)
        self.splitter.setSizes([360, 820])  # the groups need the room: several panels side by side
        self.keys_help = QLabel(KEYS_HELP)
        self.keys_help.setObjectName("keysHelp")
        self.keys_help.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.splitter, 1)
        lay.addWidget(self.keys_help)
        self._wire(self.pool_view)
        self._apply_zoom()

    def _wire(self, view: MapListView) -> None:
        view.plain_press.connect(self._clear_others)
        view.current_item.connect(self._on_current)

    # ---- opening a board -----------------------------------------------------------------------------------
    def open(self, pool_id: int, annotator_id: int) -> None:
        same_pool = self.state is not None and pool_id == self.pool_id
        maps = self.state.maps if same_pool and self.state is not None else None
        self.pool_id, self.annotator_id = pool_id, annotator_id
        naming.unclear_group(self.project, pool_id, annotator_id, create=True)
        self.state = naming.BoardState.load(self.project, pool_id, annotator_id, maps=maps)
        if not same_pool:
            self.pictures = naming.MapPictures.for_pool(self.project, pool_id)
            self._by_id = {m.id: m for m in self.state.maps}
            self._at = {m.position: m.id for m in self.state.maps}
            self._auto = {}
            for lab in naming.automatic_labels(self.project, self.state.pool.layer_id):
                self._auto.setdefault(lab["unit"], []).append(f"{lab['method']}: {lab['label']}")
            self.page = 0
        key = (pool_id, annotator_id)
        if key not in self._stacks:
            self._stacks[key] = QUndoStack(self.undo_group)
        self.undo_group.setActiveStack(self._stacks[key])
        for panel in list(self._panels.values()):
            self._drop_panel(panel)
        self._sync()
        self.loaded.emit()

    def close_board(self) -> None:
        for panel in list(self._panels.values()):
            self._drop_panel(panel)
        self.state = None
        self.pool_model.set_items([])

    @property
    def stack(self) -> QUndoStack | None:
        return self._stacks.get((self.pool_id, self.annotator_id))

    def reload(self) -> None:
        if self.state is None:
            return
        self.state = naming.BoardState.load(self.project, self.pool_id, self.annotator_id, maps=self.state.maps)
        self._sync()

    def _drop_panel(self, panel: GroupPanel) -> None:
        self._panels.pop(panel.gid, None)
        idx = self.flow.indexOf(panel)
        if idx >= 0:
            self.flow.takeAt(idx)
        panel.hide()
        panel.deleteLater()

    def _sync(self) -> None:
        state = self.state
        if state is None:
            return
        order = ([state.unclear] if state.unclear else []) + state.concepts
        wanted = {g.id for g in order}
        for gid in [g for g in self._panels if g not in wanted]:
            self._drop_panel(self._panels[gid])
        for n, g in enumerate(([state.unclear] if state.unclear else []) + state.concepts):
            panel = self._panel(g.id, g.is_unclear)
            panel.set_group(g.name, n, g.members, self.pool_id)
            panel.name.setToolTip(f"made by {state.annotator} on {g.created_at[:16].replace('T', ' ')} UTC, "
                                  f"last changed {g.updated_at[:16].replace('T', ' ')} UTC")
        ids = [g.id for g in order]
        if ids != self._order:
            for panel in self._panels.values():
                i = self.flow.indexOf(panel)
                if i >= 0:
                    self.flow.takeAt(i)
            zone = self.flow.indexOf(self.new_zone)
            if zone >= 0:
                self.flow.takeAt(zone)
            for i, gid in enumerate(ids):
                self.flow.insert_widget(i, self._panels[gid])
            self.flow.insert_widget(len(ids), self.new_zone)
            self._order = ids
        self._fit_columns()
        self.flow.invalidate()
        self.groups_host.updateGeometry()
        unassigned = state.unassigned
        pages = max(1, math.ceil(len(unassigned) / self.page_size))
        self.page = min(self.page, pages - 1)
        start = self.page * self.page_size
        self.pool_model.set_items(unassigned[start:start + self.page_size], self.pool_id)
        self.pool_title.setText(f"Pool · {len(unassigned)} of {len(state.maps)} maps unassigned")
        self.page_label.setText(f"page {self.page + 1} of {pages}")
        self.prev_button.setEnabled(self.page > 0)
        self.next_button.setEnabled(self.page < pages - 1)
        named = sum(len(g.members) for g in state.concepts)
        self.groups_title.setText(
            f"{state.annotator}'s groups · {len(state.concepts)} concepts · {named} maps named"
            f" ({named / max(1, len(state.maps)):.0%})")

    # ---- packing the group panels --------------------------------------------------------------------------
    def eventFilter(self, obj: Any, event: Any) -> bool:
        if obj is self.groups_scroll.viewport() and event.type() == QEvent.Type.Resize:
            self._fit_columns()
        return super().eventFilter(obj, event)

    def _fit_columns(self) -> None:
        """Panels side by side as many as the groups pane holds: three thumbnails a panel row when at least two
        such panels fit in a row, else two when that makes two fit, then wider panels with the room left over; in
        a pane too narrow for two panels, one per row, as narrow as it must be. A wide window thus shows several
        columns of groups instead of one panel per row."""
        panel = next(iter(self._panels.values()), None)
        if panel is None:
            return
        m = self.flow.contentsMargins()
        avail = self.groups_scroll.viewport().width() - m.left() - m.right()
        gap = self.flow.spacing_px

        def per_row(columns: int) -> int:
            return max(1, (avail + gap) // (panel.width_for(columns) + gap))

        if per_row(GroupPanel.COLUMNS) >= 2:
            n, columns = per_row(GroupPanel.COLUMNS), GroupPanel.COLUMNS
        elif per_row(2) >= 2:
            n, columns = per_row(2), 2
        else:
            n = 1
            columns = next((c for c in (GroupPanel.COLUMNS, 2) if panel.width_for(c) <= avail), 1)
        while columns < 6 and n * (panel.width_for(columns + 1) + gap) - gap <= avail:
            columns += 1
        if columns != self.columns:
            self.columns = columns
            for p in self._panels.values():
                p.set_columns(columns)
            self.new_zone.set_icon_size(self.zoom, columns)
            self.flow.invalidate()

    def _panel(self, gid: int, unclear: bool) -> GroupPanel:
        panel = self._panels.get(gid)
        if panel is None:
            panel = GroupPanel(self, gid, unclear, self.groups_host)
            panel.columns = self.columns
            panel.set_icon_size(self.zoom)
            self._wire(panel.view)
            self._panels[gid] = panel
            panel.show()
        return panel

    # ---- what the models ask -------------------------------------------------------------------------------
    def _key(self, mid: int) -> tuple:
        return ("map", self.pool_id, self._by_id[mid].position, self.mode, self.zoom)

    def thumbnail(self, mid: int) -> QPixmap:
        key = self._key(mid)
        pics, pos, mode, size = self.pictures, key[2], self.mode, self.zoom
        pix = self.cache.get(key, lambda: pics.render(pos, mode, size))
        return pix if pix is not None else self.cache.placeholder(self.zoom)

    def item_of_key(self, key: Hashable) -> int | None:
        if (isinstance(key, tuple) and len(key) == 5 and key[0] == "map" and key[1] == self.pool_id
                and key[3] == self.mode and key[4] == self.zoom):
            return self._at.get(key[2])
        return None

    def caption(self, mid: int) -> str:
        return f"u{self._by_id[mid].unit}"

    def tooltip(self, mid: int) -> str:
        m = self._by_id[mid]
        kind = "contribution" if self.state and self.state.pool.kind == "decision" else "peak activation"
        lines = [f"unit {m.unit} · image {m.image_key}", f"{kind} {m.score:.3g}"]
        predicted = self.state.pool.params.get("predictions", {}).get(str(m.image_index)) if self.state else None
        if predicted:
            lines.append(f"the model predicts {predicted['name']}")
        if not self.blind and self._auto.get(m.unit):
            lines += self._auto[m.unit]
        return "\n".join(lines)

    # ---- selection -----------------------------------------------------------------------------------------
    def views(self) -> list[MapListView]:
        return [self.pool_view] + [self._panels[g].view for g in self._order if g in self._panels]

    def _clear_others(self, keep: MapListView) -> None:
        self.clear_group_selection()
        for v in self.views():
            if v is not keep:
                v.clearSelection()

    def selected_ids(self) -> list[int]:
        out: list[int] = []
        for v in self.views():
            out += v.selected_items()
        return out

    def select(self, map_ids: Sequence[int]) -> None:
        """Selects these maps wherever they are shown (for the keyboard and tests)."""
        wanted = list(map_ids)
        for v in self.views():
            v.select_items([m for m in wanted if v.model().row_of(m) is not None])

    def _on_current(self, mid: int) -> None:
        if mid in self._by_id:
            self.current_map.emit(self._by_id[mid])

    # ---- edits ---------------------------------------------------------------------------------------------
    def run(self, command: cmd.BoardCommand) -> bool:
        if self.stack is None:
            return False
        try:
            command.apply()
        except NeuronStudioError as exc:
            self.message.emit(str(exc))
            self.reload()
            return False
        except Exception as exc:  # never lose the window over one edit; the database kept the last state
            log.exception("edit %s failed", command.text())
            self.message.emit(f"{command.text()} failed: {exc}")
            self.reload()
            return False
        self.stack.push(command)
        return True

    def after_edit(self, command: cmd.BoardCommand) -> None:
        self.last_edit = ("Undone: " if command.undone else "") + command.text()
        self.reload()
        self.edited.emit()

    def edit_failed(self, command: cmd.BoardCommand, exc: BaseException) -> None:
        self.message.emit(f"{command.text()} could not be undone/redone: {exc}. The board shows what is saved.")
        stack = self.stack
        if stack is not None:
            # The history no longer matches the saved board; clearing it is the honest thing.
            QTimer.singleShot(0, stack.clear)

    def group_id(self, gid: int) -> int:
        while gid in self._group_alias:
            gid = self._group_alias[gid]
        return gid

    def alias_group(self, old: int, new: int) -> None:
        self._group_alias[old] = new

    def annotation_id(self, aid: int) -> int:
        while aid in self._annotation_alias:
            aid = self._annotation_alias[aid]
        return aid

    def alias_annotation(self, old: int, new: int) -> None:
        self._annotation_alias[old] = new

    def _name(self, gid: int | None) -> str:
        if gid is None:
            return "the pool"
        try:
            return self.state.group(gid).name if self.state else str(gid)
        except KeyError:
            return str(gid)

    def move_maps(self, map_ids: Sequence[int], target: int | None) -> bool:
        ids = list(dict.fromkeys(map_ids))
        if not ids:
            self.message.emit("select maps first (click, Shift+click, Ctrl+click or drag a rectangle)")
            return False
        n = len(ids)
        return self.run(cmd.MoveMaps(self, ids, target, f"Move {n} map{'s' * (n != 1)} to {self._name(target)}"))

    def move_selection_to_concept(self, number: int) -> bool:
        concepts = self.state.concepts if self.state else []
        if not 1 <= number <= len(concepts):
            self.message.emit(f"there is no group {number}; press N to make one from the selection")
            return False
        return self._move_selection(concepts[number - 1].id)

    def move_selection_to_unclear(self) -> bool:
        if self.state is None or self.state.unclear is None:
            return False
        return self._move_selection(self.state.unclear.id)

    def unassign_selection(self) -> bool:
        return self._move_selection(None)

    def _move_selection(self, target: int | None) -> bool:
        anchor = self._anchor()
        if not self.move_maps(self.selected_ids(), target):
            return False
        self._continue_at(anchor)
        return True

    def _anchor(self) -> tuple[MapListView, int] | None:
        for v in self.views():
            rows = sorted(i.row() for i in v.selectionModel().selectedIndexes())
            if rows:
                return v, rows[0]
        return None

    def _continue_at(self, anchor: tuple[MapListView, int] | None) -> None:
        """After a keyboard move the cursor stays where the moved maps were, on the next map, so a run of
        number keys names one map after another."""
        if anchor is None or anchor[0] not in self.views():
            return
        view, row = anchor
        n = view.model().rowCount()
        if n:
            view.setCurrentIndex(view.model().index(min(row, n - 1)))
            view.setFocus()

    def _default_name(self) -> str:
        taken = {g.name for g in self.state.groups} if self.state else set()
        k = len(self.state.concepts) + 1 if self.state else 1
        while f"Concept {k}" in taken:
            k += 1
        return f"Concept {k}"

    def new_group(self, map_ids: Sequence[int], name: str | None = None, text: str | None = None) -> int | None:
        """A new group from these maps: a split when they all come from one concept group."""
        ids = list(dict.fromkeys(map_ids))
        name = name or self._default_name()
        group_of = self.state.group_of if self.state else {}
        sources = {group_of.get(m) for m in ids}
        split_from = None
        if ids and len(sources) == 1 and None not in sources:
            src = next(iter(sources))
            if not self.state.group(src).is_unclear and len(ids) < len(self.state.group(src).members):
                split_from = src
        command = cmd.CreateGroup(self, name, ids, split_from=split_from, text=text)
        if not self.run(command):
            return None
        return command.gid

    def new_group_from_selection(self, name: str | None = None) -> int | None:
        gid = self.new_group(self.selected_ids(), name)
        if gid is not None and name is None:
            panel = self._panels.get(self.group_id(gid))
            if panel is not None:
                # Type the concept's name right away; it is saved as you type.
                panel.start_rename()
                self.groups_scroll.ensureWidgetVisible(panel)
        return gid

    def split_selection(self, gid: int) -> int | None:
        panel = self._panels.get(gid)
        ids = panel.view.selected_items() if panel else []
        if not ids:
            self.message.emit("select the maps to split off first")
            return None
        return self.new_group(ids)

    def rename_group(self, gid: int, name: str) -> bool:
        return self.run(cmd.RenameGroup(self, gid, name))

    def delete_group(self, gid: int) -> bool:
        return self.run(cmd.DeleteGroup(self, gid, self._name(gid)))

    def merge_groups(self, target: int, sources: Sequence[int]) -> bool:
        return self.run(cmd.MergeGroups(self, target, list(sources), self._name(target)))

    def select_group(self, gid: int, additive: bool = False) -> None:
        """Selects a group (its header was clicked); additive toggles it within the current selection. Map
        selections are dropped so M and the number keys act on one kind of selection at a time."""
        for v in self.views():
            v.clearSelection()
        for g, panel in self._panels.items():
            if g == gid:
                panel.set_selected(not panel.selected if additive else True)
            elif not additive:
                panel.set_selected(False)

    def clear_group_selection(self) -> None:
        for panel in self._panels.values():
            panel.set_selected(False)

    def selected_groups(self) -> list[int]:
        """Selected groups in board order."""
        return [g for g in self._order if g in self._panels and self._panels[g].selected]

    def merge_selection(self) -> bool:
        if self.state is None:
            return False
        concepts = [g.id for g in self.state.concepts]
        chosen = set(self.selected_groups())
        if len(chosen & set(concepts)) >= 2:
            order = [g for g in concepts if g in chosen]
        else:  # maps selected in two or more groups merge their groups too
            group_of = self.state.group_of
            touched = {group_of.get(m) for m in self.selected_ids()} - {None}
            order = [g for g in concepts if g in touched]
        if len(order) < 2:
            self.message.emit("select two or more groups (click a header, Ctrl+click another) or maps in two or "
                              "more groups, then press M to merge them into the first")
            return False
        return self.merge_groups(order[0], order[1:])

    def drop_maps(self, pool_id: int, map_ids: Sequence[int], target: Any) -> None:
        if pool_id != self.pool_id:
            self.message.emit("those maps belong to another pool")
            return
        if target == "new":
            self.new_group(map_ids)
        else:
            group_of = self.state.group_of if self.state else {}
            moving = [m for m in map_ids if group_of.get(m) != target]
            if moving:
                self.move_maps(moving, target)

    def accept_suggestion(self, name: str, map_ids: Sequence[int]) -> int | None:
        return self.new_group(map_ids, name or None, text=f"Accept suggestion {name!r}")

    def other_groups(self, gid: int) -> list[tuple[int, str]]:
        if self.state is None:
            return []
        return [(g.id, f"{n}. {g.name}") for n, g in enumerate(self.state.concepts, start=1) if g.id != gid]

    def rename_focused(self) -> None:
        for v in self.views()[1:]:
            if v.hasFocus() or v.selected_items():
                panel = v.parentWidget()
                if isinstance(panel, GroupPanel) and not panel.unclear:
                    panel.start_rename()
                    return
        selected = self.selected_groups()
        if len(selected) == 1 and not self._panels[selected[0]].unclear:
            self._panels[selected[0]].start_rename()

    # ---- unit annotations (undoable too) -------------------------------------------------------------------
    def set_unit_name(self, unit_id: int, unit: int, name: str) -> bool:
        return self.run(cmd.SetUnitName(self, unit_id, unit, name))

    def add_description(self, unit_id: int, unit: int, text: str) -> int | None:
        command = cmd.AddDescription(self, unit_id, unit, text)
        return command.aid if self.run(command) else None

    def edit_description(self, aid: int, text: str) -> bool:
        return self.run(cmd.EditDescription(self, aid, text))

    def delete_description(self, aid: int) -> bool:
        return self.run(cmd.DeleteDescription(self, aid))

    # ---- display -------------------------------------------------------------------------------------------
    def zoom_step(self, step: int) -> None:
        i = min(range(len(ZOOMS)), key=lambda j: abs(ZOOMS[j] - self.zoom))
        self.set_zoom(ZOOMS[max(0, min(len(ZOOMS) - 1, i + step))])

    def set_zoom(self, size: int) -> None:
        if size != self.zoom:
            self.zoom = int(size)
            self._apply_zoom()
            self.zoom_changed.emit(self.zoom)

    def _apply_zoom(self) -> None:
        self.pool_view.set_icon_size(self.zoom)
        for panel in self._panels.values():
            panel.set_icon_size(self.zoom)
        self.new_zone.set_icon_size(self.zoom, self.columns)
        self._fit_columns()
        self.flow.invalidate()
        self.pool_model.repaint_all()
        for panel in self._panels.values():
            panel.model.repaint_all()

    def set_mode(self, mode: str) -> None:
        if mode in imaging.RENDER_MODES and mode != self.mode:
            self.mode = mode
            self.pool_model.repaint_all()
            for panel in self._panels.values():
                panel.model.repaint_all()

    def set_blind(self, blind: bool) -> None:
        self.blind = bool(blind)

    def next_page(self) -> None:
        self.page += 1
        self._sync()

    def prev_page(self) -> None:
        self.page = max(0, self.page - 1)
        self._sync()

    def displayed(self) -> dict[str, Any]:
        """What the board shows, read from its widgets (for tests and the kill-and-reopen check)."""
        return {
            "groups": [{"name": self._panels[g].name.text(), "unclear": self._panels[g].unclear,
                        "members": self._panels[g].model.items()} for g in self._order],
            "pool": self.pool_model.items(),
            "title": self.pool_title.text(),
        }

    # ---- keys ----------------------------------------------------------------------------------------------
    def handle_key(self, event: QKeyEvent) -> bool:
        key = event.key()
        mods = event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier
        ctrl = bool(mods & Qt.KeyboardModifier.ControlModifier)
        shift = bool(mods & Qt.KeyboardModifier.ShiftModifier)
        stack = self.stack
        if ctrl:
            if key == Qt.Key.Key_Z and stack is not None:
                stack.redo() if shift else stack.undo()
                return True
            if key == Qt.Key.Key_Y and stack is not None:
                stack.redo()
                return True
            if key in (Qt.Key.Key_Plus, Qt.Key.Key_Equal):
                self.zoom_step(1)
                return True
            if key == Qt.Key.Key_Minus:
                self.zoom_step(-1)
                return True
            return False
        if mods not in (Qt.KeyboardModifier.NoModifier, Qt.KeyboardModifier.ShiftModifier):
            return False
        if Qt.Key.Key_1 <= key <= Qt.Key.Key_9 and not shift:
            self.move_selection_to_concept(int(key) - int(Qt.Key.Key_0))
        elif key == Qt.Key.Key_0 and not shift:
            self.move_selection_to_unclear()
        elif key == Qt.Key.Key_N:
            self.new_group_from_selection()
        elif key == Qt.Key.Key_M:
            self.merge_selection()
        elif key in (Qt.Key.Key_Delete, Qt.Key.Key_Backspace):
            self.unassign_selection()
        elif key == Qt.Key.Key_F2:
            self.rename_focused()
        elif key in (Qt.Key.Key_PageDown, Qt.Key.Key_BracketRight):
            self.next_page()
        elif key in (Qt.Key.Key_PageUp, Qt.Key.Key_BracketLeft):
            self.prev_page()
        else:
            return False
        return True

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if not self.handle_key(event):
            super().keyPressEvent(event)
