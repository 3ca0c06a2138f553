"""INVERT at its defaults on planted units: how many planted image-level formulas are recovered and how many noise
units are flagged significant, for several minimum-support settings and dataset sizes; and its time at scale.

    .venv/bin/python benchmarks/invert_planted.py                       # 20,000 x 256 x 300, 32 planted formulas
    .venv/bin/python benchmarks/invert_planted.py --images 2000,5000,20000
    .venv/bin/python benchmarks/invert_planted.py --timing --timing-units 256   # 50,000 x 2,048 x 1,000, extrapolated

Synthetic data: concepts are independent image-level labels with prevalence log-uniform between 1% and 30%. Unit
u < 32 is planted: its activation is Gaussian noise plus `effect` on the images where its formula holds (8 single
concepts, 8 ANDs, 8 ORs, 8 of the form (a AND NOT b) OR c, each holding on 2-25% of the images). The other units
are pure noise. A planted unit counts as recovered when its rank-1 formula holds on exactly the planted formula's
images (logically equal on the data). A noise unit is flagged when its rank-1 label is "significant".
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labelers.base import Concept, LabelerInputs
from labelers.formulas import And, Formula, Leaf, Not, Or, parse
from labelers.invert import Invert

PLANTED = 32


def planted_data(n: int, units: int, concepts: int, effect: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    prevalence = torch.exp(torch.empty(concepts).uniform_(math.log(0.01), math.log(0.3), generator=g))
    presence = torch.rand(n, concepts, generator=g) < prevalence
    names = [f"c{i:03d}" for i in range(concepts)]
    formulas: list[Formula] = []
    while len(formulas) < min(PLANTED, units):
        a, b, c = (int(x) for x in torch.randint(0, concepts, (3,), generator=g))
        if len({a, b, c}) < 3:
            continue
        kind = len(formulas) % 4
        f: Formula = [Leaf(a), And(Leaf(a), Leaf(b)), Or(Leaf(a), Leaf(b)),
                      Or(And(Leaf(a), Not(Leaf(b))), Leaf(c))][kind]
        frac = float(f.evaluate(presence.T).float().mean())
        if 0.02 <= frac <= 0.25:
            formulas.append(f)
    pooled = torch.randn(n, units, generator=g)
    for u, f in enumerate(formulas):
        pooled[:, u] += effect * f.evaluate(presence.T).float()
    return pooled, presence, names, formulas


def score(result, presence: torch.Tensor, names: list[str], formulas: list[Formula], units: int):
    recovered = 0
    by_kind = [0, 0, 0, 0]
    for u, f in enumerate(formulas):
        labs = result.for_unit(u)
        if labs and torch.equal(parse(labs[0].formula, names).evaluate(presence.T), f.evaluate(presence.T)):
            recovered += 1
            by_kind[u % 4] += 1
    noise = range(len(formulas), units)
    flagged = sum(1 for u in noise if result.for_unit(u) and result.for_unit(u)[0].extra["significant"])
    planted_flagged = sum(1 for u in range(len(formulas))
                          if result.for_unit(u) and result.for_unit(u)[0].extra["significant"])
    support = [result.for_unit(u)[0].extra["positive_fraction"] for u in noise if result.for_unit(u)]
    median = sorted(support)[len(support) // 2] if support else 0.0
    return recovered, flagged, len(noise), planted_flagged, median, by_kind


SETTINGS = {
    "reference (no minimum, in-sample, Bonferroni)": {"min_fraction": 0.0, "min_images": 0, "split_half": False,
                                                      "correction": "bonferroni"},
    "min_fraction 0.002, in-sample, Bonferroni": {"min_fraction": 0.002, "min_images": 0, "split_half": False,
                                                  "correction": "bonferroni"},
    "min_fraction 0.002, split half, Holm": {"min_fraction": 0.002, "min_images": 0},
    "min 20 images only, split half, Holm": {"min_fraction": 0.0, "min_images": 20},
    "DEFAULT max(0.002, 20 images), split half, Holm": {},
    "min_fraction 0.01, split half, Holm": {"min_fraction": 0.01, "min_images": 0},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="20000", help="comma-separated dataset sizes")
    ap.add_argument("--units", type=int, default=256)
    ap.add_argument("--concepts", type=int, default=300)
    ap.add_argument("--effect", type=float, default=1.0, help="planted shift in noise standard deviations")
    ap.add_argument("--settings", default="", help="comma-separated indices into the settings table (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing", action="store_true", help="time the defaults at 50,000 x 2,048 x 1,000")
    ap.add_argument("--timing-units", type=int, default=2048, help="units actually run in --timing (extrapolated)")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    print(f"torch threads {torch.get_num_threads()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.timing:
        return timing(args)
    chosen = list(SETTINGS.items())
    if args.settings:
        chosen = [chosen[int(i)] for i in args.settings.split(",")]
    print(f"{'images':>7}  {'setting':<50}{'recovered':>10}{'noise flagged':>15}{'planted flagged':>17}"
          f"{'noise median support':>22}{'time':>8}   recovered by kind (a / a AND b / a OR b / (a AND NOT b) OR c, of 8 each)")
    for n in (int(x) for x in args.images.split(",")):
        pooled, presence, names, formulas = planted_data(n, args.units, args.concepts, args.effect, args.seed)
        inputs = LabelerInputs(layer="planted", num_units=args.units, pooled_mean=pooled,
                               concepts=[Concept(x) for x in names], concept_presence=presence)
        for label, params in chosen:
            t0 = time.perf_counter()
            res = Invert()(inputs, dict(params))
            dt = time.perf_counter() - t0
            rec, flagged, n_noise, pf, support, by_kind = score(res, presence, names, formulas, args.units)
            print(f"{n:>7}  {label:<50}{rec:>5} / {len(formulas):<3}{flagged:>7} / {n_noise:<5}"
                  f"{pf:>10} / {len(formulas):<4}{support:>20.4f}{dt:>7.1f}s   {'/'.join(map(str, by_kind))}",
                  flush=True)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


def timing(args: argparse.Namespace) -> int:
    n, total_units, concepts = 50_000, 2048, 1000
    units = min(args.timing_units, total_units)
    g = torch.Generator().manual_seed(args.seed)
    prevalence = torch.exp(torch.empty(concepts).uniform_(math.log(0.002), math.log(0.2), generator=g))
    presence = torch.rand(n, concepts, generator=g) < prevalence
    pooled = torch.randn(n, units, generator=g)
    pooled[:, : units // 8] += 1.5 * presence[:, : units // 8].float()
    inputs = LabelerInputs(layer="timing", num_units=units, pooled_mean=pooled,
                           concepts=[Concept(f"c{i}") for i in range(concepts)], concept_presence=presence)
    t0, c0 = time.perf_counter(), time.process_time()
    Invert()(inputs, {})
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    scale = total_units / units
    print(f"CPU seconds (all threads): {cpu:.1f}; on 2 otherwise idle cores about {cpu / 2:.0f} s wall"
          + (f", {cpu / 2 * scale:.0f} s for {total_units:,} units" if units < total_units else ""))
    print(f"INVERT defaults on {n:,} images x {units:,} units x {concepts:,} concepts: {dt:.1f} s"
          + (f"; cost is linear in units (units are searched in independent chunks), so {total_units:,} units "
             f"-> {dt * scale:.0f} s extrapolated" if units < total_units else ""))
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
