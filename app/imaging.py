"""Pictures of unit activation maps, in numpy and PIL only (no Qt): the extraction (mask geometry), the exporters,
the naming board and the window all use them.

Geometry. A unit's map covers the model's input: the stored image resized and centre-cropped exactly like
`app.sources.preprocess` does it (torchvision's Resize + CenterCrop, zero padding where the crop is larger than the
resized image). Maps are enlarged with bilinear interpolation at pixel centres (PyTorch's `align_corners=False`,
which is also what PIL does for enlargement and what Network Dissection's `threshold_and_upsample` uses), and a
region is where the enlarged map is strictly above the unit's threshold, as in the engine.

Two frames are offered:
- the model's view (`model_view`, `upsample_map`): what the unit saw, for thumbnails and overlays;
- the stored image (`map_on_image`): the map placed on the original pixel grid, for masks and crops that must line
  up with the files on disk (COCO segmentations, concept-set crops). Pixels the model never saw get -inf, so they
  are never inside a region.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "colormap", "model_view_box", "model_view", "upsample_map", "map_on_image", "region", "outline", "bbox",
    "heat_overlay", "contour_rgba", "contour_overlay", "feature_rgba", "has_extent", "masked_image", "crop_region", "exemplar_picture", "png_bytes", "data_uri", "RENDER_MODES",
]

# "outline" first: the default picture keeps the image's own colours (a contour of the thresholded region and a
# light tint inside it), so a group named "circle" is not really purple rings under a heat map.
RENDER_MODES = ("outline", "heat", "region", "crop")
CONTOUR_RGB = (255, 214, 0)

# Inferno, sampled at nine stops (matplotlib's values, rounded): dark for silence, bright yellow for the peak.
_STOPS = np.array([
    (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51), (249, 140, 10),
    (249, 201, 50), (252, 255, 164),
], dtype=np.float64)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, c])
                 for c in range(3)], axis=1).round().astype(np.uint8)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS,
}


def colormap(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (clipped; NaN counts as 0) -> uint8 RGB of the same shape plus a last axis of 3."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return _LUT[(np.clip(v, 0.0, 1.0) * 255).round().astype(np.int64)]


# ---- geometry ----------------------------------------------------------------------------------------------------
def _resized_size(width: int, height: int, preprocess: Mapping[str, Any]) -> tuple[int, int]:
    crop = int(preprocess.get("crop") or 224)
    resize = int(preprocess.get("resize") or crop)
    if preprocess.get("resize_mode", "shorter") == "square":
        return resize, resize
    # torchvision: the shorter side becomes `resize`, the longer one int(resize * long / short)
    if width <= height:
        return resize, max(1, int(resize * height / width))
    return max(1, int(resize * width / height)), resize


def _crop_offset(size: int, crop: int) -> int:
    """Where torchvision's CenterCrop starts along one side: rounded half the excess, or minus the left/top zero
    padding (half the shortfall, rounded down) where the side is shorter than the crop."""
    return int(round((size - crop) / 2.0)) if size >= crop else -((crop - size) // 2)


def model_view_box(width: int, height: int, preprocess: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the model's input crop in stored-image pixels. It reaches outside the image
    where the crop is larger than the resized image (the model saw zero padding there)."""
    crop = int(preprocess.get("crop") or 224)
    nw, nh = _resized_size(width, height, preprocess)
    sx, sy = nw / width, nh / height
    left, top = _crop_offset(nw, crop), _crop_offset(nh, crop)
    return left / sx, top / sy, (left + crop) / sx, (top + crop) / sy


