"""A small study project built with the store alone (no model loading, no dataset reader): real PNG files, a
layer extraction written exactly where and how `app/engine/extract.py` writes it, label runs of three methods,
annotators' names and descriptions, and a naming pool with groups.

The images are 40 x 32 and the model's preprocessing resizes the shorter side to 32 and centre-crops 32 x 32, so
the model sees columns 4..36 of each image: exports must place maps through that crop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.project import arrays
from app.project.store import Project, now
from labelers.base import Label

W, H = 40, 32
N_IMAGES = 10
TOPK = 5
PREPROCESS = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
              "interpolation": "bilinear", "resize_mode": "shorter"}
CONCEPTS = [("red", "color"), ("blue", "color"), ("square", "object"), ("disc", "object")]
CATEGORIES = ["color", "object"]


@dataclass
class LayerRow:
    name: str
    type: str
    shape: tuple
    kind: str
    units: int
    grid: tuple | None
    prefix_tokens: int = 0


LAYERS = [
    LayerRow("conv", "Conv2d", (4, 4, 4), "conv", 4, (4, 4)),
    LayerRow("pool", "AdaptiveAvgPool2d", (4, 1, 1), "other", 0, None),
    LayerRow("fc", "Linear", (3,), "linear", 3, None),
]


@dataclass(frozen=True)
class FakeImage:
    key: str
    path: Path
    width: int | None
    height: int | None


@dataclass(frozen=True)
class FakeConcept:
    name: str
    category: str
    source: str = "labels.csv"


@dataclass
class FakeReader:
    """What `Project.add_dataset` reads from a dataset reader."""

    root: Path
    images: list[FakeImage]
    presence_matrix: np.ndarray
    format: str = "folder"
    concepts: list[FakeConcept] = field(default_factory=lambda: [FakeConcept(n, c) for n, c in CONCEPTS])
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    has_masks: bool = False

    @property
    def source(self) -> Path:
        return self.root

    def presence(self) -> np.ndarray:
        return self.presence_matrix

    def captions(self) -> None:
        return None

    def class_labels(self) -> None:
        return None

    def report(self) -> dict[str, Any]:
        return {"format": self.format, "images": len(self.images)}


def write_images(folder: Path) -> list[FakeImage]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(N_IMAGES):
        img = np.full((H, W, 3), 120, np.uint8) + rng.integers(0, 30, (H, W, 3), dtype=np.uint8)
        img[8:20, 10 + i:22 + i] = (220, 40, 40) if i % 2 == 0 else (40, 40, 220)
        key = f"img/{i:03d}.png"
        (folder / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / key)
        # Sizes recorded for half the images only: a folder reader does not read them, exports must cope.
        out.append(FakeImage(key, folder / key, W if i % 2 == 0 else None, H if i % 2 == 0 else None))
    return out


def activations(seed: int = 0) -> dict[str, torch.Tensor]:
    """Maps [N, U, h, w] per layer: conv units fire on a blob that moves with the image index."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.rand((N_IMAGES, 4, 4, 4), generator=g) * 0.5
    for i in range(N_IMAGES):
        conv[i, i % 4, 1:3, (i % 3):(i % 3) + 2] += 2.0 + i * 0.1
    fc = torch.rand((N_IMAGES, 3, 1, 1), generator=g) * 3
    return {"conv": conv, "fc": fc}


