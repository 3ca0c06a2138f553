"""Tiny random transformers language models written to a folder with save_pretrained, for fast tests: a
VisionEncoderDecoder captioner (small ViT + GPT-2 decoder) and a GPT-2 causal LM, each with its own word-level
tokenizer (the two vocabularies number the words differently, as two real models would)."""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ["red", "green", "blue", "circle", "square", "star", "ring", "on", "the", "a", "water", "grass", "small"]


def word_tokenizer(words: list[str], path: Path, specials: dict[str, str], reverse: bool = False):
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for tok in dict.fromkeys(specials.values()):
        vocab[tok] = len(vocab)
    for w in (reversed(words) if reverse else words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(path)
    return fast


def make_captioner(path: Path, *, set_captioner: bool = True, image_size: int = 16, seed: int = 0,
                   words: list[str] = WORDS, sharpness: float = 1.0) -> Path:
    """A random captioner folder; `sharpness` scales the output layer (peakier next-token distributions)."""
    import torch
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(words, path, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                       "unk_token": "<unk>"})
    enc = tf.ViTConfig(image_size=image_size, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)
    dec = tf.GPT2Config(vocab_size=len(tok), n_positions=40, n_embd=24, n_layer=1, n_head=2,
                        add_cross_attention=True, is_decoder=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = tf.VisionEncoderDecoderModel(config=cfg)
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(sharpness)
    model.save_pretrained(path)
    tf.ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    if set_captioner:
        cfg_file = path / "config.json"
        config = json.loads(cfg_file.read_text())
        config["neuron_studio_set_captioner"] = True
        cfg_file.write_text(json.dumps(config))
    return path


def make_lm(path: Path, seed: int = 1, words: list[str] = WORDS) -> Path:
    import torch
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(words, path, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                       "unk_token": "<|unk|>"}, reverse=True)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_positions=40, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(path)
    return path
