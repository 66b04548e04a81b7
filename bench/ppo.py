"""Seconds per PPO iteration (rollout + update): `shoggoth ppo` against TRL's PPOTrainer, same model, same batch.

    python bench/ppo.py --trl-python /tmp/trlvenv/bin/python [--dtype auto|bf16|fp32] [--iters 3] [--threads 1]
    python bench/ppo.py --trl-python python3 --device cuda --shape gpt2 --batch 64 --response 128

One fixed Llama-shaped model with random weights (seed 0) is written as a Hugging Face
directory: the policy and reference, and with a random score head the reward and value
model. --shape demo: 4 layers, d=256, 4 heads, 2 KV heads, vocab 4096 (the demo's size);
gpt2: GPT-2 124M's shape (12 layers, d=768, 12 heads, vocab 50304; the tokenizer's 4096
ids are its first rows). Both trainers run the same recipe: --batch chat prompts per
iteration (32), responses of exactly --response tokens (32) sampled at temperature 1 (the
random model never emits a stop token), 4 PPO epochs of 4 minibatches, in the same dtype
(--dtype; auto: what `shoggoth ppo --dtype auto` picks on --device), on the same number of
CPU threads. The first iteration is a warm-up and not counted. On CUDA, each phase's
clock is read after the GPU has finished its work.

TRL removed PPOTrainer in 2026; the TRL half runs in another interpreter with a TRL
release that still ships `trl.PPOTrainer` (0.23.1 here), given by --trl-python: e.g.

    python -m venv /tmp/trlvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/trlvenv/lib/python3.11/site-packages/main.pth  # same torch, transformers
    /tmp/trlvenv/bin/pip install trl==0.23.1 accelerate datasets

Split of an iteration: generate (sampling the responses), score (reference/value/reward
forward passes, rewards, advantages) and update (the PPO epochs).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import DTYPE_HELP, DTYPES, run_dtype

EPOCHS, MINIBATCHES = 4, 4
SHAPES = {"demo": dict(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, n_embd=256),
          "gpt2": dict(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768)}


def make_models(root, shape, batch, response):
    """Tokenizer, policy (also the reference) and reward model directories, and the prompts file."""
    import torch

    from shoggoth.lm import checkpoint, tokenizer
    from shoggoth.data.corpus import bible_path
    from shoggoth.data.prompts import builtin_prompts
    from shoggoth.train import rl
    from shoggoth.lm.model import GPT, GPTConfig, RewardModel

    verses = [json.loads(ln)["text"] for ln in bible_path().read_text().splitlines()[:5000]]
    tok = tokenizer.train(verses, 4096)
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPES[shape], max_seq_len=256,
                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    policy = GPT(cfg)
    checkpoint.save_pretrained(policy, root / "policy")
    tokenizer.save(tok, root / "policy")
    rm = RewardModel(cfg)
    rm.model.load_state_dict(policy.model.state_dict())
    checkpoint.save_reward(rm, root / "reward", shift=0.0)
    tokenizer.save(tok, root / "reward")
    prompts = builtin_prompts("train")[:batch]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"messages": p["messages"]}) + "\n" for p in prompts))
    ids = rl.encode_prompts(tokenizer.load(root / "policy"), prompts, 256 - response)  # with its chat template
    (root / "prompt_ids.json").write_text(json.dumps(ids))
    return policy.num_params()


def run_shoggoth(root, a, tag):
    from shoggoth.train import metrics
    from shoggoth.stages import ppo

    out = root / f"shoggoth_{tag}"
    ppo.run(ppo.Config(policy=str(root / "policy"), reward=str(root / "reward"), prompts=str(root / "prompts.jsonl"),
                       out=str(out), iterations=a.iters + 1, batch_size=a.batch, minibatch_size=a.batch // MINIBATCHES,
                       ppo_epochs=EPOCHS, max_new_tokens=a.response, temperature=1.0, dtype=a.dtype, device=a.device,
                       missing_eos_penalty=0.0, ckpt_every=10_000, seed=0))
    recs = [r for r in metrics.read(out / "metrics.jsonl") if "time/generate" in r][1:]  # drop the warm-up iteration
    lengths = [r["response_length"] for r in recs]
    return {"generate": [r["time/generate"] for r in recs], "score": [r["time/score"] for r in recs],
            "update": [r["time/update"] for r in recs], "response_length": sum(lengths) / len(lengths)}


def run_trl(root, a, tag):
    """Runs inside the TRL interpreter."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.trainer import ppo_trainer as P

    tok = AutoTokenizer.from_pretrained(root / "policy", padding_side="left")
    ids = json.loads((root / "prompt_ids.json").read_text())
    marks = {"gen": [], "whiten": [], "step": []}
    gen, whiten = P.batch_generation, P.masked_whiten
    cuda = a.device == "cuda"

    def clock():  # shoggoth.train.dist.clock's twin: this interpreter need not have shoggoth
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed_generation(*args, **kw):
        t0 = clock()
        out = gen(*args, **kw)
        marks["gen"].append(clock() - t0)
        return out

    def timed_whiten(values, mask, shift_mean=True):
        out = whiten(values, mask, shift_mean)
        if shift_mean:  # the advantages: the last step of scoring
            marks["whiten"].append(clock())
        return out

    P.batch_generation, P.masked_whiten = timed_generation, timed_whiten

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["step"].append(clock())

        def on_step_end(self, args, state, control, **kw):
            marks["step"].append(clock())

    # TRL 0.23: a rollout batch is per_device_train_batch_size x gradient_accumulation_steps prompts, cut into
    # num_mini_batches minibatches of one optimizer step each.
    args = trl.PPOConfig(output_dir=str(root / f"trl_{tag}"), per_device_train_batch_size=a.batch,
                         gradient_accumulation_steps=1, num_mini_batches=MINIBATCHES, num_ppo_epochs=EPOCHS,
                         local_rollout_forward_batch_size=a.batch, total_episodes=a.batch * (a.iters + 1),
                         response_length=a.response, temperature=1.0, stop_token=None, missing_eos_penalty=None,
                         kl_coef=0.05, learning_rate=1e-5, num_sample_generations=0, report_to=[], save_strategy="no",
                         logging_steps=1, use_cpu=not cuda, bf16=a.dtype == "bf16", seed=0, disable_tqdm=True)
    load = lambda cls, d: cls.from_pretrained(root / d, dtype=torch.float32)  # noqa: E731
    trainer = trl.PPOTrainer(args=args, processing_class=tok, model=load(AutoModelForCausalLM, "policy"),
                             ref_model=load(AutoModelForCausalLM, "policy"),
                             reward_model=load(AutoModelForSequenceClassification, "reward"),
                             value_model=load(AutoModelForSequenceClassification, "reward"),
                             train_dataset=Dataset.from_dict({"input_ids": ids}), callbacks=[Clock()])
    trainer.train()
    assert trainer.state.episode == a.batch * (a.iters + 1), trainer.state.episode  # the same batch as shoggoth's
    steps = marks["step"]
    gens, ends_of_scoring = marks["gen"], marks["whiten"]
    res = {"generate": [], "score": [], "update": [], "trl": trl.__version__}
    for i in range(1, a.iters + 1):  # iteration i runs from steps[i] to steps[i + 1]; 0 is the warm-up
        total = steps[i + 1] - steps[i]
        score_end = ends_of_scoring[i] - steps[i]
        res["generate"].append(gens[i])
        res["score"].append(score_end - gens[i])
        res["update"].append(total - score_end)
    return res


