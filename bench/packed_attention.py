"""Packed-row attention for SFT on the CPU: which kernel for block-diagonal causal attention.

SFT packs several conversations into one row of T tokens; each must attend only to
itself (shoggoth.data.conversations.collate builds a dense (B, 1, T, T) bool mask and the model
calls SDPA with it). This times one attention layer, forward + backward, with
SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head_dim 64; the
model has 30 layers, numbers here are per layer) for:

  a     SDPA with the dense bool block-diagonal causal mask (what shoggoth does now), enable_gqa
  b     FlexAttention under torch.compile with a document BlockMask (create_block_mask)
  c     varlen by unpad/repad: each document gathered into a padded (n_docs, H, Lmax, D)
        batch (documents sorted by length and split into length buckets), plain causal
        attention, outputs gathered back to (B, H, T, D):
          c-sdpa   SDPA is_causal=True per bucket
          c-mm     two matmuls per bucket: baddbmm with a causal -inf bias, softmax, @ v
          c-mix    under bf16, c-mm for buckets of length <= 512 (--mix-max), c-sdpa above;
                   in fp32 the same as c-sdpa (flash is the faster there at every length)
  d     a loop over documents, SDPA is_causal=True on each slice
  e     baseline: SDPA is_causal=True over the whole row, no packing mask (one document per row)

on two layouts of documents in B rows of T tokens (fixed seed):
  chat  lengths ~ lognormal (mean 150 before clipping), clipped to [16, 1024], packed
        next-fit as shoggoth.data.conversations.pack does; a row's unused tail is padding
  long  one document per even row, two (cut at a random point) per odd row

Inputs are fp32 leaves (requires_grad) laid out as the model's projections give them,
(B, T, heads, D) seen as (B, heads, T, D). For bf16 the layer runs under
torch.autocast('cpu', bfloat16) and q/k/v are cast to bf16 first (what a bf16 projection
under autocast hands to attention); gradients land on the fp32 leaves. The upstream
gradient is random on real tokens and zero on padding (padding has no loss), so an
option may skip padding: outputs are compared on real tokens only.

Method. Every (option, dtype) runs in a fresh subprocess (both layouts in turn), so no
option inherits another's allocator state or compiled code; FlexAttention compiles into
a fresh inductor cache directory, so its compile time is a cold one.
  time     1 warm-up step (FlexAttention: the compile), then --repeats steps; the median
           wall time of the forward and of forward + backward. Setup (mask, block mask,
           gather indices) is per batch, shared by all 30 layers: timed apart, not per layer.
  memory   process RSS from /proc/self/status, after the timed steps: glibc's mmap
           threshold is fixed at 64 KiB (mallopt) and free memory trimmed (malloc_trim), so
           freed buffers go back to the OS; the peak (VmHWM) is reset through
           /proc/self/clear_refs; baseline = RSS with inputs and per-batch state allocated;
           then one step: "kept" = RSS after the forward - baseline (what the layer holds
           for its backward, output included: a model holds this for every layer at once),
           "peak" = VmHWM over forward + backward - baseline (includes the q/k/v grads,
           the same 19+13 MB (fp32) for every option). The per-batch state (dense mask,
           indices) is reported apart, from its tensors' sizes.
  check    each option's output (real tokens) and q/k/v gradients against option a in the
           same dtype: max abs difference, relative to the max abs value of a's tensor.

    python bench/packed_attention.py [--dtype fp32|bf16|both] [--T 2048] [--B 4] [--repeats 3]
"""

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from shoggoth.train.metrics import machine

H, HKV, D = 9, 3, 64  # SmolLM2-135M: query heads, key/value heads, head_dim
LAYERS = 30
OPTIONS = ["a", "b", "c-sdpa", "c-mm", "c-mix", "d", "e"]
TOL = {"fp32": 1e-4, "bf16": 4e-2}  # relative max abs difference to option a
MIX_MAX = 512  # varlen_attention under bf16: two matmuls for buckets up to this length


# ---------------------------------------------------------------------------- layouts

