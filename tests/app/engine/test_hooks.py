import pytest
import torch

from app.engine import hooks


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
