"""Peak memory and seconds per step, full fine-tuning vs LoRA: SFT, DPO and a PPO iteration.

A model with SmolLM2-135M's configuration (random weights; bench/sft_data.py) goes through
`shoggoth sft`, `shoggoth dpo` and `shoggoth ppo` (against a reward model on the same
trunk with a random head), each once in full and once with --lora-r 16 (alpha 32, the
attention and MLP projections), and PPO once more with LoRA but the value model on its
own copy of the reward model's trunk (what sharing the trunk saves). Each run is a fresh
process: peak memory is its ru_maxrss (weights, optimizer, activations, and the Python
and torch runtime, about 0.5 GiB, and what glibc's heap keeps of freed temporaries);
seconds per step are between consecutive step logs, the first step left out (PPO: one
iteration, rollout + scoring + update, from its own time/* split, the first left out).

    python bench/lora.py [--steps 4] [--dtype bf16|fp32] [--threads 1] [--no-record]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402
import sft_data  # noqa: E402

from shoggoth.train import metrics  # noqa: E402

# In the child: time every training step's log line, run the stage, report peak RSS.
CHILD = """
import copy, json, resource, sys, time
from shoggoth.train import metrics
from shoggoth.evaluation import scoring
from shoggoth.cli import main
times, log = [], metrics.Metrics.log
def timed(self, step, echo=True, **values):
    if "loss" in values or "objective/scores" in values:
        times.append(time.perf_counter())
    return log(self, step, echo, **values)
metrics.Metrics.log = timed
if sys.argv[1] == "--own-value-trunk":  # the LoRA value model on a copy of the reward model, not on the model itself
    sys.argv.pop(1)
    scoring.lora_value = lambda reward_model: copy.deepcopy(reward_model)
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "times": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
LORA = ["--lora-r", "16", "--lora-alpha", "32"]


