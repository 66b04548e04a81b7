"""Peak memory (and seconds per step) of every fine-tuning stage on models of real shapes, at 2,048-token rows.

Random-weight models with the public configurations of SmolLM2-135M, Qwen2.5-0.5B
(Qwen2ForCausalLM) and Llama-3.2-1B (bench/sft_data.py SHAPES; SmolLM2's small trained
tokenizer and template on each, the model's own vocabulary size) go through, one row
(or pair, or prompt) per step, default flags otherwise (--grad-ckpt auto):
  * `shoggoth sft` in full and with --lora-r 16 (alpha 32), packed rows of 2,048 tokens;
  * `shoggoth dpo` with LoRA: one (chosen, rejected) pair per step, each row 2,048 tokens
    (a long prompt, a reply of a few sentences; --seq-len 2048 keeps each row's end);
  * `shoggoth ppo` with LoRA, all four models (the reference is the policy with its adapters
    off, the value model the reward model's trunk with its own adapters, the reward model that
    trunk with them off): one prompt per iteration, of 1,960-1,984 tokens, and a response of
    at most 64 new tokens (one minibatch, one PPO epoch), against a reward model on the same
    trunk with a random head (bench/lora.py make_reward).
DPO and PPO also with --grad-ckpt on (their `auto` turns it on only where the step would not fit half the
memory available). At the 135M shape also `shoggoth sft` in full at its own default batch
(--batch-size 0: rows sized to half the available memory) and with --grad-ckpt on, and TRL's
SFTTrainer on the same 1 x 2,048-token rows at its defaults (gradient checkpointing on;
bench/sft_trl.py; skipped when trl is not importable).
Skipped at the 1B shape, as estimated over what a 24 GiB machine shared with other jobs holds:
full SFT (weights, gradients and AdamW moments alone are 16 bytes x 1.24B parameters = 18.4 GiB,
before activations and the 2,048 x 128,256 logits), and PPO with checkpointing off (the
activations kept for backward, about 29 bytes per token, layer and unit of hidden + intermediate
size, are 9.7 GB per 2,048-token row; the policy and the value model each hold one, on 2 x 5 GB
of fp32 weights: 29.4 GB; the same estimate was 7% over the measured 0.5B PPO).

Each run is a fresh process (bench/lora.py `run`): peak memory is its ru_maxrss; seconds per
step are between the step logs after the first (PPO: one iteration's rollout + score + update).
Every run's result is appended to WORK/results.jsonl as it ends; a rerun with the same --work
keeps the models and results already there and does only what is missing (--runs: only those
named; --no-run: nothing, the table of what is there).

    python bench/memory.py [--shapes 135m,qwen2.5-0.5b,llama3.2-1b] [--steps 2] [--dtype bf16|fp32]
                           [--threads 1] [--work DIR] [--runs "SFT LoRA,PPO LoRA"] [--no-record]
    PYTHONPATH=.:TRL_DIR python bench/memory.py ...   # with trl==1.16.0 installed in TRL_DIR (--no-deps)
"""

import datetime
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import lora  # noqa: E402
import results  # noqa: E402
import sft  # noqa: E402
import sft_data  # noqa: E402

from shoggoth.train import metrics  # noqa: E402

SHAPES = {"135m": "SmolLM2-135M", "qwen2.5-0.5b": "Qwen2.5-0.5B", "llama3.2-1b": "Llama-3.2-1B"}
ROW = 2048  # tokens per row
NEW_TOKENS = 64  # PPO's response length
SKIP = {("llama3.2-1b", "SFT full"), ("llama3.2-1b", "PPO LoRA")}  # estimated over 24 GiB (docstring)
EXTRA = ("SFT full (its default batch)", "SFT full (grad-ckpt on)")  # runs at the 135M shape only
FREE_GIB = {"135m": 4, "qwen2.5-0.5b": 8, "llama3.2-1b": 12}  # wait for this much available before a run


def long_text(tok, r, tokens):
    """Generated sentences whose chat-templated user turn is at most `tokens` tokens (within one sentence)."""
    sentences = []
    while True:
        sentences.append(sft_data._sentence(r))
        text = tok.apply_chat_template([{"role": "user", "content": " ".join(sentences)}], tokenize=False,
                                       add_generation_prompt=True)
        if len(tok(text, add_special_tokens=False)["input_ids"]) > tokens:
            return " ".join(sentences[:-1])


def make_inputs(work, shape):
    """The model directory of `shape`, a reward model on its trunk, SFT chats, DPO pairs
    (with held-out ones) and PPO prompts, made once per work directory."""
    from transformers import AutoTokenizer

    d = work / shape
    if (d / "done").exists():
        return d
    model = sft_data.make_model_dir(d / "model", shape=shape)
    lora.make_reward(model, d / "reward")
    sft_data.make_data(d / "chats.jsonl", 200)
    tok, r = AutoTokenizer.from_pretrained(model), random.Random(0)
    replies = [m[1]["content"] for m in sft_data.conversations(8, seed=2)]
    pairs = [{"prompt": long_text(tok, r, ROW - 64), "chosen": a, "rejected": b} for a, b in zip(replies[::2], replies[1::2])]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:3]))
    (d / "held.jsonl").write_text(json.dumps(pairs[3]) + "\n")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": long_text(tok, r, ROW - NEW_TOKENS)}) + "\n"
                                             for _ in range(4)))
    (d / "done").touch()
    return d


