"""MILAN's cost per unit against the captioner's plain greedy decode, and the memory bound of its exemplars.

    python benchmarks/milan.py [--units 16] [--threads 2] [--captioner DIR --lm DIR]
                               [--project P.nstudio --layer NAME]

(1) Time per unit of MILAN at the paper's defaults (k = 15 masked exemplars, beam 50, at most 15 tokens, re-ranked
    by wpmi with the causal LM) against the same captioner's greedy decode of the same exemplar sets (one
    hypothesis, no prior) in the same run, and their ratio. Without --captioner/--lm, random models of the in-app
    size are written to a temporary folder (a ViT encoder, 64 px images, and a 2-layer GPT-2 decoder and LM over a
    500-word vocabulary); random decoders seldom end early, so their times are an upper bound for trained ones.
(2) Memory: peak resident memory of streaming the exemplars (images + masks) of N units and of 4 N units, each in
    a fresh process, and their ratio (flat is the goal: one chunk of units is in memory at a time). With --project
    and --layer, the project's own extraction and image files are streamed; otherwise synthetic exemplars.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_models(tmp: Path, vocab: int = 500, image_size: int = 64) -> tuple[Path, Path]:
    import torch
    import transformers as tf

    from tests.labelers.tiny_language import word_tokenizer

    words = [f"w{i}" for i in range(vocab)]
    cap, lm = tmp / "captioner", tmp / "lm"
    tok = word_tokenizer(words, cap, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                      "unk_token": "<unk>"})
    enc = tf.ViTConfig(image_size=image_size, patch_size=8, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=512)
    dec = tf.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=128, n_layer=2, n_head=4,
                        add_cross_attention=True, is_decoder=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, \
        tok.pad_token_id
    torch.manual_seed(0)
    tf.VisionEncoderDecoderModel(config=cfg).save_pretrained(cap)
    tf.ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(cap)
    config = json.loads((cap / "config.json").read_text())
    config["neuron_studio_set_captioner"] = True
    (cap / "config.json").write_text(json.dumps(config))
    ltok = word_tokenizer(words, lm, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                      "unk_token": "<|unk|>"})
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(ltok), n_positions=64, n_embd=128, n_layer=2, n_head=4,
                                     bos_token_id=ltok.bos_token_id, eos_token_id=ltok.eos_token_id)
                       ).save_pretrained(lm)
    return cap, lm


class SyntheticExemplars:
    """Exemplar batches made on demand (nothing kept between chunks), as the project's provider streams them."""

    def __init__(self, size: int = 64, seed: int = 0):
        self.size = size
        self.seed = seed

    def batches(self, units, k, quantile, chunk):
        import torch

        from labelers.base import ExemplarBatch

        for s in range(0, len(units), chunk):
            us = torch.tensor(list(units[s:s + chunk]))
            g = torch.Generator().manual_seed(self.seed + s)
            S = self.size
            yield ExemplarBatch(units=us, images=torch.randint(0, 256, (len(us), k, S, S, 3), generator=g,
                                                               dtype=torch.uint8),
                                masks=torch.rand(len(us), k, S, S, generator=g) > 0.7,
                                present=torch.ones(len(us), k, dtype=torch.bool),
                                image_index=torch.zeros(len(us), k, dtype=torch.long))


def greedy(parts, states, max_length):
    """The baseline: the captioner's single most likely next token at each step (cached decoder)."""
    import torch

    from labelers.milan import _decoder_step

    with torch.inference_mode():
        ids = torch.full((states.shape[0], 1), parts.start_id, dtype=torch.long)
        logits, cache = _decoder_step(parts.model, ids, states)
        out = [logits[:, -1].argmax(-1)]
        for _ in range(max_length):
            logits, cache = _decoder_step(parts.model, out[-1][:, None], states, cache)
            out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, 1)


