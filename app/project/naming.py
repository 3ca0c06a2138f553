"""Persistence of interactive naming (Hamidi-Haines et al. 2018): pools of activation maps and their arrays,
annotators' boards that group the maps into named visual concepts, and unit names and descriptions. The computation
(building a pool by running the model, suggested groups, the study's measures) lives in `app/naming/`.

Safety of work: every board operation below is one function that writes in ONE transaction, so a kill at any
moment leaves the board as it was after the last completed edit; `BoardState.load` reads it back exactly. The
functions that undo an edit (`assign_maps`, `restore_groups`, ...) are board operations too, so an undo is as safe
as the edit it undoes.

The maps of a pool (float16, the layer's grid), the threshold of each map's unit and the region features used for
suggestions live in `arrays/pools/<token>/` beside the database; pool rows point there.
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import ProjectError
from app.project import arrays
from app.project.store import Project, now
from labelers import agreement

log = logging.getLogger(__name__)

POOL_KINDS = ("unit", "decision")
UNCLEAR_NAME = "Unclear / not a concept"
POOLS_DIR = "pools"


# ==== records ==================================================================================================
@dataclass
class PoolInfo:
    id: int
    name: str
    kind: str
    layer_id: int
    layer: str
    model_id: int
    dataset_id: int | None
    source_run_id: int | None
    params: dict[str, Any]
    created_at: str
    size: int

    @property
    def array_dir(self) -> str | None:
        return self.params.get("array_dir")

    @property
    def has_features(self) -> bool:
        return bool(self.params.get("has_features"))


@dataclass
class PoolMap:
    id: int
    position: int
    image_id: int
    image_index: int
    image_key: str
    unit_id: int
    unit: int
    score: float


@dataclass
class GroupInfo:
    id: int
    name: str
    is_unclear: bool
    position: int
    members: list[int]  # map ids, in pool order
    created_at: str
    updated_at: str


@dataclass
class GroupSnapshot:
    """A group as it was, enough to put it back exactly (same id where it is still free)."""

    id: int
    pool_id: int
    annotator_id: int
    name: str
    is_unclear: bool
    position: int
    created_at: str
    updated_at: str
    members: list[tuple[int, str]]  # (map id, added_at)


@dataclass
class BoardState:
    """One annotator's board over one pool, as committed in the database."""

    pool: PoolInfo
    annotator_id: int
    annotator: str
    maps: list[PoolMap]
    groups: list[GroupInfo]  # the unclear group included, in board order (position, then id)

    @classmethod
    def load(cls, project: Project, pool_id: int, annotator_id: int,
             maps: list[PoolMap] | None = None) -> "BoardState":
        """`maps` may be passed back from an earlier load of the same pool (a pool's maps never change)."""
        pool = pool_info(project, pool_id)
        row = project.one("SELECT name FROM annotators WHERE id=?", (annotator_id,))
        if row is None:
            raise ProjectError(f"the project has no annotator {annotator_id}", file=project.path)
        if maps is None:
            maps = pool_maps(project, pool_id)
        position = {m.id: m.position for m in maps}
        members: dict[int, list[int]] = {}
        for gid, mid in project.conn.execute(
            "SELECT gm.group_id, gm.map_id FROM group_members gm JOIN groups g ON g.id=gm.group_id"
            " WHERE g.pool_id=? AND gm.annotator_id=?", (pool_id, annotator_id),
        ):
            members.setdefault(gid, []).append(mid)
        groups = [
            GroupInfo(id=g["id"], name=g["name"], is_unclear=bool(g["is_unclear"]), position=g["position"],
                      members=sorted(members.get(g["id"], []), key=position.__getitem__),
                      created_at=g["created_at"], updated_at=g["updated_at"])
            for g in project.all("SELECT * FROM groups WHERE pool_id=? AND annotator_id=? ORDER BY position, id",
                                 (pool_id, annotator_id))
        ]
        return cls(pool=pool, annotator_id=annotator_id, annotator=row["name"], maps=maps, groups=groups)

    # ---- views of the board --------------------------------------------------------------------------------
    @property
    def unclear(self) -> GroupInfo | None:
        return next((g for g in self.groups if g.is_unclear), None)

    @property
    def concepts(self) -> list[GroupInfo]:
        """The concept groups in board order: the N-th one is what the number key N moves to."""
        return [g for g in self.groups if not g.is_unclear]

    def group(self, group_id: int) -> GroupInfo:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    @property
    def group_of(self) -> dict[int, int]:
        return {mid: g.id for g in self.groups for mid in g.members}

    @property
    def unassigned(self) -> list[int]:
        placed = self.group_of
        return [m.id for m in self.maps if m.id not in placed]

    @property
    def map_by_id(self) -> dict[int, PoolMap]:
        return {m.id: m for m in self.maps}

    def partition(self) -> agreement.Partition:
        pos = {m.id: m.position for m in self.maps}
        return agreement.Partition.from_groups(
            self.annotator, len(self.maps),
            [(g.name, [pos[mid] for mid in g.members], g.is_unclear) for g in self.groups],
        )

    def snapshot(self) -> dict[str, Any]:
        """What the board shows, as plain data (for comparisons and logs)."""
        return {
            "pool": self.pool.id, "annotator": self.annotator,
            "groups": [{"id": g.id, "name": g.name, "unclear": g.is_unclear, "members": list(g.members)}
                       for g in self.groups],
            "unassigned": self.unassigned,
        }