def make_layout(name, B, T, seed=0):
    """seg (B, T) long: each token's document index within its row, -1 for padding."""
    rng = np.random.default_rng(seed)
    seg = torch.full((B, T), -1, dtype=torch.long)
    if name == "chat":
        sigma = 0.9
        mu = math.log(150) - sigma**2 / 2  # lognormal mean 150 (before clipping)
        b, used, j = 0, 0, 0
        while True:
            n = int(np.clip(round(rng.lognormal(mu, sigma)), 16, 1024))
            if used + n > T:  # next-fit, as shoggoth.data.conversations.pack
                b, used, j = b + 1, 0, 0
                if b == B:
                    break
            seg[b, used:used + n] = j
            used, j = used + n, j + 1
    elif name == "long":
        for b in range(B):
            seg[b] = 0
            if b % 2:
                seg[b, int(rng.integers(T // 8, 7 * T // 8)):] = 1
    else:
        raise ValueError(name)
    return seg


def doc_lengths(seg):
    """Per row: (lengths of its consecutive runs, whether each run is a document rather than padding)."""
    out = []
    for row in seg:
        ids, lens = torch.unique_consecutive(row, return_counts=True)
        out.append((lens.tolist(), (ids >= 0).tolist()))
    return out


# ---------------------------------------------------------------------------- options

def dense_mask(seg):
    """The mask shoggoth.data.conversations.collate builds: same document and causal, (B, 1, T, T) bool."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def attn_dense(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def attn_causal(q, k, v, _):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def flex_setup(seg):
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, qi, ki):
        return (seg[b, qi] == seg[b, ki]) & (qi >= ki)

    B, T = seg.shape
    return create_block_mask(document_causal, B, None, T, T, device="cpu")


_flex = None


def attn_flex(q, k, v, block_mask):
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex = torch.compile(flex_attention)
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def loop_setup(seg):
    return doc_lengths(seg)


def attn_loop(q, k, v, rows):
    """SDPA is_causal on each document's slice; split/unbind so that backward concatenates
    the slices' gradients once instead of adding a full-size zero tensor per slice."""
    gqa = k.shape[1] != q.shape[1]
    out = []
    for (lens, real), qb, kb, vb in zip(rows, q.unbind(0), k.unbind(0), v.unbind(0)):
        parts = []
        for qi, ki, vi, r in zip(qb.split(lens, 1), kb.split(lens, 1), vb.split(lens, 1), real):
            if r:
                parts.append(F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True,
                                                            enable_gqa=gqa)[0])
            else:  # padding: no loss reads it
                parts.append(qi.new_zeros(qi.shape))
        out.append(torch.cat(parts, 1))
    return torch.stack(out)


# --- c: varlen by unpad/repad ------------------------------------------------

def varlen_plan(seg, overhead=128 * 128):
    """Gather indices for varlen_attention, built once per batch (every layer shares them).
    seg (B, T): document index per token, -1 for padding. Documents are sorted by length
    and cut into buckets minimising sum(n_docs * Lmax^2) + overhead per bucket (an exact
    DP over the sorted lengths; `overhead`, in token^2, stands for a kernel call's fixed
    cost). Returns (idx, shapes, inv): idx (sum n*L,) long into the B*T tokens, bucket after
    bucket, each (n_docs, Lmax) document-major and right-padded with the document's first
    token (under a causal mask only padded queries, whose outputs are dropped, see a padded
    key); shapes [(n_docs, Lmax), ...]; inv (B*T,) each token's position in idx, padding
    tokens -> len(idx) (a zero row appended to the outputs)."""
    B, T = seg.shape
    flat = seg.flatten()
    run = flat + torch.arange(B).repeat_interleave(T) * (T + 1)  # distinct across rows
    _, lens = torch.unique_consecutive(run, return_counts=True)
    starts = lens.cumsum(0) - lens
    keep = flat[starts] >= 0
    starts, lens = starts[keep], lens[keep]
    order = torch.argsort(lens, descending=True, stable=True)
    starts, lens = starts[order], lens[order]
    L, n = lens.tolist(), len(lens)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * L[i] ** 2 + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    idxs, shapes, off = [], [], 0
    inv = torch.full((B * T,), sum((j - i) * L[i] for i, j in bounds), dtype=torch.long)
    for i, j in reversed(bounds):
        pos = torch.arange(L[i])
        idx = starts[i:j, None] + pos
        valid = pos < lens[i:j, None]
        inv[idx[valid]] = off + torch.arange((j - i) * L[i]).view(j - i, L[i])[valid]
        idxs.append(torch.where(valid, idx, starts[i:j, None]).flatten())
        shapes.append((j - i, L[i]))
        off += (j - i) * L[i]
    return torch.cat(idxs), shapes, inv


def causal_mm(q, k, v):
    """Causal attention as two batched matmuls, GQA without copying k/v per query head:
    the r query heads of a key/value head are stacked along the query axis."""
    n, H, L, D = q.shape
    Hkv = k.shape[1]
    r = H // Hkv
    bias = torch.full((L, L), float("-inf"), dtype=q.dtype).triu_(1).repeat(r, 1)  # (r*L, L)
    s = torch.baddbmm(bias, q.reshape(n * Hkv, r * L, D), k.reshape(n * Hkv, L, D).transpose(1, 2), alpha=D**-0.5)
    return (s.softmax(-1) @ v.reshape(n * Hkv, L, D)).view(n, H, L, D)


def varlen_attention(q, k, v, plan, mm_max=None):
    """Block-diagonal causal attention over packed rows. q (B, H, T, D), k and v (B, Hkv, T, D)
    (views of (B, T, heads, D) projections are read without a copy), plan from varlen_plan.
    One gather per tensor (its backward is one index_add), plain causal attention per
    length bucket: two matmuls up to mm_max tokens (default: 512 for bf16, none for fp32),
    SDPA's flash kernel above. Returns (B, H, T, D), zero on padding tokens."""
    if mm_max is None:
        mm_max = MIX_MAX if q.dtype == torch.bfloat16 else 0
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    idx, shapes, inv = plan
    sizes = [n * L for n, L in shapes]
    qs = q.transpose(1, 2).reshape(B * T, H, D).index_select(0, idx).split(sizes)
    ks = k.transpose(1, 2).reshape(B * T, Hkv, D).index_select(0, idx).split(sizes)
    vs = v.transpose(1, 2).reshape(B * T, Hkv, D).index_select(0, idx).split(sizes)
    outs = []
    for (n, L), qb, kb, vb in zip(shapes, qs, ks, vs):
        qb, kb, vb = (x.view(n, L, -1, D).transpose(1, 2) for x in (qb, kb, vb))
        if L <= mm_max:
            yb = causal_mm(qb, kb, vb)
        else:
            yb = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=Hkv != H)
        outs.append(yb.transpose(1, 2).reshape(n * L, H, D))
    outs.append(outs[0].new_zeros(1, H, D))
    return torch.cat(outs).index_select(0, inv).view(B, T, H, D).transpose(1, 2)


def option(name):
    """(setup(seg) -> per-batch state, attention(q, k, v, state) -> y)."""
    return {
        "a": (dense_mask, attn_dense),
        "b": (flex_setup, attn_flex),
        "c-sdpa": (varlen_plan, lambda q, k, v, p: varlen_attention(q, k, v, p, 0)),
        "c-mm": (varlen_plan, lambda q, k, v, p: varlen_attention(q, k, v, p, 1 << 30)),
        "c-mix": (varlen_plan, varlen_attention),
        "d": (loop_setup, attn_loop),
        "e": (lambda seg: None, attn_causal),
    }[name]


# ---------------------------------------------------------------------------- child: one option

def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def state_mb(state):
    if isinstance(state, torch.Tensor):
        return state.nbytes / 2**20
    if isinstance(state, (list, tuple)):
        return sum(state_mb(s) for s in state)
    if hasattr(state, "as_tuple"):  # BlockMask
        return sum(state_mb(s) for s in state.as_tuple() if isinstance(s, torch.Tensor))
    return 0.0


def run_child(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    global MIX_MAX
    MIX_MAX = a.mix_max
    setup, attention = option(a.child)
    if a.bucket_overhead is not None:
        setup = (lambda seg: varlen_plan(seg, a.bucket_overhead)) if setup is varlen_plan else setup
    bf16 = a.dtype == "bf16"
    results = {}
    for lay in a.layouts:
        seg = make_layout(lay, a.B, a.T)
        gen = torch.Generator().manual_seed(1)
        qL = torch.randn(a.B, a.T, H, D, generator=gen).requires_grad_()
        kL = torch.randn(a.B, a.T, HKV, D, generator=gen).requires_grad_()
        vL = torch.randn(a.B, a.T, HKV, D, generator=gen).requires_grad_()
        g = torch.randn(a.B, H, a.T, D, generator=gen) * (seg >= 0)[:, None, :, None]
        setup_s = []
        for _ in range(2):  # the first may pay one-off initialisation
            t0 = time.perf_counter()
            state = setup(seg)
            setup_s.append(time.perf_counter() - t0)
        r = {"setup_ms": setup_s[-1] * 1e3, "setup_first_ms": setup_s[0] * 1e3, "state_mb": state_mb(state)}

        def step(grad):
            for x in (qL, kL, vL):
                x.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                q, k, v = (x.transpose(1, 2) for x in (qL, kL, vL))
                if bf16:
                    q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
                t0, c0 = time.perf_counter(), time.process_time()
                y = attention(q, k, v, state)
                t1 = time.perf_counter()
            if grad:
                y.backward(g.to(y.dtype))
            return y, t1 - t0, time.perf_counter() - t0, time.process_time() - c0

        grad = True
        try:
            t0 = time.perf_counter()
            step(True)
            first = time.perf_counter() - t0
        except Exception as e:  # FlexAttention has no CPU backward
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            grad = False
            # After an error inside a compiled frame dynamo runs that frame eagerly from then
            # on (for flex_attention: the unfused reference, 30x slower); compile afresh.
            torch._dynamo.reset()
            globals()["_flex"] = None
            for x in (qL, kL, vL):
                x.requires_grad_(False)
            with torch.no_grad():
                t0 = time.perf_counter()
                step(False)
                first = time.perf_counter() - t0
        fwd, tot, cpu = [], [], []
        with torch.set_grad_enabled(grad):
            for _ in range(a.repeats):
                y, tf, tt, tc = step(grad)
                fwd.append(tf)
                tot.append(tt)
                cpu.append(tc)
        r.update(fwd_ms=statistics.median(fwd) * 1e3, grad=grad, cpu_ms=statistics.median(cpu) * 1e3,
                 fwdbwd_ms=statistics.median(tot) * 1e3 if grad else None,
                 first_ms=first * 1e3)
        if a.out:
            torch.save({"y": y.detach().float(), **({n: x.grad for n, x in zip("qkv", (qL, kL, vL))} if grad else {})},
                       os.path.join(a.out, f"{a.dtype}_{lay}_{a.child}.pt"))
        # Memory: freed buffers back to the OS, peak reset, then one step.
        del y
        for x in (qL, kL, vL):
            x.grad = None
        gc.collect()
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: fixed, so large frees are unmapped at once
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = status_mb("VmRSS")
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            q, k, v = (x.transpose(1, 2) for x in (qL, kL, vL))
            if bf16:
                q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
            y = attention(q, k, v, state)
            del q, k, v
        kept = status_mb("VmRSS") - base
        if grad:
            y.backward(g.to(y.dtype))
        r.update(kept_mb=kept, peak_mb=status_mb("VmHWM") - base)
        del y, state
        results[lay] = r
    print("RESULT " + json.dumps(results), flush=True)


# ---------------------------------------------------------------------------- parent

def describe(seg):
    rows = doc_lengths(seg)
    docs = [n for lens, real in rows for n, r in zip(lens, real) if r]
    B, T = seg.shape
    pad = (seg < 0).float().mean().item()
    work = sum(n * (n + 1) / 2 for n in docs) / (B * T * (T + 1) / 2)
    return (f"{len(docs)} documents in {B} rows, length mean {statistics.mean(docs):.0f} median "
            f"{statistics.median(docs):.0f} max {max(docs)}, padding {pad:.1%}; block-diagonal causal "
            f"work = {work:.1%} of full-row causal")


def compare(ref, got, seg):
    real = (seg >= 0)[:, None, :, None]
    out = {}
    for n in ("y", "q", "k", "v"):
        if n not in got:
            continue
        a, b = ref[n], got[n]
        if n == "y":
            a, b = a * real, b * real
        out[n] = ((a - b).abs().max().item(), a.abs().max().item())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", nargs="+", default=["chat", "long"], choices=["chat", "long"])
    p.add_argument("--options", nargs="+", default=OPTIONS, choices=OPTIONS)
    p.add_argument("--mix-max", type=int, default=MIX_MAX,
                   help="c-mix under bf16: two-matmul buckets up to this length")
    p.add_argument("--bucket-overhead", type=int,
                   help="c: varlen_plan's per-bucket cost in token^2 (default 128*128)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return run_child(a)

    t_start = time.perf_counter()
    dtypes = ["fp32", "bf16"] if a.dtype == "both" else [a.dtype]
    options = ["a"] + [o for o in a.options if o != "a"]  # a is the reference
    print(f"CPU: {machine()}; torch {torch.__version__}")
    threads = a.threads or torch.get_num_threads()
    print(f"shape: B={a.B} T={a.T} H={H} Hkv={HKV} D={D}; {threads} threads; median of {a.repeats} after 1 warm-up; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    segs = {lay: make_layout(lay, a.B, a.T) for lay in a.layouts}
    for lay, seg in segs.items():
        print(f"layout {lay}: {describe(seg)}")
    plan = varlen_plan(segs[a.layouts[0]], *([a.bucket_overhead] if a.bucket_overhead is not None else []))
    print(f"c buckets ({a.layouts[0]}): " + ", ".join(f"{n}x{L}" for n, L in plan[1]))
    print()

    rows, notes, fp32_refs = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dt in dtypes:
            refs = {}
            for opt in options:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, f"inductor_{dt}_{opt}"))
                cmd = [sys.executable, os.path.abspath(__file__), "--child", opt, "--dtype", dt, "--T", str(a.T),
                       "--B", str(a.B), "--repeats", str(a.repeats), "--mix-max", str(a.mix_max),
                       "--threads", str(a.threads), "--out", tmp, "--layouts", *a.layouts,
                       *(["--bucket-overhead", str(a.bucket_overhead)] if a.bucket_overhead is not None else [])]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"{dt} {opt}: child failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                res = json.loads(line[0][7:])
                print(f"  {dt:4} {opt:6} done in {wall:5.1f} s", file=sys.stderr, flush=True)
                for lay in a.layouts:
                    r = res[lay]
                    path = os.path.join(tmp, f"{dt}_{lay}_{opt}.pt")
                    got = torch.load(path)
                    os.remove(path)
                    if opt == "a":
                        refs[lay] = got
                        if dt == "fp32":
                            fp32_refs[lay] = got
                        elif lay in fp32_refs:  # the scale of bf16 rounding
                            d = compare(fp32_refs[lay], got, segs[lay])
                            notes.append(f"bf16 {lay} a vs fp32 a (bf16 rounding): max abs diff out / dq / dk / dv "
                                         + " / ".join(f"{d[n][0]:.1e}" for n in "yqkv")
                                         + f" (rel {max(x / m for x, m in d.values()):.1e})")
                    r["diff"] = compare(refs[lay], got, segs[lay]) if lay in refs else {}
                    rows.append((dt, lay, opt, r))
                    if opt == "b" and lay == a.layouts[0]:  # later layouts reuse the compiled kernel
                        notes.append(f"{dt} b: " + (f"forward+backward failed: {r['error']} -> timed the forward "
                                                    f"alone, without grad; " if "error" in r else "")
                                     + f"first call (cold compile) {r['first_ms'] / 1e3:.1f} s, "
                                     f"create_block_mask {r['setup_first_ms']:.0f} ms first, {r['setup_ms']:.0f} ms after")
                del got

    # table
    def fmt(x, f="{:.0f}"):
        return "-" if x is None else f.format(x)

    print("| dtype | layout | option | fwd ms | fwd+bwd ms | vs a | cpu ms | kept MB | peak MB | setup ms/batch | "
          "state MB | max abs diff vs a: out / dq / dk / dv (rel) | ok |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|")
    base = {(dt, lay): r for dt, lay, o, r in rows if o == "a"}
    contended = 0
    for dt, lay, opt, r in rows:
        # With T threads an uncontended step keeps them all busy (OpenMP spins while it
        # waits), so CPU time ~ T x wall; much less means a thread waited for a core.
        flag = ""
        if threads > 1 and r["cpu_ms"] < 0.8 * threads * (r["fwdbwd_ms"] or r["fwd_ms"]):
            flag, contended = " !", contended + 1
        ra = base.get((dt, lay))
        ratio = (f"{ra['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x" if r["grad"] and ra else
                 f"fwd {ra['fwd_ms'] / r['fwd_ms']:.2f}x" if ra else "-")
        d = r["diff"]
        diff = " / ".join(f"{d[n][0]:.1e}" for n in "yqkv" if n in d)
        rel = max((d[n][0] / d[n][1] for n in d), default=0.0)
        ok = ("ref" if opt == "a" else "n/a (no mask)" if opt == "e" else
              ("yes" if rel <= TOL[dt] else "NO") + ("" if r["grad"] else " (fwd)"))
        tot = fmt(r["fwdbwd_ms"]) + ("" if r["grad"] else " (no bwd)") + flag
        print(f"| {dt} | {lay} | {opt} | {r['fwd_ms']:.0f} | {tot} | {ratio} | {r['cpu_ms']:.0f} | {r['kept_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['setup_ms']:.1f} | {r['state_mb']:.1f} | {diff} ({rel:.1e}) | {ok} |")
    print()
    for n in notes:
        print("note: " + n)
    if contended:
        print(f"WARNING: {contended} rows marked ! ran with CPU time < 80% of {threads} x wall: other processes "
              f"took cores (load average {os.getloadavg()[0]:.2f} now); their wall times are not the kernels'. "
              f"Rerun on an idle machine, or with --threads 1 and read cpu ms.")
    if "a" in options:
        print(f"note: a's kept includes SDPA's float copy of the bool mask, made at every call and saved for backward "
              f"({a.B * a.T * a.T * 4 / 2**20:.0f} MB fp32, {a.B * a.T * a.T * 2 / 2**20:.0f} MB bf16 per layer); "
              f"a float mask built once per batch would be shared by the layers instead")
    print(f"tolerance: relative max abs diff <= {TOL}; kept = RSS held after the forward (x{LAYERS} layers in a "
          f"model); peak = RSS high-water over forward+backward; both minus the baseline with inputs and state.")

    # conclusion
    print()
    parts = []
    for dt in dtypes:
        for lay in a.layouts:
            rs = {o: r for d_, l_, o, r in rows if d_ == dt and l_ == lay and r["grad"] and o != "e"}
            if "a" not in rs:
                continue
            fast = min(rs, key=lambda o: rs[o]["fwdbwd_ms"])
            light = min(rs, key=lambda o: rs[o]["peak_mb"])
            ra, rf = rs["a"], rs[fast]
            e = next((r for d_, l_, o, r in rows if d_ == dt and l_ == lay and o == "e"), None)
            fast_cpu = min(rs, key=lambda o: rs[o]["cpu_ms"])
            parts.append(
                f"{dt}/{lay}: fastest {fast} at {rf['fwdbwd_ms']:.0f} ms per layer vs {ra['fwdbwd_ms']:.0f} ms for a "
                f"({ra['fwdbwd_ms'] / rf['fwdbwd_ms']:.1f}x; by CPU time {fast_cpu}, "
                f"{ra['cpu_ms'] / rs[fast_cpu]['cpu_ms']:.1f}x"
                + (f"; full-row causal e {e['fwdbwd_ms']:.0f} ms" if e else "")
                + f"), peak {rf['peak_mb']:.0f} vs {ra['peak_mb']:.0f} MB, kept {rf['kept_mb']:.0f} vs "
                f"{ra['kept_mb']:.0f} MB; lightest {light} (peak {rs[light]['peak_mb']:.0f} MB)")
    print("Conclusion (measured): " + "; ".join(parts) + ".")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
