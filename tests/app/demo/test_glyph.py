"""The demo's spurious cue: the glyph lands where its annotation says, on the cue class only."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image


def test_glyph_is_stamped_on_the_cue_class_and_annotated_with_its_mask(tmp_path):
    from app.demo.glyph import GLYPH, add_spurious_cue, write_test_sets
    from app.demo.shapes import generate_shapes_dataset
    from app.sources.datasets import open_dataset

    src = generate_shapes_dataset(tmp_path / "src", n_images=24, seed=3)
    n = add_spurious_cue(src, tmp_path / "cue", "circle", share=1.0)
    data = json.loads((tmp_path / "cue" / "annotations" / "instances.json").read_text())
    circles = [im for im in data["images"] if im["class"] == "circle"]
    assert n == len(circles) > 0
    reader = open_dataset(tmp_path / "cue")
    g = [c.name for c in reader.concepts].index(GLYPH)
    present = reader.presence()[:, g]
    keys = [r.path.name for r in reader.images]
    assert {keys[i] for i in np.flatnonzero(present)} == {im["file_name"] for im in circles}
    i = int(np.flatnonzero(present)[0])
    cidx, masks = reader.masks(i, (64, 64))
    glyph_mask = masks[list(cidx).index(g)]
    before = np.asarray(Image.open(src / "images" / keys[i]).convert("RGB")).astype(int)
    after = np.asarray(Image.open(tmp_path / "cue" / "images" / keys[i]).convert("RGB")).astype(int)
    changed = (before != after).any(-1)
    assert changed.any() and not changed[~glyph_mask].any()

    counts = write_test_sets(src, tmp_path / "clean", tmp_path / "shifted", "circle", share=1.0)
    assert counts["images"] == 24 and counts["shifted"] == 24 - len(circles)
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == sorted({im["class"] for im in data["images"]})


def test_the_demo_dataset_carries_the_cue_once(tmp_path):
    import pytest

    from app.demo.glyph import CUE_CLASS, GLYPH, generate_demo_dataset, stamp_cue_in_place
    from app.errors import DatasetError

    out = generate_demo_dataset(tmp_path / "demo", 30, seed=0)
    data = json.loads((out / "annotations" / "instances.json").read_text())
    glyph_id = next(c["id"] for c in data["categories"] if c["name"] == GLYPH)
    stamped = {a["image_id"] for a in data["annotations"] if a["category_id"] == glyph_id}
    classes = {im["id"]: im["class"] for im in data["images"]}
    assert stamped and {classes[i] for i in stamped} == {CUE_CLASS}
    with pytest.raises(DatasetError, match="already has the glyph concept"):
        stamp_cue_in_place(out)
