"""What the naming study measured: every annotator's board of a pool as a partition of its maps, the automatic
labelers' partitions of the same maps, and the agreement between them (`labelers.agreement`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.project import naming as store
from app.project.naming import BoardState, pool_info, pool_maps
from app.project.store import Project
from labelers import agreement
from labelers.base import NullProgress, Progress
from labelers.resample import Interval, annotator_mean, bootstrap
from labelers.resample import keyed_rng as _rng

N_BOOT = agreement.N_BOOT
N_SHUFFLES = agreement.N_SHUFFLES


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
    # with intervals (n_boot > 0): aligned with `adequacy` and `comparisons`; see `study_report`
    adequacy_ci: list[Interval] = field(default_factory=list)
    intervals: list[agreement.PairIntervals] = field(default_factory=list)
    summary: list[SummaryRow] = field(default_factory=list)
    n_boot: int = 0
    shuffles: int = 0


@dataclass
class SummaryRow:
    """A mean ARI of the pool with its interval: the annotators with each other, or one method with them."""

    who: str  # "annotators with each other" or "auto: METHOD with the annotators"
    ari: Interval
    resampled: str  # "annotators" or "units": what the interval resamples
    pairs: int  # comparisons averaged
    chance_high: float  # the highest 97.5th percentile of chance among those comparisons


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
                 automatic: bool = True, unclear: str = "group", n_boot: int = 0,
                 shuffles: int = agreement.N_SHUFFLES, seed: int = 0, progress: Progress | None = None
                 ) -> StudyReport:
    """The study's measures of one pool. With `n_boot` > 0, also 95% intervals and chance ranges:

    - per comparison (and per annotator's adequacy): units resampled, each with all its maps, because the maps of
      one unit are not independent (`agreement.pair_intervals`); chance: b's groups shuffled over the maps;
    - the mean ARI between annotators, and of each method with the annotators: annotators resampled, since the
      question is how another set of annotators would agree (`labelers.resample.annotator_mean`); with fewer
      annotators than that needs (3 between annotators, 2 with a method) the one comparison's units interval.
    """
    progress = progress or NullProgress()
    progress.update(0, 0, "reading the boards")
    humans, units = board_partitions(project, pool_id, annotator_ids)
    autos = automatic_partitions(project, pool_id) if automatic else []
    everyone = humans + autos
    pairs = [(i, j) for i in range(len(everyone)) for j in range(i + 1, len(everyone)) if i < len(humans)]
    comparisons = []
    for k, (i, j) in enumerate(pairs):
        progress.update(k, len(pairs), f"agreement of {everyone[i].annotator} and {everyone[j].annotator}")
        comparisons.append(agreement.compare(everyone[i], everyone[j], unclear))
    report = StudyReport(
        pool_id=pool_id, annotators=[p.annotator for p in everyone],
        adequacy=[agreement.adequacy(p) for p in humans],
        correspondence={p.annotator: agreement.concept_units(p, units) for p in humans},
        adjusted_rand=agreement.agreement_matrix(everyone, "ari", unclear),
        pairwise=agreement.agreement_matrix(everyone, "pairs", unclear),
        comparisons=comparisons, unclear=unclear, n_boot=n_boot, shuffles=shuffles if n_boot > 0 else 0,
    )
    if n_boot <= 0:
        return report
    report.adequacy_ci = [agreement.adequacy_interval(p, units, n_boot, _rng(seed, "adequacy", p.annotator))
                          for p in humans]
    for k, (i, j) in enumerate(pairs):
        a, b = everyone[i], everyone[j]
        progress.update(k, len(pairs), f"bootstrap over units: {a.annotator} and {b.annotator}")
        report.intervals.append(agreement.pair_intervals(a, b, units, unclear, n_boot, shuffles,
                                                         _rng(seed, unclear, a.annotator, b.annotator)))
    progress.update(len(pairs), len(pairs), "bootstrap over annotators")
    report.summary = _summary(report, len(humans), n_boot, seed)
    return report


def _summary(report: StudyReport, humans: int, n_boot: int, seed: int) -> list[SummaryRow]:
    names = report.annotators
    by_pair = {(c.a, c.b): (c, iv) for c, iv in zip(report.comparisons, report.intervals)}
    rows = []
    if humans >= 2:
        among = [by_pair[(names[i], names[j])] for i in range(humans) for j in range(i + 1, humans)]
        chance = max(iv.chance_ari.high for _, iv in among)
        if humans >= 3:
            ari = annotator_mean(report.adjusted_rand[:humans, :humans], n_boot, _rng(seed, "humans"))
            rows.append(SummaryRow("annotators with each other", ari, "annotators", len(among), chance))
        else:
            rows.append(SummaryRow("annotators with each other", among[0][1].adjusted_rand, "units", 1, chance))
    for m in range(humans, len(names)):
        with_humans = [by_pair[(names[h], names[m])] for h in range(humans)]
        if not with_humans:
            continue
        chance = max(iv.chance_ari.high for _, iv in with_humans)
        if humans >= 2:
            values = np.array([c.adjusted_rand for c, _ in with_humans])
            ari = bootstrap(values[np.isfinite(values)], n_boot, _rng(seed, names[m]))
            rows.append(SummaryRow(f"{names[m]} with the annotators", ari, "annotators", humans, chance))
        else:
            rows.append(SummaryRow(f"{names[m]} with the annotators", with_humans[0][1].adjusted_rand, "units", 1,
                                   chance))
    return rows


class StudyJob:
    """`study_report` with intervals as a job of its own read-only connection: the bootstrap takes seconds on a
    large pool, so the window runs it in a child process."""

    kind = "study"

    def __init__(self, project_path: str | Path, pool_id: int, automatic: bool = True, unclear: str = "group",
                 n_boot: int = agreement.N_BOOT, shuffles: int = agreement.N_SHUFFLES, seed: int = 0):
        self.project_path = Path(project_path)
        self.pool_id = pool_id
        self.automatic = automatic
        self.unclear = unclear
        self.n_boot = n_boot
        self.shuffles = shuffles
        self.seed = seed
        self.title = "Study: agreement with intervals"

    def execute(self, progress: Any) -> StudyReport:
        with Project.open(self.project_path, readonly=True) as project:
            return study_report(project, self.pool_id, automatic=self.automatic, unclear=self.unclear,
                                n_boot=self.n_boot, shuffles=self.shuffles, seed=self.seed, progress=progress)
