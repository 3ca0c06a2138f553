"""Suggested groups for the naming board: maps clustered by the layer's activation vector pooled over each map's
thresholded region. Nothing here writes: accepting a suggestion is `create_group`."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobError
from app.project.naming import BoardState, PoolArrays, pool_info
from app.project.store import Project


@dataclass
class Suggestion:
    name: str
    map_ids: list[int]  # most typical first (closest to the cluster's centre)
    coherence: float  # mean cosine similarity of the members' features to their centre
    hint: str | None = None  # the commonest automatic label of the members' units (hidden in blind mode)


def suggest_groups(project: Project, pool_id: int, annotator_id: int, n_groups: int | None = None,
                   method: str = "kmeans", only_unassigned: bool = True, max_groups: int = 20,
                   min_size: int = 2, seed: int = 0) -> list[Suggestion]:
    """Clusters the maps by the layer's activation vector pooled over each map's thresholded region (cosine
    geometry: rows are L2-normalised). With `n_groups` None the number of clusters with the best silhouette is
    used, searched from half the rule-of-thumb sqrt(n/2) up to `max_groups`: silhouette alone often prefers two
    huge clusters, which are no help to someone naming concepts. Nothing is written: accepting a suggestion is
    `create_group`."""
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import silhouette_score

    if method not in ("kmeans", "agglomerative"):
        raise JobError(f"clustering method {method!r} is unknown", fix="use kmeans or agglomerative")
    pool = pool_info(project, pool_id)
    feats = PoolArrays.open(project.path, pool).features
    if feats is None:
        raise JobError("this pool has no region features yet", fix="compute them (Suggest asks to) and try again")
    state = BoardState.load(project, pool_id, annotator_id)
    candidates = state.unassigned if only_unassigned else [m.id for m in state.maps]
    if len(candidates) < max(2, min_size):
        return []
    pos = {m.id: m.position for m in state.maps}
    x = feats[[pos[m] for m in candidates]].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(candidates)

    def cluster(k: int, n_init: int = 10) -> np.ndarray:
        if method == "kmeans":
            return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)

    if n_groups is None:
        best: tuple[float, int] | None = None
        k_low = max(2, math.ceil(math.sqrt(n / 2) / 2))
        for k in range(min(k_low, n - 1), min(max(max_groups, k_low), n - 1) + 1):
            labels = cluster(k, n_init=3)  # the search only ranks k; the chosen k is fitted fully below
            if len(set(labels.tolist())) < 2:
                continue
            score = silhouette_score(x, labels, sample_size=min(n, 2000), random_state=seed)
            if best is None or score > best[0]:
                best = (score, k)
        labels = cluster(best[1]) if best else np.zeros(n, dtype=np.int64)
    else:
        labels = cluster(max(1, min(int(n_groups), n)))
    hints = _label_hints(project, pool.layer_id)
    unit_of = {m.id: m.unit for m in state.maps}
    out = []
    for c in np.unique(labels):
        rows = np.nonzero(labels == c)[0]
        if len(rows) < min_size:
            continue
        centre = x[rows].mean(axis=0)
        centre /= max(np.linalg.norm(centre), 1e-12)
        sims = x[rows] @ centre
        order = rows[np.argsort(-sims, kind="stable")]
        members = [candidates[i] for i in order]
        counts = Counter(h for m in members for h in hints.get(unit_of[m], ()))
        out.append(Suggestion(name="", map_ids=members, coherence=float(sims.mean()),
                              hint=counts.most_common(1)[0][0] if counts else None))
    out.sort(key=lambda s: (-len(s.map_ids), -s.coherence))
    for i, s in enumerate(out):
        s.name = f"Suggestion {i + 1}"
    return out


def _label_hints(project: Project, layer_id: int) -> dict[int, list[str]]:
    hints: dict[int, list[str]] = {}
    for lab in project.labels(layer_id=layer_id, max_rank=1):
        hints.setdefault(lab["unit"], []).append(lab["label"])
    return hints


class SuggestJob:
    """`suggest_groups` as a job of its own connection (the window runs it in a child process)."""

    kind = "suggest"

    def __init__(self, project_path: str | Path, pool_id: int, annotator_id: int, n_groups: int | None = None,
                 method: str = "kmeans"):
        self.project_path = Path(project_path)
        self.pool_id = pool_id
        self.annotator_id = annotator_id
        self.n_groups = n_groups
        self.method = method
        self.title = "Suggest groups"

    def execute(self, progress: Any) -> list[Suggestion]:
        with Project.open(self.project_path, readonly=True) as project:
            return suggest_groups(project, self.pool_id, self.annotator_id, n_groups=self.n_groups,
                                  method=self.method)
