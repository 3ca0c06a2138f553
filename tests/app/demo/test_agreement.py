"""Which descriptions name a demo concept: its name, plural or a synonym the demo's captions use, as whole words."""
import pytest

from app.demo.agreement import names_concept


@pytest.mark.parametrize("text,concept,named", [
    ("red circles", "circle", True),
    ("crosses on the left", "cross", True),
    ("spotted squares", "dotted", True),
    ("a checked star", "checkered", True),
    ("waves", "water", True),
    ("red squares", "circle", False),
    ("circled", "circle", False),  # whole words only
    ("reddish", "red", False),
])
def test_names_concept(text, concept, named):
    assert names_concept(text, concept) is named
