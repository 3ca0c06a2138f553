"""Inner layers of TorchScript files and torch.export programs, for the one hook code of app/sources/instrument.py.

A TorchScript module cannot take Python forward hooks. `ScriptedLayers` wraps it in an ordinary `nn.Module` whose
module tree mirrors the scripted one with `LayerTap`s (layer1, layer1.0, layer1.0.conv1, ...). When a forward pass
runs with hooks on some taps, the wrapper runs a rewritten copy of the scripted forward graph instead: the calls
on the path to each chosen submodule are inlined, so that the value each chosen submodule returns is an SSA value
of the top-level graph, and these values are registered as extra outputs of the graph (`Graph.registerOutput`).
The wrapper then passes each value through its tap, whose forward hooks see exactly what the submodule returned.
The rewritten graphs are compiled once per set of chosen layers.

A submodule called inside TorchScript control flow (an `if` or a loop) returns a value the graph's return cannot
see; its tap never fires and layer discovery reports it as not run. A submodule called twice fires its tap twice,
as eager hooks would.

A torch.export program (`.pt2`) is loaded with `torch.load` restricted to `weights_only=True` (its tensors are
plain data; a file that needs pickled objects is refused) and unflattened back into its module hierarchy
(`torch.export.unflatten`), whose submodules take forward hooks like any module.
"""
from __future__ import annotations

import contextlib
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import ModelLoadError

log = logging.getLogger(__name__)


class LayerTap(nn.Module):
    """Stands for one submodule of a scripted model: its forward returns the value the submodule returned, so
    forward hooks registered on it see the submodule's output."""

    def __init__(self, original_name: str):
        super().__init__()
        self.original_name = original_name  # the scripted submodule's class name, for the layer's type

    def forward(self, value: Any) -> Any:
        return value


class ScriptedLayers(nn.Module):
    """A TorchScript module whose submodules' outputs can be hooked (through `LayerTap`s of the same names)."""

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        # Not a child: the taps are the module tree that named_modules() shows; the script's own tree would repeat it.
        self.__dict__["script"] = script
        self.original_name = getattr(script, "original_name", type(script).__name__)
        self.__dict__["taps"] = {}
        for name, sub in script.named_modules():
            if not name:
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = self.taps[parent_name] if parent_name else self
            tap = LayerTap(getattr(sub, "original_name", type(sub).__name__))
            parent.add_module(leaf, tap)
            self.taps[name] = tap
        self.__dict__["_compiled"] = {}

    # The script holds the parameters and buffers: device moves, eval() and parameter queries go to it.
    def _apply(self, fn: Any, recurse: bool = True) -> ScriptedLayers:
        self.script._apply(fn)
        return self

    def train(self, mode: bool = True) -> ScriptedLayers:
        self.script.train(mode)
        return super().train(mode)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.script.parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        return self.script.named_parameters(*args, **kwargs)

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        return self.script.buffers(recurse)

    def forward(self, x: torch.Tensor) -> Any:
        wanted = tuple(name for name, tap in self.taps.items() if tap._forward_hooks or tap._forward_pre_hooks)
        if not wanted:
            return self.script(x)
        fn, order = self._compiled.get(wanted) or self._compile(wanted)
        out = fn(self.script._c, x)
        for name, value in zip(order, out[1:]):
            self.taps[name](value)
        return out[0]

    def _compile(self, wanted: tuple[str, ...]) -> tuple[Any, list[str]]:
        graph, order = expose_outputs(self.script, wanted)
        fn = torch._C._create_function_from_graph("forward_with_layers", graph)
        self._compiled[wanted] = (fn, order)
        log.info("compiled a TorchScript forward returning %d layer output(s) as well", len(order))
        return fn, order


def _path_of(value: Any, self_value: Any) -> str | None:
    """The dotted submodule path a graph value stands for ("" for the module itself), or None for other values."""
    if value.unique() == self_value.unique():
        return ""
    node = value.node()
    if node.kind() != "prim::GetAttr":
        return None
    parent = _path_of(node.input(), self_value)
    if parent is None:
        return None
    return f"{parent}.{node.s('name')}" if parent else node.s("name")


def _submodule(script: Any, path: str) -> Any:
    module = script
    for part in path.split("."):
        module = getattr(module, part)
    return module