# ==== pools: reading ===========================================================================================
def _pool_from_row(row: dict[str, Any]) -> PoolInfo:
    return PoolInfo(
        id=row["id"], name=row["name"], kind=row["kind"], layer_id=row["layer_id"], layer=row["layer"],
        model_id=row["model_id"], dataset_id=row["dataset_id"], source_run_id=row["source_run_id"],
        params=json.loads(row["params"] or "{}"), created_at=row["created_at"], size=row["size"],
    )


# The dataset comes from the pool's images, not its source run (a deleted run leaves source_run_id NULL).
_POOL_SQL = (
    "SELECT p.*, l.name AS layer, l.model_id,"
    " (SELECT i.dataset_id FROM pool_maps pm JOIN images i ON i.id=pm.image_id WHERE pm.pool_id=p.id LIMIT 1)"
    " AS dataset_id, (SELECT COUNT(*) FROM pool_maps pm WHERE pm.pool_id=p.id) AS size"
    " FROM pools p JOIN layers l ON l.id=p.layer_id"
)


def pools(project: Project, layer_id: int | None = None) -> list[PoolInfo]:
    if layer_id is None:
        rows = project.all(_POOL_SQL + " ORDER BY p.id")
    else:
        rows = project.all(_POOL_SQL + " WHERE p.layer_id=? ORDER BY p.id", (layer_id,))
    return [_pool_from_row(r) for r in rows]


def pool_info(project: Project, pool_id: int) -> PoolInfo:
    row = project.one(_POOL_SQL + " WHERE p.id=?", (pool_id,))
    if row is None:
        raise ProjectError(f"the project has no pool {pool_id}", file=project.path,
                           fix="pick one of the project's pools, or build a new one")
    return _pool_from_row(row)


def pool_maps(project: Project, pool_id: int) -> list[PoolMap]:
    return [
        PoolMap(**r) for r in project.all(
            "SELECT pm.id, pm.position, pm.image_id, i.idx AS image_index, i.key AS image_key, pm.unit_id,"
            " u.idx AS unit, pm.score FROM pool_maps pm JOIN images i ON i.id=pm.image_id"
            " JOIN units u ON u.id=pm.unit_id WHERE pm.pool_id=? ORDER BY pm.position", (pool_id,))
    ]


@dataclass
class PoolArrays:
    """The arrays of a pool, index-aligned with pool positions."""

    maps: np.ndarray  # [M, h, w] float16 (memory-mapped)
    thresholds: np.ndarray  # [M] float32: threshold of each map's unit
    features: np.ndarray | None  # [M, U] float32: the layer's activations pooled over each map's region

    @classmethod
    def open(cls, project_path: Path, pool: PoolInfo) -> "PoolArrays":
        if not pool.array_dir:
            raise ProjectError(f"pool {pool.name!r} records no array folder", file=project_path,
                               fix="build the pool again")
        d = Path(project_path) / pool.array_dir
        if not (d / "maps.npy").exists():
            raise ProjectError("the pool's maps are missing", file=d / "maps.npy", fix="build the pool again")
        feats = d / "features.npy"
        return cls(maps=arrays.load_npy(d / "maps.npy"),
                   thresholds=arrays.load_npy(d / "thresholds.npy", mmap=False),
                   features=arrays.load_npy(feats, mmap=False) if feats.exists() else None)


def image_path(root: str | Path, key: str) -> Path:
    """Image keys are paths relative to the dataset root, or absolute for files outside it."""
    p = Path(key)
    return p if p.is_absolute() else Path(root) / key


