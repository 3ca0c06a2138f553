"""Interactive naming (Hamidi-Haines et al. 2018): pools of activation maps, annotators' boards that group them
into named visual concepts, unit descriptions, suggested groups, and the study's measures. Qt-free: the cluster
board in `app/ui/board/` is a view over these functions.

Safety of work: every board operation below is one function that writes in ONE transaction, so a kill at any
moment leaves the board as it was after the last completed edit; `BoardState.load` reads it back exactly. The
functions that undo an edit (`assign_maps`, `restore_groups`, ...) are board operations too, so an undo is as safe
as the edit it undoes.

Pools: a pool is a fixed list of maps (image, unit) of one layer, either
- unit-centric: the top exemplars of chosen units (from the extraction's top-k), or
- decision-centric, as in the formative study: for each chosen image, the maps of the layer that contribute most
  to the predicted class. The contribution of unit u is gradient x activation summed over the map,
  sum_ij dy_c/dA_uij * A_uij. For a linear head after global average pooling, dy_c/dA_uij = w_cu / (h w), so this
  is exactly the class weight times the pooled activation, w_cu * mean_ij A_uij; for any other head it is the
  usual gradient x activation.
The maps themselves (float16, the layer's grid), the threshold of each map's unit and the region features used
for suggestions live in `arrays/pools/<token>/` beside the database; pool rows point there.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app import imaging
from app.errors import JobError, ProjectError
from app.project import arrays
from app.project.store import Project, now
from labelers import agreement
from labelers.base import NullProgress, Progress

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


@dataclass
class PoolSpec:
    """What a new pool holds. Unit-centric: the `per_unit` top exemplars of `units` (None: all units).
    Decision-centric: for each of `images` (dataset indices; None: `num_images` drawn at random among the images
    the extraction read), the `per_image` maps with the largest positive contribution to the predicted class."""

    kind: str
    layer: str | int  # layer name (of `model`) or layer id
    model: str | int | None = None
    name: str | None = None
    units: list[int] | None = None
    per_unit: int = 5
    images: list[int] | None = None
    num_images: int = 20
    per_image: int = 5
    quantile: float | None = None  # threshold of a map's region; None: the lowest extracted quantile (0.99)
    shuffle: bool = True  # present maps in random order, so position does not suggest a grouping
    seed: int = 0
    features: bool = True  # compute region features now (needed for suggested groups)
    device: str = "auto"
    batch_size: int = 16


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


# ==== pools: building ==========================================================================================
def _layer_rows(project: Project, layer: str | int, model: str | int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(layer, int):
        row = project.one("SELECT model_id FROM layers WHERE id=?", (layer,))
        if row is None:
            raise ProjectError(f"the project has no layer {layer}", file=project.path)
        model_row = project.model(row["model_id"])
        layer_row = next(r for r in project.layers(model_row["id"]) if r["id"] == layer)
    else:
        model_row = project.model(model)
        layer_row = project.layer(model_row["id"], layer)
    return model_row, layer_row


def _thresholds(results: Any, quantile: float | None) -> tuple[float, np.ndarray]:
    q = min(results.meta["quantiles"]) if quantile is None else float(quantile)
    return q, np.asarray(results.threshold(q), dtype=np.float32)


def build_pool(project: Project, spec: PoolSpec, progress: Progress | None = None, model: Any = None) -> int:
    """Build a pool and write it (arrays first, then the rows in one transaction). `model` is a loaded model
    (`app.sources.models.LoadedModel`); by default the project's model is loaded when the pool needs it."""
    from app.engine.device import pick_device
    from app.engine.results import LayerResults

    progress = progress or NullProgress()
    if spec.kind not in POOL_KINDS:
        raise JobError(f"a pool is 'unit' or 'decision', not {spec.kind!r}")
    model_row, layer_row = _layer_rows(project, spec.layer, spec.model)
    results = LayerResults.load(project, layer_row["id"])
    dataset_id = int(results.stats["dataset_id"])
    q, thr_units = _thresholds(results, spec.quantile)
    valid = np.asarray(results.valid)
    device = pick_device(spec.device)
    rng = np.random.default_rng(spec.seed)
    params: dict[str, Any] = {"quantile": q, "seed": spec.seed, "shuffle": spec.shuffle,
                              "grid": list(results.topk_maps.shape[2:])}

    def get_model() -> Any:
        nonlocal model
        if model is None:
            from app.engine.extract import load_project_model

            model = load_project_model(model_row, device)
        return model

    features: np.ndarray | None = None
    if spec.kind == "unit":
        n_units = int(layer_row["units"])
        units = np.arange(n_units) if spec.units is None else np.unique(np.asarray(spec.units, dtype=np.int64))
        if units.size == 0 or units.min() < 0 or units.max() >= n_units:
            raise JobError(f"layer {layer_row['name']} has units 0..{n_units - 1}; the pool names others",
                           fix="choose units inside that range")
        k = min(int(spec.per_unit), int(results.topk_index.shape[1]))
        if k < 1:
            raise JobError("a unit-centric pool needs at least one exemplar per unit", fix="set per_unit to 1 or more")
        idx = np.asarray(results.topk_index[units, :k])
        scores = np.asarray(results.topk_scores[units, :k], dtype=np.float64)
        maps = np.asarray(results.topk_maps[units, :k])
        ok = np.isfinite(scores) & valid[idx]
        image_idx, unit_idx = idx[ok], np.broadcast_to(units[:, None], idx.shape)[ok]
        score, maps = scores[ok], maps[ok].astype(np.float16)
        params.update(units=units.tolist(), per_unit=k)
        default_name = f"{layer_row['name']}: top {k} of {len(units)} units"
    else:
        n_images = valid.shape[0]
        if spec.images is None:
            candidates = np.nonzero(valid)[0]
            take = min(int(spec.num_images), len(candidates))
            images = np.sort(rng.choice(candidates, size=take, replace=False)) if take else candidates[:0]
        else:
            images = np.unique(np.asarray(spec.images, dtype=np.int64))
            bad = images[(images < 0) | (images >= n_images)]
            if bad.size:
                raise JobError(f"image index {int(bad[0])} is outside the dataset (0..{n_images - 1})")
            unread = images[~valid[images]]
            if unread.size:
                raise JobError(f"image {int(unread[0])} could not be read by the extraction",
                               fix="leave it out of the pool")
        if images.size == 0:
            raise JobError("a decision-centric pool needs at least one image", fix="choose images")
        decision = _decision_maps(project, get_model(), layer_row, dataset_id, images, int(spec.per_image),
                                  thr_units, spec.batch_size, device, spec.features, progress)
        image_idx, unit_idx, score, maps, features, predictions = decision
        class_names = model_row.get("class_names") or []
        params.update(images=images.tolist(), per_image=int(spec.per_image), predictions={
            str(i): {"class": c, "name": class_names[c] if c < len(class_names) else str(c)}
            for i, c in predictions.items()})
        default_name = f"{layer_row['name']}: top {spec.per_image} maps of {len(images)} images"
    if len(image_idx) == 0:
        raise JobError("the pool came out empty (no exemplar or contributing map)",
                       fix="choose other units or images")
    thresholds = thr_units[unit_idx].astype(np.float32)
    if spec.kind == "unit" and spec.features:
        features = _region_features(project, get_model(), layer_row, dataset_id, image_idx, maps, thresholds,
                                    spec.batch_size, device, progress)
    order = rng.permutation(len(image_idx)) if spec.shuffle else np.arange(len(image_idx))
    return write_pool(
        project, name=spec.name or default_name, kind=spec.kind, layer_id=int(layer_row["id"]),
        source_run_id=results.run_id, dataset_id=dataset_id, image_index=image_idx[order], unit=unit_idx[order],
        score=score[order], maps=maps[order], thresholds=thresholds[order],
        features=None if features is None else features[order], params=params,
    )


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


