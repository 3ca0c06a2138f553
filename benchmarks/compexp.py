"""Compositional explanations: the product's search (pixels grouped by concept vector) against the former
pixel implementation (one pass over the pixels per formula length), in the same run, on the demo's layers.

    .venv/bin/python benchmarks/compexp.py --project out/demo.nstudio        # the demo's mask batches
    .venv/bin/python benchmarks/compexp.py                                   # synthetic batches of the demo's size
    .venv/bin/python benchmarks/compexp.py --reference-images 600            # the old search on fewer images

The mask batches of each layer are read once (through the app, as a labeling job does: run the model, upsample
and threshold the maps) and kept in memory bit-packed, so both implementations are timed on the same data without
the cost of producing it; that cost (one pass over the data) is measured and reported separately, because the
old search needed `max_length` passes where the new one needs one. With --reference-images the old search runs on
the first N images only and its time is scaled by the number of images (its cost is linear in pixels); the new
one is then also checked against it on those N images.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labelers.base import Concept, LabelerInputs, MaskBatch
from labelers.compexp import CompExp, canonical_key
from labelers.formulas import parse

DEMO_LAYERS = {"block1": 16, "block2": 32, "block3": 64, "block4": 64}


class Packed:
    """One layer's mask batches, bit-packed along the last axis."""

    def __init__(self, size: int):
        self.size = size
        self.units: list[np.ndarray] = []
        self.concepts: list[np.ndarray] = []
        self.annotated: list[np.ndarray] = []

    def add(self, b: MaskBatch) -> None:
        self.units.append(np.packbits(b.unit_masks.cpu().numpy(), axis=-1))
        self.concepts.append(np.packbits(b.concept_masks.cpu().numpy(), axis=-1))
        self.annotated.append(b.category_annotated.cpu().numpy())

    @property
    def images(self) -> int:
        return sum(u.shape[0] for u in self.units)

    def batches(self, limit: int | None = None):
        def it() -> Iterator[MaskBatch]:
            left = self.images if limit is None else limit
            for u, c, a in zip(self.units, self.concepts, self.annotated):
                if left <= 0:
                    return
                k = min(left, u.shape[0])
                left -= k
                yield MaskBatch(
                    torch.from_numpy(np.unpackbits(u[:k], axis=-1, count=self.size).astype(bool)),
                    torch.from_numpy(np.unpackbits(c[:k], axis=-1, count=self.size).astype(bool)),
                    torch.from_numpy(a[:k]),
                )
        return it


def from_project(project: Path, layers: list[str]) -> tuple[list[Concept], dict[str, Packed], dict[str, float]]:
    import labelers.base as lb
    from app.engine.labeling import LabelJob
    from app.engine.results import LayerResults
    from app.project.store import Project

    out: dict[str, Packed] = {}
    pass_s: dict[str, float] = {}
    concepts: list[Concept] = []
    with Project.open(project) as proj:
        model_row = proj.model(None)
        for layer in layers:
            layer_row = proj.layer(model_row["id"], layer)
            results = LayerResults.load(proj, layer_row["id"], None)
            ds_row = proj.dataset(results.stats["dataset_id"])
            job = LabelJob(project, "compexp", layer, device="cpu")
            inputs = job._inputs(proj, lb.get("compexp"), results, layer_row, model_row, ds_row, torch.device("cpu"))
            concepts = list(inputs.concepts or [])
            t0 = time.perf_counter()
            packed: Packed | None = None
            for b in inputs.mask_batches():  # type: ignore[misc]
                packed = packed or Packed(b.unit_masks.shape[-1])
                packed.add(b)
            pass_s[layer] = time.perf_counter() - t0
            assert packed is not None
            out[layer] = packed
    return concepts, out, pass_s


