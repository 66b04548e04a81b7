"""DPO: learn the rankings directly, without a reward model (Rafailov et al. 2023), written out.

    shoggoth dpo --policy runs/sft --rankings rankings.jsonl --out runs/dpo
    shoggoth dpo --policy DIR --rankings pairs.jsonl --beta 0.1 --out DIR     # TRL pairs work too

Each K-way ranking expands into its untied pairs (better, worse): C(K, 2) pairs when
there are no ties. Each pair's two responses are scored by their summed log-prob
under the policy and under the frozen reference (the SFT model, or with LoRA the
policy with its adapters off; its log-probs are computed once, before training), and losses.dpo_loss pushes the policy's implicit
reward beta * log(pi / pi_ref) of the better response above the worse one's.
The logged `rewards/*` are those implicit rewards (TRL's names).
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..lm import checkpoint, lora
from ..data.rankings import epoch_batches, split_rankings
from ..train import dist, losses, rl, stage
from ..errors import ShoggothError
from ..train.metrics import Metrics, Sums


@dataclass
class Config(lora.Options, stage.Common):
    """DPO on K-way rankings (every untied pair) or TRL pairs, with a frozen reference."""

    policy: str = ""  # model directory (or hub id) to optimise (the SFT model); also the frozen reference
    ref: str = ""  # frozen reference model; empty = the policy (where DPO starts). `shoggoth rounds --rl dpo` sets the SFT model
    revision: str = ""  # branch, tag or commit of --policy when it is a hub id; empty = main
    rankings: str = ""  # rankings {"prompt", "completions", "ranks"}, TRL pairs {"prompt", "chosen", "rejected"}, HH transcripts or scored completions: JSONL, Parquet, Arrow, a save_to_disk folder or a hub ID:SPLIT
    eval_rankings: str = ""  # held-out rankings (as --rankings); empty = hold out eval_frac of the prompts of --rankings
    eval_frac: float = 0.1  # share of prompts (with all their rankings) held out when there is no --eval-rankings
    heldout_prompts: str = "builtin"  # prompts kept for evaluation, whose rankings are refused: builtin (chatterbot held-out questions), a prompts JSONL, or none
    out: str = "runs/dpo"
    skip_invalid: bool = False  # skip (and count) invalid rows instead of stopping at the first
    seq_len: int = 0  # longest (prompt, response) row; longer ones keep their end; 0 = the model's max_seq_len
    batch_size: int = 16  # pairs per optimizer step, summed over ranks
    max_memory: float = 0.0  # GiB a micro-step may use (weights, AdamW state, activations): a step's pairs go through in micro-steps that fit, and --grad-ckpt auto turns on where one pair would not; 0 = half the memory available now
    epochs: int = 1  # passes over the training pairs
    max_steps: int = 0  # stop after this many steps; 0 = run all epochs
    lr: float = 1e-6  # peak learning rate (the DPO paper's)
    beta: float = 0.1  # DPO's beta: strength of the implicit KL leash to the reference
    label_smoothing: float = 0.0  # assumed probability that a pair's label is flipped (conservative DPO); 0 = plain DPO
    eval_every: int = 50  # steps between held-out loss and implicit-reward accuracy


MAY_CHANGE = stage.MAY_CHANGE | {"max_steps", "heldout_prompts", "max_memory"}


def encode_pairs(records, tok, seq_len):
    """Rankings -> (rows, pairs): rows are (ids, labels) arrays, labels -100 except on the
    response (the last assistant turn, through its end of turn); pairs are (better row,
    worse row) indices."""
    rows, pairs = [], []
    for r in records:
        first = len(rows)
        for comp in r["completions"]:
            ids, mask = tok.render_reply(r["prompt"], comp)
            ids, mask = np.array(ids[-seq_len:]), np.array(mask[-seq_len:])
            # Predict token t+1 at position t: the label of position t is the next token, where it is trained on.
            labels = np.where(np.roll(mask, -1) == 1, np.roll(ids, -1), -100)
            labels[-1] = -100
            rows.append((ids, labels))
        ranks = r["ranks"]
        pairs += [(first + i, first + j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]
    return rows, pairs


def sequence_logps(model, rows, pad_id, device):
    """Summed log-probs (B,) of each row's labelled tokens, right-padded in one batch."""
    T = max(len(x) for x, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (x, y) in enumerate(rows):
        idx[b, :len(x)], labels[b, :len(y)] = torch.from_numpy(x), torch.from_numpy(y)
    idx, labels = idx.to(device), labels.to(device)
    # Logits at the labelled positions only: the prompt positions' log-probs are never read
    # (bench/RESULTS.md: the time this saves).
    labelled = labels != -100
    logits = model(idx, at=labelled)  # (M, V)
    nll = F.cross_entropy(logits.float(), labels[labelled], reduction="none")  # (M,)
    return -torch.zeros(len(rows), device=device).index_add_(0, labelled.nonzero()[:, 0], nll)  # (B,)


def run(c: Config):
    if not c.policy or not c.rankings:
        raise ShoggothError("dpo: --policy DIR (the SFT model) and --rankings FILE.jsonl are required")
    d, out, state, ckpt_path = stage.begin(c, MAY_CHANGE)

    tok, policy, ref = rl.load_policy(c, d.device)
    seq_len = c.seq_len or policy.config.max_seq_len
    train_recs, held_recs = split_rankings(c.rankings, c.eval_rankings, c.eval_frac, c.skip_invalid, dist.print0,
                                           c.heldout_prompts)
    rows, pairs = encode_pairs(train_recs, tok, seq_len)
    held_rows, held_pairs = encode_pairs(held_recs, tok, seq_len)
    dist.print0(f"data: {len(train_recs)} train / {len(held_recs)} held-out rankings -> {len(pairs)} / {len(held_pairs)} "
                f"(better, worse) pairs over {len(rows)} / {len(held_rows)} responses")
    if not pairs:
        raise ShoggothError(f"{c.rankings}: no untied pair to train on")
    if c.batch_size < d.world:
        raise ShoggothError(f"--batch-size {c.batch_size} is below the number of processes ({d.world})")

    batches = epoch_batches(pairs, c.batch_size, c.epochs, c.seed, d.world)  # of pairs
    total = min(len(batches), c.max_steps) if c.max_steps else len(batches)

    amp_dtype = dist.autocast_dtype(d.device, c.dtype)
    amp = dist.autocast(d.device, amp_dtype)

    def all_logps(model, rows_):
        """Summed response log-probs of every row, in batches of rows (no grad)."""
        out_ = []
        with torch.no_grad(), amp:
            for i in range(0, len(rows_), 2 * c.batch_size):
                out_.append(sequence_logps(model, rows_[i:i + 2 * c.batch_size], tok.pad_id, d.device).float())
        return torch.cat(out_) if out_ else torch.zeros(0, device=d.device)

    # The reference's log-probs once, before training: it never changes.
    t0 = time.perf_counter()
    with rl.reference(policy, ref) as m:
        ref_logps, ref_held = all_logps(m, rows), all_logps(m, held_rows)
    del ref, m
    dist.print0(f"reference log-probs of {len(rows) + len(held_rows)} responses in {time.perf_counter() - t0:.1f}s")

    if state:
        checkpoint.load_trained(policy, state["model"], ckpt_path)
    # A step's pairs (this rank's share) go through in micro-steps that fit the memory budget, each
    # a pair's two rows at the longest row's length; checkpointing (auto) where the whole share would not fit.
    micro, ckpt_note = stage.micro_steps(policy, c, d, -(-c.batch_size // d.world), 2 * max(len(x) for x, *_ in rows),
                                         "dpo", "pair")
    train_model, opt, step = stage.train_setup(policy, c, d, amp_dtype, state, ckpt_path)
    metrics = Metrics(out, total, resume_step=step, enabled=d.main, config=c)
    dist.print0(f"dpo: {policy.num_params():,} parameters, {total} steps of {c.batch_size} pairs, beta {c.beta}, "
                f"autocast {amp_dtype}{lora.summary(policy)}{ckpt_note}")

    def pair_stats(chosen, rejected, ref_chosen, ref_rejected):
        """(mean loss, sums of TRL's statistics) of pairs: their implicit rewards, accuracy, margin, log-probs."""
        loss, rc, rr = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta, c.label_smoothing)
        return loss, {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/accuracies": (rc > rr).sum(),
                      "rewards/margins": (rc - rr).sum(), "logps/chosen": chosen.sum(), "logps/rejected": rejected.sum()}

    def evaluate():
        """Held-out loss and implicit-reward accuracy and margin over this rank's share of the held-out pairs."""
        if not held_pairs:
            return {}
        policy.eval()  # no LoRA dropout in evaluation
        logps = all_logps(policy, held_rows)
        policy.train()
        mine = torch.tensor(dist.share(held_pairs, d), dtype=torch.long, device=d.device).view(-1, 2)
        s = Sums("loss", "rewards/accuracies", "rewards/margins")  # loss: summed over pairs
        if len(mine):  # more ranks than held-out pairs leaves some with none
            w, l = mine[:, 0], mine[:, 1]
            loss, st = pair_stats(logps[w], logps[l], ref_held[w], ref_held[l])
            s.add(loss=loss * len(mine), **{k: st[k] for k in ("rewards/accuracies", "rewards/margins")})
        s = dist.all_sums(s, d.device)
        return {"val_loss": s["loss"] / len(held_pairs), **{f"val/{k}": s[k] / len(held_pairs)
                                                            for k in ("rewards/accuracies", "rewards/margins")}}

    if step == 0 and held_pairs:
        metrics.log(0, **evaluate())
    while step < total:
        step += 1
        t0 = dist.clock(d.device)
        lr = stage.set_lr(opt, c, step, total)
        batch = batches[step - 1]
        mine, sums = dist.share(batch, d), Sums()
        parts = [mine[j:j + micro] for j in range(0, len(mine), micro)]
        for k, part in enumerate(parts):
            w = torch.tensor([p[0] for p in part], device=d.device)
            l = torch.tensor([p[1] for p in part], device=d.device)
            with dist.grad_sync(train_model, k == len(parts) - 1):
                with amp:
                    logps = sequence_logps(train_model, [rows[i] for i in w.tolist() + l.tolist()], tok.pad_id, d.device)
                chosen, rejected = logps[:len(part)], logps[len(part):]
                loss, st = pair_stats(chosen, rejected, ref_logps[w], ref_logps[l])
                (loss * len(part) * d.world / len(batch)).backward()  # each pair weighs the same over ranks (DDP averages)
            sums.add(loss=loss * len(part), **st)
        means = {k: v / len(batch) for k, v in dist.all_sums(sums, d.device).items()}
        grad_norm = stage.optimizer_step(opt, policy, c, out, f"step {step}", means["loss"])
        tokens = sum(len(rows[i][0]) for p in batch for i in p)
        metrics.log(step, **means, lr=lr, grad_norm=grad_norm.item(), **{"tok/s": tokens / (dist.clock(d.device) - t0)})
        if held_pairs and (step % c.eval_every == 0 or step == total):
            metrics.log(step, **evaluate())
        if step % c.ckpt_every == 0 or step == total:
            stage.save_checkpoint(out, step, policy, opt, c)  # rank 0 writes; every rank resumes from it

    return stage.finish(d, metrics, policy, dist.model_state(policy), out, c.policy)
