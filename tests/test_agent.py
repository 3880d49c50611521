"""agent.py: the harness with the v0 scaffold against a real HTTP server (traces, the LOG/PLAN
invariant, failures, concurrency), scaffold loading errors, tiny-random on every game, and
two-model mode with a LoRA adapter. BALROG's baselines: test_baselines.py."""
import json
import re
import shutil

import pytest

import agent
import envs
from agent import HFBackend, OpenAIBackend, Request, ScaffoldError, load_scaffold, make_agent, play, run_episodes
from scripted_server import ScriptedServer

KITCHEN_SINK = agent.ROOT / "tests" / "scaffolds" / "kitchen_sink"


def run_one(env, ag, backend, steps, seed=0, concurrency=1):
    records = []
    result = run_episodes([play(env, ag, seed, records.append, steps)], backend, concurrency)[0]
    # every trace line must survive a JSON round trip, as eval writes it
    records = [json.loads(json.dumps(r)) for r in records]
    return records, result


def last_user(body):
    return next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")


def is_log(body):
    """v0's LOG conversations open with its role line (v0 sends no system message)."""
    return body["messages"][0]["content"].startswith("MEMORY UPDATE")


def lines_of(body, name):
    """The line count a v0 prompt's file index gives for a memory file."""
    return int(re.search(rf"^{re.escape(name)} \((\d+) lines?\)", body["messages"][0]["content"], re.M).group(1))


def crafter_script(body):
    """A realistic scripted model: looks before it writes, logs outcomes, plans from memory."""
    last = last_user(body)
    if is_log(body):
        step = int(re.search(r"\(step (\d+)\)", body["messages"][0]["content"]).group(1)) + 1
        if "[SEARCH" not in last and "[APPEND" not in last:
            return "Let me check my map first.\n<|SEARCH|>map_notes.txt|tree<|END|>"
        if "[SEARCH" in last:
            return (f"Recording the outcome.\n<|APPEND|>survival_log.txt|step {step}: moved, all fine<|END|>\n"
                    f"<|WRITE|>map_notes.txt|tree: seen at step {step}<|END|>")
        return "<|DONE|>"
    if "[READ" not in last:
        return "```\n<|READ|>strategy.txt<|END|>\n```"
    return "My plan says explore.\n<|ACTION|>" + ("Move West" if lines_of(body, "survival_log.txt") % 2 else "Move East") + "<|END|>"


def test_memory_agent_end_to_end_against_server(tmp_path):
    scaffold = load_scaffold("v0")
    with ScriptedServer(crafter_script) as server:
        backend = OpenAIBackend(server.url, "scripted", max_retries=0)
        env = envs.make_env("crafter", seed=7)
        ag = make_agent("memory", env, scaffold, tmp_path / "mem")
        records, result = run_one(env, ag, backend, steps=4, seed=7)
        sent = list(server.requests)
    assert result["steps"] == 4 and len(records) == 4
    # actions reached the game
    assert [r["action"]["executed"] for r in records] == ["Move East", "Move West", "Move East", "Move West"]
    assert all(r["action"]["valid"] for r in records)
    # memory changed exactly as scripted
    files = ag.fs.files()
    assert files["survival_log.txt"].splitlines()[-3:] == [
        "step 1: moved, all fine", "step 2: moved, all fine", "step 3: moved, all fine"]
    assert files["map_notes.txt"] == "tree: seen at step 3\n"
    assert (tmp_path / "mem" / "survival_log.txt").read_text() == files["survival_log.txt"]
    # the trace holds what DESIGN.md lists
    for r in records:
        for key in ("step", "observation", "routines", "plan", "action", "reward", "done", "progression",
                    "tokens", "latency_s", "memory_diff"):
            assert key in r
        assert set(r["action"]) == {"raw", "executed", "valid"}
        assert r["tokens"]["prompt"] > 0 and r["tokens"]["completion"] > 0
    assert records[0]["routines"] == ["plan"] and "log" not in records[0]   # no LOG before the first action
    assert all(r["routines"] == ["log", "plan"] for r in records[1:])
    log = records[2]["log"]
    assert log["ended"] == "done" and [t["role"] for t in log["turns"]] == ["base"] * 3
    assert log["turns"][0]["ops"][0] == {"op": "SEARCH", "args": ["map_notes.txt", "tree"], "error": None,
                                         "kind": "read", "result": "map_notes.txt: 1 line containing 'tree':\n"
                                                                   "tree: seen at step 1", }
    assert [o["kind"] for o in log["turns"][1]["ops"]] == ["write", "write"]
    assert records[2]["memory_diff"] == {
        "survival_log.txt": {"appended": ["step 2: moved, all fine"]},
        "map_notes.txt": {"replaced": "tree: seen at step 2\n"}}
    assert records[2]["plan"]["ended"] == "action"
    # each turn's input, the first input_messages of its routine's conversation, is exactly what
    # the server received
    rebuilt = [r[name]["messages"][:t["input_messages"]] for r in records for name in r["routines"]
               for t in r[name]["turns"]]
    assert rebuilt == [b["messages"] for b in sent]


