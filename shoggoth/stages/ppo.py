"""PPO against a reward model: InstructGPT's RL stage (Ouyang et al. 2022, section 3.5), written out.

    shoggoth ppo --policy runs/sft --reward runs/reward --out runs/ppo        # built-in chatterbot questions
    shoggoth ppo --policy DIR --reward DIR --prompts prompts.jsonl --out DIR

Four models: the policy (trained, starts as the SFT model), the reference (the SFT
model, frozen), the value model (the reward model's trunk and head, trained) and
the reward model (frozen). With LoRA (--lora-r) two sets of weights hold all four:
the reference is the policy with its adapters off, and the value model is the
reward model's own trunk with its own adapters and a copy of its head (the reward
is read with those adapters off). Each iteration:

  1. rollout: batch_size prompts (each rank its share), one response each, sampled by
     the Engine at `temperature` until a stop token (end of turn) or max_new_tokens;
  2. score: reference log-probs and values in one forward each (the old log-probs
     are the Engine's, sampled at the same temperature); the reward model's score at the response's end, minus missing_eos_penalty when the
     response never emitted a stop token; per-token rewards -beta * (logp - logp_ref)
     with the score on the last token (losses.kl_penalized_rewards);
  3. advantages: GAE (gamma, lambda) over the values, whitened over the whole batch;
  4. update: ppo_epochs shuffled passes over the batch in minibatches, each one
     optimizer step on the clipped policy loss plus vf_coef times the clipped value
     loss (plus ptx_coef times the pretraining loss: PPO-ptx);
  5. the adaptive KL controller moves beta toward target_kl (when set); the EMA
     copy of the policy (when ema_decay > 0) moves toward the policy.

Log-probs in training use logits / temperature, the distribution the Engine sampled
from, so the rollout's log-probs are the old log-probs of the ratio (tests/test_rl.py
holds them equal to a training forward's). The model has no dropout.
"""

import copy
from dataclasses import dataclass

import torch

from ..lm import checkpoint, lora
from ..data.shards import TokenShards
from ..train import dist, losses, rl, stage
from ..evaluation import scoring
from ..errors import ShoggothError
from ..train.metrics import Metrics, Sums


