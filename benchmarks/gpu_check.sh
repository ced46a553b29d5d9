#!/usr/bin/env bash
# One GPU check on one H200: makes its own data (no downloads), writes under $OUT (else a temporary folder), prints a
# summary table at the end. First H200 run (2026-12-04, benchmarks/results/gpu_check_2026-12-04): data, plans and
# proposals 104 s, eager steps 55 s, checkpointed 50 s, 1-step pretraining 50 s, loader 20 s; the compiled sections
# take 2-4 min each, so the whole script needs about 12 min, and GPU_CHECK_COMPILE=0 (no compiled sections) about 6.
#
#   bash benchmarks/gpu_check.sh                         # on the GPU machine, from the repository root
#   GPU_CHECK_TINY=1 GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # CPU dry run of every part, tiny sizes
#
# 1. data: the CT phantom pair (Dataset731 unlabelled, 4 cases; Dataset732 labelled, 6 cases: nnU-Net's 5 folds) at the default size
#    (96×128×128, 1.5 mm; GPU_CHECK_PHANTOM=full for 512×512×200), planned with the default ResEnc M plans (full
#    width, 32 base features; 731 takes 732's architecture), proposed (supervoxels), and a derived plans file
#    nnUNetResEncUNetMPlans_p<PATCH> with the patch forced to PATCH³ (128³; same preprocessed data);
# 2. P1/P3/P5: benchmarks/pretrain_step.py, MASS pretraining step (bf16 autocast) against nnU-Net's own supervised
#    step on the same plans, eager, eager with --activation-checkpointing and with torch.compile (both sides);
# 3. P2: benchmarks/finetune_iteration.py, in-context head fine-tuning under nnU-Net's AMP, with nnU-Net's compile;
# 4. loader throughput: the pretraining sampler with 12 DataLoader workers, samples per second.
# Environment: GPU_CHECK_TINY=1 (small phantom, patch 32³, few steps, 2 workers), GPU_CHECK_DEVICE (cuda),
# GPU_CHECK_WORKERS (12), GPU_CHECK_COMPILE=0 (no torch.compile: eager pretraining steps only, fine-tuning without
# nnUNet_compile; on CPU the compiled step compiles for ~5 min), GPU_CHECK_PROFILE=N (only the data and one eager
# pretrain_step.py run with N profiled steps per side: about 3 min), PYTHON (python), GPU_CHECK_STEP_TIMEOUT (seconds
# per timed section, 150). A failing or timed-out section is logged and the script goes on with the next one (each
# section's output stays in its own file); the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORKERS=${GPU_CHECK_WORKERS:-$([[ -n "${GPU_CHECK_TINY:-}" ]] && echo 2 || echo 12)}
COMPILE=${GPU_CHECK_COMPILE:-1}
PROFILE=${GPU_CHECK_PROFILE:-}
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
PLANS=nnUNetResEncUNetMPlans
DERIVED=${PLANS}_p${PATCH}
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-150}
log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - start ))s] $*"; }
failed=0
check() {  # check NAME COMMAND...: run a timed section, log and count its failure, never stop the script
  local name=$1; shift
  timeout "$STEP_TIMEOUT" "$@"
  local rc=$?
  if [[ $rc != 0 ]]; then failed=$((failed + 1)); log "FAILED ($name): exit $rc$([[ $rc == 124 ]] && echo ", timed out after ${STEP_TIMEOUT}s")"; fi
  return 0
}
start=$(date +%s)

log "data: phantom pair ($SIZE) into $nnUNet_raw"
check data $PY - "$SIZE" <<'EOF'
import sys
from mass_nnu.demo_data.phantom import phantom_geometry, write_phantom_dataset
from mass_nnu.workspace import configure_environment
configure_environment(quiet=True)
shape, spacing = phantom_geometry(sys.argv[1])
slabs = sys.argv[1] == "full"
write_phantom_dataset(731, "GpuCheckPre", 4, 0, shape=shape, spacing=spacing, seed=1, labelled=False, force=True,
                      slabs=slabs)
write_phantom_dataset(732, "GpuCheckSeg", 6, 0, shape=shape, spacing=spacing, seed=2, force=True, slabs=slabs)
EOF
log "plan (default ResEnc M, full width) and propose"
if [[ -n "$PROFILE" ]]; then  # the unlabelled set alone (same full-width architecture family, half the planning)
  PLANNED="731"
  check plan-731 $PY -m mass_nnu plan -d 731 -np "$NP" > "$ROOT/plan_731.txt"
else
  PLANNED="731 732"
  check plan-732 $PY -m mass_nnu plan -d 732 -np "$NP" > "$ROOT/plan_732.txt"
  check plan-731 $PY -m mass_nnu plan -d 731 --target-dataset 732 -np "$NP" > "$ROOT/plan_731.txt"
