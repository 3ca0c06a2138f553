"""Undoable board edits. Every command changes the project through one `app.naming` function (one transaction),
never a widget: after it ran, the board reloads what is committed and redraws (Orange's rule: commands change the
model, views follow).

A command is first *applied* (`apply()`, which may raise: then nothing is pushed and the user sees why), then
pushed, and the stack's first `redo()` does nothing more. Group and annotation ids that an undo brings back under
a new id (the old one was taken meanwhile, e.g. by another annotator's window) are aliased on the board, so later
commands on the stack still find their group.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from PySide6.QtGui import QUndoCommand

from app import naming

log = logging.getLogger(__name__)

RENAME_ID = 1001
UNIT_NAME_ID = 1002
DESCRIPTION_ID = 1003


class BoardLike(Protocol):
    project: Any
    pool_id: int
    annotator_id: int

    def group_id(self, gid: int) -> int: ...

    def alias_group(self, old: int, new: int) -> None: ...

    def annotation_id(self, aid: int) -> int: ...

    def alias_annotation(self, old: int, new: int) -> None: ...

    def after_edit(self, command: "BoardCommand") -> None: ...

    def edit_failed(self, command: "BoardCommand", exc: BaseException) -> None: ...


class BoardCommand(QUndoCommand):
    def __init__(self, board: BoardLike, text: str):
        super().__init__(text)
        self.board = board
        # A stack belongs to one board (pool, annotator); its commands keep those even if the window switches.
        self.pool_id = board.pool_id
        self.annotator_id = board.annotator_id
        self._applied = False

    @property
    def project(self) -> Any:
        return self.board.project

    def g(self, gid: int | None) -> int | None:
        return None if gid is None else self.board.group_id(gid)

    # ---- to implement --------------------------------------------------------------------------------------
    def first(self) -> None:
        self.do_redo()

    def do_redo(self) -> None:
        raise NotImplementedError

    def do_undo(self) -> None:
        raise NotImplementedError

    # ---- QUndoCommand ----------------------------------------------------------------------------------------
    def apply(self) -> None:
        self.first()
        self._applied = True

    undone = False  # whether the last thing done to this command was an undo (for the window's feedback)

    def redo(self) -> None:
        self.undone = False
        if self._applied:
            self._applied = False
            self.board.after_edit(self)
            return
        self._guard(self.do_redo)

    def undo(self) -> None:
        self.undone = True
        self._guard(self.do_undo)

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # the database refused: show why, show what is committed
            log.warning("%s failed: %s", self.text(), exc, exc_info=True)
            self.board.edit_failed(self, exc)
        self.board.after_edit(self)


class MoveMaps(BoardCommand):
    """Maps into a group (None: back to the pool)."""

    def __init__(self, board: BoardLike, map_ids: Sequence[int], target: int | None, text: str):
        super().__init__(board, text)
        self.map_ids = [int(m) for m in map_ids]
        self.target = target
        self.prev: dict[int, int | None] = {}

    def do_redo(self) -> None:
        self.prev = naming.move_maps(self.project, self.pool_id, self.annotator_id, self.map_ids,
                                     self.g(self.target))

    def do_undo(self) -> None:
        naming.assign_maps(self.project, self.pool_id, self.annotator_id,
                           {m: self.g(g) for m, g in self.prev.items()})


class CreateGroup(BoardCommand):
    """A new group from maps (a split when they all come from `split_from`; an accepted suggestion)."""

    def __init__(self, board: BoardLike, name: str, map_ids: Sequence[int], split_from: int | None = None,
                 text: str | None = None):
        super().__init__(board, text or (f"Split into {name!r}" if split_from is not None else f"New group {name!r}"))
        self.name = name
        self.map_ids = [int(m) for m in map_ids]
        self.split_from = split_from
        self.prev: dict[int, int | None] = {}
        self.gid: int | None = None
        self.snap: naming.GroupSnapshot | None = None

    def first(self) -> None:
        self.prev = naming.assignment(self.project, self.annotator_id, self.map_ids)
        if self.split_from is not None:
            self.gid = naming.split_group(self.project, self.g(self.split_from), self.map_ids, self.name)
        else:
            self.gid = naming.create_group(self.project, self.pool_id, self.annotator_id, self.name, self.map_ids)

    def do_undo(self) -> None:
        assert self.gid is not None
        self.snap = naming.delete_group(self.project, self.g(self.gid),
                                        return_maps_to={m: self.g(g) for m, g in self.prev.items()})

    def do_redo(self) -> None:
        assert self.snap is not None
        (new,) = naming.restore_groups(self.project, [self.snap])
        if new != self.snap.id:
            self.board.alias_group(self.snap.id, new)


class RenameGroup(BoardCommand):
    def __init__(self, board: BoardLike, gid: int, name: str):
        super().__init__(board, f"Rename to {name!r}")
        self.gid = gid
        self.new = name
        self.old = ""

    def first(self) -> None:
        self.old = naming.rename_group(self.project, self.g(self.gid), self.new)

    def do_redo(self) -> None:
        naming.rename_group(self.project, self.g(self.gid), self.new)

    def do_undo(self) -> None:
        naming.rename_group(self.project, self.g(self.gid), self.old)

    def id(self) -> int:
        return RENAME_ID

    def mergeWith(self, other: QUndoCommand) -> bool:
        # Typing a name saves as you go; one undo step per name, not per keystroke.
        if isinstance(other, RenameGroup) and self.g(other.gid) == self.g(self.gid):
            self.new = other.new
            self.setText(f"Rename to {self.new!r}")
            return True
        return False


class DeleteGroup(BoardCommand):
    def __init__(self, board: BoardLike, gid: int, name: str = ""):
        super().__init__(board, f"Delete group {name!r}" if name else "Delete group")
        self.gid = gid
        self.snap: naming.GroupSnapshot | None = None

    def do_redo(self) -> None:
        self.snap = naming.delete_group(self.project, self.g(self.gid))

    def do_undo(self) -> None:
        assert self.snap is not None
        (new,) = naming.restore_groups(self.project, [self.snap])
        if new != self.snap.id:
            self.board.alias_group(self.snap.id, new)


class MergeGroups(BoardCommand):
    def __init__(self, board: BoardLike, target: int, sources: Sequence[int], name: str = ""):
        super().__init__(board, f"Merge into {name!r}" if name else "Merge groups")
        self.target = target
        self.sources = list(sources)
        self.snaps: list[naming.GroupSnapshot] = []

    def do_redo(self) -> None:
        self.snaps = naming.merge_groups(self.project, self.g(self.target), [self.g(s) for s in self.sources])

    def do_undo(self) -> None:
        for snap, new in zip(self.snaps, naming.restore_groups(self.project, self.snaps)):
            if new != snap.id:
                self.board.alias_group(snap.id, new)


class SetUnitName(BoardCommand):
    def __init__(self, board: BoardLike, unit_id: int, unit: int, name: str):
        super().__init__(board, f"Name unit {unit} {name!r}" if name else f"Clear the name of unit {unit}")
        self.unit_id = unit_id
        self.new = name
        self.old: str | None = None

    def first(self) -> None:
        self.old = naming.set_unit_name(self.project, self.annotator_id, self.unit_id, self.new)

    def do_redo(self) -> None:
        naming.set_unit_name(self.project, self.annotator_id, self.unit_id, self.new)

    def do_undo(self) -> None:
        naming.set_unit_name(self.project, self.annotator_id, self.unit_id, self.old)

    def id(self) -> int:
        return UNIT_NAME_ID

    def mergeWith(self, other: QUndoCommand) -> bool:
        if isinstance(other, SetUnitName) and other.unit_id == self.unit_id:
            self.new = other.new
            self.setText(other.text())
            return True
        return False


class AddDescription(BoardCommand):
    def __init__(self, board: BoardLike, unit_id: int, unit: int, text: str):
        super().__init__(board, f"Describe unit {unit}")
        self.unit_id = unit_id
        self.description = text
        self.aid: int | None = None
        self.row: dict[str, Any] | None = None

    def first(self) -> None:
        self.aid = naming.add_description(self.project, self.annotator_id, self.unit_id, self.description)

    def do_undo(self) -> None:
        assert self.aid is not None
        self.row = naming.delete_annotation(self.project, self.board.annotation_id(self.aid))

    def do_redo(self) -> None:
        assert self.row is not None
        new = naming.restore_annotation(self.project, self.row)
        if new != self.row["id"]:
            self.board.alias_annotation(self.row["id"], new)

    def id(self) -> int:
        return DESCRIPTION_ID

    def mergeWith(self, other: QUndoCommand) -> bool:
        # A description is saved while it is typed: its later edits belong to the step that added it.
        if isinstance(other, EditDescription) and self.aid is not None and \
                self.board.annotation_id(other.aid) == self.board.annotation_id(self.aid):
            self.description = other.new
            return True
        return False


class EditDescription(BoardCommand):
    def __init__(self, board: BoardLike, aid: int, text: str):
        super().__init__(board, "Edit a description")
        self.aid = aid
        self.new = text
        self.old = ""

    def first(self) -> None:
        self.old = naming.edit_description(self.project, self.board.annotation_id(self.aid), self.new)

    def do_redo(self) -> None:
        naming.edit_description(self.project, self.board.annotation_id(self.aid), self.new)

    def do_undo(self) -> None:
        naming.edit_description(self.project, self.board.annotation_id(self.aid), self.old)

    def id(self) -> int:
        return DESCRIPTION_ID

    def mergeWith(self, other: QUndoCommand) -> bool:
        if isinstance(other, EditDescription) and \
                self.board.annotation_id(other.aid) == self.board.annotation_id(self.aid):
            self.new = other.new
            return True
        return False


class DeleteDescription(BoardCommand):
    def __init__(self, board: BoardLike, aid: int):
        super().__init__(board, "Delete a description")
        self.aid = aid
        self.row: dict[str, Any] | None = None

    def do_redo(self) -> None:
        self.row = naming.delete_annotation(self.project, self.board.annotation_id(self.aid))

    def do_undo(self) -> None:
        assert self.row is not None
        new = naming.restore_annotation(self.project, self.row)
        if new != self.row["id"]:
            self.board.alias_annotation(self.row["id"], new)