class PoolJob:
    """Builds a pool in its own connection (for a worker thread or the CLI)."""

    kind = "pool"

    def __init__(self, project_path: str | Path, spec: PoolSpec, model: Any = None):
        self.project_path = Path(project_path)
        self.spec = spec
        self.model = model
        self.title = f"Build a {spec.kind}-centric pool of {spec.layer}"
        self.pool_id: int | None = None

    def execute(self, progress: Progress) -> int:
        with Project.open(self.project_path) as project:
            self.pool_id = build_pool(project, self.spec, progress, model=self.model)
        return self.pool_id


class FeaturesJob:
    """Computes the region features of a pool built without them."""

    kind = "pool-features"

    def __init__(self, project_path: str | Path, pool_id: int, device: str = "auto", model: Any = None):
        self.project_path = Path(project_path)
        self.pool_id = pool_id
        self.device = device
        self.model = model
        self.title = "Compute region features for suggestions"

    def execute(self, progress: Progress) -> None:
        with Project.open(self.project_path) as project:
            compute_features(project, self.pool_id, progress, device=self.device, model=self.model)


def compute_features(project: Project, pool_id: int, progress: Progress | None = None, device: str = "auto",
                     model: Any = None, batch_size: int = 16) -> None:
    from app.engine.device import pick_device

    pool = pool_info(project, pool_id)
    model_row, layer_row = _layer_rows(project, pool.layer_id, None)
    dev = pick_device(device)
    if model is None:
        from app.engine.extract import load_project_model

        model = load_project_model(model_row, dev)
    arr = PoolArrays.open(project.path, pool)
    maps = pool_maps(project, pool_id)
    feats = _region_features(project, model, layer_row, int(pool.dataset_id),
                             np.array([m.image_index for m in maps]), np.asarray(arr.maps), arr.thresholds,
                             batch_size, dev, progress or NullProgress())
    arrays.save_npy(project.path / pool.array_dir / "features.npy", feats)
    with project.transaction() as conn:
        conn.execute("UPDATE pools SET params=? WHERE id=?",
                     (json.dumps(pool.params | {"has_features": True}, sort_keys=True), pool_id))


