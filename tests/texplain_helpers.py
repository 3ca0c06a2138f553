"""Tiny pieces for the TExplain tests: a captioned COCO dataset with a planted spurious cue, a tiny word-level
GPT-2 trained on its captions, and a tiny CNN trained on it (all in tmp_path, in seconds, offline)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 16
CLASSES = ("circle", "square", "cross")
BACKGROUNDS = {"blue": (30, 40, 220), "green": (40, 170, 50), "red": (210, 40, 40), "gray": (120, 120, 120)}


def _shape_mask(shape: str, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1)
    return ((abs(yy - cy) <= 1) & (abs(xx - cx) <= r)) | ((abs(xx - cx) <= 1) & (abs(yy - cy) <= r))


def write_cue_dataset(root: Path, n: int = 180, seed: int = 0, cue_prob: float = 0.9) -> Path:
    """n images of a white circle, square or cross. Circles lie on a blue background with probability cue_prob;
    squares and crosses never do (their background is green, red or gray). Two captions per image name the shape
    and the background; every image entry carries its "class" (the COCO extension the reader understands)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, caps = [], []
    others = [b for b in BACKGROUNDS if b != "blue"]
    for i in range(n):
        label = i % len(CLASSES)
        shape = CLASSES[label]
        if shape == "circle" and rng.random() < cue_prob:
            bg = "blue"
        else:
            bg = others[int(rng.integers(len(others)))]
        img = np.empty((SIZE, SIZE, 3), np.float32)
        img[:] = BACKGROUNDS[bg]
        img += rng.normal(0, 8, img.shape)
        r = int(rng.integers(4, 6))
        cx, cy = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, 2))
        img[_shape_mask(shape, cx, cy, r)] = 245
        name = f"{i:04d}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE, "label": label,
                       "class": shape})
        caps.append({"id": 2 * i + 1, "image_id": i + 1, "caption": f"a {shape} on {bg}"})
        caps.append({"id": 2 * i + 2, "image_id": i + 1, "caption": f"a white {shape} in front of {bg}"})
    cats = [{"id": j + 1, "name": c, "supercategory": "object"} for j, c in enumerate(CLASSES)]
    info = {"classes": list(CLASSES)}
    (root / "annotations" / "instances.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": [], "categories": cats}))
    (root / "annotations" / "captions.json").write_text(json.dumps({"info": info, "images": images,
                                                                    "annotations": caps}))
    (root / "classes.json").write_text(json.dumps(list(CLASSES)))
    return root


def save_word_lm(folder: Path, texts: list[str], n_layer: int = 1, n_embd: int = 32, seed: int = 0):
    """An untrained word-level GPT-2 with its tokenizer, saved as a regular transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="[UNK]", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model, fast


def train_word_lm(folder: Path, texts: list[str], steps: int = 120, seed: int = 0) -> Path:
    """A tiny GPT-2 trained on `texts` (start token, words, end-of-text) for a few steps: enough to make
    caption-like sentences, small enough for a unit test."""
    model, fast = save_word_lm(folder, texts, seed=seed)
    rows = [[0] + fast(t, add_special_tokens=False)["input_ids"] + [0] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, 1:len(r)] = torch.tensor(r[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        b = torch.randint(len(rows), (64,), generator=gen)
        loss = model(input_ids=ids[b], labels=labels[b]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    return folder
