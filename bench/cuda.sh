#!/bin/bash
# The engine's CUDA path on a lent GPU, in one call: the CUDA-parametrised engine tests,
# then bench/generate.py on the demo and GPT-2-sized shapes. Logs and the updated
# bench/RESULTS.md go to $OUT (or ./cuda-out). Uses the machine's own torch/transformers.
set -o pipefail
OUT=${OUT:-cuda-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda 2>&1 | tee "$OUT/tests.log"
timeout 200 python3 bench/generate.py --device cuda --repeats 3 2>&1 | tee "$OUT/bench_demo.log"
timeout 200 python3 bench/generate.py --device cuda --shape gpt2 --repeats 3 2>&1 | tee "$OUT/bench_gpt2.log"
cp bench/RESULTS.md "$OUT/"
