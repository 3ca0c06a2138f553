"""MILAN against direct computations with tiny random transformers models written to tmp_path."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import labelers.milan as milan
from labelers import textmodels
from labelers.base import ExemplarBatch, Input, LabelerError, LabelerInputs, MissingInputError, get
from tests.labelers.tiny_language import WORDS, make_captioner, make_lm

S = 20  # exemplar picture side; the captioners' processors resize to 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("milan_models")
    return {
        "set": textmodels.load(make_captioner(root / "set", set_captioner=True, seed=0), "captioner"),
        "image": textmodels.load(make_captioner(root / "image", set_captioner=False, seed=2), "captioner"),
        "lm": textmodels.load(make_lm(root / "lm", seed=1), "lm"),
    }


class ArrayExemplars:
    """The EXEMPLARS contract over in-memory arrays."""

    def __init__(self, units: int, k: int, seed: int = 0, missing: dict[int, int] | None = None):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (units, k, S, S, 3), generator=g, dtype=torch.uint8)
        self.masks = torch.rand(units, k, S, S, generator=g) > 0.6
        self.present = torch.ones(units, k, dtype=torch.bool)
        for u, n in (missing or {}).items():
            self.present[u, n:] = False
            self.images[u, n:] = 0
            self.masks[u, n:] = False

    def batches(self, units, k, quantile, chunk):
        for s in range(0, len(units), chunk):
            us = torch.tensor(units[s:s + chunk])
            yield ExemplarBatch(units=us, images=self.images[us, :k], masks=self.masks[us, :k],
                                present=self.present[us, :k], image_index=torch.zeros(len(us), k, dtype=torch.long))


def inputs_for(ex, captioner, lm, units):
    inp = LabelerInputs(layer="layer", num_units=units)
    inp.exemplars, inp.captioner, inp.causal_lm = ex, captioner, lm
    return inp


# ---- direct computations, written from the definitions ----------------------------------------------------------
def pixel_values(captioner, images, masks):
    """The masked pictures as app.imaging draws them, through the captioner's own image processor."""
    from app.imaging import masked_image

    pics = [np.asarray(masked_image(Image.fromarray(im.numpy()), m.numpy(), dim=milan.MASK_DIM))
            for im, m in zip(images, masks)]
    return captioner.image_processor(images=pics, return_tensors="pt")["pixel_values"]


def direct_log_p_given_e(captioner, images, masks, texts, set_conditioned=True):
    """log p(text | E) of texts of one token length, with the model's full forward pass: encoder states of the k
    pictures concatenated (set), or the mean over pictures of log p(text | picture) (image-level)."""
    from transformers.modeling_outputs import BaseModelOutput

    m = captioner.model
    tok = [captioner.tokenizer(t, add_special_tokens=False)["input_ids"] + [m.config.eos_token_id] for t in texts]
    assert len({len(t) for t in tok}) == 1
    tok = torch.tensor(tok)
    ids = torch.cat([torch.full((len(tok), 1), m.config.decoder_start_token_id), tok[:, :-1]], 1)
    with torch.no_grad():
        enc = m.encoder(pixel_values=pixel_values(captioner, images, masks)).last_hidden_state
        sets = [enc.reshape(1, -1, enc.shape[-1])] if set_conditioned else [e[None] for e in enc]
        total = torch.zeros(len(tok), dtype=torch.float64)
        for states in sets:
            out = m(encoder_outputs=BaseModelOutput(last_hidden_state=states.expand(len(tok), -1, -1)),
                    decoder_input_ids=ids)
            total += torch.log_softmax(out.logits, -1).gather(-1, tok[..., None])[..., 0].sum(1).double()
    return dict(zip(texts, (total / len(sets)).tolist()))


def direct_log_p(lm, texts):
    tok = lm.tokenizer
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert len({len(t) for t in ids}) == 1
    ids = torch.tensor(ids)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    vals = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].sum(1)
    return dict(zip(texts, vals.tolist()))


def by_length(fn, texts, *args, **kwargs):
    out = {}
    for n in sorted({len(t.split()) for t in texts}):
        out.update(fn(*args, [t for t in texts if len(t.split()) == n], **kwargs))
    return out


# ---- tests -----------------------------------------------------------------------------------------------------
def test_wpmi_reranking_equals_exhaustive_direct_computation(models):
    """With descriptions of at most two words and a beam wider than all of them, the beam is exhaustive: the top 5
    must be the 5 best of every possible description by wpmi computed directly."""
    cap, lm = models["set"], models["lm"]
    ex = ArrayExemplars(units=1, k=3, seed=4)
    params = {"k": 3, "beam": 200, "max_length": 2, "lambda": 0.2, "batch": 1, "top_n": 5}
    res = get("milan")(inputs_for(ex, cap, lm, 1), params)
    texts = [" ".join(w) for n in (1, 2) for w in itertools.product(WORDS, repeat=n)]
    for unit in (0,):
        got = res.for_unit(unit)
        assert [lab.rank for lab in got] == [1, 2, 3, 4, 5]
        a = by_length(direct_log_p_given_e, texts, cap, ex.images[unit], ex.masks[unit])
        b = by_length(direct_log_p, texts, lm)
        wpmi = {t: a[t] - 0.2 * b[t] for t in texts}
        best = sorted(texts, key=lambda t: -wpmi[t])[:5]
        assert [lab.text for lab in got] == best
        for lab in got:
            assert lab.score == pytest.approx(wpmi[lab.text], abs=1e-4)
            assert lab.extra["wpmi"] == pytest.approx(lab.score)
            assert lab.extra["log_p_d_given_e"] == pytest.approx(a[lab.text], abs=1e-4)
            assert lab.extra["log_p_d"] == pytest.approx(b[lab.text], abs=1e-4)
            assert lab.extra["exemplars"] == 3


