import itertools

import numpy as np
import pytest
import torch

from app.engine.stats import TopKExemplars, TopQuantiles


def _stream(values: torch.Tensor, chunk: int, tq: TopQuantiles) -> None:
    for s in range(0, values.shape[1], chunk):
        tq.update(values[:, s:s + chunk])


@pytest.mark.parametrize("dist", ["normal", "relu", "ties"])
def test_top_quantiles_exact_matches_torch_quantile(dist):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 20_000, generator=g)
    if dist == "relu":
        v = v.clamp(min=0)  # most values tie at zero, as after a ReLU
    elif dist == "ties":
        v = torch.round(v * 4) / 4
    tq = TopQuantiles(7, v.shape[1], [0.99, 0.995], torch.device("cpu"))
    assert tq.exact
    _stream(v, 1_337, tq)
    res = tq.result()
    expected = torch.quantile(v.double(), torch.tensor([0.99, 0.995], dtype=torch.float64), dim=1).float()
    torch.testing.assert_close(res.values, expected, rtol=0, atol=1e-6)
    assert res.expected_relative_error == 0


def test_top_quantiles_buffer_is_the_exact_top_m_whenever_candidates_are_merged():
    """Candidates gather between merges: the buffer (what checkpoints and shards hand on) is still exactly each unit's
    m largest values, sorted, at any point, and so are the quantiles read from it."""
    g = torch.Generator().manual_seed(4)
    v = torch.randn(5, 30_000, generator=g).clamp(min=0)  # ReLU-like: many ties
    v[2] = torch.round(v[2] * 8) / 8
    tq = TopQuantiles(5, v.shape[1], [0.99, 0.995], torch.device("cpu"))
    for s in range(0, v.shape[1], 700):
        tq.update(v[:, s:s + 700])
        if s in (7_000, 21_000):  # mid-stream, with candidates pending
            assert tq._pending
            seen = v[:, :s + 700]
            assert torch.equal(tq.state()["buffer"], seen.topk(min(tq.m, seen.shape[1]), dim=1).values)
    assert torch.equal(tq.state()["buffer"], v.topk(tq.m, dim=1).values)
    expected = torch.quantile(v.double(), torch.tensor([0.99, 0.995], dtype=torch.float64), dim=1).float()
    torch.testing.assert_close(tq.result().values, expected, rtol=0, atol=1e-6)


def test_top_quantiles_state_round_trip_resumes_identically():
    v = torch.randn(3, 9_000, generator=torch.Generator().manual_seed(1))
    a = TopQuantiles(3, 9_000, [0.995], torch.device("cpu"))
    _stream(v[:, :4_000], 500, a)
    b = TopQuantiles(3, 9_000, [0.995], torch.device("cpu"))
    b.load_state({k: t.clone() for k, t in a.state().items()})
    _stream(v[:, 4_000:], 500, a)
    _stream(v[:, 4_000:], 500, b)
    torch.testing.assert_close(a.result().values, b.result().values)


def test_sampled_fallback_stays_within_its_documented_error():
    n = 400_000
    v = torch.randn(4, n, generator=torch.Generator().manual_seed(2))
    # a budget far below 0.5% of the values forces the sampled path
    tq = TopQuantiles(4, n, [0.995], torch.device("cpu"), budget_bytes=4 * 4 * 600)
    assert not tq.exact and tq.rate < 1
    _stream(v, 10_000, tq)
    res = tq.result()
    realised = (v > res.values[0][:, None]).float().mean(dim=1)  # true fraction above the estimated threshold
    rel = (realised - 0.005).abs() / 0.005
    assert res.expected_relative_error > 0
    # 4 standard errors: a wrong sampler or index would miss by far more
    assert float(rel.max()) < 4 * res.expected_relative_error, (rel, res.expected_relative_error)


def test_topk_exemplars_match_direct_topk():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(50, 5, 3, 3, generator=g)
    scores = maps.flatten(2).amax(2)
    tk = TopKExemplars(5, 4, (3, 3), torch.device("cpu"))
    for s in range(0, 50, 7):
        tk.update(scores[s:s + 7], torch.arange(s, min(s + 7, 50)), maps[s:s + 7])
    top = scores.T.topk(4, dim=1)
    assert torch.equal(tk.index, top.indices)
    torch.testing.assert_close(tk.scores, top.values)
    for u in range(5):
        for j in range(4):
            torch.testing.assert_close(tk.maps[u, j].float(), maps[top.indices[u, j], u].half().float())


def test_capture_is_not_rewritten_by_a_later_inplace_op():
    from app.sources import instrument as hooks

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU(inplace=True))
    with torch.no_grad():
        net[0].weight.fill_(-1.0)
        net[0].bias.zero_()
    x = torch.ones(1, 1, 2, 2)
    with hooks.capture(net, ["0"]) as outs:
        got = hooks.run_captured(net, x, outs)
    assert float(got["0"].max()) == -1.0  # the conv output, not the ReLU's zeros
    assert not net[0]._forward_hooks


