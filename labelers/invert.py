"""INVERT: Inverse Recognition (Bykov, Kopf, Nakajima, Kloft & Hoehne, NeurIPS 2023, arXiv:2311.13594).

A unit is labelled with the concept formula whose images it ranks highest: the score of a formula F is the AUROC
of the unit's per-image activation as a classifier of "F holds on the image" (ties count half, so AUC equals the
Mann-Whitney U statistic over n+ n-). Formulas are built by beam search as in the reference code (lapalap/invert,
`Invert.explain_representation`):

- atoms are every concept c and its negation NOT c (AUC(NOT c) = 1 - AUC(c));
- the first beam holds the B best atoms whose positive fraction lies in [min_fraction, max_fraction] (and strictly
  between 0 and 1);
- for each length 2..L every beam formula is combined with every atom by AND and by OR (the atoms optionally limited
  to the `limit_search` most "differentiable" ones, 2 |0.5 - AUC|); candidates go through the same fraction filter,
  compete with the current beam, and the B best survive;
- significance: the two-sided Mann-Whitney U test of the unit's activations on formula-positive against
  formula-negative images (normal approximation with tie and continuity correction, as
  `scipy.stats.mannwhitneyu(method="asymptotic")`), corrected over all units x formulas tested.

Where we deliberately differ from the reference, for labels a user can read:
- candidates whose image set equals one already in the pool (a formula that changes nothing, "dog AND animal" next
  to "dog", or the same set reached twice) are scored once; the shortest, earliest spelling is kept;
- an atom is not combined with a formula that already contains its concept (sympy, which the reference uses,
  collapses such formulas to shorter ones anyway);
- the growth test (`growth_alpha`, off in the `reference` preset): a formula F grows to F AND c / F OR c only when
  the images the term removes (AND) or adds (OR) rank lower than the rest of F (resp. higher than the rest of
  NOT F) by a Wilcoxon rank-sum test with ranks taken within that class, Bonferroni over every extension the
  search may try for a unit; a first atom must pass the same test against all images to be extended at all.
  Without it the best of thousands of extensions always beats its parent by chance, so the label of a planted
  "a" becomes "a AND NOT x" for a noise concept x, and such variants crowd out of the beam the partial formula a
  longer planted formula needs (decision record 0102).

Speed: nothing is ever re-sorted. Each unit's activations are ranked once (average ranks for ties); a formula's rank
sum, positive count and a set fingerprint over all concepts come from one matrix product with the concept matrix,
and AND / AND NOT / OR / OR NOT of a beam formula with every atom follow by inclusion-exclusion from those products.
All sums are integer-valued and computed exactly (int8 digit products on the CPU; on a GPU float32 with TF32 off,
on 12-bit digits in blocks of 4096 images, so that every partial sum stays below 2^24). A formula carried over in
the beam from the previous length keeps its products; only formulas new to the beam (and allowed to grow) are
multiplied.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from labelers.base import (
    Input,
    Label,
    Labeler,
    LabelerError,
    LabelerInputs,
    LabelingResult,
    MissingInputError,
    NullProgress,
    Param,
    Progress,
    register,
    unit_chunks,
)
from labelers.formulas import And, ConceptRelations, Formula, Leaf, Not, Or, canonical_formula_text
from labelers.significance import search_half

log = logging.getLogger(__name__)

CORRECTIONS = ("bonferroni", "holm", "fdr_bh", "none")

# Minimum support (see the `min_fraction` / `min_images` help and benchmarks/invert_planted.py for the measurements).
MIN_FRACTION = 0.002
MIN_IMAGES = 20
# Level of the test a formula must pass to grow by a term (see the `growth_alpha` help).
GROWTH_ALPHA = 0.05

# Operations on a beam formula F and an atom's concept c, in the order candidates are laid out.
OP_AND, OP_AND_NOT, OP_OR, OP_OR_NOT = range(4)
# Codes stored per step of a formula (0 marks an unused step of a shorter formula).
STEP_NONE, STEP_AND, STEP_OR = 0, 1, 2

_DIGIT = 4096.0  # 12-bit digits for the float32 path
_F32_BLOCK = 4096  # images per float32 block: a digit sum stays below 4096 * 4096 = 2^24
_F64_BLOCK = 8192  # images per float64 block: bounds the float64 copy of the concept matrix
_I8_BLOCK = 1 << 16  # images per int8 block: a digit sum stays below 255 * 2^16 < 2^31
_HASH_BITS = 16  # at most this many bits per image weight of the set fingerprint (two 8-bit digits)
_POOL_BUDGET = 1 << 21  # candidate scores held at once per unit chunk
_ROW_BUDGET = 1 << 25  # float64 entries of the matrix-product rows held at once (256 MiB)


# ----------------------------------------------------------------------------------------------------------------
# Ranks, AUC and the Mann-Whitney test


@dataclass
class TieGroups:
    """Each row's sort order and, per sorted position, the first and last sorted position of its tie group."""

    order: torch.Tensor  # [U, N] int64
    start: torch.Tensor  # [U, N] int64
    end: torch.Tensor  # [U, N] int64


def tie_groups(values: torch.Tensor) -> TieGroups:
    num_rows, n = values.shape
    sorted_vals, order = torch.sort(values, dim=1, stable=True)
    pos = torch.arange(n, device=values.device).expand(num_rows, n)
    change = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    edge = torch.ones(num_rows, 1, dtype=torch.bool, device=values.device)
    is_start = torch.cat([edge, change], dim=1)
    is_end = torch.cat([change, edge], dim=1)
    start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(is_end, pos, torch.full_like(pos, n - 1)).flip(1).cummin(dim=1).values.flip(1)
    return TieGroups(order, start, end)