@dataclass
class Config(rl.Options, lora.Options, stage.Common):
    """PPO against a reward model with a KL penalty to the SFT model (InstructGPT)."""

    reward: str = ""  # reward model directory or hub id (a `shoggoth reward` output); also initialises the value model
    out: str = "runs/ppo"  # output Hugging Face model directory (the policy)
    iterations: int = 100  # PPO iterations (rollout + update)
    batch_size: int = 64  # prompts (one response each) per iteration, summed over ranks
    minibatch_size: int = 16  # responses per optimizer step, summed over ranks
    max_memory: float = 0.0  # GiB an update may use (weights, AdamW state, activations of policy and value): --grad-ckpt auto turns checkpointing on where a minibatch would not fit; 0 = half the memory available now
    ppo_epochs: int = 4  # passes over each rollout batch
    lr: float = 1e-5  # peak learning rate (policy and value model)
    grad_clip: float = 1.0  # max global grad norm of policy and value model together; 0 = off
    beta: float = 0.05  # KL penalty coefficient (the start value when target_kl is set)
    target_kl: float = 0.0  # adaptive KL controller's target KL per response (nats); 0 = fixed beta
    kl_horizon: int = 10000  # adaptive KL controller's horizon, in responses
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    vf_clip: float = 0.2  # value clip: how far a value may move from its rollout-time prediction
    vf_coef: float = 0.1  # weight of the value loss
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss mixed into each update (InstructGPT's gamma); 0 = off
    ptx_data: str = ""  # token shards for PPO-ptx (a pretrain run's out/tokens folder)
    ema_decay: float = 0.0  # keep an EMA of the policy's weights with this decay, saved to out/ema; 0 = off


MAY_CHANGE = stage.MAY_CHANGE | {"iterations", "eval_samples", "max_memory"}


def run(c: Config):
    if not c.policy or not (c.reward or c.toy_reward):
        raise ShoggothError("ppo: --policy DIR (the SFT model) and --reward DIR (the reward model) are required")
    if c.ptx_coef and not c.ptx_data:
        raise ShoggothError("ppo: --ptx-coef needs --ptx-data (a pretrain run's tokens folder)")
    if c.ema_decay and c.fsdp:
        raise ShoggothError("ppo: --ema-decay does not work with --fsdp (the EMA needs the whole policy on every rank)")
    if c.ema_decay and c.lora_r:
        raise ShoggothError("ppo: --ema-decay does not work with --lora-r (an EMA of the factors is not one of the product)")
    rl.check_lora(c)
    d, out, state, ckpt_path = stage.begin(c, MAY_CHANGE)
    if c.batch_size % d.world or c.batch_size % c.minibatch_size or c.minibatch_size % d.world:
        raise ShoggothError(f"ppo: --batch-size {c.batch_size} must be a multiple of --minibatch-size "
                            f"{c.minibatch_size}, and both of the number of processes ({d.world})")
    torch.manual_seed(c.seed)

    # ---- the four models: policy, reference, value (trained), reward (frozen). With LoRA, two:
    # the reference is the policy with its adapters off, the reward the value model with its adapters off.
    tok, policy, ref = rl.load_policy(c, d.device)
    reward_fn, reward_model = scoring.load_reward(c.reward, c.toy_reward, tok, d.device)
    value = scoring.value_model(c, policy.config, reward_model).to(d.device)
    ema = copy.deepcopy(policy).requires_grad_(False) if c.ema_decay else None
    if state:
        checkpoint.load_trained(policy, state["policy"], ckpt_path)
        checkpoint.load_trained(value, state["value"], ckpt_path)
        if ema is not None:
            ema.load_state_dict(state["ema"])
    amp_dtype = dist.autocast_dtype(d.device, c.dtype)
    amp = dist.autocast(d.device, amp_dtype)
    # ---- prompts
    prompts, held = rl.load_prompt_sets(c, dist.print0)
    room = policy.config.max_seq_len - c.max_new_tokens
    prompt_ids = rl.encode_prompts(tok, prompts, room)
    mb = c.minibatch_size // d.world  # this rank's rows per optimizer step
    # checkpointing (auto) where a minibatch of the longest rows would not fit the memory budget
    _, ckpt_note, *_ = stage.sized_ckpt([policy, value], c, d, mb * (max(map(len, prompt_ids)) + c.max_new_tokens))
    both = rl.PolicyValue(policy, value)
    # DDP over ranks, or FSDP2 sharding every block of both models, then the rest; the models themselves on one
    both_t, opt, it = stage.train_setup(both, c, d, amp_dtype, state, ckpt_path,
                                        blocks=[*policy.model.layers, *value.model.layers], unit="iteration")
    beta = state["beta"] if state else c.beta
    shards = TokenShards(c.ptx_data, seed=c.seed) if c.ptx_coef else None

    n_mb = c.batch_size // c.minibatch_size
    total_steps = c.iterations * c.ppo_epochs * n_mb
    metrics = Metrics(out, c.iterations, resume_step=it, enabled=d.main, config=c)
    dist.print0(f"ppo: policy {policy.num_params():,} parameters; {c.iterations} iterations of {c.batch_size} "
                f"responses (<= {c.max_new_tokens} tokens), {c.ppo_epochs} epochs x {n_mb} minibatches; "
                f"reward {'toy: fraction of ' + repr(c.toy_reward) if c.toy_reward else c.reward}; KL reference "
                f"{c.ref or c.policy}; autocast {amp_dtype}"
                f"{lora.summary(policy)}{ckpt_note}")
    bf16 = amp_dtype == torch.bfloat16

    def score_rollout(r):
        """Reference log-probs, values and scores of a rollout (call inside dist.full_weights(both))."""
        with torch.no_grad(), amp, rl.reference(policy, ref) as ref_model:
            ref_logprobs = rl.logprobs_of(ref_model, r, c.temperature, mb)  # (B, N)
            values = rl.in_chunks(lambda s: rl.response_values(value, s), r, mb)  # (B, N)
            scores = rl.in_chunks(reward_fn, r, mb).float()  # (B,)
        return ref_logprobs, values, scores

    def evaluate():
        with dist.full_weights(both):
            return scoring.evaluate(policy, ref, reward_fn, tok, held, c, amp, bf16, d, "ppo")

    if it == 0 and held:
        metrics.log(0, **evaluate())
    while it < c.iterations:
        # ---- 1. rollout: this rank's share of the iteration's prompts, one response each
        t0 = dist.clock(d.device)
        mine = dist.share(rl.prompt_batch(len(prompts), c.batch_size, it, c.seed), d)
        records = [prompts[i] for i in mine]
        with dist.full_weights(both):  # under FSDP2 every rank gathers both models to sample and score
            r = rl.generate(policy, tok, [prompt_ids[i] for i in mine], c.max_new_tokens, c.temperature,
                            seed=c.seed * 1_000_003 + it * d.world + d.rank, bf16=bf16)
            t1 = dist.clock(d.device)

            # ---- 2. score: log-probs, values, reward; per-token rewards with the KL penalty
            old_logprobs = r.logprobs  # the Engine's, at this temperature: what a training forward gives (B, N)
            ref_logprobs, old_values, scores = score_rollout(r)
        scores = scores - c.missing_eos_penalty * (~r.ended).float()  # (B,)
        rewards, kl = losses.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, r.mask, beta)  # (B, N)

        # ---- 3. advantages: GAE, whitened over every rank's masked tokens
        advantages, returns = losses.gae(rewards, old_values, r.mask, c.gamma, c.lam)  # (B, N)
        advantages = losses.masked_whiten(advantages, r.mask, rl.masked_moments(advantages, r.mask))
        t2 = dist.clock(d.device)

        # ---- 4. update: ppo_epochs passes in shuffled minibatches, one optimizer step each
        sums = Sums()
        g = torch.Generator().manual_seed(c.seed * 7919 + it)
        for epoch in range(c.ppo_epochs):
            perm = torch.randperm(len(mine), generator=g).to(d.device)
            for k in range(n_mb):
                step = (it * c.ppo_epochs + epoch) * n_mb + k + 1
                lr = stage.set_lr(opt, c, step, total_steps)
                idx = perm[k * mb:(k + 1) * mb]
                sub = r.rows(idx)
                lm = None
                if c.ptx_coef:  # PPO-ptx: next-token loss on pretraining text, in the same optimizer step
                    x, y = shards.batch("train", c.minibatch_size, policy.config.max_seq_len, step, 0, d.rank, d.world)
                    lm = x.to(d.device), y.to(d.device)
                with amp:
                    logits, values, ptx = both_t(sub, lm)  # (b, N, V), (b, N), ()
                    logprobs = rl.token_logprobs(logits, sub.tokens, c.temperature)  # (b, N)
                pg_loss, pg = losses.ppo_policy_loss(logprobs, old_logprobs[idx], advantages[idx], sub.mask, c.clip)
                vf_loss, vf_clipfrac = losses.ppo_value_loss(values, old_values[idx], returns[idx], sub.mask, c.vf_clip)
                ptx = torch.zeros((), device=d.device) if ptx is None else ptx
                loss = pg_loss + c.vf_coef * vf_loss + c.ptx_coef * ptx
                loss.backward()
                grad_norm = stage.optimizer_step(opt, both, c, out, f"iteration {it + 1}", dist.all_mean(loss.detach()))
                with torch.no_grad():
                    entropy = losses.masked_mean(losses.entropy_from_logits(logits / c.temperature), sub.mask)
                sums.add(**{"policy/approxkl": pg["approxkl"], "policy/clipfrac": pg["clipfrac"], "policy/entropy": entropy,
                            "loss/policy": pg_loss, "loss/value": vf_loss, "val/clipfrac": vf_clipfrac,
                            "val/ratio": pg["ratio"], "loss/ptx": ptx})
        it += 1
        t3 = dist.clock(d.device)

        # ---- 5. the iteration's statistics, averaged over ranks in one call; adaptive KL coefficient, EMA of the policy
        stats = dist.all_means({"objective/scores": scores.mean(), "objective/kl": kl.sum(1).mean(),  # KL per response
                                **scoring.gold_sums(records, rl.decode(tok, r)),
                                **{k: v / (c.ppo_epochs * n_mb) for k, v in sums.items()},
                                "eot_rate": r.ended.float().mean(), "response_length": r.lengths.float().mean()}, d.device)
        score, kl_sum, ptx_loss = stats.pop("objective/scores").item(), stats.pop("objective/kl").item(), stats.pop("loss/ptx")
        beta_used = beta
        if c.target_kl:
            beta = losses.adaptive_kl_beta(beta, kl_sum, c.target_kl, c.kl_horizon, c.batch_size)
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), policy.parameters()):
                    pe.lerp_(p, 1 - c.ema_decay)

        non_score = -beta_used * kl_sum
        metrics.log(it, **scoring.with_gold({"objective/scores": score, "objective/kl": kl_sum,
                                             "objective/non_score_reward": non_score,
                                             "objective/rlhf_reward": score + non_score, **stats}, "objective/gold"),
                    beta=beta_used, lr=lr, grad_norm=grad_norm, **({"loss/ptx": ptx_loss} if c.ptx_coef else {}),
                    **{"time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2})
        if held and (it % c.eval_every == 0 or it == c.iterations):
            metrics.log(it, **evaluate())
        if it % c.ckpt_every == 0 or it == c.iterations:
            stage.save_checkpoint(out, it, both, opt, c, split=True, beta=beta,
                                  ema=ema.state_dict() if ema is not None else None)

    final = rl.split_state(dist.model_state(both)).get("policy")  # gathered to rank 0 under FSDP2 ({} elsewhere)
    if d.main and ema is not None:
        checkpoint.save_pretrained(ema, out / "ema", tokenizer_dir=c.policy)
    return stage.finish(d, metrics, policy, final, out, c.policy,
                        note=f" (and the EMA policy in {out / 'ema'})" if ema is not None else "")
