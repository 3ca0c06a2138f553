"""What several exporters read: the chosen layers, the dataset's image files, and units' exemplars with their maps
and thresholds from an extraction."""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import DatasetError, JobError
from app.project import naming as naming_store
from app.project.store import Project
from labelers.base import Param

log = logging.getLogger(__name__)

# Options shared by several formats (each format lists the ones it takes).
MODEL = Param("model", str, "", "only this model (name); default: every model of the project")
LAYERS = Param("layers", str, "all", "comma-separated layer names, or 'all'")
METHODS = Param("methods", str, "all", "comma-separated labeling methods, or 'all'")
ANNOTATORS = Param("annotators", str, "all", "comma-separated annotator names, or 'all'")
QUANTILE = Param("quantile", float, 0.99, "activation quantile of the unit that thresholds its regions (MILAN: 0.99)",
                 minimum=0.0, maximum=1.0)
EXEMPLARS = Param("exemplars", int, 0, "exemplars per unit (0: every one the extraction kept)", minimum=0)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str, limit: int = 80) -> str:
    """A file-name-safe spelling: runs of other characters become one '_'."""
    out = _SAFE.sub("_", text.strip()).strip("._")[:limit]
    return out or "_"


@dataclass
class LayerRef:
    model_id: int
    model: str
    layer_id: int
    layer: str
    position: int
    type: str
    kind: str
    units: int
    preprocess: dict[str, Any]


def layer_refs(project: Project, model: str | None = None, layers: list[str] | None = None,
               with_units: bool = True) -> list[LayerRef]:
    """The layers to export, in model then layer order. Unknown names are refused, naming the known ones."""
    models = [project.model(model)] if model else [project.model(r["id"]) for r in project.models()]
    out: list[LayerRef] = []
    found: set[str] = set()
    for m in models:
        for r in project.layers(m["id"], extractable_only=with_units):
            if layers is not None and r["name"] not in layers:
                continue
            found.add(r["name"])
            out.append(LayerRef(model_id=m["id"], model=m["name"], layer_id=r["id"], layer=r["name"],
                                position=r["position"], type=r["type"], kind=r["kind"], units=r["units"],
                                preprocess=dict(m["preprocess"])))
    if layers is not None:
        missing = [n for n in layers if n not in found]
        if missing:
            known = sorted({r.layer for r in layer_refs(project, model, None, with_units)})
            raise JobError(f"no layer named {missing[0]!r}" + (f" in model {model}" if model else ""),
                           fix=f"pick among: {', '.join(known[:30])}{' ...' if len(known) > 30 else ''}")
    return out


# ---- image files -------------------------------------------------------------------------------------------------
def _image_root(ds: dict[str, Any]) -> Path:
    """The folder image keys are relative to. The project stores what was opened: a folder, or an annotation file
    (a COCO JSON inside `annotations/` keeps its images one level up, as the COCO reader assumes)."""
    src = Path(ds["root"])
    if src.is_dir():
        return src
    if src.suffix.lower() == ".json" and src.parent.name == "annotations":
        return src.parent.parent
    return src.parent


class Images:
    """Paths, sizes and decoded pixels of dataset images, by (dataset id, image index), with a small LRU cache."""

    def __init__(self, project: Project, cache: int = 32):
        self.project = project
        self._ds: dict[int, dict[str, Any]] = {}
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._cache_size = cache
        self._reader_paths: dict[int, dict[str, Path] | None] = {}
        self.problems: dict[str, str] = {}  # key -> why it could not be used

    def dataset(self, dataset_id: int) -> dict[str, Any]:
        if dataset_id not in self._ds:
            ds = self.project.dataset(dataset_id)
            rows = self.project.images(dataset_id)
            ds["keys"] = [r["key"] for r in rows]
            ds["sizes"] = [(r["width"], r["height"]) for r in rows]
            ds["image_root"] = _image_root(ds)
            self._ds[dataset_id] = ds
        return self._ds[dataset_id]

    def key(self, dataset_id: int, index: int) -> str:
        return self.dataset(dataset_id)["keys"][index]

    def path(self, dataset_id: int, index: int) -> Path:
        ds = self.dataset(dataset_id)
        key = ds["keys"][index]
        p = Path(key)
        path = p if p.is_absolute() else ds["image_root"] / key
        if path.exists():
            return path
        # Formats whose files do not sit under one folder (a labels CSV naming paths elsewhere): ask the reader.
        paths = self._from_reader(dataset_id)
        return (paths or {}).get(key) or path

    def _from_reader(self, dataset_id: int) -> dict[str, Path] | None:
        if dataset_id not in self._reader_paths:
            ds = self.dataset(dataset_id)
            try:
                from app.sources.datasets import open_dataset

                reader = open_dataset(ds["root"], ds["format"])
                self._reader_paths[dataset_id] = {im.key: Path(im.path) for im in reader.images}
            except Exception as exc:  # the reader is only a second chance to find files
                log.info("cannot reopen dataset %s to locate images: %s", ds["name"], exc)
                self._reader_paths[dataset_id] = None
        return self._reader_paths[dataset_id]

    def size(self, dataset_id: int, index: int) -> tuple[int, int]:
        """(width, height), from the project when it recorded them, else from the file's header."""
        ds = self.dataset(dataset_id)
        w, h = ds["sizes"][index]
        if w and h:
            return int(w), int(h)
        from PIL import Image

        path = self.path(dataset_id, index)
        try:
            with Image.open(path) as im:
                size = im.size
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read the image's size ({exc})", file=path,
                               fix="put the file back or replace it with a valid image") from None
        ds["sizes"][index] = size
        return size

    def load(self, dataset_id: int, index: int) -> Any:
        """The image as RGB (PIL); DatasetError naming the file when it is missing or corrupt."""
        k = (dataset_id, index)
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        from app.sources.datasets import load_rgb

        image = load_rgb(self.path(dataset_id, index))
        self._cache[k] = image
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image

    def try_load(self, dataset_id: int, index: int) -> Any | None:
        """Like `load`, but a missing or broken file is noted in `problems` and gives None."""
        try:
            return self.load(dataset_id, index)
        except DatasetError as exc:
            key = self.key(dataset_id, index)
            if key not in self.problems:
                log.warning("export leaves out %s: %s", key, exc)
            self.problems[key] = exc.problem
            return None


