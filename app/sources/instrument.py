"""Everything that hooks a model: capture layer outputs, stop the forward pass after the last needed layer, replace a
layer's output by a function of it, ablate chosen units. Hooks are always removed (try/finally), whatever the
forward pass raised, so the model is left exactly as it was.

One rule for which tensor of a layer's output is "the" output: the output itself when it is a tensor, else the
first tensor among the items of a tuple/list or the values of a mapping (a transformers ModelOutput is an
OrderedDict of its non-None fields). Extraction, layer discovery, the naming board and the edits all use it.

It lives beside the model loader (app.sources) rather than in the engine so that layer discovery, below the
engine, can use it too."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from app.errors import JobError

ABLATION_MODES: tuple[str, ...] = ("zero", "mean", "constant")


class StopForward(Exception):
    """Raised by the hook of the deepest captured layer when the rest of the network is not needed."""


def _items(output: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(output, Mapping):
        return list(output.items())
    if isinstance(output, (tuple, list)):
        return list(enumerate(output))
    return None


def first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    for _k, v in _items(output) or ():
        if isinstance(v, torch.Tensor):
            return v
    return None


def replace_first_tensor(output: Any, new: torch.Tensor) -> Any:
    """`output` with its first tensor (by the rule above) replaced by `new`, the container type kept."""
    if isinstance(output, torch.Tensor):
        return new
    items = _items(output)
    for k, v in items or ():
        if isinstance(v, torch.Tensor):
            if isinstance(output, Mapping):
                out = output.copy() if hasattr(output, "copy") else dict(output)
                out[k] = new
                return out
            seq = list(output)
            seq[k] = new
            return seq if isinstance(output, list) else tuple(seq)
    raise JobError("the layer's output holds no tensor, so it cannot be changed", fix="choose another layer")


def _snapshot(output: Any) -> Any:
    """A later in-place op (ReLU(inplace=True) after a BatchNorm) would otherwise rewrite what was captured."""
    t = first_tensor(output)
    return output if t is None else replace_first_tensor(output, t.clone())


def module_by_name(model: torch.nn.Module, name: str) -> torch.nn.Module:
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
            outputs[name] = _snapshot(output)
            remaining.discard(name)
            if stop_after_last and not remaining:
                raise StopForward()

        return hook

    try:
        handles.append(model.register_forward_pre_hook(lambda _module, _inputs: remaining.update(names)))
        for name in names:
            handles.append(module_by_name(model, name).register_forward_hook(make_hook(name)))
        outputs["__reset__"] = lambda: (outputs.clear(), remaining.update(names))  # type: ignore[func-returns-value]
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def watch(model: torch.nn.Module, names: Sequence[str], on_output: Callable[[str, Any], None]) -> Iterator[None]:
    """While inside, `on_output(name, output)` is called every time a module named in `names` runs (a module run
    twice in one pass is seen twice): what layer discovery and the edit's execution order read."""
    modules = dict(model.named_modules())
    handles = []

    def make_hook(name: str):
        return lambda _module, _inputs, output: on_output(name, output)

    try:
        for name in names:
            if name not in modules:
                raise KeyError(f"the model has no module {name!r}")
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield
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


def _replace_hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        t = first_tensor(output)
        if t is None:
            raise JobError("the layer's output holds no tensor, so it cannot be changed", fix="choose another layer")
        return replace_first_tensor(output, fn(t))

    return hook


@contextlib.contextmanager
def replace(model: torch.nn.Module, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """While inside, the output of each layer named in `edits` is replaced by `fn(its first tensor)` (the rest of a
    tuple or mapping output kept)."""
    handles = []
    try:
        for name, fn in edits.items():
            handles.append(module_by_name(model, name).register_forward_hook(_replace_hook(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def unit_axis(kind: str, channels_last: bool = False) -> int:
    """The axis of a layer's raw output that indexes its units (the layout `unit_maps` reads): a conv's channels,
    a linear layer's features, a transformer block's hidden dimension (every token, class token included)."""
    if kind == "conv":
        return -1 if channels_last else 1
    if kind == "linear":
        return 1
    if kind == "vit":
        return -1
    raise JobError(f"a {kind!r} layer has no units to ablate", fix="choose a convolution, linear or transformer layer")


def ablation_fn(units: Sequence[int], axis: int, values: torch.Tensor | float = 0.0
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that sets `units` along `axis` to `values` (a scalar, or one value per unit) on a copy."""
    idx = torch.as_tensor(list(units), dtype=torch.long)

    def fn(t: torch.Tensor) -> torch.Tensor:
        if idx.numel() == 0:
            return t
        out = t.clone()
        moved = out.movedim(axis, -1)  # a view: writing to it writes to `out`
        if int(idx.max()) >= moved.shape[-1] or int(idx.min()) < 0:
            raise JobError(f"unit {int(idx.max())} is out of range: the layer has {moved.shape[-1]} units",
                           fix="choose units between 0 and the layer's unit count minus one")
        v = torch.as_tensor(values, dtype=out.dtype, device=out.device)
        moved[..., idx.to(out.device)] = v if v.ndim == 0 else v.reshape(-1)
        return out

    return fn


def ablation_values(mode: str, units: Sequence[int], *, pooled_mean: Any = None, constant: float = 0.0
                    ) -> torch.Tensor | float:
    """What ablated units are set to: 0, the unit's mean activation over the extraction's dataset (the mean of its
    per-image spatial means, `pooled_mean` [N, U]), or a constant."""
    if mode == "zero":
        return 0.0
    if mode == "constant":
        return float(constant)
    if mode == "mean":
        if pooled_mean is None:
            raise JobError("mean ablation needs the layer's extraction (its per-image means)",
                           fix="extract the layer first, or use --mode zero")
        import numpy as np

        cols = np.asarray(pooled_mean)[:, list(units)].astype(np.float64)
        return torch.as_tensor(np.nanmean(cols, axis=0), dtype=torch.float32)
    raise JobError(f"unknown ablation mode {mode!r}", fix=f"use one of {', '.join(ABLATION_MODES)}")


@contextlib.contextmanager
def ablate(model: torch.nn.Module, layer: str, units: Sequence[int], *, axis: int = 1,
           values: torch.Tensor | float = 0.0) -> Iterator[None]:
    """While inside, `units` of `layer` (along `axis` of its output) are set to `values` in every forward pass."""
    with replace(model, {layer: ablation_fn(units, axis, values)}):
        yield


def install_edit(model: torch.nn.Module, edit: Mapping[str, Any]) -> Any:
    """Makes a saved ablation part of `model` for good: the edit (a saved edited model's `neuron_studio.edit`
    metadata: layer, units, axis, values) becomes a forward hook that stays, so that every forward pass of the
    model, whoever runs it, is the edited model's. Unlike the contexts above this hook is meant to stay: it is the
    wrapper of an edit that could not be folded into the weights. Returns the hook's handle."""
    try:
        layer, units, axis = str(edit["layer"]), [int(u) for u in edit["units"]], int(edit["axis"])
        values = edit.get("values", 0.0)
        values = torch.as_tensor([float(v) for v in values]) if isinstance(values, list) else float(values)
        module = module_by_name(model, layer)
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"the saved edit cannot be applied to this model ({exc})",
                       fix="load the edited weights with the model they were saved from") from None
    return module.register_forward_hook(_replace_hook(ablation_fn(units, axis, values)))
