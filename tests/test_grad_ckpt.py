"""Activation checkpointing (--grad-ckpt): the loss and every gradient bit for bit the same with
it on and off (full model and LoRA with dropout, fp32 and bf16 autocast, packed rows, Hugging
Face families); stage runs end with the same numbers; auto turns it on when --max-memory says
the step would not fit, and leaves it off otherwise."""

import re

import pytest
import torch

import hf_families
from common import shoggoth, tiny_model_dir
from rl_common import ENV, FAST, lm_dir, rm_dir, series, toy_pairs  # noqa: F401  (fixtures)
from shoggoth.lm import checkpoint, lora
from shoggoth import config
from shoggoth.train import metrics, stage
from shoggoth.lm.model import GPT, Documents, GPTConfig, RewardModel
from shoggoth.stages import sft

TINY = dict(vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64)


def with_lora(model, dropout=0.1):
    """model with LoRA adapters whose B is not zero, so that the adapters change the numbers."""
    lora.wrap(model, lora.Options(lora_r=4, lora_dropout=dropout), seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def step(model, ckpt, amp):
    """(loss, {name: grad}, bytes autograd saved outside checkpointed blocks) of one training forward
    and backward on fixed packed rows; dropout draws the same masks on every call."""
    model.model.grad_ckpt = ckpt
    model.train().zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids, targets = torch.randint(0, vocab, (2, 48), generator=g), torch.randint(0, vocab, (2, 48), generator=g)
    seg = torch.tensor([[0] * 20 + [1] * 28, [0] * 40 + [-1] * 8])  # packed documents, one padded row
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None].expand(2, -1)
    saved = []
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if isinstance(model, RewardModel):
                loss = model(ids, pos=pos, mask=Documents(seg)).square().sum()
            else:
                loss = model(ids, targets, pos=pos, mask=Documents(seg))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


def assert_same(model, amp):
    loss0, grads0, kept0 = step(model, False, amp)
    loss1, grads1, kept1 = step(model, True, amp)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0), \
        [k for k in grads0 if not torch.equal(grads0[k], grads1[k])]
    assert kept1 < kept0 / 2  # it is on: the blocks' activations are not kept


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["full", "lora", "reward"])
def test_loss_and_gradients_identical_with_checkpointing(kind, amp):
    torch.manual_seed(0)
    model = (RewardModel if kind == "reward" else GPT)(GPTConfig(**TINY, qkv_bias=True))
    assert_same(with_lora(model) if kind == "lora" else model, amp)


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3"])
def test_hugging_face_families_identical_with_checkpointing(family, tmp_path):
    """qkv bias (Qwen2.5), per-head q/k norms (Qwen3), llama3 RoPE scaling, loaded from real-family directories."""
    d = hf_families.build(family, tmp_path / family)
    assert_same(checkpoint.load_pretrained(d), amp=True)
    assert_same(with_lora(checkpoint.load_pretrained(d)), amp=True)


def test_grad_ckpt_values_and_auto_rule():
    with pytest.raises(config.UsageError, match="--grad-ckpt must be auto, on or off"):
        config.build(sft.Config, grad_ckpt="yes")
    model = GPT(GPTConfig(**TINY))
    for value, need, have, on in [("auto", 0, 0, False), ("auto", 2, 1, True), ("auto", 1, 2, False),
                                  ("on", 0, 0, True), ("off", 2, 1, False)]:
        got, note = stage.grad_ckpt([model], sft.Config(grad_ckpt=value), need, have)
        assert got == on == model.model.grad_ckpt and ("grad-ckpt on" in note) == on
        assert ("auto:" in note) == (on and value == "auto")


