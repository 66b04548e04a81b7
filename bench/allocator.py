"""What glibc's allocator costs a training step: peak RSS, page faults and seconds per step of a
full SFT-like step (bf16 autocast, packed documents of 150-450 tokens in one 2,048-token row,
AdamW) on a random model of SmolLM2-135M's shape, under three allocator settings:

  default    glibc as it comes: its mmap threshold grows (up to 32 MiB) each time a large
             block is freed, so later tensors come from the heap, which fragments and keeps
             pages once touched (few page faults, a peak that grows over the first steps);
  mmap-128k  MALLOC_MMAP_THRESHOLD_=131072 (a fixed threshold): every tensor over 128 KiB is
             its own mapping, returned when freed, and its pages fault in again at every step;
  trim       the default, plus malloc_trim(0) after every optimizer step (free heap pages go
             back to the system between steps).

Each setting runs in a fresh process (the first step is left out of the median).

    python bench/allocator.py [--steps 5] [--threads 1]
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import ctypes, json, resource, sys, time, torch
from shoggoth.lm.model import GPT, GPTConfig, Documents
from shoggoth.train import optim
trim = ctypes.CDLL("libc.so.6").malloc_trim if sys.argv[2] == "trim" else None
torch.manual_seed(0)
cfg = GPTConfig(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                max_seq_len=2048, tie_embeddings=True)
m = GPT(cfg)
opt = optim.adamw(m, 1e-4, 0.1)
T, g = 2048, torch.Generator().manual_seed(0)
ru = lambda: resource.getrusage(resource.RUSAGE_SELF)
steps = []
for i in range(int(sys.argv[1])):
    lens, left = [], T
    while left > 0:
        lens.append(min(left, int(torch.randint(150, 450, (1,), generator=g))))
        left -= lens[-1]
    seg = torch.cat([torch.full((n,), k) for k, n in enumerate(lens)])[None]
    ids, tg = (torch.randint(0, cfg.vocab_size, (1, T), generator=g) for _ in range(2))
    f0, t = ru().ru_minflt, time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids, tg, mask=Documents(seg))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if trim:
        trim(0)
    steps.append({"s": time.perf_counter() - t, "faults": ru().ru_minflt - f0, "peak_gib": ru().ru_maxrss / 2**20})
print(json.dumps(steps))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print("| setting | peak RSS (GiB) | s/step (median) | minor page faults per step (median) |\n|---|---|---|---|")
    for name in ("default", "mmap-128k", "trim"):
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        if name == "mmap-128k":
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        out = subprocess.run([sys.executable, "-c", CHILD, str(a.steps), name], env=env, capture_output=True,
                             text=True, check=True).stdout
        steps = json.loads(out.splitlines()[-1])
        med = lambda k: sorted(s[k] for s in steps[1:])[len(steps[1:]) // 2]  # noqa: E731
        print(f"| {name} | {steps[-1]['peak_gib']:.2f} | {med('s'):.2f} | {med('faults'):,} |", flush=True)


if __name__ == "__main__":
    main()