# ---- running the model ----------------------------------------------------------------------------------------
def _load_batch(model: Any, paths: Sequence[Path]) -> Any:
    import torch

    from app.sources.datasets import load_rgb

    transform = model.preprocess.transform()
    return torch.stack([transform(load_rgb(p)) for p in paths])


def _dataset_paths(project: Project, dataset_id: int, indices: Sequence[int]) -> list[Path]:
    ds = project.dataset(dataset_id)
    keys = project.image_keys(dataset_id)
    return [image_path(ds["root"], keys[int(i)]) for i in indices]


def _replace_first_tensor(output: Any, new: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)):
        items = list(output)
        for i, v in enumerate(items):
            if isinstance(v, torch.Tensor):
                items[i] = new
                return type(output)(items) if isinstance(output, list) else tuple(items)
    raise JobError("the layer's output is not a tensor or a tuple of tensors, so its gradient cannot be taken",
                   fix="build a unit-centric pool for this layer instead")


def _first_tensor(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, torch.Tensor):
                return v
    return None


def gradient_x_activation(model: Any, info: Any, x: Any) -> tuple[Any, Any, Any]:
    """Unit maps [B, U, h, w], their gradient x activation maps [B, U, h, w] for the predicted class, and the
    logits [B, C]. The layer's output is replaced by a leaf that requires grad (the loaded model's parameters do
    not), so the gradient flows to it whatever the model; the hook is always removed."""
    import torch

    from app.engine.hooks import _module_by_name
    from app.sources.models import unit_maps

    captured: dict[str, Any] = {}

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        t = _first_tensor(output)
        if t is None:
            raise JobError(f"layer {info.name!r} produced no tensor", fix="choose another layer")
        leaf = t.detach().float().requires_grad_(True)
        captured["leaf"] = leaf
        # A copy goes on: the next module may work in place (ReLU(inplace=True)), which a leaf does not allow.
        return _replace_first_tensor(output, leaf.to(t.dtype, copy=True))

    handle = _module_by_name(model.module, info.name).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model.forward(x)
            if logits.ndim != 2:
                raise JobError(
                    f"decision-centric pools need a classifier (output [batch, classes]); the model gives "
                    f"{list(logits.shape)}", fix="build a unit-centric pool instead")
            if "leaf" not in captured:
                raise JobError(f"layer {info.name!r} did not run in the forward pass", fix="choose another layer")
            pred = logits.argmax(dim=1)
            selected = logits.gather(1, pred[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, captured["leaf"], allow_unused=True)
    finally:
        handle.remove()
    leaf = captured["leaf"].detach()
    if grad is None:
        grad = torch.zeros_like(leaf)
    # unit_maps only slices and permutes, so it lays the gradient out exactly like the activation.
    maps = unit_maps(info, leaf).float()
    return maps, unit_maps(info, grad).float() * maps, logits.detach()


def _decision_maps(project: Project, model: Any, layer_row: dict[str, Any], dataset_id: int, images: np.ndarray,
                   per_image: int, thr_units: np.ndarray, batch_size: int, device: Any, with_features: bool,
                   progress: Progress):
    import torch

    from app.engine.extract import layer_info

    info = layer_info(layer_row)
    paths = _dataset_paths(project, dataset_id, images.tolist())
    out_img, out_unit, out_score, out_maps, out_feats = [], [], [], [], []
    predictions: dict[int, int] = {}
    thr = torch.from_numpy(thr_units).to(device)
    model.module.to(device)
    for start in range(0, len(images), max(1, batch_size)):
        progress.update(start, len(images), "contributions to the predicted class")
        chunk = images[start:start + batch_size]
        x = _load_batch(model, paths[start:start + len(chunk)]).to(device)
        maps, gxa, logits = gradient_x_activation(model, info, x)
        contrib = gxa.sum(dim=(2, 3))  # [B, U]
        k = min(per_image, contrib.shape[1])
        top = contrib.topk(k, dim=1)
        for b, img in enumerate(chunk.tolist()):
            predictions[int(img)] = int(logits[b].argmax())
            keep = top.values[b] > 0  # a map that pushes against the decision does not explain it
            units = top.indices[b][keep]
            if units.numel() == 0:
                continue
            out_img.append(np.full(units.numel(), img, dtype=np.int64))
            out_unit.append(units.cpu().numpy())
            out_score.append(top.values[b][keep].double().cpu().numpy())
            m = maps[b, units]
            out_maps.append(m.half().cpu().numpy())
            if with_features:
                out_feats.append(region_features(maps[b][None].expand(len(units), -1, -1, -1), m,
                                                 thr[units]).cpu().numpy())
    progress.update(len(images), len(images), "contributions to the predicted class")
    if not out_img:
        raise JobError("no map of this layer contributes positively to any chosen image's prediction",
                       fix="choose other images or another layer")
    feats = np.concatenate(out_feats).astype(np.float32) if with_features else None
    return (np.concatenate(out_img), np.concatenate(out_unit), np.concatenate(out_score),
            np.concatenate(out_maps), feats, predictions)


def region_features(acts: Any, maps: Any, thresholds: Any) -> Any:
    """acts [n, U, h, w] (the layer on each map's image), maps [n, h, w], thresholds [n] -> [n, U]: the layer's
    activation vector averaged over the map's thresholded region (its maximum where nothing passes the
    threshold, which happens for decision-centric maps of images that are no unit's top exemplar)."""
    import torch

    maps = maps.float()
    thr = thresholds.float()[:, None, None]
    # Strictly above, as the engine counts a region: a threshold of 0 (a unit silent on 99% of positions after a
    # ReLU) must not make the whole map its region.
    region = maps > thr
    peak = maps >= maps.flatten(1).amax(dim=1)[:, None, None]
    region = torch.where(region.flatten(1).any(dim=1)[:, None, None], region, peak)
    weight = region.float()
    weight = weight / weight.flatten(1).sum(dim=1)[:, None, None]
    return torch.einsum("nhw,nuhw->nu", weight, acts.float())


def _region_features(project: Project, model: Any, layer_row: dict[str, Any], dataset_id: int,
                     image_idx: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, batch_size: int, device: Any,
                     progress: Progress) -> np.ndarray:
    import torch

    from app.engine.extract import MapRunner, layer_info

    info = layer_info(layer_row)
    runner = MapRunner(model, {info.name: info}, device, amp=False, batch_size=batch_size)
    uniq, inverse = np.unique(image_idx, return_inverse=True)
    paths = _dataset_paths(project, dataset_id, uniq.tolist())
    out = np.zeros((len(image_idx), int(layer_row["units"])), dtype=np.float32)
    step = max(1, batch_size)
    for start in range(0, len(uniq), step):
        progress.update(start, len(uniq), "region features for suggestions")
        acts = runner.maps(_load_batch(model, paths[start:start + step]))[info.name]  # [B, U, h, w]
        rows = np.nonzero((inverse >= start) & (inverse < start + step))[0]
        if rows.size == 0:
            continue
        local = torch.from_numpy(inverse[rows] - start).to(acts.device)
        feats = region_features(acts[local], torch.from_numpy(np.asarray(maps[rows], dtype=np.float32)).to(acts.device),
                                torch.from_numpy(np.asarray(thresholds[rows], dtype=np.float32)).to(acts.device))
        out[rows] = feats.cpu().numpy()
    progress.update(len(uniq), len(uniq), "region features for suggestions")
    return out


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


# ==== suggested groups =========================================================================================
@dataclass
class Suggestion:
    name: str
    map_ids: list[int]  # most typical first (closest to the cluster's centre)
    coherence: float  # mean cosine similarity of the members' features to their centre
    hint: str | None = None  # the commonest automatic label of the members' units (hidden in blind mode)


def suggest_groups(project: Project, pool_id: int, annotator_id: int, n_groups: int | None = None,
                   method: str = "kmeans", only_unassigned: bool = True, max_groups: int = 20,
                   min_size: int = 2, seed: int = 0) -> list[Suggestion]:
    """Clusters the maps by the layer's activation vector pooled over each map's thresholded region (cosine
    geometry: rows are L2-normalised). With `n_groups` None the number of clusters with the best silhouette is
    used, searched from half the rule-of-thumb sqrt(n/2) up to `max_groups`: silhouette alone often prefers two
    huge clusters, which are no help to someone naming concepts. Nothing is written: accepting a suggestion is
    `create_group`."""
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import silhouette_score

    if method not in ("kmeans", "agglomerative"):
        raise JobError(f"clustering method {method!r} is unknown", fix="use kmeans or agglomerative")
    pool = pool_info(project, pool_id)
    feats = PoolArrays.open(project.path, pool).features
    if feats is None:
        raise JobError("this pool has no region features yet", fix="compute them (Suggest asks to) and try again")
    state = BoardState.load(project, pool_id, annotator_id)
    candidates = state.unassigned if only_unassigned else [m.id for m in state.maps]
    if len(candidates) < max(2, min_size):
        return []
    pos = {m.id: m.position for m in state.maps}
    x = feats[[pos[m] for m in candidates]].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(candidates)

    def cluster(k: int, n_init: int = 10) -> np.ndarray:
        if method == "kmeans":
            return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)

    if n_groups is None:
        best: tuple[float, int] | None = None
        k_low = max(2, math.ceil(math.sqrt(n / 2) / 2))
        for k in range(min(k_low, n - 1), min(max(max_groups, k_low), n - 1) + 1):
            labels = cluster(k, n_init=3)  # the search only ranks k; the chosen k is fitted fully below
            if len(set(labels.tolist())) < 2:
                continue
            score = silhouette_score(x, labels, sample_size=min(n, 2000), random_state=seed)
            if best is None or score > best[0]:
                best = (score, k)
        labels = cluster(best[1]) if best else np.zeros(n, dtype=np.int64)
    else:
        labels = cluster(max(1, min(int(n_groups), n)))
    hints = _label_hints(project, pool.layer_id)
    unit_of = {m.id: m.unit for m in state.maps}
    out = []
    for c in np.unique(labels):
        rows = np.nonzero(labels == c)[0]
        if len(rows) < min_size:
            continue
        centre = x[rows].mean(axis=0)
        centre /= max(np.linalg.norm(centre), 1e-12)
        sims = x[rows] @ centre
        order = rows[np.argsort(-sims, kind="stable")]
        members = [candidates[i] for i in order]
        counts = Counter(h for m in members for h in hints.get(unit_of[m], ()))
        out.append(Suggestion(name="", map_ids=members, coherence=float(sims.mean()),
                              hint=counts.most_common(1)[0][0] if counts else None))
    out.sort(key=lambda s: (-len(s.map_ids), -s.coherence))
    for i, s in enumerate(out):
        s.name = f"Suggestion {i + 1}"
    return out


