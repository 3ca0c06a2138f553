"""Load a vision model from local files, safely, and find the layers whose units can be labelled.

A model is named by a spec string:

    torchvision:NAME           architecture from torchvision, weights from --weights (.pth/.pt or .safetensors)
    torchscript:FILE           a TorchScript archive (its inner layers too, see app/sources/scripted.py)
    export:FILE.pt2            a torch.export program saved with torch.export.save (tensors only, no pickles)
    hf:DIR                     a transformers folder written by save_pretrained (no remote code)
    python:FILE.py:FACTORY     FACTORY() from a Python file; runs code, so only with trust_code=True
    builtin:NAME               an architecture that ships with Neuron Studio, weights from a .safetensors file

Nothing is downloaded. Pickled weights are read only through `torch.load(weights_only=True)` (never a fallback),
and every problem is raised as `ModelLoadError` before a model is returned. torch, torchvision and transformers
are imported inside the functions that need them, so importing this module is cheap.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import JobError, ModelLoadError
from app.sources.preprocess import (
    PREPROCESS_KEYS,
    Preprocess,
    PreprocessError,
    default_preprocess_values,
    hf_preprocess_values,
    merge_preprocess,
    parse_preprocess_json,
    torchvision_preprocess_values,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUILTIN_ARCHITECTURES",
    "LayerInfo",
    "LoadedModel",
    "ModelSpec",
    "Preprocess",
    "discover_layers",
    "load_model",
    "parse_spec",
    "unit_maps",
]

log = logging.getLogger(__name__)

SPEC_KINDS = ("torchvision", "torchscript", "export", "hf", "python", "builtin")
SPEC_EXAMPLES = (
    "torchvision:resnet18 (with --weights FILE), torchscript:/path/model.pt, export:/path/model.pt2, hf:/path/folder, "
    "python:/path/file.py:make_model, builtin:shapes_cnn"
)

# Architectures that ship with Neuron Studio: name -> "module:attribute", imported only when asked for.
BUILTIN_ARCHITECTURES: dict[str, str] = {"shapes_cnn": "app.demo.train:ShapesCNN"}

# Metadata keys Neuron Studio writes into (and reads from) .safetensors files.
META_ARCHITECTURE = "neuron_studio.architecture"
META_ARCH_KWARGS = "neuron_studio.arch_kwargs"
META_PREPROCESS = "neuron_studio.preprocess"
META_CLASSES = "neuron_studio.classes"

# torch.load(weights_only=True) had a code-execution bypass before 2.6 and memory corruption before 2.10.
MIN_TORCH_FOR_PICKLED_WEIGHTS = (2, 10)
PICKLE_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_EXTENSION = ".safetensors"
# Training scripts often save {"state_dict": ..., "epoch": ..., "optimizer": ...}.
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "network")
# Leading tokens a ViT may put before its patches: CLS, distillation, registers.
MAX_PREFIX_TOKENS = 16
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------- specs


@dataclass
class ModelSpec:
    kind: str
    target: str
    factory: str | None = None


def parse_spec(spec: str) -> ModelSpec:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("the model spec is empty", fix=f"name a model, e.g. {SPEC_EXAMPLES}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ModelLoadError(
            f"model spec {spec!r} does not say what kind of model it is",
            fix=f"write KIND:TARGET, e.g. {SPEC_EXAMPLES}",
        )
    kind = kind.strip().lower()
    if kind not in SPEC_KINDS:
        close = difflib.get_close_matches(kind, SPEC_KINDS, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ModelLoadError(
            f"model spec {spec!r} has unknown kind {kind!r} (known: {', '.join(SPEC_KINDS)})",
            fix=f"{hint}Examples: {SPEC_EXAMPLES}",
        )
    rest = rest.strip()
    if not rest:
        raise ModelLoadError(f"model spec {spec!r} names no target", fix=f"examples: {SPEC_EXAMPLES}")
    factory: str | None = None
    if kind == "python":
        # Split at the last colon so Windows drive letters ("C:\\...") survive.
        path_part, colon, last = rest.rpartition(":")
        if colon and re.fullmatch(r"[A-Za-z_][\w.]*", last) and not last.endswith(".py"):
            rest, factory = path_part, last
        else:
            raise ModelLoadError(
                f"model spec {spec!r} does not name the function that builds the model",
                fix="write python:FILE.py:FUNCTION, e.g. python:/path/net.py:make_model",
            )
    if kind in ("torchscript", "export", "hf", "python"):
        rest = str(Path(rest).expanduser())
    return ModelSpec(kind=kind, target=rest, factory=factory)


# --------------------------------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    spec: str
    kind: str
    module: torch.nn.Module
    preprocess: Preprocess
    weights_path: Path | None
    fingerprint: str
    class_names: list[str] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":
            out = self.module(pixel_values=x)
            for attr in ("logits", "last_hidden_state"):
                value = getattr(out, attr, None)
                if value is not None:
                    return value
        else:
            out = self.module(x)
        tensor = _first_tensor(out)
        if tensor is None:
            raise ModelLoadError(
                f"the model returned {type(out).__name__}, which holds no tensor",
                file=self.weights_path,
                fix="wrap the model so that forward returns a tensor",
            )
        return tensor

    __call__ = forward

    def to(self, device: str | torch.device) -> LoadedModel:
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        import torch

        for t in self.module.parameters():
            return t.device
        for t in self.module.buffers():
            return t.device
        return torch.device("cpu")


@dataclass
class _Parts:
    """What one kind's loader found, before the shared steps (preprocessing, metadata, device)."""

    module: torch.nn.Module
    weights_path: Path | None
    fingerprint: str
    preprocess_values: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    metadata_file: Path | None = None
    class_names: list[str] | None = None


