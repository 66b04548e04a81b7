"""`shoggoth rounds`: RLHF in rounds. InstructGPT iterated its steps 2 and 3; Anthropic's HH model
and Llama 2 were trained in weekly rounds, each ranking answers of the latest policy, so that the
reward model keeps up with what the policy writes and stops rewarding its exploits.

    shoggoth rounds --sft runs/sft --reward runs/reward --prompts prompts.jsonl --db feedback.db \\
        --rounds 2 --out runs/rounds [--simulate balanced] [--select uncertain]

Round n, in OUT/round-n/, each step resumable (re-run the same command after a kill, or to go on
waiting for people):

  1. ask:    a fresh slice of the prompts file, never ranked in an earlier round; K completions of
             each from the current policy, as campaign `round-n` of the ranking app. With
             --select uncertain, `pool` times as many candidate prompts are sampled, and those
             whose completions an ensemble of reward heads disagrees on most are kept.
  2. rank:   people rank in the app while this command shows the progress (--no-wait: show it
             once and stop; re-run later), or simulated labelers rank at once (--simulate PERSONA).
  3. reward: the reward model retrained on every round's rankings so far (and --rankings), warm
             from the last one; its accuracy on the round's held-out prompts (eval_frac of them)
             at step 0 is the last model's, before, and at the end the new one's, after.
  4. ppo:    PPO (or GRPO, --rl grpo) continues from the current policy against the new reward
             model, the KL leash still to the SFT model (--sft). Or online DPO (--rl dpo): DPO from
             the current policy on every round's rankings so far, its frozen reference the SFT model;
             the reward model then only measures the round.

Evaluation campaigns (blind comparisons) never feed training: a round named like one is refused.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .lm import checkpoint, tokenizer
from . import config
from .data.files import atomic_write, write_json
from .data.prompts import builtin_prompts
from .data.rankings import flatten_rankings, hold_out, pad_right, read_rankings, reward_rows
from .data.rows import iter_rows
from .train import metrics
from .errors import DataError, ShoggothError
from .feedback import campaigns, jobs, queries
from .feedback.db import connect
from .train.metrics import duration


@dataclass
class Config:
    """RLHF in rounds: sample the current policy, rank (people or simulated), retrain the reward model, PPO again."""

    sft: str = ""  # the SFT model (a directory or hub id): every round's KL reference, and the first round's policy unless --policy
    revision: str = ""  # branch, tag or commit of --sft when it is a hub id (--policy and --reward: main); empty = main
    policy: str = ""  # the policy round 1 samples and PPO continues; empty = --sft
    reward: str = ""  # reward model round 1 warm-starts from (and the first ensemble reads); empty = round 1 trains from --sft
    rankings: str = ""  # rankings collected before the rounds (as reward's --rankings) (the first campaign's export): in every round's training
    prompts: str = ""  # prompts ({"prompt"} or {"messages"}, optional "references"; as ppo's --prompts); empty = built-in chatterbot questions
    db: str = "feedback.db"  # the ranking app's database: a SQLite file or a database URL
    out: str = "runs/rounds"  # run directory: round-1/, round-2/, ... and rounds.json
    rounds: int = 2  # rounds to run; a re-run with more continues from the last finished one
    prompts_per_round: int = 32  # prompts ranked per round (fresh ones each round)
    k: int = 4  # completions per prompt
    rankings_per_task: int = 3  # rankings each prompt collects
    simulate: str = ""  # persona of simulated labelers who rank each round at once; empty = people in the ranking app
    labelers: int = 3  # simulated labelers
    min_agreement: float = -1.0  # leave out a round's rankings by labelers whose tau with the others is below this; -1 = none
    select: str = "random"  # random | uncertain: which prompts labelers get (uncertain: those the reward heads disagree on most)
    pool: int = 4  # with --select uncertain: candidate prompts sampled per prompt kept
    heads: int = 8  # reward heads in the ensemble that measures disagreement
    eval_frac: float = 0.25  # share of each round's prompts held out to measure the reward model before and after
    max_new_tokens: int = 48  # longest sampled completion
    temperature: float = 1.0  # sampling temperature of the completions
    reward_config: str = "demo-reward"  # preset or TOML file of the reward stage
    ppo_config: str = "demo-ppo"  # preset or TOML file of the PPO stage
    rl: str = "ppo"  # ppo | grpo | dpo: the RL stage of each round (its policy goes to round-N/ppo either way)
    grpo_config: str = ""  # preset or TOML file of the GRPO stage with --rl grpo; empty = its defaults
    dpo_config: str = "demo-dpo"  # preset or TOML file of the DPO stage with --rl dpo (online DPO: each round's on the rankings so far)
    iterations: int = 0  # PPO iterations per round; 0 = the PPO preset's
    wait: bool = True  # wait while people rank; --no-wait shows the progress once and stops (re-run to go on)
    poll: float = 30.0  # seconds between progress checks while people rank
    dtype: str = "auto"  # auto | bf16 | fp32: autocast dtype of the reward and PPO stages
    device: str = ""  # cpu | cuda; empty = cuda when available
    grad_ckpt: str = "auto"  # auto | on | off: activation checkpointing of the reward and RL stages (as their --grad-ckpt)
    report_to: list[str] = field(default_factory=lambda: ["auto"])  # trackers of the reward and RL stages (as their --report-to)
    seed: int = 0  # seeds the prompt order, sampling and the ensemble


def passed(c: Config):
    """The fields every round's reward and RL stage takes from the rounds' own flags."""
    return {"dtype": c.dtype, "device": c.device, "grad_ckpt": c.grad_ckpt, "report_to": c.report_to}


CHANCE = 0.55  # held-out pairwise accuracy below which a round's reward model is said to have learnt nothing
ASKED = ("round", "out", "policy", "select", "prompts", "disagreement")  # what asked.json and the campaign keep of step 1


def log(msg):
    print(f"[rounds] {msg}", flush=True)


# ---------------------------------------------------------------- which prompts


def prompt_records(c: Config):
    return jobs.read_prompts(c.prompts) if c.prompts else builtin_prompts("train")


def used_prompts(out, n):
    """Indices of the prompts rounds 1..n-1 asked about."""
    return {i for m in range(1, n) for i in json.loads((out / f"round-{m}" / "asked.json").read_text())["prompts"]}


def features(model, rows, pad_id, batch_size=64):
    """The reward model's trunk output (N, d) at each row's last token: what its head reads."""
    out, limit = [], model.config.max_seq_len
    rows = [r[-limit:] for r in rows]  # a long row keeps its end, as the reward stage trains it
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            idx, last = pad_right(rows[i:i + batch_size], pad_id)
            h = model.model(idx)  # (B, T, d)
            out.append(h[torch.arange(len(idx)), last].float())  # (B, d)
    return torch.cat(out)


def fit_heads(reward_dir, rankings, heads, seed, steps=200, lr=0.05, l2=1e-3):
    """An ensemble of reward heads: each a copy of the reward model's head, refitted with InstructGPT's
    loss on a bootstrap resample of the rankings (features of the frozen trunk). Where the rankings
    pin the reward down the heads agree; where they do not, the resamples pull them apart
    (a last-layer bootstrap ensemble: one trunk pass, heads in seconds). Returns (model, tok, W (H, d))."""
    model, _ = checkpoint.load_reward(reward_dir)
    model.eval()
    tok = tokenizer.load(reward_dir)
    recs = [r for r in rankings if len(set(r["ranks"])) > 1]
    if not recs:
        raise DataError("--select uncertain: no rankings with an untied pair to fit the ensemble of reward heads on")
    for r in recs:
        r["rows"] = reward_rows(tok, r["prompt"], r["completions"])
    rows, which, ranks, groups = flatten_rankings(recs)
    F = features(model, rows, tok.pad_id)  # (R, d)
    # Every ranking's untied pairs (better i, worse j), found once: losses.ranking_loss finds them
    # among all N x N completions of its batch, too slow for every ranking so far at every step.
    pi, pj, pg = [], [], []
    start = 0
    for g, r in enumerate(recs):
        k = len(r["ranks"])
        for a in range(k):
            for b in range(k):
                if r["ranks"][a] < r["ranks"][b]:
                    pi.append(int(which[start + a]))
                    pj.append(int(which[start + b]))
                    pg.append(g)
        start += k
    pi, pj, pg = torch.tensor(pi), torch.tensor(pj), torch.tensor(pg)
    per_ranking = torch.bincount(pg, minlength=len(recs)).float()  # (G,) untied pairs of each ranking
    w0 = model.score.weight.detach().float()[0]  # (d,)
    gen = torch.Generator().manual_seed(seed)
    W = []
    for _ in range(heads):
        # A bootstrap resample of the rankings, as how often each is drawn; InstructGPT's loss over it:
        # the mean over drawn rankings of the mean over each one's pairs of -log sigmoid(r_i - r_j).
        drawn = torch.bincount(torch.randint(len(recs), (len(recs),), generator=gen), minlength=len(recs)).float()
        weight = (drawn / per_ranking)[pg] / drawn.sum()  # (P,)
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            s = F @ w  # (R,)
            loss = (weight * -torch.nn.functional.logsigmoid(s[pi] - s[pj])).sum()
            (loss + l2 * (w - w0).pow(2).sum()).backward()
            opt.step()
            opt.zero_grad()
        W.append(w.detach())
    return model, tok, torch.stack(W)


def disagreement(model, tok, W, records, texts):
    """Per prompt: the ensemble's disagreement over which of its completions is better, the variance
    across heads of sigmoid(r_i - r_j), averaged over its pairs of completions."""
    rows = [row for rec, comps in zip(records, texts) for row in reward_rows(tok, rec["messages"], comps)]
    scores = features(model, rows, tok.pad_id) @ W.T  # (rows, H): every prompt's completions in one pass
    out, start = [], 0
    for comps in texts:
        s = scores[start:start + len(comps)]  # (K, H)
        start += len(comps)
        p = torch.sigmoid(s[:, None, :] - s[None, :, :])  # (K, K, H)
        i, j = torch.triu_indices(len(comps), len(comps), 1)
        out.append(p[i, j].var(dim=-1).mean().item())
    return out


def training_rankings(c: Config, n):
    """Every ranking the reward model of round n trains on, before round n's own: --rankings and rounds 1..n-1."""
    out = Path(c.out)
    recs = read_rankings(c.rankings, log=lambda *_: None) if c.rankings else []
    for m in range(1, n):
        recs += read_rankings(out / f"round-{m}" / "rankings.jsonl", log=lambda *_: None)
    return recs