def test_log_records_only_after_the_environment_answered(tmp_path):
    """The invariant: PLAN cannot write; LOG of step t sees the observation that followed
    action t-1, and every memory change of a step happens in its LOG."""
    def script(body):
        if is_log(body):
            return "<|APPEND|>survival_log.txt|outcome noted<|END|><|DONE|>"
        return "<|APPEND|>survival_log.txt|premature<|END|><|ACTION|>Do<|END|>"
    with ScriptedServer(script) as server:
        backend = OpenAIBackend(server.url, "scripted", max_retries=0)
        env = envs.make_env("crafter", seed=1)
        ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "mem")
        records, _ = run_one(env, ag, backend, steps=3, seed=1)
    for prev, cur in zip(records, records[1:]):
        log_prompt = cur["log"]["messages"][0]["content"]
        assert all(part in log_prompt for part in cur["observation"].split("\n\n"))  # the env's answer to prev's action
        assert f"Your previous action (step {prev['step']}): {prev['action']['raw']}" in log_prompt
    for r in records:
        plan_ops = [op for t in r["plan"]["turns"] for op in t["ops"] if op["op"] == "APPEND"]
        assert plan_ops and plan_ops[0]["error"].startswith("APPEND is not allowed")
    assert "premature" not in ag.fs.read("survival_log.txt")
    assert ag.fs.read("survival_log.txt").count("outcome noted") == 2


def test_invalid_action_is_told(tmp_path):
    """An action the game does not accept runs the game's default (as in BALROG), not the
    scaffold's fallback (v0's is "search", an action in this task)."""
    def script(body):
        return "<|DONE|>" if is_log(body) else "<|ACTION|>fly to the moon<|END|>"
    with ScriptedServer(script) as server:
        env = envs.make_env("minihack", "MiniHack-Corridor-R3-v0", seed=2)
        ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "mem")
        records, _ = run_one(env, ag, OpenAIBackend(server.url, "m", max_retries=0), steps=2)
    assert records[0]["action"] == {"raw": "fly to the moon", "executed": "north", "valid": False}
    prompt = records[1]["log"]["messages"][0]["content"]
    assert ("Your previous output (step 0) was 'fly to the moon'. That is not a valid action, so the game "
            "ran its default action, north, instead.") in prompt
    # and the observation carries the evaluator's note, as the authors' agent read it
    assert ("The game's response (the current observation):\n\n\nYour previous output did not contain a valid "
            "action. Defaulted to action: north\n\nObservation:\nmessage:\n") in prompt


