#!/usr/bin/env bash
# Two real training processes on one CPU machine (gloo backend), e.g. to check data-parallel code without GPUs.
#   launch/cpu_2proc.sh train/train_sdd.py --config configs/sdd/tiny.yaml output_dir=outputs/tiny-2proc
# `accelerate launch --cpu --num_processes 2` and `distributed_type: MULTI_CPU` silently run ONE process;
# these flags really give two. One thread per process, or two processes thrash two cores.
set -euo pipefail
NPROC=${NPROC:-2}
PORT=${PORT:-$((29500 + RANDOM % 1000))}
export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
  --dynamo_backend no --main_process_port "$PORT" "$@"
