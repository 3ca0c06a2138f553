"""MILAN (Hernandez et al., ICLR 2022): open-ended natural-language descriptions of units, chosen by weighted
pointwise mutual information between a description and the unit's exemplars.

For unit u:
1. Exemplars E_u: the unit's top k = 15 images, each masked where the unit's map (upsampled to the image) exceeds
   the unit's 0.99 activation quantile. The captioner sees the masked picture: the region as it is, everything else
   darkened to `MASK_DIM` of its brightness (app.imaging.masked_image draws the same picture for people). The
   reference masks the encoder's features instead; a transformers image encoder takes pixels, so we mask those.
2. Candidates: beam search (beam 50, at most 15 description tokens) on p(d | E_u) from the captioner.
   - A set captioner (config `neuron_studio_set_captioner: true`) sees all k exemplars at once: the ViT encoder's
     outputs of the k masked images are concatenated along the sequence axis and the decoder cross-attends to all.
   - An image-level captioner (any other VisionEncoderDecoderModel) runs one beam per exemplar; the candidates are
     the union of those beams, and log p(d | E_u) is the mean over the exemplars of log p(d | masked x_i).
3. Re-ranking: wpmi(d) = log p(d | E_u) - lambda log p(d), lambda = 0.2, where p(d) comes from a causal language
   model. The top 5 by wpmi are the unit's labels; each keeps wpmi, log p(d|E) and log p(d) in its extra data.

Scores are log-probabilities of the description *as text*: each model scores the string with its own tokenizer, as
[start] + tokens(d) + [end], summing the log-probability of every token after the start, the end token included.
The captioner and the language model may tokenize differently; scoring strings keeps both terms about the same d.
A beam path whose tokens are not the captioner tokenizer's own tokenization of its text is scored again from the
text, so every log p(d|E) is that of the canonical tokenization.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from labelers.base import (
    ExemplarBatch,
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
from labelers.textmodels import encoder_tokens

log = logging.getLogger(__name__)

# Brightness kept outside a unit's region in the captioner's picture; the in-app captioner is trained on pictures
# drawn the same way. A captioner folder may say otherwise with `neuron_studio_mask_dim` in its config.json.
MASK_DIM = 0.25
# Rows of one teacher-forced scoring pass (sequences x tokens x vocabulary logits stay near this many floats).
SCORE_FLOATS = 2**25


# ---- the captioner --------------------------------------------------------------------------------------------
@dataclass
class CaptionerParts:
    """What MILAN needs of a captioner bundle, validated once."""

    model: Any  # VisionEncoderDecoderModel
    tokenizer: Any
    image_processor: Any
    device: torch.device
    start_id: int
    end_id: int
    pad_id: int
    set_conditioned: bool
    mask_dim: float
    # a captioner trained on regions shown over a flat grey (the in-app one: labelers.textmodels.mask_pixels) says
    # so with `neuron_studio_mask_fill` (the grey, 0..1); its exemplars are then drawn the same way
    mask_fill: float | None = None


def captioner_parts(captioner: Any) -> CaptionerParts:
    """Check that a `labelers.textmodels.TextModel` of kind "captioner" is one MILAN can decode with."""
    cfg = getattr(captioner, "config", None) or {}
    path = getattr(captioner, "path", "the captioner")
    model = captioner.model
    if cfg.get("model_type") != "vision-encoder-decoder" or not hasattr(model, "encoder") \
            or not hasattr(model, "decoder"):
        raise LabelerError(
            f"{path}: MILAN decodes with a transformers VisionEncoderDecoderModel (image encoder + text decoder); "
            f"this captioner is {cfg.get('model_type')!r}. Train one in the app (neuron-studio language train "
            f"PROJECT --kind captioner) or bring a vision-encoder-decoder folder")
    if captioner.image_processor is None:
        raise LabelerError(f"{path}: the captioner folder has no preprocessor_config.json, so its images cannot be "
                           f"prepared; save its image processor with save_pretrained into the same folder")
    mc = model.config
    dec = getattr(mc, "decoder", None)
    tok = captioner.tokenizer

    def first(*values: Any) -> int | None:
        return next((int(v) for v in values if v is not None), None)

    start = first(getattr(mc, "decoder_start_token_id", None), getattr(dec, "decoder_start_token_id", None),
                  getattr(dec, "bos_token_id", None), tok.bos_token_id)
    end = first(getattr(mc, "eos_token_id", None), getattr(dec, "eos_token_id", None), tok.eos_token_id)
    if start is None or end is None:
        raise LabelerError(f"{path}: the captioner's config names no decoder start token or end token "
                           f"(decoder_start_token_id, eos_token_id); set them in config.json")
    pad = first(getattr(mc, "pad_token_id", None), getattr(dec, "pad_token_id", None), tok.pad_token_id, end)
    dim = float(cfg.get("neuron_studio_mask_dim", MASK_DIM))
    return CaptionerParts(model=model, tokenizer=tok, image_processor=captioner.image_processor,
                          device=torch.device(captioner.device), start_id=start, end_id=end, pad_id=int(pad),
                          set_conditioned=bool(cfg.get("neuron_studio_set_captioner")), mask_dim=dim,
                          mask_fill=None if cfg.get("neuron_studio_mask_fill") is None
                          else float(cfg["neuron_studio_mask_fill"]))


def masked_views(images: torch.Tensor, masks: torch.Tensor, dim: float = MASK_DIM,
                 fill: float | None = None) -> torch.Tensor:
    """[n, S, S, 3] uint8 and [n, S, S] bool -> the captioner's pictures: the region as it is, the rest at `dim`
    (or, with `fill`, the rest a flat grey of that level in 0..1, as the in-app captioner was trained)."""
    if fill is not None:
        return torch.where(masks[..., None], images, torch.full_like(images, round(float(fill) * 255)))
    keep = torch.where(masks[..., None], 1.0, float(dim))
    # truncation, as app.imaging.masked_image draws the same picture
    return (images.float() * keep).clamp(0, 255).to(torch.uint8)


def encode_images(parts: CaptionerParts, pictures: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """[n, S, S, 3] uint8 pictures -> [n, T, D] encoder states, projected to the decoder's width."""
    model = parts.model
    out = []
    with torch.inference_mode():
        for s in range(0, len(pictures), batch):
            arrays = [p.numpy() for p in pictures[s:s + batch].cpu()]
            pixels = parts.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
            states = encoder_tokens(model.encoder, pixels.to(parts.device, dtype=model.dtype))
            out.append(_project(model, states))
    return torch.cat(out)


