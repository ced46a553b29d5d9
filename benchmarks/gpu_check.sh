#!/usr/bin/env bash
# One GPU check on one H200, within a deadline (GPU_CHECK_BUDGET, 480 s): makes its own data (no downloads), writes
# under $OUT (else a temporary folder), prints a summary table at the end. Runs so far (H200, section times in
# docs/benchmarks.md, "The GPU check"): benchmarks/results/gpu_check_2026-12-04 (eager and checkpointed steps; the
# compiled ones ran out of time) and gpu_check_2026-12-04_run2 (compiled steps: MASS compiles in 137 s, nnU-Net in
# 84 s; compiled fine-tuning 69 s and 92 s). Since run 2 the compiled step writes the weights that fine-tuning
# starts from (no separate 1-step pretraining) and fine-tuning uses the same batch as the step, so that nnU-Net's
# compiled network comes from inductor's cache; eager sections only with GPU_CHECK_EAGER=1.
#
#   bash benchmarks/gpu_check.sh                         # on the GPU machine, from the repository root
#   GPU_CHECK_EAGER=1 GPU_CHECK_BUDGET=720 bash benchmarks/gpu_check.sh   # also the eager sections
#   GPU_CHECK_TINY=1 GPU_CHECK_DEVICE=cpu GPU_CHECK_COMPILE=0 bash benchmarks/gpu_check.sh   # CPU dry run, tiny sizes
#
# 1. data: the labelled CT phantom Dataset732 (6 cases: nnU-Net's 5 folds) at the default size (96×128×128, 1.5 mm;
#    GPU_CHECK_PHANTOM=full for 512×512×200), planned with the default ResEnc M plans (full width, 32 base features),
#    proposed (supervoxels: proposals know nothing of the labels, so the labelled set pretrains too), and a derived
#    plans file nnUNetResEncUNetMPlans_p<PATCH> with the patch forced to PATCH³ (128³; same preprocessed data) and
#    batch 2;
# 2. P1/P3/P5: benchmarks/pretrain_step.py, MASS pretraining step (bf16 autocast) against nnU-Net's own supervised
#    step on the same plans, with torch.compile on both sides (the warm-up row holds the compilation);
# 3. loader throughput: the pretraining sampler with 12 DataLoader workers, samples per second;
# 4. P2: benchmarks/finetune_iteration.py, in-context head fine-tuning under nnU-Net's AMP and compile, from the
#    weights of 2.;
# 5. with GPU_CHECK_EAGER=1: P1/P3/P5 eager, eager with pageable batches, eager with --activation-checkpointing.
# Environment: GPU_CHECK_TINY=1 (small phantom, patch 32³, few steps, 2 workers), GPU_CHECK_DEVICE (cuda),
# GPU_CHECK_WORKERS (12), GPU_CHECK_COMPILE=0 (no torch.compile: 2. runs eager and 4. without nnUNet_compile;
# mass pretrain ignores --compile on CPU, as nnU-Net), GPU_CHECK_EAGER=1, GPU_CHECK_PROFILE=N (only the data and
# one eager pretrain_step.py run with N profiled steps per side), PYTHON (python), GPU_CHECK_STEP_TIMEOUT (seconds
# per section, 150; compiled sections get 150 more), GPU_CHECK_BUDGET (seconds for the whole script, 480). A
# failing, timed-out or skipped section is logged and the script goes on with the next one (each section's output
# stays in its own file); the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORKERS=${GPU_CHECK_WORKERS:-$([[ -n "${GPU_CHECK_TINY:-}" ]] && echo 2 || echo 12)}
COMPILE=${GPU_CHECK_COMPILE:-1}
PROFILE=${GPU_CHECK_PROFILE:-}
BUDGET=${GPU_CHECK_BUDGET:-480}
ROOT=${OUT:-$(mktemp -d /tmp/mass_gpu_check.XXXXXX)}/gpu_check
mkdir -p "$ROOT"
export nnUNet_raw=$ROOT/raw nnUNet_preprocessed=$ROOT/preprocessed nnUNet_results=$ROOT/results
export nnUNet_n_proc_DA=$WORKERS MPLBACKEND=Agg
if [[ -n "${GPU_CHECK_TINY:-}" ]]; then
  SIZE=small; PATCH=32; STEPS=2; WARMUP=1; ITERS=2; ROUNDS=1; BATCHES=4; NP=2; LOADER_WORKERS=2
