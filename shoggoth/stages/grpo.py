"""GRPO: critic-free RL against a reward model (Shao et al. 2024, DeepSeekMath, section 4), written out.

    shoggoth grpo --policy runs/sft --reward runs/reward --out runs/grpo        # built-in chatterbot questions
    shoggoth grpo --policy DIR --reward DIR --prompts prompts.jsonl --advantage rloo --out DIR

No value model: each prompt gets G responses and each response's advantage is its
reward against its group's (losses.group_advantages, or RLOO's leave-one-out
baseline, losses.rloo_advantages). Each iteration:

  1. rollout: batch_size prompts (each rank its share), group_size responses each;
  2. score: the reward (minus missing_eos_penalty for a response that never ends its turn)
     and the reference's log-probs (the old log-probs are the Engine's);
  3. advantages: one per response, from its group;
  4. update: epochs passes over the responses in minibatches on GRPO's loss: the
     clipped ratio times the advantage on every token, plus beta times the k3 KL
     estimate to the reference (losses.grpo_loss).
"""

from dataclasses import dataclass

import torch

from ..lm import checkpoint, lora
from ..train import dist, losses, rl, stage
from ..evaluation import scoring
from ..errors import ShoggothError
from ..train.metrics import Metrics, Sums


@dataclass
class Config(rl.Options, lora.Options, stage.Common):
    """GRPO (or RLOO): group-relative advantages over G responses per prompt, KL to the SFT model."""

    out: str = "runs/grpo"  # output Hugging Face model directory (the policy)
    advantage: str = "grpo"  # grpo: (r - group mean) / group std | drgrpo: r - group mean | rloo: r - mean of the others
    batch_size: int = 16  # prompts per iteration, summed over ranks
    group_size: int = 4  # responses per prompt (G)
    minibatch_size: int = 32  # responses per optimizer step, summed over ranks
    epochs: int = 1  # passes over each rollout batch (1: the ratio is 1 and the clip never acts)
    beta: float = 0.04  # weight of the KL term (k3 estimate, per token) in the loss
    max_memory: float = 0.0  # GiB an update may use (weights, AdamW state, the policy's activations): --grad-ckpt auto turns checkpointing on where a minibatch would not fit; 0 = half the memory available now


MAY_CHANGE = stage.MAY_CHANGE | {"iterations", "eval_samples", "max_memory"}


