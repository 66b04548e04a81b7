"""Hugging Face in and out: logits of imported and exported models match transformers."""

import json

import pytest
import torch
import transformers

from shoggoth.lm.checkpoint import ModelDirError, load_pretrained, save_pretrained
from shoggoth.lm.model import GPT, GPTConfig

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
KINDS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24, tie_word_embeddings=True)),
    # Llama 3.1/3.2's long-context RoPE frequencies (their config.json's rope_scaling), at a toy original length
    "llama3.1": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8})),
}


def randomize(model):
    # Random norms and biases too, so that a swapped or dropped weight shows in the logits.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers(kind, tmp_path):
    cfg_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**SHAPE, **extra)).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.qkv_bias == (kind == "qwen2") and ours.config.qk_norm == (kind == "qwen3")
    assert bool(ours.config.rope_scaling) == (kind == "llama3.1")
    idx = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, tie_embeddings=False), dict(qk_norm=True, head_dim=24),
                                dict(rope_theta=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                            original_max_position_embeddings=8))])
def test_export_loads_in_transformers(kw, tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64, **kw)).eval()
    randomize(ours)
    save_pretrained(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == kw.get("rope_theta", 10000.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff
    again = load_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_bad_model_dirs(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelDirError, match="'gpt2' is not supported"):
        load_pretrained(tmp_path)
    save_pretrained(GPT(GPTConfig(vocab_size=50, n_layer=1, n_embd=32, n_head=2)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="has shape"):
        load_pretrained(tmp_path)


def test_malformed_model_files_are_named(tmp_path):
    save_pretrained(GPT(GPTConfig(vocab_size=50, n_layer=1, n_embd=32, n_head=2)), tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for cfg, says in [([1, 2], "expected a JSON object, got list"), (42, "got int"),
                      ({k: v for k, v in good.items() if k != "hidden_size"}, "hidden_size must be a positive integer"),
                      ({**good, "num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer"),
                      ({**good, "num_key_value_heads": 0}, "num_key_value_heads must be a positive integer")]:
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelDirError, match=says):
            load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(good))
    weights = (tmp_path / "model.safetensors").read_bytes()
    for bad in (weights[:500], b"", b"\x00garbage" * 100):
        (tmp_path / "model.safetensors").write_bytes(bad)
        with pytest.raises(ModelDirError, match="not a readable safetensors file"):
            load_pretrained(tmp_path)
