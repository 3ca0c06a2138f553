from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from labelers.base import Input, LabelerInputs, MissingInputError, get
from labelers.textsum import TextSummary, count_words

# ---------------------------------------------------------------------------------------------------------------
# a direct computation with explicit loops, to check the vectorised one against


CAPTIONS = [
    ["A red circle on grass.", "the red circle"],
    ["a blue square", "Blue square, blue sky"],
    [],  # an image without captions takes no part
    ["red square on sand"],
    ["a blue circle", "circle in blue"],
    ["a green triangle on grass"],
]
ACTS = torch.tensor(
    [[3.0, 0.0, -1.0], [0.0, 2.0, 0.5], [5.0, 5.0, 9.0], [2.0, 1.0, -2.0], [0.0, 3.0, 1.5], [0.5, 0.0, 0.0]]
)


def slow_reference(captions, acts, top_images, contrast):
    bags = []
    for caps in captions:
        words = [w for c in caps for w in re.findall(r"[a-z]{2,}", c.lower()) if w not in ENGLISH_STOP_WORDS]
        bags.append(Counter(words))
    valid = [i for i, b in enumerate(bags) if sum(b.values()) > 0]
    vocab = sorted({w for b in bags for w in b})
    p_w_x = {i: {w: bags[i][w] / sum(bags[i].values()) for w in vocab} for i in valid}
    p_w = {w: sum(p_w_x[i][w] for i in valid) / len(valid) for w in vocab}
    out = {}
    for u in range(acts.shape[1]):
        values = {i: float(acts[i, u]) for i in valid}
        floor = min(0.0, min(values.values()))
        weight = {i: values[i] - floor for i in valid}
        if top_images:
            best = sorted(valid, key=lambda i: -values[i])[:top_images]
            weight = {i: (weight[i] if i in best else 0.0) for i in valid}
        total = sum(weight.values())
        scores = {}
        for w in vocab:
            p = sum(weight[i] / total * p_w_x[i][w] for i in valid)
            if p > 0:
                scores[w] = (p if contrast == "none" else math.log(p) - math.log(p_w[w]), p)
        out[u] = scores
    return out


@pytest.mark.parametrize("top_images", [0, 2])
@pytest.mark.parametrize("contrast", ["none", "pmi"])
def test_matches_slow_reference(top_images, contrast):
    inputs = LabelerInputs(layer="l", num_units=3, pooled_max=ACTS, captions=CAPTIONS)
    params = {"min_word_images": 1, "fold_plurals": False, "top_n": 50, "top_images": top_images,
              "contrast": contrast}
    result = get("textsum")(inputs, params)
    ref = slow_reference(CAPTIONS, ACTS, top_images, contrast)
    for u in range(3):
        labels = result.for_unit(u)
        got = {lab.text: (lab.score, lab.extra["p_word_given_unit"]) for lab in labels}
        assert set(got) == set(ref[u])  # every word with p(w|u) > 0, nothing else
        for w, (score, p) in ref[u].items():
            assert got[w][0] == pytest.approx(score, rel=1e-9, abs=1e-12)
            assert got[w][1] == pytest.approx(p, rel=1e-9)
        assert [lab.rank for lab in labels] == list(range(1, len(labels) + 1))
        assert all(a.score >= b.score for a, b in zip(labels, labels[1:]))
    if contrast == "none":
        # p(w|u) is a distribution over the vocabulary
        for u in range(3):
            assert sum(lab.score for lab in result.for_unit(u)) == pytest.approx(1.0)
    assert result.summary["images_with_captions"] == 5
    # unit 0 fires on the two red images most: its top word is "red"
    assert result.for_unit(0)[0].text == "red"
    assert result.for_unit(1)[0].text == "blue"


def test_word_counting_folds_plurals_and_filters_rare_words():
    caps = [["two circles and a box"], ["one circle", "boxes everywhere"], ["berries and a berry"], ["glass"]]
    wc = count_words(caps, min_word_images=1, fold_plurals=True)
    assert "circles" not in wc.vocabulary and "boxes" not in wc.vocabulary and "berries" not in wc.vocabulary
    assert "glass" in wc.vocabulary  # no "glas" to fold onto
    col = {w: i for i, w in enumerate(wc.vocabulary)}
    assert wc.counts[0, col["circle"]] == 1 and wc.counts[1, col["circle"]] == 1
    assert wc.counts[2, col["berry"]] == 2
    assert wc.images_with_word[col["circle"]] == 2
    assert not set(wc.vocabulary) & ENGLISH_STOP_WORDS
    wc2 = count_words(caps, min_word_images=2, fold_plurals=True)
    assert sorted(wc2.vocabulary) == ["box", "circle"]


def test_missing_captions_and_mismatch():
    with pytest.raises(MissingInputError) as exc:
        get("textsum")(LabelerInputs(layer="l", num_units=3, pooled_max=ACTS, captions=[[]] * 6))
    assert exc.value.missing is Input.CAPTIONS
    with pytest.raises(Exception, match="captions for 2 images"):
        get("textsum")(LabelerInputs(layer="l", num_units=3, pooled_max=ACTS, captions=[["a"], ["b"]]))