def load_model(
    spec: str,
    weights: str | Path | None = None,
    *,
    trust_code: bool = False,
    preprocess_overrides: dict | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    parsed = parse_spec(spec)
    overrides = _check_overrides(preprocess_overrides)
    weights_path = Path(weights).expanduser() if weights is not None else None

    if parsed.kind == "torchvision":
        parts = _load_torchvision(parsed.target, weights_path)
    elif parsed.kind == "torchscript" and Path(parsed.target).suffix.lower() != ".pt2":
        parts = _load_torchscript(Path(parsed.target), weights_path)
    elif parsed.kind in ("export", "torchscript"):  # a .pt2 given as torchscript: is a torch.export program
        parts = _load_exported(Path(parsed.target), weights_path)
    elif parsed.kind == "hf":
        parts = _load_hf(Path(parsed.target), weights_path)
    elif parsed.kind == "python":
        parts = _load_python(Path(parsed.target), parsed.factory or "", weights_path, trust_code)
    else:
        parts = _load_builtin(parsed.target, weights_path)

    meta = parts.metadata or {}
    meta_file = parts.metadata_file or parts.weights_path
    meta_preprocess: dict[str, Any] | None = None
    if META_PREPROCESS in meta:
        try:
            meta_preprocess = parse_preprocess_json(meta[META_PREPROCESS])
        except PreprocessError as exc:
            raise ModelLoadError(
                f"the {META_PREPROCESS} metadata is unusable: {exc}", file=meta_file,
                fix="rewrite the file's metadata, or pass the preprocessing options (resize, crop, mean, std)",
            ) from None
    class_names = parts.class_names
    if META_CLASSES in meta:
        class_names = _parse_classes(meta[META_CLASSES], meta_file)

    values = merge_preprocess(default_preprocess_values(), parts.preprocess_values, meta_preprocess, overrides)
    try:
        preprocess = Preprocess.from_dict(values)
    except PreprocessError as exc:
        raise ModelLoadError(
            f"preprocessing is unusable: {exc}", file=meta_file or parsed.target,
            fix="pass preprocessing options (resize, crop, mean, std, interpolation) that fix it",
        ) from None

    module = parts.module
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    _install_saved_edit(module, meta, meta_file)
    try:
        module.to(device)
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot move the model to device {device!r}: {_first_line(exc)}",
            fix="pick a device this machine has (cpu, or cuda when a GPU and CUDA build of torch are present)",
        ) from None
    log.info("loaded %s (%s), fingerprint %s", spec, parts.weights_path or "no weights file", parts.fingerprint[:12])
    return LoadedModel(
        spec=spec,
        kind=parsed.kind,
        module=module,
        preprocess=preprocess,
        weights_path=parts.weights_path,
        fingerprint=parts.fingerprint,
        class_names=class_names,
    )


META_EDIT = "neuron_studio.edit"  # written by app.edit with an edited model's weights


def _install_saved_edit(module: torch.nn.Module, meta: Mapping[str, str], file: Path | None) -> None:
    """An edited model saved as a wrapper (its ablation could not be folded into the weights) carries the edit in
    its metadata: it is applied here, so the file loads as the edited model wherever it is loaded."""
    if META_EDIT not in meta:
        return
    try:
        edit = json.loads(meta[META_EDIT])
    except ValueError as exc:
        raise ModelLoadError(f"the {META_EDIT} metadata is not JSON ({exc})", file=file,
                             fix="save the edited model again with `neuron-studio ablate --save`") from None
    if not isinstance(edit, dict) or edit.get("applied") != "wrapper":
        return  # folded into the weights: nothing to apply
    from app.sources import instrument

    try:
        instrument.install_edit(module, edit)
    except JobError as exc:
        raise ModelLoadError(exc.problem, file=file, fix=exc.fix) from None
    log.info("applied the saved ablation of %d unit(s) of %s", len(edit.get("units", [])), edit.get("layer"))


def _check_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    unknown = sorted(set(overrides) - set(PREPROCESS_KEYS))
    if unknown:
        raise ModelLoadError(
            f"unknown preprocessing options {unknown}",
            fix=f"use only {', '.join(PREPROCESS_KEYS)}",
        )
    return {k: v for k, v in overrides.items() if v is not None}


def _parse_classes(text: str, file: Path | None) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        value = exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelLoadError(
            f"the {META_CLASSES} metadata is not a JSON list of class names", file=file,
            fix="rewrite it as a JSON list of strings, one per output class",
        )
    return value


# --------------------------------------------------------------------------------------------------- kinds


