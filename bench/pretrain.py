"""Pretraining throughput: shoggoth's GPT vs transformers' LlamaForCausalLM, step for step.

For each model shape: our GPT and a `transformers.LlamaForCausalLM` with the same
weights (exported with save_pretrained, loaded with from_pretrained), the same
batch and the same training step as `shoggoth pretrain`: forward with the loss,
backward, grad-norm clip, fused AdamW, in --dtype on the CPU (auto: what `shoggoth
pretrain --dtype auto` would run here; bf16 = autocast, fp32 = none). Steps of the two
alternate (A,B then B,A) after a warmup, and between them the matmul peak of that dtype
is measured, so that all numbers share the machine's load (these machines are shared).
Prints the machine (CPU, flags, the instruction set of PyTorch's kernels), median
tokens/s, the ratio, and each side's achieved model FLOP/s (GPT.flops_per_token x
tokens/s) as a fraction of the peak; appends the table to bench/RESULTS.md under
"## Pretraining throughput (bench/pretrain.py)".

Every step and every peak is timed twice: wall clock, and the process's CPU time.
On a machine shared with other jobs the wall clock mostly measures the others (a
2-thread step stalls whenever one of its threads is descheduled); with --threads 1
the CPU-time numbers are what an idle machine would show for one core.

    python bench/pretrain.py [--dtype auto|bf16|fp32] [--shapes demo 14m] [--steps 8] [--threads N] [--compile] [--no-record]
"""

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import transformers

from results import DTYPE_HELP, DTYPES, record, run_dtype
from shoggoth.train import optim
from shoggoth.lm.checkpoint import save_pretrained
from shoggoth.train.dist import autocast
from shoggoth.train.metrics import machine
from shoggoth.lm.model import GPT, GPTConfig

# (model, batch): demo is `shoggoth pretrain --config demo-cpu`; 14m is a Llama-shaped
# 13.8M-parameter model (tied embeddings, SwiGLU width 1024) at the same sequence length.
SHAPES = {
    "demo": (dict(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, max_seq_len=256), 16),
    "14m": (dict(vocab_size=8192, n_layer=6, n_embd=384, n_head=6, max_seq_len=256), 16),
}
HEADING = "## Pretraining throughput (bench/pretrain.py)"


def matmul_rate(n, k, m, dtype, seconds=0.25):
    """FLOP per wall second and per CPU second of an (n, k) @ (k, m) matmul in dtype, run for about `seconds`."""
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    a @ b
    calls, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    flops = calls * 2 * n * k * m
    return flops / (time.perf_counter() - t0), flops / (time.process_time() - c0)


class Trainer:
    """One model with its optimizer; step() is one optimizer step of `shoggoth pretrain`."""

    def __init__(self, name, model, loss_fn, amp_dtype):
        self.name, self.model, self.loss_fn, self.amp_dtype = name, model, loss_fn, amp_dtype
        self.opt = optim.adamw(model, lr=3e-4, weight_decay=0.1)
        self.times, self.cpu_times, self.losses = [], [], []

    def step(self):
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(torch.device("cpu"), self.amp_dtype):
            loss = self.loss_fn()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        return time.perf_counter() - t0, time.process_time() - c0


