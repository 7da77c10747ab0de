#!/usr/bin/env bash
# Regenerates the records in examples/results/gpu-h200/ on a GPU host, from the repository root:
#   DEV=cuda OUT=/tmp/gpu-out bash examples/results/gpu-h200/make.sh
# (DEV=cpu runs the same steps on a CPU-only host, as a dry run.) Each step writes one results
# directory, packed without weights into $OUT/<step>.tar.gz, and its output into $OUT/log.txt.
# Steps run in order of importance and are skipped once the time budget (BUDGET seconds) is spent.
set -u
DEV=${DEV:-cuda}
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${BUDGET:-540}
R=$(mktemp -d)
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import yaml" 2>/dev/null && [ -d .devwheels ]; then  # a bare GPU host: pure wheels carried along
  mkdir -p "$R/site" && for w in .devwheels/*.whl; do python3 -m zipfile -e "$w" "$R/site"; done
  export PYTHONPATH="$PYTHONPATH:$R/site"
fi
devices=$([ "$DEV" = cpu ] && echo cpu || echo "$DEV,cpu")
t0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }

step() {  # step NAME NEEDS_SECONDS harness-args...
  local name=$1 needs=$2; shift 2
  if [ "$(left)" -lt "$needs" ]; then echo "== $name: skipped, $(left) s left of $BUDGET" | tee -a "$LOG"; return; fi
  echo "== $name [$(( $(date +%s) - t0 )) s]: harness $*" | tee -a "$LOG"
  local s=$(date +%s)
  timeout "$(left)" python3 -m harness "$@" >>"$LOG" 2>&1
  echo "== $name: exit $? in $(( $(date +%s) - s )) s" | tee -a "$LOG"
  tar -C "$R" --exclude='*.pt' -czf "$OUT/$name.tar.gz" "$name" 2>/dev/null
}

{ python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'python', sys.version.split()[0])"
  nproc; } >>"$LOG" 2>&1

# 1. The Conv1d example's matrix on this host, with both bands and traces (the evidence the docs show).
step conv-matrix 120 matrix examples/optuna_best_conv --backend local --devices "$devices" \
  --determinism strict,default --tf32 off,on --threads 1 --repeats 2 --band 8 --band-seeds 8 --trace \
  -o "$R/conv-matrix" --json "$R/conv-matrix/report-full.json" --no-progress

# 2. A model without random ops (the MLP with dropout 0) on both devices, traced: where kernels alone part.
mkdir -p "$R/bundles" && cp -r examples/optuna_best examples/data "$R/bundles/"
python3 - "$R/bundles/optuna_best/config.yaml" <<'PY'
import sys, yaml
p = sys.argv[1]; c = yaml.safe_load(open(p)); c["model"]["dropout_rate"] = 0.0; yaml.safe_dump(c, open(p, "w"))
PY
step mlp-nodropout 40 matrix "$R/bundles/optuna_best" --backend local --devices "$devices" --determinism strict \
  --tf32 off --threads 1 --band 0 --band-seeds 0 --trace -o "$R/mlp-nodropout" --no-progress

# 3. The README's main command, as a newcomer on this host runs it (CUDA cells against a CPU-recorded trial).
step readme-main 100 matrix examples/optuna_best_conv --backend local --isa native,baseline --band 4 \
  -o "$R/readme-main" --no-progress

# 4. The CUDA cell and the CPU cell retrained with the band's 8 seeds: the paired test of CUDA's shift.
step conv-pairs 110 matrix examples/optuna_best_conv --backend local --devices "$devices" --determinism strict \
  --tf32 off --threads 1 --band-seeds 8 --cell-seeds 8 -o "$R/conv-pairs" --no-progress

echo "== done in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
