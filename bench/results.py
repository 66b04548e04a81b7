"""bench/RESULTS.md: each benchmark appends its dated entries to its own section."""

import re
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


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
