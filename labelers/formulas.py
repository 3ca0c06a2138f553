"""Logical formulas over concepts, shared by compositional explanations and INVERT.

A formula is an immutable tree: a leaf is a concept index, inner nodes are NOT, AND, OR. Text follows the
compexp convention, e.g. ``((water OR sea) AND (NOT boat))``; ``parse`` reads that text back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import torch


@dataclass(frozen=True)
class Leaf:
    concept: int

    def length(self) -> int:
        return 1

    def text(self, names: list[str]) -> str:
        return names[self.concept]

    def evaluate(self, atoms: torch.Tensor) -> torch.Tensor:
        """`atoms` is [C, ...] bool; returns the [...] truth values of the formula."""
        return atoms[self.concept]

    def concepts(self) -> frozenset[int]:
        return frozenset((self.concept,))


@dataclass(frozen=True)
class Not:
    child: "Formula"

    def length(self) -> int:
        return self.child.length()

    def text(self, names: list[str]) -> str:
        return f"(NOT {self.child.text(names)})"

    def evaluate(self, atoms: torch.Tensor) -> torch.Tensor:
        return ~self.child.evaluate(atoms)

    def concepts(self) -> frozenset[int]:
        return self.child.concepts()


@dataclass(frozen=True)
class And:
    left: "Formula"
    right: "Formula"

    def length(self) -> int:
        return self.left.length() + self.right.length()

    def text(self, names: list[str]) -> str:
        return f"({self.left.text(names)} AND {self.right.text(names)})"

    def evaluate(self, atoms: torch.Tensor) -> torch.Tensor:
        return self.left.evaluate(atoms) & self.right.evaluate(atoms)

    def concepts(self) -> frozenset[int]:
        return self.left.concepts() | self.right.concepts()


@dataclass(frozen=True)
class Or:
    left: "Formula"
    right: "Formula"

    def length(self) -> int:
        return self.left.length() + self.right.length()

    def text(self, names: list[str]) -> str:
        return f"({self.left.text(names)} OR {self.right.text(names)})"

    def evaluate(self, atoms: torch.Tensor) -> torch.Tensor:
        return self.left.evaluate(atoms) | self.right.evaluate(atoms)

    def concepts(self) -> frozenset[int]:
        return self.left.concepts() | self.right.concepts()


Formula = Union[Leaf, Not, And, Or]


def to_text(formula: Formula, names: list[str]) -> str:
    """compexp's spelling: ``((water OR sea) AND (NOT boat))``; a single concept is its bare name."""
    return formula.text(names)


# A name is the shortest text up to the next operator or parenthesis (lazy `??`: a one-letter name must not swallow
# the rest of "(b AND c)").
_TOKEN = re.compile(r"\s*(\(|\)|AND NOT\b|AND\b|OR\b|NOT\b|[^()\s](?:[^()]*?[^()\s])??(?=\s+(?:AND|OR)\b|\s*\)|\s*$))")


def parse(text: str, names: list[str]) -> Formula:
    """Inverse of `to_text` for names that contain no parentheses and no bare AND/OR/NOT words."""
    index = {n: i for i, n in enumerate(names)}
    tokens = _tokens(text)

    def expr(i: int) -> tuple[Formula, int]:
        left, i = unary(i)
        while i < len(tokens) and tokens[i] in ("AND", "OR", "AND NOT"):
            op = tokens[i]
            right, i = unary(i + 1)
            left = And(left, Not(right)) if op == "AND NOT" else (And(left, right) if op == "AND" else Or(left, right))
        return left, i

    def unary(i: int) -> tuple[Formula, int]:
        if i >= len(tokens):
            raise ValueError(f"formula {text!r} ends too early")
        tok = tokens[i]
        if tok == "NOT":
            child, i = unary(i + 1)
            return Not(child), i
        if tok == "(":
            inner, i = expr(i + 1)
            if i >= len(tokens) or tokens[i] != ")":
                raise ValueError(f"formula {text!r} has an unclosed parenthesis")
            return inner, i + 1
        if tok not in index:
            raise ValueError(f"formula {text!r} names an unknown concept {tok!r}")
        return Leaf(index[tok]), i + 1

    formula, end = expr(0)
    if end != len(tokens):
        raise ValueError(f"formula {text!r} has extra text after position {end}")
    return formula


