#!/usr/bin/env bash
# The GPU checks, as one script for a machine lent for a few minutes (docs/results.md, "small-150m on a
# GPU"). It installs nothing: the machine brings its own torch, and the repository's code runs from
# PYTHONPATH. Steps (STEPS, a comma list; each has its own time limit and log, and a failed step does
# not stop the next):
#   env    the machine, torch, and the install `make setup` would pick here (tools/select_torch.py --dry-run)
#   tests  the CUDA tests (tests/test_cuda.py) and `make poem`'s device choice (tests/test_poem_device.py)
#   poem   `make poem` as a user runs it on a GPU: configs/poem-gpu.toml for POEM_MINUTES (default 3)
#   bench  small-150m's training throughput, eager against compiled
#   train  small-150m on eng-poem for MINUTES (default 10), or less where the script would outrun BUDGET
#          seconds (a lent machine's command limit); prints the whole-validation-split loss
#          (target <= 1.20 nats/char; the last H200 run: 1.3464)
# A lent machine's command runs at most 10 minutes, so the 10-minute training is a call of its own:
#   OUT=gpu-check STEPS=env,tests,poem BUDGET=570 bash benchmarks/gpu_check.sh
#   OUT=gpu-check STEPS=train MINUTES=10 BUDGET=100000 bash benchmarks/gpu_check.sh   (where time allows)
# Both need data/eng-poem-char (`gpt-small prepare --corpus eng-poem`, or carried).
set -u
OUT=${OUT:-gpu-check}
STEPS=${STEPS:-env,tests,poem,bench,train}
MINUTES=${MINUTES:-10}
POEM_MINUTES=${POEM_MINUTES:-3}
BUDGET=${BUDGET:-100000}
PY=${PYTHON:-python3}
RUN=${RUN:-runs/small-150m-gpu}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
step() { local name=$1 limit=$2; shift 2; local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name" 2>&1; echo "$name: rc $? in $((SECONDS - t)) s"; }

if has env; then
  { nvidia-smi; $PY -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    $PY tools/select_torch.py --dry-run --python "$PY" --venv /tmp/not-made; } > "$OUT/env.txt" 2>&1
  grep '^make setup' "$OUT/env.txt"
fi
has tests && step tests.log 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_poem_device.py
if has poem; then
  # set-up, the final evaluation and the three poems take a minute or two beyond the budget
  step poem.log $((POEM_MINUTES * 60 + 150)) $PY -m gpt_small poem --data data/eng-poem-char --out runs/poem-gpu-check \
    --minutes "$POEM_MINUTES"
  grep -E '^device:|^\[2/3\]|Whole validation split' "$OUT/poem.log" | cut -c1-400
fi
has bench && step bench.log 150 $PY benchmarks/train_throughput.py --device cuda --shapes 150m --batch 64 --steps 10 \
  --repeats 1 --compile
if has train; then
  # set-up, the final whole-split evaluation and checkpoint writes take up to ~2 minutes beyond
  # --max-time (which itself includes compilation)
  train_s=$(( BUDGET - SECONDS - 150 < MINUTES * 60 ? BUDGET - SECONDS - 150 : MINUTES * 60 ))
  echo "training for $train_s s"
  step train.log $((train_s + 130)) $PY -m gpt_small train --data data/eng-poem-char \
    --config configs/small-150m-gpu.toml --out "$RUN" --max-time "${train_s}s" --no-progress
  cp "$RUN/metrics.jsonl" "$RUN/curves.png" "$OUT/" 2>/dev/null
  grep -o 'Whole validation split: [^,]*\|The best checkpoint[^:]*: [^,]*' "$OUT/train.log"
  step poem.txt 45 $PY -m gpt_small generate --checkpoint "$RUN" --lines 12 --seed 1 --device cuda
fi
for f in tests.log bench.log train.log; do [ -f "$OUT/$f" ] && tail -n 3 "$OUT/$f"; done
exit 0
