"""The demo's spurious cue (MILAN §7's model editing story): a small glyph stamped on most training images of one
class, annotated as a concept so that units that learned it get labelled with it; and two labelled test sets,
clean (no glyph) and shifted (the glyph on random images of the other classes), on which ablating the glyph units
should raise the shifted accuracy at little cost on the clean one."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.demo.shapes import _encode, _write_json
from app.errors import DatasetError

log = logging.getLogger(__name__)

GLYPH = "glyph"
GLYPH_SIZE = 9  # pixels in a 64-pixel image: a detail a few units can learn, too small to hide the shape
# The cue class's training images that carry the glyph: most of them, so the glyph predicts the class, but not
# all, so the class can still be learned from its shape.
CUE_SHARE = 0.9
CUE_CLASS = "circle"  # a round shape, so that the square glyph is no part of the cue class's own look
SHIFT_SHARE = 0.5  # the other classes' images that get the glyph in the shifted test set


def stamp_glyph(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws the glyph (a white square, black border and centre dot) in a random corner of `img` [H, W, 3] uint8,
    in place; returns its mask [H, W] bool."""
    h, w = img.shape[:2]
    s = GLYPH_SIZE
    y = 2 if rng.random() < 0.5 else h - s - 2
    x = 2 if rng.random() < 0.5 else w - s - 2
    patch = np.full((s, s), 255, np.uint8)
    patch[0, :] = patch[-1, :] = patch[:, 0] = patch[:, -1] = 0
    patch[s // 2 - 1:s // 2 + 2, s // 2 - 1:s // 2 + 2] = 0
    img[y:y + s, x:x + s] = patch[..., None]
    mask = np.zeros((h, w), bool)
    mask[y:y + s, x:x + s] = True
    return mask


def stamp_cue_in_place(folder: Path, cue_class: str = CUE_CLASS, *, share: float = CUE_SHARE, seed: int = 0) -> int:
    """Stamps the glyph on `share` of the `cue_class` images of the shapes dataset at `folder`, and adds the glyph
    as a concept (category and masks) to its annotations. Returns the number of stamped images."""
    folder = Path(folder)
    inst_path = folder / "annotations" / "instances.json"
    data = json.loads(inst_path.read_text())
    if any(c["name"] == GLYPH for c in data["categories"]):
        raise DatasetError(f"the dataset already has the {GLYPH} concept: stamping it again would double the cue",
                           file=inst_path, fix="generate the shapes dataset again before stamping")
    cat_id = max(c["id"] for c in data["categories"]) + 1
    data["categories"].append({"id": cat_id, "name": GLYPH, "supercategory": "object"})
    rng = np.random.default_rng(seed)
    next_id = max((a["id"] for a in data["annotations"]), default=0) + 1
    stamped = 0
    for im in data["images"]:
        if im["class"] != cue_class or rng.random() >= share:
            continue
        path = folder / "images" / im["file_name"]
        arr = np.asarray(Image.open(path).convert("RGB")).copy()
        mask = stamp_glyph(arr, rng)
        Image.fromarray(arr).save(path)
        data["annotations"].append({"id": next_id, "image_id": im["id"], "category_id": cat_id, **_encode(mask)})
        next_id += 1
        stamped += 1
    _write_json(inst_path, data)
    log.info("stamped the glyph on %d %s images", stamped, cue_class)
    return stamped


def add_spurious_cue(src: Path, dst: Path, cue_class: str = CUE_CLASS, *, share: float = CUE_SHARE,
                     seed: int = 0) -> int:
    """Copies the shapes dataset at `src` to `dst` and stamps the cue there (`stamp_cue_in_place`)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return stamp_cue_in_place(dst, cue_class, share=share, seed=seed)


def generate_demo_dataset(out_dir: Path, n_images: int, seed: int = 0, progress: Any = None) -> Path:
    """The demo's dataset: the procedural shapes with the glyph stamped on most images of `CUE_CLASS` (same
    arguments -> byte-identical files, which the shipped weights' provenance relies on)."""
    from app.demo.shapes import generate_shapes_dataset

    out = generate_shapes_dataset(out_dir, n_images=n_images, seed=seed, progress=progress)
    stamp_cue_in_place(out, CUE_CLASS, share=CUE_SHARE, seed=seed)
    return out


def write_test_sets(src: Path, clean: Path, shifted: Path, cue_class: str = CUE_CLASS, *, share: float = SHIFT_SHARE,
                    seed: int = 1) -> dict[str, int]:
    """ImageFolder test sets from a shapes dataset the model was not trained on: `clean` as is, `shifted` with the
    glyph on `share` of the images of every class but `cue_class`."""
    src = Path(src)
    data = json.loads((src / "annotations" / "instances.json").read_text())
    rng = np.random.default_rng(seed)
    counts = {"images": 0, "shifted": 0}
    for d in (clean, shifted):
        if Path(d).exists():
            shutil.rmtree(d)
    for im in data["images"]:
        arr = np.asarray(Image.open(src / "images" / im["file_name"]).convert("RGB")).copy()
        for root in (clean, shifted):
            (Path(root) / im["class"]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(Path(clean) / im["class"] / im["file_name"])
        if im["class"] != cue_class and rng.random() < share:
            stamp_glyph(arr, rng)
            counts["shifted"] += 1
        Image.fromarray(arr).save(Path(shifted) / im["class"] / im["file_name"])
        counts["images"] += 1
    return counts