def test_a_blocked_move_is_noticed_and_an_effective_one_is_not(tmp_path):
    """The previous observation is the one the last action was chosen on (it used to be the
    current one, so every LOG said the action may have had no effect)."""
    moves = iter(["west", "south", "south", "east"])   # Corridor-R3, seed 0: a wall lies south

    def script(body):
        return "<|DONE|>" if is_log(body) else f"<|ACTION|>{next(moves)}<|END|>"
    with ScriptedServer(script) as server:
        env = envs.make_env("minihack", "MiniHack-Corridor-R3-v0", seed=0)
        ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "mem")
        records, _ = run_one(env, ag, OpenAIBackend(server.url, "m", max_retries=0), steps=4)
    # the first bump into the wall still changes the text ("It's a wall."); the second does not
    assert [r["observation"] != records[i + 1]["observation"] for i, r in enumerate(records[:3])] == [True, True, False]
    note = "the observation is the same as before the previous action, so that action most likely had no effect"
    prompts = [r["log"]["messages"][0]["content"] for r in records[1:]]
    assert [note in p for p in prompts] == [False, False, True]
    assert "Do not repeat your last action (south)" in records[3]["plan"]["messages"][0]["content"]
    assert "Do not repeat" not in records[2]["plan"]["messages"][0]["content"]


def test_no_committed_action_is_invalid_and_told(tmp_path):
    """A PLAN that never commits counts as an invalid output (as in BALROG): the scaffold's
    fallback runs, the trace says the model gave none, and LOG (or a baseline's next
    observation) tells the model."""
    def script(body):
        return "<|DONE|>" if is_log(body) else "<|SEARCH|>strategy.txt|goal<|END|>"   # consults, never commits
    with ScriptedServer(script) as server:
        backend = OpenAIBackend(server.url, "m", max_retries=0)
        env = envs.make_env("crafter", seed=5)
        ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "mem")
        records, _ = run_one(env, ag, backend, steps=2)
        env = envs.make_env("crafter", seed=5)
        naive, _ = run_one(env, make_agent("naive", env), backend, steps=2)
    assert records[0]["plan"]["ended"] == "turn_limit" and len(records[0]["plan"]["turns"]) == 10
    assert records[0]["action"] == {"raw": None, "executed": "Noop", "valid": False}
    log_prompt = records[1]["log"]["messages"][0]["content"]
    # v0's Crafter fallback is "noop", which the authors' evaluator did not accept: told as invalid
    assert ("Your previous output (step 0) was 'noop'. That is not a valid action, so the game ran its "
            "default action, Noop, instead.") in log_prompt
    assert naive[0]["action"] == {"raw": "SEARCHstrategytxtgoalEND", "executed": "Noop", "valid": False}
    told = naive[1]["plan"]["messages"][-2]["content"]   # the request's last message, before the reply
    assert "\n\n\nYour previous output did not contain a valid action. Defaulted to action: Noop\n\nObservation:\n" in told


def test_a_benchmark_stops_at_an_unfinished_episode():
    """What the benchmarks measure must have played all its steps."""
    done = [{"steps": 20}, {"steps": 20}]
    assert agent.all_finished(done) is done
    with pytest.raises(SystemExit, match="^an episode did not finish, nothing measured: ServerDown: server x down"):
        agent.all_finished([done[0], agent.Unfinished("ServerDown: server x down", "Traceback ...")])


def test_failing_server_degrades_to_fallback_and_goes_on(tmp_path):
    """Until `max_failures` requests in a row have failed (then the episode ends unfinished:
    tests/test_faults.py)."""
    with ScriptedServer(lambda body: 503) as server:
        backend = OpenAIBackend(server.url, "m", max_retries=1, timeout=5, backoff=0.01, max_failures=4)
        env = envs.make_env("crafter", seed=3)
        ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "mem")
        records, result = run_one(env, ag, backend, steps=2)
        calls = len(server.requests)
    assert result["steps"] == 2
    assert all(r["action"] == {"raw": None, "executed": "Noop", "valid": False}   # the scaffold's fallback
               for r in records)
    assert records[0]["plan"]["ended"] == "backend_error" and records[1]["log"]["ended"] == "backend_error"
    assert "503" in records[0]["plan"]["turns"][0]["error"]
    assert calls == 2 * 3  # step 0: PLAN; step 1: LOG + PLAN; each tried twice (1 retry)


