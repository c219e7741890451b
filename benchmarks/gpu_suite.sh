#!/usr/bin/env bash
# One call on a lent GPU, under 8 minutes on an H100: install, GPU tests, the three benchmarks, a summary LAST.
#
#   bash benchmarks/gpu_suite.sh            # the device tool sets $OUT; elsewhere it defaults to results/suite
#
# Every step runs under `timeout`, cut to what is left of SUITE_BUDGET (seconds, default 460); a failing step
# never stops the next. The benchmarks write each row as it is measured, so a killed step keeps its rows.
# Steps: GPU tests, the kernels' block-config sweep (tune_attention), attention, fine-tuning, decoding, packing, the
# transformers drop-in against PEFT.
# $OUT gets at most 8 files: summary.md, suite.log, <bench>-<device>.json x3, tune_attention-<device>.json and
# results.tar.gz (PNGs, JSONs, per-step logs). Bring them home with: tar -xzf results.tar.gz -C benchmarks/results
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
[[ $PY == */* && $PY != /* ]] && PY=$ROOT/$PY
OUT=${OUT:-$ROOT/benchmarks/results/suite}
BUDGET=${SUITE_BUDGET:-460}
RESULTS=${RESULTS_DIR:-$ROOT/benchmarks/results}
LOGS=$(mktemp -d)/logs
START=$SECONDS
mkdir -p "$OUT" "$RESULTS" "$LOGS"

# A step's timeout: its own cap, or what is left of the budget after a reserve for the summary, whichever is less.
cap() {
  local left=$((BUDGET - (SECONDS - START) - 25))
  if ((left < $1)); then echo $((left > 15 ? left : 15)); else echo "$1"; fi
}

# The --budget a benchmark gets inside a timeout of $1 seconds: time to plot and exit before the kill.
inner() { echo $(($1 > 50 ? $1 - 25 : $1 / 2)); }

# step NAME SECONDS CMD...: run under timeout, log to $LOGS/NAME.log, report rc and elapsed time.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: timeout ${limit}s, t=$((SECONDS - START))s ==="
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]} note=""
  ((rc == 124 || rc == 137)) && note=" (timed out)"
  echo "=== $name: rc=$rc$note, t=$((SECONDS - START))s ==="
  printf '%-10s rc=%s%s, done at t=%ss\n' "$name" "$rc" "$note" "$((SECONDS - START))" >>"$LOGS/steps.txt"
}

# kernels/ must import as llama_adapter.kernels: an editable install maps it (setup.py package_dir); where pip
# cannot, a symlink inside this (throw-away) copy of the tree does, removed again on exit.
install() {
  if (cd /tmp && "$PY" -c "import llama_adapter.kernels" 2>/dev/null); then
    echo "installed already: $(cd /tmp && "$PY" -c "import llama_adapter; print(llama_adapter.__file__)")"
  elif "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . &&
    (cd /tmp && "$PY" -c "import llama_adapter.kernels"); then
    echo "installed: pip editable"
  elif [ ! -e llama_adapter/kernels ]; then
    ln -s ../kernels llama_adapter/kernels
    trap 'rm -f "$ROOT/llama_adapter/kernels"' EXIT
    echo "installed: symlink llama_adapter/kernels -> ../kernels"
  fi
  "$PY" -c "import llama_adapter.kernels, llama_adapter.ops; print('llama_adapter.ops imports')"
}

main() {
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  install

  local timeout_flag=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 60)
  step pytest "$(cap 80)" "$PY" -m pytest -m gpu -q -rfE --durations=5 -p no:cacheprovider "${timeout_flag[@]}"

  # without CUDA (a dry run of this script) every benchmark falls back to its tiny CPU sizes
  local quick=()
  "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && quick=(--quick)
  local lim dev
  dev=$("$PY" -c "from benchmarks.common import device_info; print(device_info().slug)")
  # block-config sweep of the fused kernels (forward, dK/dV, dQ timed apart): feeds the autotune tables
  lim=$(cap 60)
  step tune "$lim" "$PY" -m benchmarks.tune_attention --out "$RESULTS/tune_attention-$dev.json" \
    --budget "$(inner "$lim")"
  lim=$(cap 130)
  step attention "$lim" "$PY" -m benchmarks.bench_attention --out "$RESULTS" "${quick[@]}" --budget "$(inner "$lim")"
  lim=$(cap 70)
  step finetune "$lim" "$PY" -m benchmarks.bench_finetune --out "$RESULTS" --budget "$(inner "$lim")"
  lim=$(cap 45)
  step generate "$lim" "$PY" -m benchmarks.bench_generate --out "$RESULTS" --budget "$(inner "$lim")"
  # packed vs padded training step on an Alpaca-like length mix (its JSON travels in results.tar.gz)
  lim=$(cap 35)
  step packing "$lim" "$PY" -m benchmarks.bench_packing --out "$RESULTS" --budget "$(inner "$lim")"
  # transformers drop-in vs PEFT AdaptionPrompt: train step + prefill, 7B-shaped 4 layers, B8 N512 bf16
  lim=$(cap 50)
  step hf "$lim" "$PY" -m benchmarks.bench_hf --out "$RESULTS" --budget "$(inner "$lim")"

  local jsons=()
  for bench in attention finetune generate; do
    [ -f "$RESULTS/$bench-$dev.json" ] && jsons+=("$RESULTS/$bench-$dev.json")
  done
  if ((${#jsons[@]})); then
    timeout 60 "$PY" -m benchmarks.plot "${jsons[@]}" >"$LOGS/plot.log" 2>&1 || echo "plot failed: see plot.log"
    timeout 30 "$PY" -m benchmarks.plot --summary-only "${jsons[@]}" >"$OUT/summary.md" 2>>"$LOGS/plot.log"
    cp "${jsons[@]}" "$OUT/"
    [ -f "$RESULTS/tune_attention-$dev.json" ] && cp "$RESULTS/tune_attention-$dev.json" "$OUT/"
  else
    echo "no results were written" >"$OUT/summary.md"
  fi
  local files=()
  for f in "$RESULTS"/*-"$dev".json "$RESULTS"/*-"$dev"-*.png "$RESULTS"/*-"$dev".png; do files+=("${f##*/}"); done
  tar -czf "$OUT/results.tar.gz" -C "$RESULTS" "${files[@]}" -C "${LOGS%/logs}" logs
  echo "=== done in $((SECONDS - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  echo
  cat "$LOGS/steps.txt"
  echo
  cat "$OUT/summary.md"
}

main 2>&1 | tee "$OUT/suite.log"
