"""Window fixes that misled users: word search that respects negation, p-value formatting, and more."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from app.ui.data import MethodColumn, UnitTable  # noqa: E402


def _table(labels: list[str], names: list[str] | None = None) -> UnitTable:
    n = len(labels)
    names = names or [""] * n
    col = MethodColumn("compexp", 1, labels, np.ones(n), np.full(n, np.nan), [""] * n, np.ones(n, bool),
                       np.ones(n, bool), False, "", "")
    hay = [f"{nm} | {t}" for nm, t in zip(names, labels)]
    return UnitTable(1, "layer", np.arange(n), np.arange(n) + 10, names, [col], hay)


def test_search_matches_words_and_respects_negation():
    t = _table(["star", "(circle AND NOT star)", "stars", "starfish", "NOT (star OR moon)", "red star"],
               ["", "", "", "", "", "Sky Watcher"])
    hits = lambda q: list(np.flatnonzero(t.matching(q)))  # noqa: E731
    assert hits("star") == [0, 2, 5]  # not the negated atoms, not 'starfish'
    assert hits("stars") == [0, 2, 5]  # plural and singular are one word
    assert hits("NOT star") == [1, 4] and hits("-star") == [1, 4]
    assert hits("circle NOT star") == [1]
    assert hits("moon") == [] and hits("not moon") == [4]
    assert hits("sky watcher") == [5] and hits("red star") == [5]
    assert hits("sta") == []


def test_p_values_read_as_floors_not_subnormal_digits():
    from app.formatting import format_p

    assert format_p(3.5e-318) == "< 1e-300" and format_p(0.0) == "< 1e-300"
    assert format_p(2.345e-7) == "2.3e-7" and format_p(0.0123) == "0.012"
    assert format_p(0.5) == "0.500" and format_p(None) == "" and format_p(float("nan")) == ""