def write_extraction(project: Project, model_id: int, ds_id: int, maps: dict[str, torch.Tensor],
                     mask_counts: bool = True) -> int:
    """The arrays `ExtractJob` writes, for each layer of `maps`, then the layer stats and a finished run."""
    run = project.create_run(kind="extract", key="fake-extract", params={}, model_id=model_id, dataset_id=ds_id)
    project.start_run(run)
    quantiles = [0.99, 0.995]
    for name, a in maps.items():
        layer = project.layer(model_id, name)
        d = project.arrays_dir / f"run-{run}" / name
        d.mkdir(parents=True)
        n, u = a.shape[:2]
        flat = a.flatten(2)
        arrays.save_npy(d / "pooled_max.npy", flat.amax(2).numpy().astype(np.float32))
        arrays.save_npy(d / "pooled_mean.npy", flat.mean(2).numpy().astype(np.float32))
        per_unit = a.transpose(0, 1).reshape(u, -1)
        arrays.save_npy(d / "quantiles.npy", torch.quantile(per_unit, torch.tensor(quantiles), dim=1).numpy())
        top = flat.amax(2).T.topk(TOPK, dim=1)
        arrays.save_npy(d / "topk_index.npy", top.indices.numpy().astype(np.int64))
        arrays.save_npy(d / "topk_scores.npy", top.values.numpy().astype(np.float32))
        arrays.save_npy(d / "topk_maps.npy", a[top.indices, torch.arange(u)[:, None]].numpy().astype(np.float16))
        (d / "meta.json").write_text(json.dumps({"layer": name, "quantiles": quantiles, "exact": True,
                                                 "sample_rate": 1.0, "expected_relative_error": 0.0, "topk": TOPK,
                                                 "iou_quantile": 0.995}, indent=1))
        with_masks = mask_counts and name == "conv"
        if with_masks:
            rng = np.random.default_rng(1)
            arrays.save_npy(d / "mask_intersection.npy", rng.integers(0, 50, (u, len(CONCEPTS))).astype(np.float64))
            arrays.save_npy(d / "mask_unit_area.npy", rng.integers(50, 200, (u, len(CATEGORIES))).astype(np.float64))
            arrays.save_npy(d / "mask_concept_area.npy", rng.integers(100, 300, len(CONCEPTS)).astype(np.float64))
            arrays.save_npy(d / "concept_category.npy", np.array([0, 0, 1, 1], dtype=np.int64))
        project.add_layer_stats(run_id=run, layer_id=layer["id"], array_dir=str(d.relative_to(project.path)),
                                quantiles=quantiles, quantile_method="exact", has_mask_counts=with_masks,
                                mask_size=(8, 8) if with_masks else None)
    project.finish_run(run, "done", report={"images": N_IMAGES})
    return run


def label_run(project: Project, model_id: int, ds_id: int, layer: str, method: str, source: int,
              labels: list[Label]) -> int:
    layer_id = project.layer(model_id, layer)["id"]
    run = project.create_run(kind="label", key=f"{method}-{layer}-{len(labels)}", params={}, model_id=model_id,
                             dataset_id=ds_id, layer_id=layer_id, source_run_id=source, method=method)
    project.start_run(run)
    project.replace_labels(run, layer_id, method, labels)
    project.finish_run(run, "done")
    return run


def write_pool(project: Project, layer_id: int, ds_id: int, run: int, units: list[int], per_unit: int,
               name: str) -> int:
    """A unit-centric naming pool laid out like `app.naming.write_pool` does it."""
    d_rel = f"arrays/pools/{name.replace(' ', '_')}"
    d = project.path / d_rel
    d.mkdir(parents=True)
    src = project.path / project.layer_stats(layer_id)["array_dir"]
    idx = np.load(src / "topk_index.npy")
    scores = np.load(src / "topk_scores.npy")
    maps = np.load(src / "topk_maps.npy")
    thr = np.load(src / "quantiles.npy")[0]
    entries = [(int(idx[u, k]), u, float(scores[u, k]), maps[u, k]) for u in units for k in range(per_unit)]
    arrays.save_npy(d / "maps.npy", np.stack([e[3] for e in entries]).astype(np.float16))
    arrays.save_npy(d / "thresholds.npy", np.array([thr[e[1]] for e in entries], dtype=np.float32))
    image_ids = project.image_ids(ds_id)
    unit_ids = project.unit_ids(layer_id)
    with project.transaction() as conn:
        pool = int(conn.execute(
            "INSERT INTO pools (name, kind, layer_id, source_run_id, params, created_at) VALUES (?,?,?,?,?,?)",
            (name, "unit", layer_id, run, json.dumps({"array_dir": d_rel, "quantile": 0.99}), now())).lastrowid)
        conn.executemany("INSERT INTO pool_maps (pool_id, position, image_id, unit_id, score) VALUES (?,?,?,?,?)",
                         [(pool, p, image_ids[e[0]], unit_ids[e[1]], e[2]) for p, e in enumerate(entries)])
    return pool


def group(project: Project, pool: int, annotator: int, name: str, positions: list[int], *, position: int,
          unclear: bool = False, stamp: str = "2024-01-01T00:00:00.000+00:00") -> int:
    with project.transaction() as conn:
        gid = int(conn.execute(
            "INSERT INTO groups (pool_id, annotator_id, name, is_unclear, position, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?)", (pool, annotator, name, int(unclear), position, stamp, stamp)).lastrowid)
        for p in positions:
            map_id = conn.execute("SELECT id FROM pool_maps WHERE pool_id=? AND position=?", (pool, p)).fetchone()[0]
            conn.execute("INSERT INTO group_members (group_id, map_id, annotator_id, added_at) VALUES (?,?,?,?)",
                         (gid, map_id, annotator, stamp))
    return gid


