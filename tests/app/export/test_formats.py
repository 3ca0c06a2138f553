from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from app.errors import JobError
from app.project.store import Project
from tests.app.export.conftest import export
from tests.app.export.helpers import H, W


def layer_arrays(study, layer: str = "conv") -> dict[str, np.ndarray]:
    with Project.open(study["path"]) as p:
        d = p.path / p.layer_stats(study[layer])["array_dir"]
    return {n: np.load(d / f"{n}.npy") for n in ("topk_index", "topk_scores", "topk_maps", "quantiles",
                                                 "pooled_max", "pooled_mean")}


def expected_region(study, unit: int, rank: int, quantile_row: int = 0) -> np.ndarray:
    """The region computed directly with torch: the map upsampled to the 32 x 32 crop and thresholded; the crop
    sits at columns 4..35 of the 40 x 32 image."""
    a = layer_arrays(study)
    m = torch.from_numpy(a["topk_maps"][unit, rank].astype(np.float32))[None, None]
    up = F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros((H, W), bool)
    out[:, 4:36] = up > a["quantiles"][quantile_row, unit]
    return out


def test_concepts_folder(study, tmp_path):
    out = tmp_path / "sets"
    rep = export(study["path"], "concepts", out, margin="0")
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert sorted(m["file_name"] for m in meta) == pngs and len(pngs) == rep.summary["files"] > 0
    for m in meta:
        with Image.open(out / m["file_name"]) as im:
            x0, y0, x1, y1 = m["bbox"]
            assert im.size == (x1 - x0, y1 - y0) and 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    # the top exemplar of conv unit 0 (image 8) is labeled "red" by netdissect and named by alice and bob
    red = [m for m in meta if m["concept"] == "red" and m["layer"] == "conv"]
    assert len(red) == 1 and red[0]["image"] == "img/008.png" and red[0]["units"] == [0]
    assert red[0]["methods"] == ["netdissect"] and red[0]["label_scores"] == {"netdissect": 0.3}
    mask = expected_region(study, 0, 0)
    ys, xs = np.nonzero(mask)
    assert red[0]["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert red[0]["region_pixels"] == int(mask.sum())
    blob = [m for m in meta if m["concept"] == "red blob"]
    assert blob and all(m["annotators"] == ["alice", "bob"] for m in blob)  # "Red  Blob" is the same concept
    with Image.open(out / red[0]["file_name"]) as im, Image.open(study["images"] / "img/008.png") as src:
        assert np.array_equal(np.asarray(im), np.asarray(src.convert("RGB").crop(tuple(red[0]["bbox"]))))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "task_categories" in card
    for folder in {m["file_name"].split("/")[0] for m in meta}:
        assert f"| {folder} |" in card
    # a quantile the extraction did not compute is refused, naming the ones it did
    with pytest.raises(JobError, match="without the 0.5 quantile"):
        export(study["path"], "concepts", tmp_path / "q", quantile="0.5")
    assert not (tmp_path / "q").exists()


def test_concepts_whole_images_and_masked(study, tmp_path):
    out = tmp_path / "images"
    export(study["path"], "concepts", out, images="image", sources="names")
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert {m["concept"] for m in meta} == {"red blob"} and len(meta) == 5  # unit 0's five exemplars
    for m in meta:
        assert (out / m["file_name"]).read_bytes() == (study["images"] / m["image"]).read_bytes()
    out2 = tmp_path / "masked"
    export(study["path"], "concepts", out2, images="masked", sources="groups")
    meta2 = [json.loads(x) for x in (out2 / "metadata.jsonl").read_text().splitlines()]
    assert {m["concept"] for m in meta2} <= {"stripes"}
    for m in meta2:
        with Image.open(out2 / m["file_name"]) as im, Image.open(m["image_path"]) as src:
            assert im.size == src.size
            got, orig = np.asarray(im, np.int32), np.asarray(src.convert("RGB"), np.int32)
            assert np.array_equal(got[0, 0], (orig[0, 0] * 0.25).astype(np.int32))  # outside the region: dimmed


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own use of numpy 2
def test_coco_file_loads_and_holds_the_regions(study, tmp_path):
    out = tmp_path / "regions.json"
    rep = export(study["path"], "coco", out)
    coco = COCO(str(out))
    sets = tmp_path / "sets"
    rep_sets = export(study["path"], "concepts", sets)
    meta = [json.loads(x) for x in (sets / "metadata.jsonl").read_text().splitlines()]
    assert len(coco.getAnnIds()) == rep.summary["annotations"] == rep_sets.summary["files"] == len(meta)
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {m["concept"] for m in meta}
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img["width"], img["height"]) == (W, H)  # also for images whose size the project did not record
    red = coco.getCatIds(catNms=["red"])
    img8 = next(i["id"] for i in coco.loadImgs(coco.getImgIds()) if i["file_name"] == "img/008.png")
    ann = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img8], catIds=red)) if a["layer"] == "conv"][0]
    assert ann["unit"] == 0 and ann["methods"] == ["netdissect"]
    assert np.array_equal(coco.annToMask(ann).astype(bool), expected_region(study, 0, 0))
    assert ann["area"] == float(expected_region(study, 0, 0).sum())
    assert json.loads(out.read_text())["info"]["image_root"] == str(study["images"])
    assert mask_utils.decode(ann["segmentation"]).shape == (H, W)


