"""What the naming study measured: every annotator's board of a pool as a partition of its maps, the automatic
labelers' partitions of the same maps, and the agreement between them (`labelers.agreement`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.project import naming as store
from app.project.naming import BoardState, pool_info, pool_maps
from app.project.store import Project
from labelers import agreement


@dataclass
class StudyReport:
    pool_id: int
    annotators: list[str]  # humans first, then "auto: METHOD" partitions
    adequacy: list[agreement.Adequacy]  # humans only
    correspondence: dict[str, agreement.Correspondence]  # per human annotator
    adjusted_rand: np.ndarray  # [A, A] over `annotators`
    pairwise: np.ndarray  # [A, A]
    comparisons: list[agreement.Comparison] = field(default_factory=list)  # every pair with a human in it
    unclear: str = "group"


def board_partitions(project: Project, pool_id: int, annotator_ids: Sequence[int] | None = None,
                     with_empty: bool = False) -> tuple[list[agreement.Partition], np.ndarray]:
    """Every annotator's board of a pool (those who placed at least one map, unless `with_empty`) and the unit of
    each map, in pool order."""
    maps = pool_maps(project, pool_id)
    if annotator_ids is None:
        annotator_ids = store.pool_annotator_ids(project, pool_id)
    boards = []
    for a in annotator_ids:
        state = BoardState.load(project, pool_id, a, maps=maps)
        if with_empty or state.group_of:
            boards.append(state.partition())
    return boards, np.array([m.unit for m in maps], dtype=np.int64)


def automatic_partitions(project: Project, pool_id: int) -> list[agreement.Partition]:
    """One partition per labeling method of the pool's layer: maps whose units share their top label."""
    pool = pool_info(project, pool_id)
    maps = pool_maps(project, pool_id)
    by_method: dict[str, dict[int, str]] = {}
    for lab in project.labels(layer_id=pool.layer_id, max_rank=1):
        by_method.setdefault(lab["method"], {})[lab["unit"]] = lab["label"]
    return [agreement.partition_from_labels(f"auto: {method}", [labels.get(m.unit) for m in maps])
            for method, labels in sorted(by_method.items())]


def study_report(project: Project, pool_id: int, annotator_ids: Sequence[int] | None = None,
                 automatic: bool = True, unclear: str = "group") -> StudyReport:
    humans, units = board_partitions(project, pool_id, annotator_ids)
    autos = automatic_partitions(project, pool_id) if automatic else []
    everyone = humans + autos
    comparisons = [agreement.compare(everyone[i], everyone[j], unclear)
                   for i in range(len(everyone)) for j in range(i + 1, len(everyone)) if i < len(humans)]
    return StudyReport(
        pool_id=pool_id, annotators=[p.annotator for p in everyone],
        adequacy=[agreement.adequacy(p) for p in humans],
        correspondence={p.annotator: agreement.concept_units(p, units) for p in humans},
        adjusted_rand=agreement.agreement_matrix(everyone, "ari", unclear),
        pairwise=agreement.agreement_matrix(everyone, "pairs", unclear),
        comparisons=comparisons, unclear=unclear,
    )
