#!/usr/bin/env bash
# Loop #2: memory-proficiency training. Per iteration: curate SFT data from the base model's own
# good memory turns -> train a LoRA memory specialist -> evaluate with the specialist running the
# memory turns and the untouched base model committing actions -> append a ledger row (recipe,
# data size, result), which the next recipe choice reads.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings (each may also come from the environment) ----------------------------------------
ENV_NAME=${ENV_NAME:-crafter}                 # crafter | minihack | nle
TASKS=${TASKS:-}                              # e.g. "MiniHack-Corridor-R3-v0" (minihack)
SEEDS=${SEEDS:-42-51}
SCAFFOLD=${SCAFFOLD:-v0}                      # the scaffold to train for (loop #1's best)
MODEL=${MODEL:-Qwen/Qwen2.5-32B-Instruct}     # base model: HF id or path (trained and evaluated here)
DATA_RUNS=${DATA_RUNS:-}                      # runs to curate from (space-separated); empty: evaluate the base
ITERATIONS=${ITERATIONS:-3}
MAX_STEPS=${MAX_STEPS:-}                      # cap per episode; empty: the game's own limit
CONCURRENCY=${CONCURRENCY:-16}
META_MODEL=${META_MODEL:-gpt-5}               # judge and recipe chooser
META_BASE_URL=${META_BASE_URL:-}              # empty: the heuristic judge and the authors' priors
MIN_EXAMPLES=${MIN_EXAMPLES:-300}
TRAIN_ARGS=${TRAIN_ARGS:-}                    # extra train_lora.py flags, e.g. "--save-every 50"
LAUNCH=${LAUNCH:-}                            # e.g. "accelerate launch" for several GPUs
RUNS=${RUNS:-runs/loop2_${ENV_NAME}}
SFT=${SFT:-sft/loop2_${ENV_NAME}}
ADAPTERS=${ADAPTERS:-adapters/loop2_${ENV_NAME}}
PYTHON=${PYTHON:-python}
# -------------------------------------------------------------------------------------------------

evaluate() {  # evaluate <out> [specialist]
  local args=(--env "$ENV_NAME" --scaffold "$SCAFFOLD" --model "$MODEL" --seeds "$SEEDS"
              --concurrency "$CONCURRENCY" --out "$1" --resume)
  [ -n "${2:-}" ] && args+=(--specialist "$2")
  [ -n "$MAX_STEPS" ] && args+=(--max-steps "$MAX_STEPS")
  [ -n "$TASKS" ] && args+=(--tasks $TASKS)
  $LAUNCH "$PYTHON" eval.py "${args[@]}"
}

mkdir -p "$RUNS" "$SFT" "$ADAPTERS"
ledger="$SFT/ledger.jsonl"
if [ -z "$DATA_RUNS" ]; then
  evaluate "$RUNS/base"
  DATA_RUNS="$RUNS/base"
fi
judge=(--judge heuristic)
[ -n "$META_BASE_URL" ] && judge=(--judge llm --meta-model "$META_MODEL" --meta-base-url "$META_BASE_URL")
for i in $(seq 1 "$ITERATIONS"); do
  data="$SFT/iter$i"
  runs=()
  for r in $DATA_RUNS; do runs+=(--run "$r"); done
  "$PYTHON" curate_sft.py "${runs[@]}" --scaffold "$SCAFFOLD" --out "$data" --ledger "$ledger" \
      --min-examples "$MIN_EXAMPLES" "${judge[@]}"
  $LAUNCH "$PYTHON" train_lora.py --model "$MODEL" --data "$data/train.jsonl" --recipe "$data/recipe.json" \
      --out "$ADAPTERS/iter$i" --resume $TRAIN_ARGS
  evaluate "$RUNS/specialist_iter$i" "$ADAPTERS/iter$i"
  "$PYTHON" curate_sft.py --out "$data" --record "$RUNS/specialist_iter$i" --ledger "$ledger"
done
"$PYTHON" eval.py report $DATA_RUNS "$RUNS"/specialist_iter* --plot "$RUNS/progression.png"