fi
check propose $PY -m mass_nnu propose -d 731 -np "$NP" > "$ROOT/propose.txt"
check derived-plans $PY - "$PLANS" "$DERIVED" "$PATCH" $PLANNED <<'EOF'
import json, sys
from mass_nnu.adapter.datasets import Dataset
from mass_nnu.workspace import configure_environment
configure_environment(quiet=True)
source, derived, patch = sys.argv[1], sys.argv[2], int(sys.argv[3])
for ident in sys.argv[4:]:  # the planned datasets
    dataset = Dataset.resolve(ident)
    plans = dataset.plans(source)
    plans["plans_name"] = derived
    plans["configurations"]["3d_fullres"]["patch_size"] = [patch] * 3  # same data_identifier: same data
    path = dataset.plans_file(derived)
    path.write_text(json.dumps(plans, indent=2))
    print(f"{path}: patch {[patch] * 3}")
EOF

if [[ -n "$PROFILE" ]]; then
  log "profile: $PROFILE eager steps of each side under torch.profiler"
  check profile $PY benchmarks/pretrain_step.py -d 731 -p "$DERIVED" -device "$DEVICE" --batch-size 2 --steps "$STEPS" \
      --warmup "$WARMUP" -np "$WORKERS" --profile "$PROFILE" --profile-rows 30 > >(tee "$ROOT/profile.txt")
  log "done (GPU_CHECK_PROFILE: the other sections are skipped)"
  exit $(( failed > 0 ))
fi

log "P1/P3/P5 eager (bf16 autocast on cuda)"
check step-eager $PY benchmarks/pretrain_step.py -d 731 -p "$DERIVED" -device "$DEVICE" --batch-size 2 --steps "$STEPS" \
    --warmup "$WARMUP" -np "$WORKERS" > >(tee "$ROOT/pretrain_step_eager.txt")
log "P1/P3/P5 eager with --activation-checkpointing (the reference's encoder pass recomputed in backward)"
check step-checkpointing $PY benchmarks/pretrain_step.py -d 731 -p "$DERIVED" -device "$DEVICE" --batch-size 2 --steps "$STEPS" \
    --warmup "$WARMUP" -np "$WORKERS" --activation-checkpointing > >(tee "$ROOT/pretrain_step_checkpointing.txt")

log "P2: fine-tuning iterations (nnU-Net's AMP, nnUNet_compile unless GPU_CHECK_COMPILE=0), in-context head from a 1-step pretraining"
check pretrain-1step $PY -m mass_nnu pretrain -d 731 -p "$DERIVED" --epochs 1 --iters-per-epoch 1 --val-iters 1 --batch-size 1 -np 0 \
    -device "$DEVICE" -o "$ROOT/pretrained" > "$ROOT/pretrain_1step.txt"
STEP_TIMEOUT=$(( STEP_TIMEOUT + 150 )) check finetune env nnUNet_compile=$([[ $COMPILE != 0 ]] && echo true || echo false) $PY benchmarks/finetune_iteration.py \
    -d 732 -p "$DERIVED" -w "$ROOT/pretrained" --heads incontext --iterations "$ITERS" --rounds "$ROUNDS" \
    -device "$DEVICE" > >(tee "$ROOT/finetune_iteration.txt")

log "loader throughput, $LOADER_WORKERS workers"
check loader $PY benchmarks/loader_throughput.py -d 731 -p "$DERIVED" --patch 0 -np "$LOADER_WORKERS" --batches "$BATCHES" \
    $([[ $DEVICE == cuda ]] && echo --pin) > >(tee "$ROOT/loader.txt")

MODES="eager checkpointing"
if [[ "$COMPILE" != 0 ]]; then
  log "P1/P3/P5 torch.compile"
  STEP_TIMEOUT=$(( STEP_TIMEOUT + 150 )) check step-compile $PY benchmarks/pretrain_step.py -d 731 -p "$DERIVED" -device "$DEVICE" --batch-size 2 --steps "$STEPS" \
      --warmup "$WARMUP" -np "$WORKERS" --compile > >(tee "$ROOT/pretrain_step_compile.txt")
  MODES="eager checkpointing compile"
fi

log "summary (all outputs in $ROOT)"
{
  echo "| check | figure |"
  echo "| --- | --- |"
  for mode in $MODES; do
    f=$ROOT/pretrain_step_$mode.txt
    [[ -s $f ]] || { echo "| pretrain step ($mode) | failed |"; continue; }
    echo "| pretrain step ($mode): $(head -1 "$f") | $(grep -E '^(P1|P3|P5) ' "$f" | awk '{printf "%s %s (%s %s, %s); ", $1, $2, $3, $4, $5}') |"
    echo "| step time s, MASS / nnU-Net ($mode) | $(grep '^step time' "$f" | awk '{print $(NF-1)" / "$NF}') |"
    echo "| peak memory MiB, MASS / nnU-Net ($mode) | $(grep '^peak memory' "$f" | awk '{print $(NF-1)" / "$NF}') |"
  done
  grep -s '^P2' "$ROOT/finetune_iteration.txt" | sed 's/^/| fine-tuning | /; s/$/ |/'
  sed 's/^/| /; s/$/ | |/' "$ROOT/loader.txt" 2>/dev/null
  echo "| wall time | $(( $(date +%s) - start )) s |"
  echo "| failed sections | $failed |"
} | tee "$ROOT/summary.md"
exit $(( failed > 0 ))
