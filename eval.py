"""Fixed-seed evaluation: episodes -> JSONL traces, results, final memories, summary, report, plots.

    python eval.py --env crafter --model tiny-random --episodes 1 --max-steps 5 --max-new-tokens 16  # smoke
    python eval.py --env crafter --scaffold v3 --base-url http://localhost:8000/v1 \\
        --model Qwen/Qwen2.5-32B-Instruct                  # the paper's protocol on a vLLM server
    accelerate launch eval.py --env all --scaffold v3      # episodes split across GPU processes
    torchrun --nproc_per_node 2 eval.py --env crafter ...  # the same with CPU processes
    python eval.py --env all ... --shard $SLURM_ARRAY_TASK_ID/8  # one of 8 independent jobs
    python eval.py summarize runs/A                        # summary.json + report.md, at any time
    python eval.py report runs/A runs/B --plot progression.png
    python eval.py table runs/A runs/B --out table.md     # the paper's table, a row per agent (paper_table.sh)
    python eval.py replay runs/A runs/B --seed 42 --out replay.html   # side-by-side HTML replay

Defaults are the paper's protocol (PAPER_SEEDS, PAPER_SAMPLING, envs.MAX_STEPS): Crafter seeds
42-51 and 2000 steps, MiniHack seeds 42-46 on each of the 8 tasks with autopickup and 100 steps,
NetHack seeds 42-46, 100,000 steps and BALROG's no-progress timeout (an episode ends after 150
steps in a row without game time passing: envs.NO_PROGRESS_TIMEOUT),
Qwen/Qwen2.5-32B-Instruct at temperature 1.0 with up to 4096 new tokens per reply; report.md says
where a run departs from it. The leaderboard statistics are BALROG's (`mean_se`, `overall`);
beside them, stratified-bootstrap intervals and the IQM (`interval_estimates`), and `report`
pairs runs on the same seeds (`paired_comparison`). A run folder
holds config.json, <env>/<task>/ep_<seed>.jsonl (one self-contained JSON line per step, gzipped
to ep_<seed>.jsonl.gz when the episode ends) and ep_<seed>.json (written when it ends),
<env>/<task>/memory_<seed>/, summary.json and report.md. Every figure in the summary is
recomputed from the traces (`summarize`), which the loops reuse.

An episode that cannot finish (the server stayed down, an exception in the game or the
scaffold's code) keeps its trace, gets no result file but ep_<seed>.error.txt (reason, traceback),
and is not scored; the others go on, the run lists it and exits 1, and --resume reruns it.
Processes (a launcher's ranks, --shard jobs) share only the run folder: the last to end writes
the summary and is the one that exits 1 (a launcher stops every process when one fails, so the
others exit 0); `eval.py summarize` exits 1 too while episodes are unfinished.
"""
import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

import agent as agent_mod
import envs
from memory_fs import ALL_OPS, builtin_kind

ROOT = Path(__file__).resolve().parent
REFERENCE = ROOT / "data" / "reference_results.json"
CONTENT_WRITES = ("APPEND", "WRITE", "UPSERT")   # built-in writes whose text can already be in the file
# The paper's protocol, read from data/protocol.json (envs.PROTOCOL): report seeds per game (per
# task for MiniHack), sampling per reply; step limits in envs.MAX_STEPS.
PAPER_SEEDS = {game: range(first, last + 1) for game, p in envs.PROTOCOL["games"].items()
               for first, last in [p["report_seeds"]]}
PAPER_SAMPLING = envs.PROTOCOL["sampling"]
# Loop #2 collects its training traces on seeds from TRAIN_SEEDS_START up; loop #1's gate seeds and
# the report seeds stay below it. One rule, read by both loops.
TRAIN_SEEDS_START = 1000
FIRST_SEED = 42


# ---------------------------------------------------------------------------------------------
# Traces: writing and reading
# ---------------------------------------------------------------------------------------------

def routines(record):
    """(name, routine) for every routine that ran in a step record, in the order they ran: the
    record lists their names (traces older than scaffold code held only LOG and PLAN)."""
    return [(name, record[name]) for name in record.get("routines", ("log", "plan")) if record.get(name)]


def routine_ops(routine):
    """Every op of a routine (None: a routine that did not run), in order."""
    return [op for t in (routine or {}).get("turns", []) for op in t.get("ops", [])]


def op_kind(op):
    """A traced op's kind, "read", "write" or "control": the harness records it for every op, so a
    scaffold's own ops count as what they do; older traces fall back to the built-in op sets."""
    return op.get("kind") or builtin_kind(op["op"])


class TraceWriter:
    """Appends one JSON line per step with a single write() on an O_APPEND file, so a killed
    process leaves whole lines only. A line is whole in itself (json.loads reads it): each
    routine holds its conversation once, as plain messages, and each turn the number of them
    that formed its input (`input_messages`) beside its raw reply. A running episode's trace is
    plain JSONL, to watch and to resume; `finish_trace` compresses it when the episode ends."""

    def __init__(self, path):
        Path(f"{path}.gz").unlink(missing_ok=True)   # a killed run's trace of this episode
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def write(self, record):
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())

    def close(self):
        os.close(self.fd)


def finish_trace(path):
    """A finished episode's trace, gzipped to <path>.gz (pandas' read_json and `zcat | jq` read
    it); the plain file goes once the compressed one is in place."""
    path = Path(path)
    tmp = Path(f"{path}.gz.{os.getpid()}.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as raw, \
            gzip.GzipFile(path.name, "wb", compresslevel=6, fileobj=raw) as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, f"{path}.gz")
    path.unlink()


def trace_file(path):
    """The file holding the trace `path` names (ep_<seed>.jsonl): itself while its episode runs,
    <path>.gz once it finished; None if there is neither."""
    return next((p for p in (Path(path), Path(f"{path}.gz")) if p.exists()), None)


def open_text(path, errors="strict"):
    """A text file, through gzip when its name ends in .gz."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def iter_trace(path):
    """The step records of a trace (ep_<seed>.jsonl, or its .gz), one at a time; a line cut by
    a crash mid-write (never seen in practice) ends the trace rather than failing the reader."""
    found = trace_file(path)
    if found is None:
        raise FileNotFoundError(f"no trace {path} (nor {path}.gz)")
    with open_text(found) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def read_trace(path):
    """The whole trace as a list (iter_trace streams it)."""
    return list(iter_trace(path))


class Trace:
    """A trace's step records, streamed anew each time it is iterated: never held whole."""

    def __init__(self, path):
        self.path = path

    def __iter__(self):
        return iter_trace(self.path)


def write_json(path, data, replace=True):
    write_text(path, json.dumps(data, indent=1, ensure_ascii=False), replace)


def write_text(path, text, replace=True):
    """Atomically: readers see the old file or the new one, never part of one (several processes
    may write the same file). `replace=False` raises FileExistsError if the file exists."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def episode_paths(run, env_name, task, seed):
    folder = Path(run) / env_name / task
    return folder / f"ep_{seed}.jsonl", folder / f"ep_{seed}.json", folder / f"memory_{seed}"


def not_a_run(paths):
    """The first of `paths` that is not a run folder, as an error message; None if all are."""
    bad = next((p for p in paths if not (Path(p) / "config.json").exists()), None)
    return bad and f"{bad} is not a run folder (no config.json)"


def error_path(run, env_name, task, seed):
    """Where an unfinished episode's reason (first line) and traceback are kept."""
    return Path(run) / env_name / task / f"ep_{seed}.error.txt"


def unfinished_reason(run, env_name, task, seed):
    path = error_path(run, env_name, task, seed)
    return path.read_text().split("\n", 1)[0] if path.exists() else "not run yet, or still running"


def planned_episodes(config):
    """(env, task, seed) of every episode a run's config asks for. A game's seeds are its own
    (`--env all` on the paper's seeds: Crafter 42-51, the others 42-46)."""
    by_task = {t: e for e in envs.ENVS for t in envs.TASKS[e]}
    return [(by_task[t], t, s) for t in config.get("tasks", []) for s in config["seeds_by_env"][by_task[t]]]


def finished_episodes(run):
    """(env, task, seed) of every episode whose result file exists."""
    return sorted((p.parent.parent.name, p.parent.name, int(p.stem[3:]))
                  for p in Path(run).glob("*/*/ep_*.json"))


# ---------------------------------------------------------------------------------------------
# Scores and behaviour metrics, from traces alone
# ---------------------------------------------------------------------------------------------

def episode_stats(records):
    """Everything reported about one episode, computed from its trace records (any iterable:
    `iter_trace` streams them, so a long trace is never held whole)."""
    c = dict(steps=0, unproductive=0, writes=0, redundant=0, searches=0,
             empty_searches=0, log_writes=0, log_searches=0, prompt_tokens=0,
             completion_tokens=0, invalid_actions=0, parse_errors=0, backend_errors=0,
             requests=0, failed_requests=0, retries=0, context_length=0, truncated=0)
    prev, last, ret = {}, {}, 0.0
    for r in records:
        c["steps"] += 1
        if r.get("next_state") is not None and (
                r["next_state"] == r.get("state") or
                (prev and r["next_state"] == prev.get("state"))):
            c["unproductive"] += 1
        prev = last = r
        ret += r["reward"]
        c["prompt_tokens"] += r["tokens"]["prompt"]
        c["completion_tokens"] += r["tokens"]["completion"]
        c["invalid_actions"] += not r["action"]["valid"]
        for phase, routine in routines(r):
            c["backend_errors"] += routine.get("ended") == "backend_error"
            for turn in routine.get("turns", []):
                count_request(c, turn)
            for op in routine_ops(routine):
                flags = op.get("flags", [])
                kind = op_kind(op)   # a scaffold's ops count by their kind
                if op.get("error"):
                    c["parse_errors"] += 1
                    continue
                wrote = "errors" not in flags   # a refused write, or a scaffold op that raised, wrote nothing
                if wrote and (op["op"] in CONTENT_WRITES or (kind == "write" and op["op"] not in ALL_OPS)):
                    c["writes"] += 1
                    c["redundant"] += "redundant" in flags
                if op["op"] == "SEARCH":
                    c["searches"] += 1
                    c["empty_searches"] += "empty" in flags
                if phase == "log":   # a scaffold's own reads count as searches, as its writes count as writes
                    c["log_writes"] += kind == "write" and wrote
                    c["log_searches"] += op["op"] == "SEARCH" or (kind == "read" and op["op"] not in ALL_OPS)
    info = last.get("info", {})
    return {
        "steps": c["steps"], "progression": last.get("progression", 0.0), "return": ret,
        "end_status": info.get("end_status") or ("truncated" if last and not last["done"] else None),
        "achievements": info.get("unlocked"), "counts": c,
    }


def count_request(c, turn):
    """A turn is one request to the model: failed (no answer after retries), refused as over the
    context length (a failed turn too, not retried), or cut at max_new_tokens."""
    c["requests"] += 1
    c["retries"] += turn.get("retries", 0)
    c["context_length"] += turn.get("finish_reason") == "context_length"
    c["failed_requests"] += bool(turn.get("error")) and turn.get("finish_reason") != "context_length"
    c["truncated"] += turn.get("finish_reason") == "length"


def backend_health(counts):
    """How the model's server behaved over a run: failed requests per request, retried attempts,
    prompts refused for the context length, replies cut at max_new_tokens."""
    n = counts.get("requests", 0)
    return {"requests": n, "error_rate": _ratio(counts.get("failed_requests", 0) + counts.get("context_length", 0), n),
            "failed": counts.get("failed_requests", 0), "retries": counts.get("retries", 0),
            "context_length": counts.get("context_length", 0), "truncated": counts.get("truncated", 0)}


def _ratio(a, b):
    return a / b if b else None


def behaviour(counts):
    """The paper's behaviour metrics from (summed) counts."""
    return {
        "unproductive_action_rate": _ratio(counts["unproductive"], counts["steps"]),
        "redundant_write_rate": _ratio(counts["redundant"], counts["writes"]),
        "redundant_writes": counts["redundant"],
        "empty_search_rate": _ratio(counts["empty_searches"], counts["searches"]),
        "mean_prompt_tokens_per_step": _ratio(counts["prompt_tokens"], counts["steps"]),
        "log_writes_per_search": _ratio(counts["log_writes"], counts["log_searches"]),
        "invalid_action_rate": _ratio(counts["invalid_actions"], counts["steps"]),
    }


def mean_se(values):
    """BALROG's mean and standard error: the population standard deviation (divided by N, not
    N - 1) over sqrt(N); 0 for a single value."""
    n = len(values)
    if n == 0:
        return {"mean": None, "stderr": None, "n": 0}
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / n) / math.sqrt(n) if n > 1 else 0.0
    return {"mean": m, "stderr": se, "n": n}