# ---- exemplars -----------------------------------------------------------------------------------------------------
@dataclass
class Exemplar:
    layer_id: int
    unit: int
    rank: int  # 1 = the unit's strongest image
    dataset_id: int
    image_index: int
    score: float  # the unit's spatial maximum on the image
    map: np.ndarray  # [h, w] float32 at the layer's resolution
    threshold: float


class Exemplars:
    """Units' top images from extractions, with maps and the threshold at `quantile`; results are cached per
    (layer, extraction run)."""

    def __init__(self, project: Project, quantile: float = 0.99):
        self.project = project
        self.quantile = float(quantile)
        self._results: dict[tuple[int, int | None], Any] = {}

    def results(self, layer_id: int, run_id: int | None = None) -> Any | None:
        """The layer's newest extraction (or that of `run_id`, falling back to the newest when that one is gone);
        None when the layer was never extracted."""
        from app.engine.results import LayerResults

        k = (layer_id, run_id)
        if k not in self._results:
            res = None
            for rid in ([run_id, None] if run_id is not None else [None]):
                try:
                    res = LayerResults.load(self.project, layer_id, rid)
                    break
                except JobError:
                    continue
            self._results[k] = res
        return self._results[k]

    def thresholds(self, res: Any) -> np.ndarray:
        qs = sorted(res.quantiles)
        q = next((x for x in qs if math.isclose(x, self.quantile, abs_tol=1e-9)), None)
        if q is None:
            raise JobError(f"layer {res.layer['name']} was extracted without the {self.quantile} quantile "
                           f"(it has {', '.join(map(str, qs))})",
                           fix=f"export with --option quantile={qs[0]}, or extract the layer again with it")
        return np.asarray(res.quantiles[q], dtype=np.float32)

    def of_unit(self, layer_id: int, unit: int, k: int = 0, run_id: int | None = None) -> list[Exemplar]:
        res = self.results(layer_id, run_id)
        if res is None:
            return []
        thr = float(self.thresholds(res)[unit])
        idx = np.asarray(res.topk_index[unit])
        scores = np.asarray(res.topk_scores[unit], dtype=np.float64)
        n = len(idx) if k <= 0 else min(k, len(idx))
        valid = res.valid
        maps = np.asarray(res.topk_maps[unit, :n], dtype=np.float32)
        ds = int(res.stats["dataset_id"])
        return [Exemplar(layer_id=layer_id, unit=unit, rank=r + 1, dataset_id=ds, image_index=int(idx[r]),
                         score=float(scores[r]), map=maps[r], threshold=thr)
                for r in range(n) if math.isfinite(scores[r]) and bool(valid[int(idx[r])])]


def group_rows(project: Project, layer_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """Every member of every named (not 'unclear') group: group, annotator, pool, map position, image, unit."""
    rows = naming_store.group_members(project)
    if layer_ids is not None:
        rows = [r for r in rows if r["layer_id"] in layer_ids]
    return rows


class PoolMaps:
    """Maps and thresholds of naming pools (the arrays beside the database), opened once per pool."""

    def __init__(self, project: Project):
        self.project = project
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

    def get(self, pool_id: int, params: dict[str, Any], position: int) -> tuple[np.ndarray, float] | None:
        if pool_id not in self._arrays:
            from app.project import arrays

            d = self.project.path / str(params.get("array_dir", ""))
            if params.get("array_dir") and (d / "maps.npy").exists() and (d / "thresholds.npy").exists():
                self._arrays[pool_id] = (arrays.load_npy(d / "maps.npy"),
                                         arrays.load_npy(d / "thresholds.npy", mmap=False))
            else:
                log.warning("pool %d has no maps on disk (%s); its groups are left out", pool_id, d)
                self._arrays[pool_id] = None
        got = self._arrays[pool_id]
        if got is None:
            return None
        return np.asarray(got[0][position], dtype=np.float32), float(got[1][position])
