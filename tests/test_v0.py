"""scaffolds/v0 is the authors' inner_agent_v0 (automem_reference.md section 1), behaviourally: its
limits against a model that never ends a routine, its op set and PLAN's read-only rule, the
contents of LOG and PLAN in the authors' order, fallbacks and overrides per game, the grouped-op
and unshown-reads quirks, the map analysis and the action repair, on the real games."""
import json
import random
import re

import pytest

import envs
from agent import OpenAIBackend, load_scaffold, make_agent, play, run_episodes
from scripted_server import ScriptedServer

V0 = load_scaffold("v0")
POLICY = V0.module()    # v0's functions, for the pure ones (map analysis, repair)


def episode(tmp_path, script, env_name, task=None, steps=2, seed=0, two_model=False):
    records = []
    with ScriptedServer(script) as server:
        env = envs.make_env(env_name, task, seed=seed)
        ag = make_agent("memory", env, V0, tmp_path / "mem", two_model=two_model)
        backend = OpenAIBackend(server.url, "m", specialist="memory-lora" if two_model else None, max_retries=0)
        run_episodes([play(env, ag, seed, records.append, steps)], backend)
    return [json.loads(json.dumps(r)) for r in records], ag


def is_log(body):
    return body["messages"][0]["content"].startswith("MEMORY UPDATE")


def first_prompt(record, routine):
    return record[routine]["messages"][0]["content"]


def in_order(text, *parts):
    """Every part occurs in text, each after the one before."""
    at = [text.find(p) for p in parts]
    assert all(i >= 0 for i in at), [p for p, i in zip(parts, at) if i < 0]
    assert at == sorted(at), [p for p, _ in sorted(zip(parts, at), key=lambda x: x[1])]


def test_a_model_that_never_ends_gets_10_log_and_10_plan_turns(tmp_path):
    """LOG and PLAN run to their limits (10 each); UPSERT is not a v0 op; PLAN never writes."""
    def never_ends(body):
        if is_log(body):
            return "<|SEARCH|>actions_log.txt|step<|END|> <|UPSERT|>strategy.txt|goal|stairs<|END|>"
        return "<|READ|>strategy.txt<|END|> <|APPEND|>strategy.txt|premature<|END|>"
    records, ag = episode(tmp_path, never_ends, "minihack", "MiniHack-Corridor-R3-v0", steps=3)
    assert [r["routines"] for r in records] == [["plan"], ["log", "plan"], ["log", "plan"]]
    for r in records:
        assert len(r["plan"]["turns"]) == 10 and r["plan"]["ended"] == "turn_limit"
        assert r["action"] == {"raw": None, "executed": "search", "valid": False}     # v0's MiniHack fallback
        assert r["memory_diff"] == {}
        appends = [o for t in r["plan"]["turns"] for o in t["ops"] if o["op"] == "APPEND"]
        assert len(appends) == 10 and all(o["error"].startswith("APPEND is not allowed here") for o in appends)
    for r in records[1:]:
        assert len(r["log"]["turns"]) == 10 and r["log"]["ended"] == "turn_limit"
        upserts = [o for t in r["log"]["turns"] for o in t["ops"] if o["op"] == "UPSERT"]
        assert len(upserts) == 10 and all(o["error"].startswith("UPSERT is not allowed here") for o in upserts)
    assert ag.fs.read("strategy.txt") == ""
    # the fallback "search" is a MiniHack action here: the next LOG reports it as the previous action
    assert "Your previous action (step 0): search\n" in first_prompt(records[1], "log")
    # a turn's continuation: results, a fresh index, a reminder (LOG); results and advice (PLAN)
    log_next = records[1]["log"]["messages"][2]["content"]
    assert log_next.startswith("Results:\n[SEARCH actions_log.txt|step]\nactions_log.txt is empty\n\n"
                               "[UPSERT strategy.txt|goal|stairs]\nerror: UPSERT is not allowed here")
    assert "Memory files now (name and number of lines):\nactions_log.txt (0 lines)\n" in log_next
    plan_next = records[1]["plan"]["messages"][2]["content"]
    assert plan_next.endswith("Commit your action now with <|ACTION|>action name<|END|>, or revise your idea "
                              "and consult memory again.") and "Memory files" not in plan_next


