"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023): name units with the concepts that CLIP sees in their top images.

1. P[i, t] = cosine similarity of CLIP's embedding of probe image i and of concept word t (the bare word, as the
   reference code encodes it).
2. p(t | x_i) = softmax over concepts of a * P[i, :], a = 10.
3. soft-WPMI: for unit u with top images x_1..x_k (k = 100, by pooled activation), weights
   w_j = p_start - (j / k)(p_start - p_end), j = 0..k-1 (0.998 falling linearly towards 0.97),
       log p(t | u) = sum_j log(1 + w_j (p(t | x_j) - 1))
       log p(t)     = logsumexp_u log p(t | u) - log U        (over all units of the layer)
       score(u, t)  = log p(t | u) - lambda log p(t)
   which is what `similarity.soft_wpmi` of the reference (Trustworthy-ML-Lab/CLIP-dissect) computes, including its
   1e-7 floor inside the logarithm.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from labelers.base import (
    Input,
    Label,
    Labeler,
    LabelerError,
    LabelerInputs,
    LabelingResult,
    NullProgress,
    Param,
    Progress,
    register,
    unit_chunks,
)

log = logging.getLogger(__name__)

DEFAULT_VOCABULARY = Path(__file__).resolve().parent.parent / "resources" / "vocab" / "words.txt"
# The reference adds this inside log() so a concept with p(t | x) = 0 in a weight-1 image stays finite.
MIN_PROB = 1e-7
# Bytes of one [units, k, concepts] float32 block of soft_wpmi; two temporaries of that size exist at once.
CHUNK_BYTES = 128 * 2**20

ImageBatches = Callable[[int], Iterator[tuple[torch.Tensor, list[Any]]]]


def example_weights(k: int, p_start: float = 0.998, p_end: float = 0.97) -> torch.Tensor:
    """[k] weight of the j-th strongest image: linear from p_start, stepping (p_start - p_end) / k per rank."""
    return p_start - torch.arange(k, dtype=torch.float64) / k * (p_start - p_end)


