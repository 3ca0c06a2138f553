"""The demo CNN's trained weights, shipped with the app so that the demo does not spend its first minutes training.

`resources/demo/shapes_cnn.safetensors` is what `train_demo_model` wrote, with its defaults, on the shapes dataset
of `DEFAULT_IMAGES` images and seed 0; `shapes_cnn.json` beside it records how it was made (the training recipe,
the digest of the dataset's files, the digest of the weights, the versions used). The demo uses the shipped file
only when all of that matches: the dataset generated on this machine has the recorded digest (so `shapes.py` still
draws the same images), the requested images/seed/epochs are the recipe's, and `train_demo_model`'s defaults are
the recorded ones. Otherwise it trains, as before.

Rebuild both files after changing shapes.py, glyph.py or train.py: `python -m app.demo.shipped`.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINING_DEFAULTS = ("epochs", "width", "batch_size", "lr")


def shipped_dir() -> Path:
    import resources

    return Path(resources.__file__).resolve().parent / "demo"


def dataset_digest(folder: Path) -> str:
    """sha256 over the relative path and bytes of every file of a generated dataset (its images and annotations)."""
    h = hashlib.sha256()
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 over a .safetensors file's tensors (name, dtype, shape, bytes) and metadata, in sorted order. Not the
    file's bytes: the header's key order can differ between two writes of the same tensors."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def training_defaults() -> dict[str, Any]:
    from app.demo.train import train_demo_model

    sig = inspect.signature(train_demo_model)
    return {name: sig.parameters[name].default for name in TRAINING_DEFAULTS}


def read_provenance(folder: Path | None = None) -> dict[str, Any] | None:
    path = (folder or shipped_dir()) / "shapes_cnn.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def matching_shipped_weights(data_dir: Path, n_images: int, seed: int, epochs: int | None,
                             folder: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The shipped weights and their training metrics when they are what training would produce here, else None
    (the reason is logged)."""
    folder = folder or shipped_dir()
    prov = read_provenance(folder)
    weights = folder / "shapes_cnn.safetensors"
    if prov is None or not weights.exists():
        log.info("no shipped demo weights in %s: training", folder)
        return None
    recipe = prov["recipe"]
    # What training would use here: the requested images, seed and epochs, and train_demo_model's other defaults.
    wanted = {"images": n_images, "seed": seed, **training_defaults()}
    if epochs is not None:
        wanted["epochs"] = epochs
    why = ""
    if any(recipe.get(k) != v for k, v in wanted.items()):
        why = f"training here would use {wanted}, the shipped weights were trained with {recipe}"
    elif weights_digest(weights) != prov["weights_digest"]:
        why = "the shipped weights do not have their recorded digest"
    elif dataset_digest(data_dir) != prov["dataset_sha256"]:
        why = "the generated dataset differs from the one the shipped weights were trained on"
    if why:
        log.info("not using the shipped demo weights: %s", why)
        return None
    return weights, dict(prov["metrics"])


def build_shipped(out_folder: Path, n_images: int, seed: int = 0, work_dir: Path | None = None,
                  **train_kwargs: Any) -> dict[str, Any]:
    """Generate the dataset, train with `train_demo_model`'s defaults (or `train_kwargs`), and write the weights and
    their provenance to `out_folder`. The demo default is what ships; tests call it with a tiny recipe."""
    import torch

    from app.demo.glyph import generate_demo_dataset
    from app.demo.train import train_demo_model

    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        data = generate_demo_dataset(Path(tmp) / "shapes", n_images=n_images, seed=seed)
        recipe = {"images": n_images, "seed": seed, **training_defaults(), **train_kwargs}
        kwargs = {k: recipe[k] for k in TRAINING_DEFAULTS}
        metrics = train_demo_model(data, out_folder / "shapes_cnn.safetensors", seed=seed, **kwargs)
        prov = {
            "recipe": recipe,
            "dataset_sha256": dataset_digest(data),
            "weights_digest": weights_digest(out_folder / "shapes_cnn.safetensors"),
            "metrics": {k: v for k, v in metrics.items() if k != "seconds"},
            "built_with": {"torch": torch.__version__, "python": sys.version.split()[0],
                           "machine": platform.machine(), "threads": torch.get_num_threads()},
            "how": "python -m app.demo.shipped (train_demo_model on generate_demo_dataset, both deterministic)",
        }
    tmp_json = out_folder / "shapes_cnn.json.tmp"
    tmp_json.write_text(json.dumps(prov, indent=1, default=float) + "\n")
    os.replace(tmp_json, out_folder / "shapes_cnn.json")
    return prov


if __name__ == "__main__":
    from app.demo.shapes import DEFAULT_IMAGES

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(build_shipped(shipped_dir(), DEFAULT_IMAGES), indent=1, default=float))
