"""Scaffolds are code: the test scaffold tests/scaffolds/kitchen_sink uses every capability of the
episode API in real episodes (each asserted from the traces); the harness's rules hold whatever a
policy does; hostile policies are refused when they are loaded, each case with its file and line."""
import dataclasses
import json
import re
import subprocess
import sys
import textwrap

import pytest

import envs
import eval as ev
import scaffolds
from agent import (PolicyError, OpenAIBackend, Reply, ScaffoldError, Unfinished, load_scaffold, make_agent, play,
                   run_episodes)
from scripted_server import ScriptedServer

KITCHEN_SINK = load_scaffold(ev.ROOT / "tests" / "scaffolds" / "kitchen_sink")
CORRIDOR = "MiniHack-Corridor-R3-v0"


def kitchen_model(body):
    """Plays the test scaffold's routines by their first lines (it shows the step number)."""
    msgs = body["messages"]
    first = next(m["content"] for m in msgs if m["role"] == "user")
    last = msgs[-1]["content"]
    if first.startswith("ROUTINE reflect"):
        return "<|TAIL|>actions.txt|3<|END|> Steady."
    step = int(re.search(r"\(step (\d+)\)", first).group(1))
    if first.startswith("ROUTINE log"):
        notes = {1: "<|NOTE_HERE|>start, a door east<|END|><|APPEND|>actions.txt|s1<|END|>",
                 4: "<|APPEND|>actions.txt|s4\ns5<|END|>"}
        return "<|DONE|>" if last.startswith("Results:") else notes.get(step, f"<|APPEND|>actions.txt|s{step}<|END|>")
    if first.startswith("ROUTINE plan, direction only"):
        return "<|ACTION|>east<|END|>"
    if step == 0:   # south is a wall: rejected twice, then accepted (written so that it needs repair)
        return "<|ACTION|>Go South.<|END|>" if "(0 more" in last else "<|ACTION|>south<|END|>"
    if step == 1:
        return "<|ACTION|>kick<|END|>" if last.startswith("Results:") else "<|VISITS|><|END|>"
    return {3: "<|ACTION|>move west<|END|>"}.get(step, "<|ACTION|>east<|END|>")


def run_kitchen(tmp_path, task, steps, model=kitchen_model):
    records = []
    with ScriptedServer(model) as server:
        env = envs.make_env("minihack", task, seed=0)
        ag = make_agent("memory", env, KITCHEN_SINK, tmp_path / "mem")
        run_episodes([play(env, ag, 0, records.append, steps)], OpenAIBackend(server.url, "m", max_retries=0))
    return [json.loads(json.dumps(r)) for r in records], ag


def cursor(record):
    x, y = re.search(r"\(x=(\d+), y=(\d+)\)", record["observation"]).groups()
    return int(x), int(y)


def ops_of(record, routine):
    return [o for t in record[routine]["turns"] for o in t["ops"]]


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    return run_kitchen(tmp_path_factory.mktemp("kitchen"), CORRIDOR, steps=5)


def test_routines_of_any_name_are_traced_and_read_by_eval(kitchen):
    records, _ = kitchen
    assert [r["routines"] for r in records] == [["plan"], ["log", "plan"], ["log", "reflect", "plan"],
                                                ["log", "plan"], ["log", "plan"]]
    reflect = records[2]["reflect"]
    assert [o["op"] for o in ops_of(records[2], "reflect")] == ["TAIL"] and reflect["ended"] == "done"
    assert [name for name, _ in ev.routines(records[2])] == ["log", "reflect", "plan"]
    assert ev.episode_stats(records)["counts"]["writes"] == 5     # NOTE_HERE (a scaffold write op) + 4 APPENDs


def test_rejection_gate_re_prompts_at_most_twice_and_repairs(kitchen):
    records, _ = kitchen
    plan = records[0]["plan"]
    said = [m["content"] for m in plan["messages"][plan["turns"][0]["input_messages"]:] if m["role"] == "user"]
    assert said == ["REJECTED: south walks into a wall. Choose another action (1 more rejections allowed).\n",
                    "REJECTED: south walks into a wall. Choose another action (0 more rejections allowed).\n"]
    assert plan["ended"] == "action after 2 rejections" and plan["turns"][2]["response"] == "<|ACTION|>Go South.<|END|>"
    assert records[0]["action"] == {"raw": "south", "executed": "south", "valid": True}   # repaired, then accepted
    assert records[3]["action"]["raw"] == "west" and records[3]["plan"]["turns"][0]["response"] == "<|ACTION|>move west<|END|>"


def test_status_block_and_visit_counts_come_from_the_observations(kitchen):
    records, _ = kitchen
    for r, visits in zip(records, (1, 2)):   # the move south was blocked: the same tile twice
        hp = re.search(r"HP:(\d+)\((\d+)\)", r["observation"]).groups()
        status = f"STATUS: HP {hp[0]}/{hp[1]}, Dlvl 1, position {cursor(r)}, visits here {visits}\n"
        assert status in r["plan"]["messages"][1]["content"]
    visits = ops_of(records[1], "plan")[0]
    assert visits == {"op": "VISITS", "args": [], "error": None, "kind": "read",
                      "result": "you have stood here 2 time(s)"}


