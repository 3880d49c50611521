#!/usr/bin/env bash
# The paper's table in one command: every row run with eval.py on the paper's protocol (its
# defaults) over every game, then one report beside the paper's numbers and BALROG's.
#   naive, cot       BALROG's agents (eval.py --agent naive|cot), --env all
#   v0               the paper's starting scaffold, --env all
#   + scaffold opt.  the converged scaffold of each game (CONVERGED: a scaffold plays only its
#                    own games, so one run per game)
#   + memory training the converged scaffolds in two-model mode, given each game's SPECIALIST
# Runs go to $OUT/<row>[/<game>], the report to $OUT/report.md (eval.py table): mean ± SE per game
# and overall, the LLM calls and tokens of each row, and, for a pilot (e.g. --max-steps 50), those
# projected to the protocol's step limits (an upper bound) to price the full run.
# After a kill, run the same command again: eval.py --resume keeps every finished episode, and a
# finished run loads no model.
#   scripts/paper_table.sh --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-32B-Instruct
#   scripts/paper_table.sh --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-32B-Instruct \
#       --max-steps 50 --seeds 42 --out runs/pilot      # a pilot: its report prices the full run
#   scripts/paper_table.sh --model tiny-random --max-steps 5 --seeds 42 --specialist adapters/x
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings (each may also come from the environment, or from the flag in brackets) ----------
MODEL=${MODEL:-Qwen/Qwen2.5-32B-Instruct}     # [--model] HF id/path, 'tiny-random', or the served name
BASE_URL=${BASE_URL:-}                        # [--base-url] an OpenAI-compatible server; empty: HF
SPECIALIST=${SPECIALIST:-}                    # [--specialist] each game's memory specialist (loop #2 trains
                                              # one per game): "crafter=A minihack=B nle=C", or one for all;
                                              # an adapter folder (HF) or the served LoRA's name; empty: no
                                              # "+ memory training" row
MAX_STEPS=${MAX_STEPS:-}                      # [--max-steps] empty: the paper's (2000 / 100 / 100,000)
SEEDS=${SEEDS:-}                              # [--seeds] e.g. 42-43; empty: the paper's per game
MINIHACK_TASKS=${MINIHACK_TASKS:-}            # [--minihack-tasks] e.g. "MiniHack-Corridor-R3-v0"; empty: all 8
CONVERGED=${CONVERGED:-"crafter=crafter_v5 minihack=minihack_v4 nle=nethack_v2"}   # game=scaffold
CONCURRENCY=${CONCURRENCY:-16}                # episodes in flight per run
EVAL_ARGS=${EVAL_ARGS:-}                      # more eval.py flags for every run, e.g. "--max-new-tokens 16"
OUT=${OUT:-}                                  # [--out] empty: runs/paper_table_<model>
PYTHON=${PYTHON:-python}
# -------------------------------------------------------------------------------------------------

while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "paper_table.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --model) MODEL=$2 ;;
    --base-url) BASE_URL=$2 ;;
    --specialist) SPECIALIST=$2 ;;
    --max-steps) MAX_STEPS=$2 ;;
    --seeds) SEEDS=$2 ;;
    --minihack-tasks) MINIHACK_TASKS=$2 ;;
    --out) OUT=$2 ;;
    *) echo "paper_table.sh: unknown flag $1 (settings: see the top of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
OUT=${OUT:-runs/paper_table_${MODEL##*/}}

runs=()
unfinished=0
evaluate() {  # evaluate <run folder> <eval.py flags...>; exit 1 (unfinished episodes) is reported in the table
  local out=$1 rc=0; shift
  local args=(--model "$MODEL" --concurrency "$CONCURRENCY" --out "$out" --resume "$@")
  [ -n "$BASE_URL" ] && args+=(--base-url "$BASE_URL")
  [ -n "$MAX_STEPS" ] && args+=(--max-steps "$MAX_STEPS")
  [ -n "$SEEDS" ] && args+=(--seeds "$SEEDS")
  echo "paper_table.sh: $out" >&2
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
  "$PYTHON" eval.py "${args[@]}" $EVAL_ARGS || rc=$?
  [ "$rc" -le 1 ] || { echo "paper_table.sh: stopped at $out (eval.py exited $rc$([ "$rc" -eq 2 ] ||
                         echo '; rerun the same command to continue'))" >&2; exit "$rc"; }
  [ "$rc" -eq 0 ] || unfinished=1
  runs+=("$out")
}
all_tasks=()   # --env all runs every game's tasks: name them only to narrow MiniHack's
[ -n "$MINIHACK_TASKS" ] && all_tasks=(--tasks default $MINIHACK_TASKS NetHackChallenge-v0)
game_tasks() {  # game_tasks <game>: the --tasks flags of a one-game run
  [ "$1" = minihack ] && [ -n "$MINIHACK_TASKS" ] && echo "--tasks $MINIHACK_TASKS"
  return 0
}
specialist_of() {  # specialist_of <game>: its specialist from SPECIALIST (empty: none)
  if [[ $SPECIALIST != *=* ]]; then echo "$SPECIALIST"; return; fi
  for pair in $SPECIALIST; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done
  return 0
}

evaluate "$OUT/naive" --env all --agent naive "${all_tasks[@]}"
evaluate "$OUT/cot" --env all --agent cot "${all_tasks[@]}"
evaluate "$OUT/v0" --env all --scaffold v0 "${all_tasks[@]}"
for pair in $CONVERGED; do
  # shellcheck disable=SC2046  # game_tasks prints flags
  evaluate "$OUT/scaffold_opt/${pair%%=*}" --env "${pair%%=*}" --scaffold "${pair#*=}" $(game_tasks "${pair%%=*}")
done
for pair in $CONVERGED; do
  specialist=$(specialist_of "${pair%%=*}")
  # shellcheck disable=SC2046
  [ -z "$specialist" ] || evaluate "$OUT/memory_training/${pair%%=*}" --env "${pair%%=*}" --scaffold "${pair#*=}" \
      --specialist "$specialist" $(game_tasks "${pair%%=*}")
done
"$PYTHON" eval.py table "${runs[@]}" --out "$OUT/report.md" > /dev/null
echo "paper_table.sh: wrote $OUT/report.md"
[ "$unfinished" -eq 0 ] || { echo "paper_table.sh: some episodes are unfinished (the report lists them); rerun to finish them" >&2; exit 1; }
