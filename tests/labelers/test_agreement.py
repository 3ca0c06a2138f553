"""The study's measures on small boards whose values were worked out by hand (the arithmetic is in the comments)."""
import math

import numpy as np
import pytest

from labelers.agreement import (
    Partition, adequacy, adjusted_rand, agreement_matrix, compare, comparable_labels, concept_units,
    match_concepts, pair_counts, pairwise_agreement, partition_from_labels,
)
from labelers.base import LabelerError

# A pool of 8 maps; the unit each map comes from:
UNITS = [0, 0, 0, 1, 1, 2, 2, 3]


def board_a():
    # dog {0,1,2}, wheel {3,4,5}, unclear {6}; map 7 unassigned
    return Partition.from_groups("ann", 8, [("dog", [0, 1, 2], False), ("wheel", [3, 4, 5], False),
                                            ("unclear", [6], True)])


def board_b():
    # animal {0,1}, round {2,3,4}, stripes {5,6}, unclear {7}
    return Partition.from_groups("bob", 8, [("animal", [0, 1], False), ("round", [2, 3, 4], False),
                                            ("stripes", [5, 6], False), ("unclear", [7], True)])


def test_partition_from_groups_and_masks():
    a = board_a()
    assert a.assignment.tolist() == [0, 0, 0, 1, 1, 1, 2, -1]
    assert a.placed.tolist() == [True] * 7 + [False]
    assert a.in_concept.tolist() == [True] * 6 + [False, False]
    assert a.concept_groups.tolist() == [0, 1]
    with pytest.raises(LabelerError, match="two groups"):
        Partition.from_groups("x", 3, [("p", [0, 1], False), ("q", [1], False)])
    with pytest.raises(LabelerError, match="outside"):
        Partition("x", np.array([0, 3]), ["p"], np.array([False]))


def test_adequacy():
    a = adequacy(board_a())
    assert (a.maps, a.concept, a.unclear, a.unassigned) == (8, 6, 1, 1)
    assert a.adequacy == pytest.approx(6 / 8)
    assert a.judged_adequacy == pytest.approx(6 / 7)
    b = adequacy(board_b())
    assert (b.concept, b.unclear, b.unassigned) == (7, 1, 0)
    assert b.adequacy == pytest.approx(7 / 8)
    empty = adequacy(Partition.from_groups("new", 4, []))
    assert empty.adequacy == 0 and math.isnan(empty.judged_adequacy)


def test_adjusted_rand_and_pairs_unclear_as_group():
    # Maps both placed: 0..6 (7 unassigned by ann). Contingency (rows dog, wheel, unclear; cols animal, round,
    # stripes): [[2,1,0],[0,2,1],[0,0,1]]. Pairs together in both: C(2,2)+C(2,2) = 2; in ann: C(3,2)*2 = 6;
    # in bob: C(2,2)+C(3,2)+C(2,2) = 5; all pairs C(7,2) = 21.
    # ARI = (2 - 6*5/21) / ((6+5)/2 - 6*5/21) = (4/7) / (57/14) = 8/57.
    a, b = board_a(), board_b()
    maps, la, lb = comparable_labels(a, b)
    assert maps.tolist() == list(range(7))
    assert adjusted_rand(a, b) == pytest.approx(8 / 57)
    pc = pair_counts(a, b)
    assert (pc.maps, pc.pairs, pc.both_same, pc.only_a_same, pc.only_b_same, pc.both_different) == (7, 21, 2, 4, 3, 12)
    assert pairwise_agreement(a, b) == pytest.approx(14 / 21)
    assert pc.positive_agreement == pytest.approx(2 / 9)
    # symmetric
    assert adjusted_rand(b, a) == pytest.approx(8 / 57)
    assert pairwise_agreement(b, a) == pytest.approx(14 / 21)


