"""Export a model with units ablated, the ablation folded into the weights of the next layer that reads them
(a Linear head or a convolution), so that the edited model needs no hooks. A fold is kept only when the folded
model's outputs equal the hooked ablation's on probe inputs. Where the architecture does not allow it (a residual
connection also reads the units, a normalisation sits between, a padded convolution reads a constant) the file
holds the model's own weights and the edit as metadata (layer, units, axis, values): a wrapper that the model
loader re-applies as a forward hook (`instrument.install_edit`), so the edited file needs no code to be trusted
and loads like the original, edited. Both are safetensors, never pickle."""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.errors import JobError

log = logging.getLogger(__name__)

class NotFoldable(JobError):
    """The architecture does not let the ablation be folded into the next layer's weights."""


PROBE_IMAGES = 4
TOLERANCE = 1e-4  # float32 logits of a folded and a hooked model differ only by summation order


def _execution_order(module: Any, x: Any) -> list[str]:
    """Names of the leaf modules in the order a forward pass runs them."""
    import torch

    from app.sources import instrument

    order: list[str] = []
    leaves = [name for name, m in module.named_modules() if name and not list(m.children())]
    with instrument.watch(module, leaves, lambda name, _out: order.append(name)), torch.no_grad():
        module(x)
    return order


def _fold_into(target: Any, units: Sequence[int], values: Any) -> None:
    """Zero the target's weights that read `units` and add what the ablated value contributed to its bias."""
    import torch

    idx = torch.as_tensor(list(units), dtype=torch.long)
    w = target.weight.data
    v = torch.as_tensor(values, dtype=w.dtype).expand(len(units)) if torch.as_tensor(values).ndim == 0 \
        else torch.as_tensor(values, dtype=w.dtype)
    read = w[:, idx]
    contribution = (read * v.reshape((1, -1) + (1,) * (read.ndim - 2))).flatten(1).sum(1)
    if bool((contribution != 0).any()):
        if target.bias is None:
            raise NotFoldable("the next layer has no bias to take the ablated units' constant value",
                              fix="use --mode zero to export this edit folded")
        target.bias.data += contribution
    w[:, idx] = 0


def fold_ablation(model: Any, layer: str, units: Sequence[int], *, axis: int, values: Any = 0.0
                  ) -> tuple[Any, str]:
    """(a folded copy of `model.module`, the name of the layer the ablation was folded into). `model` is a
    LoadedModel (its `forward` and `preprocess` give the probe inputs)."""
    import torch

    from app.sources import instrument

    torch.manual_seed(0)
    x = torch.randn(PROBE_IMAGES, 3, int(model.preprocess.crop), int(model.preprocess.crop))
    with torch.no_grad(), instrument.ablate(model.module, layer, units, axis=axis, values=values):
        want = model.forward(x)
    order = _execution_order(model.module, x)
    modules = dict(model.module.named_modules())
    leaves_of_layer = [n for n in order if n == layer or n.startswith(layer + ".")] if layer else []
    if not leaves_of_layer:
        raise JobError(f"layer {layer!r} did not run as a module of the model, so nothing can be folded",
                       fix="ablate a module layer (not the model output)")
    after = order[max(order.index(n) for n in leaves_of_layer) + 1:]
    n_units = None
    tried: list[str] = []
    for name in after:
        m = modules[name]
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1:
            n_units = m.in_channels
        elif isinstance(m, torch.nn.Linear):
            n_units = m.in_features
        else:
            continue
        if max(units, default=-1) >= n_units:
            tried.append(f"{name} reads {n_units} inputs")
            continue
        original = model.module
        folded = copy.deepcopy(original)
        _fold_into(dict(folded.named_modules())[name], units, values)
        try:
            model.module = folded
            with torch.no_grad():
                got = model.forward(x)
        finally:
            model.module = original
        if torch.allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE):
            return folded, name
        tried.append(f"{name} gives other outputs than the ablation")
        break  # only the first layer that reads the units can take them: later ones read something else
    raise NotFoldable(
        f"the ablation of {layer} cannot be folded into the next layer's weights ({'; '.join(tried) or 'no Linear or Conv2d reads it'})",
        fix="ablate the output of a block that a convolution or the linear head reads directly (e.g. after "
            "its ReLU), or use --mode zero")


