"""The files other interpretability tools write, so that their scripts and plots read our labels:

- netdissect-tally: NetDissect-Lite's `tally.csv` for one layer: `unit,category,label,score` (unit 1-based, units
  sorted by score, best first), then per category `{cat}-label,{cat}-truth,{cat}-activation,{cat}-intersect,
  {cat}-iou` from the best label the unit has in that category (truth = the concept's pixels, activation = the
  unit's active pixels where the category is annotated, both from the extraction's mask counts).
- clip-dissect-csv: CLIP-Dissect's `descriptions.csv`: `layer,unit,description,similarity` (unit 0-based).
- milan-csv: MILAN's descriptions CSV: `layer,unit,description` (unit 0-based), each unit's best description.
- invert-csv: INVERT / CoSy's `neuron,concept,concept_id,metric`: the formula, the same formula over concept indices
  of the dataset vocabulary, and its AUC.
"""
from __future__ import annotations

import csv
import math
from typing import Any

from app.errors import JobError
from app.export.base import ExportContext, exporter, split_names
from app.export.common import LAYERS, MODEL, layer_refs
from app.project.labels import labeled_layers
from app.project.store import Project
from labelers.base import Param

LAYER = Param("layer", str, "", "the layer (default: the only layer labeled by the method)")


def _method(default: str) -> Param:
    return Param("method", str, default, "labeling method whose labels are written")


MAX_RANK1 = Param("max_rank", int, 1, "labels of rank <= this per unit", minimum=1)


def _one_layer(project: Project, model: str | None, layer: str, method: str) -> dict[str, Any]:
    """The layer to write: the named one, or the only one with labels of `method`."""
    refs = layer_refs(project, model or None, [layer] if layer else None)
    labeled = labeled_layers(project, method)
    have = [r for r in refs if r.layer_id in labeled]
    if layer:
        if not have:
            raise JobError(f"layer {layer} has no {method} labels", fix=f"run `neuron-studio label --method {method}`")
        return have[0].__dict__
    if not have:
        raise JobError(f"the project has no {method} labels", fix=f"run `neuron-studio label --method {method}` first")
    if len(have) > 1:
        raise JobError(f"several layers have {method} labels ({', '.join(r.layer for r in have)})",
                       fix="name one with --option layer=NAME")
    return have[0].__dict__


