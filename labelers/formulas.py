"""Logical formulas over concepts, shared by compositional explanations and INVERT.

A formula is an immutable tree: a leaf is a concept index, inner nodes are NOT, AND, OR. Text follows the
compexp convention, e.g. ``((water OR sea) AND (NOT boat))``; ``parse`` reads that text back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

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


_TOKEN = re.compile(r"\s*(\(|\)|AND NOT\b|AND\b|OR\b|NOT\b|[^()\s](?:[^()]*?[^()\s])?(?=\s+(?:AND|OR)\b|\s*\)|\s*$))")


def parse(text: str, names: list[str]) -> Formula:
    """Inverse of `to_text` for names that contain no parentheses and no bare AND/OR/NOT words."""
    index = {n: i for i, n in enumerate(names)}
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"cannot read formula {text!r} at position {pos}")
        tokens.append(m.group(1))
        pos = m.end()

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