def test_a_map_op_writes_at_the_agents_position(kitchen):
    records, ag = kitchen
    note = ops_of(records[1], "log")[0]
    x, y = cursor(records[1])
    assert note == {"op": "NOTE_HERE", "args": ["start, a door east"], "error": None, "kind": "write",
                    "result": f"noted at ({x},{y})"}
    assert records[1]["memory_diff"]["map.txt"] == {   # a scaffold op's write: the lines it changed
        "created": True, "edited": [{"op": "NOTE_HERE", "removed": [], "added": [f"({x},{y}): start, a door east"]}]}
    assert ag.fs.read("map.txt") == f"({x},{y}): start, a door east\n"


def test_code_prunes_after_log(kitchen):
    records, ag = kitchen
    assert records[3]["memory_diff"] == {"actions.txt": {"appended": ["s3"]}}              # 3 lines: kept
    assert records[4]["memory_diff"] == {"actions.txt": {"replaced": "s3\ns4\ns5\n"}}      # 5 lines: pruned to 3
    assert ag.fs.read("actions.txt") == "s3\ns4\ns5\n"


def test_a_conditional_plan_prompt(kitchen):
    records, _ = kitchen
    assert records[1]["action"]["executed"] == "kick" and "In what direction?" in records[2]["observation"]
    prompt = records[2]["plan"]["messages"][1]["content"]
    assert prompt.startswith("ROUTINE plan, direction only (step 2). The game asks: In what direction?")
    assert records[2]["action"] == {"raw": "east", "executed": "east", "valid": True}
    assert all(r["plan"]["messages"][1]["content"].startswith(f"ROUTINE plan (step {r['step']})")
               for i, r in enumerate(records) if i != 2)


def test_log_compares_with_the_observation_the_last_action_was_chosen_on(tmp_path):
    """Harness defect #1 (review 9): ep.previous_observation is the observation the last action was
    chosen on, not the current one. The test scaffold's LOG compares the two: the second bump into
    the wall south changes nothing, the first bump (a message) and a move west do."""
    def model(body):
        first = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if not first.startswith("ROUTINE plan"):
            return "<|DONE|>"
        step = int(re.search(r"\(step (\d+)\)", first).group(1))
        return "<|ACTION|>south<|END|>" if step < 2 else "<|ACTION|>west<|END|>"
    records, _ = run_kitchen(tmp_path, CORRIDOR, steps=4, model=model)
    told = [re.match(r"ROUTINE log \(step \d\)\. Your last action was (\w+); ([a-z ]+)\.",
                     r["log"]["messages"][1]["content"]).groups() for r in records[1:]]
    assert [r["action"]["executed"] for r in records[:3]] == ["south", "south", "west"]
    assert [records[i]["observation"] == records[i + 1]["observation"] for i in range(3)] == [False, True, False]
    assert told == [("south", "the game changed"), ("south", "nothing changed"), ("west", "the game changed")]


def test_the_system_prompt_is_traced_once_per_routine(kitchen, tmp_path):
    """A routine's conversation is stored once in its line, however many turns it had."""
    records, _ = kitchen
    writer = ev.TraceWriter(tmp_path / "t.jsonl")
    for r in records:
        writer.write(r)
    writer.close()
    assert ev.read_trace(tmp_path / "t.jsonl") == records
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert max(len(routine["turns"]) for r in records for _, routine in ev.routines(r)) > 1
    for line, r in zip(lines, records):
        with_system = [name for name, routine in ev.routines(r) if routine["messages"][0]["role"] == "system"]
        assert with_system and line.count("and keep a memory of text files") == len(with_system)


def test_boxoban_gets_its_own_prompt_and_fallback(tmp_path, boxoban_levels):
    records, _ = run_kitchen(tmp_path, "MiniHack-Boxoban-Hard-v0", steps=2,
                             model=lambda body: "<|DONE|>" if "ROUTINE log" in json.dumps(body) else "hmm")
    prompt = records[0]["plan"]["messages"][1]["content"]
    assert prompt.startswith("ROUTINE plan, Boxoban (step 0). Push every boulder (`) onto a fountain ({); ")
    assert all(r["action"] == {"raw": None, "executed": "south", "valid": False} for r in records)
    assert records[0]["plan"]["ended"] == "no_action"


# ---------------------------------------------------------------- the harness's rules ---------

class Model:
    """An in-process model with the batched backend interface, answering from a function."""
    batched = True

    def __init__(self, answer):
        self.answer = answer

    def generate(self, requests):
        return [Reply(self.answer(r)) for r in requests]


