"""Median tokens/s and MFU of a `shoggoth pretrain` run's steps after a warm-up, from its metrics.jsonl.

    python bench/steps.py RUN_DIR [--skip 10]
"""

import argparse
import statistics
from pathlib import Path

from shoggoth.train import metrics


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--skip", type=int, default=10, help="steps left out first (warm-up, compilation)")
    a = p.parse_args()
    steps = [r for r in metrics.read(Path(a.run_dir) / "metrics.jsonl") if "tok/s" in r and r["step"] > a.skip]
    if not steps:
        raise SystemExit(f"{a.run_dir}: no step after {a.skip} has tok/s")
    med = lambda k: statistics.median(r[k] for r in steps)  # noqa: E731
    print(f"{a.run_dir}: steps {steps[0]['step']}-{steps[-1]['step']}: median {med('tok/s'):,.0f} tok/s, "
          f"MFU {med('mfu'):.1%}, {med('dt') * 1e3:.0f} ms/step; last loss {steps[-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