def soft_wpmi_terms(
    activations: torch.Tensor,
    p_concept_given_image: torch.Tensor,
    top_k: int = 100,
    p_start: float = 0.998,
    p_end: float = 0.97,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (log p(t | u) [U, T], log p(t) [T]) of soft-WPMI; see the module docstring.

    `activations` is [N, U] (one value per image and unit), `p_concept_given_image` is [N, T] with rows summing to
    one. Computed on the device of `p_concept_given_image`, in float32 as the reference, chunked over units.
    """
    progress = progress or NullProgress()
    n, num_units = activations.shape
    if p_concept_given_image.shape[0] != n:
        raise LabelerError(
            f"clip_dissect: {n} images have activations but {p_concept_given_image.shape[0]} have CLIP similarities"
        )
    device = p_concept_given_image.device
    probs = p_concept_given_image.to(torch.float32)
    t = probs.shape[1]
    k = min(top_k, n)
    if k < top_k:
        log.warning("clip_dissect: only %d probe images; using all of them as each unit's top images", n)
    top = torch.topk(activations.to(device=device, dtype=torch.float32), k=k, dim=0).indices.T  # [U, k]
    w = example_weights(k, p_start, p_end).to(device=device, dtype=torch.float32)[None, :, None]
    chunk = max(1, CHUNK_BYTES // max(1, k * t * 4))
    log_p_t_u = torch.empty(num_units, t, dtype=torch.float32, device=device)
    for sl in unit_chunks(num_units, chunk):
        gathered = probs[top[sl]]  # [c, k, T]
        log_p_t_u[sl] = torch.log1p(w * (gathered - 1.0) + MIN_PROB).sum(dim=1)
        progress.update(sl.stop, num_units, "soft-WPMI")
    log_p_t = torch.logsumexp(log_p_t_u, dim=0) - math.log(num_units)
    return log_p_t_u, log_p_t


def soft_wpmi(
    activations: torch.Tensor,
    p_concept_given_image: torch.Tensor,
    top_k: int = 100,
    p_start: float = 0.998,
    p_end: float = 0.97,
    lam: float = 1.0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """[U, T] soft-WPMI score log p(t | u) - lam * log p(t) of every unit and concept."""
    log_p_t_u, log_p_t = soft_wpmi_terms(activations, p_concept_given_image, top_k, p_start, p_end, progress)
    return log_p_t_u - lam * log_p_t[None, :]


def _load_clip(clip_dir: Path, device: torch.device):
    """(model, tokenizer, image processor) of a local CLIP folder: one trained in the app (its own tokenizer) or a
    brought one; validated and loaded by `labelers.textmodels` (no remote code, safetensors or weights_only)."""
    from labelers.textmodels import load

    tm = load(Path(clip_dir), "clip", device)
    if tm.image_processor is None:
        raise LabelerError(
            f"{clip_dir}: the CLIP folder has no image processor (preprocessor_config.json); save the model's "
            "processor into the same folder, or train a dual encoder in the app: "
            "neuron-studio language train PROJECT --kind clip"
        )
    return tm.model, tm.tokenizer, tm.image_processor


def _features(out: Any) -> torch.Tensor:
    # transformers 4 returns the projected embedding; transformers 5 a model output holding it as pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def encode_texts(
    model, tokenizer, texts: Sequence[str], device: torch.device, batch_size: int = 256,
    progress: Progress | None = None,
) -> torch.Tensor:
    """[T, D] L2-normalised CLIP text embeddings of the bare texts (the reference uses no prompt template)."""
    progress = progress or NullProgress()
    max_len = int(model.config.text_config.max_position_embeddings)
    out = []
    for start in range(0, len(texts), batch_size):
        tok = tokenizer(
            list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=max_len,
            return_tensors="pt",
        ).to(device)
        feats = _features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        progress.update(min(start + batch_size, len(texts)), len(texts), "encoding concepts with CLIP")
    return torch.cat(out)


@torch.no_grad()
def clip_similarity(
    images: ImageBatches | Iterable[tuple[torch.Tensor, list[Any]]],
    texts: Sequence[str],
    clip_dir: Path,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    progress: Progress | None = None,
    num_images: int | None = None,
    only: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, T] float32 cosine similarity of every probe image with every text, computed with a local CLIP model.

    `images` is either the dataset's batch callable (called with `batch_size`) or an iterable of (indices [B],
    list of B PIL images); rows are placed by index. N is `num_images`, or one past the largest index seen.
    With `only` (image indices), just those images go through CLIP and row r of the result is image `only[r]`.
    """
    progress = progress or NullProgress()
    device = torch.device(device)
    model, tokenizer, image_processor = _load_clip(Path(clip_dir), device)
    text_feats = encode_texts(model, tokenizer, texts, device, max(batch_size, 256), progress)

    position: torch.Tensor | None = None
    if only is not None:
        only = torch.as_tensor(only, dtype=torch.int64).cpu()
        size = num_images if num_images is not None else int(only.max()) + 1 if len(only) else 0
        position = torch.full((size,), -1, dtype=torch.int64)
        position[only] = torch.arange(len(only))
    batches = images(batch_size) if callable(images) else images
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen = 0
    for indices, pil_images in batches:
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        seen += len(indices)
        if position is not None:
            inside = indices < len(position)
            pick = torch.zeros(len(indices), dtype=torch.bool)
            pick[inside] = position[indices[inside]] >= 0
            pil_images = [im for im, keep in zip(pil_images, pick.tolist()) if keep]
            indices = position[indices[pick]]
        if len(pil_images) > 0:
            pixels = image_processor(images=[im.convert("RGB") for im in pil_images], return_tensors="pt")[
                "pixel_values"
            ]
            feats = _features(model.get_image_features(pixel_values=pixels.to(device=device, dtype=model.dtype)))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            rows.append((indices, (feats @ text_feats.T).cpu()))
        progress.update(seen, max(num_images or 0, seen), "encoding probe images with CLIP")
    if only is not None:
        n = len(only)
    elif num_images is not None:
        n = num_images
    else:
        n = int(max((int(ix.max()) for ix, _ in rows), default=-1)) + 1
    if n == 0 or not rows:
        raise LabelerError("clip_dissect: the dataset yielded no images; check that its image files are on disk")
    sim = torch.full((n, len(texts)), float("nan"), dtype=torch.float32)
    for ix, block in rows:
        sim[ix] = block
    missing = int(torch.isnan(sim[:, 0]).sum()) if len(texts) else 0
    if missing:
        raise LabelerError(
            f"clip_dissect: {missing} of the {n} images needed were not yielded by the dataset; check that every "
            "image file of the dataset is on disk"
        )
    return sim


def concept_probabilities_(similarity: torch.Tensor, a: float = 10.0, rows_per_step: int = 4096) -> torch.Tensor:
    """p(t | x) = softmax_t(a * P[x, t]), written over `similarity` row block by row block to spare memory."""
    for start in range(0, similarity.shape[0], rows_per_step):
        block = similarity[start : start + rows_per_step]
        block.copy_(torch.softmax(a * block, dim=1))
    return similarity


def read_vocabulary(path: Path) -> list[str]:
    """Concepts of a text file, one per line; '#' lines and blank lines are skipped, duplicates dropped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelerError(
            f"{path}: the concept vocabulary cannot be read ({exc}); give vocabulary=default, vocabulary=dataset, "
            "or the path of a UTF-8 text file with one concept per line"
        ) from None
    words = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    words = list(dict.fromkeys(words))
    if not words:
        raise LabelerError(f"{path}: the concept vocabulary is empty; write one concept per line")
    return words


@register
class ClipDissect(Labeler):
    name = "clip_dissect"
    title = "CLIP-Dissect"
    paper = (
        "Oikarinen & Weng 2023, CLIP-Dissect: Automatic Description of Neuron Representations in Deep Vision "
        "Networks (ICLR)"
    )
    inputs = (Input.POOLED, Input.IMAGES, Input.CLIP_MODEL)
    params = (
        Param("pooling", str, "mean", "per-image activation of a unit: spatial mean (the paper) or max",
              choices=("mean", "max")),
        Param("vocabulary", str, "default",
              "concepts: 'default' (20k common words), 'dataset' (the dataset's concepts) or a text file path"),
        Param("top_k_images", int, 100, "a unit's most activating images used by soft-WPMI", minimum=1),
        Param("p_start", float, 0.998, "soft-WPMI weight of the unit's top image", minimum=0.0, maximum=1.0),
        Param("p_end", float, 0.97, "soft-WPMI weight the linear schedule falls towards at the k-th image",
              minimum=0.0, maximum=1.0),
        Param("lambda", float, 1.0, "weight of the concept prior log p(t) subtracted from log p(t|unit)", minimum=0.0),
        Param("a", float, 10.0, "softmax scale a of p(concept|image) = softmax(a * CLIP similarity)", minimum=0.0),
        Param("batch_size", int, 64, "images per CLIP forward pass", minimum=1),
        Param("top_n", int, 5, "concepts reported per unit", minimum=1),
    )

    def concepts_for(self, inputs: LabelerInputs, vocabulary: str) -> tuple[list[str], list[str]]:
        """(concept texts, their categories) of the chosen vocabulary."""
        if vocabulary == "default":
            words = read_vocabulary(DEFAULT_VOCABULARY)
            return words, ["word"] * len(words)
        if vocabulary == "dataset":
            if not inputs.concepts:
                raise LabelerError(
                    "clip_dissect: vocabulary=dataset, but the dataset has no concept names; use vocabulary=default "
                    "or a text file with one concept per line"
                )
            seen: dict[str, str] = {}
            for c in inputs.concepts:
                seen.setdefault(c.name, c.category)
            return list(seen), list(seen.values())
        words = read_vocabulary(Path(vocabulary).expanduser())
        return words, [""] * len(words)

    def run(self, inputs: LabelerInputs, params: dict, progress: Progress) -> LabelingResult:
        inputs.require(self.name, *self.inputs)
        assert inputs.images is not None and inputs.clip_model is not None  # for the type checker: required above
        acts = inputs.pooled(params["pooling"])
        n, num_units = acts.shape
        texts, categories = self.concepts_for(inputs, params["vocabulary"])
        # Only images among some unit's top k enter soft-WPMI, and p(t | x) of an image depends on that image
        # alone, so the others need no CLIP pass; the result is the same as encoding every image.
        k = min(params["top_k_images"], n)
        used = torch.topk(acts.to(torch.float32), k=k, dim=0).indices.unique()
        sim = clip_similarity(
            inputs.images, texts, inputs.clip_model, inputs.device, params["batch_size"], progress,
            num_images=n, only=used,
        )
        p_t_x = concept_probabilities_(sim.to(inputs.device), params["a"])
        log_p_t_u, log_p_t = soft_wpmi_terms(
            acts[used.to(acts.device)], p_t_x, params["top_k_images"], params["p_start"], params["p_end"], progress
        )
        scores = log_p_t_u - params["lambda"] * log_p_t[None, :]
        top_n = min(params["top_n"], len(texts))
        vals, idx = torch.topk(scores, k=top_n, dim=1)
        parts = log_p_t_u.gather(1, idx)
        vals, idx, parts = vals.cpu().tolist(), idx.cpu().tolist(), parts.cpu().tolist()
        prior = log_p_t.cpu().tolist()
        labels = [
            Label(
                unit=u,
                rank=r + 1,
                text=texts[j],
                score=float(vals[u][r]),
                category=categories[j] or None,
                extra={"log_p_concept_given_unit": float(parts[u][r]), "log_p_concept": float(prior[j])},
            )
            for u in range(num_units)
            for r, j in enumerate(idx[u])
        ]
        vocab_name = params["vocabulary"] if params["vocabulary"] in ("default", "dataset") else str(
            Path(params["vocabulary"]).expanduser()
        )
        return LabelingResult(
            labels,
            summary={
                "vocabulary": vocab_name,
                "num_concepts": len(texts),
                "num_images": n,
                "top_k_images_used": k,
                "images_encoded": int(len(used)),
                "clip_model": str(inputs.clip_model),
                "score": "soft-WPMI: log p(t|unit) - lambda log p(t)",
            },
        )