def _label_hints(project: Project, layer_id: int) -> dict[int, list[str]]:
    hints: dict[int, list[str]] = {}
    for lab in project.labels(layer_id=layer_id, max_rank=1):
        hints.setdefault(lab["unit"], []).append(lab["label"])
    return hints


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


# ==== what the study measured ==================================================================================
@dataclass
class StudyReport:
    pool_id: int
    annotators: list[str]  # humans first, then "auto: METHOD" partitions
    adequacy: list[agreement.Adequacy]  # humans only
    correspondence: dict[str, agreement.Correspondence]  # per human annotator
    adjusted_rand: np.ndarray  # [A, A] over `annotators`
    pairwise: np.ndarray  # [A, A]
    comparisons: list[agreement.Comparison] = field(default_factory=list)  # every pair with a human in it
    unclear: str = "group"


def board_partitions(project: Project, pool_id: int, annotator_ids: Sequence[int] | None = None,
                     with_empty: bool = False) -> tuple[list[agreement.Partition], np.ndarray]:
    """Every annotator's board of a pool (those who placed at least one map, unless `with_empty`) and the unit of
    each map, in pool order."""
    maps = pool_maps(project, pool_id)
    if annotator_ids is None:
        annotator_ids = [r["annotator_id"] for r in project.all(
            "SELECT DISTINCT annotator_id FROM groups WHERE pool_id=? ORDER BY annotator_id", (pool_id,))]
    boards = []
    for a in annotator_ids:
        state = BoardState.load(project, pool_id, a, maps=maps)
        if with_empty or state.group_of:
            boards.append(state.partition())
    return boards, np.array([m.unit for m in maps], dtype=np.int64)


