"""Training losses as the papers write them: small pure functions over tensors.

Each names its paper and equation, and spells out its steps with shapes.
"""

import torch
import torch.nn.functional as F


def ranking_loss(rewards, ranks, groups):
    """InstructGPT's reward-model loss over K-way rankings (Ouyang et al. 2022, eq. 1):

        loss(theta) = -1 / C(K, 2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid(r(x, y_w) - r(x, y_l)) ]

    Every ranking (one prompt's K completions ranked by one labeler) is one batch
    element: all its pairs with different ranks (ties dropped) are averaged within
    it, so a prompt with a large K does not dominate, then the elements are averaged.

    rewards (N,) scores of all completions in the batch; ranks (N,) each completion's
    rank within its ranking (0 best, ties share a rank); groups (N,) which ranking
    (0..G-1) each completion belongs to. Returns (loss (), margins (P,)): the mean
    loss, and r_better - r_worse of every pair (accuracy is the share above 0)."""
    # 1. Pairs: i better than j within the same ranking; ties (equal ranks) are no pair.
    same = groups[:, None] == groups[None, :]  # (N, N)
    better = ranks[:, None] < ranks[None, :]  # (N, N)
    i, j = (same & better).nonzero(as_tuple=True)  # (P,), (P,)
    # 2. Reward margin of each pair: r(x, y_w) - r(x, y_l).
    margins = rewards[i] - rewards[j]  # (P,)
    # 3. Per-pair loss: -log sigmoid(margin).
    pair_loss = -F.logsigmoid(margins.float())  # (P,)
    # 4. Mean over each ranking's pairs (the 1 / C(K, 2), counting only untied pairs).
    G = int(groups.max()) + 1
    g = groups[i]  # (P,) the ranking each pair came from
    per_group = torch.zeros(G, device=rewards.device).index_add(0, g, pair_loss)  # (G,)
    n_pairs = torch.bincount(g, minlength=G)  # (G,)
    has = n_pairs > 0  # rankings with at least one untied pair
    # 5. Mean over the rankings of the batch.
    loss = (per_group[has] / n_pairs[has]).mean()  # ()
    return loss, margins


# ---------------------------------------------------------------- RLHF: PPO, GRPO, DPO
# Shapes: B rows (responses), N response tokens; mask (B, N) is True on real response tokens.


def masked_mean(x, mask, dim=None):
    """Mean of x over the entries where mask is True (over dim, or over all)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, moments=None, eps=1e-8):
    """(x - mean) / std over the masked entries, 0 elsewhere: PPO's advantage normalisation.

    moments: (mean, var) computed by the caller (over all ranks' batches, say);
    default the (biased) moments of x's own masked entries."""
    # 1. Moments over real tokens only: padding must not pull the mean to 0.
    if moments is None:
        mean = masked_mean(x, mask)  # ()
        var = masked_mean((x - mean) ** 2, mask)  # ()
    else:
        mean, var = moments
    # 2. Shift and scale; padding stays 0.
    return (x - mean) * torch.rsqrt(var + eps) * mask  # (B, N)


def kl_estimates(logprobs, ref_logprobs):
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence"), with log_ratio = log pi(y_t) - log pi_ref(y_t):

        k1 = log_ratio                              unbiased, any sign (InstructGPT's penalty)
        k3 = exp(-log_ratio) - 1 + log_ratio        unbiased, >= 0 (GRPO's)

    logprobs, ref_logprobs (B, N). Returns (k1, k3), each (B, N)."""
    log_ratio = logprobs - ref_logprobs  # (B, N)
    return log_ratio, torch.expm1(-log_ratio) + log_ratio


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """Per-token rewards of InstructGPT's RL objective (Ouyang et al. 2022, eq. 2, after Ziegler et al. 2019):

        R(x, y) = r_phi(x, y) - beta * log(pi(y | x) / pi_ref(y | x))

    spread over the response: every token t pays -beta * (log pi(y_t) - log pi_ref(y_t)),
    and the last real token also receives the reward-model score.

    scores (B,) reward-model scores; logprobs, ref_logprobs (B, N); mask (B, N) bool,
    each row's real tokens first. Returns (rewards (B, N), kl (B, N)), 0 outside mask."""
    # 1. Per-token KL (k1) on the sampled tokens.
    kl = (logprobs - ref_logprobs) * mask  # (B, N)
    # 2. The KL penalty on every token.
    rewards = -beta * kl  # (B, N)
    # 3. The score on each row's last real token.
    last = (mask.sum(1) - 1).clamp(min=0)  # (B,)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16):

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = sum_l (gamma * lam)^l * delta_{t+l}       (A_t = delta_t + gamma * lam * A_{t+1})

    The episode ends after a row's last real token: V and A there are 0.
    rewards, values (B, N); mask (B, N) bool. Returns (advantages, returns = A + V), (B, N) each, 0 outside mask."""
    mask = mask.to(values.dtype)
    # 1. Nothing exists after the end: value and reward 0 on padding.
    values, rewards = values * mask, rewards * mask  # (B, N)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1})
    next_adv = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    # 2. The recursion, last token first.
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    # 3. Returns: the value targets.
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2):
    """PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss:

        L = -E_t[ min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t) ],   rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)

    averaged over the masked tokens. logprobs (B, N) under the current policy, old_logprobs
    (B, N) under the rollout policy, advantages (B, N). Returns (loss (), stats): clipfrac
    (share of tokens where the clipped term is taken), approxkl (0.5 * E[(log rho)^2]), ratio."""
    # 1. Probability ratio of the taken tokens.
    log_ratio = logprobs - old_logprobs  # (B, N)
    ratio = log_ratio.exp()  # (B, N)
    # 2. Unclipped and clipped surrogates, as losses (negated).
    loss_unclipped = -advantages * ratio  # (B, N)
    loss_clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)  # (B, N)
    # 3. The pessimistic bound: the larger loss, token by token, averaged over real tokens.
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)  # ()
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask), "ratio": masked_mean(ratio, mask)}
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip=0.2):
    """The clipped value loss of PPO's reference implementation (OpenAI baselines ppo2; Huang
    et al. 2022, "The 37 implementation details of PPO", detail 9):

        L_V = 0.5 * E_t[ max((V_t - R_t)^2, (clip(V_t, V_old_t - eps, V_old_t + eps) - R_t)^2) ]

    values (B, N) now, old_values (B, N) at rollout time, returns (B, N) from gae.
    Returns (loss (), clipfrac: share of tokens where the clipped error is taken)."""
    # 1. A prediction may move at most eps from its rollout-time value.
    clipped = old_values + (values - old_values).clamp(-clip, clip)  # (B, N)
    # 2. Squared errors of both; the larger counts.
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2  # (B, N)
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)  # ()
    return loss, masked_mean((err_clipped > err).float(), mask).detach()


def adaptive_kl_beta(beta, kl, target, horizon, n_samples):
    """Ziegler et al. 2019's adaptive KL controller (section 2.2), one update:

        e = clip(KL / KL_target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n / horizon)

    kl: the batch's mean KL(pi || pi_ref) per response (nats); n_samples: responses in the batch."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n_samples / horizon)