def _load_torchvision(name: str, weights: Path | None) -> _Parts:
    import torchvision.models as tvm

    classifiers = tvm.list_models(module=tvm)
    if name not in classifiers:
        if name in tvm.list_models():
            raise ModelLoadError(
                f"torchvision model {name!r} is not an image classifier; detection, segmentation, video and "
                "quantized models are not supported",
                fix="use a classification backbone (e.g. torchvision:resnet50), or a python:FILE.py:FACTORY spec",
            )
        close = difflib.get_close_matches(name, classifiers, n=5, cutoff=0.5)
        raise ModelLoadError(
            f"torchvision has no classification model named {name!r}",
            fix=(f"did you mean {', '.join(close)}?" if close else
                 "see torchvision.models.list_models(module=torchvision.models) for the names"),
        )
    if weights is None:
        raise ModelLoadError(
            f"torchvision:{name} needs a weights file, and Neuron Studio never downloads weights",
            fix="pass --weights FILE (.pth, .pt or .safetensors), e.g. one saved with "
                "torch.save(model.state_dict(), 'model.pth')",
        )
    state, meta, sha = _read_state_dict(weights)
    kwargs = _torchvision_kwargs(name, state)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # inception/googlenet init-weights notice
            module = tvm.get_model(name, weights=None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - an architecture that cannot be built is the user's input problem
        raise ModelLoadError(
            f"torchvision could not build {name} with {kwargs or 'default settings'}: {_first_line(exc)}",
            file=weights, fix="check that the weights belong to this architecture",
        ) from None
    _load_state_dict_strict(module, state, weights, arch=f"torchvision:{name}")

    class_names = None
    if kwargs.get("num_classes", 1000) == 1000:
        try:
            class_names = list(tvm.get_model_weights(name).DEFAULT.meta["categories"])
        except (ValueError, KeyError, AttributeError):
            class_names = None
    return _Parts(
        module=module, weights_path=weights, fingerprint=sha,
        preprocess_values=torchvision_preprocess_values(name), metadata=meta, class_names=class_names,
    )


def _torchvision_kwargs(name: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer constructor arguments (num_classes, aux_logits) from the state dict, so fine-tuned files load."""
    import torch
    import torchvision.models as tvm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # The meta device allocates nothing, so even large architectures cost only their Python setup.
            with torch.device("meta"):
                ref = tvm.get_model(name, weights=None)
    except Exception:  # noqa: BLE001 - some constructors copy real data; build on the CPU instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ref = tvm.get_model(name, weights=None)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    state = _strip_prefixes(state, ref_shapes)
    kwargs: dict[str, Any] = {}
    counts = set()
    for key, shape in ref_shapes.items():
        got = state.get(key)
        if got is None or not shape or shape[0] != 1000 or got.ndim != len(shape):
            continue
        if got.shape[0] != 1000 and tuple(got.shape[1:]) == shape[1:]:
            counts.add(int(got.shape[0]))
    if len(counts) == 1:
        kwargs["num_classes"] = counts.pop()
    for prefix in ("AuxLogits.", "aux1."):
        if any(k.startswith(prefix) for k in ref_shapes) and not any(k.startswith(prefix) for k in state):
            kwargs["aux_logits"] = False
    if name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = False  # every weight is overwritten; skip the slow truncated-normal init
    return kwargs


def _load_torchscript(path: Path, weights: Path | None) -> _Parts:
    import torch

    _require_file(path, "TorchScript file")
    if weights is not None:
        raise ModelLoadError(
            "a TorchScript file carries its own weights; --weights is not used with torchscript:",
            file=weights, fix="leave --weights out",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the format users have
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - the file is user input; any failure means it is unusable
        text = str(exc)
        if "constants.pkl" in text or "code/" in text:
            raise ModelLoadError(
                "not a TorchScript archive (it looks like a state dict or a torch.save'd object)", file=path,
                fix="for a state dict use torchvision:NAME or python:FILE.py:FACTORY with --weights FILE",
            ) from None
        raise ModelLoadError(
            f"cannot read the TorchScript file, it is truncated or corrupt ({_first_line(exc)})", file=path,
            fix="export it again with torch.jit.script(model).save(path) or torch.jit.trace",
        ) from None
    from app.sources.scripted import ScriptedLayers

    return _Parts(module=ScriptedLayers(module), weights_path=path, fingerprint=_sha256_file(path))


def _load_exported(path: Path, weights: Path | None) -> _Parts:
    from app.sources.scripted import load_exported

    _require_file(path, "torch.export file")
    if weights is not None:
        raise ModelLoadError("a torch.export file carries its own weights; --weights is not used with export:",
                             file=weights, fix="leave --weights out")
    return _Parts(module=load_exported(path), weights_path=path, fingerprint=_sha256_file(path))


def _load_hf(folder: Path, weights: Path | None) -> _Parts:
    if weights is not None:
        raise ModelLoadError(
            "a transformers folder carries its own weights; --weights is not used with hf:",
            file=weights, fix="leave --weights out",
        )
    if not folder.exists():
        raise ModelLoadError(
            "folder not found; hf: takes a local folder and Neuron Studio does not download from the Hub",
            file=folder,
            fix="download the model once elsewhere (e.g. `hf download ORG/NAME --local-dir DIR`) and pass hf:DIR",
        )
    if not folder.is_dir():
        raise ModelLoadError("hf: needs a folder, not a file", file=folder,
                             fix="point hf: at the folder written by save_pretrained")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            "not a transformers model folder: it has no config.json", file=folder,
            fix="point hf: at the folder written by save_pretrained (config.json plus model.safetensors)",
        )
    cfg = _read_json(config_path)
    if "auto_map" in cfg:
        raise ModelLoadError(
            "this model needs its own Python code (config.json has auto_map), and Neuron Studio does not run "
            "remote code", file=config_path,
            fix="use a model whose architecture ships with transformers, or build it in a python:FILE.py:FACTORY "
                "spec and pass --trust-code",
        )
    safetensors_files = sorted(folder.glob("*.safetensors"))
    pickle_files = sorted(folder.glob("pytorch_model*.bin"))
    if not safetensors_files and not pickle_files:
        raise ModelLoadError(
            "the folder holds no weights (model.safetensors or pytorch_model.bin)", file=folder,
            fix="save the model with save_pretrained into this folder",
        )
    if not safetensors_files:
        _require_safe_torch()

    import torch
    import transformers

    architectures = cfg.get("architectures") or []
    wants_classifier = not architectures or any(a.endswith("ForImageClassification") for a in architectures)
    auto_classes = [transformers.AutoModel]
    if wants_classifier:
        auto_classes.insert(0, transformers.AutoModelForImageClassification)
    module = info = None
    used = None
    for auto in auto_classes:
        try:
            module, info = auto.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False, output_loading_info=True,
                dtype=torch.float32,
            )
            used = auto
            break
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc) and auto is not auto_classes[-1]:
                continue  # no classification head for this architecture: take the bare model
            raise ModelLoadError(f"transformers cannot load this folder: {_first_line(exc)}", file=folder,
                                 fix="check config.json and that transformers knows this model_type") from None
        except Exception as exc:  # noqa: BLE001 - corrupt, truncated or mismatched files in the user's folder
            raise ModelLoadError(
                f"transformers cannot load this folder: {_first_line(exc)}", file=folder,
                fix="check that the weights were saved together with this config.json (save_pretrained)",
            ) from None
    assert module is not None and info is not None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ModelLoadError(
            "the weights do not fit config.json: "
            + "; ".join(
                part for part in (
                    f"{len(missing)} missing ({_few(missing)})" if missing else "",
                    f"{len(mismatched)} with another shape ({_few([str(m) for m in mismatched])})"
                    if mismatched else "",
                ) if part
            ),
            file=folder,
            fix="save the model again with save_pretrained, so that config.json and the weights match",
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s: ignored %d weights the model does not use (%s)", folder, len(unexpected), _few(unexpected))

    class_names = None
    id2label = getattr(module.config, "id2label", None)
    if used is not transformers.AutoModel and isinstance(id2label, Mapping) and id2label:
        ordered = [str(id2label[k]) for k in sorted(id2label, key=int)]
        # transformers fills LABEL_0, LABEL_1, ... when the config has no names; those name nothing.
        if not all(re.fullmatch(r"LABEL_\d+", n) for n in ordered):
            class_names = ordered

    preprocess_values: dict[str, Any] | None = None
    proc_path = folder / "preprocessor_config.json"
    if proc_path.is_file():
        preprocess_values = hf_preprocess_values(_read_json(proc_path))
    else:
        size = cfg.get("image_size")
        if isinstance(size, int):
            preprocess_values = {"resize": size, "crop": size, "resize_mode": "square"}
        log.warning("%s has no preprocessor_config.json; using ImageNet mean/std", folder)

    metadata, metadata_file = None, None
    if safetensors_files:
        metadata_file = safetensors_files[0]
        metadata = _safetensors_metadata(metadata_file)
    hashed = [config_path, *safetensors_files, *pickle_files, *sorted(folder.glob("*.index.json"))]
    return _Parts(
        module=module, weights_path=folder, fingerprint=_sha256_files(hashed, base=folder),
        preprocess_values=preprocess_values, metadata=metadata, metadata_file=metadata_file,
        class_names=class_names,
    )


def _load_python(path: Path, factory: str, weights: Path | None, trust_code: bool) -> _Parts:
    import torch

    if not trust_code:
        raise ModelLoadError(
            "a python: spec imports and runs this Python file, which can do anything your account can",
            file=path, fix="only if you trust the file, pass --trust-code (trust_code=True)",
        )
    _require_file(path, "Python file")
    if path.suffix != ".py":
        raise ModelLoadError("python: needs a .py file", file=path, fix="write python:FILE.py:FUNCTION")
    # A unique module name per file content, so two model files called model.py do not collide.
    module_name = "neuron_studio_user_model_" + _sha256_file(path)[:16]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError("cannot import this file", file=path, fix="check that it is a Python source file")
    py_module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = py_module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(py_module)
    except Exception as exc:  # noqa: BLE001 - the user's code failed; report it instead of a traceback
        sys.modules.pop(module_name, None)
        log.exception("importing %s failed", path)
        raise ModelLoadError(f"importing the file failed: {type(exc).__name__}: {_first_line(exc)}", file=path,
                             fix="run the file with python to see the full error") from None
    obj: Any = py_module
    for part in factory.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if obj is None or not callable(obj):
        names = sorted(n for n, v in vars(py_module).items() if callable(v) and not n.startswith("_"))
        raise ModelLoadError(
            f"the file has no function named {factory!r}", file=path,
            fix=f"name one of: {', '.join(names[:10])}" if names else "define a function that returns the model",
        )
    try:
        module = obj()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        log.exception("%s:%s() failed", path, factory)
        raise ModelLoadError(f"{factory}() failed: {type(exc).__name__}: {_first_line(exc)}", file=path,
                             fix=f"make {factory}() work without arguments") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"{factory}() returned {type(module).__name__}, not a torch.nn.Module", file=path,
            fix=f"make {factory}() return the model",
        )
    files = [path]
    meta = None
    if weights is not None:
        state, meta, _ = _read_state_dict(weights)
        _load_state_dict_strict(module, state, weights, arch=f"{path.name}:{factory}()")
        files.append(weights)
    return _Parts(
        module=module, weights_path=weights, fingerprint=_sha256_files(files), metadata=meta,
    )


def _load_builtin(name: str, weights: Path | None) -> _Parts:
    if name not in BUILTIN_ARCHITECTURES:
        close = difflib.get_close_matches(name, list(BUILTIN_ARCHITECTURES), n=3)
        raise ModelLoadError(
            f"there is no built-in architecture named {name!r}",
            fix=(f"did you mean {', '.join(close)}?" if close else
                 f"built-in architectures: {', '.join(sorted(BUILTIN_ARCHITECTURES))}"),
        )
    if weights is None:
        raise ModelLoadError(
            f"builtin:{name} needs its weights", fix="pass --weights FILE.safetensors written by Neuron Studio",
        )
    if weights.suffix.lower() != SAFETENSORS_EXTENSION:
        raise ModelLoadError(
            "built-in architectures read only .safetensors files written by Neuron Studio", file=weights,
            fix="pass the .safetensors file Neuron Studio wrote when it trained the model",
        )
    state, meta, sha = _read_state_dict(weights)
    arch = meta.get(META_ARCHITECTURE)
    if arch is None:
        raise ModelLoadError(
            f"the file has no {META_ARCHITECTURE} metadata, so it was not written by Neuron Studio", file=weights,
            fix="for other weights use a torchvision:, python: or hf: spec",
        )
    if arch != name:
        raise ModelLoadError(
            f"the file holds weights for builtin:{arch}, not builtin:{name}", file=weights,
            fix=f"load it as builtin:{arch}",
        )
    if META_PREPROCESS not in meta:
        raise ModelLoadError(
            f"the file has no {META_PREPROCESS} metadata", file=weights,
            fix="write the file again with Neuron Studio, or pass resize, crop, mean and std",
        )
    try:
        arch_kwargs = json.loads(meta.get(META_ARCH_KWARGS, "{}"))
    except json.JSONDecodeError:
        arch_kwargs = None
    if not isinstance(arch_kwargs, dict):
        raise ModelLoadError(f"the {META_ARCH_KWARGS} metadata is not a JSON object", file=weights,
                             fix="write the file again with Neuron Studio")
    target = BUILTIN_ARCHITECTURES[name]
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"the built-in architecture {name} ({target}) cannot be imported: {exc}",
                             fix="reinstall Neuron Studio") from None
    try:
        module = cls(**arch_kwargs)
    except Exception as exc:  # noqa: BLE001 - arguments from the file's metadata do not fit
        raise ModelLoadError(
            f"cannot build builtin:{name} with {arch_kwargs}: {type(exc).__name__}: {_first_line(exc)}",
            file=weights, fix="write the file again with this version of Neuron Studio",
        ) from None
    _load_state_dict_strict(module, state, weights, arch=f"builtin:{name}")
    return _Parts(module=module, weights_path=weights, fingerprint=sha, metadata=meta)


# --------------------------------------------------------------------------------------------------- weights


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Read a state dict without running code: (tensors by name, safetensors metadata, sha256 of the file)."""
    _require_file(path, "weights file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_EXTENSION:
        from safetensors.torch import load_file

        meta = _safetensors_metadata(path)
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors alike mean an unusable file
            raise ModelLoadError(
                f"cannot read the safetensors file, it is truncated or corrupt ({_first_line(exc)})", file=path,
                fix="copy or save the file again",
            ) from None
        return state, meta, _sha256_file(path)
    if suffix in PICKLE_EXTENSIONS:
        import torch

        _require_safe_torch()
        try:
            with warnings.catch_warnings():  # torch's note on the pickle protocol is not the user's concern
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated zips raise RuntimeError, junk KeyError/EOFError
            # Why it failed is read from the file itself, not from torch's wording (which changes between
            # versions and suggests weights_only=False, the one thing never to do with an untrusted file).
            raise _unreadable_weights(path, exc) from None
        return _unwrap_state_dict(obj, path), {}, _sha256_file(path)
    raise ModelLoadError(
        f"unknown weights format {path.suffix or '(no extension)'!r}", file=path,
        fix=f"pass a .safetensors file or a state dict saved with torch.save ({', '.join(PICKLE_EXTENSIONS)})",
    )


@dataclass
class _PickleScan:
    is_pickle: bool  # the bytes parse as a pickle stream (or a torch zip holding one)
    zip_damaged: bool  # a zip archive (torch's format) whose directory cannot be read
    code_globals: list[str]  # classes and functions the stream names that a weights-only load refuses


def _allowed_globals() -> set[str]:
    """Names torch's weights-only unpickler accepts ("module.name"), or an empty set where torch hides them."""
    names: set[str] = set()
    try:
        from torch import _weights_only_unpickler as wou

        names |= set(wou._get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private helper; without it every non-torch global counts as code
        pass
    try:
        import torch.serialization as ser

        names |= {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}"
                  for g in ser.get_safe_globals() if not isinstance(g, tuple)}
    except Exception:  # noqa: BLE001
        pass
    return names


def _scan_pickle(path: Path, limit: int = 64 * 2**20) -> _PickleScan:
    """Walk the pickle opcodes of a weights file without executing anything, noting every global it names."""
    import pickletools
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(4)
    data: bytes
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            if member is None:
                return _PickleScan(False, False, [])
            with zf.open(member) as fh:
                data = fh.read(limit)
    elif head == b"PK\x03\x04":
        return _PickleScan(False, True, [])
    else:
        with open(path, "rb") as fh:
            data = fh.read(limit)
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    parsed = 0
    stream = io.BytesIO(data)
    # torch's legacy format is several pickles in a row (magic number, version, ..., the object), then raw bytes.
    while stream.tell() < len(data) and parsed < 8:
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                               "BINSTRING", "STRING"):
                    strings.append(str(arg))
                elif op.name in ("MEMOIZE",) and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                    strings.append(memo[int(arg)])
                elif op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle: junk, or the raw storages after the pickles
            break
        parsed += 1
    if not parsed:
        return _PickleScan(False, False, [])
    allowed = _allowed_globals()
    safe_prefixes = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.")
    code = [n for n in dict.fromkeys(names)
            if n not in allowed and not (not allowed and n.startswith(safe_prefixes))]
    return _PickleScan(True, False, code)


def _unreadable_weights(path: Path, exc: BaseException) -> ModelLoadError:
    """The message for a pickled weights file torch.load(weights_only=True) refused, by what the file holds."""
    try:
        scan = _scan_pickle(path)
    except OSError as err:
        return _corrupt(path, err)
    if scan.code_globals:
        shown = ", ".join(scan.code_globals[:3]) + (", ..." if len(scan.code_globals) > 3 else "")
        return ModelLoadError(
            f"the file is not plain weights: it holds Python objects ({shown}) that only unpickling could rebuild, "
            "and Neuron Studio will not unpickle them because that can run arbitrary code",
            file=path,
            fix="if you trust its author, open it in Python and save only the weights: "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')",
        )
    if scan.zip_damaged:
        return _corrupt(path, exc)
    if not scan.is_pickle:
        return ModelLoadError(
            "not a weights file: neither a PyTorch checkpoint (torch.save) nor a safetensors file", file=path,
            fix="pass the weights file itself (a .safetensors file, or a state dict saved with torch.save)",
        )
    return _corrupt(path, exc)


def _corrupt(path: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read the weights file, it is truncated or corrupt ({type(exc).__name__}: {_first_line(exc)})",
        file=path, fix="copy or save the file again",
    )


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    def is_state_dict(x: Any) -> bool:
        return (isinstance(x, Mapping) and len(x) > 0
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items()))

    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in NESTED_STATE_DICT_KEYS:
            if is_state_dict(obj.get(key)):
                log.info("%s: using the state dict under %r", path, key)
                return dict(obj[key])
        keys = [repr(k) for k in list(obj)[:8]]
        raise ModelLoadError(
            "the file holds no state dict (a mapping of parameter names to tensors, at the top or under "
            f"{', '.join(repr(k) for k in NESTED_STATE_DICT_KEYS[:2])}); its top-level keys are "
            f"{', '.join(keys) or 'none'}",
            file=path, fix="save the weights with torch.save(model.state_dict(), path)",
        )
    raise ModelLoadError(
        f"the file holds a {type(obj).__name__}, not a state dict", file=path,
        fix="save the weights with torch.save(model.state_dict(), path)",
    )


def _strip_prefixes(state: Mapping[str, Any], model_keys: Mapping[str, Any]) -> dict[str, Any]:
    """Drop wrapper prefixes every key shares but the model lacks ("module." from DataParallel, "_orig_mod."
    from torch.compile, "model." from Lightning)."""
    state = dict(state)
    while state:
        first = next(iter(state)).split(".", 1)[0]
        prefix = first + "."
        if not all(k.startswith(prefix) for k in state) or any(k.startswith(prefix) for k in model_keys):
            break
        log.info("stripping prefix %r from the weights' keys", prefix)
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                            *, arch: str) -> None:
    """strict=True semantics, checked by hand so the message names the keys and shapes that differ."""
    expected = module.state_dict()
    state = _strip_prefixes(state, expected)
    # BatchNorm counters are absent from old checkpoints and unused in eval mode.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights the architecture needs are missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} weights in the file are not in the architecture ({_few(unexpected)})")
        raise ModelLoadError(
            f"the weights do not fit {arch}: " + "; ".join(parts), file=path,
            fix="check that the file was saved from this architecture",
        )
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if mismatched:
        key, got, want = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ModelLoadError(
            f"the weights do not fit {arch}: {key!r} has shape {list(got)} in the file but {list(want)} in the "
            f"architecture{more}", file=path,
            fix="check that the file was saved from this architecture with the same settings (e.g. number of "
                "classes)",
        )
    state = dict(state)
    for k, v in expected.items():
        if k not in state:
            state[k] = v  # a num_batches_tracked counter
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"the weights do not fit {arch}: {_first_line(exc)}", file=path,
                             fix="check that the file was saved from this architecture") from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - SafetensorError is not importable under a stable name
        raise ModelLoadError(
            f"cannot read the safetensors file, it is truncated or corrupt ({_first_line(exc)})", file=path,
            fix="copy or save the file again",
        ) from None


