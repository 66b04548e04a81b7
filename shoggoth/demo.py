"""`shoggoth demo`: every layer of the cake on the built-in defaults, one after the other.

pretrain (King James Bible, chit-chat conversations) -> SFT (chatterbot-corpus) -> two rounds of
RLHF (`shoggoth rounds`): K completions per prompt from the current policy, ranked by simulated
labelers through the feedback app's database -> reward model retrained on every round so far ->
PPO from the current policy; then DPO on the same rankings for comparison -> answers (the
held-out prompts through every model, proxy and gold scores; "the mask" of the report) -> blind win rates
(the simulated labelers rank every model's answers to the held-out prompts, as an
evaluation campaign of the feedback app) -> report.html.

Each step writes its own directory under the run directory; a finished step is
skipped on a second run and an interrupted stage resumes from its last
checkpoint, so re-running the same command continues where it stopped.
"""

import dataclasses
import json
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import config, rounds
from .data.files import write_json
from .data.prompts import builtin_prompts, prompt_text
from .errors import ShoggothError
from .evaluation import report, simulated
from .evaluation.scoring import load_scorer, score_replies, score_texts
from .feedback import campaigns, jobs, queries, winrate
from .feedback.agreement import agreement
from .feedback.db import connect
from .lm import checkpoint, lora, sampling
from .train import dist, metrics
from .train.metrics import duration

MODELS = ("pretrained", "sft", "ppo-1", "ppo", "dpo")  # ppo-1: the first round's policy; ppo: the last round's
ROUNDS = 2  # rounds of RLHF; the train prompts are split between them, and so are PPO's iterations
K = 8  # completions per prompt (InstructGPT: 4 to 9); reward accuracy 0.674-0.728 on three draws (K = 4: 0.635-0.674)
LABELERS = 3  # simulated labelers; each ranks every task, so they overlap and disagree
MASK_PROMPTS = 6  # held-out prompts shown side by side in the report
SAMPLES = 4  # sampled replies per held-out prompt behind each model's mean gold and proxy reward
# --quick: the same pipeline at toy scale, for smoke tests: each stage's preset and fields.
QUICK_PRESETS = {"pretrain": "tiny"}
QUICK = {
    "pretrain": dict(vocab_size=512, seq_len=128, max_steps=30),
    "sft": dict(max_steps=20, sample_every=0),
    "reward": dict(normalize_samples=16),
    "ppo": dict(iterations=2, batch_size=8, minibatch_size=4, eval_samples=8, eval_every=2, max_new_tokens=16),
    "dpo": dict(max_steps=4),
}
QUICK_PROMPTS = 40  # train prompts ranked at --quick, over all rounds
# --init DIR: the RLHF half on the user's model, sized to the budget from three costs measured on it
# (init_costs): sampling a reply, one training step and one forward pass. The rounds' labels (sampling
# K replies a prompt, ranking them, training the reward model on every round's rankings so far) take
# INIT_SHARES["labels"] of the budget, the held-out answers INIT_SHARES["answers"]; what is left goes to
# PPO's iterations (INIT_SHARES["ppo"] of it) and DPO's steps. Each size lies between its minimum
# (INIT_MIN) and the demo's own: fewer than 48 prompts a round and the reward model learnt nothing (at 24
# prompts x 4 a 135M model's reward model was at chance, and PPO came out worse than its start). A
# 135M model's PPO iteration took 102 s, so the preset's 15 a round would be 26 minutes. A model above
# LORA_PARAMS parameters is trained through LoRA adapters (rank 16) in the reward model, PPO and DPO.
INIT_SHARES = {"labels": 0.4, "answers": 0.15, "ppo": 0.75}
INIT_MIN = {"prompts": 48, "ppo": 2, "dpo": 10, "heldout": 40}  # per round for prompts and PPO iterations
LORA_PARAMS = 50e6
LORA = {"lora_r": 16, "lora_alpha": 32.0}


