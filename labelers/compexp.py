"""Compositional explanations of neurons (Mu & Andreas, NeurIPS 2020), vision part, as in jayelm/compexp.

A unit's active mask (its map upsampled and thresholded at the NetDissect top-0.5% threshold) is explained by a
logical formula over concept masks, found by beam search: start from the `beam_size` concepts of highest IoU,
then repeatedly combine every formula of the beam with every concept by OR, AND and AND NOT, and keep the
`beam_size` best formulas seen so far, up to `max_length` concepts. The score is the plain pixel IoU of the
formula's mask with the active mask over the whole dataset,

    IoU(A, F) = |A AND F| / |A OR F|      (summed over all pixels of all images),

and, as in the reference code, NOT c is the complement of c's mask over every pixel: unlike NetDissect, there is
no rule that counts the active area only in images where a concept's category is annotated.

How it is computed. A formula's mask depends on a pixel only through the pixel's concept vector (which concepts
cover it), so pixels with the same concept vector ("patterns") are interchangeable: one pass over the data groups
the pixels of every image into patterns and counts, per pattern, its pixels and each unit's active pixels among
them. Every count the search needs is then a weighted sum over patterns, exactly equal to the sum over pixels, and
the patterns are few (thousands where the pixels are tens of millions). The table is kept in memory when it fits
`memory_mb`; otherwise each search pass reads the data again (same results, more time).

For a beam formula F of unit u (with active mask A) and every concept c, the three candidates' intersections and
unions follow in closed form from six counts,

    F AND c:      |A F c|,                      |F c|
    F OR c:       |A F| + |A c| - |A F c|,      |F| + |c| - |F c|
    F AND NOT c:  |A F| - |A F c|,              |F| - |F c|
    union = |A| + |candidate| - |A AND candidate|,

of which |A F c| and |F c| are products of the [rows, patterns] counts of A AND F (resp. F) with the [patterns,
concepts] 0/1 matrix, in float64 (exact for counts below 2^53; on a GPU the same products run there).

Honest scores (`split_half`, on by default): the images are split at random (seeded) into a search half and a
test half; the beam search sees only the search half, and the reported score is the formula's IoU on the test
half, which the search never saw. The IoU on the search half (the figure the reference reports, inflated by the
choice among many formulas) is kept in `extra["iou_in_sample"]`, the IoU on all images in `extra["iou_all"]`.
With split_half off the search runs on all images and reports their IoU, as the reference.

Differences from the reference, on purpose (none changes the best formula):
- A concept already in F is not combined with F again (F OR c, F AND c with c in F are F or shorter formulas,
  and F AND NOT c with c in F is shorter or empty), and formulas are deduplicated by a canonical form
  (commutative, associative AND/OR), so e.g. (a OR b) and (b OR a) do not take two places in the beam.
- A candidate whose mask equals its parent's (F OR c with c inside F, F AND c with F inside c, F AND NOT c with c
  apart from F; known in closed form from |F c|, |F|, |c|) is dropped: it cannot score higher than F, which ranks
  before it, and each of its extensions has the mask of an extension of F. Otherwise such no-op formulas fill the
  lower ranks and the beam with copies of F (e.g. "red AND NOT blue" next to "red").
- Formulas of IoU 0 are never kept (the reference starts from nonzero atoms only but may keep zero formulas
  when it has nothing better); a unit that never fires gets no label.
- Only formulas added to the beam by the previous pass are extended: any older beam member was extended before,
  and since a formula that leaves the beam never returns, re-extending it only re-finds known candidates.
- `top_n` formulas are returned per unit; they are the best of all formulas scored, which for top_n <= beam_size
  is exactly the reference's final beam.
- Labels are written in the canonical form of `labelers.formulas` (sorted operands, and terms that the dataset's
  masks make redundant removed, e.g. "(NOT solid)" beside "striped" when textures never overlap); the mask, and so
  the score, is unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from labelers.base import (
    Input,
    Label,
    Labeler,
    LabelerError,
    LabelerInputs,
    LabelingResult,
    MaskBatch,
    Param,
    Progress,
    register,
)
from labelers.formulas import (
    And,
    ConceptRelations,
    Formula,
    Leaf,
    Not,
    Or,
    canonical_formula_text,
    formula_key,
    to_text,
)
from labelers.netdissect import pixel_iou_applies_to, select_concepts
from labelers.significance import search_half

log = logging.getLogger(__name__)

OP_OR, OP_AND, OP_AND_NOT = 0, 1, 2
_OPS = (OP_OR, OP_AND, OP_AND_NOT)

Steps = tuple[tuple[int, int], ...]  # (operator, concept index) applied left to right after the first concept


def build_formula(first: int, steps: Steps) -> Formula:
    """The left-deep formula ((first op1 c1) op2 c2) ... that the beam search builds."""
    f: Formula = Leaf(first)
    for op, c in steps:
        if op == OP_OR:
            f = Or(f, Leaf(c))
        elif op == OP_AND:
            f = And(f, Leaf(c))
        elif op == OP_AND_NOT:
            f = And(f, Not(Leaf(c)))
        else:
            raise ValueError(f"unknown operator {op}")
    return f


def canonical_key(f: Formula) -> str:
    """A text that is equal for formulas that differ only by the order or grouping of AND / OR operands."""
    return formula_key(f)


@dataclass
class _Entry:
    score: float  # what the beam ranks by: IoU x complexity_penalty ** (length - 1)
    iou: float
    first: int
    steps: Steps
    key: str

    @property
    def length(self) -> int:
        return 1 + len(self.steps)

    def concepts(self) -> list[int]:
        return [self.first] + [c for _, c in self.steps]


def _merge(pool: list[_Entry], new: list[_Entry], keep: int) -> list[_Entry]:
    # Ties go to the shorter formula, then to the one found first.
    merged = sorted(pool + new, key=lambda e: (-e.score, e.length))
    out: list[_Entry] = []
    seen: set[str] = set()
    for e in merged:
        if e.key in seen:
            continue
        seen.add(e.key)
        out.append(e)
        if len(out) == keep:
            break
    return out


def _evaluate(cm: torch.Tensor, first: torch.Tensor, ops: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Masks [D, n] of D left-deep formulas of equal length over concept masks cm [C, n], all at once."""
    f = cm[first]  # advanced indexing: index_select on bool is very slow on CPU
    for j in range(ops.shape[1]):
        other = cm[cols[:, j]]
        is_or = (ops[:, j] == OP_OR)[:, None]
        negate = (ops[:, j] == OP_AND_NOT)[:, None]
        f = torch.where(is_or, f | other, f & (other ^ negate))
    return f


