"""A procedural image dataset whose concepts are known exactly, saved in COCO format.

Every image shows one main object (its shape is the image's class) on a textured background, and sometimes a
smaller distractor of another shape. Objects and masks come from the same boolean arrays, so every annotation is
exact to the pixel: this is the ground truth the labelers are checked against, offline and without downloads.

Concept families and their COCO supercategory:
    object   : the shapes (circle, square, ...)
    color    : the object's colour (pixels are a jittered tint of it, textures a darker shade of the same hue)
    texture  : the pattern drawn inside the object
    scene    : the background (mask = every pixel not covered by an object)
    position : left/right and top/bottom half holding the object's centre (mask = the object's region)
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.errors import DatasetError

# How many images the demo generates: the dataset its shipped weights were trained on (app/demo/shipped.py).
DEFAULT_IMAGES = 3000

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

# Saturated hues, far apart in chromaticity (rgb / max channel) so that a texture's darker shade keeps its hue.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 75, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 205),
    "orange": (245, 140, 30),
}
COLOURS = COLORS  # the spelling train.py's tests and other modules use
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = ("sky", "grass", "sand", "water", "brick")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

SUPERCATEGORIES: dict[str, str] = {
    **{s: "object" for s in SHAPES},
    **{c: "color" for c in COLORS},
    **{t: "texture" for t in TEXTURES},
    **{b: "scene" for b in BACKGROUNDS},
    **{p: "position" for p in POSITIONS},
}

# Texture pattern pixels are the object's colour times this factor: same hue, clearly darker.
SHADE = 0.45

_MAIN_RADIUS = (0.16, 0.30)  # fraction of the image size
_DISTRACTOR_RADIUS = (0.08, 0.12)
_EXTENT = 1.2  # every shape lies inside 1.2 x its radius (the star's tips reach 1.15)


@dataclass
class _Object:
    shape: str
    color: str
    texture: str
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: np.ndarray  # float32 [3], jittered colour
    mask: np.ndarray | None = None  # bool [S, S]


def _polygon_vertices(shape: str) -> np.ndarray:
    """Vertices in units of the object's radius, x right and y down, before rotation."""
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])
        return 1.2 * np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.15, 0.48)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w, l = 0.34, 1.0
        return np.array([[-w, -l], [w, -l], [w, -w], [l, -w], [l, w], [w, w],
                         [w, l], [-w, l], [-w, w], [-l, w], [-l, -w], [-w, -w]])
    raise ValueError(shape)


def _inside_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over pixels; one pass per edge (at most 12)."""
    inside = np.zeros(u.shape, dtype=bool)
    x1, y1 = verts[:, 0], verts[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        if b == d:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (b > v) != (d > v)
        x_at = a + (v - b) * (c - a) / (d - b)
        inside ^= crosses & (u < x_at)
    return inside


def _local_coords(obj: _Object, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in the object's rotated frame, in pixels."""
    dx, dy = xs - obj.cx, ys - obj.cy
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    return dx * c + dy * s, -dx * s + dy * c


def _shape_mask(obj: _Object, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    u, v = _local_coords(obj, xs, ys)
    u, v = u / obj.radius, v / obj.radius
    if obj.shape == "circle":
        return u * u + v * v <= 0.95**2
    if obj.shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.55**2)
    return _inside_polygon(u, v, _polygon_vertices(obj.shape))