def parse_text(text: str) -> tuple[Formula, list[str]]:
    """Read formula text without knowing the vocabulary: leaves get indices in order of first appearance.

    Returns the formula and the names of its leaves (``names[leaf.concept]``)."""
    names: list[str] = []
    index: dict[str, int] = {}
    for tok in _tokens(text):
        if tok not in ("(", ")", "AND", "OR", "NOT", "AND NOT") and tok not in index:
            index[tok] = len(names)
            names.append(tok)
    return parse(text, names), names


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"cannot read formula {text!r} at position {pos}")
        out.append(m.group(1))
        pos = m.end()
    return out


# ----------------------------------------------------------------------------------------------------------------
# One normal form for formulas
#
# Every formula method (compexp, INVERT), the summaries and the comparison of labels spell a formula one way:
# negation pushed down to the concepts (De Morgan), nested AND / OR flattened, repeated operands dropped, operands
# sorted (concepts by name, a concept before its negation, single concepts before groups), and, when the dataset's
# concept relations are given, operands that the others already imply removed. Two formulas with the same canonical
# text are logically equal (given those relations), so they are one label.


@dataclass(frozen=True)
class ConceptRelations:
    """What the dataset says about pairs of concepts (concept indices), measured on the masks the method reads.

    `implies` holds (a, b) when every pixel / image of a also has b (a is a subset of b); `exclusive` holds (a, b)
    and (b, a) when a and b never occur together. A formula simplified with these relations has exactly the same
    mask on that dataset, so its score does not change."""

    implies: frozenset[tuple[int, int]] = frozenset()
    exclusive: frozenset[tuple[int, int]] = frozenset()

    @staticmethod
    def from_cooccurrence(co: Any, sizes: Any | None = None) -> "ConceptRelations":
        """From a [C, C] co-occurrence count matrix (pixels or images on which both concepts hold); its diagonal
        (or `sizes`) is each concept's own count. Concepts that never occur take part in no relation."""
        import numpy as np

        m = np.asarray(co.cpu() if hasattr(co, "cpu") else co, dtype=np.float64)
        size = np.diag(m) if sizes is None else np.asarray(sizes.cpu() if hasattr(sizes, "cpu") else sizes,
                                                           dtype=np.float64)
        occurs = size > 0
        both = occurs[:, None] & occurs[None, :]
        np.fill_diagonal(both, False)
        implies = both & (m == size[:, None])
        exclusive = both & (m == 0)
        return ConceptRelations(
            implies=frozenset(map(tuple, np.argwhere(implies).tolist())),  # type: ignore[arg-type]
            exclusive=frozenset(map(tuple, np.argwhere(exclusive).tolist())),  # type: ignore[arg-type]
        )

    def literal_subset(self, a: int, a_neg: bool, b: int, b_neg: bool) -> bool:
        """Whether literal a (NOT a when a_neg) holds wherever literal b does not fail, i.e. set(a) <= set(b)."""
        if a == b:
            return a_neg == b_neg
        if not a_neg and not b_neg:
            return (a, b) in self.implies
        if not a_neg and b_neg:
            return (a, b) in self.exclusive
        if a_neg and b_neg:
            return (b, a) in self.implies
        return False  # NOT a <= b would need a OR b to cover everything: not tracked


_NO_RELATIONS = ConceptRelations()


def _nnf(f: Formula, negate: bool = False) -> Formula:
    if isinstance(f, Leaf):
        return Not(f) if negate else f
    if isinstance(f, Not):
        return _nnf(f.child, not negate)
    left, right = _nnf(f.left, negate), _nnf(f.right, negate)
    is_and = isinstance(f, And) != negate
    return And(left, right) if is_and else Or(left, right)


def _operands(f: Formula, kind: type) -> list[Formula]:
    out: list[Formula] = []
    stack = [f]
    while stack:
        node = stack.pop()
        if type(node) is kind:
            stack.extend((node.right, node.left))  # type: ignore[union-attr]
        else:
            out.append(node)
    return out


def _literal(f: Formula) -> tuple[int, bool] | None:
    if isinstance(f, Leaf):
        return f.concept, False
    if isinstance(f, Not) and isinstance(f.child, Leaf):
        return f.child.concept, True
    return None


def _subset(x: Formula, y: Formula, rel: ConceptRelations) -> bool:
    """A sufficient test of set(x) <= set(y) for formulas in negation normal form."""
    lx, ly = _literal(x), _literal(y)
    if lx is not None and ly is not None:
        return rel.literal_subset(lx[0], lx[1], ly[0], ly[1])
    if isinstance(y, And):
        return all(_subset(x, part, rel) for part in _operands(y, And))
    if isinstance(x, Or):
        return all(_subset(part, y, rel) for part in _operands(x, Or))
    if isinstance(x, And):
        return any(_subset(part, y, rel) for part in _operands(x, And))
    if isinstance(y, Or):
        return any(_subset(x, part, rel) for part in _operands(y, Or))
    return False


