"""Reward model: learn to predict the human rankings (InstructGPT, Ouyang et al. 2022, section 3.5).

    shoggoth reward --init runs/sft --rankings rankings.jsonl --out runs/reward
    shoggoth score runs/reward --prompt "Hi" --completion "Hello!"

The SFT model's trunk plus a scalar head, read at the end-of-turn token that closes
each (prompt, completion) rendered with the model's chat template. Each ranking (one labeler,
one prompt, K completions) is one batch element: its K completions are scored in
one forward and all its untied pairs are averaged in the loss (losses.ranking_loss),
so a completion is never seen in many separate batch elements. TRL pairs
{"prompt", "chosen", "rejected"} are rankings with K = 2.

After training, the reward is shifted so that its mean over completions the SFT
policy samples for the training prompts is 0; the shift is stored in config.json
(`reward_shift`). The directory is a Hugging Face sequence-classification model:
transformers gives the raw score, shoggoth raw - shift.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..lm import checkpoint, lora, sampling, tokenizer
from ..data.rankings import (encode_rankings, flatten_rankings, grouped_batches, pad_right, prompt_key, reward_rows,
                             split_rankings)
from ..train import dist, losses, stage
from ..errors import ShoggothError
from ..feedback.agreement import kendall_tau_b
from ..train.metrics import Metrics, Sums
from ..lm.model import RewardModel
from ..evaluation.scoring import score_pad, scores


@dataclass
class Config(lora.Options, stage.Common):
    """Reward model on K-way rankings (or TRL pairs), InstructGPT's loss."""

    init: str = ""  # model directory (or hub id) whose trunk starts the reward model (the SFT model); also the policy sampled for normalisation
    revision: str = ""  # branch, tag or commit of --init when it is a hub id (--warm: main); empty = main
    warm: str = ""  # reward model directory (or hub id) whose trunk and head start training instead (`shoggoth rounds`: the last round's)
    rankings: str = ""  # rankings {"prompt", "completions", "ranks"}, TRL pairs {"prompt", "chosen", "rejected"}, HH transcripts or scored completions: JSONL, Parquet, Arrow, a save_to_disk folder or a hub ID:SPLIT
    eval_rankings: str = ""  # held-out rankings (as --rankings); empty = hold out eval_frac of the prompts of --rankings
    eval_frac: float = 0.1  # share of prompts (with all their rankings) held out when there is no --eval-rankings
    heldout_prompts: str = "builtin"  # prompts kept for evaluation, whose rankings are refused: builtin (chatterbot held-out questions), a prompts JSONL, or none
    out: str = "runs/reward"  # output Hugging Face sequence-classification directory
    skip_invalid: bool = False  # skip (and count) invalid rows instead of stopping at the first
    seq_len: int = 0  # longest (prompt, completion) row; longer ones keep their end; 0 = the model's max_seq_len
    batch_size: int = 8  # rankings per micro-step (each with all its K completions), summed over ranks; the rankings of one task stay together
    grad_accum: int = 1  # micro-steps per optimizer step
    max_memory: float = 0.0  # GiB a micro-step may use (weights, AdamW state, activations): its rankings go through in smaller micro-steps that fit, and --grad-ckpt auto turns on where one ranking would not; 0 = half the memory available now
    epochs: int = 1  # passes over the training rankings (InstructGPT: 1; more overfits)
    max_steps: int = 0  # stop after this many steps; 0 = run all epochs
    eval_every: int = 50  # steps between held-out accuracy, Kendall tau and loss
    normalize_samples: int = 256  # training prompts whose SFT-policy completion sets the reward's zero; 0 = no shift
    normalize_max_new_tokens: int = 64  # longest completion sampled for the normalisation
    normalize_temperature: float = 1.0  # sampling temperature of the normalisation completions


MAY_CHANGE = stage.MAY_CHANGE | {"max_steps", "heldout_prompts", "normalize_samples", "normalize_max_new_tokens",
                                 "normalize_temperature", "max_memory"}


def load_rankings(c: Config, log):
    """(train, held-out) rankings. Without --eval-rankings the held-out share is a set of
    prompts (chosen by a hash), so that no held-out prompt has rankings in training."""
    return split_rankings(c.rankings, c.eval_rankings, c.eval_frac, c.skip_invalid, log, c.heldout_prompts)


