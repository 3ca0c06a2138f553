"""What the interactive-naming study measured (Hamidi-Haines et al. 2018, "Interactive Naming for Explaining Deep
Neural Networks: A Formative Study"), computed from annotators' boards.

A board is one annotator's partition of a pool of M activation maps into named groups; one group may be the
"unclear / not a concept" group, and maps the annotator has not placed yet are *unassigned*. From boards this
module computes:

- adequacy: the fraction of the pool's maps that received a concept (a named group that is not the unclear one);
- agreement between two annotators on the same pool: the adjusted Rand index and the pairwise agreement on map
  pairs ("same group" versus "different group"), both over the maps that *both* annotators placed;
- which concepts match between two annotators, by overlap of their members (Jaccard matrix, then the one-to-one
  matching of largest total Jaccard, i.e. the Hungarian algorithm);
- correspondence of concepts to units: for each concept, how many of its maps come from each unit, and whether it
  is carried by one unit or spread over many (share of the top unit, and the effective number of units
  exp(H) of the distribution's Shannon entropy H).

Automatic labels enter the same comparisons as a partition of their own (`partition_from_labels`): maps whose
units share a label form one group.

Pure numpy/scipy/scikit-learn; it knows nothing about the project database or Qt.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from labelers.base import LabelerError
from labelers.resample import NAN, Interval, cluster_weights, percentile_interval

# How the "unclear / not a concept" group enters comparisons between annotators:
#   "group":      as one more group. Two annotators who both call a map unclear agree about it; a map one calls
#                 unclear and the other names disagrees. This is the default: it compares the boards as drawn.
#   "singletons": each unclear map is a group of its own: "not a concept" is not a shared concept, so two unclear
#                 maps never count as "same group".
#   "exclude":    maps either annotator called unclear are left out: agreement on the concepts alone.
UNCLEAR_MODES = ("group", "singletons", "exclude")


@dataclass
class Partition:
    """One annotator's board over a pool of M maps.

    `assignment[m]` is the index of the group holding map m, or -1 when the map is unassigned. Groups are
    index-aligned with `names` and `unclear` (True for the "unclear / not a concept" group).
    """

    annotator: str
    assignment: np.ndarray  # [M] int64
    names: list[str]
    unclear: np.ndarray  # [G] bool

    def __post_init__(self) -> None:
        self.assignment = np.asarray(self.assignment, dtype=np.int64).reshape(-1)
        self.unclear = np.asarray(self.unclear, dtype=bool).reshape(-1)
        g = len(self.names)
        if self.unclear.shape[0] != g:
            raise LabelerError(
                f"board of {self.annotator!r}: {g} group names but {self.unclear.shape[0]} unclear flags; "
                "give one flag per group"
            )
        if self.assignment.size and (self.assignment.min() < -1 or self.assignment.max() >= g):
            raise LabelerError(
                f"board of {self.annotator!r}: a map is assigned to a group index outside 0..{g - 1}; "
                "use -1 for unassigned maps"
            )

    @classmethod
    def from_groups(cls, annotator: str, num_maps: int,
                    groups: Sequence[tuple[str, Sequence[int], bool]]) -> "Partition":
        """From (name, member map positions, is_unclear) per group; a map may belong to one group only."""
        assignment = np.full(num_maps, -1, dtype=np.int64)
        for g, (_, members, _) in enumerate(groups):
            idx = np.asarray(list(members), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= num_maps):
                raise LabelerError(f"board of {annotator!r}: group {g} names a map outside 0..{num_maps - 1}")
            if (assignment[idx] >= 0).any():
                raise LabelerError(f"board of {annotator!r}: a map is in two groups; each map has one group at most")
            assignment[idx] = g
        return cls(annotator, assignment, [str(name) for name, _, _ in groups],
                   np.array([bool(u) for _, _, u in groups], dtype=bool))

    @property
    def num_maps(self) -> int:
        return int(self.assignment.shape[0])

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @property
    def placed(self) -> np.ndarray:
        """[M] bool: maps in some group (the unclear one included)."""
        return self.assignment >= 0

    @property
    def in_concept(self) -> np.ndarray:
        """[M] bool: maps in a concept group (not unclear, not unassigned)."""
        concept_group = np.append(~self.unclear, False)  # index -1 reads the appended False
        return concept_group[self.assignment]

    @property
    def concept_groups(self) -> np.ndarray:
        return np.nonzero(~self.unclear)[0]

    def membership(self, groups: np.ndarray | None = None) -> np.ndarray:
        """[len(groups), M] bool membership matrix (all groups by default)."""
        groups = np.arange(self.num_groups) if groups is None else np.asarray(groups, dtype=np.int64)
        return self.assignment[None, :] == groups[:, None]


def _same_pool(a: Partition, b: Partition) -> None:
    if a.num_maps != b.num_maps:
        raise LabelerError(
            f"the boards of {a.annotator!r} ({a.num_maps} maps) and {b.annotator!r} ({b.num_maps} maps) are not "
            "over the same pool; compare boards of one pool"
        )


def partition_from_labels(annotator: str, labels: Sequence[str | None]) -> Partition:
    """A partition from one label per map (e.g. the automatic label of each map's unit): maps with equal labels
    form a group, maps without a label (None or "") are unassigned. Groups are in sorted label order."""
    names = sorted({lab for lab in labels if lab})
    index = {name: i for i, name in enumerate(names)}
    assignment = np.array([index[lab] if lab else -1 for lab in labels], dtype=np.int64)
    return Partition(annotator, assignment, names, np.zeros(len(names), dtype=bool))


# ---- adequacy -------------------------------------------------------------------------------------------------
@dataclass
class Adequacy:
    annotator: str
    maps: int  # maps in the pool
    concept: int  # maps in a concept group
    unclear: int  # maps in the unclear group
    unassigned: int
    adequacy: float  # concept / maps: the study's measure
    judged_adequacy: float  # concept / (concept + unclear): the same over the maps the annotator has placed


def adequacy(board: Partition) -> Adequacy:
    """Fraction of the pool's maps that received a concept. Maps in the unclear group and unassigned maps do not
    count; `judged_adequacy` leaves the unassigned ones out of the denominator (useful while a session is going)."""
    m = board.num_maps
    concept = int(board.in_concept.sum())
    placed = int(board.placed.sum())
    return Adequacy(
        annotator=board.annotator, maps=m, concept=concept, unclear=placed - concept, unassigned=m - placed,
        adequacy=concept / m if m else math.nan,
        judged_adequacy=concept / placed if placed else math.nan,
    )


# ---- agreement between two annotators -------------------------------------------------------------------------
def comparable_labels(a: Partition, b: Partition, unclear: str = "group") -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """The maps both annotators placed (unassigned maps of either are left out: no judgement, no (dis)agreement),
    and their group labels under the `unclear` rule (see UNCLEAR_MODES). Returns (map positions, labels of a,
    labels of b)."""
    _same_pool(a, b)
    if unclear not in UNCLEAR_MODES:
        raise LabelerError(f"unclear must be one of {', '.join(UNCLEAR_MODES)}, not {unclear!r}")
    if unclear == "exclude":
        keep = a.in_concept & b.in_concept
    else:
        keep = a.placed & b.placed
    maps = np.nonzero(keep)[0]
    la = a.assignment[maps].copy()
    lb = b.assignment[maps].copy()
    if unclear == "singletons":
        # Fresh labels past every real group index, one per unclear map.
        for labels, board in ((la, a), (lb, b)):
            is_unclear = board.unclear[labels]
            labels[is_unclear] = board.num_groups + np.arange(int(is_unclear.sum()))
    return maps, la, lb


def adjusted_rand(a: Partition, b: Partition, unclear: str = "group") -> float:
    """Adjusted Rand index of two boards of one pool over the maps both placed (NaN with fewer than two)."""
    from sklearn.metrics import adjusted_rand_score

    maps, la, lb = comparable_labels(a, b, unclear)
    if len(maps) < 2:
        return math.nan
    return float(adjusted_rand_score(la, lb))


@dataclass
class PairCounts:
    """Unordered pairs of maps both annotators placed, by whether each annotator put the two in the same group."""

    maps: int
    pairs: int
    both_same: int
    both_different: int
    only_a_same: int
    only_b_same: int

    @property
    def agreement(self) -> float:
        """Fraction of pairs on which the two agree ("same group" for both or "different group" for both)."""
        return (self.both_same + self.both_different) / self.pairs if self.pairs else math.nan

    @property
    def chance_agreement(self) -> float:
        """The agreement two independent groupings with these same-group rates would reach: p_a p_b +
        (1 - p_a)(1 - p_b), p being the share of pairs each puts together. Many small groups make it high (most
        pairs are apart for both), which is why `agreement` alone flatters."""
        if not self.pairs:
            return math.nan
        pa = (self.both_same + self.only_a_same) / self.pairs
        pb = (self.both_same + self.only_b_same) / self.pairs
        return pa * pb + (1 - pa) * (1 - pb)

    @property
    def positive_agreement(self) -> float:
        """Of the pairs either put together, the fraction both put together: not inflated by the many pairs that
        are trivially apart when there are many groups."""
        together = self.both_same + self.only_a_same + self.only_b_same
        return self.both_same / together if together else math.nan


def _pairs(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pair_counts(a: Partition, b: Partition, unclear: str = "group") -> PairCounts:
    """Counted from the contingency table, never by enumerating pairs: pairs together in both boards are
    sum C(n_ij, 2), together in a are sum_i C(a_i, 2), together in b sum_j C(b_j, 2)."""
    maps, la, lb = comparable_labels(a, b, unclear)
    n = len(maps)
    if n == 0:
        return PairCounts(0, 0, 0, 0, 0, 0)
    _, ia = np.unique(la, return_inverse=True)
    _, ib = np.unique(lb, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    both = _pairs(table)
    same_a = _pairs(table.sum(axis=1))
    same_b = _pairs(table.sum(axis=0))
    total = n * (n - 1) // 2
    return PairCounts(maps=n, pairs=total, both_same=both, both_different=total - same_a - same_b + both,
                      only_a_same=same_a - both, only_b_same=same_b - both)


def pairwise_agreement(a: Partition, b: Partition, unclear: str = "group") -> float:
    return pair_counts(a, b, unclear).agreement


def agreement_matrix(boards: Sequence[Partition], measure: str = "ari", unclear: str = "group") -> np.ndarray:
    """[A, A] symmetric matrix of adjusted Rand index ("ari") or pairwise agreement ("pairs") between boards; the
    diagonal is 1."""
    if measure not in ("ari", "pairs"):
        raise LabelerError(f"measure must be 'ari' or 'pairs', not {measure!r}")
    fn = adjusted_rand if measure == "ari" else pairwise_agreement
    n = len(boards)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = fn(boards[i], boards[j], unclear)
    return out


# ---- which concepts match -------------------------------------------------------------------------------------
@dataclass
class ConceptMatch:
    a_group: int
    b_group: int
    a_name: str
    b_name: str
    jaccard: float
    shared: int
    a_size: int
    b_size: int


@dataclass
class ConceptMatching:
    a_groups: np.ndarray  # [Ga] group indices of a (rows of `jaccard`)
    b_groups: np.ndarray  # [Gb] group indices of b (columns)
    jaccard: np.ndarray  # [Ga, Gb]
    shared: np.ndarray  # [Ga, Gb] int: maps in both groups
    matches: list[ConceptMatch] = field(default_factory=list)  # best total overlap, one-to-one, largest first
    unmatched_a: list[int] = field(default_factory=list)
    unmatched_b: list[int] = field(default_factory=list)


def match_concepts(a: Partition, b: Partition, include_unclear: bool = False,
                   min_jaccard: float = 0.0) -> ConceptMatching:
    """Jaccard overlap |A ∩ B| / |A ∪ B| of every group of a with every group of b (over all their members, so a
    map only one of them placed enlarges the union), then the one-to-one matching of largest total Jaccard
    (`scipy.optimize.linear_sum_assignment`). Pairs with Jaccard <= `min_jaccard` are not reported as matches."""
    from scipy.optimize import linear_sum_assignment

    _same_pool(a, b)
    ga = np.arange(a.num_groups) if include_unclear else a.concept_groups
    gb = np.arange(b.num_groups) if include_unclear else b.concept_groups
    ma = a.membership(ga).astype(np.int64)
    mb = b.membership(gb).astype(np.int64)
    shared = ma @ mb.T
    union = ma.sum(1)[:, None] + mb.sum(1)[None, :] - shared
    jac = np.divide(shared, union, out=np.zeros(shared.shape, dtype=np.float64), where=union > 0)
    out = ConceptMatching(a_groups=ga, b_groups=gb, jaccard=jac, shared=shared)
    matched_a: set[int] = set()
    matched_b: set[int] = set()
    if jac.size:
        rows, cols = linear_sum_assignment(jac, maximize=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if jac[r, c] > min_jaccard:
                out.matches.append(ConceptMatch(
                    a_group=int(ga[r]), b_group=int(gb[c]), a_name=a.names[ga[r]], b_name=b.names[gb[c]],
                    jaccard=float(jac[r, c]), shared=int(shared[r, c]), a_size=int(ma[r].sum()),
                    b_size=int(mb[c].sum()),
                ))
                matched_a.add(int(ga[r]))
                matched_b.add(int(gb[c]))
    out.matches.sort(key=lambda m: (-m.jaccard, m.a_group))
    out.unmatched_a = [int(g) for g in ga if int(g) not in matched_a]
    out.unmatched_b = [int(g) for g in gb if int(g) not in matched_b]
    return out


# ---- concepts and units ---------------------------------------------------------------------------------------
@dataclass
class ConceptUnits:
    group: int
    name: str
    size: int  # maps in the concept
    units: list[int]  # units contributing maps, most maps first (ties: lower unit first)
    counts: list[int]  # maps per unit, aligned with `units`
    top_unit: int
    top_share: float  # share of the concept's maps from its top unit
    entropy: float  # Shannon entropy (nats) of the distribution of its maps over units
    effective_units: float  # exp(entropy): 1 when one unit carries it, k for k equal units
    single_unit: bool  # top_share >= the `single_share` asked for


@dataclass
class Correspondence:
    """The concept-by-unit table of one board."""

    groups: np.ndarray  # [G] group indices (rows)
    units: np.ndarray  # [K] unit ids seen in those groups (columns), ascending
    counts: np.ndarray  # [G, K] int: maps of concept g from unit k
    concepts: list[ConceptUnits]
    # per unit (column): into how many concepts its maps spread, as an effective number exp(H)
    unit_effective_concepts: np.ndarray  # [K]


def _entropy_rows(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(axis=1)


def concept_units(board: Partition, map_units: Sequence[int] | np.ndarray, include_unclear: bool = False,
                  single_share: float = 0.8) -> Correspondence:
    """For each concept of `board`, how many of its maps come from each unit (`map_units[m]` is the unit of map m).
    A concept counts as carried by a single unit when that unit supplies at least `single_share` of its maps."""
    map_units = np.asarray(map_units, dtype=np.int64).reshape(-1)
    if map_units.shape[0] != board.num_maps:
        raise LabelerError(
            f"{map_units.shape[0]} unit ids for a board of {board.num_maps} maps; give the unit of every map"
        )
    groups = np.arange(board.num_groups) if include_unclear else board.concept_groups
    member = board.membership(groups)  # [G, M]
    used = member.any(axis=0)
    units = np.unique(map_units[used])
    col = np.searchsorted(units, map_units)
    onehot = np.zeros((board.num_maps, len(units)), dtype=np.int64)
    if len(units):
        rows = np.nonzero(used)[0]
        onehot[rows, col[rows]] = 1
    counts = member.astype(np.int64) @ onehot  # [G, K]
    entropy = _entropy_rows(counts)
    unit_entropy = _entropy_rows(counts.T)
    concepts = []
    for r, g in enumerate(groups.tolist()):
        row = counts[r]
        size = int(row.sum())
        order = np.lexsort((units, -row))  # most maps first, then lower unit id
        order = order[row[order] > 0]
        top_share = float(row[order[0]] / size) if size else math.nan
        concepts.append(ConceptUnits(
            group=g, name=board.names[g], size=size, units=units[order].tolist(), counts=row[order].tolist(),
            top_unit=int(units[order[0]]) if size else -1, top_share=top_share, entropy=float(entropy[r]),
            effective_units=float(np.exp(entropy[r])) if size else math.nan,
            single_unit=bool(size and top_share >= single_share),
        ))
    return Correspondence(groups=groups, units=units, counts=counts, concepts=concepts,
                          unit_effective_concepts=np.where(counts.sum(0) > 0, np.exp(unit_entropy), np.nan))


# ---- automatic versus human -----------------------------------------------------------------------------------
@dataclass
class Comparison:
    a: str
    b: str
    maps: int  # maps both placed
    adjusted_rand: float
    pairs: PairCounts
    matching: ConceptMatching


def compare(a: Partition, b: Partition, unclear: str = "group") -> Comparison:
    """Everything the study reports for two boards of one pool (human versus human, or human versus a partition
    made from automatic labels with `partition_from_labels`)."""
    pairs = pair_counts(a, b, unclear)
    return Comparison(a=a.annotator, b=b.annotator, maps=pairs.maps, adjusted_rand=adjusted_rand(a, b, unclear),
                      pairs=pairs, matching=match_concepts(a, b))


# ---- intervals and chance -------------------------------------------------------------------------------------
# Bootstrap resamples and label shuffles for the study's intervals and chance baselines: 1000 resamples put the
# 2.5% and 97.5% percentiles within about a hundredth of where more resamples would; 200 shuffles give the chance
# range's percentiles to about the same. Both are vectorised over contingency tables (milliseconds per pair).
N_BOOT = 1000
N_SHUFFLES = 200


@dataclass
class PairIntervals:
    """95% intervals of one comparison's ARI and pairwise agreement, with whole units resampled (the maps of a
    unit are not independent of each other), and what chance gives: the same two boards with b's groups shuffled
    over the maps both placed (group sizes kept). `chance_*.value` is the mean over shuffles (the ARI's is about
    0 by construction), `low`/`high` the range 95% of shuffles fall in: an ARI inside it is no better than chance.
    """

    adjusted_rand: Interval
    agreement: Interval
    chance_ari: Interval
    chance_agreement: Interval
    units: int  # units resampled
    n_boot: int
    shuffles: int

    @property
    def above_chance(self) -> bool:
        """The ARI's whole interval lies above the 97.5th percentile of chance."""
        return bool(self.adjusted_rand.known and self.chance_ari.known
                    and self.adjusted_rand.low > self.chance_ari.high)


