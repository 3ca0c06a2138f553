"""Network Dissection: counting helpers against explicit set counting, the labeler on planted units, parameters.

The planted dataset and model below are shared with test_compexp.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labelers.base import (
    Concept,
    LabelerError,
    LabelerInputs,
    MaskBatch,
    MaskCounts,
    MissingInputError,
    get,
)
from labelers.formulas import And, Formula, Leaf, Not, Or
from labelers.netdissect import (
    NetDissect,
    _dense_counts,
    _gather_counts,
    iou_counts,
    iou_counts_from_maps,
    may_fire,
    overlap_counts,
    threshold_and_upsample,
)

# ---------------------------------------------------------------------------------------------------------------
# A generated dataset with known concept masks and a model whose channels are known detectors
# ---------------------------------------------------------------------------------------------------------------

COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.9, 0.9, 0.1),
    "cyan": (0.1, 0.85, 0.85),
    "magenta": (0.85, 0.1, 0.85),
    "orange": (0.95, 0.55, 0.05),
}
TEXTURES = ("striped", "checkered")
SHAPES = ("circle", "square")
CONCEPTS = (
    [Concept(c, "color") for c in COLOURS] + [Concept(t, "texture") for t in TEXTURES]
    + [Concept(s, "object") for s in SHAPES]
)
NAMES = [c.name for c in CONCEPTS]
IDX = {n: i for i, n in enumerate(NAMES)}
# How many 6x6 objects of each (colour, texture). Every planted unit's region covers < 0.5% of the map positions,
# so the top-0.5% threshold falls on the background and the active mask is the planted region, slightly blurred.
SCHEDULE = {
    ("red", "plain"): 10, ("red", "striped"): 8, ("red", "checkered"): 6,
    ("green", "plain"): 14, ("green", "striped"): 4, ("green", "checkered"): 6,
    ("blue", "plain"): 10, ("yellow", "plain"): 10,
    ("cyan", "plain"): 8, ("cyan", "checkered"): 4,
    ("magenta", "plain"): 8, ("magenta", "checkered"): 4,
    ("orange", "plain"): 14, ("orange", "striped"): 10,
}


def _l(n: str) -> Formula:
    return Leaf(IDX[n])


# unit index -> planted explanation (the random unit comes last)
PLANTED_SINGLE = {0: _l("red"), 1: _l("green"), 2: _l("blue"), 3: _l("yellow"), 4: _l("cyan"), 5: _l("magenta"),
                  6: _l("orange"), 7: _l("striped"), 8: _l("checkered")}
PLANTED_FORMULA = {
    9: And(_l("red"), Not(_l("striped"))),
    10: Or(_l("blue"), _l("yellow")),
    11: And(_l("orange"), _l("striped")),
    12: And(Or(_l("cyan"), _l("magenta")), Not(_l("checkered"))),
}
RANDOM_UNIT = 13
NUM_UNITS = 14


@dataclass
class Planted:
    images: torch.Tensor  # [N, 3, S, S] float in [0, 1]
    concept_masks: torch.Tensor  # [N, C, S, S] bool
    maps: torch.Tensor  # [N, U, S/2, S/2] float: the planted model's unit maps
    thresholds: torch.Tensor  # [U]
    unit_masks: torch.Tensor  # [N, U, S, S] bool


def make_images(n_images: int = 200, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    img = 0.5 + 0.01 * rng.standard_normal((n_images, 3, size, size))
    masks = np.zeros((n_images, len(CONCEPTS), size, size), dtype=bool)
    slots = [(i, qy, qx) for i in range(n_images) for qy in (0, 16) for qx in (0, 16)]
    order = rng.permutation(len(slots))
    objects = [key for key, count in SCHEDULE.items() for _ in range(count)]
    yy, xx = np.mgrid[0:6, 0:6]
    disk = (yy - 2.5) ** 2 + (xx - 2.5) ** 2 <= 9.0
    for k, (colour, texture) in enumerate(objects):
        i, qy, qx = slots[order[k]]
        y0, x0 = qy + 2 * rng.integers(0, 6), qx + 2 * rng.integers(0, 6)  # even offsets: aligned to map cells
        shape = SHAPES[rng.integers(0, 2)]
        region = disk if shape == "circle" else np.ones((6, 6), dtype=bool)
        if texture == "striped":
            bright = np.where(xx % 2 == 0, 1.0, 0.55)
        elif texture == "checkered":
            bright = np.where((xx + yy) % 2 == 0, 1.0, 0.55)
        else:
            bright = np.ones((6, 6))
        rgb = np.asarray(COLOURS[colour])[:, None, None] * bright[None]
        patch = img[i, :, y0:y0 + 6, x0:x0 + 6]
        patch[:, region] = rgb[:, region] + 0.01 * rng.standard_normal((3, int(region.sum())))
        for name in (colour, shape) + ((texture,) if texture != "plain" else ()):
            masks[i, IDX[name], y0:y0 + 6, x0:x0 + 6] |= region
    return torch.from_numpy(img.clip(0, 1)).float(), torch.from_numpy(masks)


def planted_model(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Hand-written 'network': pixel detectors of colour and texture, combined, then a stride-2 average pool.

    Channels 0-8 detect one concept each, 9-12 a formula of concepts, 13 is a random-weight 3x3 filter applied to
    noise that does not depend on the image (a unit that carries no information about any concept)."""
    x = images.double()
    chroma = x / x.sum(1, keepdim=True).clamp_min(1e-6)
    protos = torch.tensor(list(COLOURS.values()), dtype=torch.float64)
    protos = protos / protos.sum(1, keepdim=True)
    dist = ((chroma[:, None] - protos[None, :, :, None, None]) ** 2).sum(2)  # [N, colours, S, S]
    saturated = (x.amax(1) - x.amin(1)) > 0.25 * x.amax(1)
    nearest = dist.argmin(1)
    colour = torch.stack([(nearest == k) & saturated for k in range(len(COLOURS))], 1).double()

    bright = x.sum(1)
    pad = F.pad(bright[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    dx1, dx2 = bright - pad[:, 1:-1, :-2], pad[:, 1:-1, 2:] - bright
    dy1, dy2 = bright - pad[:, :-2, 1:-1], pad[:, 2:, 1:-1] - bright
    h_alt = (dx1 * dx2 < 0) & (dx1.abs() > 0.15) & (dx2.abs() > 0.15)
    v_alt = (dy1 * dy2 < 0) & (dy1.abs() > 0.15) & (dy2.abs() > 0.15)

    def dilate(m: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(m.double()[:, None], 3, stride=1, padding=1)[:, 0]

    checkered = v_alt.double()
    striped = (h_alt & (dilate(v_alt) == 0)).double()
    c = {name: colour[:, k] for k, name in enumerate(COLOURS)}
    units = [c[n] for n in COLOURS] + [striped, checkered]
    units += [
        c["red"] * (1 - dilate(striped > 0)),
        torch.maximum(c["blue"], c["yellow"]),
        c["orange"] * dilate(striped > 0),
        torch.maximum(c["cyan"], c["magenta"]) * (1 - dilate(checkered > 0)),
    ]
    g = torch.Generator().manual_seed(seed)
    # smooth noise (blobs a few cells wide, like a real unit's activity), independent of the image
    noise = torch.randn((x.shape[0], 1, x.shape[2] // 4, x.shape[3] // 4), generator=g, dtype=torch.float64)
    noise = F.interpolate(noise, size=x.shape[2:], mode="bilinear", align_corners=False)
    weight = torch.randn((1, 1, 3, 3), generator=g, dtype=torch.float64)
    units.append(F.conv2d(noise, weight, padding=1)[:, 0])
    pixel_level = torch.stack(units, 1)
    return F.avg_pool2d(pixel_level, 2).float()


def make_planted(n_images: int = 200, size: int = 32, seed: int = 0) -> Planted:
    images, concept_masks = make_images(n_images, size, seed)
    maps = planted_model(images, seed)
    flat = maps.transpose(0, 1).reshape(maps.shape[1], -1)
    thresholds = torch.quantile(flat, 0.995, dim=1)  # exact top-0.5% quantile, as NetDissect
    unit_masks = threshold_and_upsample(maps, thresholds, (size, size))
    return Planted(images, concept_masks, maps, thresholds, unit_masks)


def mask_batches(p: Planted, batch_size: int = 64, annotated: torch.Tensor | None = None):
    """The engine's MaskBatch stream for the planted data (every category annotated unless given)."""
    n = p.unit_masks.shape[0]
    k = len({c.category for c in CONCEPTS})
    ann = annotated if annotated is not None else torch.ones((n, k), dtype=torch.bool)

    def batches():
        for s in range(0, n, batch_size):
            yield MaskBatch(p.unit_masks[s:s + batch_size], p.concept_masks[s:s + batch_size], ann[s:s + batch_size])

    return batches


def categories_of(concepts: list[Concept]) -> tuple[list[str], torch.Tensor]:
    cats = list(dict.fromkeys(c.category for c in concepts))
    return cats, torch.tensor([cats.index(c.category) for c in concepts])


def accumulate_counts(batches, concepts: list[Concept]) -> MaskCounts:
    """What the engine's second pass does: sum `iou_counts` over batches."""
    cats, concept_category = categories_of(concepts)
    total = None
    for b in batches():
        part = iou_counts(b.unit_masks, b.concept_masks, b.category_annotated, concept_category)
        total = part if total is None else tuple(t + q for t, q in zip(total, part))
    inter, unit_area, concept_area = total
    return MaskCounts(inter, unit_area, concept_area, concept_category, cats)


@pytest.fixture(scope="module")
def planted() -> Planted:
    return make_planted()


# ---------------------------------------------------------------------------------------------------------------
# 1. Reference checks
# ---------------------------------------------------------------------------------------------------------------


def _explicit_iou(unit_masks, concept_masks, annotated, concept_category):
    """IoU by explicit sets of (image, y, x) pixels, with NetDissect's annotated-category rule."""
    B, U, H, W = unit_masks.shape
    C = concept_masks.shape[1]
    iou = np.zeros((U, C))
    for u in range(U):
        for c in range(C):
            k = int(concept_category[c])
            act = {(b, y, x) for b in range(B) if annotated[b, k] for y in range(H) for x in range(W)
                   if unit_masks[b, u, y, x]}
            con = {(b, y, x) for b in range(B) if annotated[b, k] for y in range(H) for x in range(W)
                   if concept_masks[b, c, y, x]}
            union = act | con
            iou[u, c] = len(act & con) / len(union) if union else 0.0
    return iou


def test_iou_counts_match_explicit_set_counting():
    g = torch.Generator().manual_seed(1)
    B, U, C, K, H, W = 4, 3, 5, 2, 5, 6
    unit_masks = torch.rand((B, U, H, W), generator=g) < 0.3
    concept_masks = torch.rand((B, C, H, W), generator=g) < 0.4
    concept_category = torch.tensor([0, 0, 1, 1, 1])
    annotated = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    # Masks of a category that is not annotated in an image are ignored (the engine never produces them).
    counts = accumulate_counts(lambda: iter([
        MaskBatch(unit_masks[:2], concept_masks[:2], annotated[:2]),
        MaskBatch(unit_masks[2:], concept_masks[2:], annotated[2:]),
    ]), [Concept(f"c{i}", ["a", "b"][int(k)]) for i, k in enumerate(concept_category)])
    expected = _explicit_iou(unit_masks.numpy(), concept_masks.numpy(), annotated.numpy(), concept_category.numpy())
    union = counts.union()
    got = (counts.intersection / union).nan_to_num(0.0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # and the areas themselves
    assert counts.unit_area[1, 1].item() == unit_masks[[0, 2, 3], 1].sum().item()
    assert counts.concept_area[0].item() == concept_masks[[0, 1, 3], 0].sum().item()

    concepts = [Concept(f"c{i}", ["a", "b"][int(k)]) for i, k in enumerate(concept_category)]
    res = NetDissect()(LabelerInputs(layer="l", num_units=U, concepts=concepts, mask_counts=counts),
                       {"top_n": C, "iou_threshold": 0.2})
    for u in range(U):
        labs = res.for_unit(u)
        order = np.argsort(-expected[u], kind="stable")
        assert [lab.score for lab in labs] == pytest.approx(sorted(expected[u][expected[u] > 0], reverse=True))
        assert labs[0].text == f"c{order[0]}"
        assert labs[0].extra["interpretable"] == (expected[u].max() >= 0.2)
        for lab in labs:
            c = lab.extra["concept_index"]
            assert lab.extra["intersection"] / lab.extra["union"] == pytest.approx(expected[u, c])
            assert lab.category == concepts[c].category


def test_overlap_counts_branches_agree(monkeypatch):
    g = torch.Generator().manual_seed(2)
    a = torch.rand((40, 3000), generator=g) < 0.01
    b = torch.rand((25, 3000), generator=g) < 0.3
    ref = (a.double() @ b.double().T)
    assert torch.equal(overlap_counts(a, b), ref)
    import labelers.netdissect as nd

    for cost in (0.0, 1e12):  # every chunk by gather, then every chunk by dense product
        monkeypatch.setattr(nd, "_GATHER_COST_CPU", cost)
        assert torch.equal(overlap_counts(a, b), ref)
        assert torch.equal(overlap_counts(b, a), ref.T)
    monkeypatch.undo()
    assert torch.equal(overlap_counts(b, a), ref.T)
    assert torch.equal(_dense_counts(a, b).double(), ref)
    assert torch.equal(_gather_counts(a, b, budget=1000).double(), ref)  # tiny budget: many sub-chunks
    assert torch.equal(_gather_counts(b, a, budget=10**6).T.double(), ref)
    assert torch.equal(overlap_counts(a, b, budget_bytes=2000), ref)  # many pixel chunks
    assert overlap_counts(a[:, :0], b[:, :0]).shape == (40, 25)


def test_threshold_and_upsample_matches_pil_bilinear():
    """NetDissect-Lite resizes with PIL's bilinear filter (scipy imresize, mode 'F') and keeps values > threshold."""
    g = torch.Generator().manual_seed(3)
    maps = torch.randn((2, 3, 7, 7), generator=g)
    thr = torch.tensor([0.5, 0.0, 1.0])
    got = threshold_and_upsample(maps, thr, (28, 28), budget_bytes=28 * 28 * 4 * 2)  # a chunk per unit
    for b in range(2):
        for u in range(3):
            pil = np.array(Image.fromarray(maps[b, u].numpy(), mode="F").resize((28, 28), Image.BILINEAR))
            ref = pil > thr[u].item()
            near = np.abs(pil - thr[u].item()) < 1e-5  # rounding may decide pixels exactly at the threshold
            assert ((got[b, u].numpy() == ref) | near).all()
    same = threshold_and_upsample(maps, thr, (7, 7))
    assert torch.equal(same, maps > thr[None, :, None, None])


# ---------------------------------------------------------------------------------------------------------------
# 2. Planted units
# ---------------------------------------------------------------------------------------------------------------


def test_planted_units_are_found(planted: Planted):
    counts = accumulate_counts(mask_batches(planted), CONCEPTS)
    res = NetDissect()(LabelerInputs(layer="planted", num_units=NUM_UNITS, concepts=CONCEPTS, mask_counts=counts))
    hits = [res.for_unit(u)[0].text == NAMES[f.concept] for u, f in PLANTED_SINGLE.items()]
    assert sum(hits) / len(hits) >= 0.9, [res.for_unit(u)[0].text for u in PLANTED_SINGLE]
    for u in PLANTED_SINGLE:
        top = res.for_unit(u)[0]
        assert top.extra["interpretable"] and top.score > 0.3
        assert len(res.for_unit(u)) <= 5
        assert [lab.rank for lab in res.for_unit(u)] == list(range(1, len(res.for_unit(u)) + 1))
    # The random unit (a random filter on image-independent noise) must not be a detector: its best IoU stays
    # below the paper's 0.04 and far below every planted unit's.
    assert planted.unit_masks[:, RANDOM_UNIT].float().mean() > 0.001  # it does fire, on ~0.5% of the pixels
    rnd = res.for_unit(RANDOM_UNIT)
    assert rnd and rnd[0].score < 0.04 and not rnd[0].extra["interpretable"]
    assert res.summary["interpretable_units"] >= len(PLANTED_SINGLE)
    assert res.summary["iou_threshold"] == 0.04
    assert sum(res.summary["interpretable_per_category"].values()) == res.summary["interpretable_units"]
    assert res.summary["unique_detectors_per_category"]["texture"] == 2


def test_categories_and_min_pixels_restrict_the_concepts(planted: Planted):
    counts = accumulate_counts(mask_batches(planted), CONCEPTS)
    inputs = LabelerInputs(layer="planted", num_units=NUM_UNITS, concepts=CONCEPTS, mask_counts=counts)
    res = NetDissect()(inputs, {"categories": "texture, object"})
    assert all(lab.category in ("texture", "object") for lab in res.labels)
    assert res.for_unit(7)[0].text == "striped"
    assert res.summary["categories"] == ["texture", "object"]
    big = float(counts.concept_area[IDX["red"]]) + 1
    res = NetDissect()(inputs, {"min_concept_pixels": big})
    assert all(counts.concept_area[lab.extra["concept_index"]] >= big for lab in res.labels)
    assert all(lab.text != "red" for lab in res.labels)


def test_partially_annotated_category_counts_only_annotated_images(planted: Planted):
    """Texture annotated in half of the images: the striped unit's IoU is computed on that half only."""
    n = planted.unit_masks.shape[0]
    cats, _ = categories_of(CONCEPTS)
    ann = torch.ones((n, len(cats)), dtype=torch.bool)
    ann[::2, cats.index("texture")] = False
    counts = accumulate_counts(mask_batches(planted, 50, ann), CONCEPTS)
    u, c = 7, IDX["striped"]
    keep = ann[:, cats.index("texture")]
    act = planted.unit_masks[keep, u]
    con = planted.concept_masks[keep, c]
    expected = (act & con).sum().item() / (act | con).sum().item()
    got = (counts.intersection[u, c] / counts.union()[u, c]).item()
    assert got == pytest.approx(expected, abs=1e-12)
    res = NetDissect()(LabelerInputs(layer="planted", num_units=NUM_UNITS, concepts=CONCEPTS, mask_counts=counts))
    assert res.for_unit(u)[0].text == "striped"


# ---------------------------------------------------------------------------------------------------------------
# 3. Parameters and missing inputs
# ---------------------------------------------------------------------------------------------------------------


def test_params_defaults_and_validation():
    p = NetDissect.resolve_params()
    assert p == {"iou_threshold": 0.04, "top_n": 5, "categories": "", "min_concept_pixels": 0}
    assert NetDissect.resolve_params({"top_n": "3", "iou_threshold": "0.1"})["top_n"] == 3
    for bad in ({"top_n": 0}, {"iou_threshold": 1.5}, {"iou_threshold": "high"}, {"min_concept_pixels": -1},
                {"beam_size": 5}):
        with pytest.raises(LabelerError):
            NetDissect.resolve_params(bad)
    assert isinstance(get("netdissect"), NetDissect)


def test_missing_and_mismatched_inputs(planted: Planted):
    with pytest.raises(MissingInputError, match="mask counts"):
        NetDissect()(LabelerInputs(layer="l", num_units=NUM_UNITS, concepts=CONCEPTS))
    counts = accumulate_counts(mask_batches(planted), CONCEPTS)
    with pytest.raises(LabelerError, match="extract the layer again"):
        NetDissect()(LabelerInputs(layer="l", num_units=NUM_UNITS + 1, concepts=CONCEPTS, mask_counts=counts))
    with pytest.raises(LabelerError, match="'material'"):
        NetDissect()(LabelerInputs(layer="l", num_units=NUM_UNITS, concepts=CONCEPTS, mask_counts=counts),
                     {"categories": "color,material"})


def _skip_test_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Maps where the shortcut of skipping maps that cannot fire is at its edge: thresholds at a map's exact maximum
    (an interpolated quantile often is one of the values), constant maps at the threshold, negative maps, all-zero
    (ReLU) maps, a NaN, and units whose every map is below or above the threshold. 16 units: a multiple of the CPU
    kernel's vector width, where the whole-batch resize and the resize of the selected maps round alike."""
    g = torch.Generator().manual_seed(11)
    B, U, h, w = 9, 16, 5, 4
    maps = torch.randn((B, U, h, w), generator=g).relu() * torch.rand((B, U, 1, 1), generator=g) * 3
    maps[:, 1] = -maps[:, 1] - 0.5  # negative maps, threshold below zero
    maps[2, 2] = 0.75  # constant map equal to the threshold
    maps[3, 3] = 0.0
    maps[4, 4, 1, 1] = float("nan")
    thr = torch.quantile(maps.transpose(0, 1).reshape(U, -1).nan_to_num(0.0), 0.9, dim=1)
    thr[0] = maps[5, 0].max()  # exactly a map's maximum
    thr[1] = -0.6
    thr[2] = 0.75
    thr[5] = 100.0  # no map can fire
    thr[6] = -1.0  # every map fires
    return maps, thr


def test_threshold_and_upsample_skips_only_maps_that_cannot_fire():
    maps, thr = _skip_test_maps()
    for size in ((17, 13), (5, 4), (3, 3), (64, 64)):
        dense = F.interpolate(maps, size=size, mode="bilinear", align_corners=False) if size != (5, 4) else maps
        ref = dense > thr[None, :, None, None]
        fire = may_fire(maps, thr)
        assert not ref[~fire].any()  # a skipped map is all False for certain
        assert fire.sum() < fire.numel()  # and some are skipped
        assert torch.equal(threshold_and_upsample(maps, thr, size), ref)
        assert torch.equal(threshold_and_upsample(maps, thr, size, budget_bytes=1), ref)  # one map per chunk


def test_iou_counts_from_maps_equals_upsample_then_count():
    maps, thr = _skip_test_maps()
    B, U = maps.shape[:2]
    g = torch.Generator().manual_seed(12)
    size = (16, 12)
    concept_masks = torch.rand((B, 5, *size), generator=g) < 0.3
    concept_category = torch.tensor([0, 1, 1, 2, 0])
    annotated = torch.rand((B, 3), generator=g) < 0.7  # masks of unannotated categories are ignored by both
    ref_active = F.interpolate(maps, size=size, mode="bilinear", align_corners=False) > thr[None, :, None, None]
    ref = iou_counts(ref_active, concept_masks, annotated, concept_category)
    for budget in (256 * 2**20, 1):  # all maps at once, one map at a time
        got = iou_counts_from_maps(maps, thr, size, concept_masks, annotated, concept_category, budget_bytes=budget)
        for r, x in zip(ref, got):
            assert x.dtype == torch.float64 and torch.equal(r, x)
    # no concept in the batch: areas only
    none = iou_counts_from_maps(maps, thr, size, concept_masks[:, :0], annotated, concept_category[:0])
    assert none[0].shape == (U, 0) and torch.equal(none[1], ref[1]) and none[2].shape == (0,)
