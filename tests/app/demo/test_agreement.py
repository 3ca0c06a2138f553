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


def test_concept_areas_are_each_concepts_share_of_the_image(tmp_path):
    import json

    import numpy as np

    from app.demo.agreement import _concept_areas
    from app.demo.shapes import generate_shapes_dataset
    from app.project.store import Project
    from app.workspace import add_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", n_images=12, seed=3)
    with Project.create(tmp_path / "p.nstudio") as p:
        add_dataset(p, data, name="shapes")
        ds = p.dataset("shapes")
        words = list(dict.fromkeys(c["name"] for c in p.concepts(ds["id"])))
        areas = _concept_areas(p, ds["id"], words)
    coco = json.loads((data / "annotations" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    row = {im["id"]: i for i, im in enumerate(coco["images"])}
    want = np.zeros_like(areas)
    for a in coco["annotations"]:  # the demo's images are 64 x 64: the masks are read at their own size
        want[row[a["image_id"]], words.index(names[a["category_id"]])] += a["area"] / 64**2
    assert areas.shape == (12, len(words)) and np.allclose(areas, want, atol=1e-6)
    assert (areas.sum(1) > 1).all()  # an object's pixels carry its shape, colour, texture and position
