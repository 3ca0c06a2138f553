"""The compositional-explanations search as it was before pixels were grouped by concept vector: one pass over
the pixels per formula length, counts by products of [rows, pixels] masks. Kept only as the reference the tests and
the benchmark compare the product's implementation with (same formulas, same scores, same tie-breaking); it is
not registered as a labeling method.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
)
from labelers.formulas import And, Formula, Leaf, Not, Or, to_text
from labelers.netdissect import pixels_per_chunk, count_rows, overlap_counts, select_concepts

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
    if isinstance(f, Leaf):
        return str(f.concept)
    if isinstance(f, Not):
        return "~" + canonical_key(f.child)
    kind = type(f)
    parts: list[str] = []
    stack: list[Formula] = [f]
    while stack:
        node = stack.pop()
        if type(node) is kind:
            stack.extend((node.left, node.right))  # type: ignore[union-attr]
        else:
            parts.append(canonical_key(node))
    sep = "&" if kind is And else "|"
    return "(" + sep.join(sorted(parts)) + ")"


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


class ReferenceCompExp(Labeler):
    name = "compexp_reference"
    title = "Compositional explanations"
    paper = "Mu, Andreas. Compositional Explanations of Neurons. NeurIPS 2020"
    inputs = (Input.MASK_BATCHES,)
    params = (
        Param("beam_size", int, 5, "Formulas kept in the beam at each step (reference: 5).", minimum=1),
        Param("max_length", int, 3, "Most concepts in a formula (reference: 3); one pass over the data per length.",
              minimum=1, maximum=10),
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
        Param("memory_mb", int, 512, "Working memory for one chunk of pixels, in MB (lower it if memory runs out).",
              minimum=16),
    )

    def run(self, inputs: LabelerInputs, params: dict[str, Any], progress: Progress) -> LabelingResult:
        concepts = inputs.concepts
        assert concepts is not None and inputs.mask_batches is not None  # guaranteed by require()
        beam = int(params["beam_size"])
        max_len = int(params["max_length"])
        top_n = int(params["top_n"])
        penalty = float(params["complexity_penalty"])
        budget = int(params["memory_mb"]) * 2**20
        keep = max(beam, top_n)
        device = inputs.device
        U = inputs.num_units
        in_category, chosen = select_concepts(concepts, params["categories"], self.name)
        sel = in_category.nonzero().flatten()  # original concept indices the formulas may use
        summary: dict[str, Any] = {
            "beam_size": beam, "max_length": max_len, "top_n": top_n, "complexity_penalty": penalty,
            "categories": chosen, "iou": "plain pixel IoU over all images (no annotated-category rule)",
        }
        n_batches = 0

        def chunks(cols: torch.Tensor, widest: int, pass_no: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            """Contiguous [U, n] active masks and [len(cols), n] concept masks, a slice of pixels at a time.

            `widest` is the most rows of any float temporary the caller makes per pixel."""
            nonlocal n_batches
            total = max_len * n_batches if n_batches else 0
            done = (pass_no - 1) * n_batches
            b_count = 0
            n_cols = cols.numel()
            on_cuda = device.type == "cuda"
            for batch in inputs.mask_batches():  # type: ignore[misc]
                self._check_batch(batch, inputs, len(concepts))
                um, cm = batch.unit_masks, batch.concept_masks
                B, _, H, W = um.shape
                img_step = max(1, min(B, budget // max(1, (U + n_cols) * H * W)))
                for s in range(0, B, img_step):
                    a = um[s:s + img_step].to(device)
                    c = cm[s:s + img_step].to(device)
                    if n_cols != c.shape[1]:
                        c = c[:, cols]  # advanced indexing: index_select on bool is very slow on CPU
                    a = a if a.dtype == torch.bool else a != 0
                    c = c if c.dtype == torch.bool else c != 0
                    a = a.transpose(0, 1).reshape(U, -1)
                    c = c.transpose(0, 1).reshape(n_cols, -1)
                    n = a.shape[1]
                    step = min(n, pixels_per_chunk(4 * max(1, widest), budget, on_cuda))
                    if step == n:
                        yield a, c
                    else:
                        for p in range(0, n, step):
                            yield a[:, p:p + step].contiguous(), c[:, p:p + step].contiguous()
                b_count += 1
                progress.update(done + b_count if total else 0, total or max_len,
                                f"pass {pass_no} of at most {max_len}: {b_count} batches")
            if pass_no == 1:
                n_batches = b_count

        # ---- pass 1: IoU of every concept with every unit ----
        cols = sel.to(device)
        C1 = cols.numel()
        I_Ac = torch.zeros((U, C1), dtype=torch.float64, device=device)
        S_A = torch.zeros(U, dtype=torch.float64, device=device)
        S_c = torch.zeros(C1, dtype=torch.float64, device=device)
        for a, c in chunks(cols, max(U, C1), 1):
            I_Ac += overlap_counts(a, c, budget)
            S_A += count_rows(a).to(torch.float64)
            S_c += count_rows(c).to(torch.float64)
        passes = 1

        # Concepts that never occur cannot improve any formula; drop them from the concept axis.
        present = S_c > 0
        cols, I_Ac, S_c = cols[present], I_Ac[:, present], S_c[present]
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
                pools[u] = [_Entry(v, v, col_list[c], (), str(col_list[c])) for v, c in zip(vs, cs) if v > 0]

        # ---- passes 2..max_length: extend the formulas the previous pass put into each unit's beam ----
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
            first = torch.tensor([pos_of[e.first] for e in reps], dtype=torch.int64, device=device)
            ops = torch.tensor([[op for op, _ in e.steps] for e in reps], dtype=torch.int64,
                               device=device).reshape(D, L - 2)
            fcols = torch.tensor([[pos_of[c] for _, c in e.steps] for e in reps], dtype=torch.int64,
                                 device=device).reshape(D, L - 2)
            row_unit_t = torch.tensor([u for u, _, _ in rows], dtype=torch.int64, device=device)
            row_slot_t = torch.tensor([s for _, s, _ in rows], dtype=torch.int64, device=device)
            row_form_t = torch.tensor(row_form, dtype=torch.int64, device=device)

            I_AF = torch.zeros(R, dtype=torch.float64, device=device)
            S_F = torch.zeros(D, dtype=torch.float64, device=device)
            I_AFc = torch.zeros((R, Cw), dtype=torch.float64, device=device)
            I_Fc = torch.zeros((D, Cw), dtype=torch.float64, device=device)
            for a, c in chunks(cols, max(R, Cw), L):
                fm = _evaluate(c, first, ops, fcols)
                m = a[row_unit_t] & fm[row_form_t]
                I_AF += count_rows(m).to(torch.float64)
                S_F += count_rows(fm).to(torch.float64)
                I_AFc += overlap_counts(m, c, budget)
                I_Fc += overlap_counts(fm, c, budget)

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

        names = [c.name for c in concepts]
        cats = [c.category for c in concepts]
        labels: list[Label] = []
        for u in range(U):
            for rank, e in enumerate(pools[u][:top_n], start=1):
                f = build_formula(e.first, e.steps)
                text = to_text(f, names)
                atom_cats = {cats[c] for c in e.concepts()}
                extra: dict[str, Any] = {"length": e.length, "category_formula": to_text(f, cats)}
                if penalty != 1.0:
                    extra["ranking_score"] = e.score
                labels.append(Label(
                    unit=u, rank=rank, text=text, score=e.iou, formula=text,
                    category=atom_cats.pop() if len(atom_cats) == 1 else None, extra=extra,
                ))
        firing = (S_A > 0).cpu()
        best_up_to = best_by_len.cummax(0).values
        summary.update({
            "passes": passes,
            "units": U,
            "units_labeled": sum(1 for p in pools if p),
            "mean_best_iou_up_to_length": {
                str(L + 1): (float(best_up_to[L, firing].mean()) if bool(firing.any()) else 0.0)
                for L in range(max_len)
            },
        })
        log.info("compexp %s: %d passes over the data, %d of %d units labeled", inputs.layer, passes,
                 summary["units_labeled"], U)
        return LabelingResult(labels=labels, summary=summary)

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