def automatic_partitions(project: Project, pool_id: int) -> list[agreement.Partition]:
    """One partition per labeling method of the pool's layer: maps whose units share their top label."""
    pool = pool_info(project, pool_id)
    maps = pool_maps(project, pool_id)
    by_method: dict[str, dict[int, str]] = {}
    for lab in project.labels(layer_id=pool.layer_id, max_rank=1):
        by_method.setdefault(lab["method"], {})[lab["unit"]] = lab["label"]
    return [agreement.partition_from_labels(f"auto: {method}", [labels.get(m.unit) for m in maps])
            for method, labels in sorted(by_method.items())]


def study_report(project: Project, pool_id: int, annotator_ids: Sequence[int] | None = None,
                 automatic: bool = True, unclear: str = "group") -> StudyReport:
    humans, units = board_partitions(project, pool_id, annotator_ids)
    autos = automatic_partitions(project, pool_id) if automatic else []
    everyone = humans + autos
    comparisons = [agreement.compare(everyone[i], everyone[j], unclear)
                   for i in range(len(everyone)) for j in range(i + 1, len(everyone)) if i < len(humans)]
    return StudyReport(
        pool_id=pool_id, annotators=[p.annotator for p in everyone],
        adequacy=[agreement.adequacy(p) for p in humans],
        correspondence={p.annotator: agreement.concept_units(p, units) for p in humans},
        adjusted_rand=agreement.agreement_matrix(everyone, "ari", unclear),
        pairwise=agreement.agreement_matrix(everyone, "pairs", unclear),
        comparisons=comparisons, unclear=unclear,
    )