def test_log_and_plan_say_what_the_authors_said_in_their_order(tmp_path):
    """MiniHack, the fallback "search" each step (after the welcome message has gone it changes
    nothing): step 2 shows every optional section, the unchanged notice included."""
    records, _ = episode(tmp_path, lambda body: "<|DONE|>" if is_log(body) else "I am not sure.",
                         "minihack", "MiniHack-Corridor-R3-v0", steps=3)
    assert records[0]["plan"]["ended"] == "no_ops" and len(records[0]["plan"]["turns"]) == 1   # fallback at once
    log, plan = first_prompt(records[2], "log"), first_prompt(records[2], "plan")
    assert records[2]["log"]["turns"][0]["input_messages"] == 1                  # no system message: one user message
    in_order(log, "MEMORY UPDATE. You keep the memory of an agent",
             "Your previous action (step 1): search\n\n",
             "Note: the observation is the same as before the previous action, so that action most likely had no effect.",
             "Spatial notes: find @ (you) on the map",
             "MAP ANALYSIS (around @):\n",
             "The game's response (the current observation):\nmessage:\n",
             "\ninventory:\na: a +0 short sword",
             "Memory files (name and number of lines):\nactions_log.txt (0 lines)\ndungeon_map.txt (0 lines)\n"
             "game_rules.txt (33 lines)\n",
             "<|CREATE|>file<|END|>               make a new empty file\n<|DONE|>",
             "- Check before you write", "- Write log entries as: Step N action 'X': outcome",
             "When memory is up to date, finish with <|DONE|>.")
    assert log.endswith("finish with <|DONE|>.")
    in_order(plan, "You are playing MiniHack, a small NetHack level.",
             "Goal: reach the staircase down (>) on this level.",
             "You keep a memory of this episode", "Spatial notes:",
             "Note: the observation is the same as before the previous action, so that action most likely had no "
             "effect. Log this.\nDo not repeat your last action (search): it changed nothing.",
             "MAP ANALYSIS (around @):", "Memory files (name and number of lines):", "Current observation:\nmessage:",
             "Decide in six steps:", "Commands (memory is read-only here):", "<|ACTION|>action name<|END|>        commit",
             "Commit exactly one action")
    # the observation as the authors' agent read it: long-term context, a new line, short-term, with
    # their environment wrapper's distance and compass words
    obs = envs.make_env("minihack", "MiniHack-Corridor-R3-v0", seed=0).reset()
    authors = (obs["long_term_context"].replace("horizontal wall near north", "horizontal wall 3-4 steps away north")
               .replace("very near northnortheast", "2 steps away between north and northeast")
               .replace("dark area very near east", "dark area 2 steps away east")
               .replace("adjacent", "1 step away (directly reachable)"))
    assert "vertical closed door 1 step away (directly reachable) east\n" in authors
    assert f"{authors}\n{obs['short_term_context']}" in first_prompt(records[0], "plan")


def test_the_stuck_notice_counts_steps_from_3_on(tmp_path):
    records, _ = episode(tmp_path, lambda body: "<|DONE|>" if is_log(body) else "<|ACTION|>search<|END|>",
                         "minihack", "MiniHack-Corridor-R3-v0", steps=5)
    notes = [re.findall(r"^(Note: the observation|WARNING: the observation has not changed for \d+ steps)",
                        first_prompt(r, "log"), re.M) for r in records[1:]]
    assert notes == [[], ["Note: the observation"], ["Note: the observation"],   # step 0 cleared the welcome
                     ["WARNING: the observation has not changed for 3 steps"]]


def test_overrides_and_fallbacks_per_game(tmp_path):
    silent = lambda body: "<|DONE|>" if is_log(body) else "..."   # noqa: E731   (PLAN: no op, no action)
    nle, _ = episode(tmp_path / "nle", silent, "nle", steps=2)
    plan = first_prompt(nle[1], "plan")
    assert plan.startswith("You are playing NetHack, a roguelike dungeon crawler.")
    in_order(plan, "Actions by category:\n- Move one square:", "- Stairs: down (on >), up (on <",
             "Never merge a command and a letter", "How to read the observation:", "Goal: go as far as you can")
    assert nle[0]["action"] == {"raw": None, "executed": "search", "valid": False}
    crafter, _ = episode(tmp_path / "crafter", silent, "crafter", steps=2)
    plan = first_prompt(crafter[1], "plan")
    assert plan.startswith(envs.make_env("crafter").instruction)               # the game's own instruction
    assert "MAP ANALYSIS" not in plan and "Spatial notes: record your position" in plan
    assert crafter[0]["action"] == {"raw": None, "executed": "Noop", "valid": False}
    maze, _ = episode(tmp_path / "maze", silent, "minihack", "MiniHack-MazeWalk-9x9-v0", steps=2)
    # "search" is no MazeWalk action: the game's default (north) runs, and LOG quotes the output
    assert maze[0]["action"] == {"raw": None, "executed": "north", "valid": False}
    assert ("Your previous output (step 0) was 'search'. That is not a valid action, so the game ran its default "
            "action, north, instead.") in first_prompt(maze[1], "log")


