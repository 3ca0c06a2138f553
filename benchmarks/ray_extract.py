"""Extraction on a local Ray against the same extraction in one process, and the cost of merging shard states.

    python benchmarks/ray_extract.py [--model resnet18] [--images 128] [--size 160] [--shards 4]

Prints (1) seconds of the in-process extraction (one torch thread, images decoded in the same process: the work of
one Ray worker), of the Ray path with 1 worker slot and with 2 (same shards), the overhead ratio Ray(1) / in-process
and the speed-up Ray(1) / Ray(2); (2) the per-shard overhead, from Ray(1) with 1 shard against N shards;
(3) the coordinator's cost of merging one shard's statistics (exact quantile buffer, top-k exemplars with maps)
for a few unit counts and k, and the size of one shard's state. Ray's own start-up is timed apart: a cluster
starts once, not per job. Results are checked equal to the in-process run's on every Ray run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def fresh_project(tmp: Path, template: Path, name: str) -> Path:
    """A copy of the not-yet-extracted project: a done run with the same key would be reused, not recomputed."""
    dest = tmp / name / template.name
    shutil.copytree(template, dest)
    return dest


def layer_names(model: str) -> list[str]:
    return {"resnet18": ["layer3", "layer4"], "resnet50": ["layer3", "layer4"]}.get(model, ["features"])


def timed_extract(project: Path, layers: list[str], batch_size: int, shards: int | None) -> tuple[float, Path]:
    from app.engine.distributed import RayExtractJob
    from app.engine.extract import ExtractJob, ExtractOptions
    from app.jobs import JobProgress
    from app.project.store import Project

    opts = ExtractOptions(layers=layers, batch_size=batch_size, device="cpu", num_workers=0)
    job = ExtractJob(project, opts) if shards is None else RayExtractJob(project, opts, "auto", shards)
    t = time.perf_counter()
    job.execute(JobProgress())
    secs = time.perf_counter() - t
    with Project.open(project) as p:
        return secs, p.arrays_dir / f"run-{job.run_id}"


def same_arrays(a: Path, b: Path) -> bool:
    import numpy as np

    fa = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    return fa == sorted(p.relative_to(b) for p in b.rglob("*.npy")) and all(
        np.array_equal(np.load(a / f), np.load(b / f), equal_nan=True) for f in fa)


def ray_runs(ray, template: Path, tmp: Path, layers: list[str], args: argparse.Namespace, cpus: int,
             shard_counts: list[int], reference: Path) -> dict[int, float]:
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    # Warm the worker processes (interpreter, torch import) once: a running cluster has them warm.
    ray.get([ray.remote(_warm).options(num_cpus=1).remote() for _ in range(cpus)])
    print(f"ray start with {cpus} CPU slot(s), workers warm: {time.perf_counter() - t:.1f} s")
    out = {}
    try:
        for shards in shard_counts:
            secs, arrays_dir = timed_extract(fresh_project(tmp, template, f"ray{cpus}-{shards}"), layers,
                                             args.batch_size, shards)
            ok = same_arrays(arrays_dir, reference)
            print(f"ray, {cpus} slot(s), {shards:2d} shards: {secs:7.2f} s   arrays identical to one process: {ok}")
            out[shards] = secs
    finally:
        ray.shutdown()
    return out


def _warm() -> None:
    import torch  # noqa: F401

    import app.engine.extract  # noqa: F401


def shard_fixed_cost(project: Path, reps: int = 3) -> float:
    """Seconds a shard spends before its first image: loading (and checksumming) the model and opening the
    dataset, as `distributed.run_shard` does on the worker."""
    import torch

    from app.engine.extract import load_project_model, open_project_dataset
    from app.project.store import Project

    with Project.open(project) as p:
        model_row = p.model()
        ds_row = p.dataset()
    load_project_model(model_row, torch.device("cpu"))  # warm: a worker that ran a shard before
    t = time.perf_counter()
    for _ in range(reps):
        load_project_model(model_row, torch.device("cpu"))
        open_project_dataset(ds_row)
    return (time.perf_counter() - t) / reps


def ray_round_trip(ray) -> float:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        noop = ray.remote(_warm).options(num_cpus=1)
        ray.get(noop.remote())
        t = time.perf_counter()
        for _ in range(20):
            ray.get(noop.remote())
        return (time.perf_counter() - t) / 20
    finally:
        ray.shutdown()


def print_fixed_costs(ray, template: Path) -> None:
    print(f"per-shard fixed cost (model load and checksum, dataset open): {shard_fixed_cost(template):.2f} s; "
          f"Ray task round trip: {ray_round_trip(ray) * 1000:.1f} ms")


def merge_costs() -> None:
    import torch

    from app.engine.stats import TopKExemplars, TopQuantiles

    dev = torch.device("cpu")
    print("merge of one shard's state into the coordinator's (quantile buffer + exemplars with 7x7 maps):")
    for units in (512, 2048):
        for k in (15, 50):
            n_images, grid = 50_000, (7, 7)
            total = n_images * grid[0] * grid[1]
            q, other_q = (TopQuantiles(units, total, [0.99, 0.995], dev) for _ in range(2))
            g = torch.Generator().manual_seed(0)
            for tq in (q, other_q):
                tq.update(torch.randn(units, q.m + 10, generator=g))
            tk, other_k = (TopKExemplars(units, k, grid, dev) for _ in range(2))
            for i, kk in enumerate((tk, other_k)):
                maps = torch.rand(k, units, *grid, generator=g)
                kk.update(maps.flatten(2).amax(2), torch.arange(k) + i * k, maps)
            states = (other_q.state(), other_k.state())
            nbytes = sum(v.numel() * v.element_size() for s in states for v in s.values())
            reps = 3
            t = time.perf_counter()
            for _ in range(reps):
                q.merge(states[0])
                tk.merge(states[1])
            ms = (time.perf_counter() - t) / reps * 1000
            print(f"  units {units:5d}  k {k:3d}  quantile buffer m {q.m:6d}: {ms:8.1f} ms per merge, "
                  f"state {nbytes / 2**20:7.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=160, help="side of the generated images")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--costs-only", action="store_true", help="only the per-shard fixed cost and Ray's round trip")
    args = ap.parse_args()
    import ray
    import torch
    from extract import make_project

    torch.set_num_threads(1)  # one Ray CPU slot runs torch on one thread: compare like with like
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        template, model = make_project(tmp, args.model, args.images, args.size)
        layers = layer_names(model)
        print(f"model {model}, layers {layers}, {args.images} images of {args.size}px, batch {args.batch_size}, "
              f"CPU")
        if args.costs_only:
            print_fixed_costs(ray, template)
            return
        t_in, reference = timed_extract(fresh_project(tmp, template, "inproc"), layers, args.batch_size, None)
        print(f"in process (1 thread): {t_in:7.2f} s  ({args.images / t_in:.1f} images/s)")
        one = ray_runs(ray, template, tmp, layers, args, 1, [1, args.shards], reference)
        two = ray_runs(ray, template, tmp, layers, args, 2, [args.shards], reference)
        s = args.shards
        print(f"overhead Ray(1 slot, {s} shards) / in process: {one[s] / t_in:.3f}")
        print(f"speed-up Ray 2 slots / 1 slot ({s} shards): {one[s] / two[s]:.3f}  (ideal 2 on 2 free cores)")
        print(f"per-shard overhead, Ray 1 slot {s} shards against 1 shard: {(one[s] - one[1]) / max(1, s - 1):.2f} s")
        print_fixed_costs(ray, template)
    if not args.skip_merge:
        merge_costs()
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
