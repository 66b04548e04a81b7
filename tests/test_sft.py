"""SFT: chat template parity with transformers, the loss mask, packing, bad input, a tiny run."""

import json

import numpy as np
import pytest
import torch
import transformers

from common import bible_corpus, interrupt_and_resume, shoggoth, tiny_model_dir
from shoggoth.lm import checkpoint, tokenizer
from shoggoth.data.conversations import (chatterbot_conversations, collate, conversation, encode_conversations, pack,
                                         read_conversations)
from shoggoth.train import metrics
from shoggoth.lm.model import GPT, Documents, GPTConfig

CONVS = [
    [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "The science of thinking machines."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Hello! é 😀\n"}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "Fine, thanks <|pad|> <b>x</b>"}],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "m")


def test_chat_template_matches_transformers(model_dir):
    tok = tokenizer.load(model_dir)
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert (model_dir / "chat_template.jinja").read_text() == tokenizer.CHAT_TEMPLATE
    for conv in CONVS:
        want = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = tok.render_chat(conv)
        assert ids == want["input_ids"] and mask == want["assistant_masks"]
        gen = hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
        assert tok.render_chat(conv[:-1], add_generation_prompt=True)[0] == gen["input_ids"]
    # The mask covers exactly the assistant texts and their end-of-turn tokens.
    ids, mask = tok.render_chat(CONVS[1])
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == \
        " Hello! é 😀\n<|im_end|>Fine, thanks <|pad|> <b>x</b><|im_end|>"


def test_no_user_or_padding_token_is_trained(model_dir):
    tok = tokenizer.load(model_dir)
    examples, _ = encode_conversations(CONVS, tok, 128)
    for conv, (ids, labels) in zip(CONVS, examples):
        _, mask = tok.render_chat(conv)
        trained = labels != -100
        # Position t is trained iff token t+1 is assistant text or its <|im_end|>.
        assert np.array_equal(trained[:-1], np.array(mask[1:]) == 1) and not trained[-1]
        assert np.array_equal(labels[trained], ids[1:][trained[:-1]])
    model = checkpoint.load_pretrained(model_dir).eval()
    rows = pack(examples, 128, [0, 2, 1])
    assert rows == [[0, 2], [1]]  # two short examples share a row
    ids, labels, pos, seg = collate(examples, rows, 128, tok.pad_id)
    mask = Documents(seg)
    used = [sum(len(examples[i][0]) for i in row) for row in rows]
    padding = torch.arange(128)[None] >= torch.tensor(used)[:, None]
    assert padding.any() and (ids[padding] == tok.pad_id).all() and (labels[padding] == -100).all()
    packed = model(ids, labels, pos=pos, mask=mask)
    # Attention stays inside each example: the packed loss is the token-weighted mean of
    # each example's loss alone; garbage in the padding changes nothing.
    alone = [(model(torch.tensor(x)[None], torch.tensor(y)[None]).item(), (y != -100).sum()) for x, y in examples]
    expect = sum(l * n for l, n in alone) / sum(n for _, n in alone)
    assert abs(packed.item() - expect) < 1e-4
    noisy = ids.clone()
    noisy[padding] = torch.randint(5, 200, (int(padding.sum()),))
    assert abs(model(noisy, labels, pos=pos, mask=mask).item() - packed.item()) < 1e-5


@pytest.mark.parametrize("lengths", [[[5, 17, 9], [40], [1, 2, 30]], [[3] * 13, [20, 20], [7, 11, 2, 9]]])
def test_documents_attention_is_the_block_diagonal_mask(lengths):
    """Packed documents attend only to themselves: Documents (gathered per document, no (T, T)
    mask) gives the dense block-diagonal causal mask's outputs and gradients, GQA included."""
    torch.manual_seed(0)
    B, T = len(lengths), 40
    seg, pos = torch.full((B, T), -1), torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(lengths):
        t = 0
        for j, n in enumerate(row):
            seg[b, t:t + n], pos[b, t:t + n] = j, torch.arange(n)
            t += n
    model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64))
    idx = torch.randint(0, 97, (B, T))
    dense = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
    real = seg >= 0
    outs, grads = [], []
    for mask in (dense, Documents(seg)):
        y = model(idx, pos=pos, mask=mask)[real]
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1])).sum(), list(model.parameters())))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-6


def test_bad_sft_lines_name_file_and_line(model_dir, tmp_path):
    good = json.dumps({"messages": CONVS[0]})
    cases = {
        '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}': "unknown role 'wizard'",
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}': "empty or non-string content",
        '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
        '{"messages": [': "invalid JSON",
        '{"question": "x"}': "expected 'messages'",
    }
    for line, msg in cases.items():
        f = tmp_path / "bad.jsonl"
        f.write_text(f"{good}\n{line}\n{good}\n")
        r = shoggoth("sft", "--init", model_dir, "--data", f, "--out", tmp_path / "o", check=False)
        assert r.returncode == 1 and f"{f}:2: " in r.stderr and msg in r.stderr, r.stderr
    convs = []
    with pytest.raises(Exception):
        read_conversations(f, log=convs.append)
    kept = read_conversations(f, skip_invalid=True, log=convs.append)
    assert len(kept) == 2 and "2 conversations read, 1 invalid row(s) skipped" in convs[-1]


def test_prompt_completion_format_and_builtin_split():
    conv = conversation({"prompt": "2+2?", "completion": "4"}, "x")
    assert conv == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    conv = conversation({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                         "completion": [{"role": "assistant", "content": "a"}]}, "x")
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    train, held = chatterbot_conversations("train"), chatterbot_conversations("heldout")
    assert len(train) > 1500 and len(held) > 150
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in held}
    answers = {}
    for c in train:
        answers.setdefault(c[0]["content"], set()).add(c[1]["content"])
    assert max(len(a) for a in answers.values()) > 1  # several answers per question kept


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    corpus = bible_corpus(root / "c.jsonl")
    out = root / "p"
    shoggoth("pretrain", "--config", "tiny", "--vocab-size", 400, "--corpus", corpus, "--out", out,
             "--max-steps", 30, "--seq-len", 128)
    return out


@pytest.mark.slow
def test_tiny_sft_lowers_heldout_loss_and_loads_in_transformers(pretrained, tmp_path):
    out = tmp_path / "sft"
    args = ["--init", pretrained, "--out", out, "--max-steps", 40, "--eval-every", 20, "--ckpt-every", 20,
            "--batch-size", 8, "--sample-every", 0]
    shoggoth("sft", *args)
    val = [r["val_loss"] for r in metrics.read(out / "metrics.jsonl") if "val_loss" in r]
    assert val[-1] < val[0] - 0.3, val
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "What is AI?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    gen = hf.generate(**ids, max_new_tokens=20, do_sample=False, eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=hf_tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # Resume refuses to overwrite, then continues to the same end: stopped after step 20 (the later
    # checkpoint and the model gone) and resumed, the same weights, bit for bit.
    r = shoggoth("sft", "--init", pretrained, "--out", out, "--max-steps", 40, check=False)
    assert r.returncode == 1 and "--resume" in r.stderr
    before, after = interrupt_and_resume("sft", args, out, 20)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_sft_from_transformers_llama_directory(tmp_path):
    src = tiny_model_dir(tmp_path / "ours")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer.load(src)), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((src / name).read_bytes())
    out = tmp_path / "sft"
    shoggoth("sft", "--init", tmp_path / "hf", "--out", out, "--max-steps", 4, "--sample-every", 0, "--batch-size", 4)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.CHAT_TEMPLATE
    assert checkpoint.load_pretrained(out).config.n_layer == 2
