"""Peak memory and seconds per step of a full SFT step with activation checkpointing off and on.

A model with SmolLM2-135M's configuration (random weights; bench/sft_data.py) goes through
`shoggoth sft` on packed rows of 2,048 tokens, one row per step, once with --grad-ckpt off
and once with --grad-ckpt on, each run in a fresh process (bench/lora.py's `run`: peak RSS is
the process's ru_maxrss; seconds per step between consecutive step logs, the first left out).

    python bench/grad_ckpt.py [--steps 4] [--dtype bf16|fp32] [--threads 1] [--no-record]
"""

import datetime
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import lora  # noqa: E402
import results  # noqa: E402
import sft_data  # noqa: E402

from shoggoth.train import metrics  # noqa: E402


def main():
    a = lora.options(__doc__)
    work = Path(tempfile.mkdtemp(prefix="bench-grad-ckpt-"))
    model = str(sft_data.make_model_dir(work / "smollm2-135m"))
    chats = str(sft_data.make_data(work / "chats.jsonl", 200))
    args = ["sft", "--init", model, "--data", chats, "--seq-len", "2048", "--batch-size", "1", "--max-steps",
            str(a.steps), "--sample-every", "0", "--dtype", a.dtype, "--eval-every", "100000", "--ckpt-every", "100000"]
    runs = {mode: lora.run(args + ["--grad-ckpt", mode], work / mode, a.threads) for mode in ("off", "on")}
    lines = [f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {metrics.machine()}, {a.dtype}, "
             f"{a.threads} thread(s), 1 row x 2,048 tokens per step", "",
             "| --grad-ckpt | peak RSS (GiB) | s/step |", "|---|---|---|",
             *(f"| {mode} | {lora.cells(r)} |" for mode, r in runs.items()),
             "", "on/off: memory {:.2f}x, time {:.2f}x".format(*lora.ratios(runs["on"], runs["off"]))
             + f" ({a.steps - 1} timed steps per run)."]
    results.publish(lines, not a.no_record, "## Activation checkpointing in SFT (bench/grad_ckpt.py)",
                    "Peak memory and seconds per step of a full `shoggoth sft` step with `--grad-ckpt off` and `on`, "
                    "each run in a fresh process.")


if __name__ == "__main__":
    main()
