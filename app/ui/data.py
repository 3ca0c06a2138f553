"""What the views show, read from a project. No Qt here, so it is testable on its own and cheap to run on a pool
thread: each call takes a `Project` opened by the calling thread (a Project is not shared between threads).

Reads are queries against the store's connection; the column-wise results are numpy arrays so that sorting and
filtering 10,000 units in the table never loops over units in Python.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.audit import query_terms, terms_match, unit_terms
from app.project import labels as label_store
from app.project.labels import latest_label_runs
from app.project.store import Project

log = logging.getLogger(__name__)

# How each method says a unit is "interpretable", in the order looked for in its labels' extra fields. Methods
# that report none of these are counted as labeled, and the overview says so.
CRITERIA = (
    ("interpretable", "IoU at or above the method's threshold"),
    ("significant", "significant after multiple-test correction"),
)
P_VALUE_ALPHA = 0.05
# The pooled arrays are [images, units] row-major on disk: one unit's column touches a page per row. Above this
# many images the histogram counts a regular sample of rows, so a click stays interactive on a million images.
HISTOGRAM_ROWS = 50_000
NO_CATEGORY = "(none)"


@dataclass
class MethodColumn:
    """The best (rank 1) label of every unit for one method, index-aligned with `UnitTable.units`."""

    method: str
    run_id: int
    text: list[str]
    score: np.ndarray  # float64, NaN where the unit has no label
    p_value: np.ndarray  # float64, NaN where none
    category: list[str]
    interpretable: np.ndarray  # bool
    has_label: np.ndarray  # bool
    has_p: bool
    criterion: str  # '' when the method reports no interpretability test
    criterion_help: str


@dataclass
class UnitTable:
    layer_id: int
    layer: str
    units: np.ndarray  # int64 unit indices, in table row order (= unit order)
    unit_ids: np.ndarray  # int64 ids of the units rows
    names: list[str]  # human name per unit ('' when none)
    methods: list[MethodColumn]
    haystack: list[str]  # lower-case text searched by the filter: every label of every method, and the name
    _terms: list[tuple[frozenset[str], frozenset[str]]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.units)

    def terms(self) -> list[tuple[frozenset[str], frozenset[str]]]:
        """Per unit, the words its labels and names assert and the words they negate (read once, then kept)."""
        if self._terms is None:
            self._terms = [unit_terms(h.split(" | ")) for h in self.haystack]
        return self._terms

    def matching(self, query: str) -> np.ndarray:
        """Which units match a search, by the word rule `neuron-studio find` uses (app.audit.terms_match): every
        query word a word of a label or name, `NOT word` or `-word` a negated atom of a formula, so "star" does not
        find "NOT star"; plurals match singulars ("circles" finds "circle"). An empty query matches nothing."""
        wanted = query_terms(query)
        terms = self.terms()
        return np.fromiter((terms_match(wanted, t) for t in terms), dtype=bool, count=len(terms))

    def method(self, name: str) -> MethodColumn | None:
        return next((m for m in self.methods if m.method == name), None)


def load_unit_table(project: Project, layer_id: int) -> UnitTable:
    layer = project.layer_by_id(layer_id)
    if layer is None:
        raise KeyError(layer_id)
    unit_rows = label_store.unit_indices(project, layer_id)
    n = len(unit_rows)
    unit_ids = np.fromiter((r[0] for r in unit_rows), dtype=np.int64, count=n)
    units = np.fromiter((r[1] for r in unit_rows), dtype=np.int64, count=n)
    pos = {int(i): k for k, i in enumerate(units)}
    names = [""] * n
    # Several annotators may name a unit: every name is shown with its author, none hides another.
    by_unit: dict[int, list[str]] = {}
    for idx, annotator, text in label_store.unit_names_by_annotator(project, layer_id):
        if idx in pos:
            by_unit.setdefault(pos[idx], []).append(f"{text} ({annotator})")
    for k, shown in by_unit.items():
        names[k] = " · ".join(shown)
    runs = latest_label_runs(project, layer_id)
    methods = [_method_column(project, method, run_id, pos, n) for method, run_id in runs.items()]
    haystack = [nm.lower() for nm in names]
    raw = list(names)  # formulas keep their upper-case AND / OR / NOT for the word search
    for idx, texts in label_store.label_texts(project, list(runs.values())):
        k = pos.get(idx)
        if k is not None and texts:
            haystack[k] = f"{haystack[k]} | {texts.lower()}"
            raw[k] = f"{raw[k]} | {texts}"
    table = UnitTable(layer_id, layer["name"], units, unit_ids, names, methods, haystack)
    # here, on the loading thread, not on the first keystroke
    table._terms = [unit_terms(r.split(" | ")) for r in raw]
    return table


def unit_notes(project: Project, layer_id: int, unit: int) -> list[dict[str, Any]]:
    """Every annotator's name and descriptions of a unit, for the unit view."""
    return label_store.unit_notes(project, layer_id, unit)


