"""Inner layers of TorchScript (scripted and traced) and torch.export models: found, and equal to the eager model's."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from app.sources import instrument as hooks
from app.errors import ModelLoadError
from app.sources.models import discover_layers, load_model
from app.sources.scripted import _only_weights_only_loads

PROBES = ["stem", "layer1", "layer1.0.conv1", "layer1.1", "layer2.0.downsample.0", "layer2.0", "fc"]


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()  # called twice, as in torchvision's BasicBlock
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def eager():
    torch.manual_seed(0)
    net = TinyResNet()
    for m in net.modules():  # non-trivial running statistics, so batch norm in eval mode is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _eager_outputs(net: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    with hooks.capture(net, names) as outs, torch.no_grad():
        return hooks.run_captured(net, x, outs)


def _save(kind: str, net: nn.Module, folder) -> str:
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "scripted":
            path = folder / "scripted.pt"
            torch.jit.script(net).save(str(path))
            return f"torchscript:{path}"
        if kind == "traced":
            path = folder / "traced.pt"
            torch.jit.trace(net, x).save(str(path))
            return f"torchscript:{path}"
        path = folder / "exported.pt2"
        batch = torch.export.Dim("batch", min=1)
        torch.export.save(torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}}), str(path))
        return f"export:{path}"


@pytest.mark.parametrize("kind", ["scripted", "traced", "exported"])
def test_inner_layers_equal_the_eager_models(kind, eager, tmp_path):
    spec = _save(kind, eager, tmp_path)
    loaded = load_model(spec, preprocess_overrides={"resize": 16, "crop": 16})
    layers = {layer.name: layer for layer in discover_layers(loaded)}
    assert layers["layer1.0.conv1"].kind == "conv" and layers["layer1.0.conv1"].units == 8
    assert layers["layer2.0"].shape == (16, 8, 8) and layers["fc"].kind == "linear" and layers["fc"].units == 5
    assert layers["layer1.0.conv1"].type == "Conv2d" and layers["layer1"].type == "Sequential"
    if kind != "traced":  # a trace records the second call of a shared module as plain ops
        assert layers["layer1.0.relu"].kind == "other" and "2 times" in layers["layer1.0.relu"].note

    x = torch.randn(3, 3, 16, 16)
    want = _eager_outputs(eager, x, PROBES)
    with hooks.capture(loaded.module, PROBES) as outs, torch.no_grad():
        got = hooks.run_captured(loaded.forward, x, outs)
    assert set(got) == set(PROBES)
    for name in PROBES:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():  # the hooks are gone and the plain forward is the eager model's
        torch.testing.assert_close(loaded.forward(x), eager(x), rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks for m in loaded.module.modules())


def test_a_layer_inside_script_control_flow_is_reported_not_faked(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.extra = nn.Conv2d(4, 4, 1)
            self.flag = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if self.flag:
                y = self.extra(y)
            return y.mean((2, 3))

    path = tmp_path / "branchy.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Branchy().eval()).save(str(path))
    layers = {la.name: la for la in discover_layers(load_model(f"torchscript:{path}",
                                                               preprocess_overrides={"resize": 8, "crop": 8}))}
    assert layers["conv"].kind == "conv"
    assert layers["extra"].kind == "other" and "not run" in layers["extra"].note


def test_pt2_loading_never_unpickles(tmp_path):
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    with _only_weights_only_loads(tmp_path / "m.pt2"):
        buf.seek(0)
        assert torch.equal(torch.load(buf)["w"], torch.ones(2))  # plain tensors load, as weights_only=True
        with pytest.raises(ModelLoadError, match="pickled Python objects"):
            torch.load(buf, weights_only=False)
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(nn.Conv2d(3, 2, 3).eval(), (torch.randn(2, 3, 8, 8),)), str(fixed))
    with pytest.raises(ModelLoadError, match="batches of exactly 2"):
        load_model(f"export:{fixed}")
    bogus = tmp_path / "bogus.pt2"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a torch.export archive"):
        load_model(f"export:{bogus}")