def model_view(image: Image.Image, preprocess: Mapping[str, Any], size: int | None = None) -> Image.Image:
    """The pixels the model saw (resize, centre crop, zero padding), optionally shrunk to size x size."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    crop = int(preprocess.get("crop") or 224)
    nw, nh = _resized_size(image.width, image.height, preprocess)
    resample = _RESAMPLE.get(str(preprocess.get("interpolation", "bilinear")), Image.Resampling.BILINEAR)
    resized = image.resize((nw, nh), resample)
    left, top = _crop_offset(nw, crop), _crop_offset(nh, crop)
    view = Image.new("RGB", (crop, crop))
    view.paste(resized, (-left, -top))
    if size is not None and size != crop:
        view = view.resize((size, size), Image.Resampling.BILINEAR)
    return view


def _bilinear(amap: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample [h, w] at fractional map coordinates (pixel-centre convention), edges clamped."""
    h, w = amap.shape
    ys = np.clip(ys, 0.0, h - 1)
    xs = np.clip(xs, 0.0, w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None].astype(np.float32)
    wx = (xs - x0)[None, :].astype(np.float32)
    top = amap[np.ix_(y0, x0)] * (1 - wx) + amap[np.ix_(y0, x1)] * wx
    bottom = amap[np.ix_(y1, x0)] * (1 - wx) + amap[np.ix_(y1, x1)] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def upsample_map(amap: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """[h, w] -> [H, W] float32 (size is an int for a square, or (W, H)), equal to
    `F.interpolate(..., mode='bilinear', align_corners=False)`."""
    m = np.asarray(amap, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"a unit map is 2-D, got shape {m.shape}")
    W, H = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if m.shape == (H, W):
        return m.copy()
    ys = (np.arange(H) + 0.5) * (m.shape[0] / H) - 0.5
    xs = (np.arange(W) + 0.5) * (m.shape[1] / W) - 0.5
    return _bilinear(m, ys, xs)


def map_on_image(amap: np.ndarray, image_size: tuple[int, int], preprocess: Mapping[str, Any]) -> np.ndarray:
    """The map placed on the stored image of size (W, H): [H, W] float32, -inf where the model saw nothing of it."""
    m = np.asarray(amap, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"a unit map is 2-D, got shape {m.shape}")
    W, H = int(image_size[0]), int(image_size[1])
    left, top, right, bottom = model_view_box(W, H, preprocess)
    cx = np.arange(W) + 0.5
    cy = np.arange(H) + 0.5
    xs = (cx - left) / (right - left) * m.shape[1] - 0.5
    ys = (cy - top) / (bottom - top) * m.shape[0] - 0.5
    out = _bilinear(m, ys, xs)
    seen_x = (cx >= left) & (cx <= right)
    seen_y = (cy >= top) & (cy <= bottom)
    out[~(seen_y[:, None] & seen_x[None, :])] = -np.inf
    return out


def region(values: np.ndarray, threshold: float) -> np.ndarray:
    """The thresholded region: strictly above the threshold, as the engine counts it."""
    return np.asarray(values) > float(threshold)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the region's border)."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end-exclusive, of the True pixels; None for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ---- pictures ----------------------------------------------------------------------------------------------------
def heat_overlay(image: Image.Image, values: np.ndarray, *, vmin: float | None = None, vmax: float | None = None,
                 threshold: float | None = None, opacity: float = 0.5, dim: float = 0.7,
                 outline_rgb: tuple[int, int, int] = (80, 220, 255)) -> Image.Image:
    """The activation over `image` (same size as `values`): silent parts darkened by up to `dim`, active parts
    tinted with the colour map (up to `opacity`), and with `threshold` the region's border in `outline_rgb`.
    Darkening keeps the response readable on any content (a tint alone vanishes on objects of its own colour)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    v = np.asarray(values, dtype=np.float32)
    if base.shape[:2] != v.shape:
        raise ValueError(f"image is {base.shape[1]}x{base.shape[0]} but the values are {v.shape[1]}x{v.shape[0]}")
    finite = np.isfinite(v)
    lo = float(np.min(v[finite])) if vmin is None and finite.any() else float(vmin or 0.0)
    hi = float(np.max(v[finite])) if vmax is None and finite.any() else float(vmax if vmax is not None else 1.0)
    t = np.where(finite, (v - lo) / (hi - lo), 0.0) if hi > lo else np.zeros_like(v)
    t = np.clip(t, 0.0, 1.0)
    out = base * ((1 - dim) + dim * np.sqrt(t))[..., None]
    alpha = (opacity * t)[..., None]
    out = out * (1 - alpha) + colormap(t).astype(np.float32) * alpha
    if threshold is not None:
        edge = outline(region(v, threshold))
        out[edge] = outline_rgb
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def has_extent(amap: np.ndarray) -> bool:
    """Whether a unit's map has a spatial extent to draw (a 1x1 map, a linear feature, has none)."""
    return np.asarray(amap).size > 1


def _thick(mask: np.ndarray, width: int) -> np.ndarray:
    """`mask` grown by width-1 pixels (4-neighbour steps): a contour thick enough to see at thumbnail size."""
    out = np.asarray(mask, dtype=bool).copy()
    for _ in range(max(0, width - 1)):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def contour_rgba(values: np.ndarray, threshold: float, *, tint: float = 0.22,
                 rgb: tuple[int, int, int] = CONTOUR_RGB, width: int | None = None) -> np.ndarray:
    """An RGBA layer over an image of the same size: the thresholded region lightly tinted, its contour opaque
    (about 1/64 of the side thick), everything else transparent, so the image keeps its colours."""
    v = np.asarray(values, dtype=np.float32)
    active = region(v, threshold)
    width = width if width is not None else max(1, round(max(v.shape) / 64))
    border = _thick(outline(active), width) & (active | _thick(active, width))
    out = np.zeros((*v.shape, 4), dtype=np.uint8)
    out[active, :3] = rgb
    out[active, 3] = round(255 * tint)
    out[border, :3] = rgb
    out[border, 3] = 255
    return out


def _composite(image: Image.Image, rgba: np.ndarray) -> Image.Image:
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = base * (1 - a) + rgba[..., :3].astype(np.float32) * a
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def contour_overlay(image: Image.Image, values: np.ndarray, threshold: float, **kw: Any) -> Image.Image:
    """The image in its own colours with the region's contour and a light tint (see `contour_rgba`)."""
    return _composite(image, contour_rgba(values, threshold, **kw))


def feature_rgba(side: int, value: float, threshold: float, vmin: float | None = None,
                 vmax: float | None = None, rgb: tuple[int, int, int] = CONTOUR_RGB) -> np.ndarray:
    """The overlay of a map without spatial extent (1x1): a frame when the activation is above the threshold and
    a bar along the bottom as long as the activation, never a tint of the whole picture."""
    out = np.zeros((side, side, 4), dtype=np.uint8)
    lo = 0.0 if vmin is None else float(vmin)
    hi = value if vmax is None else float(vmax)
    t = float(np.clip((value - lo) / (hi - lo), 0.0, 1.0)) if hi > lo else 1.0
    bar = max(3, side // 14)
    out[side - bar:, :, 3] = 160
    out[side - bar:, : max(1, round(t * side)), :3] = colormap(max(t, 0.15))
    out[side - bar:, : max(1, round(t * side)), 3] = 255
    if value > threshold:
        width = max(2, side // 48)
        for sl in ((slice(0, width), slice(None)), (slice(None), slice(0, width)), (slice(None), slice(-width, None)),
                   (slice(side - bar - width, side - bar), slice(None))):
            out[sl[0], sl[1], :3] = rgb
            out[sl[0], sl[1], 3] = 255
    return out


def masked_image(image: Image.Image, mask: np.ndarray, dim: float = 0.25) -> Image.Image:
    """MILAN's exemplar picture: the region as it is, everything else darkened to `dim` of its brightness."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep = np.where(np.asarray(mask, dtype=bool)[..., None], 1.0, dim)
    return Image.fromarray((base * keep).clip(0, 255).astype(np.uint8))


def crop_region(image: Image.Image, mask: np.ndarray,
                margin: float = 0.1) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    """The image cut to the region's bounding box grown by `margin` of its size on each side (clamped to the
    image); returns (crop, box) or None when the region is empty."""
    box = bbox(mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    mx = int(round((x1 - x0) * margin))
    my = int(round((y1 - y0) * margin))
    box = (max(0, x0 - mx), max(0, y0 - my), min(image.width, x1 + mx), min(image.height, y1 + my))
    return image.crop(box), box


def exemplar_picture(image: Image.Image, amap: np.ndarray, threshold: float, preprocess: Mapping[str, Any],
                     mode: str = "heat", size: int = 128, vmin: float | None = None,
                     vmax: float | None = None) -> Image.Image:
    """One exemplar as the model saw it, size x size: 'outline' (the image's colours, the region's contour and a
    light tint), 'heat' (heat map and region border over the image), 'region' (outside the region darkened) or
    'crop' (the region's bounding box, enlarged to size x size). A map without spatial extent (1x1) is drawn as
    a frame and a bar in every mode but crop, never as a tint of the whole picture."""
    if mode not in RENDER_MODES:
        raise ValueError(f"mode must be one of {', '.join(RENDER_MODES)}, not {mode!r}")
    if mode == "crop":
        crop = int(preprocess.get("crop") or 224)
        view = model_view(image, preprocess)
        values = upsample_map(amap, crop)
        got = crop_region(view, region(values, threshold))
        if got is None:  # nothing above threshold: show the whole view rather than nothing
            return view.resize((size, size), Image.Resampling.BILINEAR)
        return got[0].resize((size, size), Image.Resampling.BILINEAR)
    view = model_view(image, preprocess, size)
    if not has_extent(amap):
        return _feature_picture(view, float(np.asarray(amap, dtype=np.float32).ravel()[0]), threshold, vmin, vmax)
    values = upsample_map(amap, size)
    if mode == "outline":
        return contour_overlay(view, values, threshold)
    if mode == "region":
        return masked_image(view, region(values, threshold))
    return heat_overlay(view, values, vmin=vmin, vmax=vmax, threshold=threshold)


def _feature_picture(view: Image.Image, value: float, threshold: float, vmin: float | None,
                     vmax: float | None) -> Image.Image:
    """A unit without a spatial map (a linear feature): the image untouched but for `feature_rgba`'s frame and bar.
    A heat map of one value would only tint the whole picture."""
    return _composite(view, feature_rgba(view.width, value, threshold, vmin, vmax))


def png_bytes(image: Image.Image, colors: int | None = None, optimize: bool = True) -> bytes:
    """PNG bytes; with `colors`, an adaptive palette of that many colours (about 40% smaller at 256 for heat-map
    thumbnails, without visible banding at thumbnail size)."""
    if colors:
        image = image.convert("RGB").quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=optimize)
    return buf.getvalue()


def data_uri(image: Image.Image, colors: int | None = None) -> str:
    """A PNG `data:` URI, for pages that must open without their image files."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, colors)).decode("ascii")