def ask(c: Config, n, policy, reward, engine):
    """Step 1: sample the chosen prompts' completions from `policy` and open campaign round-n."""
    out, name = Path(c.out) / f"round-{n}", f"round-{n}"
    records = prompt_records(c)
    used = used_prompts(Path(c.out), n)
    order = [int(i) for i in np.random.default_rng(c.seed).permutation(len(records)) if int(i) not in used]
    known = training_rankings(c, n) if c.select == "uncertain" and reward else []
    uncertain = bool(known)
    if c.select == "uncertain" and not uncertain:
        log(f"round {n}: no reward model or rankings yet to measure disagreement with: a random slice this round")
    cand = order[:c.prompts_per_round * (c.pool if uncertain else 1)]
    if len(cand) < min(c.prompts_per_round, 2):
        raise DataError(f"round {n}: {len(order)} prompts of {len(records)} left that no earlier round asked about; "
                        "give --prompts more, or fewer --prompts-per-round")
    log(f"round {n}: sampling {c.k} completions for each of {len(cand)} prompts from {policy}")
    texts = jobs.sample(policy, [records[i] for i in cand], c.k, c.max_new_tokens, c.temperature, seed=c.seed + n,
                        device=c.device or "cpu")
    scores = None
    if uncertain:
        model, tok, W = fit_heads(reward, known, c.heads, c.seed + n)
        scores = disagreement(model, tok, W, [records[i] for i in cand], texts)
        keep = sorted(np.argsort(scores, kind="stable")[::-1][:c.prompts_per_round].tolist())
        log(f"round {n}: kept the {len(keep)} of {len(cand)} prompts the {c.heads} reward heads disagree on most "
            f"(disagreement {np.mean([scores[i] for i in keep]):.4f} against {np.mean(scores):.4f} over all)")
    else:
        keep = list(range(len(cand)))
    tasks = [{"messages": records[cand[i]]["messages"], "references": records[cand[i]]["references"],
              "completions": texts[i]} for i in keep]
    asked = dict(zip(ASKED, (n, str(Path(c.out).resolve()), str(policy), "uncertain" if uncertain else "random",
                             [cand[i] for i in keep], None if scores is None else [scores[i] for i in keep])))
    # the campaign and what it asked, in one transaction: a kill after it resumes from the database
    campaigns.add_tasks(engine, name, tasks, c.rankings_per_task, source=str(policy), info=asked)
    write_json(out / "asked.json", asked)
    log(f"round {n}: campaign {name!r} open with {len(tasks)} prompts x {c.k} completions, "
        f"{c.rankings_per_task} rankings each")


