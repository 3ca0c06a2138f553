"""How well automatic labels agree with human names and descriptions of the same units, beside trivial baselines.

For each layer, every labeling method's top label of a unit is compared with each annotator's texts for that unit
(names and descriptions), by three measures:

- exact: 1 when the label equals one of the annotator's texts after normalisation (case, punctuation, articles,
  plural); a formula label (``((red AND water) AND (NOT top))``) agrees when one of its *positive* atoms does;
- cosine: cosine of the two sentence embeddings (mean-pooled last layer, L2-normalised);
- BERTScore F1 (Zhang et al. 2020): greedy cosine matching of the last layer's token embeddings, precision and
  recall idf-weighted (idf from the project's text), F1 their harmonic mean.
A unit with several texts by one annotator scores the best match (multi-reference BERTScore takes the maximum).

Every figure is a mean over units with a bootstrap 95% interval (units resampled with replacement). Baselines are
rows of their own, always: the most frequent human text given to every unit, a constant generic word ("object"),
and each method's labels shuffled across the units (a permutation baseline: the mean over `shuffles` seeded
permutations; its analytic expectation, the mean over all unit x label pairs, is reported with it). The ceiling is
annotators compared with each other on the units both named.

Describe-and-Dissect found a constant label ("depictions") beating every method on MILANNOTATIONS: a method row
means something only next to these baselines.

Maps grouped on the naming board enter through `group_overlap`: each human concept group is matched with the
groups formed by the method's label-sharing units (the partition of `labelers.agreement.partition_from_labels`) by
Jaccard overlap of their maps.

Pure numpy + a sentence encoder (`labelers.sentence`); nothing here knows the project database or Qt.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelers import agreement
from labelers.base import LabelerError, NullProgress, Progress
from labelers.resample import Interval, bootstrap, percentile_interval
from labelers.resample import keyed_rng as _rng

MEASURES = ("exact", "cosine", "bertscore")
CONSTANT = "object"
# Bootstrap resamples for the 95% intervals: with 1000, the 2.5% and 97.5% percentiles move by well under the
# interval's own width between seeds, at a cost of a few milliseconds per row.
N_BOOT = 1000
# Permutations for the shuffled baseline (the 100): the mean's standard error is the per-unit spread / 10.
N_SHUFFLES = 100

KIND_METHOD = "method"
KIND_BASELINE = "baseline"
KIND_CEILING = "ceiling"


# ==== text normalisation and formula atoms ======================================================================
_ARTICLES = {"a", "an", "the"}
_KEEP_S = ("ss", "us", "is", "ous")


def _singular(word: str) -> str:
    """English plural to singular for the common regular cases (labels are mostly nouns and adjectives)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(_KEEP_S):
        return word[:-1]
    return word


def normalise(text: str) -> str:
    """Lower case, separators to spaces, punctuation and articles dropped, every word singular."""
    text = re.sub(r"[_\-/]+", " ", str(text).lower())
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(_singular(w) for w in text.split() if w not in _ARTICLES)


def looks_like_formula(text: str) -> bool:
    return bool(re.search(r"\b(AND|OR|NOT)\b", text)) or ("(" in text and ")" in text)


def formula_atoms(text: str) -> list[tuple[str, bool]] | None:
    """The atoms of a formula in compexp's spelling, each with whether it is positive (under an even number of
    NOTs): ``((red AND water) AND (NOT top))`` -> [(red, True), (top, False), (water, True)]. None when `text` is
    not a formula (a plain label or a description) or cannot be read as one. The parsing is
    `labelers.formulas.formula_atoms`, the one reading of formula texts."""
    from labelers.formulas import formula_atoms as parse_atoms

    if not looks_like_formula(text):
        return None
    try:
        atoms = parse_atoms(text)
    except ValueError:
        return None
    return [(name, not negated) for name, negated in atoms] or None


