"""The EXEMPLARS input: each unit's top images as the model saw them, with the unit's region on each.

From one extraction of a layer (`LayerResults`: top-k image indices, their maps, the units' quantiles) this builds,
for a chunk of units at a time, the k exemplar images in the model's view (`app.imaging.model_view`: the model's
resize and centre crop, zero padding where the crop overhangs) and the masks: the stored map upsampled bilinearly
to the view and strictly above the unit's threshold at the asked quantile (`labelers.netdissect.threshold_and_upsample`,
the engine's one definition of a region). Memory stays bounded: one chunk of units' images at a time plus a small
cache of decoded views (units of a layer share many top images), never the dataset.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from app.engine.results import LayerResults
from app.errors import JobError
from labelers.base import ExemplarBatch

log = logging.getLogger(__name__)

# Decoded model views kept between chunks (224 x 224 x 3 bytes each: 256 of them are about 38 MB).
CACHE_IMAGES = 256


class ProjectExemplars:
    """Exemplars of one extracted layer, in the labeler's image order (the images extraction read)."""

    def __init__(self, results: LayerResults, reader: Any, preprocess: dict[str, Any], rows: np.ndarray,
                 cache_images: int = CACHE_IMAGES):
        self.results = results
        self.reader = reader
        self.preprocess = dict(preprocess)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.size = int(self.preprocess.get("crop") or 224)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_images = max(0, int(cache_images))

    # what LabelerInputs.exemplars promises besides batches()
    @property
    def topk_index(self) -> np.ndarray:
        """[U, K] positions of the top images in the labeler's image order, -1 for an empty slot."""
        idx = np.asarray(self.results.topk_index, dtype=np.int64)
        pos = np.searchsorted(self.rows, idx)
        ok = (pos < len(self.rows)) & (self.rows[np.minimum(pos, len(self.rows) - 1)] == idx) & self._finite()
        return np.where(ok, pos, -1)

    @property
    def topk_maps(self) -> np.ndarray:
        return self.results.topk_maps

    @property
    def thresholds(self) -> dict[float, np.ndarray]:
        return self.results.quantiles

    def _finite(self) -> np.ndarray:
        return np.isfinite(np.asarray(self.results.topk_scores, dtype=np.float64))

    def threshold(self, quantile: float) -> np.ndarray:
        have = sorted(self.results.quantiles)
        q = next((x for x in have if math.isclose(x, quantile, abs_tol=1e-9)), None)
        if q is None:
            raise JobError(f"layer {self.results.layer['name']} was extracted without the {quantile} quantile "
                           f"(it has {', '.join(map(str, have))})",
                           fix=f"use --param quantile={have[0]}, or extract the layer again with that quantile")
        return np.asarray(self.results.quantiles[q], dtype=np.float32)

    def view(self, index: int) -> np.ndarray:
        """[S, S, 3] uint8: dataset image `index` as the model saw it."""
        from app.imaging import model_view
        from app.sources.datasets import load_rgb

        got = self._cache.get(index)
        if got is not None:
            self._cache.move_to_end(index)
            return got
        path = self.reader.images[index].path
        try:
            arr = np.array(model_view(load_rgb(path), self.preprocess), dtype=np.uint8)
        except Exception as exc:  # a file that extraction read and that is now gone or damaged
            raise JobError(f"{path}: an exemplar image that extraction read cannot be read now ({exc})",
                           fix="restore the file, or extract the layer again") from None
        if self._cache_images:
            self._cache[index] = arr
            while len(self._cache) > self._cache_images:
                self._cache.popitem(last=False)
        return arr

    def batches(self, units: Sequence[int], k: int, quantile: float, chunk: int) -> Iterator[ExemplarBatch]:
        """ExemplarBatch for `units`, `chunk` units at a time, in the order given."""
        from labelers.netdissect import threshold_and_upsample

        stored = int(np.asarray(self.results.topk_index).shape[1])
        if k > stored:
            raise JobError(f"layer {self.results.layer['name']} was extracted with {stored} top images per unit, "
                           f"fewer than the {k} asked for", fix=f"use --param k={stored} or extract again with more")
        thr = torch.from_numpy(self.threshold(quantile))
        valid = self.results.valid
        S = self.size
        units = [int(u) for u in units]
        for s in range(0, len(units), max(1, chunk)):
            us = np.asarray(units[s:s + chunk], dtype=np.int64)
            idx = np.asarray(self.results.topk_index[us, :k], dtype=np.int64)
            scores = np.asarray(self.results.topk_scores[us, :k], dtype=np.float64)
            present = np.isfinite(scores) & valid[np.clip(idx, 0, len(valid) - 1)] & (idx >= 0)
            maps = torch.from_numpy(np.asarray(self.results.topk_maps[us, :k], dtype=np.float32))
            # threshold_and_upsample takes [batch, units, h, w] with one threshold per unit: the k slots are the batch
            masks = threshold_and_upsample(maps.transpose(0, 1), thr[torch.from_numpy(us)], (S, S)).transpose(0, 1)
            masks = masks & torch.from_numpy(present)[..., None, None]
            images = torch.zeros((len(us), k, S, S, 3), dtype=torch.uint8)
            for i in range(len(us)):
                for j in range(k):
                    if present[i, j]:
                        images[i, j] = torch.from_numpy(self.view(int(idx[i, j])))
            pos = np.searchsorted(self.rows, idx)
            position = np.where(present, pos, -1)
            yield ExemplarBatch(units=torch.from_numpy(us), images=images, masks=masks.contiguous(),
                                present=torch.from_numpy(present), image_index=torch.from_numpy(position))
