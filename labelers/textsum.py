"""Caption-word summaries of units (Guo, Anderson, Pearson & Farrell 2018, "Neural Network Interpretation via
Fine Grained Textual Summarization", arXiv:1805.08969).

Each unit gets a distribution over caption words by Bayesian marginalisation with the image as latent variable:

    p(w | u) = sum_x p(w | x) p(x | u),    p(x | u) = p(u | x) p(x) / p(u)

- p(w | x): the bag of words of all captions of image x (lower-cased, English stop-words removed, simple plurals
  folded onto their singular), normalised to sum to one over the vocabulary.
- p(u | x): how strongly the unit fires on x, i.e. its pooled activation (shifted to be non-negative), with a
  uniform p(x) over captioned images; optionally only the unit's `top_images` strongest images keep their weight.

Words are ranked by p(w | u) (the paper's attribute distribution); `contrast="pmi"` ranks by the pointwise mutual
information log p(w | u) - log p(w) instead, where p(w) = sum_x p(w | x) p(x) is the dataset's word prior, which
demotes words that every caption uses ("image", "picture").
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    unit_chunks,
)

log = logging.getLogger(__name__)

# Alphabetic tokens of two or more letters: digits and punctuation carry no attribute.
TOKEN_PATTERN = r"(?u)\b[^\W\d_]{2,}\b"


@dataclass
class WordCounts:
    """Caption words per image after stop-word removal, plural folding and the document-frequency filter."""

    vocabulary: list[str]
    counts: Any  # scipy.sparse.csr_matrix [N, V] float64: occurrences of word v in the captions of image n
    images_with_word: np.ndarray  # [V] int64


def _plural_targets(vocabulary: list[str]) -> dict[str, str]:
    """Map a plural to its singular only when the singular also occurs, so that "glass" or "bus" stay whole."""
    vocab = set(vocabulary)
    target: dict[str, str] = {}
    for w in vocabulary:
        if len(w) > 4 and w.endswith("ies") and w[:-3] + "y" in vocab:
            target[w] = w[:-3] + "y"
        elif len(w) > 3 and w.endswith("es") and w[:-2] in vocab and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
            target[w] = w[:-2]
        elif len(w) > 3 and w.endswith("s") and not w.endswith("ss") and w[:-1] in vocab:
            target[w] = w[:-1]
    # A target may itself have been folded; follow chains so that every word maps to a word that is kept.
    for w in list(target):
        seen = {w}
        t = target[w]
        while t in target and t not in seen:
            seen.add(t)
            t = target[t]
        target[w] = t
    return target


def count_words(captions: list[list[str]], min_word_images: int = 1, fold_plurals: bool = True) -> WordCounts:
    """[N, V] word counts of each image's captions taken together."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer

    docs = [" ".join(c for c in caps if c) for caps in captions]
    vectorizer = CountVectorizer(lowercase=True, stop_words="english", token_pattern=TOKEN_PATTERN)
    try:
        counts = vectorizer.fit_transform(docs).tocsr().astype(np.float64)
    except ValueError:  # sklearn refuses an empty vocabulary (every caption was stop-words only)
        raise LabelerError(
            "textsum: the captions contain no words besides stop-words; provide captions that describe the images"
        ) from None
    vocabulary = list(vectorizer.get_feature_names_out())

    if fold_plurals:
        target = _plural_targets(vocabulary)
        kept = [w for w in vocabulary if w not in target]
        new_index = {w: i for i, w in enumerate(kept)}
        cols = np.array([new_index[target.get(w, w)] for w in vocabulary], dtype=np.int64)
        fold = sp.csr_matrix(
            (np.ones(len(vocabulary)), (np.arange(len(vocabulary)), cols)), shape=(len(vocabulary), len(kept))
        )
        counts = (counts @ fold).tocsr()
        vocabulary = kept

    images_with_word = np.asarray((counts > 0).sum(axis=0)).ravel().astype(np.int64)
    keep = np.flatnonzero(images_with_word >= min_word_images)
    counts = counts[:, keep].tocsr()
    return WordCounts([vocabulary[i] for i in keep], counts, images_with_word[keep])


def _to_torch_sparse(m, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    m = m.tocoo()
    indices = torch.from_numpy(np.vstack([m.row, m.col]).astype(np.int64))
    t = torch.sparse_coo_tensor(indices, torch.from_numpy(m.data).to(dtype), size=m.shape, check_invariants=False)
    return t.coalesce().to(device)


def image_given_unit(activations: torch.Tensor, valid_images: torch.Tensor, top_images: int = 0) -> torch.Tensor:
    """[N, U] p(x | u): each unit's non-negative activations over the valid images, normalised per unit.

    A unit with negative values is shifted by its minimum, so its weakest response weighs zero (a ReLU unit is left
    as it is). With `top_images` > 0 only the unit's strongest images keep their weight. A unit that never fires
    above its floor gets an all-zero column.
    """
    a = activations.to(torch.float64)
    a = a.masked_fill(~valid_images[:, None], float("-inf"))
    floor = a.masked_fill(~valid_images[:, None], float("inf")).amin(dim=0, keepdim=True).clamp(max=0.0)
    w = (a - floor).clamp(min=0.0).nan_to_num(nan=0.0, neginf=0.0)
    n_valid = int(valid_images.sum())
    if 0 < top_images < n_valid:
        idx = torch.topk(a, k=top_images, dim=0).indices
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(0, idx, True)
        w = w * keep
    total = w.sum(dim=0, keepdim=True)
    return torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))


