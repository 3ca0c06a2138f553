"""Training the project's language models: a job like extraction (progress with the loss and an ETA, cancel, resume
from the last checkpoint), on the GPU with mixed precision where there is one.

Kinds (all small configs of real transformers classes, saved with save_pretrained):
- clip: a dual encoder, image tower (`TrainOptions.vision`: `CLIPModel` with its ViT, or
  `VisionTextDualEncoderModel` with a ConvNeXt or Swin tower) and a text tower, trained contrastively on
  (image, caption), (masked region, concept phrase) and (whole image, name of a concept it contains) pairs. Identical
  texts in a batch are all positives of each other, so two "red" regions do not push each other apart; a region is a
  positive of every text that names its pixels ("red", "circle" and "red circle" of one object), and a whole image
  is a positive of every concept name in the batch that it contains.
- captioner: `VisionEncoderDecoderModel` (ViT or Swin encoder, GPT-2 decoder with cross-attention), config flag
  `neuron_studio_set_captioner: true`: conditioned on a set of k masked exemplars whose encoder outputs are
  concatenated (`labelers.textmodels.encode_exemplar_sets`). Trained on captions (sets of one image), on sets of
  regions sharing a concept phrase -> the phrase in the plural ("red circles"), and on unit descriptions with their
  units' exemplars (held-out units never seen).
- lm: `GPT2LMHeadModel` over the same text (captions, phrases, descriptions).

Resume: every `checkpoint_seconds` the model and optimizer state, the step and the loss curve go to a work folder
(safetensors + a weights_only torch file, each written to a temporary name and renamed), so a kill -9 loses at most
one interval. Batches are drawn from a generator seeded by (seed, step), so a resumed run sees the batches the
uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import JobError
from app.jobs import Cancelled, JobProgress
from app.language.tokenizer import BOS_ID, EOS_ID, PAD_ID
from labelers.textmodels import MASK_GREY

log = logging.getLogger(__name__)

TRAINABLE = ("clip", "captioner", "lm")
KIND_TITLES = {"clip": "dual encoder (CLIP)", "captioner": "exemplar-set captioner", "lm": "language model"}
RUN_KIND = "train_language"
WORK_DIR = ".work"
CARD_JSON = "card.json"
# How the captioner and the dual encoder are trained (decision 0104): the image tower learns the concepts of masked
# regions first, then the whole model learns from captions and regions (for the captioner: region sets as MILAN will
# show them).
# How often the captioner's steps draw each kind of batch (relative weights, over the kinds the data has).
CAPTIONER_MIX = {"caption": 1.0, "regions": 3.0, "descriptions": 0.2}
# Weight of the auxiliary loss: a linear head on each picture's pooled tower output says which concept of each
# category the picture shows (`concept_loss`). The next-token loss alone barely reaches the image tower: on the demo
# a captioner trained on it told six shapes apart no better than chance (held-out sets of 15 masked regions), though
# the same towers learn them when trained to. Used in training only; the stored models are regular transformers
# models.
TOWER_AUX = 1.0
# Share of the steps that train the image tower and the auxiliary head alone first, on single region pictures
# (`Batches._draw_tower`), so that the decoder learns to read a tower that already tells the concepts apart.
TOWER_WARMUP = 0.5
# The kinds trained this way (the image tower's warm-up and the auxiliary head): the captioner and the dual encoder.
TOWER_KINDS = ("captioner", "clip")
# Region sets drawn the way MILAN will draw a unit's exemplars: a unit's map is a coarse grid, upsampled bilinearly
# and cut at a level, so its region is a blob around what it responds to, never the concept's exact outline. This
# share of the regions in the captioner's sets is coarsened that way (the mask averaged onto one of these grids,
# upsampled, cut at a random level in UNIT_LIKE_LEVELS), so that the captioner names concepts from such blobs too.
UNIT_LIKE_SHARE = 0.5
UNIT_LIKE_GRIDS = (4, 8, 16)
UNIT_LIKE_LEVELS = (0.2, 0.6)
# Pictures in one training region set. MILAN shows 15 and the decoder's attention pools over however many it gets;
# small sets keep a dozen phrases and more in each batch, which batch normalisation in the tower needs.
REGION_SET_SIZES = (1, 4)
# Two regions of an image with at least this IoU are the same pixels under two names (training and scoring agree).
SAME_PIXELS_IOU = 0.8


@dataclass
class TrainOptions:
    """What to train. Defaults are sized for a small project on two CPU cores (on the demo: the dual encoder and
    the LM under a minute each, the captioner a little over a minute); raise `steps` for a larger dataset: the
    card's held-out figures say whether it helped."""

    kind: str
    dataset: str | int | None = None
    steps: int | None = None  # None: the kind's default (DEFAULT_STEPS)
    batch_size: int | None = None
    lr: float | None = None
    image_size: int = 64
    patch_size: int = 8  # the ViT towers' patch side in pixels
    # The image tower (None: DEFAULT_VISION of the kind). The dual encoder: "vit" (CLIPModel's own), or "mobilenet",
    # "convnext", "swin" in a VisionTextDualEncoderModel; the captioner: "vit" or "swin". On the demo's 64-pixel
    # shapes none learns shapes within the default steps (see DEFAULT_VISION).
    vision: str | None = None
    hidden: int = 128
    layers: int = 2
    vocab_size: int = 1000
    max_text_tokens: int = 40
    max_images: int = 20000
    device: str = "auto"
    seed: int = 0
    name: str | None = None
    checkpoint_seconds: float = 20.0

    def key_fields(self) -> dict[str, Any]:
        # what changes the trained model (not the device, the name or the checkpoint cadence)
        d = dataclasses.asdict(self)
        for k in ("device", "name", "checkpoint_seconds"):
            d.pop(k)
        return d


# The captioner's 1200 steps: about a minute on the demo on 2 CPU cores (a ResNet step costs half a ViT step); with
# 240 steps the tower is still learning the concepts when the decoder starts (decision 0104).
# The dual encoder's 360: half of them its tower's warm-up (on the demo, CLIP-Dissect agreed with Network Dissection
# on 11 detectors of 118 with 240 steps of a warmed-up MobileNetV2, 17 with 360, 16 with 480; 7 with the ViT).
DEFAULT_STEPS = {"clip": 360, "captioner": 1200, "lm": 300}
DEFAULT_BATCH = {"clip": 128, "captioner": 48, "lm": 64}
DEFAULT_LR = {"clip": 1e-3, "captioner": 1e-3, "lm": 2e-3}


