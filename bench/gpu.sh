#!/bin/bash
# Issue 21 on a lent GPU, as two calls of the device tool (each under its 10-minute limit):
#
#   bash bench/gpu.sh check   # the engine's CUDA tests, pretraining MFU of gpt2-124m (torch.compile
#                             # off and on), PPO vs TRL 0.23.1 (two model shapes), DDP on nccl
#   bash bench/gpu.sh demo    # `shoggoth demo` on the GPU (every stage, the report) and
#                             # `shoggoth demo --scale small-gpu`
#
# Each call: timeout_s 600 and carry [".whl"], the wheels `bash bench/gpu_wheels.sh` fetched here
# first (the GPU machine reaches no package index). A session's device time (15 minutes with the
# machine's start) holds both parts only back to back. Every step has its own timeout, cut to
# what is left of the part's BUDGET (540 s), so one that hangs or fails leaves the rest to run.
# Logs go to $OUT (the device tool brings back at most 8 files): gpu-<part>.log, everything
# printed, and gpu-<part>.tgz, the runs' metrics.jsonl, summary.json and report.html.
# `DEVICE=cpu TRL_PYTHON=/tmp/trlvenv/bin/python BUDGET=120 bash bench/gpu.sh check` runs its flow here.
set -o pipefail
part=${1:?usage: bash bench/gpu.sh check|demo}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
LOG="$OUT/gpu-$part.log"; RUNS=/tmp/gpu-runs; mkdir -p "$RUNS"
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then  # built for the GPU machine's Python 3.12
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
exec > >(tee -a "$LOG") 2>&1

BUDGET=${BUDGET:-540}  # seconds for the whole part: the device tool stops a call at 600
step() {  # step SECONDS NAME COMMAND...: run it with a timeout (cut to what is left of BUDGET), print its time and status
    local limit=$1 name=$2; shift 2
    local left=$((BUDGET - SECONDS))
    echo; echo "==== $name ($(date -u +%H:%M:%S), limit ${limit}s, ${left}s left): $*"
    if ((left < 30)); then echo "==== $name: skipped, the part's ${BUDGET}s are spent"; return; fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@"; local rc=$?
    echo "==== $name: rc=$rc in $((SECONDS - t0))s"
}
shog=(python3 -m shoggoth)  # timeout runs programs, not shell functions

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 - <<'PY'
import importlib.metadata as m
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"
print(", ".join(f"{n} {version(n)}" for n in ("trl", "datasets", "pyarrow", "accelerate", "huggingface-hub", "fastapi",
                                              "sqlalchemy", "tokenizers", "safetensors")))
PY
nproc; grep -m1 'model name' /proc/cpuinfo

case $part in
check)
    step 150 "engine CUDA tests" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k $DEVICE
    # Pretraining MFU: gpt2-124m (124M, vocab 32768, 1024 context) on the built-in corpus, batch 32 x 1024 tokens
    # per step on one GPU, bf16 autocast; the compiled run reuses the first run's tokenizer.
    common=(--config gpt2-124m --device $DEVICE --batch-size 32 --grad-accum 1 --max-steps 30 --eval-every 1000
            --sample-every 0 --ckpt-every 1000)
    step 150 "pretrain gpt2-124m, eager" "${shog[@]}" pretrain "${common[@]}" --no-compile --out "$RUNS/mfu-eager"
    step 200 "pretrain gpt2-124m, torch.compile" "${shog[@]}" pretrain "${common[@]}" --compile --tokenizer "$RUNS/mfu-eager" \
        --out "$RUNS/mfu-compile"
    for r in mfu-eager mfu-compile; do python3 bench/steps.py "$RUNS/$r" --skip 10; done
    step 150 "PPO vs TRL, demo shape" python3 bench/ppo.py --trl-python ${TRL_PYTHON:-python3} --device $DEVICE --shape demo --rounds 1
    step 200 "PPO vs TRL, GPT-2 124M shape" python3 bench/ppo.py --trl-python ${TRL_PYTHON:-python3} --device $DEVICE --shape gpt2 \
        --batch 64 --response 128 --rounds 1 --iters 2
    step 90 "DDP, one process, nccl" torchrun --standalone --nproc_per_node 1 -m shoggoth pretrain --config tiny \
        --max-steps 20 --device $DEVICE --out "$RUNS/ddp"
    runs=("$RUNS"/*/metrics.jsonl)
    ;;
demo)
    step 300 "shoggoth demo (scale cpu) on $DEVICE: every stage" "${shog[@]}" demo --device $DEVICE --out "$RUNS/demo"
    step 300 "shoggoth demo --scale small-gpu" "${shog[@]}" demo --device $DEVICE --scale small-gpu --out "$RUNS/demo-gpu"
    runs=("$RUNS"/*/summary.json "$RUNS"/*/report.html "$RUNS"/*/mask.json "$RUNS"/*/*/metrics.jsonl)
    ;;
*) echo "unknown part $part (check or demo)"; exit 2 ;;
esac
tar czf "$OUT/gpu-$part.tgz" "${runs[@]}" 2>/dev/null
echo "==== done $(date -u +%H:%M:%S)"