def stage_runs(d, steps, dtype):
    """{name: shoggoth command line} of one shape's runs."""
    model, n = str(d / "model"), str(steps)
    common = ["--dtype", dtype, "--eval-every", "100000", "--ckpt-every", "100000"]
    sft_args = ["sft", "--init", model, "--data", str(d / "chats.jsonl"), "--seq-len", str(ROW), "--max-steps", n,
                "--sample-every", "0", *common]
    ppo = ["ppo", "--policy", model, "--reward", str(d / "reward"), "--prompts", str(d / "prompts.jsonl"),
           "--batch-size", "1", "--minibatch-size", "1", "--ppo-epochs", "1", "--max-new-tokens",
           str(NEW_TOKENS), "--iterations", n, *common, *lora.LORA]
    dpo = ["dpo", "--policy", model, "--rankings", str(d / "pairs.jsonl"), "--eval-rankings",
           str(d / "held.jsonl"), "--batch-size", "1", "--seq-len", str(ROW), "--max-steps", n,
           *common, *lora.LORA]
    return {
        "SFT full": sft_args + ["--batch-size", "1"],
        "SFT LoRA": sft_args + ["--batch-size", "1", *lora.LORA],
        "PPO LoRA": ppo,
        "DPO LoRA": dpo,
        "SFT full (its default batch)": sft_args,
        "SFT full (grad-ckpt on)": sft_args + ["--batch-size", "1", "--grad-ckpt", "on"],
        "PPO LoRA (grad-ckpt on)": ppo + ["--grad-ckpt", "on"],
        "DPO LoRA (grad-ckpt on)": dpo + ["--grad-ckpt", "on"],
    }


def available_gib():
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable:"))
    return int(line.split()[1]) / 2**20


def wait_for_memory(gib, patience=600):
    """Wait (up to patience seconds) until gib GiB are available: the machine is shared."""
    t0 = time.time()
    while available_gib() < gib and time.time() - t0 < patience:
        print(f"waiting: {available_gib():.1f} GiB available, {gib} wanted", flush=True)
        time.sleep(60)


def measure(work, shape, a):
    """Run (or read back from WORK/results.jsonl) every run of shape; returns {name: result}."""
    done = {}
    store = work / "results.jsonl"
    if store.exists():
        done = {(x["shape"], x["run"]): x for x in map(json.loads, store.read_text().splitlines())}
    d = make_inputs(work, shape)
    runs = stage_runs(d, a.steps, a.dtype)
    runs = {k: v for k, v in runs.items() if shape == "135m" or k not in EXTRA}
    for name, args in runs.items():
        if (shape, name) in done or (shape, name) in SKIP or a.no_run or (a.runs and name not in a.runs.split(",")):
            continue
        wait_for_memory(FREE_GIB.get(shape, 2))
        t0 = time.time()
        out = d / name.replace(" ", "-").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)  # a run that was never recorded (killed, or its line removed) starts over
        res = {"shape": shape, "run": name, **lora.run(args, out, a.threads),
               "wall_s": time.time() - t0, "when": f"{datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC"}
        with open(store, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(res, flush=True)
        done[(shape, name)] = res
    if (shape == "135m" and (shape, "TRL SFTTrainer") not in done and not a.no_run
            and (not a.runs or "TRL SFTTrainer" in a.runs)):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not importable: no TRL run (see the docstring)")
        else:
            wait_for_memory(FREE_GIB.get(shape, 2))
            ns = type("A", (), {"batch_size": 1, "steps": a.steps, "dtype": a.dtype})
            r = sft.run_trl(str(d / "model"), str(d / "chats.jsonl"), ns, True)
            res = {"shape": shape, "run": "TRL SFTTrainer", "peak_rss_mib": r["peak_rss_mib"],
                   "s_per_step": ROW / r["tok/s"], "trained": "all", "grad_ckpt": True, "versions": r["versions"]}
            with open(store, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(res, flush=True)
            done[(shape, "TRL SFTTrainer")] = res
    names = [*runs, *(["TRL SFTTrainer"] if shape == "135m" else [])]
    return {name: done.get((shape, name)) for name in names}  # None: not measured


def table(measured, a):
    """The RESULTS.md entry's lines."""
    lines = [f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {metrics.machine()}, {a.dtype}, "
             f"{a.threads} thread(s), rows of {ROW:,} tokens, one row (pair, prompt) per step", "",
             "| model shape | run | peak RSS (GiB) | s/step | grad-ckpt | trains |", "|---|---|---|---|---|---|"]
    for shape, runs in measured.items():
        for name, r in runs.items():
            if r:
                lines.append(f"| {SHAPES.get(shape, shape)} | {name} | {lora.cells(r)} | "
                             f"{'on' if r['grad_ckpt'] else 'off'} | {r['trained']} |")
            else:
                why = "skipped: estimated over 24 GiB (bench/memory.py)" if (shape, name) in SKIP else "not measured"
                lines.append(f"| {SHAPES.get(shape, shape)} | {name} | {why} | | | |")
    return lines


def main():
    more = [("--shapes", dict(default=",".join(SHAPES), help="comma-separated shapes of bench/sft_data.py SHAPES")),
            ("--runs", dict(default="", help="comma-separated names of the runs to do (as in the table); default all")),
            ("--no-run", dict(action="store_true", help="only the table of what --work's results.jsonl holds")),
            ("--work", dict(default="", help="work directory (models, inputs, results.jsonl); reused when given"))]
    a = lora.options(__doc__, steps=2, more=more)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # TRL's run too
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work}", flush=True)
    measured = {shape: measure(work, shape, a) for shape in a.shapes.split(",")}
    results.publish(table(measured, a), not a.no_record, "## Peak memory at real shapes (bench/memory.py)",
                    "Peak RSS of `shoggoth sft` (full and LoRA), `dpo` and `ppo` (LoRA) on random-weight models "
                    "with the public configurations of SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B, at rows of "
                    "2,048 tokens, each run in a fresh process.")


if __name__ == "__main__":
    main()