@dataclass
class TrainReport:
    kind: str
    name: str
    path: str
    steps: int
    seconds: float
    device: str
    heldout: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)


# ---- models ------------------------------------------------------------------------------------------------------
# The image tower of each kind when TrainOptions.vision is None, and the towers each kind may use. Measured on the
# demo (2 CPU cores, from scratch): a six-way shape classifier on masked regions of the shapes, 45 s, held-out
# accuracy ResNet 0.94, FocalNet 0.41; on whole images, 60 s, FocalNet 0.60, ViT 0.36; ConvNeXt, Swin, LeViT and
# MobileNetV2 stayed near chance after 150 steps. transformers' ResNet gives a feature map, whose positions a
# captioner's decoder attends to as tokens (labelers.textmodels.encoder_tokens); its pooled output is not one a dual
# encoder can project, so it is the captioner's tower only. FocalNet gives tokens and a pooled vector, so it can be
# either (as the demo's dual encoder tower, 240 steps: held-out recall@5 0.21 against the ViT's 0.41, CLIP-Dissect
# agreeing with Network Dissection on 8 of 118 detectors against 7). Trained contrastively alone, the dual encoder's
# ViT learned colours best (held-out top colour right 97% against 48% ConvNeXt and 17% MobileNetV2); with the tower
# warm-up and auxiliary concept loss (TOWER_KINDS) a MobileNetV2, which batch-normalises like the ResNet and learns
# the shapes of masked regions as fast (0.86 in 45 s), names regions best (held-out region->phrase 0.89 against the
# warmed-up ViT's 0.75) and gives CLIP-Dissect the most agreement with Network Dissection (17 of 118 against 11).
DEFAULT_VISION = {"clip": "mobilenet", "captioner": "resnet"}
VISION_TOWERS = {"clip": ("mobilenet", "convnext", "swin", "focalnet", "vit"),
                 "captioner": ("resnet", "focalnet", "vit", "swin")}


def vision_tower(kind: str, opts: TrainOptions) -> str:
    tower = opts.vision or DEFAULT_VISION[kind]
    if tower not in VISION_TOWERS[kind]:
        raise JobError(f"a {kind} cannot have a {tower!r} image tower",
                       fix=f"choose one of {', '.join(VISION_TOWERS[kind])}")
    return tower