@pytest.mark.slow
def test_sft_runs_alike_on_off_and_auto(tmp_path):
    """Two SFT steps: --grad-ckpt on, off, and auto under a --max-memory too small for the step
    end with the same losses and weights; auto with the machine's memory stays off."""
    init = tiny_model_dir(tmp_path / "init")
    args = ["--init", init, "--max-steps", 2, "--batch-size", 4, "--eval-every", 2, "--sample-every", 0,
            "--dtype", "bf16"]
    runs = {"off": ["--grad-ckpt", "off"], "on": ["--grad-ckpt", "on"], "small": ["--max-memory", "0.001"],
            "auto": []}
    out = {k: shoggoth("sft", *args, *extra, "--out", tmp_path / k, env=ENV).stdout for k, extra in runs.items()}
    assert "grad-ckpt" not in out["off"] and "grad-ckpt" not in out["auto"]
    assert ", grad-ckpt on\n" in out["on"]
    assert re.search(r", grad-ckpt on \(auto: the step needs [\d.e-]+ GiB, 0\.001 GiB available\)", out["small"])
    ref = [r for r in metrics.read(tmp_path / "off" / "metrics.jsonl") if "loss" in r or "val_loss" in r]
    w = checkpoint.load_state_dict(tmp_path / "off")
    for k in ("on", "small", "auto"):
        got = [r for r in metrics.read(tmp_path / k / "metrics.jsonl") if "loss" in r or "val_loss" in r]
        assert [(r.get("loss"), r.get("val_loss")) for r in got] == [(r.get("loss"), r.get("val_loss")) for r in ref]
        wk = checkpoint.load_state_dict(tmp_path / k)
        assert all(torch.equal(w[n], wk[n]) for n in w), k