def test_concurrent_episodes_are_independent(tmp_path):
    with ScriptedServer(crafter_script, delay=0.01) as server:
        backend = OpenAIBackend(server.url, "m", max_retries=0)
        gens, agents = [], []
        for i in range(4):
            env = envs.make_env("crafter", seed=10 + i)
            agents.append(make_agent("memory", env, load_scaffold("v0"), tmp_path / f"m{i}"))
            gens.append(play(env, agents[-1], 10 + i, None, 3))
        results = run_episodes(gens, backend, concurrency=4)
    assert [r["seed"] for r in results] == [10, 11, 12, 13] and all(r["steps"] == 3 for r in results)
    for a in agents:
        assert a.fs.read("survival_log.txt").count("moved, all fine") == 2


def _copy(tmp_path, source=agent.SCAFFOLDS / "v0"):
    dst = tmp_path / "vx"
    shutil.copytree(source, dst)
    return dst


def _edit(folder, name, old, new):
    path = folder / name
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))


def test_scaffold_validation_names_the_broken_part(tmp_path):
    s = load_scaffold("v0")
    assert (s.limits["log_turns"], s.limits["plan_turns"], s.limits["search_cap"]) == (10, 10, 1000)
    assert s.ops("log") == ["READ", "SEARCH", "TAIL", "COUNT", "APPEND", "WRITE", "CREATE", "DONE"]
    assert s.ops("plan") == ["READ", "SEARCH", "TAIL", "COUNT", "ACTION"]
    assert len(s.content_hash()) == 64
    with pytest.raises(ScaffoldError, match="unknown scaffold 'v99'"):
        load_scaffold("v99")
    d = _copy(tmp_path / "a")
    (d / "prompts" / "plan.txt").unlink()
    with pytest.raises(ScaffoldError, match=r"scaffold vx: policy.py:\d+: ep.render\('plan'\): there is no prompts/plan.txt"):
        load_scaffold(d)
    d = _copy(tmp_path / "b")
    _edit(d, "prompts/plan.txt", "{analysis}", "{analysis}{weather}")
    with pytest.raises(ScaffoldError, match=r"policy.py:\d+: ep.render\('plan'\) must give exactly the fields of "
                                            r"prompts/plan.txt: missing \['weather'\], unknown \[\]"):
        load_scaffold(d)
    d = _copy(tmp_path / "c")
    (d / "prompts" / "spare.txt").write_text("never used")
    with pytest.raises(ScaffoldError, match="scaffold vx: prompts/spare.txt: never rendered by policy.py"):
        load_scaffold(d)
    d = _copy(tmp_path / "d")
    _edit(d, "policy.py", "def setup(ep):", "def setup(ep:")
    with pytest.raises(ScaffoldError, match=r"scaffold vx: policy.py:\d+: SyntaxError"):
        load_scaffold(d)
    (d / "policy.py").unlink()
    with pytest.raises(ScaffoldError, match="scaffold vx: policy.py: missing"):
        load_scaffold(d)
    d = _copy(tmp_path / "e")
    cfg = json.loads((d / "scaffold.json").read_text())
    cfg["ops"]["plan"].append("APPEND")
    (d / "scaffold.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaffoldError, match=r"plan commits the action, so it may not write memory \(\['APPEND'\]\)"):
        load_scaffold(d)
    cfg["ops"]["plan"] = ["READ", "ACTION", "TELEPORT"]
    (d / "scaffold.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaffoldError, match=r"unknown ops \['TELEPORT'\]"):
        load_scaffold(d)
    cfg["ops"]["plan"], cfg["initial_files"]["nle"] = ["READ", "ACTION"], "memory/nowhere"
    (d / "scaffold.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaffoldError, match="scaffold.json initial_files: nle: a folder of the scaffold"):
        load_scaffold(d)
    (d / "scaffold.json").write_text("{nope")
    with pytest.raises(ScaffoldError, match="scaffold.json: not valid JSON"):
        load_scaffold(d)


def test_v0_initial_files_per_game():
    s = load_scaffold("v0")
    assert set(s.initial_files("crafter")) == {"map_notes.txt", "crafting_progress.txt", "survival_log.txt",
                                                "actions_log.txt", "strategy.txt"}
    assert not any(s.initial_files("crafter").values())
    nethack = {"game_rules.txt", "nethack_symbols.txt", "dungeon_map.txt", "inventory.txt", "actions_log.txt",
               "strategy.txt"}
    assert set(s.initial_files("minihack")) == nethack and set(s.initial_files("nle")) == nethack | {"monster_encounters.txt"}
    rules = s.initial_files("nle")["game_rules.txt"]
    for topic in ("MOVING", "FIGHTING", "Ranged", "DOORS", "STAIRS", "dungeon level 1", "ITEMS (two steps",
                  "pickup", "PROMPTS", "pray", "Elbereth"):
        assert topic in rules, topic
    symbols = s.initial_files("minihack")["nethack_symbols.txt"]
    for topic in ("TERRAIN", "ITEMS ON THE FLOOR", "MONSTER LETTERS", "pet"):
        assert topic in symbols, topic
    # the file index shows line counts to the model: the authors' 33 and 65
    assert (rules.count("\n"), symbols.count("\n")) == (33, 65)


# ---------------------------------------------------------------- HF / tiny-random -------------

@pytest.fixture(scope="module")
def tiny():
    return HFBackend("tiny-random", max_new_tokens=8, temperature=1.0, seed=0)


@pytest.mark.parametrize("env_name,task", [("crafter", None), ("minihack", "MiniHack-Corridor-R3-v0"),
                                           ("nle", None)])
def test_tiny_random_plays_each_game(tmp_path, tiny, env_name, task):
    env = envs.make_env(env_name, task, seed=0)
    ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "mem")
    records, result = run_one(env, ag, tiny, steps=2)
    assert result["steps"] == 2
    plan = records[1]["plan"]["turns"][0]
    assert plan["prompt_tokens"] > 100 and 1 <= plan["completion_tokens"] <= 8
    assert records[1]["log"]["turns"][0]["role"] == "base"


def test_tiny_random_batches_across_episodes(tmp_path, tiny):
    seen = []
    generate = tiny.generate
    tiny.generate = lambda reqs: (seen.append(len(reqs)), generate(reqs))[1]
    try:
        gens = []
        for i in range(3):
            env = envs.make_env("minihack", "MiniHack-MazeWalk-9x9-v0", seed=i)
            gens.append(play(env, make_agent("naive", env), i, None, 2))
        run_episodes(gens, tiny, concurrency=3)
    finally:
        tiny.generate = generate
    assert seen == [3, 3]                                  # one padded batch per round


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(agent.tiny_random_path())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return str(path)


def test_two_model_mode_routes_memory_turns_through_the_adapter(tmp_path, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    both = HFBackend("tiny-random", adapter=adapter_dir, max_new_tokens=12, temperature=0)
    plain = HFBackend("tiny-random", max_new_tokens=12, temperature=0)
    assert isinstance(both.model, PeftModel)
    # one copy of the base weights: base parameters + LoRA parameters, nothing duplicated
    base_n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(agent.tiny_random_path()).parameters())
    lora_n = sum(p.numel() for n, p in both.model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in both.model.parameters()) == base_n + lora_n and lora_n > 0
    msgs = [{"role": "user", "content": "<|SEARCH|>map_notes.md|tree<|END|> what next?"}]
    spec, base = both.generate([Request(msgs, "specialist"), Request(msgs, "base")])
    reference = plain.generate([Request(msgs, "base")])[0]
    assert base.text == reference.text                    # adapter off: the untouched base model
    assert spec.text != base.text                         # adapter on: different model
    enc = both.tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True)
    with torch.no_grad():
        on = both.model(**enc).logits
        with both.model.disable_adapter():
            off = both.model(**enc).logits
    assert not torch.allclose(on, off)

    env = envs.make_env("crafter", seed=0)
    ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "mem", two_model=True)
    records, _ = run_one(env, ag, both, steps=2)
    log_roles = {t["role"] for t in records[1]["log"]["turns"]}
    turns = records[1]["plan"]["turns"]
    plan_roles = [t["role"] for t in turns]
    assert log_roles == {"specialist"}
    first_base = plan_roles.index("base")      # the specialist consults, then the base model continues
    assert first_base > 0 and set(plan_roles[:first_base]) == {"specialist"} and set(plan_roles[first_base:]) == {"base"}
    handoff = records[1]["plan"]["messages"][:turns[first_base]["input_messages"]]
    assert handoff[-1]["role"] == "user" and "consultation is over" in handoff[-1]["content"]
    assert all("<|ACTION|>" not in m["content"] for m in handoff if m["role"] == "assistant")


