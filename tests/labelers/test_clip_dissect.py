from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

import pytest
import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

import labelers.clip_dissect as cd
from labelers.base import Concept, Input, LabelerError, LabelerInputs, MissingInputError, get
from labelers.clip_dissect import (
    DEFAULT_VOCABULARY,
    ClipDissect,
    clip_similarity,
    example_weights,
    read_vocabulary,
    soft_wpmi,
)

# ---------------------------------------------------------------------------------------------------------------
# the maths


def slow_soft_wpmi(acts, probs, top_k, p_start, p_end, lam):
    """One unit, one concept, one image at a time, as the paper writes it."""
    n, num_units = acts.shape
    t = probs.shape[1]
    log_p = [[0.0] * t for _ in range(num_units)]
    for u in range(num_units):
        order = sorted(range(n), key=lambda i: -float(acts[i, u]))[:top_k]
        for c in range(t):
            total = 0.0
            for j, i in enumerate(order):
                w = p_start - j / top_k * (p_start - p_end)
                total += math.log(1 + w * (float(probs[i, c]) - 1) + 1e-7)
            log_p[u][c] = total
    scores = torch.empty(num_units, t, dtype=torch.float64)
    for c in range(t):
        column = [log_p[u][c] for u in range(num_units)]
        peak = max(column)
        prior = peak + math.log(sum(math.exp(v - peak) for v in column)) - math.log(num_units)
        for u in range(num_units):
            scores[u, c] = log_p[u][c] - lam * prior
    return scores


def test_example_weights_follow_the_reference_schedule():
    w = example_weights(100)
    assert w[0].item() == pytest.approx(0.998)
    assert w[1].item() == pytest.approx(0.998 - 0.028 / 100)
    assert w[-1].item() == pytest.approx(0.998 - 0.99 * 0.028)  # falls towards 0.97, one step short of it
    assert torch.all(w[1:] < w[:-1])


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_soft_wpmi_matches_direct_loop(lam, monkeypatch):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(60, 7, generator=g)
    probs = torch.softmax(10 * torch.rand(60, 11, generator=g), dim=1)
    ref = slow_soft_wpmi(acts, probs, top_k=20, p_start=0.998, p_end=0.97, lam=lam)
    got = soft_wpmi(acts, probs, top_k=20, lam=lam)
    assert got.shape == (7, 11)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)
    # chunking over units changes nothing
    monkeypatch.setattr(cd, "CHUNK_BYTES", 20 * 11 * 4 * 2)
    assert torch.allclose(soft_wpmi(acts, probs, top_k=20, lam=lam), got, rtol=1e-6, atol=1e-5)


def test_fewer_images_than_top_k_uses_them_all():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(8, 3, generator=g)
    probs = torch.softmax(torch.randn(8, 5, generator=g), dim=1)
    ref = slow_soft_wpmi(acts, probs, top_k=8, p_start=0.998, p_end=0.97, lam=1.0)
    assert torch.allclose(soft_wpmi(acts, probs, top_k=100).double(), ref, rtol=1e-5, atol=1e-4)


def constructed_problem(num_units=10, per_concept=30, seed=0):
    """Unit j fires on images of concept j; a 'generic' concept (the last) is a little more CLIP-similar to every
    image than the image's own concept, as a word like 'image' would be."""
    g = torch.Generator().manual_seed(seed)
    n = num_units * per_concept
    concept = torch.arange(n) % num_units
    acts = torch.rand(n, num_units, generator=g)
    acts[torch.arange(n), concept] += 2.0
    sim = 0.20 + 0.02 * torch.rand(n, num_units + 1, generator=g)
    sim[torch.arange(n), concept] = 0.30
    sim[:, -1] = 0.31
    return acts, torch.softmax(10 * sim, dim=1)


def test_unit_gets_the_concept_of_its_top_images():
    acts, probs = constructed_problem()
    scores = soft_wpmi(acts, probs, top_k=30)
    best = scores.argmax(dim=1)
    assert (best == torch.arange(10)).float().mean() >= 0.9
    # without the prior, the concept that is a little likely everywhere wins: lambda is what removes it
    no_prior = soft_wpmi(acts, probs, top_k=30, lam=0.0)
    assert torch.all(no_prior.argmax(dim=1) == 10)


# ---------------------------------------------------------------------------------------------------------------
# the vocabulary


def test_default_vocabulary_is_20k_clean_words():
    words = read_vocabulary(DEFAULT_VOCABULARY)
    assert len(words) == 20000 == len(set(words))
    assert all(re.fullmatch(r"[a-z]{3,}", w) for w in words)
    assert not set(words) & ENGLISH_STOP_WORDS
    assert {"dog", "water", "red", "car", "tree"} <= set(words)
    assert DEFAULT_VOCABULARY.read_text(encoding="utf-8").startswith("#")


