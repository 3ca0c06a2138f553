import pytest
import torch

from app.sources import instrument as hooks


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_stop_after_last_outside_run_captured_runs_to_the_last_layer():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2), Counter())
    x = torch.ones(1, 2)
    with torch.no_grad():
        want = net[2](net[1](net[0](x)))
    with hooks.capture(net, ["0", "2"], stop_after_last=True) as outs:
        for _ in range(2):  # and again: every forward starts with all layers to go
            with pytest.raises(hooks.StopForward):
                net(x)
            assert set(outs) - {"__reset__"} == {"0", "2"}
            torch.testing.assert_close(outs["2"].detach(), want)
            assert net[3].calls == 0  # stopped after the last captured layer, before the rest
    assert not net._forward_pre_hooks and not net[0]._forward_hooks and not net[2]._forward_hooks


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def _hook_count(net: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def _convnet() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(5, 3)).eval()


def test_every_context_removes_its_hooks_even_when_the_forward_raises():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), Boom())
    for ctx in (lambda: hooks.capture(net, ["0", "1"], stop_after_last=False),
                lambda: hooks.replace(net, {"0": lambda t: t * 2}),
                lambda: hooks.ablate(net, "0", [1])):
        with pytest.raises(RuntimeError, match="boom"), ctx():
            assert _hook_count(net) > 0
            net(torch.ones(1, 2))
        assert _hook_count(net) == 0


def test_ablation_equals_zeroing_the_units_by_hand_and_nothing_changes_nothing():
    net = _convnet()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = net(x)
        h = net[2](net[1](net[0](x)))
        h[:, [1, 3]] = 0.0
        want = net[6](net[5](net[4](net[3](h))))
        with hooks.ablate(net, "2", [1, 3], axis=hooks.unit_axis("conv")):
            got = net(x)
        with hooks.ablate(net, "2", [], axis=1):
            same = net(x)
        # a constant per unit, along the last axis of a linear layer's output
        with hooks.ablate(net, "6", [0, 2], axis=hooks.unit_axis("linear"), values=torch.tensor([5.0, -1.0])):
            head = net(x)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(same, plain)
    torch.testing.assert_close(head[:, 1], plain[:, 1])
    assert (head[:, 0] == 5.0).all() and (head[:, 2] == -1.0).all()
    assert _hook_count(net) == 0


def test_first_tensor_rule_is_shared_and_containers_are_kept():
    a, b = torch.ones(1), torch.zeros(1)
    assert hooks.first_tensor((None, a, b)) is a
    assert hooks.first_tensor({"x": 1, "y": b}) is b
    assert hooks.first_tensor([1, 2]) is None
    out = hooks.replace_first_tensor((None, a, b), b)
    assert isinstance(out, tuple) and out[1] is b and out[2] is b
    assert hooks.replace_first_tensor({"x": 1, "y": a}, b)["y"] is b


def test_mean_ablation_values_come_from_the_pooled_means():
    import numpy as np

    pooled = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, np.nan]], dtype=np.float32)
    v = hooks.ablation_values("mean", [0, 2], pooled_mean=pooled)
    torch.testing.assert_close(v, torch.tensor([2.0, 3.0]))
    with pytest.raises(Exception, match="unknown ablation mode"):
        hooks.ablation_values("nope", [0])
