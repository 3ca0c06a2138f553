"""Building pools of activation maps for the naming board, and the pictures and exemplars it shows. A pool is a
fixed list of maps (image, unit) of one layer, either
- unit-centric: the top exemplars of chosen units (from the extraction's top-k), or
- decision-centric, as in the formative study: for each chosen image, the maps of the layer that contribute most
  to the predicted class. The contribution of unit u is gradient x activation summed over the map,
  sum_ij dy_c/dA_uij * A_uij. For a linear head after global average pooling, dy_c/dA_uij = w_cu / (h w), so this
  is exactly the class weight times the pooled activation, w_cu * mean_ij A_uij; for any other head it is the
  usual gradient x activation.
What a pool is once built (its rows and arrays) is `app.project.naming`'s.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app import imaging
from app.errors import JobError, ProjectError
from app.project import arrays
from app.project import naming as store
from app.project.naming import POOL_KINDS, PoolArrays, image_path, image_paths, pool_info, pool_maps, write_pool
from app.project.store import Project
from labelers.base import NullProgress, Progress


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


# ==== pools: building ==========================================================================================
def _layer_rows(project: Project, layer: str | int, model: str | int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(layer, int):
        row = project.layer_by_id(layer)
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
    store.set_pool_params(project, pool_id, pool.params | {"has_features": True})


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


def gradient_x_activation(model: Any, info: Any, x: Any) -> tuple[Any, Any, Any]:
    """Unit maps [B, U, h, w], their gradient x activation maps [B, U, h, w] for the predicted class, and the
    logits [B, C]. The layer's output is replaced by a leaf that requires grad (the loaded model's parameters do
    not), so the gradient flows to it whatever the model; the hook is always removed."""
    import torch

    from app.sources import instrument
    from app.sources.models import unit_maps

    captured: dict[str, Any] = {}

    def as_leaf(t: Any) -> Any:
        leaf = t.detach().float().requires_grad_(True)
        captured["leaf"] = leaf
        # A copy goes on: the next module may work in place (ReLU(inplace=True)), which a leaf does not allow.
        return leaf.to(t.dtype, copy=True)

    with instrument.replace(model.module, {info.name: as_leaf}), torch.enable_grad():
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
