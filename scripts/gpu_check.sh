#!/usr/bin/env bash
# The testbed chain on a GPU, compared with the same chain on the CPU (issue #20).
#
# For a GPU machine that has Python with torch and torchvision and no package
# registry: the other packages come as wheels carried in WHEELS (default
# ./wheels; README "GPUs" says how to download them). Nothing is compiled.
# Runs float eval, calibrate, a short aph reconstruct, eval, export and eval
# of the export, on cuda and on cpu from the same run settings; with two or
# more GPUs also the torchrun (NCCL) eval. Prints a table, and exits non-zero
# when any AP differs from the CPU's by more than 0.1.
#
#     scripts/gpu_check.sh [WHEELS] [IMAGES]     # IMAGES: val images evaluated (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-wheels}
images=${2:-50}
PY=${PYTHON:-python3}
work=${APHQ_GPU_CHECK_DIR:-$(mktemp -d)}
site=$work/site
mkdir -p "$site"
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export APHQ_CACHE=$work/cache
aphq() { "$PY" -m aphq_cli "$@"; }
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no GPU"
print(f"gpu_check: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF

short=(--iters 20 --images 4)
for dev in cuda cpu; do
  run=$work/run-$dev
  echo "gpu_check: chain on $dev" >&2
  aphq eval --device "$dev" --limit "$images" --json "$work/$dev-fp.json" >/dev/null
  aphq calibrate --run "$run" --device "$dev" >/dev/null
  aphq eval --run "$run" --device "$dev" --limit "$images" --json "$work/$dev-calibrate.json" >/dev/null
  aphq reconstruct --run "$run" --loss aph "${short[@]}" --device "$dev" >/dev/null
  aphq eval --run "$run" --device "$dev" --limit "$images" --json "$work/$dev-reconstruct.json" >/dev/null
  aphq export --run "$run" --out "$work/$dev-export.safetensors" >/dev/null
  aphq eval --artifact "$work/$dev-export.safetensors" --device "$dev" --limit "$images" \
    --json "$work/$dev-export.json" >/dev/null
done
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
  echo "gpu_check: torchrun eval on $gpus GPUs (NCCL)" >&2
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m aphq_cli eval -r "$work/run-cuda" \
    --device cuda --limit "$images" --json "$work/cuda-torchrun.json" >/dev/null
fi

"$PY" - "$work" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
worst = 0.0
print(f"{'step':<12} {'metric':<8} {'cpu':>6} {'cuda':>6} {'diff':>6}")
for step in ("fp", "calibrate", "reconstruct", "export", "torchrun"):
    cuda = work / f"cuda-{step}.json"
    cpu = work / f"cpu-{'reconstruct' if step == 'torchrun' else step}.json"
    if not cuda.is_file():
        continue
    a, b = json.loads(cpu.read_text()), json.loads(cuda.read_text())
    for metric in ("bbox_AP", "segm_AP"):
        diff = b[metric] - a[metric]
        worst = max(worst, abs(diff))
        print(f"{step:<12} {metric:<8} {a[metric]:6.1f} {b[metric]:6.1f} {diff:+6.1f}")
print(f"largest difference {worst:.1f} AP: {'ok' if worst <= 0.1 else 'more than 0.1'}")
sys.exit(0 if worst <= 0.1 else 1)
EOF