def _project(model: Any, states: torch.Tensor) -> torch.Tensor:
    # VisionEncoderDecoderModel maps encoder states to the decoder's width when they differ (and the decoder has no
    # cross_attention_hidden_size); its forward does it on every call, we do it once.
    proj = getattr(model, "enc_to_dec_proj", None)
    return proj(states) if proj is not None else states


def _decoder_step(model: Any, ids: torch.Tensor, states: torch.Tensor, cache: Any = None,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    kwargs: dict[str, Any] = {"input_ids": ids, "encoder_hidden_states": states, "use_cache": cache is not False}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if cache is not None and cache is not False:
        kwargs[_cache_kw(model.decoder)] = cache
    out = model.decoder(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits, new_cache


def _cache_kw(module: Any) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _reorder(cache: Any, index: torch.Tensor, resized: bool) -> None:
    """Reorder the decoder's cache after a beam step. Cross-attention keys and values are the same for every
    hypothesis of a row and hypotheses never move between rows, so that (much larger) cache stays put unless the
    beam changed width: reordering it cost three quarters of the time."""
    own = getattr(cache, "self_attention_cache", None)
    (own if own is not None and not resized else cache).reorder_cache(index)


@dataclass
class Beam:
    """Finished hypotheses of one beam search row, best first: token paths (end token excluded) and their summed
    log-probabilities (end token included)."""

    paths: list[list[int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def beam_search(parts: CaptionerParts, states: torch.Tensor, beam: int, max_length: int) -> list[Beam]:
    """Beam search on p(d | states) for each row of `states` [B, L, D], ranked by summed log-probability (no length
    normalisation, as the reference's beam). A finished hypothesis stays in the beam and competes with its final
    score, as in the reference. At most `max_length` description tokens, then the end token: the last step may only
    end a hypothesis, since a cut-off sentence is not a description (and must not hold a place in the beam).
    Special tokens other than the end token are never proposed."""
    model = parts.model
    B = states.shape[0]
    device = states.device
    if B == 0:
        return []
    with torch.inference_mode():
        ids = torch.full((B, 1), parts.start_id, dtype=torch.long, device=device)
        logits, cache = _decoder_step(model, ids, states)
        V = logits.shape[-1]
        banned = torch.zeros(V, dtype=torch.bool, device=device)
        special = [i for i in (getattr(parts.tokenizer, "all_special_ids", None) or []) if 0 <= i < V]
        banned[special] = True
        banned[parts.start_id] = banned[parts.pad_id] = True
        banned[parts.end_id] = False
        only_end = torch.full((V,), -math.inf, device=device)
        only_end[parts.end_id] = 0.0

        def next_logp(logits: torch.Tensor, last: bool) -> torch.Tensor:
            logp = torch.log_softmax(logits.float(), dim=-1).masked_fill(banned, -math.inf)
            return torch.where(only_end > -math.inf, logp, -math.inf) if last else logp

        logp = next_logp(logits[:, -1], max_length == 0)
        w = min(beam, V)
        scores, tok = logp.topk(w, dim=-1)  # [B, w]
        seqs = tok[..., None]
        done = tok == parts.end_id
        cache.batch_repeat_interleave(w)
        rep = states.repeat_interleave(w, dim=0)
        for step in range(1, max_length + 1):
            if bool(done.all()):
                break
            logits, cache = _decoder_step(model, seqs[:, :, -1].reshape(-1, 1), rep, cache)
            logp = next_logp(logits[:, -1], step == max_length).view(B, w, V)
            # A finished hypothesis can only repeat the end token, at no cost: its score stays what it was.
            logp = torch.where(done[..., None], only_end, logp)
            new_w = min(beam, w * V)
            scores, flat = (scores[..., None] + logp).view(B, w * V).topk(new_w, dim=-1)
            parent, tok = flat // V, flat % V
            seqs = torch.cat([seqs.gather(1, parent[..., None].expand(-1, -1, seqs.shape[-1])), tok[..., None]], -1)
            done = done.gather(1, parent) | (tok == parts.end_id)
            _reorder(cache, (parent + (torch.arange(B, device=device) * w)[:, None]).reshape(-1), new_w != w)
            if new_w != w:
                w = new_w
                rep = states.repeat_interleave(w, dim=0)
    seqs_l, scores_l, done_l = seqs.cpu().tolist(), scores.cpu().tolist(), done.cpu().tolist()
    beams = []
    for b in range(B):
        out = Beam()
        for path, score, ok in zip(seqs_l[b], scores_l[b], done_l[b]):
            if ok and math.isfinite(score):
                out.paths.append(path[:path.index(parts.end_id)])
                out.scores.append(float(score))
        beams.append(out)
    return beams


def caption_logprob(parts: CaptionerParts, states: torch.Tensor, rows: Sequence[int],
                    token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
    """Teacher-forced log p(tokens + end | states[rows[i]]) for each i (tokens without start or end): [n] float64."""
    seqs = [list(t) + [parts.end_id] for t in token_lists]
    return _forced_logprob(lambda ids, mask, sl: _decoder_step(parts.model, ids, states[list(rows[sl])], False,
                                                               mask)[0],
                           parts.start_id, parts.pad_id, seqs, states.device, _vocab_size(parts.model.decoder))


def _vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _forced_logprob(forward: Any, start_id: int, pad_id: int, seqs: Sequence[Sequence[int]], device: torch.device,
                    vocab: int) -> torch.Tensor:
    """Sum over positions of log p(seq[t] | start, seq[:t]); `forward(ids, mask, slice)` returns logits."""
    n = len(seqs)
    out = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return out
    longest = max(len(s) for s in seqs) + 1
    step = max(1, SCORE_FLOATS // max(1, longest * vocab))
    with torch.inference_mode():
        for s in range(0, n, step):
            sl = slice(s, min(n, s + step))
            part = seqs[sl]
            width = max(len(x) for x in part) + 1
            ids = torch.full((len(part), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, x in enumerate(part):
                ids[i, 0] = start_id
                ids[i, 1:len(x) + 1] = torch.as_tensor(x, dtype=torch.long)
                mask[i, :len(x) + 1] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = forward(ids, mask, sl)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            got = logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            out[sl] = got.sum(dim=1).double().cpu()
    return out


def canonical_tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def clean_text(tokenizer: Any, path: Sequence[int]) -> str:
    return " ".join(tokenizer.decode(list(path), skip_special_tokens=True).split())


# ---- the language model ---------------------------------------------------------------------------------------
def lm_logprob(lm: Any, texts: Sequence[str]) -> torch.Tensor:
    """log p(d) of each text under a causal LM bundle: [bos] + tokens(d) + [eos], summed after the bos. [n]."""
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    eos = next((int(v) for v in (tok.eos_token_id, getattr(cfg, "eos_token_id", None)) if v is not None), None)
    bos = next((int(v) for v in (tok.bos_token_id, getattr(cfg, "bos_token_id", None)) if v is not None), eos)
    if eos is None or bos is None:
        raise LabelerError(f"{lm.path}: the language model's tokenizer has no end-of-text token, so p(d) of a "
                           f"whole description cannot be computed; give a causal LM with an eos_token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    seqs = [canonical_tokens(tok, t) + [eos] for t in texts]
    device = torch.device(lm.device)
    return _forced_logprob(lambda ids, mask, sl: model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                           bos, int(pad), seqs, device, _vocab_size(model))


# ---- per unit ---------------------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """A unit's candidate descriptions with log p(d | E_u)."""

    texts: list[str]
    log_p_given_e: list[float]
    exemplars: int


def set_candidates(parts: CaptionerParts, states: torch.Tensor, beam: int, max_length: int) -> list[Candidates]:
    """Set captioner: `states` [u, k*T, D], one row per unit."""
    beams = beam_search(parts, states, beam, max_length)
    out: list[Candidates] = []
    rescore: list[tuple[int, int, list[int]]] = []  # (unit, candidate position, canonical tokens)
    for u, b in enumerate(beams):
        cand = Candidates([], [], 0)
        seen: set[str] = set()
        for path, score in zip(b.paths, b.scores):
            text = clean_text(parts.tokenizer, path)
            if not text or text in seen:
                continue
            seen.add(text)
            canon = canonical_tokens(parts.tokenizer, text)
            cand.texts.append(text)
            cand.log_p_given_e.append(score)
            if canon != path:  # the beam took another spelling of this text; score the text itself
                rescore.append((u, len(cand.texts) - 1, canon))
        out.append(cand)
    if rescore:
        vals = caption_logprob(parts, states, [r[0] for r in rescore], [r[2] for r in rescore]).tolist()
        for (u, i, _), v in zip(rescore, vals):
            out[u].log_p_given_e[i] = v
    return out


def image_candidates(parts: CaptionerParts, states: torch.Tensor, present: torch.Tensor, beam: int,
                     max_length: int) -> list[Candidates]:
    """Image-level captioner: `states` [u*k, T, D], `present` [u, k]. One beam per exemplar; the union of the
    beams, best `beam` texts by the score under the exemplar that proposed them, each scored on every exemplar."""
    u, k = present.shape
    pres = present.cpu().tolist()
    rows = [u_ * k + j for u_ in range(u) for j in range(k) if pres[u_][j]]
    beams = dict(zip(rows, beam_search(parts, states[rows], beam, max_length)))
    out: list[Candidates] = []
    score_rows: list[int] = []
    score_tokens: list[list[int]] = []
    spans: list[tuple[int, int, int]] = []  # per unit: start in the score list, number of texts, exemplars
    for u_ in range(u):
        best: dict[str, float] = {}
        mine = [u_ * k + j for j in range(k) if pres[u_][j]]
        for r in mine:
            for path, score in zip(beams[r].paths, beams[r].scores):
                text = clean_text(parts.tokenizer, path)
                if text and score > best.get(text, -math.inf):
                    best[text] = score
        texts = sorted(best, key=lambda t: -best[t])[:beam]
        out.append(Candidates(texts, [], len(mine)))
        spans.append((len(score_rows), len(texts), len(mine)))
        for t in texts:
            canon = canonical_tokens(parts.tokenizer, t)
            score_rows.extend(mine)
            score_tokens.extend([canon] * len(mine))
    vals = caption_logprob(parts, states, score_rows, score_tokens)
    for cand, (start, n, m) in zip(out, spans):
        if n:
            cand.log_p_given_e = vals[start:start + n * m].view(n, m).mean(dim=1).tolist()
    return out


def rerank(cands: Candidates, log_p: Sequence[float], lam: float, top_n: int) -> list[tuple[str, float, float, float]]:
    """(text, wpmi, log p(d|E), log p(d)) of the best `top_n` candidates by wpmi; ties keep the beam's order."""
    rows = [(t, a - lam * b, a, b) for t, a, b in zip(cands.texts, cands.log_p_given_e, log_p)]
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][1], i))
    return [rows[i] for i in order[:top_n]]


@register
class Milan(Labeler):
    name = "milan"
    title = "MILAN"
    paper = ("Hernandez, Schwettmann, Bau, Bagashvili, Torralba & Andreas 2022, Natural Language Descriptions of "
             "Deep Visual Features (ICLR)")
    inputs = (Input.EXEMPLARS, Input.CAPTIONER, Input.CAUSAL_LM)
    params = (
        Param("k", int, 15, "exemplars per unit: the paper's 15 top images; fewer make the description rest on "
                            "a handful of images, more cost time linearly", minimum=1),
        Param("quantile", float, 0.99,
              "activation quantile whose level masks each exemplar (the paper's 0.99: the region the unit fires "
              "on most, still large enough to show an object part); extraction must have stored it",
              minimum=0.0, maximum=1.0),
        Param("lambda", float, 0.2,
              "weight of the prior log p(d) subtracted from log p(d|E): the paper's 0.2 demotes generic "
              "descriptions ('depictions') without promoting rare, unrelated ones; 0 keeps the captioner's order",
              minimum=0.0),
        Param("beam", int, 50, "beam width of the candidate search (paper: 50); re-ranking can only choose among "
                               "the beam, so a narrow beam leaves wpmi little to do", minimum=1),
        Param("max_length", int, 15, "most tokens in a description (paper: 15), the end token not counted",
              minimum=1, maximum=256),
        Param("batch", int, 8, "units decoded together (beam x this many sequences at once); lower it if memory "
                               "runs out, raise it on a GPU", minimum=1),
        Param("top_n", int, 5, "descriptions kept per unit, best wpmi first (paper: 1; the next ones show how "
                               "sure the choice is)", minimum=1),
    )

    def run(self, inputs: LabelerInputs, params: dict, progress: Progress) -> LabelingResult:
        inputs.require(self.name, *self.inputs)
        parts = captioner_parts(inputs.captioner)
        ex = inputs.exemplars
        k, q, lam = params["k"], params["quantile"], params["lambda"]
        units = list(range(inputs.num_units))
        labels: list[Label] = []
        lm_cache: dict[str, float] = {}
        undescribed: list[int] = []
        total = len(units)
        done = 0
        progress.update(0, total, "describing units")
        for eb in _batches(ex, units, k, q, params["batch"]):
            got = self.describe(parts, eb, params)
            texts = list(dict.fromkeys(t for c in got for t in c.texts if t not in lm_cache))
            if texts:
                lm_cache.update(zip(texts, lm_logprob(inputs.causal_lm, texts).tolist()))
            for unit, cands in zip(eb.units.tolist(), got):
                best = rerank(cands, [lm_cache[t] for t in cands.texts], lam, params["top_n"])
                if not best:
                    undescribed.append(unit)
                for r, (text, w, a, b) in enumerate(best):
                    labels.append(Label(unit=unit, rank=r + 1, text=text, score=float(w), extra={
                        "wpmi": float(w), "log_p_d_given_e": float(a), "log_p_d": float(b),
                        "exemplars": cands.exemplars, "candidates": len(cands.texts)}))
            done += len(eb.units)
            first, last = int(eb.units[0]), int(eb.units[-1])
            progress.update(done, total, f"describing units {first}-{last}")
        if undescribed:
            log.warning("milan: %d units got no finished description within %d tokens", len(undescribed),
                        params["max_length"])
        return LabelingResult(labels, summary={
            "captioner": str(getattr(inputs.captioner, "path", "")),
            "language_model": str(getattr(inputs.causal_lm, "path", "")),
            "set_captioner": parts.set_conditioned, "mask_dim": parts.mask_dim,
            "score": "wpmi: log p(d|E) - lambda log p(d)", "undescribed_units": undescribed[:100],
            "num_undescribed": len(undescribed)})

    @staticmethod
    def describe(parts: CaptionerParts, eb: ExemplarBatch, params: dict) -> list[Candidates]:
        """Candidates with log p(d | E) for each unit of one exemplar batch."""
        u, k = eb.present.shape
        if u == 0:
            return []
        present = eb.present.clone()
        # A unit with fewer than k exemplars (a dataset smaller than k images): a set captioner sees its exemplars
        # repeated to fill the k slots; the decoder's cross-attention has no padding mask to leave slots empty.
        empty = ~present.any(dim=1)
        pics = masked_views(eb.images.reshape(u * k, *eb.images.shape[2:]), eb.masks.reshape(u * k, *eb.masks.shape[2:]),
                            parts.mask_dim, parts.mask_fill)
        if parts.set_conditioned:
            order = _fill_slots(present)
            states = encode_images(parts, pics[order.reshape(-1)])
            states = states.reshape(u, k * states.shape[1], states.shape[2])
            cands = set_candidates(parts, states, params["beam"], params["max_length"])
            for i in torch.nonzero(empty).flatten().tolist():
                cands[i] = Candidates([], [], 0)
            for i, c in enumerate(cands):
                c.exemplars = int(present[i].sum())
            return cands
        rows = torch.nonzero(present.reshape(-1)).flatten()
        states = torch.zeros(0)
        if len(rows):
            enc = encode_images(parts, pics[rows])
            states = enc.new_zeros((u * k, *enc.shape[1:]))
            states[rows.to(enc.device)] = enc
        return image_candidates(parts, states, present, params["beam"], params["max_length"])


def _fill_slots(present: torch.Tensor) -> torch.Tensor:
    """[u, k] flat picture index per slot: the slot's own picture, or the unit's present ones cycled into gaps."""
    u, k = present.shape
    out = torch.arange(u * k).reshape(u, k)
    for i in range(u):
        have = torch.nonzero(present[i]).flatten()
        if 0 < len(have) < k:
            out[i] = i * k + have[torch.arange(k) % len(have)]
    return out


def _batches(ex: Any, units: Sequence[int], k: int, quantile: float, chunk: int) -> Iterable[ExemplarBatch]:
    if not hasattr(ex, "batches"):
        raise LabelerError("milan: the exemplars input must offer batches(units, k, quantile, chunk)")
    return ex.batches(units, k, quantile, chunk)
