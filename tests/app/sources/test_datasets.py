"""Every dataset format built tiny in tmp_path: detection, images, concepts, presence, masks, captions, and the
ways annotation files go wrong."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from app.errors import DatasetError
from app.sources.datasets import (
    IMAGE_EXTENSIONS,
    Concept,
    detect_format,
    load_rgb,
    open_dataset,
    resize_nearest,
)


def _img(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = m.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(m.shape), "counts": runs}


def _compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _up2(m: np.ndarray) -> np.ndarray:
    return m.repeat(2, axis=0).repeat(2, axis=1)


# ---- COCO --------------------------------------------------------------------------------------------------------

H, W = 20, 30
POLY = [3.0, 2.0, 15.0, 2.0, 15.0, 12.0, 3.0, 12.0]


def _known_masks():
    m1 = np.zeros((H, W), bool)
    m1[4:9, 10:25] = True
    m2 = np.zeros((H, W), bool)
    m2[12:18, 2:7] = True
    m2[0, 29] = True  # a run that starts on the first column boundary of the last column
    m3 = np.zeros((H, W), bool)
    m3[0:3, 0:4] = True  # starts with ones: the uncompressed counts begin with a zero run
    m3[10:20, 20:30] = True
    return m1, m2, m3


def write_coco(root: Path) -> dict:
    m1, m2, m3 = _known_masks()
    _img(root / "images" / "train" / "b.png", H, W, 1)
    _img(root / "images" / "train" / "a.png", H, W, 2)
    _img(root / "images" / "train" / "c.png", H, W, 3)
    images = [
        {"id": 10, "file_name": "b.png", "width": W, "height": H},
        {"id": 11, "file_name": "a.png", "width": W, "height": H},
        {"id": 12, "file_name": "gone.png", "width": W, "height": H},  # not on disk
        {"id": 13, "file_name": "c.png", "width": W, "height": H},  # no annotations
    ]
    cats = [
        {"id": 1, "name": "cat", "supercategory": "animal"},
        {"id": 2, "name": "dog", "supercategory": "animal"},
        {"id": 5, "name": "car"},  # no supercategory: "object"
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "segmentation": [POLY], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 2, "segmentation": _uncompressed_rle(m1), "iscrowd": 1},
        {"id": 3, "image_id": 10, "category_id": 2, "segmentation": _compressed_rle(m2), "iscrowd": 1},
        {"id": 4, "image_id": 11, "category_id": 5, "segmentation": _compressed_rle(m3), "iscrowd": 1},
        {"id": 5, "image_id": 12, "category_id": 5, "segmentation": [POLY]},
        {"id": 6, "image_id": 99, "category_id": 5, "segmentation": [POLY]},
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    caps = [
        {"id": 1, "image_id": 10, "caption": "a cat and two dogs"},
        {"id": 2, "image_id": 11, "caption": "a red car"},
        {"id": 3, "image_id": 10, "caption": "animals"},
        {"id": 4, "image_id": 12, "caption": "nobody sees this"},
    ]
    (root / "annotations" / "captions_train.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return {"m1": m1, "m2": m2, "m3": m3}


def test_coco_images_concepts_presence_and_captions(tmp_path):
    root = tmp_path / "coco"
    write_coco(root)
    assert detect_format(root) == "coco"
    r = open_dataset(root)
    assert r.format == "coco" and r.root == root.resolve()
    assert [im.key for im in r.images] == ["images/train/a.png", "images/train/b.png", "images/train/c.png"]
    assert all(im.path.is_absolute() and im.path.is_file() for im in r.images)
    assert (r.images[0].width, r.images[0].height) == (W, H)
    assert r.concepts == [Concept("cat", "animal", "coco"), Concept("dog", "animal", "coco"),
                          Concept("car", "object", "coco")]
    assert r.categories == ["animal", "object"]
    np.testing.assert_array_equal(r.presence(), [[0, 0, 1], [1, 1, 0], [0, 0, 0]])
    assert r.presence().dtype == bool
    assert r.has_masks
    for i in range(3):
        np.testing.assert_array_equal(r.annotated_categories(i), [True, True])
    assert r.captions() == [["a red car"], ["a cat and two dogs", "animals"], []]
    assert r.class_labels() is None
    rep = r.report()
    assert rep["images"] == 3 and rep["concepts"] == 3
    assert rep["skipped"]["missing_image"]["count"] == 1
    assert rep["skipped"]["missing_image"]["examples"] == ["gone.png"]
    assert rep["skipped"]["annotations_of_missing_images"]["count"] == 1
    assert rep["skipped"]["unknown_image_id"]["count"] == 1
    assert rep["skipped"]["captions_unknown_image"]["count"] == 1
    json.dumps(rep)  # the store keeps it as JSON


def test_coco_masks_polygon_and_both_rles_decode_to_the_known_masks(tmp_path):
    root = tmp_path / "coco"
    known = write_coco(root)
    r = open_dataset(root)
    poly = mask_utils.decode(mask_utils.frPyObjects([POLY], H, W)[0]).astype(bool)
    assert poly[3:12, 4:15].all() and poly.sum() < 14 * 12  # the rectangle the polygon outlines

    # same size: exact
    idx, m = r.masks(1, (H, W))  # b.png: cat (polygon), dog (uncompressed RLE OR compressed RLE)
    assert idx.dtype == np.int64 and m.dtype == bool
    assert idx.tolist() == [0, 1]
    np.testing.assert_array_equal(m[0], poly)
    np.testing.assert_array_equal(m[1], known["m1"] | known["m2"])
    idx, m = r.masks(0, (H, W))
    assert idx.tolist() == [2]
    np.testing.assert_array_equal(m[0], known["m3"])

    # twice the size: every pixel becomes a 2x2 block
    idx, m = r.masks(1, (2 * H, 2 * W))
    assert m.shape == (2, 2 * H, 2 * W)
    np.testing.assert_array_equal(m[1], _up2(known["m1"] | known["m2"]))
    np.testing.assert_array_equal(m[0], _up2(poly))
    # half the size: samples at pixel centres, i.e. the odd rows and columns
    idx, m = r.masks(0, (H // 2, W // 2))
    np.testing.assert_array_equal(m[0], known["m3"][1::2, 1::2])
    # an arbitrary size agrees with torch's nearest-exact and with Pillow's nearest at integer factors
    idx, m = r.masks(1, (7, 11))
    ref = F.interpolate(torch.from_numpy(known["m1"] | known["m2"]).float()[None, None], size=(7, 11),
                        mode="nearest-exact")[0, 0].bool().numpy()
    np.testing.assert_array_equal(m[1], ref)
    pil = np.asarray(Image.fromarray(known["m3"].astype(np.uint8) * 255).resize((W * 3, H * 3), Image.NEAREST)) > 0
    np.testing.assert_array_equal(r.masks(0, (H * 3, W * 3))[1][0], pil)
    # an image without annotations
    idx, m = r.masks(2, (5, 6))
    assert idx.shape == (0,) and m.shape == (0, 5, 6)


def test_coco_opened_through_the_json_file_itself(tmp_path):
    root = tmp_path / "coco"
    write_coco(root)
    f = root / "annotations" / "instances_train.json"
    assert detect_format(f) == "coco"
    r = open_dataset(f)
    assert r.root == root.resolve() and r.source == f.resolve()
    assert [im.key for im in r.images] == ["images/train/a.png", "images/train/b.png", "images/train/c.png"]
    assert r.captions()[1] == ["a cat and two dogs", "animals"]


def test_coco_images_at_root_without_width_height_and_bbox_only(tmp_path):
    root = tmp_path / "flat"
    _img(root / "x.png", 8, 10)
    m = np.zeros((8, 10), bool)
    m[2:5, 3:9] = True
    data = {
        "images": [{"id": "x", "file_name": "x.png"}],
        "categories": [{"id": 1, "name": "thing", "supercategory": "stuff"}],
        "annotations": [{"id": 1, "image_id": "x", "category_id": 1, "bbox": [3, 2, 6, 3]}],
    }
    (root / "annotations.json").write_text(json.dumps(data))
    r = open_dataset(root)
    assert r.format == "coco" and [im.key for im in r.images] == ["x.png"]
    assert r.images[0].width is None
    idx, masks = r.masks(0, (8, 10))  # the size comes from the image header
    np.testing.assert_array_equal(masks[0], m)
    assert r.captions() is None
    assert "bbox" in r.report()["notes"][0]


def test_coco_bad_inputs_name_the_file_and_key(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    f = root / "instances.json"
    f.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DatasetError) as e:
        open_dataset(root)
    assert "instances.json" in str(e.value) and '"images"' in str(e.value) and e.value.fix

    _img(root / "a.png", 4, 4)
    f.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]},
                        {"image_id": 1, "category_id": 1, "segmentation": "oops"}],
    }))
    with pytest.raises(DatasetError, match=r"annotations\[1\]\.segmentation"):
        open_dataset(f)

    f.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DatasetError, match="line 2"):
        open_dataset(f)

    # an RLE whose size disagrees with its image is caught when decoded
    f.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"image_id": 1, "category_id": 1, "segmentation": {"size": [5, 4], "counts": [20]}}],
    }))
    r = open_dataset(f)
    with pytest.raises(DatasetError, match=r"annotations\[0\]\.segmentation\.size"):
        r.masks(0, (4, 4))

    (root / "annotations").mkdir()
    (root / "annotations" / "instances_a.json").write_text("{}")
    (root / "annotations" / "instances_b.json").write_text("{}")
    f.unlink()
    with pytest.raises(DatasetError, match="instances_a.json, annotations/instances_b.json"):
        open_dataset(root)


# ---- Broden ------------------------------------------------------------------------------------------------------

def _label_png(path: Path, labels: np.ndarray) -> None:
    """Encode label numbers as NetDissect does: R = label % 256, G = label // 256."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_broden(root: Path, c_files: bool = False) -> dict:
    img = root / "images"
    _img(img / "ade" / "a.jpg", 16, 16, 1)
    _img(img / "ade" / "b.jpg", 16, 16, 2)
    obj = np.zeros((8, 8), np.int64)
    obj[:4] = 2  # wall
    obj[4:, :3] = 300  # door: needs G = 1
    part = np.zeros((8, 8), np.int64)
    part[5:7, 1:2] = 7  # handle
    part[0, 7] = 9  # a label label.csv does not name
    color = np.zeros((8, 8), np.int64)
    color[2:6, 2:6] = 1  # red
    _label_png(img / "ade" / "a_object.png", obj)
    _label_png(img / "ade" / "a_part.png", part)
    _label_png(img / "ade" / "b_color.png", color)
    (root / "index.csv").write_text(
        "image,split,ih,iw,sh,sw,color,object,part,scene\n"
        "ade/b.jpg,train,16,16,8,8,ade/b_color.png,,,\n"
        "ade/a.jpg,train,16,16,8,8,,ade/a_object.png,ade/a_part.png;ade/a_lost.png,5\n"
        "ade/missing.jpg,val,16,16,8,8,,,,5\n"
    )
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n"
        "1,red-c,color(1),1,0.2,\n"
        "2,wall,object(1),1,0.5,\n"
        "5,street-s,scene(1),1,1.0,\n"
        "7,handle,part(1),1,0.03,\n"
        "300,door,object(10);part(3),13,0.2,entrance\n"
    )
    if c_files:
        (root / "c_object.csv").write_text("code,number,name,frequency,coverage\n1,2,wall,1,0.5\n2,300,door,10,0.1\n")
        (root / "c_part.csv").write_text("code,number,name,frequency,coverage\n1,7,handle,1,0.03\n2,300,door,3,0.4\n")
    return {"obj": obj, "part": part, "color": color}