def normalization_shift(model, c: Config, tok, prompts, device, log):
    """Mean raw reward of one completion per prompt sampled from the SFT policy (--init)."""
    policy = checkpoint.load_pretrained(c.init).to(device)
    texts = sampling.chat_replies((policy, tok), prompts, c.normalize_max_new_tokens, c.normalize_temperature,
                                  seed=c.seed, batch_size=64, strip=False)
    del policy
    rows = [reward_rows(tok, p, [t])[0][-(c.seq_len or model.config.max_seq_len):] for p, t in zip(prompts, texts)]
    with torch.no_grad():  # fp32, as `shoggoth score` and transformers compute it
        raw = scores(model.eval(), rows, tok.pad_id, device)
    log(f"normalisation: {len(rows)} SFT-policy completions of training prompts: raw reward mean "
        f"{raw.mean().item():.4f}, std {raw.std().item() if len(raw) > 1 else 0.0:.4f}; stored shift = the mean")
    return raw.mean().item()


def run(c: Config):
    if not c.init or not c.rankings:
        raise ShoggothError("reward: --init DIR (the SFT model) and --rankings FILE.jsonl are required")
    d, out, state, ckpt_path = stage.begin(c, MAY_CHANGE)

    tok = tokenizer.load(c.init)
    config = checkpoint.gpt_config(checkpoint.read_config(c.init), where=f"{c.init}/config.json")
    tok.check_model(config.vocab_size, c.init)
    config.pad_token_id = score_pad(tok)  # transformers reads the score at the last token that is not pad
    seq_len = c.seq_len or config.max_seq_len
    train, held = load_rankings(c, dist.print0)
    cut = sum(encode_rankings(recs, tok, seq_len, config.pad_token_id) for recs in (train, held))
    n_pairs = lambda recs: sum(sum(a < b for a in r["ranks"] for b in r["ranks"]) for r in recs)  # noqa: E731
    dist.print0(f"data: {len(train)} train / {len(held)} held-out rankings ({n_pairs(train)} / {n_pairs(held)} untied "
                f"pairs), K = {sorted({len(r['rows']) for r in train})}; {cut} rows truncated to seq_len={seq_len}")
    if c.batch_size < d.world:
        raise ShoggothError(f"--batch-size {c.batch_size} is below the number of processes ({d.world})")

    batches = grouped_batches(train, c.batch_size, c.epochs, c.seed, d.world)
    held_batches = grouped_batches(held, c.batch_size, 1, c.seed, 1)
    total = len(batches) // c.grad_accum
    if c.max_steps:
        total = min(total, c.max_steps)

    torch.manual_seed(c.seed)
    model = RewardModel(config)  # head ~ N(0, 1/(d+1))
    checkpoint.load_trunk(model, c.init)
    if c.warm:  # the last reward model goes on learning, head and all
        if not tok.same_tokens(c.warm):
            raise ShoggothError(f"--warm {c.warm}: its tokenizer differs from --init's; warm-start from a reward model "
                                "trained from the same SFT model")
        model.load_state_dict(checkpoint.load_reward(c.warm)[0].state_dict())
    lora.wrap(model, c, c.seed, trained=("score",)).to(d.device)  # with LoRA: adapters and the head train
    if state:
        checkpoint.load_trained(model, state["model"], ckpt_path)
    amp_dtype = dist.autocast_dtype(d.device, c.dtype)
    # A micro-step's rankings (this rank's share) go through in smaller micro-steps that fit the memory budget,
    # each ranking at the most completions and the longest row; checkpointing (auto) where the share would not fit.
    per, ckpt_note = stage.micro_steps(model, c, d, -(-c.batch_size // d.world),
                                       max(len(r["rows"]) for r in train) * max(len(x) for r in train for x in r["rows"]),
                                       "reward", "ranking")
    train_model, opt, step = stage.train_setup(model, c, d, amp_dtype, state, ckpt_path)
    amp = dist.autocast(d.device, amp_dtype)
    metrics = Metrics(out, total, resume_step=step, enabled=d.main, config=c)
    dist.print0(f"reward: {model.num_params():,} parameters, {total} steps ({c.epochs} epoch(s), {c.batch_size} "
                f"rankings per micro-step), autocast {amp_dtype}{lora.summary(model)}{ckpt_note}")

    def micro(records, fwd):
        """This rank's share of rankings -> (loss, margins, tokens)."""
        rows, which, ranks, groups = flatten_rankings(records)
        idx, last = pad_right(rows, tok.pad_id)
        rewards = fwd(idx.to(d.device), last=last.to(d.device))[which.to(d.device)]  # (N,)
        loss, margins = losses.ranking_loss(rewards, ranks.to(d.device), groups.to(d.device))
        return loss, margins, sum(map(len, rows))

    def evaluate():
        """Held-out loss, pairwise accuracy, margin, and mean Kendall tau-b of the model's
        ordering against each human ranking."""
        model.eval()
        sums, taus = Sums("loss", "rankings", "correct", "pairs", "margin"), []  # loss: summed over rankings
        # Weights gathered once (under FSDP2): a rank left without rankings by a small last batch
        # skips it, which sharded forwards, each an all-gather on every rank, would not allow.
        with torch.no_grad(), amp, dist.full_weights(model):
            for recs in held_batches:  # every rank takes its share of the same batches
                recs = dist.share(recs, d)
                if not recs:
                    continue
                rows, which, ranks, groups = flatten_rankings(recs)
                r = scores(model, rows, tok.pad_id, d.device)[which.to(d.device)]
                loss, m = losses.ranking_loss(r, ranks.to(d.device), groups.to(d.device))
                sums.add(loss=loss * len(recs), rankings=len(recs), correct=(m > 0).sum(), pairs=len(m), margin=m.float().sum())
                k = 0
                for rec in recs:
                    own = r[k:k + len(rec["rows"])].tolist()
                    k += len(rec["rows"])
                    t = kendall_tau_b(rec["ranks"], [-x for x in own])  # rank 0 best, score high best
                    if t is not None:
                        taus.append(t)
        s = dist.all_sums({**sums, "tau": torch.tensor(sum(taus), dtype=torch.float64),
                           "taus": torch.tensor(len(taus), dtype=torch.float64)}, d.device)
        model.train()
        return {"val_loss": s["loss"] / s["rankings"], "val_accuracy": s["correct"] / s["pairs"],
                "val_margin": s["margin"] / s["pairs"], "val_tau": s["tau"] / s["taus"] if s["taus"] else float("nan")}

    final_eval = None
    if step == 0 and held:
        metrics.log(0, **evaluate())
    model.train()
    while step < total:
        step += 1
        t0 = dist.clock(d.device)
        lr = stage.set_lr(opt, c, step, total)
        micro_batches = batches[(step - 1) * c.grad_accum: step * c.grad_accum]
        n_rankings = sum(map(len, micro_batches))
        # Each ranking weighs the same in the step's mean, over micro-steps and ranks (DDP averages over ranks).
        s, tokens = Sums(), 0  # loss: summed over rankings
        for k, recs in enumerate(micro_batches):
            mine = dist.share(recs, d)
            parts = [mine[j:j + per] for j in range(0, len(mine), per)]
            for p, part in enumerate(parts):
                with amp, dist.grad_sync(train_model, k == len(micro_batches) - 1 and p == len(parts) - 1):
                    loss, m, n_tok = micro(part, train_model)
                    (loss * len(part) * d.world / n_rankings).backward()
                s.add(loss=loss * len(part), correct=(m > 0).sum(), pairs=len(m), margin=m.sum())
                tokens += n_tok
        s = dist.all_sums(s, d.device)
        loss_val = (s["loss"] / n_rankings).item()
        grad_norm = stage.optimizer_step(opt, model, c, out, f"step {step}", loss_val)
        dt = dist.clock(d.device) - t0
        metrics.log(step, loss=loss_val, accuracy=s["correct"] / s["pairs"], margin=s["margin"] / s["pairs"],
                    lr=lr, grad_norm=grad_norm.item(), **{"tok/s": tokens * d.world / dt})
        if held and (step % c.eval_every == 0 or step == total):
            final_eval = evaluate()
            metrics.log(step, **final_eval)
        if step % c.ckpt_every == 0 or step == total:
            stage.save_checkpoint(out, step, model, opt, c)  # rank 0 writes; every rank resumes from it
    if held and final_eval is None:  # resumed after the last step
        final_eval = evaluate()
    if held:
        e = final_eval
        dist.print0(f"held-out: pairwise accuracy {e['val_accuracy']:.3f} over {n_pairs(held)} pairs, mean Kendall "
                    f"tau-b {e['val_tau']:.3f} over {len(held)} rankings, margin {e['val_margin']:.3f}, loss {e['val_loss']:.4f}")

    shift = 0.0
    if c.normalize_samples:
        unique = list({prompt_key(r): r["prompt"] for r in train}.values())
        pick = np.random.default_rng(c.seed).permutation(len(unique))[:c.normalize_samples]
        shift = normalization_shift(model, c, tok, [unique[i] for i in sorted(pick)], d.device, dist.print0)
        metrics.log(step, echo=False, reward_shift=shift)
    pad = config.pad_token_id
    note = (f" (reward_shift {shift:.4f}; pad_token_id {pad} "
            f"{tok.token(pad) if pad is not None else '(none: transformers scores one row at a time)'!r})")
    return stage.finish(d, metrics, model, dist.model_state(model), out, c.init, shift=shift, note=note)