def run(c: Config):
    if not c.policy or not (c.reward or c.toy_reward):
        raise ShoggothError("grpo: --policy DIR (the SFT model) and --reward DIR (the reward model) are required")
    if c.advantage not in ("grpo", "drgrpo", "rloo") or c.group_size < 2:
        raise ShoggothError(f"grpo: --advantage must be grpo, drgrpo or rloo and --group-size at least 2 "
                            f"(got {c.advantage!r}, {c.group_size})")
    rl.check_lora(c)
    d, out, state, ckpt_path = stage.begin(c, MAY_CHANGE)
    rows = c.batch_size * c.group_size  # responses per iteration
    if c.batch_size % d.world or rows % c.minibatch_size or c.minibatch_size % d.world:
        raise ShoggothError(f"grpo: --batch-size {c.batch_size} must be a multiple of the number of processes "
                            f"({d.world}), and batch_size x group_size ({rows}) of --minibatch-size {c.minibatch_size}, "
                            "itself a multiple of the number of processes")
    torch.manual_seed(c.seed)

    # ---- models: policy (trained), reference and reward (frozen); with LoRA the reference is the policy, adapters off
    tok, policy, ref = rl.load_policy(c, d.device)
    reward_fn, _ = scoring.load_reward(c.reward, c.toy_reward, tok, d.device)
    if state:
        checkpoint.load_trained(policy, state["policy"], ckpt_path)
    amp_dtype = dist.autocast_dtype(d.device, c.dtype)
    amp = dist.autocast(d.device, amp_dtype)
    bf16 = amp_dtype == torch.bfloat16

    # ---- prompts
    prompts, held = rl.load_prompt_sets(c, dist.print0)
    room = policy.config.max_seq_len - c.max_new_tokens
    prompt_ids = rl.encode_prompts(tok, prompts, room)
    mb = c.minibatch_size // d.world  # this rank's rows per optimizer step
    # checkpointing (auto) where a minibatch of the longest rows would not fit the memory budget
    _, ckpt_note, *_ = stage.sized_ckpt([policy], c, d, mb * (max(map(len, prompt_ids)) + c.max_new_tokens))
    pv = rl.PolicyValue(policy)  # DDP or FSDP2 over ranks; pv on one
    policy_t, opt, it = stage.train_setup(pv, c, d, amp_dtype, state, ckpt_path, blocks=policy.model.layers,
                                          unit="iteration")
    n_mb = rows // c.minibatch_size
    total_steps = c.iterations * c.epochs * n_mb
    metrics = Metrics(out, c.iterations, resume_step=it, enabled=d.main, config=c)
    dist.print0(f"grpo: policy {policy.num_params():,} parameters; {c.iterations} iterations of {c.batch_size} prompts "
                f"x {c.group_size} responses (<= {c.max_new_tokens} tokens), {c.advantage} advantages, "
                f"{c.epochs} epoch(s) x {n_mb} minibatches; reward "
                f"{'toy: fraction of ' + repr(c.toy_reward) if c.toy_reward else c.reward}; autocast {amp_dtype}"
                f"{lora.summary(policy)}{ckpt_note}")

    def score_rollout(r):
        """Reference log-probs and rewards of a rollout (call inside dist.full_weights(pv))."""
        with torch.no_grad(), amp, rl.reference(policy, ref) as ref_model:
            ref_logprobs = rl.logprobs_of(ref_model, r, c.temperature, mb)  # (B, N)
            scores = rl.in_chunks(reward_fn, r, mb).float()  # (B,)
        return ref_logprobs, scores

    def evaluate():
        with dist.full_weights(pv):
            return scoring.evaluate(policy, ref, reward_fn, tok, held, c, amp, bf16, d, "grpo")

    if it == 0 and held:
        metrics.log(0, **evaluate())
    while it < c.iterations:
        # ---- 1. rollout: this rank's prompts, each repeated group_size times (a group stays on one rank)
        t0 = dist.clock(d.device)
        mine = [i for i in dist.share(rl.prompt_batch(len(prompts), c.batch_size, it, c.seed), d)
                for _ in range(c.group_size)]
        records = [prompts[i] for i in mine]
        with dist.full_weights(pv):  # under FSDP2 every rank gathers the policy to sample (and, with LoRA, score)
            r = rl.generate(policy, tok, [prompt_ids[i] for i in mine], c.max_new_tokens, c.temperature,
                            seed=c.seed * 1_000_003 + it * d.world + d.rank, bf16=bf16)
            t1 = dist.clock(d.device)

            # ---- 2. score: rewards, old and reference log-probs
            old_logprobs = r.logprobs  # the Engine's, at this temperature: what a training forward gives (B, N)
            ref_logprobs, scores = score_rollout(r)
        scores = scores - c.missing_eos_penalty * (~r.ended).float()  # (B,)

        # ---- 3. advantages: each response against its own group
        if c.advantage == "rloo":
            advantages = losses.rloo_advantages(scores, c.group_size)  # (B,)
        else:
            advantages = losses.group_advantages(scores, c.group_size, scale=c.advantage == "grpo")  # (B,)
        t2 = dist.clock(d.device)

        # ---- 4. update
        sums = Sums()
        g = torch.Generator().manual_seed(c.seed * 7919 + it)
        for epoch in range(c.epochs):
            perm = torch.randperm(len(mine), generator=g).to(d.device)
            for k in range(n_mb):
                step = (it * c.epochs + epoch) * n_mb + k + 1
                lr = stage.set_lr(opt, c, step, total_steps)
                idx = perm[k * mb:(k + 1) * mb]
                sub = r.rows(idx)
                with amp:
                    logits, _, _ = policy_t(sub)  # (b, N, V)
                    logprobs = rl.token_logprobs(logits, sub.tokens, c.temperature)  # (b, N)
                loss, st = losses.grpo_loss(logprobs, old_logprobs[idx], ref_logprobs[idx], advantages[idx],
                                            sub.mask, c.clip, c.beta)
                loss.backward()
                grad_norm = stage.optimizer_step(opt, pv, c, out, f"iteration {it + 1}", dist.all_mean(loss.detach()))
                with torch.no_grad():
                    entropy = losses.masked_mean(losses.entropy_from_logits(logits / c.temperature), sub.mask)
                sums.add(**{"policy/clipfrac": st["clipfrac"], "policy/kl": st["kl"], "policy/entropy": entropy,
                            "loss/policy": loss})
        it += 1
        t3 = dist.clock(d.device)

        # ---- the iteration's statistics, averaged over ranks in one call
        group_std = scores.view(-1, c.group_size).std(1)  # (prompts,)
        stats = dist.all_means({
            "objective/scores": scores.float().mean(), "objective/kl": ((old_logprobs - ref_logprobs) * r.mask).sum(1).mean(),
            **scoring.gold_sums(records, rl.decode(tok, r)),
            "reward_std": group_std.mean(), "zero_std_frac": (group_std < 1e-6).float().mean(),
            **{k: v / (c.epochs * n_mb) for k, v in sums.items()},
            "eot_rate": r.ended.float().mean(), "response_length": r.lengths.float().mean()}, d.device)
        metrics.log(it, **scoring.with_gold(stats, "objective/gold"), lr=lr, grad_norm=grad_norm,
                    **{"time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2})
        if held and (it % c.eval_every == 0 or it == c.iterations):
            metrics.log(it, **evaluate())
        if it % c.ckpt_every == 0 or it == c.iterations:
            stage.save_checkpoint(out, it, pv, opt, c, split=True)

    final = rl.split_state(dist.model_state(pv)).get("policy")  # gathered to rank 0 under FSDP2 ({} elsewhere)
    return stage.finish(d, metrics, policy, final, out, c.policy)
