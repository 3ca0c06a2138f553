"""What a perfect exemplar-set describer could reach on a project: for every unit Network Dissection calls a detector
(IoU >= 0.04), is its concept the one covering most of the pixels MILAN shows the captioner (the unit's top k
images, masked where the unit's map exceeds its q quantile)?

    python benchmarks/description_ceiling.py PROJECT.nstudio [--layers block3 block4] [--k 15] [--quantile 0.99]

Prints, per detector, the share of the masked exemplar pixels that the Network Dissection concept covers and the
concept covering the most (position concepts left out: their masks repeat the object's), then how many detectors'
concept is that dominant one. Beside the demo summary's MILAN agreement, it separates what the captioner misses from
what the exemplars do not show.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSITIONS = ("left", "right", "top", "bottom")  # the demo's position masks are its objects' masks


def main() -> None:
    import numpy as np

    from app.engine.exemplars import ProjectExemplars
    from app.engine.extract import open_project_dataset
    from app.engine.results import LayerResults
    from app.project.store import Project

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project")
    ap.add_argument("--layers", nargs="+", default=["block3", "block4"])
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--quantile", type=float, default=0.99)
    args = ap.parse_args()
    total = dominant = 0
    with Project.open(Path(args.project)) as proj:
        model = proj.model()
        for layer in args.layers:
            row = proj.layer(model["id"], layer)
            res = LayerResults.load(proj, row["id"])
            ds = proj.dataset(res.stats["dataset_id"])
            names = [c["name"] for c in proj.concepts(ds["id"])]
            reader = open_project_dataset(ds)
            rows = np.nonzero(res.valid)[0]
            src = ProjectExemplars(res, reader, model["preprocess"], rows)
            det = {lab["unit"]: lab["label"] for lab in proj.labels(layer_id=row["id"], method="netdissect", max_rank=1)
                   if lab["extra"].get("interpretable")}
            for eb in src.batches(sorted(det), args.k, args.quantile, 16):
                for j, u in enumerate(eb.units.tolist()):
                    cover: collections.Counter = collections.Counter()
                    shown = 0
                    for s in range(eb.masks.shape[1]):
                        if not eb.present[j, s]:
                            continue
                        m = eb.masks[j, s].numpy()
                        cidx, cmasks = reader.masks(int(rows[int(eb.image_index[j, s])]), m.shape)
                        shown += int(m.sum())
                        for c, cm in zip(cidx.tolist(), cmasks):
                            cover[names[c]] += int((cm & m).sum())
                    top = max((n for n in cover if n not in POSITIONS), key=lambda n: cover[n], default=None)
                    total += 1
                    dominant += top == det[u]
                    print(f"{layer} unit {u}: {det[u]} covers {cover[det[u]] / max(shown, 1):.2f} of the shown pixels; "
                          f"most: {top} {cover[top] / max(shown, 1):.2f}")
    print(f"{dominant} of {total} detectors: their concept covers the most of what MILAN shows the captioner")


if __name__ == "__main__":
    main()
