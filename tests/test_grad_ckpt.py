"""Activation checkpointing (--grad-ckpt): the loss and every gradient bit for bit the same with
it on and off (full model and LoRA with dropout, fp32 and bf16 autocast, packed rows, Hugging
Face families); stage runs end with the same numbers."""

import pytest
import torch

import hf_families
from common import shoggoth
from rl_common import ENV, FAST, lm_dir, rm_dir, series  # noqa: F401  (fixtures)
from shoggoth import checkpoint, lora
from shoggoth.model import GPT, Documents, GPTConfig, RewardModel

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


@pytest.mark.slow
def test_lora_ppo_with_reward_model_runs_alike_with_checkpointing(lm_dir, rm_dir, tmp_path):  # noqa: F811
    """PPO checkpoints both trained models (policy, and the value model on the reward model's trunk)."""
    args = ["--policy", lm_dir, "--reward", rm_dir, "--iterations", 2, "--batch-size", 8, "--minibatch-size", 4,
            "--ppo-epochs", 1, "--lr", 1e-3, "--lora-r", 4, "--eval-every", 2, *FAST]
    r = shoggoth("ppo", *args, "--out", tmp_path / "on", "--grad-ckpt", "on", env=ENV)
    assert ", grad-ckpt on\n" in r.stdout
    shoggoth("ppo", *args, "--out", tmp_path / "off", env=ENV)
    for key in ("loss/policy", "loss/value", "objective/scores", "grad_norm"):
        assert series(tmp_path / "on", key) == series(tmp_path / "off", key)
    a, b = checkpoint.load_state_dict(tmp_path / "on"), checkpoint.load_state_dict(tmp_path / "off")
    assert all(torch.equal(a[n], b[n]) for n in a)