def test_broden_concepts_presence_annotated_and_masks(tmp_path):
    root = tmp_path / "broden"
    known = write_broden(root)
    assert detect_format(root) == "broden"
    assert detect_format(root / "index.csv") == "broden"
    r = open_dataset(root)
    assert r.format == "broden" and r.has_masks
    assert [im.key for im in r.images] == ["images/ade/a.jpg", "images/ade/b.jpg"]
    assert (r.images[0].width, r.images[0].height) == (16, 16)
    assert r.categories == ["color", "object", "part", "scene"]
    # concepts in label-number order; door counts more often as object than as part
    assert r.concepts == [Concept("red-c", "color", "broden"), Concept("wall", "object", "broden"),
                          Concept("street-s", "scene", "broden"), Concept("handle", "part", "broden"),
                          Concept("door", "object", "broden")]
    np.testing.assert_array_equal(r.annotated_categories(0), [False, True, True, True])
    np.testing.assert_array_equal(r.annotated_categories(1), [True, False, False, False])
    np.testing.assert_array_equal(r.presence(), [[0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])

    idx, m = r.masks(0, (16, 16))
    assert idx.tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(m[0], _up2(known["obj"] == 2))
    np.testing.assert_array_equal(m[1], np.ones((16, 16), bool))  # the scene covers the whole image
    np.testing.assert_array_equal(m[2], _up2(known["part"] == 7))
    np.testing.assert_array_equal(m[3], _up2(known["obj"] == 300))
    idx, m = r.masks(1, (4, 4))
    assert idx.tolist() == [0]
    np.testing.assert_array_equal(m[0], (known["color"] == 1)[1::2, 1::2])
    assert r.captions() is None and r.class_labels() is None

    rep = r.report()
    assert rep["skipped"]["missing_image"]["count"] == 1
    assert "ade/missing.jpg" in rep["skipped"]["missing_image"]["examples"][0]
    assert rep["skipped"]["missing_mask"]["count"] == 1
    assert rep["skipped"]["unknown_labels"]["examples"] == ["ade/a_part.png: 9"]


def test_broden_primary_category_from_c_files_coverage(tmp_path):
    root = tmp_path / "broden"
    write_broden(root, c_files=True)
    r = open_dataset(root / "index.csv")
    assert r.root == root.resolve()
    assert {c.name: c.category for c in r.concepts}["door"] == "part"  # 0.4 coverage as part beats 0.1 as object


def test_broden_readers_pickle_for_dataloader_workers(tmp_path):
    root = tmp_path / "broden"
    write_broden(root)
    r = open_dataset(root)
    r.presence()
    r2 = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(r2.masks(0, (8, 8))[1], r.masks(0, (8, 8))[1])


def test_broden_bad_label_csv_names_the_line(tmp_path):
    root = tmp_path / "broden"
    write_broden(root)
    (root / "label.csv").write_text("number,name,category\n1,red,color(1)\nx,wall,object(1)\n")
    with pytest.raises(DatasetError, match="line 3") as e:
        open_dataset(root)
    assert "label.csv" in str(e.value)


# ---- labels.csv --------------------------------------------------------------------------------------------------

def write_labels(root: Path) -> None:
    for i, name in enumerate(["x.png", "y.png", "z.png"]):
        _img(root / "images" / name, 6, 6, i)
    (root / "labels.csv").write_text(
        "filename,dog,cat,sky\n"
        "images/z.png,0,0,1\n"
        "x.png,1,0, 1\n"
        "images/y.png,0,1,0\n"
        "missing.png,1,1,1\n"
    )
    (root / "captions.jsonl").write_text(
        json.dumps({"image": "x.png", "caption": "a dog"}) + "\n\n"
        + json.dumps({"image": "images/y.png", "captions": ["a cat", "kitty"]}) + "\n"
        + json.dumps({"image": "elsewhere.png", "caption": "nobody"}) + "\n"
    )


def test_labels_csv_presence_and_captions(tmp_path):
    root = tmp_path / "labels"
    write_labels(root)
    assert detect_format(root) == "labels-csv"
    r = open_dataset(root)
    assert [im.key for im in r.images] == ["images/x.png", "images/y.png", "images/z.png"]
    assert r.concepts == [Concept("dog", "label", "labels.csv"), Concept("cat", "label", "labels.csv"),
                          Concept("sky", "label", "labels.csv")]
    assert r.categories == ["label"]
    np.testing.assert_array_equal(r.presence(), [[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(r.annotated_categories(0), [True])
    assert not r.has_masks
    assert r.masks(0, (3, 3))[1].shape == (0, 3, 3)
    assert r.captions() == [["a dog"], ["a cat", "kitty"], []]
    rep = r.report()
    assert rep["skipped"]["missing_image"]["count"] == 1
    assert rep["skipped"]["missing_image"]["examples"] == ["line 5: missing.png"]
    assert rep["skipped"]["captions_unknown_image"]["count"] == 1


def test_labels_csv_given_as_a_file_and_without_captions(tmp_path):
    root = tmp_path / "labels"
    write_labels(root)
    (root / "captions.jsonl").unlink()
    other = root / "my_tags.csv"
    other.write_text("path,red\nimages/x.png,1\nimages/y.png,0\n")
    assert detect_format(other) == "labels-csv"
    r = open_dataset(other)
    assert r.root == root.resolve() and [im.key for im in r.images] == ["images/x.png", "images/y.png"]
    np.testing.assert_array_equal(r.presence(), [[1], [0]])
    assert r.captions() is None


@pytest.mark.parametrize("text, line, what", [
    ("image,a,b\nimages/x.png,1,0\nimages/y.png,2,0\n", 3, "'a' holds '2'"),
    ("image,a,b\nimages/x.png,1,0\nimages/y.png,1\n", 3, "2 values"),
    ("name,a\nx.png,1\n", 1, "no image column"),
    ("image,a\nimages/x.png,1\nx.png,yes\n", 3, "0 or 1"),
    ("image,a\nimages/x.png,1\nimages/x.png,0\n", 3, "first at line 2"),
])
def test_labels_csv_errors_name_the_line(tmp_path, text, line, what):
    root = tmp_path / "labels"
    write_labels(root)
    (root / "labels.csv").write_text(text)
    with pytest.raises(DatasetError) as e:
        open_dataset(root, "labels-csv")
    msg = str(e.value)
    assert f"line {line}" in msg and what in msg and "labels.csv" in msg


def test_captions_jsonl_error_names_the_line(tmp_path):
    root = tmp_path / "labels"
    write_labels(root)
    (root / "captions.jsonl").write_text('{"image": "x.png", "caption": "ok"}\n{"image": "x.png"}\n')
    with pytest.raises(DatasetError, match="line 2") as e:
        open_dataset(root)
    assert "captions.jsonl" in str(e.value)


# ---- ImageFolder and plain folder --------------------------------------------------------------------------------

def test_imagefolder_classes(tmp_path):
    root = tmp_path / "if"
    _img(root / "dog" / "a.png", 4, 4)
    _img(root / "dog" / "deep" / "b.jpg", 4, 4)
    _img(root / "cat" / "z.png", 4, 4)
    _img(root / "cat" / "y.PNG", 4, 4)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here")
    assert detect_format(root) == "imagefolder"
    r = open_dataset(root)
    assert [im.key for im in r.images] == ["cat/y.PNG", "cat/z.png", "dog/a.png", "dog/deep/b.jpg"]
    assert r.concepts == [Concept("cat", "class", "imagefolder"), Concept("dog", "class", "imagefolder")]
    assert r.categories == ["class"]
    classes, labels = r.class_labels()
    assert classes == ["cat", "dog"] and labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(r.presence(), [[1, 0], [1, 0], [0, 1], [0, 1]])
    np.testing.assert_array_equal(r.annotated_categories(3), [True])
    assert r.report()["skipped"]["folders_without_images"]["examples"] == ["notes"]


def test_plain_folder_is_recursive_sorted_and_skips_non_images(tmp_path):
    root = tmp_path / "plain"
    _img(root / "b.png", 3, 3)
    _img(root / "a" / "z.jpg", 3, 3)
    _img(root / "a.png", 3, 3)
    _img(root / ".hidden" / "q.png", 3, 3)
    (root / "notes.txt").write_text("hi")
    assert detect_format(root) == "folder"  # loose images at the top: not class folders
    r = open_dataset(root)
    assert [im.key for im in r.images] == ["a.png", "a/z.jpg", "b.png"]
    assert r.concepts == [] and r.categories == []
    assert r.presence().shape == (3, 0)
    assert r.annotated_categories(0).shape == (0,)
    assert r.captions() is None and r.class_labels() is None and not r.has_masks
    # a single subfolder of images is not read as a one-class ImageFolder
    one = tmp_path / "one"
    _img(one / "photos" / "p.png", 3, 3)
    assert detect_format(one) == "folder"
    assert [im.key for im in open_dataset(one).images] == ["photos/p.png"]


def test_format_can_be_forced_and_bad_names_are_explained(tmp_path):
    root = tmp_path / "if"
    _img(root / "dog" / "a.png", 4, 4)
    _img(root / "cat" / "b.png", 4, 4)
    assert open_dataset(root, "folder").format == "folder"
    with pytest.raises(DatasetError, match="unknown dataset format") as e:
        open_dataset(root, "voc")
    assert "coco" in e.value.fix
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="index.csv"):
        open_dataset(root, "broden")


# ---- load_rgb and resizing ---------------------------------------------------------------------------------------

def test_load_rgb_good_images_become_rgb(tmp_path):
    a = _img(tmp_path / "a.png", 5, 7)
    im = load_rgb(tmp_path / "a.png")
    assert im.mode == "RGB" and im.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(im), a)
    Image.fromarray(np.full((3, 3), 200, np.uint8), "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "g.png")), np.full((3, 3, 3), 200, np.uint8))
    Image.new("P", (2, 2)).save(tmp_path / "p.gif")
    assert load_rgb(tmp_path / "p.gif").mode == "RGB"
    assert ".png" in IMAGE_EXTENSIONS and ".jpg" in IMAGE_EXTENSIONS


def test_load_rgb_raises_dataset_error_naming_the_file(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "text.jpg").write_text("hello")
    _img(tmp_path / "whole.png", 40, 40)
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 7).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for name in ("fake.png", "text.jpg", "cut.png", "cut.jpg", "missing.png"):
        with pytest.raises(DatasetError) as e:
            load_rgb(tmp_path / name)
        assert name in str(e.value) and e.value.fix, name
    with pytest.raises(DatasetError, match="missing"):
        load_rgb(tmp_path / "missing.png")


def test_resize_nearest_matches_torch_nearest_exact():
    rng = np.random.default_rng(0)
    for (h, w), (H, W) in [((5, 7), (2, 3)), ((13, 11), (29, 31)), ((112, 112), (7, 5)), ((24, 32), (112, 112))]:
        a = rng.integers(0, 1000, (3, h, w))
        ref = F.interpolate(torch.from_numpy(a).double()[None], size=(H, W), mode="nearest-exact")[0]
        np.testing.assert_array_equal(resize_nearest(a, (H, W)), ref.long().numpy())
