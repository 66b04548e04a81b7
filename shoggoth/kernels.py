"""The one compiled kernel: one-query decode attention on CPU (csrc/decode_attention.cpp).

Built on first use with torch.utils.cpp_extension (g++, about 25 s once; the build is
cached under ~/.cache/torch_extensions), for the CPU it runs on. Where it cannot be built
(no compiler, no Python headers) or SHOGGOTH_NO_KERNELS=1 is set, `decode_attention`
returns None and callers use PyTorch's SDPA instead, with the same results up to float
rounding. tests/test_engine.py checks the kernel against SDPA.
"""

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
_lock = threading.Lock()
_module = None  # the built extension; False once a build has failed or is turned off


def _cpu_tag():
    # -march=native code must not run on another CPU that shares the cache folder.
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line
                break
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


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
        name = f"shoggoth_decode_attention_{_cpu_tag()}"
        if not _built(name):
            print("shoggoth: building the CPU decode-attention kernel (once, about 25 s)", file=sys.stderr, flush=True)
        return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp",
                                                                      "-fno-math-errno"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, headers or ninja: fall back to SDPA, and say so once
        print(f"shoggoth: CPU decode-attention kernel unavailable ({type(e).__name__}: {str(e)[:200]}); "
              "using PyTorch's SDPA", file=sys.stderr, flush=True)
        return False


def _built(name):
    try:  # a private helper of torch's: used only to say whether the build is already there
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:
        return True


def decode_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D)) v for one query per row, in fp32: q (B, H, 1, D), k and v
    (B, Hkv, S, D) fp32 or bf16 (views of a cache are fine), mask (B, 1, 1, S) bool, True
    where visible, or None. Returns (B, H, 1, D) fp32, or None without the kernel."""
    ext = load()
    if ext is None:
        return None
    B, H, _, D = q.shape
    m = None if mask is None else mask.expand(B, 1, 1, k.shape[2]).reshape(B, -1)
    out = ext.decode_attention(q.reshape(B, H, D).float().contiguous(), k, v, m, D**-0.5)
    return out.view(B, H, 1, D)
