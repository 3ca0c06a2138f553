"""Reading back what an extraction stored for one layer: the one place that knows the array files' names."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import JobError
from app.project import arrays
from app.project.store import Project


@dataclass
class LayerResults:
    project_path: Path
    layer: dict[str, Any]  # the layers row
    stats: dict[str, Any]  # the layer_stats row (with run_id, dataset_id, model_id)
    unread: tuple[int, ...] = ()  # dataset indices the extraction could not read (its image-problems record)

    @classmethod
    def load(cls, project: Project, layer_id: int, run_id: int | None = None) -> "LayerResults":
        stats = project.layer_stats(layer_id, run_id)
        layer = project.layer_by_id(layer_id)
        if stats is None or layer is None:
            name = layer["name"] if layer else f"#{layer_id}"
            raise JobError(f"layer {name} has not been extracted yet", fix="run `neuron-studio extract` on it first")
        layer["grid"] = layer["grid"] or (1, 1)
        return cls(project.path, layer, stats, tuple(project.unread_images(int(stats["run_id"]))))

    @property
    def dir(self) -> Path:
        return self.project_path / self.stats["array_dir"]

    @property
    def run_id(self) -> int:
        return int(self.stats["run_id"])

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.dir / "meta.json").read_text())

    @cached_property
    def pooled_max(self) -> np.ndarray:
        return arrays.load_npy(self.dir / "pooled_max.npy")

    @cached_property
    def pooled_mean(self) -> np.ndarray:
        return arrays.load_npy(self.dir / "pooled_mean.npy")

    @cached_property
    def valid(self) -> np.ndarray:
        """[N] bool: images that were read. From the run's record of unread images, never from the values: a NaN
        activation (possible under fp16 autocast) is a fact about one unit, not a reason to drop the image."""
        valid = np.ones(self.pooled_max.shape[0], dtype=bool)
        unread = np.asarray(self.unread, dtype=np.int64)
        valid[unread[unread < valid.size]] = False
        return valid

    @cached_property
    def quantiles(self) -> dict[float, np.ndarray]:
        values = arrays.load_npy(self.dir / "quantiles.npy", mmap=False)
        return {float(q): values[i] for i, q in enumerate(self.meta["quantiles"])}

    def threshold(self, q: float | None = None) -> np.ndarray:
        q = self.meta["iou_quantile"] if q is None else q
        if q not in self.quantiles:
            raise JobError(f"quantile {q} was not extracted (have {sorted(self.quantiles)})",
                           fix="extract again with that quantile")
        return self.quantiles[q]

    @cached_property
    def topk_index(self) -> np.ndarray:
        return arrays.load_npy(self.dir / "topk_index.npy", mmap=False)

    @cached_property
    def topk_scores(self) -> np.ndarray:
        return arrays.load_npy(self.dir / "topk_scores.npy", mmap=False)

    @cached_property
    def topk_maps(self) -> np.ndarray:
        return arrays.load_npy(self.dir / "topk_maps.npy")

    @property
    def has_mask_counts(self) -> bool:
        return bool(self.stats["has_mask_counts"])

    def mask_counts(self, categories: list[str]) -> Any:
        from labelers.base import MaskCounts

        load = lambda name: torch.from_numpy(np.array(arrays.load_npy(self.dir / name, mmap=False)))  # noqa: E731
        return MaskCounts(
            intersection=load("mask_intersection.npy").double(), unit_area=load("mask_unit_area.npy").double(),
            concept_area=load("mask_concept_area.npy").double(), concept_category=load("concept_category.npy").long(),
            categories=list(categories),
        )
