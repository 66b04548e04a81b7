"""Generation speed: shoggoth's Engine vs transformers `generate` with its KV cache.

Same weights (exported with save_pretrained, loaded with LlamaForCausalLM), same
dtype (--dtype; auto: what the stages' --dtype auto picks on this machine; both sides'
weights are cast to it), same ragged left-padded prompts, greedy, 256 new tokens with
no early stop, batch 1, 16 and 64. Prints the machine (CPU, flags, the instruction set
of PyTorch's kernels), a table of new tokens/s and the ratio, and appends it to
bench/RESULTS.md under "## Generation (bench/generate.py)".

    python bench/generate.py [--dtype auto|bf16|fp32 ...] [--batches 1 16 64] [--shape demo|gpt2] [--no-record]
    python bench/generate.py --device cuda   # the engine's CUDA-graph step; also times it without the graph
"""

import argparse
import datetime
import os
import tempfile
import time

import torch
import transformers

from results import DTYPE_HELP, DTYPES, record, run_dtype
from shoggoth.lm import kernels
from shoggoth.train import metrics
from shoggoth.lm.checkpoint import save_pretrained
from shoggoth.lm.engine import Engine
from shoggoth.lm.model import GPT, GPTConfig

SHAPES = {
    "demo": dict(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, max_seq_len=512),
    "gpt2": dict(vocab_size=50304, n_layer=12, n_embd=768, n_head=12, max_seq_len=512),
}
HEADING = "## Generation (bench/generate.py)"


def prompts(batch, vocab, seed=0):
    # Ragged, as in RLHF: 16 to 48 tokens per prompt.
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (batch,), generator=g).tolist()
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()  # both generators return before the GPU is done
    return time.perf_counter() - t0, out


def run_ours(engine, batch_prompts, new):
    return engine.generate(batch_prompts, max_new_tokens=new, temperature=0).tokens


def run_hf(hf, batch_prompts, new):
    P = max(map(len, batch_prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in batch_prompts], device=hf.device)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in batch_prompts], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, P:]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="demo")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["auto"], help=DTYPE_HELP + "; several: one after another")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    a = p.parse_args()
    transformers.logging.set_verbosity_error()
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    dtypes = list(dict.fromkeys(run_dtype(d, a.device) for d in a.dtype))
    mach = metrics.machine()
    print(f"machine: {mach}; dtype {', '.join(dtypes)}" + (" (auto)" if "auto" in a.dtype else ""), flush=True)

    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[a.shape])).eval()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        for dt in dtypes:
            dtype = torch.bfloat16 if dt == "bf16" else torch.float32
            model = model.to(dev, dtype)
            ours = Engine(model)
            eager = Engine(model, static=False)  # on CUDA: the same engine without the graph, for the record
            hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=dtype).eval().to(dev)
            for b in a.batches:
                ps = prompts(b, model.config.vocab_size)
                run_ours(ours, ps[:1], 8), run_hf(hf, ps[:1], 8)  # warm up allocators and kernels
                if gpu:
                    run_ours(eager, ps[:1], 8)
                # Interleaved, best of a.repeats each: the least disturbed run of either (the CPUs are shared).
                t_ours = t_hf = t_eager = float("inf")
                for _ in range(a.repeats):
                    t, out_ours = timed(lambda: run_ours(ours, ps, a.new))
                    t_ours = min(t_ours, t)
                    t, out_hf = timed(lambda: run_hf(hf, ps, a.new))
                    t_hf = min(t_hf, t)
                    if gpu:
                        t_eager = min(t_eager, timed(lambda: run_ours(eager, ps, a.new))[0])
                # Greedy agreement: rows can part ways after a near-tie in bf16, so count rows, don't assert.
                same = sum(torch.equal(x, y) for x, y in zip(out_ours, out_hf))
                n = b * a.new
                rows.append((dt, b, n / t_ours, n / t_hf, t_hf / t_ours, f"{same}/{b}", n / t_eager))
                print(f"{dt:4} batch {b:3}: engine {n / t_ours:8.0f} tok/s  transformers {n / t_hf:8.0f} tok/s"
                      f"  ratio {t_hf / t_ours:5.2f}x  identical rows {same}/{b}"
                      + (f"  (engine without graph {n / t_eager:8.0f} tok/s)" if gpu else ""), flush=True)
    model_desc = ", ".join(f"{k} {v}" for k, v in SHAPES[a.shape].items())
    table = ["| dtype | batch | engine tok/s | transformers tok/s | ratio | identical greedy rows |"
             + (" engine without graph tok/s |" if gpu else ""), "|---|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    table += [f"| {dt} | {b} | {o:.0f} | {h:.0f} | {r:.2f}x | {s} |" + (f" {e:.0f} |" if gpu else "")
              for dt, b, o, h, r, s, e in rows]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = (f"{os.cpu_count()} host CPUs, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after" if gpu
             else f"{torch.get_num_threads()} threads, decode attention by "
                  f"{'shoggoth.lm.kernels' if kernels.load() else 'SDPA'}, load average {load_before:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after (other jobs share these CPUs)")
    entry = (f"\n### {date}, {mach}, {', '.join(dtypes)}\n\nModel `{a.shape}` ({model_desc}; {model.num_params() / 1e6:.1f}M params), "
             f"greedy, {a.new} new tokens (no early stop), ragged prompts of 16-48 tokens left-padded, "
             f"torch {torch.__version__}, transformers {transformers.__version__}, "
             f"best of {a.repeats} interleaved runs; {where}.\n\n" + "\n".join(table) + "\n")
    print(entry)
    if not a.no_record:
        record(HEADING, "New tokens per second, engine vs transformers `generate` (higher is better); "
                        "ratio = engine / transformers.", entry)


if __name__ == "__main__":
    main()
