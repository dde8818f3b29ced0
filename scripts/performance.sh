#!/usr/bin/env bash
# The whole speed/memory measurement of PERFORMANCE.md in one call.
#   scripts/performance.sh cpu   # tiny model on this machine: exact switches at B=1 and B=8, two processes
#   scripts/performance.sh gpu   # SD-1.5 architecture (random weights) on one GPU: xattn/full/lora x fp32/bf16;
#                                # SDXL base architecture (random weights, 1024 px): SDD xattn/lora and ESD xattn, bf16
# Results: outputs/perf-<mode>.json (+ the tables on stdout). Stop other work on the machine first.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-cpu}
BIN=${BIN:-.venv/bin}
case "$mode" in
  cpu)
    "$BIN/sdd-bench" --preset tiny --method sdd --batch-sizes 1,8 --iters 20 --warmup 3 --threads 2 \
      --teacher-bf16 --compile --out outputs/perf-cpu-sdd.json
    "$BIN/sdd-bench" --preset tiny --method esd --batch-sizes 1,8 --iters 20 --warmup 3 --threads 2 \
      --switches default --compile --out outputs/perf-cpu-esd.json
    # data parallel: one thread per process, against one process with one thread
    "$BIN/sdd-bench" --preset tiny --method sdd --batch-sizes 8 --iters 20 --warmup 3 --threads 1 \
      --switches default --processes 2 --out outputs/perf-cpu-2proc.json
    ;;
  gpu)
    "$BIN/sdd-bench" --preset sd15 --method sdd --finetune xattn,full,lora --precision fp32,bf16 \
      --batch-sizes 1 --iters 5 --warmup 1 --switches default --out outputs/perf-gpu-sdd.json
    "$BIN/sdd-bench" --preset sd15 --method sdd --finetune xattn --precision bf16 --batch-sizes 1,4 \
      --iters 5 --warmup 1 --teacher-bf16 --compile --out outputs/perf-gpu-sdd-switches.json
    "$BIN/sdd-bench" --preset sd15 --method esd --finetune xattn --precision fp32,bf16 --batch-sizes 1 \
      --iters 5 --warmup 1 --switches default --out outputs/perf-gpu-esd.json
    # SDXL base 1.0's architecture (sdxl-random: 2.57 B UNet, random weights) at its 1024 px (128x128 latents),
    # batch 1, bf16: with and without gradient checkpointing (configs/sdd/nudity_sdxl.yaml's memory plan)
    "$BIN/sdd-bench" --preset sdxl --method sdd --finetune xattn,lora --precision bf16 --batch-sizes 1 \
      --iters 5 --warmup 1 --switches ours,ours+grad-checkpointing --out outputs/perf-gpu-sdxl-sdd.json
    "$BIN/sdd-bench" --preset sdxl --method esd --finetune xattn --precision bf16 --batch-sizes 1 \
      --iters 5 --warmup 1 --switches default --out outputs/perf-gpu-sdxl-esd.json
    ;;
  *) echo "usage: $0 cpu|gpu" >&2; exit 2 ;;
esac
