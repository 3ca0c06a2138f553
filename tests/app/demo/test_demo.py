import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from app.demo.shapes import COLOURS, SHAPES, generate_shapes_dataset


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=60, size=48, seed=3)


def test_generation_is_deterministic(shapes, tmp_path):
    again = generate_shapes_dataset(tmp_path / "again", n_images=60, size=48, seed=3)
    assert _digest(shapes) == _digest(again)
    other = generate_shapes_dataset(tmp_path / "other", n_images=60, size=48, seed=4)
    assert _digest(other) != _digest(shapes)


def test_coco_masks_are_exact(shapes):
    coco = COCO(str(shapes / "annotations" / "instances.json"))
    cats = {c["id"]: c for c in coco.loadCats(coco.getCatIds())}
    assert {c["supercategory"] for c in cats.values()} == {"object", "color", "texture", "scene", "position"}
    for img_id in coco.getImgIds()[:30]:
        info = coco.loadImgs(img_id)[0]
        pixels = np.asarray(Image.open(shapes / "images" / info["file_name"]).convert("RGB")).astype(int)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        by_sup = {}
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            assert m.sum() == a["area"] > 0
            by_sup.setdefault(cats[a["category_id"]]["supercategory"], []).append((cats[a["category_id"]]["name"], m))
        objects = np.any([m for _, m in by_sup["object"]], axis=0)
        (scene_name, scene_mask), = by_sup["scene"]
        assert np.array_equal(scene_mask, ~objects)  # background = every pixel no object covers
        for name, m in by_sup["color"]:
            # solid parts of an object have its colour (textured parts are a darker shade of it)
            rgb = np.array(COLOURS[name])
            dist = np.abs(pixels[m] - rgb).sum(1)
            dark = np.abs(pixels[m] - rgb * 0.45).sum(1)
            assert np.all(np.minimum(dist, dark) < 60)
        assert info["class"] == by_sup["object"][0][0] or info["class"] in [n for n, _ in by_sup["object"]]


def test_captions_name_shape_and_colour(shapes):
    caps = json.loads((shapes / "annotations" / "captions.json").read_text())
    inst = json.loads((shapes / "annotations" / "instances.json").read_text())
    cls = {im["id"]: im["class"] for im in inst["images"]}
    per_image = {}
    for a in caps["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["caption"])
    assert len(per_image) == 60 and all(len(v) == 2 for v in per_image.values())
    for img_id, texts in per_image.items():
        for t in texts:
            assert cls[img_id] in t
            assert any(c in t for c in COLOURS)


def test_training_writes_loadable_weights_that_learn(shapes, tmp_path):
    from app.demo.train import ShapesCNN, _accuracy, load_training_data, train_demo_model
    from app.sources.models import discover_layers, load_model

    out = tmp_path / "m.safetensors"
    metrics = train_demo_model(shapes, out, epochs=6, seed=0, width=8, batch_size=16)
    model = load_model("builtin:shapes_cnn", out)
    assert model.class_names == list(SHAPES)
    assert model.preprocess.crop == 48
    names = [layer.name for layer in discover_layers(model) if layer.units]
    assert {"block1", "block2", "block3", "block4", "fc"} <= set(names)
    x, y, _ = load_training_data(shapes)
    torch.manual_seed(0)
    untrained = _accuracy(ShapesCNN(len(SHAPES), 8), x, y, "cpu")
    # deterministic training: the trained model fits its (tiny) training set well beyond an untrained one
    assert metrics["train_accuracy"] > untrained + 0.2, (metrics, untrained)
