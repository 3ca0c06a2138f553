"""Import what another project (or this one, before a reset) exported: label and annotation tables, and
MILANNOTATIONS-style unit descriptions.

Imports are lossless and idempotent: labels keep their runs (one run per run of the source, with the source's run id
where that id is free, so that exporting again writes the same table), annotations keep their annotators and
timestamps, and rows already present are not added twice. Every import is one transaction: a file with a bad row
changes nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import ProjectError
from app.export.tables import read_table
from app.project import labels as label_store
from app.project import naming as naming_store
from app.project.store import Project, now
from labelers.base import Label

log = logging.getLogger(__name__)

__all__ = ["import_tables", "import_milan"]

MILAN_ANNOTATOR = "milannotations"


class _Layers:
    """Resolves (model name in the file, layer name, unit) to this project's layers and units."""

    def __init__(self, project: Project, path: Path, model: str | int | None):
        self.project = project
        self.path = path
        self.models = project.models()
        if not self.models:
            raise ProjectError("the project has no model to import into", file=project.path,
                               fix="add the model the file was made with (`neuron-studio add-model`)")
        self.forced = project.model(model)["id"] if model is not None else None
        self._layers: dict[int, dict[str, dict[str, Any]]] = {}
        self._units: dict[int, list[int]] = {}

    def model_id(self, name: str | None, where: str) -> int:
        if self.forced is not None:
            return self.forced
        for m in self.models:
            if m["name"] == name:
                return m["id"]
        if len(self.models) == 1:
            return self.models[0]["id"]
        names = ", ".join(m["name"] for m in self.models)
        raise ProjectError(f"{where}: model {name!r} is not in this project (it has: {names})", file=self.path,
                           fix="name the model to import into (--model)")

    def layer(self, model_id: int, name: str, where: str) -> dict[str, Any]:
        if model_id not in self._layers:
            self._layers[model_id] = {r["name"]: r for r in self.project.layers(model_id)}
        layers = self._layers[model_id]
        if name not in layers:
            model = next(m["name"] for m in self.models if m["id"] == model_id)
            known = [n for n, r in layers.items() if r["units"] > 0]
            raise ProjectError(f"{where}: layer {name!r} is not a layer of model {model}", file=self.path,
                               fix=f"import into a project with the same model; its layers are: "
                                   f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
        return layers[name]

    def unit_id(self, layer: dict[str, Any], unit: Any, where: str) -> int:
        if layer["id"] not in self._units:
            self._units[layer["id"]] = self.project.unit_ids(layer["id"])
        ids = self._units[layer["id"]]
        if not isinstance(unit, int) or isinstance(unit, bool) or not 0 <= unit < len(ids):
            raise ProjectError(f"{where}: layer {layer['name']} has units 0..{len(ids) - 1}, the file names unit "
                               f"{unit!r}", file=self.path, fix="import into a project with the same model")
        return ids[unit]


def _need(row: dict[str, Any], columns: tuple[str, ...], where: str, path: Path) -> None:
    missing = [c for c in columns if row.get(c) is None]
    if missing:
        raise ProjectError(f"{where}: {', '.join(missing)} missing", file=path,
                           fix="import a table written by `neuron-studio export`")


# ---- tables --------------------------------------------------------------------------------------------------------
def import_tables(project: Project, path: str | Path, model: str | int | None = None) -> int:
    """Import a labels or annotations table written by the labels-* or annotations-* exports (.csv, .jsonl,
    .parquet). Returns the number of rows added (0 when everything was already there)."""
    path = Path(path)
    rows = read_table(path)
    if not rows:
        return 0
    columns = set().union(*(r.keys() for r in rows))
    if {"method", "rank", "label", "score"} <= columns:
        return _import_labels(project, path, rows, model)
    if {"kind", "text", "annotator"} <= columns:
        return _import_annotations(project, path, rows, model)
    if {"layer", "unit", "text", "annotator"} <= columns:
        # a names table written by hand without a kind column: every row names a unit
        return _import_annotations(project, path, [dict(r, kind="name") for r in rows], model)
    raise ProjectError(f"the table is neither labels nor annotations (columns: {', '.join(sorted(columns))})",
                       file=path, fix="import a file written by `neuron-studio export --format labels-jsonl` "
                                      "or `annotations-jsonl`")


def _content(labels: list[Label]) -> str:
    """What identifies a run's labels, independent of ids and order."""
    rows = sorted([lab.unit, lab.rank, lab.text, float(lab.score), lab.p_value, lab.formula, lab.category,
                   json.loads(json.dumps(lab.extra, sort_keys=True, default=float))] for lab in labels)
    return json.dumps(rows, sort_keys=True)


def _have_labels(project: Project, layer_id: int, method: str, content: str) -> bool:
    """Whether a finished run of this layer and method holds exactly these labels (the project's own export
    imported back into it adds nothing)."""
    for run_id in label_store.label_runs(project, layer_id, method):
        rows = project.labels(run_id=run_id)
        have = [Label(unit=r["unit"], rank=r["rank"], text=r["label"], score=r["score"], p_value=r["p_value"],
                      formula=r["formula"], category=r["category"], extra=r["extra"]) for r in rows]
        if _content(have) == content:
            return True
    return False


def _import_labels(project: Project, path: Path, rows: list[dict[str, Any]], model: str | int | None) -> int:
    layers = _Layers(project, path, model)
    runs: OrderedDict[tuple[Any, ...], list[tuple[int, dict[str, Any]]]] = OrderedDict()
    for n, r in enumerate(rows, 1):
        where = f"row {n}"
        _need(r, ("layer", "unit", "method", "rank", "label", "score"), where, path)
        model_id = layers.model_id(r.get("model"), where)
        layer = layers.layer(model_id, str(r["layer"]), where)
        layers.unit_id(layer, r["unit"], where)
        runs.setdefault((model_id, layer["id"], r["method"], r.get("run_id")), []).append((n, r))
    added = 0
    with project.transaction():
        for (model_id, layer_id, method, source_run), items in runs.items():
            labels = [Label(unit=int(r["unit"]), rank=int(r["rank"]), text=str(r["label"]), score=float(r["score"]),
                            p_value=None if r.get("p_value") is None else float(r["p_value"]),
                            formula=r.get("formula"), category=r.get("category"), extra=dict(r.get("extra") or {}))
                      for _, r in items]
            content = _content(labels)
            key = "import:" + hashlib.sha256(f"{layer_id}\0{method}\0{source_run}\0{content}".encode()).hexdigest()
            if project.finished_run("label", key) or _have_labels(project, layer_id, method, content):
                log.info("labels of run %s (%s) are already in the project", source_run, method)
                continue
            extraction = project.layer_stats(layer_id)
            # Keep the source's run id where it is free, so that run_id reads the same in both projects.
            keep_id = source_run if isinstance(source_run, int) and not isinstance(source_run, bool) \
                and source_run > 0 else None
            run_id = project.create_run(
                kind="label", key=key, params={"imported_from": str(path), "source_run_id": source_run},
                model_id=model_id, dataset_id=extraction["dataset_id"] if extraction else None, layer_id=layer_id,
                source_run_id=extraction["run_id"] if extraction else None, method=method, run_id=keep_id)
            project.start_run(run_id)
            project.replace_labels(run_id, layer_id, method, labels)
            project.update_run(run_id, done=len(labels), total=len(labels))
            project.finish_run(run_id, "done", message=f"imported {len(labels)} labels")
            added += len(labels)
    return added


def _import_annotations(project: Project, path: Path, rows: list[dict[str, Any]], model: str | int | None) -> int:
    layers = _Layers(project, path, model)
    unit_rows: list[tuple[int, dict[str, Any], int]] = []
    pools: OrderedDict[tuple[Any, ...], list[tuple[int, dict[str, Any]]]] = OrderedDict()
    for n, r in enumerate(rows, 1):
        where = f"row {n}"
        _need(r, ("layer", "kind", "text", "annotator"), where, path)
        model_id = layers.model_id(r.get("model"), where)
        layer = layers.layer(model_id, str(r["layer"]), where)
        kind = r["kind"]
        if kind in ("name", "description"):
            _need(r, ("unit",), where, path)
            unit_rows.append((n, r, layers.unit_id(layer, r["unit"], where)))
        elif kind == "group":
            _need(r, ("pool", "pool_kind", "group_position", "created_at", "updated_at"), where, path)
            if r.get("image") is not None:
                layers.unit_id(layer, r.get("unit"), where)
            pools.setdefault((model_id, layer["id"], r["pool"], r["pool_kind"]), []).append((n, r))
        else:
            raise ProjectError(f"{where}: kind {kind!r} is not name, description or group", file=path)
    added = 0
    annotator_ids: dict[str, int] = {}

    def annotator(name: str) -> int:
        if name not in annotator_ids:
            annotator_ids[name] = project.annotator(name)
        return annotator_ids[name]

    with project.transaction():
        for _, r, unit_id in unit_rows:
            aid = annotator(str(r["annotator"]))
            r = dict(r, text=str(r["text"]).strip())
            if not r["text"]:
                continue
            if r.get("created_at") is None or r.get("updated_at") is None:
                # A table written by hand (model, layer, unit, kind, text, annotator): what it says is the newest
                # word, and a description already there with the same text is the same description.
                stamp = now()
                r["created_at"] = r.get("created_at") or stamp
                r["updated_at"] = r.get("updated_at") or stamp
                if r["kind"] == "description" and naming_store.has_description(project, aid, unit_id, r["text"]):
                    continue
            if r["kind"] == "description":
                if naming_store.has_description(project, aid, unit_id, r["text"], r["created_at"]):
                    continue
            else:
                old = naming_store.name_annotation(project, aid, unit_id)
                if old is not None:
                    # One name per annotator and unit: the newer one wins, as if both had been typed here.
                    if old["text"] != r["text"] and str(r["updated_at"]) > old["updated_at"]:
                        naming_store.import_annotation(project, aid, unit_id, "name", r["text"], r["created_at"],
                                                       r["updated_at"], replace_id=old["id"])
                        added += 1
                    continue
            naming_store.import_annotation(project, aid, unit_id, r["kind"], r["text"], r["created_at"],
                                           r["updated_at"])
            added += 1
        for (model_id, layer_id, pool_name, pool_kind), items in pools.items():
            added += _import_groups(project, path, layer_id, pool_name, pool_kind, items, annotator)
    return added


def _import_groups(project: Project, path: Path, layer_id: int, pool_name: str, pool_kind: str,
                   items: list[tuple[int, dict[str, Any]]], annotator: Any) -> int:
    pairs = [(r["image"], int(r["unit"])) for _, r in items if r.get("image") is not None]
    pool_id = None
    for candidate in naming_store.find_pools(project, layer_id, pool_name, pool_kind):
        if set(pairs) <= set(naming_store.pool_map_ids(project, candidate)):
            pool_id = candidate
            break
    layer_name = project.layer_by_id(layer_id)["name"]
    if pool_id is None:
        pool_id = _make_unit_pool(project, path, layer_id, layer_name, pool_name, pool_kind, items)
    maps = naming_store.pool_map_ids(project, pool_id)
    added = 0
    groups: OrderedDict[tuple[Any, ...], list[dict[str, Any]]] = OrderedDict()
    for _, r in items:
        groups.setdefault((r["annotator"], int(r["group_position"]), r["text"], r["created_at"], r["updated_at"],
                           bool(r.get("unclear"))), []).append(r)
    for (who, position, name, created, updated, unclear), members in groups.items():
        aid = annotator(str(who))
        gid, created_now = naming_store.import_group(project, pool_id, aid, name, position, unclear, created, updated)
        if created_now and not any(m.get("image") is not None for m in members):
            added += 1  # an empty group is one row of the table
        for m in members:
            if m.get("image") is None:
                continue
            map_id = maps[(m["image"], int(m["unit"]))]
            if naming_store.import_member(project, gid, map_id, aid, m.get("added_at") or now()):
                added += 1
    return added


def _make_unit_pool(project: Project, path: Path, layer_id: int, layer_name: str, pool_name: str, pool_kind: str,
                    items: list[tuple[int, dict[str, Any]]]) -> int:
    """A unit-centric pool holding the imported maps, cut from this project's extraction of the layer (the maps of
    a unit pool are its units' top exemplars). Decision pools depend on the model's gradients: build them first."""
    fix = (f"build a {pool_kind} pool named {pool_name!r} on layer {layer_name} (naming board) with the same maps, "
           f"then import again")
    if pool_kind != "unit":
        raise ProjectError(f"the naming pool {pool_name!r} of layer {layer_name} is not in this project",
                           file=path, fix=fix)
    from app.engine.results import LayerResults
    from app.errors import JobError

    try:
        res = LayerResults.load(project, layer_id)
    except JobError:
        raise ProjectError(f"the naming pool {pool_name!r} of layer {layer_name} is not in this project, and the "
                           "layer has no extraction to rebuild it from", file=path,
                           fix=f"extract layer {layer_name}, then import again") from None
    dataset_id = int(res.stats["dataset_id"])
    key_index = {k: i for i, k in enumerate(project.image_keys(dataset_id))}
    q = min(res.meta["quantiles"])
    thresholds_all = np.asarray(res.threshold(q), dtype=np.float32)
    topk_index = np.asarray(res.topk_index)
    seen: dict[tuple[str, int], float] = {}
    for n, r in items:
        if r.get("image") is not None:
            seen.setdefault((r["image"], int(r["unit"])), float(r.get("map_score") or 0.0))
    image_idx, units, scores, maps = [], [], [], []
    for (key, unit), score in seen.items():
        idx = key_index.get(key)
        hit = np.flatnonzero(topk_index[unit] == idx) if idx is not None else np.zeros(0, dtype=np.int64)
        if hit.size == 0:
            raise ProjectError(f"image {key} is not among the top exemplars of unit {unit} of {layer_name} in this "
                               f"project, so the naming pool {pool_name!r} cannot be rebuilt", file=path, fix=fix)
        image_idx.append(idx)
        units.append(unit)
        scores.append(score)
        maps.append(np.asarray(res.topk_maps[unit, int(hit[0])], dtype=np.float16))
    return naming_store.write_pool(
        project, name=pool_name, kind="unit", layer_id=layer_id, source_run_id=res.run_id, dataset_id=dataset_id,
        image_index=np.asarray(image_idx, dtype=np.int64), unit=np.asarray(units, dtype=np.int64),
        score=np.asarray(scores, dtype=np.float64), maps=np.stack(maps) if maps else np.zeros((0, 1, 1), np.float16),
        thresholds=thresholds_all[np.asarray(units, dtype=np.int64)] if units else np.zeros(0, np.float32),
        params={"quantile": q, "imported_from": str(path)},
    )


# ---- MILANNOTATIONS ------------------------------------------------------------------------------------------------
def _milan_records(data: Any, path: Path) -> list[dict[str, Any]]:
    records = data
    if isinstance(data, dict):
        records = next((data[k] for k in ("units", "annotations", "records") if k in data), None)
    if not isinstance(records, list):
        raise ProjectError("expected a JSON list of unit records (or an object with a \"units\" list)", file=path,
                           fix="each record needs layer, unit and descriptions")
    return records


def import_milan(project: Project, json_path: str | Path, model: str | int | None = None,
                 annotator: str | None = None) -> int:
    """Import MILANNOTATIONS-style unit descriptions: records with `layer`, `unit` and `descriptions` (a list; a
    single `description` or `summary` string is accepted too), and optionally `annotators` (one name per
    description). Every layer and unit must exist in `model` (default: the project's only model); the first
    that does not is named in the error and nothing is imported. Returns the number of descriptions added."""
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectError("the file to import does not exist", file=path, fix="check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProjectError(f"not a JSON file ({exc})", file=path) from None
    records = _milan_records(data, path)
    model_row = project.model(model)
    layers = {r["name"]: r for r in project.layers(model_row["id"]) if r["units"] > 0}
    default_annotator = (annotator or MILAN_ANNOTATOR).strip() or MILAN_ANNOTATOR
    todo: list[tuple[int, str, str]] = []
    for n, rec in enumerate(records):
        where = f"record {n}"
        if not isinstance(rec, dict) or "layer" not in rec or "unit" not in rec:
            raise ProjectError(f"{where} has no layer and unit", file=path,
                               fix="each record needs layer, unit and descriptions")
        layer = str(rec["layer"])
        if layer not in layers:
            raise ProjectError(f"{where}: layer {layer!r} is not a layer of model {model_row['name']}", file=path,
                               fix=f"its layers with units are: {', '.join(list(layers)[:20])}"
                                   f"{' ...' if len(layers) > 20 else ''}")
        try:
            unit = int(rec["unit"])
        except (TypeError, ValueError):
            raise ProjectError(f"{where}: unit {rec['unit']!r} is not a number", file=path) from None
        if not 0 <= unit < layers[layer]["units"]:
            raise ProjectError(f"{where}: layer {layer} has units 0..{layers[layer]['units'] - 1}, not {unit}",
                               file=path, fix="import descriptions made for this model")
        texts = rec.get("descriptions")
        if texts is None:
            texts = rec.get("description", rec.get("summary", []))
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ProjectError(f"{where}: descriptions must be a list of strings", file=path)
        who = rec.get("annotators")
        if not (isinstance(who, list) and len(who) == len(texts)):
            who = [default_annotator] * len(texts)
        unit_id = project.unit_ids(layers[layer]["id"])[unit]
        todo.extend((unit_id, str(w or default_annotator), t.strip()) for t, w in zip(texts, who) if t.strip())
    added = 0
    with project.transaction():
        ids: dict[str, int] = {}
        for unit_id, who, text in todo:
            if who not in ids:
                ids[who] = project.annotator(who)
            if naming_store.has_description(project, ids[who], unit_id, text):
                continue
            stamp = now()
            naming_store.import_annotation(project, ids[who], unit_id, "description", text, stamp, stamp)
            added += 1
    return added