def _method_column(project: Project, method: str, run_id: int, pos: dict[int, int], n: int) -> MethodColumn:
    text = [""] * n
    category = [""] * n
    score = np.full(n, np.nan)
    p_value = np.full(n, np.nan)
    flag_interp = np.zeros(n, dtype=np.int8) - 1  # -1: key absent
    flag_signif = np.zeros(n, dtype=np.int8) - 1
    has = np.zeros(n, dtype=bool)
    rows = label_store.top_labels(project, run_id)
    for idx, t, s, p, c, fi, fs in rows:
        k = pos.get(idx)
        if k is None:
            continue
        has[k] = True
        text[k] = t
        score[k] = s
        if p is not None:
            p_value[k] = p
        category[k] = c or ""
        if fi is not None:
            flag_interp[k] = int(bool(fi))
        if fs is not None:
            flag_signif[k] = int(bool(fs))
    has_p = bool(np.isfinite(p_value).any())
    if (flag_interp >= 0).any():
        criterion, helptext = CRITERIA[0]
        interpretable = flag_interp == 1
    elif (flag_signif >= 0).any():
        criterion, helptext = CRITERIA[1]
        interpretable = flag_signif == 1
    elif has_p:
        criterion, helptext = "p_value", f"p-value at most {P_VALUE_ALPHA}"
        interpretable = np.nan_to_num(p_value, nan=1.0) <= P_VALUE_ALPHA
    else:
        criterion, helptext = "", "the method reports no interpretability test: every labeled unit is counted"
        interpretable = has.copy()
    return MethodColumn(method, run_id, text, score, p_value, category, interpretable & has, has, has_p,
                        criterion, helptext)


@dataclass
class MethodOverview:
    method: str
    criterion: str
    criterion_help: str
    labeled: int
    interpretable: int
    by_category: dict[str, int]


@dataclass
class LayerOverviewData:
    layer: str
    units: int
    methods: list[MethodOverview]
    categories: list[str]  # every category that occurs, most frequent first


def layer_overview(table: UnitTable) -> LayerOverviewData:
    """Interpretable units per method and concept category of their best label (no query: from the table)."""
    out = []
    totals: Counter[str] = Counter()
    for m in table.methods:
        cats: Counter[str] = Counter()
        for k in np.nonzero(m.interpretable)[0]:
            cats[m.category[k] or NO_CATEGORY] += 1
        totals.update(cats)
        out.append(MethodOverview(m.method, m.criterion, m.criterion_help, int(m.has_label.sum()),
                                  int(m.interpretable.sum()), dict(cats)))
    categories = [c for c, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]
    return LayerOverviewData(table.layer, len(table), out, categories)


def unit_labels(project: Project, layer_id: int, unit: int) -> dict[str, list[dict[str, Any]]]:
    """Every ranked label of one unit, per method (newest finished run of each method)."""
    import json

    runs = latest_label_runs(project, layer_id)
    if not runs:
        return {}
    rows = label_store.unit_label_rows(project, layer_id, unit, list(runs.values()))
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in runs}
    for r in rows:
        r["extra"] = json.loads(r["extra"]) if r["extra"] else {}
        out[r["method"]].append(r)
    return out


# ---- one layer's extraction, for the unit view -------------------------------------------------------------------
@dataclass
class Exemplar:
    rank: int
    image: int  # index of the image in its dataset
    key: str
    score: float  # the unit's spatial maximum on this image
    map: np.ndarray  # [h, w] float32 activation map at the layer's resolution


@dataclass
class Histogram:
    counts: np.ndarray
    edges: np.ndarray
    threshold: float  # the unit's map threshold (top quantile used by Network Dissection)
    threshold_quantile: float
    images: int  # images counted (a regular sample when the dataset is larger than `HISTOGRAM_ROWS`)
    pooling: str
    total_images: int = 0