def _require_safe_torch(version: str | None = None) -> None:
    if version is None:
        import torch

        version = str(torch.__version__)
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and (int(found.group(1)), int(found.group(2))) >= MIN_TORCH_FOR_PICKLED_WEIGHTS:
        return
    need = ".".join(map(str, MIN_TORCH_FOR_PICKLED_WEIGHTS))
    raise ModelLoadError(
        f"torch {version} cannot read pickled weights (.pth/.pt/.bin) safely: torch.load(weights_only=True) had a "
        f"code-execution bypass before 2.6 and memory corruption before {need}",
        fix=f"upgrade with pip install -U 'torch>={need}', or use a .safetensors file",
    )


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelLoadError(f"{what} not found", file=path, fix="check the path")
    if not path.is_file():
        raise ModelLoadError(f"{what} is a folder, not a file", file=path, fix="point at the file itself")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read this JSON file: {_first_line(exc)}", file=path,
                             fix="repair or write the file again") from None
    if not isinstance(value, dict):
        raise ModelLoadError("this JSON file does not hold an object", file=path, fix="repair or write it again")
    return value


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_files(paths: list[Path], base: Path | None = None) -> str:
    """One file: its own sha256 (so it matches `sha256sum`); several: a hash over their names and hashes."""
    if len(paths) == 1:
        return _sha256_file(paths[0])
    h = hashlib.sha256()
    for p in paths:
        label = p.relative_to(base).as_posix() if base is not None else p.name
        h.update(f"{label}\t{_sha256_file(p)}\n".encode())
    return h.hexdigest()


