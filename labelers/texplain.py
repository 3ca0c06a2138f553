"""TExplain: a frozen language model says what a classifier's features encode.

After "Explaining learned visual features via pre-trained (frozen) language models" (TExplain, 2023): a small
translator maps the classifier's feature vector (pooled, at one layer; by default the input of the final linear
layer) to a prefix of K embedding vectors of a frozen causal language model, trained on the dataset's
(image, caption) pairs with the language model frozen (a ClipCap-style prefix). At inference the language model,
given an image's prefix, samples many sentences (nucleus sampling, seeded); their words, stop-words removed, are
counted per image and summed over groups of images:

- per class (labelling the classifier layer, whose units are the classes): the images predicted as the class, and
  also labelled as it when the dataset has class labels;
- per unit of any layer: the unit's top-activating images (default), or feature vectors in which only that unit
  departs from the average image (`unit_images="isolated"`, only for the translator's own layer).

Each word gets its frequency (the fraction of the group's sentences that say it), its raw count, and its lift
(frequency in the group / frequency over all images). Frequent words that are not the class's own name, said far
more for the class than overall, are the spurious-cue candidates; with class labels the report gives how often the
classifier is right on the class's images when the word is said versus when it is not.

This module is the pure part (translator network, caption loss, sampling, counting); `app/language/translator.py`
trains and stores translators and hands them to the labeler as `LabelerInputs.translator`.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from labelers.base import (
    Input,
    Label,
    Labeler,
    LabelerError,
    LabelerInputs,
    LabelingResult,
    Param,
    Progress,
    register,
)

log = logging.getLogger(__name__)


# ---- the translator -------------------------------------------------------------------------------------------

class PrefixMapper(nn.Module):
    """Feature vector [B, D] -> a prefix of K vectors for the frozen language model (ClipCap's MLP mapper).

    mode "embeddings" is ClipCap's: K input embeddings placed before the caption. mode "deep" (the default) maps
    the same K vectors, through one linear map per layer, to the keys and values of K virtual tokens at every
    attention layer (a prefix-tuning prefix, Li & Liang 2021, computed from the features). Why deep by default:
    language models trained in the app on the project's captions alone never needed earlier words to predict a
    caption's content words, so an input prefix barely moves them; on a 1-layer caption GPT-2 a free per-class
    input prefix left the caption loss at the no-prefix baseline (0.394 -> 0.395 nats per token) while deep
    prefixes write through every layer's attention. Large pre-trained models work with either.

    Features are standardised with the training set's mean and std (stored as buffers), so one learning rate fits
    layers whose activations differ in scale by orders of magnitude.
    """

    def __init__(self, feature_dim: int, prefix_length: int, embed_dim: int, hidden: int | None = None,
                 mode: str = "deep", layers: int = 0, kv_heads: int = 0, head_dim: int = 0):
        super().__init__()
        if mode not in ("deep", "embeddings"):
            raise LabelerError(f"translator mode {mode!r} is not 'deep' or 'embeddings'")
        hidden = hidden or max(64, (prefix_length * embed_dim) // 2)
        self.config = {"feature_dim": int(feature_dim), "prefix_length": int(prefix_length),
                       "embed_dim": int(embed_dim), "hidden": int(hidden), "mode": mode, "layers": int(layers),
                       "kv_heads": int(kv_heads), "head_dim": int(head_dim)}
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, prefix_length * embed_dim))
        if mode == "deep":
            if min(layers, kv_heads, head_dim) <= 0:
                raise LabelerError("a deep translator needs the language model's layers, heads and head size")
            self.kv = nn.Linear(embed_dim, layers * 2 * kv_heads * head_dim)

    @classmethod
    def for_lm(cls, feature_dim: int, prefix_length: int, lm: Any, hidden: int | None = None,
               mode: str = "deep") -> PrefixMapper:
        cfg = lm.model.config
        embed = lm.model.get_input_embeddings().weight.shape[1]
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or embed // heads)
        return cls(feature_dim, prefix_length, embed, hidden, mode, int(cfg.num_hidden_layers), kv_heads, head_dim)

    @property
    def prefix_length(self) -> int:
        return self.config["prefix_length"]

    @property
    def mode(self) -> str:
        return self.config["mode"]

    def set_normalisation(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))
        # a unit that never varies would divide by zero; it carries no information either way
        self.feature_std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """"embeddings": [B, K, E]; "deep": [L, 2, B, H, K, Dh] keys and values per layer."""
        c = self.config
        z = (features.to(self.feature_mean) - self.feature_mean) / self.feature_std
        x = self.net(z).view(len(features), c["prefix_length"], c["embed_dim"])
        if c["mode"] == "embeddings":
            return x
        kv = self.kv(x).view(len(features), c["prefix_length"], c["layers"], 2, c["kv_heads"], c["head_dim"])
        return kv.permute(2, 3, 0, 4, 1, 5)


def special_ids(lm: Any) -> tuple[int, int, int]:
    """(start, end, pad) token ids of a causal LM bundle: GPT-2 style models reuse end-of-text for all three."""
    tok, cfg = lm.tokenizer, lm.model.config
    eos = tok.eos_token_id if tok.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise LabelerError(f"{lm.path}: the language model has no end-of-text token (eos_token_id), so sentences "
                           "cannot end; give a tokenizer with an eos token")
    bos = tok.bos_token_id if tok.bos_token_id is not None else getattr(cfg, "bos_token_id", None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return int(bos if bos is not None else eos), int(eos), int(pad)


def encode_captions(lm: Any, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] of each caption followed by end-of-text (truncated to max_tokens), and their mask [B, T]."""
    _, eos, pad = special_ids(lm)
    return pad_token_rows(caption_token_rows(lm, captions, max_tokens, eos), pad)


def caption_token_rows(lm: Any, captions: list[str], max_tokens: int, eos: int) -> list[list[int]]:
    """Token ids of each caption (truncated to max_tokens - 1) followed by end-of-text; one tokenizer call."""
    if not captions:
        return []
    got = lm.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    return [list(ids[: max_tokens - 1]) + [eos] for ids in got]


def pad_token_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _cache(lm: Any, kv: torch.Tensor) -> Any:
    """A transformers cache holding a deep prefix [L, 2, B, H, K, Dh] (differentiable: the tensors are used as is)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0], kv[layer, 1], layer)
    return cache


def _out_cache(out: Any) -> Any:
    return getattr(out, "cache", None) or out.past_key_values


def caption_logits(lm: Any, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None,
                   mode: str = "deep") -> torch.Tensor:
    """Logits [B, T, V] predicting each caption token, given a prefix, or (prefix=None) only the start token: the
    language model without a prefix, scored on the same tokens."""
    model = lm.model
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    b = len(ids)
    bos, _, _ = special_ids(lm)
    start = torch.full((b, 1), bos, dtype=torch.long, device=device)
    if prefix is not None and mode == "embeddings":
        emb = model.get_input_embeddings()(ids)
        k = prefix.shape[1]
        attn = torch.cat([torch.ones((b, k), dtype=mask.dtype, device=device), mask], dim=1)
        logits = model(inputs_embeds=torch.cat([prefix.to(emb.dtype), emb], dim=1), attention_mask=attn).logits
        return logits[:, k - 1: -1]  # the last prefix vector predicts the first token
    x = torch.cat([start, ids], dim=1)
    attn = torch.cat([torch.ones((b, 1), dtype=mask.dtype, device=device), mask], dim=1)
    if prefix is None:
        return model(input_ids=x, attention_mask=attn).logits[:, :-1]
    k = prefix.shape[4]
    attn = torch.cat([torch.ones((b, k), dtype=mask.dtype, device=device), attn], dim=1)
    pos = torch.arange(x.shape[1], device=device)[None].expand(b, -1)
    out = model(input_ids=x, attention_mask=attn, position_ids=pos, cache=_cache(lm, prefix), use_cache=True)
    return out.logits[:, :-1]


def caption_loss(lm: Any, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None,
                 mode: str = "deep") -> torch.Tensor:
    """Mean cross-entropy per caption token (end-of-text included)."""
    pred = caption_logits(lm, ids, mask, prefix, mode).float()
    ids, mask = ids.to(pred.device), mask.to(pred.device)
    loss = nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids.reshape(-1), reduction="none")
    m = mask.reshape(-1).float()
    return (loss * m).sum() / m.sum().clamp(min=1)


def new_optimizer(mapper: PrefixMapper, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(mapper.parameters(), lr=lr, weight_decay=1e-4)


def train_steps(lm: Any, mapper: PrefixMapper, optim: torch.optim.Optimizer, features: torch.Tensor,
                pairs: list[tuple[int, str]], *, start: int, steps: int, batch_size: int, lr: float,
                max_tokens: int, seed: int, on_step: Any = None) -> int:
    """Train the mapper (the language model stays frozen) from step `start` to `steps` on (image index, caption)
    pairs; returns the step reached. Batches and the learning rate (linear warm-up, cosine decay) are functions of
    the step and seed, so a run resumed from a checkpoint continues exactly as it would have. `on_step(step, loss)`
    reports, checkpoints and may raise `Cancelled`."""
    device = next(lm.model.parameters()).device
    lm.model.requires_grad_(False)
    mapper.to(device).train()
    per_epoch = max(1, math.ceil(len(pairs) / batch_size))
    warmup = max(1, steps // 20)
    _, eos, pad = special_ids(lm)
    tokens = caption_token_rows(lm, [c for _, c in pairs], max_tokens, eos)  # once, not per step
    step = start
    while step < steps:
        epoch, pos = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(pairs))
        chosen = order[pos * batch_size:(pos + 1) * batch_size]
        ids, mask = pad_token_rows([tokens[j] for j in chosen], pad)
        x = features[torch.tensor([pairs[j][0] for j in chosen])].to(device)
        for g in optim.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
        loss = caption_loss(lm, ids, mask, mapper(x), mapper.mode)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mapper.parameters(), 1.0)
        optim.step()
        step += 1
        if on_step is not None:
            on_step(step, float(loss.detach()))
    mapper.eval()
    return step


# ---- sampling -------------------------------------------------------------------------------------------------

def _pick(logits: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling by inverse CDF with pre-drawn uniforms u [B]; top_p <= 0 is greedy decoding."""
    if top_p <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    keep = (cum - sorted_p) < top_p  # the smallest set whose mass reaches top_p (always the first token)
    cdf = (sorted_p * keep).cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    pos = torch.searchsorted(cdf, u.to(cdf).reshape(-1, 1).contiguous()).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, pos).squeeze(-1)


