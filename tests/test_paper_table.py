"""scripts/paper_table.sh and eval.py table: every row of the paper's table on tiny-random over the
real games, a rerun after a kill that redoes no finished episode, and the table's rows, numbers and
projections from hand-made summaries."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval as ev

ROOT = Path(ev.__file__).resolve().parent
SCRIPT = ROOT / "scripts" / "paper_table.sh"


def script_env(out, **settings):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "MODEL": "tiny-random", "MAX_STEPS": "1",
           "SEEDS": "42", "MINIHACK_TASKS": "MiniHack-Corridor-R3-v0", "CONCURRENCY": "1",
           "EVAL_ARGS": "--max-new-tokens 4", **settings}
    env.pop("META_API_KEY", None)
    return env


def results(out):
    """Every finished episode's result file -> (mtime, content)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(out).rglob("ep_*.json")}


ROWS = ("naive", "cot", "v0", "+ scaffold opt.")


def test_every_row_and_a_rerun_after_a_kill_redoes_no_finished_episode(tmp_path):
    out = tmp_path / "table"
    env = script_env(out)
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=ROOT, start_new_session=True, stdout=f, stderr=f)
    deadline = time.time() + 600
    while not list((out / "cot").rglob("ep_*.json")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, log.read_text()[-2000:]
    os.killpg(first.pid, signal.SIGKILL)       # mid-run: naive done, cot under way (one episode at a time)
    first.wait()
    before = results(out)
    assert any("naive" in str(p) for p in before) and any("cot" in str(p) for p in before)
    assert not (out / "v0").exists() and not (out / "report.md").exists()

    rerun = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = results(out)
    assert {p: after[p] for p in before} == before             # not one finished episode redone
    episodes = {"crafter": "crafter/default", "minihack": "minihack/MiniHack-Corridor-R3-v0",
                "nle": "nle/NetHackChallenge-v0"}
    expected = {out / row / e / "ep_42.json" for row in ("naive", "cot", "v0") for e in episodes.values()}
    expected |= {out / "scaffold_opt" / g / e / "ep_42.json" for g, e in episodes.items()}
    assert set(after) == expected

    report = (out / "report.md").read_text()
    assert "Model: **tiny-random**" in report and "A tiny random model proves plumbing, not skill" in report
    for row in ROWS:
        line = next(x for x in report.splitlines() if x.startswith(f"| **{row}** |"))
        assert line.startswith(f"| **{row}** | tiny-random | ") and line.count(" †") == 4   # each game and the overall
    assert "| paper: AutoMem + scaffold opt. (loop 1) | Qwen/Qwen2.5-32B-Instruct | 47.27 ± 2.05 | 27.50 ± 7.06 | " \
           "1.57 ± 0.35 | 25.45 ± 2.45 |" in report
    assert "- crafter: at most 1 steps per episode (paper: 2,000); 1 episode, seeds 42 (paper: 10 episodes, seeds " \
           "42-51); max new tokens 4 (paper: 4096) (naive, cot, v0, + scaffold opt.)" in report
    # a row's calls and tokens are its runs' own, summed over its games; projected at 2000 x 10 for Crafter
    naive = ev.summarize(out / "naive")["envs"]["crafter"]["cost"]
    assert naive["steps"] == 1 and naive["llm_calls"] == 1
    assert (f"| naive | crafter | 20,000 | {naive['prompt_tokens'] * 20_000:,} | {naive['completion_tokens'] * 20_000:,} "
            "| 20,000 |") in report


def summary(run, agent="memory", scaffold="v0", specialist=None, games=None, steps=10, **differences):
    """A hand-made run summary: each game 2 episodes scoring 10 % and 30 % (BALROG's SE: population
    std 10 / sqrt 2 = 7.07), 30 LLM
    calls, 3000 prompt and 300 completion tokens over `steps` steps."""
    envs = {}
    for g in games or ("crafter", "minihack", "nle"):
        envs[g] = {"progression_pct": ev.mean_se([10.0, 30.0]), "protocol_differences": differences.get(g, []),
                   "tasks": {"t": {"seeds": [42, 43], "scores_pct": [10.0, 30.0]}},
                   "intervals": ev.interval_estimates({g: [[10.0, 30.0]]}),
                   "cost": {"llm_calls": 30, "prompt_tokens": 3000, "completion_tokens": 300, "steps": steps}}
    return {"run": run, "model": "Qwen/Qwen2.5-32B-Instruct", "agent": agent, "scaffold": scaffold,
            "specialist": specialist, "envs": envs, "unfinished": []}


def test_the_two_model_row_is_the_converged_scaffolds_with_a_specialist_beside_the_paper():
    runs = [summary("naive", agent="naive"), summary("v0")]
    runs += [summary(f"opt_{g}", scaffold=s, games=[g]) for g, s in ev.PAPER_SCAFFOLDS.items()]
    runs += [summary(f"mem_{g}", scaffold=s, specialist="adapters/best", games=[g],
                     **{g: ["at most 50 steps per episode (paper: 2,000)"]} if g == "crafter" else {})
             for g, s in ev.PAPER_SCAFFOLDS.items()]
    runs.append(summary("v3", scaffold="v3", games=["crafter"]))
    runs[0]["unfinished"] = [{"env": "nle", "task": "NetHackChallenge-v0", "seed": 46, "reason": "server down"}]
    table = ev.table_markdown(runs)
    rows = [x.split(" | ")[0][2:] for x in table.split("## Cost")[0].splitlines() if x.startswith("| **")]
    assert rows == ["**naive**", "**v0**", "**+ scaffold opt.**", "**+ memory training**", "**v3**"]
    assert ("| **+ memory training** | Qwen/Qwen2.5-32B-Instruct + specialist adapters/best | 20.00 ± 7.07 † | "
            "20.00 ± 7.07 | 20.00 ± 7.07 | 20.00 ± 4.08 † |") in table        # overall SE: sqrt(3 x 7.07²) / 3; † as crafter's
    assert ("| paper: AutoMem + memory training (loop 2) | Qwen/Qwen2.5-32B-Instruct | 51.36 ± 3.81 | 30.00 ± 7.25 | "
            "1.85 ± 0.44 | 27.74 ± 2.73 |") in table
    assert "| **v3** | Qwen/Qwen2.5-32B-Instruct | 20.00 ± 7.07 | - | - | - |" in table   # no paper row, no overall
    assert "| **v0** | Qwen/Qwen2.5-32B-Instruct | 20.00 ± 7.07 | 20.00 ± 7.07 | 20.00 ± 7.07 | 20.00 ± 4.08 |" in table
    assert "| Qwen2.5-72B-Instruct | 27.30 ± 3.60 | 5.00 ± 3.40 | 0.30 ± 0.30 | 10.87 ± 1.65 |" in table
    # the bootstrap of the row's three runs pooled as one overall figure, beside each game's own
    cell = "20.00 [10.00, 30.00]; IQM 20.00 [10.00, 30.00]"
    assert f"| + memory training | {cell} | {cell} | {cell} | {cell} |" in table.split("## Intervals")[1]
    assert "- crafter: at most 50 steps per episode (paper: 2,000) (+ memory training)" in table
    # only the off-protocol row is projected: 3 calls and 300 + 30 tokens per step, x 10 episodes x 2000 steps
    projected = table.split("Projected to the paper's protocol")[1]
    assert "| + memory training | crafter | 60,000 | 6,000,000 | 600,000 | 20,000 |" in projected
    assert "| + memory training | nle | 1,500,000 | 150,000,000 | 15,000,000 | 500,000 |" in projected
    assert "| + memory training | all | 1,572,000 | 157,200,000 | 15,720,000 | 524,000 |" in projected
    assert "| naive |" not in projected
    assert "- naive (naive): 1" in table.split("Unfinished episodes, not scored")[1]


def test_a_game_twice_in_a_row_and_bad_input_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ev.UsageError, match="two runs give row 'v0' its crafter cell: a and b"):
        ev.table_markdown([summary("a"), summary("b", games=["crafter"])])
    with pytest.raises(SystemExit) as e:
        ev.main(["table", str(tmp_path)])
    assert e.value.code == 2 and f"{tmp_path} is not a run folder" in capsys.readouterr().err
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("paper_table.sh: unknown flag --bogus")


def test_a_baseline_run_resumes_after_the_scaffold_changed_but_a_memory_run_does_not(tmp_path):
    """naive and cot use no scaffold, so a merged v0 change must not stop paper_table.sh's rerun."""
    for agent, refused in (("naive", False), ("memory", True)):
        args = ev.build_parser().parse_args(["--env", "crafter", "--agent", agent, "--model", "tiny-random",
                                             "--out", str(tmp_path / agent), "--resume"])
        scaffold, jobs = ev.check_args(args)
        (tmp_path / agent).mkdir()
        ev.write_json(tmp_path / agent / "config.json", {**ev.make_config(args, scaffold, jobs), "scaffold_hash": "old"})
        if refused:
            with pytest.raises(ev.UsageError, match=r"was run with other settings \(scaffold_hash\)"):
                ev.prepare_run(args, scaffold, jobs, shared=False)
        else:
            ev.prepare_run(args, scaffold, jobs, shared=False)
