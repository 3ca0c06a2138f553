"""TExplain's pure parts on tiny models: translator training, seeded sampling, word counts, a brought GPT-2
folder, and the per-class words and spurious-cue report on features with a planted cue."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from labelers.base import Cancelled, LabelerInputs
from labelers.texplain import (
    PrefixMapper,
    TExplain,
    TranslatorInputs,
    count_sentence_words,
    heldout_loss,
    new_optimizer,
    sample_sentences,
    train_steps,
)
from labelers.textmodels import load
from tests.texplain_helpers import train_word_lm

SHAPES = ("circle", "square", "cross")
BGS = ("blue", "green", "red")


def planted(n: int = 120, seed: int = 0):
    """Features of a classifier that encodes the class and the background; circles lie on blue 90% of the time,
    the other classes never. One caption per image names both."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % 3
    bg = np.where((cls == 0) & (rng.random(n) < 0.9), 0, rng.integers(1, 3, n))
    feats = np.concatenate([np.eye(3)[cls], np.eye(3)[bg]], 1) + rng.normal(0, 0.1, (n, 6))
    caps = [f"a {SHAPES[c]} on {BGS[b]}" for c, b in zip(cls, bg)]
    return torch.tensor(feats, dtype=torch.float32), caps, torch.tensor(cls), torch.tensor(bg)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    _, caps, _, _ = planted()
    folder = train_word_lm(tmp_path_factory.mktemp("lm") / "lm", caps, steps=30)
    return load(folder, "lm")


@pytest.fixture(scope="module")
def trained(lm):
    feats, caps, cls, bg = planted()
    mapper = PrefixMapper.for_lm(feats.shape[1], 2, lm)
    mapper.set_normalisation(feats[:100])
    pairs = list(enumerate(caps))[:100]
    steps = train_steps(lm, mapper, new_optimizer(mapper, 2e-2), feats, pairs, start=0, steps=80, batch_size=32,
                        lr=2e-2, max_tokens=8, seed=0)
    assert steps == 80
    return mapper, feats, caps, cls, bg


def test_translator_beats_the_language_model_alone(lm, trained):
    mapper, feats, caps, _, _ = trained
    held = heldout_loss(lm, mapper, feats[100:], caps[100:], 8)
    base = heldout_loss(lm, None, feats[100:], caps[100:], 8)
    assert held < base - 0.1, (held, base)


