#!/usr/bin/env bash
# Every number of the README's "Attacks" section in one call (ShapesWorld, red; 2 CPU cores: several hours, most of
# it prompt search where it fails; an interrupted call continues: each step skips what is on disk).
#   scripts/attacks_shapes.sh            # everything
#   SEEDS="0" scripts/attacks_shapes.sh  # one training seed
# Results: outputs/attacks-shapes/<model>/<attack>/attack.json, outputs/attacks-shapes/bench-*/bench.json, and the
# tables printed by scripts/attacks_table.py (run at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-outputs/attacks-shapes}
SEEDS=${SEEDS:-"0 1 2"}
export WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p "$OUT"

train() {  # config, output folder, seed
  if [ ! -f "$2/pipeline/model_index.json" ]; then
    if [ -d "$2/checkpoints" ]; then resume="--resume"; else resume=""; fi
    "$BIN/python" train/train_sdd.py --config "$1" output_dir="$2" train.seed="$3" $resume
  fi
}
attack() {  # model folder or name, label, attack, extra settings...
  local model=$1 label=$2 name=$3; shift 3
  if [ ! -f "$OUT/$label/$name/attack.json" ]; then
    "$BIN/sdd-attack" --model "$model" --concept red --attack "$name" --out "$OUT/$label/$name" cache="$OUT/cache" "$@"
  fi
}
bench() {  # output folder, guidance, models...
  local out=$1 guidance=$2; shift 2
  if [ ! -f "$out/bench.json" ]; then
    "$BIN/sdd-shapes" bench "$@" --concept red --seed 10000 --n 192 --n-retention 384 --guidance "$guidance" \
      --out "$out" --quiet
  fi
}

# the models: shapes_red_keep.yaml's (SDD + preservation, the quick start's config when measured) and robust SDD, per training seed
models=()
for seed in $SEEDS; do
  train configs/sdd/shapes_red_keep.yaml "$OUT/models/keep-s$seed" "$seed"
  train configs/sdd/shapes_red_robust.yaml "$OUT/models/robust-s$seed" "$seed"
  models+=("keep-s$seed=$OUT/models/keep-s$seed" "robust-s$seed=$OUT/models/robust-s$seed")
done

# every attack at its default budget on the base model (it must break a model that was never erased) ...
for name in concept-inversion prompt-search ring-a-bell relearn; do attack shapes base "$name"; done
# ... and on each erased model
for spec in "${models[@]}"; do
  label=${spec%%=*}; model=${spec#*=}
  for name in concept-inversion prompt-search ring-a-bell relearn; do attack "$model" "$label" "$name"; done
done

# the plain benchmark on held-out seeds, at the benchmark's CFG 5 and at CFG 10 and 15 (what users choose)
args=(--model base=shapes)
for spec in "${models[@]}"; do args+=(--model "${spec%%=*}=${spec#*=}/pipeline"); done
for guidance in 5 10 15; do bench "$OUT/bench-cfg$guidance" "$guidance" "${args[@]}"; done

"$BIN/python" scripts/attacks_table.py "$OUT"
