#!/usr/bin/env bash
# GPU figures: the kernel benchmarks, one compress run and one adapt run on a CUDA device,
# written to one results folder named after the device.
#
#   benchmarks/gpu.sh [RESULTS_DIR]        default: benchmarks/results/gpu/<device name>
#
# Environment:
#   PYTHON   the interpreter that has torch with CUDA and this package's dependencies
#            (default: .venv/bin/python when it exists, else python3); the package is run from
#            this checkout (PYTHONPATH), so nothing needs installing.
#   MODEL    the model compressed and adapted (default builtin:smollm2-135m; a local directory
#            works where the built-in data packages are not installed).
#   DRY_RUN  1: print the commands, one per line, and run nothing (no GPU needed).
#
# Exit codes: 0 done, 2 no CUDA device (nothing written), else the failing step's own code.
# RESULTS_DIR/summary.md names the device, driver and torch, and each step's wall time and exit
# code; each step's stdout is in RESULTS_DIR/<step>.log and the verbs' reports beside it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
MODEL="${MODEL:-builtin:smollm2-135m}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # real kernels: the interpreter is for CPU tests only

# name and command of each step; $WORK is a scratch folder for checkpoints (not kept)
STEPS=(
  "dictionary_kernel|$PYTHON benchmarks/dictionary_kernel.py --json \$RESULTS/dictionary_kernel.json"
  "dora_speed_r16|$PYTHON benchmarks/dora_speed.py --rank 16"
  "dora_speed_r256|$PYTHON benchmarks/dora_speed.py --rank 256"
  "rank_multiple|$PYTHON benchmarks/rank_multiple.py --device cuda"
  "compress|$PYTHON -m subspace_cli compress $MODEL --method svd-llm --ratio 0.2 --calib builtin:shakespeare --device cuda --out \$WORK/compress --overwrite --json"
  "compress_40|$PYTHON -m subspace_cli compress $MODEL --method svd-llm --ratio 0.4 --calib builtin:shakespeare --device cuda --out \$WORK/compress_40 --overwrite --json"
  "compress_cospadi|$PYTHON -m subspace_cli compress $MODEL --method cospadi --ratio 0.2 --calib builtin:shakespeare --device cuda --out \$WORK/compress_cospadi --overwrite --json"
  "bench|$PYTHON -m subspace_cli bench $MODEL \$WORK/compress \$WORK/compress_40 \$WORK/compress_cospadi --device cuda --rounds 5 --json"
  "adapt|$PYTHON -m subspace_cli adapt $MODEL --method dora --data builtin:kjv --rank 16 --steps 100 --batch-size 8 --seqlen 256 --precision bf16 --device cuda --out \$WORK/adapt --overwrite --json"
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for step in "${STEPS[@]}"; do echo "${step#*|}"; done
  exit 0
fi

if ! DEVICE="$("$PYTHON" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())' 2>/dev/null)"; then
  echo "benchmarks/gpu.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); nothing was run" >&2
  exit 2
fi
SLUG="$(echo "$DEVICE" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')"
RESULTS="${1:-benchmarks/results/gpu/$SLUG}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"

DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || echo unknown)"
TORCH="$("$PYTHON" -c 'import torch, triton; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")' 2>/dev/null || "$PYTHON" -c 'import torch; print(f"torch {torch.__version__}")')"
{
  echo "# GPU figures: $DEVICE"
  echo
  echo "$(date -u +%Y-%m-%d), driver $DRIVER, $TORCH, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo "Command: \`benchmarks/gpu.sh\` (MODEL=$MODEL)."
  echo
  echo "| step | exit | wall s | command |"
  echo "|---|---:|---:|---|"
} > "$RESULTS/summary.md"

failed=0
for step in "${STEPS[@]}"; do
  name="${step%%|*}"
  command="$(eval echo "\"${step#*|}\"")"
  echo "== $name: $command" >&2
  start=$(date +%s%N)
  set +e
  $command > "$RESULTS/$name.log"
  code=$?
  set -e
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '| %s | %d | %d.%d | `%s` |\n' "$name" "$code" $((ms / 1000)) $((ms % 1000 / 100)) "${step#*|}" >> "$RESULTS/summary.md"
  for report in report.json report.md; do  # the verbs' reports, without their checkpoints
    [[ -f "$WORK/$name/$report" ]] && cp "$WORK/$name/$report" "$RESULTS/$name.$report"
  done
  if [[ $code -ne 0 ]]; then failed=$code; echo "== $name failed with exit $code" >&2; fi
done
echo "results: $RESULTS/summary.md" >&2
exit $failed
