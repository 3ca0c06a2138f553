"""The extract dialog's choice of where to run: this machine, or Ray (auto, local or an address)."""
from __future__ import annotations

from dataclasses import dataclass

from app.ui.views.params import ExtractDialog


@dataclass
class Prefs:
    batch_size: int = 8
    device: str = "cpu"
    num_workers: int | None = None


def test_extract_dialog_offers_ray_with_shards(qtbot):
    dlg = ExtractDialog(["conv1"], [{"id": 1, "name": "d", "num_images": 4, "format": "coco"}], Prefs())
    qtbot.addWidget(dlg)
    assert dlg.ray_address() is None and dlg.shard_count() is None  # this machine by default
    dlg.run_on.setCurrentText("Ray: local")
    dlg.shards.setValue(6)
    assert dlg.ray_address() == "local" and dlg.shard_count() == 6
    dlg.run_on.setCurrentText("Ray: ray://head:10001")
    assert dlg.ray_address() == "ray://head:10001"
    dlg.run_on.setCurrentText("Ray")
    assert dlg.ray_address() == "auto"
    assert "Workers need the same package" in dlg.run_on.toolTip()
