"""A small naming project built directly with the store: real PNG images, a tiny CNN run over them to write the
layer arrays exactly where and how the extraction writes them, and automatic labels for one method.

Used by tests/app/test_naming.py and tests/app/ui/test_board.py (also from subprocesses: `python -m
tests.app.naming_helpers PATH` builds a project at PATH)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 32
N_IMAGES = 12
UNITS = 6
TOPK = 4
LAYER = "act2"
PREPROCESS = {"resize": SIZE, "crop": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
              "interpolation": "bilinear", "resize_mode": "shorter"}


class TinyNet(torch.nn.Module):
    """conv -> relu -> conv -> relu (`act2`, the layer we name) -> global average pool -> linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(4, UNITS, 3, stride=2, padding=1)
        self.act2 = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(UNITS, 3)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass
class LayerRow:
    name: str
    units: int
    type: str = "ReLU"
    kind: str = "conv"
    shape: tuple = (UNITS, SIZE // 2, SIZE // 2)
    grid: tuple = (SIZE // 2, SIZE // 2)
    prefix_tokens: int = 0


def tiny_model():
    from app.sources.models import LoadedModel
    from app.sources.preprocess import Preprocess

    torch.manual_seed(0)
    net = TinyNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    pre = Preprocess.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in PREPROCESS.items()})
    return LoadedModel(spec="builtin:tiny", kind="builtin", module=net, preprocess=pre, weights_path=None,
                       fingerprint="tiny", class_names=["a", "b", "c"])


def write_images(folder: Path, n: int = N_IMAGES, seed: int = 0) -> list[str]:
    """Half the images hold a red square, half a blue disc, on grey noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    keys = []
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        img = np.full((SIZE, SIZE, 3), 110, np.uint8) + rng.integers(0, 25, (SIZE, SIZE, 3), dtype=np.uint8)
        cy, cx = (int(v) for v in rng.integers(8, SIZE - 8, 2))
        if i % 2 == 0:
            img[cy - 5:cy + 5, cx - 5:cx + 5] = (220, 30, 30)
        else:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 30] = (30, 30, 220)
        key = f"{i:03d}.png"
        Image.fromarray(img).save(folder / key)
        keys.append(key)
    return keys


def build_project(root: Path, labels: bool = True, pool: str | None = "unit") -> dict:
    """Creates root/images and root/proj.nstudio; returns ids (and the pool id when `pool` is set)."""
    from app.project import arrays
    from app.project.store import Project, now
    from labelers.base import Label

    root = Path(root)
    keys = write_images(root / "images")
    model = tiny_model()
    project = Project.create(root / "proj.nstudio")
    model_id = project.add_model(name="tiny", spec="builtin:tiny", kind="builtin", weights_path=None,
                                 fingerprint="tiny", preprocess=PREPROCESS, class_names=["a", "b", "c"],
                                 layers=[LayerRow(LAYER, UNITS)])
    layer_id = project.layer(model_id, LAYER)["id"]
    with project.transaction() as conn:
        ds_id = int(conn.execute(
            "INSERT INTO datasets (name, format, root, fingerprint, num_images, has_masks, categories, added_at)"
            " VALUES (?,?,?,?,?,?,?,?)", ("shapes", "folder", str(root / "images"), "fp", len(keys), 0, "[]", now()),
        ).lastrowid)
        conn.executemany("INSERT INTO images (dataset_id, idx, key, width, height) VALUES (?,?,?,?,?)",
                         [(ds_id, i, k, SIZE, SIZE) for i, k in enumerate(keys)])
    # The extraction's files for the layer, from the real model on the real images.
    transform = model.preprocess.transform()
    x = torch.stack([transform(Image.open(root / "images" / k).convert("RGB")) for k in keys])
    acts: dict = {}
    handle = model.module.act2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    with torch.no_grad():
        model.module(x)
    handle.remove()
    a = acts["a"]  # [N, U, h, w]
    flat = a.flatten(2)
    run = project.create_run(kind="extract", key="fake", params={}, model_id=model_id, dataset_id=ds_id)
    d = project.arrays_dir / f"run-{run}" / LAYER
    d.mkdir(parents=True)
    arrays.save_npy(d / "pooled_max.npy", flat.amax(2).numpy().astype(np.float32))
    arrays.save_npy(d / "pooled_mean.npy", flat.mean(2).numpy().astype(np.float32))
    per_unit = a.transpose(0, 1).reshape(UNITS, -1)
    quantiles = [0.99, 0.995]
    arrays.save_npy(d / "quantiles.npy", torch.quantile(per_unit, torch.tensor(quantiles), dim=1).numpy())
    top = flat.amax(2).T.topk(TOPK, dim=1)  # [U, k]
    arrays.save_npy(d / "topk_index.npy", top.indices.numpy().astype(np.int64))
    arrays.save_npy(d / "topk_scores.npy", top.values.numpy().astype(np.float32))
    maps = a[top.indices, torch.arange(UNITS)[:, None]]  # [U, k, h, w]
    arrays.save_npy(d / "topk_maps.npy", maps.numpy().astype(np.float16))
    (d / "meta.json").write_text(json.dumps({"layer": LAYER, "quantiles": quantiles, "exact": True,
                                             "topk": TOPK, "iou_quantile": 0.995}))
    project.add_layer_stats(run_id=run, layer_id=layer_id, array_dir=str(d.relative_to(project.path)),
                            quantiles=quantiles, quantile_method="exact", has_mask_counts=False, mask_size=None)
    project.finish_run(run, "done")
    out = {"project": str(project.path), "model_id": model_id, "layer_id": layer_id, "dataset_id": ds_id,
           "run_id": run}
    if labels:
        lrun = project.create_run(kind="label", key="lab", params={}, model_id=model_id, layer_id=layer_id,
                                  method="netdissect", source_run_id=run)
        project.replace_labels(lrun, layer_id, "netdissect", [
            Label(unit=u, rank=1, text="red" if u % 2 == 0 else "disc", score=0.1 * (u + 1)) for u in range(UNITS)])
        project.finish_run(lrun, "done")
    if pool:
        from app import naming

        out["pool_id"] = naming.build_pool(project, naming.PoolSpec(kind=pool, layer=LAYER, per_unit=TOPK,
                                                                    device="cpu"), model=model)
    project.close()
    return out


if __name__ == "__main__":
    print(json.dumps(build_project(Path(sys.argv[1]))))
