"""Extraction throughput against the bare forward pass, and peak memory at 1x and 10x the dataset size.

    python benchmarks/extract.py [--model resnet18] [--images 256] [--batch-size 32] [--device auto]

Prints (1) images/s of the bare forward pass (preprocessed tensors already in memory, same model, batch size and
device), (2) images/s of extraction pass 1 (decoding, hooks, pooled arrays, exact quantiles, exemplars), and their
ratio; (3) peak resident memory of a whole extraction over N and 10 N images, each in a fresh process, and their
ratio (flat is the goal: everything per image goes to memory-mapped files).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        # cheap distinct images: a shifted, tinted base pattern saved as JPEG (what real datasets hold)
        img = np.roll(base, shift=(i * 7) % size, axis=0) // 2 + rng.integers(0, 128, (1, 1, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)


def make_project(tmp: Path, model: str, n_images: int, size: int) -> tuple[Path, str]:
    import torch
    import torchvision
    from safetensors.torch import save_file

    from app.project.store import Project
    from app.workspace import add_dataset, add_model

    weights = tmp / f"{model}.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        net = torchvision.models.get_model(model, weights=None)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    images = tmp / f"images-{n_images}"
    if not images.exists():
        make_images(images, n_images, size)
    proj = tmp / f"bench-{n_images}.nstudio"
    with Project.create(proj) as p:
        add_model(p, f"torchvision:{model}", weights, name=model)
        add_dataset(p, images, name="images")
    return proj, model


def layer_names(model: str) -> list[str]:
    return {"resnet18": ["layer3", "layer4"], "resnet50": ["layer3", "layer4"]}.get(model, ["features"])


def bare_forward(project: Path, batch_size: int, device_name: str, n_images: int) -> float:
    import torch

    from app.engine.device import pick_device
    from app.engine.extract import load_project_model
    from app.project.store import Project

    device = pick_device(device_name)
    with Project.open(project) as p:
        row = p.model()
    model = load_project_model(row, device)
    crop = model.preprocess.crop
    x = torch.randn(batch_size, 3, crop, crop)
    if device.type == "cuda":
        model.module.to(memory_format=torch.channels_last)
    batches = max(2, n_images // batch_size)
    with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        xb = x.to(device)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        model.forward(xb)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(batches):
            model.forward(x.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batches * batch_size / (time.perf_counter() - t)


def extraction(project: Path, model: str, batch_size: int, device: str, workers: int | None) -> dict:
    from app.engine.extract import ExtractJob, ExtractOptions
    from app.jobs import JobProgress

    opts = ExtractOptions(layers=layer_names(model), batch_size=batch_size, device=device, num_workers=workers)
    rep = ExtractJob(project, opts).execute(JobProgress())
    return {"images_per_second": rep.images_per_second, "seconds": rep.seconds, "device": rep.device}


def child_main(args: argparse.Namespace) -> None:
    out = extraction(Path(args.child), args.model, args.batch_size, args.device, args.workers)
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def peak_memory(project: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", str(project), "--model", args.model, "--batch-size",
           str(args.batch_size), "--device", args.device]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    # the extraction's own process; decoding workers are separate processes of constant size
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256, help="side of the generated images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--memory-images", type=int, default=None, help="N for the 1x/10x memory runs (default --images/4)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proj, model = make_project(tmp, args.model, args.images, args.size)
        fwd = bare_forward(proj, args.batch_size, args.device, args.images)
        ext = extraction(proj, model, args.batch_size, args.device, args.workers)
        print(f"device: {ext['device']}  model: {model}  batch: {args.batch_size}  images: {args.images}")
        print(f"bare forward:        {fwd:8.1f} images/s")
        print(f"extraction (pass 1): {ext['images_per_second']:8.1f} images/s")
        print(f"ratio extraction / forward: {ext['images_per_second'] / fwd:.3f}  (goal >= 0.9)")
        if not args.skip_memory:
            n = args.memory_images or max(args.batch_size, args.images // 4)
            p1, _ = make_project(tmp, model, n, args.size)
            p10, _ = make_project(tmp, model, 10 * n, args.size)
            m1 = peak_memory(p1, args)
            m10 = peak_memory(p10, args)
            print(f"peak RSS, {n} images: {m1['max_rss_mb']:.0f} MB; {10 * n} images: {m10['max_rss_mb']:.0f} MB; "
                  f"ratio 10x/1x: {m10['max_rss_mb'] / m1['max_rss_mb']:.3f}  (goal: flat, ~1.0)")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
