"""The views on their own: forms built from labelers' declared parameters, the units table at 10,000 units, the
overlay geometry against the model's preprocessing, preferences, drag and drop, appearance."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox

import labelers.base as lb
from app.ui import imaging
from app.ui.data import MethodColumn, UnitTable, layer_overview, load_unit_table
from app.ui.views.params import LabelDialog, ParamForm
from app.ui.views.units import UnitsBrowser

pytestmark = pytest.mark.qt


# ---- forms from Param declarations -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(lb.available()))
def test_param_form_has_one_widget_per_param_with_paper_defaults(qtbot, name):
    cls = lb.available()[name]
    form = ParamForm(cls.params)
    qtbot.addWidget(form)
    assert list(form.widgets) == [p.name for p in cls.params]
    for p in cls.params:
        w = form.widgets[p.name]
        expected = (QComboBox if p.choices else QCheckBox if p.type is bool else QSpinBox if p.type is int
                    else QDoubleSpinBox if p.type is float else QLineEdit)
        assert isinstance(w, expected), p
        assert p.help in w.toolTip()
        if isinstance(w, (QSpinBox, QDoubleSpinBox)):
            if p.minimum is not None:
                assert w.minimum() == pytest.approx(p.minimum)
            if p.maximum is not None:
                assert w.maximum() == pytest.approx(p.maximum)
    assert cls.resolve_params(form.values()) == cls.resolve_params({})


def test_param_form_values_round_trip(qtbot):
    params = (lb.Param("beam", int, 5, "beam", minimum=1), lb.Param("alpha", float, 0.05, "alpha", maximum=1.0),
              lb.Param("pool", str, "max", "pool", choices=("max", "mean")), lb.Param("fold", bool, True, "fold"),
              lb.Param("cats", str, "", "categories"))
    form = ParamForm(params)
    qtbot.addWidget(form)
    form.set_values({"beam": 9, "alpha": 0.001, "pool": "mean", "fold": False, "cats": "object,color"})
    assert form.values() == {"beam": 9, "alpha": 0.001, "pool": "mean", "fold": False, "cats": "object,color"}
    form.widgets["beam"].setValue(0)  # below the minimum: the spin box keeps it in range
    assert form.values()["beam"] == 1
    form.reset()
    assert form.values() == {"beam": 5, "alpha": 0.05, "pool": "max", "fold": True, "cats": ""}


def test_label_dialog_unticks_methods_that_cannot_run_and_builds_requests(qtbot):
    methods = lb.available()
    why = {"layer1": {"netdissect": "Needs mask counts, which comes from a dataset with masks."}}
    dlg = LabelDialog(methods, ["layer1", "layer2"], "layer1", why)
    qtbot.addWidget(dlg)
    dlg.set_checked(["netdissect", "invert"])
    dlg._refresh_availability()
    ticked = [dlg.method_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(dlg.method_list.count())
              if dlg.method_list.item(i).checkState() == Qt.CheckState.Checked]
    assert "netdissect" not in ticked
    assert dlg.page_of["netdissect"].warning.text().startswith("Needs mask counts")
    dlg.set_checked(["invert"])
    inv = dlg.page_of["invert"].form
    inv.set_values({"beam_size": 7})
    reqs = dlg.requests()
    params = methods["invert"].resolve_params({"beam_size": 7})
    assert reqs == [{"layer": "layer1", "method": "invert", "params": params, "clip_model": None}]
    if "clip_dissect" in methods:
        dlg.set_checked(["clip_dissect"])
        # an empty folder field means the project's own dual encoder (its availability is the provider's to say)
        assert [r["clip_model"] for r in dlg.requests()] == [None]


# ---- units table at scale ----------------------------------------------------------------------------------------
def synthetic_table(n: int, methods: int = 5, seed: int = 0) -> UnitTable:
    rng = np.random.default_rng(seed)
    words = np.array(["red", "blue", "dog", "wheel", "sky", "grass", "stripes", "face", "window", "tree"])
    cats = np.array(["color", "color", "object", "part", "scene", "scene", "texture", "part", "object", "object"])
    cols = []
    hay = [""] * n
    for j in range(methods):
        pick = rng.integers(0, len(words), n)
        score = rng.random(n)
        score[rng.random(n) < 0.05] = np.nan
        has = np.isfinite(score)
        text = [str(words[k]) if h else "" for k, h in zip(pick, has)]
        p = np.where(has, rng.random(n) * 0.1, np.nan) if j % 2 else np.full(n, np.nan)
        interp = has & (score > 0.5)
        cols.append(MethodColumn(f"m{j}", j + 1, text, score, p, [str(cats[k]) if h else "" for k, h in zip(pick, has)],
                                 interp, has, bool(j % 2), "interpretable", "score > 0.5"))
        hay = [f"{h} | {t}" for h, t in zip(hay, text)]
    names = ["" for _ in range(n)]
    names[123] = "Wheel Finder"
    hay[123] += " | wheel finder"
    return UnitTable(1, "layer", np.arange(n), np.arange(n) + 100, names, cols, [h.lower() for h in hay])


def test_units_browser_is_fast_and_right_at_10k_units(qtbot):
    table = synthetic_table(10_000)
    b = UnitsBrowser()
    qtbot.addWidget(b)
    b.resize(900, 600)
    b.show()
    t0 = time.perf_counter()
    b.set_table(table)
    qtbot.wait(1)
    t_load = time.perf_counter() - t0
    assert b.model.rowCount() == 10_000 and b.current_unit() == 0

    col = next(i for i, c in enumerate(b.model.columns) if c.kind == "score" and c.method == "m2")
    t0 = time.perf_counter()
    b.view.sortByColumn(col, Qt.SortOrder.DescendingOrder)
    t_sort = time.perf_counter() - t0
    shown = [float(b.model.data(b.model.index(r, col)) or "nan") for r in range(0, 10_000)]
    finite = [v for v in shown if v == v]
    assert finite == sorted(finite, reverse=True)
    assert all(v != v for v in shown[len(finite):])  # units without a label go last
    assert b.current_unit() == 0  # the selection follows its unit through the sort

    t0 = time.perf_counter()
    b.search.setText("wheel finder")
    b._apply_search()
    t_search = time.perf_counter() - t0
    assert b.visible_units() == [123]
    b.search.setText("red")
    b._apply_search()
    expected = {u for u in range(10_000) if "red" in table.haystack[u]}
    assert set(b.visible_units()) == expected and b.count.text() == f"{len(expected)} of 10000 units"
    first = b.visible_units()[0]
    b.select_unit(first)
    b.step(1)
    assert b.current_unit() == b.visible_units()[1]
    print(f"10k units: load {t_load * 1e3:.0f} ms, sort {t_sort * 1e3:.0f} ms, search {t_search * 1e3:.0f} ms")
    assert t_load < 1.0 and t_sort < 1.0 and t_search < 1.0


@dataclass
class FakeLayer:
    name: str
    units: int
    type: str = "Conv2d"
    kind: str = "conv"
    shape: tuple = (4, 2, 2)
    grid: tuple = (2, 2)
    prefix_tokens: int = 0


def test_unit_table_query_matches_the_database_at_10k_units(tmp_path):
    from app.project.store import Project

    n = 10_000
    rng = np.random.default_rng(1)
    with Project.create(tmp_path / "p") as p:
        mid = p.add_model(name="m", spec="builtin:x", kind="builtin", weights_path=None, fingerprint="f",
                          preprocess={"crop": 8}, class_names=None, layers=[FakeLayer("big", n, shape=(n, 2, 2))])
        layer_id = p.layer(mid, "big")["id"]
        expected = {}
        for method, flag in (("netdissect", "interpretable"), ("invert", "significant")):
            run = p.create_run(kind="label", key=method, params={}, model_id=mid, layer_id=layer_id, method=method)
            labels = []
            for u in range(n):
                for rank in (1, 2, 3):
                    s = float(rng.random())
                    labels.append(lb.Label(u, rank, f"{method}-{u % 97}-{rank}", s,
                                           p_value=s / 10 if method == "invert" else None,
                                           category="object" if u % 2 else "color", extra={flag: bool(u % 3 == 0)}))
                    if rank == 1:
                        expected[(method, u)] = labels[-1]
            p.replace_labels(run, layer_id, method, labels)
            p.finish_run(run, "done")
        annot = p.annotator("ann")
        unit_ids = p.unit_ids(layer_id)
        p.set_annotation(annotator_id=annot, unit_id=unit_ids[42], kind="name", text="Colour blob")
        t0 = time.perf_counter()
        table = load_unit_table(p, layer_id)
        seconds = time.perf_counter() - t0
    assert len(table) == n and table.names[42] == "Colour blob (ann)"
    for m in table.methods:
        for u in (0, 1, 4999, n - 1):
            lab = expected[(m.method, u)]
            assert m.text[u] == lab.text and m.score[u] == pytest.approx(lab.score)
            assert m.interpretable[u] == (u % 3 == 0)
        assert m.has_p == (m.method == "invert")
    assert "netdissect-5-3" in table.haystack[5] and "colour blob" in table.haystack[42]
    ov = layer_overview(table)
    by = {m.method: m for m in ov.methods}
    assert by["netdissect"].interpretable == len([u for u in range(n) if u % 3 == 0])
    assert by["netdissect"].by_category == {"color": len(range(0, n, 6)), "object": len(range(3, n, 6))}
    print(f"unit table of 10k units x 2 methods x 3 ranks loaded in {seconds * 1e3:.0f} ms")
    assert seconds < 3.0


# ---- overlays line up with the model's input -------------------------------------------------------------------
@pytest.mark.parametrize("size,pre", [((50, 37), {"resize": 24, "crop": 20}), ((30, 60), {"resize": 32, "crop": 32}),
                                      ((40, 40), {"resize": 20, "crop": 24})])
def test_model_view_matches_the_model_preprocessing(size, pre):
    from app.sources.preprocess import Preprocess

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    full = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), **pre}
    x = Preprocess.from_dict(full).transform()(img)  # [3, crop, crop] in [0, 1]
    ours = np.asarray(imaging.model_view(img, full)).astype(np.float32) / 255
    assert ours.shape == (pre["crop"], pre["crop"], 3)
    assert np.abs(ours - x.permute(1, 2, 0).numpy()).max() <= 1.5 / 255


def test_upsample_matches_torch_bilinear_and_region_outline():
    m = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    ours = imaging.upsample(m, 28)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(28, 28), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    assert np.abs(ours - ref).max() < 1e-5
    thr = float(np.quantile(ours, 0.9))
    rgba = imaging.region_rgba(ours, thr)
    active = ours > thr  # strictly above, as the engine counts a region
    assert (rgba[~active, 3] == 200).all()
    border = imaging.edges(active)
    assert (rgba[border, 3] == 255).all() and (rgba[active & ~border, 3] == 0).all()
    heat = imaging.heat_rgba(ours, 0.0, float(ours.max()), np.stack([np.arange(256)] * 3, 1).astype(np.uint8))
    order = np.argsort(ours.ravel())
    assert (np.diff(heat[..., 3].ravel()[order].astype(int)) >= 0).all()  # opacity grows with activation


def test_model_view_mask_follows_the_image():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 25:35] = True
    img = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, 2))
    pre = {"resize": 20, "crop": 20}
    seen = np.asarray(imaging.model_view(img, pre))[..., 0] > 127
    moved = imaging.model_view_mask(mask, pre, 20)
    assert (seen != moved).mean() < 0.03


# ---- preferences, recent projects ------------------------------------------------------------------------------
def test_preferences_round_trip_and_survive_a_damaged_file(tmp_path):
    from app.ui.settings import PREFS_VERSION, Preferences

    path = tmp_path / "cfg" / "preferences.json"
    p = Preferences.load(path)
    assert p.appearance == "system" and p.path == path
    p.appearance, p.batch_size, p.overlay_opacity = "dark", 64, 0.3
    p.save()
    data = json.loads(path.read_text())
    assert data["version"] == PREFS_VERSION and data["batch_size"] == 64
    q = Preferences.load(path)
    assert (q.appearance, q.batch_size, q.overlay_opacity) == ("dark", 64, 0.3)
    path.write_text(json.dumps({"appearance": "purple", "batch_size": -3, "overlay_opacity": 7, "unknown": 1}))
    r = Preferences.load(path)
    assert (r.appearance, r.batch_size, r.overlay_opacity) == ("system", 32, 1.0)
    path.write_text("{not json")
    assert Preferences.load(path).appearance == "system"


def test_recent_projects(tmp_path, settings):
    from app.ui.settings import MAX_RECENT, RecentProjects

    r = RecentProjects(settings)
    for i in range(MAX_RECENT + 3):
        r.add(tmp_path / f"p{i}")
    r.add(tmp_path / "p2")
    items = r.list()
    assert len(items) == MAX_RECENT and items[0] == str((tmp_path / "p2").resolve())
    r.remove(tmp_path / "p2")
    assert str((tmp_path / "p2").resolve()) not in r.list()


# ---- drag and drop, appearance -----------------------------------------------------------------------------------
def test_drops_open_projects_and_prefill_dialogs(qtbot, window, tmp_path, model_file, coco_dir):
    from PySide6.QtCore import QMimeData, QPointF, QUrl
    from PySide6.QtGui import QDropEvent

    from app.project.store import Project
    from app.ui.main_window import classify_drop
    from app.ui.views.sources import AddDatasetDialog, AddModelDialog, guess_model_kind

    proj = tmp_path / "d.nstudio"
    Project.create(proj).close()
    assert classify_drop(proj) == "project" and classify_drop(model_file) == "model"
    assert classify_drop(coco_dir) == "dataset" and classify_drop(coco_dir / "annotations" / "instances.json") == \
        "dataset"
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    state = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state)
    assert guess_model_kind(scripted) == "torchscript" and guess_model_kind(state) == "torchvision"

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(proj))])
    ev = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                    Qt.KeyboardModifier.NoModifier)
    window.dropEvent(ev)
    qtbot.waitUntil(lambda: window.project_path == proj.resolve())

    window.handle_drop([model_file])
    dlg = next(w for w in window.findChildren(AddModelDialog) if w.isVisible())
    assert dlg.kind_key() == "python" and dlg.target.currentText() == str(model_file)
    dlg.reject()
    window.handle_drop([coco_dir])
    dlg = next(w for w in window.findChildren(AddDatasetDialog) if w.isVisible())
    assert dlg.path.text() == str(coco_dir)
    dlg.reject()


def test_appearance_follows_choice_and_is_saved(qtbot, window):
    from app.ui.settings import Preferences

    window.set_appearance("dark")
    qtbot.waitUntil(lambda: window.palette().color(QPalette.ColorRole.Window).lightness() < 100, timeout=3000)
    assert window.unit_view.plot.backgroundBrush().color().lightness() < 100
    assert Preferences.load(window.prefs.path).appearance == "dark"
    window.set_appearance("light")
    qtbot.waitUntil(lambda: window.palette().color(QPalette.ColorRole.Window).lightness() > 200, timeout=3000)


def test_status_bar_names_the_device(qtbot, window):
    qtbot.waitUntil(lambda: window.device_label.text() != "detecting device...", timeout=30000)
    text = window.device_label.text()
    assert text.startswith("CPU") or text.startswith("GPU")
    if torch.cuda.is_available() and window.prefs.device != "cpu":
        assert torch.cuda.get_device_name(0) in text


def test_histogram_samples_rows_of_very_large_extractions(tmp_path):
    from types import SimpleNamespace

    from app.ui.data import HISTOGRAM_ROWS, LayerView

    n = 2 * HISTOGRAM_ROWS + 10
    pooled = np.random.default_rng(0).random((n, 3)).astype(np.float32)
    pooled[5, :] = np.nan  # an unreadable image
    results = SimpleNamespace(pooled_max=pooled, pooled_mean=pooled, valid=~np.isnan(pooled[:, 0]))
    view = LayerView(tmp_path, {"id": 1, "name": "l", "units": 3, "type": "Conv2d"}, {"id": 1}, {}, [], [], 1,
                     np.array([0.9, 0.9, 0.9], np.float32), 0.995, np.zeros((3, 1), np.int64),
                     np.zeros((3, 1), np.float32), results, False)
    h = view.histogram(1)
    assert h.total_images == n - 1 and HISTOGRAM_ROWS // 2 < h.images <= HISTOGRAM_ROWS
    assert h.counts.sum() == h.images and h.threshold == pytest.approx(0.9)
    small = LayerView(tmp_path, view.layer, {"id": 1}, {}, [], [], 1, view.thresholds, 0.995, view.topk_index,
                      view.topk_scores, SimpleNamespace(pooled_max=pooled[:1000], pooled_mean=pooled[:1000],
                                                        valid=results.valid[:1000]), False)
    hs = small.histogram(2)
    assert hs.images == hs.total_images == 999
    assert np.array_equal(hs.counts, np.histogram(pooled[:1000, 2][np.isfinite(pooled[:1000, 2])], bins=60,
                                                  range=(hs.edges[0], hs.edges[-1]))[0])


def test_layer_overview_chart_stacks_interpretable_units_by_category(qtbot):
    from app.ui.data import NO_CATEGORY
    from app.ui.views.overview import LayerOverview

    table = synthetic_table(500, methods=3)
    table.methods[2].category = [c if i % 3 else "" for i, c in enumerate(table.methods[2].category)]
    data = layer_overview(table)
    w = LayerOverview()
    qtbot.addWidget(w)
    w.set_data(data)
    labels = list(w.legend_colours)
    assert len(labels) == len(set(labels)) == len(w.bars)  # one legend entry per stacked category
    assert labels[-1].startswith("no single category") and NO_CATEGORY in data.categories
    tops = np.zeros(len(data.methods))
    for bar in w.bars:
        tops += np.asarray(bar.opts["height"])
    assert tops.tolist() == [m.interpretable for m in data.methods]
    assert [m.interpretable for m in data.methods] == [int(c.interpretable.sum()) for c in table.methods]
    assert w.table.rowCount() == 3 and w.table.item(0, 1).text() == str(data.methods[0].interpretable)