def overall(per_env):
    """BALROG's overall figure from the games' {mean, stderr}: the unweighted mean of the means,
    and sqrt(sum of squared standard errors) / number of games."""
    k = len(per_env)
    if k == 0:
        return {"mean": None, "stderr": None, "n_envs": 0}
    return {"mean": sum(e["mean"] for e in per_env) / k,
            "stderr": math.sqrt(sum(e["stderr"] ** 2 for e in per_env)) / k, "n_envs": k}


# Interval estimates beside BALROG's mean ± SE, as the few-runs literature recommends (Agarwal et
# al. 2021, "Deep RL at the edge of the statistical precipice", and its rliable library).
RESAMPLES = 10_000     # bootstrap resamples of every interval
CONFIDENCE = 0.95
STATS_SEED = 0         # fixed, so that a report is the same every time it is made
INTERVALS_NOTE = (f"Intervals: {CONFIDENCE * 100:g} % percentile bootstrap over episodes, stratified (each task of a game "
                  f"resampled on its own: MiniHack's tasks, and each game), {RESAMPLES:,} resamples with seed "
                  f"{STATS_SEED} (scipy.stats.bootstrap), expanded for few episodes (Hesterberg 2015: with "
                  "normal scores, 95 % coverage at 10 episodes, where a plain percentile interval covers about 90 %; at 5, "
                  "NetHack's, about 92 %, the plain one 85 %). IQM: the interquartile mean, the mean of the middle 50 % "
                  "of a game's episodes (scipy.stats.trim_mean, 25 % cut at each end). Overall: the mean of the "
                  "games' figures, as BALROG's overall.")


def iqm(scores, axis=-1):
    """The interquartile mean: robust to a few outlying episodes, less noisy than the median."""
    from scipy import stats
    return stats.trim_mean(scores, 0.25, axis=axis)


def _over_games(statistic, strata_per_game):
    """statistic of each game's strata pooled, averaged over the games (BALROG pools a game's
    tasks, and its overall figure is the mean of the games'); vectorized for scipy's bootstrap."""
    def pooled(*strata, axis=-1):
        ends = np.cumsum([0, *strata_per_game])
        return np.mean([statistic(np.concatenate(strata[a:b], axis=axis), axis=axis)
                        for a, b in zip(ends[:-1], ends[1:])], axis=0)
    return pooled


def expanded_level(strata):
    """The level at which a percentile interval gets CONFIDENCE coverage from few episodes: its
    spread is the plug-in standard deviation (sqrt((n-1)/n) of the usual one) and its tails are
    normal, so at 10 episodes a 95 % percentile interval covers about 90 %. Hesterberg's expanded
    percentile interval (The American Statistician, 2015) widens it to a t interval's width; at 5
    episodes the resampled means' tails are too short to reach that width: it covers about 92 %."""
    from scipy import stats
    n, df = min(len(s) for s in strata), sum(len(s) for s in strata) - len(strata)
    return float(2 * stats.norm.cdf(np.sqrt(n / (n - 1)) * stats.t.ppf((1 + CONFIDENCE) / 2, df)) - 1)