def image_paths(project: Project, image_ids: Iterable[int]) -> dict[int, Path]:
    ids = sorted(set(int(i) for i in image_ids))
    out: dict[int, Path] = {}
    for start in range(0, len(ids), 900):
        chunk = ids[start:start + 900]
        for r in project.conn.execute(
            f"SELECT i.id, i.key, d.root FROM images i JOIN datasets d ON d.id=i.dataset_id"
            f" WHERE i.id IN ({','.join('?' * len(chunk))})", chunk,
        ):
            out[r["id"]] = image_path(r["root"], r["key"])
    return out

def write_pool(project: Project, *, name: str, kind: str, layer_id: int, source_run_id: int | None,
               dataset_id: int, image_index: np.ndarray, unit: np.ndarray, score: np.ndarray, maps: np.ndarray,
               thresholds: np.ndarray, features: np.ndarray | None = None,
               params: dict[str, Any] | None = None) -> int:
    """Arrays go to a fresh folder first; the pool becomes visible only with the transaction that writes its
    rows, so a kill in between leaves at most an unreferenced folder."""
    token = uuid.uuid4().hex[:12]
    rel = f"{project.arrays_dir.name}/{POOLS_DIR}/{token}"
    d = project.path / rel
    d.mkdir(parents=True, exist_ok=True)
    arrays.save_npy(d / "maps.npy", np.asarray(maps, dtype=np.float16))
    arrays.save_npy(d / "thresholds.npy", np.asarray(thresholds, dtype=np.float32))
    if features is not None:
        arrays.save_npy(d / "features.npy", np.asarray(features, dtype=np.float32))
    params = dict(params or {}) | {"array_dir": rel, "has_features": features is not None}
    image_ids = np.asarray(project.image_ids(dataset_id), dtype=np.int64)
    unit_ids = np.asarray(project.unit_ids(layer_id), dtype=np.int64)
    with project.transaction() as conn:
        pool_id = int(conn.execute(
            "INSERT INTO pools (name, kind, layer_id, source_run_id, params, created_at) VALUES (?,?,?,?,?,?)",
            (name, kind, layer_id, source_run_id, json.dumps(params, sort_keys=True), now()),
        ).lastrowid)
        conn.executemany(
            "INSERT INTO pool_maps (pool_id, position, image_id, unit_id, score) VALUES (?,?,?,?,?)",
            ((pool_id, p, int(image_ids[i]), int(unit_ids[u]), float(s))
             for p, (i, u, s) in enumerate(zip(image_index.tolist(), unit.tolist(), score.tolist()))),
        )
    log.info("pool %d (%s): %d maps", pool_id, kind, len(score))
    return pool_id


def rename_pool(project: Project, pool_id: int, name: str) -> str:
    name = _clean_name(name)
    old = pool_info(project, pool_id).name
    with project.transaction() as conn:
        conn.execute("UPDATE pools SET name=? WHERE id=?", (name, pool_id))
    return old


def delete_pool(project: Project, pool_id: int) -> None:
    """Deletes the pool with every board drawn on it (all annotators), then its arrays."""
    pool = pool_info(project, pool_id)
    with project.transaction() as conn:
        conn.execute("DELETE FROM pools WHERE id=?", (pool_id,))
    if pool.array_dir:
        shutil.rmtree(project.path / pool.array_dir, ignore_errors=True)


def set_pool_params(project: Project, pool_id: int, params: dict[str, Any]) -> None:
    with project.transaction() as conn:
        conn.execute("UPDATE pools SET params=? WHERE id=?", (json.dumps(params, sort_keys=True), pool_id))


# ==== board operations: each one transaction ===================================================================
def _clean_name(name: str) -> str:
    name = " ".join(str(name).split())
    if not name:
        raise ProjectError("a name cannot be empty", fix="type a name")
    return name