def test_lambda_zero_keeps_the_captioners_beam_order(models):
    cap, lm = models["set"], models["lm"]
    ex = ArrayExemplars(units=2, k=4, seed=1)
    params = {"k": 4, "beam": 10, "max_length": 4, "lambda": 0.0, "batch": 2, "top_n": 5}
    res = get("milan")(inputs_for(ex, cap, lm, 2), params)
    parts = milan.captioner_parts(cap)
    for unit in range(2):
        pics = milan.masked_views(ex.images[unit], ex.masks[unit], parts.mask_dim)
        states = milan.encode_images(parts, pics)
        beam = milan.beam_search(parts, states.reshape(1, -1, states.shape[-1]), 10, 4)[0]
        order = [t for t in dict.fromkeys(milan.clean_text(cap.tokenizer, p) for p in beam.paths) if t]
        assert beam.scores == sorted(beam.scores, reverse=True)
        got = res.for_unit(unit)
        assert [lab.text for lab in got] == order[:5]
        for lab in got:  # and the prior is reported, though it weighed nothing
            assert lab.score == pytest.approx(lab.extra["log_p_d_given_e"])
            assert lab.extra["log_p_d"] == pytest.approx(direct_log_p(lm, [lab.text])[lab.text], abs=1e-4)


def test_lambda_changes_the_choice_towards_rarer_descriptions(models):
    cap, lm = models["set"], models["lm"]
    ex = ArrayExemplars(units=1, k=2, seed=3)
    base = {"k": 2, "beam": 20, "max_length": 3, "batch": 1, "top_n": 20}
    for lam in (0.0, 1.0):
        labs = get("milan")(inputs_for(ex, cap, lm, 1), base | {"lambda": lam}).for_unit(0)
        scores = [lab.extra["log_p_d_given_e"] - lam * lab.extra["log_p_d"] for lab in labs]
        assert scores == sorted(scores, reverse=True)
        assert [lab.score for lab in labs] == pytest.approx(scores)


def test_image_level_captioner_scores_the_mean_over_exemplars(models):
    cap, lm = models["image"], models["lm"]
    assert not cap.set_conditioned
    ex = ArrayExemplars(units=2, k=3, seed=5, missing={1: 2})  # unit 1 has only two exemplars
    params = {"k": 3, "beam": 6, "max_length": 3, "lambda": 0.2, "batch": 2, "top_n": 3}
    res = get("milan")(inputs_for(ex, cap, lm, 2), params)
    for unit, n in ((0, 3), (1, 2)):
        got = res.for_unit(unit)
        assert got and all(lab.extra["exemplars"] == n for lab in got)
        for lab in got:
            a = direct_log_p_given_e(cap, ex.images[unit, :n], ex.masks[unit, :n], [lab.text],
                                     set_conditioned=False)[lab.text]
            assert lab.extra["log_p_d_given_e"] == pytest.approx(a, abs=1e-4)
            assert lab.score == pytest.approx(a - 0.2 * direct_log_p(lm, [lab.text])[lab.text], abs=1e-4)
        # candidates come from each exemplar's own beam
        parts = milan.captioner_parts(cap)
        states = milan.encode_images(parts, milan.masked_views(ex.images[unit, :n], ex.masks[unit, :n]))
        proposed = {milan.clean_text(cap.tokenizer, p) for b in milan.beam_search(parts, states, 6, 3) for p in b.paths}
        assert {lab.text for lab in got} <= proposed


def test_missing_inputs_and_unusable_captioner(models):
    inp = LabelerInputs(layer="l", num_units=1)
    inp.exemplars = ArrayExemplars(1, 2)
    with pytest.raises(MissingInputError, match="captioner"):
        get("milan")(inp)
    inp.captioner = models["lm"]  # a causal LM is not an image captioner
    inp.causal_lm = models["lm"]
    with pytest.raises(LabelerError, match="VisionEncoderDecoder"):
        get("milan")(inp, {"k": 2})
    assert set(get("milan").inputs) == {Input.EXEMPLARS, Input.CAPTIONER, Input.CAUSAL_LM}


def test_defaults_are_the_papers():
    p = {x.name: x.default for x in get("milan").params}
    assert (p["k"], p["quantile"], p["lambda"], p["beam"], p["max_length"]) == (15, 0.99, 0.2, 50, 15)


def test_progress_per_chunk_and_cancel(models):
    from labelers.base import Cancelled

    class Stop:
        def __init__(self, at):
            self.at, self.seen = at, []

        def update(self, done, total, message=""):
            self.seen.append((done, total, message))
            if len(self.seen) == self.at:
                raise Cancelled()

    params = {"k": 2, "beam": 3, "max_length": 2, "batch": 2}
    ok = Stop(at=0)
    get("milan")(inputs_for(ArrayExemplars(5, 2), models["set"], models["lm"], 5), params, ok)
    assert [s[:2] for s in ok.seen] == [(0, 5), (2, 5), (4, 5), (5, 5)] and "units 4-4" in ok.seen[-1][2]
    stop = Stop(at=2)
    with pytest.raises(Cancelled):
        get("milan")(inputs_for(ArrayExemplars(5, 2), models["set"], models["lm"], 5), params, stop)
    assert len(stop.seen) == 2