def _sort_key(f: Formula, names: list[str]) -> tuple[int, str, int]:
    lit = _literal(f)
    if lit is not None:
        return 0, names[lit[0]], int(lit[1])
    return 1, flat_text(f, names), 0


def _rebuild(parts: list[Formula], kind: type) -> Formula:
    out = parts[0]
    for p in parts[1:]:
        out = kind(out, p)
    return out


def _canon(f: Formula, names: list[str], rel: ConceptRelations) -> Formula:
    if not isinstance(f, (And, Or)):
        return f
    kind = type(f)
    parts = [_canon(p, names, rel) for p in _operands(f, kind)]
    flat: list[Formula] = []
    for p in parts:  # a simplified operand may now be of the same kind: flatten again
        flat.extend(_operands(p, kind) if type(p) is kind else [p])
    flat = list({flat_text(p, names): p for p in sorted(flat, key=lambda p: _sort_key(p, names))}.values())
    # Drop an operand another one makes redundant: inside an AND one that a smaller operand lies in, inside an OR
    # one that lies in a larger operand. Of operands with equal sets the first (in sorted order) stays.
    inner = (lambda x, y: _subset(x, y, rel)) if kind is And else (lambda x, y: _subset(y, x, rel))
    kept = [
        y for i, y in enumerate(flat)
        if not any(j != i and inner(x, y) and (j < i or not inner(y, x)) for j, x in enumerate(flat))
    ]
    flat = kept or flat[:1]
    return flat[0] if len(flat) == 1 else _rebuild(flat, kind)


def canonical(f: Formula, names: list[str], relations: ConceptRelations | None = None) -> Formula:
    """The normal form of `f`: negation normal form, AND / OR flattened and sorted, repeated operands dropped, and
    operands implied by the others (given `relations`) removed. `to_text` of the result is the canonical text."""
    return _canon(_nnf(f), names, relations or _NO_RELATIONS)


def flat_text(f: Formula, names: list[str]) -> str:
    """Like `to_text` but with nested AND / OR of one kind written as one group: ``(a OR b OR c)``."""
    if isinstance(f, (And, Or)):
        kind = type(f)
        sep = " AND " if kind is And else " OR "
        return "(" + sep.join(flat_text(p, names) for p in _operands(f, kind)) + ")"
    if isinstance(f, Not):
        return f"(NOT {flat_text(f.child, names)})"
    return names[f.concept]


def canonical_formula_text(f: Formula, names: list[str], relations: ConceptRelations | None = None) -> str:
    """The text every formula method reports: `flat_text` of `canonical`."""
    return flat_text(canonical(f, names, relations), names)


def canonical_text(text: str, names: list[str] | None = None, relations: ConceptRelations | None = None) -> str:
    """Canonical spelling of formula text, e.g. ``(purple AND circle)`` -> ``(circle AND purple)``.

    With `names` (the dataset's concept names, index-aligned with `relations`) unknown names raise ValueError;
    without, any leaf text is accepted and no relations apply."""
    if names is None:
        f, leaf_names = parse_text(text)
        return canonical_formula_text(f, leaf_names)
    return canonical_formula_text(parse(text, names), names, relations)


def formula_key(f: Formula) -> str:
    """A key equal for formulas that differ only by order or grouping of AND / OR operands or by where NOT is
    written (negation normal form); no relations, no vocabulary needed. Used to deduplicate search candidates."""
    top = max(f.concepts())
    names = [str(i).zfill(len(str(top))) for i in range(top + 1)]  # zero-padded: sorts like the numbers
    return flat_text(canonical(f, names), names)


def formula_atoms(text: str) -> list[tuple[str, bool]]:
    """The concepts of a formula text with whether each appears negated, in canonical order: e.g.
    ``((water OR sea) AND (NOT boat))`` -> ``[("boat", True), ("sea", False), ("water", False)]``.

    Negations are pushed to the concepts first (``NOT (a OR b)`` gives a and b negated). A concept that appears
    both plain and negated is listed twice. Raises ValueError for text that is not a formula."""
    f, names = parse_text(text)
    c = canonical(f, names)
    out: list[tuple[str, bool]] = []
    stack = [c]
    while stack:
        node = stack.pop()
        lit = _literal(node)
        if lit is not None:
            out.append((names[lit[0]], lit[1]))
        else:
            stack.extend((node.right, node.left))  # type: ignore[union-attr]
    return list(dict.fromkeys(out))
