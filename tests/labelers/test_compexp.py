"""Compositional explanations: closed-form IoUs against direct evaluation of formulas, a naive beam search,
planted formula units, parameters."""
from __future__ import annotations

import pytest
import torch

from labelers.base import Cancelled, Concept, LabelerError, LabelerInputs, MaskBatch, MissingInputError, get
from labelers.compexp import OP_AND, OP_AND_NOT, OP_OR, CompExp, build_formula, canonical_key
from labelers.formulas import And, Formula, Leaf, Not, Or, parse
from tests.labelers.test_netdissect import (
    CONCEPTS,
    NAMES,
    NUM_UNITS,
    PLANTED_FORMULA,
    PLANTED_SINGLE,
    RANDOM_UNIT,
    Planted,
    make_planted,
    mask_batches,
)


@pytest.fixture(scope="module")
def planted() -> Planted:
    return make_planted()


def _iou(unit: torch.Tensor, f: Formula, concept_masks: torch.Tensor) -> float:
    """Plain pixel IoU of a formula's mask (evaluated by the formula itself) with a unit's active mask."""
    m = f.evaluate(concept_masks.transpose(0, 1))  # atoms [C, B, H, W] -> [B, H, W]
    union = (unit | m).sum().item()
    return (unit & m).sum().item() / union if union else 0.0


def _random_data(seed: int, B=6, U=4, C=6, H=8, W=8):
    g = torch.Generator().manual_seed(seed)
    concept_masks = torch.rand((B, C, H, W), generator=g) < torch.rand((1, C, 1, 1), generator=g) * 0.5
    # units that overlap some concepts, plus noise, so that formulas matter
    unit_masks = torch.rand((B, U, H, W), generator=g) < 0.15
    unit_masks[:, 0] |= concept_masks[:, 0] & ~concept_masks[:, 1]
    unit_masks[:, 1] |= concept_masks[:, 2] | concept_masks[:, 3]
    concepts = [Concept(f"k{i}", "a" if i < 3 else "b") for i in range(C)]
    ann = torch.ones((B, 2), dtype=torch.bool)

    def batches():
        for s in range(0, B, 4):
            yield MaskBatch(unit_masks[s:s + 4], concept_masks[s:s + 4], ann[s:s + 4])

    return unit_masks, concept_masks, concepts, batches


def _naive_beam(unit, concept_masks, C, beam, max_len, keep):
    """The reference's beam search, one formula at a time with `.evaluate`, plus our rules: no concept twice,
    no extension that leaves the mask unchanged, dedupe by canonical form."""
    atoms = sorted(((_iou(unit, Leaf(c), concept_masks), c) for c in range(C)), key=lambda t: -t[0])
    pool = [(v, 1, canonical_key(Leaf(c)), c, ()) for v, c in atoms if v > 0][:keep]
    for L in range(2, max_len + 1):
        new = []
        for v, n, key, first, steps in pool[:beam]:
            if n != L - 1:
                continue
            used = {first, *(c for _, c in steps)}
            for c in range(C):
                if c in used or concept_masks[:, c].sum() == 0:
                    continue
                parent = build_formula(first, steps).evaluate(concept_masks.transpose(0, 1))
                for op in (OP_OR, OP_AND, OP_AND_NOT):
                    f = build_formula(first, steps + ((op, c),))
                    if torch.equal(f.evaluate(concept_masks.transpose(0, 1)), parent):
                        continue  # a no-op extension (same mask as its parent)
                    s = _iou(unit, f, concept_masks)
                    if s > 0:
                        new.append((s, L, canonical_key(f), first, steps + ((op, c),)))
        merged, seen = [], set()
        for e in sorted(pool + new, key=lambda e: (-e[0], e[1])):
            if e[2] not in seen:
                seen.add(e[2])
                merged.append(e)
        pool = merged[:keep]
    return pool


# ---------------------------------------------------------------------------------------------------------------
# 1. Reference checks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_formula_ious_match_direct_evaluation_and_naive_beam(seed):
    unit_masks, concept_masks, concepts, batches = _random_data(seed)
    U, C = unit_masks.shape[1], concept_masks.shape[1]
    res = CompExp()(LabelerInputs(layer="l", num_units=U, concepts=concepts, mask_batches=batches),
                    {"beam_size": 3, "max_length": 3, "top_n": 4, "memory_mb": 16})
    names = [c.name for c in concepts]
    lengths = set()
    for u in range(U):
        labs = res.for_unit(u)
        assert labs, u
        for lab in labs:
            f = parse(lab.formula, names)
            assert lab.text == lab.formula
            assert lab.extra["length"] == f.length()
            lengths.add(f.length())
            assert lab.score == pytest.approx(_iou(unit_masks[:, u], f, concept_masks), abs=1e-12)
        naive = _naive_beam(unit_masks[:, u], concept_masks, C, beam=3, max_len=3, keep=4)
        assert [lab.score for lab in labs] == pytest.approx([e[0] for e in naive], abs=1e-12)
        assert canonical_key(parse(labs[0].formula, names)) == naive[0][2]
    assert {2, 3} <= lengths  # formulas of several lengths were compared
    assert res.summary["passes"] == 3


def test_canonical_key_and_formula_building():
    a, b, c = Leaf(0), Leaf(1), Leaf(2)
    assert canonical_key(Or(Or(a, b), c)) == canonical_key(Or(a, Or(c, b)))
    assert canonical_key(And(And(a, Not(c)), b)) == canonical_key(And(And(a, b), Not(c)))
    assert canonical_key(And(a, b)) != canonical_key(Or(a, b))
    assert canonical_key(And(a, Not(b))) != canonical_key(And(b, Not(a)))
    assert build_formula(0, ((OP_OR, 1), (OP_AND_NOT, 2))) == And(Or(a, b), Not(c))
    assert build_formula(0, ((OP_AND, 1),)) == And(a, b)


