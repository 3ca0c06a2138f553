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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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

    @property
    def exact(self) -> bool:
        return self.rate >= 1.0

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
            # Values at or below each unit's current m-th largest can never enter its top m.
            floor = self.buffer[:, -1:]
            k = int((values > floor).sum(dim=1).max())
            if k == 0:
                return
            values = values.topk(min(k, n), dim=1).values
        elif n > self.m:
            values = values.topk(self.m, dim=1).values
        merged = torch.cat([self.buffer, values.float()], dim=1)
        self.buffer = merged.topk(min(self.m, merged.shape[1]), dim=1).values

    def result(self) -> QuantileResult:
        vals = torch.stack([_interpolated_quantile(self.buffer, self.count, q) for q in self.quantiles])
        err = 0.0
        if not self.exact:
            k = max(1.0, (1 - self.quantiles[-1]) * float(self.count.float().mean()))
            err = 1 / math.sqrt(k)
        return QuantileResult(self.quantiles, vals.float().cpu(), self.exact, self.rate, err)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"buffer": self.buffer, "count": self.count}
        if self.generator is not None:
            out["rng"] = self.generator.get_state()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer = state["buffer"].to(self.device)
        self.count = state["count"].to(self.device)
        if self.generator is not None and "rng" in state:
            self.generator.set_state(state["rng"].cpu())


class TopKExemplars:
    """Streaming top-k images per unit by spatial maximum, keeping their maps (float16, [U, k, h, w])."""

    def __init__(self, units: int, k: int, grid: tuple[int, int], device: torch.device):
        self.k = k
        self.scores = torch.full((units, 0), float("-inf"), device=device)
        self.index = torch.zeros((units, 0), dtype=torch.int64, device=device)
        self.maps = torch.zeros((units, 0, *grid), dtype=torch.float16, device=device)
        self.device = device

    def update(self, scores: torch.Tensor, image_index: torch.Tensor, maps: torch.Tensor) -> None:
        """scores [B, U] spatial maxima; image_index [B] dataset indices; maps [B, U, h, w]."""
        s = torch.cat([self.scores, scores.T.float()], dim=1)
        idx = torch.cat([self.index, image_index[None, :].expand(s.shape[0], -1).to(self.index.device)], dim=1)
        kk = min(self.k, s.shape[1])
        top = s.topk(kk, dim=1)
        # Gather maps only for the winners: [U, kk, h, w] from old maps and the batch's maps.
        old = self.maps.shape[1]
        from_old = top.indices < old
        new_maps = torch.empty((s.shape[0], kk, *self.maps.shape[2:]), dtype=torch.float16, device=self.device)
        if old:
            src = top.indices.clamp(max=old - 1)
            gathered = self.maps.gather(1, src[:, :, None, None].expand(-1, -1, *self.maps.shape[2:]))
            new_maps[from_old] = gathered[from_old]
        if (~from_old).any():
            u, j = torch.nonzero(~from_old, as_tuple=True)
            b = top.indices[u, j] - old
            new_maps[u, j] = maps[b, u].to(torch.float16)
        self.scores = top.values
        self.index = idx.gather(1, top.indices)
        self.maps = new_maps

    def state(self) -> dict[str, torch.Tensor]:
        return {"scores": self.scores, "index": self.index, "maps": self.maps}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = state["scores"].to(self.device)
        self.index = state["index"].to(self.device)
        self.maps = state["maps"].to(self.device)