def test_sft_auto_sizes_rows_for_checkpointing():
    """Where one row does not fit without checkpointing, auto turns it on and sizes the rows by
    what a checkpointed token costs."""
    model = GPT(GPTConfig(**{**TINY, "max_seq_len": 2048}))
    plain, ckpt = stage.activation_bytes(model, False), stage.activation_bytes(model, True)
    assert ckpt < plain / 2
    budget = stage.weight_bytes(model) + plain * 1024  # half a 2,048-token row
    on, _ = stage.grad_ckpt([model], sft.Config(), stage.weight_bytes(model) + plain * 2048, budget)
    assert on
    rows = sft.micro_rows(budget - stage.weight_bytes(model), ckpt, 2048, (budget, "test"), lambda *a: None)
    assert rows == min(4, plain * 1024 // ckpt // 2048)


@pytest.mark.slow
def test_dpo_fits_max_memory_in_micro_steps(lm_dir, tmp_path):  # noqa: F811
    """DPO under a --max-memory too small for a step's pairs goes through them one pair per
    micro-step, with checkpointing (auto): the same losses and weights as one pass, up to float rounding."""
    args = ["--policy", lm_dir, "--rankings", toy_pairs(tmp_path / "pairs.jsonl", 40, 0), "--max-steps", 3,
            "--batch-size", 4, "--lr", 1e-4, "--warmup-steps", 1, "--eval-every", 3, "--dtype", "fp32"]
    whole = shoggoth("dpo", *args, "--out", tmp_path / "whole", env=ENV).stdout
    small = shoggoth("dpo", *args, "--max-memory", "0.001", "--out", tmp_path / "small", env=ENV).stdout
    assert "per micro-step per process" not in whole and "grad-ckpt" not in whole
    assert "dpo: 1 pair(s) per micro-step per process, to fit 0.001 GiB (--max-memory)" in small
    assert re.search(r", grad-ckpt on \(auto: the step needs [\d.e-]+ GiB, 0\.001 GiB available\)", small)
    for key in ("loss", "val_loss", "rewards/margins", "grad_norm"):
        a, b = series(tmp_path / "whole", key), series(tmp_path / "small", key)
        assert len(a) == len(b) > 0 and all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (key, a, b)
    w, v = checkpoint.load_state_dict(tmp_path / "whole"), checkpoint.load_state_dict(tmp_path / "small")
    assert all(torch.allclose(w[n], v[n], atol=1e-5) for n in w)


@pytest.mark.slow
def test_lora_ppo_with_reward_model_runs_alike_with_checkpointing(lm_dir, rm_dir, tmp_path):  # noqa: F811
    """PPO checkpoints both trained models (policy, and the value model on the reward model's trunk);
    auto turns it on where --max-memory does not hold a minibatch."""
    args = ["--policy", lm_dir, "--reward", rm_dir, "--iterations", 2, "--batch-size", 8, "--minibatch-size", 4,
            "--ppo-epochs", 1, "--lr", 1e-3, "--lora-r", 4, "--eval-every", 2, *FAST]
    r = shoggoth("ppo", *args, "--out", tmp_path / "on", "--grad-ckpt", "on", env=ENV)
    assert ", grad-ckpt on\n" in r.stdout
    off = shoggoth("ppo", *args, "--out", tmp_path / "off", env=ENV).stdout
    assert "grad-ckpt" not in off  # auto: the machine's memory holds the minibatch
    # auto under a --max-memory the minibatch does not fit: on, and the same run
    small = shoggoth("ppo", *args, "--out", tmp_path / "small", "--max-memory", "0.001", env=ENV).stdout
    assert re.search(r", grad-ckpt on \(auto: the step needs [\d.e-]+ GiB, 0\.001 GiB available\)", small)
    for run in ("on", "small"):
        for key in ("loss/policy", "loss/value", "objective/scores", "grad_norm"):
            assert series(tmp_path / run, key) == series(tmp_path / "off", key), (run, key)
        a, b = checkpoint.load_state_dict(tmp_path / run), checkpoint.load_state_dict(tmp_path / "off")
        assert all(torch.equal(a[n], b[n]) for n in a), run


@pytest.mark.slow
def test_reward_fits_max_memory_in_micro_steps(lm_dir, tmp_path):  # noqa: F811
    """The reward model under a --max-memory too small for a micro-step's rankings goes through them
    one ranking at a time, with checkpointing (auto): the same losses and weights as one pass, up to
    float rounding (shorter padding changes the shapes the matmuls see)."""
    args = ["--init", lm_dir, "--rankings", toy_pairs(tmp_path / "pairs.jsonl", 40, 0), "--max-steps", 3,
            "--batch-size", 4, "--lr", 1e-4, "--warmup-steps", 1, "--eval-every", 3, "--normalize-samples", 0,
            "--dtype", "fp32", "--heldout-prompts", "none"]
    whole = shoggoth("reward", *args, "--out", tmp_path / "whole", env=ENV).stdout
    small = shoggoth("reward", *args, "--max-memory", "0.001", "--out", tmp_path / "small", env=ENV).stdout
    assert "per micro-step per process" not in whole and "grad-ckpt" not in whole
    assert "reward: 1 ranking(s) per micro-step per process, to fit 0.001 GiB (--max-memory)" in small
    assert re.search(r", grad-ckpt on \(auto: the step needs [\d.e-]+ GiB, 0\.001 GiB available\)", small)
    for key in ("loss", "accuracy", "margin", "grad_norm", "val_loss"):
        a, b = series(tmp_path / "whole", key), series(tmp_path / "small", key)
        assert len(a) == len(b) > 0 and all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (key, a, b)
    w, v = checkpoint.load_state_dict(tmp_path / "whole"), checkpoint.load_state_dict(tmp_path / "small")
    assert w.keys() == v.keys() and all(torch.allclose(w[n], v[n], atol=1e-5) for n in w)


@pytest.mark.slow
def test_grpo_turns_checkpointing_on_where_max_memory_says(lm_dir, rm_dir, tmp_path):  # noqa: F811
    """GRPO's auto leaves checkpointing off where the machine holds a minibatch, and turns it on
    under a --max-memory that does not: the same run, bit for bit."""
    args = ["--policy", lm_dir, "--reward", rm_dir, "--iterations", 2, "--batch-size", 4, "--group-size", 4,
            "--minibatch-size", 8, "--lr", 1e-3, "--eval-every", 2, *FAST]
    off = shoggoth("grpo", *args, "--out", tmp_path / "off", env=ENV).stdout
    assert "grad-ckpt" not in off
    small = shoggoth("grpo", *args, "--out", tmp_path / "small", "--max-memory", "0.001", env=ENV).stdout
    assert re.search(r", grad-ckpt on \(auto: the step needs [\d.e-]+ GiB, 0\.001 GiB available\)", small)
    assert all(g > 0 for g in series(tmp_path / "off", "grad_norm"))  # it learns: there is something to differ
    for key in ("loss/policy", "policy/kl", "objective/scores", "grad_norm", "eval/scores"):
        a, b = series(tmp_path / "small", key), series(tmp_path / "off", key)
        assert a == b and len(a) > 0, key
    a, b = checkpoint.load_state_dict(tmp_path / "small"), checkpoint.load_state_dict(tmp_path / "off")
    assert all(torch.equal(a[n], b[n]) for n in a)
