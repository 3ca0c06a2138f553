"""Concept-set folders: one folder per concept (automatic label text, annotators' unit names, naming-board groups)
holding the exemplar images, the crops of their thresholded regions, or the images with everything outside the
region darkened; a `metadata.jsonl` with one line per file; and a dataset card `README.md`.

The layout is the Hugging Face `imagefolder` one (folder = class, `metadata.jsonl` with `file_name`), so
`datasets.load_dataset("imagefolder", data_dir=...)` reads it as it is.

A region is the unit's map placed on the stored image (bilinear, see `app.imaging`) and thresholded at the
unit's `quantile` activation (0.99 by default, as MILAN masks exemplars); a crop is the region's bounding box grown
by `margin` on each side. An exemplar whose region is empty (its peak lies below the threshold, or outside what
the model saw) gives no crop and is counted in the card.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from typing import Any

from app.errors import JobError
from app import imaging
from app.export.base import ExportContext, exporter
from app.export.common import safe_name
from app.export.conceptsets import PARAMS, ConceptSets, Member
from labelers.base import Param

MODES = ("crop", "masked", "image")


@exporter("concepts", title="Concept-set folders", target="folder", params=PARAMS + (
    Param("images", str, "crop", "crop: the region's bounding box; masked: the image with everything outside the "
                                 "region darkened; image: the exemplar image file as it is", choices=MODES),
    Param("margin", float, 0.1, "crops: grow the region's box by this fraction of its size on each side",
          minimum=0.0, maximum=2.0),
))
def write_concepts(ctx: ExportContext) -> dict[str, Any]:
    """One folder per concept with exemplar crops (or images), metadata.jsonl and a dataset card README.md."""
    opts = ctx.options
    sets = ConceptSets(ctx.project, opts)
    concepts = sets.gather()
    mode = opts["images"]
    images = sets.images
    total = sum(len(c.members) for c in concepts)
    done = 0
    empty = 0
    written: dict[str, int] = {}
    datasets: dict[int, str] = {}
    ctx.update(0, total, "concept sets")
    with open(ctx.path / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for concept in concepts:
            folder = ctx.path / concept.slug
            folder.mkdir()
            if mode == "image":  # one file per image and layer, listing every unit of the concept on it
                by_image: dict[tuple[int, int, int], list[Member]] = {}
                for m in concept.members:
                    by_image.setdefault((m.layer.layer_id, m.dataset_id, m.image_index), []).append(m)
                entries = list(by_image.values())
            else:
                entries = [[m] for m in concept.members]
            count = 0
            for members in entries:
                first = members[0]
                ds, idx = first.dataset_id, first.image_index
                datasets.setdefault(ds, ctx.project.dataset(ds)["name"])
                key = images.key(ds, idx)
                path = images.path(ds, idx)
                row: dict[str, Any] = {
                    "concept": concept.name, "category": concept.category or None, "image": key,
                    "image_path": str(path), "dataset": datasets[ds], "model": first.layer.model,
                    "layer": first.layer.layer, "units": sorted({m.unit for m in members}),
                    "methods": sorted({x for m in members for x in m.methods}),
                    "annotators": sorted({x for m in members for x in m.annotators}),
                    "score": max(m.score for m in members),
                    "label_scores": {k: v for m in members for k, v in m.label_scores.items()},
                }
                stem = f"{safe_name(first.layer.layer, 40)}_{idx:06d}_{safe_name(path.stem, 40)}"
                if mode == "image":
                    if not path.is_file():
                        images.problems[key] = "the image file is missing"
                        done += len(members)
                        continue
                    name = f"{stem}{path.suffix.lower()}"
                    shutil.copyfile(path, folder / name)
                else:
                    image = images.try_load(ds, idx)
                    if image is None:
                        done += 1
                        continue
                    values = sets.values_on_image(first, image.size)
                    mask = imaging.region(values, first.threshold)
                    if not mask.any():
                        empty += 1
                        done += 1
                        ctx.update(done, total, concept.name)
                        continue
                    if mode == "crop":
                        picture, box = imaging.crop_region(image, mask, opts["margin"])
                        row["bbox"] = list(box)
                    else:
                        picture = imaging.masked_image(image, mask)
                        row["bbox"] = list(imaging.bbox(mask))
                    row["region_pixels"] = int(mask.sum())
                    row["threshold"] = first.threshold
                    name = f"{stem}_u{first.unit}.png"
                    picture.save(folder / name, format="PNG")
                meta.write(json.dumps({"file_name": f"{concept.slug}/{name}", **row}, ensure_ascii=False) + "\n")
                count += 1
                done += len(members)
                ctx.update(done, total, concept.name)
            if count:
                written[concept.slug] = count
            else:
                folder.rmdir()
    if not written:
        raise JobError("no exemplar of any concept could be written (regions empty or image files missing)",
                       fix="check that the dataset's images are still in place, or use --option images=image")
    kept = [c for c in concepts if c.slug in written]
    _card(ctx, kept, written, datasets, empty, sets)
    return {"concepts": len(kept), "files": sum(written.values()), "empty_regions": empty,
            "missing_images": len(images.problems)}


def _card(ctx: ExportContext, concepts: list[Any], written: dict[str, int], datasets: dict[int, str], empty: int,
          sets: ConceptSets) -> None:
    opts = ctx.options
    project = ctx.project
    n_files = sum(written.values())
    size = ("n<1K" if n_files < 1000 else "1K<n<10K" if n_files < 10_000 else "10K<n<100K" if n_files < 100_000
            else "n>100K")
    models = sorted({m.layer.model for c in concepts for m in c.members})
    layers = sorted({f"{m.layer.model}/{m.layer.layer}" for c in concepts for m in c.members})
    mode = opts["images"]
    what = {"crop": "crops of the thresholded regions", "masked": "exemplar images with everything outside the "
            "thresholded region darkened", "image": "the exemplar images as they are"}[mode]
    lines = [
        "---",
        f"pretty_name: Concept sets of {', '.join(models)}",
        "task_categories:", "- image-classification",
        "size_categories:", f"- {size}",
        "configs:", "- config_name: default", "  data_files:", "  - split: train", "    path: \"**\"",
        "---", "",
        f"# Concept sets of {', '.join(models)}", "",
        f"Exported by Neuron Studio on {_dt.date.today().isoformat()} from the project `{project.path.name}`.",
        f"{len(concepts)} concepts, {n_files} files: {what}.", "",
        "## How the files were made", "",
        f"- Model(s): {', '.join(models)}; layers: {', '.join(layers)}.",
        f"- Images: dataset(s) {', '.join(sorted(set(datasets.values())))}.",
        "- Each concept is a name given to units: the label text of an automatic labeling method "
        "(rank <= {}), an annotator's name for a unit, or a group an annotator formed on the naming board. "
        "Names that differ only in case or spacing are one concept.".format(opts["max_rank"]),
        "- A unit contributes its top exemplars (the images where it fires most) from the extraction its labels "
        "came from; a group contributes the maps placed in it.",
        f"- Regions: the unit's activation map, upsampled bilinearly onto the image (through the model's resize "
        f"and centre crop), above the unit's {opts['quantile']} activation quantile"
        + (f"; crops are the region's bounding box grown by {opts['margin']:g} of its size per side." if mode == "crop"
           else "."),
    ]
    if empty:
        lines.append(f"- {empty} exemplars had no pixel above the threshold and gave no file.")
    if sets.images.problems:
        lines.append(f"- {len(sets.images.problems)} images could not be read and were left out "
                     f"(e.g. {next(iter(sets.images.problems))}).")
    lines += [
        "", "## Structure", "",
        "One folder per concept; `metadata.jsonl` has one line per file: `file_name` (relative to this folder), "
        "`concept`, `category`, `image` (the source image's key in its dataset), `image_path`, `dataset`, `model`, "
        "`layer`, `units`, `methods` (automatic labelers that gave this concept to the unit), `annotators` (people "
        "who did), `score` (the unit's peak activation on the image), `label_scores` (per method, the label's own "
        "score; scales differ between methods)" + (", `bbox` ([x0, y0, x1, y1] on the source image), "
                                                    "`region_pixels`, `threshold`." if mode != "image" else "."),
        "", "## Concepts", "", "| concept | folder | files | from |", "|---|---|---|---|",
    ]
    for c in concepts:
        name = c.name.replace("|", "\\|")
        lines.append(f"| {name} | {c.slug} | {written[c.slug]} | {', '.join(c.sources)} |")
    lines += [
        "", "## Limitations", "",
        "Automatic labels are hypotheses of their methods and can be wrong; a region shows where one unit fired, "
        "not a human-verified annotation. Check `methods`, `annotators` and the scores before training on these "
        "files. The images keep the license of their source dataset.", "",
    ]
    (ctx.path / "README.md").write_text("\n".join(lines), encoding="utf-8")