# ==== pictures of maps =========================================================================================
@dataclass
class MapPictures:
    """Everything needed to draw a pool's maps, resolved once in the thread that opened the project; `render` is
    then safe to call from worker threads (it reads files and memory-mapped arrays only)."""

    pool_id: int
    paths: list[Path]  # per pool position
    arrays: PoolArrays
    preprocess: dict[str, Any]

    @classmethod
    def for_pool(cls, project: Project, pool_id: int) -> "MapPictures":
        pool = pool_info(project, pool_id)
        maps = pool_maps(project, pool_id)
        where = image_paths(project, [m.image_id for m in maps])
        model = project.model(pool.model_id)
        return cls(pool_id=pool_id, paths=[where[m.image_id] for m in maps],
                   arrays=PoolArrays.open(project.path, pool), preprocess=dict(model["preprocess"]))

    def render(self, position: int, mode: str = "heat", size: int = 128) -> Any:
        from app.sources.datasets import load_rgb

        image = load_rgb(self.paths[position])
        return imaging.exemplar_picture(image, np.asarray(self.arrays.maps[position], dtype=np.float32),
                                        float(self.arrays.thresholds[position]), self.preprocess, mode, size)


@dataclass
class Exemplar:
    rank: int
    image_index: int
    path: Path
    score: float
    map: np.ndarray  # [h, w] float32
    threshold: float


def unit_exemplars(project: Project, layer_id: int, unit: int, k: int | None = None,
                   quantile: float | None = None) -> list[Exemplar]:
    """A unit's top exemplars from the newest extraction of its layer."""
    from app.engine.results import LayerResults

    results = LayerResults.load(project, layer_id)
    _, thr = _thresholds(results, quantile)
    idx = np.asarray(results.topk_index[unit])
    scores = np.asarray(results.topk_scores[unit], dtype=np.float64)
    maps = np.asarray(results.topk_maps[unit], dtype=np.float32)
    n = len(idx) if k is None else min(k, len(idx))
    keys = project.image_keys(int(results.stats["dataset_id"]))
    root = project.dataset(int(results.stats["dataset_id"]))["root"]
    return [Exemplar(rank=r + 1, image_index=int(idx[r]), path=image_path(root, keys[int(idx[r])]),
                     score=float(scores[r]), map=maps[r], threshold=float(thr[unit]))
            for r in range(n) if math.isfinite(scores[r])]
