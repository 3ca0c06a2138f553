"""Queries over labels and the runs that made them, for the units table, the unit view and the exports. The rows
themselves are written by `Project.replace_labels`; `Project.labels` is the general joined reader."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.project.store import Project


def latest_label_runs(project: Project, layer_id: int) -> dict[str, int]:
    """The newest finished labeling run per method of a layer (what `Project.labels(latest_only=True)` shows)."""
    rows = project.conn.execute(
        "SELECT method, MAX(id) FROM runs WHERE kind='label' AND status='done' AND layer_id=?"
        " GROUP BY method ORDER BY method", (layer_id,))
    return {method: int(run_id) for method, run_id in rows}


def label_runs(project: Project, layer_id: int, method: str) -> list[int]:
    """Every finished labeling run of a layer with a method, oldest first."""
    return [r[0] for r in project.conn.execute(
        "SELECT id FROM runs WHERE kind='label' AND status='done' AND layer_id=? AND method=? ORDER BY id",
        (layer_id, method))]


def labeled_layers(project: Project, method: str) -> set[int]:
    """The layers with a finished labeling run of `method`."""
    return {r[0] for r in project.conn.execute(
        "SELECT DISTINCT layer_id FROM runs WHERE kind='label' AND status='done' AND method=?", (method,))}


def label_run_sources(project: Project) -> dict[int, int | None]:
    """label run id -> the extraction run it was computed from."""
    return dict(project.conn.execute("SELECT id, source_run_id FROM runs WHERE kind='label'").fetchall())


def unit_names(project: Project, layer_id: int) -> list[tuple[int, str]]:
    """(unit index, name) of every name any annotator gave a unit of the layer, oldest edit first: where several
    annotators named a unit, the last pair is the most recent name."""
    return [(int(i), t) for i, t in project.conn.execute(
        "SELECT u.idx, a.text FROM annotations a JOIN units u ON u.id=a.unit_id WHERE u.layer_id=? AND a.kind='name'"
        " ORDER BY a.updated_at, a.id", (layer_id,))]


def unit_names_by_annotator(project: Project, layer_id: int) -> list[tuple[int, str, str]]:
    """(unit index, annotator, name) of every name given to a unit of the layer, by unit, then annotator."""
    return [(int(i), a, t) for i, a, t in project.conn.execute(
        "SELECT u.idx, an.name, a.text FROM annotations a JOIN units u ON u.id=a.unit_id"
        " JOIN annotators an ON an.id=a.annotator_id WHERE u.layer_id=? AND a.kind='name'"
        " ORDER BY u.idx, an.name, a.updated_at", (layer_id,))]


def unit_notes(project: Project, layer_id: int, unit: int) -> list[dict[str, Any]]:
    """Every annotator's name and descriptions of one unit (annotator, kind, text, updated_at), by annotator and
    then oldest first."""
    return project.all(
        "SELECT an.name AS annotator, a.kind, a.text, a.updated_at FROM annotations a"
        " JOIN units u ON u.id=a.unit_id JOIN annotators an ON an.id=a.annotator_id"
        " WHERE u.layer_id=? AND u.idx=? ORDER BY an.name, a.kind DESC, a.created_at, a.id", (layer_id, int(unit)))


def unit_indices(project: Project, layer_id: int) -> list[tuple[int, int]]:
    """(unit id, unit index) of a layer's units, by index."""
    return [(int(i), int(x)) for i, x in project.conn.execute(
        "SELECT id, idx FROM units WHERE layer_id=? ORDER BY idx", (layer_id,))]


def label_texts(project: Project, run_ids: Sequence[int]) -> list[tuple[int, str]]:
    """(unit index, every label text of the runs joined by ' | '), for searching."""
    if not run_ids:
        return []
    marks = ",".join("?" * len(run_ids))
    return [(int(i), t) for i, t in project.conn.execute(
        f"SELECT u.idx, group_concat(lb.text, ' | ') FROM labels lb JOIN units u ON u.id=lb.unit_id"
        f" WHERE lb.run_id IN ({marks}) GROUP BY u.idx", tuple(run_ids))]


def top_labels(project: Project, run_id: int) -> list[tuple[Any, ...]]:
    """The rank-1 label of each unit of a run: (unit index, text, score, p_value, category, extra.interpretable,
    extra.significant)."""
    return project.conn.execute(
        "SELECT u.idx, lb.text, lb.score, lb.p_value, lb.category, json_extract(lb.extra, '$.interpretable'),"
        " json_extract(lb.extra, '$.significant') FROM labels lb JOIN units u ON u.id=lb.unit_id"
        " WHERE lb.run_id=? AND lb.rank=1", (run_id,)).fetchall()


def unit_label_rows(project: Project, layer_id: int, unit: int, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Every ranked label of one unit in the given runs (method, rank, text, formula, category, score, p_value,
    extra as stored JSON), by method and rank."""
    if not run_ids:
        return []
    marks = ",".join("?" * len(run_ids))
    return project.all(
        f"SELECT lb.method, lb.rank, lb.text, lb.formula, lb.category, lb.score, lb.p_value, lb.extra"
        f" FROM labels lb JOIN units u ON u.id=lb.unit_id WHERE u.layer_id=? AND u.idx=? AND lb.run_id IN ({marks})"
        f" ORDER BY lb.method, lb.rank", (layer_id, unit, *run_ids))
