#!/usr/bin/env bash
# Loop #1: scaffold optimisation. Evaluate the starting scaffold, then per iteration: the meta-LLM
# proposes a revision, it is evaluated on the same seeds, and the gate keeps it only if mean
# progression improves; a rejected revision gets a bounded number of continuations with feedback.
# The best scaffold so far is the parent of the next proposal.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings (each may also come from the environment) ----------------------------------------
ENV_NAME=${ENV_NAME:-crafter}                 # crafter | minihack | nle
TASKS=${TASKS:-}                              # e.g. "MiniHack-Corridor-R3-v0" (minihack)
SEEDS=${SEEDS:-42-51}                         # the fixed seed set every version is scored on
START=${START:-v0}                            # starting scaffold
ITERATIONS=${ITERATIONS:-5}
ATTEMPTS=${ATTEMPTS:-3}                       # proposals per iteration (first + continuations)
MODEL=${MODEL:-Qwen/Qwen2.5-32B-Instruct}     # the agent's model (HF id/path, or served name)
BASE_URL=${BASE_URL:-}                        # e.g. http://localhost:8000/v1 (vLLM); empty: HF
MAX_STEPS=${MAX_STEPS:-}                      # cap per episode; empty: the game's own limit
CONCURRENCY=${CONCURRENCY:-16}
META_MODEL=${META_MODEL:-gpt-5}               # the meta-LLM
META_BASE_URL=${META_BASE_URL:-https://api.openai.com/v1}
RUNS=${RUNS:-runs/loop1_${ENV_NAME}}
SCAFFOLD_DIR=${SCAFFOLD_DIR:-scaffolds}       # where new versions vN are written
PYTHON=${PYTHON:-python}
# -------------------------------------------------------------------------------------------------

evaluate() {  # evaluate <scaffold> <out>
  local args=(--env "$ENV_NAME" --scaffold "$1" --model "$MODEL" --seeds "$SEEDS"
              --concurrency "$CONCURRENCY" --out "$2" --resume)
  [ -n "$BASE_URL" ] && args+=(--base-url "$BASE_URL")
  [ -n "$MAX_STEPS" ] && args+=(--max-steps "$MAX_STEPS")
  [ -n "$TASKS" ] && args+=(--tasks $TASKS)
  "$PYTHON" eval.py "${args[@]}"
}

mkdir -p "$RUNS"
log="$RUNS/loop1_log.jsonl"
best=$START                                   # a scaffold name in scaffolds/ or a folder
evaluate "$best" "$RUNS/$(basename "$best")"
for i in $(seq 1 "$ITERATIONS"); do
  feedback=()
  accepted=no
  for a in $(seq 1 "$ATTEMPTS"); do
    cand=$("$PYTHON" meta_scaffold.py next-version --dir "$SCAFFOLD_DIR")
    if ! "$PYTHON" meta_scaffold.py propose --scaffold "$best" --run "$RUNS/$(basename "$best")" --out "$SCAFFOLD_DIR/$cand" \
         --meta-model "$META_MODEL" --meta-base-url "$META_BASE_URL" "${feedback[@]}"; then
      echo "{\"iteration\": $i, \"attempt\": $a, \"candidate\": \"$cand\", \"result\": \"no valid revision\"}" >> "$log"
      continue
    fi
    evaluate "$SCAFFOLD_DIR/$cand" "$RUNS/$cand"
    if "$PYTHON" meta_scaffold.py gate --base "$RUNS/$(basename "$best")" --candidate "$RUNS/$cand"; then
      echo "{\"iteration\": $i, \"attempt\": $a, \"candidate\": \"$cand\", \"result\": \"accepted\", \"parent\": \"$(basename "$best")\"}" >> "$log"
      best=$SCAFFOLD_DIR/$cand
      accepted=yes
      break
    fi
    echo "{\"iteration\": $i, \"attempt\": $a, \"candidate\": \"$cand\", \"result\": \"rejected\", \"parent\": \"$(basename "$best")\"}" >> "$log"
    feedback=(--feedback "$RUNS/$cand")
  done
  echo "iteration $i: accepted=$accepted, best scaffold $best"
done
echo "$best" > "$RUNS/best_scaffold"
"$PYTHON" eval.py report "$RUNS"/v* --plot "$RUNS/progression.png"
echo "best scaffold: $best"
