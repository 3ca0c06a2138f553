"""Forward hooks that capture the outputs of chosen layers, always removed (try/finally), and that can stop the
forward pass once the last needed layer has run."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class StopForward(Exception):
    """Raised by the hook of the deepest captured layer when the rest of the network is not needed."""


def _snapshot(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_snapshot(o) if i == 0 else o for i, o in enumerate(output))
    if isinstance(output, dict):
        first = next(iter(output), None)
        return {k: (_snapshot(v) if k == first else v) for k, v in output.items()}
    return output


def _module_by_name(model: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise KeyError(f"the model has no module {name!r}")
    return modules[name]


@contextlib.contextmanager
def capture(model: torch.nn.Module, names: Sequence[str], stop_after_last: bool = False) -> Iterator[dict[str, Any]]:
    """Yields a dict that each forward pass fills with {layer name: output}. With `stop_after_last`, the forward
    raises StopForward after the last of `names` to execute; call it through `run_captured`."""
    outputs: dict[str, Any] = {}
    # Every forward starts with all layers to go (the root's pre-hook below), so a forward called directly, not
    # through run_captured, also runs until the last of them rather than stopping after the first.
    remaining: set[str] = set(names)
    handles = []

    def make_hook(name: str):
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            # A later in-place op (ReLU(inplace=True) after a BatchNorm) would otherwise rewrite what we captured.
            outputs[name] = _snapshot(output)
            remaining.discard(name)
            if stop_after_last and not remaining:
                raise StopForward()

        return hook

    try:
        handles.append(model.register_forward_pre_hook(lambda _module, _inputs: remaining.update(names)))
        for name in names:
            handles.append(_module_by_name(model, name).register_forward_hook(make_hook(name)))
        outputs["__reset__"] = lambda: (outputs.clear(), remaining.update(names))  # type: ignore[func-returns-value]
        yield outputs
    finally:
        for h in handles:
            h.remove()


def run_captured(forward: Any, x: torch.Tensor, outputs: dict[str, Any]) -> dict[str, Any]:
    reset = outputs["__reset__"]
    reset()
    outputs["__reset__"] = reset
    try:
        forward(x)
    except StopForward:
        pass
    return {k: v for k, v in outputs.items() if k != "__reset__"}