def mini(tmp_path, policy, ops=None, prompts=None, name="mini", limits=None, initial_files=None):
    """A scaffold folder holding scaffold.json, policy.py and prompts."""
    d = tmp_path / name
    (d / "prompts").mkdir(parents=True)
    (d / "scaffold.json").write_text(json.dumps({
        "ops": ops or {"plan": ["READ", "ACTION"], "log": ["APPEND", "DONE"]},
        "limits": {"search_cap": 10, "max_result_chars": 1000, "max_file_bytes": 1000, "max_total_bytes": 5000,
                   "max_files": 8, **(limits or {})},
        "fallback_action": {}, "initial_files": initial_files or {}}))
    (d / "policy.py").write_text(textwrap.dedent(policy))
    for template, text in (prompts or {}).items():
        (d / "prompts" / f"{template}.txt").write_text(text)
    return d


def play_mini(tmp_path, folder, answer="<|ACTION|>Noop<|END|>", steps=2, episodes=1, model=None, agents=None):
    """Play a scaffold in `episodes` Crafter episodes; `agents`, a list, gets the agents as they are made."""
    scaffold = load_scaffold(folder)
    records, agents, games = [[] for _ in range(episodes)], [] if agents is None else agents, []
    for i in range(episodes):
        env = envs.make_env("crafter", seed=i)
        agents.append(make_agent("memory", env, scaffold, tmp_path / f"mem{i}"))
        games.append(play(env, agents[-1], i, records[i].append, steps))
    for result in run_episodes(games, Model(model or (lambda request: answer)), concurrency=episodes):
        if isinstance(result, Unfinished):   # an episode's exception ends that episode only
            raise result.error
    return records, agents


def test_no_write_once_the_action_is_being_decided(tmp_path):
    d = mini(tmp_path, '''
        def step(ep):
            ep.write("early.txt", "before deciding: allowed")
            plan = ep.routine("plan", ["READ", "ACTION"])
            plan.say("act")
            turn = yield from plan.ask()
            ep.write("late.txt", "after: refused")
            return turn.action
        ''')
    with pytest.raises(PolicyError, match="ep.write: memory is read-only once the step's action is being decided"):
        play_mini(tmp_path, d)
    d = mini(tmp_path, '''
        def step(ep):
            ep.routine("plan", ["READ", "ACTION"])
            ep.routine("log", ["APPEND", "DONE"])
        ''', name="late_log")
    with pytest.raises(PolicyError, match=r"routine log may not write \(\['APPEND'\]\): the step's action is decided"):
        play_mini(tmp_path, d)


def test_a_read_op_cannot_write_and_a_write_op_can(tmp_path):
    d = mini(tmp_path, '''
        def append(ep, text):
            ep.append("notes.txt", text)
            return "appended"

        OPS = {"PEEK": {"handler": append, "arity": 1, "kind": "read"},
               "NOTE": {"handler": append, "arity": 1, "kind": "write"}}

        def step(ep):
            log = ep.routine("log", ep.data["ops"]["log"])
            log.say("record")
            yield from log.ask()
            return "Noop"
        ''', ops={"log": ["PEEK", "NOTE", "DONE"]})
    records, agents = play_mini(tmp_path, d, answer="<|PEEK|>x<|END|><|NOTE|>y<|END|><|DONE|>", steps=1)
    ops = records[0][0]["log"]["turns"][0]["ops"]
    assert [o["result"] for o in ops] == ["error: PEEK failed: PolicyError: ep.append: a read op cannot write",
                                          "appended", None]
    assert [o["kind"] for o in ops] == ["read", "write", "control"] and agents[0].fs.read("notes.txt") == "y\n"


def test_replies_come_only_from_the_model(tmp_path):
    d = mini(tmp_path, '''
        def step(ep):
            plan = ep.routine("plan", ["ACTION"])
            plan.say("act")
            asking = plan.ask()
            next(asking)
            next(asking)      # resumes the ask with None, not the model's reply
        ''')
    with pytest.raises(PolicyError, match="policy.py:7: a turn's reply comes from the model, through the harness"):
        play_mini(tmp_path, d)
    d = mini(tmp_path, '''
        def step(ep):
            yield "a request of my own"
        ''', name="own")
    with pytest.raises(PolicyError, match=r"a step yields only what routine.ask\(\) yields"):
        play_mini(tmp_path, d)


def test_state_is_per_episode_and_code_alone_may_act(tmp_path):
    """policy.py runs afresh per episode: module globals are not shared by concurrent episodes.
    A step that asks no model returns its action directly."""
    d = mini(tmp_path, '''
        SEEN = []

        def step(ep):
            SEEN.append(ep.step)
            ep.state["n"] = ep.state.get("n", 0) + 1
            ep.write("seen.txt", " ".join(str(s) for s in SEEN) + f" | {ep.state['n']}")
            return "Do" if ep.step % 2 else "noop"
        ''')
    records, agents = play_mini(tmp_path, d, steps=3, episodes=2)
    assert [a.fs.read("seen.txt") for a in agents] == ["0 1 2 | 3\n"] * 2
    assert [r["action"]["executed"] for r in records[0]] == ["Noop", "Do", "Noop"]


