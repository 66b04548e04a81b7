"""Active selection for `shoggoth rounds --select uncertain`: held-out reward accuracy against the
number of ranked prompts, random against uncertain, on the demo's simulated labelers.

    python bench/active.py --run runs/demo [--seeds 0 1 2] [--start 100] [--add 100] [--steps 3]

From a demo run's SFT model: K completions of every built-in train prompt are sampled once (the
pool) and a test set of --test other train prompts is ranked by the simulated labelers (balanced
persona, 3 labelers, as in the demo). Each seed starts from the same kind of random --start
prompts, ranked, and a reward model trained on them from the SFT model (the demo's reward preset,
no normalisation: accuracy does not need it). Then --steps times: --add more prompts, chosen at
random or as the ones whose completions the ensemble of reward heads (rounds.fit_heads, 8 heads,
on the current reward model and every ranking so far) disagrees on most, out of a pool of 4 x
--add random unranked candidates (what `--pool 4` does); they are ranked, and the reward model is
retrained on all rankings so far, warm from the last one (what a round does). The test accuracy
after each step is printed and written to --out as JSON (RUN/active.json: `shoggoth report RUN`
plots it). Not a timed benchmark.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoggoth import config, rounds
from shoggoth.data.prompts import builtin_prompts, prompt_text
from shoggoth.data.rankings import read_rankings
from shoggoth.train import metrics  # noqa: E402
from shoggoth.feedback import jobs  # noqa: E402
from shoggoth.evaluation.simulated import SimulatedLabeler  # noqa: E402

K, LABELERS, PERSONA, HEADS, POOL = 8, 3, "balanced", 8, 4


def rank(records, texts, seed):
    """Rankings of each prompt's completions by LABELERS simulated labelers: JSONL records."""
    out = []
    for i in range(LABELERS):
        sim = SimulatedLabeler(PERSONA, jobs.labeler_seed(PERSONA, i, seed))
        for rec, comps in zip(records, texts):
            ranks, _ = sim.rank(prompt_text(rec), comps, rec["references"])
            out.append({"prompt": prompt_text(rec), "completions": comps, "ranks": list(ranks),
                        "labeler": f"sim-{PERSONA}-{i}"})
    return out


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def train(work, name, sft, rankings, test, warm, dtype):
    out = work / name
    if not config.finished(out):
        config.run("reward", "demo-reward", out, init=sft, warm=warm, rankings=rankings, eval_rankings=test,
                   normalize_samples=0, dtype=dtype, heldout_prompts="none")
    acc = [r["val_accuracy"] for r in metrics.read(out / "metrics.jsonl") if "val_accuracy" in r]
    return str(out), acc[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="a finished `shoggoth demo` output directory (its sft/)")
    p.add_argument("--work", default="runs/active", help="where the pool, rankings and reward models go")
    p.add_argument("--out", help="results JSON (default: RUN/active.json, which `shoggoth report RUN` plots)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--start", type=int, default=100, help="prompts ranked before the first selection")
    p.add_argument("--add", type=int, default=100, help="prompts added per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--test", type=int, default=100, help="prompts of the test rankings")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args()
    sft, work = str(Path(a.run) / "sft"), Path(a.work)
    a.out = a.out or str(Path(a.run) / "active.json")
    work.mkdir(parents=True, exist_ok=True)
    records = builtin_prompts("train")
    pool_file = work / "pool.json"
    if not pool_file.exists():
        t = time.time()
        texts = jobs.sample(sft, records, K, max_new_tokens=48, seed=0)
        pool_file.write_text(json.dumps(texts))
        print(f"pool: {K} completions of {len(records)} prompts sampled in {time.time() - t:.0f}s", flush=True)
    texts = json.loads(pool_file.read_text())
    order = np.random.default_rng(12345).permutation(len(records)).tolist()
    test_ids, rest = order[:a.test], order[a.test:]
    test = write(work / "test.jsonl", rank([records[i] for i in test_ids], [texts[i] for i in test_ids], 999))
    results = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    for seed in a.seeds:
        rng = random.Random(seed)
        start = rng.sample(rest, a.start)
        for method in ("random", "uncertain"):
            key = f"{method}/{seed}"
            if key in results and len(results[key]) == a.steps + 1:
                continue
            chosen, curve = list(start), []
            ranked = rank([records[i] for i in chosen], [texts[i] for i in chosen], seed)
            model, acc = train(work, f"{seed}-start", sft, write(work / f"{seed}-start.jsonl", ranked), test, "", a.dtype)
            curve.append([len(chosen), acc])
            for step in range(1, a.steps + 1):
                left = [i for i in rest if i not in set(chosen)]
                cand = random.Random(f"{seed}/{step}").sample(left, min(len(left), POOL * a.add))
                if method == "random":
                    new = cand[:a.add]
                else:
                    m, tok, W = rounds.fit_heads(model, read_rankings(work / f"{key.replace('/', '-')}-{step - 1}.jsonl"
                                                                          if step > 1 else work / f"{seed}-start.jsonl",
                                                                          log=lambda *_: None), HEADS, seed + step)
                    d = rounds.disagreement(m, tok, W, [records[i] for i in cand], [texts[i] for i in cand])
                    new = [cand[j] for j in np.argsort(d, kind="stable")[::-1][:a.add]]
                chosen += new
                ranked += rank([records[i] for i in new], [texts[i] for i in new], seed + 100 * step)
                name = f"{key.replace('/', '-')}-{step}"
                model, acc = train(work, name, sft, write(work / f"{name}.jsonl", ranked), test, model, a.dtype)
                curve.append([len(chosen), acc])
                print(f"{method:9s} seed {seed} step {step}: {len(chosen)} prompts ranked, test accuracy {acc:.3f}",
                      flush=True)
            results[key] = curve
            Path(a.out).write_text(json.dumps(results, indent=1))
    for method in ("random", "uncertain"):
        curves = [results[f"{method}/{s}"] for s in a.seeds if f"{method}/{s}" in results]
        mean = np.mean([[acc for _, acc in c] for c in curves], axis=0)
        print(f"{method:9s} mean test accuracy by prompts ranked: "
              + ", ".join(f"{n}: {m:.3f}" for (n, _), m in zip(curves[0], mean)))


if __name__ == "__main__":
    main()
