"""Time every available labeling method on synthetic inputs, and INVERT against a per-pair sklearn loop.

    .venv/bin/python benchmarks/labelers.py            # 512 units, 1,000 concepts, 20,000 images
    .venv/bin/python benchmarks/labelers.py --quick    # a small run
    .venv/bin/python benchmarks/labelers.py --methods invert --clip /path/to/clip-vit-b16

Inputs are built in-process (no files): pooled activations whose units are driven by one or two concepts each, a
boolean image x concept matrix, Network-Dissection style mask counts, per-pixel mask batches on a subset of images
at low resolution, and one caption per image naming some of its concepts. Methods that need images and a CLIP model
run only with --clip DIR.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labelers.base import (  # noqa: E402
    Concept,
    Input,
    LabelerInputs,
    MaskBatch,
    MaskCounts,
    available,
)

CATEGORIES = ["object", "part", "scene", "texture", "color"]


def build_inputs(args: argparse.Namespace) -> LabelerInputs:
    g = torch.Generator().manual_seed(args.seed)
    n, u, c = args.images, args.units, args.concepts
    # Concept frequencies spread log-uniformly from rare (0.2%) to common (20%), as in annotated datasets.
    prevalence = torch.exp(torch.empty(c).uniform_(math.log(0.002), math.log(0.2), generator=g))
    presence = torch.rand(n, c, generator=g) < prevalence
    concepts = [Concept(f"concept{i:04d}", CATEGORIES[i % len(CATEGORIES)]) for i in range(c)]
    # Each unit responds to one or two concepts (AND or OR of two for a third of them), plus noise.
    drive_a = torch.randint(0, c, (u,), generator=g)
    drive_b = torch.randint(0, c, (u,), generator=g)
    kind = torch.randint(0, 3, (u,), generator=g)
    pa, pb = presence[:, drive_a].float(), presence[:, drive_b].float()
    signal = torch.where(kind == 0, pa, torch.where(kind == 1, pa * pb, torch.maximum(pa, pb)))
    pooled_mean = torch.relu(signal * 2.0 + torch.randn(n, u, generator=g))
    pooled_max = pooled_mean + torch.rand(n, u, generator=g)

    k = len(CATEGORIES)
    category = torch.arange(c) % k
    pixels = 112 * 112
    concept_area = presence.sum(0).double() * pixels * 0.2
    unit_area = torch.full((u, k), 0.005 * n * pixels, dtype=torch.float64)
    overlap = torch.rand(u, c, generator=g, dtype=torch.float64) * 0.1
    overlap[torch.arange(u), drive_a] = 0.5
    intersection = overlap * torch.minimum(unit_area[:, category], concept_area[None, :])
    mask_counts = MaskCounts(intersection, unit_area, concept_area, category, list(CATEGORIES))

    mask_images, size, seed = min(args.mask_images, n), args.mask_size, args.seed

    def mask_batches() -> Iterator[MaskBatch]:
        gen = torch.Generator().manual_seed(seed + 1)
        for s in range(0, mask_images, 64):
            e = min(s + 64, mask_images)
            here = presence[s:e]  # [B, C]
            blob = torch.rand(e - s, 1, size, size, generator=gen) < 0.3
            concept_masks = here[:, :, None, None] & blob
            unit_maps = torch.rand(e - s, u, size, size, generator=gen) < 0.01
            unit_masks = unit_maps | (concept_masks[:, drive_a] & (torch.rand(e - s, u, 1, 1, generator=gen) < 0.8))
            yield MaskBatch(unit_masks, concept_masks, torch.ones(e - s, k, dtype=torch.bool))

    names = [cc.name for cc in concepts]
    fillers = ["a photo of", "an image with", "a picture showing", "there is"]
    present: list[list[str]] = [[] for _ in range(n)]
    for img, con in presence.nonzero().tolist():
        present[img].append(names[con])
    captions = []
    for i in range(n):
        words = present[i][:5] or ["nothing"]
        captions.append([f"{fillers[i % len(fillers)]} {' and '.join(words)}"])

    inputs = LabelerInputs(
        layer="synthetic",
        num_units=u,
        device=torch.device(args.device),
        pooled_max=pooled_max,
        pooled_mean=pooled_mean,
        concepts=concepts,
        concept_presence=presence,
        mask_counts=mask_counts,
        mask_batches=mask_batches,
        captions=captions,
    )
    if args.clip:
        from PIL import Image

        def images(batch_size: int) -> Iterator[tuple[torch.Tensor, list]]:
            rng = np.random.default_rng(seed + 2)
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                pics = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(s, e)]
                yield torch.arange(s, e), pics

        inputs.images = images
        inputs.clip_model = Path(args.clip)
    return inputs


def time_methods(inputs: LabelerInputs, args: argparse.Namespace) -> dict[str, float]:
    wanted = set(args.methods.split(",")) if args.methods else None
    times: dict[str, float] = {}
    print(f"{'method':<16}{'time':>10}{'labels':>10}  note")
    for name, cls in available().items():
        if wanted is not None and name not in wanted:
            continue
        needs = set(cls.inputs)
        if Input.CLIP_MODEL in needs and not args.clip:
            print(f"{name:<16}{'-':>10}{'-':>10}  skipped: needs a local CLIP model folder (--clip DIR)")
            continue
        if Input.IMAGES in needs and inputs.images is None:
            print(f"{name:<16}{'-':>10}{'-':>10}  skipped: needs image files (given only with --clip DIR)")
            continue
        note = ""
        if Input.MASK_BATCHES in needs:
            note = f"mask batches: {min(args.mask_images, args.images)} images at {args.mask_size}x{args.mask_size}"
        try:
            t0 = time.perf_counter()
            result = cls()(inputs)
            dt = time.perf_counter() - t0
        except Exception as exc:  # one broken method must not hide the others' numbers
            print(f"{name:<16}{'-':>10}{'-':>10}  failed: {type(exc).__name__}: {exc}")
            continue
        times[name] = dt
        print(f"{name:<16}{dt:>9.2f}s{len(result.labels):>10}  {note}")
    return times


def invert_speedup(inputs: LabelerInputs, args: argparse.Namespace, invert_time: float | None) -> None:
    from sklearn.metrics import roc_auc_score

    from labelers.invert import Invert, auc_table

    pooled = inputs.pooled_mean
    presence = inputs.concept_presence
    assert pooled is not None and presence is not None
    n, u = pooled.shape
    c = presence.shape[1]
    device = torch.device(args.device)

    t0 = time.perf_counter()
    auc_table(pooled.to(device), presence.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours_table = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)
    x = pooled.numpy().astype(np.float64)
    y = presence.numpy()
    pairs = [(int(rng.integers(u)), int(rng.integers(c))) for _ in range(args.baseline_pairs)]
    valid = [(a, b) for a, b in pairs if 0 < y[:, b].sum() < n]
    t0 = time.perf_counter()
    for a, b in valid:
        roc_auc_score(y[:, b], x[:, a])
    per_pair = (time.perf_counter() - t0) / max(len(valid), 1)

    print()
    print("INVERT against a per-unit, per-concept loop of sklearn.metrics.roc_auc_score")
    loop_table = per_pair * u * c
    print(
        f"  AUC + p-value table ({u} x {c} pairs): ours {ours_table:.2f} s; loop timed on {len(valid)} pairs "
        f"({per_pair * 1e3:.2f} ms/pair) -> {loop_table:.0f} s extrapolated: {loop_table / ours_table:.0f}x"
    )
    if invert_time is None:
        return
    p = Invert.resolve_params()
    beam, length = p["beam_size"], p["max_length"]
    # The reference scores every atom, then per added length every beam formula AND / OR every atom.
    calls = u * (2 * c + (length - 1) * beam * 2 * 2 * c)
    loop_search = per_pair * calls
    print(
        f"  full beam search (B={beam}, L={length}, {2 * c} atoms): ours {invert_time:.2f} s; the reference's loop "
        f"makes {calls:,} AUC calls -> {loop_search:.0f} s extrapolated (formula evaluation not counted): "
        f"{loop_search / invert_time:.0f}x"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="64 units, 100 concepts, 2,000 images")
    ap.add_argument("--methods", default="", help="comma-separated method names (default: all available)")
    ap.add_argument("--clip", default="", help="local CLIP model folder for CLIP-Dissect")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mask-images", type=int, default=2000, help="images in the per-pixel mask batches")
    ap.add_argument("--mask-size", type=int, default=16, help="side of the synthetic segmentation masks")
    ap.add_argument("--baseline-pairs", type=int, default=300, help="unit x concept pairs the sklearn loop times")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.units, args.concepts, args.images = 64, 100, 2000
        args.mask_images = min(args.mask_images, 500)
    t0 = time.perf_counter()
    inputs = build_inputs(args)
    print(
        f"synthetic inputs: {args.images} images, {args.units} units, {args.concepts} concepts "
        f"(built in {time.perf_counter() - t0:.1f} s), torch threads: {torch.get_num_threads()}, device: {args.device}"
    )
    times = time_methods(inputs, args)
    if not args.methods or "invert" in args.methods.split(","):
        invert_speedup(inputs, args, times.get("invert"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