def build_project(root: Path, name: str = "study.nstudio", *, content: bool = True, model_name: str = "tiny",
                  images: Path | None = None) -> dict[str, Any]:
    """The project at root/name (images under root/data unless given). With content=False: the same model,
    dataset and extraction only (a fresh project to import into)."""
    root = Path(root)
    data = images or root / "data"
    recs = write_images(data) if images is None else [
        FakeImage(f"img/{i:03d}.png", data / f"img/{i:03d}.png", W if i % 2 == 0 else None, H if i % 2 == 0 else None)
        for i in range(N_IMAGES)]
    presence = np.zeros((N_IMAGES, len(CONCEPTS)), dtype=bool)
    presence[::2, 0] = True
    presence[1::2, 1] = True
    presence[::3, 2] = True
    presence[1::3, 3] = True
    project = Project.create(root / name)
    model_id = project.add_model(name=model_name, spec="builtin:tiny", kind="builtin", weights_path=None,
                                 fingerprint="tiny", preprocess=PREPROCESS, class_names=["a", "b", "c"],
                                 layers=LAYERS)
    ds_id = project.add_dataset(name="shapes", reader=FakeReader(data, recs, presence), fingerprint="x")
    extract = write_extraction(project, model_id, ds_id, activations())
    out = {"path": root / name, "images": data, "model_id": model_id, "dataset_id": ds_id, "extract_run": extract,
           "conv": project.layer(model_id, "conv")["id"], "fc": project.layer(model_id, "fc")["id"]}
    if content:
        names = [c for c, _ in CONCEPTS]
        cats = dict(CONCEPTS)
        # an older netdissect run, superseded by the newer one (latest_only leaves it out)
        label_run(project, model_id, ds_id, "conv", "netdissect", extract,
                  [Label(unit=u, rank=1, text="square", score=0.01, category="object") for u in range(4)])
        nd = []
        for u in range(4):
            for r, c in enumerate([u % 4, (u + 2) % 4], 1):
                nd.append(Label(unit=u, rank=r, text=names[c], score=0.3 / r - 0.01 * u, category=cats[names[c]],
                                extra={"interpretable": r == 1, "intersection": 10.0 * (u + 1), "union": 80.0,
                                       "concept_index": c}))
        out["netdissect_run"] = label_run(project, model_id, ds_id, "conv", "netdissect", extract, nd)
        inv = [Label(unit=u, rank=1, text=f"({names[u]} OR {names[(u + 1) % 4]})", score=0.9 - 0.1 * u,
                     p_value=10.0 ** -(u + 2), formula=f"({names[u]} OR {names[(u + 1) % 4]})",
                     extra={"auc": 0.9 - 0.1 * u, "significant": u < 2, "length": 2}) for u in range(3)]
        inv.append(Label(unit=0, rank=2, text="NOT blue", score=0.7, p_value=0.01, formula="NOT blue",
                         extra={"auc": 0.7, "significant": True, "length": 1}))
        out["invert_run"] = label_run(project, model_id, ds_id, "conv", "invert", extract, inv)
        out["clip_run"] = label_run(project, model_id, ds_id, "fc", "clip_dissect", extract, [
            Label(unit=u, rank=1, text=w, score=s, extra={"log_p_concept": -1.5})
            for u, (w, s) in enumerate([("stripes", 1.25), ("red", 0.5), ("sky, blue", -0.25)])])
        out["milan_run"] = label_run(project, model_id, ds_id, "conv", "milan", extract, [
            Label(unit=u, rank=r, text=t, score=w, extra={"wpmi": w, "log_p_d_given_e": a, "log_p_d": b})
            for u, r, t, w, a, b in [(0, 1, "red squares", -2.0, -3.0, -5.0), (0, 2, "red, left", -2.5, -3.5, -5.0),
                                     (2, 1, "blue \"things\"", -1.0, -2.0, -5.0)]])
        alice, bob = project.annotator("alice"), project.annotator("bob")
        conv_units = project.unit_ids(out["conv"])
        project.set_annotation(annotator_id=alice, unit_id=conv_units[0], kind="name", text="red blob")
        project.set_annotation(annotator_id=bob, unit_id=conv_units[0], kind="name", text="Red  Blob")
        project.set_annotation(annotator_id=alice, unit_id=conv_units[0], kind="description", text="red patches")
        project.set_annotation(annotator_id=alice, unit_id=conv_units[1], kind="description", text="blue squares")
        project.set_annotation(annotator_id=bob, unit_id=conv_units[1], kind="description",
                               text='blue "things", left\nand right')
        pool = write_pool(project, out["conv"], ds_id, extract, [0, 1], 3, "conv top 3")
        group(project, pool, alice, "stripes", [0, 1], position=0)
        group(project, pool, alice, "Unclear / not a concept", [3], position=1, unclear=True)
        group(project, pool, alice, "later", [], position=2)
        group(project, pool, bob, "stripes", [4], position=0)
        out["pool"] = pool
    project.close()
    return out