def test_training_resumes_exactly(lm):
    feats, caps, _, _ = planted(40)
    pairs = list(enumerate(caps))

    def fresh():
        torch.manual_seed(1)
        m = PrefixMapper.for_lm(feats.shape[1], 2, lm)
        return m, new_optimizer(m, 1e-2)

    m1, o1 = fresh()
    train_steps(lm, m1, o1, feats, pairs, start=0, steps=6, batch_size=8, lr=1e-2, max_tokens=8, seed=3)
    m2, o2 = fresh()

    def killed(step: int, loss: float) -> None:
        if step == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_steps(lm, m2, o2, feats, pairs, start=0, steps=6, batch_size=8, lr=1e-2, max_tokens=8, seed=3,
                    on_step=killed)
    m3, o3 = fresh()
    m3.load_state_dict(m2.state_dict())
    o3.load_state_dict(o2.state_dict())
    train_steps(lm, m3, o3, feats, pairs, start=3, steps=6, batch_size=8, lr=1e-2, max_tokens=8, seed=3)
    for (k, a), b in zip(m1.state_dict().items(), m3.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_sampling_is_reproducible_with_a_seed(lm, trained):
    mapper, feats, _, _, _ = trained
    a = sample_sentences(lm, mapper, feats[:4], 6, [0, 1, 2, 3])
    b = sample_sentences(lm, mapper, feats[:4], 6, [0, 1, 2, 3])
    assert a == b
    # an image's sentences depend on its seed, not on its batch
    assert sample_sentences(lm, mapper, feats[2:3], 6, [2]) == a[2:3]
    assert sample_sentences(lm, mapper, feats[:4], 6, [10, 11, 12, 13]) != a
    greedy = sample_sentences(lm, mapper, feats[:1], 3, [0], top_p=0.0)[0]
    assert len(set(greedy)) == 1


def test_word_counts_equal_a_direct_count():
    sentences = [["a red circle on blue", "red circle and red square", "the circle"],
                 ["green square", "a square on green grass", "blue sky"]]
    words = count_sentence_words(sentences)
    stop = {"a", "on", "and", "the"}
    for n, sents in enumerate(sentences):
        tokens = [[w for w in re.findall(r"[a-z]+", s) if w not in stop] for s in sents]
        for j, w in enumerate(words.vocabulary):
            assert words.occurrences[n, j] == sum(t.count(w) for t in tokens), (n, w)
            assert words.sentences_with[n, j] == sum(w in t for t in tokens), (n, w)
    assert set(words.vocabulary) == {"red", "circle", "blue", "square", "green", "grass", "sky"}


def _inputs(lm, mapper, feats, cls, layer="fc", predictions=None):
    pooled = torch.nn.functional.one_hot(cls, 3).float() if layer == "fc" else feats
    tr = TranslatorInputs(mapper=mapper, lm=lm, features=feats, layer="pool", classifier_layer="fc",
                          class_names=list(SHAPES), predictions=cls if predictions is None else predictions,
                          class_labels=cls)
    return LabelerInputs(layer=layer, num_units=pooled.shape[1], pooled_max=pooled, pooled_mean=pooled,
                         translator=tr)


def test_planted_cue_is_among_the_class_words_and_flagged(lm, trained):
    mapper, feats, _, cls, bg = trained
    # the classifier gets circles right only on blue: the cue it relies on
    pred = cls.clone()
    pred[(cls == 0) & (bg != 0)] = 1
    out = TExplain()(_inputs(lm, mapper, feats, cls, predictions=pred), {"sentences": 10, "top_n": 5})
    circle = [lab.text for lab in out.for_unit(0)]
    assert "blue" in circle[:3], circle
    assert "circle" in circle[:3], circle
    report = {c["name"]: c for c in out.summary["spurious"]}
    cues = {w["word"]: w for w in report["circle"]["words"]}
    assert cues["blue"]["flagged"] and cues["blue"]["lift"] >= 1.5
    assert cues["blue"]["accuracy_said"] > cues["blue"]["accuracy_not_said"]
    assert "circle" not in cues  # the class's own name is not a cue
    for name in ("square", "cross"):
        assert not any(w["flagged"] for w in report[name]["words"]), report[name]
    lab = out.for_unit(0)[0]
    assert {"frequency", "count", "lift", "frequency_rank", "lift_rank"} <= set(lab.extra)


def test_units_by_top_images_and_isolated(lm, trained):
    mapper, feats, _, cls, _ = trained
    out = TExplain()(_inputs(lm, mapper, feats, cls, layer="pool"), {"sentences": 5, "top_images": 20})
    assert out.summary["mode"] == "units"
    assert out.for_unit(3)[0].text == "blue"  # the blue-background unit
    iso = TExplain()(_inputs(lm, mapper, feats, cls, layer="pool"),
                     {"sentences": 5, "unit_images": "isolated", "top_images": 20})
    assert {lab.unit for lab in iso.labels} <= set(range(6)) and iso.labels


def test_a_brought_gpt2_folder_with_a_byte_level_tokenizer_works(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    _, caps, cls, _ = planted(30)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(caps, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    brought = load(folder, "lm")
    feats, _, cls, _ = planted(30)
    mapper = PrefixMapper.for_lm(6, 2, brought)
    out = TExplain()(_inputs(brought, mapper, feats, cls), {"sentences": 3, "max_tokens": 6})
    assert out.summary["images"] == 30 and out.summary["sentences_per_image"] == 3


def test_a_sample_of_images_per_class_counts_the_same_sentences(lm, trained):
    """images_per_class draws a seeded sample per class; each sampled image's sentences are those a full run gives
    it (its seed is its dataset index), so a class's counts are the full run's counts over the sampled images."""
    mapper, feats, _, cls, _ = trained
    params = {"sentences": 4, "top_n": 40, "images_per_class": 0}
    full = TExplain()(_inputs(lm, mapper, feats, cls), params)
    part = TExplain()(_inputs(lm, mapper, feats, cls), {**params, "images_per_class": 7})
    assert full.summary["images_sampled"] == len(feats) and part.summary["images_sampled"] == 21
    report = {c["name"]: c for c in part.summary["spurious"]}
    assert all(report[n]["images"] == 7 and report[n]["images_in_class"] == 40 for n in SHAPES)
    # the sample of a class: recount its words from a direct sampling of those images
    tx = TExplain()
    groups = tx._class_samples(_inputs(lm, mapper, feats, cls).translator, 3, {**params, "images_per_class": 7,
                                                                               "seed": 0, "class_images": "correct"})
    rows = groups[0]
    sents = sample_sentences(lm, mapper, feats[torch.from_numpy(rows)], 4, [int(i) for i in rows], 0.9, 24)
    words = count_sentence_words(sents)
    said = np.asarray(words.sentences_with.sum(0)).ravel() / (len(rows) * 4)
    got = {lab.text: lab.extra["frequency"] for lab in part.for_unit(0)}
    for w, f in got.items():
        assert abs(said[words.vocabulary.index(w)] - f) < 1e-9, w