@register
class TextSummary(Labeler):
    name = "textsum"
    title = "Caption-word summary"
    paper = (
        "Guo, Anderson, Pearson & Farrell 2018, Neural Network Interpretation via Fine Grained Textual Summarization "
        "(arXiv:1805.08969)"
    )
    inputs = (Input.POOLED, Input.CAPTIONS)
    params = (
        Param("pooling", str, "max", "per-image activation of a unit: spatial max or mean", choices=("max", "mean")),
        Param(
            "top_images", int, 0, "only each unit's N strongest images weigh in p(image|unit) (0 = all images)",
            minimum=0,
        ),
        Param(
            # Default 'pmi': ranked by the plain marginal, a word in half of all captions (a position word in
            # the demo) tops almost every unit; 'none' keeps Guo et al.'s p(word|unit) ranking.
            "contrast", str, "pmi",
            "rank words by log p(word|unit) - log p(word) ('pmi') or by p(word|unit) alone ('none')",
            choices=("none", "pmi"),
        ),
        Param("min_word_images", int, 3, "ignore words that occur in the captions of fewer images", minimum=1),
        Param("fold_plurals", bool, True, "count a plural ('circles') as its singular when the singular occurs"),
        Param("top_n", int, 10, "words reported per unit", minimum=1),
    )

    # Units per matrix product; bounds the [V, chunk] block of p(word | unit).
    unit_chunk: int = 512

    def run(self, inputs: LabelerInputs, params: dict, progress: Progress) -> LabelingResult:
        import scipy.sparse as sp

        acts = inputs.pooled(params["pooling"])
        captions = inputs.captions or []
        n, num_units = acts.shape
        if len(captions) != n:
            raise LabelerError(
                f"textsum: the dataset has captions for {len(captions)} images but {inputs.layer} has activations "
                f"for {n}; extract the layer again on the same dataset"
            )
        device = inputs.device
        progress.update(0, num_units, "counting caption words")
        words = count_words(captions, params["min_word_images"], params["fold_plurals"])
        vocab_size = len(words.vocabulary)
        if vocab_size == 0:
            raise LabelerError(
                f"textsum: no caption word occurs in at least {params['min_word_images']} images; "
                "lower min_word_images"
            )

        dtype = torch.float64 if device.type == "cpu" else torch.float32
        row_totals = np.asarray(words.counts.sum(axis=1)).ravel()
        valid = torch.from_numpy(row_totals > 0).to(device)
        inv = np.divide(1.0, row_totals, out=np.zeros_like(row_totals), where=row_totals > 0)
        word_given_image = sp.diags(inv) @ words.counts  # [N, V] rows sum to one (or zero without words)
        p_word = np.asarray(word_given_image.sum(axis=0)).ravel() / max(int((row_totals > 0).sum()), 1)
        # transposed so one sparse @ dense product gives [V, units] for a chunk of units
        wx_t = _to_torch_sparse(word_given_image.T, device, dtype)
        p_word_t = torch.from_numpy(p_word).to(device=device, dtype=dtype)
        log_p_word = torch.log(p_word_t)

        p_x_given_u = image_given_unit(acts.to(device), valid, params["top_images"]).to(dtype)
        fired = p_x_given_u.sum(dim=0) > 0
        top_n = min(params["top_n"], vocab_size)
        labels: list[Label] = []
        for chunk in unit_chunks(num_units, self.unit_chunk):
            p_w_u = torch.sparse.mm(wx_t, p_x_given_u[:, chunk].contiguous()).T  # [c, V]
            if params["contrast"] == "pmi":
                score = torch.log(p_w_u) - log_p_word[None, :]
            else:
                score = p_w_u.clone()
            score = score.masked_fill(p_w_u <= 0, float("-inf"))
            vals, idx = torch.topk(score, k=top_n, dim=1)
            probs = p_w_u.gather(1, idx)
            vals, idx, probs = vals.cpu().tolist(), idx.cpu().tolist(), probs.cpu().tolist()
            units = range(chunk.start, chunk.stop)
            fired_chunk = fired[chunk].cpu().tolist()
            for row, unit in enumerate(units):
                if not fired_chunk[row]:
                    continue
                rank = 0
                for v, j, p in zip(vals[row], idx[row], probs[row]):
                    if not math.isfinite(v):
                        break
                    rank += 1
                    labels.append(
                        Label(
                            unit=unit,
                            rank=rank,
                            text=words.vocabulary[j],
                            score=float(v),
                            extra={
                                "p_word_given_unit": float(p),
                                "p_word": float(p_word[j]),
                                "images_with_word": int(words.images_with_word[j]),
                            },
                        )
                    )
            progress.update(chunk.stop, num_units, "summarising units with caption words")

        silent = int((~fired).sum())
        if silent:
            log.info("textsum: %d units of %s never fire above their floor; they get no words", silent, inputs.layer)
        return LabelingResult(
            labels,
            summary={
                "vocabulary_size": vocab_size,
                "images_with_captions": int(valid.sum()),
                "units_without_activation": silent,
                "score": "p(word|unit)" if params["contrast"] == "none" else "log p(word|unit) - log p(word)",
            },
        )
