"""Concept regions as a COCO instances file: categories = concepts, one annotation per (concept, unit, image)
region with an RLE segmentation (pycocotools) of the thresholded activation map on the stored image.

Images are the exemplar images, named by their key relative to the dataset folder (`info.image_root`), so that
`pycocotools.coco.COCO(file)` and COCO-reading training code find them. Besides the standard fields each annotation
carries `layer`, `unit`, `score` (the unit's peak on the image), `methods` and `annotators`.
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import numpy as np

from app.errors import DatasetError, JobError
from app import imaging
from app.export.base import ExportContext, exporter
from app.export.conceptsets import PARAMS, ConceptSets


@exporter("coco", title="COCO instances (RLE regions)", target="file", suffix=".json", params=PARAMS)
def write_coco(ctx: ExportContext) -> dict[str, Any]:
    """Concept regions as COCO segmentation annotations (RLE), categories = concepts; loadable by pycocotools."""
    from pycocotools import mask as mask_utils

    opts = ctx.options
    sets = ConceptSets(ctx.project, opts)
    concepts = sets.gather()
    images: dict[tuple[int, int], dict[str, Any]] = {}
    roots: dict[int, str] = {}
    categories: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    total = sum(len(c.members) for c in concepts)
    done = empty = 0
    ctx.update(0, total, "regions")
    for concept in concepts:
        cat_id = len(categories) + 1
        used = False
        for m in concept.members:
            done += 1
            try:
                values = sets.values_on_image(m)
            except DatasetError as exc:
                sets.images.problems[sets.images.key(m.dataset_id, m.image_index)] = exc.problem
                continue
            mask = imaging.region(values, m.threshold)
            if not mask.any():
                empty += 1
                ctx.update(done, total, concept.name)
                continue
            k = (m.dataset_id, m.image_index)
            if k not in images:
                ds = sets.images.dataset(m.dataset_id)
                roots.setdefault(ds["name"], str(ds["image_root"]))
                w, h = sets.images.size(*k)
                images[k] = {"id": len(images) + 1, "file_name": sets.images.key(*k), "width": int(w),
                             "height": int(h), "dataset": ds["name"], "index": m.image_index}
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append({
                "id": len(annotations) + 1, "image_id": images[k]["id"], "category_id": cat_id,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [x, y, bw, bh], "iscrowd": 0,
                "model": m.layer.model, "layer": m.layer.layer, "unit": m.unit, "score": m.score,
                "threshold": m.threshold, "methods": sorted(m.methods), "annotators": sorted(m.annotators),
            })
            used = True
            ctx.update(done, total, concept.name)
        if used:
            categories.append({"id": cat_id, "name": concept.name,
                               "supercategory": concept.category or ("automatic" if any(
                                   x.methods for x in concept.members) else "human"),
                               "sources": concept.sources})
    if not annotations:
        raise JobError("no region of any concept lies above its threshold", fix="try a lower --option quantile")
    doc = {
        "info": {"description": f"Concept regions of {ctx.project.path.name}, exported by Neuron Studio",
                 "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "quantile": opts["quantile"],
                 "image_root": next(iter(roots.values())) if len(roots) == 1 else None,
                 "image_roots": roots},
        "licenses": [],
        "images": sorted(images.values(), key=lambda r: r["id"]),
        "categories": categories,
        "annotations": annotations,
    }
    with open(ctx.path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, ensure_ascii=False)
    return {"categories": len(categories), "images": len(images), "annotations": len(annotations),
            "empty_regions": empty, "missing_images": len(sets.images.problems)}
