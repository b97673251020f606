#!/usr/bin/env bash
# The GPU checks, as one script for a machine lent for a few minutes (docs/results.md, "small-150m on a GPU"):
# the environment, the CUDA tests, small-150m's training throughput eager against compiled, a
# time-boxed small-150m training run on eng-poem, and a poem from it. Each step has its own time
# limit and its own log, and a failed step does not stop the next. The training gets MINUTES, or
# less where the whole script would outrun BUDGET seconds (a lent machine's command limit).
#   OUT=gpu-check MINUTES=10 BUDGET=570 bash benchmarks/gpu_check.sh   (needs data/eng-poem-char)
set -u
OUT=${OUT:-gpu-check}
MINUTES=${MINUTES:-10}
BUDGET=${BUDGET:-100000}
PY=${PYTHON:-python3}
RUN=${RUN:-runs/small-150m-gpu}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { local name=$1 limit=$2; shift 2; local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name" 2>&1; echo "$name: rc $? in $((SECONDS - t)) s"; }

{ nvidia-smi; $PY -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
step tests.log 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bench.log 150 $PY benchmarks/train_throughput.py --device cuda --shapes 150m --batch 64 --steps 10 --repeats 1 --compile
# set-up, the final whole-split evaluation and checkpoint writes take up to ~2 minutes beyond
# --max-time (which itself includes compilation), the poem well under a minute
train_s=$(( BUDGET - SECONDS - 150 < MINUTES * 60 ? BUDGET - SECONDS - 150 : MINUTES * 60 ))
echo "training for $train_s s"
step train.log $((train_s + 130)) $PY -m gpt_small train --data data/eng-poem-char \
  --config configs/small-150m-gpu.toml --out "$RUN" --max-time "${train_s}s" --no-progress
cp "$RUN/metrics.jsonl" "$RUN/curves.png" "$OUT/" 2>/dev/null
step poem.txt 45 $PY -m gpt_small generate --checkpoint "$RUN" --lines 12 --seed 1 --device cuda
tail -n 3 "$OUT"/tests.log "$OUT"/bench.log "$OUT"/train.log
