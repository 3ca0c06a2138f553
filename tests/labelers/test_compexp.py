"""Compositional explanations: the grouped-pattern search against the former pixel implementation (same formulas,
scores and ties), closed-form IoUs against direct evaluation of formulas, a naive beam search, the split into search
and test halves, planted formula units, parameters."""
from __future__ import annotations

import pytest
import torch

from labelers.base import Cancelled, Concept, LabelerError, LabelerInputs, MaskBatch, MissingInputError, get
from labelers.compexp import (
    OP_AND,
    OP_AND_NOT,
    OP_OR,
    CompExp,
    PatternTable,
    build_formula,
    canonical_key,
    pattern_ids,
)
from labelers.formulas import And, ConceptRelations, Formula, Leaf, Not, Or, canonical_text, parse
from labelers.significance import search_half
from tests.labelers.compexp_reference import ReferenceCompExp
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
                    {"beam_size": 3, "max_length": 3, "top_n": 4, "memory_mb": 16, "split_half": False})
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
        assert canonical_key(parse(labs[0].extra["search_formula"], names)) == naive[0][2]
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
    assert top.formula == "red" and top.extra["ranking_score"] == top.extra["iou_in_sample"]
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
    # the pass over the data (4 batches), one search step, the scores on the test half, done
    assert rec.calls[:4] == [(0, 3)] * 4 and rec.calls[-1] == (3, 3)
    assert [d for d, _ in rec.calls] == sorted(d for d, _ in rec.calls)
    with pytest.raises(Cancelled):
        CompExp()(inputs, {}, Recorder(cancel_after=5))


# ---------------------------------------------------------------------------------------------------------------
# 4. The grouped-pattern search against the former pixel implementation
# ---------------------------------------------------------------------------------------------------------------


def _tied_data(seed: int, B=10, U=7, C=9, H=6, W=6):
    """Random masks with exact ties: two concepts share one mask, one concept never occurs, one unit never fires."""
    g = torch.Generator().manual_seed(seed)
    cm = torch.rand((B, C, H, W), generator=g) < torch.rand((1, C, 1, 1), generator=g) * 0.6
    cm[:, 4] = cm[:, 1]
    cm[:, 7] = False
    um = torch.rand((B, U, H, W), generator=g) < 0.2
    um[:, 0] |= cm[:, 0] & ~cm[:, 2]
    um[:, 1] |= cm[:, 1] | cm[:, 3]
    um[:, 2] = cm[:, 5] & cm[:, 6]
    um[:, 6] = False
    concepts = [Concept(f"k{i}", ("a", "b", "c")[i % 3]) for i in range(C)]
    ann = torch.ones((B, 3), dtype=torch.bool)

    def batches():
        for s in range(0, B, 3):
            yield MaskBatch(um[s:s + 3], cm[s:s + 3], ann[s:s + 3])

    return um, cm, concepts, batches


def _search_keys(res, names):
    return {u: [(lab.score, canonical_key(parse(lab.extra.get("search_formula", lab.formula), names)))
                for lab in res.for_unit(u)] for u in {lab.unit for lab in res.labels}}


@pytest.mark.parametrize("seed,params", [
    (0, {}), (1, {"beam_size": 3, "top_n": 4}), (2, {"max_length": 4, "beam_size": 2}),
    (3, {"complexity_penalty": 0.8, "categories": "a,b"}),
])
def test_same_formulas_scores_and_ties_as_the_pixel_implementation(seed, params, monkeypatch):
    # Without the dataset's relations no two labels merge (the search already keeps one of each structural form),
    # so the labels are the search's pool one to one.
    monkeypatch.setattr(CompExp, "_relations", staticmethod(lambda co, sel: ConceptRelations()))
    um, cm, concepts, batches = _tied_data(seed)
    inputs = LabelerInputs(layer="l", num_units=um.shape[1], concepts=concepts, mask_batches=batches)
    ref = ReferenceCompExp()(inputs, dict(params, memory_mb=16))
    new = CompExp()(inputs, dict(params, split_half=False))
    names = [c.name for c in concepts]
    assert _search_keys(new, names) == _search_keys(ref, names)  # scores bit for bit, formulas in the same order
    assert new.summary["passes"] == ref.summary["passes"] and new.summary["data_passes"] == 1
    assert new.summary["mean_best_iou_up_to_length"] == ref.summary["mean_best_iou_up_to_length"]


def test_data_read_once_per_step_when_the_table_does_not_fit(monkeypatch):
    um, cm, concepts, batches = _tied_data(5)
    inputs = LabelerInputs(layer="l", num_units=um.shape[1], concepts=concepts, mask_batches=batches)
    kept = CompExp()(inputs, {})
    monkeypatch.setattr("labelers.compexp._Accumulator.nbytes", lambda self: 1 << 40)
    streamed = CompExp()(inputs, {})
    assert streamed.summary["data_passes"] == 1 + 2 + 2  # grouping, two search steps, both halves for the scores
    assert [(lab.unit, lab.text, lab.score, lab.extra) for lab in streamed.labels] == \
        [(lab.unit, lab.text, lab.score, lab.extra) for lab in kept.labels]


