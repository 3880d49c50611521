#!/usr/bin/env bash
# Loop #1: scaffold optimisation, as a chain of eval.py and meta_scaffold.py.
#   1. The starting scaffold is evaluated on the gate seeds, which are disjoint from the report
#      seeds; the gate's power for that many episodes is printed, from the run's own variance.
#   2. Per iteration, up to ATTEMPTS times: the best version is evaluated on the analysis seeds
#      (once per version), the meta-LLM studies that run and revises the best version (it is given
#      the whole lineage and every rejected attempt, and no trace of a gate or report run), the
#      revision is evaluated on the gate seeds, and the gate keeps it only if its paired
#      improvement is significant (one-sided sign-flip test at GATE_ALPHA per iteration, split
#      over its attempts).
#   3. The chain of accepted versions is evaluated once on the report seeds; report.md puts the
#      gate and report numbers side by side.
# Every outcome is appended to $RUNS/loop1_log.jsonl. After a kill, run the same command again: it
# continues from the log (best version, iteration, attempt, a candidate proposed but not yet
# gated), and eval.py --resume reruns only unfinished episodes.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings (each may also come from the environment) ----------------------------------------
ENV_NAME=${ENV_NAME:-crafter}                 # crafter | minihack | nle
TASKS=${TASKS:-}                              # e.g. "MiniHack-Corridor-R3-v0" (minihack; default all 8)
# Report seeds are the paper's. Gate seeds and analysis seeds (the meta-LLM studies runs on them)
# are disjoint from them, from each other and from loop #2's training seeds (eval.TRAIN_SEEDS_START,
# 1000, and up; loop-state refuses any overlap); the number of gate seeds is set for the gate's
# noise: see the --power table printed at start. Analysis runs are as large as the paper's.
case "$ENV_NAME" in
  crafter)  gate_default=100-129 analysis_default=200-209 report_default=42-51 ;;   # 30 gate episodes
  minihack) gate_default=100-109 analysis_default=200-204 report_default=42-46 ;;   # 10 per task (80 with all 8 tasks)
  nle)      gate_default=100-119 analysis_default=200-204 report_default=42-46 ;;   # 20
  *) echo "loop1.sh: ENV_NAME must be crafter, minihack or nle, not '$ENV_NAME'" >&2; exit 2 ;;