def cached_project(project: Path, layers: list[str], cache: Path | None):
    if cache is None:
        return from_project(project, layers)
    cache.mkdir(parents=True, exist_ok=True)
    data: dict[str, Packed] = {}
    pass_s: dict[str, float] = {}
    concepts: list[Concept] = []
    for layer in layers:
        f = cache / f"{layer}.npz"
        if not f.exists():
            c, d, t = from_project(project, [layer])
            p = d[layer]
            np.savez(f, size=p.size, pass_s=t[layer], names=[x.name for x in c], cats=[x.category for x in c],
                     lengths=[u.shape[0] for u in p.units], units=np.concatenate(p.units),
                     concepts=np.concatenate(p.concepts), annotated=np.concatenate(p.annotated))
        z = np.load(f)
        concepts = [Concept(str(a), str(b)) for a, b in zip(z["names"], z["cats"])]
        p = Packed(int(z["size"]))
        s = 0
        units, concept_masks, annotated = z["units"], z["concepts"], z["annotated"]  # each access reads the file
        for k in z["lengths"].tolist():
            p.units.append(units[s:s + k])
            p.concepts.append(concept_masks[s:s + k])
            p.annotated.append(annotated[s:s + k])
            s += k
        data[layer] = p
        pass_s[layer] = float(z["pass_s"])
    return concepts, data, pass_s


