"""One dense progress line per step with its ETA, a progress bar on a terminal,
metrics.jsonl, the experiment trackers of --report-to (trackers.py), and MFU."""

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from .dist import clock
from ..data.files import atomic_write
from .trackers import open_all, trl_name

# Dense bf16 peak FLOP/s of common accelerators (spec sheets, no sparsity).
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
             "4090": 165e12, "3090": 71e12}
_peak = {}  # (device, dtype) -> measured FLOP/s


def peak_flops(device, dtype):
    """Peak matmul FLOP/s for MFU: the spec sheet's dense bf16 figure on a GPU it lists;
    elsewhere (a CPU, fp32 on a GPU, a GPU not listed) measured once per process with a
    square matmul in the training dtype (1024 on a CPU, 8192 on a GPU): the best of six 0.05 s
    windows, since a shared machine's neighbours slow some windows down (one 0.3 s window
    read 255 to 780 GFLOP/s on one bf16 Xeon while it was busy)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        sheet = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        if sheet:
            return sheet
    key = (str(device), dtype)
    if key not in _peak:
        n = 1024 if device.type == "cpu" else 8192
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        best = 0.0
        for _ in range(6):
            calls, t0 = 0, clock(device)
            while time.perf_counter() - t0 < 0.05:
                a @ b
                calls += 1
            best = max(best, calls * 2 * n**3 / (clock(device) - t0))
        _peak[key] = best
    return _peak[key]


# Environment variables that hold PyTorch's kernels, oneDNN and MKL below the CPU's instruction set.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine():
    """The machine in words, with what decides the fast dtype: the CPU's name, cores and
    flags (AVX2, AVX-512, AVX-512 bf16, AMX) from /proc/cpuinfo and the instruction set
    PyTorch's kernels use (torch.backends.cpu.get_cpu_capability(): below the flags when
    ISA_LIMITS hold it there, as when an AVX-512 CPU emulates an AVX2 one), or the GPU's name."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(key)), "")  # noqa: E731
    flags = field("flags").split()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    kernels = torch.backends.cpu.get_cpu_capability()
    limited = "avx512f" in flags and not kernels.startswith("AVX512")
    env = " ".join(f"{k}={os.environ[k]}" for k in ISA_LIMITS if k in os.environ)
    kernels = f"kernels {'limited to ' if limited else ''}{kernels}" + (f" by {env}" if env else "")
    return f"{os.cpu_count()} x {field('model name') or 'unknown CPU'} ({', '.join(shown) or 'no AVX2'}; {kernels})"


class Sums(dict):
    """Named running sums of a step's statistics, float32 tensors where they were computed:
    `sums.add(loss=loss, clipfrac=clipfrac)`; dist.all_sums(sums) or dist.all_means(...) reduces
    them over ranks in one call. Sums(*names) starts those at zero, so that every rank reduces
    the same names even where it had nothing to add."""

    def __init__(self, *names):
        super().__init__({k: torch.zeros(()) for k in names})

    def add(self, **values):
        for k, v in values.items():
            self[k] = self.get(k, 0.0) + torch.as_tensor(v).detach().float()
        return self


def _fmt(k, v):
    if isinstance(v, float):
        if k.startswith("time/"):
            return f"{k} {v:.2f}s"
        if k in ("mfu",) or k.endswith("_rate") or k.endswith("frac"):
            return f"{k} {100 * v:.1f}%"
        if k == "tok/s":
            return f"{k} {v:,.0f}"
        if k == "lr":
            return f"{k} {v:.2e}"
        return f"{k} {v:.4g}" if abs(v) < 1e4 else f"{k} {v:,.0f}"
    return f"{k} {v}"


def duration(seconds):
    """3h05m, 12m04s or 41s: an ETA or an elapsed time at a glance."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def read(path, skipped=None):
    """The records of a metrics.jsonl, in order: the one reader of that file (stages, report, demo,
    tests, benchmarks). A run killed mid-write leaves a torn last line (no newline after it): it is
    dropped without a word. Any other line that is not a JSON object is skipped too, and its line
    number (from 1) appended to the list `skipped`, when one is given, for the caller to say."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")  # [-1]: after the last newline
    rows = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            rows.append(rec)
        elif i < len(lines) and skipped is not None:
            skipped.append(i)
    return rows


class Metrics:
    """Writes metrics to out_dir/metrics.jsonl (and the trackers of config's --report-to; sample
    completions, a value that is a list of rows, go to the trackers only) and prints a line per call,
    ending with the ETA of the remaining steps at the pace of the steps done in this process.
    On a terminal a tqdm bar stays under the lines (stderr; none when it is not a terminal).

    On resume, the file is first rewritten (atomically) without the records after the resume
    step and without a torn last line, so that it holds one unbroken curve and the next record
    starts a line of its own. Only rank 0 should write (enabled=False elsewhere)."""

    def __init__(self, out_dir, total_steps, resume_step=0, enabled=True, config=None):
        self.enabled, self.total = enabled, total_steps
        self.path = Path(out_dir) / "metrics.jsonl"
        self.trackers = []
        self.start, self.t0 = resume_step, time.perf_counter()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            bad = []
            keep = [r for r in read(self.path, bad) if r.get("step", 0) <= resume_step]
            if bad:
                print(f"{self.path}: warning: dropped {len(bad)} unreadable line(s): line {', '.join(map(str, bad))}",
                      flush=True)
            atomic_write(self.path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in keep)))
        self.file = open(self.path, "a")
        self.bar = tqdm(total=total_steps, initial=resume_step, desc=Path(out_dir).name, unit="step",
                        file=sys.stderr, disable=None, dynamic_ncols=True)
        self.stage = type(config).__module__.rsplit(".", 1)[-1] if config is not None else "stage"
        self.trackers = open_all(getattr(config, "report_to", ["auto"]), out_dir, self.stage,
                                          asdict(config) if config is not None else {}, resume_step)

    def eta(self, step):
        """Seconds left at the mean pace of this process's steps so far; None before the first."""
        done = step - self.start
        return (time.perf_counter() - self.t0) / done * (self.total - step) if done > 0 else None

    def log(self, step, echo=True, **values):
        if not self.enabled:
            return
        tables = {k: values.pop(k) for k in [k for k, v in values.items() if isinstance(v, list)]}
        rec = {"step": step, **{k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in values.items()}}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.trackers:  # under TRL's names, renamed once for them all
            named = {trl_name(self.stage, k): v for k, v in rec.items()
                     if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            for t in self.trackers:
                if named:
                    t.log(named, step)
                for k, rows in tables.items():
                    if rows:
                        t.table(trl_name(self.stage, k), rows, step)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        if echo:
            width = len(str(self.total))
            line = " | ".join(_fmt(k, v) for k, v in rec.items() if k != "step")
            eta = self.eta(step)
            tail = f" | eta {duration(eta)}" if eta is not None and step < self.total else ""
            tqdm.write(f"step {step:>{width}}/{self.total} | {line}{tail}", file=sys.stdout)
            sys.stdout.flush()  # a log piped to a file shows each step as it ends

    def close(self):
        if self.enabled:
            self.bar.close()
            self.file.close()
            for t in self.trackers:
                t.close()
