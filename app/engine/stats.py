"""Streaming per-unit statistics, computed on the extraction device batch by batch with memory that does not
grow with the number of batches beyond a fixed budget.

- `TopQuantiles`: upper quantiles (e.g. 0.99 and 0.995) of every unit's activations over all spatial positions of
  all images. Exact: it keeps each unit's largest `m` values, where `m` covers the lowest requested quantile, and
  reads the quantile with the same linear interpolation as `torch.quantile`. A sketch at this tail misplaces the top
  0.5% by up to 15% (see DESIGN.md), so a sketch is only the fallback: when `units x m` would exceed the memory
  budget, positions are subsampled with a fixed rate chosen up front (a Bernoulli sample) and the quantile is read
  from the sample; the realised top fraction then has a relative standard error of about 1/sqrt(k), k being the
  number of sampled values above the quantile (reported as `expected_relative_error`).
- `TopKExemplars`: each unit's k images with the highest spatial maximum, and their activation maps.
- `PooledRows`: per-image spatial max and mean of every unit, for a contiguous range of images.
- `MaskCounts`: Network Dissection's overlap counts of thresholded unit maps with concept masks.

All of them follow one protocol (`Statistic`): `observe` a batch, `state` / `load_state` for checkpoints, `merge`
another instance's state, `result`. Merging is exact: the states of shards of a dataset, merged in any order, give
bit for bit what one pass over the whole dataset gives. That holds because each statistic is a function of the
multiset of what it saw, never of the order: the quantile buffer is the multiset of the m largest values, the
exemplars are the top k under a total order (score descending, then image index ascending, so ties break the same
way whatever the split), pooled rows are disjoint, and mask counts are integer sums held in float64 (exact up to
2^53 pixels). The sampled quantile fallback is the one exception: shards draw their own samples, so the merged
sample is as good as one process's but not the same draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass
class MaskBatch:
    """The concept masks of a batch's valid images, densified over the concepts present in the batch."""

    dense: torch.Tensor  # [B, P, H, W] bool, P concepts present in the batch
    present: torch.Tensor  # [P] int64 concept indices
    annotated: torch.Tensor  # [B, K] bool, which categories each image annotates


@dataclass
class LayerBatch:
    """What the tally loop hands every statistic of one layer for one batch."""

    index: torch.Tensor  # [B] dataset indices of the valid images
    maps: torch.Tensor  # [B, U, h, w] float32 unit maps
    masks: MaskBatch | None = None

    @property
    def flat(self) -> torch.Tensor:
        return self.maps.reshape(self.maps.shape[0], self.maps.shape[1], -1)


class Statistic(Protocol):
    """A streaming statistic whose states merge exactly (see the module docstring)."""

    def observe(self, batch: LayerBatch) -> None: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def merge(self, state: dict[str, torch.Tensor]) -> None: ...

    def result(self) -> Any: ...


def _interpolated_quantile(desc: torch.Tensor, n: torch.Tensor, q: float) -> torch.Tensor:
    """`desc` [U, m] holds each unit's m largest of n values, sorted descending; returns torch.quantile's
    linear interpolation of quantile q, provided the two order statistics it needs lie inside the buffer."""
    pos = q * (n.to(torch.float64) - 1)  # ascending 0-based position
    lo = torch.floor(pos)
    frac = (pos - lo).to(desc.dtype)
    lo_desc = (n.to(torch.float64) - 1 - lo).long()  # index of the lower order statistic in descending order
    hi_desc = (lo_desc - 1).clamp(min=0)
    m = desc.shape[1]
    if int(lo_desc.max()) >= m:
        raise RuntimeError("the top-value buffer is too small for the requested quantile")
    v_lo = desc.gather(1, lo_desc[:, None]).squeeze(1)
    v_hi = desc.gather(1, hi_desc[:, None]).squeeze(1)
    return v_lo + frac * (v_hi - v_lo)


@dataclass
class QuantileResult:
    quantiles: list[float]
    values: torch.Tensor  # [len(quantiles), U] float32
    exact: bool
    sample_rate: float
    expected_relative_error: float  # of the realised top fraction; 0 when exact


