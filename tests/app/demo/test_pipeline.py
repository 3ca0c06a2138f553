"""The demo end to end, small: named steps, each timed and reported as step k of n; every layer it extracts gets
units and labels from every method it can run; a second run finds every step done."""
from app.demo.pipeline import DEMO_LAYERS, DemoJob, demo_steps, format_summary
from app.jobs import JobProgress
from app.project.store import Project

# A lighter compositional search than the paper's (beam 5, length 3): the pipeline is under test here, the method in
# tests/labelers.
LIGHT = {"compexp": {"beam_size": 2, "max_length": 2}, "milan": {"k": 3, "beam": 3, "max_length": 4},
         "texplain": {"sentences": 2, "images_per_class": 3, "max_tokens": 8},
         "audit": {"exact_only": True}}
TINY_LANGUAGE = {"steps": 2, "hidden": 32, "layers": 1, "image_size": 32, "batch_size": 16}
TINY_TRANSLATOR = {"steps": 3, "batch_size": 16}


def test_small_demo_builds_a_labeled_project(tmp_path):
    infos = []
    progress = JobProgress(min_interval=0.0)
    progress.listeners.append(infos.append)
    job = DemoJob(tmp_path / "demo", n_images=60, epochs=1, device="cpu", params=LIGHT, language_options=TINY_LANGUAGE,
                  translator_options=TINY_TRANSLATOR)
    summary = job.execute(progress)

    names = [layer["layer"] for layer in summary.layers]
    assert names == ["block1", "block2", "block3", "block4", "fc"] == list(DEMO_LAYERS)
    for layer in summary.layers:
        # the IoU methods mean little on the 1x1 classifier: skipped there, with the reason
        iou = {"netdissect", "compexp"} if layer["layer"] != "fc" else set()
        assert set(layer["methods"]) >= iou | {"invert", "textsum", "clip_dissect"}, layer
        assert layer["methods"]["invert"]["units"] == layer["units"]
        # CLIP-Dissect runs with the demo's own dual encoder, on the dataset's concepts
        assert layer["methods"]["clip_dissect"]["units"] == layer["units"]
        if layer["layer"] in ("block3", "block4", "fc"):  # MILAN describes these with the demo's captioner and LM
            assert layer["methods"]["milan"]["units"] == layer["units"]
    assert "1x1" in summary.skipped_methods["compexp on fc"] and "netdissect on fc" in summary.skipped_methods
    assert "clip_dissect" not in summary.skipped_methods
    assert set(summary.language) == {"clip", "captioner", "lm"}
    assert all(m["heldout"] for m in summary.language.values())
    assert summary.clip_agreement["detectors"] >= 0
    # beside the agreement: the most frequent label for every unit, and the method with the true image labels
    cb = summary.clip_baselines
    assert cb["detectors"] == summary.clip_agreement["detectors"] and 0 <= cb["ceiling"] <= cb["detectors"]
    assert 0 <= cb["most_frequent"] <= cb["detectors"]
    assert 0 <= cb["ceiling_area"] <= cb["detectors"]  # the demo's dataset has masks
    mg = summary.milan_agreement
    assert mg["units_described"] == sum(layer["methods"]["milan"]["units"] for layer in summary.layers
                                        if "milan" in layer["methods"])
    assert 0 <= mg["agree"] <= mg["detectors"] and 0 <= mg["most_frequent"] <= mg["detectors"]
    assert sum(v["detectors"] for v in mg["concepts"].values()) == mg["detectors"]
    assert sum(v["agree"] for v in mg["concepts"].values()) == mg["agree"]
    # TExplain: a translator on the demo's own LM, words per class on the classifier layer, the own-word figure
    tx = summary.texplain
    assert tx["layer"] == "fc" and tx["classes"] and 0.0 <= tx["fraction"] <= 1.0
    assert set(tx["own_word"]) <= set(tx["classes"]) and tx["sentences_per_image"] == 2
    assert "texplain on block4" not in {s.name for s in demo_steps()}  # per class only, on fc

    # every step ran once, in order, reported as "step k of n" with its own name; its time is in the summary
    steps = demo_steps()
    assert [s.name for s in summary.steps] == [s.name for s in steps]
    assert summary.steps[1].outcome == "done (trained here)"  # 60 images: not the shipped weights' dataset
    assert all(s.seconds >= 0 for s in summary.steps) and summary.seconds >= sum(s.seconds for s in summary.steps)
    starts = [i for i in infos if i.message == "starting"]
    assert [(i.step, i.steps, i.stage) for i in starts] == [(k, len(steps), s.name) for k, s in enumerate(steps, 1)]
    assert "compexp on block3" in {s.name for s in steps}
    extract = [i for i in infos if i.stage.startswith("extract ") and i.total]
    assert extract and all(i.heading.startswith("step 4 of ") for i in extract)
    assert any("pass 1" in i.stage for i in extract)  # the extraction's own stages, under the step's name

    # the audit: two labelled test sets in the project, the glyph query on block4 (found or said why not)
    assert summary.audit["layer"] == "block4" and summary.audit["query"] == "glyph"
    if summary.audit["units"]:
        for name in ("shapes-clean", "shapes-shifted"):
            r = summary.audit[name]
            assert r["units"] == summary.audit["units"] and len(r["control"]) == 10 and r["images"] == 6
    else:
        assert "no unit of block4" in summary.audit["skipped"]
    with Project.open(summary.project) as p:
        assert [d["name"] for d in p.datasets()] == ["shapes", "shapes-clean", "shapes-shifted"]
        assert p.dataset("shapes-shifted")["num_images"] == 6

    text = format_summary(summary)
    assert "audit: `find glyph` on block4" in text
    assert "layer block4 (" in text and "netdissect" in text
    assert "own shape word is among its top 10 words" in text and "spurious-cue report" in text
    assert f"time per step ({len(steps)} steps" in text and "compexp on block3" in text
    with Project.open(summary.project) as p:
        assert p.integrity_check() == "ok"
        assert {r.status for r in p.runs()} == {"done"}
        n_runs = len(p.runs())

    # a second run finds everything done and changes nothing
    again = DemoJob(tmp_path / "demo", n_images=60, epochs=1, device="cpu", params=LIGHT,
                    language_options=TINY_LANGUAGE, translator_options=TINY_TRANSLATOR).execute(JobProgress())
    assert again.layers == summary.layers
    assert all(s.outcome.startswith(("already done", "skipped")) for s in again.steps if s.name != summary.steps[3].name)
    with Project.open(summary.project) as p:
        assert len(p.runs()) == n_runs

    # the window's way: one step per job
    one = DemoJob(tmp_path / "demo", n_images=60, epochs=1, device="cpu", only=["textsum on fc"], params=LIGHT)
    assert one.title == "textsum on fc"
    assert [s.name for s in one.execute(JobProgress()).steps] == ["textsum on fc"]
    setup = DemoJob(tmp_path / "demo", n_images=60, epochs=1, device="cpu", setup_only=True)
    assert [s.name for s in setup.execute(JobProgress()).steps] == [s.name for s in steps if s.setup]