def test_two_model_handoff_over_a_server(tmp_path):
    def script(body):
        if body["model"] == "memory-lora":
            if is_log(body):
                return "<|DONE|>"
            return "<|SEARCH|>game_rules.txt|stairs<|END|> so I would <|ACTION|>up<|END|>"
        assert "<|ACTION|>up" not in json.dumps(body["messages"])   # stripped before hand-off
        if "[READ" not in last_user(body):
            return "<|READ|>strategy.txt<|END|>"                   # the base model may still read
        return "<|ACTION|>far east<|END|>"
    with ScriptedServer(script) as server:
        backend = OpenAIBackend(server.url, "base", specialist="memory-lora", max_retries=0)
        env = envs.make_env("nle", seed=0)
        ag = make_agent("memory", env, load_scaffold("v0"), tmp_path / "m", two_model=True)
        records, _ = run_one(env, ag, backend, steps=2)
    assert [r["action"]["raw"] for r in records] == ["far east", "far east"]
    turns = records[1]["plan"]["turns"]
    assert [t["role"] for t in turns] == ["specialist", "base", "base"]
    assert [o["op"] for o in turns[0]["ops"]] == ["SEARCH", "ACTION"]
    handed = records[1]["plan"]["messages"][:turns[1]["input_messages"]]
    assert handed[-2] == {"role": "assistant", "content": "<|SEARCH|>game_rules.txt|stairs<|END|> so I would"}
    assert turns[0]["response"] == "<|SEARCH|>game_rules.txt|stairs<|END|> so I would <|ACTION|>up<|END|>"  # as said
    assert handed[-1]["content"].startswith("[SEARCH game_rules.txt|stairs]\ngame_rules.txt: 1 line containing "
                                            "'stairs':\nSTAIRS\n\nThe memory consultation is over.")
    assert turns[1]["ops"][0]["op"] == "READ" and records[1]["plan"]["ended"] == "action"


