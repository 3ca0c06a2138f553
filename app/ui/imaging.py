"""Overlays for the unit view, in numpy and PIL only (no Qt, safe on pool threads).

The geometry is `app.imaging`'s, shared with the exporters: an exemplar is shown the way the model saw it
(resize, centre crop), the map is enlarged bilinearly at pixel centres, and a region is where the enlarged map is
strictly above the unit's threshold. What is the window's own: each overlay is a separate RGBA layer, so that the
opacity slider only changes how the delegate paints them, never the pixels.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from app.imaging import model_view_box, outline, region, upsample_map
from app.imaging import model_view as _model_view


def model_view(image: Image.Image, preprocess: dict[str, Any], max_side: int | None = None) -> Image.Image:
    """The pixels the model saw, shrunk to `max_side` when the crop is larger."""
    crop = int(preprocess.get("crop") or 224)
    return _model_view(image, preprocess, max_side if max_side is not None and crop > max_side else None)


def upsample(map2d: np.ndarray, size: int) -> np.ndarray:
    """[h, w] -> [size, size] float32, like `F.interpolate(mode='bilinear', align_corners=False)`."""
    return upsample_map(map2d, size)


def edges(mask: np.ndarray) -> np.ndarray:
    return outline(mask)


def model_view_mask(mask: np.ndarray, preprocess: dict[str, Any], side: int) -> np.ndarray:
    """A mask on the stored image's pixel grid, seen through the model's resize and centre crop at side x side
    (nearest pixel; False where the model saw padding)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    left, top, right, bottom = model_view_box(w, h, preprocess)
    xs = left + (np.arange(side) + 0.5) / side * (right - left)
    ys = top + (np.arange(side) + 0.5) / side * (bottom - top)
    xi, yi = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    inside_x = (xi >= 0) & (xi < w)
    inside_y = (yi >= 0) & (yi < h)
    out = mask[np.ix_(np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1))]
    return out & inside_y[:, None] & inside_x[None, :]


def heat_rgba(up: np.ndarray, vmin: float, vmax: float, lut: np.ndarray) -> np.ndarray:
    """A heat map whose colour and opacity grow with activation: weak responses leave the image visible."""
    span = max(vmax - vmin, 1e-12)
    t = np.clip((up - vmin) / span, 0.0, 1.0)
    idx = (t * (len(lut) - 1)).astype(np.int32)
    out = np.empty((*up.shape, 4), dtype=np.uint8)
    out[..., :3] = lut[idx, :3]
    out[..., 3] = (t * 255).astype(np.uint8)
    return out


def region_rgba(up: np.ndarray, threshold: float, edge_rgb: tuple[int, int, int] = (255, 214, 0)) -> np.ndarray:
    """The thresholded region (as the engine counts it): outside darkened, the border outlined."""
    active = region(up, threshold)
    out = np.zeros((*up.shape, 4), dtype=np.uint8)
    out[~active, 3] = 200
    border = outline(active)
    out[border, :3] = edge_rgb
    out[border, 3] = 255
    return out


def mask_rgba(mask: np.ndarray, rgb: tuple[int, int, int] = (0, 200, 255)) -> np.ndarray:
    """A concept mask as a translucent fill with an opaque outline."""
    out = np.zeros((*mask.shape, 4), dtype=np.uint8)
    out[mask, :3] = rgb
    out[mask, 3] = 140
    border = outline(mask)
    out[border, 3] = 255
    return out