def source_metadata(weights_path: str | None) -> dict[str, str]:
    """The metadata of the model's own safetensors file (a built-in architecture is loaded by it), else none."""
    if not weights_path or Path(weights_path).suffix.lower() != ".safetensors" or not Path(weights_path).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(weights_path, framework="pt") as f:
        return dict(f.metadata() or {})


def save_safetensors(module: Any, path: Path, edit: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """The module's state dict, with the source file's metadata kept (so the file loads as the original did) and
    the edit described under `neuron_studio.edit`."""
    from safetensors.torch import save_file

    from app.sources.models import META_EDIT

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={**(metadata or {}), META_EDIT: json.dumps(edit)})


def save_edited_model(project_path: str | Path, options: Any, units: Sequence[int], path: Path,
                      model: Any = None) -> str:
    """Write the project's model with `units` of `options.layer` ablated (as `options.mode`) to `path`
    (.safetensors); returns a line saying what was written."""
    import torch

    from app.engine.extract import layer_info, load_project_model
    from app.project.store import Project
    from app.sources import instrument

    if path.suffix.lower() != ".safetensors":
        raise JobError(f"{path}: the edited model is written as safetensors", fix="name the file FILE.safetensors")
    with Project.open(project_path, readonly=True) as project:
        model_row = project.model(options.model)
        layer_row = project.layer(int(model_row["id"]), options.layer)
        pooled_mean = None
        if options.mode == "mean":
            from app.engine.results import LayerResults

            pooled_mean = LayerResults.load(project, int(layer_row["id"])).pooled_mean
    model = model if model is not None else load_project_model(model_row, torch.device("cpu"))
    info = layer_info(layer_row)
    values = instrument.ablation_values(options.mode, units, pooled_mean=pooled_mean, constant=options.constant)
    source = source_metadata(model_row["weights_path"])
    if _is_wrapper(source):
        raise JobError(f"{model_row['weights_path']} is itself an edited model saved as a wrapper: a second edit "
                       "would replace its first", fix="ablate every unit at once on the model it was saved from")
    edit = {"model": model_row["name"], "spec": model_row["spec"], "layer": info.name, "units": list(units),
            "mode": options.mode}
    how = write_edited(model, info.name, units, instrument.unit_axis(info.kind, info.channels_last), values, path,
                       edit, source)
    return f"wrote {path}: {model_row['name']} with {len(units)} unit(s) of {info.name} ablated, {how}"


def _is_wrapper(metadata: dict[str, str]) -> bool:
    from app.sources.models import META_EDIT

    try:
        return json.loads(metadata.get(META_EDIT, "{}")).get("applied") == "wrapper"
    except (ValueError, AttributeError):
        return False


def write_edited(model: Any, layer: str, units: Sequence[int], axis: int, values: Any, path: Path,
                 edit: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """Writes the edited model to `path`: folded into the next layer's weights where that reproduces the ablation,
    else as a wrapper (the model's own weights, the edit in the metadata for the loader to apply). Returns how."""
    try:
        folded, into = fold_ablation(model, layer, units, axis=axis, values=values)
    except NotFoldable as exc:
        vals = values.tolist() if hasattr(values, "tolist") else float(values)
        save_safetensors(model.module, path, {**edit, "layer": layer, "units": [int(u) for u in units],
                                              "applied": "wrapper", "axis": axis, "values": vals,
                                              "why": exc.problem}, metadata)
        return (f"as a wrapper that the model loader applies (not foldable into the weights: {exc.problem}); load "
                f"it with `neuron-studio add-model` and the model's spec")
    save_safetensors(folded, path, {**edit, "applied": "folded", "folded_into": into}, metadata)
    return f"folded into {into}"