def _few(items: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(i) if not i.startswith("(") else i for i in items[:n])
    return shown + (", ..." if len(items) > n else "")


# Sentences in torch's errors that advise loading with weights_only=False: never passed on to a user.
_UNSAFE_ADVICE = re.compile(r"weights_only|Weights only load failed|arbitrary code|trusted source|file an issue",
                            re.IGNORECASE)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first meaningful line of an error, without torch's weights_only advice, cut at a word boundary."""
    lines = [ln.strip() for ln in (str(exc).strip() or type(exc).__name__).splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        sentences = [x for x in re.split(r"(?<=[.!?])\s+", ln) if x and not _UNSAFE_ADVICE.search(x)]
        if sentences:
            kept.append(" ".join(sentences))
    if not kept:
        inner = exc.__cause__ or exc.__context__
        return _first_line(inner, limit) if inner is not None and inner is not exc else type(exc).__name__
    text = kept[0]
    if len(text) > limit:
        cut = text[:limit]
        space = cut.rfind(" ")
        text = (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + " ..."
    return text


# --------------------------------------------------------------------------------------------------- layers


@dataclass
class LayerInfo:
    name: str  # dotted module path as named_modules() gives it; "" is the model's output (LoadedModel.forward)
    type: str  # module class name
    shape: tuple[int, ...]  # output shape without the batch dimension
    kind: str  # "conv" | "linear" | "vit" | "other" (not extractable)
    units: int  # C, F or D; 0 for "other"
    grid: tuple[int, int] | None  # (H, W) for conv, (1, 1) for linear, the patch grid (h, w) for vit
    prefix_tokens: int = 0  # vit: leading non-patch tokens (CLS, distillation, registers)
    channels_last: bool = False  # conv output laid out [B, H, W, C] (torchvision Swin, ConvNeXt permutes)
    calls: int = 1  # how many times the module ran in one forward pass
    note: str = ""  # why a layer is "other"


def discover_layers(model: LoadedModel) -> list[LayerInfo]:
    """One dry run of a 1 x 3 x crop x crop zero image, watching every named module (`instrument.watch`).

    The root module is listed first under the name "" with the output of `LoadedModel.forward`. A TorchScript
    model's submodules are hooked through its `ScriptedLayers` wrapper's taps. A module that runs more than once per
    forward pass (a ReLU shared inside a ResNet block) is "other": its output per image is ambiguous.
    """
    import torch

    module = model.module
    crop = model.preprocess.crop
    device, dtype = torch.device("cpu"), torch.float32
    for p in module.parameters():
        device, dtype = p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
        break
    x = torch.zeros(1, 3, crop, crop, device=device, dtype=dtype)

    named = list(module.named_modules())
    seen: dict[str, tuple[tuple[int, ...], torch.dtype] | None] = {}
    calls: dict[str, int] = {}

    def record(name: str, output: Any) -> None:
        calls[name] = calls.get(name, 0) + 1
        t = _first_tensor(output)
        seen[name] = (tuple(t.shape), t.dtype) if t is not None else None

    from app.sources import instrument

    with instrument.watch(module, [name for name, _sub in named if name], record):
        try:
            with torch.no_grad():
                out = model.forward(x)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model that cannot run on its own preprocessing is a user problem
            log.exception("dry run of %s failed", model.spec)
            raise ModelLoadError(
                f"a test pass of one {crop}x{crop} image through the model failed: {type(exc).__name__}: "
                f"{_first_line(exc)}",
                file=model.weights_path,
                fix="check that the crop size matches the input size the model expects (preprocessing option crop)",
            ) from None

    hint = _patch_count_hint(model)
    layers: list[LayerInfo] = []
    for name, sub in named:
        type_name = type(sub).__name__
        if type_name in ("RecursiveScriptModule", "LayerTap", "ScriptedLayers", "InterpreterModule",
                         "UnflattenedModule"):
            type_name = getattr(sub, "original_name", type_name)
        if not name:
            layers.append(_describe("", type_name, (tuple(out.shape), out.dtype), 1, hint))
        else:
            layers.append(_describe(name, type_name, seen.get(name), calls.get(name, 0), hint))
    return layers


def _describe(name: str, type_name: str, record: tuple[tuple[int, ...], Any] | None, n_calls: int,
              patch_hint: int | None) -> LayerInfo:
    def other(shape: tuple[int, ...], note: str) -> LayerInfo:
        return LayerInfo(name, type_name, shape, "other", 0, None, calls=n_calls, note=note)

    if n_calls == 0:
        return other((), "not run during a forward pass")
    if record is None:
        return other((), "its output holds no tensor")
    full, dtype = record
    shape = tuple(full[1:])
    if n_calls > 1:
        return other(shape, f"runs {n_calls} times per forward pass, so its output per image is ambiguous")
    if not dtype.is_floating_point:
        return other(shape, "its output is not floating point")
    if len(full) == 0 or full[0] != 1:
        return other(shape, "its output has no batch dimension")
    if len(full) == 2:
        return LayerInfo(name, type_name, shape, "linear", full[1], (1, 1), calls=n_calls)
    if len(full) == 4:
        _, a, b, c = full
        # Inputs are square, so a map is square; [B, H, W, C] shows as two equal leading dims and a different last.
        if b != c and a == b:
            return LayerInfo(name, type_name, shape, "conv", c, (a, b), channels_last=True, calls=n_calls)
        return LayerInfo(name, type_name, shape, "conv", a, (b, c), calls=n_calls)
    if len(full) == 3:
        tokens, dim = full[1], full[2]
        prefix = _prefix_tokens(tokens, patch_hint)
        if prefix is None:
            return other(shape, "a 3-D output whose tokens do not form a square patch grid")
        side = math.isqrt(tokens - prefix)
        return LayerInfo(name, type_name, shape, "vit", dim, (side, side), prefix_tokens=prefix, calls=n_calls)
    return other(shape, f"a {len(full)}-D output")


def _prefix_tokens(tokens: int, patch_hint: int | None) -> int | None:
    if patch_hint is not None and 0 <= tokens - patch_hint <= MAX_PREFIX_TOKENS:
        return tokens - patch_hint
    # Smallest prefix first: a square token count is a grid with no prefix (Swin stages, patch embeddings).
    for prefix in range(0, min(MAX_PREFIX_TOKENS, tokens - 4) + 1):
        n = tokens - prefix
        if math.isqrt(n) ** 2 == n:
            return prefix
    return None


def _patch_count_hint(model: LoadedModel) -> int | None:
    """Number of patches the model's own patch size gives at this crop (transformers config or torchvision
    VisionTransformer), used to tell CLS/register tokens from patches."""
    module = model.module
    patch = getattr(getattr(module, "config", None), "patch_size", None)
    if patch is None:
        patch = getattr(module, "patch_size", None)
    if isinstance(patch, (list, tuple)) and patch:
        patch = patch[0]
    if isinstance(patch, int) and patch > 0:
        return (model.preprocess.crop // patch) ** 2
    return None


def unit_maps(layer: LayerInfo, output: Any) -> torch.Tensor:
    """A hooked layer's raw output -> [B, units, h, w]: conv as is, linear [B, F] -> [B, F, 1, 1],
    vit [B, T, D] -> patch tokens only -> [B, D, h, w] (row-major patch order)."""
    t = _first_tensor(output)
    if t is None:
        raise ModelLoadError(f"layer {layer.name!r} produced no tensor", fix="choose another layer")
    if layer.kind == "conv":
        if t.ndim != 4:
            raise _shape_error(layer, t)
        return t.permute(0, 3, 1, 2) if layer.channels_last else t
    if layer.kind == "linear":
        if t.ndim != 2:
            raise _shape_error(layer, t)
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    if layer.kind == "vit":
        if t.ndim != 3:
            raise _shape_error(layer, t)
        b, tokens, dim = t.shape
        n = tokens - layer.prefix_tokens
        h, w = layer.grid or (0, 0)
        if h * w != n:
            # Another input size than at discovery: the grid is still square.
            side = math.isqrt(max(n, 0))
            if side * side != n or n == 0:
                raise _shape_error(layer, t)
            h = w = side
        return t[:, layer.prefix_tokens:, :].transpose(1, 2).reshape(b, dim, h, w)
    raise ModelLoadError(
        f"layer {layer.name!r} ({layer.type}) has no units to label: {layer.note or 'unsupported output'}",
        fix="choose a convolution, linear or transformer-block layer",
    )


def _shape_error(layer: LayerInfo, t: torch.Tensor) -> ModelLoadError:
    return ModelLoadError(
        f"layer {layer.name!r} gave an output of shape {list(t.shape)}, which does not fit its {layer.kind} "
        f"description {list(layer.shape)}",
        fix="run layer discovery again for this model and input size",
    )


def _first_tensor(output: Any) -> torch.Tensor | None:
    from app.sources.instrument import first_tensor

    return first_tensor(output)