else
  SIZE=${GPU_CHECK_PHANTOM:-default}; PATCH=128; STEPS=10; WARMUP=3; ITERS=10; ROUNDS=3; BATCHES=40; NP=8
  LOADER_WORKERS=$WORKERS
fi
D=732
PLANS=nnUNetResEncUNetMPlans
DERIVED=${PLANS}_p${PATCH}
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-150}
log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - start ))s] $*"; }
failed=0
check() {  # check NAME COMMAND...: a section limited to STEP_TIMEOUT and to what is left of BUDGET; a failure is
  local name=$1; shift  # logged and counted, never stops the script
  local left=$(( BUDGET - ($(date +%s) - start) ))
  local limit=$(( STEP_TIMEOUT < left ? STEP_TIMEOUT : left ))
  if (( limit < 20 )); then
    failed=$((failed + 1)); log "SKIPPED ($name): ${left}s of the ${BUDGET}s budget left"; return 0
  fi
  timeout "$limit" "$@"
  local rc=$?
  if [[ $rc != 0 ]]; then
    failed=$((failed + 1)); log "FAILED ($name): exit $rc$([[ $rc == 124 ]] && echo ", timed out after ${limit}s")"
  fi
  return 0
}
step() {  # step MODE [pretrain_step.py options]: P1/P3/P5 into pretrain_step_MODE.txt
  local mode=$1; shift
  check "step-$mode" $PY benchmarks/pretrain_step.py -d "$D" -p "$DERIVED" -device "$DEVICE" --batch-size 2 \
      --steps "$STEPS" --warmup "$WARMUP" -np "$WORKERS" "$@" > >(tee "$ROOT/pretrain_step_$mode.txt")
}
start=$(date +%s)

log "data: phantom $D ($SIZE) into $nnUNet_raw"
check data $PY - "$SIZE" "$D" <<'EOF'
import sys
from mass_nnu.demo_data.phantom import phantom_geometry, write_phantom_dataset
from mass_nnu.workspace import configure_environment
configure_environment(quiet=True)
shape, spacing = phantom_geometry(sys.argv[1])
write_phantom_dataset(int(sys.argv[2]), "GpuCheck", 6, 0, shape=shape, spacing=spacing, seed=2, force=True,
                      slabs=sys.argv[1] == "full")
EOF
log "plan (default ResEnc M, full width) and propose"
check plan $PY -m mass_nnu plan -d "$D" -np "$NP" > "$ROOT/plan.txt"
check propose $PY -m mass_nnu propose -d "$D" -np "$NP" > "$ROOT/propose.txt"
check derived-plans $PY - "$PLANS" "$DERIVED" "$PATCH" "$D" <<'EOF'
import json, sys
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.workspace import configure_environment
configure_environment(quiet=True)
source, derived, patch = sys.argv[1], sys.argv[2], int(sys.argv[3])
dataset = Dataset.resolve(sys.argv[4])
plans = dataset.plans(source)
plans["plans_name"] = derived
configuration = plans["configurations"]["3d_fullres"]
configuration["patch_size"] = [patch] * 3  # same data_identifier: same data
configuration["batch_size"] = 2  # pretrain_step.py's: fine-tuning then reuses nnU-Net's compiled network
path = dataset.plans_file(derived)
path.write_text(json.dumps(plans, indent=2))
print(f"{path}: patch {[patch] * 3}, batch 2")
EOF