esac
GATE_SEEDS=${GATE_SEEDS:-$gate_default}
ANALYSIS_SEEDS=${ANALYSIS_SEEDS:-$analysis_default}
REPORT_SEEDS=${REPORT_SEEDS:-$report_default}
GATE_ALPHA=${GATE_ALPHA:-0.05}                # false-accept rate per iteration (Bonferroni over attempts)
START=${START:-v0}                            # starting scaffold
ITERATIONS=${ITERATIONS:-5}
ATTEMPTS=${ATTEMPTS:-3}                       # proposals per iteration
MODEL=${MODEL:-Qwen/Qwen2.5-32B-Instruct}     # the agent's model (HF id/path, or served name)
BASE_URL=${BASE_URL:-}                        # the agent's server, e.g. http://localhost:8000/v1; empty: HF
MAX_STEPS=${MAX_STEPS:-}                      # cap per episode; empty: the game's own limit
CONCURRENCY=${CONCURRENCY:-16}
META_MODEL=${META_MODEL:-gpt-5}               # the meta-LLM (key: META_API_KEY)
META_BASE_URL=${META_BASE_URL:-https://api.openai.com/v1}
META_ALLOW_PYTHON=${META_ALLOW_PYTHON:-0}     # 1: the meta-LLM may run Python analyses of the run
RUNS=${RUNS:-runs/loop1_${ENV_NAME}}
SCAFFOLD_DIR=${SCAFFOLD_DIR:-scaffolds}       # where new versions vN are written
PYTHON=${PYTHON:-python}
# -------------------------------------------------------------------------------------------------

evaluate() {  # evaluate <scaffold> <run folder> <seeds>; the meta-LLM's key is not the agent's business
  local args=(--env "$ENV_NAME" --scaffold "$1" --model "$MODEL" --seeds "$3"
              --concurrency "$CONCURRENCY" --out "$2" --resume)
  [ -n "$BASE_URL" ] && args+=(--base-url "$BASE_URL")
  [ -n "$MAX_STEPS" ] && args+=(--max-steps "$MAX_STEPS")
  [ -n "$TASKS" ] && args+=(--tasks $TASKS)
  env -u META_API_KEY "$PYTHON" eval.py "${args[@]}"
}
gate_run() { echo "$RUNS/gate/$(basename "$1")"; }
analysis_run() { echo "$RUNS/analysis/$(basename "$1")"; }
read_state() {  # sets best, iteration, attempt, pending, chain from the log
  local state
  state=$("$PYTHON" meta_scaffold.py loop-state --log "$log" --start "$START" --attempts "$ATTEMPTS" \
          --analysis-seeds "$ANALYSIS_SEEDS" --gate-seeds "$GATE_SEEDS" --report-seeds "$REPORT_SEEDS" --setting "alpha=$GATE_ALPHA" \
          --setting "iterations=$ITERATIONS" --setting "env=$ENV_NAME" --setting "tasks=$TASKS" \
          --setting "model=$MODEL" --setting "base_url=$BASE_URL" --setting "max_steps=$MAX_STEPS" \
          --setting "meta_model=$META_MODEL" --setting "allow_python=$META_ALLOW_PYTHON")
  eval "$state"
}
run_step() {  # run_step <command...>: exit 0 and 1 are outcomes (logged); anything else stops the loop
  local rc=0
  "$@" || rc=$?
  [ "$rc" -le 1 ] || { echo "loop1.sh: stopped ($1 ${2:-} exited $rc); fix it and rerun to continue" >&2; exit "$rc"; }
}

mkdir -p "$RUNS"
log="$RUNS/loop1_log.jsonl"
alpha=$(awk -v a="$GATE_ALPHA" -v k="$ATTEMPTS" 'BEGIN { print a / k }')
meta_args=(--meta-model "$META_MODEL" --meta-base-url "$META_BASE_URL" --log "$log")
[ "$META_ALLOW_PYTHON" = 1 ] && meta_args+=(--allow-python)
read_state
evaluate "$best" "$(gate_run "$best")" "$GATE_SEEDS"
if [ "$iteration" -eq 1 ] && [ "$attempt" -eq 1 ] && [ -z "$pending" ]; then
  "$PYTHON" meta_scaffold.py gate --power --base "$(gate_run "$best")" --alpha "$alpha"
fi
while [ "$iteration" -le "$ITERATIONS" ]; do
  echo "loop1.sh: iteration $iteration, attempt $attempt, best $(basename "$best")"
  cand=$pending
  if [ -z "$cand" ]; then
    cand="$SCAFFOLD_DIR/$("$PYTHON" meta_scaffold.py next-version --dir "$SCAFFOLD_DIR")"
    evaluate "$best" "$(analysis_run "$best")" "$ANALYSIS_SEEDS"
    run_step "$PYTHON" meta_scaffold.py propose --scaffold "$best" --run "$(analysis_run "$best")" --out "$cand" \
        --iteration "$iteration" --attempt "$attempt" "${meta_args[@]}"
  fi
  if [ -d "$cand" ]; then   # not there: no valid revision this attempt (logged)
    evaluate "$cand" "$(gate_run "$cand")" "$GATE_SEEDS"
    run_step "$PYTHON" meta_scaffold.py gate --base "$(gate_run "$best")" --candidate "$(gate_run "$cand")" \
        --alpha "$alpha" --log "$log" --iteration "$iteration" --attempt "$attempt"
  fi
  read_state
done
reports=()
for s in "${chain[@]}"; do
  evaluate "$s" "$RUNS/report/$(basename "$s")" "$REPORT_SEEDS"
  reports+=("$RUNS/report/$(basename "$s")")
done
"$PYTHON" meta_scaffold.py report --log "$log" --out "$RUNS/report.md"
"$PYTHON" eval.py report "${reports[@]}" --plot "$RUNS/progression.png"
echo "$best" > "$RUNS/best_scaffold"
echo "best scaffold: $best (report: $RUNS/report.md)"