def test_padded_batch_generates_what_each_prompt_generates_alone(adapter_dir, monkeypatch):
    """Prompts of different lengths batched together (prefilled one by one into a left-padded
    static cache, then decoded together) give, greedily, what each prompt gives alone: same text,
    same token counts, adapter on or off. A model the unpadded prefill does not fit falls back to
    plain padded generate."""
    both = HFBackend("tiny-random", adapter=adapter_dir, max_new_tokens=24, temperature=0)
    convs = [[{"role": "user", "content": text}] for text in
             ("short", "a much longer prompt " * 30, "<|SEARCH|>map_notes.md|tree<|END|> what next?")]
    for role in ("specialist", "base"):
        together = both.generate([Request(c, role) for c in convs])
        alone = [both.generate([Request(c, role)])[0] for c in convs]
        assert [(r.text, r.prompt_tokens, r.completion_tokens) for r in together] == \
               [(r.text, r.prompt_tokens, r.completion_tokens) for r in alone]
        assert len({r.prompt_tokens for r in together}) == 3 and all(r.text for r in together)
    assert both.unpadded_prefill

    def misfit(enc):
        raise NotImplementedError("no static cache for this model")
    monkeypatch.setattr(both, "_prefill_unpadded", misfit)
    fallback = both.generate([Request(c, "base") for c in convs])
    assert not both.unpadded_prefill and [r.text for r in fallback] == [r.text for r in together]