def test_activations_folder(study, tmp_path):
    out = tmp_path / "acts"
    export(study["path"], "activations", out)
    a = layer_arrays(study)
    np.testing.assert_array_equal(np.load(out / "conv.npy"), a["pooled_max"])
    with open(out / "images.csv", newline="") as fh:
        images = list(csv.DictReader(fh))
    assert [r["key"] for r in images] == [f"img/{i:03d}.png" for i in range(10)]
    with open(out / "units.csv", newline="") as fh:
        units = list(csv.DictReader(fh))
    assert len(units) == 7 and {r["layer"] for r in units} == {"conv", "fc"}
    table = pq.read_table(out / "conv.parquet")
    assert table.column_names == ["image_index", "image", "u0", "u1", "u2", "u3"] and table.num_rows == 10
    np.testing.assert_array_equal(np.stack([table.column(f"u{j}").to_numpy() for j in range(4)], 1), a["pooled_max"])
    export(study["path"], "activations", out, pooling="mean", layers="conv", parquet="false")
    np.testing.assert_array_equal(np.load(out / "conv.npy"), a["pooled_mean"])
    assert not (out / "fc.npy").exists() and not (out / "conv.parquet").exists()


def test_other_tools_files(study, tmp_path):
    export(study["path"], "netdissect-tally", tmp_path / "tally.csv")
    with open(tmp_path / "tally.csv", newline="") as fh:
        tally = list(csv.DictReader(fh))
    assert list(tally[0])[:4] == ["unit", "category", "label", "score"]
    assert [r["unit"] for r in tally] == ["1", "2", "3", "4"]  # 1-based, best score first
    assert [float(r["score"]) for r in tally] == sorted((float(r["score"]) for r in tally), reverse=True)
    with Project.open(study["path"]) as p:
        d = p.path / p.layer_stats(study["conv"])["array_dir"]
    concept_area, unit_area = np.load(d / "mask_concept_area.npy"), np.load(d / "mask_unit_area.npy")
    first = tally[0]  # unit 0: red (color, concept 0), square (object, concept 2)
    assert first["label"] == "red" and float(first["color-truth"]) == concept_area[0]
    assert float(first["color-activation"]) == unit_area[0, 0] and float(first["object-truth"]) == concept_area[2]
    assert first["object-label"] == "square" and float(first["object-iou"]) == 0.15

    export(study["path"], "clip-dissect-csv", tmp_path / "clip.csv")
    with open(tmp_path / "clip.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [["layer", "unit", "description", "similarity"], ["fc", "0", "stripes", "1.25"],
                    ["fc", "1", "red", "0.5"], ["fc", "2", "sky, blue", "-0.25"]]
    export(study["path"], "invert-csv", tmp_path / "invert.csv", max_rank="2")
    with open(tmp_path / "invert.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["neuron", "concept", "concept_id", "metric"]
    assert ["0", "(red OR blue)", "(0 OR 1)", "0.9"] in rows and ["0", "NOT blue", "(NOT 1)", "0.7"] in rows
    with pytest.raises(JobError, match="no compexp labels"):
        export(study["path"], "invert-csv", tmp_path / "x.csv", method="compexp")


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.units = 0
        self.images: list[str] = []
        self.links: list[str] = []
        self.svgs = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article" and a.get("class") == "unit":
            self.units += 1
        if tag == "img":
            self.images.append(a["src"])
        if tag == "svg":
            self.svgs += 1
        for k in ("src", "href"):
            if k in a and tag != "img":
                self.links.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained(study, tmp_path):
    out = tmp_path / "report.html"
    rep = export(study["path"], "html", out, thumb="48", compare="off")
    page = PageParser()
    page.feed(out.read_text(encoding="utf-8"))
    page.close()
    assert page.units == 7 == rep.summary["units"]
    assert len(page.images) == 35 == rep.summary["pictures"]  # 5 exemplars of 7 units
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.size == (48, 48)
    assert all(link.startswith("#") for link in page.links)  # nothing to fetch from elsewhere
    assert page.svgs >= 4
    text = " ".join(page.text)
    for expected in ("(red OR blue)", "sky, blue", "red blob", "Red  Blob", "blue squares", "stripes", "alice",
                     "netdissect", "invert", "clip_dissect"):
        assert expected in text
    export(study["path"], "html", out, units="annotated", layers="conv", exemplars="0", compare="exact")
    page = PageParser()
    page.feed(out.read_text(encoding="utf-8"))
    assert page.units == 4 and page.images == []


def test_exports_cope_with_a_missing_image(study, tmp_path):
    (study["images"] / "img/008.png").unlink()
    rep = export(study["path"], "html", tmp_path / "r.html", compare="off")
    assert rep.summary["missing_images"] == 1 and "missing" in (tmp_path / "r.html").read_text()
    rep = export(study["path"], "concepts", tmp_path / "sets")
    assert rep.summary["missing_images"] == 1
    meta = [json.loads(x) for x in (tmp_path / "sets" / "metadata.jsonl").read_text().splitlines()]
    assert "img/008.png" not in {m["image"] for m in meta}
    assert "could not be read" in (tmp_path / "sets" / "README.md").read_text()


def test_layer_names_are_checked(study, tmp_path):
    with pytest.raises(JobError, match="no layer named 'layer9'"):
        export(study["path"], "activations", tmp_path / "a", layers="layer9")
    with pytest.raises(JobError, match="layer fc has no netdissect labels"):
        export(study["path"], "netdissect-tally", tmp_path / "t.csv", layer="fc")
    assert not any(Path(tmp_path).glob("t.csv"))


def test_milan_csv_is_layer_unit_description(study, tmp_path):
    export(study["path"], "milan-csv", tmp_path / "milan.csv")
    with open(tmp_path / "milan.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    # each unit's best description, 0-based units; quotes and commas survive the CSV
    assert rows == [["layer", "unit", "description"], ["conv", "0", "red squares"], ["conv", "2", 'blue "things"']]
    with pytest.raises(JobError, match="no milan descriptions"):
        export(study["path"], "milan-csv", tmp_path / "x.csv", layers="fc")


def test_html_report_shows_milan_candidates_with_their_scores(study, tmp_path):
    out = tmp_path / "report.html"
    export(study["path"], "html", out, max_rank="1", exemplars="0")
    page = PageParser()
    page.feed(out.read_text(encoding="utf-8"))
    text = " ".join(page.text)
    # the second candidate shows although max_rank is 1, with what its wpmi is made of
    assert "red squares" in text and "red, left" in text and 'blue "things"' in text
    assert "log p(d|E) -3" in text and "log p(d) -5" in text and "log p(d|E) -3.5" in text
    assert "NOT blue" not in text  # other methods still keep to max_rank