def expose_outputs(script: torch.jit.ScriptModule, targets: tuple[str, ...]) -> tuple[Any, list[str]]:
    """A copy of `script`'s forward graph that returns (output, *values) where the values are what the submodules
    named in `targets` returned, one per call, in the returned order (a name repeats for a submodule called twice).
    """
    graph = script._c._get_method("forward").graph.copy()
    self_value = next(iter(graph.inputs()))
    values: dict[str, list[Any]] = {t: [] for t in targets}
    prefixes = {t.rsplit(".", i)[0] for t in targets for i in range(1, t.count(".") + 1)}

    def forward_calls() -> Iterator[tuple[Any, str]]:
        for node in graph.findAllNodes("prim::CallMethod", True):
            path = _path_of(node.inputsAt(0), self_value)
            if path is not None and node.s("name") == "forward":
                yield node, path

    # Inline the calls on the way to a target (its ancestors), outermost first, until every target's call is a
    # call of the top-level graph. An inlined target's value is the first output of its inlined body.
    while True:
        todo = next(((n, p) for n, p in forward_calls() if p in prefixes), None)
        if todo is None:
            break
        node, path = todo
        callee = _submodule(script, path)._c._get_method(node.s("name")).graph
        with graph.insert_point_guard(node):
            outs = graph.insertGraph(callee, list(node.inputs()))
        for old, new in zip(node.outputs(), outs):
            for t in values:  # a recorded value that this node produced is now the inlined body's value
                values[t] = [new if v.unique() == old.unique() else v for v in values[t]]
            old.replaceAllUsesWith(new)
        node.destroy()
        if path in values:
            values[path].append(outs[0])
    for node, path in forward_calls():
        if path in values:
            values[path].append(node.output())
    order = []
    for name in targets:
        for value in values[name]:
            # A value made inside an `if` or a loop is not visible at the graph's return.
            if value.node().owningBlock().owningNode() is None:
                graph.registerOutput(value)
                order.append(name)
            else:
                log.info("layer %s of the TorchScript model runs inside control flow: not exposed", name)
    graph.makeMultiOutputIntoTuple()
    graph.lint()
    return graph, order


# ---- torch.export programs -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _only_weights_only_loads(path: Path) -> Iterator[None]:
    """While a .pt2 loads, every torch.load is weights_only=True: torch.export.load unpickles some payloads (and
    falls back to a full unpickle), which would run whatever code the file holds."""
    real = torch.load

    def guarded(f: Any, *args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        if weights_only is False:
            raise ModelLoadError(
                "the torch.export file holds pickled Python objects, which are not loaded (they could run code)",
                file=path, fix="export the model with plain tensor weights (torch.export.save of an exported program)",
            )
        return real(f, *args, weights_only=True, **kwargs)

    torch.load = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real  # type: ignore[assignment]


def _require_dynamic_batch(program: Any, path: Path) -> None:
    """Extraction runs batches of any size; a program exported for one batch size refuses every other."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in inputs else None
        if isinstance(val, torch.Tensor) and val.ndim == 4 and isinstance(val.shape[0], int):
            raise ModelLoadError(
                f"the program was exported for batches of exactly {val.shape[0]} image(s)", file=path,
                fix="export it with a dynamic batch size: torch.export.export(model, (x,), "
                    "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) (x being forward's argument)",
            )


def _name_exported_modules(program: Any, module: nn.Module) -> None:
    """Unflattened submodules are all InterpreterModules: give each its original class name (from the program's
    module-stack metadata) as `original_name`, which layer discovery shows as the layer's type."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, type_name in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(str(fqn), str(type_name).rsplit(".", 1)[-1])
    for name, sub in module.named_modules():
        if name in types:
            sub.original_name = types[name]


def load_exported(path: Path) -> nn.Module:
    """A torch.export program saved with torch.export.save, as a module tree whose submodules take hooks."""
    if not zipfile.is_zipfile(path):
        raise ModelLoadError("not a torch.export archive (a .pt2 file is a zip archive)", file=path,
                             fix="save the program with torch.export.save(torch.export.export(model, (x,)), path)")
    try:
        with _only_weights_only_loads(path):
            program = torch.export.load(str(path))
        _require_dynamic_batch(program, path)
        module = torch.export.unflatten(program)
        _name_exported_modules(program, module)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the file is user input; any failure means it is unusable
        log.info("cannot load %s", path, exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read the torch.export program ({first[:300]})", file=path,
                             fix="save it again with torch.export.save with this version of torch") from None
    return module