def bootstrap_interval(strata, statistic, resamples=RESAMPLES, seed=STATS_SEED, equal="every episode scored the same"):
    """(low, high) of the expanded percentile-bootstrap interval of statistic(*strata), each
    stratum (an array of episode scores) resampled on its own, and why it is degenerate (None: it
    is not). One episode in a stratum gives no interval; equal values everywhere (`equal` says which)
    one of no width."""
    from scipy import stats
    if not all(np.isfinite(s).all() for s in strata):
        return None, "a score is not a number: no interval"
    if any(len(s) < 2 for s in strata):
        return None, "a task with a single episode: no interval"
    if len({float(v) for s in strata for v in s}) == 1:
        v = float(statistic(*strata))
        return [v, v], f"{equal}: the interval has no width"
    res = stats.bootstrap(strata, statistic, n_resamples=resamples, confidence_level=expanded_level(strata),
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return [float(x) for x in res.confidence_interval], None


def interval_estimates(games):
    """The mean and the IQM, each with its stratified-bootstrap interval, of episode scores given
    as {game: [scores of each task]}: per game with one game, overall with several."""
    strata = [np.asarray(task, dtype=float) for tasks in games.values() for task in tasks]
    per_game = [len(tasks) for tasks in games.values()]
    out = {}
    for name, statistic in (("mean", np.mean), ("iqm", iqm)):
        pooled = _over_games(statistic, per_game)
        ci, out["degenerate"] = bootstrap_interval(strata, pooled)   # the same for both: it depends on the data
        out.update({name: float(pooled(*strata)), f"{name}_ci": ci})
    return out


EXACT_UP_TO = 16       # sign-flip tests on up to 2^16 patterns are enumerated exactly


def sign_flip_p(diffs, flips=100_000, seed=0):
    """One-sided p-values of the paired sign-flip (permutation) test of mean > 0, one per row of
    `diffs`. Under "A is no better than B", each paired difference is as likely positive as
    negative, so flipping signs gives the statistic's null distribution: exact for any
    distribution of differences (bounded, skewed and tied, as progression is) and any number of
    seeds, where a t-test assumes normality and a percentile bootstrap is anti-conservative for
    the 10-30 pairs a gate has. Up to EXACT_UP_TO pairs every pattern is enumerated; beyond,
    `flips` random patterns give a valid Monte-Carlo p-value, (1 + hits) / (1 + flips). A row
    with a score that is not a number gets p NaN, which no alpha accepts."""
    from scipy import stats
    d = np.atleast_2d(np.asarray(diffs, dtype=float))
    n = d.shape[1]
    if n == 1:   # scipy wants two pairs; of one pair's two sign patterns, d > 0 beats one
        p = np.where(d[:, 0] > 0, 0.5, 1.0)
    else:
        patterns = max(flips, 2 ** n) if n <= EXACT_UP_TO else flips
        batch = max(1, 4_000_000 // d.size)   # resampled copies of the data held at once
        p = stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True, n_resamples=patterns,
                                   alternative="greater", axis=-1, batch=batch, rng=np.random.default_rng(seed)).pvalue
    return np.where(np.isnan(d).any(axis=1), np.nan, p)


def probability_of_improvement(a, b):
    """P(A > B): the chance that an episode of A scores above one of B on the same task, ties
    counting half (the Mann-Whitney U over all pairs / pairs, as rliable)."""
    x, y = np.expand_dims(a, -1), np.expand_dims(b, -2)
    return np.mean((x > y) + 0.5 * (x == y), axis=(-1, -2))


def paired_comparison(a, b):
    """A against B on one game, from {(task, seed): score} of each, on the same episodes: the mean
    paired difference A - B with its interval (the pairs of each task resampled on their own),
    P(A > B) with its interval (each run's episodes of each task resampled on their own, as
    rliable), and the gate's one-sided sign-flip p-value for A > B."""
    tasks = sorted({t for t, _ in a})
    keys = [[k for k in sorted(a) if k[0] == t] for t in tasks]
    diffs = [np.array([a[k] - b[k] for k in ks]) for ks in keys]
    runs = [np.array([run[k] for k in ks]) for ks in keys for run in (a, b)]
    diff_ci, diff_degenerate = bootstrap_interval(diffs, _over_games(np.mean, [len(tasks)]),
                                                  equal="every pair differed by the same")

    def poi(*strata, axis=-1):
        return np.mean([probability_of_improvement(x, y) for x, y in zip(strata[::2], strata[1::2])], axis=0)
    poi_ci, poi_degenerate = bootstrap_interval(runs, poi)
    every = np.concatenate(diffs)
    return {"n": len(every), "diff": float(every.mean()), "diff_ci": diff_ci, "p_improvement": float(poi(*runs)),
            "p_improvement_ci": poi_ci, "p_value": float(sign_flip_p(every)[0]),
            "degenerate": poi_degenerate or diff_degenerate}


def seed_ranges(numbers, sep=", "):
    """[42, 43, 44, 50] -> '42-44, 50' (loop #1's log writes them with sep=",")."""
    spans = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return sep.join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _episodes_text(env_name, episodes):
    text = f"{len(episodes)} episode{'s' * (len(episodes) != 1)}, seeds {seed_ranges({s for _, s in episodes})}"
    if len(envs.TASKS[env_name]) > 1:
        text += f" on {len({t for t, _ in episodes})} of {len(envs.TASKS[env_name])} tasks"
    return text


def protocol_differences(env_name, config, episodes):
    """Where a run departs from the paper's protocol on one game, in words (none: it follows it):
    step limit, tasks and seeds of the finished `episodes` ((task, seed) pairs), tokens,
    temperature, a top_p the paper left to the model, MiniHack's autopickup, unseeded NetHack."""
    notes = []
    paper_steps = envs.MAX_STEPS[env_name]
    steps = config.get("max_steps") or paper_steps   # the game's limit in this run (episode_env)
    if steps != paper_steps:
        notes.append(f"at most {steps:,} steps per episode (paper: {paper_steps:,})")
    paper = {(t, s) for t in envs.TASKS[env_name] for s in PAPER_SEEDS[env_name]}
    if set(episodes) != paper:
        notes.append(f"{_episodes_text(env_name, episodes)} (paper: {_episodes_text(env_name, paper)})")
    for key, value in PAPER_SAMPLING.items():
        if config.get(key) != value:
            notes.append(f"{key.replace('_', ' ')} {config.get(key)} (paper: {value})")
    if config.get("top_p") is not None:
        notes.append(f"top_p {config['top_p']} sent (paper: the model's own)")
    if env_name == "minihack" and not config.get("minihack_autopickup"):
        notes.append("autopickup off (paper: on)")
    if env_name == "nle" and config.get("nle_seeded") is False:
        notes.append("unseeded: every episode a new game (paper: seeds 42-46 fix the games)")
    return notes


def _total(counts):
    return {k: sum(c[k] for c in counts) for k in counts[0]}


def _group(stats):
    counts = _total([s["counts"] for s in stats])
    ends = {}
    for s in stats:
        ends[str(s["end_status"])] = ends.get(str(s["end_status"]), 0) + 1
    stats = sorted(stats, key=lambda s: s["seed"])
    scores = [100 * s["progression"] for s in stats]
    return {"progression_pct": mean_se(scores), "return": mean_se([s["return"] for s in stats]),
            "steps": mean_se([s["steps"] for s in stats]), "end_reasons": ends,
            "behaviour": behaviour(counts), "cost": cost(counts),
            "seeds": [s["seed"] for s in stats], "scores_pct": scores}


def cost(counts):
    """What the model was asked for: calls (one per turn), tokens in and out, tokens per step."""
    return {"llm_calls": counts["requests"], "prompt_tokens": counts["prompt_tokens"],
            "completion_tokens": counts["completion_tokens"], "steps": counts["steps"],
            "tokens_per_step": _ratio(counts["prompt_tokens"] + counts["completion_tokens"], counts["steps"])}


def task_scores(task_groups):
    return [g["scores_pct"] for g in task_groups.values()]


def summarize(run, on_episode=None):
    """summary.json's content, recomputed from the run's traces, each streamed. Finished episodes
    are scored; `on_episode(env, task, seed, records, stats)` lets a caller digest each one too
    (`records`: a Trace, to iterate as often as it needs). Episodes the run planned that have no
    result are listed under `unfinished`, with the reason their error file gives, and not scored;
    the backend's figures count the requests of every trace, theirs too."""
    run = Path(run)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    per_env = {}
    for env_name, task, seed in finished_episodes(run):
        records = Trace(episode_paths(run, env_name, task, seed)[0])
        s = episode_stats(records)
        if on_episode:
            on_episode(env_name, task, seed, records, s)
        s["seed"] = seed
        per_env.setdefault(env_name, {}).setdefault(task, []).append(s)
    summary = {"run": run.name, "model": config.get("model"), "scaffold": config.get("scaffold"),
               "agent": config.get("agent"), "specialist": config.get("specialist"), "envs": {}}
    everything = []
    for env_name, tasks in per_env.items():
        all_eps = [s for eps in tasks.values() for s in eps]   # BALROG pools a game's tasks
        everything += all_eps
        ran = [(t, s["seed"]) for t, eps in tasks.items() for s in eps]
        task_groups = {t: _group(eps) for t, eps in sorted(tasks.items())}
        summary["envs"][env_name] = {**_group(all_eps), "tasks": task_groups,
                                     "intervals": interval_estimates({env_name: task_scores(task_groups)}),
                                     "protocol_differences": protocol_differences(env_name, config, ran)}
    summary["overall_progression_pct"] = overall([e["progression_pct"] for e in summary["envs"].values()])
    if everything:
        total = _group(everything)
        summary["overall_intervals"] = interval_estimates({e: task_scores(g["tasks"])
                                                           for e, g in summary["envs"].items()})
        summary["behaviour"] = total["behaviour"]
        summary["cost"] = total["cost"]
    unfinished = [e for e in planned_episodes(config) if not episode_paths(run, *e)[1].exists()]
    traces = [trace_file(episode_paths(run, *e)[0]) for e in unfinished]
    counts = [s["counts"] for s in everything] + [episode_stats(Trace(t))["counts"] for t in traces if t]
    if counts:
        summary["backend"] = backend_health(_total(counts))
    summary["unfinished"] = [{"env": e, "task": t, "seed": s, "reason": unfinished_reason(run, e, t, s)}
                             for e, t, s in unfinished]
    return summary


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

def _pct(ms):
    return "-" if ms["mean"] is None else f"{ms['mean']:.2f} ± {ms['stderr']:.2f}"


def _fmt(v):
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _ci(interval):
    return "-" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _intervals_text(iv):
    """The mean and IQM with their intervals in words, and why an interval is degenerate."""
    return (f"mean {iv['mean']:.2f} %, 95 % CI {_ci(iv['mean_ci'])}; IQM {iv['iqm']:.2f} %, 95 % CI "
            f"{_ci(iv['iqm_ci'])}" + (f" ({iv['degenerate']})" if iv["degenerate"] else ""))


BEHAVIOUR_NOTE = (   # what each behaviour metric means; "-" where its denominator is zero
    "Behaviour, over the finished episodes' steps: *unproductive action rate*, the share of steps whose "
    "action left the game state unchanged or brought it back to the state of two steps before; *redundant "
    "write rate*, the share of memory writes whose text was already in the target file (*redundant writes*: "
    "their number); *empty search rate*, the share of SEARCH ops that found nothing; *mean prompt tokens per "
    "step*, the prompt tokens of all model calls of a step (the input context); *log writes per search*, "
    "memory writes per SEARCH in the LOG routine; *invalid action rate*, the share of steps whose action was "
    "not one of the game's (the game ran its default instead).\n\n"
    '"-": no value, because what it is a share of never happened (no write, no SEARCH, no episode), or the '
    "figure does not exist for that row (a paper row has no interval; one episode has none either).")


BALROG_ROWS_NOTE = (  # specs/balrog_agents_protocol.md section 3
    "The rows marked (balrog) are BALROG leaderboard runs under BALROG's own settings, not the "
    "paper's protocol: a random seed per episode (NetHack unseeded); its 2024 naive runs at "
    "temperature 0.0 with 1024 new tokens, its reasoning models with robust_cot and 4096-8192 tokens.")


def report_markdown(summary):
    ref = json.loads(REFERENCE.read_text())["rows"]
    model = summary.get("model") or "?"
    lines = [f"# {summary['run']}", "",
             f"Model **{model}**, scaffold **{summary.get('scaffold')}**, agent "
             f"**{summary.get('agent')}**" + (f", specialist **{summary['specialist']}**"
                                              if summary.get("specialist") else "") + ".",
             "Progression in % (mean ± standard error over episodes, as BALROG computes them). "
             + ("A tiny random model proves plumbing, not skill." if model == "tiny-random" else ""), ""]
    if len(summary["envs"]) > 1:
        lines += [f"Overall: {_pct(summary['overall_progression_pct'])} % (BALROG's: the mean of the "
                  f"{len(summary['envs'])} games' means; standard error sqrt(sum of squares) / games); "
                  f"{_intervals_text(summary['overall_intervals'])}.", ""]
    for env_name, e in summary["envs"].items():
        lines += [f"## {env_name}", "", "| agent | progression % | episodes |", "| --- | --- | --- |",
                  f"| **this run** ({model}) | {_pct(e['progression_pct'])} | {e['progression_pct']['n']} |"]
        for row in ref:
            if env_name in row:
                m, se = row[env_name]
                lines.append(f"| {row['agent']} ({row['group']}) | {m:.2f} ± {se:.2f} | paper |")
        differences = e.get("protocol_differences")
        lines += ["", "**Not the paper's protocol**, so not comparable with the rows above: "
                  + "; ".join(differences) + "." if differences else
                  "Protocol: the paper's (its seeds, step limit, temperature and token cap).", "",
                  BALROG_ROWS_NOTE, "", f"This run: {_intervals_text(e['intervals'])} (see the note on intervals "
                  "at the end)."]
        if len(e["tasks"]) > 1:
            lines += ["", "| task | progression % | n | mean steps | end reasons |", "| --- | --- | --- | --- | --- |"]
            for t, g in e["tasks"].items():
                lines.append(f"| {t} | {_pct(g['progression_pct'])} | {g['progression_pct']['n']} | "
                             f"{_fmt(g['steps']['mean'])} | {g['end_reasons']} |")
        b = e["behaviour"]
        lines += ["", "| behaviour | value |", "| --- | --- |"]
        lines += [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in b.items()]
        lines += [f"| return (mean) | {_fmt(e['return']['mean'])} |",
                  f"| steps (mean) | {_fmt(e['steps']['mean'])} |",
                  f"| end reasons | {e['end_reasons']} |", ""]
    if summary.get("cost"):
        c = summary["cost"]
        lines.append(f"Cost, over the finished episodes: {c['llm_calls']:,} LLM calls, {c['prompt_tokens']:,} prompt "
                     f"and {c['completion_tokens']:,} completion tokens, {_fmt(c['tokens_per_step'])} tokens per "
                     f"step ({c['steps']:,} steps).")
    if summary.get("backend"):
        b = summary["backend"]
        lines += ["", f"Backend, over every episode, unfinished ones too: {b['requests']:,} requests, error "
                      f"rate {_fmt(b['error_rate'])} ({b['failed']} "
                      f"failed after retries, {b['context_length']} refused as over the context length; the "
                      f"step went on with the fallback), {b['retries']} retried attempts, {b['truncated']} "
                      "replies cut at max_new_tokens."]
    if summary.get("unfinished"):
        lines += ["", f"**{len(summary['unfinished'])} episode(s) unfinished**, not scored above "
                      "(`--resume` reruns them):"]
        lines += [f"- {u['env']} {u['task']} seed {u['seed']}: {u['reason']}" for u in summary["unfinished"]]
    if summary["envs"]:
        lines += ["", INTERVALS_NOTE, "", BEHAVIOUR_NOTE]
    return "\n".join(lines) + "\n"


def off_protocol(summary, env_name):
    """A run's departures from the paper's protocol on one game, in one line ("": none)."""
    return "; ".join(summary["envs"][env_name].get("protocol_differences") or [])


def compare_markdown(summaries, pairs=None):
    """Runs side by side: progression (BALROG's mean ± s.e., marked † off the paper's protocol),
    its intervals, cost and behaviour; `pairs` (paired_blocks) below them."""
    envs_seen = sorted({e for s in summaries for e in s["envs"]})
    head = "| run | model | scaffold | agent | " + " | ".join(f"{e} %" for e in envs_seen) + " |"
    lines = [head, "|" + " --- |" * (4 + len(envs_seen))]
    for s in summaries:
        cells = [_pct(s["envs"][e]["progression_pct"]) + " †" * bool(off_protocol(s, e)) if e in s["envs"] else "-"
                 for e in envs_seen]
        agent_name = s.get("agent") or "?"
        if s.get("specialist"):
            agent_name += " + specialist"
        lines.append(f"| {s['run']} | {s.get('model')} | {s.get('scaffold')} | {agent_name} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| run | game | episodes | mean | 95 % CI | IQM | 95 % CI |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        rows = [(e, s["envs"][e]["intervals"], s["envs"][e]["progression_pct"]["n"]) for e in envs_seen if e in s["envs"]]
        if len(rows) > 1:
            rows.append(("overall", s["overall_intervals"], sum(n for _, _, n in rows)))
        lines += [f"| {s['run']} | {e} | {n} | {iv['mean']:.2f} | {_ci(iv['mean_ci'])} | {iv['iqm']:.2f} | {_ci(iv['iqm_ci'])} |"
                  for e, iv, n in rows]
    lines += ["", "| run | LLM calls | prompt tokens | completion tokens | tokens per step |", "| --- | --- | --- | --- | --- |"]
    for s in summaries:
        c = s.get("cost", {})
        lines.append(f"| {s['run']} | {_fmt(c.get('llm_calls'))} | {_fmt(c.get('prompt_tokens'))} | "
                     f"{_fmt(c.get('completion_tokens'))} | {_fmt(c.get('tokens_per_step'))} |")
    lines += ["", "| run | unproductive | redundant writes | empty searches | prompt tok/step | LOG writes/SEARCH |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        b = s.get("behaviour", {})
        lines.append(f"| {s['run']} | {_fmt(b.get('unproductive_action_rate'))} | "
                     f"{_fmt(b.get('redundant_write_rate'))} | {_fmt(b.get('empty_search_rate'))} | "
                     f"{_fmt(b.get('mean_prompt_tokens_per_step'))} | {_fmt(b.get('log_writes_per_search'))} |")
    lines += ["", *(pairs or [])]
    flagged = [f"- † {s['run']}, {e}: not the paper's protocol, so not comparable with the paper's rows: "
               f"{off_protocol(s, e)}." for s in summaries for e in envs_seen if e in s["envs"] and off_protocol(s, e)]
    degenerate = [f"- {s['run']}, {e}: {s['envs'][e]['intervals']['degenerate']}." for s in summaries
                  for e in envs_seen if e in s["envs"] and s["envs"][e]["intervals"]["degenerate"]]
    lines += [*flagged, *degenerate, *([""] if flagged or degenerate else []), INTERVALS_NOTE, "", BEHAVIOUR_NOTE]
    return "\n".join(lines) + "\n"


# The paper's table: a row per agent, one column per game and the overall, beside the paper's rows.
PAPER_SCAFFOLDS = {"crafter": "crafter_v5", "minihack": "minihack_v4", "nle": "nethack_v2"}   # loop #1's result per game
PAPER_ROWS = {   # our row -> the paper's row of the same agent (data/reference_results.json)
    "naive": "Qwen2.5-32B-Instruct sliding window",
    "cot": "Qwen2.5-32B-Instruct sliding window + chain-of-thought",
    "v0": "AutoMem v0 (memory-as-file-system)",
    "+ scaffold opt.": "AutoMem + scaffold opt. (loop 1)",
    "+ memory training": "AutoMem + memory training (loop 2)",
}


def table_row(summary):
    """The table row a run belongs to: BALROG's agents by name; AutoMem by scaffold, a game's
    converged scaffold (PAPER_SCAFFOLDS) being '+ scaffold opt.' and, with a specialist,
    '+ memory training'; any other scaffold under its own name."""
    if summary.get("agent") != "memory":
        return summary.get("agent") or "?"
    converged = summary.get("scaffold") in PAPER_SCAFFOLDS.values()
    if summary.get("specialist"):
        return "+ memory training" if converged else f"{summary.get('scaffold')} + specialist"
    return "+ scaffold opt." if converged else summary.get("scaffold") or "?"


def table_rows(summaries):
    """{row: {game: summary}} in the paper's order, then any other row; a game twice in a row is
    an error (which run would the cell show?)."""
    rows = {}
    for s in summaries:
        cells = rows.setdefault(table_row(s), {})
        for env_name in s["envs"]:
            if env_name in cells:
                raise UsageError(f"two runs give row {table_row(s)!r} its {env_name} cell: "
                                 f"{cells[env_name]['run']} and {s['run']}")
            cells[env_name] = s
    order = list(PAPER_ROWS)
    return dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def protocol_episodes(env_name):
    """How many episodes the paper's protocol plays on a game (every task, every report seed)."""
    return len(envs.TASKS[env_name]) * len(PAPER_SEEDS[env_name])


COST_KEYS = ("llm_calls", "prompt_tokens", "completion_tokens", "steps")


def projected_cost(c, env_name):
    """One game's calls and tokens on the paper's protocol, from a run's per-step rates: rate x the
    game's step limit x the protocol's episodes. An upper bound: episodes that end early (death,
    a solved task, NetHack's no-progress timeout) take fewer steps."""
    steps = envs.MAX_STEPS[env_name] * protocol_episodes(env_name)
    return {**{k: c[k] / c["steps"] * steps if c["steps"] else None for k in COST_KEYS[:3]}, "steps": steps}


def _add(costs):
    return {k: None if any(c[k] is None for c in costs) else sum(c[k] for c in costs) for k in COST_KEYS}


def _num(v):
    return "-" if v is None else f"{v:,.0f}"


def table_markdown(summaries):
    """The paper's table from run summaries: one row per agent (table_row), one column per game and
    the overall (BALROG's mean ± SE; † off the paper's protocol), each row followed by the paper's
    number for it, BALROG's leaderboard below; the same rows' bootstrap intervals and IQM; then the
    LLM calls and tokens each row took, and, for rows run off the protocol (a pilot), those
    projected to the protocol."""
    ref = json.loads(REFERENCE.read_text())["rows"]
    rows = table_rows(summaries)
    games = list(envs.ENVS)
    models = sorted({str(s.get("model")) for s in summaries})
    head = "| agent | model | " + " | ".join(f"{g} %" for g in games) + " | overall % |"
    lines = ["# The paper's table", "",
             f"Model{'s' * (len(models) > 1)}: **{', '.join(models)}**. Progression in %, mean ± standard error "
             "over episodes (BALROG's statistics: a game's tasks pooled; overall: the mean of the games' means, "
             f"SE sqrt(sum SE²) / games). Each row is followed by the paper's number for it ({agent_mod.PAPER_MODEL})."
             + (" **A tiny random model proves plumbing, not skill.**" if "tiny-random" in models else ""), "",
             head, "|" + " --- |" * (len(games) + 3)]
    flagged = {}
    for name, cells in rows.items():
        row_models = sorted({str(s.get("model")) + (f" + specialist {s['specialist']}" if s.get("specialist") else "")
                             for s in cells.values()})
        texts, off = [], False
        for g in games:
            if g not in cells:
                texts.append("-")
                continue
            differences = off_protocol(cells[g], g)
            if differences:
                flagged.setdefault(f"{g}: {differences}", []).append(name)
                off = True
            texts.append(_pct(cells[g]["envs"][g]["progression_pct"]) + " †" * bool(differences))
        whole = overall([cells[g]["envs"][g]["progression_pct"] for g in games]) if set(games) <= set(cells) else None
        texts.append(_pct(whole) + " †" * off if whole else "-")   # an overall of an off-protocol cell is off it too
        lines.append(f"| **{name}** | {', '.join(row_models)} | " + " | ".join(texts) + " |")
        paper = next((r for r in ref if r["agent"] == PAPER_ROWS.get(name)), None)
        if paper:
            lines.append(f"| paper: {paper['agent']} | {agent_mod.PAPER_MODEL} | "
                         + " | ".join(_pct(_ref(paper[g])) for g in games) + f" | {_pct(_ref_overall(paper, games))} |")
    lines += ["", "BALROG's leaderboard, as the paper quotes it (BALROG's own settings, not the paper's protocol):", "",
              "| model | " + " | ".join(f"{g} %" for g in games) + " | overall % |", "|" + " --- |" * (len(games) + 2)]
    for r in ref:
        if "(balrog)" in r["group"]:
            lines.append(f"| {r['agent']} | " + " | ".join(_pct(_ref(r[g])) for g in games)
                         + f" | {_pct(_ref_overall(r, games))} |")
    if flagged:
        lines += ["", "† Not the paper's protocol, so not comparable with the paper's numbers:"]
        lines += [f"- {text} ({', '.join(names)})" for text, names in flagged.items()]
    lines += ["", "## Intervals", "", "The mean and the IQM of each cell above, each with its 95 % stratified-bootstrap "
              "interval (the paper's rows have none).", "",
              "| agent | " + " | ".join(f"{g} %" for g in games) + " | overall % |", "|" + " --- |" * (len(games) + 2)]
    degenerate = {}
    for name, cells in rows.items():
        estimates = {g: cells[g]["envs"][g]["intervals"] for g in games if g in cells}
        if set(games) <= set(cells):
            estimates["overall"] = interval_estimates({g: task_scores(cells[g]["envs"][g]["tasks"]) for g in games})
        for where, iv in estimates.items():
            if iv["degenerate"]:
                degenerate.setdefault(iv["degenerate"], []).append(f"{name} {where}")
        lines.append(f"| {name} | " + " | ".join(_interval_cell(estimates.get(g)) for g in [*games, "overall"]) + " |")
    lines += [""] * bool(degenerate) + [f"- ‡ {reason}: {', '.join(where)}" for reason, where in degenerate.items()]
    lines += ["", INTERVALS_NOTE]
    lines += ["", "## Cost", "", "LLM calls (one per model turn), tokens and steps of each row's finished episodes.", "",
              "| agent | game | LLM calls | prompt tokens | completion tokens | steps |", "| --- | --- | --- | --- | --- | --- |"]
    projections = []
    for name, cells in rows.items():
        spent = {g: s["envs"][g]["cost"] for g, s in cells.items()}
        projected = {g: projected_cost(c, g) for g, c in spent.items()}
        lines += _cost_lines(name, spent)
        if any(off_protocol(s, g) for g, s in cells.items()):
            projections += _cost_lines(name, projected)
    if projections:
        limits = ", ".join(f"{g} {protocol_episodes(g)} x {envs.MAX_STEPS[g]:,}" for g in games)
        lines += ["", "Projected to the paper's protocol, for the rows run off it (a pilot: e.g. --max-steps 50): each "
                  "game's calls and tokens per step in this run x its step limit x the protocol's episodes "
                  f"(episodes x steps: {limits}). An upper bound on steps: episodes that end early (death, a solved "
                  "task, NetHack's no-progress timeout) take fewer. Tokens per step are the pilot's: a memory "
                  "scaffold's prompts grow with its files over a long episode, and a pilot with a smaller "
                  "--max-new-tokens than the protocol's 4096 writes shorter replies.", "",
                  "| agent | game | LLM calls | prompt tokens | completion tokens | steps |",
                  "| --- | --- | --- | --- | --- | --- |", *projections]
    unfinished = [s for s in summaries if s.get("unfinished")]
    if unfinished:
        lines += ["", "Unfinished episodes, not scored (rerun paper_table.sh, or eval.py --resume, to finish them):"]
        lines += [f"- {table_row(s)} ({s['run']}): {len(s['unfinished'])}" for s in unfinished]
    lines += ["", "Runs: " + "; ".join(f"{table_row(s)}: {s['run']}" for s in summaries) + "."]
    return "\n".join(lines) + "\n"


def _interval_cell(iv):
    """A row's mean and IQM with their intervals ("-": no runs there); ‡ marks a degenerate interval."""
    return "-" if iv is None else (f"{iv['mean']:.2f} {_ci(iv['mean_ci'])}; IQM {iv['iqm']:.2f} {_ci(iv['iqm_ci'])}"
                                   + " ‡" * bool(iv["degenerate"]))


def _cost_lines(name, per_game):
    """A row's cost lines: one per game, and their sum when there are several."""
    lines = [(g, c) for g, c in per_game.items()] + ([("all", _add(list(per_game.values())))] if len(per_game) > 1 else [])
    return [f"| {name} | {g} | " + " | ".join(_num(c[k]) for k in COST_KEYS) + " |" for g, c in lines]


def _ref(pair):
    return {"mean": pair[0], "stderr": pair[1]}


def _ref_overall(row, games):
    return overall([_ref(row[g]) for g in games])


def episode_scores(summary, env_name):
    """(task, seed) -> progression % of every finished episode of a game."""
    return {(t, seed): score for t, g in summary["envs"][env_name]["tasks"].items()
            for seed, score in zip(g["seeds"], g["scores_pct"])}


def paired_blocks(summaries):
    """The first run (A) against each other (B), game by game, where both ran the same episodes
    (same tasks and seeds): the paired difference, P(A > B) and the gate's p; otherwise one line
    saying why not."""
    first, lines = summaries[0], []
    for other in summaries[1:]:
        rows, unpaired, notes = [], [], []
        for env_name in sorted(set(first["envs"]) & set(other["envs"])) or [None]:
            if env_name is None:
                unpaired.append("they ran no game in common")
                continue
            a, b = episode_scores(first, env_name), episode_scores(other, env_name)
            if set(a) != set(b):
                unpaired.append(f"on {env_name} they ran other episodes ({_episodes_text(env_name, a)} vs "
                                f"{_episodes_text(env_name, b)})")
                continue
            c = paired_comparison(a, b)
            rows.append(f"| {env_name} | {c['n']} | {c['diff']:+.2f} | {_ci(c['diff_ci'])} | {c['p_improvement']:.2f} | "
                        f"{_ci(c['p_improvement_ci'])} | {c['p_value']:.4f} |")
            notes += [f"{env_name}: {c['degenerate']}."] if c["degenerate"] else []
        if rows:
            lines += [f"Paired: A = {first['run']} against B = {other['run']}, episode by episode on the same seeds.", "",
                      "| game | pairs | A - B, mean | 95 % CI | P(A > B) | 95 % CI | p (A > B) |",
                      "| --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
        if unpaired:
            notes.append(f"{first['run']} and {other['run']} cannot be paired: {'; '.join(unpaired)}.")
        lines += [*notes, *([""] if notes else [])]
    return lines + ([PAIRED_NOTE, ""] if len(summaries) > 1 else [])


PAIRED_NOTE = (
    "Paired: A - B is the mean over episode pairs (same game, task and seed) of A's progression minus B's, in "
    "points, with its stratified-bootstrap interval (each task's pairs resampled on their own). P(A > B), the "
    "probability of improvement: the chance that an episode of A scores above one of B on the same task, ties "
    "counting half (rliable's; each run's episodes resampled on their own for its interval). p: the gate's "
    "one-sided paired sign-flip test of A > B (meta_scaffold.py gate), exact up to 16 pairs.")


def plot_progression(summaries, out):
    """Per game, top: each run's mean progression with its 95 % bootstrap interval and its IQM,
    beside the paper's rows (BALROG's frontier models dashed, the paper's AutoMem rows dotted);
    bottom: the score distribution, the fraction of episodes above each progression level, one
    line per run. A run off the paper's protocol is marked † and the figure says how."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = json.loads(REFERENCE.read_text())["rows"]
    references = [(r, "--") for r in ref if r["group"].startswith("frontier")] + \
                 [(r, ":") for r in ref if r["group"].startswith("AutoMem")]
    envs_seen = sorted({e for s in summaries for e in s["envs"]})
    fig, axes = plt.subplots(2, len(envs_seen), figsize=(4.6 * len(envs_seen) + 1, 8.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    levels = np.linspace(0, 100, 401)
    for (ax, dist), env_name in zip(axes.T, envs_seen):
        runs = [s for s in summaries if env_name in s["envs"]]
        ivs = [s["envs"][env_name]["intervals"] for s in runs]
        means = np.array([iv["mean"] for iv in ivs])
        cis = np.array([iv["mean_ci"] or (iv["mean"], iv["mean"]) for iv in ivs])
        x = np.arange(len(runs))
        bars = ax.bar(x, means, yerr=[means - cis[:, 0], cis[:, 1] - means], capsize=4, color="#4C72B0",
                      alpha=0.85, label="mean, 95 % CI")
        ax.scatter(x, [iv["iqm"] for iv in ivs], marker="D", color="black", zorder=3, s=18, label="IQM")
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=8)
        names = [s["run"] + " †" * bool(off_protocol(s, env_name)) for s in runs]
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        for i, (r, style) in enumerate(references):
            color = colors[(i + 1) % len(colors)]
            ax.axhline(r[env_name][0], ls=style, lw=1, color=color, label=f"{r['agent']} {r[env_name][0]:.1f}")
            dist.axvline(r[env_name][0], ls=style, lw=0.8, color=color)
        top = max([*cis[:, 1], *(r[env_name][0] for r, _ in references), 1])
        ax.set_ylim(0, top * 1.7)  # headroom: the legend sits above the reference lines
        ax.set_title(env_name)
        ax.set_ylabel("progression (%)")
        ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.9)
        for k, (s, name) in enumerate(zip(runs, names)):
            scores = np.asarray(s["envs"][env_name]["scores_pct"])
            dist.step(levels, (scores[:, None] > levels).mean(0), where="post", color=colors[k % len(colors)],
                      label=f"{name} ({len(scores)})")
        dist.set_xlabel("progression level (%); reference means as vertical lines")
        dist.set_ylabel("fraction of episodes above")
        dist.set_ylim(0, 1.05)
        dist.legend(fontsize=7, loc="upper right")
    models = sorted({str(s.get("model")) for s in summaries})
    fig.suptitle("Progression: mean with 95 % stratified-bootstrap CI, IQM\nmodel: " + ", ".join(models), fontsize=10)
    flagged = sorted({s["run"] for s in summaries for e in s["envs"] if off_protocol(s, e)})
    if flagged:
        fig.text(0.01, 0.005, f"† not the paper's protocol, not comparable with its rows: {', '.join(flagged)} "
                 "(eval.py report lists how)", fontsize=8, color="darkred")
    fig.tight_layout(rect=(0, 0.03 if flagged else 0, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Running an evaluation
# ---------------------------------------------------------------------------------------------

class UsageError(Exception):
    pass


def parse_seeds(text):
    """'42-51', '1,5,9', '42-44,60' -> sorted unique ints."""
    seeds = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UsageError(f"malformed seed list {text!r}: use e.g. 42-51 or 1,5,9")
        a = int(m.group(1))
        seeds.update(range(a, int(m.group(2) or a) + 1))
    return sorted(seeds)


def plan_jobs(args):
    """(env, task, seed) of every episode the command asks for."""
    env_names = list(envs.ENVS) if args.env == "all" else [args.env]
    if args.tasks:
        known = {t for e in env_names for t in envs.TASKS[e]}
        unknown = [t for t in args.tasks if t not in known]
        if unknown:
            raise UsageError(f"unknown task {unknown[0]!r} for --env {args.env}; valid: {', '.join(sorted(known))}")
    jobs = []
    for env_name in env_names:
        tasks = [t for t in args.tasks if t in envs.TASKS[env_name]] if args.tasks else envs.TASKS[env_name]
        if args.seeds:
            seeds = parse_seeds(args.seeds)
        elif args.episodes:
            seeds = list(range(FIRST_SEED, FIRST_SEED + args.episodes))
        else:
            seeds = list(PAPER_SEEDS[env_name])
        jobs += [(env_name, t, s) for t in tasks for s in seeds]
    return jobs


def check_args(args):
    """Everything that can be wrong with the command line, before any model is loaded."""
    if args.env not in (*envs.ENVS, "all"):
        raise UsageError(f"unknown env {args.env!r}; valid: {', '.join(envs.ENVS)}, all")
    if args.agent not in agent_mod.AGENTS:
        raise UsageError(f"unknown agent {args.agent!r}; valid: {', '.join(agent_mod.AGENTS)}")
    if args.episodes is not None and args.episodes < 1:
        raise UsageError("--episodes must be at least 1")
    if args.specialist and args.agent != "memory":
        raise UsageError("--specialist runs memory turns: it needs --agent memory")
    if args.specialist and not args.base_url and not Path(args.specialist).is_dir():
        raise UsageError(f"--specialist {args.specialist!r}: no adapter folder there (with --base-url "
                         "it is the served LoRA's model name)")
    if any(n is not None and n < 1 for n in (args.concurrency, args.max_steps, args.batch_tokens, args.gpus_per_process)):
        raise UsageError("--concurrency, --max-steps, --batch-tokens and --gpus-per-process must be at least 1")
    if not (args.retries >= 0 and args.backoff >= 0 and args.max_failures >= 1 and 0 < args.timeout < math.inf):
        raise UsageError("--retries and --backoff must be at least 0, --max-failures at least 1, --timeout "
                         "a number of seconds above 0")
    if args.shard:
        parse_shard(args.shard)
    try:
        scaffold = agent_mod.load_scaffold(args.scaffold)
    except agent_mod.ScaffoldError as e:
        raise UsageError(str(e))
    jobs = plan_jobs(args)
    if args.agent == "memory" and scaffold.plays_problem(sorted({e for e, _, _ in jobs})):
        raise UsageError(scaffold.plays_problem(sorted({e for e, _, _ in jobs})) + ": choose its --env")
    if any(e == "minihack" and "Boxoban" in t for e, t, _ in jobs):
        try:
            envs._boxoban_folder()
        except FileNotFoundError as e:
            raise UsageError(str(e))
    return scaffold, jobs


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _versions():
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "openai", "crafter", "nle", "minihack"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def make_config(args, scaffold, jobs):
    return {
        "env": args.env, "tasks": sorted({t for _, t, _ in jobs}),
        "seeds": sorted({s for _, _, s in jobs}), "episodes": len(jobs),
        "seeds_by_env": {e: sorted({s for e2, _, s in jobs if e2 == e}) for e in dict.fromkeys(e for e, _, _ in jobs)},
        "scaffold": scaffold.name, "scaffold_path": str(scaffold.path),
        "scaffold_hash": scaffold.content_hash(), "agent": args.agent, "model": args.model,
        "base_url": args.base_url, "specialist": args.specialist,
        "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "top_p": args.top_p,
        "max_steps": args.max_steps, "concurrency": args.concurrency,
        "nle_seeded": not args.unseeded, "minihack_autopickup": args.autopickup,
        "nle_no_progress_timeout": envs.NO_PROGRESS_TIMEOUT,
        "boxoban_levels": os.environ.get("BOXOBAN_LEVELS"),
        "git_commit": _git_commit(), "versions": _versions(),
        "command": " ".join(sys.argv),
    }


# settings that must match for --resume to continue a run rather than mix two
RESUME_KEYS = ("env", "scaffold_hash", "agent", "model", "base_url", "specialist", "temperature",
               "max_new_tokens", "top_p", "max_steps", "nle_seeded", "minihack_autopickup")


def prepare_run(args, scaffold, jobs, shared):
    """The run folder and its config. A run folder that holds a run is continued only with
    --resume, or by another process of the same run (`shared`: a launcher's rank, a --shard),
    and only with the same settings."""
    out = Path(args.out)
    config = make_config(args, scaffold, jobs)
    old = out / "config.json"
    if old.exists():
        if not (args.resume or shared):
            raise UsageError(f"{out} already holds a run: pass --resume to continue it, or another --out")
        prev = json.loads(old.read_text())
        # processes of one run must also plan the same episodes, or their shares would not add up
        keys = RESUME_KEYS + (("tasks", "seeds", "seeds_by_env") if shared else ())
        if config["agent"] != "memory":   # BALROG's agents use no scaffold: a changed one changes nothing
            keys = tuple(k for k in keys if k != "scaffold_hash")
        changed = [k for k in keys if prev.get(k) != config.get(k)]
        if changed:
            raise UsageError(f"{'--resume' if args.resume else 'this process'}: {out} was run with other "
                             f"settings ({', '.join(changed)})")
    return out, config


def parse_shard(text):
    """'i/n' (0 <= i < n) -> (i, n)."""
    m = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UsageError(f"malformed --shard {text!r}: use i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def my_share(jobs, shard=(0, 1), environ=os.environ):
    """The episodes this process runs, and how many processes share the run: shard i of n
    (independent jobs, e.g. a Slurm array), and within it rank r of w of a launcher (torchrun and
    accelerate launch set RANK and WORLD_SIZE). No process group is made and no process waits for
    another: they share only the run folder."""
    i, n = shard
    r, w = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
    return jobs[i * w + r::n * w], n * w


def episode_env(config, env_name, task, seed):
    """The game of one episode as the run's config.json sets it: the run's step limit
    (`max_steps`, None: the paper's) is the game's own, so a longer limit really plays longer (a
    MiniHack task's built-in limit, 200 to 1000 steps, still applies); NetHack's seeding and
    MiniHack's autopickup as recorded."""
    options = {"nle": {"seeded": config.get("nle_seeded", True)},
               "minihack": {"autopickup": config.get("minihack_autopickup", False)}}.get(env_name, {})
    return envs.make_env(env_name, task, seed=seed, max_steps=config.get("max_steps"), **options)


def load_backend(args):
    """The model, or a one-line reason it cannot be used here: a server that does not serve
    --model / --specialist, a model that does not fit this process's GPUs, one that does not load."""
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.base_url:
        backend = agent_mod.OpenAIBackend(args.base_url, args.model, specialist=args.specialist,
                                          timeout=args.timeout, max_retries=args.retries, backoff=args.backoff,
                                          max_failures=args.max_failures, **kwargs)
        try:
            agent_mod.require_models(backend.client, args.base_url, [args.model, args.specialist],
                                     "--model and --specialist", min(args.timeout, 60))
        except agent_mod.EndpointError as e:
            raise UsageError(str(e))
        return backend
    try:
        import torch
        gpus = None
        if torch.cuda.is_available():
            gpus = agent_mod.process_gpus(torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0)),
                                          int(os.environ.get("LOCAL_WORLD_SIZE", 1)), args.gpus_per_process)
        backend = agent_mod.HFBackend(args.model, adapter=args.specialist, gpus=gpus,
                                      batch_tokens=args.batch_tokens, **kwargs)
    except agent_mod.DoesNotFit as e:
        raise SystemExit(f"eval.py: {e}")
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SystemExit(f"eval.py: cannot load model {args.model!r} here ({type(e).__name__}: {reason}). "
                         "For an offline smoke run use --model tiny-random; to use a served model pass "
                         "--base-url http://HOST:PORT/v1 --model NAME.")
    if backend.plan:
        p = backend.plan
        print(f"GPUs {gpus}: {p['weights_gib']:.1f} GiB of weights + {p['kv_gib']:.1f} GiB of KV cache for "
              f"batches of {p['batch_tokens']:,} tokens, of {p['usable_gib']:.1f} GiB usable", file=sys.stderr)
    return backend


def print_unfinished(run, episode, reason):
    path = error_path(run, *episode)
    print(f"unfinished: {' '.join(map(str, episode))}: {reason}"
          + (f" (traceback in {path})" if path.exists() else ""), file=sys.stderr)


def write_summary(run):
    """summary.json and report.md from the run folder's files; returns the summary."""
    summary = summarize(run)
    write_json(Path(run) / "summary.json", summary)
    write_text(Path(run) / "report.md", report_markdown(summary))
    return summary


def print_summary(run, summary):
    for env_name, e in summary["envs"].items():
        p = e["progression_pct"]
        print(f"{env_name}: progression {p['mean']:.2f} ± {p['stderr']:.2f} % over {p['n']} "
              f"episodes ({summary.get('model')})")
    if summary.get("backend"):
        print(f"backend: {summary['backend']['requests']} requests, error rate {_fmt(summary['backend']['error_rate'])}")
    for u in summary["unfinished"]:
        print_unfinished(run, (u["env"], u["task"], u["seed"]), u["reason"])
    print(f"wrote {run}/summary.json and {run}/report.md"
          + (f"; {len(summary['unfinished'])} episode(s) unfinished: rerun with --resume"
             if summary["unfinished"] else ""))


def default_run_name(args):
    """<env>_<scaffold>_<model>[+<specialist>] for AutoMem, <env>_<agent>_<model> for BALROG's agents."""
    model = args.model.split("/")[-1]
    if args.agent != "memory":
        return f"{args.env}_{args.agent}_{model}"
    specialist = f"+{Path(args.specialist.rstrip('/')).name}" if args.specialist else ""
    return f"{args.env}_{Path(args.scaffold).name}_{model}{specialist}"


def run_eval(args):
    scaffold, jobs = check_args(args)
    mine, processes = my_share(jobs, parse_shard(args.shard) if args.shard else (0, 1))
    out, config = prepare_run(args, scaffold, jobs, shared=processes > 1)
    from tqdm import tqdm

    done = set(finished_episodes(out))
    mine = [j for j in mine if j not in done]
    backend = None
    if mine or not (out / "config.json").exists():   # a finished run resumed needs no model
        backend = load_backend(args)     # before anything is written: a failed load leaves no run
        config["sampling"] = backend.sampling    # what the run sets; a server gets exactly these
        if not args.base_url:   # HF: the model's own settings, and what generate receives from both
            config["model_generation_config"] = backend.model_generation_config
            config["generate_kwargs"] = backend.generate_kwargs()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):   # the first process of the run writes it
        write_json(out / "config.json", config, replace=False)
    for j in mine:   # a rerun's stale reasons go; the episodes' ends write them anew
        error_path(out, *j).unlink(missing_ok=True)
    show = int(os.environ.get("RANK", 0)) == 0 and bool(mine)
    bar_eps = tqdm(total=len(mine), desc="episodes", position=0, disable=not show)
    bar_steps = tqdm(desc="steps", unit="step", position=1, disable=not show)
    running, failed = {}, []

    def episode(env_name, task, seed):
        trace_path, result_path, memory_dir = episode_paths(out, env_name, task, seed)
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        env = episode_env(config, env_name, task, seed)
        ag = agent_mod.make_agent(args.agent, env, scaffold, memory_dir, two_model=bool(args.specialist))
        writer = TraceWriter(trace_path)  # truncates a partial trace from a killed run
        key = (env_name, task, seed)

        def on_step(record):
            writer.write(record)
            running[key] = record["progression"]
            bar_steps.update(1)
            bar_steps.set_postfix(running=len(running),
                                  progression=f"{sum(running.values()) / len(running):.3f}")
        try:
            result = yield from agent_mod.play(env, ag, seed, on_step)   # the game ends at max_steps
        finally:
            writer.close()
            ag.close()
            running.pop(key, None)
        finish_trace(trace_path)
        result.update(env=env_name, task=task, scaffold=scaffold.name, agent=args.agent,
                      model=args.model, specialist=args.specialist)
        write_json(result_path, result)   # its presence marks the episode finished
        return result

    def on_done(i, result):
        bar_eps.update(1)
        if isinstance(result, agent_mod.Unfinished):   # the trace stays; no result file
            error_path(out, *mine[i]).write_text(f"{result.reason}\n\n{result.traceback}")
            failed.append((mine[i], result.reason))
            bar_eps.set_postfix(unfinished=len(failed))

    interrupted = False
    try:
        agent_mod.run_episodes([episode(*j) for j in mine], backend, concurrency=args.concurrency,
                               on_done=on_done)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar_steps.close()
        bar_eps.close()
    ended = [j for j in jobs if episode_paths(out, *j)[1].exists() or error_path(out, *j).exists()]
    if interrupted or len(ended) < len(jobs):   # else the summary lists them
        for episode_key, reason in failed:
            print_unfinished(out, episode_key, reason)
    if interrupted:
        print(f"interrupted: {len(finished_episodes(out))} of {len(jobs)} episodes finished in {out}; "
              "rerun the same command with --resume to finish the rest", file=sys.stderr)
        return 130
    if len(ended) < len(jobs):   # another process is still at work: the last one to end summarizes
        # and exits 1 for the unfinished. Under a launcher (WORLD_SIZE set) exiting 1 here would make
        # it stop the others; an independent --shard job (a Slurm array task) exits 1 for its own.
        launched = "WORLD_SIZE" in os.environ
        print(f"{len(ended)} of {len(jobs)} episodes of {out} have ended; the last process of the run writes "
              f"summary.json (or run: python eval.py summarize {out})"
              + (f"; this one exits {0 if launched else 1}: {len(failed)} of its episodes are unfinished "
                 "(their error files say why; the summary lists them)" if failed else ""))
        return 1 if failed and not launched else 0
    summary = write_summary(out)
    print_summary(out, summary)
    return 1 if summary["unfinished"] else 0


def run_summarize(args):
    if problem := not_a_run([args.run]):
        raise UsageError(problem)
    summary = write_summary(args.run)
    print_summary(args.run, summary)
    return 1 if summary["unfinished"] else 0


def run_report(args):
    if problem := not_a_run(args.runs):
        raise UsageError(problem)
    summaries = [summarize(run) for run in args.runs]
    table = compare_markdown(summaries, paired_blocks(summaries))
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.plot:
        plot_progression(summaries, args.plot)
        print(f"wrote {args.plot}")
    return 0


def run_table(args):
    if problem := not_a_run(args.runs):
        raise UsageError(problem)
    table = table_markdown([{**summarize(run), "run": str(run)} for run in args.runs])
    print(table)
    if args.out:
        write_text(args.out, table)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Replays: the same seed, several runs, panels in lockstep
# ---------------------------------------------------------------------------------------------

REPLAY_TEMPLATE = ROOT / "data" / "replay.html"
RESULT_CHARS = 600      # memory-op results shown under a frame are cut here


def _picture(env):
    """The frame of the state the agent sees now: Crafter's rendered image as WebP (base64),
    NetHack / MiniHack's terminal as rows of characters and of colour digits. Crafter frames are
    scaled to 144 px, its art's own 16 px per cell: a third of the bytes of the 256 px render."""
    if env.name == "crafter":
        import base64
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(env.frame).resize((144, 144), Image.LANCZOS).save(buf, format="WEBP", quality=60, method=4)
        return base64.b64encode(buf.getvalue()).decode()
    raw = env.last_obs
    return {"chars": [bytes(r).decode("latin-1") for r in raw["tty_chars"]],
            "colors": ["".join("0123456789abcdef"[int(c) & 15] for c in r) for r in raw["tty_colors"]]}


def _ops_for_page(routine):
    return [{"op": o["op"], "args": [str(a) for a in o.get("args", [])], "error": o.get("error"),
             "result": None if o.get("result") is None else
             (o["result"] if len(o["result"]) <= RESULT_CHARS else o["result"][:RESULT_CHARS] + " [...]")}
            for o in routine_ops(routine)]


def replay_panel(run, seed, task=None):
    """Rebuild one run's episode on the seeded game from its recorded actions, checking every
    observation against the trace; the first difference stops the panel there."""
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    found = sorted({(p.parent.parent.name, p.parent.name) for name in (f"ep_{seed}.jsonl", f"ep_{seed}.jsonl.gz")
                    for p in run.glob(f"*/*/{name}") if task is None or p.parent.name == task})
    if not found:
        raise UsageError(f"{run} has no episode with seed {seed}" + (f" on {task}" if task else ""))
    if len(found) > 1:
        raise UsageError(f"{run} has seed {seed} on several tasks ({', '.join(t for _, t in found)}): pass --task")
    env_name, task_name = found[0]
    records = read_trace(episode_paths(run, env_name, task_name, seed)[0])
    env = episode_env(cfg, env_name, task_name, seed)
    obs = env.reset(seed=seed)
    frames, frame_ids, steps, diverged = [], {}, [], None
    for rec in records:
        if obs["text"] != rec["observation"]:
            diverged = {"step": rec["step"], "reason": "the rebuilt observation differs from the trace's"}
            break
        picture = _picture(env)
        key = json.dumps(picture) if isinstance(picture, dict) else picture
        if key not in frame_ids:
            frame_ids[key] = len(frames)
            frames.append(picture)
        steps.append({"f": frame_ids[key], "obs": rec["observation"],
                      "routines": [[name, _ops_for_page(r)] for name, r in routines(rec)],
                      "action": rec["action"], "reward": rec["reward"], "progression": rec["progression"]})
        obs, _, _, info = env.step(rec["action"]["executed"])
        if info["executed_action"] != rec["action"]["executed"]:
            diverged = {"step": rec["step"] + 1, "reason": "the game ran another action than the trace says"}
            break
    return {"run": run.name, "scaffold": cfg.get("scaffold"), "model": cfg.get("model"),
            "specialist": cfg.get("specialist"), "env": env_name, "task": task_name, "seed": seed,
            "final_progression": records[-1]["progression"] if records else 0.0,
            "kind": "image" if env_name == "crafter" else "tty", "frames": frames, "steps": steps,
            "diverged": diverged}


def build_replay(runs, seed, task=None):
    """The self-contained HTML page: every byte of data inline, deflated."""
    import base64
    import zlib
    panels = [replay_panel(run, seed, task) for run in runs]
    packed = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = packed.compress(json.dumps({"panels": panels}, separators=(",", ":")).encode()) + packed.flush()
    title = f"replay: seed {seed}, {panels[0]['env']} {panels[0]['task']}"
    html = REPLAY_TEMPLATE.read_text().replace("__TITLE__", title)
    return html.replace("__DATA__", base64.b64encode(data).decode()), panels


def run_replay(args):
    if problem := not_a_run(args.runs):
        raise UsageError(problem)
    html, panels = build_replay(args.runs, args.seed, args.task)
    out = Path(args.out or f"replay_{panels[0]['env']}_{args.seed}.html")
    out.write_text(html)
    for panel in panels:
        note = f", STOPPED at step {panel['diverged']['step']}: {panel['diverged']['reason']}" if panel["diverged"] else ""
        print(f"{panel['run']}: {len(panel['steps'])} steps, {len(panel['frames'])} distinct frames{note}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

class DefaultCommandParser(argparse.ArgumentParser):
    """A command line of subcommands, one of them implied: with none named (the first argument an
    option, or no argument) it is `default_command`, so `eval.py --env crafter` is `eval.py run
    --env crafter`; `--help` lists the subcommands. Sets `command` to the subcommand's name."""

    def __init__(self, *args, default_command, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if not args or args[0].startswith("-") and args[0] not in ("-h", "--help"):
            args = [self.default_command, *args]
        return super().parse_known_args(args, namespace)

    def add_subparsers(self, **kwargs):
        return super().add_subparsers(dest="command", parser_class=argparse.ArgumentParser, **kwargs)


def add_run_arguments(p):
    p.add_argument("--env", required=True, help="crafter, minihack, nle or all")
    p.add_argument("--scaffold", default="v0", help="scaffolds/vN name or a scaffold folder")
    p.add_argument("--agent", default="memory",
                   help="memory (AutoMem), or BALROG's naive, cot, robust_naive, robust_cot")
    p.add_argument("--model", default=agent_mod.PAPER_MODEL,
                   help="HF id or path, 'tiny-random', or the served model's name with --base-url")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. vLLM")
    p.add_argument("--specialist", default=None,
                   help="memory specialist: a LoRA adapter folder (HF) or a served model name")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes per task, seeds from 42 (default: the paper's seeds)")
    p.add_argument("--seeds", default=None, help="e.g. 42-51 or 1,5,9 (overrides --episodes)")
    p.add_argument("--concurrency", type=int, default=16, help="episodes in flight at once")
    p.add_argument("--max-steps", type=int, default=None,
                   help="step limit per episode (default: the paper's, 2000 / 100 / 100,000); report.md flags any other")
    p.add_argument("--temperature", type=float, default=PAPER_SAMPLING["temperature"])
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"per model reply (default {PAPER_SAMPLING['max_new_tokens']}; 32 for tiny-random)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sent only when given (default: the model's own generation config)")
    p.add_argument("--out", default=None, help="run folder (default runs/<env>_<scaffold>_<model>; BALROG's agents: runs/<env>_<agent>_<model>)")
    p.add_argument("--resume", action="store_true", help="skip finished episodes, rerun unfinished ones")
    p.add_argument("--shard", default=None, help="i/n: run share i of n of the episodes (0 <= i < n), as one "
                   "of n independent jobs on the same run folder, e.g. a Slurm array")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a server request may take")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed server request")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each "
                   "time, each wait times a random 0.5-1 (defaults: at most 1+2+4+8+16 = 31 s of waiting per "
                   "request; a killed server ends the run within about 1.5 minutes)")
    p.add_argument("--max-failures", type=int, default=3, help="failed requests in a row (retries spent) "
                   "after which the server counts as down: its episodes end unfinished, each after its step")
    p.add_argument("--batch-tokens", type=int, default=None, help="HF: cap on a batch's KV cache in tokens "
                   "(prompts x (longest + max new)); default on GPUs: the most that fits, on CPU: none")
    p.add_argument("--gpus-per-process", type=int, default=None, help="HF: GPUs each process spreads the "
                   "model over (default: the machine's GPUs split evenly among its processes)")
    p.add_argument("--unseeded", action="store_true", help="run NetHack unseeded, as BALROG does")
    p.add_argument("--autopickup", action=argparse.BooleanOptionalAction,
                   default=envs.PROTOCOL["games"]["minihack"]["autopickup"],
                   help="MiniHack autopickup (default on, the paper's setting)")


def build_parser():
    """eval.py's command line; `run` when no subcommand is named."""
    p = DefaultCommandParser(prog="eval.py", default_command="run", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="subcommands (`eval.py SUBCOMMAND --help` shows its options)")
    add_run_arguments(sub.add_parser("run", help="play episodes on fixed seeds into a run folder (the default: "
                                                 "`eval.py --env crafter ...` is `eval.py run --env crafter ...`)"))
    summarize_p = sub.add_parser("summarize", help="summary.json and report.md of a run from its files, at any time")
    summarize_p.add_argument("run")
    report_p = sub.add_parser("report", help="several runs side by side")
    report_p.add_argument("runs", nargs="+")
    report_p.add_argument("--plot", default=None, help="PNG of progression per run with s.e. bars")
    report_p.add_argument("--out", default=None, help="also write the table to this markdown file")
    table_p = sub.add_parser("table", help="the paper's table from runs (scripts/paper_table.sh)")
    table_p.add_argument("runs", nargs="+", help="run folders: a row's runs are told apart by agent, scaffold and specialist")
    table_p.add_argument("--out", default=None, help="also write the table to this markdown file")
    replay_p = sub.add_parser("replay", help="side-by-side HTML replay of one seed")
    replay_p.add_argument("runs", nargs="+")
    replay_p.add_argument("--seed", type=int, required=True)
    replay_p.add_argument("--task", default=None)
    replay_p.add_argument("--out", default=None, help="HTML file (default replay_<env>_<seed>.html)")
    return p


def run_command(args):
    if args.max_new_tokens is None:
        # tiny-random babbles until the cap: a protocol-sized cap makes a smoke run take hours
        args.max_new_tokens = 32 if args.model == "tiny-random" else PAPER_SAMPLING["max_new_tokens"]
    if args.out is None:
        args.out = str(ROOT / "runs" / default_run_name(args))
    return run_eval(args)


COMMANDS = {"run": run_command, "summarize": run_summarize, "report": run_report, "table": run_table,
            "replay": run_replay}


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        p.exit(2, f"eval.py {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
