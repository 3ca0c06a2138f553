"""TExplain on a demo project, as the demo runs it: train the translator (the demo's options) on the project's own
language model, label the classifier layer per class (the demo's parameters), and report the time of each part,
the sentences per second, and the demo's figure (classes whose top-10 words include the class's own shape word).

    .venv/bin/python benchmarks/texplain_demo.py OUT/demo.nstudio
    .venv/bin/python benchmarks/texplain_demo.py OUT/demo.nstudio --steps 600 --sentences 50 --images-per-class 100

The project is copied to a temporary folder first (the original is never changed). Times are wall and CPU seconds
and, so that runs on busy or different machines compare, a ratio against a baseline measured in the same run: one
training step of the project's LM on a batch of 64 captions (forward and backward, the unit of the language step's
LM training, DEFAULT_STEPS["lm"] of them).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def lm_step_seconds(project_path: Path, repeats: int = 5) -> float:
    """Wall seconds of one forward+backward of the project's LM on 64 of its captions (the baseline)."""
    import torch

    from app.language.translator import resolve_lm
    from app.project.store import Project
    from labelers.texplain import encode_captions
    from labelers.textmodels import load

    with Project.open(project_path) as p:
        lm = load(resolve_lm(p, None), "lm", torch.device("cpu"))
        caps = [c for cs in p.captions(p.dataset()["id"]) for c in cs][:64]
    ids, mask = encode_captions(lm, caps, 32)
    labels = ids.masked_fill(mask == 0, -100)
    lm.model.train()
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        best = min(best, time.perf_counter() - t0)
    lm.model.zero_grad(set_to_none=True)
    return best


def main() -> None:
    from app.demo.pipeline import (
        DEMO_PARAMS,
        DEMO_TRANSLATOR,
        TEXPLAIN_LAYERS,
        texplain_own_words,
    )
    from app.engine.labeling import LabelJob
    from app.jobs import JobProgress
    from app.language.translator import TranslatorJob, TranslatorOptions
    from app.project.store import Project

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project", help="a demo project (neuron-studio demo --headless) with its language models")
    ap.add_argument("--steps", type=int, default=DEMO_TRANSLATOR["steps"])
    ap.add_argument("--prefix-length", type=int, default=DEMO_TRANSLATOR["prefix_length"])
    ap.add_argument("--lr", type=float, default=DEMO_TRANSLATOR.get("lr", TranslatorOptions.lr))
    ap.add_argument("--sentences", type=int, default=DEMO_PARAMS["texplain"]["sentences"])
    ap.add_argument("--images-per-class", type=int, default=DEMO_PARAMS["texplain"]["images_per_class"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp) / "demo.nstudio"
        shutil.copytree(args.project, proj, ignore=shutil.ignore_patterns("translators"))
        with Project.open(proj) as p:
            p.integrity_check()
        base = lm_step_seconds(proj)
        opts = TranslatorOptions(**{**DEMO_TRANSLATOR, "steps": args.steps, "prefix_length": args.prefix_length,
                                    "lr": args.lr}, device="cpu")
        t0, c0 = time.perf_counter(), time.process_time()
        rep = TranslatorJob(proj, opts).execute(JobProgress())
        t1, c1 = time.perf_counter(), time.process_time()
        params = {**DEMO_PARAMS["texplain"], "sentences": args.sentences, "images_per_class": args.images_per_class}
        out = LabelJob(proj, "texplain", TEXPLAIN_LAYERS[0], params, device="cpu").execute(JobProgress())
        t2, c2 = time.perf_counter(), time.process_time()
        with Project.open(proj) as p:
            fig = texplain_own_words(p, p.model()["id"], TEXPLAIN_LAYERS[0])
    sentences = out.summary["images_sampled"] * out.summary["sentences_per_image"]
    result = {
        "translator": {"steps": rep.steps, "prefix_length": args.prefix_length, "lr": args.lr,
                       "heldout_loss": rep.heldout_loss, "baseline_loss": rep.baseline_loss,
                       "wall_s": round(t1 - t0, 2), "cpu_s": round(c1 - c0, 2),
                       "lm_steps_equivalent": round((t1 - t0) / base, 1)},
        "labeling": {"images_sampled": out.summary["images_sampled"], "sentences": sentences,
                     "wall_s": round(t2 - t1, 2), "cpu_s": round(c2 - c1, 2),
                     "sentences_per_s": round(sentences / max(t2 - t1, 1e-9), 1),
                     "lm_steps_equivalent": round((t2 - t1) / base, 1)},
        "total_wall_s": round(t2 - t0, 2),
        "baseline_lm_step_s": round(base, 4),
        "own_word": fig.get("own_word"), "classes": fig.get("classes"), "fraction": fig.get("fraction"),
        "flagged": fig.get("flagged"),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