def rank(c: Config, n, engine):
    """Step 2: wait until campaign round-n has all its rankings (people), or have simulated labelers
    rank it; True when it is complete."""
    name = f"round-{n}"
    if c.simulate:
        done = jobs.simulate(c.db, persona=c.simulate, labelers=c.labelers, campaign=name, seed=c.seed + n)
        log(f"round {n}: simulated labelers ({c.simulate}) submitted {sum(done.values())} rankings")
    shown = None
    while True:
        p = campaigns.round_progress(engine, name)
        if p["complete"] == p["tasks"]:
            return True
        line = progress_line(p)
        if line != shown:
            log(f"round {n}: {line}")
            shown = line
        if not c.wait:
            log(f"round {n}: not complete; re-run this command to go on (rankings are kept in {c.db})")
            return False
        time.sleep(c.poll)


def progress_line(p, now=None):
    """done / wanted rankings, per labeler, and an ETA from the pace since the round's first ranking."""
    now = now or time.time()
    left = p["wanted"] - p["done"]
    eta = "no rankings yet"
    if p["done"] and p["first"] is not None and now > p["first"]:
        eta = f"about {duration(left / (p['done'] / (now - p['first'])))} left at the pace so far"
    who = ", ".join(f"{k} {v}" for k, v in p["labelers"].items()) or "nobody yet"
    return f"{p['done']} / {p['wanted']} rankings, {p['complete']} / {p['tasks']} prompts complete ({who}); {eta}"