def mean(x):
    return sum(x) / len(x)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl-python", help="interpreter with trl (a release that has PPOTrainer)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per run (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each trainer, alternating (a shared machine is noisy)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.add_argument("--threads", type=int, default=1, help="torch threads of both trainers")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both trainers run")
    p.add_argument("--shape", choices=SHAPES, default="demo", help="the model (the policy, reference, reward and value)")
    p.add_argument("--batch", type=int, default=32, help=f"prompts per iteration ({MINIBATCHES} minibatches)")
    p.add_argument("--response", type=int, default=32, help="tokens per response")
    p.add_argument("--half", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.half == "trl":
        print("RESULT " + json.dumps(run_trl(Path(a.root), a, a.tag)), flush=True)
        return
    from shoggoth.train.metrics import machine

    if a.batch % MINIBATCHES:
        sys.exit(f"--batch must be a multiple of {MINIBATCHES} (got {a.batch})")
    asked, a.dtype = a.dtype, run_dtype(a.dtype, a.device)  # the TRL half gets the resolved dtype
    print(f"machine: {machine()}; dtype {a.dtype}" + (" (auto)" if asked == "auto" else ""), flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    n_params = make_models(root, a.shape, a.batch, a.response)
    shape = ", ".join(f"{k} {v}" for k, v in SHAPES[a.shape].items())
    print(f"model: {n_params:,} parameters ({a.shape}: {shape}); batch {a.batch} prompts x {a.response} tokens, "
          f"{EPOCHS} epochs x {MINIBATCHES} minibatches of {a.batch // MINIBATCHES}; {a.dtype} on {a.device}; "
          f"{a.threads} thread(s); {a.rounds} alternating rounds of 1 + {a.iters} iterations; {root}")
    runs = {"shoggoth": [], "trl": []}
    for k in range(a.rounds):
        runs["shoggoth"].append(run_shoggoth(root, a, k))
        if a.trl_python:
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            r = subprocess.run([a.trl_python, __file__, "--half", "trl", "--root", str(root), "--iters", str(a.iters),
                                "--threads", str(a.threads), "--dtype", a.dtype, "--tag", str(k), "--device", a.device,
                                "--batch", str(a.batch), "--response", str(a.response)],
                               capture_output=True, text=True, env=env)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"TRL half failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
            runs["trl"].append(json.loads(line[len("RESULT "):]))
    print("\n| trainer | s/iteration | generate s | score s | update s | generate share | all rounds s/iteration |\n"
          "|---|---|---|---|---|---|---|")
    totals = {}
    for name, rs in runs.items():
        if not rs:
            continue
        per_round = [mean(r["generate"]) + mean(r["score"]) + mean(r["update"]) for r in rs]
        r = rs[per_round.index(min(per_round))]  # the least disturbed round
        g, s_, u = mean(r["generate"]), mean(r["score"]), mean(r["update"])
        totals[name] = g + s_ + u
        label = "shoggoth ppo" if name == "shoggoth" else f"TRL {r['trl']} PPOTrainer"
        print(f"| {label} | {g + s_ + u:.2f} | {g:.2f} | {s_:.2f} | {u:.2f} | {100 * g / (g + s_ + u):.0f}% | "
              f"{', '.join(f'{t:.2f}' for t in per_round)} |")
    if "trl" in totals:
        print(f"\nshoggoth / TRL speed: {totals['trl'] / totals['shoggoth']:.2f}x per PPO iteration (each trainer's best "
              f"round, mean of {a.iters} iterations after a warm-up)")


if __name__ == "__main__":
    main()