def test_batched_generate_says_nothing_deprecated(monkeypatch):
    """The unpadded prefill names the cache as this transformers version does, in generate's
    keyword and in the model's output, so no deprecation warning is printed."""
    import logging
    import transformers.utils.logging  # noqa: F401  (gives logging.Logger its warning_once)
    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(msg))
    backend = HFBackend("tiny-random", max_new_tokens=2, temperature=0)
    backend.generate([Request([{"role": "user", "content": text}], "base") for text in ("short", "longer " * 20)])
    assert backend.unpadded_prefill and not [m for m in said if "deprecated" in m]


def test_plan_may_only_offer_read_ops(tmp_path):
    """The LOG-after-observation invariant holds for a scaffold's own ops too: a routine that
    commits the action cannot be given one that writes."""
    d = _copy(tmp_path, KITCHEN_SINK)
    cfg = json.loads((d / "scaffold.json").read_text())
    cfg["ops"]["plan"].append("NOTE_HERE")
    (d / "scaffold.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaffoldError, match=r"plan commits the action, so it may not write memory \(\['NOTE_HERE'\]\)"):
        load_scaffold(d)
    _edit(d, "policy.py", '"NOTE_HERE": {"handler": note_here, "arity": 1, "kind": "write"}',
          '"NOTE_HERE": {"handler": note_here, "arity": 1, "kind": "read"}')
    assert "NOTE_HERE" in load_scaffold(d).ops("plan")
    _edit(d, "policy.py", '"kind": "read"}', '"kind": "sometimes"}')
    with pytest.raises(ScaffoldError, match=r"policy.py OPS: 'NOTE_HERE': a scaffold op is OPS\['NAME'\]"):
        load_scaffold(d)
# ---------------------------------------------------------------- GPU memory, on the arithmetic --
# No GPU here: the plan that decides what fits is checked on Qwen2.5-32B's config numbers (no
# download), the GPU split and the batching on their arithmetic, the rest on CPU.

QWEN25_32B = dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                  num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)
H100 = 85_029_158_912          # bytes torch reports for an 80 GB H100
GIB = 2 ** 30