def test_unit_that_never_fires_gets_no_label():
    unit_masks, concept_masks, concepts, _ = _random_data(3)
    unit_masks[:, 2] = False
    ann = torch.ones((unit_masks.shape[0], 2), dtype=torch.bool)
    res = CompExp()(LabelerInputs(layer="l", num_units=4, concepts=concepts,
                                  mask_batches=lambda: iter([MaskBatch(unit_masks, concept_masks, ann)])))
    assert res.for_unit(2) == []
    assert res.summary["units_labeled"] == 3


# ---------------------------------------------------------------------------------------------------------------
# 2. Planted units
# ---------------------------------------------------------------------------------------------------------------


def test_planted_formulas_are_recovered(planted: Planted):
    res = CompExp()(LabelerInputs(layer="planted", num_units=NUM_UNITS, concepts=CONCEPTS,
                                  mask_batches=mask_batches(planted, 64)))
    got = {u: res.for_unit(u)[0] for u in range(NUM_UNITS) if res.for_unit(u)}
    hits = [canonical_key(parse(got[u].formula, NAMES)) == canonical_key(f) for u, f in PLANTED_FORMULA.items()]
    assert sum(hits) / len(hits) >= 0.9, {u: got[u].formula for u in PLANTED_FORMULA}
    # the formula explains its unit better than any single concept does
    for u, f in PLANTED_FORMULA.items():
        atoms = [lab.score for lab in res.for_unit(u) if lab.extra["length"] == 1]
        assert got[u].extra["length"] == f.length()
        assert all(got[u].score > s for s in atoms)
        assert got[u].score > 0.4
    # single-concept units are explained by their concept alone (longer formulas never beat it)
    single = [got[u].formula == NAMES[f.concept] for u, f in PLANTED_SINGLE.items()]
    assert sum(single) / len(single) >= 0.9, {u: got[u].formula for u in PLANTED_SINGLE}
    # The random unit (random filter on image-independent noise): even the best formula of up to three concepts
    # overlaps it with IoU below NetDissect's 0.04.
    assert RANDOM_UNIT not in got or got[RANDOM_UNIT].score < 0.04
    by_len = res.summary["mean_best_iou_up_to_length"]
    assert by_len["1"] <= by_len["2"] <= by_len["3"]
    assert got[12].category is None and got[7].category == "texture"
    assert got[12].extra["category_formula"] == "((color OR color) AND (NOT texture))"


def test_complexity_penalty_prefers_shorter_formulas(planted: Planted):
    inputs = LabelerInputs(layer="planted", num_units=NUM_UNITS, concepts=CONCEPTS,
                           mask_batches=mask_batches(planted, 100))
    res = CompExp()(inputs, {"complexity_penalty": 0.5, "max_length": 2, "categories": "color,texture"})
    top = res.for_unit(9)[0]  # red AND NOT striped: 0.5 x its IoU is below the IoU of "red"
    assert top.formula == "red" and top.extra["ranking_score"] == top.score
    assert all(lab.category in ("color", "texture") for lab in res.labels if lab.category)
    assert res.summary["passes"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 3. Parameters and missing inputs
# ---------------------------------------------------------------------------------------------------------------


def test_params_defaults_and_validation():
    p = CompExp.resolve_params()
    assert (p["beam_size"], p["max_length"], p["top_n"], p["complexity_penalty"]) == (5, 3, 5, 1.0)
    for bad in ({"beam_size": 0}, {"max_length": 0}, {"top_n": "many"}, {"complexity_penalty": 2.0},
                {"min_iou_gain": 0.1}):
        with pytest.raises(LabelerError):
            CompExp.resolve_params(bad)
    assert isinstance(get("compexp"), CompExp)


def test_missing_and_mismatched_inputs(planted: Planted):
    with pytest.raises(MissingInputError, match="mask batches"):
        CompExp()(LabelerInputs(layer="l", num_units=NUM_UNITS, concepts=CONCEPTS))
    with pytest.raises(LabelerError, match="extract it again"):
        CompExp()(LabelerInputs(layer="l", num_units=NUM_UNITS - 1, concepts=CONCEPTS,
                                mask_batches=mask_batches(planted)))
    with pytest.raises(LabelerError, match="'scene'"):
        CompExp()(LabelerInputs(layer="l", num_units=NUM_UNITS, concepts=CONCEPTS,
                                mask_batches=mask_batches(planted)), {"categories": "scene"})


def test_progress_is_reported_and_cancel_propagates(planted: Planted):
    class Recorder:
        def __init__(self, cancel_after: int | None = None):
            self.calls: list[tuple[int, int]] = []
            self.cancel_after = cancel_after

        def update(self, done: int, total: int, message: str = "") -> None:
            self.calls.append((done, total))
            if self.cancel_after is not None and len(self.calls) > self.cancel_after:
                raise Cancelled()

    inputs = LabelerInputs(layer="planted", num_units=NUM_UNITS, concepts=CONCEPTS,
                           mask_batches=mask_batches(planted, 50))
    rec = Recorder()
    CompExp()(inputs, {"max_length": 2}, rec)
    assert rec.calls[-1] == (8, 8)  # 4 batches x 2 passes, counted once the number of batches is known
    with pytest.raises(Cancelled):
        CompExp()(inputs, {}, Recorder(cancel_after=5))
