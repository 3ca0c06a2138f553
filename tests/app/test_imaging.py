from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from app import imaging

PRE = {"resize": 32, "crop": 32, "interpolation": "bilinear", "resize_mode": "shorter"}


def gradient_image(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


@pytest.mark.parametrize("size,pre", [
    ((40, 32), PRE),
    ((31, 57), {"resize": 36, "crop": 32}),
    ((50, 50), {"resize": 40, "crop": 32, "resize_mode": "square"}),
    ((20, 12), {"resize": 16, "crop": 23}),  # crop larger than the resized image: zero padding, odd shortfall
])
def test_model_view_is_torchvision_resize_and_center_crop(size, pre):
    image = gradient_image(*size)
    resize = [pre["resize"]] * 2 if pre.get("resize_mode") == "square" else pre["resize"]
    ref = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(pre["crop"])])(image)
    got = imaging.model_view(image, pre)
    assert got.size == ref.size
    assert np.abs(np.asarray(got, np.int16) - np.asarray(ref, np.int16)).max() <= 1


def test_model_view_box_in_stored_pixels():
    # 40 x 32 -> shorter side 32 (no scaling), crop 32 x 32 starting at column 4
    assert imaging.model_view_box(40, 32, PRE) == (4.0, 0.0, 36.0, 32.0)
    # 80 x 64 -> scaled by 1/2: the same box, twice as large
    assert imaging.model_view_box(80, 64, PRE) == (8.0, 0.0, 72.0, 64.0)


def test_upsample_map_equals_interpolate_without_corner_alignment():
    m = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=(11, 13), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(imaging.upsample_map(m, (13, 11)), ref.numpy(), atol=1e-5)
    ref_sq = F.interpolate(torch.from_numpy(m)[None, None], size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(imaging.upsample_map(m, 32), ref_sq[0, 0].numpy(), atol=1e-5)


def test_map_on_image_places_the_map_through_the_crop():
    m = np.random.default_rng(1).random((4, 4)).astype(np.float32)
    on_image = imaging.map_on_image(m, (40, 32), PRE)
    assert on_image.shape == (32, 40)
    # the model saw columns 4..35 at scale 1: the values there are the map upsampled to the crop
    np.testing.assert_allclose(on_image[:, 4:36], imaging.upsample_map(m, 32), atol=1e-5)
    assert np.isneginf(on_image[:, :4]).all() and np.isneginf(on_image[:, 36:]).all()
    # at twice the resolution, every stored pixel samples the same continuous map
    big = imaging.map_on_image(m, (80, 64), PRE)
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=(64, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(big[:, 8:72], ref[0, 0].numpy(), atol=1e-5)


def test_region_bbox_and_crop():
    values = np.zeros((20, 30), np.float32)
    values[5:9, 10:16] = 2.0
    mask = imaging.region(values, 1.0)
    assert mask.sum() == 24
    assert imaging.region(values, 2.0).sum() == 0  # strictly above, as the engine counts
    assert imaging.bbox(mask) == (10, 5, 16, 9)
    assert imaging.bbox(np.zeros((3, 3), bool)) is None
    image = gradient_image(30, 20)
    crop, box = imaging.crop_region(image, mask, margin=0.5)
    assert box == (7, 3, 19, 11) and crop.size == (12, 8)
    assert imaging.crop_region(image, np.zeros((20, 30), bool)) is None
    edge = imaging.outline(mask)
    assert edge.sum() == 2 * 6 + 2 * 4 - 4 and not edge[6:8, 11:15].any()


def test_heat_overlay_and_masked_image():
    image = Image.new("RGB", (16, 16), (100, 100, 100))
    values = np.zeros((16, 16), np.float32)
    values[4:8, 4:8] = 1.0
    out = np.asarray(imaging.heat_overlay(image, values, vmin=0.0, vmax=1.0, threshold=0.5))
    assert (out[0, 0] == 30).all()  # silent parts darkened to 30%
    assert tuple(out[4, 4]) == (80, 220, 255)  # the region's border
    assert not (out[5, 5] == 100).all()  # inside: coloured
    masked = np.asarray(imaging.masked_image(image, values > 0.5))
    assert tuple(masked[5, 5]) == (100, 100, 100) and tuple(masked[0, 0]) == (25, 25, 25)
    with pytest.raises(ValueError):
        imaging.heat_overlay(image, values[:8])


def test_exemplar_pictures_and_data_uri():
    image = gradient_image(40, 32)
    m = np.zeros((4, 4), np.float32)
    m[1, 2] = 3.0
    for mode in imaging.RENDER_MODES:
        pic = imaging.exemplar_picture(image, m, 1.0, PRE, mode, 48)
        assert pic.size == (48, 48) and pic.mode == "RGB"
    with pytest.raises(ValueError):
        imaging.exemplar_picture(image, m, 1.0, PRE, "nope")
    # a unit without a spatial map: the picture is framed when the value is above the threshold
    hot = np.asarray(imaging.exemplar_picture(image, np.array([[2.0]]), 1.0, PRE, "heat", 48, 0.0, 2.0))
    cold = np.asarray(imaging.exemplar_picture(image, np.array([[0.5]]), 1.0, PRE, "heat", 48, 0.0, 2.0))
    assert tuple(hot[0, 24]) == imaging.CONTOUR_RGB and tuple(cold[0, 24]) != imaging.CONTOUR_RGB
    uri = imaging.data_uri(imaging.exemplar_picture(image, m, 1.0, PRE, "heat", 32))
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.format == "PNG" and im.size == (32, 32)
    assert imaging.colormap(np.array([0.0, 1.0, np.nan])).shape == (3, 3)


def test_outline_keeps_the_image_colours_and_1x1_maps_never_tint_the_picture():
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    m = np.zeros((8, 8), np.float32)
    m[2:6, 2:6] = 5.0
    pic = np.asarray(imaging.exemplar_picture(image, m, 1.0, {"crop": 64, "resize": 64}, "outline", 64))
    assert tuple(pic[1, 1]) == (40, 90, 200)  # outside the region: the image exactly
    inside = pic[32, 32].astype(int)
    assert np.abs(inside - (40, 90, 200)).max() < 70 and tuple(inside) != (40, 90, 200)  # a light tint only
    values = imaging.upsample_map(m, 64)
    edge = imaging.outline(imaging.region(values, 1.0))
    assert (pic[edge] == imaging.CONTOUR_RGB).all()  # the contour is drawn in full
    layer = imaging.contour_rgba(values, 1.0)
    assert layer[..., 3][~imaging.region(values, 1.0) & ~imaging._thick(edge, 2)].max() == 0
    # a 1x1 map: in every mode but crop the picture keeps the image's colour over its upper part
    for mode in ("outline", "heat", "region"):
        one = np.asarray(imaging.exemplar_picture(image, np.array([[3.0]]), 1.0, {"crop": 64}, mode, 64))
        assert tuple(one[20, 32]) == (40, 90, 200), mode
    assert not imaging.has_extent(np.zeros((1, 1))) and imaging.has_extent(np.zeros((2, 2)))