@dataclass
class LayerView:
    """What the unit view needs from one extracted layer; built once per layer on a pool thread."""

    project_path: Path
    layer: dict[str, Any]
    dataset: dict[str, Any]
    preprocess: dict[str, Any]
    concepts: list[dict[str, Any]]
    image_keys: list[str]
    run_id: int
    thresholds: np.ndarray  # [U] per-unit threshold at `threshold_quantile`
    threshold_quantile: float
    topk_index: np.ndarray  # [U, k]
    topk_scores: np.ndarray  # [U, k]
    results: Any  # app.engine.results.LayerResults (memory-mapped arrays, opened lazily)
    has_masks: bool
    _source: "ImageSource | None" = field(default=None, repr=False)

    @classmethod
    def load(cls, project: Project, layer_id: int) -> "LayerView":
        from app.engine.results import LayerResults

        results = LayerResults.load(project, layer_id)
        ds = project.dataset(results.stats["dataset_id"])
        model = project.model(results.stats["model_id"])
        q = float(results.meta["iou_quantile"])
        try:
            thresholds = np.asarray(results.threshold(q), dtype=np.float32)
        except Exception:  # an extraction without that quantile: the highest one it has
            q = max(results.quantiles)
            thresholds = np.asarray(results.quantiles[q], dtype=np.float32)
        layer = dict(results.layer)
        return cls(
            project_path=Path(project.path), layer=layer, dataset=ds, preprocess=dict(model["preprocess"] or {}),
            concepts=project.concepts(ds["id"]), image_keys=project.image_keys(ds["id"]), run_id=results.run_id,
            thresholds=thresholds, threshold_quantile=q, topk_index=np.asarray(results.topk_index),
            topk_scores=np.asarray(results.topk_scores, dtype=np.float32), results=results,
            has_masks=bool(results.has_mask_counts and ds["has_masks"]),
        )

    @property
    def units(self) -> int:
        return int(self.layer["units"])

    @property
    def source(self) -> "ImageSource":
        if self._source is None:
            self._source = ImageSource(self.dataset)
        return self._source

    def exemplars(self, unit: int) -> list[Exemplar]:
        maps = np.asarray(self.results.topk_maps[unit], dtype=np.float32)  # [k, h, w]
        out = []
        for r, (img, s) in enumerate(zip(self.topk_index[unit].tolist(), self.topk_scores[unit].tolist())):
            if not np.isfinite(s):  # fewer images than k
                continue
            key = self.image_keys[img] if 0 <= img < len(self.image_keys) else str(img)
            out.append(Exemplar(r + 1, int(img), key, float(s), maps[r]))
        return out

    def histogram(self, unit: int, bins: int = 60, pooling: str = "max") -> Histogram:
        pooled = self.results.pooled_max if pooling == "max" else self.results.pooled_mean
        n = pooled.shape[0]
        step = max(1, -(-n // HISTOGRAM_ROWS))
        col = np.asarray(pooled[::step, unit], dtype=np.float64)
        col = col[np.isfinite(col)]
        total = int(self.results.valid.sum()) if step > 1 else int(col.size)
        thr = float(self.thresholds[unit])
        if col.size == 0:
            return Histogram(np.zeros(0), np.zeros(1), thr, self.threshold_quantile, 0, pooling, total)
        lo, hi = float(col.min()), float(col.max())
        hi = max(hi, thr) if np.isfinite(thr) else hi
        if hi <= lo:
            hi = lo + 1e-6
        counts, edges = np.histogram(col, bins=bins, range=(lo, hi))
        return Histogram(counts, edges, thr, self.threshold_quantile, int(col.size), pooling, total)


class ImageSource:
    """Finds and reads the images (and concept masks) of a dataset for display, from any thread.

    The dataset reader is opened at most once (the way the engine opens it), and only when the cheap path
    (root / key) is not enough: masks, or images whose keys are not paths below the root.
    """

    def __init__(self, dataset: dict[str, Any]):
        self.dataset = dataset
        self.root = Path(dataset["root"])
        self._reader: Any = None
        self._lock = threading.Lock()

    def reader(self) -> Any:
        with self._lock:
            if self._reader is None:
                from app.engine.extract import open_project_dataset

                self._reader = open_project_dataset(self.dataset)
            return self._reader

    def path(self, index: int, key: str) -> Path:
        direct = Path(key) if Path(key).is_absolute() else self.root / key
        if key and direct.is_file():
            return direct
        return Path(self.reader().images[index].path)

    def load(self, index: int, key: str) -> Any:
        from app.sources.datasets import load_rgb

        return load_rgb(self.path(index, key))

    def concept_mask(self, index: int, concept: int, size: tuple[int, int]) -> np.ndarray | None:
        """The concept's mask on image `index` at size=(H, W), or None where the image does not contain it."""
        reader = self.reader()
        if not getattr(reader, "has_masks", False):
            return None
        cidx, masks = reader.masks(index, size)
        cidx = np.asarray(cidx).tolist()
        if concept not in cidx:
            return None
        return np.asarray(masks[cidx.index(concept)], dtype=bool)