def _vision_config(tower: str, opts: TrainOptions) -> Any:
    """Small image towers over S x S pictures. ConvNeXt: a 4 x 4 patchify convolution and two convolutional stages
    (the second halves the grid); one pooled vector per image. Swin: 4 x 4 patches, attention inside 4 x 4 windows
    and patch merging over up to three stages (a 4 x 4 grid of tokens at 64 pixels: a sequence a decoder attends to).
    ViT: 8 x 8 patches (`patch_size`), global attention."""
    import transformers as tf

    h, n = opts.hidden, opts.layers
    if tower == "mobilenet":
        # convolutions with batch normalisation, the kind of network that learns the demo's shapes fastest
        cfg = tf.MobileNetV2Config(image_size=opts.image_size, depth_multiplier=0.35, finegrained_output=False)
        cfg.hidden_size = int(tf.MobileNetV2Model(cfg).conv_1x1.convolution.out_channels)  # its pooled width
        return cfg
    if tower == "convnext":
        cfg = tf.ConvNextConfig(image_size=opts.image_size, patch_size=4, num_stages=2, hidden_sizes=[h // 4, h // 2],
                                depths=[1, n], layer_scale_init_value=1.0)  # 1e-6 would mute the blocks
        cfg.hidden_size = h // 2  # the width VisionTextDualEncoderModel and VisionEncoderDecoderModel read
        return cfg
    if tower == "resnet":
        # a 4x-downsampling stem, then stages of basic blocks, the last two halving the grid (4 x 4 at 64 pixels)
        cfg = tf.ResNetConfig(embedding_size=max(8, h // 4), hidden_sizes=[max(8, h // 4), max(8, h // 2), h],
                              depths=[1, 1, n], layer_type="basic")
        cfg.hidden_size = h  # the width VisionEncoderDecoderModel reads
        return cfg
    if tower == "focalnet":
        stages, _grid, embed = _hierarchical_stages(opts)
        cfg = tf.FocalNetConfig(image_size=opts.image_size, patch_size=4, embed_dim=embed,
                                depths=[1] * (stages - 1) + [n], focal_levels=[2] * stages,
                                focal_windows=[3] * stages)
        cfg.hidden_size = embed << (stages - 1)  # the width VisionEncoderDecoderModel and the dual encoder read
        return cfg
    if tower == "swin":
        stages, grid, embed = _hierarchical_stages(opts)
        return tf.SwinConfig(image_size=opts.image_size, patch_size=4, embed_dim=embed,
                             depths=[1] * (stages - 1) + [n], window_size=min(4, grid),
                             num_heads=[max(1, (embed << i) // 32) for i in range(stages)])
    return tf.ViTConfig(image_size=opts.image_size, patch_size=opts.patch_size, hidden_size=h,
                        intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=max(1, h // 32))


def _hierarchical_stages(opts: TrainOptions) -> tuple[int, int, int]:
    """(stages, last grid side, first stage's width) of a tower over 4 x 4 patches that halves its grid per stage:
    up to three stages, as many as keep the last grid at least 4 x 4 (one Swin window; FocalNet likewise), the
    width doubling per stage so that the last stage's is `hidden`."""
    stages, grid = 1, opts.image_size // 4
    while stages < 3 and grid // 2 >= 4:
        stages, grid = stages + 1, grid // 2
    return stages, grid, max(8, opts.hidden >> (stages - 1))


def build_model(kind: str, vocab: int, opts: TrainOptions) -> Any:
    import transformers as tf

    h, n, heads = opts.hidden, opts.layers, max(1, opts.hidden // 32)
    special = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if kind == "clip":
        text = tf.CLIPTextConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n,
                                 num_attention_heads=heads, max_position_embeddings=opts.max_text_tokens, **special)
        tower = vision_tower(kind, opts)
        if tower == "vit":
            vit = _vision_config("vit", opts).to_dict()
            vision = tf.CLIPVisionConfig(**{k: vit[k] for k in ("image_size", "patch_size", "hidden_size",
                                                                  "intermediate_size", "num_hidden_layers",
                                                                  "num_attention_heads")})
            cfg = tf.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=h)
            return tf.CLIPModel(cfg)
        # any transformers image model whose pooler_output is one vector per image, as a regular dual encoder
        cfg = tf.VisionTextDualEncoderConfig.from_vision_text_configs(_vision_config(tower, opts), text,
                                                                      projection_dim=h)
        return tf.VisionTextDualEncoderModel(config=cfg)
    if kind == "captioner":
        enc = _vision_config(vision_tower(kind, opts), opts)
        dec = tf.GPT2Config(vocab_size=vocab, n_embd=h, n_layer=n, n_head=heads, n_positions=opts.max_text_tokens,
                            add_cross_attention=True, is_decoder=True, **special)
        cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = BOS_ID, PAD_ID, EOS_ID
        cfg.neuron_studio_set_captioner = True
        cfg.neuron_studio_mask_fill = MASK_GREY  # MILAN draws exemplars as this captioner saw regions
        return tf.VisionEncoderDecoderModel(config=cfg)
    if kind == "lm":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=h, n_layer=n, n_head=heads,
                                                n_positions=opts.max_text_tokens, **special))
    raise JobError(f"cannot train a {kind!r} model", fix=f"train one of {', '.join(TRAINABLE)}; bring a sentence "
                   "encoder with `neuron-studio language add PROJECT DIR --kind sentence`")


def image_processor(size: int) -> Any:
    from transformers import CLIPImageProcessor

    from labelers.textmodels import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


# ---- batches -----------------------------------------------------------------------------------------------------
class Batches:
    """Draws the training batches of one kind from a corpus; `draw(step)` is deterministic in (seed, step)."""

    def __init__(self, kind: str, corpus: Any, tokenizer: Any, opts: TrainOptions, batch: int, warmup: int = 0):
        import torch

        from labelers.textmodels import CLIP_MEAN, CLIP_STD

        self.kind, self.corpus, self.tok, self.opts, self.batch = kind, corpus, tokenizer, opts, batch
        self.warmup = warmup  # the first steps train the image tower alone (TOWER_WARMUP)
        self.caps = corpus.caption_split(False)
        self.regions = corpus.region_split(False)
        self.descs = [d for d in corpus.descriptions if not d.heldout]
        self.texts = corpus.texts(False)
        self.word_rows = (torch.nonzero(~corpus.heldout & corpus.presence.any(1)).flatten()
                          if corpus.presence is not None else torch.zeros(0, dtype=torch.int64))
        self.mean = torch.tensor(CLIP_MEAN)[:, None, None]
        self.std = torch.tensor(CLIP_STD)[:, None, None]
        # regions grouped by phrase, for the captioner's sets; phrases with too few regions are left to CLIP
        self.by_phrase: list[Any] = []
        if len(self.regions):
            ph = corpus.region_phrase[self.regions]
            for p in ph.unique().tolist():
                members = self.regions[ph == p]
                if len(members) >= 2:
                    self.by_phrase.append((p, members))
        self.same_pixels = self._same_pixel_phrases() if kind in TOWER_KINDS and len(self.regions) else []
        # the auxiliary head's targets for regions (TOWER_AUX): the concept words naming a region's pixels (a whole
        # image's are the concept words present in it)
        self.region_words = self._region_words() if self.same_pixels else None
        if not self.texts:
            raise JobError("the dataset has no text to learn from (no captions, no concept names, no unit "
                           "descriptions)", fix="add a dataset with captions (COCO captions JSON) or concept "
                           "annotations, or import unit descriptions")
        if kind in ("clip", "captioner") and not self.caps and not len(self.regions) and not self.descs:
            raise JobError(f"a {kind} needs images paired with text, and this dataset has neither captions nor "
                           "concept masks", fix="add a dataset with captions or per-pixel concept masks")

    def pixels(self, images: Any, masks: Any = None) -> Any:
        from labelers.textmodels import mask_pixels

        x = mask_pixels(images, masks) if masks is not None else images.float() / 255.0
        return (x - self.mean) / self.std

    def tokens(self, texts: list[str]) -> tuple[Any, Any]:
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.opts.max_text_tokens,
                       return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def draw(self, step: int) -> dict[str, Any]:
        import torch

        g = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + step)
        if step < self.warmup and self.region_words is not None:
            return self._draw_tower(g)
        return getattr(self, f"_draw_{self.kind}")(g)

    def _draw_lm(self, g: Any) -> dict[str, Any]:
        import torch

        idx = torch.randint(len(self.texts), (self.batch,), generator=g).tolist()
        ids, att = self.tokens([self.texts[i] for i in idx])
        return {"ids": ids, "att": att}

    def _draw_clip(self, g: Any) -> dict[str, Any]:
        import torch

        c = self.corpus
        parts = [p for p, ok in (("cap", bool(self.caps)), ("reg", len(self.regions) > 0),
                                 ("word", len(self.word_rows) > 0)) if ok]
        share = {p: self.batch // len(parts) for p in parts}
        share[parts[0]] += self.batch - sum(share.values())
        n_cap, n_reg, n_word = share.get("cap", 0), share.get("reg", 0), share.get("word", 0)
        imgs, texts = [], []
        aux = []  # each picture's concept words, for the auxiliary head (TOWER_AUX)
        if n_cap:
            pick = torch.randint(len(self.caps), (n_cap,), generator=g).tolist()
            rows = torch.tensor([self.caps[i][0] for i in pick])
            imgs.append(self.pixels(c.images[rows]))
            texts += [self.caps[i][1] for i in pick]
            if self.aux_words:
                aux.append(c.presence[rows].float())
        if n_reg:
            r = self.regions[torch.randint(len(self.regions), (n_reg,), generator=g)]
            imgs.append(self.pixels(c.images[c.region_image[r]], c.region_masks[r]))
            texts += [c.phrases[j] for j in c.region_phrase[r].tolist()]
            if self.aux_words:
                aux.append(self.region_words[r])
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
        if n_word:
            rows = self.word_rows[torch.randint(len(self.word_rows), (n_word,), generator=g)]
            present = c.presence[rows]  # [n_word, W]
            pick = torch.multinomial(present.float(), 1, generator=g)[:, 0]
            imgs.append(self.pixels(c.images[rows]))
            if self.aux_words:
                aux.append(present.float())
            words = [c.concept_names[j] for j in pick.tolist()]
            m = len(texts)
            texts += words
            grown = torch.zeros(len(texts), len(texts), dtype=torch.bool)
            grown[:m, :m] = same
            grown[m:, m:] = present[:, pick]  # image i contains the word of pair j
            for a in range(m):  # a caption or region text identical to a word
                for b in range(m, len(texts)):
                    if texts[a] == texts[b]:
                        grown[a, b] = grown[b, a] = True
            same = grown
        if n_reg:
            # One set of pixels carries several names (a red dotted circle is "red", "dotted", "circle", "red circle"):
            # a region is a positive of every text in the batch that names (nearly) its pixels, not only of its own
            # phrase; otherwise a red circle drawn for "red" would be pushed away from "circle".
            for k, ri in enumerate(r.tolist()):
                names = self.same_pixels[ri]
                for b, t in enumerate(texts):
                    if t in names:
                        same[n_cap + k, b] = True
        ids, att = self.tokens(texts)
        same = same.float()  # [image, text]: rows for the image-to-text loss, columns for text-to-image
        out = {"pixels": torch.cat(imgs), "ids": ids, "att": att, "targets": same}
        if aux:
            out["aux"] = torch.cat(aux)[:, None]  # [pictures, 1, W], as the captioner's single pictures
        return out

    def _same_pixel_phrases(self) -> list[frozenset[str]]:
        """For every region, the phrases of the regions of its image with nearly the same pixels (IoU >= 0.8, the
        rule the held-out region naming is scored by), its own phrase included."""
        import torch

        c = self.corpus
        out: list[frozenset[str]] = [frozenset()] * len(c.region_image)
        order = torch.argsort(c.region_image, stable=True)
        counts = torch.unique_consecutive(c.region_image[order], return_counts=True)[1].tolist()
        start = 0
        for n in counts:
            idx = order[start:start + n]
            start += n
            m = c.region_masks[idx].flatten(1).float()
            inter = m @ m.T
            area = m.sum(1)
            iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
            ph = c.region_phrase[idx]
            for a, ri in enumerate(idx.tolist()):
                out[ri] = frozenset(c.phrases[j] for j in ph[iou[a] >= SAME_PIXELS_IOU].tolist())
        return out

    def _region_words(self) -> Any:
        """[R, W] float: 1 where concept word w names (nearly) the pixels of region r (`same_pixels`)."""
        import torch

        c = self.corpus
        if not c.concept_names:
            return None
        index = {w: i for i, w in enumerate(c.concept_names)}
        of_phrase = {ph: [index[w] for w in ph.split() if w in index] for ph in c.phrases}
        out = torch.zeros(len(c.region_image), len(index))
        for r, names in enumerate(self.same_pixels):
            for ph in names:
                out[r, of_phrase[ph]] = 1.0
        return out

    @property
    def concept_groups(self) -> list[Any]:
        """Indices of the concept words of each category, for `concept_loss`."""
        import torch

        c = self.corpus
        cats = c.concept_categories or [""] * len(c.concept_names)
        return [torch.tensor([i for i, x in enumerate(cats) if x == cat]) for cat in dict.fromkeys(cats)]

    def _draw_tower(self, g: Any) -> dict[str, Any]:
        """The image tower's warm-up batch: single region pictures drawn over all regions, with their concept words
        and no text."""
        import torch

        c = self.corpus
        r = self.regions[torch.randint(len(self.regions), (self.batch,), generator=g)]
        return {"pixels": self.pixels(c.images[c.region_image[r]], c.region_masks[r])[:, None],
                "aux": self.region_words[r][:, None]}

    @property
    def aux_words(self) -> int:
        """How many concept words the auxiliary head predicts (0: no head)."""
        c = self.corpus
        return len(c.concept_names) if self.kind in TOWER_KINDS and c.concept_names and c.presence is not None else 0

    def _draw_captioner(self, g: Any) -> dict[str, Any]:
        import torch

        from app.language.data import plural

        c = self.corpus
        choices = [name for name, ok in (("caption", bool(self.caps)), ("regions", bool(self.by_phrase)),
                                         ("descriptions", bool(self.descs))) if ok]
        # descriptions are few and precious: a fifth of the steps when there are any
        weights = torch.tensor([CAPTIONER_MIX[ch] for ch in choices])
        what = choices[int(torch.multinomial(weights, 1, generator=g))] if choices else "caption"
        if what == "caption":
            pick = torch.randint(len(self.caps), (self.batch,), generator=g).tolist()
            rows = torch.tensor([self.caps[i][0] for i in pick])
            pixels = self.pixels(c.images[rows])[:, None]
            texts = [self.caps[i][1] for i in pick]
            aux = c.presence[rows].float()[:, None] if self.aux_words else None
        elif what == "regions":
            k = int(torch.randint(REGION_SET_SIZES[0], REGION_SET_SIZES[1] + 1, (1,), generator=g))
            b = max(4, self.batch // k)
            sets, texts, words = [], [], []
            for p in torch.randint(len(self.by_phrase), (b,), generator=g).tolist():
                phrase, members = self.by_phrase[p]
                r = members[torch.randint(len(members), (k,), generator=g)]
                sets.append(self.pixels(c.images[c.region_image[r]], unit_like_masks(c.region_masks[r], g)))
                texts.append(plural(c.phrases[phrase]))
                if self.aux_words:
                    words.append(self.region_words[r])
            pixels = torch.stack(sets)
            aux = torch.stack(words) if self.aux_words else None
        else:
            k = min(min(len(d.exemplar_rows) for d in self.descs), 6)
            b = max(4, self.batch // max(k, 1))
            sets, texts = [], []
            for i in torch.randint(len(self.descs), (b,), generator=g).tolist():
                d = self.descs[i]
                j = torch.randperm(len(d.exemplar_rows), generator=g)[:k]
                sets.append(self.pixels(c.images[d.exemplar_rows[j]], d.exemplar_masks[j]))
                texts.append(d.text)
            pixels = torch.stack(sets)
            aux = None  # a description names no concept word for certain
        ids, att = self.tokens(texts)
        out = {"pixels": pixels, "ids": ids, "att": att}
        if aux is not None:
            out["aux"] = aux  # [sets, k, W]
        return out


def unit_like_masks(masks: Any, g: Any) -> Any:
    """[n, S, S] bool concept masks -> the same with `UNIT_LIKE_SHARE` of them replaced by the blob a unit that
    detects exactly that concept would give MILAN (see UNIT_LIKE_SHARE); a blob that comes out empty keeps its mask."""
    import torch
    import torch.nn.functional as F

    n = masks.shape[0]
    grid = UNIT_LIKE_GRIDS[int(torch.randint(len(UNIT_LIKE_GRIDS), (1,), generator=g))]
    lo, hi = UNIT_LIKE_LEVELS
    level = lo + (hi - lo) * torch.rand(n, generator=g)
    use = torch.rand(n, generator=g) < UNIT_LIKE_SHARE
    coarse = F.adaptive_avg_pool2d(masks[:, None].float(), grid)
    up = F.interpolate(coarse, size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    blob = up > level[:, None, None]
    use &= blob.flatten(1).any(1)
    return torch.where(use[:, None, None], blob, masks)


# ---- losses ------------------------------------------------------------------------------------------------------
def _features(out: Any) -> Any:
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_loss(model: Any, batch: dict[str, Any], aux_head: Any = None, groups: Any = None) -> Any:
    """The symmetric contrastive loss over the batch's (picture, text) pairs with several positives per row, plus
    (with `aux_head` and targets in the batch) the auxiliary concept loss on the image tower's pooled output, as the
    captioner's (`concept_loss`). A batch without texts (the tower's warm-up) has the auxiliary loss only."""
    import torch
    import torch.nn.functional as F

    pixels = batch["pixels"].flatten(0, 1) if batch["pixels"].dim() == 5 else batch["pixels"]
    # the tower once, for both losses: CLIPModel and VisionTextDualEncoderModel project its pooled output
    pooled = model.vision_model(pixel_values=pixels).pooler_output.flatten(1)
    loss = 0.0
    if "ids" in batch:
        img = F.normalize(model.visual_projection(pooled).float(), dim=-1)
        txt = F.normalize(_features(model.get_text_features(input_ids=batch["ids"],
                                                            attention_mask=batch["att"])).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        t = batch["targets"]  # [B, B] 0/1: image i goes with text j
        ti = t / t.sum(1, keepdim=True)
        tt = t.T / t.T.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-ti * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-tt * F.log_softmax(logits.T, 1), 1).mean())
    if aux_head is not None and "aux" in batch:
        loss = loss + TOWER_AUX * concept_loss(aux_head(pooled).float(), batch["aux"].flatten(0, 1), groups)
    return loss


def captioner_loss(model: Any, batch: dict[str, Any], tm: Any, aux_head: Any = None,
                   groups: Any = None) -> Any:
    """The decoder's next-token loss on the batch's texts, plus (with `aux_head` and targets in the batch) the
    auxiliary concept loss on each picture's pooled encoder tokens (`concept_loss`, TOWER_AUX). A batch
    without texts (the tower's warm-up) has the auxiliary loss only."""
    from labelers.textmodels import encode_exemplar_sets

    enc = encode_exemplar_sets(tm, batch["pixels"])
    loss = 0.0
    if "ids" in batch:
        ids, att = batch["ids"], batch["att"]
        labels = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
        loss = model(encoder_outputs=enc, decoder_input_ids=ids[:, :-1], decoder_attention_mask=att[:, :-1],
                     labels=labels).loss
    if aux_head is not None and "aux" in batch:
        s, k = batch["pixels"].shape[:2]
        h = enc.last_hidden_state
        pooled = h.reshape(s, k, h.shape[1] // k, h.shape[2]).mean(2)
        loss = loss + TOWER_AUX * concept_loss(aux_head(pooled).float(), batch["aux"], groups)
    return loss


def concept_loss(logits: Any, targets: Any, groups: Any) -> Any:
    """Which concept of each category a picture shows: for every category (`groups`: one index tensor of concept
    words per category) with a word naming the picture, cross-entropy of the category's words against its naming
    words (several share the target); summed over categories, averaged over pictures. A softmax within a category
    makes shapes compete with shapes and colours with colours, which teaches the tower far faster than independent
    yes/no outputs (measured: see TOWER_AUX)."""
    import torch

    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, targets.shape[-1])
    total = logits.new_zeros(())
    for idx in groups:
        t = targets[:, idx]
        n = t.sum(1)
        named = n > 0
        if not bool(named.any()):
            continue
        logp = torch.log_softmax(logits[named][:, idx], dim=1)
        total = total - ((t[named] / n[named, None]) * logp).sum(1).sum()
    return total / max(1, logits.shape[0])


def lm_loss(model: Any, batch: dict[str, Any]) -> Any:
    ids, att = batch["ids"], batch["att"]
    return model(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)).loss


# ---- evaluation --------------------------------------------------------------------------------------------------
def unigram_log_probs(tokenizer: Any, texts: list[str], vocab: int) -> Any:
    """Add-one smoothed unigram log-probabilities of the tokens after <s> (end token included) of `texts`."""
    import torch

    counts = torch.ones(vocab, dtype=torch.float64)
    for ids in tokenizer(texts)["input_ids"]:
        counts += torch.bincount(torch.tensor(ids[1:], dtype=torch.int64), minlength=vocab)[:vocab].double()
    return torch.log(counts / counts.sum())


def unigram_perplexity(tokenizer: Any, train_texts: list[str], test_texts: list[str], vocab: int) -> float:
    import torch

    logp = unigram_log_probs(tokenizer, train_texts, vocab)
    ids = [torch.tensor(x[1:], dtype=torch.int64) for x in tokenizer(test_texts)["input_ids"]]
    ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    return float(torch.exp(-logp[ids].mean())) if len(ids) else float("nan")


def perplexity(tm: Any, texts: list[str], encoder_outputs: Any = None) -> float:
    import torch

    from labelers.textmodels import text_log_likelihood, token_counts

    if not texts:
        return float("nan")
    ll = text_log_likelihood(tm, texts, encoder_outputs)
    return float(torch.exp(-ll.sum() / token_counts(tm, texts).sum()))


def evaluate(kind: str, tm: Any, corpus: Any, batches: Batches, vocab: int, limit: int = 500) -> tuple[dict, dict]:
    """Held-out figures and their trivial baselines (random ranking; unigram perplexity)."""
    import torch

    from app.language.data import plural
    from labelers.textmodels import encode_exemplar_sets

    heldout, base = {}, {}
    train_texts = corpus.texts(False)
    g = torch.Generator().manual_seed(12345)
    test_caps = corpus.caption_split(True)
    with torch.no_grad():
        if kind == "clip":
            # one caption per held-out image; rank all of them for every image
            first: dict[int, str] = {}
            for i, t in test_caps:
                first.setdefault(i, t)
            rows = list(first)[:limit]
            if len(rows) >= 10:
                texts = [first[i] for i in rows]
                ids, att = batches.tokens(texts)
                img = torch.nn.functional.normalize(_features(tm.model.get_image_features(
                    pixel_values=batches.pixels(corpus.images[torch.tensor(rows)]).to(tm.device))).float(), dim=-1)
                txt = torch.nn.functional.normalize(_features(tm.model.get_text_features(
                    input_ids=ids.to(tm.device), attention_mask=att.to(tm.device))).float(), dim=-1)
                sim = img @ txt.T
                # a caption identical to the right one counts as right: templated captions repeat
                same = torch.tensor([[a == b for b in texts] for a in texts], device=sim.device)
                top5 = sim.topk(min(5, len(rows)), dim=1).indices
                hits = same.gather(1, top5).any(1).float()
                heldout["image_to_caption_recall_at_5"] = float(hits.mean())
                heldout["image_to_caption_candidates"] = len(rows)
                # random ranking: P(one of the identical captions lands in the top 5)
                m = same.sum(1).double()
                n = len(rows)
                p_miss = torch.ones_like(m)
                for j in range(min(5, n)):
                    p_miss *= (n - m - j).clamp(min=0) / (n - j)
                base["image_to_caption_recall_at_5"] = float((1 - p_miss).mean())
            if corpus.presence is not None:
                rows = torch.nonzero(corpus.heldout & corpus.presence.any(1)).flatten()[:limit]
                if len(rows):
                    ids, att = batches.tokens(corpus.concept_names)
                    txt = torch.nn.functional.normalize(_features(tm.model.get_text_features(
                        input_ids=ids.to(tm.device), attention_mask=att.to(tm.device))).float(), dim=-1)
                    img = torch.nn.functional.normalize(_features(tm.model.get_image_features(
                        pixel_values=batches.pixels(corpus.images[rows]).to(tm.device))).float(), dim=-1)
                    present = corpus.presence[rows]
                    sim = (img @ txt.T).cpu()
                    # per image: do the concepts it contains rank above those it lacks? (AUC; the baseline ranks
                    # every image's concepts by how often they occur in the training images)
                    heldout["image_to_concept_auc"] = _mean_auc(sim, present)
                    train_rate = corpus.presence[~corpus.heldout].float().mean(0)
                    base["image_to_concept_auc"] = _mean_auc(train_rate.expand_as(sim), present)
            reg = corpus.region_split(True)
            if len(reg):
                reg = reg[torch.randperm(len(reg), generator=g)[:limit]]
                phrases = corpus.phrases
                ids, att = batches.tokens(phrases)
                txt = torch.nn.functional.normalize(_features(tm.model.get_text_features(
                    input_ids=ids.to(tm.device), attention_mask=att.to(tm.device))).float(), dim=-1)
                px = batches.pixels(corpus.images[corpus.region_image[reg]], corpus.region_masks[reg])
                img = torch.nn.functional.normalize(_features(tm.model.get_image_features(
                    pixel_values=px.to(tm.device))).float(), dim=-1)
                pred = (img @ txt.T).argmax(1).cpu()
                # One set of pixels often carries several names (a red dotted circle's mask is annotated "red",
                # "dotted" and "circle"): a phrase is right when it names a region of (nearly) the same pixels.
                right = torch.zeros(len(reg), len(phrases), dtype=torch.bool)
                for j, r in enumerate(reg.tolist()):
                    same_img = torch.nonzero(corpus.region_image == corpus.region_image[r]).flatten()
                    m = corpus.region_masks[r].flatten()
                    others = corpus.region_masks[same_img].flatten(1)
                    iou = (others & m).sum(1).double() / (others | m).sum(1).clamp(min=1).double()
                    right[j, corpus.region_phrase[same_img[iou >= SAME_PIXELS_IOU]]] = True
                heldout["region_to_phrase_accuracy"] = float(right[torch.arange(len(reg)), pred].float().mean())
                heldout["region_to_phrase_candidates"] = len(phrases)
                counts = torch.bincount(corpus.region_phrase[corpus.region_split(False)], minlength=len(phrases))
                base["region_to_phrase_accuracy"] = float(right[:, counts.argmax()].float().mean())
        elif kind == "captioner":
            cap_texts = [t for _, t in test_caps][:limit]
            if cap_texts:
                rows = torch.tensor([i for i, _ in test_caps][:limit])
                px = batches.pixels(corpus.images[rows])[:, None].to(tm.device)
                enc = encode_exemplar_sets(tm, px)
                heldout["caption_perplexity"] = perplexity(tm, cap_texts, enc)
                base["caption_perplexity"] = unigram_perplexity(tm.tokenizer, train_texts, cap_texts, vocab)
            reg = corpus.region_split(True)
            if len(reg):
                ph = corpus.region_phrase[reg]
                sets, texts = [], []
                for p in ph.unique().tolist():
                    members = reg[ph == p]
                    if len(members) >= 5:
                        r = members[torch.randperm(len(members), generator=g)[:5]]
                        sets.append(batches.pixels(corpus.images[corpus.region_image[r]], corpus.region_masks[r]))
                        texts.append(plural(corpus.phrases[p]))
                if texts:
                    enc = encode_exemplar_sets(tm, torch.stack(sets).to(tm.device))
                    heldout["region_set_perplexity"] = perplexity(tm, texts, enc)
                    heldout["region_sets"] = len(texts)
                    base["region_set_perplexity"] = unigram_perplexity(tm.tokenizer, train_texts, texts, vocab)
            descs = [d for d in corpus.descriptions if d.heldout]
            if descs:
                k = min(min(len(d.exemplar_rows) for d in descs), 15)
                sets = [batches.pixels(corpus.images[d.exemplar_rows[:k]], d.exemplar_masks[:k]) for d in descs]
                enc = encode_exemplar_sets(tm, torch.stack(sets).to(tm.device))
                texts = [d.text for d in descs]
                heldout["description_perplexity"] = perplexity(tm, texts, enc)
                heldout["heldout_descriptions"] = len(texts)
                base["description_perplexity"] = unigram_perplexity(tm.tokenizer, train_texts, texts, vocab)
        elif kind == "lm":
            texts = corpus.texts(True)[:4 * limit]
            if texts:
                heldout["text_perplexity"] = perplexity(tm, texts)
                heldout["heldout_texts"] = len(texts)
                base["text_perplexity"] = unigram_perplexity(tm.tokenizer, train_texts, texts, vocab)
    return heldout, base


def _mean_auc(scores: Any, positive: Any) -> float:
    """Mean over rows (with both classes) of the ROC AUC of `scores` for `positive`, ties counted half."""
    import torch

    aucs = []
    for sc, pos in zip(scores.double(), positive.bool()):
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            diff = sc[pos][:, None] - sc[~pos][None, :]
            aucs.append(float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean()))
    return float(torch.tensor(aucs).mean()) if aucs else float("nan")


# ---- the job -----------------------------------------------------------------------------------------------------
def _atomic_save_file(tensors: dict[str, Any], target: Path) -> None:
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, target)


def _atomic_write(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


class TrainJob:
    """Train one language model of a project (see the module docstring); picklable, so the window runs it in its
    child process like any other job."""

    kind = RUN_KIND

    def __init__(self, project_path: str | Path, options: TrainOptions):
        if options.kind not in TRAINABLE:
            raise JobError(f"cannot train a {options.kind!r} model",
                           fix=f"--kind is one of {', '.join(TRAINABLE)}; a sentence encoder is brought with "
                               "`neuron-studio language add PROJECT DIR --kind sentence`")
        self.project_path = Path(project_path)
        self.options = options
        self.tower_warmup = 0  # the steps that trained the image tower alone, once training has begun
        self.title = f"Train the {KIND_TITLES[options.kind]}"
        self.run_id: int | None = None

    def execute(self, progress: JobProgress) -> TrainReport:
        from app.project.store import Project

        project = Project.open(self.project_path)
        try:
            return self._execute(project, progress)
        finally:
            project.close()

    def _execute(self, project: Any, progress: JobProgress) -> TrainReport:
        from app.engine.device import describe, pick_device
        from app.language.data import gather

        o = self.options
        steps = int(o.steps or DEFAULT_STEPS[o.kind])
        batch = int(o.batch_size or DEFAULT_BATCH[o.kind])
        lr = float(o.lr or DEFAULT_LR[o.kind])
        if steps < 1 or batch < 1:
            raise JobError("--steps and the batch size must be at least 1")
        ds_row = project.dataset(o.dataset)
        key = hashlib.sha256(json.dumps({**o.key_fields(), "dataset": ds_row["id"], "fp": ds_row["fingerprint"]},
                                        sort_keys=True, default=str).encode()).hexdigest()
        device = pick_device(o.device)
        prior = project.resumable_run(self.kind, key)
        run_id = prior.id if prior else project.create_run(kind=self.kind, key=key, params=dataclasses.asdict(o),
                                                           dataset_id=ds_row["id"], method=o.kind)
        self.run_id = run_id
        project.start_run(run_id)
        t0 = time.monotonic()
        work = project.language_dir() / WORK_DIR / key[:16]
        with project.finishing(run_id, t0, cancelled="cancelled; train again with the same options to resume"):
            progress.begin_stage("reading the dataset")
            corpus = gather(project, ds_row["id"], o.image_size, o.max_images, progress=progress, seed=o.seed)
            report = self._train(project, progress, corpus, ds_row, work, steps, batch, lr, device, run_id, t0)
        project.finish_run(run_id, "done", report=dataclasses.asdict(report), seconds=report.seconds,
                           message=f"{report.name}: {steps} steps on {describe(device)}")
        return report

    def _train(self, project: Any, progress: JobProgress, corpus: Any, ds_row: dict[str, Any], work: Path,
               steps: int, batch: int, lr: float, device: Any, run_id: int, t0: float) -> TrainReport:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        from app.engine.device import describe
        from app.language.tokenizer import train_tokenizer
        from labelers.textmodels import TextModel

        o = self.options
        work.mkdir(parents=True, exist_ok=True)
        tok_dir = work / "tokenizer"
        if (tok_dir / "tokenizer.json").exists():  # a resumed run keeps the vocabulary its weights were trained on
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        else:
            progress.begin_stage("training the tokenizer")
            tokenizer = train_tokenizer(corpus.texts(False), o.vocab_size, o.max_text_tokens)
            tmp = work / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, tok_dir)
        vocab = len(tokenizer)
        torch.manual_seed(o.seed)
        model = build_model(o.kind, vocab, o).to(device)
        model.train()
        batches = Batches(o.kind, corpus, tokenizer, o, batch,
                          warmup=int(TOWER_WARMUP * steps) if o.kind in TOWER_KINDS else 0)
        aux_head = None
        if batches.aux_words:
            tower = model.config.encoder if o.kind == "captioner" else model.config.vision_config
            width = int(tower.hidden_size)
            aux_head = torch.nn.Linear(width, batches.aux_words).to(device)
        params = list(model.parameters()) + (list(aux_head.parameters()) if aux_head is not None else [])
        groups = [g.to(device) for g in batches.concept_groups] if aux_head is not None else None
        self.tower_warmup = batches.warmup if aux_head is not None else 0  # for the card
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        start, losses, seconds_before, cpu_before = 0, [], 0.0, 0.0
        ckpt, state_file = work / "model.safetensors", work / "state.json"
        if ckpt.exists() and state_file.exists():
            state = json.loads(state_file.read_text())
            model.load_state_dict(load_file(str(ckpt), device=str(device)))
            if aux_head is not None:
                aux_head.load_state_dict(load_file(str(work / "aux_head.safetensors"), device=str(device)))
            opt.load_state_dict(torch.load(work / "optimizer.pt", map_location=device, weights_only=True))
            sched.load_state_dict(state["scheduler"])
            start, losses, seconds_before = int(state["step"]), state["losses"], float(state["seconds"])
            cpu_before = float(state.get("cpu_seconds", 0.0))
            log.info("resuming %s training at step %d", o.kind, start)
        config = json.loads(model.config.to_json_string())
        tm = TextModel(kind=o.kind, path=work, model=model, tokenizer=tokenizer, device=device, config=config)
        amp = device.type == "cuda"
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

        def save_checkpoint(step: int) -> None:
            sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            if aux_head is not None:  # before the model's file, whose presence says a checkpoint exists
                _atomic_save_file({k: v.detach().contiguous() for k, v in aux_head.state_dict().items()},
                                  work / "aux_head.safetensors")
            _atomic_save_file(_untie(sd), ckpt)
            tmp = work / "optimizer.pt.tmp"
            torch.save(opt.state_dict(), tmp)
            os.replace(tmp, work / "optimizer.pt")
            _atomic_write(state_file, json.dumps({"step": step, "losses": losses, "scheduler": sched.state_dict(),
                                                  "seconds": seconds_before + time.monotonic() - t_train,
                                                  "cpu_seconds": cpu_before + time.process_time() - cpu_train}))

        progress.begin_stage(f"training the {KIND_TITLES[o.kind]}", done=start)
        t_train = time.monotonic()
        cpu_train = time.process_time()  # CPU time as well: on a busy machine it says what the work itself cost
        last_ckpt = time.monotonic()
        step = start
        try:
            for step in range(start, steps):
                b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batches.draw(step).items()}
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    if o.kind == "clip":
                        loss = clip_loss(model, b, aux_head, groups)
                    elif o.kind == "captioner":
                        loss = captioner_loss(model, b, tm, aux_head, groups)
                    else:
                        loss = lm_loss(model, b)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(opt)
                scaler.update()
                sched.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise JobError(f"the training loss became {value} at step {step + 1}",
                                   fix="train again with a smaller --lr")
                losses.append([step + 1, round(value, 5)])
                if time.monotonic() - last_ckpt >= o.checkpoint_seconds:
                    save_checkpoint(step + 1)
                    project.update_run(run_id, done=step + 1, total=steps, message=f"loss {value:.3f}")
                    last_ckpt = time.monotonic()
                progress.update(step + 1, steps, f"step {step + 1}/{steps}, loss {value:.3f}")
        except Cancelled:
            save_checkpoint(len(losses) and losses[-1][0] or start)
            raise
        train_seconds = seconds_before + time.monotonic() - t_train
        cpu_seconds = cpu_before + time.process_time() - cpu_train
        progress.begin_stage("measuring on held-out data")
        progress.update(0, 1, "measuring on held-out data")
        model.eval()
        heldout, base = evaluate(o.kind, tm, corpus, batches, vocab)
        report = self._store(project, model, tokenizer, corpus, ds_row, run_id, steps, batch, lr, train_seconds,
                             describe(device), losses, heldout, base, work, cpu_seconds)
        progress.update(1, 1, "done")
        return report

    def _store(self, project: Any, model: Any, tokenizer: Any, corpus: Any, ds_row: dict[str, Any], run_id: int,
               steps: int, batch: int, lr: float, seconds: float, device: str, losses: list, heldout: dict,
               base: dict, work: Path, cpu_seconds: float = 0.0) -> TrainReport:
        o = self.options
        names = project.language_model_names()
        name = o.name or f"{o.kind}-{ds_row['name']}"
        if o.name and name in names:
            raise JobError(f"the project already has a language model named {name!r}", fix="choose another --name")
        n = 2
        base_name = name
        while name in names:
            name, n = f"{base_name}-{n}", n + 1
        root = project.language_dir()
        final = root / name
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if o.kind in ("clip", "captioner"):
            image_processor(o.image_size).save_pretrained(str(tmp))
        card = {
            "name": name, "kind": o.kind, "architecture": type(model).__name__,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "trained_in": "Neuron Studio", "dataset": ds_row["name"], "data": corpus.summary(),
            "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer)},
            "options": dataclasses.asdict(o), "steps": steps, "batch_size": batch, "lr": lr,
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "device": device, "loss_curve": _thin(losses, 300),
            "heldout": heldout, "baselines": base,
        }
        if o.kind in VISION_TOWERS:
            card["image_tower"] = vision_tower(o.kind, o)
            card["tower_warmup_steps"] = self.tower_warmup
        if o.kind == "captioner":
            card["descriptions_seen"] = sorted({d.unit for d in corpus.descriptions if not d.heldout})
            card["descriptions_heldout"] = sorted({d.unit for d in corpus.descriptions if d.heldout})
        _atomic_write(tmp / CARD_JSON, json.dumps(card, indent=1, default=str))
        _atomic_write(tmp / "README.md", card_markdown(card))
        if final.exists():  # a folder left by a crash between the rename and the database insert
            shutil.rmtree(final)
        os.replace(tmp, final)
        project.add_language_model(name=name, kind=o.kind, source="trained", path=final,
                                   card={k: v for k, v in card.items() if k != "loss_curve"},
                                   dataset_id=ds_row["id"], run_id=run_id)
        shutil.rmtree(work, ignore_errors=True)
        return TrainReport(kind=o.kind, name=name, path=str(final), steps=steps, seconds=round(seconds, 2),
                           device=device, heldout=heldout, baselines=base)


def _untie(sd: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors sharing memory (tied embeddings): store each shared one once, as a copy."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in sd.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def _thin(points: list, n: int) -> list:
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


def read_card(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / CARD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def card_markdown(card: dict[str, Any]) -> str:
    """The model card as a README.md beside the weights."""
    lines = [f"# {card['name']}", "",
             f"A {KIND_TITLES.get(card['kind'], card['kind'])} ({card['architecture']}"
             f"{', image tower ' + card['image_tower'] if card.get('image_tower') else ''}, {card['parameters']:,} "
             f"parameters) trained offline by Neuron Studio on the dataset **{card['dataset']}** of its project.", "",
             "## Data", ""]
    for k, v in card["data"].items():
        if k != "notes":
            lines.append(f"- {k.replace('_', ' ')}: {v}")
    for note in card["data"].get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "## Training", "",
              f"- steps: {card['steps']}, batch size {card['batch_size']}, learning rate {card['lr']}",
              f"- time: {card['seconds']} s on {card['device']} ({card.get('cpu_seconds', '?')} s of CPU time)",
              f"- tokenizer: {card['tokenizer']['type']}, {card['tokenizer']['vocab_size']} tokens"]
    if card.get("tower_warmup_steps"):
        lines.append(f"- the first {card['tower_warmup_steps']} steps trained the image tower alone to tell the "
                     f"dataset's concepts apart in masked regions (their loss is that, not the captions')")
    curve = card.get("loss_curve") or []
    if curve:
        lines.append(f"- loss: {curve[0][1]:.3f} at step {curve[0][0]} -> {curve[-1][1]:.3f} at step {curve[-1][0]} "
                     f"(the full curve is in card.json)")
    lines += ["", "## Held-out figures (beside a trivial baseline)", "", "| measure | this model | baseline |",
              "|---|---|---|"]
    for k, v in card["heldout"].items():
        lines.append(f"| {k.replace('_', ' ')} | {_fmt(v)} | {_fmt(card['baselines'].get(k, ''))} |")
    lines += ["", "Baselines: random ranking for retrieval, the most frequent phrase for region naming (a phrase is "
              "right when it names a region of nearly the same pixels: IoU >= 0.8), an add-one smoothed unigram "
              "model of the training text for perplexity.", ""]
    if card.get("descriptions_seen") is not None:
        lines += ["## Unit descriptions", "",
                  f"Trained on the descriptions of {len(card['descriptions_seen'])} units; "
                  f"{len(card.get('descriptions_heldout', []))} units were held out (listed in card.json).", ""]
    return "\n".join(lines)
