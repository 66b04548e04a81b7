"""The tiny real-family model directories of hf_families load in transformers and behave like the real ones."""

import json

import pytest
import transformers

import hf_families

HI = [{"role": "user", "content": "Hi there"}]
ARCH = {"smollm2": "LlamaForCausalLM", "qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "llama3": "LlamaForCausalLM", "plain": "LlamaForCausalLM"}
# What apply_chat_template(HI, add_generation_prompt=True) must contain.
MARKERS = {
    "smollm2": ["<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"],
    "qwen2.5": ["<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"],
    "qwen3": ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"],
    "llama3": ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n",
               "Today Date: ", "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"],
    "plain": ["<|user|>\nHi there</s>\n<|assistant|>\n"],
}
# (bos, eos, pad, unk) token strings of the tokenizer.
SPECIAL = {
    "smollm2": ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"),
    "qwen2.5": (None, "<|im_end|>", "<|endoftext|>", None),
    "qwen3": (None, "<|im_end|>", "<|endoftext|>", None),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", None, None),
    "plain": ("<s>", "</s>", None, "<unk>"),
}
# generation_config.json's eos_token_id, as token strings.
GEN_EOS = {"smollm2": "<|im_end|>", "qwen2.5": ["<|im_end|>", "<|endoftext|>"], "qwen3": ["<|im_end|>", "<|endoftext|>"],
           "llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "plain": "</s>"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in hf_families.FAMILIES:
        d = hf_families.build(family, root / family)
        out[family] = (d, transformers.AutoTokenizer.from_pretrained(d))
    return out


@pytest.mark.parametrize("family", hf_families.FAMILIES)
def test_family_loads_and_renders(family, built):
    d, tok = built[family]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / name).exists(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert type(model).__name__ == cfg["architectures"][0] == ARCH[family]
    assert cfg["vocab_size"] % 64 == 0 and len(tok) <= cfg["vocab_size"] < len(tok) + 64 and 400 <= len(tok) <= 600
    assert "rope_scaling" not in cfg or cfg["rope_scaling"] is None
    assert cfg["rope_parameters"]["rope_type"] == ("llama3" if family == "llama3" else "default")

    text = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    for marker in MARKERS[family]:
        assert marker in text, (marker, text)
    assert "{% generation" not in tok.chat_template
    ids = tok.apply_chat_template(HI, add_generation_prompt=True)["input_ids"]
    assert tok.decode(ids) == text
    # Every special marker of the rendering is one token, as in the real tokenizer.
    for token in ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "</s>"):
        if token in text:
            assert tok.convert_tokens_to_ids(token) in ids

    bos, eos, pad, unk = SPECIAL[family]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (bos, eos, pad, unk)
    gen = json.loads((d / "generation_config.json").read_text())
    want = GEN_EOS[family]
    assert gen["eos_token_id"] == (tok.convert_tokens_to_ids(want) if isinstance(want, str) else [tok.convert_tokens_to_ids(t) for t in want])


def test_family_specifics(built):
    d, tok = built["smollm2"]
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.apply_chat_template(HI, add_generation_prompt=True)["input_ids"][0] == 1
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())

    d, tok = built["qwen2.5"]
    assert tok.bos_token_id is None and tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>") != tok.eos_token_id
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["pad_token_id"] == tok.pad_token_id
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is True
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())

    d, tok = built["qwen3"]
    assert (d / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((d / "tokenizer_config.json").read_text())
    assert json.loads((d / "config.json").read_text())["head_dim"] == 32
    no_think = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok("<think>\nhmm</think>")["input_ids"][0] == tok.convert_tokens_to_ids("<think>")
    reply = [*HI, {"role": "assistant", "content": "Hello", "reasoning_content": "hmm"}]
    assert tok.apply_chat_template(reply, tokenize=False).endswith("<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|im_end|>\n")

    d, tok = built["llama3"]
    ids = tok.apply_chat_template(HI, add_generation_prompt=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok("Hi there")["input_ids"][0] == tok.bos_token_id  # tokenizer.json's post-processor adds BOS
    assert "pad_token_id" not in json.loads((d / "generation_config.json").read_text())

    d, tok = built["plain"]
    assert (d / "chat_template.jinja").exists()
    text = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>" not in text and "<|start_header_id|>" not in text


def test_strict_template_rejects_system(tmp_path):
    d = hf_families.build_strict(tmp_path / "strict")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *HI], add_generation_prompt=True)
    transformers.AutoModelForCausalLM.from_pretrained(d)


def test_build_is_deterministic(tmp_path):
    a, b = hf_families.build("qwen2.5", tmp_path / "a"), hf_families.build("qwen2.5", tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    with pytest.raises(ValueError, match="unknown family"):
        hf_families.build("gpt2", tmp_path / "c")
