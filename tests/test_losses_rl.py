"""RL losses (shoggoth/train/losses.py) against values computed by hand: PPO clip, value clip, GAE, KL, DPO, GRPO."""

import math

import pytest
import torch

from shoggoth.train import losses


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def sp(x):  # softplus(x) = log(1 + e^x) = -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_ppo_policy_loss_clips_by_hand():
    # Ratios 1.5, 0.5, 1.5, 1.1 against advantages 1, -1, -1, 2 (clip 0.2), and a masked-out token.
    old = torch.zeros(1, 5)
    logprobs = torch.log(t([1.5, 0.5, 1.5, 1.1, 50.0]))
    adv = t([1.0, -1.0, -1.0, 2.0, 100.0])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, stats = losses.ppo_policy_loss(logprobs, old, adv, mask, clip=0.2)
    # Per token, the larger of -A * rho and -A * clip(rho, 0.8, 1.2):
    #   1.5, A=1:  -1.5 vs -1.2 -> -1.2 (clipped)     0.5, A=-1: 0.5 vs 0.8 -> 0.8 (clipped)
    #   1.5, A=-1:  1.5 vs  1.2 ->  1.5 (not clipped: the pessimistic side)   1.1, A=2: -2.2 (inside the band)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 1.5 - 2.2) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # approxkl = 0.5 * mean(log rho ^ 2) = 0.5 * (0.164402 + 0.480453 + 0.164402 + 0.009085) / 4
    assert stats["approxkl"].item() == pytest.approx(0.5 * (0.1644020 + 0.4804530 + 0.1644020 + 0.0090840) / 4, abs=1e-6)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 1.1) / 4)
    # Gradient flows only where the unclipped term is taken: tokens 3 and 4.
    lp = logprobs.clone().requires_grad_()
    losses.ppo_policy_loss(lp, old, adv, mask, clip=0.2)[0].backward()
    # d/dlogp of -A * exp(logp) / 4 = -A * rho / 4
    assert lp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 1.5 / 4, -2.2 / 4, 0.0])


def test_ppo_value_loss_clips_by_hand():
    values, old, returns = t([1.0, 0.0, 2.0, 7.0]), t([0.5, 0.5, 0.0, 0.0]), t([2.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[True, True, True, False]])
    loss, clipfrac = losses.ppo_value_loss(values, old, returns, mask, clip=0.2)
    # V=1 clipped to 0.7: max((1-2)^2, (0.7-2)^2) = 1.69; V=0 clipped to 0.3: max(0, 0.09) = 0.09;
    # V=2 clipped to 0.2: max(4, 0.04) = 4. Loss 0.5 * mean = 0.5 * 5.78 / 3.
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 4.0) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_gae_by_hand():
    rewards = t([0.0, 0.0, 1.0], [0.2, 1.0, 9.0])
    values = t([0.5, 0.6, 0.7], [0.1, 0.4, 9.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0: delta = (0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7) = (0.1, 0.1, 0.3)
    #   A2 = 0.3, A1 = 0.1 + 0.95 * 0.3 = 0.385, A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # Row 1 ends after 2 tokens (V after the end is 0): delta = (0.2 + 0.4 - 0.1, 1 + 0 - 0.4) = (0.5, 0.6)
    #   A1 = 0.6, A0 = 0.5 + 0.95 * 0.6 = 1.07
    assert adv.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3])
    assert adv.tolist()[1] == pytest.approx([1.07, 0.6, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0])
    assert ret.tolist()[1] == pytest.approx([1.17, 1.0, 0.0])
    # lambda = 1, gamma = 1: returns are the rewards to go (Monte Carlo), whatever the values.
    _, mc = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert mc.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 1.2, 1.0, 0.0])
    # gamma = 0.5, lambda = 0 (one-step TD): A_t = r_t + 0.5 V_{t+1} - V_t
    td, _ = losses.gae(rewards, values, mask, gamma=0.5, lam=0.0)
    assert td.tolist()[0] == pytest.approx([0.0 + 0.3 - 0.5, 0.0 + 0.35 - 0.6, 1.0 - 0.7])


def test_kl_penalized_rewards_and_estimators_by_hand():
    scores = torch.tensor([2.0, -1.0])
    logprobs = t([-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0])
    ref = t([-1.5, -1.0, -0.5], [-2.0, -1.0, -5.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = losses.kl_penalized_rewards(scores, logprobs, ref, mask, beta=0.1)
    assert kl.flatten().tolist() == pytest.approx([0.5, -1.0, 0.0, 1.0, 0.0, 0.0])
    # -0.1 * kl on every token; the score on each row's last real token (column 2, then column 1).
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 2.0, -0.1, -1.0, 0.0])
    k1, k3 = losses.kl_estimates(t([0.5, -1.0, 0.0]), torch.zeros(1, 3))
    assert k1.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    # k3 = e^-x - 1 + x: e^-0.5 - 0.5 = 0.1065307, e - 2 = 0.7182818
    assert k3.tolist()[0] == pytest.approx([0.1065307, 0.7182818, 0.0], abs=1e-6)