def average_ranks(values: torch.Tensor, groups: TieGroups | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of each row of `values` [U, N] with ties averaged (1-based, float64), and each row's tie term
    sum over tie groups of (t^3 - t), which the variance of the Mann-Whitney U statistic needs."""
    g = groups or tie_groups(values)
    avg = (g.start + g.end).to(torch.float64) / 2 + 1
    ranks = torch.empty_like(avg).scatter_(1, g.order, avg)
    size = (g.end - g.start + 1).to(torch.float64)
    # Each member of a group of size t contributes t^2 - 1, so the group contributes t^3 - t.
    tie_term = (size * size - 1).sum(dim=1)
    return ranks, tie_term


def class_ranks2(sets: torch.Tensor, groups: TieGroups) -> torch.Tensor:
    """Twice the rank of each image within its own class, ties averaged: sets [U, S, N] bool (S sets per row of
    `groups`) -> int32 [U, S, N], 2 x (rank among the set's images) on the set's images and 2 x (rank among the
    other images) elsewhere. Each class's values are then a permutation of 2, 4, ..., 2 x size (ties averaged)."""
    u, num_sets, n = sets.shape
    out = torch.empty(u, num_sets, n, dtype=torch.int32, device=sets.device)
    no_ties = bool((groups.start == groups.end).all())
    pos = torch.arange(n, dtype=torch.int32, device=sets.device)
    for k in range(num_sets):  # one set at a time keeps the temporaries at [U, N]
        s_sorted = sets[:, k].gather(1, groups.order)
        cum = s_sorted.to(torch.int32).cumsum(dim=1, dtype=torch.int32)  # set members up to here, inclusive
        if no_ties:
            # A member's rank in the set is `cum`; a non-member's rank among the others is pos + 1 - cum.
            twice = torch.where(s_sorted, 2 * cum, 2 * (pos + 1 - cum))
        else:
            below_in = (cum - s_sorted.to(torch.int32)).gather(1, groups.start)  # members before the tie group
            within_in = cum.gather(1, groups.end) - below_in  # members in the tie group
            below_out = groups.start.to(torch.int32) - below_in
            within_out = (groups.end - groups.start + 1).to(torch.int32) - within_in
            twice = torch.where(s_sorted, 2 * below_in + within_in + 1, 2 * below_out + within_out + 1)
        out[:, k].scatter_(1, groups.order, twice)
    return out


def auc_from_rank_sum(rank_sum: torch.Tensor, n_pos: torch.Tensor, n: int) -> torch.Tensor:
    """AUROC with half credit for ties: U / (n+ n-), U = R+ - n+(n+ + 1)/2. NaN where a class is empty."""
    n_neg = n - n_pos
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def mannwhitney_log_p(rank_sum: torch.Tensor, n_pos: torch.Tensor, n: int, tie_term: torch.Tensor) -> torch.Tensor:
    """Natural log of the two-sided Mann-Whitney U p-value, normal approximation with tie and continuity correction
    (scipy's `mannwhitneyu(method="asymptotic", use_continuity=True)`). `tie_term` broadcasts against `n_pos`.
    Computed in log space so that p-values far below 1e-308 still order correctly."""
    n1 = n_pos
    n2 = n - n_pos
    u1 = rank_sum - n1 * (n1 + 1) / 2
    u = torch.maximum(u1, n1 * n2 - u1)
    var = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    sd = var.clamp_min(0).sqrt()
    ok = sd > 0
    z = (u - n1 * n2 / 2 - 0.5) / torch.where(ok, sd, torch.ones_like(sd))
    log_p = (math.log(2.0) + torch.special.log_ndtr(-z)).clamp_max(0.0)
    # Without spread (one class empty, or all values tied) nothing can be rejected.
    return torch.where(ok, log_p, torch.zeros_like(log_p))


@contextlib.contextmanager
def _ieee_float32_matmul():
    """float32 products in full precision (no TF32, no bf16) inside the block, and each backend's own setting put
    back as it was after it. `torch.set_float32_matmul_precision` is process-wide and its get/set round trip does
    not restore the per-backend settings (it spreads CUDA's TF32 choice to oneDNN)."""
    knobs = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [k.fp32_precision for k in knobs]
    for k in knobs:
        k.fp32_precision = "ieee"
    try:
        yield
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value


class Int8Product:
    """Exact rows @ presence on CPU by 8-bit digits in int8 x int8 -> int32 products (VNNI: ~9x float64's rate
    here). The int8 copy of the concept matrix and its column counts are made once and reused for every product.
    Digits 0..255 are stored shifted by -128; the shift adds -128 x (column count) to every product, which is
    added back. `available` is False where this torch build has no CPU int8 product."""

    def __init__(self, presence: torch.Tensor):
        self.blocks: list[tuple[slice, torch.Tensor, torch.Tensor]] = []
        self.num_c = presence.shape[1]
        self.available = hasattr(torch, "_int_mm") and presence.device.type == "cpu"
        if not self.available:
            return
        n = presence.shape[0]
        for s in range(0, n, _I8_BLOCK):
            p8 = presence[s : s + _I8_BLOCK].to(torch.int8).contiguous()
            shift = 128.0 * p8.sum(dim=0, dtype=torch.int64).to(torch.float64)
            self.blocks.append((slice(s, s + _I8_BLOCK), p8, shift))
        try:
            torch._int_mm(torch.zeros((32, min(n, 64)), dtype=torch.int8), self.blocks[0][1][:64])
        except (RuntimeError, NotImplementedError, IndexError):
            self.available = False

    def mm(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, N] of non-negative integers (bool or an integer or float dtype) -> float64 [M, C]."""
        m = rows.shape[0]
        out = torch.zeros(m, self.num_c, dtype=torch.float64)
        if rows.dtype == torch.bool:
            digits = [rows.to(torch.int8) - 128]
        else:
            top = int(rows.max()) if rows.numel() else 0
            wide = top >= 2**31
            r = rows.to(torch.int64 if wide else torch.int32).contiguous()
            num_digits = max(1, math.ceil(math.log2(top + 1) / 8)) if top > 0 else 1
            # The little-endian bytes of the integers are the digits; x ^ 0x80 read as int8 is x - 128.
            byte_view = r.view(torch.uint8).view(m, -1, 8 if wide else 4)
            digits = [(byte_view[..., d] ^ 128).view(torch.int8) for d in range(num_digits)]
        stacked = torch.cat(digits, dim=0) if len(digits) > 1 else digits[0]
        for sl, p8, shift in self.blocks:
            part = torch._int_mm(stacked[:, sl].contiguous(), p8).to(torch.float64)
            part += shift[None, :]
            scale = 1.0
            for d in range(len(digits)):
                out += part[d * m : (d + 1) * m] * scale
                scale *= 256.0
        return out


def exact_int_matmul(rows: torch.Tensor, presence: torch.Tensor, float32: bool | None = None) -> torch.Tensor:
    """rows [M, N] holding non-negative integers, presence [N, C] bool -> the exact sums rows @ presence, float64.

    On CPU (by default) rows are split into 8-bit digits and multiplied as int8 with int32 sums, exact while a
    block's sums stay below 2^31. float64 products (`float32=False`) are exact while sums stay below 2^53. On a GPU
    float64 is slow, so (by default, or with `float32=True`) rows are split into 12-bit digits and multiplied in
    float32 with TF32 off over blocks of 4096 images: every partial sum is then an integer below 2^24, which float32
    holds exactly whatever the order of accumulation."""
    use_f32 = rows.device.type != "cpu" if float32 is None else float32
    m, n = rows.shape
    if float32 is None and not use_f32 and m and n:
        prod = Int8Product(presence)
        if prod.available:
            return prod.mm(rows)
    out = torch.zeros(m, presence.shape[1], dtype=torch.float64, device=rows.device)
    if not use_f32:
        rows64 = rows.to(torch.float64)
        for s in range(0, n, _F64_BLOCK):
            out.addmm_(rows64[:, s : s + _F64_BLOCK], presence[s : s + _F64_BLOCK].to(torch.float64))
        return out
    rows64 = rows.to(torch.float64)
    top = float(rows64.max()) if rows64.numel() else 0.0
    num_digits = max(1, math.ceil(math.log2(top + 1) / 12)) if top > 0 else 1
    digits = []
    rest = rows64
    for _ in range(num_digits):
        high = torch.floor(rest / _DIGIT)
        digits.append((rest - high * _DIGIT).to(torch.float32))
        rest = high
    stacked = torch.cat(digits, dim=0)
    with _ieee_float32_matmul():
        for s in range(0, n, _F32_BLOCK):
            part = (stacked[:, s : s + _F32_BLOCK] @ presence[s : s + _F32_BLOCK].to(torch.float32)).to(torch.float64)
            scale = 1.0
            for d in range(num_digits):
                out += part[d * m : (d + 1) * m] * scale
                scale *= _DIGIT
    return out


def auc_table(pooled: torch.Tensor, presence: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """AUC and two-sided Mann-Whitney log p-value of every unit x concept: pooled [N, U], presence [N, C] bool ->
    ([U, C] float64, [U, C] float64). Ranks each unit once; one exact matrix product gives every rank sum."""
    n, num_units = pooled.shape
    presence = presence.to(pooled.device, torch.bool)
    n_pos = presence.sum(dim=0).to(torch.float64)
    aucs, log_ps = [], []
    for sl in unit_chunks(num_units, chunk):
        ranks, tie = average_ranks(pooled[:, sl].T.contiguous())
        rank_sum = exact_int_matmul(ranks * 2, presence) / 2
        aucs.append(auc_from_rank_sum(rank_sum, n_pos, n))
        log_ps.append(mannwhitney_log_p(rank_sum, n_pos, n, tie[:, None]))
    return torch.cat(aucs), torch.cat(log_ps)


# ----------------------------------------------------------------------------------------------------------------
# Multiple-testing correction


def adjust_p_values(
    log_p: torch.Tensor, num_tests: int, method: str, tested_log_p: torch.Tensor | None = None
) -> torch.Tensor:
    """Adjusted p-values (not logs) of the reported `log_p` within a family of `num_tests` tests.

    Bonferroni needs only the count. Holm and Benjamini-Hochberg need where each reported p-value lies among all
    tested ones: `tested_log_p` holds them all (any order), the reported ones among them."""
    log_p = log_p.to(torch.float64)
    if method == "none":
        return log_p.exp()
    m = max(int(num_tests), 1)
    if method == "bonferroni":
        return (log_p + math.log(m)).clamp_max(0.0).exp()
    if method not in ("holm", "fdr_bh"):
        raise LabelerError(f"correction must be one of {', '.join(CORRECTIONS)}, not {method!r}")
    if tested_log_p is None:
        raise ValueError(f"{method} needs the p-values of all tested formulas")
    ordered = torch.sort(tested_log_p.to(torch.float32).flatten()).values
    t = ordered.numel()
    if t != m:
        raise ValueError(f"{t} tested p-values for a family of {m} tests")
    flat = log_p.flatten().cpu()
    key = flat.to(torch.float32)
    ordered64 = ordered.to(torch.float64)
    j = torch.arange(t, dtype=torch.float64)
    if method == "holm":
        # p_adj(i) = max over j <= i of (m - j) p_(j) (0-based); ties share the value of their first position.
        step = (torch.log(m - j) + ordered64).cummax(dim=0).values
        pos = torch.searchsorted(ordered, key, right=False)
        before = torch.where(pos > 0, step[(pos - 1).clamp_min(0)], torch.full_like(flat, -math.inf))
        own = torch.log(m - pos.to(torch.float64).clamp_max(m - 1)) + flat
        adj = torch.maximum(before, own)
    else:
        # p_adj(i) = min over j >= i of m p_(j) / (j + 1); ties share the value of their last position.
        step = (math.log(m) - torch.log(j + 1) + ordered64).flip(0).cummin(dim=0).values.flip(0)
        pos = torch.searchsorted(ordered, key, right=True).clamp_min(1)
        own = math.log(m) - torch.log(pos.to(torch.float64)) + flat
        after = torch.where(pos < t, step[pos.clamp_max(t - 1)], torch.full_like(flat, math.inf))
        adj = torch.minimum(own, after)
    return adj.clamp_max(0.0).exp().reshape(log_p.shape).to(log_p.device)


# ----------------------------------------------------------------------------------------------------------------
# Beam search


@dataclass
class InvertSearch:
    """Each unit's final beam, best first (slot 0 is the label). Atom index a < C is concept a; a >= C is NOT a-C.

    A formula is left-deep: first atom, then per step (op, atom), e.g. ((a OR b) AND (NOT c))."""

    first: torch.Tensor  # [U, B] int64 first atom
    ops: torch.Tensor  # [U, B, L-1] int64 STEP_AND / STEP_OR, STEP_NONE after the formula ends
    atoms: torch.Tensor  # [U, B, L-1] int64 atom of each step
    length: torch.Tensor  # [U, B] int64 number of atoms
    ok: torch.Tensor  # [U, B] bool: the slot holds a formula (fewer may pass the fraction filter)
    auc: torch.Tensor  # [U, B] float64
    count: torch.Tensor  # [U, B] float64 images on which the formula holds
    log_p: torch.Tensor  # [U, B] float64 two-sided Mann-Whitney log p-value
    tests: torch.Tensor  # [U] int64 formulas scored for the unit (the multiple-testing family)
    tested_log_p: torch.Tensor | None  # [sum(tests)] float32 log p of every formula scored, when asked for
    num_images: int
    num_concepts: int

    def formula(self, unit: int, slot: int) -> Formula:
        c = self.num_concepts

        def atom(a: int) -> Formula:
            return Leaf(a) if a < c else Not(Leaf(a - c))

        f = atom(int(self.first[unit, slot]))
        for op, a in zip(self.ops[unit, slot].tolist(), self.atoms[unit, slot].tolist()):
            if op == STEP_AND:
                f = And(f, atom(a))
            elif op == STEP_OR:
                f = Or(f, atom(a))
        return f


def _select(key: torch.Tensor, count: torch.Tensor, fingerprint: torch.Tensor, tiebreak: torch.Tensor, k: int):
    """Per row, the k best entries by key (descending, then tiebreak ascending), one per distinct image set
    (entries with equal key, count and fingerprint are the same set; the one with the smallest tiebreak stays).
    Invalid entries carry key -inf. Returns indices [R, k] and whether each holds a valid entry."""
    rows, m = key.shape
    tiebreak = tiebreak.expand(rows, m)
    # Order by (key desc, fingerprint, count, tiebreak): copies of one set end up adjacent, the first one kept.
    o = torch.argsort(tiebreak, dim=1, stable=True)
    o = o.gather(1, torch.argsort(count.gather(1, o), dim=1, stable=True))
    o = o.gather(1, torch.argsort(fingerprint.gather(1, o), dim=1, stable=True))
    o = o.gather(1, torch.argsort(-key.gather(1, o), dim=1, stable=True))
    ks, fs, cs = key.gather(1, o), fingerprint.gather(1, o), count.gather(1, o)
    dup = torch.zeros_like(ks, dtype=torch.bool)
    dup[:, 1:] = (ks[:, 1:] == ks[:, :-1]) & (fs[:, 1:] == fs[:, :-1]) & (cs[:, 1:] == cs[:, :-1])
    ks = ks.masked_fill(dup, -math.inf)
    tb = tiebreak.gather(1, o)
    o2 = torch.argsort(tb, dim=1, stable=True)
    o2 = o2.gather(1, torch.argsort(-ks.gather(1, o2), dim=1, stable=True))
    kk = min(k, m)
    top = o2[:, :kk]
    idx = o.gather(1, top)
    ok = ks.gather(1, top) > -math.inf
    if kk < k:
        idx = torch.cat([idx, idx.new_zeros(rows, k - kk)], dim=1)
        ok = torch.cat([ok, ok.new_zeros(rows, k - kk)], dim=1)
    return idx, ok


def _select_fast(key, count, fingerprint, tiebreak, k, short: int | None = None):
    """`_select` on a short list first: the k best distinct sets are exactly those among the top K by key when at
    least k distinct sets there score strictly above the K-th key (every copy of such a set is then inside too).
    Rows where that fails (many copies of one set, large ties) are redone with a list 8 times longer, at worst on
    the whole pool."""
    rows, m = key.shape
    big_k = short or max(4 * k, k + 32)
    if big_k >= m:
        return _select(key, count, fingerprint, tiebreak, k)
    tiebreak = tiebreak.expand(rows, m)
    top_key, top_idx = torch.topk(key, big_k, dim=1, sorted=False)
    sub_idx, ok = _select(
        top_key, count.gather(1, top_idx), fingerprint.gather(1, top_idx), tiebreak.gather(1, top_idx), k
    )
    idx = top_idx.gather(1, sub_idx)
    threshold = top_key.min(dim=1).values
    strictly_above = ok & (key.gather(1, idx) > threshold[:, None])
    redo = strictly_above.sum(dim=1) < k
    # Rows with fewer than K valid entries in the whole pool are complete once every valid entry is in the list.
    redo &= (key > -math.inf).sum(dim=1) > big_k
    if bool(redo.any()):
        r = redo.nonzero().flatten()
        idx_r, ok_r = _select_fast(key[r], count[r], fingerprint[r], tiebreak[r], k, big_k * 8)
        idx[r] = idx_r
        ok[r] = ok_r
    return idx, ok


def growth_z(
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    i_n: torch.Tensor,
    f_n: torch.Tensor,
    c_n: torch.Tensor,
    f_sq: torch.Tensor,
    nf_sq: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """z of the images each extension of a formula F changes, [..., 4, C] laid out as OP_AND, OP_AND_NOT, OP_OR,
    OP_OR_NOT.

    Extending F by AND removes the images D = F minus F'; by OR it adds D = F' minus F. If the term carried nothing
    about the unit beyond F, D would be a random draw of |D| of F's images (AND) or of NOT F's (OR). The test is
    the Wilcoxon rank-sum test of D against the rest of its class, with ranks taken within the class (so the null
    distribution is that of |D| draws from 1..size, whatever the activations): z > 0 when D ranks lower than the
    rest of F (AND) or higher than the rest of NOT F (OR), i.e. the term moved images the way a better label
    must. Normal approximation with the exact finite-population variance (ties included through the sum of
    squared ranks); at small |D| it errs on the safe side, since a sum of few uniform draws has short tails.

    Inputs, in units of 2 x rank: w_in = sum over F AND c of the within-F ranks, w_out = sum over (NOT F) AND c
    of the within-(NOT F) ranks, [..., C]; i_n = |F AND c|, f_n = |F|, c_n = |c|; f_sq / nf_sq = sums of squared
    within-class ranks over F / NOT F. `f_*` broadcast against the candidates (trailing size 1)."""
    nf_n = n - f_n
    t_in, t_out = f_n * (f_n + 1), nf_n * (nf_n + 1)  # sums of 2 x rank over each class
    # D and its class per operation: F AND c drops F AND NOT c; F AND NOT c drops F AND c; F OR c adds
    # (NOT F) AND c; F OR NOT c adds (NOT F) AND (NOT c).
    out_n = c_n - i_n
    d = torch.stack([f_n - i_n, i_n, out_n, nf_n - out_n], dim=-2)
    w = torch.stack([t_in - w_in, w_in, w_out, t_out - w_out], dim=-2)
    is_or = torch.tensor([False, False, True, True], device=d.device)[:, None]
    p_n = torch.where(is_or, nf_n[..., None, :], f_n[..., None, :])
    p_sum = torch.where(is_or, t_out[..., None, :], t_in[..., None, :])
    p_sq = torch.where(is_or, nf_sq[..., None, :], f_sq[..., None, :])
    mean = p_sum / p_n.clamp_min(1)
    var_p = (p_sq / p_n.clamp_min(1) - mean * mean).clamp_min(0)
    var = d * var_p * (p_n - d) / (p_n - 1).clamp_min(1)
    shift = torch.where(is_or, w - d * mean, d * mean - w)
    ok = var > 0
    return torch.where(ok, shift / torch.where(ok, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))


def _beam_products(
    sets: torch.Tensor,
    unit: torch.Tensor,
    r2: torch.Tensor,
    r2_int: torch.Tensor | None,
    weights: torch.Tensor,
    weights_int: torch.Tensor | None,
    presence: torch.Tensor,
    int8: Int8Product,
    groups: TieGroups | None,
) -> dict[str, torch.Tensor]:
    """Exact sums over F AND c for formula image sets F [K, N] (of units `unit` [K]) and every concept c: 2 x rank
    ("r2"), count ("n") and fingerprint ("h"), each [K, C] float64. With `groups` (the growth test) also the sums of
    2 x within-F ranks over F AND c ("w_in") and of 2 x within-(NOT F) ranks over (NOT F) AND c ("w_out"), and the
    sums of squared 2 x within-class ranks over F and NOT F ("f_sq", "nf_sq", [K, 1]). Three or five products
    rather than one of combined rows: each needs only the digits of its own largest value."""
    out: dict[str, torch.Tensor] = {}
    if groups is not None:
        sub = TieGroups(groups.order[unit], groups.start[unit], groups.end[unit])
        q2 = class_ranks2(sets[:, None, :], sub)[:, 0]  # [K, N]
        q_in = torch.where(sets, q2, 0)
        q_out = q2 - q_in
        q64 = q2.to(torch.float64)
        sq = q64 * q64
        out["f_sq"] = (sq * sets).sum(-1, keepdim=True)
        out["nf_sq"] = sq.sum(-1, keepdim=True) - out["f_sq"]
        del q2, q64, sq
    if int8.available:
        fi = sets.to(torch.int32)
        out["r2"] = int8.mm(fi * r2_int[unit])
        out["n"] = int8.mm(sets)
        out["h"] = int8.mm(fi * weights_int)
        if groups is not None:
            out["w_in"] = int8.mm(q_in)
            out["w_out"] = int8.mm(q_out)
    else:
        f = sets.to(torch.float64)
        out["r2"] = exact_int_matmul(f * r2[unit], presence)
        out["n"] = exact_int_matmul(f, presence)
        out["h"] = exact_int_matmul(f * weights, presence)
        if groups is not None:
            out["w_in"] = exact_int_matmul(q_in, presence)
            out["w_out"] = exact_int_matmul(q_out, presence)
    return out


def invert_search(
    pooled: torch.Tensor,
    presence: torch.Tensor,
    *,
    beam_size: int = 5,
    max_length: int = 3,
    min_fraction: float = 0.0,
    max_fraction: float = 0.5,
    mode: str = "positive",
    limit_search: int = 0,
    keep_tested: bool = False,
    progress: Progress | None = None,
    chunk: int | None = None,
    min_count: int = 0,
    growth_alpha: float = 0.0,
) -> InvertSearch:
    """INVERT's beam search for every unit: pooled [N, U] activations, presence [N, C] bool. Runs on
    `pooled.device`. `limit_search` 0 means every atom; `keep_tested` keeps every scored formula's log p-value
    (for Holm / Benjamini-Hochberg corrections). `growth_alpha` > 0 lets a formula grow by a term only when the
    term's images pass `growth_z` at that level (Bonferroni over the 4C extensions of a formula); 0 = the
    reference (any extension competes on its AUC alone)."""
    progress = progress or NullProgress()
    device = pooled.device
    n, num_units = pooled.shape
    presence = presence.to(device=device, dtype=torch.bool)
    num_c = presence.shape[1]
    b_size, length_max = int(beam_size), int(max_length)
    sign = 1.0 if mode == "positive" else -1.0

    # A set fingerprint per formula: the sum of random image weights w_i over its images. Sets with equal count
    # and fingerprint are taken as one set. The weights narrow as the dataset grows so that sums stay exact.
    count_bits = max(1, math.ceil(math.log2(n + 1)))
    hash_bits = max(0, min(_HASH_BITS, 52 - 2 * count_bits))
    gen = torch.Generator().manual_seed(0x1A7E)
    weights = torch.randint(0, 1 << hash_bits, (n,), generator=gen, dtype=torch.int64).to(device, torch.float64)
    int8 = Int8Product(presence)  # the CPU's exact products, the concept matrix converted once
    weights_int = weights.to(torch.int32) if int8.available else None
    n_c = presence.sum(dim=0).to(torch.float64)  # [C]
    h_c = (int8.mm(weights_int[None, :]) if int8.available else exact_int_matmul(weights[None, :], presence))[0]
    h_all = weights.sum()
    r2_all = float(n) * (n + 1)  # sum of 2 * rank over all images
    atom_n = torch.cat([n_c, n - n_c])  # [2C]
    atom_h = torch.cat([h_c, h_all - h_c])
    lo, hi = max(min_fraction * n, float(min_count)), max_fraction * n
    atom_valid = (atom_n > 0) & (atom_n < n) & (atom_n >= lo) & (atom_n <= hi)
    presence_t = presence.T.contiguous()  # [C, N] to gather atom image sets
    # One-sided normal quantile for the growth test: alpha split over every extension the search may try for a
    # unit (B formulas x 4C extensions x L-1 steps), so that noise grows a unit's label with chance <= alpha.
    family = b_size * 4 * num_c * max(length_max - 1, 1)
    z_crit = -float(torch.special.ndtri(torch.tensor(growth_alpha / family, dtype=torch.float64))) \
        if growth_alpha > 0 else None
    # The first term's test (from the empty formula) is over the 2C atoms.
    z_atom = -float(torch.special.ndtri(torch.tensor(growth_alpha / (2 * num_c), dtype=torch.float64))) \
        if growth_alpha > 0 else None

    pool_m = b_size + 4 * b_size * num_c
    if chunk is None:
        # Bound the candidate pool ([chunk, B + 4BC] scores) and the product rows ([chunk * 2B, N] float64).
        chunk = max(1, min(num_units, _POOL_BUDGET // pool_m, _ROW_BUDGET // (b_size * 2 * n)))
    chunks = unit_chunks(num_units, chunk)
    total_steps = len(chunks) * length_max
    done = 0

    steps = max(length_max - 1, 0)
    out_first = torch.zeros(num_units, b_size, dtype=torch.int64, device=device)
    out_ops = torch.zeros(num_units, b_size, steps, dtype=torch.int64, device=device)
    out_atoms = torch.zeros(num_units, b_size, steps, dtype=torch.int64, device=device)
    out_len = torch.zeros(num_units, b_size, dtype=torch.int64, device=device)
    out_ok = torch.zeros(num_units, b_size, dtype=torch.bool, device=device)
    out_auc = torch.full((num_units, b_size), math.nan, dtype=torch.float64, device=device)
    out_count = torch.zeros(num_units, b_size, dtype=torch.float64, device=device)
    out_logp = torch.zeros(num_units, b_size, dtype=torch.float64, device=device)
    out_tests = torch.zeros(num_units, dtype=torch.int64, device=device)
    tested: list[torch.Tensor] = []

    for sl in chunks:
        uc = sl.stop - sl.start
        rows_u = torch.arange(uc, device=device)
        groups = tie_groups(pooled[:, sl].T.contiguous())
        ranks, tie = average_ranks(pooled[:, sl].T, groups)
        if z_crit is None:
            del groups
        r2 = ranks * 2  # integers, so every sum below is exact
        del ranks
        r2_int = r2.to(torch.int32) if int8.available else None
        tie_col = tie[:, None]

        # Length 1: every concept and its negation.
        r2_c = int8.mm(r2_int) if int8.available else exact_int_matmul(r2, presence)  # [Uc, C]
        atom_r2 = torch.cat([r2_c, r2_all - r2_c], dim=1)  # [Uc, 2C]
        atom_auc = auc_from_rank_sum(atom_r2 / 2, atom_n, n)
        atom_auc = torch.where(torch.isfinite(atom_auc), atom_auc, torch.full_like(atom_auc, 0.5))
        key = torch.where(atom_valid, sign * atom_auc, torch.full_like(atom_auc, -math.inf))
        out_tests[sl] += int(atom_valid.sum())
        if keep_tested:
            lp = mannwhitney_log_p(atom_r2 / 2, atom_n.expand(uc, -1), n, tie_col)
            tested.append(lp[atom_valid.expand(uc, -1)].to(torch.float32).cpu())
        idx, ok = _select_fast(
            key, atom_n.expand(uc, -1), atom_h.expand(uc, -1), torch.arange(2 * num_c, device=device), b_size
        )
        beam_first = idx
        beam_ops = torch.zeros(uc, b_size, steps, dtype=torch.int64, device=device)
        beam_atoms = torch.zeros(uc, b_size, steps, dtype=torch.int64, device=device)
        beam_len = torch.ones(uc, b_size, dtype=torch.int64, device=device)
        beam_ok = ok
        if z_crit is not None:
            # The first term passes the same test from the empty formula: the empty formula OR c adds c's images,
            # ranked against all others (within NOT F = all images, global ranks are the within-class ranks), and
            # OR NOT c adds NOT c's. Atoms that fail may still be labels; they cannot grow.
            zeros = torch.zeros_like(r2_c)
            empty = torch.zeros(uc, 1, dtype=zeros.dtype, device=device)
            z_or = growth_z(zeros, r2_c, zeros, empty, n_c, empty, (r2 * r2).sum(dim=1, keepdim=True), n)
            atom_z = torch.cat([z_or[:, OP_OR], z_or[:, OP_OR_NOT]], dim=1)  # [Uc, 2C], laid out as atom_r2
            beam_grow = ok & (sign * atom_z.gather(1, idx) > z_atom)
            del atom_z, z_or, zeros, empty
        else:
            beam_grow = ok
        beam_key = key.gather(1, idx).masked_fill(~ok, -math.inf)
        beam_n = atom_n[idx]
        beam_r2 = atom_r2.gather(1, idx)
        beam_h = atom_h[idx]
        concept = idx % num_c
        negated = idx >= num_c
        beam_sets = presence_t[concept] ^ negated[..., None]  # [Uc, B, N]
        beam_used = torch.zeros(uc, b_size, num_c, dtype=torch.bool, device=device)
        beam_used.scatter_(2, concept[..., None], True)

        if limit_search and limit_search < 2 * num_c:
            # The reference ranks atoms by metric, then (stably) by differentiability 2|0.5 - AUC|.
            diff = 2 * (0.5 - atom_auc).abs()
            order = torch.argsort(-sign * atom_auc, dim=1, stable=True)
            order = order.gather(1, torch.argsort(-diff.gather(1, order), dim=1, stable=True))
            allowed = torch.zeros(uc, 2 * num_c, dtype=torch.bool, device=device)
            allowed.scatter_(1, order[:, :limit_search], True)
        else:
            allowed = torch.ones(uc, 2 * num_c, dtype=torch.bool, device=device)
        allowed_ops = torch.stack(
            [allowed[:, :num_c], allowed[:, num_c:], allowed[:, :num_c], allowed[:, num_c:]], dim=1
        )  # [Uc, 4, C]
        done += 1
        progress.update(done, total_steps, f"INVERT: units {sl.start}-{sl.stop - 1}, length 1")

        prod = {
            name: torch.zeros(uc, b_size, num_c if name not in ("f_sq", "nf_sq") else 1, dtype=torch.float64,
                              device=device)
            for name in ("r2", "n", "h", *(("w_in", "w_out", "f_sq", "nf_sq") if z_crit is not None else ()))
        }
        fresh = torch.ones(uc, b_size, dtype=torch.bool, device=device)
        for ell in range(2, length_max + 1):
            # Intersections F AND c of every beam formula with every concept: rank sum, count, fingerprint (and,
            # for the growth test, sums of within-class ranks). A formula carried over from the last step has the
            # same products as then, so only the formulas new to the beam (and able to grow) are multiplied.
            need = (beam_grow & fresh).flatten().nonzero().flatten()
            if need.numel():
                fresh_prod = _beam_products(
                    beam_sets.reshape(uc * b_size, n)[need], need // b_size, r2, r2_int, weights, weights_int,
                    presence, int8, groups if z_crit is not None else None,
                )
                for name, value in fresh_prod.items():
                    prod[name].view(uc * b_size, -1)[need] = value
                del fresh_prod
            i_r2, i_n, i_h = prod["r2"], prod["n"], prod["h"]
            if z_crit is not None:
                grow_z = growth_z(
                    prod["w_in"], prod["w_out"], i_n, beam_n[..., None], n_c, prod["f_sq"], prod["nf_sq"], n
                )  # [Uc, B, 4, C]
            f_r2, f_n, f_h = beam_r2[..., None], beam_n[..., None], beam_h[..., None]
            c_r2, c_n, c_h = r2_c[:, None, :], n_c, h_c
            # F AND c; F AND NOT c = F - (F AND c); F OR c = F + c - (F AND c); F OR NOT c = NOT (c AND NOT F).
            cand_r2 = torch.stack([i_r2, f_r2 - i_r2, f_r2 + c_r2 - i_r2, r2_all - c_r2 + i_r2], dim=2)
            cand_n = torch.stack([i_n, f_n - i_n, f_n + c_n - i_n, n - c_n + i_n], dim=2)
            cand_h = torch.stack([i_h, f_h - i_h, f_h + c_h - i_h, h_all - c_h + i_h], dim=2)
            valid = (
                beam_grow[:, :, None, None]
                & allowed_ops[:, None]
                & ~beam_used[:, :, None, :]
                & (cand_n > 0)
                & (cand_n < n)
                & (cand_n >= lo)
                & (cand_n <= hi)
                & (cand_n != f_n[..., None])  # a formula that changes nothing is not a new test
            )  # [Uc, B, 4, C]
            if z_crit is not None:
                valid &= sign * grow_z > z_crit
                del grow_z
            cand_auc = auc_from_rank_sum(cand_r2 / 2, cand_n, n)
            cand_key = torch.where(valid, sign * cand_auc, torch.full_like(cand_auc, -math.inf))
            out_tests[sl] += valid.flatten(1).sum(dim=1)
            if keep_tested:
                lp = mannwhitney_log_p(cand_r2 / 2, cand_n, n, tie[:, None, None, None])
                tested.append(lp[valid].to(torch.float32).cpu())
                del lp

            pool_key = torch.cat([beam_key, cand_key.flatten(1)], dim=1)
            pool_n = torch.cat([beam_n, cand_n.flatten(1)], dim=1)
            pool_h = torch.cat([beam_h, cand_h.flatten(1)], dim=1)
            pool_r2 = torch.cat([beam_r2, cand_r2.flatten(1)], dim=1)
            m = pool_key.shape[1]
            position = torch.arange(m, device=device).expand(uc, m)
            pool_len = torch.cat([beam_len, torch.full((uc, m - b_size), ell, device=device)], dim=1)
            tiebreak = pool_len * m + position  # shorter first, then the current beam, then candidate order
            del cand_key, cand_n, cand_h, cand_r2, valid

            sel, ok = _select_fast(pool_key, pool_n, pool_h, tiebreak, b_size)
            from_old = sel < b_size
            j = (sel - b_size).clamp_min(0)
            src_b = torch.where(from_old, sel, j // (4 * num_c))
            op = (j // num_c) % 4
            c = j % num_c
            g = (rows_u[:, None], src_b)
            new_first = beam_first[g]
            new_ops = beam_ops[g].clone()
            new_atoms = beam_atoms[g].clone()
            new_len = torch.where(from_old, beam_len[g], torch.full_like(sel, ell))
            is_new = ~from_old
            step_op = torch.where((op == OP_AND) | (op == OP_AND_NOT), STEP_AND, STEP_OR)
            step_atom = c + num_c * ((op == OP_AND_NOT) | (op == OP_OR_NOT)).long()
            new_ops[..., ell - 2] = torch.where(is_new, step_op, new_ops[..., ell - 2])
            new_atoms[..., ell - 2] = torch.where(is_new, step_atom, new_atoms[..., ell - 2])
            src_sets = beam_sets[g]
            atom_sets = presence_t[c] ^ ((op == OP_AND_NOT) | (op == OP_OR_NOT))[..., None]
            is_and = ((op == OP_AND) | (op == OP_AND_NOT))[..., None]
            combined = torch.where(is_and, src_sets & atom_sets, src_sets | atom_sets)
            new_sets = torch.where(is_new[..., None], combined, src_sets)
            new_used = beam_used[g].clone()
            new_used[rows_u[:, None], torch.arange(b_size, device=device)[None, :], c] |= is_new

            beam_first, beam_ops, beam_atoms, beam_len = new_first, new_ops, new_atoms, new_len
            beam_sets, beam_used, beam_ok = new_sets, new_used, ok
            beam_grow = ok & torch.where(from_old, beam_grow[g], True)
            fresh = is_new
            prod = {name: value[g] for name, value in prod.items()}
            beam_key = pool_key.gather(1, sel).masked_fill(~ok, -math.inf)
            beam_n = pool_n.gather(1, sel)
            beam_h = pool_h.gather(1, sel)
            beam_r2 = pool_r2.gather(1, sel)
            del pool_key, pool_n, pool_h, pool_r2, tiebreak, position, pool_len
            done += 1
            progress.update(done, total_steps, f"INVERT: units {sl.start}-{sl.stop - 1}, length {ell}")

        out_first[sl] = beam_first
        out_ops[sl] = beam_ops
        out_atoms[sl] = beam_atoms
        out_len[sl] = beam_len
        out_ok[sl] = beam_ok
        out_auc[sl] = torch.where(beam_ok, auc_from_rank_sum(beam_r2 / 2, beam_n, n), out_auc[sl])
        out_count[sl] = beam_n
        out_logp[sl] = mannwhitney_log_p(beam_r2 / 2, beam_n, n, tie_col)

    return InvertSearch(
        first=out_first,
        ops=out_ops,
        atoms=out_atoms,
        length=out_len,
        ok=out_ok,
        auc=out_auc,
        count=out_count,
        log_p=out_logp,
        tests=out_tests,
        tested_log_p=torch.cat(tested) if keep_tested else None,
        num_images=n,
        num_concepts=num_c,
    )


# ----------------------------------------------------------------------------------------------------------------
# The labeler


@register
class Invert(Labeler):
    name = "invert"
    title = "INVERT (inverse recognition)"
    paper = "Bykov et al., Labeling Neural Representations with Inverse Recognition, NeurIPS 2023"
    inputs = (Input.POOLED, Input.CONCEPT_PRESENCE)
    params = (
        Param(
            "pooling",
            str,
            "mean",
            "per-image activation of a unit: spatial mean (the reference labels average-pooled features) or max",
            choices=("mean", "max"),
        ),
        Param("beam_size", int, 5, "formulas kept per step of the beam search (B)", minimum=1, maximum=1000),
        Param("max_length", int, 3, "most concepts in a formula (L)", minimum=1, maximum=10),
        Param(
            "min_fraction", float, MIN_FRACTION,
            "least fraction of images on which a formula may hold. Without it (the reference's 0) the best AUC of "
            "every unit is a formula true on 1-2 images that happen to rank high: on 20,000 planted images 0 of 32 "
            "planted formulas were recovered; with 0.002 (INVERT's own example notebook) they were (see the "
            "decision record on minimum support)",
            minimum=0.0, maximum=1.0,
        ),
        Param(
            "min_images", int, MIN_IMAGES,
            "least number of images on which a formula may hold, whatever the fraction: on small datasets a "
            "fraction alone still allows formulas of a handful of images, whose AUC is noise. Capped at 5% of the "
            "searched images so that a small dataset still gets labels. 0 = no minimum",
            minimum=0,
        ),
        Param(
            "max_fraction", float, 0.5, "largest fraction of images on which a formula may hold", minimum=0.0, maximum=1.0
        ),
        Param(
            "mode",
            str,
            "positive",
            "positive: formulas the unit ranks highest (maximise AUC); negative: ranks lowest (minimise AUC)",
            choices=("positive", "negative"),
        ),
        Param(
            "limit_search",
            int,
            0,
            "combine beam formulas only with this many atoms, the most differentiable (2|0.5-AUC|); 0 = all",
            minimum=0,
        ),
        Param(
            "growth_alpha", float, GROWTH_ALPHA,
            "a formula grows by a term only when the images the term removes (AND) or adds (OR) rank lower (higher) "
            "than the rest of the formula's images, at this level, Bonferroni over the 4 x concepts ways to extend "
            "a formula (a rank-sum test on the searched images). Without it the best of thousands of extensions "
            "always scores a little higher by chance, so a noise term rides on the real label and crowds the beam: "
            "on 20,000 planted images (4 seeds, 3 SD effect) 39 of 128 planted formulas were recovered without it "
            "and 127 of 128 with it, no noise unit flagged either way (decision record 0102). 0 = off (the "
            "reference: any extension competes on its AUC alone)",
            minimum=0.0, maximum=1.0,
        ),
        Param("top_n", int, 5, "labels reported per unit, from the final beam", minimum=1),
        Param(
            "split_half", bool, True,
            "search formulas on a random half of the images and report the AUC and p-value on the other half, "
            "corrected over units only: a p-value computed on the images that chose the formula is far too small "
            "whatever the correction. The in-sample AUC is kept beside it. Off = the reference (in-sample, "
            "corrected over units x formulas scored)",
        ),
        Param("seed", int, 0, "seed of the random split into search and test halves", minimum=0),
        Param("alpha", float, 0.05, "significance level after correction", minimum=0.0, maximum=1.0),
        Param(
            "correction",
            str,
            "holm",
            "multiple-testing correction: over units (one held-out test each) with split_half, otherwise over all "
            "units x formulas scored",
            choices=CORRECTIONS,
        ),
    )
    # The reference code's settings (lapalap/invert): no minimum support, in-sample statistics, Bonferroni.
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "reference": {
            "min_fraction": 0.0, "min_images": 0, "split_half": False, "correction": "bonferroni", "growth_alpha": 0.0,
        },
    }

    def run(self, inputs: LabelerInputs, params: dict[str, Any], progress: Progress) -> LabelingResult:
        kind = params["pooling"]
        pooled = inputs.pooled_mean if kind == "mean" else inputs.pooled_max
        if pooled is None:
            raise MissingInputError(
                self.name,
                Input.POOLED,
                f"no per-image {kind} activations of {inputs.layer}; extract them or set pooling to the other kind",
            )
        presence = inputs.concept_presence
        concepts = inputs.concepts
        assert presence is not None and concepts is not None  # `require` checked both
        if params["min_fraction"] > params["max_fraction"]:
            raise LabelerError(
                f"invert: min_fraction {params['min_fraction']} is above max_fraction {params['max_fraction']}; "
                "no formula could pass. Lower min_fraction or raise max_fraction."
            )
        if pooled.dim() != 2 or presence.dim() != 2:
            raise LabelerError(
                f"invert: pooled activations must be [images, units] and concept presence [images, concepts], "
                f"got {tuple(pooled.shape)} and {tuple(presence.shape)}. Re-run the extraction of {inputs.layer}."
            )
        n, num_units = pooled.shape
        if presence.shape[0] != n:
            raise LabelerError(
                f"invert: {inputs.layer} has activations for {n} images but the concept labels cover "
                f"{presence.shape[0]}. Re-run the extraction on the same dataset as the concept labels."
            )
        if presence.shape[1] != len(concepts):
            raise LabelerError(
                f"invert: the concept matrix has {presence.shape[1]} columns for {len(concepts)} concept names. "
                "Re-import the dataset's annotations."
            )
        split = bool(params["split_half"])
        if n < (4 if split else 2):
            raise LabelerError(
                f"invert: {n} image(s) is too few to compare activations{' in two halves' if split else ''}; "
                "use a larger dataset."
            )
        device = inputs.device
        pooled = pooled.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(pooled).all()):
            bad = int((~torch.isfinite(pooled)).any(dim=0).sum())
            raise LabelerError(
                f"invert: {bad} unit(s) of {inputs.layer} have NaN or infinite activations. "
                "Re-run the extraction (check the model's numerics, e.g. run in float32)."
            )
        presence = presence.to(device) != 0

        correction = params["correction"]
        if split:
            in_search = search_half(torch.arange(n), int(params["seed"])).to(device)
            search_rows, test_rows = in_search.nonzero().flatten(), (~in_search).nonzero().flatten()
        else:
            search_rows = test_rows = torch.arange(n, device=device)
        n_search = search_rows.numel()
        search = invert_search(
            pooled[search_rows],
            presence[search_rows],
            beam_size=params["beam_size"],
            max_length=params["max_length"],
            min_fraction=params["min_fraction"],
            min_count=min_support_count(params["min_images"], n_search),
            max_fraction=params["max_fraction"],
            mode=params["mode"],
            limit_search=params["limit_search"],
            growth_alpha=params["growth_alpha"],
            keep_tested=correction in ("holm", "fdr_bh") and not split,
            progress=progress,
        )
        top_n = min(params["top_n"], params["beam_size"])
        report = search.ok[:, :top_n]
        if split:
            progress.update(0, 1, "INVERT: testing the formulas on the held-out half")
            test_auc, test_log_p, test_count = evaluate_formulas(search, top_n, pooled[test_rows], presence[test_rows])
            progress.update(1, 1, "INVERT: formulas tested on the held-out half")
            log_p_rep = test_log_p
            # One held-out test per unit and rank: the family is the units.
            p_adj = torch.ones_like(log_p_rep)
            num_tests = 0
            for slot in range(top_n):
                have = report[:, slot]
                k = int(have.sum())
                if k:
                    lp = log_p_rep[:, slot][have].cpu()
                    p_adj[:, slot][have] = adjust_p_values(lp, k, correction, lp).to(p_adj.device)
                    num_tests = max(num_tests, k)
            auc_rep = test_auc
        else:
            log_p_rep = search.log_p[:, :top_n]
            num_tests = int(search.tests.sum())
            p_adj = torch.ones_like(log_p_rep)
            if num_tests > 0 and bool(report.any()):
                p_adj[report] = adjust_p_values(
                    log_p_rep[report].cpu(), num_tests, correction, search.tested_log_p
                ).to(p_adj.device)
            auc_rep = search.auc[:, :top_n]
            test_count = search.count[:, :top_n]

        names = [c.name for c in concepts]
        # What the dataset says about pairs of concepts, for the canonical spelling of formulas (all images).
        relations = ConceptRelations.from_cooccurrence(exact_int_matmul(presence.T, presence).cpu())
        # Python objects per reported label only; all arithmetic above is vectorised.
        ok = report.cpu()
        auc = auc_rep.cpu().tolist()
        auc_in = search.auc[:, :top_n].cpu().tolist()
        log_p = log_p_rep.cpu().tolist()
        p_adj_l = p_adj.cpu().tolist()
        count = search.count[:, :top_n].cpu().tolist()
        t_count = test_count.cpu().tolist()
        n_test = test_rows.numel()
        length = search.length[:, :top_n].cpu().tolist()
        alpha = params["alpha"]
        labels: list[Label] = []
        rank_of: dict[int, int] = {}
        seen: dict[int, set[str]] = {}
        for unit, slot in ok.nonzero().tolist():
            formula = search.formula(unit, slot)
            text = canonical_formula_text(formula, names, relations)
            if text in seen.setdefault(unit, set()):
                continue  # the same formula (on this dataset) as one ranked higher
            seen[unit].add(text)
            rank_of[unit] = rank_of.get(unit, 0) + 1
            base = formula.child if isinstance(formula, Not) else formula
            category = (concepts[base.concept].category or None) if isinstance(base, Leaf) else None
            lp = log_p[unit][slot]
            a = float(auc[unit][slot])
            undefined = math.isnan(a)
            if undefined:
                # The formula holds on none or all of the test images: they say nothing about it either way.
                a, lp = 0.5, 0.0
            extra = {
                "auc": a,
                "significant": bool(p_adj_l[unit][slot] <= alpha),
                "p_adjusted": float(p_adj_l[unit][slot]),
                "log10_p": lp / math.log(10),
                "positive_fraction": count[unit][slot] / n_search,
                "length": int(length[unit][slot]),
            }
            if split:
                if undefined:
                    extra["test_note"] = "the formula holds on none or all of the held-out images: no test"
                extra.update({
                    "auc_in_sample": float(auc_in[unit][slot]),
                    "test_positive_fraction": t_count[unit][slot] / max(n_test, 1),
                    "search_images": n_search,
                    "test_images": n_test,
                })
            labels.append(
                Label(
                    unit=unit,
                    rank=rank_of[unit],
                    text=text,
                    score=a,
                    p_value=math.exp(lp),
                    formula=text,
                    category=category,
                    extra=extra,
                )
            )
        significant_units = len({lab.unit for lab in labels if lab.rank == 1 and lab.extra["significant"]})
        summary = {
            "metric": "AUROC",
            "pooling": kind,
            "tests": num_tests,
            "correction": correction,
            "correction_family": "units (held-out half)" if split else "units x formulas scored (in-sample)",
            "alpha": alpha,
            "units": num_units,
            "units_labelled": len({lab.unit for lab in labels}),
            "units_significant": significant_units,
            "split_half": split,
            "search_images": n_search,
            "test_images": n_test if split else 0,
            "min_count": max(params["min_fraction"] * n_search, min_support_count(params["min_images"], n_search)),
        }
        log.info(
            "invert: %s, %d units, %d tests, %d units significant at %s (%s)",
            inputs.layer,
            num_units,
            num_tests,
            significant_units,
            alpha,
            correction,
        )
        return LabelingResult(labels=labels, summary=summary)


def min_support_count(min_images: int, n: int) -> float:
    """The image-count part of the minimum support on n searched images: `min_images`, but at most 5% of them."""
    return float(min(int(min_images), 0.05 * n))


def evaluate_formulas(
    search: InvertSearch, top_n: int, pooled: torch.Tensor, presence: torch.Tensor, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AUC, Mann-Whitney log p-value and positive count [U, top_n] of each unit's first `top_n` beam formulas on
    other images: pooled [N', U], presence [N', C]. Entries whose slot is empty, or whose formula holds on none or
    all of these images, get AUC NaN and log p 0."""
    n, num_units = pooled.shape
    num_c = search.num_concepts
    presence_t = presence.T.contiguous()
    auc = torch.full((num_units, top_n), math.nan, dtype=torch.float64, device=pooled.device)
    log_p = torch.zeros((num_units, top_n), dtype=torch.float64, device=pooled.device)
    count = torch.zeros((num_units, top_n), dtype=torch.float64, device=pooled.device)

    def atom_sets(a: torch.Tensor) -> torch.Tensor:
        return presence_t[a % num_c] ^ (a >= num_c)[..., None]

    for sl in unit_chunks(num_units, chunk):
        sets = atom_sets(search.first[sl, :top_n])  # [Uc, B, N']
        for j in range(search.ops.shape[2]):
            op = search.ops[sl, :top_n, j][..., None]
            other = atom_sets(search.atoms[sl, :top_n, j])
            sets = torch.where(op == STEP_AND, sets & other, torch.where(op == STEP_OR, sets | other, sets))
        ranks, tie = average_ranks(pooled[:, sl].T.contiguous())
        r_sum = (sets.to(torch.float64) * ranks[:, None, :]).sum(-1)
        c = sets.sum(-1).to(torch.float64)
        a = auc_from_rank_sum(r_sum, c, n)
        lp = mannwhitney_log_p(r_sum, c, n, tie[:, None])
        valid = search.ok[sl, :top_n] & (c > 0) & (c < n)
        auc[sl] = torch.where(valid, a, torch.full_like(a, math.nan))
        log_p[sl] = torch.where(valid, lp, torch.zeros_like(lp))
        count[sl] = c
    return auc, log_p, count
