"""A tiny project built from scratch: a TorchScript CNN with known weights and a COCO dataset with masks,
captions and one corrupt image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

SIZE = 16
CATS = [("square", "object"), ("red", "color"), ("blue", "color")]


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def write_coco(root: Path, n: int, seed: int = 0, corrupt: int | None = None) -> list[np.ndarray]:
    """n images SIZE x SIZE, each with one red or blue square; returns the square masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns, caps, masks = [], [], [], []
    aid = 1
    for i in range(n):
        img = np.full((SIZE, SIZE, 3), 90, np.uint8)
        img += rng.integers(0, 30, img.shape, dtype=np.uint8)
        s = int(rng.integers(4, 9))
        y, x = (int(v) for v in rng.integers(0, SIZE - s, 2))
        m = np.zeros((SIZE, SIZE), np.uint8)
        m[y:y + s, x:x + s] = 1
        colour = "red" if i % 2 == 0 else "blue"
        img[m.astype(bool)] = (230, 20, 20) if colour == "red" else (20, 20, 230)
        name = f"{i:04d}.png"
        Image.fromarray(img).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        for cat_id in (1, 2 if colour == "red" else 3):
            anns.append({"id": aid, "image_id": i + 1, "category_id": cat_id, "segmentation": rle,
                         "area": float(m.sum()), "bbox": [x, y, s, s], "iscrowd": 0})
            aid += 1
        caps.append({"id": i + 1, "image_id": i + 1, "caption": f"a {colour} square"})
        masks.append(m.astype(bool))
    if corrupt is not None:
        (root / "images" / images[corrupt]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "annotations").mkdir()
    cats = [{"id": j + 1, "name": nm, "supercategory": sc} for j, (nm, sc) in enumerate(CATS)]
    (root / "annotations" / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                     "categories": cats}))
    (root / "annotations" / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return masks


FACTORY = """
import torch
from tests.app.engine.conftest import TinyNet

def make():
    torch.manual_seed(0)
    return TinyNet()
"""


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A `python:` factory (TorchScript submodules cannot be hooked, so a scripted model exposes no layers)."""
    path = tmp_path / "tiny_model.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture
def tiny_project(tmp_path, tiny_model):
    from app.project.store import Project
    from app.workspace import add_dataset, add_model

    data = tmp_path / "coco"
    write_coco(data, 24, corrupt=5)
    proj = tmp_path / "p.nstudio"
    with Project.create(proj) as p:
        add_model(p, f"python:{tiny_model}:make", None, name="tiny", trust_code=True,
                  preprocess_overrides={"resize": SIZE, "crop": SIZE, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
        add_dataset(p, data, name="coco")
    return proj
