"""The demo end to end, small: every layer it extracts gets units and labels from every method it can run."""
from app.demo.pipeline import DemoJob, format_summary
from app.jobs import JobProgress
from app.project.store import Project


def test_small_demo_builds_a_labeled_project(tmp_path):
    job = DemoJob(tmp_path / "demo", n_images=120, epochs=1, device="cpu")
    summary = job.execute(JobProgress())
    names = [layer["layer"] for layer in summary.layers]
    assert names == ["block1", "block2", "block3", "block4", "fc"]
    for layer in summary.layers:
        # the IoU methods mean little on the 1x1 classifier: skipped there, with the reason
        iou = {"netdissect", "compexp"} if layer["layer"] != "fc" else set()
        assert set(layer["methods"]) == iou | {"invert", "textsum"}, layer
        assert layer["methods"]["invert"]["units"] == layer["units"]
    assert "1x1" in summary.skipped_methods["compexp on fc"] and "netdissect on fc" in summary.skipped_methods
    assert "clip_dissect" in summary.skipped_methods and "--clip" in summary.skipped_methods["clip_dissect"]
    text = format_summary(summary)
    assert "layer block4 (" in text and "netdissect" in text
    with Project.open(summary.project) as p:
        assert p.integrity_check() == "ok"
        assert {r.status for r in p.runs()} == {"done"}
    # a second run finds everything done and changes nothing
    again = DemoJob(tmp_path / "demo", n_images=120, epochs=1, device="cpu").execute(JobProgress())
    assert again.layers == summary.layers
