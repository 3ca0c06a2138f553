"""Concept sets: which (unit, image) regions belong to which named concept, gathered from the project.

A concept is a name, from three sources:
- automatic labels: each labeled unit's label text per method (ranks up to `max_rank`), whose regions are the unit's
  top exemplars in the extraction the labels were computed from;
- annotators' unit names: the same, for a unit an annotator named;
- naming-board groups: each named group's maps (one map = one unit on one image), with the pool's thresholds.
Names that differ only in case or spacing are one concept. A region belongs to a concept once, whatever the number
of methods or annotators that put it there (they are listed with it).

`ConceptSets.regions_on_image` turns a member into a mask on the stored image: the unit's map placed on the
original pixels (see `app.imaging.map_on_image`) and thresholded at the unit's quantile.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.export.base import split_names
from app.export.common import ANNOTATORS, EXEMPLARS, LAYERS, METHODS, MODEL, QUANTILE, Exemplars, Images, LayerRef, \
    PoolMaps, group_rows, layer_refs, safe_name
from app.project.labels import label_run_sources
from app.project.store import Project
from labelers.base import Param

log = logging.getLogger(__name__)

SOURCES = ("labels", "names", "groups")
PARAMS = (
    MODEL, LAYERS, METHODS, ANNOTATORS, QUANTILE, EXEMPLARS,
    Param("sources", str, "labels,names,groups", "where concepts come from: labels (automatic), names (annotators' "
                                                 "unit names), groups (naming-board groups)"),
    Param("max_rank", int, 1, "automatic labels of rank <= this", minimum=1),
    Param("min_score", float, None, "leave out automatic labels scoring below this (default: keep all)"),
)


@dataclass
class Member:
    """One region of a concept: a unit's map on one image."""

    layer: LayerRef
    unit: int
    dataset_id: int
    image_index: int
    score: float  # the unit's activation peak on the image
    map: np.ndarray  # [h, w] float32
    threshold: float
    methods: list[str] = field(default_factory=list)
    annotators: list[str] = field(default_factory=list)
    label_scores: dict[str, float] = field(default_factory=dict)  # method -> score of the label


@dataclass
class Concept:
    name: str
    slug: str
    category: str
    members: list[Member] = field(default_factory=list)
    index: dict[tuple[int, int, int, int], Member] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        return sorted({*(m for x in self.members for m in x.methods), *(a for x in self.members for a in x.annotators)})


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


class ConceptSets:
    """Gathers the concepts of a project for the chosen options (the `PARAMS` above)."""

    def __init__(self, project: Project, options: dict[str, Any]):
        self.project = project
        self.options = options
        self.images = Images(project)
        self.exemplars = Exemplars(project, options.get("quantile", 0.99))
        self.concepts: dict[str, Concept] = {}
        self._slugs: set[str] = set()
        self.skipped: dict[str, int] = {}

    def _concept(self, name: str, category: str = "") -> Concept:
        key = _norm(name)
        if key not in self.concepts:
            slug = safe_name(name.strip(), 60)
            base, i = slug, 2
            while slug.casefold() in self._slugs:
                slug = f"{base}-{i}"
                i += 1
            self._slugs.add(slug.casefold())
            self.concepts[key] = Concept(name=" ".join(name.split()), slug=slug, category=category or "")
        return self.concepts[key]

    def _add(self, concept: Concept, member: Member, method: str | None, annotator: str | None,
             label_score: float | None) -> None:
        k = (member.layer.layer_id, member.unit, member.dataset_id, member.image_index)
        have = concept.index.get(k)
        if have is None:
            concept.index[k] = have = member
            concept.members.append(member)
        if method and method not in have.methods:
            have.methods.append(method)
            if label_score is not None:
                have.label_scores[method] = float(label_score)
        if annotator and annotator not in have.annotators:
            have.annotators.append(annotator)

    def gather(self) -> list[Concept]:
        """The concepts with at least one member; refuses when there is none (every export of them needs one)."""
        opts = self.options
        sources = split_names(opts.get("sources")) or list(SOURCES)
        bad = [s for s in sources if s not in SOURCES]
        if bad:
            from app.errors import JobError

            raise JobError(f"no concept source {bad[0]!r}", fix=f"use some of: {', '.join(SOURCES)}")
        refs = {r.layer_id: r for r in layer_refs(self.project, opts.get("model") or None,
                                                   split_names(opts.get("layers")))}
        methods = split_names(opts.get("methods"))
        annotators = split_names(opts.get("annotators"))
        k = int(opts.get("exemplars") or 0)
        if "labels" in sources:
            origin = label_run_sources(self.project)
            for lab in self.project.labels(max_rank=int(opts.get("max_rank") or 1)):
                ref = refs.get(lab["layer_id"])
                if ref is None or (methods and lab["method"] not in methods):
                    continue
                if opts.get("min_score") is not None and lab["score"] < float(opts["min_score"]):
                    self.skipped["labels below min_score"] = self.skipped.get("labels below min_score", 0) + 1
                    continue
                concept = self._concept(lab["label"], lab["category"] or "")
                for ex in self.exemplars.of_unit(ref.layer_id, lab["unit"], k, origin.get(lab["run_id"])):
                    self._add(concept, self._member(ref, ex), lab["method"], None, lab["score"])
        if "names" in sources:
            names = [a for a in self.project.annotations() if a["kind"] == "name"]
            for a in sorted(names, key=lambda a: (a["layer_id"], a["unit"], a["annotator"])):
                ref = refs.get(a["layer_id"])
                if ref is None or (annotators and a["annotator"] not in annotators) or not a["text"].strip():
                    continue
                concept = self._concept(a["text"])
                for ex in self.exemplars.of_unit(ref.layer_id, a["unit"], k):
                    self._add(concept, self._member(ref, ex), None, a["annotator"], None)
        if "groups" in sources:
            pools = PoolMaps(self.project)
            for g in group_rows(self.project, list(refs)):
                if annotators and g["annotator"] not in annotators:
                    continue
                got = pools.get(g["pool_id"], g["pool_params"], g["map_position"])
                if got is None:
                    self.skipped["group maps without arrays"] = self.skipped.get("group maps without arrays", 0) + 1
                    continue
                amap, thr = got
                member = Member(layer=refs[g["layer_id"]], unit=g["unit"], dataset_id=g["dataset_id"],
                                image_index=g["image_index"], score=float(g["score"]), map=amap, threshold=thr)
                self._add(self._concept(g["name"]), member, None, g["annotator"], None)
        out = [c for c in self.concepts.values() if c.members]
        if not out:
            from app.errors import JobError

            raise JobError("no concept to export: the chosen layers have no labels, unit names or groups with "
                           "exemplars", fix="label or name units of an extracted layer first, or widen --option "
                           "sources/layers")
        out.sort(key=lambda c: _norm(c.name))
        return out

    @staticmethod
    def _member(ref: LayerRef, ex: Any) -> Member:
        return Member(layer=ref, unit=ex.unit, dataset_id=ex.dataset_id, image_index=ex.image_index,
                      score=ex.score, map=ex.map, threshold=ex.threshold)

    def values_on_image(self, member: Member, size: tuple[int, int] | None = None) -> np.ndarray:
        """The member's map on its stored image of `size` (W, H; read from the project or the file when not
        given): [H, W] float32, -inf outside what the model saw."""
        from app.imaging import map_on_image

        size = size or self.images.size(member.dataset_id, member.image_index)
        return map_on_image(member.map, size, member.layer.preprocess)