def test_adaptive_kl_controller_by_hand():
    # KL twice the target: error clipped to +0.2; beta * (1 + 0.2 * 256 / 10000)
    assert losses.adaptive_kl_beta(0.1, 12.0, 6.0, 10000, 256) == pytest.approx(0.100512)
    assert losses.adaptive_kl_beta(0.1, 3.0, 6.0, 10000, 256) == pytest.approx(0.099488)
    assert losses.adaptive_kl_beta(0.1, 6.6, 6.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))


def test_masked_whiten_and_entropy_by_hand():
    x = t([1.0, 2.0, 3.0], [4.0, 100.0, 100.0])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # Masked entries 1, 2, 3, 4: mean 2.5, biased var 1.25, std 1.118034.
    w = losses.masked_whiten(x, mask)
    assert w.flatten().tolist() == pytest.approx([-1.341641, -0.447214, 0.447214, 1.341641, 0.0, 0.0], abs=1e-5)
    assert losses.entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    # p = (0.5, 0.5, 0): entropy log 2
    assert losses.entropy_from_logits(torch.tensor([0.0, 0.0, -1e9])).item() == pytest.approx(math.log(2))


def test_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -8.0]), torch.tensor([-11.0, -8.0])
    loss, rc, rr = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    # Implicit rewards 0.1 * (logp - logp_ref): chosen (0.1, 0), rejected (-0.1, 0.1); margins z = (0.2, -0.1).
    assert rc.tolist() == pytest.approx([0.1, 0.0]) and rr.tolist() == pytest.approx([-0.1, 0.1])
    # -log sigmoid(z) = softplus(-z): log(1 + e^-0.2) = 0.5981389, log(1 + e^0.1) = 0.7443967
    assert loss.item() == pytest.approx((0.5981389 + 0.7443967) / 2, abs=1e-6)
    smooth, _, _ = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.1)
    assert smooth.item() == pytest.approx((0.9 * sp(-0.2) + 0.1 * sp(0.2) + 0.9 * sp(0.1) + 0.1 * sp(-0.1)) / 2)
    # At the reference, the loss is log 2 whatever beta.
    z = torch.zeros(3)
    assert losses.dpo_loss(z, z, z, z, beta=5.0)[0].item() == pytest.approx(math.log(2))


def test_grpo_and_rloo_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    # Group (1, 2, 3): mean 2, unbiased std 1 -> (-1, 0, 1); a group of equal rewards -> 0, not NaN.
    assert losses.group_advantages(r, 3, eps=1e-12).tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])
    assert losses.group_advantages(r, 3, scale=False).tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])
    assert losses.group_advantages(torch.tensor([0.0, 4.0]), 2, eps=1e-12).tolist() == pytest.approx(
        [-2 / math.sqrt(8), 2 / math.sqrt(8)])
    # RLOO: 1 - (2 + 3) / 2 = -1.5, 2 - (1 + 3) / 2 = 0, 3 - (1 + 2) / 2 = 1.5
    assert losses.rloo_advantages(r, 3).tolist() == pytest.approx([-1.5, 0, 1.5, 0, 0, 0])


def test_grpo_loss_by_hand():
    # Row 0: ratio 1 on both tokens, A = 2, log(pi / pi_ref) = (0.5, -1) -> k3 = (0.1065307, 0.7182818).
    # Row 1: one real token with ratio 1.5 and A = -1 (the unclipped 1.5 is taken), at the reference.
    logprobs = t([-1.0, -2.0], [math.log(1.5) - 1.0, 0.0])
    old = t([-1.0, -2.0], [-1.0, 3.0])
    ref = t([-1.5, -1.0], [math.log(1.5) - 1.0, 9.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = losses.grpo_loss(logprobs, old, ref, torch.tensor([2.0, -1.0]), mask, clip=0.2, beta=0.1)
    row0 = ((-2 + 0.1 * 0.1065307) + (-2 + 0.1 * 0.7182818)) / 2
    row1 = 1.5
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0
    assert stats["kl"].item() == pytest.approx((0.1065307 + 0.7182818 + 0.0) / 3, abs=1e-6)
