#!/usr/bin/env bash
# The install for machines no lock serves: a fresh venv from pyproject.toml's ranges alone (what
# `make setup` does there), then a smoke subset of the tests and a 1-minute `make poem`.
# torch is the one package pointed at a local wheel folder (WHEELS), so the check does not
# download a multi-GB CUDA build; everything else resolves from the package index, newest in range.
#   OUT=ranges-check bash benchmarks/ranges_check.sh          (about 5 minutes; needs the index)
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${OUT:-ranges-check}")
WHEELS=${WHEELS:-/opt/wheels}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
t=$SECONDS
$PY -m venv "$WORK/venv"
V="$WORK/venv/bin"
TORCH=$(grep -m1 '^torch==' "$ROOT/requirements.lock" | cut -d' ' -f1)   # torch==2.13.0+cpu: the local wheel's release
"$V/pip" install -q --find-links "$WHEELS" "$TORCH"                  # its dependencies from the index, newest in range
"$V/pip" install -q -e "$ROOT[corpus,serve,trackers,verse,test]"     # pyproject's ranges, no lock
"$V/pip" install -q --no-deps -r "$ROOT/requirements-data.in"
"$V/pip" freeze --exclude-editable > "$OUT/freeze.txt"
echo "install: $((SECONDS - t)) s"
cd "$ROOT"
"$V/python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_tokenizer.py tests/test_config.py \
  tests/test_generate.py tests/test_data.py tests/test_select_torch.py 2>&1 | tail -n 3 | tee "$OUT/smoke.log"
cd "$WORK"
"$V/gpt-small" poem --data data/eng-poem-char --out runs/poem --config "$ROOT/configs/poem-cpu.toml" --minutes 1 \
  > "$OUT/poem.log" 2>&1
grep -E "^device:|val|--- poem 1" "$OUT/poem.log" | head -n 5
echo "total: $((SECONDS - t)) s"