if [[ -n "$PROFILE" ]]; then
  log "profile: $PROFILE eager steps of each side under torch.profiler"
  step profile --profile "$PROFILE" --profile-rows 30
  log "done (GPU_CHECK_PROFILE: the other sections are skipped)"
  exit $(( failed > 0 ))
fi

if [[ "$COMPILE" != 0 ]]; then
  log "P1/P3/P5 torch.compile (both sides); the MASS side's weights go to $ROOT/pretrained"
  STEP_TIMEOUT=$(( STEP_TIMEOUT + 150 )) step compile --compile --export "$ROOT/pretrained"
  MODES="compile"
else
  log "P1/P3/P5 eager (bf16 autocast on cuda); the MASS side's weights go to $ROOT/pretrained"
  step eager --export "$ROOT/pretrained"
  MODES="eager"
fi

log "loader throughput, $LOADER_WORKERS workers"
check loader $PY benchmarks/loader_throughput.py -d "$D" -p "$DERIVED" --patch 0 -np "$LOADER_WORKERS" \
    --batches "$BATCHES" $([[ $DEVICE == cuda ]] && echo --pin) > >(tee "$ROOT/loader.txt")

log "P2: fine-tuning iterations (nnU-Net's AMP, nnUNet_compile unless GPU_CHECK_COMPILE=0), in-context head"
STEP_TIMEOUT=$(( STEP_TIMEOUT + 150 )) check finetune env nnUNet_compile=$([[ $COMPILE != 0 ]] && echo true || echo false) \
    $PY benchmarks/finetune_iteration.py -d "$D" -p "$DERIVED" -w "$ROOT/pretrained" --heads incontext \
    --iterations "$ITERS" --rounds "$ROUNDS" -device "$DEVICE" > >(tee "$ROOT/finetune_iteration.txt")

if [[ -n "${GPU_CHECK_EAGER:-}" ]]; then
  if [[ "$COMPILE" != 0 ]]; then
    log "P1/P3/P5 eager (bf16 autocast on cuda)"
    step eager
    MODES="$MODES eager"
  fi
  log "P1/P3/P5 eager, pageable batches (mass pretrain pins them)"
  step eager-pageable --no-pin
  log "P1/P3/P5 eager with --activation-checkpointing (the reference's encoder pass recomputed in backward)"
  step checkpointing --activation-checkpointing
  MODES="$MODES eager-pageable checkpointing"
fi

log "summary (all outputs in $ROOT)"
{
  echo "| check | figure |"
  echo "| --- | --- |"
  for mode in $MODES; do
    f=$ROOT/pretrain_step_$mode.txt
    if ! grep -q '^P1 ' "$f" 2>/dev/null; then
      echo "| pretrain step ($mode) | not finished: $(grep -E '^(mass|nnunet): ' "$f" 2>/dev/null | tr '\n' ' ') |"
      continue
    fi
    echo "| pretrain step ($mode): $(grep '^device' "$f") | $(grep -E '^(P1|P3|P5) ' "$f" | awk '{printf "%s %s (%s %s, %s); ", $1, $2, $3, $4, $5}') |"
    echo "| step time s, MASS / nnU-Net ($mode) | $(grep '^step time' "$f" | awk '{print $(NF-1)" / "$NF}') |"
    echo "| peak memory MiB, MASS / nnU-Net ($mode) | $(grep '^peak memory' "$f" | awk '{print $(NF-1)" / "$NF}') |"
    echo "| warm-up s, MASS / nnU-Net ($mode) | $(grep '^warm-up' "$f" | awk '{print $4" / "$5}') |"
  done
  grep -s -E '^P2|warm-up' "$ROOT/finetune_iteration.txt" | sed 's/^/| fine-tuning | /; s/$/ |/'
  sed 's/^/| /; s/$/ | |/' "$ROOT/loader.txt" 2>/dev/null
  echo "| wall time | $(( $(date +%s) - start )) s |"
  echo "| failed or skipped sections | $failed |"
} | tee "$ROOT/summary.md"
exit $(( failed > 0 ))
