"""The edited model's export: the ablation folded into the next layer's weights equals the hooked ablation."""
from __future__ import annotations

import pytest
import torch

from tests.app.naming_helpers import SIZE, TinyNet, tiny_model


def _hooked(model, layer, units, values, x):
    from app.sources import instrument

    with torch.no_grad(), instrument.ablate(model.module, layer, units, axis=1, values=values):
        return model.forward(x)


@pytest.mark.parametrize("values", [0.0, torch.tensor([0.7, -0.2])])
def test_folded_model_saved_as_safetensors_equals_the_hooked_ablation(tmp_path, values):
    from safetensors.torch import load_file

    from app.edit import fold_ablation, save_safetensors

    model = tiny_model()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    folded, into = fold_ablation(model, "act2", [1, 4], axis=1, values=values)
    assert into == "fc"
    save_safetensors(folded, tmp_path / "edited.safetensors", {"layer": "act2"})
    fresh = TinyNet().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "edited.safetensors")))
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        got = fresh(x)
    torch.testing.assert_close(got, _hooked(model, "act2", [1, 4], values, x), atol=1e-5, rtol=1e-5)
    # the project's model itself is untouched, with no hooks left
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(m._forward_hooks for m in model.module.modules())


def test_a_fold_that_would_change_the_outputs_is_refused():
    from app.edit import fold_ablation
    from app.errors import JobError

    model = tiny_model()
    # A constant on conv1's channel reaches the padded conv2: its borders see zeros, so no bias can stand for it.
    with pytest.raises(JobError, match="cannot be folded"):
        fold_ablation(model, "conv1", [0], axis=1, values=1.0)


def test_an_edit_that_cannot_be_folded_is_saved_as_a_wrapper_the_loader_applies(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from app.edit import write_edited
    from app.errors import JobError
    from app.sources import instrument
    from app.sources.models import META_EDIT

    model = tiny_model()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    how = write_edited(model, "conv1", [0], 1, 1.0, tmp_path / "e.safetensors", {"layer": "conv1"})
    assert "wrapper" in how
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        edit = json.loads(f.metadata()[META_EDIT])
    assert edit["applied"] == "wrapper" and edit["units"] == [0] and edit["values"] == 1.0
    saved = load_file(str(tmp_path / "e.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in before)  # the model's own weights: the edit is the hook
    fresh = TinyNet().eval()
    fresh.load_state_dict(saved)
    instrument.install_edit(fresh, edit)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        got = fresh(x)
    torch.testing.assert_close(got, _hooked(model, "conv1", [0], 1.0, x))
    assert not any(m._forward_hooks for m in model.module.modules())
    with pytest.raises(JobError, match="cannot be applied"):
        instrument.install_edit(TinyNet(), {**edit, "layer": "nowhere"})