def table_measures(tables: np.ndarray, self_pairs: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """ARI and pairwise agreement of [S, Ga, Gb] contingency tables; the same formulas as `adjusted_rand`
    (Hubert & Arabie) and `pair_counts`. NaN for a table of fewer than two maps.

    In a bootstrap resample a map drawn twice would pair with its own copy, a pair both boards trivially put
    together, which pulls a chance-level ARI above 0; `self_pairs` ([S], sum over maps of C(copies, 2)) takes
    those pairs out of every count, so only pairs of two different maps are counted."""
    t = np.asarray(tables, dtype=np.float64)
    n = t.sum(axis=(1, 2))
    self_pairs = np.asarray(self_pairs, dtype=np.float64)
    both = (t * (t - 1) / 2).sum(axis=(1, 2)) - self_pairs
    ra = t.sum(axis=2)
    cb = t.sum(axis=1)
    sa = (ra * (ra - 1) / 2).sum(axis=1) - self_pairs
    sb = (cb * (cb - 1) / 2).sum(axis=1) - self_pairs
    pairs = n * (n - 1) / 2 - self_pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = sa * sb / pairs
        top = (sa + sb) / 2
        ari = (both - expected) / (top - expected)
        agree = (pairs - sa - sb + 2 * both) / pairs
    # equal denominators happen only for two identical trivial groupings (all together, or all apart)
    ari = np.where((top == expected) & (pairs > 0), 1.0, ari)
    ari = np.where(pairs > 0, ari, np.nan)
    agree = np.where(pairs > 0, agree, np.nan)
    return ari, agree


def pair_intervals(a: Partition, b: Partition, map_units: Sequence[int] | np.ndarray, unclear: str = "group",
                   n_boot: int = N_BOOT, shuffles: int = N_SHUFFLES,
                   rng: np.random.Generator | None = None) -> PairIntervals:
    """Intervals (units resampled with replacement, each bringing all its maps) and the chance range (b's groups
    shuffled) of the ARI and pairwise agreement of two boards of one pool."""
    rng = rng if rng is not None else np.random.default_rng(0)
    map_units = np.asarray(map_units, dtype=np.int64).reshape(-1)
    maps, la, lb = comparable_labels(a, b, unclear)
    n = len(maps)
    if n < 2:
        return PairIntervals(NAN, NAN, NAN, NAN, len(np.unique(map_units[maps])), n_boot, shuffles)
    _, ia = np.unique(la, return_inverse=True)
    _, ib = np.unique(lb, return_inverse=True)
    ga, gb = int(ia.max()) + 1, int(ib.max()) + 1
    onehot = np.zeros((n, ga * gb), dtype=np.float64)
    onehot[np.arange(n), ia * gb + ib] = 1.0
    ari0, agree0 = (float(v[0]) for v in table_measures(onehot.sum(0).reshape(1, ga, gb)))
    units = map_units[maps]
    weights = cluster_weights(units, n_boot, rng).astype(np.float64)
    ari_b, agree_b = table_measures((weights @ onehot).reshape(-1, ga, gb),
                                    (weights * (weights - 1) / 2).sum(axis=1))
    if shuffles > 0:
        perms = np.argsort(rng.random((shuffles, n)), axis=1)
        cells = ia[None, :] * gb + ib[perms]
        shuffled = np.zeros((shuffles, ga * gb), dtype=np.float64)
        np.add.at(shuffled, (np.arange(shuffles)[:, None], cells), 1.0)
        ari_s, agree_s = table_measures(shuffled.reshape(-1, ga, gb))
        chance_ari = percentile_interval(float(np.nanmean(ari_s)), ari_s)
        chance_agree = percentile_interval(float(np.nanmean(agree_s)), agree_s)
    else:
        chance_ari, chance_agree = NAN, NAN
    return PairIntervals(
        adjusted_rand=percentile_interval(ari0, ari_b), agreement=percentile_interval(agree0, agree_b),
        chance_ari=chance_ari, chance_agreement=chance_agree, units=len(np.unique(units)), n_boot=n_boot,
        shuffles=shuffles)


def adequacy_interval(board: Partition, map_units: Sequence[int] | np.ndarray, n_boot: int = N_BOOT,
                      rng: np.random.Generator | None = None) -> Interval:
    """The board's adequacy (share of the pool's maps in a concept) with a 95% interval over units resampled."""
    rng = rng if rng is not None else np.random.default_rng(0)
    map_units = np.asarray(map_units, dtype=np.int64).reshape(-1)
    if board.num_maps == 0:
        return NAN
    concept = board.in_concept.astype(np.float64)
    weights = cluster_weights(map_units, n_boot, rng).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = (weights @ concept) / weights.sum(axis=1)
    return percentile_interval(float(concept.mean()), shares)