def test_silent_unit_gets_no_words():
    acts = torch.zeros(6, 2)
    acts[:, 1] = torch.arange(6.0)
    result = get("textsum")(LabelerInputs(layer="l", num_units=2, pooled_max=acts, captions=CAPTIONS),
                            {"min_word_images": 1})
    assert result.for_unit(0) == []
    assert result.for_unit(1)
    assert result.summary["units_without_activation"] == 1


def test_params_have_help_and_defaults():
    for p in TextSummary.params:
        assert p.help and "\n" not in p.help
    assert TextSummary.resolve_params()["pooling"] == "max"


# ---------------------------------------------------------------------------------------------------------------
# planted units: a generated dataset with known attributes and a model whose channels are known detectors

COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"stripes": "stripes", "dots": "dots", "plain": "a plain gray background"}
TEMPLATES = (
    "a {color} {shape} on {bg}",
    "a picture of a {color} {shape} in front of {bg}",
    "the {shape} is {color} and behind it there are {bg}",
    "{bg} behind a {color} {shape}",
)


def draw(color, shape, background, rng: random.Random, size=32) -> torch.Tensor:
    img = torch.full((3, size, size), 0.5)
    if background == "stripes":  # horizontal lines, 2 px white, 2 px black
        rows = (torch.arange(size) // 2) % 2 == 0
        img[:, rows, :] = 1.0
        img[:, ~rows, :] = 0.0
    elif background == "dots":  # isolated 2 x 2 white dots on gray
        for y in range(1, size - 2, 6):
            for x in range(1, size - 2, 6):
                img[:, y : y + 2, x : x + 2] = 1.0
    r = rng.randint(5, 7)
    cy, cx = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
        mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
    else:
        mask = (yy >= cy - r) & (yy <= cy + r) & ((xx - cx).abs() <= (yy - (cy - r)) // 2)
    img[:, mask] = torch.tensor(COLORS[color])[:, None]
    return img


def make_dataset(n=300, seed=0):
    rng = random.Random(seed)
    images, captions, attrs = [], [], []
    for _ in range(n):
        color, shape, bg = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        images.append(draw(color, shape, bg, rng))
        caps = [t.format(color=color, shape=shape, bg=BACKGROUNDS[bg]) for t in rng.sample(TEMPLATES, 2)]
        captions.append(caps)
        attrs.append((color, shape, bg))
    return torch.stack(images), captions, attrs


class PlantedNet(torch.nn.Module):
    """Six channels with known meaning: red, green, blue, yellow pixels; horizontal stripes; isolated dots."""

    units = ("red", "green", "blue", "yellow", "stripes", "dots")

    def __init__(self):
        super().__init__()
        self.color = torch.nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.color.weight.copy_(torch.tensor(
                [[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -2.0]]
            )[:, :, None, None])
            self.color.bias.copy_(torch.tensor([-0.5, -0.5, -0.5, -1.5]))

    def forward(self, x):
        colors = F.relu(self.color(x))
        s = x.sum(dim=1, keepdim=True)
        p = F.pad(s, (2, 2, 2, 2), mode="replicate")
        h, w = s.shape[-2:]
        up, down = p[..., 0:h, 2 : 2 + w], p[..., 4 : 4 + h, 2 : 2 + w]
        left, right = p[..., 2 : 2 + h, 0:w], p[..., 2 : 2 + h, 4 : 4 + w]
        # a long horizontal edge: vertical intensity change that persists over 9 columns
        dy = (s - p[..., 1 : 1 + h, 2 : 2 + w]).abs()
        stripes = F.relu(F.avg_pool2d(F.pad(dy, (4, 4, 0, 0), mode="replicate"), (1, 9), stride=1) - 1.5)
        # a spot brighter than its surround in all four directions
        spot = torch.stack([s - up, s - down, s - left, s - right]).amin(dim=0)
        dots = F.relu(spot - 1.0)
        return torch.cat([colors, stripes, dots], dim=1)


@pytest.mark.parametrize("contrast", ["none", "pmi"])
def test_planted_units_get_their_attribute(contrast):
    images, captions, attrs = make_dataset()
    with torch.no_grad():
        maps = PlantedNet()(images)
    inputs = LabelerInputs(
        layer="planted", num_units=maps.shape[1], pooled_mean=maps.mean(dim=(2, 3)), pooled_max=maps.amax(dim=(2, 3)),
        captions=captions,
    )
    # the detectors really are what they claim: each fires exactly on its images
    truth = torch.tensor([[c == "red", c == "green", c == "blue", c == "yellow", b == "stripes", b == "dots"]
                          for c, _, b in attrs])
    assert torch.equal(inputs.pooled_mean > 0, truth)

    result = get("textsum")(inputs, {"pooling": "mean", "contrast": contrast, "top_n": 5})
    top = [result.for_unit(u)[0].text for u in range(len(PlantedNet.units))]
    hits = sum(t == want for t, want in zip(top, PlantedNet.units))
    assert hits / len(PlantedNet.units) >= 0.9, top
    for lab in result.labels:
        assert lab.text not in ENGLISH_STOP_WORDS
        assert lab.text.isalpha() and lab.text == lab.text.lower()
    if contrast == "none":
        # red appears once in each caption of a red image, and a caption has 3-6 content words
        assert 0.12 < result.for_unit(0)[0].score < 0.3
