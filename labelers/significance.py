"""Honest significance after a search: split the images into a search half and a test half, choose formulas on
the first, report their statistic and p-value on the second, and correct over units only.

Why: a formula picked as the best of thousands on some images fits those images better than it fits new ones, so
its p-value computed there is far too small whatever correction is applied afterwards (the search, not just the
number of formulas, decides what gets tested). On the held-out half each unit tests one formula, fixed before the
test half was looked at, so the family to correct for is the units.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps like uint64 in two's complement; the right shifts must be logical, hence the masks.
    def shr(v: torch.Tensor, k: int) -> torch.Tensor:
        return (v >> k) & ((1 << (64 - k)) - 1)

    x = x + (-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64
    x = (x ^ shr(x, 30)) * (-4658895280553007687)  # 0xBF58476D1CE4E5B9
    x = (x ^ shr(x, 27)) * (-7723592293110705685)  # 0x94D049BB133111EB
    return x ^ shr(x, 31)


def search_half(image_index: torch.Tensor, seed: int) -> torch.Tensor:
    """[n] bool: whether each image (by its position in the dataset's image order) is in the search half.

    Images are taken in consecutive pairs (0, 1), (2, 3), ...; a seeded hash of the pair picks which of the two
    goes to the search half. The split depends only on the position and the seed, so any batching of the images,
    in any number of passes, gives the same split, and the halves differ by at most one image even on tiny
    datasets."""
    idx = image_index.to(device="cpu", dtype=torch.int64)
    h = _splitmix64((idx // 2) ^ _splitmix64(torch.tensor([int(seed) & 0x7FFFFFFFFFFFFFFF]))[0])
    return ((h & 1) ^ (idx & 1)) == 0