def write_jsonl(path, recs):
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                 for r in recs), encoding="utf-8"))


def export(c: Config, n, engine):
    """round-n/rankings.jsonl (this round's, from the database; without labelers below --min-agreement),
    train.jsonl (--rankings, every earlier round and this round's training share) and eval.jsonl (this
    round's held-out prompts)."""
    out = Path(c.out) / f"round-{n}"
    leave_out = jobs.low_agreement(engine, c.min_agreement, f"round-{n}") if c.min_agreement > -1 else frozenset()
    mine = [{k: r[k] for k in queries.EXPORT_KEYS if k in r}
            for r in queries.export_rows(engine, campaign=f"round-{n}", leave_out=leave_out)]
    write_jsonl(out / "rankings.jsonl", mine)
    raw = [row for _, row in iter_rows(c.rankings)] if c.rankings else []
    for m in range(1, n):
        raw += [json.loads(line) for line in (Path(c.out) / f"round-{m}" / "rankings.jsonl").read_text().splitlines()]
    train, held = hold_out(mine, c.eval_frac)
    write_jsonl(out / "train.jsonl", raw + train)
    write_jsonl(out / "eval.jsonl", held)
    return len(raw) + len(train), len(held)


def check_campaigns(c: Config, engine):
    """Refuse evaluation campaigns as training data: a round's name taken by one, or --rankings exported from one."""
    for n in range(1, c.rounds + 1):
        cid = campaigns.campaign_id(engine, f"round-{n}", required=False)
        if cid is not None and campaigns.round_progress(engine, f"round-{n}")["evaluation"]:
            raise DataError(f"campaign 'round-{n}' is an evaluation campaign (a blind comparison of models); "
                            "evaluations never feed training: use another --db or rename that campaign")
    if c.rankings:
        read_rankings(c.rankings, log=lambda *_: None)  # a bad line is a one-line error now, not rounds later
        for where, row in iter_rows(c.rankings):
            if "models" in row:
                raise DataError(f"{where}: a ranking of an evaluation campaign (it names its models); "
                                "evaluations never feed training")