@torch.no_grad()
def sample_token_ids(lm: Any, prefix: torch.Tensor, n: int, seeds: list[int], top_p: float = 0.9,
                     max_tokens: int = 20, mode: str = "deep") -> list[list[list[int]]]:
    """n sentences per image from its prefix ("embeddings": [B, K, E]; "deep": [L, 2, B, H, K, Dh]), as token ids
    without end-of-text.

    Each image draws its uniforms from its own generator seeded with `seeds[b]`, before decoding: the sentences of
    an image depend on its seed only, not on which other images share its batch.
    """
    model = lm.model
    device = next(model.parameters()).device
    bos, eos, _ = special_ids(lm)
    b = len(seeds)
    u = torch.stack([torch.rand((n, max_tokens), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    u = u.reshape(b * n, max_tokens).to(device)
    rows = b * n
    if mode == "embeddings":
        x = prefix.repeat_interleave(n, dim=0).to(device=device, dtype=model.get_input_embeddings().weight.dtype)
        out = model(inputs_embeds=x, use_cache=True)
        offset = x.shape[1]
    else:
        kv = prefix.repeat_interleave(n, dim=2).to(device=device, dtype=model.get_input_embeddings().weight.dtype)
        start = torch.full((rows, 1), bos, dtype=torch.long, device=device)
        out = model(input_ids=start, position_ids=torch.zeros((rows, 1), dtype=torch.long, device=device),
                    cache=_cache(lm, kv), use_cache=True)
        offset = 1
    tokens = torch.zeros((rows, max_tokens), dtype=torch.long, device=device)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    length = torch.full((rows,), max_tokens, dtype=torch.long, device=device)
    for t in range(max_tokens):
        nxt = _pick(out.logits[:, -1], u[:, t], top_p)
        ended = alive & (nxt == eos)
        length[ended] = t
        alive &= ~ended
        tokens[:, t] = nxt
        if not alive.any() or t == max_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], cache=_out_cache(out), use_cache=True,
                    position_ids=torch.full((rows, 1), offset + t, dtype=torch.long, device=device))
    tokens, length = tokens.cpu(), length.cpu().tolist()
    flat = [tokens[i, : length[i]].tolist() for i in range(rows)]
    return [flat[i * n:(i + 1) * n] for i in range(b)]


def sample_sentences(lm: Any, mapper: PrefixMapper, features: torch.Tensor, n: int, seeds: list[int],
                     top_p: float = 0.9, max_tokens: int = 20) -> list[list[str]]:
    """n decoded sentences for each feature vector [B, D]."""
    device = next(lm.model.parameters()).device
    with torch.no_grad():
        prefix = mapper.to(device)(features.to(device))
    ids = sample_token_ids(lm, prefix, n, seeds, top_p, max_tokens, mapper.mode)
    return [lm.tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in ids]


# ---- counting -------------------------------------------------------------------------------------------------

@dataclass
class SentenceWords:
    """Words of every image's sentences, after textsum's stop-word removal and plural folding."""

    vocabulary: list[str]
    occurrences: Any  # scipy.sparse.csr_matrix [N, V]: how many times image n's sentences use word v
    sentences_with: Any  # scipy.sparse.csr_matrix [N, V]: how many of image n's sentences use word v
    sentences_per_image: int


def count_sentence_words(sentences: list[list[str]]) -> SentenceWords:
    """Per image, word occurrences and the number of its sentences that say each word (`sentences[n]` are the
    sentences of image n, all images with the same count)."""
    import scipy.sparse as sp

    from labelers.textsum import count_words

    per_image = len(sentences[0]) if sentences else 0
    if any(len(s) != per_image for s in sentences):
        raise ValueError("every image needs the same number of sentences")
    flat = [[s] for sents in sentences for s in sents]
    try:
        words = count_words(flat, min_word_images=1, fold_plurals=True)
    except LabelerError:
        raise LabelerError(
            "texplain: the language model's sentences contain no words besides stop-words; train the translator "
            "longer or check that the language model was trained on the dataset's captions") from None
    n = len(sentences)
    owner = sp.csr_matrix((np.ones(len(flat)), (np.repeat(np.arange(n), per_image), np.arange(len(flat)))),
                          shape=(n, len(flat)))
    occurrences = (owner @ words.counts).tocsr()
    said = words.counts.copy()
    said.data = np.ones_like(said.data)
    sentences_with = (owner @ said).tocsr()
    return SentenceWords(words.vocabulary, occurrences, sentences_with, per_image)


def name_words(name: str) -> set[str]:
    """The words of a class or concept name, with a plural and singular form each ("sea lion" -> sea, seas...)."""
    out: set[str] = set()
    for w in re.findall(r"[^\W\d_]{2,}", name.lower()):
        out.add(w)
        out.add(w + "s")
        out.add(w + "es")
        if w.endswith("s"):
            out.add(w[:-1])
    return out


@dataclass
class TranslatorInputs:
    """What the labeler needs besides the layer's activations; `app/language/translator.py` builds it.

    All per-image tensors are index-aligned with the labeler inputs' images.
    """

    mapper: PrefixMapper
    lm: Any  # labelers.textmodels.TextModel of kind "lm": the frozen language model the mapper was trained for
    features: torch.Tensor  # [N, D] float32: the translator layer's pooled features
    layer: str  # the layer the features come from
    classifier_layer: str | None = None  # the layer whose units are the classes (the logits)
    class_names: list[str] | None = None
    predictions: torch.Tensor | None = None  # [N] int64 the classifier's predicted class
    class_labels: torch.Tensor | None = None  # [N] int64 the dataset's class of each image, -1 where unknown
    name: str = ""  # the translator's folder name, recorded with the run


def _group_stats(words: SentenceWords, members: np.ndarray, overall: np.ndarray) -> dict[str, np.ndarray]:
    """frequency, count, lift of every word over the images `members` (index array)."""
    said = np.asarray(words.sentences_with[members].sum(axis=0)).ravel()
    count = np.asarray(words.occurrences[members].sum(axis=0)).ravel()
    freq = said / max(1, len(members) * words.sentences_per_image)
    lift = np.divide(freq, overall, out=np.zeros_like(freq), where=overall > 0)
    return {"frequency": freq, "count": count, "lift": lift, "said": said}


@register
class TExplain(Labeler):
    name = "texplain"
    title = "TExplain: words a frozen language model says about the features"
    paper = ("TExplain 2023, Explaining learned visual features via pre-trained (frozen) language models; "
             "prefix mapping after ClipCap (Mokady et al. 2021)")
    inputs = (Input.POOLED, Input.TRANSLATOR)
    params = (
        Param("sentences", int, 50, "sentences sampled per image (the paper samples many per image; 50 keeps a "
                                    "word said in 10% of sentences within about +-4% per image)", minimum=1),
        Param("top_p", float, 0.9, "nucleus sampling mass: 0.9 keeps the model's plausible words and drops its "
                                   "long tail; 0 decodes greedily (one sentence repeated)", minimum=0.0, maximum=1.0),
        Param("seed", int, 0, "seed of the sampling: the same seed gives the same sentences"),
        Param("max_tokens", int, 24, "longest sentence in tokens", minimum=2),
        Param("top_n", int, 15, "words stored per class or unit (the union of the top by frequency and by lift)",
              minimum=1),
        Param("rank_by", str, "frequency", "order of the stored words: 'frequency' (the paper's most frequent "
                                           "words) or 'lift' (frequency relative to all images)",
              choices=("frequency", "lift")),
        Param("class_images", str, "correct",
              "images summarised per class: 'correct' (predicted as and labelled as the class, the paper's choice; "
              "falls back to predicted when the dataset has no class labels) or 'predicted'",
              choices=("correct", "predicted")),
        Param("unit_images", str, "top",
              "per unit: 'top' counts the sentences of the unit's top-activating images (the default: it reuses the "
              "sentences already sampled per image and stays on the features the translator was trained on); "
              "'isolated' samples from the average feature vector with only this unit raised to its top-image "
              "level (translator layer only; a vector no real image has, so words are less reliable)",
              choices=("top", "isolated")),
        Param("top_images", int, 50, "per unit: how many top-activating images (by mean-pooled activation)",
              minimum=1),
        Param("min_lift", float, 1.5, "spurious-cue report: a word said at least this many times more often for "
                                      "the class than over all images (1.5: clearly class-bound; background words "
                                      "spread evenly over classes sit near 1)", minimum=1.0),
        Param("min_frequency", float, 0.1, "spurious-cue report: a word said in at least this fraction of the "
                                           "class's sentences", minimum=0.0, maximum=1.0),
        Param("said_fraction", float, 0.2, "an image 'says' a word when at least this fraction of its sentences "
                                           "do (for accuracy when said vs not said)", minimum=0.0, maximum=1.0),
        Param("batch_images", int, 32, "images decoded together (memory: batch_images x sentences sequences)",
              minimum=1),
        Param("images_per_class", int, 100,
              "images whose sentences are sampled, per class: a seeded random sample of each class's images "
              "(predicted or labelled as it; the spurious-cue accuracies are over the same sample). 100 images x 50 "
              "sentences gives a word's frequency within about +-0.05 (the spread between images dominates, not "
              "the sentences) at a cost that grows with the classes, not the dataset; 0 samples every image (the "
              "paper's full count). Per unit, every unit's top images are sampled, and this many images per class "
              "(in all, without classes) give the overall frequency the lift divides by",
              minimum=0),
    )

    def run(self, inputs: LabelerInputs, params: dict, progress: Progress) -> LabelingResult:
        tr: TranslatorInputs = inputs.translator
        acts = inputs.pooled("mean")
        n, num_units = acts.shape
        if len(tr.features) != n:
            raise LabelerError(f"texplain: the translator has features for {len(tr.features)} images but "
                               f"{inputs.layer} has activations for {n}; train the translator again on this dataset")
        class_mode = tr.classifier_layer is not None and inputs.layer == tr.classifier_layer
        if class_mode and tr.predictions is None:
            raise LabelerError("texplain: per-class words need the classifier's predictions; train the translator "
                               "again with the classifier layer found")
        isolated = not class_mode and params["unit_images"] == "isolated"
        if isolated and inputs.layer != tr.layer:
            raise LabelerError(f"texplain: unit_images='isolated' needs the translator's own layer ({tr.layer}), "
                               f"not {inputs.layer}; use unit_images='top' or label {tr.layer}")
        if isolated:  # sentences of made-up feature vectors only: no image's sentences are needed
            labels = self._isolated(tr, acts, num_units, params, progress)
            return LabelingResult(labels, {"mode": "units", "unit_images": "isolated", "translator": tr.name,
                                           "translator_layer": tr.layer, "images": n,
                                           "sentences_per_image": params["sentences"]})

        per_class = params["images_per_class"]
        top = None
        if not class_mode:
            k = min(params["top_images"], n)
            top = torch.topk(acts.float().cpu(), k=k, dim=0).indices.numpy()  # [k, U]
        if class_mode:
            rows = np.unique(np.concatenate([*self._class_samples(tr, num_units, params).values(),
                                             np.zeros(0, np.int64)]))
        elif per_class:
            rows = self._overall_sample(tr, n, params)
            rows = np.union1d(rows, top.ravel())
        else:
            rows = np.arange(n)
        if not len(rows):
            raise LabelerError("texplain: no image to sample sentences for (no image is predicted as any class)")
        words = self._image_words(tr, params, progress, rows)
        # words are counted for `rows` only; pos maps a dataset image to its row of the counts
        pos = np.full(n, -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        baseline = pos[self._overall_sample(tr, n, params)] if not class_mode and per_class else np.arange(len(rows))
        overall_all = _group_stats(words, baseline, np.ones(len(words.vocabulary)))["frequency"]
        labels: list[Label] = []
        summary: dict[str, Any] = {"mode": "classes" if class_mode else "units", "translator": tr.name,
                                   "translator_layer": tr.layer, "vocabulary_size": len(words.vocabulary),
                                   "images": n, "images_sampled": len(rows),
                                   "images_per_class": per_class, "sentences_per_image": words.sentences_per_image}
        if class_mode:
            labels, report = self._classes(tr, words, overall_all, num_units, params, pos)
            summary["spurious"] = report
            summary.update({k: params[k] for k in ("min_lift", "min_frequency", "said_fraction")})
            summary["class_images"] = params["class_images"] if tr.class_labels is not None else "predicted"
        else:
            k = top.shape[0]
            for unit in range(num_units):
                stats = _group_stats(words, pos[top[:, unit]], overall_all)
                labels += self._labels(unit, words.vocabulary, stats, params, {"images": k})
        return LabelingResult(labels, summary)

    # -- per image sentences
    def _image_words(self, tr: TranslatorInputs, params: dict, progress: Progress,
                     rows: np.ndarray) -> SentenceWords:
        """Words of the sentences of the images `rows` (in that order). An image's seed is its dataset index, so
        its sentences are the same whichever sample it is part of."""
        n = len(rows)
        batch = params["batch_images"]
        sentences: list[list[str]] = []
        for s in range(0, n, batch):
            progress.update(s, n, f"sampling sentences ({n} images x {params['sentences']})")
            chunk = rows[s:s + batch]
            seeds = [params["seed"] * 1_000_003 + int(i) for i in chunk]
            sentences += sample_sentences(tr.lm, tr.mapper, tr.features[torch.from_numpy(chunk)], params["sentences"],
                                          seeds, params["top_p"], params["max_tokens"])
        progress.update(n, n, "counting words")
        return count_sentence_words(sentences)

    @staticmethod
    def _class_groups(tr: TranslatorInputs, num_units: int, params: dict) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per class: the images whose words describe it (predicted as it, and labelled as it when the dataset
        says and class_images is 'correct'), and the images labelled as it (None without labels)."""
        pred = tr.predictions.cpu().numpy()
        truth = tr.class_labels.cpu().numpy() if tr.class_labels is not None else None
        out = []
        for c in range(num_units):
            members = pred == c
            if truth is not None and params["class_images"] == "correct":
                members &= truth == c
            out.append((np.flatnonzero(members), np.flatnonzero(truth == c) if truth is not None else None))
        return out

    def _class_samples(self, tr: TranslatorInputs, num_units: int, params: dict) -> dict[int, np.ndarray]:
        """Per class, the images sampled (sorted dataset indices): a seeded random `images_per_class` of the
        class's group and labelled images together, or all of them."""
        per_class = params["images_per_class"]
        out = {}
        for c, (members, labelled) in enumerate(self._class_groups(tr, num_units, params)):
            pool = members if labelled is None else np.union1d(members, labelled)
            if per_class and len(pool) > per_class:
                pool = np.sort(np.random.default_rng([params["seed"], c]).choice(pool, per_class, replace=False))
            out[c] = pool
        return out

    @staticmethod
    def _overall_sample(tr: TranslatorInputs, n: int, params: dict) -> np.ndarray:
        """Images that stand for all images in a per-unit lift: images_per_class per class (or in all)."""
        classes = len(tr.class_names) if tr.class_names else 1
        m = params["images_per_class"] * classes
        if not m or m >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng([params["seed"], n]).choice(n, m, replace=False))

    def _labels(self, unit: int, vocab: list[str], stats: dict[str, np.ndarray], params: dict,
                extra: dict[str, Any]) -> list[Label]:
        freq, lift = stats["frequency"], stats["lift"]
        said = freq > 0
        if not said.any():
            return []
        top_n = params["top_n"]
        by_freq = [j for j in np.argsort(-freq, kind="stable") if said[j]][:top_n]
        # a word said once in a small group has a huge lift by chance: rank lift among words said in >= 5%
        lift_ok = said & (freq >= 0.05)
        by_lift = [j for j in np.argsort(-lift, kind="stable") if lift_ok[j]][:top_n]
        freq_rank = {int(j): r + 1 for r, j in enumerate(np.argsort(-freq, kind="stable"))}
        lift_rank = {int(j): r + 1 for r, j in enumerate(by_lift)}
        chosen = list(dict.fromkeys([int(j) for j in by_freq] + [int(j) for j in by_lift]))
        key = (lambda j: (-freq[j], j)) if params["rank_by"] == "frequency" else (
            lambda j: (lift_rank.get(j, 10**9), -freq[j]))
        chosen.sort(key=key)
        out = []
        for rank, j in enumerate(chosen, 1):
            out.append(Label(
                unit=unit, rank=rank, text=vocab[j],
                score=float(freq[j] if params["rank_by"] == "frequency" else lift[j]),
                extra={"frequency": float(freq[j]), "count": int(stats["count"][j]), "lift": float(lift[j]),
                       "frequency_rank": freq_rank[j], "lift_rank": lift_rank.get(j), **extra},
            ))
        return out

    # -- per class
    def _classes(self, tr: TranslatorInputs, words: SentenceWords, overall: np.ndarray, num_units: int,
                 params: dict, pos: np.ndarray) -> tuple[list[Label], list[dict[str, Any]]]:
        pred = tr.predictions.cpu().numpy()
        names = tr.class_names or [str(c) for c in range(num_units)]
        groups = self._class_groups(tr, num_units, params)
        samples = self._class_samples(tr, num_units, params)
        per_image = words.sentences_per_image
        # [N, V] fraction of each image's sentences that say the word
        said_frac = words.sentences_with.multiply(1.0 / per_image).tocsc()
        index = {w: j for j, w in enumerate(words.vocabulary)}
        labels: list[Label] = []
        report: list[dict[str, Any]] = []
        for c in range(num_units):
            group, labelled_all = groups[c]
            idx = np.intersect1d(group, samples[c])
            name = names[c] if c < len(names) else str(c)
            if not len(idx):
                report.append({"class": c, "name": name, "images": 0, "images_in_class": len(group), "words": []})
                continue
            stats = _group_stats(words, pos[idx], overall)
            own = name_words(name)
            class_labels = self._labels(c, words.vocabulary, stats, params, {"images": len(idx),
                                                                              "class": name})
            cues = []
            labelled = np.intersect1d(labelled_all, samples[c]) if labelled_all is not None else None
            for lab in class_labels:
                j = index[lab.text]
                lab.extra["own_word"] = lab.text in own
                if lab.text in own:
                    continue
                flagged = stats["frequency"][j] >= params["min_frequency"] and stats["lift"][j] >= params["min_lift"]
                entry: dict[str, Any] = {"word": lab.text, "frequency": float(stats["frequency"][j]),
                                         "lift": float(stats["lift"][j]), "flagged": bool(flagged)}
                if labelled is not None and len(labelled):
                    frac = said_frac[pos[labelled], j].toarray().ravel()
                    said = frac >= params["said_fraction"]
                    right = pred[labelled] == c
                    entry.update(
                        images_said=int(said.sum()), images_not_said=int((~said).sum()),
                        accuracy_said=float(right[said].mean()) if said.any() else None,
                        accuracy_not_said=float(right[~said].mean()) if (~said).any() else None)
                lab.extra.update({k: v for k, v in entry.items() if k != "word"})
                lab.extra["spurious"] = lab.extra.pop("flagged")
                cues.append(entry)
            labels += class_labels
            report.append({"class": c, "name": name, "images": len(idx), "images_in_class": len(group),
                           "accuracy": float((pred[labelled] == c).mean()) if labelled is not None and len(labelled)
                           else None,
                           "words": sorted(cues, key=lambda e: -e["frequency"])})
        return labels, report

    # -- per unit, isolated
    def _isolated(self, tr: TranslatorInputs, acts: torch.Tensor, num_units: int,
                  params: dict, progress: Progress) -> list[Label]:
        feats = tr.features.float()
        mean = feats.mean(0)
        k = min(params["top_images"], len(feats))
        top = torch.topk(acts.float().to(feats.device), k=k, dim=0).indices  # [k, U]
        level = feats.gather(0, top).mean(0)  # [U] each unit's mean over its own top images
        n = params["sentences"]
        seed0 = params["seed"] * 1_000_003 + len(feats) + 7
        base = sample_sentences(tr.lm, tr.mapper, mean[None], n, [seed0], params["top_p"], params["max_tokens"])
        batch = max(1, params["batch_images"])
        sents: list[list[str]] = []
        for s in range(0, num_units, batch):
            progress.update(s, num_units, "sampling from isolated units")
            units = torch.arange(s, min(s + batch, num_units))
            x = mean.repeat(len(units), 1)
            x[torch.arange(len(units)), units] = level[units]
            sents += sample_sentences(tr.lm, tr.mapper, x, n, [seed0 + 1 + int(u) for u in units], params["top_p"],
                                      params["max_tokens"])
        unit_words = count_sentence_words(base + sents)
        base_freq = np.asarray(unit_words.sentences_with[0].todense()).ravel() / n
        # lift against the average image's own sentences: what raising the unit adds
        base_freq = np.where(base_freq > 0, base_freq, 1.0 / n)
        labels: list[Label] = []
        for unit in range(num_units):
            stats = _group_stats(unit_words, np.array([unit + 1]), base_freq)
            labels += self._labels(unit, unit_words.vocabulary, stats, params,
                                   {"images": 0, "level": float(level[unit])})
        return labels


def heldout_loss(lm: Any, mapper: PrefixMapper | None, features: torch.Tensor, captions: list[str],
                 max_tokens: int, batch: int = 256) -> float:
    """Mean per-token caption loss over (feature, caption) pairs, with the mapper's prefix or (mapper=None)
    without a prefix; token-weighted so both figures score exactly the same tokens."""
    total, tokens = 0.0, 0
    device = next(lm.model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(captions), batch):
            ids, mask = encode_captions(lm, captions[s:s + batch], max_tokens)
            prefix = None if mapper is None else mapper.to(device)(features[s:s + batch].to(device))
            m = int(mask.sum())
            total += float(caption_loss(lm, ids, mask, prefix, mapper.mode if mapper else "deep")) * m
            tokens += m
    return total / max(1, tokens) if tokens else math.nan
