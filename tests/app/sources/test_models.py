from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from app.errors import ModelLoadError
from app.sources import models as M
from app.sources.models import (
    LayerInfo,
    LoadedModel,
    ModelSpec,
    Preprocess,
    discover_layers,
    load_model,
    parse_spec,
    unit_maps,
)
from app.sources.preprocess import PreprocessError, hf_preprocess_values

REPO = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------------- tiny models


class TinyNet(nn.Module):
    """conv -> relu (used twice) -> pool -> linear, plus a module that never runs."""

    def __init__(self, classes: int = 3, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        x = self.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class ScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ChannelsLastNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 5, 4, stride=4), Permute(), nn.LayerNorm(5))
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).mean((1, 2)))


TinyBuiltin = TinyNet  # registered as a built-in architecture by the tests below

FACTORY_SOURCE = """
import torch.nn as nn

def make_model():
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))

def not_a_model():
    return 42
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _hooks_left(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """torchvision mobilenet_v3_small with 5 classes, random weights, saved as .pth and .safetensors."""
    torch.manual_seed(0)
    import torchvision.models as tvm

    model = tvm.get_model("mobilenet_v3_small", weights=None, num_classes=5).eval()
    folder = tmp_path_factory.mktemp("tv")
    pth = folder / "mnv3.pth"
    torch.save(model.state_dict(), pth)
    st = folder / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    return model, pth, st


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                    image_size=32, patch_size=8, num_labels=3,
                    id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2})
    model = ViTForImageClassification(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, folder


# --------------------------------------------------------------------------------------------- specs


def test_parse_spec_kinds():
    assert parse_spec("torchvision:resnet18") == ModelSpec("torchvision", "resnet18", None)
    assert parse_spec(" TorchScript:/p/m.pt ") == ModelSpec("torchscript", "/p/m.pt", None)
    assert parse_spec("hf:/p/dir") == ModelSpec("hf", "/p/dir", None)
    assert parse_spec("python:/p/f.py:make_model") == ModelSpec("python", "/p/f.py", "make_model")
    assert parse_spec("builtin:shapes_cnn") == ModelSpec("builtin", "shapes_cnn", None)
    # A Windows drive letter must not be mistaken for the factory separator.
    assert parse_spec(r"python:C:\m\f.py:build").factory == "build"
    assert parse_spec(r"python:C:\m\f.py:build").target.endswith("f.py")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty"),
        ("resnet18", "kind"),
        ("torchvison:resnet18", "did you mean torchvision"),
        ("hf:", "no target"),
        ("python:/p/f.py", "function"),
    ],
)
def test_parse_spec_errors(spec, needle):
    with pytest.raises(ModelLoadError) as err:
        parse_spec(spec)
    assert needle in str(err.value)
    assert err.value.fix


def test_module_imports_neither_torch_nor_transformers():
    code = ("import sys, app.sources.models, app.sources.preprocess; "
            "print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------- preprocess


def test_preprocess_roundtrip_and_transform_values():
    pp = Preprocess(resize=8, crop=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert Preprocess.from_dict(pp.to_dict()) == pp
    assert json.loads(json.dumps(pp.to_dict()))["mean"] == [0.5, 0.25, 0.0]
    # A solid grey image: every pixel normalises to (v/255 - mean) / std; an L image becomes 3 channels.
    x = pp.transform()(Image.new("L", (16, 10), 102))
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    v = 102 / 255
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(v - 0.5) / 0.5, (v - 0.25) / 0.25, v]))


def test_preprocess_resize_modes():
    img = Image.new("RGB", (40, 20))
    # Shorter side to 10 keeps the aspect (20 x 10), a 10 crop cuts the middle; square warps to 10 x 10.
    for mode in ("shorter", "square"):
        pp = Preprocess(resize=10, crop=10, mean=(0, 0, 0), std=(1, 1, 1), resize_mode=mode)
        assert pp.transform()(img).shape == (3, 10, 10)
    # 6 x 2 with the two left columns white: warping keeps them, a centre crop of the unscaled image cuts them.
    pixels = Image.new("RGB", (6, 2))
    for x in (0, 1):
        for y in (0, 1):
            pixels.putpixel((x, y), (255, 255, 255))
    rows = {}
    for mode in ("square", "shorter"):
        pp = Preprocess(resize=2, crop=2, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", resize_mode=mode)
        rows[mode] = pp.transform()(pixels)[0, 0].tolist()
    assert rows == {"square": [1.0, 0.0], "shorter": [0.0, 0.0]}


@pytest.mark.parametrize(
    "bad",
    [
        {"resize": 0, "crop": 4, "mean": (0, 0, 0), "std": (1, 1, 1)},
        {"resize": 4, "crop": 4, "mean": (0, 0), "std": (1, 1, 1)},
        {"resize": 4, "crop": 4, "mean": (0, 0, 0), "std": (1, 0, 1)},
        {"resize": 4, "crop": 4, "mean": (0, 0, 0), "std": (1, 1, 1), "interpolation": "fancy"},
        {"resize": 4, "crop": 4, "mean": (0, 0, 0), "std": (1, 1, 1), "colour": 1},
        {"resize": 4, "mean": (0, 0, 0), "std": (1, 1, 1)},
    ],
)
def test_preprocess_rejects_bad_values(bad):
    with pytest.raises(PreprocessError):
        Preprocess.from_dict(bad)


def test_hf_preprocess_values_variants():
    vit = hf_preprocess_values({"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3,
                                "image_std": [0.5] * 3, "resample": 2})
    assert vit == {"resize": 224, "crop": 224, "resize_mode": "square", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                   "interpolation": "bilinear"}
    clip = hf_preprocess_values({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                                 "do_center_crop": True, "resample": 3})
    assert (clip["resize"], clip["crop"], clip["resize_mode"], clip["interpolation"]) == (
        224, 224, "shorter", "bicubic")
    deit = hf_preprocess_values({"size": {"height": 256, "width": 256}, "crop_size": {"height": 224, "width": 224},
                                 "do_center_crop": True})
    assert (deit["resize"], deit["crop"], deit["resize_mode"]) == (256, 224, "square")
    convnext = hf_preprocess_values({"size": {"shortest_edge": 224}, "crop_pct": 0.875})
    assert (convnext["resize"], convnext["crop"], convnext["resize_mode"]) == (256, 224, "shorter")
    old_int = hf_preprocess_values({"size": 384})
    assert (old_int["resize"], old_int["crop"], old_int["resize_mode"]) == (384, 384, "square")
    no_norm = hf_preprocess_values({"size": 8, "do_normalize": False, "image_mean": [0.5] * 3})
    assert no_norm["mean"] == (0.0, 0.0, 0.0) and no_norm["std"] == (1.0, 1.0, 1.0)
    # Non-square sizes cannot be expressed: resize/crop are left for overrides.
    assert "crop" not in hf_preprocess_values({"size": {"height": 224, "width": 320}})


# --------------------------------------------------------------------------------------------- torchvision


def test_torchvision_pth_and_safetensors_match_original(mobilenet):
    model, pth, st = mobilenet
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    for path in (pth, st):
        loaded = load_model("torchvision:mobilenet_v3_small", path)
        assert isinstance(loaded, LoadedModel) and loaded.kind == "torchvision"
        assert not loaded.module.training
        assert all(not p.requires_grad for p in loaded.module.parameters())
        assert loaded.weights_path == path
        assert loaded.fingerprint == _sha(path)
        assert loaded.class_names is None  # 5 classes: the ImageNet names do not apply
        assert loaded.preprocess == Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
        with torch.no_grad():
            got = loaded.forward(x)
        assert got.shape == (2, 5)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torchvision_nested_and_dataparallel_state_dict(mobilenet, tmp_path):
    model, _, _ = mobilenet
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    loaded = load_model("torchvision:mobilenet_v3_small", path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(x), model(x), rtol=0, atol=0)


def test_torchvision_imagenet_classes_and_safetensors_metadata(tmp_path):
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.get_model("squeezenet1_1", weights=None).eval()
    path = tmp_path / "sq.safetensors"
    save_file(model.state_dict(), path)
    loaded = load_model("torchvision:squeezenet1_1", path)
    assert len(loaded.class_names) == 1000 and loaded.class_names[0] == "tench"

    classes = [f"c{i}" for i in range(1000)]
    meta = {"neuron_studio.preprocess": json.dumps({"resize": 70, "crop": 64, "mean": [0.1, 0.2, 0.3],
                                                    "std": [1, 1, 1]}),
            "neuron_studio.classes": json.dumps(classes)}
    save_file(model.state_dict(), path, metadata=meta)
    loaded = load_model("torchvision:squeezenet1_1", path, preprocess_overrides={"crop": 60})
    assert loaded.class_names == classes
    assert (loaded.preprocess.resize, loaded.preprocess.crop, loaded.preprocess.mean) == (70, 60, (0.1, 0.2, 0.3))


def test_torchvision_refusals(mobilenet, tmp_path):
    model, pth, st = mobilenet
    cases: list[tuple[str, object, tuple[str, ...]]] = [
        ("torchvision:mobilenet_v3_small", None, ("--weights", "never downloads")),
        ("torchvision:mobilenet_v3_smal", pth, ("mobilenet_v3_small",)),
        ("torchvision:fasterrcnn_resnet50_fpn", pth, ("not an image classifier",)),
        ("torchvision:mobilenet_v3_small", tmp_path / "nope.pth", ("not found",)),
        ("torchvision:mobilenet_v3_small", tmp_path, ("folder",)),
        ("torchvision:mobilenet_v3_small", _truncate(pth, tmp_path / "half.pth"), ("truncated or corrupt",)),
        ("torchvision:mobilenet_v3_small", _truncate(st, tmp_path / "half.safetensors"),
         ("truncated or corrupt",)),
    ]
    (tmp_path / "w.onnx").write_bytes(b"x")
    cases.append(("torchvision:mobilenet_v3_small", tmp_path / "w.onnx", ("unknown weights format",)))
    for spec, weights, needles in cases:
        with pytest.raises(ModelLoadError) as err:
            load_model(spec, weights)
        for needle in needles:
            assert needle in str(err.value), (spec, weights, str(err.value))
        assert err.value.fix


def test_torchvision_refuses_pickled_objects(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(TinyNet(), whole)
    with pytest.raises(ModelLoadError) as err:
        load_model("torchvision:mobilenet_v3_small", whole)
    msg = str(err.value)
    assert "not plain weights" in msg and "will not unpickle" in msg and "TinyNet" in msg
    assert "state_dict()" in err.value.fix

    not_a_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(ModelLoadError, match="holds a list, not a state dict"):
        load_model("torchvision:mobilenet_v3_small", not_a_dict)
    meta_only = tmp_path / "meta.pth"
    torch.save({"epoch": 1, "lr": 0.1}, meta_only)
    with pytest.raises(ModelLoadError, match="'epoch', 'lr'"):
        load_model("torchvision:mobilenet_v3_small", meta_only)


def test_torchvision_key_and_shape_mismatches(mobilenet, tmp_path):
    model, _, _ = mobilenet
    sd = dict(model.state_dict())
    dropped = dict(sd)
    dropped.pop("features.0.0.weight")
    dropped["extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys.safetensors"
    save_file(dropped, path)
    with pytest.raises(ModelLoadError) as err:
        load_model("torchvision:mobilenet_v3_small", path)
    msg = str(err.value)
    assert "1 weights the architecture needs are missing ('features.0.0.weight')" in msg
    assert "1 weights in the file are not in the architecture ('extra.weight')" in msg

    resized = dict(sd)
    resized["features.0.0.weight"] = torch.zeros(16, 3, 5, 5)
    save_file(resized, path)
    with pytest.raises(ModelLoadError) as err:
        load_model("torchvision:mobilenet_v3_small", path)
    assert "'features.0.0.weight' has shape [16, 3, 5, 5] in the file but [16, 3, 3, 3]" in str(err.value)


def test_old_torch_is_refused_for_pickles():
    with pytest.raises(ModelLoadError, match="torch 2.9.1 cannot read pickled weights"):
        M._require_safe_torch("2.9.1")
    with pytest.raises(ModelLoadError):
        M._require_safe_torch("1.13.0")
    M._require_safe_torch("2.10.0")
    M._require_safe_torch("2.15.0+cu132")


def test_bad_overrides_and_device(mobilenet):
    _, pth, _ = mobilenet
    with pytest.raises(ModelLoadError, match="unknown preprocessing options"):
        load_model("torchvision:mobilenet_v3_small", pth, preprocess_overrides={"size": 3})
    with pytest.raises(ModelLoadError, match="preprocessing is unusable"):
        load_model("torchvision:mobilenet_v3_small", pth, preprocess_overrides={"std": [1, 0, 1]})
    with pytest.raises(ModelLoadError, match="cannot move the model"):
        load_model("torchvision:mobilenet_v3_small", pth, device="not-a-device")


# --------------------------------------------------------------------------------------------- torchscript


def test_torchscript_load_and_layers(tmp_path):
    torch.manual_seed(0)
    net = ScriptNet().eval()
    path = tmp_path / "m.pt"
    with pytest.warns(FutureWarning):
        torch.jit.script(net).save(str(path))
    loaded = load_model(f"torchscript:{path}", preprocess_overrides={"resize": 12, "crop": 10})
    assert loaded.fingerprint == _sha(path) and loaded.weights_path == path
    assert loaded.preprocess.mean == (0.485, 0.456, 0.406) and loaded.preprocess.crop == 10
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(x), net(x), rtol=0, atol=0)
    layers = discover_layers(loaded)
    assert [(l.name, l.kind, l.shape) for l in layers[:1]] == [("", "linear", (2,))]
    # the inner layers are found through the rewritten graph (tests/app/sources/test_scripted.py checks values)
    assert [(l.name, l.type, l.kind) for l in layers[1:]] == [("conv", "Conv2d", "conv"), ("fc", "Linear", "linear")]


def test_torchscript_refusals(tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save(ScriptNet().state_dict(), sd)
    with pytest.raises(ModelLoadError, match="not a TorchScript archive"):
        load_model(f"torchscript:{sd}")
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(f"torchscript:{_truncate(sd, tmp_path / 'half.pt')}")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(f"torchscript:{tmp_path / 'missing.pt'}")
    with pytest.raises(ModelLoadError, match="--weights is not used"):
        load_model(f"torchscript:{sd}", sd)


# --------------------------------------------------------------------------------------------- transformers


def test_hf_load_outputs_preprocess_and_layers(vit_folder):
    model, folder = vit_folder
    loaded = load_model(f"hf:{folder}")
    assert loaded.kind == "hf" and loaded.weights_path == folder
    assert loaded.class_names == ["cat", "dog", "fish"]
    assert loaded.preprocess == Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", "square")
    files = [folder / "config.json", folder / "model.safetensors"]
    lines = "".join(f"{p.name}\t{_sha(p)}\n" for p in files)
    assert loaded.fingerprint == hashlib.sha256(lines.encode()).hexdigest()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(x), model(pixel_values=x).logits, rtol=0, atol=0)

    layers = {l.name: l for l in discover_layers(loaded)}
    block = layers["vit.layers.0"]
    assert (block.kind, block.shape, block.units, block.grid, block.prefix_tokens) == (
        "vit", (17, 32), 32, (4, 4), 1)
    patches = layers["vit.embeddings.patch_embeddings"]
    assert (patches.kind, patches.grid, patches.prefix_tokens) == ("vit", (4, 4), 0)
    proj = layers["vit.embeddings.patch_embeddings.projection"]
    assert (proj.kind, proj.shape, proj.units, proj.grid) == ("conv", (32, 4, 4), 32, (4, 4))
    assert (layers["classifier"].kind, layers["classifier"].units) == ("linear", 3)
    assert layers[""].kind == "linear" and layers[""].shape == (3,)
    # The attention block returns a tuple; its first tensor is described.
    assert layers["vit.layers.0.attention"].kind == "vit"
    assert _hooks_left(loaded.module) == 0

    # Patch tokens laid back on their grid are exactly the patch-embedding convolution's map.
    outs = {}
    mods = dict(loaded.module.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
          for n in ("vit.embeddings.patch_embeddings", "vit.embeddings.patch_embeddings.projection",
                    "vit.layers.0")]
    with torch.no_grad():
        loaded.forward(x)
    for h in hs:
        h.remove()
    torch.testing.assert_close(unit_maps(patches, outs["vit.embeddings.patch_embeddings"]),
                               outs["vit.embeddings.patch_embeddings.projection"])
    maps = unit_maps(block, outs["vit.layers.0"])
    assert maps.shape == (2, 32, 4, 4)
    torch.testing.assert_close(maps[:, :, 1, 2], outs["vit.layers.0"][:, 1 + 1 * 4 + 2, :])


def test_hf_refusals(vit_folder, tmp_path):
    _, folder = vit_folder
    with pytest.raises(ModelLoadError, match="does not download"):
        load_model("hf:google/vit-base-patch16-224")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(f"hf:{tmp_path / 'empty'}")

    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    with pytest.raises(ModelLoadError, match="needs its own Python code"):
        load_model(f"hf:{remote}")

    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="holds no weights"):
        load_model(f"hf:{noweights}")

    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    sd.pop("classifier.weight")
    (noweights / "model.safetensors").unlink(missing_ok=True)
    save_file(sd, noweights / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="1 missing .*classifier.weight"):
        load_model(f"hf:{noweights}")

    _truncate(folder / "model.safetensors", noweights / "model.safetensors")
    with pytest.raises(ModelLoadError):
        load_model(f"hf:{noweights}")
    with pytest.raises(ModelLoadError, match="--weights is not used"):
        load_model(f"hf:{folder}", folder / "model.safetensors")


# --------------------------------------------------------------------------------------------- python factory


def test_python_factory_needs_trust_and_loads(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(FACTORY_SOURCE)
    spec = f"python:{src}:make_model"
    with pytest.raises(ModelLoadError) as err:
        load_model(spec)
    assert "runs this Python file" in str(err.value) and "--trust-code" in err.value.fix

    loaded = load_model(spec, trust_code=True, preprocess_overrides={"resize": 8, "crop": 8})
    assert loaded.weights_path is None and loaded.fingerprint == _sha(src)
    assert isinstance(loaded.module[0], nn.Conv2d)

    torch.manual_seed(3)
    trained = load_model(spec, trust_code=True).module
    for p in trained.parameters():
        p.data.normal_()
    weights = tmp_path / "net.safetensors"
    save_file(trained.state_dict(), weights, metadata={
        "neuron_studio.preprocess": json.dumps({"resize": 9, "crop": 8, "mean": [0, 0, 0], "std": [1, 1, 1]}),
        "neuron_studio.classes": json.dumps(["a", "b", "c"])})
    loaded = load_model(spec, weights, trust_code=True)
    assert loaded.class_names == ["a", "b", "c"] and loaded.preprocess.resize == 9
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(x), trained(x), rtol=0, atol=0)
    files = "".join(f"{p.name}\t{_sha(p)}\n" for p in (src, weights))
    assert loaded.fingerprint == hashlib.sha256(files.encode()).hexdigest()


def test_python_factory_errors(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(FACTORY_SOURCE)
    with pytest.raises(ModelLoadError, match="no function named 'nope'") as err:
        load_model(f"python:{src}:nope", trust_code=True)
    assert "make_model" in err.value.fix
    with pytest.raises(ModelLoadError, match="returned int, not a torch.nn.Module"):
        load_model(f"python:{src}:not_a_model", trust_code=True)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ModelLoadError, match="importing the file failed: RuntimeError: boom"):
        load_model(f"python:{broken}:make", trust_code=True)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(f"python:{tmp_path / 'none.py'}:make", trust_code=True)


# --------------------------------------------------------------------------------------------- builtin


@pytest.fixture
def tiny_builtin(monkeypatch, tmp_path):
    monkeypatch.setitem(M.BUILTIN_ARCHITECTURES, "tiny_test", "tests.app.sources.test_models:TinyBuiltin")
    torch.manual_seed(4)
    net = TinyBuiltin(classes=2, width=6).eval()
    meta = {
        "neuron_studio.architecture": "tiny_test",
        "neuron_studio.arch_kwargs": json.dumps({"classes": 2, "width": 6}),
        "neuron_studio.preprocess": json.dumps({"resize": 20, "crop": 16, "mean": [0.4, 0.4, 0.4],
                                                "std": [0.2, 0.2, 0.2]}),
        "neuron_studio.classes": json.dumps(["circle", "square"]),
    }
    path = tmp_path / "tiny.safetensors"
    save_file(net.state_dict(), path, metadata=meta)
    return net, path, meta


def test_builtin_loads_from_metadata(tiny_builtin):
    net, path, _ = tiny_builtin
    loaded = load_model("builtin:tiny_test", path)
    assert loaded.class_names == ["circle", "square"]
    assert loaded.preprocess == Preprocess(20, 16, (0.4,) * 3, (0.2,) * 3)
    assert loaded.fingerprint == _sha(path)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(x), net(x), rtol=0, atol=0)
    assert load_model("builtin:tiny_test", path, preprocess_overrides={"crop": 12}).preprocess.crop == 12


def test_builtin_refusals(tiny_builtin, tmp_path):
    net, path, meta = tiny_builtin
    with pytest.raises(ModelLoadError, match="needs its weights"):
        load_model("builtin:tiny_test")
    with pytest.raises(ModelLoadError, match="no built-in architecture named 'tiny_tset'") as err:
        load_model("builtin:tiny_tset", path)
    assert "tiny_test" in err.value.fix
    pth = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), pth)
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        load_model("builtin:tiny_test", pth)
    bare = tmp_path / "bare.safetensors"
    save_file(net.state_dict(), bare)
    with pytest.raises(ModelLoadError, match="not written by Neuron Studio"):
        load_model("builtin:tiny_test", bare)
    other = tmp_path / "other.safetensors"
    save_file(net.state_dict(), other, metadata={**meta, "neuron_studio.architecture": "shapes_cnn"})
    with pytest.raises(ModelLoadError, match="weights for builtin:shapes_cnn, not builtin:tiny_test"):
        load_model("builtin:tiny_test", other)
    wrong_kwargs = tmp_path / "wide.safetensors"
    save_file(net.state_dict(), wrong_kwargs, metadata={**meta, "neuron_studio.arch_kwargs": '{"width": 8}'})
    with pytest.raises(ModelLoadError, match="shape"):
        load_model("builtin:tiny_test", wrong_kwargs)
    bad_classes = tmp_path / "classes.safetensors"
    save_file(net.state_dict(), bad_classes, metadata={**meta, "neuron_studio.classes": '{"a": 1}'})
    with pytest.raises(ModelLoadError, match="not a JSON list"):
        load_model("builtin:tiny_test", bad_classes)


# --------------------------------------------------------------------------------------------- layers


def test_discover_layers_conv_linear_and_other(tiny_builtin):
    _, path, _ = tiny_builtin
    loaded = load_model("builtin:tiny_test", path)
    layers = discover_layers(loaded)
    assert [l.name for l in layers] == [n for n, _ in loaded.module.named_modules()]
    by = {l.name: l for l in layers}
    assert by["conv"] == LayerInfo("conv", "Conv2d", (6, 16, 16), "conv", 6, (16, 16))
    assert by["conv2"] == LayerInfo("conv2", "Conv2d", (6, 8, 8), "conv", 6, (8, 8))
    assert by["pool"] == LayerInfo("pool", "AdaptiveAvgPool2d", (6, 1, 1), "conv", 6, (1, 1))
    assert by["fc"] == LayerInfo("fc", "Linear", (2,), "linear", 2, (1, 1))
    assert (by["relu"].kind, by["relu"].calls) == ("other", 2) and "2 times" in by["relu"].note
    assert (by["unused"].kind, by["unused"].calls, by["unused"].shape) == ("other", 0, ())
    assert _hooks_left(loaded.module) == 0


def test_discover_layers_removes_hooks_when_forward_fails(tiny_builtin):
    _, path, _ = tiny_builtin
    loaded = load_model("builtin:tiny_test", path)
    loaded.module.conv = nn.Conv2d(5, 6, 3, padding=1)  # now expects 5 channels: the dry run must fail
    with pytest.raises(ModelLoadError, match="test pass of one 16x16 image"):
        discover_layers(loaded)
    assert _hooks_left(loaded.module) == 0


def test_channels_last_layers(tmp_path):
    src = tmp_path / "cl.py"
    src.write_text("from tests.app.sources.test_models import ChannelsLastNet\n")
    loaded = load_model(f"python:{src}:ChannelsLastNet", trust_code=True,
                        preprocess_overrides={"resize": 16, "crop": 16})
    by = {l.name: l for l in discover_layers(loaded)}
    norm = by["stem.2"]
    assert (norm.kind, norm.units, norm.grid, norm.channels_last, norm.shape) == ("conv", 5, (4, 4), True, (4, 4, 5))
    out = torch.arange(2 * 4 * 4 * 5, dtype=torch.float32).reshape(2, 4, 4, 5)
    maps = unit_maps(norm, out)
    assert maps.shape == (2, 5, 4, 4)
    assert maps[1, 3, 2, 1] == out[1, 2, 1, 3]


def test_unit_maps_conversions():
    lin = LayerInfo("fc", "Linear", (3,), "linear", 3, (1, 1))
    y = torch.randn(2, 3)
    torch.testing.assert_close(unit_maps(lin, y), y[:, :, None, None])
    conv = LayerInfo("c", "Conv2d", (3, 2, 2), "conv", 3, (2, 2))
    z = torch.randn(2, 3, 2, 2)
    assert unit_maps(conv, (z, None)) is z
    vit = LayerInfo("b", "Block", (6, 4), "vit", 4, (2, 2), prefix_tokens=2)
    tokens = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    maps = unit_maps(vit, {"last_hidden_state": tokens})
    assert maps.shape == (2, 4, 2, 2)
    # Patch k (after 2 prefix tokens) sits at row k // 2, column k % 2.
    for k in range(4):
        torch.testing.assert_close(maps[:, :, k // 2, k % 2], tokens[:, 2 + k, :])
    # A larger input (4 x 4 grid) still maps onto a square grid.
    assert unit_maps(vit, torch.zeros(1, 18, 4)).shape == (1, 4, 4, 4)
    with pytest.raises(ModelLoadError, match="does not fit"):
        unit_maps(vit, torch.zeros(1, 7, 4))
    with pytest.raises(ModelLoadError, match="does not fit"):
        unit_maps(lin, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ModelLoadError, match="no units to label"):
        unit_maps(LayerInfo("r", "ReLU", (), "other", 0, None, note="runs 2 times"), y)


def test_prefix_token_inference():
    assert M._prefix_tokens(197, None) == 1
    assert M._prefix_tokens(261, 256) == 5  # CLS + 4 registers, told by the patch size
    assert M._prefix_tokens(3136, None) == 0
    assert M._prefix_tokens(50, None) == 1
    assert M._prefix_tokens(198, 196) == 2  # DeiT: CLS + distillation token
