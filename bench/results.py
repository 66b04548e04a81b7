"""bench/RESULTS.md: each benchmark appends its dated entries to its own section; and the
--dtype every benchmark takes (what the machine would really run, unless told otherwise)."""

import re
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
DTYPES = ("auto", "bf16", "fp32")
DTYPE_HELP = "precision of both sides (bf16: autocast); auto: what `shoggoth.train.dist.autocast_dtype` picks here"


def run_dtype(dtype, device="cpu"):
    """'bf16' or 'fp32': the dtype a run with --dtype dtype uses on device ('auto' resolved
    as the stages resolve it)."""
    import torch

    from shoggoth.train.dist import autocast_dtype

    return "bf16" if autocast_dtype(torch.device(device), dtype) == torch.bfloat16 else "fp32"


def record(heading, intro, entry, path=RESULTS):
    """Append entry at the end of the section under `heading` (created with `intro` if
    missing), leaving the other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{intro}\n"
    start = text.index(heading) + len(heading)
    nxt = re.search(r"^## ", text[start:], flags=re.M)
    end = start + nxt.start() if nxt else len(text)
    section = text[start:end].rstrip("\n") + "\n" + entry
    path.write_text(text[:start] + section + ("\n" + text[end:] if nxt else ""))


def publish(lines, keep, heading, intro):
    """Print a benchmark's entry (its lines) and, with keep, append it to its section (record)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if keep:
        record(heading, intro, "\n" + text)