def test_grouped_ops_and_an_action_with_unshown_reads(tmp_path):
    """Kept quirks: a reply's ops run grouped by type (a READ before the WRITE written before it);
    a PLAN reply with an ACTION commits it, its reads run but their results are never shown."""
    def script(body):
        if is_log(body):
            return "<|WRITE|>strategy.txt|go east<|END|><|READ|>strategy.txt<|END|><|DONE|>"
        return "<|READ|>game_rules.txt<|END|><|ACTION|>eat d<|END|>"
    records, ag = episode(tmp_path, script, "nle", steps=2)
    ops = records[1]["log"]["turns"][0]["ops"]
    assert [(o["op"], o["result"]) for o in ops] == [("READ", "strategy.txt is empty"),
                                                     ("WRITE", "wrote strategy.txt (1 lines)"), ("DONE", None)]
    assert ag.fs.read("strategy.txt") == "go east\n"
    plan = records[1]["plan"]
    assert len(plan["turns"]) == 1 and plan["ended"] == "action"
    assert plan["turns"][0]["ops"][0]["result"].startswith("game_rules.txt (33 lines):\nNETHACK RULES")
    # combined-action repair: "eat d" is sent as "eat"
    assert [r["action"]["raw"] for r in records] == ["eat", "eat"]


def test_combined_action_repair():
    repair = POLICY["repair"]
    assert [repair(a) for a in ("eat d", "Eat f", "open west", "throw a h", "far east", "north", "move west")] == \
        ["eat", "eat", "open", "throw", "far east", "north", "move west"]


MAP = """message:
Hello Agent

map:
       -------------
       |.......>...+
       |....F<......
       |...}@+.....|
       |...^....{.>|

       ------------
       |.........|
Agent the Footpad              St:12 Dx:18 Co:14 In:10 Wi:11 Ch:10 Chaotic S:0
Dlvl:1 $:0 HP:12(12) Pw:2(2) AC:7 Xp:1/0
"""


def test_map_analysis_on_a_hand_made_map():
    """Player row, neighbours and their classes in the authors' order (N S E W NE NW SE SW), the
    stairs on the map, and the rows that close up (the blank row is left out, so the wall below
    it is next to the bottom row)."""
    assert POLICY["map_analysis"](MAP) == (
        "MAP ANALYSIS (around @):\n"
        "Stairs next to you: < northeast\n"
        "Stairs down on the map: > 2 north, 3 east (distance 3), > 1 south, 6 east (distance 6)\n"
        "Monsters next to you: F north\n"
        "Doors next to you: + east\n"
        "Danger next to you: } west, ^ southwest\n"
        "You can move: north, south, east, northeast, northwest, southeast")
    assert POLICY["map_analysis"]("no map here\nAgent @ home, a line of letters") == ""
    # the blank row is left out: the floor below it counts as next to @
    assert POLICY["map_analysis"]("|.@.|\n\n|...|") == (
        "MAP ANALYSIS (around @):\nYou can move: south, east, west, southeast, southwest\n"
        "Blocked: north, northeast, northwest")


@pytest.mark.parametrize("obs,expected", [
    # tile classes: the boulder ` and 0 are blocked, ~ (an item) is passable
    ("  `0~\n  .@F\n  }^|", "Monsters next to you: F east\nDanger next to you: ^ south, } southwest\n"
                            "You can move: east, west, northeast\nBlocked: north, northwest, southeast"),
    # a dark maze: @ almost alone; its row counts by its right-stripped length (3), leading spaces included
    (" ##\n  @", "You can move: north, northwest\nBlocked: south, east, west, northeast, southeast, southwest"),
    # letters over the right-stripped length: 2 of 3 (not a map row) before, 2 of 7 after
    ("Ab@    \n    Ab@\n    ...", "Monsters next to you: b west\nYou can move: south, west, southwest\n"
                                 "Blocked: north, east, northeast, northwest, southeast"),
    # the first 3 > in reading order, not the nearest 3 (the one 2 away is last)
    (">.......>\n.........\n....@....\n.>.......\n>.....>..",
     "Stairs down on the map: > 2 north, 4 west (distance 4), > 2 north, 4 east (distance 4), "
     "> 1 south, 3 west (distance 3)\nYou can move: north, south, east, west, northeast, northwest, southeast, southwest"),
    # the window: 15 rows above @ to 14 below (the > 15 below is out)
    ("\n".join([">.."] + ["..."] * 14 + ["..@"] + ["..."] * 13 + ["..>", "..>"]),
     "Stairs down on the map: > 15 north, 2 west (distance 15), > 14 south (distance 14)\n"
     "You can move: north, south, west, northwest, southwest\nBlocked: east, northeast, southeast"),
])
def test_map_analysis_matches_the_authors_at_the_edges(obs, expected):
    """automem_reference.md 1.1 (each expected text was checked against the authors' parse_nle_map)."""
    assert POLICY["map_analysis"](obs) == "MAP ANALYSIS (around @):\n" + expected


