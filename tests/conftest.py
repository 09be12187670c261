"""Shared fixtures: tiny random models of every supported architecture, and the built-in model."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Small configs, one per adapter. Heads/KV heads differ (GQA) wherever the architecture allows.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256, head_dim=16),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=1, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256, head_dim=16),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256, head_dim=16),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256,
                        head_dim=16, sliding_window=32),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256,
                 pad_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_hidden_layers=2, vocab_size=128, max_position_embeddings=256, rotary_pct=0.5),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=256),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=96, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=64),
}
ROPE_ARCHS = [a for a in TINY_CONFIGS if a not in ("gpt2", "opt")]


def make_tiny_model(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[arch])
    model_type = cfg.pop("model_type")
    cfg.setdefault("bos_token_id", 1)
    cfg.setdefault("eos_token_id", 1)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    return model


@pytest.fixture(params=list(TINY_CONFIGS))
def tiny_arch(request):
    return request.param


@pytest.fixture(scope="session")
def builtin_model():
    """SmolLM2-135M-Instruct (float32), loaded once per test session."""
    from mvquant.loading import load_model
    return load_model("smollm2-135m")


class ToyTokenizer:
    """A byte-level tokenizer for tiny models (vocab 128): enough for calibration and eval plumbing."""
    pad_token_id = 0
    eos_token_id = 1
    pad_token = "<pad>"
    eos_token = "<eos>"

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [2 + (b % 126) for b in text.encode("utf-8")]}

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def toy_tokenizer():
    return ToyTokenizer()


def make_tiny_tokenizer():
    """A real (savable) character-level fast tokenizer: 98 ids, fits every tiny config's vocab of 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(arch: str, path, seed: int = 0):
    """Write a tiny random model + tokenizer as a transformers directory (for CLI / loading tests)."""
    model = make_tiny_model(arch, seed=seed)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: tiny_model_dir('llama') -> path of a saved tiny model directory."""
    def make(arch: str = "llama", seed: int = 0):
        return save_tiny_model(arch, tmp_path / f"tiny-{arch}", seed=seed)
    return make
