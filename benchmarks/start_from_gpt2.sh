#!/usr/bin/env bash
# "Start from GPT-2" (docs/interop.md): fine-tuning a pretrained GPT-2-shaped model against training
# the same shape from scratch for the same wall time, on eng-poem with the gpt2 tokenizer.
#
# No real GPT-2 weights are on this machine (and no hub), so the pretrained model is our own: the
# GPT-2-shaped `baby` model (GELU, learned positions, biases, tied head, gpt2 tokenizer) trained for
# PRETRAIN minutes on 10 MB of Gutenberg verse that is NOT in eng-poem (bytes 20-30 MB of the
# gutenberg-poetry corpus; eng-poem is its first 20 MB), exported to a transformers folder and
# imported back, i.e. exactly the path a downloaded GPT-2 takes. The fine-tuned and the from-scratch
# runs then train side by side (one thread each, so they see the same machine load) for MINUTES.
set -euo pipefail
PY=${PY:-.venv/bin/python}
GS="$PY -m gpt_small"
PRETRAIN=${PRETRAIN:-6}
MINUTES=${MINUTES:-3}
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

SHAPE=(--preset baby --set activation=gelu)
COMMON=(--batch-size 16 --lr 1e-3 --warmup-steps 50 --eval-interval 200 --eval-batches 10 --no-progress)
$GS train --data data/other-verse-gpt2 --out "$OUT/pretrained" "${SHAPE[@]}" "${COMMON[@]}" --max-time "${PRETRAIN}m"
$GS export --checkpoint "$OUT/pretrained" --out "$OUT/pretrained-hf"
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
    s = json.load(open(f"{out}/{name}/summary.json"))
    f = s["final_val"]
    print(f"{name:10s} steps {s['steps']:5d}  whole-split val loss {f['loss']:.4f} nats/token  {f['bits_per_char']:.4f} bits/char")
PYEOF