def synthetic(layers: dict[str, int], images: int, size: int, seed: int) -> tuple[list[Concept], dict[str, Packed]]:
    """Shapes-like masks: per image 1-3 objects (one shape, colour, texture each) on one scene, position concepts
    as image quadrants; units are noisy detectors of a concept or of two combined, active on a few % of pixels."""
    cats = {"object": 6, "color": 6, "texture": 4, "scene": 5, "position": 4}
    concepts = [Concept(f"{cat}{i}", cat) for cat, k in cats.items() for i in range(k)]
    start = {}
    s = 0
    for cat, k in cats.items():
        start[cat] = s
        s += k
    C = len(concepts)
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    pos = np.stack([xx < size // 2, xx >= size // 2, yy < size // 2, yy >= size // 2])
    out = {}
    for layer, U in layers.items():
        packed = Packed(size)
        drive = g.integers(0, C, (U, 2))
        op = g.integers(0, 3, U)
        gl = np.random.default_rng(seed + 1)  # the same images for every layer
        for b0 in range(0, images, 32):
            B = min(32, images - b0)
            cm = np.zeros((B, C, size, size), dtype=bool)
            for i in range(B):
                cm[i, start["scene"] + gl.integers(0, 5)] = True
                cm[i, start["position"]:start["position"] + 4] = pos
                for _ in range(gl.integers(1, 4)):
                    r = gl.integers(size // 8, size // 4)
                    cy, cx = gl.integers(r, size - r, 2)
                    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                    for cat in ("object", "color", "texture"):
                        cm[i, start[cat] + gl.integers(0, cats[cat])] |= disk
                    cm[i, start["scene"]:start["scene"] + 5] &= ~disk
            a, b = cm[:, drive[:, 0]], cm[:, drive[:, 1]]
            sig = np.where((op == 0)[None, :, None, None], a, np.where((op == 1)[None, :, None, None], a & b, a | b))
            um = (sig & (gl.random(sig.shape) < 0.3)) | (gl.random(sig.shape) < 0.002)
            packed.add(MaskBatch(torch.from_numpy(um), torch.from_numpy(cm), torch.ones((B, 5), dtype=torch.bool)))
        out[layer] = packed
    return concepts, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, help="a demo project folder (its layers' mask batches are used)")
    ap.add_argument("--layers", default=",".join(DEMO_LAYERS))
    ap.add_argument("--cache", type=Path, help="with --project: keep the packed mask batches (and the time their "
                    "pass took) in this folder and reuse them on the next run")
    ap.add_argument("--images", type=int, default=3000, help="synthetic only")
    ap.add_argument("--size", type=int, default=64, help="synthetic only: side of the masks")
    ap.add_argument("--reference-images", type=int, default=0, help="run the old search on this many images only")
    ap.add_argument("--no-reference", action="store_true", help="time the new search only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    layers = [x for x in args.layers.split(",") if x]
    if args.project:
        concepts, data, pass_s = cached_project(args.project, layers, args.cache)
        source = f"project {args.project}"
    else:
        concepts, data = synthetic({k: DEMO_LAYERS.get(k, 64) for k in layers}, args.images, args.size, args.seed)
        pass_s = {}
        source = f"synthetic masks ({args.images} images at {args.size}x{args.size})"
    load = os.getloadavg()
    print(f"compexp benchmark on {source}; {len(concepts)} concepts; torch threads {torch.get_num_threads()}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'layer':<8}{'units':>6}{'images':>8}{'data pass':>11}{'new (all)':>11}{'new (split)':>12}"
          f"{'old':>10}{'old/new':>9}  {'end to end old/new':>19}")
    tot = {"new": 0.0, "split": 0.0, "old": 0.0, "pass": 0.0}
    from tests.labelers.compexp_reference import ReferenceCompExp

    names = [c.name for c in concepts]
    for layer in layers:
        p = data[layer]
        U = p.units[0].shape[1]
        n = p.images
        inputs = LabelerInputs(layer=layer, num_units=U, concepts=concepts, mask_batches=p.batches())
        t0, c0 = time.perf_counter(), time.process_time()
        new = CompExp()(inputs, {"split_half": False})
        t_new, cpu_new = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        CompExp()(inputs, {})
        t_split = time.perf_counter() - t0
        t_old = float("nan")
        if not args.no_reference:
            m = min(n, args.reference_images) if args.reference_images else n
            ref_inputs = LabelerInputs(layer=layer, num_units=U, concepts=concepts, mask_batches=p.batches(m))
            t0, c0 = time.perf_counter(), time.process_time()
            old = ReferenceCompExp()(ref_inputs, {})
            t_old = (time.perf_counter() - t0) * n / m
            cpu_old = (time.process_time() - c0) * n / m
            print(f"  {layer}: CPU seconds (all threads) old {cpu_old:.1f}, new {cpu_new:.2f}: {cpu_old / cpu_new:.0f}x")
            check = new if m == n else CompExp()(ref_inputs, {"split_half": False})
            # Rank 1 of every unit: same score, same formula (lower ranks may merge formulas equal on the data).
            ours = {lab.unit: (lab.score, canonical_key(parse(lab.extra["search_formula"], names)))
                    for lab in check.labels if lab.rank == 1}
            theirs = {lab.unit: (lab.score, canonical_key(parse(lab.formula, names)))
                      for lab in old.labels if lab.rank == 1}
            if ours != theirs:
                print(f"  WARNING: {layer}: rank-1 formulas or scores differ from the old implementation")
            note = "" if m == n else f" (old on {m} images, scaled)"
        else:
            note = ""
        dp = pass_s.get(layer, 0.0)
        # the old search read the data once per formula length (3), the new one once
        e2e = (t_old + 3 * dp) / (t_split + dp) if dp else float("nan")
        print(f"{layer:<8}{U:>6}{n:>8}{dp:>10.1f}s{t_new:>10.2f}s{t_split:>11.2f}s{t_old:>9.1f}s"
              f"{t_old / t_new:>8.0f}x  {e2e:>18.1f}x{note}")
        tot["new"] += t_new
        tot["split"] += t_split
        tot["old"] += t_old
        tot["pass"] += dp
    print(f"{'total':<22}{tot['pass']:>10.1f}s{tot['new']:>10.2f}s{tot['split']:>11.2f}s{tot['old']:>9.1f}s"
          f"{tot['old'] / tot['new']:>8.0f}x  "
          f"{((tot['old'] + 3 * tot['pass']) / (tot['split'] + tot['pass'])) if tot['pass'] else float('nan'):>18.1f}x")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
