"""Offscreen Qt, settings isolated in tmp_path, and a tiny real project: a small CNN loaded from a `python:`
factory file and a COCO dataset with masks and captions (coloured squares on a grey background)."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 32
CATS = [("square", "object"), ("disc", "object"), ("red", "color"), ("blue", "color")]

FACTORY = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.ReLU(),
        )
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def make():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        # first conv: half the units look for red, half for blue, so labels are predictable
        w = net.features[0].weight
        w.zero_()
        for u in range(8):
            w[u, 0 if u % 2 == 0 else 2] = 0.3
            w[u, 2 if u % 2 == 0 else 0] = -0.3
        net.features[0].bias.fill_(-0.05)
    return net
'''


def write_coco(root: Path, n: int, seed: int = 0) -> None:
    """n images SIZE x SIZE with one red or blue square or disc each; COCO instances (masks) and captions."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns, caps = [], [], []
    aid = 1
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        img = np.full((SIZE, SIZE, 3), 110, np.uint8)
        img += rng.integers(0, 20, img.shape, dtype=np.uint8)
        s = int(rng.integers(8, 16))
        y, x = (int(v) for v in rng.integers(0, SIZE - s, 2))
        shape = "square" if (i // 2) % 2 == 0 else "disc"
        if shape == "square":
            m = (yy >= y) & (yy < y + s) & (xx >= x) & (xx < x + s)
        else:
            m = (yy - y - s / 2) ** 2 + (xx - x - s / 2) ** 2 <= (s / 2) ** 2
        colour = "red" if i % 2 == 0 else "blue"
        img[m] = (230, 20, 20) if colour == "red" else (20, 20, 230)
        name = f"{i:04d}.png"
        Image.fromarray(img).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        for cat_id in (1 if shape == "square" else 2, 3 if colour == "red" else 4):
            anns.append({"id": aid, "image_id": i + 1, "category_id": cat_id, "segmentation": rle,
                         "area": float(m.sum()), "bbox": [x, y, s, s], "iscrowd": 0})
            aid += 1
        caps.append({"id": i + 1, "image_id": i + 1, "caption": f"a {colour} {shape} on grey"})
    (root / "annotations").mkdir()
    cats = [{"id": j + 1, "name": nm, "supercategory": sc} for j, (nm, sc) in enumerate(CATS)]
    (root / "annotations" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "annotations" / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))


PREPROCESS = {"resize": SIZE, "crop": SIZE, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    # platformdirs (preferences, log file) must not touch the real home during tests
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "tiny_net.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture
def coco_dir(tmp_path) -> Path:
    root = tmp_path / "coco"
    write_coco(root, 40)
    return root


@pytest.fixture
def settings(tmp_path):
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


@pytest.fixture
def prefs(tmp_path):
    from app.ui.settings import Preferences

    p = Preferences(path=tmp_path / "prefs.json")
    p.device = "cpu"
    p.num_workers = 0  # decoding in the job's thread: no worker processes forked from a Qt test process
    return p


@pytest.fixture
def window(qtbot, prefs, settings):
    from app.ui.main_window import MainWindow

    w = MainWindow(prefs=prefs, settings=settings)
    w.confirm = lambda title, text: True
    errors: list[tuple[str, str]] = []
    w.report_error = lambda title, text: errors.append((title, text))
    w.errors = errors
    qtbot.addWidget(w)
    w.show()
    yield w
    w.manager.shutdown(30)
    from app.ui.workers import wait_pool

    wait_pool()


def build_project(root: Path, model_file: Path, coco: Path, layers: list[str] | None = None,
                  methods: tuple[str, ...] = ()) -> Path:
    """A project with the tiny model and dataset, extracted (and labeled) without the window."""
    from app.engine.extract import ExtractJob, ExtractOptions
    from app.engine.labeling import LabelJob
    from app.jobs import JobProgress
    from app.project.store import Project
    from app.workspace import add_dataset, add_model

    proj = root / "p.nstudio"
    with Project.create(proj) as p:
        add_model(p, f"python:{model_file}:make", None, name="tiny", trust_code=True, preprocess_overrides=PREPROCESS)
        add_dataset(p, coco, name="coco")
    layers = layers or ["features.1", "features.3"]
    ExtractJob(proj, ExtractOptions(layers=layers, device="cpu", num_workers=0, batch_size=16)).execute(JobProgress())
    for layer in layers:
        for m in methods:
            LabelJob(proj, m, layer, device="cpu", num_workers=0).execute(JobProgress())
    return proj