def test_vocabulary_file_skips_comments_blanks_and_duplicates(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# my concepts\nred\n\n  striped  \nred\n#not this\nwater lily\n", encoding="utf-8")
    assert read_vocabulary(f) == ["red", "striped", "water lily"]
    with pytest.raises(LabelerError, match="cannot be read"):
        read_vocabulary(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(LabelerError, match="empty"):
        read_vocabulary(tmp_path / "empty.txt")


# ---------------------------------------------------------------------------------------------------------------
# the plumbing, with a tiny randomly initialised CLIP saved to disk


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    src = root / "tokenizer_source"
    src.mkdir()
    # a character-level byte-pair vocabulary without merges: enough to tokenize lowercase words and digits
    chars = string.ascii_lowercase + string.digits
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(src))

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=24, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model_dir = root / "tiny-clip"
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(model_dir)
    return model_dir


N_IMAGES = 40


def make_images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(N_IMAGES, 36, 40, 3, generator=g) * 255).to(torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


def batches_of(images):
    def batches(batch_size):
        for start in range(0, len(images), batch_size):
            yield torch.arange(start, min(start + batch_size, len(images))), images[start : start + batch_size]

    return batches


WORDS = ["red", "green", "stripes", "water", "dog", "sky", "grass", "metal"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("vocab") / "concepts.txt"
    f.write_text("# concepts for the test\n" + "\n".join(WORDS) + "\n\n", encoding="utf-8")
    return f


def test_clip_similarity_is_cosine_of_clip_embeddings(tiny_clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    images = make_images()
    sim = clip_similarity(batches_of(images), WORDS, tiny_clip, "cpu", batch_size=16)
    assert sim.shape == (N_IMAGES, len(WORDS)) and sim.dtype == torch.float32
    assert torch.all(sim.abs() <= 1.0 + 1e-5)
    # the same numbers, computed by hand for two images
    model = CLIPModel.from_pretrained(str(tiny_clip), local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(tiny_clip), local_files_only=True)
    proc = CLIPImageProcessor.from_pretrained(str(tiny_clip), local_files_only=True)
    with torch.no_grad():
        t = tok(WORDS, padding=True, return_tensors="pt")
        text = cd._features(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
        img = cd._features(model.get_image_features(pixel_values=proc(images=images[3:5], return_tensors="pt")
                                                    ["pixel_values"]))
    expected = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    assert torch.allclose(sim[3:5], expected, atol=1e-5)
    # encoding only some images gives the same rows
    only = torch.tensor([7, 2, 31])
    part = clip_similarity(batches_of(images), WORDS, tiny_clip, "cpu", batch_size=16, num_images=N_IMAGES,
                           only=only)
    assert torch.allclose(part, sim[only], atol=1e-6)


def test_labeler_end_to_end(tiny_clip, vocab_file):
    g = torch.Generator().manual_seed(3)
    acts = torch.rand(N_IMAGES, 6, generator=g)
    images = make_images()
    inputs = LabelerInputs(layer="layer4", num_units=6, pooled_mean=acts, images=batches_of(images),
                           clip_model=tiny_clip)
    params = {"vocabulary": str(vocab_file), "top_k_images": 10, "top_n": 3, "batch_size": 16}
    result = get("clip_dissect")(inputs, params)
    assert len(result.labels) == 6 * 3
    for u in range(6):
        labs = result.for_unit(u)
        assert [lab.rank for lab in labs] == [1, 2, 3]
        assert all(a.score >= b.score for a, b in zip(labs, labs[1:]))
        assert all(lab.text in WORDS for lab in labs)
        assert len({lab.text for lab in labs}) == 3
    assert result.summary["num_concepts"] == len(WORDS)
    assert result.summary["top_k_images_used"] == 10
    assert 10 <= result.summary["images_encoded"] <= N_IMAGES

    # the labels are soft-WPMI of the full similarity matrix: skipping unused images changes nothing
    sim = clip_similarity(batches_of(images), WORDS, tiny_clip, "cpu", batch_size=7)
    scores = soft_wpmi(acts, torch.softmax(10 * sim, dim=1), top_k=10)
    for lab in result.labels:
        assert lab.score == pytest.approx(scores[lab.unit, WORDS.index(lab.text)].item(), abs=1e-4)
        assert lab.score == pytest.approx(
            lab.extra["log_p_concept_given_unit"] - lab.extra["log_p_concept"], abs=1e-4
        )

    # deterministic
    again = get("clip_dissect")(inputs, params)
    assert [(lab.unit, lab.rank, lab.text, lab.score) for lab in again.labels] == [
        (lab.unit, lab.rank, lab.text, lab.score) for lab in result.labels
    ]


def test_dataset_vocabulary_and_categories(tiny_clip):
    acts = torch.rand(N_IMAGES, 2, generator=torch.Generator().manual_seed(5))
    concepts = [Concept("sky", "scene"), Concept("dog", "object"), Concept("red", "color"), Concept("sky", "object")]
    inputs = LabelerInputs(layer="l", num_units=2, pooled_mean=acts, images=batches_of(make_images()),
                           clip_model=tiny_clip, concepts=concepts)
    result = get("clip_dissect")(inputs, {"vocabulary": "dataset", "top_k_images": 5, "top_n": 10})
    assert len(result.for_unit(0)) == 3  # duplicate concept names count once
    cats = {lab.text: lab.category for lab in result.labels}
    assert cats == {"sky": "scene", "dog": "object", "red": "color"}
    with pytest.raises(LabelerError, match="no concept names"):
        get("clip_dissect")(
            LabelerInputs(layer="l", num_units=2, pooled_mean=acts, images=batches_of(make_images()),
                          clip_model=tiny_clip),
            {"vocabulary": "dataset"},
        )


def test_default_vocabulary_runs(tiny_clip):
    acts = torch.rand(N_IMAGES, 2, generator=torch.Generator().manual_seed(6))
    inputs = LabelerInputs(layer="l", num_units=2, pooled_mean=acts, images=batches_of(make_images()),
                           clip_model=tiny_clip)
    result = get("clip_dissect")(inputs, {"top_k_images": 5, "top_n": 2})
    assert result.summary["num_concepts"] == 20000
    assert all(re.fullmatch(r"[a-z]{3,}", lab.text) for lab in result.labels)


def test_missing_inputs_and_bad_model_folder(tmp_path, vocab_file):
    acts = torch.rand(N_IMAGES, 2)
    with pytest.raises(MissingInputError) as exc:
        get("clip_dissect")(LabelerInputs(layer="l", num_units=2, pooled_mean=acts, images=batches_of(make_images())))
    assert exc.value.missing is Input.CLIP_MODEL
    assert "--clip" in str(exc.value)
    with pytest.raises(MissingInputError) as exc:
        get("clip_dissect")(LabelerInputs(layer="l", num_units=2, pooled_mean=acts, clip_model=tmp_path))
    assert exc.value.missing is Input.IMAGES
    inputs = LabelerInputs(layer="l", num_units=2, pooled_mean=acts, images=batches_of(make_images()),
                           clip_model=tmp_path / "no-such-clip")
    with pytest.raises(LabelerError, match="no-such-clip.*--clip"):
        get("clip_dissect")(inputs, {"vocabulary": str(vocab_file)})
    (tmp_path / "empty-clip").mkdir()
    inputs.clip_model = tmp_path / "empty-clip"
    with pytest.raises(LabelerError, match="empty-clip.*--clip"):
        get("clip_dissect")(inputs, {"vocabulary": str(vocab_file)})


def test_params_follow_the_reference_defaults():
    d = ClipDissect.resolve_params()
    assert d["pooling"] == "mean" and d["top_k_images"] == 100 and d["a"] == 10.0 and d["lambda"] == 1.0
    assert d["p_start"] == 0.998 and d["p_end"] == 0.97 and d["vocabulary"] == "default"
    for p in ClipDissect.params:
        assert p.help and "\n" not in p.help


def test_refuses_a_folder_of_another_model_type(tmp_path, vocab_file):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    inputs = LabelerInputs(layer="l", num_units=2, pooled_mean=torch.rand(N_IMAGES, 2),
                           images=batches_of(make_images()), clip_model=folder)
    with pytest.raises(LabelerError, match="'bert', not a clip model"):
        get("clip_dissect")(inputs, {"vocabulary": str(vocab_file)})


def test_refuses_weights_that_lack_clip_parameters(tiny_clip, tmp_path, vocab_file):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial-clip"
    shutil.copytree(tiny_clip, folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["visual_projection.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    inputs = LabelerInputs(layer="l", num_units=2, pooled_mean=torch.rand(N_IMAGES, 2),
                           images=batches_of(make_images()), clip_model=folder)
    with pytest.raises(LabelerError, match="lack 1 parameters .*visual_projection"):
        get("clip_dissect")(inputs, {"vocabulary": str(vocab_file)})