def run(c: Config, reward=None, ppo=None):
    """Rounds 1..c.rounds, each step skipped where it finished; `reward` and `ppo`: fields set on
    those stages' presets (the demo's --quick). Returns rounds.json's content."""
    if not c.sft:
        raise ShoggothError("rounds: --sft DIR (the SFT model, the KL reference) is required")
    if c.select not in ("random", "uncertain"):
        raise ShoggothError(f"--select must be random or uncertain (got {c.select!r})")
    if c.rl not in ("ppo", "grpo", "dpo"):
        raise ShoggothError(f"--rl must be ppo, grpo or dpo (got {c.rl!r})")
    if not 2 <= c.k <= campaigns.MAX_K:
        raise ShoggothError(f"--k must be between 2 and {campaigns.MAX_K} (got {c.k})")
    if c.heads < 2:
        raise ShoggothError(f"--heads must be at least 2: disagreement needs two heads (got {c.heads})")
    if c.simulate:
        from .evaluation.simulated import persona
        persona(c.simulate)  # an unknown persona fails before anything runs
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = connect(c.db)
    check_campaigns(c, engine)
    summary_path = out / "rounds.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"rounds": []}
    reward_fields, ppo_fields = reward or {}, {**({"iterations": c.iterations} if c.iterations else {}), **(ppo or {})}
    policy, reward = c.policy or c.sft, c.reward
    for n in range(1, c.rounds + 1):
        rdir = out / f"round-{n}"
        rdir.mkdir(exist_ok=True)
        name = f"round-{n}"
        if not (rdir / "asked.json").exists():
            if campaigns.campaign_id(engine, name, required=False) is None:
                ask(c, n, policy, reward, engine)
            else:  # opened by this run, killed before it wrote asked.json; or another run's
                asked = campaigns.round_progress(engine, name)["settings"]
                if asked.get("out") != str(out.resolve()):
                    raise DataError(f"campaign {name!r} in {c.db} belongs to another run ({asked.get('out')}): give "
                                    "this run its own --db, or the --out of that run")
                write_json(rdir / "asked.json", {k: asked.get(k) for k in ASKED})
        if not (rdir / "rankings.jsonl").exists() or not (rdir / "train.jsonl").exists():
            if not rank(c, n, engine):
                return summary
            n_train, n_held = export(c, n, engine)
            log(f"round {n}: training the reward model on {n_train} rankings; {n_held} of round {n}'s held out")
        rw = rdir / "reward"
        if not config.finished(rw):
            config.run("reward", c.reward_config, rw, init=c.sft, warm=reward, rankings=str(rdir / "train.jsonl"),
                       eval_rankings=str(rdir / "eval.jsonl"), seed=c.seed + n, **passed(c),
                       **reward_fields)
        acc = [r["val_accuracy"] for r in metrics.read(rw / "metrics.jsonl") if "val_accuracy" in r]
        before = acc[0] if reward and acc else None  # step 0: the last reward model, not yet trained on this round
        after = acc[-1] if acc else None
        campaigns.set_round(engine, name, {"reward_accuracy_before": before, "reward_accuracy_after": after})
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        log(f"round {n}: reward accuracy on this round's held-out rankings: before {fmt(before)} (the last reward "
            f"model), after {fmt(after)}")
        if after is not None and after < CHANCE:
            log(f"round {n}: warning: the reward model is near chance ({after:.3f}) on this round's held-out rankings: it "
                f"has not learnt the labelers' taste from these rankings, and PPO against it learns noise. Rank more "
                "prompts per round (--prompts-per-round) or more rankings per prompt (--rankings-per-task)")
        pdir = rdir / "ppo"
        if not config.finished(pdir):
            if c.rl == "dpo":  # online DPO: from the current policy on every round's rankings so far, the
                # reference the SFT model (the same leash as PPO's KL); the reward model above only measures the round
                config.run("dpo", c.dpo_config, pdir, policy=str(policy), ref=c.sft, rankings=str(rdir / "train.jsonl"),
                           eval_rankings=str(rdir / "eval.jsonl"), seed=c.seed + n, **passed(c),
                           **(ppo or {}))
            else:
                preset = c.ppo_config if c.rl == "ppo" else c.grpo_config or None
                config.run(c.rl, preset, pdir, policy=str(policy), ref=c.sft, reward=str(rw), prompts=c.prompts,
                           seed=c.seed + n, **passed(c), **ppo_fields)
        ev = metrics.read(pdir / "metrics.jsonl")
        last = lambda k: next((r[k] for r in reversed(ev) if k in r), None)  # noqa: E731
        row = {"round": n, "policy": str(policy), "prompts": len(json.loads((rdir / "asked.json").read_text())["prompts"]),
               "rankings": len((rdir / "rankings.jsonl").read_text().splitlines()), "reward_warm_start": reward or None,
               "reward_accuracy_before": before,
               "reward_accuracy_after": after, "eval_scores": last("eval/scores"), "eval_kl": last("eval/kl"),
               "eval_distinct": last("eval/distinct"), "eval_gold": last("eval/gold")}
        summary["rounds"] = [r for r in summary["rounds"] if r["round"] != n] + [row]
        write_json(summary_path, summary)
        log(f"round {n}: done; policy {pdir} (held-out proxy reward {fmt(row['eval_scores'])}, KL {fmt(row['eval_kl'])}, "
            f"distinct answers {fmt(row['eval_distinct'])})")
        policy, reward = str(pdir), str(rw)
    return summary
