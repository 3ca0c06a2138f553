"""The demo's small CNN: classify the main object's shape in the procedural dataset. Trained here, on the CPU in
about a minute, deterministically; saved as safetensors with the metadata that `builtin:shapes_cnn` reads."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _block(c_in: int, c_out: int, pool: bool, stride: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                               nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ShapesCNN(nn.Module):
    """Four conv blocks (named block1..block4, the layers to dissect: 32, 16, 8 and 8 pixels wide for a
    64-pixel input), global average pooling and a linear classifier `fc`."""

    def __init__(self, num_classes: int = 6, width: int = 16):
        super().__init__()
        # A strided first convolution: full-resolution maps would cost most of the training time on a CPU.
        self.block1 = _block(3, width, pool=False, stride=2)
        self.block2 = _block(width, 2 * width, pool=True)
        self.block3 = _block(2 * width, 4 * width, pool=True)
        self.block4 = _block(4 * width, 4 * width, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_training_data(dataset_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images as one uint8 tensor [N, 3, H, W] (the demo set is small) and the main shape's class index."""
    from PIL import Image

    dataset_dir = Path(dataset_dir)
    classes = json.loads((dataset_dir / "classes.json").read_text())
    meta = json.loads((dataset_dir / "annotations" / "instances.json").read_text())
    index = {c: i for i, c in enumerate(classes)}
    images = sorted(meta["images"], key=lambda im: im["id"])
    x = np.stack([np.asarray(Image.open(dataset_dir / "images" / im["file_name"]).convert("RGB")) for im in images])
    y = np.array([index[im["class"]] for im in images], dtype=np.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y), classes


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def train_demo_model(dataset_dir: Path, out_path: Path, *, epochs: int = 12, seed: int = 0, progress: Any = None,
                     device: str = "cpu", width: int = 16, batch_size: int = 64, lr: float = 5e-3) -> dict[str, Any]:
    from safetensors.torch import save_file

    t0 = time.monotonic()
    torch.manual_seed(seed)
    x, y, classes = load_training_data(dataset_dir)
    n = len(y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, n // 10)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    model = ShapesCNN(len(classes), width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train_idx) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            xb = _normalise(x[idx])
            # Mirror half the batch: shapes keep their class, positions change, so units cannot lean on position.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = nn.functional.cross_entropy(model(xb.to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress.update(step, steps, f"training the demo CNN (epoch {epoch + 1}/{epochs})")
    train_acc = _accuracy(model, x[train_idx], y[train_idx], device)
    val_acc = _accuracy(model, x[val_idx], y[val_idx], device)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "neuron_studio.architecture": "shapes_cnn",
        "neuron_studio.arch_kwargs": json.dumps({"num_classes": len(classes), "width": width}),
        "neuron_studio.preprocess": json.dumps({"resize": int(x.shape[-1]), "crop": int(x.shape[-1]),
                                                "mean": list(MEAN), "std": list(STD)}),
        "neuron_studio.classes": json.dumps(classes),
    }
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, out_path)
    metrics = {"train_accuracy": train_acc, "heldout_accuracy": val_acc, "epochs": epochs,
               "images": n, "heldout_images": int(n_val), "seconds": time.monotonic() - t0}
    log.info("demo model trained: %s", metrics)
    return metrics


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(y), 256):
        pred = model(_normalise(x[s:s + 256]).to(device)).argmax(1).cpu()
        correct += int((pred == y[s:s + 256]).sum())
    return correct / max(1, len(y))