def entropy_from_logits(logits):
    """Entropy (..., ) of the softmax of logits (..., V): logsumexp(z) - sum(p * z)."""
    logits = logits.float()
    p = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """GRPO's outcome-supervised advantages (Shao et al. 2024, section 4.1.2): each of a
    prompt's G responses is compared with its group,

        A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)        (std unbiased, as DeepSeekMath's code)

    (without scale, only the mean is subtracted: Dr. GRPO, Liu et al. 2025).
    rewards (B,) with B = prompts * G, each prompt's G responses adjacent. Returns (B,)."""
    r = rewards.view(-1, group_size).float()  # (prompts, G)
    adv = r - r.mean(1, keepdim=True)  # (prompts, G)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)  # (B,)


def rloo_advantages(rewards, group_size):
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 4 after Kool et al. 2019): the
    baseline of each response is the mean reward of the other G - 1 of its prompt,

        A_i = r_i - 1 / (G - 1) * sum_{j != i} r_j

    rewards (B,) with each prompt's G responses adjacent. Returns (B,)."""
    r = rewards.view(-1, group_size).float()  # (prompts, G)
    others = (r.sum(1, keepdim=True) - r) / (group_size - 1)  # (prompts, G)
    return (r - others).view(-1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip=0.2, beta=0.04):
    """GRPO's objective (Shao et al. 2024, eq. 3), as a loss:

        L = -1/G sum_i 1/|o_i| sum_t [ min(rho_it * A_i, clip(rho_it, 1 - eps, 1 + eps) * A_i) - beta * k3_it ]

    with rho the ratio to the rollout policy and k3 the per-token KL estimate to the
    reference (kl_estimates). logprobs, old_logprobs, ref_logprobs (B, N); advantages (B,)
    one per response. Returns (loss (), stats: clipfrac, kl (mean k3 per token))."""
    # 1. The response's advantage on each of its tokens.
    adv = advantages[:, None]  # (B, 1)
    # 2. Clipped surrogate per token, as a loss.
    ratio = (logprobs - old_logprobs).exp()  # (B, N)
    loss_unclipped, loss_clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)  # (B, N)
    per_token = torch.max(loss_unclipped, loss_clipped)  # (B, N)
    # 3. The KL to the reference as a loss term (k3 estimator), not folded into the reward.
    _, k3 = kl_estimates(logprobs, ref_logprobs)  # (B, N)
    per_token = per_token + beta * k3
    # 4. Mean over each response's tokens, then over responses.
    loss = masked_mean(per_token, mask, dim=1).mean()  # ()
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask), "kl": masked_mean(k3, mask)}
    return loss, stats


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0):
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7):

        L = -E[ log sigmoid( beta * log(pi(y_w|x) / pi_ref(y_w|x)) - beta * log(pi(y_l|x) / pi_ref(y_l|x)) ) ]

    label_smoothing e > 0 assumes labels flip with probability e (conservative DPO):
    L = -(1 - e) log sigmoid(z) - e log sigmoid(-z).
    Each argument (P,): summed log-probs of a pair's chosen / rejected response. Returns
    (loss (), chosen_rewards (P,), rejected_rewards (P,)): the implicit rewards beta * log(pi / pi_ref)."""
    # 1. Implicit rewards: how much more likely each response became than under the reference.
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # (P,)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)  # (P,)
    # 2. Bradley-Terry log-likelihood of the preference under those rewards.
    z = (chosen_rewards - rejected_rewards).float()  # (P,)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)  # (P,)
    return loss.mean(), chosen_rewards.detach(), rejected_rewards.detach()