def test_masks_follow_the_models_resize_and_centre_crop():
    """A mask must cover, on the unit's map grid, the pixels the model saw: torchvision's Resize + CenterCrop."""
    import torchvision.transforms.v2 as T
    from torchvision.transforms import InterpolationMode

    from app.engine.extract import masks_in_model_view

    h, w = 30, 48  # landscape: the crop cuts the sides
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.stack([xx < 12, (yy > 5) & (xx > 20) & (xx < 30), np.ones((h, w), bool)])
    pre = {"resize": 20, "crop": 16}
    got = masks_in_model_view(masks, pre, 16)
    tf = T.Compose([T.Resize(20, interpolation=InterpolationMode.NEAREST_EXACT), T.CenterCrop(16)])
    want = tf(torch.from_numpy(masks)).numpy()
    assert got.shape == (3, 16, 16)
    assert (got != want).mean() < 0.04  # nearest-neighbour rounding at region edges only
    assert got[2].all()
    assert got[0].sum() < masks[0].mean() * 256  # the left strip is partly cropped away


# ---- merging: shard states merged in any order equal one pass over everything ----------------------------------

def _tied_maps(n: int, units: int, seed: int) -> torch.Tensor:
    """Maps with many tied maxima (rounded, ReLU-like), so that tie order is exercised."""
    g = torch.Generator().manual_seed(seed)
    return (torch.round(torch.randn(n, units, 3, 3, generator=g) * 2) / 2).clamp(min=0)


def _observe_all(stats, maps: torch.Tensor, start: int, stop: int, batch: int) -> None:
    from app.engine.stats import LayerBatch

    for s in range(start, stop, batch):
        e = min(s + batch, stop)
        lb = LayerBatch(torch.arange(s, e), maps[s:e])
        for st in stats:
            st.observe(lb)


def _pass1(n: int, units: int, start: int = 0, stop: int | None = None, seed: int = 0):
    from app.engine.stats import PooledRows

    stop = n if stop is None else stop
    return [PooledRows(start, stop - start, units), TopQuantiles(units, n * 9, [0.9, 0.99], torch.device("cpu")),
            TopKExemplars(units, 6, (3, 3), torch.device("cpu"))]


@pytest.mark.parametrize("cuts", [[0, 40], [0, 13, 40], [0, 5, 6, 27, 40]])
def test_merged_shards_equal_one_pass_exactly(cuts):
    n, units = 40, 5
    maps = _tied_maps(n, units, seed=4)
    whole = _pass1(n, units)
    _observe_all(whole, maps, 0, n, 7)
    coordinator = _pass1(n, units)
    parts = []
    for a, b in itertools.pairwise(cuts):
        part = _pass1(n, units, a, b)
        _observe_all(part, maps, a, b, 3)
        parts.append([st.state() for st in part])
    for states in reversed(parts):  # any order
        for st, state in zip(coordinator, states):
            st.merge({k: v.clone() for k, v in state.items()})
    (pm, pmean), q, top = (st.result() for st in coordinator)
    (wm, wmean), wq, wtop = (st.result() for st in whole)
    np.testing.assert_array_equal(pm, wm)
    np.testing.assert_array_equal(pmean, wmean)
    assert torch.equal(q.values, wq.values) and q.exact
    expected = torch.quantile(maps.transpose(0, 1).reshape(units, -1).double(),
                              torch.tensor([0.9, 0.99], dtype=torch.float64), dim=1).float()
    torch.testing.assert_close(q.values, expected, rtol=0, atol=1e-6)
    for key in ("index", "scores", "maps"):
        assert torch.equal(top[key], wtop[key]), key
    # ties among maxima are broken by image index, ascending
    s, i = top["scores"], top["index"]
    assert bool(((s[:, :-1] > s[:, 1:]) | ((s[:, :-1] == s[:, 1:]) & (i[:, :-1] < i[:, 1:]))).all())
    assert bool((s[:, :-1] == s[:, 1:]).any())  # the data really has ties


def test_mask_counts_merge_exactly():
    from app.engine.stats import LayerBatch, MaskBatch, MaskCounts

    g = torch.Generator().manual_seed(5)
    n, units, concepts = 12, 3, 4
    maps = torch.rand(n, units, 2, 2, generator=g)
    dense = torch.rand(n, concepts, 4, 4, generator=g) > 0.6
    annotated = torch.ones(n, 2, dtype=torch.bool)
    cat = torch.tensor([0, 0, 1, 1])

    def counts():
        return MaskCounts(units, concepts, 2, torch.full((units,), 0.5), cat, 4, torch.device("cpu"))

    def feed(mc, a, b):
        mc.observe(LayerBatch(torch.arange(a, b), maps[a:b],
                              MaskBatch(dense[a:b], torch.arange(concepts), annotated[a:b])))

    whole = counts()
    for a in range(0, n, 4):
        feed(whole, a, a + 4)
    merged, left, right = counts(), counts(), counts()
    feed(left, 0, 5)
    feed(right, 5, 12)
    merged.merge(right.state())
    merged.merge(left.state())
    for k, v in whole.result().items():
        assert torch.equal(merged.result()[k], v), k
    assert float(whole.result()["inter"].sum()) > 0