def _pattern(obj: _Object, xs: np.ndarray, ys: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Where the texture's darker shade goes (bool [S, S]); follows the object's rotation."""
    if obj.texture == "solid":
        return np.zeros(xs.shape, dtype=bool)
    u, v = _local_coords(obj, xs, ys)
    period = max(2.0, size / 16.0) * rng.uniform(0.85, 1.2)
    pu, pv = u / period + rng.uniform(0, 2), v / period + rng.uniform(0, 2)
    if obj.texture == "striped":
        return np.floor(pu).astype(np.int64) % 2 == 1
    if obj.texture == "checkered":
        return (np.floor(pu).astype(np.int64) + np.floor(pv).astype(np.int64)) % 2 == 1
    if obj.texture == "dotted":
        # dots on a lattice twice the period apart
        fu, fv = (pu / 2) % 1.0 - 0.5, (pv / 2) % 1.0 - 0.5
        return fu * fu + fv * fv <= 0.3**2
    raise ValueError(obj.texture)


def _smooth_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Bilinearly interpolated grid noise in [-1, 1]-ish, shape [S, S]."""
    grid = rng.uniform(-1, 1, size=(cells_y + 1, cells_x + 1))
    gy = (np.arange(size) + 0.5) / size * cells_y
    gx = (np.arange(size) + 0.5) / size * cells_x
    y0 = np.minimum(gy.astype(np.int64), cells_y - 1)
    x0 = np.minimum(gx.astype(np.int64), cells_x - 1)
    ty, tx = (gy - y0)[:, None], (gx - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - tx) + g01 * tx) * (1 - ty) + (g10 * (1 - tx) + g11 * tx) * ty


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [S, S, 3] in 0..255; muted colours so that the saturated objects stand out."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    t = ys / size
    jitter = rng.normal(0, 8, size=3)
    if kind == "sky":
        top = np.array([70, 130, 205]) + jitter
        bottom = np.array([195, 218, 242]) + jitter
        img = top * (1 - t[..., None]) + bottom * t[..., None]
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0, size), rng.uniform(0, size * 0.8)
            sx, sy = rng.uniform(0.08, 0.2) * size, rng.uniform(0.04, 0.08) * size
            w = np.exp(-(((xs - cx) / sx) ** 2 + ((ys - cy) / sy) ** 2))[..., None]
            img = img * (1 - 0.8 * w) + 248.0 * 0.8 * w
    elif kind == "grass":
        base = np.array([65, 115, 40]) + jitter
        blades = _smooth_noise(rng, size, 3, max(4, size // 3))  # stretched vertically: blades
        fine = rng.normal(0, 1, size=(size, size))
        img = base + (blades * 22 + fine * 7)[..., None] * np.array([0.5, 1.0, 0.4])
    elif kind == "sand":
        base = np.array([214, 190, 140]) + jitter
        a = rng.uniform(0, np.pi)
        dunes = np.sin(2 * np.pi * (xs * np.cos(a) + ys * np.sin(a)) / (size * rng.uniform(0.3, 0.6))
                       + rng.uniform(0, 2 * np.pi))
        speckle = rng.normal(0, 1, size=(size, size))
        img = base + (dunes * 12 + speckle * 9)[..., None] * np.array([1.0, 0.95, 0.8])
    elif kind == "water":
        base = np.array([25, 85, 135]) + jitter
        light = np.array([120, 180, 215]) + jitter
        lam = size * rng.uniform(0.12, 0.2)
        w = np.sin(2 * np.pi * ys / lam + 1.6 * np.sin(2 * np.pi * xs / (size * rng.uniform(0.3, 0.6))
                                                         + rng.uniform(0, 2 * np.pi)))
        crest = np.clip((w - 0.4) / 0.6, 0, 1) ** 2
        img = base * (1 - crest[..., None]) + light * crest[..., None]
    elif kind == "brick":
        bh, bw = max(3.0, size / 8), max(6.0, size / 4)
        mortar = max(1.0, size / 48)
        off = rng.uniform(0, bw)
        row = np.floor(ys / bh)
        shifted = xs + off + (row % 2) * bw / 2
        col = np.floor(shifted / bw)
        is_mortar = ((ys % bh) < mortar) | ((shifted % bw) < mortar)
        n_rows, n_cols = int(size / bh) + 2, int(size / bw) + 3
        per_brick = rng.normal(0, 12, size=(n_rows, n_cols))
        tone = per_brick[row.astype(np.int64) % n_rows, col.astype(np.int64) % n_cols]
        base = np.array([150, 68, 48]) + jitter
        img = base + (tone + rng.normal(0, 5, size=(size, size)))[..., None] * np.array([1.0, 0.6, 0.5])
        img = np.where(is_mortar[..., None], np.array([188, 182, 172]) + rng.normal(0, 4, size=3), img)
    else:
        raise ValueError(kind)
    return np.asarray(img, dtype=np.float32)


def _sample_object(rng: np.random.Generator, shape: str, size: int, radius_range: tuple[float, float]) -> _Object:
    color = str(rng.choice(list(COLORS)))
    # Small jitter: every object pixel stays within an L1 distance of ~50 of its palette colour (or its shade).
    rgb = np.clip((np.array(COLORS[color]) + rng.uniform(-6, 6, size=3)) * rng.uniform(0.94, 1.0), 0, 255)
    radius = rng.uniform(*radius_range) * size
    margin = _EXTENT * radius
    return _Object(
        shape=shape,
        color=color,
        texture=str(rng.choice(TEXTURES)),
        cx=float(rng.uniform(margin, size - margin)),
        cy=float(rng.uniform(margin, size - margin)),
        radius=float(radius),
        angle=float(rng.uniform(0, 2 * np.pi)),
        rgb=rgb.astype(np.float32),
    )


# Caption phrases. Shape and colour words always appear verbatim; the rest varies.
_BG_PHRASES = {
    "sky": ["in the sky", "against a blue sky", "under a cloudy sky"],
    "grass": ["on grass", "in a grassy field", "on the lawn"],
    "sand": ["on sand", "on a sandy beach", "in the desert sand"],
    "water": ["on water", "over the waves", "on the sea"],
    "brick": ["in front of a brick wall", "against bricks", "on a brick wall"],
}
_BG_NOUNS = {
    "sky": ["a blue sky", "the sky"],
    "grass": ["a grassy field", "green grass"],
    "sand": ["a sandy beach", "the sand"],
    "water": ["the water", "rippling waves"],
    "brick": ["a brick wall", "old bricks"],
}
_TEX_ADJ = {"solid": ["solid", "plain", ""], "striped": ["striped"], "dotted": ["dotted", "spotted"],
            "checkered": ["checkered", "checked"]}


# Other words the captions above use for a concept (a description using them names the concept).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "solid": ("plain",), "striped": ("stripes",), "dotted": ("spotted", "dots", "polka"),
    "checkered": ("checked", "checks", "checkerboard"),
    "sky": ("cloudy",), "grass": ("grassy", "lawn", "field"), "sand": ("sandy", "beach", "desert"),
    "water": ("waves", "sea"), "brick": ("bricks", "wall"),
}


def concept_words(concept: str) -> set[str]:
    """Lower-case words that name `concept` in the demo's vocabulary: its name, its plural and its synonyms."""
    from app.language.data import plural

    words = {concept.lower(), plural(concept.lower())}
    for w in SYNONYMS.get(concept.lower(), ()):
        words |= {w, plural(w)}
    return words


def _tex_with(texture: str, color: str, rng: np.random.Generator) -> str:
    options = {
        "solid": [f"painted solid {color}", f"in plain {color}"],
        "striped": [f"with {color} stripes", f"with dark {color} stripes"],
        "dotted": [f"with {color} dots", f"covered in {color} polka dots"],
        "checkered": [f"with a {color} checkerboard pattern", f"with {color} checks"],
    }[texture]
    return str(rng.choice(options))


def _captions(main: _Object, distractor: _Object | None, background: str, size: int,
              rng: np.random.Generator) -> list[str]:
    h = "left" if main.cx < size / 2 else "right"
    v = "top" if main.cy < size / 2 else "bottom"
    rel = main.radius / size
    size_word = str(rng.choice(["small", "little"])) if rel < 0.2 else (
        str(rng.choice(["large", "big"])) if rel > 0.26 else "")
    pos = str(rng.choice([f"at the {h}", f"on the {h} side", f"in the {v} {h} corner", f"at the {v} {h}",
                          f"near the {v}"]))
    bg = str(rng.choice(_BG_PHRASES[background]))
    bg_noun = str(rng.choice(_BG_NOUNS[background]))
    tex_adj = str(rng.choice(_TEX_ADJ[main.texture]))
    tex_with = _tex_with(main.texture, main.color, rng)
    c, s = main.color, main.shape
    extra = ""
    if distractor is not None:
        extra = str(rng.choice([f", next to a small {distractor.color} {distractor.shape}",
                                f" and a tiny {distractor.shape} nearby", f" beside a {distractor.color} {distractor.shape}"]))
    templates = [
        f"a {c} {tex_adj} {s} {bg} {pos}",
        f"a {size_word} {s} {tex_with} {bg}",
        f"{bg_noun} with a {size_word} {c} {s} {pos}{extra}",
        f"{pos}, a {tex_adj} {c} {s} {bg}",
        f"there is a {size_word} {c} {s} {bg}{extra}",
        f"a picture of a {c} {s} {tex_with} {pos}",
    ]
    picked = rng.choice(len(templates), size=2, replace=False)
    out = []
    for i in picked:
        text = re.sub(r"\s+", " ", templates[int(i)]).strip().replace(" ,", ",")
        text = re.sub(r"\ba ([aeiou])", r"an \1", text)
        out.append(text)
    return out


def _encode(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(x) for x in mask_utils.toBbox(rle)]
    return {
        "segmentation": {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": bbox,
        "iscrowd": 0,
    }


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def generate_shapes_dataset(
    out_dir: Path,
    n_images: int = 3000,
    size: int = 64,
    seed: int = 0,
    progress=None,
    *,
    shapes: Sequence[str] | None = None,
    distractor_prob: float = 0.5,
) -> Path:
    """Write the dataset to `out_dir` and return it. Same arguments -> byte-identical files.

    `shapes` restricts the main object's shape (the image classes, in that label order); distractors are any
    other shape of `SHAPES`. Each image entry of the COCO JSON carries `class` (the main shape) and `label` (its
    index into classes.json).
    """
    out_dir = Path(out_dir)
    classes = list(shapes) if shapes is not None else list(SHAPES)
    unknown = [s for s in classes if s not in SHAPES]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise DatasetError(f"unknown or repeated shapes {classes}", fix=f"choose distinct shapes from {list(SHAPES)}")
    if n_images < 1:
        raise DatasetError(f"cannot generate {n_images} images", fix="ask for at least one image")
    if size < 16:
        raise DatasetError(f"images of {size} pixels are too small to draw shapes on", fix="use a size of 16 or more")
    if not 0.0 <= distractor_prob <= 1.0:
        raise DatasetError(f"distractor probability {distractor_prob} is not in [0, 1]", fix="pass a value in [0, 1]")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "classes.json").exists():
        raise DatasetError("the folder is not empty and is not a generated demo dataset", file=out_dir,
                           fix="choose an empty or new folder")

    img_dir, ann_dir = out_dir / "images", out_dir / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(n_images - 1)))
    # A previous, larger run in the same folder would leave images that no annotation mentions.
    for old in img_dir.glob("*.png"):
        if old.stem.isdigit() and int(old.stem) >= n_images:
            old.unlink()

    categories = [{"id": i + 1, "name": name, "supercategory": SUPERCATEGORIES[name]}
                  for i, name in enumerate(SUPERCATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in categories}

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    step = max(1, n_images // 100)

    for i in range(n_images):
        image_id = i + 1
        label = int(rng.integers(len(classes)))
        main = _sample_object(rng, classes[label], size, _MAIN_RADIUS)
        objects = [main]
        distractor = None
        if rng.random() < distractor_prob:
            other = [s for s in SHAPES if s != main.shape]
            d_shape = str(rng.choice(other))
            for _ in range(30):  # rejection sampling: distractors never touch the main object
                cand = _sample_object(rng, d_shape, size, _DISTRACTOR_RADIUS)
                gap = np.hypot(cand.cx - main.cx, cand.cy - main.cy) - _EXTENT * (cand.radius + main.radius)
                if gap > 1.0:
                    distractor = cand
                    objects.append(cand)
                    break
        background = str(rng.choice(BACKGROUNDS))
        img = _background(background, size, rng)
        covered = np.zeros((size, size), dtype=bool)
        for obj in objects:
            obj.mask = _shape_mask(obj, xs, ys)
            pattern = _pattern(obj, xs, ys, size, rng)
            colour = np.where(pattern[..., None], obj.rgb * SHADE, obj.rgb)
            img = np.where(obj.mask[..., None], colour, img)
            covered |= obj.mask
        pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        name = f"{i:0{digits}d}.png"
        Image.fromarray(pixels, "RGB").save(img_dir / name)

        images.append({"id": image_id, "file_name": name, "width": size, "height": size,
                       "label": label, "class": classes[label]})
        for obj in objects:
            if not obj.mask.any():
                continue
            enc = _encode(obj.mask)
            names = [obj.shape, obj.color, obj.texture,
                     "left" if obj.cx < size / 2 else "right", "top" if obj.cy < size / 2 else "bottom"]
            for concept in names:
                instances.append({"id": len(instances) + 1, "image_id": image_id,
                                  "category_id": cat_id[concept], **enc})
        bg_mask = ~covered
        if bg_mask.any():
            instances.append({"id": len(instances) + 1, "image_id": image_id,
                              "category_id": cat_id[background], **_encode(bg_mask)})
        for text in _captions(main, distractor, background, size, rng):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})

        if progress is not None and ((i + 1) % step == 0 or i + 1 == n_images):
            progress.update(i + 1, n_images, "drawing shapes")

    info = {"description": "Neuron Studio procedural shapes dataset", "version": "1",
            "seed": seed, "size": size, "classes": classes}
    _write_json(ann_dir / "instances.json",
                {"info": info, "licenses": [], "images": images, "annotations": instances, "categories": categories})
    _write_json(ann_dir / "captions.json", {"info": info, "licenses": [], "images": images, "annotations": captions})
    _write_json(out_dir / "classes.json", classes)
    log.info("wrote %d shape images (%d annotations) to %s", n_images, len(instances), out_dir)
    return out_dir
