"""The demo end to end, small: every layer it extracts gets units and labels from every method it can run."""
from app.demo.pipeline import DemoJob, format_summary
from app.jobs import JobProgress
from app.project.store import Project


def test_small_demo_builds_a_labeled_project(tmp_path):
    tiny_language = {"steps": 2, "hidden": 32, "layers": 1, "image_size": 32, "batch_size": 16}
    job = DemoJob(tmp_path / "demo", n_images=120, epochs=1, device="cpu", language_options=tiny_language)
    summary = job.execute(JobProgress())
    names = [layer["layer"] for layer in summary.layers]
    assert names == ["block1", "block2", "block3", "block4", "fc"]
    for layer in summary.layers:
        # the IoU methods mean little on the 1x1 classifier: skipped there, with the reason
        iou = {"netdissect", "compexp"} if layer["layer"] != "fc" else set()
        assert set(layer["methods"]) >= iou | {"invert", "textsum", "clip_dissect"}, layer
        assert layer["methods"]["invert"]["units"] == layer["units"]
        # CLIP-Dissect runs with the demo's own dual encoder, on the dataset's concepts
        assert layer["methods"]["clip_dissect"]["units"] == layer["units"]
    assert "1x1" in summary.skipped_methods["compexp on fc"] and "netdissect on fc" in summary.skipped_methods
    assert "clip_dissect" not in summary.skipped_methods
    assert set(summary.language) == {"clip", "captioner", "lm"}
    assert all(m["heldout"] for m in summary.language.values())
    assert summary.clip_agreement["detectors"] >= 0
    text = format_summary(summary)
    assert "layer block4 (" in text and "netdissect" in text
    with Project.open(summary.project) as p:
        assert p.integrity_check() == "ok"
        assert {r.status for r in p.runs()} == {"done"}
    # a second run finds everything done and changes nothing
    again = DemoJob(tmp_path / "demo", n_images=120, epochs=1, device="cpu",
                    language_options=tiny_language).execute(JobProgress())
    assert again.layers == summary.layers