def _group_row(conn: Any, group_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM groups WHERE id=?", (group_id,)).fetchone()
    if row is None:
        raise ProjectError(f"group {group_id} no longer exists", fix="reload the board")
    return dict(row)


def _check_maps(conn: Any, pool_id: int, map_ids: Sequence[int]) -> list[int]:
    ids = list(dict.fromkeys(int(m) for m in map_ids))
    if ids:
        found = {r[0] for r in conn.execute(
            f"SELECT id FROM pool_maps WHERE pool_id=? AND id IN ({','.join('?' * len(ids))})", (pool_id, *ids))}
        missing = [m for m in ids if m not in found]
        if missing:
            raise ProjectError(f"map {missing[0]} is not in pool {pool_id}", fix="reload the board")
    return ids


def _current(conn: Any, annotator_id: int, map_ids: Sequence[int]) -> dict[int, int | None]:
    out: dict[int, int | None] = {m: None for m in map_ids}
    for start in range(0, len(map_ids), 900):
        chunk = list(map_ids[start:start + 900])
        for mid, gid in conn.execute(
            f"SELECT map_id, group_id FROM group_members WHERE annotator_id=? AND map_id IN"
            f" ({','.join('?' * len(chunk))})", (annotator_id, *chunk),
        ):
            out[mid] = gid
    return out


def _place(conn: Any, annotator_id: int, map_ids: Sequence[int], group_id: int | None, stamp: str,
           added_at: Mapping[int, str] | None = None) -> None:
    """Put maps into a group (None: back to unassigned), touching the groups they leave and enter."""
    if not map_ids:
        return
    before = _current(conn, annotator_id, map_ids)
    touched = {g for g in before.values() if g is not None}
    conn.executemany("DELETE FROM group_members WHERE annotator_id=? AND map_id=?",
                     ((annotator_id, m) for m in map_ids))
    if group_id is not None:
        conn.executemany(
            "INSERT INTO group_members (group_id, map_id, annotator_id, added_at) VALUES (?,?,?,?)",
            ((group_id, m, annotator_id, (added_at or {}).get(m, stamp)) for m in map_ids),
        )
        touched.add(group_id)
    conn.executemany("UPDATE groups SET updated_at=? WHERE id=?", ((stamp, g) for g in touched))


def _next_position(conn: Any, pool_id: int, annotator_id: int) -> int:
    row = conn.execute("SELECT MAX(position) FROM groups WHERE pool_id=? AND annotator_id=?",
                       (pool_id, annotator_id)).fetchone()
    return 0 if row[0] is None else int(row[0]) + 1


def _check_owner(group: dict[str, Any], pool_id: int, annotator_id: int) -> None:
    if group["pool_id"] != pool_id or group["annotator_id"] != annotator_id:
        raise ProjectError(f"group {group['id']} belongs to another board", fix="reload the board")


def create_group(project: Project, pool_id: int, annotator_id: int, name: str, map_ids: Sequence[int] = (), *,
                 unclear: bool = False) -> int:
    """A new group at the end of the board, holding `map_ids` (taken from wherever they were)."""
    name = _clean_name(name)
    with project.transaction() as conn:
        ids = _check_maps(conn, pool_id, map_ids)
        if unclear and conn.execute("SELECT 1 FROM groups WHERE pool_id=? AND annotator_id=? AND is_unclear=1",
                                    (pool_id, annotator_id)).fetchone():
            raise ProjectError("this board already has an unclear group", fix="move maps to it instead")
        stamp = now()
        gid = int(conn.execute(
            "INSERT INTO groups (pool_id, annotator_id, name, is_unclear, position, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (pool_id, annotator_id, name, int(unclear), _next_position(conn, pool_id, annotator_id), stamp, stamp),
        ).lastrowid)
        _place(conn, annotator_id, ids, gid, stamp)
    return gid


def unclear_group(project: Project, pool_id: int, annotator_id: int, create: bool = True) -> int | None:
    """The board's "unclear / not a concept" group (created, in its own transaction, the first time)."""
    row = project.one("SELECT id FROM groups WHERE pool_id=? AND annotator_id=? AND is_unclear=1",
                      (pool_id, annotator_id))
    if row:
        return int(row["id"])
    return create_group(project, pool_id, annotator_id, UNCLEAR_NAME, unclear=True) if create else None


def rename_group(project: Project, group_id: int, name: str) -> str:
    """Returns the old name."""
    name = _clean_name(name)
    with project.transaction() as conn:
        old = _group_row(conn, group_id)["name"]
        conn.execute("UPDATE groups SET name=?, updated_at=? WHERE id=?", (name, now(), group_id))
    return old


def move_maps(project: Project, pool_id: int, annotator_id: int, map_ids: Sequence[int],
              group_id: int | None) -> dict[int, int | None]:
    """Moves maps into `group_id` (None: back to unassigned). Returns where each map was, for `assign_maps`."""
    with project.transaction() as conn:
        ids = _check_maps(conn, pool_id, map_ids)
        if group_id is not None:
            _check_owner(_group_row(conn, group_id), pool_id, annotator_id)
        before = _current(conn, annotator_id, ids)
        _place(conn, annotator_id, [m for m in ids if before[m] != group_id], group_id, now())
    return before


def assign_maps(project: Project, pool_id: int, annotator_id: int,
                assignment: Mapping[int, int | None]) -> dict[int, int | None]:
    """Puts each map into its own target group (None: unassigned), all in one transaction; returns where they
    were. This is how a move is undone."""
    with project.transaction() as conn:
        ids = _check_maps(conn, pool_id, list(assignment))
        targets = {g for g in assignment.values() if g is not None}
        for g in targets:
            _check_owner(_group_row(conn, g), pool_id, annotator_id)
        before = _current(conn, annotator_id, ids)
        stamp = now()
        by_target: dict[int | None, list[int]] = {}
        for m in ids:
            if before[m] != assignment[m]:
                by_target.setdefault(assignment[m], []).append(m)
        for g, members in by_target.items():
            _place(conn, annotator_id, members, g, stamp)
    return before


def set_unclear(project: Project, pool_id: int, annotator_id: int,
                map_ids: Sequence[int]) -> tuple[int, dict[int, int | None]]:
    """Moves maps to the unclear group, creating it in the same transaction if the board has none yet."""
    with project.transaction() as conn:
        row = conn.execute("SELECT id FROM groups WHERE pool_id=? AND annotator_id=? AND is_unclear=1",
                           (pool_id, annotator_id)).fetchone()
        gid = int(row[0]) if row else create_group(project, pool_id, annotator_id, UNCLEAR_NAME, unclear=True)
        before = move_maps(project, pool_id, annotator_id, map_ids, gid)
    return gid, before


def _snapshot(conn: Any, group_id: int) -> GroupSnapshot:
    g = _group_row(conn, group_id)
    members = [(r[0], r[1]) for r in conn.execute(
        "SELECT map_id, added_at FROM group_members WHERE group_id=? ORDER BY map_id", (group_id,))]
    return GroupSnapshot(id=g["id"], pool_id=g["pool_id"], annotator_id=g["annotator_id"], name=g["name"],
                         is_unclear=bool(g["is_unclear"]), position=g["position"], created_at=g["created_at"],
                         updated_at=g["updated_at"], members=members)


def group_snapshot(project: Project, group_id: int) -> GroupSnapshot:
    return _snapshot(project.conn, group_id)


def assignment(project: Project, annotator_id: int, map_ids: Sequence[int]) -> dict[int, int | None]:
    """Which group of this annotator holds each map (None: unassigned)."""
    return _current(project.conn, annotator_id, [int(m) for m in map_ids])


def delete_group(project: Project, group_id: int,
                 return_maps_to: Mapping[int, int | None] | None = None) -> GroupSnapshot:
    """Deletes a group; its maps become unassigned, or go back to the groups `return_maps_to` names (how the
    creation of a group is undone: in the same transaction). Returns the group as it was, for `restore_groups`."""
    with project.transaction() as conn:
        snap = _snapshot(conn, group_id)
        conn.execute("DELETE FROM groups WHERE id=?", (group_id,))
        if return_maps_to:
            back = {m: g for m, g in return_maps_to.items() if g is not None and g != group_id}
            stamp = now()
            for g in set(back.values()):
                _check_owner(_group_row(conn, g), snap.pool_id, snap.annotator_id)
                _place(conn, snap.annotator_id, [m for m, t in back.items() if t == g], g, stamp)
    return snap


def restore_groups(project: Project, snapshots: Sequence[GroupSnapshot]) -> list[int]:
    """Puts deleted groups back with their name, position, times and members (taken from wherever they are now),
    under their old ids where those are still free. Returns the ids they got."""
    out = []
    with project.transaction() as conn:
        for s in snapshots:
            taken = conn.execute("SELECT 1 FROM groups WHERE id=?", (s.id,)).fetchone()
            cols = "pool_id, annotator_id, name, is_unclear, position, created_at, updated_at"
            values = (s.pool_id, s.annotator_id, s.name, int(s.is_unclear), s.position, s.created_at, s.updated_at)
            if taken:
                gid = int(conn.execute(f"INSERT INTO groups ({cols}) VALUES (?,?,?,?,?,?,?)", values).lastrowid)
            else:
                conn.execute(f"INSERT INTO groups (id, {cols}) VALUES (?,?,?,?,?,?,?,?)", (s.id, *values))
                gid = s.id
            ids = _check_maps(conn, s.pool_id, [m for m, _ in s.members])
            _place(conn, s.annotator_id, ids, gid, now(), added_at=dict(s.members))
            conn.execute("UPDATE groups SET updated_at=? WHERE id=?", (s.updated_at, gid))
            out.append(gid)
    return out


def merge_groups(project: Project, target_id: int, source_ids: Sequence[int]) -> list[GroupSnapshot]:
    """Moves every member of the sources into the target and deletes the sources. Returns the sources as they
    were: undo is `restore_groups` of them."""
    sources = [int(s) for s in dict.fromkeys(source_ids) if int(s) != target_id]
    if not sources:
        raise ProjectError("merging needs at least one other group", fix="choose the groups to merge into this one")
    with project.transaction() as conn:
        target = _group_row(conn, target_id)
        snaps = []
        for s in sources:
            row = _group_row(conn, s)
            _check_owner(row, target["pool_id"], target["annotator_id"])
            if row["is_unclear"] or target["is_unclear"]:
                raise ProjectError("the unclear group cannot be merged", fix="move its maps instead")
            snaps.append(_snapshot(conn, s))
        stamp = now()
        _place(conn, target["annotator_id"], [m for s in snaps for m, _ in s.members], target_id, stamp)
        conn.executemany("DELETE FROM groups WHERE id=?", ((s,) for s in sources))
    return snaps


def split_group(project: Project, group_id: int, map_ids: Sequence[int], name: str) -> int:
    """Moves some members of a group into a new group `name`. Undo: `merge_groups(group_id, [new])`."""
    with project.transaction() as conn:
        g = _group_row(conn, group_id)
        ids = _check_maps(conn, g["pool_id"], map_ids)
        if not ids:
            raise ProjectError("nothing to split off", fix="select maps of the group first")
        current = _current(conn, g["annotator_id"], ids)
        if any(current[m] != group_id for m in ids):
            raise ProjectError("only maps of the group can be split off it", fix="select maps of this group only")
        return create_group(project, g["pool_id"], g["annotator_id"], name, ids)


def ensure_board(project: Project, pool_id: int, annotator_id: int) -> BoardState:
    """Opens a board, giving it its unclear group the first time."""
    unclear_group(project, pool_id, annotator_id, create=True)
    return BoardState.load(project, pool_id, annotator_id)


# ==== unit names and descriptions ==============================================================================
def unit_annotations(project: Project, annotator_id: int, unit_id: int) -> list[dict[str, Any]]:
    """This annotator's name (at most one) and descriptions of a unit, oldest first."""
    return project.all(
        "SELECT id, kind, text, created_at, updated_at FROM annotations WHERE annotator_id=? AND unit_id=?"
        " ORDER BY kind='description', id", (annotator_id, unit_id))


def unit_name(project: Project, annotator_id: int, unit_id: int) -> str | None:
    row = project.one("SELECT text FROM annotations WHERE annotator_id=? AND unit_id=? AND kind='name'",
                      (annotator_id, unit_id))
    return row["text"] if row else None


def set_unit_name(project: Project, annotator_id: int, unit_id: int, text: str | None) -> str | None:
    """Sets (or, with empty text, removes) this annotator's name for a unit; returns the previous name."""
    text = " ".join((text or "").split())
    with project.transaction() as conn:
        old = unit_name(project, annotator_id, unit_id)
        if text:
            project.set_annotation(annotator_id=annotator_id, unit_id=unit_id, kind="name", text=text)
        else:
            conn.execute("DELETE FROM annotations WHERE annotator_id=? AND unit_id=? AND kind='name'",
                         (annotator_id, unit_id))
    return old


def add_description(project: Project, annotator_id: int, unit_id: int, text: str) -> int:
    text = text.strip()
    if not text:
        raise ProjectError("a description cannot be empty", fix="type what the unit responds to")
    with project.transaction():
        return project.set_annotation(annotator_id=annotator_id, unit_id=unit_id, kind="description", text=text)


def edit_description(project: Project, annotation_id: int, text: str) -> str:
    """Returns the old text."""
    text = text.strip()
    if not text:
        raise ProjectError("a description cannot be empty", fix="delete it instead")
    with project.transaction() as conn:
        row = conn.execute("SELECT text FROM annotations WHERE id=?", (annotation_id,)).fetchone()
        if row is None:
            raise ProjectError(f"description {annotation_id} no longer exists", fix="reload")
        conn.execute("UPDATE annotations SET text=?, updated_at=? WHERE id=?", (text, now(), annotation_id))
    return row[0]


def delete_annotation(project: Project, annotation_id: int) -> dict[str, Any]:
    """Returns the row as it was, for `restore_annotation`."""
    with project.transaction() as conn:
        row = conn.execute("SELECT * FROM annotations WHERE id=?", (annotation_id,)).fetchone()
        if row is None:
            raise ProjectError(f"annotation {annotation_id} no longer exists", fix="reload")
        conn.execute("DELETE FROM annotations WHERE id=?", (annotation_id,))
    return dict(row)


def restore_annotation(project: Project, row: Mapping[str, Any]) -> int:
    cols = ("annotator_id", "unit_id", "kind", "text", "created_at", "updated_at")
    with project.transaction() as conn:
        if conn.execute("SELECT 1 FROM annotations WHERE id=?", (row["id"],)).fetchone():
            return int(conn.execute(f"INSERT INTO annotations ({', '.join(cols)}) VALUES (?,?,?,?,?,?)",
                                    tuple(row[c] for c in cols)).lastrowid)
        conn.execute(f"INSERT INTO annotations (id, {', '.join(cols)}) VALUES (?,?,?,?,?,?,?)",
                     (row["id"], *(row[c] for c in cols)))
        return int(row["id"])


def automatic_labels(project: Project, layer_id: int, unit: int | None = None,
                     max_rank: int = 1) -> list[dict[str, Any]]:
    rows = project.labels(layer_id=layer_id, max_rank=max_rank)
    return [r for r in rows if unit is None or r["unit"] == unit]


@dataclass
class DescriptionSuggestion:
    """A sentence an automatic method proposed for a unit (MILAN), offered to an annotator to accept."""

    text: str
    rank: int
    score: float  # wpmi
    log_p_given_e: float | None
    log_p: float | None


def description_suggestions(project: Project, layer_id: int, unit: int, method: str = "milan",
                            max_rank: int = 5) -> list[DescriptionSuggestion]:
    """The unit's candidate descriptions of the newest finished `method` run, best first."""
    rows = sorted((r for r in project.labels(layer_id=layer_id, method=method, max_rank=max_rank)
                   if r["unit"] == unit), key=lambda r: r["rank"])
    return [DescriptionSuggestion(r["label"], int(r["rank"]), float(r["score"]),
                                  r["extra"].get("log_p_d_given_e"), r["extra"].get("log_p_d")) for r in rows]


# ==== sessions, tables and imports ===============================================================================
def annotators(project: Project) -> list[dict[str, Any]]:
    """Every annotator (id, name), by name."""
    return project.all("SELECT id, name FROM annotators ORDER BY name COLLATE NOCASE")


def pool_annotator_ids(project: Project, pool_id: int) -> list[int]:
    """The annotators who have a board (at least one group) on a pool."""
    return [r[0] for r in project.conn.execute(
        "SELECT DISTINCT annotator_id FROM groups WHERE pool_id=? ORDER BY annotator_id", (pool_id,))]


def latest_annotator(project: Project) -> int | None:
    """Whoever edited this project last: reopening resumes their session."""
    row = project.one(
        "SELECT a.id, MAX(COALESCE(g.updated_at, ''), COALESCE(n.updated_at, ''), a.created_at) AS t"
        " FROM annotators a LEFT JOIN groups g ON g.annotator_id=a.id LEFT JOIN annotations n"
        " ON n.annotator_id=a.id GROUP BY a.id ORDER BY t DESC, a.id DESC LIMIT 1")
    return int(row["id"]) if row else None


def latest_pool(project: Project, annotator_id: int) -> int | None:
    """The pool this annotator edited last, else the newest pool."""
    row = project.one("SELECT pool_id FROM groups WHERE annotator_id=? ORDER BY updated_at DESC LIMIT 1",
                      (annotator_id,))
    if row:
        return int(row["pool_id"])
    row = project.one("SELECT MAX(id) AS id FROM pools")
    return int(row["id"]) if row and row["id"] is not None else None


def group_members(project: Project) -> list[dict[str, Any]]:
    """Every member of every named (not 'unclear') group: group, annotator, pool, map position, image, unit."""
    rows = project.all(
        "SELECT g.id AS group_id, g.name, g.position AS group_position, an.name AS annotator, p.id AS pool_id,"
        " p.name AS pool, p.kind AS pool_kind, p.params AS pool_params, p.layer_id, pm.position AS map_position,"
        " pm.score, i.dataset_id, i.idx AS image_index, u.idx AS unit"
        " FROM groups g JOIN pools p ON p.id=g.pool_id JOIN annotators an ON an.id=g.annotator_id"
        " JOIN group_members gm ON gm.group_id=g.id JOIN pool_maps pm ON pm.id=gm.map_id"
        " JOIN images i ON i.id=pm.image_id JOIN units u ON u.id=pm.unit_id"
        " WHERE g.is_unclear=0 ORDER BY p.id, an.name, g.position, g.id, pm.position"
    )
    for r in rows:
        r["pool_params"] = json.loads(r["pool_params"] or "{}")
    return rows


def group_table(project: Project) -> list[dict[str, Any]]:
    """Every group with each of its members (one row per member; an empty group is one row with no map): model,
    layer and position, unit, group name, annotator, times, pool, board position, image key and map score."""
    return project.all(
        "SELECT m.name AS model, l.name AS layer, l.position, u.idx AS unit, g.name AS text, an.name AS annotator,"
        " g.created_at, g.updated_at, p.name AS pool, p.kind AS pool_kind, g.position AS group_position,"
        " g.is_unclear AS unclear, i.key AS image, pm.score AS map_score, gm.added_at"
        " FROM groups g JOIN pools p ON p.id=g.pool_id JOIN layers l ON l.id=p.layer_id"
        " JOIN models m ON m.id=l.model_id JOIN annotators an ON an.id=g.annotator_id"
        " LEFT JOIN group_members gm ON gm.group_id=g.id LEFT JOIN pool_maps pm ON pm.id=gm.map_id"
        " LEFT JOIN units u ON u.id=pm.unit_id LEFT JOIN images i ON i.id=pm.image_id"
    )


def find_pools(project: Project, layer_id: int, name: str, kind: str) -> list[int]:
    return [r[0] for r in project.conn.execute(
        "SELECT id FROM pools WHERE layer_id=? AND name=? AND kind=? ORDER BY id", (layer_id, name, kind))]


def pool_map_ids(project: Project, pool_id: int) -> dict[tuple[str, int], int]:
    """(image key, unit index) -> map id, for the maps of a pool."""
    return {(r["key"], r["idx"]): r["id"] for r in project.all(
        "SELECT pm.id, i.key, u.idx FROM pool_maps pm JOIN images i ON i.id=pm.image_id"
        " JOIN units u ON u.id=pm.unit_id WHERE pm.pool_id=?", (pool_id,))}


def import_group(project: Project, pool_id: int, annotator_id: int, name: str, position: int, unclear: bool,
                 created_at: str, updated_at: str) -> tuple[int, bool]:
    """The group of this board with this name, position and kind; created with the given times when there is
    none. Returns (group id, whether it was created)."""
    with project.transaction() as conn:
        row = conn.execute("SELECT id FROM groups WHERE pool_id=? AND annotator_id=? AND name=? AND position=?"
                           " AND is_unclear=?", (pool_id, annotator_id, name, position, int(unclear))).fetchone()
        if row is not None:
            return int(row[0]), False
        return int(conn.execute(
            "INSERT INTO groups (pool_id, annotator_id, name, is_unclear, position, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (pool_id, annotator_id, name, int(unclear), position, created_at, updated_at)).lastrowid), True


def import_member(project: Project, group_id: int, map_id: int, annotator_id: int, added_at: str) -> bool:
    """Puts a map into a group as an import does: a map sits in one group per annotator, and the imported board
    wins; times are kept and no group is touched. Returns whether anything changed."""
    with project.transaction() as conn:
        current = conn.execute("SELECT group_id FROM group_members WHERE map_id=? AND annotator_id=?",
                               (map_id, annotator_id)).fetchone()
        if current is not None and current[0] == group_id:
            return False
        if current is not None:
            conn.execute("DELETE FROM group_members WHERE map_id=? AND annotator_id=?", (map_id, annotator_id))
        conn.execute("INSERT INTO group_members (group_id, map_id, annotator_id, added_at) VALUES (?,?,?,?)",
                     (group_id, map_id, annotator_id, added_at))
    return True


def has_description(project: Project, annotator_id: int, unit_id: int, text: str,
                    created_at: str | None = None) -> bool:
    """Whether this annotator already described this unit with this text (at this time, when given)."""
    sql = "SELECT 1 FROM annotations WHERE annotator_id=? AND unit_id=? AND kind='description' AND text=?"
    params: tuple[Any, ...] = (annotator_id, unit_id, text)
    if created_at is not None:
        sql += " AND created_at=?"
        params += (created_at,)
    return project.conn.execute(sql, params).fetchone() is not None


def name_annotation(project: Project, annotator_id: int, unit_id: int) -> dict[str, Any] | None:
    """This annotator's name row of a unit (id, text, created_at, updated_at), if any."""
    return project.one("SELECT id, text, created_at, updated_at FROM annotations WHERE annotator_id=? AND unit_id=?"
                       " AND kind='name'", (annotator_id, unit_id))


def import_annotation(project: Project, annotator_id: int, unit_id: int, kind: str, text: str, created_at: str,
                      updated_at: str, replace_id: int | None = None) -> int:
    """An annotation with the times it had where it was written; `replace_id` rewrites that row instead (a newer
    name of the same annotator and unit)."""
    with project.transaction() as conn:
        if replace_id is not None:
            conn.execute("UPDATE annotations SET text=?, created_at=?, updated_at=? WHERE id=?",
                         (text, created_at, updated_at, replace_id))
            return replace_id
        return int(conn.execute(
            "INSERT INTO annotations (annotator_id, unit_id, kind, text, created_at, updated_at) VALUES (?,?,?,?,?,?)",
            (annotator_id, unit_id, kind, text, created_at, updated_at)).lastrowid)
