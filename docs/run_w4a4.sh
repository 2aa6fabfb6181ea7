#!/usr/bin/env bash
# The published W4/A4 pipeline for one of the paper's models on real COCO.
#
#   docs/run_w4a4.sh --model mask-rcnn-swin-t --checkpoint mask_rcnn_swin_tiny_patch4_window7.pth \
#                    --data /data/coco [--run runs/swin-t-w4a4] [--device cuda]
#
# --data is a COCO 2017 folder (annotations/instances_{train,val}2017.json,
# train2017/, val2017/). Every stage is cached in the run folder and resumable:
# rerun the script after an interruption and it continues where it stopped.
# Settings come from the published 4-bit preset (--quant-config 4bit, method.md §8).
#
# Several GPUs: APHQ="torchrun --standalone --nproc_per_node 4 -m aphq_cli" docs/run_w4a4.sh ...
# (evaluation, APH estimates and reconstruction caches then run data-parallel;
# docs/distributed.md). Run folders are passed with -r, which torchrun leaves alone.
set -euo pipefail
model=mask-rcnn-swin-t; checkpoint=; data=; run=; device=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2;;
    --checkpoint) checkpoint=$2; shift 2;;
    --data) data=$2; shift 2;;
    --run) run=$2; shift 2;;
    --device) device=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
[ -n "$checkpoint" ] && [ -n "$data" ] || { echo "usage: $0 --checkpoint PATH --data DIR [--model NAME] [--run DIR] [--device cuda]" >&2; exit 2; }
run=${run:-runs/$model-w4a4}
read -r -a aphq <<< "${APHQ:-aphq}"
common=(--model "$model" --checkpoint "$checkpoint" --data "$data" --device "$device")
mkdir -p "$run"

"${aphq[@]}" eval "${common[@]}" --json "$run/fp.json"
"${aphq[@]}" mlp-recon "${common[@]}" -r "$run" -q 4bit          # 256 images x 20000 iterations per block
"${aphq[@]}" eval -r "$run" --stage mlp-recon --device "$device" --json "$run/mlp_recon.json"
"${aphq[@]}" calibrate "${common[@]}" -r "$run" -q 4bit         # W4/A4, 1 calibration image, as published
"${aphq[@]}" reconstruct -r "$run" -q 4bit --device "$device"   # aph, 256 images x 20000 iterations per unit
"${aphq[@]}" eval -r "$run" --device "$device" --json "$run/w4a4.json"
"${aphq[@]}" export -r "$run" --out "$run/w4a4-export.safetensors"
"${aphq[@]}" eval --artifact "$run/w4a4-export.safetensors" --device "$device" --json "$run/export.json"
"${aphq[@]}" report -r "$run"