def authors_find_the_player(text):
    """The authors' player-row rule (automem_reference.md 1.1): a line with @ whose right-stripped
    text is at least 3 characters, letters other than @ under half of them."""
    for line in text.split("\n"):
        row = line.rstrip()
        if "@" in line and len(row) >= 3 and sum(c.isalpha() and c != "@" for c in row) / len(row) < 0.5:
            return True
    return False


def test_map_analysis_shows_on_every_mazewalk_observation_where_the_authors_find_the_player():
    """A random walk on MazeWalk-9x9 (seeds 42-45, 40 steps each): where @ stands almost alone
    in the dark, a strip()ped row was too short and the analysis vanished."""
    seen = 0
    for seed in (42, 43, 44, 45):
        env = envs.make_env("minihack", "MiniHack-MazeWalk-9x9-v0", seed=seed)
        obs, rng = env.reset(seed=seed), random.Random(seed)
        for _ in range(40):
            text = f"{obs['long_term_context']}\n{obs['short_term_context']}"
            if authors_find_the_player(text):
                seen += 1
                assert POLICY["map_analysis"](text), text
            obs, _, done, _ = env.step(rng.choice(env.actions))
            if done:
                break
    assert seen >= 100


def test_map_analysis_on_a_real_observation():
    obs = envs.make_env("minihack", "MiniHack-Corridor-R3-v0", seed=0).reset()
    text = f"{obs['long_term_context']}\n{obs['short_term_context']}"
    assert POLICY["map_analysis"](text) == ("MAP ANALYSIS (around @):\nDoors next to you: + east\n"
                                            "You can move: north, east, west, northwest\n"
                                            "Blocked: south, northeast, southeast, southwest")


def test_only_exact_action_names_are_valid(tmp_path):
    """As the authors' evaluator (BALROG's): "move west" is not "Move West"; the game's default runs."""
    records, _ = episode(tmp_path, lambda body: "<|DONE|>" if is_log(body) else "<|ACTION|>move west<|END|>",
                         "crafter", steps=2)
    assert records[0]["action"] == {"raw": "move west", "executed": "Noop", "valid": False}
    assert ("Your previous output (step 0) was 'move west'. That is not a valid action, so the game ran its "
            "default action, Noop, instead.") in first_prompt(records[1], "log")


@pytest.mark.parametrize("reply,expected", [
    ("Format: <|ACTION|>action name<|END|>. I go <|ACTION|>west<|END|>", "west"),   # a placeholder does not win
    ("ACTION:\nwest", "west"), ("ACTION: `west`.", "west"), ("<|ACTION|>north <|READ|>f<|END|>\nACTION: west", "west"),
    ("<|ACTION|>kick d<|END|>\nACTION: north", "kick"),   # tags first, repaired, as the authors: not north
])
def test_the_committed_action_is_the_first_the_game_accepts_once_repaired(tmp_path, reply, expected):
    records, _ = episode(tmp_path, lambda body: "<|DONE|>" if is_log(body) else reply,
                         "minihack", "MiniHack-Corridor-R3-v0", steps=1)
    assert records[0]["action"] == {"raw": expected, "executed": expected, "valid": True}


def test_a_specialist_reply_without_ops_is_a_plain_hand_off(tmp_path):
    """Two-model: the specialist stops using memory (its only op is one PLAN does not allow, which
    the authors skipped): the base model gets the hand-off with no results, as the authors'."""
    def script(body):
        if body["model"] == "memory-lora":
            return "<|DONE|>" if is_log(body) else "<|APPEND|>strategy.txt|go east<|END|>"
        return "<|ACTION|>west<|END|>"
    records, _ = episode(tmp_path, script, "minihack", "MiniHack-Corridor-R3-v0", steps=1, two_model=True)
    turns = records[0]["plan"]["turns"]
    assert [t["role"] for t in turns] == ["specialist", "base"] and records[0]["action"]["raw"] == "west"
    assert records[0]["plan"]["messages"][:turns[1]["input_messages"]][-2:] == [
        {"role": "assistant", "content": "<|APPEND|>strategy.txt|go east<|END|>"},
        {"role": "user", "content": V0.render("handoff", {"results": ""}).strip()}]