def timing(args: argparse.Namespace, cap: Path, lm: Path) -> dict:
    import torch

    from labelers import milan, textmodels
    from labelers.base import LabelerInputs, get

    torch.set_num_threads(args.threads)
    captioner, causal = textmodels.load(cap, "captioner"), textmodels.load(lm, "lm")
    parts = milan.captioner_parts(captioner)
    ex = SyntheticExemplars(size=args.size)
    units = list(range(args.units))
    params = {"batch": args.batch}
    p = get("milan").resolve_params(params)
    # baseline: encode the same exemplar sets, then greedy-decode one description per unit
    t0 = time.perf_counter()
    for eb in ex.batches(units, p["k"], p["quantile"], p["batch"]):
        u, k = eb.present.shape
        pics = milan.masked_views(eb.images.reshape(u * k, *eb.images.shape[2:]),
                                  eb.masks.reshape(u * k, *eb.masks.shape[2:]), parts.mask_dim)
        states = milan.encode_images(parts, pics)
        greedy(parts, states.reshape(u, -1, states.shape[-1]), p["max_length"])
    base = (time.perf_counter() - t0) / len(units)
    inputs = LabelerInputs(layer="bench", num_units=len(units))
    inputs.exemplars, inputs.captioner, inputs.causal_lm = ex, captioner, causal
    t0 = time.perf_counter()
    res = get("milan")(inputs, params)
    full = (time.perf_counter() - t0) / len(units)
    return {"units": len(units), "threads": args.threads, "greedy_s_per_unit": base, "milan_s_per_unit": full,
            "ratio": full / base, "labels": len(res.labels)}


def stream(project: str | None, layer: str | None, n_units: int, size: int) -> None:
    """Child process: stream n_units' exemplars once, print peak RSS in MB."""
    import resource

    import numpy as np

    if project:
        from app.engine.exemplars import ProjectExemplars
        from app.engine.extract import open_project_dataset
        from app.engine.results import LayerResults
        from app.project.store import Project

        with Project.open(Path(project)) as p:
            model = p.model()
            res = LayerResults.load(p, p.layer(model["id"], layer)["id"])
            reader = open_project_dataset(p.dataset(res.stats["dataset_id"]))
            src = ProjectExemplars(res, reader, model["preprocess"], np.nonzero(res.valid)[0])
            total = int(res.layer["units"])
    else:
        src, total = SyntheticExemplars(size=size), n_units
    units = [u % total for u in range(n_units)]  # more units than the layer has: its units again
    n = 0
    for eb in src.batches(units, 15, 0.99, 8):
        n += int(eb.present.sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"units": n_units, "exemplars": n, "peak_mb": peak}))


def memory(args: argparse.Namespace) -> dict:
    out = {}
    for n in (args.mem_units, 4 * args.mem_units):
        cmd = [sys.executable, __file__, "--child-stream", str(n), "--size", str(args.size)]
        if args.project:
            cmd += ["--project", args.project, "--layer", args.layer]
        got = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                             env=os.environ | {"PYTHONPATH": str(ROOT)})
        out[n] = json.loads(got.stdout.strip().splitlines()[-1])
    small, big = out[args.mem_units], out[4 * args.mem_units]
    return {"units_small": args.mem_units, "peak_mb_small": small["peak_mb"], "units_big": 4 * args.mem_units,
            "peak_mb_big": big["peak_mb"], "ratio": big["peak_mb"] / small["peak_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="exemplar picture side (synthetic exemplars)")
    ap.add_argument("--captioner")
    ap.add_argument("--lm")
    ap.add_argument("--project")
    ap.add_argument("--layer")
    ap.add_argument("--mem-units", type=int, default=64)
    ap.add_argument("--child-stream", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_stream is not None:
        stream(args.project, args.layer, args.child_stream, args.size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cap, lm = (Path(args.captioner), Path(args.lm)) if args.captioner and args.lm else make_models(Path(tmp))
        t = timing(args, cap, lm)
    print(f"MILAN on {t['units']} units, {t['threads']} threads: {t['milan_s_per_unit']:.3f} s/unit; greedy decode "
          f"of the same exemplar sets {t['greedy_s_per_unit']:.3f} s/unit; ratio {t['ratio']:.1f}x")
    m = memory(args)
    print(f"exemplar streaming peak memory: {m['peak_mb_small']:.0f} MB for {m['units_small']} units, "
          f"{m['peak_mb_big']:.0f} MB for {m['units_big']} units; ratio {m['ratio']:.2f}")
    print(json.dumps({"timing": t, "memory": m}))


if __name__ == "__main__":
    main()