def run(args, out, threads, own_value_trunk=False):
    """Peak RSS (MiB) and mean seconds per step after the first of one stage run."""
    r = subprocess.run([sys.executable, "-c", CHILD, *(["--own-value-trunk"] if own_value_trunk else []), *args,
                        "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    recs = metrics.read(Path(out) / "metrics.jsonl")
    if args[0] == "ppo":
        its = [x for x in recs if "time/update" in x][1:]
        per_step = sum(x["time/generate"] + x["time/score"] + x["time/update"] for x in its) / len(its)
    else:
        t = res["times"]  # when each step's line was logged
        per_step = (t[-1] - t[0]) / (len(t) - 1)
    trained = next((ln for ln in r.stdout.splitlines() if "LoRA:" in ln), "")
    return {"peak_rss_mib": res["peak_rss_mib"], "s_per_step": per_step,
            "trained": trained.split("LoRA: ")[1].split(" parameters")[0] if trained else "all",
            "grad_ckpt": "grad-ckpt on" in r.stdout}


def cells(r):
    """'peak GiB | s/step' of a run's result, two table cells."""
    return f"{r['peak_rss_mib'] / 1024:.2f} | {r['s_per_step']:.2f}"


def ratios(r, base):
    """(peak memory, seconds per step) of run r over those of run base."""
    return r["peak_rss_mib"] / base["peak_rss_mib"], r["s_per_step"] / base["s_per_step"]


def make_reward(model, out):
    """A reward model directory at out: model's trunk with a random head (seeded)."""
    import torch

    from shoggoth.lm import checkpoint
    from shoggoth.lm.model import RewardModel

    torch.manual_seed(1)
    rm = RewardModel(checkpoint.load_pretrained(model).config)
    checkpoint.load_trunk(rm, model)
    checkpoint.save_reward(rm, out, tokenizer_dir=model)
    return out


def make_inputs(work, n_pairs):
    """The model, a reward model on its trunk, SFT chats, DPO pairs and PPO prompts."""
    from shoggoth.data.prompts import builtin_prompts

    model = sft_data.make_model_dir(work / "smollm2-135m")
    make_reward(model, work / "reward")
    chats = sft_data.make_data(work / "chats.jsonl", 64)
    convs = [json.loads(ln)["messages"] for ln in chats.read_text().splitlines()]
    pairs = [{"prompt": a[0]["content"], "chosen": a[1]["content"], "rejected": b[1]["content"]}
             for a, b in zip(convs, convs[1:])][:n_pairs + 4]
    for name, part in (("pairs", pairs[:n_pairs]), ("held", pairs[n_pairs:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"messages": p["messages"]}) + "\n"
                                                for p in builtin_prompts("train")[:32]))
    return model


def options(doc, steps=4, more=()):
    """The flags of this benchmark, bench/grad_ckpt.py and bench/memory.py (whose stage runs are these),
    parsed; more: (flag, keyword arguments) of a benchmark's own flags."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=steps, help="steps (PPO: iterations) per run; the first is not timed")
    for flag, kw in more:
        ap.add_argument(flag, **kw)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steadiest on a shared machine)")
    ap.add_argument("--no-record", action="store_true", help="do not append the table to bench/RESULTS.md")
    return ap.parse_args()


def main():
    a = options(__doc__)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    n = a.steps
    model = str(make_inputs(work, 4 * n))
    common = ["--dtype", a.dtype, "--eval-every", "100000", "--ckpt-every", "100000"]
    stages = {
        "SFT (4 rows x 128 tokens)": ["sft", "--init", model, "--data", str(work / "chats.jsonl"), "--seq-len", "128",
                                      "--batch-size", "4", "--max-steps", str(n), "--sample-every", "0",
                                      "--lr", "1e-4", *common],
        "DPO (4 pairs, rows of 128 tokens)": ["dpo", "--policy", model, "--rankings", str(work / "pairs.jsonl"),
                                              "--eval-rankings", str(work / "held.jsonl"), "--batch-size", "4",
                                              "--seq-len", "128", "--max-steps", str(n),
                          *common],
        "PPO iteration (8 prompts x 32 tokens, 2 minibatches)": [
            "ppo", "--policy", model, "--reward", str(work / "reward"), "--prompts", str(work / "prompts.jsonl"),
            "--batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "32",
            "--iterations", str(n), *common],
    }
    rows, own = [], None
    for name, args in stages.items():
        rows.append((name, run(args, work / f"{args[0]}-full", a.threads),
                     run(args + LORA, work / f"{args[0]}-lora", a.threads)))
        print(rows[-1], flush=True)
        if args[0] == "ppo":
            own = run(args + LORA, work / "ppo-lora-own", a.threads, own_value_trunk=True)

    lines = [f"### {datetime.date.today()}: {metrics.machine()}, {a.dtype}, {a.threads} thread(s), "
             "full vs LoRA r=16", "",
             "| run | full: peak RSS (GiB) | full: s/step | LoRA: peak RSS (GiB) | LoRA: s/step | LoRA trains | "
             "memory LoRA/full | time LoRA/full |", "|---|---|---|---|---|---|---|---|"]
    for name, full, lo in rows:
        lines.append(f"| {name} | {cells(full)} | {cells(lo)} | {lo['trained']} | "
                     "{:.2f}x | {:.2f}x |".format(*ratios(lo, full)))
    shared = rows[-1][2]
    lines += ["", f"PPO with LoRA, the value model on its own copy of the reward model's trunk instead of the reward "
                  f"model's trunk itself: {own['peak_rss_mib'] / 1024:.2f} GiB peak, {own['s_per_step']:.2f} s per "
                  f"iteration (shared: {shared['peak_rss_mib'] / 1024:.2f} GiB, {shared['s_per_step']:.2f} s)."]
    results.publish(lines, not a.no_record, "## LoRA vs full fine-tuning on a SmolLM2-135M-shaped model (bench/lora.py)",
                    "Peak memory and seconds per step of `shoggoth sft`, `dpo` and a `ppo` iteration, in full and "
                    "with `--lora-r 16` (peft), each run in a fresh process.")


if __name__ == "__main__":
    main()
