"""COCO files whose image entries carry a "class" name (classification sets kept as COCO) give image classes."""
from __future__ import annotations

import json

from PIL import Image

from app.sources.datasets import open_dataset


def _coco(root, classes, info=None):
    (root / "images").mkdir(parents=True)
    images = []
    for i, c in enumerate(classes):
        Image.new("RGB", (4, 4)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", **({"class": c} if c else {})})
    (root / "instances.json").write_text(json.dumps({"info": info or {}, "images": images, "annotations": [],
                                                     "categories": [{"id": 1, "name": "x"}]}))
    return open_dataset(root / "instances.json", "coco")


def test_image_classes_in_the_listed_order(tmp_path):
    names, labels = _coco(tmp_path, ["ring", "circle", "ring"], {"classes": ["ring", "circle"]}).class_labels()
    assert names == ["ring", "circle"] and labels.tolist() == [0, 1, 0]


def test_image_classes_sorted_without_a_list_and_none_when_one_is_missing(tmp_path):
    names, labels = _coco(tmp_path / "a", ["ring", "circle"]).class_labels()
    assert names == ["circle", "ring"] and labels.tolist() == [1, 0]
    assert _coco(tmp_path / "b", ["ring", None]).class_labels() is None