def match_keys(text: str) -> frozenset[str]:
    """What a text can agree on exactly: its positive atoms if it is a formula, else the whole text; normalised."""
    atoms = formula_atoms(text)
    if atoms is None:
        key = normalise(text)
        return frozenset((key,)) if key else frozenset()
    return frozenset(k for k in (normalise(a) for a, positive in atoms if positive) if k)


def phrase(text: str) -> str:
    """The words a formula says, for the semantic measures: ``((red AND water) AND (NOT top))`` -> "red and
    water and not top". Other texts are returned as they are."""
    if formula_atoms(text) is None:
        return str(text).strip()
    words = re.sub(r"[()]", " ", text)
    words = re.sub(r"\b(AND|OR|NOT)\b", lambda m: m.group(1).lower(), words)
    return " ".join(words.split())


# ==== pairwise scores of texts ===================================================================================
def bertscore_pair(a: Any, b: Any, wa: np.ndarray, wb: np.ndarray) -> tuple[float, float, float]:
    """BERTScore (P, R, F1) of candidate `a` against reference `b` (TokenEmbeddings with unit-length vectors),
    token weights `wa`, `wb`. A text whose weights sum to 0 (every token in every corpus text) weighs its tokens
    equally."""
    sim = np.asarray(a.vectors, np.float64) @ np.asarray(b.vectors, np.float64).T
    wa = _usable(wa)
    wb = _usable(wb)
    p = float((wa * sim.max(1)).sum() / wa.sum())
    r = float((wb * sim.max(0)).sum() / wb.sum())
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f


