#!/usr/bin/env bash
# "Start from GPT-2" (docs/interop.md): fine-tuning a pretrained GPT-2-shaped model against training
# the same shape from scratch for the same wall time, on eng-poem with the gpt2 tokenizer.
#
# No real GPT-2 weights are on this machine (and no hub), so the pretrained model is our own: a
# small GPT-2-shaped model (the `tiny` preset with GELU: learned positions, biases, tied head, the
# gpt2 tokenizer's 50,257 tokens; a 124M model does not train in minutes on 2 shared cores) trained for
# PRETRAIN minutes on 10 MB of Gutenberg verse that is NOT in eng-poem (bytes 20-30 MB of the
# gutenberg-poetry corpus; eng-poem is its first 20 MB), exported to a transformers folder and
# imported back, i.e. exactly the path a downloaded GPT-2 takes. The fine-tuned and the from-scratch
# runs then train side by side (one thread each, so they see the same machine load; every run has
# one thread: on a shared 2-core machine two OpenMP threads per process ran 30x slower) for MINUTES and
# are compared on the validation windows of their interval evaluations (EVAL_BATCHES x 16 x 32
# tokens of eng-poem's validation split, the same windows for both; the whole split, ~500k gpt2
# tokens, takes longer to score than the runs train on this machine).
set -euo pipefail
PY=${PY:-.venv/bin/python}
GS="$PY -m gpt_small"
PRETRAIN=${PRETRAIN:-5}
MINUTES=${MINUTES:-3}
EVAL_BATCHES=${EVAL_BATCHES:-40}
OUT=${OUT:-runs/start-from-gpt2}
mkdir -p "$OUT" data

[ -f data/eng-poem-gpt2/meta.json ] || $GS prepare --corpus eng-poem --tokenizer gpt2 --out data/eng-poem-gpt2
if [ ! -f data/other-verse-gpt2/meta.json ]; then
  $PY - <<'PYEOF'
from pathlib import Path
from gpt_small.corpus import corpus_path
raw = corpus_path("gutenberg-poetry").read_bytes()[20_000_000:30_000_000]
raw = raw[raw.index(b"\n") + 1 : raw.rindex(b"\n") + 1]  # whole lines only
Path("data/other-verse.txt").write_bytes(raw)
PYEOF
  $GS prepare --text data/other-verse.txt --tokenizer gpt2 --out data/other-verse-gpt2
fi

SHAPE=(--preset tiny --set activation=gelu)
COMMON=(--batch-size 16 --lr 3e-3 --warmup-steps 20 --eval-interval 50 --eval-batches "$EVAL_BATCHES"
        --set final_eval=false --no-progress)
$GS train --data data/other-verse-gpt2 --out "$OUT/pretrained" "${SHAPE[@]}" "${COMMON[@]}" --max-time "${PRETRAIN}m" --threads 1
$GS export --checkpoint "$OUT/pretrained" --out "$OUT/pretrained-hf" --no-eval
$GS import --hf "$OUT/pretrained-hf" --out "$OUT/imported"

$GS train --data data/eng-poem-gpt2 --out "$OUT/finetuned" --init-from "$OUT/imported" "${COMMON[@]}" \
  --max-time "${MINUTES}m" --threads 1 > "$OUT/finetuned.log" 2>&1 &
FT=$!
$GS train --data data/eng-poem-gpt2 --out "$OUT/scratch" "${SHAPE[@]}" "${COMMON[@]}" \
  --max-time "${MINUTES}m" --threads 1 > "$OUT/scratch.log" 2>&1 &
SC=$!
wait $FT $SC
$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
for name in ("finetuned", "scratch"):
    rows = [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
    evals = [r for r in rows if r["kind"] == "eval"]
    curve = "  ".join(f"{r['elapsed'] / 60:.1f}m:{r['val_bpc']:.3f}" for r in evals)
    last = evals[-1]
    print(f"{name:10s} steps {last['step']:5d}  val loss {last['val_loss']:.4f} nats/token  "
          f"{last['val_bpc']:.4f} bits/char  (curve, minutes:bits/char: {curve})")
PYEOF
