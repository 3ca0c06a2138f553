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