ORDER = ("pretrain", "sft", *(f"round-{n}" for n in range(1, ROUNDS + 1)), "dpo", "answers", "winrate")
# --scale: the pretraining preset. cpu: the 4M-parameter model, its steps set by the budget; small-gpu:
# a 30M-parameter model at its preset's steps (minutes on one GPU, hours on a CPU). The other
# stages' presets fit both.
SCALES = {"cpu": "demo-cpu", "small-gpu": "demo-gpu"}
BUDGET = 20 * 60  # --budget's default: the whole demo in 20 minutes, on the machine that runs it
PRETRAIN_STEPS = (150, 2400)  # the budget picks the pretraining steps in this range (2400: about 2 passes over the corpus)
# Each stage's work in matmul-seconds: its seconds x the matmul FLOP/s of the machine it was timed on
# (in the run's dtype), so a machine of half the rate is estimated to take twice as long. A machine's
# rate for the plan is read from one real pretraining step timed at the start (`step_seconds`):
# pretrain_step / its seconds. The square-matmul rate alone misjudged CPUs both ways (an AMD EPYC
# with AVX-512 bf16 measured 380-440 GFLOP/s and ran every stage in 0.34-0.5 of the estimate it
# gave, so the budget's other half went unused and its pretraining steps swung 189-311 with the
# benchmark's noise; a Sapphire Rapids Xeon measured 1,384 and ran over its estimate). Pretraining
# is its set-up (tokenizer, token shards, the first build of the decode kernel) plus pretrain_step
# per step, as the budget sets its steps. bf16 from a CPU with AVX-512 bf16 (reward, SFT and DPO
# scaled by their fp32 cuts), fp32 from the AVX2-only machine the README times. summary.json keeps
# every run's rate and timings: re-measure when a preset changes.
# A round is its sampling and ranking, its reward model (round 2's trains on both rounds' rankings)
# and its share of PPO's iterations.
WORK = {
    "bf16": {"pretrain": 62 * 7.8e11, "pretrain_step": 0.45 * 7.8e11, "sft": 75 * 7.8e11,
             "round-1": 111 * 7.8e11, "round-2": 133 * 7.8e11, "dpo": 82 * 7.8e11,
             "answers": 32 * 7.8e11, "winrate": 5 * 7.8e11},
    "fp32": {"pretrain": 70 * 1.68e11, "pretrain_step": 1.1 * 1.68e11, "sft": 130 * 1.68e11,
             "round-1": 158 * 1.68e11, "round-2": 205 * 1.68e11, "dpo": 152 * 1.68e11,
             "answers": 34 * 1.68e11, "winrate": 5 * 1.68e11},
}
WORK_QUICK = {"pretrain": 20 * 1.2e12, "pretrain_step": 0.02 * 1.2e12, "sft": 5 * 1.2e12, "round-1": 8 * 1.2e12,
              "round-2": 8 * 1.2e12, "dpo": 3 * 1.2e12, "answers": 5 * 1.2e12, "winrate": 1 * 1.2e12}  # bf16 or fp32


def plan(rate, dtype, budget, quick=False):
    """(pretraining steps, estimated seconds per stage) for a machine whose matmuls run at `rate`
    FLOP/s in `dtype`: the other stages are fixed, pretraining steps take what the budget leaves."""
    est = {k: v / rate for k, v in (WORK_QUICK if quick else WORK[dtype]).items()}
    per_step = est.pop("pretrain_step")
    if quick:
        steps = 30
    else:
        steps = int(min(max((budget - sum(est.values())) / per_step, PRETRAIN_STEPS[0]), PRETRAIN_STEPS[1]))
    est["pretrain"] += steps * per_step
    return steps, {k: est[k] for k in ORDER}