def test_pattern_table_counts_equal_pixel_counts():
    um, cm, _, _ = _tied_data(6)
    t = PatternTable.from_masks(um, cm)
    assert t.rows == len({tuple(v) for v in cm.permute(0, 2, 3, 1).reshape(-1, cm.shape[1]).tolist()})
    assert t.pixels.sum() == um.shape[0] * 36
    # any formula: pixel count and active count through the table equal direct counting
    f = And(Or(Leaf(0), Leaf(3)), Not(Leaf(2)))
    fm_pix = f.evaluate(cm.transpose(0, 1))  # [B, H, W]
    fm_tab = f.evaluate(t.bits.T)
    assert float(t.pixels[fm_tab].sum()) == float(fm_pix.sum())
    assert torch.equal(t.active[fm_tab].sum(0), (um & fm_pix[:, None]).sum((0, 2, 3)).double())
    merged = PatternTable.merge([PatternTable.from_masks(um[:4], cm[:4]), PatternTable.from_masks(um[4:], cm[4:])])
    assert merged.rows == t.rows and torch.equal(merged.active.sum(0), t.active.sum(0))
    # the torch path (the one a GPU takes) groups the same pixels; patterns may come in another order
    tt = PatternTable.from_masks(um, cm, use_numpy=False)
    order = {tuple(b): i for i, b in enumerate(t.bits.tolist())}
    perm = torch.tensor([order[tuple(b)] for b in tt.bits.tolist()])
    assert torch.equal(tt.pixels, t.pixels[perm]) and torch.equal(tt.active, t.active[perm])
    # more than 64 concepts: several words per pattern
    wide = torch.cat([cm] * 9, 1)
    for use_numpy in (True, False):
        ids, first = pattern_ids(wide.permute(0, 2, 3, 1).reshape(-1, wide.shape[1]), use_numpy=use_numpy)
        assert first.numel() == t.rows


def test_split_half_scores_on_images_the_search_never_saw():
    um, cm, concepts, batches = _tied_data(7, B=40)
    names = [c.name for c in concepts]
    inputs = LabelerInputs(layer="l", num_units=um.shape[1], concepts=concepts, mask_batches=batches)
    res = CompExp()(inputs, {"seed": 3})
    search = search_half(torch.arange(40), 3)
    assert 0 < int(search.sum()) < 40
    only_search = CompExp()(LabelerInputs(
        layer="l", num_units=um.shape[1], concepts=concepts,
        mask_batches=lambda: iter([MaskBatch(um[search], cm[search], torch.ones((int(search.sum()), 3), dtype=bool))]),
    ), {"split_half": False})
    # the search saw the search half only: its formulas and in-sample IoUs are those of a search on that half
    assert [(lab.unit, lab.extra["search_formula"], lab.extra["iou_in_sample"]) for lab in res.labels] == \
        [(lab.unit, lab.extra["search_formula"], lab.score) for lab in only_search.labels]
    for lab in res.labels:
        f = parse(lab.formula, names)
        assert lab.score == pytest.approx(_iou(um[~search, lab.unit], f, cm[~search]), abs=1e-12)
        assert lab.extra["iou_all"] == pytest.approx(_iou(um[:, lab.unit], f, cm), abs=1e-12)
    other_seed = CompExp()(inputs, {"seed": 4})
    assert [lab.score for lab in other_seed.labels] != [lab.score for lab in res.labels]


def test_labels_are_canonical_and_drop_terms_the_masks_make_redundant():
    # striped and solid never overlap (one texture per object): "striped AND NOT solid" is just "striped"
    B, H, W = 8, 8, 8
    g = torch.Generator().manual_seed(0)
    obj = torch.rand((B, 1, H, W), generator=g) < 0.5
    striped = obj & (torch.rand((B, 1, 1, 1), generator=g) < 0.5)
    solid = obj & ~striped
    red = torch.rand((B, 1, H, W), generator=g) < 0.4
    cm = torch.cat([solid, striped, red], 1)
    um = (striped | red) & (torch.rand((B, 1, H, W), generator=g) < 0.9)
    concepts = [Concept("solid", "texture"), Concept("striped", "texture"), Concept("red", "color")]
    res = CompExp()(LabelerInputs(layer="l", num_units=1, concepts=concepts, mask_batches=lambda: iter(
        [MaskBatch(um, cm, torch.ones((B, 2), dtype=torch.bool))])), {"split_half": False, "top_n": 10})
    texts = [lab.text for lab in res.labels]
    assert texts[0] == "(red OR striped)"  # searched as (striped OR red) or (red OR striped): one spelling
    assert len(texts) == len(set(texts))
    assert all(t == canonical_text(t) for t in texts)
    searched = {lab.extra["search_formula"]: lab.text for lab in res.labels}
    assert searched.get("(striped AND (NOT solid))", "striped") == "striped", searched
    assert "((NOT solid) AND striped)" not in texts and "((red OR solid) OR striped)" not in texts
    assert [lab.rank for lab in res.labels] == list(range(1, len(texts) + 1))
