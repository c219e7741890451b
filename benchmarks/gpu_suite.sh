#!/usr/bin/env bash
# One call on a lent GPU, under 8 minutes on an H100, ordered so that a first run cut short still answers the
# headline question:
#
#   1. install, then the headline comparison at once: fused, fused_noprompt, sdpa_adapter; fwd and bwd; bf16,
#      D=128, Ka=10; N = 4096, 1024, 16384 (each row on disk as it is measured; the autotune config that won
#      for each shape is printed, TRITON_PRINT_AUTOTUNING)
#   2. one bf16 numerics test on the GPU (the fused op against float64, FlashAttention's rule)
#   3. fine-tuning, then decoding
#   4. the rest: all GPU tests, the block-config sweep, the full attention sweep, packing, the transformers drop-in
#   5. plots and summary.md, inside the budget (a reserve kept for them), printed last
#
#   bash benchmarks/gpu_suite.sh            # the device tool sets $OUT; elsewhere it defaults to results/suite-<time>
#   ALLOW_CPU=1 SUITE_BUDGET=120 bash benchmarks/gpu_suite.sh    # dry run of the ordering on a CPU, tiny sizes
#
# Without CUDA it stops at once (exit 2) unless ALLOW_CPU=1. Every step runs under `timeout`, cut to what is left
# of SUITE_BUDGET (seconds, default 460) after the plot reserve; a failing step never stops the next. Results go to
# a fresh folder per run (benchmarks/results/run-<UTC time>, or RESULTS_DIR if it does not exist yet): no earlier
# result file is ever overwritten. $OUT gets summary.md, suite.log, the headline, attention, finetune and generate
# JSONs, tune_attention-<device>.json and results.tar.gz (PNGs, JSONs, per-step logs). Bring them home with:
# tar -xzf results.tar.gz -C benchmarks/results
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
[[ $PY == */* && $PY != /* ]] && PY=$ROOT/$PY
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/benchmarks/results/suite-$STAMP}
BUDGET=${SUITE_BUDGET:-460}
RESERVE=45 # seconds kept for plots, summary and the tarball at the end
RESULTS=${RESULTS_DIR:-$ROOT/benchmarks/results/run-$STAMP}
if [ -e "$RESULTS" ]; then
  echo "results folder $RESULTS exists already: refusing to overwrite earlier results" >&2
  exit 3
fi
LOGS=$(mktemp -d)/logs
START=$SECONDS
mkdir -p "$OUT" "$RESULTS" "$LOGS"

# A step's timeout: its own cap, or what is left of the budget after the reserve, whichever is less; 0 (the step
# is skipped) when under 15 s are left.
cap() {
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  if ((left < 15)); then echo 0; elif ((left < $1)); then echo "$left"; else echo "$1"; fi
}

# The --budget a benchmark gets inside a timeout of $1 seconds: time to write and exit before the kill.
inner() { echo $(($1 > 50 ? $1 - 25 : $1 / 2)); }

# step NAME SECONDS CMD...: run under timeout, log to $LOGS/NAME.log, report rc and elapsed time.
step() {
  local name=$1 limit=$2
  shift 2
  if ((limit <= 0)); then
    echo "=== $name: skipped, the budget is spent, t=$((SECONDS - START))s ==="
    printf '%-10s skipped (budget), at t=%ss\n' "$name" "$((SECONDS - START))" >>"$LOGS/steps.txt"
    return
  fi
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
  local sizes=() quick=()
  if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    quick=(--quick)
  elif [ "${ALLOW_CPU:-0}" = 1 ]; then
    echo "no CUDA: dry run on the CPU (ALLOW_CPU=1), tiny fp32 sizes"
    sizes=(--dtypes fp32 --head-dims 16 --seqlens 32,16 --tokens 32 --hidden 32 --rep-ms 1 --warmup-ms 0)
  else
    echo "no CUDA device: nothing here can be measured; stopping (ALLOW_CPU=1 for a dry run)" >&2
    return 2
  fi
  install
  local lim dev
  dev=$("$PY" -c "from benchmarks.common import device_info; print(device_info().slug)")

  # 1. the headline, first: what a cut-short run must still answer
  lim=$(cap 150)
  local headline=(--providers fused,fused_noprompt,sdpa_adapter --modes fwd,bwd --dtypes bf16 --head-dims 128
    --ka 10 --seqlens 4096,1024,16384)
  ((${#sizes[@]})) && headline=(--providers fused,fused_noprompt,sdpa_adapter --modes fwd,bwd --ka 10 "${sizes[@]}")
  mkdir -p "$RESULTS/headline"
  step headline "$lim" "$PY" -m benchmarks.bench_attention --out "$RESULTS/headline" "${headline[@]}" \
    --print-autotune --no-plot --budget "$(inner "$lim")"

  # 2. one bf16 numerics test of the fused op on the GPU (float64 reference, FlashAttention's rule)
  local timeout_flag=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 60)
  step numerics "$(cap 60)" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider "${timeout_flag[@]}" \
    "tests/test_kernels.py::test_bf16_large_shapes_on_gpu[True]"

  # 3. fine-tuning and decoding
  lim=$(cap 70)
  step finetune "$lim" "$PY" -m benchmarks.bench_finetune --out "$RESULTS" --no-plot --budget "$(inner "$lim")"
  lim=$(cap 45)
  step generate "$lim" "$PY" -m benchmarks.bench_generate --out "$RESULTS" --no-plot --budget "$(inner "$lim")"

  # 4. the rest
  step pytest "$(cap 80)" "$PY" -m pytest -m gpu -q -rfE --durations=5 -p no:cacheprovider "${timeout_flag[@]}"
  # block-config sweep of the fused kernels (forward, dK/dV, dQ timed apart): feeds the autotune tables
  lim=$(cap 60)
  step tune "$lim" "$PY" -m benchmarks.tune_attention --out "$RESULTS/tune_attention-$dev.json" \
    --budget "$(inner "$lim")"
  lim=$(cap 100)
  step attention "$lim" "$PY" -m benchmarks.bench_attention --out "$RESULTS" "${quick[@]}" "${sizes[@]}" \
    --print-autotune --no-plot --budget "$(inner "$lim")"
  # packed vs padded training step on an Alpaca-like length mix (its JSON travels in results.tar.gz)
  lim=$(cap 35)
  step packing "$lim" "$PY" -m benchmarks.bench_packing --out "$RESULTS" --no-plot --budget "$(inner "$lim")"
  # transformers drop-in vs PEFT AdaptionPrompt: train step + prefill, 7B-shaped 4 layers, B8 N512 bf16
  lim=$(cap 50)
  step hf "$lim" "$PY" -m benchmarks.bench_hf --out "$RESULTS" --no-plot --budget "$(inner "$lim")"

  # 5. plots and the summary, in the reserve
  local jsons=() headline_json="$RESULTS/headline/attention-$dev.json"
  [ -f "$headline_json" ] && cp "$headline_json" "$OUT/headline-attention-$dev.json"
  for bench in attention finetune generate; do
    [ -f "$RESULTS/$bench-$dev.json" ] && jsons+=("$RESULTS/$bench-$dev.json")
  done
  local summary_inputs=("${jsons[@]}")
  ((${#summary_inputs[@]})) || { [ -f "$headline_json" ] && summary_inputs=("$headline_json"); }
  if ((${#summary_inputs[@]})); then
    # the summary table first (it is printed last, and is what a cut run must keep), then the PNGs
    local left=$((BUDGET - (SECONDS - START) - 5))
    ((left < 20)) && left=20
    timeout $((left / 3)) "$PY" -m benchmarks.plot --summary-only "${summary_inputs[@]}" \
      >"$OUT/summary.md" 2>"$LOGS/plot.log"
    left=$((BUDGET - (SECONDS - START) - 5))
    timeout $((left > 10 ? left : 10)) "$PY" -m benchmarks.plot "${summary_inputs[@]}" >>"$LOGS/plot.log" 2>&1 ||
      echo "plot failed or cut: see plot.log"
    ((${#jsons[@]})) && cp "${jsons[@]}" "$OUT/"
    [ -f "$RESULTS/tune_attention-$dev.json" ] && cp "$RESULTS/tune_attention-$dev.json" "$OUT/"
  else
    echo "no results were written" >"$OUT/summary.md"
  fi
  local files=()
  for f in "$RESULTS"/*.json "$RESULTS"/*.png "$RESULTS"/headline/*; do files+=("${f#"$RESULTS"/}"); done
  tar -czf "$OUT/results.tar.gz" -C "$RESULTS" "${files[@]}" -C "${LOGS%/logs}" logs
  echo "=== done in $((SECONDS - START))s; results in $RESULTS; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  echo
  cat "$LOGS/steps.txt"
  echo
  cat "$OUT/summary.md"
}

main 2>&1 | tee "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
