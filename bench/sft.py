"""SFT speed and peak memory: shoggoth vs TRL's SFTTrainer, same model, data and rows, one run.

A model with SmolLM2-135M's configuration (random weights, SmolLM2's specials and chat
template; bench/sft_data.py) is fine-tuned on the same JSONL of conversations packed into
rows of 2,048 tokens, B rows per optimizer step, by `shoggoth sft` and by TRL
(bench/sft_trl.py, with TRL's defaults: bfd packing, padding-free rows, SDPA, gradient
checkpointing; and once with gradient checkpointing off, as shoggoth has none). Each runs
in its own process; peak memory is that process's ru_maxrss. Tokens/s is the mean over
the steps after the first (real tokens, padding excluded).

    python bench/sft.py [--dtype auto|bf16|fp32] [--batch-size 2] [--steps 3] [--no-record]

Needs `pip install trl==1.16.0 torch==2.13.0 transformers==5.23.0` (TRL pulls accelerate and datasets).
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import sft_data  # noqa: E402
from results import DTYPE_HELP, DTYPES, run_dtype  # noqa: E402

from shoggoth.train import metrics  # noqa: E402

OURS = """
import json, resource, sys
from shoggoth.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_ours(model, data, held, out, a):
    args = ["sft", "--init", model, "--data", data, "--eval-data", held, "--out", out, "--seq-len", "2048",
            "--batch-size", str(a.batch_size), "--max-steps", str(a.steps), "--lr", "2e-5", "--warmup-steps", "0",
            "--dtype", a.dtype, "--eval-every", "100000", "--sample-every", "0", "--ckpt-every", "100000"]
    r = subprocess.run([sys.executable, "-c", OURS, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"shoggoth sft failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    steps = [s for s in metrics.read(Path(out) / "metrics.jsonl") if "tok/s" in s][1:]
    tps = sum(s["tok/s"] for s in steps) / len(steps)
    return {"tok/s": tps, "peak_rss_mib": peak}


def run_trl(model, data, a, checkpointing):
    args = [sys.executable, str(HERE / "sft_trl.py"), "--model", model, "--data", data, "--max-length", "2048",
            "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--assistant-only-loss"]
    args += ["--bf16"] if a.dtype == "bf16" else []
    args += [] if checkpointing else ["--no-gradient-checkpointing"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"TRL failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"tok/s": res["tokens_per_s"], "peak_rss_mib": res["peak_rss_mib"], "versions": res["versions"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    ap.add_argument("--batch-size", type=int, default=2, help="packed rows of 2,048 tokens per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps; the first is left out of the timing")
    ap.add_argument("--shape", choices=sorted(sft_data.SHAPES), default="135m", help="tiny: a smoke run")
    ap.add_argument("--no-record", action="store_true", help="do not append the table to bench/RESULTS.md")
    a = ap.parse_args()
    a.dtype = run_dtype(a.dtype)  # TRL takes bf16 or not
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    model = str(sft_data.make_model_dir(work / "smollm2-135m", shape=a.shape))
    data = str(sft_data.make_data(work / "chats.jsonl", 60 * a.batch_size * a.steps))
    held = str(sft_data.make_data(work / "held.jsonl", 8, seed=1))
    rows = {"shoggoth": run_ours(model, data, held, str(work / "out"), a),
            "TRL SFTTrainer (gradient checkpointing, its default)": run_trl(model, data, a, True),
            "TRL SFTTrainer (no gradient checkpointing)": run_trl(model, data, a, False)}
    versions = next(r["versions"] for r in rows.values() if "versions" in r)
    ours = rows["shoggoth"]
    lines = [f"### {datetime.date.today()}: {metrics.machine()}, {a.dtype}, {a.batch_size} rows x 2,048 tokens per step"
             + ("" if a.shape == "135m" else f" ({a.shape} shape)"),
             "", f"torch {versions['torch']}, transformers {versions['transformers']}, trl {versions['trl']}; "
             f"{a.steps - 1} timed steps after one warm-up; loss on assistant tokens in both", "",
             "| trainer | tokens/s | peak RSS (GiB) | shoggoth speed-up | shoggoth memory ratio |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tok/s']:.0f} | {r['peak_rss_mib'] / 1024:.2f} | "
                     f"{ours['tok/s'] / r['tok/s']:.2f}x | {ours['peak_rss_mib'] / r['peak_rss_mib']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_record:
        path = HERE / "RESULTS.md"
        body = path.read_text()
        heading = "## SFT on a SmolLM2-135M-shaped model (bench/sft.py)"
        if heading not in body:
            body += f"\n{heading}\n\n"
        path.write_text(body.replace(heading + "\n\n", heading + "\n\n" + text + "\n", 1))


if __name__ == "__main__":
    main()