# ----------------------------------------------------------------------------------------------------------------
# Pixels grouped by concept vector


def pattern_ids(x: torch.Tensor, use_numpy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a bool matrix x [n, C] -> (id [n] int64 of each row's distinct value, 0..P-1; one row index [P] of
    each distinct value).

    On CPU the rows are bit-packed into bytes and numpy's unique runs over them as one value per row (~50x faster
    than torch.unique here); on a GPU each 62-concept word is numbered by torch.unique and the words are combined
    by numbering the pairs again."""
    n, c = x.shape
    device = x.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    if device.type == "cpu" if use_numpy is None else use_numpy:
        packed = np.packbits(x.numpy(), axis=1, bitorder="little")
        width = max(8, -(-packed.shape[1] // 8) * 8)
        rows = np.zeros((n, width), dtype=np.uint8)
        rows[:, :packed.shape[1]] = packed
        key = rows.view(np.int64)[:, 0] if width == 8 else rows.view(np.dtype((np.void, width)))[:, 0]
        _, first_np, ids_np = np.unique(key, return_index=True, return_inverse=True)
        return torch.from_numpy(ids_np.reshape(-1).astype(np.int64)), torch.from_numpy(first_np.astype(np.int64))
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    for s in range(0, max(c, 1), 62):
        part = x[:, s:s + 62].to(torch.int64)
        key = (part << torch.arange(part.shape[1], device=device, dtype=torch.int64)).sum(1)
        distinct, inv = torch.unique(key, return_inverse=True)
        # ids < n and inv < n: the product stays far below 2^63
        _, ids = torch.unique(ids * distinct.numel() + inv, return_inverse=True)
    p = int(ids.max()) + 1
    first = torch.full((p,), n, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, ids, torch.arange(n, device=device), reduce="amin")
    return ids, first


@dataclass
class PatternTable:
    """Pixels grouped by concept vector: every count of a formula's mask is a weighted sum over these rows."""

    bits: torch.Tensor  # [P, C] bool: the concepts covering the pattern's pixels
    pixels: torch.Tensor  # [P] float64: how many pixels have the pattern
    active: torch.Tensor  # [P, U] float64: how many of them each unit's active mask covers

    @staticmethod
    def empty(n_concepts: int, n_units: int, device: torch.device) -> PatternTable:
        return PatternTable(torch.zeros((0, n_concepts), dtype=torch.bool, device=device),
                            torch.zeros(0, dtype=torch.float64, device=device),
                            torch.zeros((0, n_units), dtype=torch.float64, device=device))

    @property
    def rows(self) -> int:
        return self.bits.shape[0]

    def nbytes(self) -> int:
        return self.bits.numel() + 8 * (self.pixels.numel() + self.active.numel())

    @staticmethod
    def from_masks(unit_masks: torch.Tensor, concept_masks: torch.Tensor,
                   use_numpy: bool | None = None) -> PatternTable:
        """unit_masks [B, U, H, W] and concept_masks [B, C, H, W] bool of some images -> their table (numpy on
        CPU, torch ops where the masks are, e.g. on a GPU)."""
        B, U, H, W = unit_masks.shape
        C = concept_masks.shape[1]
        n = B * H * W
        if unit_masks.device.type == "cpu" if use_numpy is None else use_numpy:
            return PatternTable._from_masks_numpy(unit_masks.numpy(), concept_masks.numpy())
        x = concept_masks.permute(0, 2, 3, 1).reshape(n, C)
        ids, first = pattern_ids(x, use_numpy=False)
        p = first.numel()
        a = unit_masks.transpose(0, 1).reshape(U, n)
        pixels = torch.bincount(ids, minlength=p).to(torch.float64)
        u_idx, px = a.nonzero(as_tuple=True)
        active = torch.bincount(u_idx * p + ids[px], minlength=U * p).view(U, p).T.to(torch.float64)
        return PatternTable(x[first], pixels, active.contiguous())

    @staticmethod
    def _from_masks_numpy(um: np.ndarray, cm: np.ndarray) -> PatternTable:
        # numpy, single-threaded: many small torch ops per batch spend most of their time waking worker threads,
        # and on a busy machine far more. Concept bits are packed along the concept axis in place (no transposed
        # copy of the masks); each pixel's packed bytes are then one sortable value.
        B, U, H, W = um.shape
        C = cm.shape[1]
        n = B * H * W
        k = -(-C // 8)
        width = max(8, -(-k // 8) * 8)
        rows = np.zeros((n, width), dtype=np.uint8)
        flat = cm.reshape(B, C, H * W)
        for byte in range(k):  # eight concepts to a byte, by shifts over contiguous planes (packbits across
            acc = np.zeros((B, H * W), dtype=np.uint8)  # a middle axis is ~10x slower)
            for j in range(min(8, C - 8 * byte)):
                acc |= flat[:, 8 * byte + j].view(np.uint8) << np.uint8(j)
            rows[:, byte] = acc.reshape(n)
        key = rows.view(np.int64)[:, 0] if width == 8 else rows.view(np.dtype((np.void, width)))[:, 0]
        _, first, ids = np.unique(key, return_index=True, return_inverse=True)
        ids = ids.reshape(-1)
        p = len(first)
        bits = np.unpackbits(rows[first, :k], axis=1, count=C, bitorder="little").astype(bool)
        pixels = np.bincount(ids, minlength=p).astype(np.float64)
        idx = _true_positions(um.reshape(-1))
        hw = H * W
        b_idx, rest = np.divmod(idx, U * hw)
        u_idx, in_img = np.divmod(rest, hw)
        px = b_idx * hw + in_img
        active = np.bincount(u_idx * p + ids[px], minlength=U * p).reshape(U, p).T.astype(np.float64)
        return PatternTable(torch.from_numpy(bits), torch.from_numpy(pixels), torch.from_numpy(np.ascontiguousarray(active)))

    @staticmethod
    def merge(parts: list[PatternTable]) -> PatternTable:
        if len(parts) == 1:
            return parts[0]
        if parts[0].bits.device.type == "cpu":
            bits_np = np.concatenate([p.bits.numpy() for p in parts])
            ids_t, first_t = pattern_ids(torch.from_numpy(bits_np))
            ids_np, p = ids_t.numpy(), first_t.numel()
            pixels_np = np.bincount(ids_np, weights=np.concatenate([q.pixels.numpy() for q in parts]), minlength=p)
            active_np = np.zeros((p, parts[0].active.shape[1]), dtype=np.float64)
            np.add.at(active_np, ids_np, np.concatenate([q.active.numpy() for q in parts]))
            return PatternTable(torch.from_numpy(bits_np[first_t.numpy()]), torch.from_numpy(pixels_np),
                                torch.from_numpy(active_np))
        bits = torch.cat([p.bits for p in parts])
        ids, first = pattern_ids(bits)
        p = first.numel()
        pixels = torch.zeros(p, dtype=torch.float64, device=bits.device).index_add_(
            0, ids, torch.cat([q.pixels for q in parts]))
        active = torch.zeros((p, parts[0].active.shape[1]), dtype=torch.float64, device=bits.device).index_add_(
            0, ids, torch.cat([q.active for q in parts]))
        return PatternTable(bits[first], pixels, active)


def _true_positions(flat: np.ndarray) -> np.ndarray:
    """np.flatnonzero of a sparse 1-D bool array, scanning it as 64-bit words first (units are active on ~0.5% of
    pixels, so most words are zero)."""
    n = flat.size
    full = n - n % 8
    words = flat[:full].view(np.uint64)
    hit = np.flatnonzero(words)
    r, c = np.nonzero(flat[:full].reshape(-1, 8)[hit])
    out = hit[r] * 8 + c
    if full < n:
        out = np.concatenate([out, full + np.flatnonzero(flat[full:])])
    return out


class _Accumulator:
    """Merges per-batch tables as they stream in, re-grouping when the pending rows double (amortised cost)."""

    def __init__(self, n_concepts: int, n_units: int, device: torch.device):
        self.table = PatternTable.empty(n_concepts, n_units, device)
        self.pending: list[PatternTable] = []
        self.pending_rows = 0

    def add(self, t: PatternTable) -> None:
        self.pending.append(t)
        self.pending_rows += t.rows
        if self.pending_rows > max(4096, self.table.rows):
            self.flush()

    def flush(self) -> PatternTable:
        if self.pending:
            self.table = PatternTable.merge([self.table] + self.pending)
            self.pending, self.pending_rows = [], 0
        return self.table

    def nbytes(self) -> int:
        return self.table.nbytes() + sum(p.nbytes() for p in self.pending)


@register
class CompExp(Labeler):
    name = "compexp"
    title = "Compositional explanations"
    paper = "Mu, Andreas. Compositional Explanations of Neurons. NeurIPS 2020"
    inputs = (Input.MASK_BATCHES,)
    applies_to = staticmethod(pixel_iou_applies_to)  # type: ignore[assignment]
    params = (
        Param("beam_size", int, 5, "Formulas kept in the beam at each step (reference: 5).", minimum=1),
        Param("max_length", int, 3, "Most concepts in a formula (reference: 3).", minimum=1, maximum=10),
        Param("top_n", int, 5, "Formulas returned per unit, best first, of any length.", minimum=1),
        Param(
            "complexity_penalty", float, 1.0,
            "Rank a formula by IoU x penalty^(length - 1); 1 = no penalty (reference FORMULA_COMPLEXITY_PENALTY "
            "= 1.0). The reported score stays the IoU.",
            minimum=0.0, maximum=1.0,
        ),
        Param(
            "categories", str, "",
            "Comma-separated concept categories formulas may use; empty = all categories of the dataset. Note: "
            "the reference leaves Broden's 'material' out by default.",
        ),
        Param(
            "split_half", bool, True,
            "Search formulas on a random half of the images and report the IoU on the other half: the best of "
            "thousands of formulas always fits the images it was chosen on better than it generalises. The "
            "in-sample IoU is kept beside it. Off = the reference (search and score on all images).",
        ),
        Param("seed", int, 0, "Seed of the random split into search and test halves.", minimum=0),
        Param("memory_mb", int, 512,
              "Working memory, in MB. The grouped mask table is kept in memory when it fits (one pass over the "
              "data); otherwise every search step reads the data again.", minimum=16),
    )

    # The reference code's scoring: search and report on all images.
    presets: ClassVar[dict[str, dict[str, Any]]] = {"reference": {"split_half": False}}

    def run(self, inputs: LabelerInputs, params: dict[str, Any], progress: Progress) -> LabelingResult:
        concepts = inputs.concepts
        assert concepts is not None and inputs.mask_batches is not None  # guaranteed by require()
        beam = int(params["beam_size"])
        max_len = int(params["max_length"])
        top_n = int(params["top_n"])
        penalty = float(params["complexity_penalty"])
        split = bool(params["split_half"])
        seed = int(params["seed"])
        budget = int(params["memory_mb"]) * 2**20
        keep = max(beam, top_n)
        device = inputs.device
        U = inputs.num_units
        in_category, chosen = select_concepts(concepts, params["categories"], self.name)
        sel = in_category.nonzero().flatten().to(device)  # original concept indices the formulas may use
        C1 = sel.numel()
        summary: dict[str, Any] = {
            "beam_size": beam, "max_length": max_len, "top_n": top_n, "complexity_penalty": penalty,
            "categories": chosen, "iou": "plain pixel IoU over all images (no annotated-category rule)",
            "split_half": split, "seed": seed,
        }
        total_steps = max_len + 1
        halves = (0, 1) if split else (0,)

        def stream(wanted: tuple[int, ...], step: int, what: str) -> Iterator[tuple[int, PatternTable]]:
            """One pass over the data: (half, table of one batch's images of that half)."""
            offset = 0
            for b_no, batch in enumerate(inputs.mask_batches(), start=1):  # type: ignore[misc]
                self._check_batch(batch, inputs, len(concepts))
                um, cm = batch.unit_masks, batch.concept_masks
                n_img = um.shape[0]
                half = (~search_half(torch.arange(offset, offset + n_img), seed)).long() if split else \
                    torch.zeros(n_img, dtype=torch.int64)
                offset += n_img
                um = um.to(device)
                cm = cm.to(device)
                um = um if um.dtype == torch.bool else um != 0
                cm = cm if cm.dtype == torch.bool else cm != 0
                if C1 != cm.shape[1]:
                    cm = torch.from_numpy(cm.numpy()[:, sel.numpy()]) if device.type == "cpu" else cm[:, sel]
                for h in wanted:
                    rows = (half == h).nonzero().flatten()
                    if rows.numel() == n_img:
                        yield h, PatternTable.from_masks(um, cm)
                    elif rows.numel() and device.type == "cpu":
                        r = rows.numpy()
                        yield h, PatternTable.from_masks(torch.from_numpy(um.numpy()[r]), torch.from_numpy(cm.numpy()[r]))
                    elif rows.numel():
                        rows = rows.to(device)
                        yield h, PatternTable.from_masks(um[rows], cm[rows])
                progress.update(step, total_steps, f"{what}: {b_no} batches, {offset} images")

        # ---- one pass: group pixels by concept vector; keep the tables if they fit in memory ----
        acc = {h: _Accumulator(C1, U, device) for h in halves}
        cached = True
        I_Ac = torch.zeros((U, C1), dtype=torch.float64, device=device)  # search half
        S_A = torch.zeros(U, dtype=torch.float64, device=device)
        S_c = torch.zeros(C1, dtype=torch.float64, device=device)
        co = torch.zeros((C1, C1), dtype=torch.float64, device=device)  # all images: concept relations
        def add_sums(h: int, t: PatternTable) -> None:
            nonlocal co, I_Ac, S_A, S_c
            xf = t.bits.to(device=device, dtype=torch.float64)
            co += (xf * t.pixels.to(device)[:, None]).T @ xf
            if h == 0:
                active = t.active.to(device)
                I_Ac += active.T @ xf
                S_A += active.sum(0)
                S_c += t.pixels.to(device) @ xf

        for h, t in stream(halves, 0, "grouping pixels by concept"):
            if not cached:
                add_sums(h, t)
                continue
            acc[h].add(t)
            if sum(a.nbytes() for a in acc.values()) > budget // 2:
                cached = False
                for hh, a in acc.items():  # what was grouped so far still counts
                    add_sums(hh, a.flush())
                acc = {}
                log.info("compexp %s: the grouped masks exceed %d MB; reading the data once per search step",
                         inputs.layer, budget // 2**20)
        tables = {h: a.flush() for h, a in acc.items()} if cached else {}
        if cached:
            tables = {h: PatternTable(t.bits.to(device), t.pixels.to(device), t.active.to(device))
                      for h, t in tables.items()}
            for h, t in tables.items():
                add_sums(h, t)
        data_passes = 1
        summary["patterns"] = {str(h): t.rows for h, t in tables.items()} if cached else "not kept (memory_mb)"

        def columns(half: int, widest: int, step: int, what: str) -> Iterator[PatternTable]:
            """The table of one half in slices of rows, such that `widest` float64 rows per pattern fit."""
            nonlocal data_passes
            if cached:
                t = tables[half]
                size = max(1024, (budget // 4) // max(1, 8 * widest))
                for s in range(0, t.rows, size):
                    yield PatternTable(t.bits[s:s + size], t.pixels[s:s + size], t.active[s:s + size])
                progress.update(step, total_steps, what)
            else:
                data_passes += 1
                for _, t in stream((half,), step, what):
                    yield PatternTable(t.bits.to(device), t.pixels.to(device), t.active.to(device))

        # Concepts that never occur cannot improve any formula; drop them from the concept axis.
        present = S_c > 0
        pos_present = present.nonzero().flatten()
        cols = sel[present]
        I_Ac, S_c = I_Ac[:, present], S_c[present]
        Cw = cols.numel()
        col_list = cols.tolist()
        pos_of = {c: i for i, c in enumerate(col_list)}
        summary["concepts_considered"] = Cw
        best_by_len = torch.zeros((max_len, U), dtype=torch.float64)

        pools: list[list[_Entry]] = [[] for _ in range(U)]
        if Cw and U:
            union = S_A[:, None] + S_c[None, :] - I_Ac
            iou1 = torch.where(union > 0, I_Ac / union.clamp_min(1e-300), torch.zeros_like(union))
            best_by_len[0] = iou1.max(1).values.cpu()
            vals, idx = iou1.topk(min(keep, Cw), dim=1)
            for u, (vs, cs) in enumerate(zip(vals.tolist(), idx.tolist())):
                pools[u] = [_Entry(v, v, col_list[c], (), canonical_key(Leaf(col_list[c])))
                            for v, c in zip(vs, cs) if v > 0]
        passes = 1

        # ---- lengths 2..max_length: extend the formulas the previous step put into each unit's beam ----
        for L in range(2, max_len + 1):
            rows: list[tuple[int, int, _Entry]] = []  # (unit, slot among the unit's rows, entry)
            for u in range(U):
                slot = 0
                for e in pools[u][:beam]:
                    if e.length == L - 1:
                        rows.append((u, slot, e))
                        slot += 1
            if not rows:
                break
            passes += 1
            forms: dict[str, int] = {}
            reps: list[_Entry] = []
            row_form = []
            for _, _, e in rows:
                d = forms.setdefault(e.key, len(forms))
                if d == len(reps):
                    reps.append(e)
                row_form.append(d)
            R, D = len(rows), len(reps)
            first, ops, fcols = self._formula_arrays(reps, pos_of, device)
            row_unit_t = torch.tensor([u for u, _, _ in rows], dtype=torch.int64, device=device)
            row_slot_t = torch.tensor([s for _, s, _ in rows], dtype=torch.int64, device=device)
            row_form_t = torch.tensor(row_form, dtype=torch.int64, device=device)

            I_AF = torch.zeros(R, dtype=torch.float64, device=device)
            S_F = torch.zeros(D, dtype=torch.float64, device=device)
            I_AFc = torch.zeros((R, Cw), dtype=torch.float64, device=device)
            I_Fc = torch.zeros((D, Cw), dtype=torch.float64, device=device)
            for t in columns(0, R + D + Cw, L - 1, f"search step {L - 1} of {max_len - 1}"):
                x = t.bits[:, pos_present]  # [n, Cw]
                xf = x.to(torch.float64)
                fm = _evaluate(x.T, first, ops, fcols).to(torch.float64)  # [D, n]
                m = t.active.T[row_unit_t] * fm[row_form_t]  # [R, n] active pixels of A AND F per pattern
                fw = fm * t.pixels[None, :]
                I_AF += m.sum(1)
                S_F += fw.sum(1)
                I_AFc += m @ xf
                I_Fc += fw @ xf

            iou = self._candidate_iou(I_AF, S_F[row_form_t], I_AFc, I_Fc[row_form_t], S_A[row_unit_t],
                                      I_Ac[row_unit_t], S_c)  # [R, 3, Cw]
            used = torch.zeros((R, Cw), dtype=torch.bool, device=device)
            ur = [r for r, (_, _, e) in enumerate(rows) for _ in e.concepts()]
            uc = [pos_of[c] for _, _, e in rows for c in e.concepts()]
            used[torch.tensor(ur, device=device), torch.tensor(uc, device=device)] = True
            iou = iou.masked_fill(used[:, None, :] | self._same_mask(S_F[row_form_t], I_Fc[row_form_t], S_c), 0.0)
            score = (iou * penalty ** (L - 1)).masked_fill(iou <= 0, float("-inf"))

            pad_score = torch.full((U, beam, 3, Cw), float("-inf"), dtype=torch.float64, device=device)
            pad_iou = torch.zeros((U, beam, 3, Cw), dtype=torch.float64, device=device)
            pad_score[row_unit_t, row_slot_t] = score
            pad_iou[row_unit_t, row_slot_t] = iou
            best_by_len[L - 1] = pad_iou.flatten(1).max(1).values.cpu()
            # Enough candidates for `keep` distinct new formulas: one formula can be reached from at most
            # `L` parents, and up to `keep` of them may repeat formulas already in the pool.
            k = min(2 * keep * L, beam * 3 * Cw)
            top_s, top_i = pad_score.flatten(1).topk(k, dim=1)
            top_iou = pad_iou.flatten(1).gather(1, top_i)
            row_at = {(u, s): e for u, s, e in rows}
            units = sorted({u for u, _, _ in rows})
            s_list, i_list, v_list = top_s[units].tolist(), top_i[units].tolist(), top_iou[units].tolist()
            for u, ss, ii, vv in zip(units, s_list, i_list, v_list):
                new: list[_Entry] = []
                for s_, flat, v in zip(ss, ii, vv):
                    if s_ == float("-inf"):
                        break
                    slot, rest = divmod(flat, 3 * Cw)
                    op, c = divmod(rest, Cw)
                    parent = row_at[(u, slot)]
                    steps = parent.steps + ((op, col_list[c]),)
                    key = canonical_key(build_formula(parent.first, steps))
                    new.append(_Entry(s_, v, parent.first, steps, key))
                pools[u] = _merge(pools[u], new, keep)

        # ---- the reported formulas on the test half (which the search never saw) ----
        finals = [(u, e) for u in range(U) for e in pools[u][:top_n]]
        test_iou: list[float] = []
        all_iou: list[float] = []
        if split and finals:
            test_iou, all_iou = self._score_finals(finals, pos_present, pos_of, columns, U, device, max_len)
        progress.update(total_steps, total_steps, "done")

        names = [c.name for c in concepts]
        cats = [c.category for c in concepts]
        relations = self._relations(co, sel)
        labels: list[Label] = []
        for u in range(U):
            seen: set[str] = set()
            rank = 0
            for i_e, e in enumerate(pools[u][:top_n]):
                f = build_formula(e.first, e.steps)
                text = canonical_formula_text(f, names, relations)
                if text in seen:  # logically equal on this dataset to a formula ranked higher
                    continue
                seen.add(text)
                rank += 1
                atom_cats = {cats[c] for c in e.concepts()}
                extra: dict[str, Any] = {"length": e.length, "category_formula": to_text(f, cats),
                                         "search_formula": to_text(f, names)}
                score = e.iou
                if split:
                    j = sum(len(pools[v][:top_n]) for v in range(u)) + i_e
                    score = test_iou[j]
                    extra.update({"iou_in_sample": e.iou, "iou_all": all_iou[j], "iou_test": test_iou[j]})
                if penalty != 1.0:
                    extra["ranking_score"] = e.score
                labels.append(Label(
                    unit=u, rank=rank, text=text, score=score, formula=text,
                    category=atom_cats.pop() if len(atom_cats) == 1 else None, extra=extra,
                ))
        firing = (S_A > 0).cpu()
        best_up_to = best_by_len.cummax(0).values
        summary.update({
            "passes": passes,
            "data_passes": data_passes,
            "units": U,
            "units_labeled": sum(1 for p in pools if p),
            "mean_best_iou_up_to_length": {
                str(L + 1): (float(best_up_to[L, firing].mean()) if bool(firing.any()) else 0.0)
                for L in range(max_len)
            },
        })
        if split:
            summary["mean_best_iou_note"] = "on the search half (in-sample)"
        log.info("compexp %s: %d search steps, %d passes over the data, %d of %d units labeled", inputs.layer,
                 passes, data_passes, summary["units_labeled"], U)
        return LabelingResult(labels=labels, summary=summary)

    @staticmethod
    def _formula_arrays(reps: list[_Entry], pos_of: dict[int, int], device: torch.device):
        """first [D], ops [D, L-1], cols [D, L-1] (positions on the concept axis) of formulas of one length."""
        n = len(reps[0].steps)
        first = torch.tensor([pos_of[e.first] for e in reps], dtype=torch.int64, device=device)
        ops = torch.tensor([[op for op, _ in e.steps] for e in reps], dtype=torch.int64,
                           device=device).reshape(len(reps), n)
        fcols = torch.tensor([[pos_of[c] for _, c in e.steps] for e in reps], dtype=torch.int64,
                             device=device).reshape(len(reps), n)
        return first, ops, fcols

    def _score_finals(self, finals: list[tuple[int, _Entry]], pos_present: torch.Tensor, pos_of: dict[int, int],
                      columns: Any, num_units: int, device: torch.device, step: int) -> tuple[list[float], list[float]]:
        """IoU on the test half and on all images of each (unit, entry) of `finals`, in order."""
        n = len(finals)
        groups = []
        by_len: dict[int, list[int]] = {}
        for i, (_, e) in enumerate(finals):
            by_len.setdefault(e.length, []).append(i)
        for idx in by_len.values():
            first, ops, fcols = self._formula_arrays([finals[i][1] for i in idx], pos_of, device)
            unit = torch.tensor([finals[i][0] for i in idx], dtype=torch.int64, device=device)
            groups.append((torch.tensor(idx, device=device), first, ops, fcols, unit))
        inter = torch.zeros((2, n), dtype=torch.float64, device=device)
        size = torch.zeros((2, n), dtype=torch.float64, device=device)
        s_a = torch.zeros((2, num_units), dtype=torch.float64, device=device)
        for h in (0, 1):
            for t in columns(h, 3 * n, step, "scoring the formulas on the test half"):
                x = t.bits[:, pos_present]
                s_a[h] += t.active.sum(0)
                for idx, first, ops, fcols, unit in groups:
                    fm = _evaluate(x.T, first, ops, fcols).to(torch.float64)  # [d, n]
                    inter[h, idx] += (fm * t.active.T[unit]).sum(1)
                    size[h, idx] += fm @ t.pixels
        units = torch.tensor([u for u, _ in finals], dtype=torch.int64, device=device)

        def iou(i: torch.Tensor, f: torch.Tensor, a: torch.Tensor) -> list[float]:
            union = a + f - i
            return torch.where(union > 0, i / union.clamp_min(1e-300), torch.zeros_like(union)).cpu().tolist()

        return iou(inter[1], size[1], s_a[1][units]), iou(inter.sum(0), size.sum(0), s_a.sum(0)[units])

    @staticmethod
    def _relations(co: torch.Tensor, sel: torch.Tensor) -> ConceptRelations:
        """Which chosen concepts imply or exclude each other on this dataset's pixels (all images)."""
        rel = ConceptRelations.from_cooccurrence(co.cpu())
        index = sel.cpu().tolist()
        return ConceptRelations(
            implies=frozenset((index[a], index[b]) for a, b in rel.implies),
            exclusive=frozenset((index[a], index[b]) for a, b in rel.exclusive),
        )

    @staticmethod
    def _candidate_iou(
        I_AF: torch.Tensor, S_F: torch.Tensor, I_AFc: torch.Tensor, I_Fc: torch.Tensor,
        S_A: torch.Tensor, I_Ac: torch.Tensor, S_c: torch.Tensor,
    ) -> torch.Tensor:
        """IoU [R, 3, C] of (F OR c, F AND c, F AND NOT c) with A from the per-row counts (see module doc)."""
        I_AF, S_F, S_A = I_AF[:, None], S_F[:, None], S_A[:, None, None]
        S_c = S_c[None, :]
        inter = torch.stack([I_AF + I_Ac - I_AFc, I_AFc, I_AF - I_AFc], dim=1)
        size = torch.stack([S_F + S_c - I_Fc, I_Fc, S_F - I_Fc], dim=1)
        union = S_A + size - inter
        return torch.where(union > 0, inter / union.clamp_min(1e-300), torch.zeros_like(union))

    @staticmethod
    def _same_mask(S_F: torch.Tensor, I_Fc: torch.Tensor, S_c: torch.Tensor) -> torch.Tensor:
        """[R, 3, C] True where F op c has exactly F's mask: c inside F (OR), F inside c (AND), c apart (AND NOT)."""
        return torch.stack([I_Fc == S_c[None, :], I_Fc == S_F[:, None], I_Fc == 0], dim=1)

    @staticmethod
    def _check_batch(batch: MaskBatch, inputs: LabelerInputs, n_concepts: int) -> None:
        um, cm = batch.unit_masks, batch.concept_masks
        ok = (
            um.dim() == 4 and cm.dim() == 4 and um.shape[1] == inputs.num_units and cm.shape[1] == n_concepts
            and um.shape[0] == cm.shape[0] and um.shape[2:] == cm.shape[2:]
        )
        if not ok:
            raise LabelerError(
                f"compexp: a mask batch of layer {inputs.layer} has unit masks {tuple(um.shape)} and concept masks "
                f"{tuple(cm.shape)}, but the layer has {inputs.num_units} units and the dataset {n_concepts} "
                f"concepts. The layer's statistics are probably from an older extraction: extract it again."
            )
