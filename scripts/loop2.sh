#!/usr/bin/env bash
# Loop #2: memory-proficiency training, as the authors ran it. The base model plays on training
# seeds (the authors' draw: 100 episodes, seeds from 1000-99999, never the report seeds). Per
# iteration the training engine (curate_sft.py iterate: the meta-LLM, or a heuristic) reads the
# ledger and decides the data (reuse, or regenerate with new size knobs) and one or two LoRA
# configs; each config is trained, evaluated on validation seeds with the specialist running the
# memory turns and the untouched base model acting, and gets a ledger row. The best row's
# specialist and the base model are then evaluated once on the report seeds. Training, validation
# and report seeds must be disjoint, and DATA_RUNS may hold no validation or report episode: the
# script refuses otherwise. Without a meta-LLM the training engine has 2 iterations (the prior,
# then its learning rate halved and doubled; curate_sft.py heuristic_decision).
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings (each may also come from the environment) ----------------------------------------
ENV_NAME=${ENV_NAME:-crafter}                 # crafter | minihack | nle
TASKS=${TASKS:-}                              # e.g. "MiniHack-Corridor-R3-v0" (minihack)
SCAFFOLD=${SCAFFOLD:-v0}                      # the scaffold to train for (loop #1's best)
MODEL=${MODEL:-Qwen/Qwen2.5-32B-Instruct}     # base model: HF id, folder or .gguf (trained; served under this name)
PYTHON=${PYTHON:-python}
TRAIN_EPISODES=${TRAIN_EPISODES:-100}         # per task; the authors: 100
TRAIN_SEEDS=${TRAIN_SEEDS:-$("$PYTHON" curate_sft.py seeds --n "$TRAIN_EPISODES")}
VAL_SEEDS=${VAL_SEEDS:-$("$PYTHON" curate_sft.py seeds --n 10 --skip "$TRAIN_EPISODES")}  # iterations are compared here
REPORT_SEEDS=${REPORT_SEEDS:-}                # empty: the paper's (eval.py's defaults)
DATA_RUNS=${DATA_RUNS:-}                      # runs to curate from (space-separated); empty: collect them
META_MODEL=${META_MODEL:-gpt-5}               # judge and training engine
META_BASE_URL=${META_BASE_URL:-}              # empty: the heuristic judge and the heuristic engine
ITERATIONS=${ITERATIONS:-$([ -n "$META_BASE_URL" ] && echo 5 || echo 2)}   # the authors: 5, at most 2 configs each
MAX_STEPS=${MAX_STEPS:-}                      # cap per episode; empty: the game's own limit
CONCURRENCY=${CONCURRENCY:-16}
BASE_URL=${BASE_URL:-}                        # an OpenAI-compatible server (vLLM) serving MODEL; each new
                                              # adapter is loaded into it (docs/loop2.md: Serving); empty: HF
TRAIN_ARGS=${TRAIN_ARGS:-}                    # extra train_lora.py flags, e.g. "--save-every 50 --qlora"
LAUNCH=${LAUNCH:-}                            # training: e.g. "accelerate launch --config_file scripts/accelerate/fsdp.yaml"
                                              # or "torchrun --nproc_per_node 8"; empty: one process ($PYTHON).
                                              # torchrun / accelerate run the python they were installed with
                                              # (PATH's), not $PYTHON: use "$PYTHON -m torch.distributed.run" otherwise
PROCESSES=${PROCESSES:-}                      # training processes; empty: LAUNCH's --nproc_per_node or
                                              # --num_processes, else its --config_file's num_processes, else 1
EVAL_LAUNCH=${EVAL_LAUNCH:-}                  # HF evaluation (no BASE_URL): e.g. "torchrun --nproc_per_node 8"
                                              # splits the episodes, and each process loads the whole model
                                              # (eval does not shard: not LAUNCH's FSDP config); empty: one process
RUNS=${RUNS:-runs/loop2_${ENV_NAME}}
SFT=${SFT:-sft/loop2_${ENV_NAME}}
ADAPTERS=${ADAPTERS:-adapters/loop2_${ENV_NAME}}
# -------------------------------------------------------------------------------------------------