def _write_rows(ctx: ExportContext, header: list[str], rows: list[list[Any]]) -> None:
    with open(ctx.path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for i in range(0, len(rows), 500):
            w.writerows(rows[i:i + 500])
            ctx.update(min(i + 500, len(rows)), len(rows), "rows")
        ctx.update(len(rows), len(rows), "rows")


def _fmt(v: Any) -> Any:
    return "" if v is None else (repr(float(v)) if isinstance(v, float) else v)


@exporter("netdissect-tally", title="NetDissect tally.csv", target="file", suffix=".csv",
          params=(MODEL, LAYER, _method("netdissect")))
def netdissect_tally(ctx: ExportContext) -> dict[str, Any]:
    """NetDissect-Lite's tally.csv of one layer: unit (1-based), category, label, score, and per-category columns."""
    from app.engine.results import LayerResults

    project, opts = ctx.project, ctx.options
    layer = _one_layer(project, opts["model"], opts["layer"], opts["method"])
    labels = project.labels(layer_id=layer["layer_id"], method=opts["method"])
    run = project.run(labels[0]["run_id"]) if labels else None
    ds = project.dataset(run.dataset_id) if run and run.dataset_id else None
    categories = list(ds["categories"]) if ds and ds["categories"] else []
    for lab in labels:
        if lab["category"] and lab["category"] not in categories:
            categories.append(lab["category"])
    counts = None
    if run is not None and run.source_run_id is not None:
        try:
            res = LayerResults.load(project, layer["layer_id"], run.source_run_id)
        except JobError:
            res = None
        if res is not None and res.has_mask_counts and ds is not None:
            counts = res.mask_counts(list(ds["categories"]))
    by_unit: dict[int, list[dict[str, Any]]] = {}
    for lab in labels:
        by_unit.setdefault(lab["unit"], []).append(lab)
    rows = []
    for unit in range(layer["units"]):
        labs = sorted(by_unit.get(unit, []), key=lambda r: r["rank"])
        top = labs[0] if labs else None
        row: dict[str, Any] = {"unit": unit + 1, "category": top["category"] if top else "",
                               "label": top["label"] if top else "", "score": float(top["score"]) if top else 0.0}
        for cat in categories:
            best = max((lab for lab in labs if lab["category"] == cat), key=lambda r: r["score"], default=None)
            if best is None:
                continue
            row[f"{cat}-label"] = best["label"]
            row[f"{cat}-iou"] = float(best["score"])
            extra = best["extra"]
            if "intersection" in extra:
                row[f"{cat}-intersect"] = float(extra["intersection"])
            c = extra.get("concept_index")
            if counts is not None and isinstance(c, int) and 0 <= c < counts.concept_area.shape[0]:
                row[f"{cat}-truth"] = float(counts.concept_area[c])
                if cat in counts.categories:
                    row[f"{cat}-activation"] = float(counts.unit_area[unit, counts.categories.index(cat)])
        rows.append(row)
    rows.sort(key=lambda r: (-r["score"], r["unit"]))  # the reference lists units by score, best first
    parts = ("label", "truth", "activation", "intersect", "iou")
    header = ["unit", "category", "label", "score"] + [f"{cat}-{part}" for cat in categories for part in parts]
    _write_rows(ctx, header, [[_fmt(r.get(h)) for h in header] for r in rows])
    return {"units": len(rows), "labeled": sum(1 for r in rows if r["label"])}


@exporter("clip-dissect-csv", title="CLIP-Dissect descriptions.csv", target="file", suffix=".csv",
          params=(MODEL, LAYERS, _method("clip_dissect"), MAX_RANK1))
def clip_dissect_csv(ctx: ExportContext) -> dict[str, Any]:
    """CLIP-Dissect's descriptions.csv: layer, unit (0-based), description, similarity."""
    project, opts = ctx.project, ctx.options
    refs = layer_refs(project, opts["model"] or None, split_names(opts["layers"]))
    rows = []
    for ref in refs:
        for lab in project.labels(layer_id=ref.layer_id, method=opts["method"], max_rank=opts["max_rank"]):
            rows.append([ref.layer, lab["unit"], lab["label"], repr(float(lab["score"]))])
    if not rows:
        raise JobError(f"the chosen layers have no {opts['method']} labels",
                       fix=f"run `neuron-studio label --method {opts['method']}` first")
    _write_rows(ctx, ["layer", "unit", "description", "similarity"], rows)
    return {"rows": len(rows)}


@exporter("milan-csv", title="MILAN descriptions CSV", target="file", suffix=".csv",
          params=(MODEL, LAYERS, _method("milan")))
def milan_csv(ctx: ExportContext) -> dict[str, Any]:
    """MILAN's descriptions CSV: layer, unit (0-based), description (each unit's best by wpmi)."""
    project, opts = ctx.project, ctx.options
    refs = layer_refs(project, opts["model"] or None, split_names(opts["layers"]))
    rows = [[ref.layer, lab["unit"], lab["label"]]
            for ref in refs for lab in project.labels(layer_id=ref.layer_id, method=opts["method"], max_rank=1)]
    if not rows:
        raise JobError(f"the chosen layers have no {opts['method']} descriptions",
                       fix=f"run `neuron-studio label --method {opts['method']}` first")
    _write_rows(ctx, ["layer", "unit", "description"], rows)
    return {"rows": len(rows)}


@exporter("invert-csv", title="INVERT / CoSy explanations CSV", target="file", suffix=".csv",
          params=(MODEL, LAYER, _method("invert"), MAX_RANK1))
def invert_csv(ctx: ExportContext) -> dict[str, Any]:
    """INVERT / CoSy's CSV of one layer: neuron (0-based), concept (formula), concept_id, metric (AUC)."""
    from labelers.formulas import parse

    project, opts = ctx.project, ctx.options
    layer = _one_layer(project, opts["model"], opts["layer"], opts["method"])
    labels = project.labels(layer_id=layer["layer_id"], method=opts["method"], max_rank=opts["max_rank"])
    names: list[str] = []
    if labels:
        run = project.run(labels[0]["run_id"])
        if run.dataset_id:
            names = [c["name"] for c in project.concepts(run.dataset_id)]
    ids = [str(i) for i in range(len(names))]
    rows = []
    for lab in labels:
        text = lab["formula"] or lab["label"]
        try:
            concept_id = parse(text, names).text(ids) if names else ""
        except (ValueError, KeyError, IndexError):
            concept_id = ""  # a label that is not a formula over this dataset's concepts
        metric = lab["extra"].get("auc", lab["score"])
        rows.append([lab["unit"], text, concept_id, repr(float(metric)) if math.isfinite(metric) else "nan"])
    _write_rows(ctx, ["neuron", "concept", "concept_id", "metric"], rows)
    return {"rows": len(rows)}


__all__ = ["netdissect_tally", "clip_dissect_csv", "invert_csv"]