def test_unclear_excluded():
    # Maps in a concept for both: 0..5. Contingency [[2,1,0],[0,2,1]]: both 2, ann 6, bob C(2,2)+C(3,2)+0 = 4,
    # pairs 15. Agreement (15 - 6 - 4 + 2 + 2)/15 = 9/15; ARI = (2 - 24/15)/(5 - 24/15) = 0.4/3.4 = 2/17.
    a, b = board_a(), board_b()
    assert pairwise_agreement(a, b, unclear="exclude") == pytest.approx(9 / 15)
    assert adjusted_rand(a, b, unclear="exclude") == pytest.approx(2 / 17)


def test_unclear_as_singletons():
    # ann: c {0,1}, unclear {2,3}; bob: k {0,1}, k2 {2,3}. As a group, unclear {2,3} matches k2 exactly.
    a = Partition.from_groups("ann", 4, [("c", [0, 1], False), ("?", [2, 3], True)])
    b = Partition.from_groups("bob", 4, [("k", [0, 1], False), ("k2", [2, 3], False)])
    assert adjusted_rand(a, b) == pytest.approx(1.0)
    assert pairwise_agreement(a, b) == pytest.approx(1.0)
    # As singletons, ann has 1 pair together, bob 2, both 1, of 6: agreement (6 - 1 - 2 + 2)/6 = 5/6.
    assert pairwise_agreement(a, b, unclear="singletons") == pytest.approx(5 / 6)
    with pytest.raises(LabelerError, match="unclear must be"):
        adjusted_rand(a, b, unclear="nope")


def test_too_few_shared_maps_and_other_pools():
    a = Partition.from_groups("ann", 3, [("c", [0], False)])
    b = Partition.from_groups("bob", 3, [("k", [0, 1], False)])
    assert math.isnan(adjusted_rand(a, b))
    assert math.isnan(pairwise_agreement(a, b))
    with pytest.raises(LabelerError, match="same pool"):
        adjusted_rand(a, Partition.from_groups("eve", 5, []))


def test_match_concepts():
    # Jaccard: dog-animal 2/3, dog-round 1/5, dog-stripes 0; wheel-animal 0, wheel-round 2/4, wheel-stripes 1/4.
    # Best one-to-one: dog-animal + wheel-round (7/6) beats dog-round + wheel-stripes (0.45) and the others.
    m = match_concepts(board_a(), board_b())
    np.testing.assert_allclose(m.jaccard, [[2 / 3, 1 / 5, 0], [0, 2 / 4, 1 / 4]])
    assert m.shared.tolist() == [[2, 1, 0], [0, 2, 1]]
    got = [(x.a_name, x.b_name, round(x.jaccard, 6), x.shared, x.a_size, x.b_size) for x in m.matches]
    assert got == [("dog", "animal", round(2 / 3, 6), 2, 3, 2), ("wheel", "round", 0.5, 2, 3, 3)]
    assert m.unmatched_a == [] and m.unmatched_b == [2]
    # A threshold drops weak matches; including the unclear groups adds their row and column.
    assert [x.a_name for x in match_concepts(board_a(), board_b(), min_jaccard=0.6).matches] == ["dog"]
    with_unclear = match_concepts(board_a(), board_b(), include_unclear=True)
    assert with_unclear.jaccard.shape == (3, 4)
    # ann's unclear {6} vs bob's stripes {5,6}: 1/2; the assignment pairs it there, leaving bob's unclear alone.
    assert ("unclear", "stripes", 0.5) in [(x.a_name, x.b_name, x.jaccard) for x in with_unclear.matches]


