#!/usr/bin/env bash
# The CPU benchmark runs behind docs/benchmarks.md (issues 14-16), resumable: every finished cell is kept, so
# rerunning a stage continues where it stopped. Validation split only; the test set is scored once, by the stage
# `test`, after every choice is made.
#
#   bash benchmarks/protocol_runs.sh setup            # data, plans, proposals with the rules on (501) and off (521)
#   bash benchmarks/protocol_runs.sh pretrain-on      # 900 steps on 501 (rules on); pretrain-off: on 521
#   bash benchmarks/protocol_runs.sh on-502 [SEEDS]   # mass, scratch, incontext on 502 (also on-503, off-502, off-503)
#   bash benchmarks/protocol_runs.sh random-init-502 [SEEDS]   # the random-init ablation (also random-init-503)
#   bash benchmarks/protocol_runs.sh variant-502 NAME OPTIONS... # a choice on validation, budgets 1 and all, e.g.
#        variant-502 scratch_lr0.03 --methods scratch --method-lr scratch=0.03    (SEEDS=2 for two seeds)
#        variant-502 head_new --methods mass --head new
#   METHOD_LR=... EPOCHS=80 [METHODS=scratch] bash benchmarks/protocol_runs.sh convergence-502 [SEEDS]
#        # mass and scratch (or METHODS), budgets 1 and all, validation and test Dice
#   python benchmarks/convergence.py $BENCH/out/final_502 $BENCH/out/conv_e*_502_* -o docs/convergence_mni.png \
#        --split validation test
#   METHOD_LR="scratch=0.1 mass=0.03 random-init=0.03" bash benchmarks/protocol_runs.sh final-502 [SEEDS]
#        # the final cells at the lr per method chosen on validation: mass, scratch, random-init, incontext in
#        # out/final_502; cells of on_502 (default lr) and of the variants <method>_lr<LR> are reused, the rest run
#   METHOD_LR=... bash benchmarks/protocol_runs.sh test-502   # once, at the end: test Dice of final_502
#   bash benchmarks/protocol_runs.sh collect          # copy tables and cells into benchmarks/results/
#
# Environment: BENCH (workspace, default /work/bench), PYTHON_BIN (the mass-nnu venv's bin folder, default .venv/bin),
# METHOD_LR ("METHOD=LR ...", the learning rates chosen on validation; final, test and convergence stages).
# Rules off uses its own preprocessed and results folders (same raw data), so its fine-tuned models never clash with
# the rules-on ones. One thread per run: two stages side by side use the two cores of the CI-like machine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BIN=${PYTHON_BIN:-$REPO/.venv/bin}
BENCH=${BENCH:-/work/bench}
MRICRON_DEB=${MRICRON_DEB:-}
mkdir -p "$BENCH/logs" "$BENCH/out"
export nnUNet_raw=$BENCH/raw nnUNet_n_proc_DA=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MPLBACKEND=Agg
PLANS=nnUNetResEncUNetMPlans_f8
EPOCHS=${EPOCHS:-20}  # the CPU preset: 20 × 12 = 240 iterations at batch 2
PRESET=(--iters-per-epoch 12 --batch-size 2)
BUDGETS=(--budgets 1 --budgets 2 --budgets all)
weights() { echo "$BENCH/res/Dataset$1_MNIPretrain/MASSPretrainer__${PLANS}__3d_fullres"; }
rules() {  # on | off: the workspace of that pretraining run
  export nnUNet_preprocessed=$BENCH/pp nnUNet_results=$BENCH/res
  if [[ $1 == off ]]; then export nnUNet_preprocessed=$BENCH/pp_off nnUNet_results=$BENCH/res_off; fi
}
bench() {  # NAME RULES DOWNSTREAM [benchmark options...]
  local name=$1 mode=$2 ds=$3; shift 3
  local w; w=$(weights "$([[ $mode == on ]] && echo 501 || echo 521)")
  rules "$mode"
  "$BIN/mass" benchmark -d "$ds" -w "$w" --epochs "$EPOCHS" "${PRESET[@]}" -o "$BENCH/out/$name" "$@" 2>&1 \
    | tee -a "$BENCH/logs/$name.log"
}
LR_FLAGS=() LR_TAG=""
for pair in ${METHOD_LR:-}; do LR_FLAGS+=(--method-lr "$pair"); LR_TAG+="_${pair/=/}"; done
stage=${1:?stage}
case $stage in
  setup)
    rules on
    "$BIN/mass" demo-data --small ${MRICRON_DEB:+--atlas-deb "$MRICRON_DEB"}
    "$BIN/mass" plan -d 501 --target-dataset 502 --base-features 8 -np 2
    "$BIN/mass" propose -d 501 -np 2
    "$BIN/mass" propose -d 501 -np 2 --out-id 521 --no-half-splits --core-depth 0   # the label-shaped rules off
    "$BIN/mass" plan -d 521 --target-dataset 502 --base-features 8 -np 2 ;;
  pretrain-on|pretrain-off)
    id=$([[ $stage == pretrain-on ]] && echo 501 || echo 521)
    rules on  # both pretrained models live in $BENCH/res; only the fine-tuning differs by workspace
    resume=$([[ -f $(weights $id)/fold_all/checkpoint_latest.pth ]] && echo --c || true)
    nnUNet_n_proc_DA=1 "$BIN/mass" pretrain -d $id -p $PLANS --epochs 30 --iters-per-epoch 30 --seed 0 -np 1 $resume \
      2>&1 | tee -a "$BENCH/logs/pretrain_$id.log" ;;
  on-502|on-503|off-502|off-503)
    mode=${stage%-*} ds=${stage#*-}
    methods=(--methods mass --methods incontext)
    [[ $mode == on ]] && methods+=(--methods scratch)  # scratch does not depend on the proposals
    bench "${mode}_$ds" "$mode" "$ds" "${BUDGETS[@]}" --seeds "${2:-2}" "${methods[@]}" ;;
  random-init-502|random-init-503)
    bench "on_${stage#random-init-}" on "${stage#random-init-}" "${BUDGETS[@]}" --seeds "${2:-3}" --methods random-init ;;
  variant-502|variant-503)  # NAME benchmark-options...: one choice to make on validation, budgets 1 and all
    name=${2:?variant name} ds=${stage#variant-}
    shift 2
    bench "variant_${name}_$ds" on "$ds" --budgets 1 --budgets all --seeds "${SEEDS:-1}" "$@" ;;
  convergence-502|convergence-503)  # EPOCHS=80 (960 it.), 167 (2004 it.), ...; 240 it. are the final_<ds> cells
    # validation and test Dice of every run (a curve to report, not a choice: nothing is chosen on these cells)
    # METHODS="scratch" (default "mass scratch"): one method per run, so two runs share the two cores
    ds=${stage#convergence-} methods=() tag=""
    [[ $EPOCHS == 20 ]] && { echo "convergence: set EPOCHS (80, 167, ...); 20 is the preset's final_$ds" >&2; exit 2; }
    for m in ${METHODS:-mass scratch}; do methods+=(--methods "$m"); done
    [[ -n ${METHODS:-} ]] && tag="_${METHODS// /_}"
    bench "conv_e${EPOCHS}_$ds$LR_TAG$tag" on "$ds" --budgets 1 --budgets all --seeds "${2:-1}" "${methods[@]}" \
      "${LR_FLAGS[@]}" --split test ;;
  final-502|final-503|test-502|test-503)
    ds=${stage#*-} split=validation
    [[ $stage == test-* ]] && split=test
    # reuse: cells of on_<ds> for the methods at their default lr, and of the variants <method>_lr<LR> (run with
    # only --methods <method> --method-lr <method>=<LR>) for the methods at the chosen LR; mass benchmark checks
    # every reused cell's settings and stops on a mismatch
    "$BIN/python" - "$BENCH/out" "$ds" "${METHOD_LR:-}" <<'EOF'
import shutil, sys
from pathlib import Path
out, ds, chosen = Path(sys.argv[1]), sys.argv[2], dict(p.split("=") for p in sys.argv[3].split())
dest = out / f"final_{ds}" / "cells"
dest.mkdir(parents=True, exist_ok=True)
sources = [(out / f"on_{ds}", None)] + [(out / f"variant_{m}_lr{lr}_{ds}", m) for m, lr in chosen.items()]
for folder, lr_method in sources:
    for cell in sorted((folder / "cells").glob("*.json")):
        method = cell.name.split("_n")[0]
        if (method == lr_method if lr_method else method not in chosen) and not (dest / cell.name).exists():
            shutil.copy(cell, dest / cell.name)
EOF
    bench "final_$ds" on "$ds" "${BUDGETS[@]}" --seeds "${2:-3}" --methods mass --methods scratch \
      --methods random-init --methods incontext "${LR_FLAGS[@]}" --split $split ;;
  collect)  # the cells so far (finished stages or not) and their tables, rebuilt with this checkout's report
    for run in "$BENCH"/out/*/; do
      name=$(basename "$run") dest=$REPO/benchmarks/results/$name
      mkdir -p "$dest/cells"
      cp "$run"/cells/*.json "$dest/cells/" 2>/dev/null || continue
      "$BIN/python" - "$dest" "$name" <<'EOF'
import json, sys
from pathlib import Path
from mass_nnu.evaluation.report import write_report
dest, name = Path(sys.argv[1]), sys.argv[2]
cells = [json.loads(p.read_text()) for p in sorted((dest / "cells").glob("*.json"))]
split = "test" if cells and all("test" in c.get("dice", {}) for c in cells) else "validation"
write_report(cells, dest, f"{name}: {len(cells)} cells, {split} Dice", split)
EOF
    done ;;
  *) echo "unknown stage '$stage' (see the header of $0)" >&2; exit 2 ;;
esac