def step_seconds(amp_dtype):
    """Seconds of one step of the demo's pretraining (its preset's model and batch, forward,
    backward and AdamW, in the run's dtype) on this machine: the median of four after two to warm up."""

    stage, c = config.load("pretrain", SCALES["cpu"])
    model = stage.new_model(c, c.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr)
    x = torch.randint(0, c.vocab_size, (c.batch_size, c.seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(6):
        t = time.perf_counter()
        with dist.autocast(torch.device("cpu"), amp_dtype):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    t = sorted(times[2:])
    return (t[1] + t[2]) / 2


def init_costs(init, dev, amp):
    """(costs, parameters, LoRA fields) of the model in `init`, measured in the run's dtype: costs["row"]
    the seconds to sample one reply (K replies to four built-in prompts, one batch of 4K rows of
    up to 48 tokens, after a warm-up batch), costs["step"] one training step (forward, backward and
    AdamW, through LoRA adapters where the stages use them) and costs["fwd"] one forward without
    gradients, both on a 16-row minibatch of a prompt and a 48-token reply: what PPO, DPO and the
    reward model do over and over."""

    model, tok = sampling.load(init, dev)
    params = sum(p.numel() for p in model.parameters())
    opts = LORA if params > LORA_PARAMS else {}
    prompts = [r["messages"] for r in builtin_prompts("train")[:4]]
    msgs = [m for m in prompts for _ in range(K)]
    with torch.no_grad(), dist.autocast(dev, amp):
        # first, a short batch that pays the one-off costs (the decode kernel's build, weight packing): timed
        # with them, a 135M model's K replies took 21.6 s a prompt where the round then sampled at 2.5 s
        sampling.chat_replies((model, tok), msgs[:K], max_new_tokens=4, temperature=1.0, seed=0)
        t = time.perf_counter()
        sampling.chat_replies((model, tok), msgs, max_new_tokens=48, temperature=1.0, seed=0)
    costs = {"row": (time.perf_counter() - t) / len(msgs)}
    length = min(sum(len(tok.prompt_ids(m)) for m in prompts) // len(prompts) + 48, model.config.max_seq_len)
    x = torch.randint(0, model.config.vocab_size, (16, length), generator=torch.Generator().manual_seed(0), device=dev)
    model = lora.wrap(model.train(), lora.Options(**opts), seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    steps, fwds = [], []
    for _ in range(3):  # the first of each pays one-off costs; the least of three: a shared machine only adds
        t = time.perf_counter()
        with dist.autocast(dev, amp):
            model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad(), dist.autocast(dev, amp):
            model(x)
        fwds.append(time.perf_counter() - t)
    costs["step"], costs["fwd"] = min(steps), min(fwds)
    return costs, params, opts


def init_plan(costs, budget, train_prompts, heldout_prompts):
    """The RLHF half's sizes for a model of measured `costs` (init_costs) and the seconds each stage
    should take: {"prompts_per_round", "ppo_iterations" (a round), "dpo_steps", "heldout", "estimate",
    "over"}. Each stage's seconds are counted from its preset's work in replies sampled, training steps
    and forwards (16 rows each); "over" is True when even the minimums take longer than the budget."""
    row, step, fwd = costs["row"], costs["step"], costs["fwd"]
    ppo, dpo, rm = (config.load(s, f"demo-{s}")[1] for s in ("ppo", "dpo", "reward"))

    def labels(p, n):  # round n's: K replies to p prompts, then a reward model on every round's rankings so far
        rankings = p * n * LABELERS * 0.9  # (a tenth of the round's prompts held out)
        shift = min(rm.normalize_samples, p * n)  # the replies that set the reward's zero
        return (p * K * row + rankings / rm.batch_size * (rm.batch_size // LABELERS * K / 16) * step
                + (p * 0.1 * K * 2 + shift) / 16 * fwd + shift * rm.normalize_max_new_tokens / 48 * row)

    def answers(n):  # greedy and SAMPLES sampled replies of every model but the pretrained one, scored
        models = len(MODELS) - 1
        return models * n * (1 + SAMPLES) * row + n * SAMPLES * (models + 2) / 16 * fwd

    def largest(cost, low, high, share):  # the largest size in [low, high] whose cost fits the share
        return max([n for n in range(low, high + 1) if cost(n) <= share * budget] or [low])

    prompts = largest(lambda p: sum(labels(p, n) for n in range(1, ROUNDS + 1)), INIT_MIN["prompts"],
                      train_prompts // ROUNDS, INIT_SHARES["labels"])
    heldout = largest(answers, INIT_MIN["heldout"], heldout_prompts, INIT_SHARES["answers"])
    minibatches = ppo.batch_size / ppo.minibatch_size
    # an iteration: a reply to each prompt, four scorings (policy, reference, value, reward), then the
    # epochs' updates of policy and value; an evaluation every eval_every iterations and at the start
    iteration = ppo.batch_size * row + 4 * minibatches * fwd + ppo.ppo_epochs * minibatches * 2 * step
    evaluation = ppo.eval_samples * row + 3 * ppo.eval_samples / 16 * fwd
    ppo_seconds = lambda n: n * iteration + (n // ppo.eval_every + 1) * evaluation  # noqa: E731
    dpo_step = 2 * dpo.batch_size / 16 * (step + fwd)  # chosen and rejected, through the policy and the reference
    # before its steps, DPO scores every ranked reply under the reference once; it evaluates the held-out ones twice
    dpo_once = prompts * ROUNDS * LABELERS * K * (1 + 0.1 * 2) / 16 * fwd
    winrate = 5.0
    left = budget - sum(labels(prompts, n) for n in range(1, ROUNDS + 1)) - answers(heldout) - winrate - dpo_once
    iterations = int(min(max(left * INIT_SHARES["ppo"] / ROUNDS / (iteration + evaluation / ppo.eval_every),
                             INIT_MIN["ppo"]), ppo.iterations // ROUNDS))
    dpo_steps = int(min(max((left - ROUNDS * ppo_seconds(iterations)) / dpo_step, INIT_MIN["dpo"]), dpo.max_steps))
    est = {**{f"round-{n}": labels(prompts, n) + ppo_seconds(iterations) for n in range(1, ROUNDS + 1)},
           "dpo": dpo_once + dpo_steps * dpo_step, "answers": answers(heldout), "winrate": winrate}
    return {"prompts_per_round": prompts, "ppo_iterations": iterations, "dpo_steps": dpo_steps, "heldout": heldout,
            "estimate": est, "over": sum(est.values()) > budget * 1.05}


class Run:
    def __init__(self, out, quick=False, dtype="auto", budget=BUDGET, device="", scale="cpu", init=""):
        dev = dist.device_or_error(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # before any file
        self.quick = quick
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        path = self.out / "summary.json"
        self.summary = json.loads(path.read_text()) if path.exists() else {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": metrics.machine(),
            "config": {}, "timings": {}, "headline": {}}
        if "plan" not in self.summary:  # a re-run keeps the first plan, so its stages resume exactly
            amp = dist.autocast_dtype(dev, dtype)
            name = "bf16" if amp == torch.bfloat16 else "fp32"
            rate = metrics.peak_flops(dev, amp)  # measured on a CPU; a GPU's spec sheet (bf16) or measured
            if init:  # the user's model: no pretraining, the RLHF half sized to the budget by its measured costs

                costs, params, lora = init_costs(init, dev, amp)
                sizes = {"prompts_per_round": QUICK_PROMPTS // ROUNDS, "estimate": None} if quick else \
                    init_plan(costs, budget, len(builtin_prompts("train")), len(builtin_prompts("heldout")))
                self.summary["plan"] = {"dtype": name, "device": str(dev), "init": str(Path(init).resolve()),
                                        "params": params, "lora": lora, "costs": costs, "budget": budget,
                                        "matmul_flops": rate, "pretrain_steps": 0, **sizes}
            else:
                step = None
                if dev.type == "cpu" and scale == "cpu":
                    step = None if quick else step_seconds(amp)
                    steps, est = plan(WORK[name]["pretrain_step"] / step if step else rate, name, budget, quick)
                else:  # WORK is measured on CPUs at the cpu scale: no estimate, no budget
                    steps = 30 if quick else PRETRAIN_STEPS[1] if scale == "cpu" else None
                    est = None
                self.summary["plan"] = {"dtype": name, "device": str(dev), "scale": scale, "matmul_flops": rate,
                                        "step_seconds": step, "budget": budget, "pretrain_steps": steps,
                                        "estimate": est}
            self.save()
        p = self.summary["plan"]
        # the plan's dtype and scale, so that a resumed stage matches its checkpoint; the device asked for now
        self.dtype, self.scale, self.device = p["dtype"], p.get("scale", "cpu"), str(dev)
        self.init = p.get("init", "")
        if (init and str(Path(init).resolve()) != self.init) or (self.init and not init):
            raise ShoggothError(f"{self.out} holds a demo run {'on ' + self.init if self.init else 'that pretrained its own model'}:"
                                f" run it again with {'--init ' + self.init if self.init else 'no --init'}, or use another --out")
        if self.init:
            c = p.get("costs") or {}  # (a run planned before the costs were measured has none)
            self.log(f"{self.summary['machine']}: {p['dtype']} on {self.device}; --init {self.init} "
                     f"({p['params'] / 1e6:,.1f}M parameters{', LoRA rank ' + str(p['lora']['lora_r']) if p['lora'] else ''})"
                     + (f": a reply sampled in {c['row']:.2f} s, a training step of 16 rows in {c['step']:.2f} s, a "
                        f"forward in {c['fwd']:.2f} s" if c else "")
                     + "; no pretraining or SFT: your model is the start of RLHF and its KL reference")
            if p["estimate"]:
                self.log(f"budget {duration(p['budget'])}: {p['prompts_per_round']} prompts a round, {p['ppo_iterations']} "
                         f"PPO iterations a round, {p['dpo_steps']} DPO steps, {p['heldout']} held-out prompts; estimated: "
                         + ", ".join(f"{k} {duration(v)}" for k, v in p["estimate"].items())
                         + f"; total {duration(sum(p['estimate'].values()))}")
                if p["over"]:
                    self.log(f"warning: even the smallest sizes ({INIT_MIN['prompts']} prompts and {INIT_MIN['ppo']} PPO "
                             f"iterations a round, {INIT_MIN['dpo']} DPO steps, {INIT_MIN['heldout']} held-out prompts) "
                             f"take longer than the budget on this machine: about {duration(sum(p['estimate'].values()))}")
            else:
                self.log(f"--quick: {p['prompts_per_round']} prompts a round, the --quick sizes of every stage")
            return
        steps = "its preset's" if p["pretrain_steps"] is None else p["pretrain_steps"]
        rate = (f"{p['dtype']} matmuls at {p['matmul_flops'] / 1e9:,.0f} GFLOP/s" if p.get("device", "cpu") == "cpu"
                else f"{p['dtype']} peak {p['matmul_flops'] / 1e12:,.0f} TFLOP/s")
        if p.get("step_seconds"):
            rate += f", a pretraining step in {p['step_seconds']:.2f} s"
        self.log(f"{self.summary['machine']}: {rate}; scale {self.scale} on {self.device}; "
                 f"{'--quick' if quick else 'budget ' + duration(p['budget']) if p['estimate'] else 'no budget'}: "
                 f"{steps} pretraining steps")
        if p["estimate"]:
            self.log("estimated: " + ", ".join(f"{k} {duration(v)}" for k, v in p["estimate"].items())
                     + f"; total {duration(sum(p['estimate'].values()))}")
        else:
            self.log("no time estimate: the stages' work is measured on CPUs at the cpu scale")

    def estimate(self, name):
        est = self.summary["plan"]["estimate"]
        return duration(est[name]) if est else "-"

    def log(self, msg):
        print(f"[demo {time.time() - self.t0:5.0f}s] {msg}", flush=True)

    def save(self):
        write_json(self.out / "summary.json", self.summary)

    def stage(self, name, preset, **fields):
        """Stage `name` on its preset (or --quick's) and fields, into the run directory's `name`
        folder, unless it already finished; resumed if it had started."""
        out = self.out / name
        if config.finished(out):
            self.log(f"{name}: done earlier ({out}), skipping")
            return out
        resume = checkpoint.latest_checkpoint(out) is not None
        self.log(f"{name}: {'resuming' if resume else 'starting'} -> {out}")
        if self.quick:
            preset, fields = QUICK_PRESETS.get(name, preset), {**fields, **QUICK.get(name, {})}
        t = time.time()
        cfg = config.run(name, preset, out, **fields, dtype=self.dtype, device=self.device)
        self.summary["config"][name] = dataclasses.asdict(cfg)
        self.summary["timings"][name] = self.summary["timings"].get(name, 0) + round(time.time() - t, 1)
        self.save()
        self.log(f"{name}: finished in {duration(time.time() - t)} (estimated {self.estimate(name)})")
        return out


def metric(path, key, which=-1):
    if not Path(path).exists():  # a stage --init skips
        return None
    vals = [r[key] for r in metrics.read(path) if key in r]
    return vals[which] if vals else None


def rlhf_round(run: Run, n):
    """Round n of RLHF (`shoggoth rounds` on the built-in prompts): K completions per prompt from the
    current policy (the SFT model in round 1), ranked by simulated labelers through the feedback app's
    database; the reward model retrained on every round's rankings so far; PPO from the current
    policy with the KL leash to the SFT model. In run/round-n/."""

    name, o = f"round-{n}", run.out
    if config.finished(o / name / "ppo"):
        run.log(f"{name}: done earlier ({o / name}), skipping")
        return
    (o / "feedback").mkdir(parents=True, exist_ok=True)
    p = run.summary["plan"]
    per_round = p["prompts_per_round"] if run.init else \
        (QUICK_PROMPTS if run.quick else len(rounds.prompt_records(rounds.Config()))) // ROUNDS
    iterations = p.get("ppo_iterations") or config.load("ppo", "demo-ppo")[1].iterations // ROUNDS  # a round's
    c = rounds.Config(sft=str(model_dirs(run)["sft"]), db=feedback_db(run), out=str(o), rounds=n, prompts_per_round=per_round,
                      k=K, rankings_per_task=LABELERS, simulate="balanced", labelers=LABELERS, eval_frac=0.1,
                      max_new_tokens=16 if run.quick else 48, iterations=iterations,
                      dtype=run.dtype, device=run.device)
    run.log(f"{name}: starting -> {o / name}")
    t = time.time()
    lora = p.get("lora") or {}
    rounds.run(c, reward={**(QUICK["reward"] if run.quick else {}), **lora} or None,
               ppo={**(QUICK["ppo"] if run.quick else {}), **lora} or None)
    for stage in ("reward", "ppo"):
        if (o / name / stage / "run_config.json").exists():  # (not if killed between the model and this file)
            run.summary["config"][f"{name}/{stage}"] = json.loads((o / name / stage / "run_config.json").read_text())
    engine = connect(c.db)
    agree = agreement(queries.rank_vectors(engine, campaigns.campaign_id(engine, name)))
    h = run.summary["headline"]
    h.setdefault("labeler_agreement", agree["tau"])  # round 1's: the labelers on the SFT model's samples
    h.setdefault("labeler_alpha", agree["alpha"])
    run.summary["timings"][name] = run.summary["timings"].get(name, 0) + round(time.time() - t, 1)
    run.save()
    run.log(f"{name}: finished in {duration(time.time() - t)} (estimated {run.estimate(name)}); labelers' mutual "
            f"Kendall tau {agree['tau']:.3f}")


def feedback_db(run: Run):
    return f"sqlite:///{(run.out / 'feedback' / 'feedback.db').resolve()}"


SAMPLING = {"max_new_tokens": 48, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}  # of the held-out replies


def gold_and_proxy(model, records, scorers):
    """Mean gold (simulated labelers' noise-free taste) and proxy (each of scorers', load_scorer's)
    score of SAMPLES replies sampled from model (sampling.load's) per held-out prompt (SAMPLING: the same for every model), and the
    first reply to each prompt (what the labelers compare blind)."""

    records = [r for r in records for _ in range(SAMPLES)]
    replies = sampling.chat_replies(model, [r["messages"] for r in records], **SAMPLING)
    gold = [simulated.gold_score(prompt_text(r), t, r["references"]) for r, t in zip(records, replies)]
    proxies = [score_replies(scorer, [r["messages"] for r in records], replies) for scorer in scorers]
    return sum(gold) / len(gold), proxies, replies[::SAMPLES]


def model_dirs(run: Run):
    """Each model the demo compares; with --init the user's model takes SFT's place, and there is no pretrained one."""
    o = run.out
    start = {"sft": Path(run.init)} if run.init else {"pretrained": o / "pretrain", "sft": o / "sft"}
    return {**start, "ppo-1": o / "round-1" / "ppo", "ppo": o / f"round-{ROUNDS}" / "ppo", "dpo": o / "dpo"}


def heldout_prompts(run: Run):

    held = builtin_prompts("heldout")
    return held[:12] if run.quick else held[:run.summary["plan"].get("heldout") or len(held)]


def answers(run: Run, reward_dir):
    """The same held-out prompts answered by every model, greedy, with proxy and gold scores; returns
    each model's first sampled reply to every held-out prompt."""

    scorer = load_scorer(reward_dir)
    first = run.out / "round-1" / "reward"
    first = load_scorer(first) if (first / "config.json").exists() else None
    held = heldout_prompts(run)
    answers, seen, h, scored = {}, set(), run.summary["headline"], {}
    step = max(1, len(held) // MASK_PROMPTS)
    shown = held[::step][:MASK_PROMPTS]
    table = [{"prompt": prompt_text(r), "references": r["references"], "answers": {}} for r in shown]
    for name, d in model_dirs(run).items():
        if not (d / "config.json").exists():
            continue
        model = sampling.load(d, run.device)
        greedy = sampling.chat_replies(model, [r["messages"] for r in held], max_new_tokens=48, temperature=0.0)
        seen.update(greedy)
        h[f"real_words_{name}"] = simulated.fluency(" ".join(greedy))  # share of real words
        h[f"distinct_{name}"] = len(set(greedy)) / len(greedy)
        h[f"on_topic_{name}"] = sum(simulated.on_topic(prompt_text(r), a, r["references"])
                                    for r, a in zip(held, greedy)) / len(held)
        replies = greedy[::step][:MASK_PROMPTS]
        for row, r, text in zip(table, shown, replies):
            row["answers"][name] = {"text": text, "proxy": score_texts(scorer, r["messages"], [text])[0],
                                    "gold": simulated.gold_score(prompt_text(r), text, r["references"])}
        # SFT and the first round's policy under the first round's reward model too: did round 2 catch its exploits?
        g, p, answers[name] = gold_and_proxy(model, held, [scorer] + ([first] if name in ("sft", "ppo-1") else []))
        h[f"gold_{name}"], h[f"proxy_{name}"] = g, sum(p[0]) / len(p[0])
        scored[name] = p
        seen.update(answers[name])
    if "ppo-1" in scored:  # how often each reward model scores round 1's answer above SFT's, sample by sample: a
        # share, so that two reward models of different scales compare
        for key, i in (("prefer_ppo-1", 0), ("prefer_ppo-1_round-1", 1)):
            pairs = list(zip(scored["ppo-1"][i], scored["sft"][i]))
            h[key] = sum(a > b for a, b in pairs) / len(pairs)
    # The taste must not be winnable by a trick: the best single reply given to every held-out
    # question, of every answer a model gave here and a list of generic replies, is measured too.
    qs = [(prompt_text(r), r["references"]) for r in held]
    h["gold_constant"], h["constant_reply"] = simulated.best_constant(qs, seen | set(simulated.GENERIC))
    h["gold_echo"] = sum(simulated.gold_score(q, q, refs) for q, refs in qs) / len(qs)  # each question echoed back
    h["shown_ppo_distinct"] = len({row["answers"]["ppo"]["text"] for row in table if "ppo" in row["answers"]})
    h["shown_ppo_on_topic"] = sum(simulated.on_topic(row["prompt"], row["answers"]["ppo"]["text"], row["references"])
                                 for row in table if "ppo" in row["answers"])
    h["taste"] = simulated.TASTE
    write_json(run.out / "answers.json", {"prompts": table})
    run.save()
    return answers


def blind_winrates(run: Run, answers):
    """InstructGPT's headline measure: the simulated labelers rank the held-out answers of every
    model, blind, through the feedback app's database and the same code as people (an evaluation
    campaign, as `shoggoth feedback compare` makes, of the replies behind the gold reward); then the
    win rate of every pair with its bootstrap interval (`shoggoth feedback winrate`)."""

    db = feedback_db(run)
    engine = connect(db)
    if campaigns.campaign_id(engine, "heldout", required=False) is None:  # made by an earlier, interrupted run: kept
        held = [{"prompt": prompt_text(r), "references": r["references"]} for r in heldout_prompts(run)]
        settings = {**SAMPLING, "dirs": {m: str(model_dirs(run)[m]) for m in answers},
                    "prompts": "chatterbot-corpus heldout", "replies": f"the first of the {SAMPLES} per prompt behind "
                    "the gold and proxy rewards"}
        jobs.add_comparison(engine, "heldout", held, answers, settings, LABELERS, rng=random.Random(0))
    done = jobs.simulate(db, persona="balanced", labelers=LABELERS, campaign="heldout")
    s = jobs.winrates(db, "heldout")
    run.log(f"winrate: {sum(done.values())} blind rankings of {s['prompts']} held-out prompts' answers by "
            f"{len(s['labelers'])} simulated labelers")
    return s


def run(out="runs/demo", quick=False, dtype="auto", budget=BUDGET, device="", scale="cpu", init=""):
    r = Run(out, quick, dtype, budget, device, scale, str(checkpoint.resolve(init)) if init else "")
    o = r.out
    if not r.init:
        steps = r.summary["plan"]["pretrain_steps"]
        r.stage("pretrain", SCALES[r.scale], **({} if steps is None else {"max_steps": steps}))
        r.stage("sft", "demo-sft", init=str(o / "pretrain"))
    for n in range(1, ROUNDS + 1):
        rlhf_round(r, n)
    last = o / f"round-{ROUNDS}"
    # DPO on what the last reward model trained on (every round's rankings but the last one's held-out share)
    p = r.summary["plan"]
    r.stage("dpo", "demo-dpo", policy=str(model_dirs(r)["sft"]), rankings=str(last / "train.jsonl"),
            **p.get("lora", {}), **({"max_steps": p["dpo_steps"]} if p.get("dpo_steps") else {}))

    h = r.summary["headline"]
    t = time.time()
    r.log("answers: held-out prompts through every model, scored by the reward model (proxy) and the labelers' taste (gold)")
    shown = answers(r, last / "reward")
    h["sft_val_loss_base"] = metric(o / "sft" / "metrics.jsonl", "val_loss", 0)
    h["sft_val_loss"] = metric(o / "sft" / "metrics.jsonl", "val_loss")
    h["pretrain_val_loss"] = metric(o / "pretrain" / "metrics.jsonl", "val_loss")
    r.summary["rounds"] = json.loads((o / "rounds.json").read_text())["rounds"]
    h["reward_accuracy"] = r.summary["rounds"][-1]["reward_accuracy_after"]
    h["reward_accuracy_before"] = r.summary["rounds"][-1]["reward_accuracy_before"]
    ppo = last / "ppo" / "metrics.jsonl"
    h["kl_ppo"] = metric(ppo, "eval/kl") or metric(ppo, "objective/kl")
    r.summary["timings"]["answers"] = round(time.time() - t, 1)
    t = time.time()
    r.log("winrate: the simulated labelers rank every model's answers to the held-out prompts, blind")
    w = r.summary["winrate"] = blind_winrates(r, shown)
    ppo_sft, ppo_dpo, ppo_1 = (winrate.lookup(w, "ppo", m) for m in ("sft", "dpo", "ppo-1"))
    h["winrate_ppo_sft"], h["winrate_ppo_dpo"] = ppo_sft["win_rate"], ppo_dpo["win_rate"]
    h["winrate_ppo_sft_low"] = ppo_sft["ci"][0] if ppo_sft["ci"] else None
    h["lc_winrate_ppo_sft"] = ppo_sft["lc_win_rate"]
    h["winrate_ppo_ppo-1"] = ppo_1["win_rate"]
    h["winrate_ppo_ppo-1_low"] = ppo_1["ci"][0] if ppo_1["ci"] else None
    r.summary["timings"]["winrate"] = round(time.time() - t, 1)
    r.save()

    html = report.write(o)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    pct = lambda k: "n/a" if h.get(k) is None else f"{100 * h[k]:.0f}%"  # noqa: E731
    gold_diff = h["gold_ppo"] - h["gold_sft"]
    print("\n=== What each layer did (held-out data, default seed) ===")
    print(f"blind win rate: {winrate.sentence(w, 'ppo', ['sft', 'ppo-1', 'dpo'], report.MODELS)} (length-controlled "
          f"{winrate.pct(ppo_sft['lc_win_rate'])} and {winrate.pct(ppo_dpo['lc_win_rate'])}; {w['judgements']} "
          f"rankings of {len(w['models'])} models' answers to {w['prompts']} held-out prompts by simulated labelers)")
    if r.init:
        print(f"your model  : {r.init} in SFT's place (the start of RLHF and the KL reference); no pretraining or SFT")
    else:
        print(f"pretraining : held-out loss {fmt(h.get('pretrain_val_loss'))} (Bible chapters and conversations)")
        print(f"SFT         : held-out chat loss {fmt(h.get('sft_val_loss_base'))} (pretrained) -> "
              f"{fmt(h.get('sft_val_loss'))} (SFT)")
    print(f"reward model: held-out pairwise accuracy {fmt(h.get('reward_accuracy'))} "
          f"(labelers agree with each other at Kendall tau {fmt(h.get('labeler_agreement'))})"
          + (f"; below {rounds.CHANCE:.2f}, it learnt next to nothing from {sum(x['rankings'] for x in r.summary['rounds'])}"
             " rankings: PPO against it measures noise; rank more prompts a round (--budget) before paying people"
             if h.get("reward_accuracy") is not None and h["reward_accuracy"] < rounds.CHANCE else ""))
    for x in r.summary["rounds"]:
        before = "no earlier model" if x["reward_accuracy_before"] is None else \
            f"{fmt(x['reward_accuracy_before'])} (the last round's model)"
        print(f"round {x['round']}     : {x['prompts']} prompts, {x['rankings']} rankings; reward accuracy on the round's "
              f"held-out rankings {before} -> {fmt(x['reward_accuracy_after'])}; PPO's held-out gold {fmt(x['eval_gold'])}, proxy "
              f"{fmt(x['eval_scores'])}, distinct greedy answers {fmt(x['eval_distinct'])}")
    caught = h["prefer_ppo-1"] < h["prefer_ppo-1_round-1"]
    print(f"exploits    : round {ROUNDS}'s reward model scores round 1's answer above SFT's {pct('prefer_ppo-1')} of the "
          f"time, round 1's did {pct('prefer_ppo-1_round-1')} ({'less: ' if caught else 'not less: no '}exploit caught); "
          f"gold SFT {fmt(h.get('gold_sft'))}, round 1's policy {fmt(h.get('gold_ppo-1'))}, round {ROUNDS}'s "
          f"{fmt(h.get('gold_ppo'))}")
    print(f"gold reward : SFT {fmt(h.get('gold_sft'))} -> PPO {fmt(h.get('gold_ppo'))} (KL to SFT {fmt(h.get('kl_ppo'))}); "
          f"DPO {fmt(h.get('gold_dpo'))}; PPO - SFT {gold_diff:+.3f}, "
          f"{'the same sign as' if (gold_diff > 0) == (ppo_sft['win_rate'] > 0.5) else 'against'} the win rate")
    print(f"proxy reward: SFT {fmt(h.get('proxy_sft'))} -> PPO {fmt(h.get('proxy_ppo'))}; DPO {fmt(h.get('proxy_dpo'))}")
    print(f"answers     : real English words SFT {pct('real_words_sft')}, PPO {pct('real_words_ppo')}, "
          f"DPO {pct('real_words_dpo')}; distinct answers per held-out question SFT {fmt(h.get('distinct_sft'))}, "
          f"PPO {fmt(h.get('distinct_ppo'))}; on topic SFT {pct('on_topic_sft')}, PPO {pct('on_topic_ppo')}, "
          f"DPO {pct('on_topic_dpo')}")
    print(f"taste       : {h.get('taste')}; the best single reply given to every held-out question, "
          f"{h.get('constant_reply')!r}, earns gold {fmt(h.get('gold_constant'))}; echoing each question back "
          f"{fmt(h.get('gold_echo'))} (SFT {fmt(h.get('gold_sft'))})")
    missed = [t for t, verdict in report.target_verdicts(h) if verdict != "met"]
    print(f"targets     : {len(report.TARGETS) - len(missed)} of {len(report.TARGETS)} met"
          + "".join(f"\n  missed: {t}" for t in missed))
    for row in json.loads((o / "answers.json").read_text())["prompts"][:3]:
        print(f"\nuser> {row['prompt']}")
        for name in MODELS:
            if name in row["answers"]:
                a = row["answers"][name]
                print(f"  {name:10s}> {a['text'][:100]!r}  (gold {a['gold']:.2f}, proxy {a['proxy']:.2f})")
    est, took = r.summary["plan"]["estimate"], r.summary["timings"]
    print(f"\n{'stage':10s} {'estimated':>9s} {'actual':>9s}")
    for name in ORDER[2:] if r.init else ORDER:
        print(f"{name:10s} {r.estimate(name):>9s} {duration(took[name]) if name in took else '-':>9s}")
    print(f"{'total':10s} {duration(sum(est.values())) if est else '-':>9s} {duration(sum(took.values())):>9s}")
    print(f"\nreport: {html}\nmodels in {o}/")
