"""The one normal form of formulas: order, grouping, negation, and terms the dataset's relations make redundant."""
from __future__ import annotations

import itertools

import pytest
import torch

from labelers.formulas import (
    And,
    ConceptRelations,
    Leaf,
    Not,
    Or,
    canonical,
    canonical_text,
    flat_text,
    formula_atoms,
    formula_key,
    parse,
    parse_text,
)


def test_order_grouping_and_repeats_give_one_spelling():
    assert canonical_text("(purple AND circle)") == canonical_text("(circle AND purple)") == "(circle AND purple)"
    assert canonical_text("((b OR c) OR a)") == canonical_text("(a OR (c OR b))") == "(a OR b OR c)"
    assert canonical_text("((ring AND star) AND sand)") == canonical_text("((sand AND ring) AND star)")
    assert canonical_text("(a AND a)") == "a"
    assert canonical_text("((NOT solid) AND striped)") == canonical_text("(striped AND (NOT solid))")
    # negation pushed to the concepts
    assert canonical_text("(NOT (a OR (b AND c)))") == "((NOT a) AND ((NOT b) OR (NOT c)))"
    assert canonical_text("(NOT (NOT a))") == "a"
    # AND and OR are not merged with each other
    assert canonical_text("((a AND b) OR c)") != canonical_text("(a AND (b OR c))")


def test_canonical_form_is_logically_equal_and_idempotent():
    g = torch.Generator().manual_seed(0)
    atoms = torch.rand((4, 64), generator=g) < 0.5
    names = ["a", "b", "c", "d"]
    leaves = [Leaf(i) for i in range(4)]
    forms = [And(Or(leaves[0], Not(leaves[1])), Not(Or(leaves[2], leaves[0]))),
             Or(Or(leaves[3], leaves[1]), And(leaves[1], Not(leaves[3]))),
             Not(And(Or(leaves[0], leaves[1]), leaves[2]))]
    for f in forms:
        c = canonical(f, names)
        assert torch.equal(c.evaluate(atoms), f.evaluate(atoms))
        text = flat_text(c, names)
        assert canonical_text(text, names) == text
        assert torch.equal(parse(text, names).evaluate(atoms), f.evaluate(atoms))


def test_relations_from_data_remove_redundant_terms_without_changing_the_mask():
    # solid and striped never co-occur (one texture per object); every dog is an animal
    names = ["solid", "striped", "red", "dog", "animal"]
    g = torch.Generator().manual_seed(1)
    obj = torch.rand(400, generator=g) < 0.6
    striped = obj & (torch.rand(400, generator=g) < 0.5)
    solid = obj & ~striped
    red = torch.rand(400, generator=g) < 0.3
    animal = torch.rand(400, generator=g) < 0.5
    dog = animal & (torch.rand(400, generator=g) < 0.5)
    x = torch.stack([solid, striped, red, dog, animal]).float()
    rel = ConceptRelations.from_cooccurrence(x @ x.T)
    assert (0, 1) in rel.exclusive and (1, 0) in rel.exclusive and (3, 4) in rel.implies
    cases = {
        "(striped AND (NOT solid))": "striped",
        "((NOT solid) AND (red OR striped))": "((NOT solid) AND (red OR striped))",  # red may be solid
        "(dog AND animal)": "dog",
        "(dog OR animal)": "animal",
        "((NOT animal) AND (NOT dog))": "(NOT animal)",
        "((striped OR red) AND (NOT solid) AND dog)": "(dog AND (NOT solid) AND (red OR striped))",
        "((dog AND striped) OR (animal AND striped))": "(animal AND striped)",
    }
    for text, want in cases.items():
        got = canonical_text(text, names, rel)
        assert got == want, (text, got)
        assert torch.equal(parse(got, names).evaluate(x.bool()), parse(text, names).evaluate(x.bool())), text


def test_formula_atoms_and_names_free_parsing():
    assert formula_atoms("((water OR sea) AND (NOT boat))") == [("boat", True), ("sea", False), ("water", False)]
    assert formula_atoms("hot dog") == [("hot dog", False)]
    assert formula_atoms("(NOT (a OR b))") == [("a", True), ("b", True)]
    assert formula_atoms("(a AND (NOT a))") == [("a", False), ("a", True)]
    # one-letter and multi-word names
    f, names = parse_text("((b AND c) OR traffic light)")
    assert names == ["b", "c", "traffic light"] and f == Or(And(Leaf(0), Leaf(1)), Leaf(2))
    with pytest.raises(ValueError):
        formula_atoms("(a AND")


def test_formula_key_merges_exactly_the_structural_equals():
    a, b, c = Leaf(0), Leaf(1), Leaf(12)
    same = [Or(Or(a, b), c), Or(a, Or(c, b)), Or(c, Or(b, a))]
    assert len({formula_key(f) for f in same}) == 1
    assert formula_key(And(a, Not(b))) != formula_key(And(b, Not(a)))
    assert formula_key(And(a, b)) != formula_key(Or(a, b))
    keys = {formula_key(And(Or(x, y), Not(z))) for x, y, z in itertools.permutations([a, b, c])}
    assert len(keys) == 3  # which concept is negated matters, the order of the OR does not
