"""The one compiled kernel: one-query decode attention on CPU (csrc/decode_attention.cpp).

Built on first use with torch.utils.cpp_extension (g++, once; the build is cached under
~/.cache/shoggoth/kernels, one folder per CPU, torch and Python), for the CPU it runs
on; bench/RESULTS.md (Generation) has the build time and the speed. Where it cannot be
built (no compiler, no Python headers) or SHOGGOTH_NO_KERNELS=1 is set,
`decode_attention` returns None and callers use PyTorch's SDPA instead, with the same
results up to float rounding. tests/test_engine.py checks the kernel against SDPA.
"""

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
_lock = threading.Lock()
_module = None  # the built extension; False once a build has failed or is turned off


def _tag():
    # -march=native code must not run on another CPU that shares the cache folder (x86
    # lists its features as "flags", Arm as "Features"), nor load into another torch.
    features = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            features = sorted({line for line in f if line.startswith(("flags", "Features"))})
    key = f"{platform.machine()} {features} {_march()} {torch.__version__} {sys.version_info[:2]} {sys.prefix}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _march():
    """-march=native, or AVX2 and FMA only (x86-64-v3) where torch's kernels are held to AVX2
    (ATEN_CPU_CAPABILITY=avx2): then the kernel runs as on an AVX2 machine too."""
    held = platform.machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() == "AVX2"
    return "-march=x86-64-v3" if held else "-march=native"


def load():
    """The compiled extension, or None where it is unavailable."""
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                _module = _build()
    return _module or None


def _build():
    if os.environ.get("SHOGGOTH_NO_KERNELS") == "1":
        return False
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # torch's build needs the ninja binary; the PyPI wheel has one
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        name = f"shoggoth_decode_attention_{_tag()}"
        build = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shoggoth" / "kernels" / name
        build.mkdir(parents=True, exist_ok=True)
        # torch's build lock has no timeout: a build killed part-way (a torchrun rank, a
        # timeout) leaves it behind, and every later process would wait on it forever.
        # A build takes about 25 s, so a lock older than 5 minutes is such a leftover.
        lock = build / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 300:
            lock.unlink(missing_ok=True)
        if not (build / f"{name}.so").exists():
            print("shoggoth: building the CPU decode-attention kernel (once, about 25 s)", file=sys.stderr, flush=True)
        return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=["-O3", _march(), "-fopenmp",
                                                                      "-fno-math-errno"],
                                  extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as e:  # no compiler, headers or ninja: fall back to SDPA, and say so once
        print(f"shoggoth: CPU decode-attention kernel unavailable ({type(e).__name__}: {str(e)[:200]}); "
              "using PyTorch's SDPA", file=sys.stderr, flush=True)
        return False


def supports(*tensors):
    """Whether the kernel takes these: CPU tensors in fp32 or bf16, nothing for autograd."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not grad and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)


def decode_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D)) v for one query per row, in fp32: q (B, H, 1, D), k and v
    (B, Hkv, S, D) fp32 or bf16 (views of a cache are fine), mask (B, 1, 1, S) bool, True
    where visible, or None. Returns (B, H, 1, D) fp32; None without the kernel, or for
    inputs it does not take (other dtypes or devices, autograd, a strided head dim)."""
    ext = load()
    if ext is None or not supports(q, k, v) or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    B, H, _, D = q.shape
    m = None if mask is None else mask.expand(B, 1, 1, k.shape[2]).reshape(B, -1)
    if m is not None and m.stride(-1) != 1:
        m = m.contiguous()
    out = ext.decode_attention(q.reshape(B, H, D).float().contiguous(), k, v, m, D**-0.5)
    return out.view(B, H, 1, D)