def _usable(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w if w.sum() > 0 else np.ones_like(w)


class TextTable:
    """The distinct texts of a comparison, embedded once: sentence vectors, token vectors with idf weights, and
    exact-match keys. Scores between texts are looked up by row index."""

    def __init__(self, texts: Sequence[str], encoder: Any, idf_corpus: Sequence[str] | None = None,
                 progress: Progress | None = None):
        from labelers.sentence import TokenEmbeddings, idf_of, idf_weights

        progress = progress or NullProgress()
        self.texts = list(dict.fromkeys(str(t) for t in texts))
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.keys = [match_keys(t) for t in self.texts]
        phrases = [phrase(t) for t in self.texts]
        self.encoder = encoder
        if encoder is None:
            # exact match only: the semantic measures read NaN (no sentence encoder at hand)
            self.sentence = np.zeros((len(self.texts), 0), dtype=np.float32)
            self.tokens = [TokenEmbeddings(np.zeros(0, np.int64), np.zeros((0, 0), np.float32)) for _ in phrases]
            self.idf = None
        else:
            self.sentence, self.tokens = encoder.embed(phrases, progress)
            corpus = list(idf_corpus) if idf_corpus else []
            self.idf = idf_weights(encoder.token_ids(corpus)) if corpus else None
        self.weights = [_usable(idf_of(self.idf, t.ids)) if len(t.ids) else np.zeros(0) for t in self.tokens]
        dim = self.sentence.shape[1] if self.sentence.ndim == 2 else 0
        tmax = max((len(t.ids) for t in self.tokens), default=0)
        # padded token tensors for batched greedy matching
        self._tok = np.zeros((len(self.texts), max(tmax, 1), dim), dtype=np.float32)
        self._w = np.zeros((len(self.texts), max(tmax, 1)), dtype=np.float64)
        self._mask = np.zeros((len(self.texts), max(tmax, 1)), dtype=bool)
        self._len = np.array([len(t.ids) for t in self.tokens], dtype=np.int64)
        for i, t in enumerate(self.tokens):
            n = len(t.ids)
            self._tok[i, :n] = t.vectors
            self._w[i, :n] = self.weights[i] / self.weights[i].sum() if n else 0.0
            self._mask[i, :n] = True

    def ids(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.index[str(t)] for t in texts], dtype=np.int64)

    def exact(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[len(a), len(b)] 1.0 where the texts share a match key."""
        out = np.zeros((len(a), len(b)), dtype=np.float64)
        for r, i in enumerate(a.tolist()):
            ki = self.keys[i]
            if ki:
                out[r] = [bool(ki & self.keys[j]) for j in b.tolist()]
        return out

    def cosine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.encoder is None:
            return np.full((len(a), len(b)), np.nan)
        return self.sentence[a].astype(np.float64) @ self.sentence[b].astype(np.float64).T

    def bertscore(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[len(a), len(b)] BERTScore F1 of each text of `a` (candidate) against each of `b` (reference),
        vectorised over pairs in chunks that keep the similarity tensor near 64 MB (float64)."""
        out = np.zeros((len(a), len(b)), dtype=np.float64)
        if self.encoder is None:
            return np.full((len(a), len(b)), np.nan)
        if not len(a) or not len(b):
            return out
        ta, tb = int(self._len[a].max(initial=1)), int(self._len[b].max(initial=1))
        ta, tb = max(ta, 1), max(tb, 1)
        # float64 throughout: F1 = 2PR / (P + R) is ill-conditioned when token cosines are negative and P, R have
        # opposite signs, and float32 products then drift by 1e-5 from the per-pair definition
        eb, mb, wb = self._tok[b, :tb].astype(np.float64), self._mask[b, :tb], self._w[b, :tb]
        chunk = max(1, int(8_000_000 // max(1, len(b) * ta * tb)))
        for s in range(0, len(a), chunk):
            ia = a[s:s + chunk]
            ea, ma, wa = self._tok[ia, :ta].astype(np.float64), self._mask[ia, :ta], self._w[ia, :ta]
            sim = np.einsum("itd,jsd->ijts", ea, eb, optimize=True)
            best_in_b = np.where(mb[None, :, None, :], sim, -np.inf).max(3)  # [i, j, t]
            best_in_a = np.where(ma[:, None, :, None], sim, -np.inf).max(2)  # [i, j, s]
            best_in_b[~np.isfinite(best_in_b)] = 0.0
            best_in_a[~np.isfinite(best_in_a)] = 0.0
            p = (best_in_b * wa[:, None, :]).sum(2)
            r = (best_in_a * wb[None, :, :]).sum(2)
            denom = p + r
            out[s:s + len(ia)] = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
        return out

    def scores(self, measure: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return {"exact": self.exact, "cosine": self.cosine, "bertscore": self.bertscore}[measure](a, b)


# ==== records =====================================================================================================
@dataclass
class SummaryRow:
    """One line of the summary: a method (or a baseline, or an annotator as the ceiling) against an annotator."""

    layer: str
    method: str  # the method, "most frequent", "constant", "shuffled METHOD", or "annotator: NAME"
    annotator: str
    kind: str  # KIND_METHOD, KIND_BASELINE or KIND_CEILING
    units: int
    exact: Interval
    cosine: Interval
    bertscore: Interval
    label: str = ""  # the text a constant baseline gives every unit
    expected: dict[str, float] = field(default_factory=dict)  # analytic expectation (permutation baseline)

    def measure(self, name: str) -> Interval:
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "method": self.method, "annotator": self.annotator,
                               "kind": self.kind, "units": self.units, "label": self.label}
        for m in MEASURES:
            iv = self.measure(m)
            out[m], out[f"{m}_low"], out[f"{m}_high"] = iv.value, iv.low, iv.high
            out[f"{m}_expected"] = self.expected.get(m, math.nan)
        return out


@dataclass
class UnitScore:
    """One unit, one labeler (a method or an annotator) against one annotator (or method-against-method)."""

    layer: str
    unit: int
    source: str  # method name or "annotator: NAME"
    annotator: str  # the reference: an annotator name, or "method: NAME" for method-against-method
    kind: str  # "method", "ceiling" or "methods"
    text: str
    reference: str
    exact: float
    cosine: float
    bertscore: float


@dataclass
class GroupRow:
    """How a method's label-sharing units overlap one annotator's concept groups of a naming pool."""

    pool: str
    layer: str
    method: str
    annotator: str
    kind: str
    groups: int  # human concept groups compared
    jaccard: Interval  # mean over groups of the best Jaccard with a method group, bootstrap over groups
    adjusted_rand: float
    expected: float = math.nan


@dataclass
class Comparison:
    rows: list[SummaryRow]
    units: list[UnitScore]
    groups: list[GroupRow] = field(default_factory=list)
    encoder: str = ""
    idf_texts: int = 0
    n_boot: int = N_BOOT
    shuffles: int = N_SHUFFLES
    seed: int = 0


@dataclass
class LayerLabels:
    """What is compared on one layer: each method's top label per unit and each annotator's texts per unit."""

    layer: str
    methods: dict[str, dict[int, str]]
    humans: dict[str, dict[int, list[str]]]


# ==== statistics ==================================================================================================
def _best_over_refs(pair: np.ndarray, cand: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """S[i, j] = max over the references of unit i of pair[candidate of unit j, reference].
    `pair` is [texts, texts] over the table's distinct texts; `refs` is [n, R] padded with -1."""
    valid = refs >= 0
    g = pair[cand[None, :, None], np.where(valid, refs, 0)[:, None, :]]  # [n_i, n_j, R]
    return np.where(valid[:, None, :], g, -np.inf).max(2)


def _unit_scores(table: TextTable, measure: str, cands: list[np.ndarray], refs: list[np.ndarray]) -> np.ndarray:
    """Per unit: mean over its candidate texts of the best score against its reference texts."""
    all_c = np.unique(np.concatenate(cands)) if cands else np.zeros(0, np.int64)
    all_r = np.unique(np.concatenate(refs)) if refs else np.zeros(0, np.int64)
    pair = table.scores(measure, all_c, all_r)
    ci = {int(t): k for k, t in enumerate(all_c)}
    ri = {int(t): k for k, t in enumerate(all_r)}
    out = np.empty(len(cands))
    for u, (c, r) in enumerate(zip(cands, refs)):
        sub = pair[np.ix_([ci[int(x)] for x in c], [ri[int(x)] for x in r])]
        out[u] = sub.max(1).mean()
    return out


def _pad(rows: list[np.ndarray]) -> np.ndarray:
    width = max((len(r) for r in rows), default=1)
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


# ==== the comparison ==============================================================================================
def most_frequent(texts: Sequence[str]) -> str | None:
    """The most frequent text after normalisation (ties: the one seen first), spelled as first seen."""
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for t in texts:
        key = normalise(t)
        if key:
            counts[key] += 1
            first.setdefault(key, str(t))
    if not counts:
        return None
    best = max(counts.values())
    return next(first[k] for k in first if counts[k] == best)


def compare(layers: Sequence[LayerLabels], encoder: Any, idf_corpus: Sequence[str] | None = None, *,
            n_boot: int = N_BOOT, shuffles: int = N_SHUFFLES, seed: int = 0, constant: str = CONSTANT,
            progress: Progress | None = None) -> Comparison:
    """Every method against every annotator on every layer, with the baselines and the annotators' ceiling.

    `encoder` is a `labelers.sentence.SentenceEncoder`; `idf_corpus` the texts the idf weights are counted on
    (the project's captions, names and descriptions; None: no idf weighting)."""
    progress = progress or NullProgress()
    if not constant.strip():
        raise LabelerError("the constant baseline needs a word, e.g. 'object'")
    texts: list[str] = [constant]
    for lay in layers:
        for labels in lay.methods.values():
            texts.extend(t for t in labels.values() if t)
        for per_unit in lay.humans.values():
            for ts in per_unit.values():
                texts.extend(t for t in ts if t)
    progress.update(0, 1, "embedding the texts")
    table = TextTable(texts, encoder, idf_corpus, progress)
    rows: list[SummaryRow] = []
    units: list[UnitScore] = []
    tasks = sum(len(lay.humans) * (len(lay.methods) + 1) for lay in layers)
    done = 0
    for lay in layers:
        humans = {a: {u: [t for t in ts if t] for u, ts in per.items() if any(t for t in ts)}
                  for a, per in lay.humans.items()}
        methods = {m: {u: t for u, t in labels.items() if t} for m, labels in lay.methods.items()}
        pooled_human = [t for per in humans.values() for ts in per.values() for t in ts]
        frequent = most_frequent(pooled_human)
        for annotator, refs_by_unit in sorted(humans.items()):
            for method, labels in sorted(methods.items()):
                progress.update(done, tasks, f"{lay.layer}: {method} against {annotator}")
                done += 1
                rows.extend(_method_rows(table, lay.layer, method, annotator, labels, refs_by_unit, units,
                                         n_boot, shuffles, seed))
            progress.update(done, tasks, f"{lay.layer}: baselines and ceiling for {annotator}")
            done += 1
            unit_ids = sorted(refs_by_unit)
            refs = [table.ids(refs_by_unit[u]) for u in unit_ids]
            for name, text in (("most frequent", frequent), ("constant", constant)):
                if text is None or not unit_ids:
                    continue
                cands = [table.ids([text])] * len(unit_ids)
                vals = {m: _unit_scores(table, m, cands, refs) for m in MEASURES}
                rng = _rng(seed, lay.layer, name, annotator)
                rows.append(SummaryRow(lay.layer, name, annotator, KIND_BASELINE, len(unit_ids),
                                       label=text, **_intervals(vals, n_boot, rng)))
            for other, other_by_unit in sorted(humans.items()):
                if other == annotator:
                    continue
                shared = sorted(set(other_by_unit) & set(refs_by_unit))
                if not shared:
                    continue
                cands = [table.ids(other_by_unit[u]) for u in shared]
                refs_s = [table.ids(refs_by_unit[u]) for u in shared]
                vals = {m: _unit_scores(table, m, cands, refs_s) for m in MEASURES}
                rng = _rng(seed, lay.layer, "ceiling", other, annotator)
                rows.append(SummaryRow(lay.layer, f"annotator: {other}", annotator, KIND_CEILING, len(shared),
                                       **_intervals(vals, n_boot, rng)))
                for k, u in enumerate(shared):
                    units.append(UnitScore(lay.layer, u, f"annotator: {other}", annotator, KIND_CEILING,
                                           " | ".join(other_by_unit[u]), " | ".join(refs_by_unit[u]),
                                           *(float(vals[m][k]) for m in MEASURES)))
        _method_pairs(table, lay.layer, methods, units)
    progress.update(tasks, tasks, "compared")
    return Comparison(rows=rows, units=units, encoder=getattr(encoder, "name", ""),
                      idf_texts=len(idf_corpus or []), n_boot=n_boot, shuffles=shuffles, seed=seed)


def _intervals(vals: Mapping[str, np.ndarray], n_boot: int, rng: np.random.Generator) -> dict[str, Interval]:
    # one set of resampled units for the three measures, so their intervals describe the same resamples
    n = len(next(iter(vals.values())))
    idx = rng.integers(0, n, size=(n_boot, n)) if n > 1 and n_boot > 0 else None
    out = {}
    for m in MEASURES:
        v = np.asarray(vals[m], dtype=np.float64)
        if n == 0:
            out[m] = Interval(math.nan, math.nan, math.nan)
        elif idx is None:
            out[m] = Interval(float(v.mean()), float(v.mean()), float(v.mean()))
        else:
            out[m] = percentile_interval(float(v.mean()), v[idx].mean(1))
    return out


def _method_rows(table: TextTable, layer: str, method: str, annotator: str, labels: Mapping[int, str],
                 refs_by_unit: Mapping[int, list[str]], units: list[UnitScore], n_boot: int, shuffles: int,
                 seed: int) -> list[SummaryRow]:
    """The method's row and its shuffled baseline; per-unit scores appended to `units`."""
    unit_ids = sorted(set(labels) & set(refs_by_unit))
    n = len(unit_ids)
    if n == 0:
        return []
    cand = table.ids([labels[u] for u in unit_ids])
    refs = _pad([table.ids(refs_by_unit[u]) for u in unit_ids])
    all_c = np.unique(cand)
    all_r = np.unique(refs[refs >= 0])
    ci = np.searchsorted(all_c, cand)
    ri = np.where(refs >= 0, np.searchsorted(all_r, np.where(refs >= 0, refs, all_r[0])), -1)
    perm_rng = _rng(seed, layer, "shuffled", method, annotator)
    perms = np.stack([perm_rng.permutation(n) for _ in range(shuffles)]) if shuffles > 0 else None
    own: dict[str, np.ndarray] = {}
    shuffled: dict[str, np.ndarray] = {}  # [shuffles, n] per measure
    expected: dict[str, float] = {}
    for m in MEASURES:
        pair = table.scores(m, all_c, all_r)
        s = _best_over_refs(pair, ci, ri)  # [unit i (reference), unit j (label)]
        own[m] = np.diag(s).copy()
        if perms is not None:
            # a uniform permutation gives unit i the label of unit j with probability 1/n: E = mean of S
            shuffled[m] = s[np.arange(n)[None, :], perms]
            expected[m] = float(s.mean())
    for k, u in enumerate(unit_ids):
        units.append(UnitScore(layer, u, method, annotator, KIND_METHOD, labels[u], " | ".join(refs_by_unit[u]),
                               *(float(own[m][k]) for m in MEASURES)))
    out = [SummaryRow(layer, method, annotator, KIND_METHOD, n,
                      **_intervals(own, n_boot, _rng(seed, layer, method, annotator)))]
    if perms is not None:
        out.append(SummaryRow(layer, f"shuffled {method}", annotator, KIND_BASELINE, n, expected=expected,
                              **_chance_intervals(shuffled, n_boot,
                                                  _rng(seed, layer, "boot-shuffled", method, annotator))))
    return out


def _chance_intervals(per_shuffle: Mapping[str, np.ndarray], n_boot: int,
                      rng: np.random.Generator) -> dict[str, Interval]:
    """The shuffled baseline: the value is the mean over all shuffles and units; the interval is where the score
    of one chance assignment falls, units resampled (as for every row) and one of the shuffles drawn per resample,
    so it holds both sources of chance and, at 95%, the analytic expectation."""
    shuffles, n = next(iter(per_shuffle.values())).shape
    idx = rng.integers(0, n, size=(n_boot, n))
    pick = rng.integers(0, shuffles, size=n_boot)
    out = {}
    for m in MEASURES:
        v = per_shuffle[m]
        # the resamples' mean scores (none when n_boot is 0: NaN bounds), read as every other interval is read
        out[m] = percentile_interval(float(v.mean()), v[pick[:, None], idx].mean(1))
    return out


def _method_pairs(table: TextTable, layer: str, methods: Mapping[str, Mapping[int, str]],
                  units: list[UnitScore]) -> None:
    """Method against method per unit: whether the methods agree with each other on a unit."""
    names = sorted(methods)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(methods[a]) & set(methods[b]))
            if not shared:
                continue
            cands = [table.ids([methods[a][u]]) for u in shared]
            refs = [table.ids([methods[b][u]]) for u in shared]
            vals = {m: _unit_scores(table, m, cands, refs) for m in MEASURES}
            for k, u in enumerate(shared):
                units.append(UnitScore(layer, u, a, f"method: {b}", "methods", methods[a][u], methods[b][u],
                                       *(float(vals[m][k]) for m in MEASURES)))


# ==== maps grouped on the naming board ===========================================================================
def group_overlap(pool: str, layer: str, board: agreement.Partition, map_units: Sequence[int] | np.ndarray,
                  methods: Mapping[str, Mapping[int, str]], *, n_boot: int = N_BOOT, shuffles: int = N_SHUFFLES,
                  seed: int = 0) -> list[GroupRow]:
    """For one annotator's board: each concept group's best Jaccard overlap with a group of maps whose units share
    a method's label (normalised), averaged over the concept groups with a bootstrap interval over groups; the
    adjusted Rand index of the two partitions (`labelers.agreement`) beside it. Jaccard as the study panel's concept
    matching counts it: |A ∩ B| / |A ∪ B| over all members, so a map only one side placed enlarges the union.
    Baselines: the method's labels shuffled across units (mean over `shuffles` permutations; no ARI, which is
    chance-corrected: 0 at chance by construction) and one label for every unit (all maps in one group)."""
    map_units = np.asarray(map_units, dtype=np.int64)
    groups = board.concept_groups
    rows: list[GroupRow] = []
    if not len(groups):
        return rows
    human = board.membership(groups).astype(np.float64)  # [G, M]
    human_size = human.sum(1)
    n_units = int(map_units.max(initial=-1)) + 1

    def best_jaccard(unit_label: np.ndarray) -> np.ndarray:
        """`unit_label[u]` is a label id >= 0 or -1; [S, U] for S assignments at once -> [S, G]."""
        lab = unit_label[:, map_units]  # [S, M]
        k = int(lab.max(initial=-1)) + 1
        if k == 0:
            return np.zeros((lab.shape[0], len(groups)))
        onehot = (lab[:, :, None] == np.arange(k)[None, None, :]).astype(np.float64)  # [S, M, K]
        shared = np.einsum("gm,smk->sgk", human, onehot)
        union = human_size[None, :, None] + onehot.sum(1)[:, None, :] - shared
        jac = np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)
        return jac.max(2)

    def label_ids(labels: Mapping[int, str]) -> tuple[np.ndarray, list[str]]:
        keys = {u: normalise(t) for u, t in labels.items() if 0 <= int(u) < n_units and normalise(t)}
        names = sorted(set(keys.values()))
        index = {n: i for i, n in enumerate(names)}
        ids = np.full(n_units, -1, dtype=np.int64)
        for u, key in keys.items():
            ids[int(u)] = index[key]
        return ids, names

    for method, labels in sorted(methods.items()):
        ids, names = label_ids(labels)
        if not names:
            continue
        best = best_jaccard(ids[None])[0]
        auto = agreement.partition_from_labels(f"auto: {method}", [names[i] if i >= 0 else None
                                                                    for i in ids[map_units].tolist()])
        rows.append(GroupRow(pool, layer, method, board.annotator, KIND_METHOD, len(groups),
                             bootstrap(best, n_boot, _rng(seed, pool, method, board.annotator)),
                             agreement.adjusted_rand(board, auto)))
        if shuffles > 0:
            rng = _rng(seed, pool, "shuffled", method, board.annotator)
            labelled = np.flatnonzero(ids >= 0)
            shuffled = np.tile(ids, (shuffles, 1))
            for s in range(shuffles):
                shuffled[s, labelled] = ids[labelled][rng.permutation(len(labelled))]
            per_group = best_jaccard(shuffled).mean(0)
            rows.append(GroupRow(pool, layer, f"shuffled {method}", board.annotator, KIND_BASELINE, len(groups),
                                 bootstrap(per_group, n_boot,
                                           _rng(seed, pool, "boot-shuffled", method, board.annotator)), math.nan))
    every = np.zeros(n_units, dtype=np.int64)
    best = best_jaccard(every[None])[0]
    one = agreement.partition_from_labels("constant", [CONSTANT] * len(map_units))
    rows.append(GroupRow(pool, layer, "constant", board.annotator, KIND_BASELINE, len(groups),
                         bootstrap(best, n_boot, _rng(seed, pool, "constant", board.annotator)),
                         agreement.adjusted_rand(board, one)))
    return rows