def test_concept_units():
    a = concept_units(board_a(), UNITS)
    assert a.units.tolist() == [0, 1, 2]
    assert a.counts.tolist() == [[3, 0, 0], [0, 2, 1]]
    dog, wheel = a.concepts
    assert (dog.units, dog.counts, dog.top_unit, dog.top_share) == ([0], [3], 0, 1.0)
    assert dog.entropy == pytest.approx(0.0) and dog.effective_units == pytest.approx(1.0) and dog.single_unit
    # wheel: 2 maps of unit 1, 1 of unit 2: H = -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.636514, exp(H) = 1.889882
    assert (wheel.units, wheel.counts, wheel.top_unit) == ([1, 2], [2, 1], 1)
    assert wheel.top_share == pytest.approx(2 / 3)
    assert wheel.entropy == pytest.approx(0.6365141682948128)
    assert wheel.effective_units == pytest.approx(1.8898815748423097)
    assert not wheel.single_unit
    assert concept_units(board_a(), UNITS, single_share=0.6).concepts[1].single_unit
    np.testing.assert_allclose(a.unit_effective_concepts, [1, 1, 1])
    # bob: unit 0 gives 2 maps to animal and 1 to round: it spreads over exp(H(2/3, 1/3)) concepts.
    b = concept_units(board_b(), UNITS)
    assert b.counts.tolist() == [[2, 0, 0], [1, 2, 0], [0, 0, 2]]
    np.testing.assert_allclose(b.unit_effective_concepts, [1.8898815748423097, 1, 1])
    # four equal units: effective number 4
    flat = Partition.from_groups("x", 4, [("spread", [0, 1, 2, 3], False)])
    assert concept_units(flat, [5, 6, 7, 8]).concepts[0].effective_units == pytest.approx(4.0)
    with pytest.raises(LabelerError, match="unit ids"):
        concept_units(board_a(), [0, 1])


def test_automatic_labels_as_a_partition():
    auto_by_unit = {0: "dog", 1: "circle", 2: "circle", 3: None}
    auto = partition_from_labels("netdissect", [auto_by_unit[u] for u in UNITS])
    assert auto.names == ["circle", "dog"] and auto.assignment.tolist() == [1, 1, 1, 0, 0, 0, 0, -1]
    # Against ann over maps 0..6: contingency dog->dog 3, wheel->circle 3, unclear->circle 1.
    # together in both 3+3 = 6, in ann 6, in auto 3 + C(4,2) = 9, pairs 21.
    # agreement (21 - 6 - 9 + 12)/21 = 18/21; ARI = (6 - 54/21)/(7.5 - 54/21) = 48/69 = 16/23.
    c = compare(board_a(), auto)
    assert c.maps == 7
    assert c.adjusted_rand == pytest.approx(16 / 23)
    assert c.pairs.agreement == pytest.approx(18 / 21)
    assert [(x.a_name, x.b_name) for x in c.matching.matches] == [("dog", "dog"), ("wheel", "circle")]
    mat = agreement_matrix([board_a(), board_b(), auto])
    assert mat.shape == (3, 3) and np.allclose(np.diag(mat), 1)
    assert mat[0, 1] == pytest.approx(8 / 57) and mat[1, 0] == pytest.approx(8 / 57)
    assert mat[0, 2] == pytest.approx(16 / 23)
    pairs = agreement_matrix([board_a(), board_b()], measure="pairs")
    assert pairs[0, 1] == pytest.approx(14 / 21)


def test_chance_pair_agreement_is_the_mean_over_shuffles():
    from labelers.agreement import PairCounts, pair_counts, partition_from_labels

    rng = np.random.default_rng(0)
    la = list(rng.integers(0, 6, 60).astype(str))
    lb = list(rng.integers(0, 3, 60).astype(str))
    c = pair_counts(partition_from_labels("a", la), partition_from_labels("b", lb))
    shuffled = [pair_counts(partition_from_labels("a", la), partition_from_labels("b", list(rng.permutation(lb))))
                .agreement for _ in range(400)]
    # shuffling one board keeps both boards' group sizes: its mean agreement is the chance baseline
    assert c.chance_agreement == pytest.approx(np.mean(shuffled), abs=0.01)
    assert math.isnan(PairCounts(0, 0, 0, 0, 0, 0).chance_agreement)