def test_files_outside_the_memory_folder_are_refused_at_run_time(tmp_path):
    d = mini(tmp_path, '''
        def step(ep):
            ep.write("../escape.txt", "out")
        ''')
    with pytest.raises(PolicyError, match="ep.write: refused file name '../escape.txt'"):
        play_mini(tmp_path, d)
    assert not (tmp_path / "escape.txt").exists()


def test_allowed_modules_are_read_only_views_of_listed_members_fresh_per_episode():
    """Past the static check (exec'd directly), a module view holds only its listed members and
    takes no attribute; each episode gets its own views and builtins."""
    views = [{name: scaffolds.ModuleView(name) for name in scaffolds.ALLOWED_IMPORTS} for _ in range(2)]
    namespaces = [{"__builtins__": scaffolds.policy_builtins(v, KITCHEN_SINK.attributes)} for v in views]
    for ns in namespaces:
        exec("import json, functools, statistics\nbox = json\nre_compile = __import__('re').compile", ns)
    assert namespaces[0]["box"] is not namespaces[1]["box"] and namespaces[0]["re_compile"] is re.compile
    assert namespaces[0]["__builtins__"] is not namespaces[1]["__builtins__"]
    for name in ("codecs", "JSONEncoder"):
        with pytest.raises(AttributeError, match=f"json.{name} is not available to a policy"):
            exec(f"box.{name}", namespaces[0])
    for module, name in (("functools", "update_wrapper"), ("functools", "singledispatch"), ("statistics", "sys")):
        with pytest.raises(AttributeError, match=f"{module}.{name} is not available"):
            exec(f"{module}.{name}", namespaces[0])
    with pytest.raises(AttributeError, match="json is read-only to a policy"):
        exec("box.fallback = 1", namespaces[0])
    with pytest.raises(ImportError, match="policy.py may import only re, math"):
        exec("import os", namespaces[1])
    for name in ("type", "object", "getattr", "setattr", "vars", "open", "exec", "eval", "__import__"):
        assert name == "__import__" or name not in namespaces[0]["__builtins__"]