if [ -z "$PROCESSES" ]; then   # the engine must pick global batches that split over them
  PROCESSES=1
  [[ $LAUNCH =~ --config_file[=\ ]+([^ ]+) ]] && [ -f "${BASH_REMATCH[1]}" ] \
    && PROCESSES=$("$PYTHON" -c 'import sys; from accelerate.commands.config.config_args import load_config_from_file as load
print(load(sys.argv[1]).num_processes or 1)' "${BASH_REMATCH[1]}")
  [[ $LAUNCH =~ --(nproc[_-]per[_-]node|num[_-]processes)[=\ ]+([0-9]+) ]] && PROCESSES=${BASH_REMATCH[2]}
fi

launch() {  # launch LAUNCHER SCRIPT ARGS...: accelerate launch and torchrun take the script itself
  local how=$1; shift
  if [ -n "$how" ]; then $how "$@"; else "$PYTHON" "$@"; fi
}

evaluate() (  # evaluate <out> <seeds> [specialist adapter]; the meta-LLM's key is not the agent's business
  unset META_API_KEY
  local args=(--env "$ENV_NAME" --scaffold "$SCAFFOLD" --model "$MODEL" --concurrency "$CONCURRENCY"
              --out "$1" --resume)
  [ -n "$2" ] && args+=(--seeds "$2")
  [ -n "$MAX_STEPS" ] && args+=(--max-steps "$MAX_STEPS")
  [ -n "$TASKS" ] && args+=(--tasks $TASKS)
  if [ -z "$BASE_URL" ]; then
    [ -n "${3:-}" ] && args+=(--specialist "$3")
    launch "$EVAL_LAUNCH" eval.py "${args[@]}"
  else  # the server plays; a specialist is its adapter, loaded under a name its weights fix
    if [ -n "${3:-}" ]; then
      local name hash served request
      hash=$(sha256sum "$3/adapter_model.safetensors") || exit 1
      name="${ENV_NAME}-${hash:0:12}"
      served=$(curl -sf "$BASE_URL/models" || true)
      if [[ "$served" != *"\"$name\""* ]]; then   # a listed name holds these very weights
        request=$("$PYTHON" -c 'import json, os, sys; print(json.dumps({"lora_name": sys.argv[1], "lora_path": os.path.realpath(sys.argv[2])}))' "$name" "$3")
        curl -sf -X POST "$BASE_URL/load_lora_adapter" -H "Content-Type: application/json" -d "$request" > /dev/null \
          || { echo "loop2.sh: the server at $BASE_URL did not load $3 as $name" >&2; exit 1; }
      fi
      args+=(--specialist "$name")
    fi
    "$PYTHON" eval.py "${args[@]}" --base-url "$BASE_URL"
  fi
)

if [ -z "$META_BASE_URL" ] && [ "$ITERATIONS" -gt 2 ]; then
  echo "loop2.sh: ITERATIONS=$ITERATIONS needs a meta-LLM (META_BASE_URL): the heuristic training" \
       "engine has 2 iterations" >&2
  exit 2
fi
runs=()
for r in $DATA_RUNS; do runs+=(--run "$r"); done
"$PYTHON" curate_sft.py check-seeds --env "$ENV_NAME" --train "$TRAIN_SEEDS" --val "$VAL_SEEDS" \
    ${REPORT_SEEDS:+--report "$REPORT_SEEDS"} "${runs[@]}"
mkdir -p "$RUNS" "$SFT" "$ADAPTERS"
ledger="$SFT/ledger.jsonl"
if [ -z "$DATA_RUNS" ]; then
  evaluate "$RUNS/train_base" "$TRAIN_SEEDS"
  runs=(--run "$RUNS/train_base")
fi
evaluate "$RUNS/val_base" "$VAL_SEEDS"
engine=(--judge heuristic)
[ -n "$META_BASE_URL" ] && engine=(--judge llm --meta-model "$META_MODEL" --meta-base-url "$META_BASE_URL")
[ -n "$REPORT_SEEDS" ] && engine+=(--report-seeds "$REPORT_SEEDS")
for i in $(seq 1 "$ITERATIONS"); do
  data="$SFT/iter$i"
  [ -f "$data/decision.json" ] || "$PYTHON" curate_sft.py iterate "${runs[@]}" --scaffold "$SCAFFOLD" \
      --ledger "$ledger" --out "$data" --processes "$PROCESSES" "${engine[@]}"
  for recipe in "$data"/recipe_*.json; do
    name="iter${i}_$(basename "$recipe" .json)"
    "$PYTHON" curate_sft.py recorded --ledger "$ledger" --adapter "$ADAPTERS/$name" && continue  # done in an earlier run
    launch "$LAUNCH" train_lora.py --model "$MODEL" --data "$data/train.jsonl" --recipe "$recipe" \
        --out "$ADAPTERS/$name" --resume $TRAIN_ARGS
    evaluate "$RUNS/val_$name" "$VAL_SEEDS" "$ADAPTERS/$name"
    "$PYTHON" curate_sft.py record --ledger "$ledger" --sft "$data" --recipe "$recipe" \
        --adapter "$ADAPTERS/$name" --run "$RUNS/val_$name" --baseline "$RUNS/val_base"
  done
done
best=$("$PYTHON" curate_sft.py best --ledger "$ledger")
echo "best specialist on the validation seeds: $best; now the report seeds"
evaluate "$RUNS/report_base" "$REPORT_SEEDS"
evaluate "$RUNS/report_specialist" "$REPORT_SEEDS" "$best"
"$PYTHON" eval.py report "$RUNS/report_base" "$RUNS/report_specialist" "$RUNS"/val_* \
    --plot "$RUNS/progression.png" --out "$RUNS/report.md"
