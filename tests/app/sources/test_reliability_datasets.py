"""Reliability regressions of the dataset readers: wide-bit-depth images, absurd polygon coordinates."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.errors import DatasetError
from app.sources.datasets import load_rgb, open_dataset
from tests.app.engine.conftest import write_coco


def _png16(path, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit-per-sample PNG written by hand (Pillow cannot save 48-bit RGB)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
    a = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    for name, write in (("pil.png", lambda p: Image.fromarray(a).save(p)), ("raw.png", lambda p: _png16(p, a, 0))):
        write(tmp_path / name)
        out = np.asarray(load_rgb(tmp_path / name))
        assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
        expected = np.rint(a / 257.0)
        assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
        assert (out == 255).mean() < 0.01  # was 99.6%: everything above 255 clipped to white


def test_48_bit_rgb_png_keeps_its_colours(tmp_path):
    a = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    rgb = np.stack([a, 65535 - a, np.full_like(a, 32768)], -1)
    _png16(tmp_path / "rgb48.png", rgb, 2)
    out = np.asarray(load_rgb(tmp_path / "rgb48.png")).astype(int)
    assert np.abs(out - np.rint(rgb / 257.0)).max() <= 1


def _coco_with(tmp_path, segmentation, sizes=True):
    root = tmp_path / "c"
    write_coco(root, 3)
    f = root / "annotations" / "instances.json"
    data = json.loads(f.read_text())
    if not sizes:
        for im in data["images"]:
            im.pop("width"), im.pop("height")
    data["annotations"][2]["segmentation"] = segmentation
    f.write_text(json.dumps(data))
    return root, f


@pytest.mark.parametrize("seg, words", [
    ([[0, 0, 5, float("inf"), 5, 5]], "coordinate 3 is inf"),
    ([[0, 0, 5, float("nan"), 5, 5]], "coordinate 3 is nan"),
    ([[0, 0, 1e12, 0, 1e12, 1e12]], "x coordinate 2 is 1000000000000.0, far outside an image of 16x16"),
    ([[0, 0, 5, -1e12, 5, 5]], "y coordinate 3"),
    ([[[0, 0], [5, 0], [5, 5]]], "nested coordinates"),
])
def test_absurd_polygons_are_refused_naming_file_and_annotation(tmp_path, seg, words):
    root, f = _coco_with(tmp_path, seg)
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    msg = str(err.value)
    assert str(f) in msg and "annotations[2].segmentation" in msg and words in msg
    assert "odd number" not in msg


def test_huge_bbox_is_refused(tmp_path):
    root, f = _coco_with(tmp_path, None)
    data = json.loads(f.read_text())
    del data["annotations"][2]["segmentation"]
    data["annotations"][2]["bbox"] = [0, 0, 1e12, 4]
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotations\[2\]\.bbox.*far outside"):
        open_dataset(root)


def test_polygon_beyond_an_unannotated_size_fails_its_image_only_at_decoding(tmp_path):
    """Without width/height in the annotations the bound is known only once the image is opened: the mask of that
    image fails with the file and annotation named, in bounded memory."""
    root, f = _coco_with(tmp_path, [[0, 0, 9e6, 0, 9e6, 9e6]], sizes=False)
    reader = open_dataset(root)
    i = next(k for k, im in enumerate(reader.images) if im.key.endswith("0001.png"))
    with pytest.raises(DatasetError) as err:
        reader.masks(i, (16, 16))
    assert str(f) in str(err.value) and "annotations[2].segmentation" in str(err.value)
    # the other images still decode
    assert reader.masks(0, (16, 16))[1].shape[0] == 2


def test_broden_unreadable_segmentation_fails_that_images_masks_not_silently(tmp_path):
    from tests.app.sources.test_datasets import write_broden

    root = tmp_path / "broden"
    write_broden(root)
    seg = root / "images" / "ade" / "a_part.png"
    seg.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    r = open_dataset(root)
    r.presence()  # listing presence stays lenient: the damaged file is noted in the report
    assert r.report()["skipped"]["unreadable_mask"]["count"] == 1
    with pytest.raises(DatasetError) as err:  # decoding the image's masks reports it (was: masks without it)
        r.masks(0, (16, 16))
    assert str(seg) in str(err.value) and "cannot be decoded" in str(err.value)
    assert r.masks(1, (4, 4))[0].tolist() == [0]