def test_gpu_memory_plan_for_qwen25_32b():
    from transformers import Qwen2Config
    config = Qwen2Config(**QWEN25_32B)
    V, H, I, L, KV = 152064, 5120, 27648, 64, 8 * 128
    layer = (H * H + H) + 2 * (H * KV + KV) + H * H + 3 * H * I + 2 * H   # q, k, v (biased), o; MLP; norms
    assert agent.parameter_count(config) == 2 * V * H + L * layer + H == 32_763_876_352
    per_token = agent.kv_bytes_per_token(config, 2)
    assert per_token == 2 * 64 * 8 * 128 * 2 == 256 * 1024
    # the round the issue describes: 16 prompts of 3.5k tokens, 1024 new tokens each
    assert 16 * (3500 + 1024) * per_token / GIB == pytest.approx(17.7, abs=0.05)   # the batch's static cache
    assert 16 * 3500 * per_token / GIB == pytest.approx(13.7, abs=0.05)            # every prefill cache at once
    # what helps is said only when it would: more GPUs if the machine has them, a lower budget if one fits
    with pytest.raises(agent.DoesNotFit, match=r"^Qwen/Qwen2.5-32B-Instruct does not fit: 61.0 GiB of weights "
                       r"\+ 26.5 GiB of KV cache for batches of 72,384 tokens > 71.3 GiB usable on 1 GPU\(s\) of 79 "
                       r"GiB; lower --batch-tokens, or serve it with vLLM \(--base-url\)$"):
        agent.memory_plan(config, 2, [H100], 16 * 4524, 1024, name="Qwen/Qwen2.5-32B-Instruct")
    plan = agent.memory_plan(config, 2, [H100], None, 1024)      # the largest budget one card holds
    assert plan["batch_tokens"] == int((0.9 * H100 - 2 * 32_763_876_352) / (1.5 * per_token)) == 27_970
    assert [len(b) for b in agent.token_batches([3500] * 16, plan["batch_tokens"], 1024)] == [6, 6, 4]
    # with the default 4096 new tokens a batch reserves room for 4096-token replies: 3 prompts
    assert [len(b) for b in agent.token_batches([3500] * 16, plan["batch_tokens"], 4096)] == [3] * 5 + [1]
    assert agent.memory_plan(config, 2, [H100] * 4, 16 * 4524, 1024)["batch_tokens"] == 72_384  # 4 GPUs
    with pytest.raises(agent.DoesNotFit, match=r"batches of 5,120 tokens > 57.6 GiB usable on 2 GPU\(s\) of 32 "
                       r"GiB; give each process more GPUs \(--gpus-per-process\), or serve it with vLLM"):
        agent.memory_plan(config, 2, [32 * GIB] * 2, None, 1024, more_gpus=True)
    with pytest.raises(agent.DoesNotFit, match=r"--batch-tokens 1,000 is less than one typical prompt and its "
                       r"reply \(5,120 tokens\)"):
        agent.memory_plan(config, 2, [H100], 1000, 1024)


def test_each_process_gets_its_slice_of_the_gpus():
    assert agent.process_gpus(8) == list(range(8))
    assert agent.process_gpus(8, 1, 2) == [4, 5, 6, 7]          # 2 processes x 4 GPUs
    assert agent.process_gpus(8, 3, 8) == [3]
    assert agent.process_gpus(8, 1, 4, per_process=2) == [2, 3]
    with pytest.raises(agent.DoesNotFit, match="process 1 of 2 on this machine wants GPUs 4-7 but only 6"):
        agent.process_gpus(6, 1, 2, per_process=4)


def test_token_batches_stay_within_the_budget():
    lengths = [900, 100, 3000, 400, 120, 2000]
    assert agent.token_batches(lengths, 4096, 100) == [[1, 4, 3, 0], [5], [2]]   # 4 x (900 + 100) = 4000
    assert agent.token_batches(lengths, 10 ** 6, 100) == [[1, 4, 3, 0, 5, 2]]


def test_token_budget_splits_a_round_and_changes_no_output():
    hf = HFBackend("tiny-random", max_new_tokens=16, temperature=0)
    sent, model_generate = [], hf.model.generate
    hf.model.generate = lambda **kw: (sent.append(kw), model_generate(**kw))[1]
    requests = [Request([{"role": "user", "content": text}]) for text in
                ("go", "a longer prompt " * 12, "<|READ|>strategy.md<|END|> then?", "hello " * 40)]
    whole = hf.generate(requests)
    sizes, generate = [], hf._generate
    hf._generate = lambda prompts, role: (sizes.append(len(prompts)), generate(prompts, role))[1]
    lengths = sorted(r.prompt_tokens for r in whole)
    hf.batch_tokens = 2 * (lengths[1] + 16)
    split = hf.generate(requests)
    assert sizes[0] == 2 and sum(sizes) == 4 and len(sizes) >= 3
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in split] == \
           [(r.text, r.completion_tokens, r.finish_reason) for r in whole]
    assert {r.finish_reason for r in whole} <= {"stop", "length"}
    assert all(kw["disable_compile"] for kw in sent)     # no implicit torch.compile of decoding