def bench_shape(shape, a):
    cfg, batch = SHAPES[shape]
    T = cfg["max_seq_len"]
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**cfg))
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    tokens = torch.randint(0, cfg["vocab_size"], (batch, T + 1), generator=torch.Generator().manual_seed(0))
    x = tokens[:, :-1]
    # transformers shifts labels itself and so predicts T-1 tokens a row; ours gets the
    # same T-1 targets (the last one ignored), so both minimise the same loss.
    y = tokens[:, 1:].clone()
    y[:, -1] = -100
    with torch.no_grad():
        parity = (ours.eval()(x[:2]) - hf.eval()(input_ids=x[:2]).logits).abs().max().item()
    ours.train(), hf.train()

    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32  # autocast to bf16, or none
    runs = [Trainer("shoggoth", ours, lambda: ours(x, y), dt),
            Trainer("transformers", hf, lambda: hf(input_ids=x, labels=x).loss, dt)]
    if a.compile:
        twin = GPT(GPTConfig(**cfg))
        twin.load_state_dict(ours.state_dict())
        compiled = torch.compile(twin)
        runs.append(Trainer("shoggoth compiled", twin, lambda: compiled(x, y), dt))
    for r in runs:
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            r.step()
        print(f"{shape}: {r.name} warmup {time.perf_counter() - t0:.1f}s", flush=True)
    peaks = {"wall": [], "cpu": []}
    n_embd, hidden = ours.config.n_embd, ours.config.intermediate_size
    for i in range(a.steps):
        for r in (runs if i % 2 == 0 else runs[::-1]):
            wall, cpu = r.step()
            r.times.append(wall)
            r.cpu_times.append(cpu)
        # The peak (in the dtype of the run) is the faster of a 1024^3 matmul and the model's own MLP matmul shape.
        rates = [matmul_rate(1024, 1024, 1024, dt), matmul_rate(batch * T, n_embd, hidden, dt)]
        peaks["wall"].append(max(w for w, _ in rates))
        peaks["cpu"].append(max(c for _, c in rates))
        print(f"{shape}: round {i + 1}/{a.steps}: " + ", ".join(f"{r.name} {r.times[-1]:.2f}s ({r.cpu_times[-1]:.2f} CPU s)" for r in runs)
              + f", {a.dtype} peak {peaks['wall'][-1] / 1e9:.0f} GFLOP/s", flush=True)

    tok, fpt = batch * T, ours.flops_per_token(T)
    peak = {k: statistics.median(v) for k, v in peaks.items()}
    rate = {r.name: tok / statistics.median(r.times) for r in runs}
    cpu_rate = {r.name: tok / statistics.median(r.cpu_times) for r in runs}  # tokens per CPU second
    row = dict(shape=shape, params=ours.num_params(), batch=batch, ours=rate["shoggoth"], hf=rate["transformers"],
               cpu_ratio=cpu_rate["shoggoth"] / cpu_rate["transformers"], compiled=rate.get("shoggoth compiled"),
               flops=fpt * rate["shoggoth"], cpu_flops=fpt * cpu_rate["shoggoth"], hf_flops=fpt * rate["transformers"],
               hf_cpu_flops=fpt * cpu_rate["transformers"], peak=peak, parity=parity,
               loss=(runs[0].losses[-1], runs[1].losses[-1]))
    print(f"{shape}: shoggoth {row['ours']:.0f} tok/s, transformers {row['hf']:.0f} tok/s, ratio {row['ours'] / row['hf']:.2f}x "
          f"(CPU time {row['cpu_ratio']:.2f}x); shoggoth {row['flops'] / 1e9:.0f} GFLOP/s = {row['flops'] / peak['wall']:.0%} of "
          f"the {a.dtype} peak {peak['wall'] / 1e9:.0f} ({row['cpu_flops'] / peak['cpu']:.0%} by CPU time), "
          f"transformers {row['hf_flops'] / peak['wall']:.0%}; "
          f"last loss {row['loss'][0]:.4f} vs {row['loss'][1]:.4f}; fp32 logit diff {parity:.1e}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(shoggoth GPT)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    a = p.parse_args()
    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    asked, a.dtype = a.dtype, run_dtype(a.dtype)
    where = machine()
    print(f"machine: {where}; dtype {a.dtype}" + (" (auto)" if asked == "auto" else ""), flush=True)
    load0 = os.getloadavg()[0]
    rows = [bench_shape(s, a) for s in a.shapes]

    # "wall / CPU": from wall-clock times, then from CPU times (FLOP per CPU second against the
    # peak's FLOP per CPU second).
    table = [f"| model | params | dtype | threads | shoggoth tok/s | transformers tok/s | ratio wall / CPU | shoggoth GFLOP/s | "
             f"% of {a.dtype} peak wall / CPU | transformers % of {a.dtype} peak wall / CPU |"
             + (" compiled tok/s |" if a.compile else ""),
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if a.compile else "")]
    for r in rows:
        pk = r["peak"]
        table.append(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {a.dtype} | {torch.get_num_threads()} | {r['ours']:.0f} | "
                     f"{r['hf']:.0f} | {r['ours'] / r['hf']:.2f}x / {r['cpu_ratio']:.2f}x | {r['flops'] / 1e9:.0f} | "
                     f"{r['flops'] / pk['wall']:.0%} / {r['cpu_flops'] / pk['cpu']:.0%} | "
                     f"{r['hf_flops'] / pk['wall']:.0%} / {r['hf_cpu_flops'] / pk['cpu']:.0%} |"
                     + (f" {r['compiled']:.0f} |" if a.compile else ""))
    shapes = "; ".join(f"`{r['shape']}`: " + ", ".join(f"{k} {v}" for k, v in SHAPES[r['shape']][0].items())
                       + f", batch {r['batch']}" for r in rows)
    peaks = "; ".join(f"`{r['shape']}` {r['peak']['wall'] / 1e9:.0f} (per CPU second: {r['peak']['cpu'] / 1e9:.0f})"
                      for r in rows)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = (f"\n### {date}, {where}, {a.dtype}\n\n{shapes}. One step = forward with loss, backward, clip, fused AdamW, "
             f"{'bf16 autocast' if a.dtype == 'bf16' else 'fp32 (no autocast)'}{' (--dtype auto)' if asked == 'auto' else ''}; "
             f"median of {a.steps} alternating steps after {a.warmup} warmup steps; torch {torch.__version__}, "
             f"transformers {transformers.__version__} (sdpa attention), {torch.get_num_threads()} threads, "
             f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
             f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end. {a.dtype} matmul peaks measured between the "
             f"steps (GFLOP/s, median): {peaks}. FLOPs per token: GPT.flops_per_token (6 per matmul weight + attention).\n\n"
             + "\n".join(table) + "\n")
    print(entry)
    if not a.no_record:
        record(HEADING, "Training tokens per second, shoggoth vs transformers on the same step (higher is better); "
                        "ratio = shoggoth / transformers.", entry)


if __name__ == "__main__":
    main()
