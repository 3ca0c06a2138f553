"""Bootstrap intervals (labelers.resample) and the naming study's intervals and chance ranges
(labelers.agreement.pair_intervals): checked against direct computations on small boards."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from labelers import agreement as ag
from labelers.resample import annotator_mean, bootstrap, cluster_weights


def _board(name, assignment, groups, unclear=()):
    return ag.Partition(name, np.asarray(assignment), [str(g) for g in range(groups)],
                        np.array([g in unclear for g in range(groups)]))


def test_cluster_weights_draw_whole_clusters():
    clusters = np.repeat([10, 20, 30, 40], 3)
    w = cluster_weights(clusters, 200, np.random.default_rng(0))
    assert w.shape == (200, 12) and (w.sum(1) == 12).all()  # 4 clusters drawn, 3 items each
    # the items of one cluster always enter a resample together, the same number of times
    assert (w.reshape(200, 4, 3) == w.reshape(200, 4, 3)[:, :, :1]).all()


def test_table_measures_match_sklearn_and_pair_counts():
    rng = np.random.default_rng(3)
    a = _board("a", rng.integers(-1, 4, 40), 4, unclear=(3,))
    b = _board("b", rng.integers(-1, 5, 40), 5)
    for unclear in ag.UNCLEAR_MODES:
        _maps, la, lb = ag.comparable_labels(a, b, unclear)
        iv = ag.pair_intervals(a, b, np.arange(40) // 4, unclear, n_boot=50, shuffles=20)
        assert np.isclose(iv.adjusted_rand.value, adjusted_rand_score(la, lb))
        assert np.isclose(iv.agreement.value, ag.pairwise_agreement(a, b, unclear))


def test_intervals_resample_units_and_chance_is_near_zero():
    rng = np.random.default_rng(1)
    units = np.repeat(np.arange(50), 6)
    truth = rng.integers(0, 6, 300)
    a = _board("a", truth, 6)
    close = _board("b", np.where(rng.random(300) < 0.8, truth, rng.integers(0, 6, 300)), 6)
    random = _board("c", rng.integers(0, 6, 300), 6)
    good = ag.pair_intervals(a, close, units)
    assert good.adjusted_rand.low < good.adjusted_rand.value < good.adjusted_rand.high
    assert good.above_chance and good.units == 50
    assert abs(good.chance_ari.value) < 0.01 and good.chance_ari.low < 0 < good.chance_ari.high
    # two unrelated boards: the interval straddles chance (copies of a map never pair with themselves)
    bad = ag.pair_intervals(a, random, units)
    assert not bad.above_chance and bad.adjusted_rand.low < 0 < bad.adjusted_rand.high
    same = ag.pair_intervals(a, a, units)
    assert same.adjusted_rand.value == same.adjusted_rand.low == same.adjusted_rand.high == 1.0


def test_adequacy_interval_and_annotator_mean():
    units = np.repeat(np.arange(10), 4)
    board = _board("a", np.where(units < 5, 0, 1), 2, unclear=(1,))  # half the units named, half unclear
    iv = ag.adequacy_interval(board, units, 500, np.random.default_rng(0))
    assert iv.value == 0.5 and iv.low < 0.5 < iv.high
    m = np.array([[1, .5, .4, .6], [.5, 1, .3, .2], [.4, .3, 1, .5], [.6, .2, .5, 1]])
    mean = annotator_mean(m, 500, np.random.default_rng(0))
    assert np.isclose(mean.value, np.mean([.5, .4, .6, .3, .2, .5]))
    assert 0.2 <= mean.low < mean.value < mean.high <= 0.6
    two = annotator_mean(m[:2, :2], 500, np.random.default_rng(0))
    assert two.value == 0.5 and not two.known  # one pair: nothing to resample
    assert bootstrap(np.array([1.0]), 100, np.random.default_rng(0)).low == 1.0
