"""Tables of labels and of human annotations, as CSV, JSON Lines and Parquet, with stable column names.

labels: one row per label of a labeling run (by default the newest finished run per layer and method):
    model, layer, unit, method, rank, label, score, p_value, formula, category, run_id, extra
annotations: one row per unit name and per unit description, and one row per map placed in a named group on a
naming board (a group with no maps gets one row with empty unit and image):
    model, layer, unit, kind, text, annotator, created_at, updated_at, pool, pool_kind, group_position, unclear,
    image, map_score, added_at
    kind is 'name', 'description' or 'group' (then text is the group's name and unit/image/map_score the map's).

`extra` is a JSON object: nested in JSON Lines, a JSON string in CSV and Parquet. In CSV an empty cell is a
missing value. Rows come in a fixed order (model, layer position, unit, ...), so that the same content always
writes the same bytes; `app.export.imports` reads all three back.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from app.export.base import ExportContext, exporter, split_names
from app.export.common import ANNOTATORS, LAYERS, METHODS, MODEL
from app.project import naming as naming_store
from app.project.store import Project
from labelers.base import Param

LABEL_COLUMNS = ("model", "layer", "unit", "method", "rank", "label", "score", "p_value", "formula", "category",
                 "run_id", "extra")
ANNOTATION_COLUMNS = ("model", "layer", "unit", "kind", "text", "annotator", "created_at", "updated_at", "pool",
                      "pool_kind", "group_position", "unclear", "image", "map_score", "added_at")
ANNOTATION_KINDS = ("name", "description", "group")

# Column types, shared by the Parquet schema and by the importer that parses CSV cells.
COLUMN_TYPES: dict[str, str] = {
    "model": "str", "layer": "str", "unit": "int", "method": "str", "rank": "int", "label": "str", "score": "float",
    "p_value": "float", "formula": "str", "category": "str", "run_id": "int", "extra": "json", "kind": "str",
    "text": "str", "annotator": "str", "created_at": "str", "updated_at": "str", "pool": "str", "pool_kind": "str",
    "group_position": "int", "unclear": "bool", "image": "str", "map_score": "float", "added_at": "str",
}
CHUNK = 500

LATEST = Param("latest_only", bool, True, "only the newest finished run per layer and method (false: every run)")
MAX_RANK = Param("max_rank", int, 0, "only labels of rank <= this (0: every rank)", minimum=0)
LABEL_PARAMS = (MODEL, LAYERS, METHODS, MAX_RANK, LATEST)
ANNOTATION_PARAMS = (MODEL, LAYERS, ANNOTATORS, Param("kinds", str, "all", "comma-separated: name, description, group"))


# ---- rows ----------------------------------------------------------------------------------------------------------
def label_rows(project: Project, options: dict[str, Any]) -> list[dict[str, Any]]:
    model = options.get("model") or None
    layers = split_names(options.get("layers"))
    methods = split_names(options.get("methods"))
    max_rank = int(options.get("max_rank") or 0) or None
    rows = project.labels(max_rank=max_rank, latest_only=bool(options.get("latest_only", True)))
    position = {r["id"]: r["position"] for m in project.models() for r in project.layers(m["id"])}
    out = []
    for r in rows:
        if (model and r["model"] != model) or (layers and r["layer"] not in layers):
            continue
        if methods and r["method"] not in methods:
            continue
        r["_order"] = (r["model"], position[r["layer_id"]], r["unit"], r["method"], r["run_id"], r["rank"])
        out.append(r)
    out.sort(key=lambda r: r["_order"])
    return [{c: r[c] for c in LABEL_COLUMNS} for r in out]


def annotation_rows(project: Project, options: dict[str, Any]) -> list[dict[str, Any]]:
    model = options.get("model") or None
    layers = split_names(options.get("layers"))
    annotators = split_names(options.get("annotators"))
    kinds = split_names(options.get("kinds")) or list(ANNOTATION_KINDS)
    bad = [k for k in kinds if k not in ANNOTATION_KINDS]
    if bad:
        from app.errors import JobError

        raise JobError(f"no annotation kind {bad[0]!r}", fix=f"use some of: {', '.join(ANNOTATION_KINDS)}")
    rows: list[dict[str, Any]] = []
    if {"name", "description"} & set(kinds):
        annotations = [{k: a[k] for k in ("model", "layer", "position", "unit", "kind", "text", "annotator",
                                          "created_at", "updated_at", "id")} for a in project.annotations()]
        annotations.sort(key=lambda a: (a["model"], a["position"], a["unit"], a["kind"], a["annotator"],
                                        a["created_at"], a["id"]))
        for r in annotations:
            del r["id"]
            if r["kind"] in kinds:
                rows.append(r | {"_order": (r["model"], r["position"], 0, r["unit"], r["kind"], r["annotator"],
                                            r["created_at"], "", 0, "")})
    if "group" in kinds:
        for r in naming_store.group_table(project):
            r["kind"] = "group"
            r["unclear"] = bool(r["unclear"])
            # Groups come after the unit rows of their layer, ordered by pool, board and map (image, unit):
            # never by database ids, which differ between projects.
            r["_order"] = (r["model"], r["position"], 1, r["pool"], r["pool_kind"], r["annotator"],
                           r["group_position"], r["created_at"], r["text"], r["image"] or "",
                           -1 if r["unit"] is None else r["unit"])
            rows.append(r)
    out = []
    for r in rows:
        if (model and r["model"] != model) or (layers and r["layer"] not in layers):
            continue
        if annotators and r["annotator"] not in annotators:
            continue
        out.append(r)
    out.sort(key=lambda r: tuple("" if v is None else v for v in r["_order"]))
    return [{c: r.get(c) for c in ANNOTATION_COLUMNS} for r in out]


# ---- writers -------------------------------------------------------------------------------------------------------
def _cell(value: Any, column: str) -> str:
    if value is None:
        return ""
    if COLUMN_TYPES[column] == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if COLUMN_TYPES[column] == "bool":
        return "true" if value else "false"
    if COLUMN_TYPES[column] == "float":
        return repr(float(value))  # shortest text that reads back to the same double
    return str(value)


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for s in range(0, len(rows), CHUNK):
        yield rows[s:s + CHUNK]


def write_csv(ctx: ExportContext, rows: list[dict[str, Any]], columns: Iterable[str]) -> None:
    columns = tuple(columns)
    with open(ctx.path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(columns)
        done = 0
        ctx.update(0, len(rows), "rows")
        for chunk in _chunks(rows):
            w.writerows([_cell(r[c], c) for c in columns] for r in chunk)
            done += len(chunk)
            ctx.update(done, len(rows), "rows")
        fh.flush()


def write_jsonl(ctx: ExportContext, rows: list[dict[str, Any]], columns: Iterable[str]) -> None:
    columns = tuple(columns)
    with open(ctx.path, "w", encoding="utf-8") as fh:
        done = 0
        ctx.update(0, len(rows), "rows")
        for chunk in _chunks(rows):
            fh.writelines(json.dumps({c: r[c] for c in columns}, ensure_ascii=False) + "\n" for r in chunk)
            done += len(chunk)
            ctx.update(done, len(rows), "rows")
        fh.flush()


def arrow_schema(columns: Iterable[str]) -> Any:
    import pyarrow as pa

    kinds = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "json": pa.string(), "bool": pa.bool_()}
    return pa.schema([pa.field(c, kinds[COLUMN_TYPES[c]], nullable=True) for c in columns])


def write_parquet(ctx: ExportContext, rows: list[dict[str, Any]], columns: Iterable[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = tuple(columns)
    schema = arrow_schema(columns)
    done = 0
    ctx.update(0, len(rows), "rows")
    with pq.ParquetWriter(str(ctx.path), schema, compression="zstd") as writer:
        for chunk in _chunks(rows):
            data = {c: [json.dumps(r[c], sort_keys=True, ensure_ascii=False) if COLUMN_TYPES[c] == "json" else r[c]
                        for r in chunk] for c in columns}
            writer.write_table(pa.table(data, schema=schema))
            done += len(chunk)
            ctx.update(done, len(rows), "rows")
        if not rows:
            writer.write_table(schema.empty_table())


_WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}


def _table(ctx: ExportContext, kind: str, fmt: str) -> dict[str, Any]:
    if kind == "labels":
        rows, columns = label_rows(ctx.project, ctx.options), LABEL_COLUMNS
    else:
        rows, columns = annotation_rows(ctx.project, ctx.options), ANNOTATION_COLUMNS
    _WRITERS[fmt](ctx, rows, columns)
    return {"rows": len(rows)}


@exporter("labels-csv", title="Labels (CSV)", target="file", suffix=".csv", params=LABEL_PARAMS)
def labels_csv(ctx: ExportContext) -> dict[str, Any]:
    """One row per label: model, layer, unit, method, rank, label, score, p_value, formula, category, run_id, extra."""
    return _table(ctx, "labels", "csv")


@exporter("labels-jsonl", title="Labels (JSON Lines)", target="file", suffix=".jsonl", params=LABEL_PARAMS)
def labels_jsonl(ctx: ExportContext) -> dict[str, Any]:
    """The labels table as JSON Lines (imports back with `neuron-studio import`)."""
    return _table(ctx, "labels", "jsonl")


@exporter("labels-parquet", title="Labels (Parquet)", target="file", suffix=".parquet", params=LABEL_PARAMS)
def labels_parquet(ctx: ExportContext) -> dict[str, Any]:
    """The labels table as Parquet (extra as a JSON string)."""
    return _table(ctx, "labels", "parquet")


@exporter("annotations-csv", title="Annotations (CSV)", target="file", suffix=".csv", params=ANNOTATION_PARAMS)
def annotations_csv(ctx: ExportContext) -> dict[str, Any]:
    """Human unit names, descriptions and naming-board groups, with annotator and timestamps."""
    return _table(ctx, "annotations", "csv")


@exporter("annotations-jsonl", title="Annotations (JSON Lines)", target="file", suffix=".jsonl",
          params=ANNOTATION_PARAMS)
def annotations_jsonl(ctx: ExportContext) -> dict[str, Any]:
    """The annotations table as JSON Lines (imports back with `neuron-studio import`)."""
    return _table(ctx, "annotations", "jsonl")


@exporter("annotations-parquet", title="Annotations (Parquet)", target="file", suffix=".parquet",
          params=ANNOTATION_PARAMS)
def annotations_parquet(ctx: ExportContext) -> dict[str, Any]:
    """The annotations table as Parquet."""
    return _table(ctx, "annotations", "parquet")


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a table written above (by suffix: .csv, .jsonl/.json, .parquet), cells typed by column."""
    from app.errors import ProjectError, json_problem

    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ProjectError("the file to import does not exist", file=path, fix="check the path")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise ProjectError(f"cannot read the Parquet file ({exc})", file=path) from None
        for r in rows:
            if isinstance(r.get("extra"), str):
                r["extra"] = json.loads(r["extra"])
        return rows
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ProjectError(f"line {n} is not JSON ({json_problem(exc, line=False)})", file=path,
                                       fix="import a file written by `neuron-studio export`") from None
                if not isinstance(row, dict):
                    raise ProjectError(f"line {n} is not a JSON object", file=path)
                if isinstance(row.get("extra"), str):
                    row["extra"] = json.loads(row["extra"])
                rows.append(row)
        return rows
    if suffix == ".csv":
        rows = []
        with open(path, newline="", encoding="utf-8") as fh:
            for n, raw in enumerate(csv.DictReader(fh), 2):
                row: dict[str, Any] = {}
                for c, v in raw.items():
                    if c is None:
                        raise ProjectError(f"line {n} has more cells than the header", file=path)
                    row[c] = _parse_cell(c, v, path, n)
                rows.append(row)
        return rows
    raise ProjectError(f"cannot import a {suffix or 'suffix-less'} file", file=path,
                       fix="import a .csv, .jsonl or .parquet table written by `neuron-studio export`")


def _parse_cell(column: str, value: str | None, path: Path, line: int) -> Any:
    from app.errors import ProjectError

    if value is None or value == "":
        return None
    kind = COLUMN_TYPES.get(column, "str")
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind == "json":
            return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise ProjectError(f"line {line}: column {column} holds {value!r}, expected a {kind} value",
                           file=path) from None
    return value