HOSTILE = {
    # reading OPENAI_API_KEY
    "api key via os": ("import os\nKEY = os.environ['OPENAI_API_KEY']\n", 1, "import of 'os' is not allowed"),
    "api key via a module's module": ("import statistics\n\ndef step(ep):\n    return statistics.sys.modules['os'].environ['OPENAI_API_KEY']\n",
                                      4, "statistics.sys is not available to a policy"),
    "api key via json.codecs": ("import json\n\ndef step(ep):\n    return json.codecs.open('/proc/self/environ').read()\n",
                                4, "json.codecs is not available to a policy"),
    "api key via subclasses": ("def step(ep):\n    return ().__class__.__base__.__subclasses__()\n", 2,
                               "the attribute .__base__ is not allowed"),
    "api key via str.format": ("def step(ep):\n    return '{0.read.__globals__[os].environ}'.format(ep)\n", 2,
                               "the attribute .format is not allowed"),
    "api key via __builtins__": ("def step(ep):\n    return __builtins__['__import__']('os')\n", 2,
                                 "the name '__builtins__' is not allowed"),
    # writing outside the memory folder
    "write via open": ("def step(ep):\n    open('../../outside.txt', 'w').write('x')\n", 2, "the name 'open' is not allowed"),
    "write via pathlib": ("from pathlib import Path\n", 1, "import from 'pathlib' is not allowed"),
    "write via exec": ("def step(ep):\n    exec(\"open('x', 'w')\")\n", 2, "the name 'exec' is not allowed"),
    # patching the environment's step or progression
    "patch env via import": ("import envs\nenvs.CrafterEnv.step = None\n", 1, "import of 'envs' is not allowed"),
    "patch env via the harness": ("def setup(ep):\n    env = ep._agent._env\n    env.progression = 1.0\n", 2,
                                  "the attribute ._agent is not allowed"),
    "patch progression via frames": ("def step(ep):\n    g = (x for x in [0])\n    env = g.gi_frame.f_back.f_locals['env']\n"
                                     "    env.progression = 1.0\n", 3, "the attribute .f_back is not allowed"),
    "patch a shared class": ("import json\n\ndef setup(ep):\n    json.JSONEncoder.encode = repr\n", 4,
                             "assigning or deleting .encode is not allowed"),
    "patch via getattr": ("def setup(ep):\n    getattr(ep, 'write')\n", 2, "the name 'getattr' is not allowed"),
    # importing os, subprocess, socket
    "import os": ("import os\n", 1, "import of 'os' is not allowed"),
    "import subprocess": ("import subprocess\n", 1, "import of 'subprocess' is not allowed"),
    "import socket": ("import socket\n", 1, "import of 'socket' is not allowed"),
    "from os import system": ("from os import system\n", 1, "import from 'os' is not allowed"),
    "__import__ socket": ("def step(ep):\n    return __import__('socket')\n", 2, "the name '__import__' is not allowed"),
    # the red team's routes (review12 items 3-4) and ours: functions that take attribute names as
    # strings, objects that set attributes, attribute stores, attributes that reach further objects
    "setattr via update_wrapper and a namedtuple": (
        "import collections\nimport functools\nimport json\n\ndef step(ep):\n"
        "    patch = collections.namedtuple('Patch', 'encode')(repr)\n"
        "    functools.update_wrapper(json.JSONEncoder, patch, assigned=('encode',), updated=())\n",
        6, "collections.namedtuple is not available to a policy"),
    "wraps": ("from functools import wraps\n", 1, "functools.wraps is not available to a policy"),
    "a module as a box shared by episodes": ("import json\n\ndef step(ep):\n    box = json\n    box.fallback = ep\n",
                                             5, "assigning or deleting .fallback is not allowed"),
    "ep.fallback assigned": ("def setup(ep):\n    ep.fallback = 'north'\n", 2,
                             "assigning or deleting .fallback is not allowed (no attribute is: keep data in ep.state; "
                             "ep.set_fallback(action) sets the fallback)"),
    "SequenceMatcher sets attributes on what it is given": (
        "import difflib\nimport statistics\n\ndef setup(ep):\n    difflib.SequenceMatcher.set_seq1(statistics.mean, ep)\n",
        5, "difflib.SequenceMatcher is not available to a policy"),
    "string.Formatter walks attributes": ("import string\n\ndef step(ep):\n    return string.Formatter().vformat('{0.read}', [ep], {})\n",
                                          4, "string.Formatter is not available to a policy"),
    "the object of an AttributeError": ("def step(ep):\n    try:\n        ep.group\n    except AttributeError as e:\n"
                                        "        return e.obj\n", 5, "the attribute .obj is not allowed"),
    "a matched attribute": ("def step(ep):\n    match ep:\n        case str(obj=x):\n            return x\n", 3,
                            "matching the attribute 'obj' is not allowed"),
    "ask driven by send": ("def step(ep):\n    asking = ep.routine('plan', ['ACTION']).ask()\n    next(asking)\n"
                           "    asking.send(None)\n", 4, "the attribute .send is not allowed"),
    "finally runs when a step is closed": ("def step(ep):\n    try:\n        return None\n    finally:\n        ep.write('x', 'y')\n",
                                           2, "finally blocks are not allowed"),
    "a bare except catches the harness's timer": ("def step(ep):\n    try:\n        return None\n    except:\n        pass\n",
                                                  4, "a bare except is not allowed"),
    "__builtins__ deleted by the end of an except": ("try:\n    pass\nexcept ValueError as __builtins__:\n    pass\n", 3,
                                                     "names starting with '__' are not allowed ('__builtins__')"),
    "__builtins__ bound by a match capture": ("match {}:\n    case {**__builtins__}:\n        pass\n", 2,
                                              "names starting with '__' are not allowed ('__builtins__')"),
    "__builtins__ rebound through global": ("def step(ep):\n    global __builtins__\n    return None\n", 2,
                                            "names starting with '__' are not allowed ('__builtins__')"),
    "an annotated assignment": ("def step(ep):\n    x: 'int' = 1\n    return None\n", 2, "annotations are not allowed"),
    "a return annotation": ("def step(ep) -> 'int':\n    return None\n", 1, "annotations are not allowed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_policies_are_refused_at_load(tmp_path, case):
    source, line, why = HOSTILE[case]
    d = mini(tmp_path, source + "\ndef step(ep):\n    return None\n" if "def step" not in source else source)
    with pytest.raises(ScaffoldError, match=rf"^scaffold mini: policy.py:{line}: {re.escape(why)}"):
        load_scaffold(d)


def test_the_checker_takes_the_authors_idioms_and_they_open_nothing(tmp_path):
    """Single-underscore helpers, print (into the step's trace line), hasattr and copy.deepcopy
    of plain data load and run; each opens nothing: hasattr answers only for attributes a policy
    may use, deepcopy refuses anything but plain data, print cannot write to a file, and the
    dunders and the harness's private attributes stay refused."""
    d = mini(tmp_path, '''
        import copy


        def _plan_note(ep, state):
            _kept = copy.deepcopy(state)
            _kept["seen"].append(ep.step)
            return _kept

        def step(ep):
            ep.state.setdefault("notes", {"seen": []})
            ep.state["notes"] = _plan_note(ep, ep.state["notes"])
            print("step", ep.step, sep="=", end=";", flush=True)
            print(hasattr(ep, "step"), hasattr(ep, "_agent"), hasattr(ep, "_fixed"), hasattr("", "__class__"))
            for probe in (lambda: copy.deepcopy(ep), lambda: copy.deepcopy({"f": ep.read}),
                          lambda: copy.deepcopy([copy]), lambda: print("x", file=ep)):
                try:
                    probe()
                except TypeError as e:
                    print("refused:", "plain data only" in str(e), "'file'" in str(e))
            return "noop"
        ''')
    records, agents = play_mini(tmp_path, d, steps=2)
    assert records[0][1]["printed"] == ("step=1;True False False False\n" + "refused: True False\n" * 3 +
                                        "refused: False True\n")
    assert agents[0].ep.state["notes"] == {"seen": [0, 1]}
    assert json.loads(json.dumps(records[0][0]))["printed"].startswith("step=0;")
    for source, line, why in (("def step(ep):\n    return ep._agent\n", 2, "the attribute ._agent is not allowed"),
                              ("def __step(ep):\n    return None\n", 1, "names starting with '__' are not allowed"),
                              ("def step(ep):\n    return __builtins__\n", 2, "the name '__builtins__' is not allowed"),
                              ("import copy\n\ndef step(ep):\n    return copy.copy(ep)\n", 4,
                               "copy.copy is not available to a policy")):
        with pytest.raises(ScaffoldError, match=rf"policy.py:{line}: {re.escape(why)}"):
            load_scaffold(mini(tmp_path / str(line) / why[:9].replace(" ", "_"), source))


def test_deepcopy_copies_data_that_holds_itself_or_shares_parts():
    looped = {"seen": []}
    looped["seen"].append(looped)
    copied = scaffolds.plain_deepcopy(looped)
    assert copied is not looped and copied["seen"][0] is copied
    shared = [1]
    for _ in range(60):          # 2**60 paths to the same few lists
        shared = [shared, shared]
    copied = scaffolds.plain_deepcopy(shared)
    assert copied is not shared and copied[0] is copied[1]
    with pytest.raises(TypeError, match="plain data only"):
        scaffolds.plain_deepcopy([shared, [looped, print]])


def test_a_print_flood_is_cut_in_the_trace(tmp_path):
    d = mini(tmp_path, '''
        def step(ep):
            for i in range(10000):
                print("x" * 100)
            return "noop"
        ''')
    records, _ = play_mini(tmp_path, d, steps=1)
    assert len(records[0][0]["printed"]) < scaffolds.PRINT_CHARS + 100
    assert records[0][0]["printed"].endswith("characters this step, the rest dropped]\n")


def test_a_scaffolds_files_are_its_own(tmp_path):
    """A link in a scaffold could read a file from anywhere into a prompt or into memory."""
    d = mini(tmp_path, "def step(ep):\n    return None\n")
    (tmp_path / "secret.txt").write_text("OPENAI_API_KEY=sk-...")
    (d / "prompts" / "plan.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ScaffoldError, match="scaffold mini: prompts/plan.txt: a link: a scaffold's files are its own"):
        load_scaffold(d)
    d = mini(tmp_path, "step = 1\n", name="nostep")
    with pytest.raises(ScaffoldError, match="scaffold nostep: policy.py: defines no step"):
        load_scaffold(d)


def test_the_readme_example_runs(tmp_path):
    """scaffolds/README.md's example, as written (and as the meta-LLM reads it), loads and plays."""
    import meta_scaffold
    api = (scaffolds.SCAFFOLDS / "README.md").read_text().strip()
    assert api.startswith("# Writing a scaffold") and api in meta_scaffold.META_SYSTEM
    example = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    d = mini(tmp_path, example, ops={"plan": ["READ", "SEARCH", "ACTION"]},
             prompts={"plan": "{observation}\nMemory: {files}\nAct: <|ACTION|>name<|END|>"})
    answers = iter(["<|SEARCH|>notes.txt|tree<|END|>", "<|ACTION|>go Move West<|END|>"] * 2)
    records, _ = play_mini(tmp_path, d, answer=None, steps=2, model=lambda request: next(answers))
    assert [r["action"] for r in records[0]] == [{"raw": "Move West", "executed": "Move West", "valid": True}] * 2
    assert [len(r["plan"]["turns"]) for r in records[0]] == [2, 2] and records[0][0]["plan"]["ended"] == "action"


# ---------------------------------------------------------------- the red team's cases ------------
# A cold review (review12) escaped the first checker; each case is now refused at load, with its
# file and line, or fails its own episode at run time.

def test_update_wrapper_copying_a_harness_modules_globals_is_refused(tmp_path):
    """Review 1: update_wrapper(updated=("__globals__",)) merged statistics' globals (sys, ...)
    into the policy's at load time, with no dunder in the code: os, open, the API key."""
    marker = tmp_path / "escaped.txt"
    d = mini(tmp_path, f'''
        import functools
        import statistics


        def holder():
            return None


        functools.update_wrapper(holder, statistics.mean, assigned=(), updated=("__globals__",))
        sys.modules["builtins"].open({str(marker)!r}, "w").write("out of the sandbox")


        def step(ep):
            return None
        ''')
    with pytest.raises(ScaffoldError, match=r"^scaffold mini: policy.py:10: functools.update_wrapper is not available"):
        load_scaffold(d)
    assert not marker.exists()


def test_annotations_are_refused(tmp_path):
    """Review 2: singledispatch's register() evaluates string annotations, which the checker never
    read: one reached os through object's subclasses at load time."""
    marker = tmp_path / "escaped.txt"
    payload = ("[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
               f".__init__.__globals__['open']({str(marker)!r}, 65) and int")
    d = mini(tmp_path, f'''
        import functools


        @functools.singledispatch
        def f(x):
            return 0


        def g(x: {payload!r}):
            return 1


        f.register(g)


        def step(ep):
            return None
        ''')
    with pytest.raises(ScaffoldError, match=r"^scaffold mini: policy.py:5: functools.singledispatch is not available"):
        load_scaffold(d)
    assert not marker.exists()
    d = mini(tmp_path, f"def step(ep, x: {payload!r} = 0):\n    return None\n", name="annotated")
    with pytest.raises(ScaffoldError, match=r"^scaffold annotated: policy.py:1: annotations are not allowed"):
        load_scaffold(d)


def test_a_reply_is_traced_as_it_arrives_and_must_go_back_to_its_ask(tmp_path):
    """Review 3 and 5: a policy driving ask() by hand acted on a reply it never gave back (the trace
    kept no response), or changed the request after the trace recorded it. The model gets the
    harness's own copy of the request, the reply is traced when it arrives, replies are frozen,
    and a reply that does not go back to its ask fails the step."""
    d = mini(tmp_path, '''
        def step(ep):
            plan = ep.routine("plan", ["READ"])
            plan.say("which action?")
            asking = plan.ask()
            request = next(asking)
            request.messages[0]["content"] = "a prompt the trace never shows"
            reply = yield request
            return reply.text
        ''')
    seen, agents = [], []
    with pytest.raises(PolicyError, match=r"^step 0: a model reply never went back to its routine.ask\(\)"):
        play_mini(tmp_path, d, model=lambda request: seen.append(request.messages) or "Do", agents=agents)
    asked = [{"role": "user", "content": "which action?"}]
    assert seen == [asked]
    traced = agents[0]._routines["plan"]._trace()
    assert traced["messages"] == asked and traced["turns"] == [
        {"role": "base", "input_messages": 1, "response": "Do", "prompt_tokens": 0, "completion_tokens": 0,
         "latency_s": 0.0, "error": None, "finish_reason": None}]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Reply("<|ACTION|>Do<|END|>").text = "the model never said this"


@pytest.mark.parametrize("case", ["never sent", "two at once", "an earlier step's routine"])
def test_every_request_goes_to_the_model_from_its_own_step(tmp_path, case):
    source, why = {
        "never sent": ('''
            def step(ep):
                plan = ep.routine("plan", ["ACTION"])
                plan.say("act")
                next(plan.ask())
                return "Noop"
            ''', r"^step 0: a routine.ask\(\) request never went to the model"),
        "two at once": ('''
            def step(ep):
                first, second = ep.routine("first", ["READ"]), ep.routine("second", ["READ"])
                first.say("one")
                second.say("two")
                next(first.ask())
                next(second.ask())
            ''', r"^policy.py:7: routine second: one model call at a time"),
        "an earlier step's routine": ('''
            def step(ep):
                if ep.step == 0:
                    ep.state["plan"] = ep.routine("plan", ["ACTION"])
                    return "Noop"
                ep.state["plan"].say("act again")
                return (yield from ep.state["plan"].ask()).action
            ''', r"^policy.py:6: routine plan.say: the routine belongs to an earlier step"),
    }[case]
    with pytest.raises(PolicyError, match=why):
        play_mini(tmp_path, mini(tmp_path, source))


def test_what_the_policy_is_given_is_its_own_copy(tmp_path):
    """Observations, the previous action and ep.data are copies: changing them changes nothing the
    harness (or the next step) reads."""
    d = mini(tmp_path, '''
        def step(ep):
            if ep.step == 1:
                ep.write("seen.txt", f"{ep.previous_observation['text'][:4]} {ep.data['limits']['max_files']} "
                                     f"{ep.previous_action['executed']}")
            ep.observation["text"] = "rewritten"
            ep.data["limits"]["max_files"] = 99
            if ep.previous_action:
                ep.previous_action["executed"] = "rewritten"
            return "Noop"
        ''')
    records, agents = play_mini(tmp_path, d, steps=2)
    assert agents[0].fs.read("seen.txt") == f"{records[0][0]['observation'][:4]} 8 Noop\n"


def test_a_policy_error_comes_out_of_its_own_episodes_generator(tmp_path):
    """Review 6: a setup() error raised when the agent was made, before any episode ran, and a
    step error ended every concurrent episode. Both now come out of the episode's generator, as
    PolicyError naming the line of policy.py, for run_episodes to end that episode alone."""
    d = mini(tmp_path, '''
        def setup(ep):
            ep.state["x"] = [1][5]


        def step(ep):
            return "Noop"
        ''')
    scaffold = load_scaffold(d)
    env = envs.make_env("crafter", seed=0)
    episode = play(env, make_agent("memory", env, scaffold, tmp_path / "mem"), 0)
    with pytest.raises(PolicyError, match=r"^policy.py:3: IndexError: list index out of range$"):
        next(episode)


@pytest.mark.parametrize("case", ["a step that never asks", "a setup that never returns", "a model that never commits"])
def test_a_step_over_its_budget_fails_with_a_one_line_reason(tmp_path, case):
    """Review 6: `while True: pass` hung every episode. A step gets `policy_seconds` of the policy's
    own code between model calls (caught or not) and `step_turns` model turns."""
    source, why = {
        "a step that never asks": ('''
            def step(ep):
                while True:
                    try:
                        while True:
                            pass
                    except Exception:
                        pass
            ''', r"^policy.py:\d: over budget: more than 1 s of the policy's own code without a model call"),
        "a setup that never returns": ('''
            def setup(ep):
                while True:
                    ep.state["n"] = ep.state.get("n", 0) + 1


            def step(ep):
                return None
            ''', r"^policy.py:[34]: over budget: more than 1 s"),
        "a model that never commits": ('''
            def step(ep):
                plan = ep.routine("plan", ["READ", "ACTION"])
                plan.say("act")
                while True:
                    yield from plan.ask()
                    plan.say("again")
            ''', r"^step 0: over budget: more than 3 model turns \(scaffold.json limits step_turns\)$"),
    }[case]
    d = mini(tmp_path, source, limits={"policy_seconds": 1, "step_turns": 3})
    with pytest.raises(PolicyError, match=why):
        play_mini(tmp_path, d, answer="<|READ|>notes.txt<|END|>")


def test_module_code_over_budget_is_refused_at_load(tmp_path):
    d = mini(tmp_path, "while True:\n    pass\n\ndef step(ep):\n    return None\n", limits={"policy_seconds": 1})
    with pytest.raises(ScaffoldError, match=r"^scaffold mini: policy.py:[12]: over budget: more than 1 s"):
        load_scaffold(d)


def test_initial_files_come_from_plain_folders_inside_the_scaffold(tmp_path):
    """Review 8: initial_files named any folder on disk ('../x', an absolute path, a linked folder,
    /proc/self) and its files went into memory and prompts; an absolute path through a link
    raised a bare ValueError. Now each folder is a relative path inside the scaffold with no link
    on the way, holding plain files with memory file names."""
    secret = tmp_path / "secretdir"
    secret.mkdir()
    (secret / "creds.txt").write_text("OPENAI_API_KEY=sk-...")
    (tmp_path / "linked").symlink_to(secret)
    for i, (folder, why) in enumerate([("../secretdir", "../secretdir is not inside the scaffold"),
                                       (str(secret), f"{secret} is not inside the scaffold"),
                                       (str(tmp_path / "linked"), "is not inside the scaffold"),
                                       ("/proc/self", "/proc/self is not inside the scaffold"),
                                       ("memory/linked", "memory/linked is a link"),
                                       ("memory/nowhere", "memory/nowhere is not a folder")]):
        d = mini(tmp_path, "def step(ep):\n    return None\n", name=f"s{i}", initial_files={"crafter": [folder]})
        (d / "memory").mkdir()
        (d / "memory" / "linked").symlink_to(secret)
        with pytest.raises(ScaffoldError, match=rf"^scaffold s{i}: scaffold.json initial_files: crafter: a folder of "
                                                rf"the scaffold or a list of them, got .*\(.*{re.escape(why)}\)$"):
            load_scaffold(d)
    for i, (entry, why) in enumerate([(".hidden", "do not start with '.'"), ("notes.txt/", "not a file"),
                                      ("creds.txt", "a link")]):
        d = mini(tmp_path, "def step(ep):\n    return None\n", name=f"f{i}", initial_files={"crafter": "memory"})
        (d / "memory").mkdir()
        if entry == "creds.txt":
            (d / "memory" / entry).symlink_to(secret / entry)
        elif entry.endswith("/"):
            (d / "memory" / entry).mkdir()
        else:
            (d / "memory" / entry).write_text("x")
        with pytest.raises(ScaffoldError, match=rf"^scaffold f{i}: memory/{re.escape(entry.rstrip('/'))}: .*{why}"):
            load_scaffold(d)


def test_policy_code_stuck_in_one_c_call_ends_the_process_with_its_line(tmp_path):
    """Found after the review: a signal is seen between bytecodes only, so sum(range(10**15))
    cannot be interrupted and hung the run. The process now ends (exit 1) after 2 * policy_seconds
    + 1 s, with a traceback naming the line of policy.py."""
    d = mini(tmp_path, "def step(ep):\n    return sum(range(10 ** 15))\n", limits={"policy_seconds": 1})
    code = (f"import envs\nfrom agent import load_scaffold, make_agent, play\nenv = envs.make_env('crafter', seed=0)\n"
            f"next(play(env, make_agent('memory', env, load_scaffold({str(d)!r}), {str(tmp_path / 'mem')!r}), 0))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ev.ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("Timeout (0:00:03)!")
    assert f'File "{d / "policy.py"}", line 2 in step' in out.stderr
