"""TExplain's sampling speed: sentences per second of seeded nucleus sampling from translator prefixes, and its
cost per generated token as a ratio against greedy decoding of the same prefixes in the same run (the cheapest
decoder: one argmax per step; per token, because greedy sentences end at a different length), and the word
counting that follows.

    .venv/bin/python benchmarks/texplain.py                 # a caption-sized GPT-2, 2 threads
    .venv/bin/python benchmarks/texplain.py --lm DIR        # a local causal LM folder (e.g. the project's)
    .venv/bin/python benchmarks/texplain.py --quick

Without --lm the model is a word-level GPT-2 with random weights of the size the app trains on captions; random
weights rarely say end-of-text, so every sentence runs to --max-tokens: the slowest case.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labelers.texplain import PrefixMapper, count_sentence_words, sample_token_ids
from labelers.textmodels import load

WORDS = ["a", "the", "on", "in", "with", "of", "at", "there", "is", "and", "small", "large", "left", "right", "top", "bottom", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "star", "cross", "ring", "solid", "striped", "dotted", "checkered", "sky", "grass", "sand", "water", "brick", "field", "against", "next", "to", "background", "shape", "object", "image"]


def random_lm(folder: Path, layers: int, width: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="[UNK]", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=width, n_layer=layers,
                               n_head=max(1, width // 32), bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    fast.save_pretrained(folder)
    return load(folder, "lm")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", help="local causal LM folder (default: a random caption-sized GPT-2)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--sentences", type=int, default=50)
    ap.add_argument("--batch-images", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefix-length", type=int, default=10)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.sentences = 16, 20
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lm = load(args.lm, "lm") if args.lm else random_lm(Path(tmp) / "lm", args.layers, args.width)
        mapper = PrefixMapper.for_lm(args.features, args.prefix_length, lm).eval()
        feats = torch.randn(args.images, args.features)

        def run(top_p: float) -> tuple[list[list[str]], int]:
            out: list[list[str]] = []
            tokens = 0
            for s in range(0, args.images, args.batch_images):
                chunk = feats[s:s + args.batch_images]
                with torch.no_grad():
                    prefix = mapper(chunk)
                ids = sample_token_ids(lm, prefix, args.sentences, list(range(s, s + len(chunk))), top_p,
                                       args.max_tokens, mapper.mode)
                tokens += sum(len(r) + 1 for rows in ids for r in rows)  # + the end-of-text step
                out += [lm.tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in ids]
            return out, tokens

        run(0.0)  # warm-up
        (_, greedy_tokens), greedy = timed(lambda: run(0.0))
        (sents, tokens), nucleus = timed(lambda: run(0.9))
        _, counting = timed(lambda: count_sentence_words(sents))
    n = args.images * args.sentences
    words = sum(len(s.split()) for ss in sents for s in ss)
    per_greedy, per_nucleus = greedy / greedy_tokens, nucleus / tokens
    print(f"{n} sentences ({args.images} images x {args.sentences}), {words / n:.1f} words each, "
          f"{torch.get_num_threads()} threads, LM {args.lm or f'random GPT-2 {args.layers}x{args.width}'}")
    print(f"greedy decoding (baseline):  {greedy_tokens / greedy:9.0f} tokens/s")
    print(f"nucleus sampling, top-p 0.9: {tokens / nucleus:9.0f} tokens/s, {n / nucleus:7.0f} sentences/s; "
          f"{per_nucleus / per_greedy:.2f}x greedy's time per token")
    print(f"word counting:               {n / counting:9.0f} sentences/s ({counting / nucleus:.2f}x the sampling time)")

if __name__ == "__main__":
    main()
