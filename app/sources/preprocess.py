"""How images become model input: one `Preprocess` record per loaded model, and the readers that derive it from a
torchvision weights enum or a transformers `preprocessor_config.json`.

torch and torchvision are imported inside functions only, so the window can import this module cheaply.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Values of torchvision.transforms.InterpolationMode, kept here so validation does not import torchvision.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
# PIL resample codes as transformers preprocessor configs store them.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# "shorter": scale the shorter side to `resize` (torchvision recipes). "square": warp to resize x resize, which is
# what transformers processors with size {"height", "width"} do (ViT, DeiT, BEiT).
RESIZE_MODES = ("shorter", "square")
PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "interpolation", "resize_mode")


class PreprocessError(ValueError):
    """A preprocessing value that cannot be used; callers turn it into their own error with the file it came from."""


@dataclass
class Preprocess:
    """Resize -> center crop -> tensor in [0, 1] -> normalise. Model input is 3 x crop x crop."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize_mode: str = "shorter"

    def __post_init__(self) -> None:
        self.resize = _positive_int(self.resize, "resize")
        self.crop = _positive_int(self.crop, "crop")
        self.mean = _triple(self.mean, "mean")
        self.std = _triple(self.std, "std")
        if any(s <= 0 for s in self.std):
            raise PreprocessError(f"std must be positive, got {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessError(
                f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise PreprocessError(f"resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")

    def transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        return PreprocessTransform(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        unknown = sorted(set(d) - set(PREPROCESS_KEYS))
        if unknown:
            raise PreprocessError(f"unknown preprocessing keys {unknown}; known: {', '.join(PREPROCESS_KEYS)}")
        missing = [k for k in ("resize", "crop", "mean", "std") if k not in d]
        if missing:
            raise PreprocessError(f"preprocessing lacks {', '.join(missing)}")
        return cls(**dict(d))


class PreprocessTransform:
    """A picklable callable (DataLoader workers may be spawned processes), unlike a lambda or closure."""

    def __init__(self, preprocess: Preprocess):
        from torchvision.transforms import InterpolationMode, v2

        import torch

        self.preprocess = preprocess
        size: int | list[int] = preprocess.resize
        if preprocess.resize_mode == "square":
            size = [preprocess.resize, preprocess.resize]
        self._compose = v2.Compose(
            [
                v2.Resize(size, interpolation=InterpolationMode(preprocess.interpolation), antialias=True),
                v2.CenterCrop(preprocess.crop),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(preprocess.mean), list(preprocess.std)),
            ]
        )

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        # Grayscale, palette and RGBA files are common in datasets; models take 3 channels.
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._compose(image)

    def __repr__(self) -> str:
        return f"PreprocessTransform({self.preprocess})"


def merge_preprocess(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers win: defaults, then what the model source says, then file metadata, then the user."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update({k: v for k, v in layer.items() if v is not None})
    return merged


def default_preprocess_values() -> dict[str, Any]:
    return {"resize": 224, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear",
            "resize_mode": "shorter"}


def parse_preprocess_json(text: str) -> dict[str, Any]:
    """The `neuron_studio.preprocess` metadata value: a JSON object with resize, crop, mean, std (+ optional
    interpolation, resize_mode)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreprocessError(f"preprocessing metadata is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PreprocessError("preprocessing metadata is not a JSON object")
    unknown = sorted(set(value) - set(PREPROCESS_KEYS))
    if unknown:
        raise PreprocessError(f"unknown preprocessing keys {unknown}; known: {', '.join(PREPROCESS_KEYS)}")
    return value


def torchvision_preprocess_values(name: str) -> dict[str, Any] | None:
    """Read the recipe from torchvision's weights enum; building the transform object downloads nothing."""
    import torchvision.models

    try:
        weights_enum = torchvision.models.get_model_weights(name)
        weights = weights_enum.DEFAULT
        t = weights.transforms()
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        log.info("no weights recipe for torchvision model %s (%s); using ImageNet defaults", name, exc)
        return None
    values: dict[str, Any] = {}
    for attr, key in (("resize_size", "resize"), ("crop_size", "crop")):
        v = getattr(t, attr, None)
        if isinstance(v, (list, tuple)) and len(v) >= 1:
            values[key] = int(v[0])
        elif isinstance(v, int):
            values[key] = v
    for key in ("mean", "std"):
        v = getattr(t, key, None)
        if v is not None:
            values[key] = tuple(float(x) for x in v)
    interp = getattr(t, "interpolation", None)
    if interp is not None:
        values["interpolation"] = getattr(interp, "value", str(interp))
    values["resize_mode"] = "shorter"
    return values


def hf_preprocess_values(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a transformers image processor config into our fields.

    Handles size as an int, {"height", "width"} (warp to a square), {"shortest_edge"} (scale the shorter side,
    with ConvNeXt's crop_pct), and crop_size as an int or a dict. Leaves resize/crop out where the config cannot be
    expressed as a square crop, so the caller can ask for overrides.
    """
    values: dict[str, Any] = {}
    do_resize = cfg.get("do_resize", True)
    do_crop = cfg.get("do_center_crop", "crop_size" in cfg)
    crop_pct = cfg.get("crop_pct")
    size = cfg.get("size")
    crop_size = cfg.get("crop_size")

    resize: int | None = None
    mode = "shorter"
    if isinstance(size, (int, float)):
        resize = int(size)
        # Old configs store an int: ViT/BEiT warp to a square, CLIP/ConvNeXt (which crop) scale the shorter side.
        mode = "shorter" if (do_crop and crop_size is not None) or crop_pct is not None else "square"
    elif isinstance(size, Mapping):
        if "height" in size and "width" in size:
            h, w = int(size["height"]), int(size["width"])
            if h == w:
                resize, mode = h, "square"
            else:
                log.warning("non-square resize %sx%s in preprocessor config; pass resize/crop overrides", h, w)
        elif "shortest_edge" in size:
            resize, mode = int(size["shortest_edge"]), "shorter"
    crop: int | None = None
    if do_crop and crop_size is not None:
        if isinstance(crop_size, (int, float)):
            crop = int(crop_size)
        elif isinstance(crop_size, Mapping) and "height" in crop_size and "width" in crop_size:
            if int(crop_size["height"]) == int(crop_size["width"]):
                crop = int(crop_size["height"])
            else:
                log.warning("non-square crop in preprocessor config; pass a crop override")
    if resize is not None and crop_pct is not None and crop is None and mode == "shorter":
        # ConvNeXt: below 384 it scales the shorter side to size / crop_pct and crops `size`; at 384+ it warps.
        if resize < 384:
            crop, resize = resize, int(resize / float(crop_pct))
        else:
            crop, mode = resize, "square"
    if resize is not None and crop is None and (mode == "square" or not do_crop):
        crop = resize
    if not do_resize and crop is not None:
        resize = crop
    if resize is not None and crop is not None:
        values.update(resize=resize, crop=crop, resize_mode=mode)

    if cfg.get("do_normalize", True):
        if "image_mean" in cfg:
            values["mean"] = _triple(cfg["image_mean"], "image_mean")
        if "image_std" in cfg:
            values["std"] = _triple(cfg["image_std"], "image_std")
    else:
        values["mean"], values["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if cfg.get("do_rescale", True) is False:
        log.warning("preprocessor config has do_rescale=false; Neuron Studio always scales pixels to [0, 1]")
    resample = cfg.get("resample")
    if isinstance(resample, int) and resample in PIL_RESAMPLE:
        values["interpolation"] = PIL_RESAMPLE[resample]
    return values


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or int(value) <= 0:
        raise PreprocessError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise PreprocessError(f"{name} must be three numbers (one per RGB channel), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise PreprocessError(f"{name} must be three finite numbers, got {value!r}")
        out.append(float(v))
    return (out[0], out[1], out[2])
