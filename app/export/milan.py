"""Unit descriptions in the MILANNOTATIONS style, to train or evaluate a MILAN-style captioner: per unit its layer,
its exemplar images (the dataset keys of its top-k images) and the list of human descriptions.

    {"format": "milannotations", "model": ..., "dataset": ..., "quantile": 0.99,
     "units": [{"layer": "layer4", "unit": 12, "exemplars": ["a/1.jpg", ...], "exemplar_scores": [...],
                "descriptions": ["red stripes", ...], "annotators": ["alice", ...]}, ...]}

MILAN's own release keeps the masked top images in arrays; here the exemplars are named, and the masks follow
from the project (threshold at the unit's `quantile` activation). `app.export.imports.import_milan` reads this
file, a bare list of such records, or records with a single `description`/`summary` string.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from app.export.base import ExportContext, exporter, split_names
from app.export.common import ANNOTATORS, LAYERS, MODEL, Exemplars, layer_refs
from labelers.base import Param


@exporter("milan", title="MILANNOTATIONS-style descriptions (JSON)", target="file", suffix=".json", params=(
    MODEL, LAYERS, ANNOTATORS,
    Param("exemplars", int, 15, "exemplar images named per unit (MILAN: 15)", minimum=0),
    Param("all_units", bool, False, "also list units without any description (with an empty list)"),
    Param("include_names", bool, False, "count annotators' unit names as descriptions too"),
))
def write_milan(ctx: ExportContext) -> dict[str, Any]:
    """Per unit: layer, unit, exemplar image keys and the list of human descriptions (JSON)."""
    project, opts = ctx.project, ctx.options
    model = project.model(opts["model"] or None)
    refs = layer_refs(project, model["name"], split_names(opts["layers"]))
    annotators = split_names(opts["annotators"])
    kinds = ("description", "name") if opts["include_names"] else ("description",)
    texts: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for r in sorted(project.annotations(),
                    key=lambda a: (a["layer_id"], a["unit"], a["annotator"], a["created_at"], a["id"])):
        if r["kind"] in kinds and (annotators is None or r["annotator"] in annotators):
            texts.setdefault((r["layer_id"], r["unit"]), []).append((r["text"], r["annotator"]))
    ex = Exemplars(project)
    datasets: set[str] = set()
    records = []
    total = sum(ref.units for ref in refs)
    done = 0
    ctx.update(0, total, "units")
    for ref in refs:
        res = ex.results(ref.layer_id)
        if res is not None:
            ds_id = int(res.stats["dataset_id"])
            datasets.add(project.dataset(ds_id)["name"])
            keys = project.image_keys(ds_id)
        for unit in range(ref.units):
            done += 1
            got = texts.get((ref.layer_id, unit), [])
            if not got and not opts["all_units"]:
                continue
            rec: dict[str, Any] = {"layer": ref.layer, "unit": unit, "exemplars": [], "exemplar_scores": []}
            if res is not None and opts["exemplars"]:
                idx = np.asarray(res.topk_index[unit][: opts["exemplars"]])
                scores = np.asarray(res.topk_scores[unit][: opts["exemplars"]], dtype=np.float64)
                keep = [i for i in range(len(idx)) if math.isfinite(scores[i]) and res.valid[int(idx[i])]]
                rec["exemplars"] = [keys[int(idx[i])] for i in keep]
                rec["exemplar_scores"] = [float(scores[i]) for i in keep]
            rec["descriptions"] = [t for t, _ in got]
            rec["annotators"] = [a for _, a in got]
            records.append(rec)
            if done % 256 == 0:
                ctx.update(done, total, "units")
        ctx.update(done, total, ref.layer)
    doc = {"format": "milannotations", "model": model["name"], "dataset": ", ".join(sorted(datasets)),
           "units": records}
    with open(ctx.path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    return {"units": len(records), "descriptions": sum(len(r["descriptions"]) for r in records)}
