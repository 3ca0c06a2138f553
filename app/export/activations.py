"""Per-image pooled activations of layers, as NumPy arrays with an index of images and units, and as Parquet.

Folder layout:
    images.csv              dataset, index, key, width, height: the rows of every array, in order
    units.csv               model, layer, unit, file, column, parquet_column, run_id, dataset
    <layer>.npy             [images, units] float32 (NaN rows: images the extraction could not read)
    <layer>.parquet         image_index, image, then one float32 column per unit (u0, u1, ...)
    README.md
"""
from __future__ import annotations

import csv
from typing import Any

import numpy as np

from app.errors import JobError
from app.export.base import ExportContext, exporter, split_names
from app.export.common import LAYERS, MODEL, Exemplars, layer_refs, safe_name
from app.project.arrays import create_rows
from labelers.base import Param

ROWS = 4096


@exporter("activations", title="Pooled activations (.npy + Parquet)", target="folder", params=(
    MODEL, LAYERS, Param("pooling", str, "max", "spatial pooling of each unit's map", choices=("max", "mean")),
    Param("parquet", bool, True, "also write a Parquet table per layer"),
))
def write_activations(ctx: ExportContext) -> dict[str, Any]:
    """Per-image pooled activations of each extracted layer as .npy, an index of images and units, and Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    project, opts = ctx.project, ctx.options
    ex = Exemplars(project)
    layers = [(ref, ex.results(ref.layer_id)) for ref in layer_refs(project, opts["model"] or None,
                                                                     split_names(opts["layers"]))]
    layers = [(ref, res) for ref, res in layers if res is not None]
    if not layers:
        raise JobError("none of the chosen layers has been extracted", fix="run `neuron-studio extract` first")
    datasets = sorted({int(res.stats["dataset_id"]) for _, res in layers})
    names: dict[str, int] = {}
    total = sum(res.pooled_max.shape[0] * (2 if opts["parquet"] else 1) for _, res in layers)
    done = 0
    with open(ctx.path / "images.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["dataset", "index", "key", "width", "height"])
        for ds_id in datasets:
            name = project.dataset(ds_id)["name"]
            for r in project.images(ds_id):
                w.writerow([name, r["idx"], r["key"], r["width"] or "", r["height"] or ""])
    unit_rows = []
    files: list[str] = []
    for ref, res in layers:
        base = safe_name(ref.layer)
        if base in names:  # two layers whose names differ only in unsafe characters
            names[base] += 1
            base = f"{base}-{names[base]}"
        names.setdefault(base, 0)
        files.append(base)
        pooled = res.pooled_max if opts["pooling"] == "max" else res.pooled_mean
        n, u = pooled.shape
        out = create_rows(ctx.path / f"{base}.npy", (n, u), np.float32)
        for s in range(0, n, ROWS):
            out[s:s + ROWS] = np.asarray(pooled[s:s + ROWS], dtype=np.float32)
            done += min(ROWS, n - s)
            ctx.update(done, total, f"{ref.layer}: npy")
        out.flush()
        del out
        ds_id = int(res.stats["dataset_id"])
        for unit in range(u):
            unit_rows.append([ref.model, ref.layer, unit, f"{base}.npy", unit,
                              f"u{unit}" if opts["parquet"] else "", res.run_id, project.dataset(ds_id)["name"]])
        if opts["parquet"]:
            keys = project.image_keys(ds_id)
            schema = pa.schema([pa.field("image_index", pa.int64()), pa.field("image", pa.string())]
                               + [pa.field(f"u{j}", pa.float32()) for j in range(u)])
            with pq.ParquetWriter(str(ctx.path / f"{base}.parquet"), schema, compression="zstd") as writer:
                for s in range(0, n, ROWS):
                    block = np.asarray(pooled[s:s + ROWS], dtype=np.float32)
                    cols = [pa.array(np.arange(s, s + len(block), dtype=np.int64)), pa.array(keys[s:s + len(block)])]
                    cols += [pa.array(block[:, j]) for j in range(u)]
                    writer.write_table(pa.Table.from_arrays(cols, schema=schema))
                    done += len(block)
                    ctx.update(done, total, f"{ref.layer}: parquet")
    with open(ctx.path / "units.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["model", "layer", "unit", "file", "column", "parquet_column", "run_id", "dataset"])
        w.writerows(unit_rows)
    lines = [
        "# Pooled activations", "",
        f"Exported by Neuron Studio from `{project.path}`: the spatial {opts['pooling']} of every unit's map on "
        "every image, as the extraction computed it (float32).", "",
        "| layer | file | images x units | extraction run |", "|---|---|---|---|",
    ]
    for (ref, res), base in zip(layers, files):
        shape = res.pooled_max.shape
        lines.append(f"| {ref.layer} | {base}.npy | {shape[0]} x {shape[1]} | {res.run_id} |")
    lines += [
        "", "Rows follow `images.csv` (dataset order); a row of NaN is an image the extraction could not read.",
        "`units.csv` maps each array column to its layer and unit; Parquet files hold the same values with columns "
        "`image_index`, `image` and `u0`, `u1`, ...", "",
        "```python", "import numpy as np, pyarrow.parquet as pq",
        f"acts = np.load('{files[0]}.npy')",
        f"table = pq.read_table('{files[0]}.parquet')" if opts["parquet"] else "", "```", "",
    ]
    (ctx.path / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return {"layers": len(layers), "units": len(unit_rows)}