class TopQuantiles:
    def __init__(
        self, units: int, total_values_per_unit: int, quantiles: list[float], device: torch.device,
        budget_bytes: int = 512 * 2**20, seed: int = 0,
    ):
        self.units = units
        self.quantiles = sorted(quantiles)
        self.device = device
        q_min = self.quantiles[0]
        need = math.ceil((1 - q_min) * total_values_per_unit) + 2
        max_m = max(16, budget_bytes // (4 * max(units, 1)))
        if need <= max_m:
            self.rate = 1.0
            self.m = need
        else:
            # Sample positions with a fixed rate so the buffer fits; m covers the tail of the sample with slack
            # for the binomial spread of the sample size (6 standard deviations).
            self.rate = max_m / need
            expected = (1 - q_min) * total_values_per_unit * self.rate
            self.m = min(max_m, int(expected + 6 * math.sqrt(expected) + 16))
            self.rate = min(1.0, self.rate * 0.9)
        self.buffer = torch.full((units, 0), float("-inf"), device=device)
        self.count = torch.zeros(units, dtype=torch.int64, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed) if self.rate < 1 else None
        # Candidates waiting to be merged into the full buffer. Merging is a top-m of m + k values per unit: done
        # for every batch, it was most of pass 1's time; done once about m candidates have gathered, it is rare.
        # The m largest of the union do not depend on when the parts are merged, so the buffer is the same.
        self._pending: list[torch.Tensor] = []
        self._pending_cols = 0

    @property
    def exact(self) -> bool:
        return self.rate >= 1.0

    def observe(self, batch: LayerBatch) -> None:
        flat = batch.flat
        self.update(flat.transpose(0, 1).reshape(flat.shape[1], -1))

    def update(self, values: torch.Tensor) -> None:
        """`values` [U, n] float32 activations of one batch (all positions of all images, flattened)."""
        if self.rate < 1.0:
            keep = torch.rand(values.shape[1], generator=self.generator, device=values.device) < self.rate
            values = values[:, keep]
        n = values.shape[1]
        if n == 0:
            return
        self.count += n
        if self.buffer.shape[1] >= self.m:
            # Values at or below each unit's m-th largest as of the last merge can never enter its top m.
            floor = self.buffer[:, -1:]
            k = int((values > floor).sum(dim=1).max())
            if k == 0:
                return
            self._pending.append(values.topk(min(k, n), dim=1).values.float())
            self._pending_cols += self._pending[-1].shape[1]
            if self._pending_cols >= self.m:
                self._merge_pending()
            return
        if n > self.m:
            values = values.topk(self.m, dim=1).values
        merged = torch.cat([self.buffer, values.float()], dim=1)
        self.buffer = merged.topk(min(self.m, merged.shape[1]), dim=1).values

    def _merge_pending(self) -> None:
        if self._pending:
            merged = torch.cat([self.buffer, *self._pending], dim=1)
            self.buffer = merged.topk(min(self.m, merged.shape[1]), dim=1).values
            self._pending, self._pending_cols = [], 0

    def result(self) -> QuantileResult:
        self._merge_pending()
        vals = torch.stack([_interpolated_quantile(self.buffer, self.count, q) for q in self.quantiles])
        err = 0.0
        if not self.exact:
            k = max(1.0, (1 - self.quantiles[-1]) * float(self.count.float().mean()))
            err = 1 / math.sqrt(k)
        return QuantileResult(self.quantiles, vals.float().cpu(), self.exact, self.rate, err)

    def state(self) -> dict[str, torch.Tensor]:
        self._merge_pending()
        out = {"buffer": self.buffer, "count": self.count}
        if self.generator is not None:
            out["rng"] = self.generator.get_state()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._pending, self._pending_cols = [], 0
        self.buffer = state["buffer"].to(self.device)
        self.count = state["count"].to(self.device)
        if self.generator is not None and "rng" in state:
            self.generator.set_state(state["rng"].cpu())

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """The m largest of the union are among the m largest of each part: exact, whatever the split."""
        self._merge_pending()
        merged = torch.cat([self.buffer, state["buffer"].to(self.device, torch.float32)], dim=1)
        self.buffer = merged.topk(min(self.m, merged.shape[1]), dim=1).values
        self.count = self.count + state["count"].to(self.device)


def _rank(scores: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of each row's k best candidates under a total order: score descending, then image index
    ascending. `topk` leaves the order of ties unspecified, and a tie broken one way in one process and another way
    across shards would make the merged exemplars differ from one process's."""
    by_index = index.argsort(dim=1, stable=True)
    by_score = scores.gather(1, by_index).argsort(dim=1, descending=True, stable=True)
    return by_index.gather(1, by_score[:, :k])


class TopKExemplars:
    """Streaming top-k images per unit by spatial maximum, keeping their maps (float16, [U, k, h, w])."""

    def __init__(self, units: int, k: int, grid: tuple[int, int], device: torch.device):
        self.k = k
        self.scores = torch.full((units, 0), float("-inf"), device=device)
        self.index = torch.zeros((units, 0), dtype=torch.int64, device=device)
        self.maps = torch.zeros((units, 0, *grid), dtype=torch.float16, device=device)
        self.device = device

    def observe(self, batch: LayerBatch) -> None:
        self.update(batch.flat.amax(dim=2), batch.index, batch.maps)

    def update(self, scores: torch.Tensor, image_index: torch.Tensor, maps: torch.Tensor) -> None:
        """scores [B, U] spatial maxima; image_index [B] dataset indices; maps [B, U, h, w]."""
        s = torch.cat([self.scores, scores.T.float()], dim=1)
        idx = torch.cat([self.index, image_index[None, :].expand(s.shape[0], -1).to(self.index.device)], dim=1)
        win = _rank(s, idx, min(self.k, s.shape[1]))
        kk = win.shape[1]
        # Gather maps only for the winners: [U, kk, h, w] from old maps and the batch's maps.
        old = self.maps.shape[1]
        from_old = win < old
        new_maps = torch.empty((s.shape[0], kk, *self.maps.shape[2:]), dtype=torch.float16, device=self.device)
        if old:
            src = win.clamp(max=old - 1)
            gathered = self.maps.gather(1, src[:, :, None, None].expand(-1, -1, *self.maps.shape[2:]))
            new_maps[from_old] = gathered[from_old]
        if (~from_old).any():
            u, j = torch.nonzero(~from_old, as_tuple=True)
            b = win[u, j] - old
            new_maps[u, j] = maps[b, u].to(self.device, torch.float16)
        self.scores = s.gather(1, win)
        self.index = idx.gather(1, win)
        self.maps = new_maps

    def state(self) -> dict[str, torch.Tensor]:
        return {"scores": self.scores, "index": self.index, "maps": self.maps}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = state["scores"].to(self.device)
        self.index = state["index"].to(self.device)
        self.maps = state["maps"].to(self.device)

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        s = torch.cat([self.scores, state["scores"].to(self.device, torch.float32)], dim=1)
        idx = torch.cat([self.index, state["index"].to(self.device)], dim=1)
        maps = torch.cat([self.maps, state["maps"].to(self.device, torch.float16)], dim=1)
        win = _rank(s, idx, min(self.k, s.shape[1]))
        self.scores = s.gather(1, win)
        self.index = idx.gather(1, win)
        self.maps = maps.gather(1, win[:, :, None, None].expand(-1, -1, *maps.shape[2:]))

    def result(self) -> dict[str, torch.Tensor]:
        return {"index": self.index, "scores": self.scores, "maps": self.maps}


class PooledRows:
    """Per-image spatial max and mean [n, U] of the images start..start+n-1 (NaN where an image was skipped).

    Rows go straight into the given arrays (the run's memory-mapped files in the coordinator or a single process,
    so memory does not grow with the dataset), or into in-memory arrays for a shard. Its state is the rows
    themselves: a shard's is small, and a single process checkpoints by flushing its files instead.
    """

    def __init__(self, start: int, n: int, units: int, rows_max: np.ndarray | None = None,
                 rows_mean: np.ndarray | None = None):
        self.start = start
        self.n = n
        self.max = rows_max if rows_max is not None else np.full((n, units), np.nan, np.float32)
        self.mean = rows_mean if rows_mean is not None else np.full((n, units), np.nan, np.float32)

    def observe(self, batch: LayerBatch) -> None:
        flat = batch.flat
        self.update(batch.index, flat.amax(dim=2), flat.mean(dim=2))

    def update(self, image_index: torch.Tensor, mx: torch.Tensor, mean: torch.Tensor) -> None:
        rows = image_index.cpu().numpy() - self.start
        self.max[rows] = mx.cpu().numpy()
        self.mean[rows] = mean.cpu().numpy()

    def state(self) -> dict[str, torch.Tensor]:
        return {"start": torch.tensor([self.start], dtype=torch.int64),
                "max": torch.from_numpy(np.asarray(self.max)), "mean": torch.from_numpy(np.asarray(self.mean))}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.merge(state)

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Another range's rows into their place (ranges are disjoint: nothing to combine)."""
        lo = int(state["start"][0]) - self.start
        hi = lo + state["max"].shape[0]
        if lo < 0 or hi > self.n:
            raise ValueError(f"rows {lo + self.start}..{hi + self.start} lie outside {self.start}..{self.start + self.n}")
        self.max[lo:hi] = state["max"].numpy()
        self.mean[lo:hi] = state["mean"].numpy()

    def flush(self) -> None:
        for a in (self.max, self.mean):
            if isinstance(a, np.memmap):
                a.flush()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.max, self.mean


class MaskCounts:
    """Network Dissection's counts over a dataset with masks: for every unit, its map upsampled to the mask grid and
    thresholded, then per concept the intersection with the concept's masks, per category the active area over
    the images that annotate it, and per concept its total area. Integer counts in float64: sums are exact."""

    def __init__(self, units: int, n_concepts: int, n_categories: int, thresholds: torch.Tensor,
                 concept_category: torch.Tensor, mask_size: int, device: torch.device):
        self.thresholds = thresholds.to(device)
        self.concept_category = concept_category.to(device)
        self.mask_size = mask_size
        self.device = device
        self.inter = torch.zeros((units, n_concepts), dtype=torch.float64, device=device)
        self.unit_area = torch.zeros((units, n_categories), dtype=torch.float64, device=device)
        self.concept_area = torch.zeros(n_concepts, dtype=torch.float64, device=device)

    def observe(self, batch: LayerBatch) -> None:
        if batch.masks is None:
            raise ValueError("mask counts need the batch's masks")
        self.update(batch.maps, batch.masks)

    def update(self, maps: torch.Tensor, masks: MaskBatch) -> None:
        from labelers.netdissect import iou_counts_from_maps

        present = masks.present.to(self.device)
        inter, area, c_area = iou_counts_from_maps(
            maps.to(self.device), self.thresholds, (self.mask_size, self.mask_size), masks.dense.to(self.device),
            masks.annotated.to(self.device), self.concept_category[present])
        if present.numel():
            self.inter.index_add_(1, present, inter.to(self.inter))
            self.concept_area.index_add_(0, present, c_area.to(self.concept_area))
        self.unit_area += area.to(self.unit_area)

    def state(self) -> dict[str, torch.Tensor]:
        return {"inter": self.inter, "unit_area": self.unit_area, "concept_area": self.concept_area}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inter = state["inter"].to(self.device, torch.float64)
        self.unit_area = state["unit_area"].to(self.device, torch.float64)
        self.concept_area = state["concept_area"].to(self.device, torch.float64)

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        self.inter += state["inter"].to(self.device, torch.float64)
        self.unit_area += state["unit_area"].to(self.device, torch.float64)
        self.concept_area += state["concept_area"].to(self.device, torch.float64)

    def result(self) -> dict[str, torch.Tensor]:
        return self.state()
