"""Pools, board operations (one transaction each), suggestions, unit annotations and the study's numbers, on a
project built directly with the store (see naming_helpers), plus a kill -9 in the middle of an edit."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import imaging, naming
from app.engine.results import LayerResults
from app.errors import JobError, ProjectError
from app.project import naming as naming_store
from app.project.store import Project
from app.sources.datasets import load_rgb
from tests.app.naming_helpers import LAYER, PREPROCESS, SIZE, TOPK, UNITS, build_project, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("naming"))


@pytest.fixture
def project(built, tmp_path):
    # Each test edits its own copy of the built project.
    import shutil

    dst = tmp_path / "proj.nstudio"
    shutil.copytree(built["project"], dst)
    p = Project.open(dst)
    yield p
    p.close()


def _model_acts(model, paths):
    t = model.preprocess.transform()
    x = torch.stack([t(Image.open(p).convert("RGB")) for p in paths])
    out = {}
    h = model.module.act2.register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
    with torch.no_grad():
        logits = model.module(x)
    h.remove()
    return out["a"], logits


def test_unit_pool_holds_the_top_exemplars_with_their_maps_and_features(project, built):
    pool = naming.pool_info(project, built["pool_id"])
    assert (pool.kind, pool.layer, pool.size) == ("unit", LAYER, UNITS * TOPK)
    res = LayerResults.load(project, built["layer_id"])
    maps = naming.pool_maps(project, pool.id)
    arr = naming.PoolArrays.open(project.path, pool)
    assert [m.position for m in maps] == list(range(UNITS * TOPK))
    # every (unit, rank) once; shuffled, so the pool does not list a unit's maps side by side
    seen = {(m.unit, m.image_index) for m in maps}
    assert seen == {(u, int(res.topk_index[u, r])) for u in range(UNITS) for r in range(TOPK)}
    assert [m.unit for m in maps] != sorted(m.unit for m in maps)
    thr = res.threshold(0.99)
    for m in maps:
        r = list(res.topk_index[m.unit]).index(m.image_index)
        np.testing.assert_array_equal(arr.maps[m.position], res.topk_maps[m.unit, r])
        assert m.score == pytest.approx(float(res.topk_scores[m.unit, r]))
        assert arr.thresholds[m.position] == pytest.approx(thr[m.unit])
    # the features of one map, by hand: the layer's vector averaged over the map's thresholded region
    m = max(maps, key=lambda m: m.score)
    acts, _ = _model_acts(tiny_model(), [Path(built["project"]).parent / "images" / m.image_key])
    a = acts[0].numpy()
    amap = np.asarray(arr.maps[m.position], dtype=np.float32)
    t = float(arr.thresholds[m.position])
    region = amap > t if t <= 0 else amap >= t
    assert region.any()
    np.testing.assert_allclose(arr.features[m.position], a[:, region].mean(axis=1), rtol=1e-3, atol=1e-5)


def test_decision_pool_contribution_is_class_weight_times_pooled_activation(project, built):
    model = tiny_model()
    pid = naming.build_pool(project, naming.PoolSpec(kind="decision", layer=LAYER, images=[0, 1, 2, 5],
                                                     per_image=3, shuffle=False, device="cpu"), model=model)
    pool = naming.pool_info(project, pid)
    assert pool.kind == "decision" and pool.params["images"] == [0, 1, 2, 5]
    keys = project.image_keys(built["dataset_id"])
    root = Path(built["project"]).parent / "images"
    acts, logits = _model_acts(model, [root / keys[i] for i in (0, 1, 2, 5)])
    pred = logits.argmax(1)
    w = model.module.fc.weight
    # For a linear head after global average pooling: gradient x activation summed = w[c, u] * mean(A_u)
    expected = (w[pred] * acts.mean(dim=(2, 3))).numpy()  # [4, U]
    maps = naming.pool_maps(project, pid)
    arr = naming.PoolArrays.open(project.path, pool)
    row_of = {0: 0, 1: 1, 2: 2, 5: 3}
    by_image: dict[int, list] = {}
    for m in maps:
        by_image.setdefault(m.image_index, []).append(m)
        assert m.score == pytest.approx(expected[row_of[m.image_index], m.unit], rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(arr.maps[m.position], acts[row_of[m.image_index], m.unit].numpy(), rtol=1e-2,
                                   atol=1e-3)
    for img, ms in by_image.items():
        e = expected[row_of[img]]
        want = [int(u) for u in np.argsort(-e)[:3] if e[u] > 0]
        assert [m.unit for m in sorted(ms, key=lambda m: -m.score)] == want
        assert pool.params["predictions"][str(img)]["class"] == int(pred[row_of[img]])
    assert arr.features is not None and arr.features.shape == (len(maps), UNITS)


def test_gradient_x_activation_before_an_in_place_relu():
    # conv2 feeds ReLU(inplace=True): the hooked output must survive the in-place op, and gradient x activation
    # of the conv is w[c, u] * mean(relu(conv_u)) (the ReLU's gradient masks the negative part).
    from app.sources.models import LayerInfo

    model = tiny_model()
    model.module.act2 = torch.nn.ReLU(inplace=True)
    info = LayerInfo(name="conv2", type="Conv2d", shape=(UNITS, SIZE // 2, SIZE // 2), kind="conv", units=UNITS,
                     grid=(SIZE // 2, SIZE // 2))
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    maps, gxa, logits = naming.gradient_x_activation(model, info, x)
    with torch.no_grad():
        conv = model.module.conv2(model.module.act1(model.module.conv1(x)))
    expected = model.module.fc.weight[logits.argmax(1)] * conv.clamp(min=0).mean(dim=(2, 3))
    torch.testing.assert_close(maps, conv)
    torch.testing.assert_close(gxa.sum(dim=(2, 3)), expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.module.parameters())


def test_pool_errors(project):
    with pytest.raises(JobError, match="units 0..5"):
        naming.build_pool(project, naming.PoolSpec(kind="unit", layer=LAYER, units=[9], features=False))
    with pytest.raises(JobError, match="outside the dataset"):
        naming.build_pool(project, naming.PoolSpec(kind="decision", layer=LAYER, images=[99]), model=tiny_model())
    with pytest.raises(JobError, match="'unit' or 'decision'"):
        naming.build_pool(project, naming.PoolSpec(kind="other", layer=LAYER))
    with pytest.raises(ProjectError, match="no pool"):
        naming.pool_info(project, 999)


def test_board_operations_and_their_undo(project, built):
    pid = built["pool_id"]
    ann = project.annotator("ann")
    state = naming.ensure_board(project, pid, ann)
    ids = state.unassigned
    assert len(ids) == UNITS * TOPK and state.unclear is not None and state.concepts == []
    unclear = state.unclear.id
    position = {m.id: m.position for m in state.maps}

    g1 = naming.create_group(project, pid, ann, "  red   squares ", ids[:4])
    g2 = naming.create_group(project, pid, ann, "discs", ids[4:7])
    s = naming.BoardState.load(project, pid, ann)
    assert [g.name for g in s.concepts] == ["red squares", "discs"]
    assert s.group(g1).members == sorted(ids[:4], key=position.get)
    assert s.unassigned == ids[7:]

    before = naming.BoardState.load(project, pid, ann).snapshot()
    prev = naming.move_maps(project, pid, ann, [ids[0], ids[8]], g2)
    assert prev == {ids[0]: g1, ids[8]: None}
    assert set(naming.BoardState.load(project, pid, ann).group(g2).members) == {ids[0], ids[8], *ids[4:7]}
    naming.assign_maps(project, pid, ann, prev)  # undo
    assert naming.BoardState.load(project, pid, ann).snapshot() == before

    gid, prev = naming.set_unclear(project, pid, ann, [ids[9], ids[1]])
    assert gid == unclear and prev == {ids[9]: None, ids[1]: g1}
    assert naming.BoardState.load(project, pid, ann).group(unclear).members == sorted([ids[9], ids[1]],
                                                                                     key=position.get)
    naming.assign_maps(project, pid, ann, prev)

    assert naming.rename_group(project, g1, "red") == "red squares"
    with pytest.raises(ProjectError, match="empty"):
        naming.rename_group(project, g1, "   ")

    before = naming.BoardState.load(project, pid, ann).snapshot()
    snaps = naming.merge_groups(project, g1, [g2])
    s = naming.BoardState.load(project, pid, ann)
    assert [g.id for g in s.concepts] == [g1] and len(s.group(g1).members) == 7
    naming.restore_groups(project, snaps)  # undo of the merge
    assert naming.BoardState.load(project, pid, ann).snapshot() == before

    g3 = naming.split_group(project, g1, ids[2:4], "small red")
    s = naming.BoardState.load(project, pid, ann)
    assert s.group(g3).members == sorted(ids[2:4], key=position.get) and len(s.group(g1).members) == 2
    with pytest.raises(ProjectError, match="only maps of the group"):
        naming.split_group(project, g1, [ids[5]], "x")
    naming.restore_groups(project, naming.merge_groups(project, g1, [g3]))  # merge back, then undo that merge
    naming.merge_groups(project, g1, [g3])
    assert naming.BoardState.load(project, pid, ann).snapshot() == before

    snap = naming.delete_group(project, g2)
    s = naming.BoardState.load(project, pid, ann)
    assert [g.id for g in s.concepts] == [g1] and set(ids[4:7]) <= set(s.unassigned)
    assert naming.restore_groups(project, [snap]) == [g2]  # same id back
    assert naming.BoardState.load(project, pid, ann).snapshot() == before

    with pytest.raises(ProjectError, match="cannot be merged"):
        naming.merge_groups(project, g1, [unclear])
    with pytest.raises(ProjectError, match="already has an unclear"):
        naming.create_group(project, pid, ann, "more unclear", unclear=True)


def test_a_failing_operation_changes_nothing(project, built, monkeypatch):
    pid = built["pool_id"]
    ann = project.annotator("ann")
    ids = naming.ensure_board(project, pid, ann).unassigned
    g1 = naming.create_group(project, pid, ann, "a", ids[:3])
    g2 = naming.create_group(project, pid, ann, "b", ids[3:5])
    before = naming.BoardState.load(project, pid, ann).snapshot()
    real_place = naming_store._place

    def place_then_fail(*args, **kwargs):
        real_place(*args, **kwargs)
        raise RuntimeError("power cut")

    monkeypatch.setattr(naming_store, "_place", place_then_fail)
    with pytest.raises(RuntimeError):
        naming.merge_groups(project, g1, [g2])
    with pytest.raises(RuntimeError):
        naming.create_group(project, pid, ann, "c", ids[5:7])
    monkeypatch.setattr(naming_store, "_place", real_place)
    assert naming.BoardState.load(project, pid, ann).snapshot() == before
    # a map of another pool, or a group of another board, is refused before anything is written
    other = project.annotator("bob")
    naming.ensure_board(project, pid, other)
    with pytest.raises(ProjectError, match="another board"):
        naming.move_maps(project, pid, other, ids[:1], g1)
    with pytest.raises(ProjectError, match="not in pool"):
        naming.move_maps(project, pid, ann, [10_000], g1)
    assert naming.BoardState.load(project, pid, ann).snapshot() == before


def test_two_annotators_are_kept_apart(project, built):
    pid = built["pool_id"]
    ann, bob = project.annotator("ann"), project.annotator("bob")
    ids = naming.ensure_board(project, pid, ann).unassigned
    naming.ensure_board(project, pid, bob)
    ga = naming.create_group(project, pid, ann, "red", ids[:5])
    gb = naming.create_group(project, pid, bob, "all of them", ids[:10])
    sa, sb = naming.BoardState.load(project, pid, ann), naming.BoardState.load(project, pid, bob)
    assert [g.name for g in sa.concepts] == ["red"] and [g.name for g in sb.concepts] == ["all of them"]
    assert sa.group(ga).members and len(sb.group(gb).members) == 10
    assert len(sa.unassigned) == UNITS * TOPK - 5 and len(sb.unassigned) == UNITS * TOPK - 10
    naming.delete_group(project, gb)
    assert naming.BoardState.load(project, pid, ann).snapshot() == sa.snapshot()
    # who made what, and when
    row = project.one("SELECT annotator_id, created_at FROM groups WHERE id=?", (ga,))
    assert row["annotator_id"] == ann and row["created_at"]
    assert {r["annotator_id"] for r in project.all("SELECT annotator_id FROM group_members WHERE group_id=?",
                                                   (ga,))} == {ann}


def _pool_with_features(project, built, units, features):
    n = len(units)
    return naming.write_pool(
        project, name="synthetic", kind="unit", layer_id=built["layer_id"], source_run_id=built["run_id"],
        dataset_id=built["dataset_id"], image_index=np.arange(n) % 12, unit=np.asarray(units),
        score=np.linspace(1, 0, n), maps=np.zeros((n, 4, 4), np.float16), thresholds=np.zeros(n, np.float32),
        features=np.asarray(features, np.float32))


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_suggestions_recover_clusters_and_write_nothing(project, built, method):
    rng = np.random.default_rng(0)
    centres = np.array([[5, 0, 0, 0, 0, 0], [0, 0, 5, 0, 0, 0], [0, 0, 0, 0, 5, 0]], float)
    truth = np.repeat([0, 1, 2], [6, 5, 4])
    feats = centres[truth] + rng.normal(0, 0.3, (15, 6))
    units = [0] * 6 + [1] * 5 + [2] * 4  # units 0, 2 are labeled "red", unit 1 "disc"
    pid = _pool_with_features(project, built, units, feats)
    ann = project.annotator("ann")
    state = naming.ensure_board(project, pid, ann)
    ids = [m.id for m in state.maps]
    naming.create_group(project, pid, ann, "done", [ids[0]])  # placed maps are not suggested again
    groups_before = project.all("SELECT * FROM groups")
    sugg = naming.suggest_groups(project, pid, ann, method=method)
    assert project.all("SELECT * FROM groups") == groups_before
    assert [len(s.map_ids) for s in sugg] == [5, 5, 4]
    got = sorted(sorted(ids.index(m) for m in s.map_ids) for s in sugg)
    assert got == [list(range(1, 6)), list(range(6, 11)), list(range(11, 15))]
    assert [s.name for s in sugg] == ["Suggestion 1", "Suggestion 2", "Suggestion 3"]
    assert {s.hint for s in sugg} == {"red", "disc"}
    assert all(0.9 < s.coherence <= 1.0 for s in sugg)
    fixed = naming.suggest_groups(project, pid, ann, n_groups=2, method=method)
    assert len(fixed) == 2 and sum(len(s.map_ids) for s in fixed) == 14
    # accepting one is creating a group with its members
    gid = naming.create_group(project, pid, ann, "accepted", sugg[0].map_ids)
    assert naming.BoardState.load(project, pid, ann).group(gid).members == sorted(sugg[0].map_ids)


def test_suggestions_need_features(project, built):
    pid = naming.build_pool(project, naming.PoolSpec(kind="unit", layer=LAYER, per_unit=2, features=False))
    ann = project.annotator("ann")
    with pytest.raises(JobError, match="no region features"):
        naming.suggest_groups(project, pid, ann)
    naming.compute_features(project, pid, device="cpu", model=tiny_model())
    assert naming.pool_info(project, pid).has_features
    assert naming.suggest_groups(project, pid, ann, n_groups=2)


def test_unit_names_and_descriptions(project, built):
    ann, bob = project.annotator("ann"), project.annotator("bob")
    unit = project.unit_ids(built["layer_id"])[3]
    assert naming.set_unit_name(project, ann, unit, "red edges") is None
    assert naming.set_unit_name(project, ann, unit, "red  corners") == "red edges"
    assert naming.unit_name(project, ann, unit) == "red corners"
    d1 = naming.add_description(project, ann, unit, "fires on the corners of red squares")
    d2 = naming.add_description(project, ann, unit, "and a little on orange")
    naming.add_description(project, bob, unit, "bob's view")
    assert [(a["kind"], a["text"]) for a in naming.unit_annotations(project, ann, unit)] == [
        ("name", "red corners"), ("description", "fires on the corners of red squares"),
        ("description", "and a little on orange")]
    assert naming.edit_description(project, d2, "and orange") == "and a little on orange"
    row = naming.delete_annotation(project, d1)
    assert len(naming.unit_annotations(project, ann, unit)) == 2
    assert naming.restore_annotation(project, row) == d1
    assert [a["id"] for a in naming.unit_annotations(project, ann, unit)][1:] == [d1, d2]
    assert naming.set_unit_name(project, ann, unit, "") == "red corners"
    assert naming.unit_name(project, ann, unit) is None
    assert [a["annotator"] for a in project.annotations(built["layer_id"])].count("bob") == 1
    with pytest.raises(ProjectError, match="empty"):
        naming.add_description(project, ann, unit, "  ")
    labels = naming.automatic_labels(project, built["layer_id"], unit=3)
    assert [(r["method"], r["label"]) for r in labels] == [("netdissect", "disc")]


def test_study_numbers_on_a_hand_made_board(project, built):
    # The boards of tests/labelers/test_agreement.py on an 8-map pool with units [0,0,0,1,1,2,2,3].
    units = [0, 0, 0, 1, 1, 2, 2, 3]
    pid = naming.write_pool(project, name="study", kind="unit", layer_id=built["layer_id"],
                            source_run_id=built["run_id"], dataset_id=built["dataset_id"], image_index=np.arange(8),
                            unit=np.asarray(units), score=np.ones(8), maps=np.zeros((8, 2, 2), np.float16),
                            thresholds=np.zeros(8, np.float32))
    ann, bob = project.annotator("ann"), project.annotator("bob")
    ids = [m.id for m in naming.pool_maps(project, pid)]
    naming.create_group(project, pid, ann, "dog", ids[0:3])
    naming.create_group(project, pid, ann, "wheel", ids[3:6])
    naming.set_unclear(project, pid, ann, [ids[6]])
    naming.create_group(project, pid, bob, "animal", ids[0:2])
    naming.create_group(project, pid, bob, "round", ids[2:5])
    naming.create_group(project, pid, bob, "stripes", ids[5:7])
    naming.set_unclear(project, pid, bob, [ids[7]])
    rep = naming.study_report(project, pid)
    assert rep.annotators == ["ann", "bob", "auto: netdissect"]
    assert [(a.annotator, a.adequacy) for a in rep.adequacy] == [("ann", 6 / 8), ("bob", 7 / 8)]
    assert rep.adjusted_rand[0, 1] == pytest.approx(8 / 57)
    assert rep.pairwise[0, 1] == pytest.approx(14 / 21)
    wheel = rep.correspondence["ann"].concepts[1]
    assert (wheel.name, wheel.units, wheel.counts) == ("wheel", [1, 2], [2, 1])
    assert wheel.effective_units == pytest.approx(1.8898815748423097)
    ab = rep.comparisons[0]
    assert [(m.a_name, m.b_name) for m in ab.matching.matches] == [("dog", "animal"), ("wheel", "round")]
    # automatic: units 0, 2 "red", 1, 3 "disc": maps grouped red {0,1,2,5,6}, disc {3,4,7}
    auto = naming.automatic_partitions(project, pid)[0]
    assert auto.names == ["disc", "red"] and auto.assignment.tolist() == [1, 1, 1, 0, 0, 1, 1, 0]
    assert len(rep.comparisons) == 3  # ann-bob, ann-auto, bob-auto


def test_pictures_of_maps(project, built):
    """The board draws its maps with the exporters' pictures (app.imaging, tested there); here: every mode renders
    a pool's map at the asked size, and 'region' keeps the pixels of the map's region."""
    pics = naming.MapPictures.for_pool(project, built["pool_id"])
    maps = naming.pool_maps(project, built["pool_id"])
    m = max(maps, key=lambda m: m.score)
    for mode in imaging.RENDER_MODES:
        im = pics.render(m.position, mode, 48)
        assert im.size == (48, 48) and im.mode == "RGB"
    region = np.asarray(pics.render(m.position, "region", SIZE), dtype=np.int64)
    view = np.asarray(imaging.model_view(load_rgb(pics.paths[m.position]), PREPROCESS, SIZE), dtype=np.int64)
    inside = imaging.region(imaging.upsample_map(np.asarray(pics.arrays.maps[m.position], np.float32), SIZE),
                            float(pics.arrays.thresholds[m.position]))
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(region[inside], view[inside])
    assert (region[~inside] <= view[~inside]).all() and (region[~inside] < view[~inside]).any()


KILLED = textwrap.dedent("""
    import json, sys, time
    from app import naming
    from app.project import naming as naming_store
    from app.project.store import Project

    p = Project.open(sys.argv[1])
    pid = int(sys.argv[2])
    a = p.annotator("killed")
    ids = naming.ensure_board(p, pid, a).unassigned
    g1 = naming.create_group(p, pid, a, "red things", ids[:3])
    naming.rename_group(p, g1, "red squares")
    g2 = naming.create_group(p, pid, a, "discs", ids[3:6])
    naming.set_unclear(p, pid, a, ids[6:8])
    naming.move_maps(p, pid, a, [ids[0]], g2)
    print(json.dumps(naming.BoardState.load(p, pid, a).snapshot()), flush=True)
    real_place = naming_store._place

    def place_then_hang(*args, **kwargs):
        real_place(*args, **kwargs)
        print("INSIDE", flush=True)
        time.sleep(120)

    naming_store._place = place_then_hang
    naming.merge_groups(p, g1, [g2])
""")


def test_kill_in_the_middle_of_an_edit_keeps_the_committed_board(project, built):
    pid = built["pool_id"]
    path = str(project.path)
    project.close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED, path, str(pid)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        committed = json.loads(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "INSIDE"  # merged members written, transaction still open
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with Project.open(path) as again:
        assert again.integrity_check() == "ok"
        a = again.annotator("killed")
        state = naming.BoardState.load(again, pid, a)
        assert state.snapshot() == committed
        assert [(g["name"], len(g["members"])) for g in committed["groups"]] == [
            ("Unclear / not a concept", 2), ("red squares", 2), ("discs", 4)]
        # the board is usable again: the killed process's lock is gone
        naming.merge_groups(again, state.concepts[0].id, [state.concepts[1].id])
