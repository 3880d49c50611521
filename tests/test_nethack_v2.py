"""scaffolds/nethack_v2 is the authors' converged NetHack scaffold (automem_reference.md section 2),
behaviourally: UPSERT_MAP, the status files code rewrites between LOG and PLAN, pruning after
LOG, PLAN's status block and oscillation warning, the map analysis of section 1.1, on the real
NetHack. tests/test_converged_scaffolds.py plays it on tiny-random and SmolLM2-135M."""
import json
import re

import pytest

import agent
import envs
import eval as ev
from agent import OpenAIBackend, load_scaffold, make_agent, play, run_episodes
from scripted_server import ScriptedServer

V2 = load_scaffold("nethack_v2")
POLICY = V2.module()
SEED = 42   # a Healer: Dlvl 1, HP 13(13), $1448, 11 inventory letters a-k


def run(tmp_path, backend, steps, two_model=False):
    records = []
    env = envs.make_env("nle", seed=SEED)
    ag = make_agent("memory", env, V2, tmp_path / "mem", two_model=two_model)
    run_episodes([play(env, ag, SEED, records.append, steps)], backend)
    return [json.loads(json.dumps(r)) for r in records], ag


def scripted(tmp_path, steps, log=(), plan=lambda n: "<|ACTION|>search<|END|>", specialist=None):
    """NetHack seed 42 against a scripted model: the LOG of step N answers log[N - 1] (else DONE),
    the n-th PLAN turn answers plan(n); with `specialist` (two-model mode) the specialist's
    turns answer specialist(first message)."""
    plans = []

    def reply(body):
        first = body["messages"][0]["content"]
        if body["model"] == "memory-lora":
            return specialist(first)
        if first.startswith("MEMORY UPDATE"):
            step = int(re.search(r"\(step (\d+)\)", first).group(1)) + 1
            return log[step - 1] if step <= len(log) else "<|DONE|>"
        plans.append(first)
        return plan(len(plans) - 1)
    with ScriptedServer(reply) as server:
        backend = OpenAIBackend(server.url, "m", specialist=specialist and "memory-lora", max_retries=0)
        return run(tmp_path, backend, steps, two_model=specialist is not None)


def first_prompt(record, routine):
    return record[routine]["messages"][0]["content"]


def test_upsert_map_replaces_the_line_of_its_square(tmp_path):
    """UPSERT_MAP (LOG only): (x,y) or x,y; the square's old line goes, the new one comes last;
    it runs after APPEND and before WRITE and CREATE whatever the text order; the diff shows what
    it changed."""
    log = ["<|UPSERT_MAP|>(3, 4)|floor<|END|><|UPSERT_MAP|>5,6|door east<|END|><|DONE|>",
           "<|CREATE|>notes.txt<|END|><|WRITE|>todo.txt|look east<|END|>"
           "<|UPSERT_MAP|>3,4|stairs down|under a boulder<|END|>"
           "<|UPSERT_MAP|>x=1,y=2|bad<|END|><|APPEND|>dungeon_map.txt|(9,9): appended<|END|><|DONE|>"]
    records, ag = scripted(tmp_path, 3, log)
    first = records[1]["log"]["turns"][0]["ops"]
    assert [(o["op"], o["args"], o["kind"], o["result"]) for o in first[:2]] == [
        ("UPSERT_MAP", ["(3, 4)", "floor"], "write", "dungeon_map.txt: (3,4) now reads: floor"),
        ("UPSERT_MAP", ["5,6", "door east"], "write", "dungeon_map.txt: (5,6) now reads: door east")]
    assert records[1]["memory_diff"]["dungeon_map.txt"] == {"edited": [
        {"op": "UPSERT_MAP", "removed": [], "added": ["(3,4): floor"]},
        {"op": "UPSERT_MAP", "removed": [], "added": ["(5,6): door east"]}]}
    second = records[2]["log"]["turns"][0]["ops"]
    assert [o["op"] for o in second] == ["APPEND", "UPSERT_MAP", "UPSERT_MAP", "WRITE", "CREATE", "DONE"]
    assert second[2]["result"] == ("error: UPSERT_MAP: the square is two whole numbers x,y, "
                                   "not 'x=1,y=2': <|UPSERT_MAP|>12,5|door, leads east<|END|>")
    assert records[2]["memory_diff"]["dungeon_map.txt"] == {
        "appended": ["(9,9): appended"],
        "edited": [{"op": "UPSERT_MAP", "removed": ["(3,4): floor"], "added": ["(3,4): stairs down|under a boulder"]}]}
    assert ag.fs.read("dungeon_map.txt") == "(5,6): door east\n(9,9): appended\n(3,4): stairs down|under a boulder\n"
    counts = ev.episode_stats(records)["counts"]   # the malformed one wrote nothing: not a write
    assert counts["writes"] == 5 and counts["log_writes"] == 6 and counts["parse_errors"] == 0
    log_prompt, plan_prompt = first_prompt(records[1], "log"), first_prompt(records[1], "plan")
    assert "<|UPSERT_MAP|>x,y|description<|END|>  set the line of square (x,y)" in log_prompt
    assert "<|WRITE|>" not in log_prompt and "<|UPSERT_MAP|>x,y" in plan_prompt   # spatial guidance names it


def test_status_and_inventory_files_are_rewritten_between_log_and_plan(tmp_path):
    """LOG reads step 0's status file, then overwrites both files (WRITE still works, though LOG
    no longer lists it); code rewrites them before PLAN, whose reads (traced, unshown) see step 1's."""
    log = ["<|WRITE|>current_status.txt|stale<|END|><|WRITE|>inventory.txt|stale<|END|>"
           "<|READ|>current_status.txt<|END|><|DONE|>"]
    records, ag = scripted(tmp_path, 2, log, lambda n: "<|READ|>current_status.txt<|END|><|READ|>inventory.txt<|END|>"
                                                   "<|ACTION|>far west<|END|>")
    status = ("CURRENT STATUS (rewritten by code at every step)\nDungeon level: 1\nHP: 13/13\nHunger: Normal\n"
              "Experience level: 1\nGold: 1448\nStep: {}\nTiles explored: 0")
    read, *writes, _ = records[1]["log"]["turns"][0]["ops"]
    assert read["result"] == "current_status.txt (8 lines):\n" + status.format(0)
    assert [w["result"] for w in writes] == ["wrote current_status.txt (1 lines)", "wrote inventory.txt (1 lines)"]
    now = status.format(1) + "\n\nRECENT ACTIONS (oldest first)\n  far west"
    plan_status, plan_inventory, _ = records[1]["plan"]["turns"][0]["ops"]
    assert plan_status["result"] == "current_status.txt (11 lines):\n" + now
    inventory = envs.make_env("nle", seed=SEED).reset(seed=SEED)["short_term_context"].strip()
    assert inventory.startswith("inventory:\n$: 1448 gold pieces\na: a blessed +0 scalpel (weapon in hand)\n")
    assert plan_inventory["result"] == ("inventory.txt (14 lines):\nINVENTORY (rewritten by code at every step)\n"
                                        + inventory)
    assert records[1]["memory_diff"]["current_status.txt"] == {"replaced": now + "\n"}
    assert ag.fs.read("inventory.txt") == "INVENTORY (rewritten by code at every step)\n" + inventory + "\n"
    # the observation as the authors' environment wrapper gave it: distances as step counts
    assert ("language observation:\nvertical wall 5-8 steps away east\nhorizontal wall 3-4 steps away southeast "
            "and south\n") in first_prompt(records[0], "plan")
    assert "tame little dog 1 step away (directly reachable) west\n" in first_prompt(records[0], "plan")
    # PLAN's status block; the visited-tile count is 0, as the authors' regex never matches BALROG's cursor
    assert ("GAME STATUS\nDlvl:1 | HP:13/13 (100%) | Hunger:Normal | Xp:1 | Step:1\nRecent actions: far west\n"
            "Tiles explored: 0\n\nMAP ANALYSIS (computed from the map around @):\n") in first_prompt(records[1], "plan")


def test_long_files_are_pruned_after_log_each_under_a_header(tmp_path):
    """actions_log over 200 lines keeps 100, monster_encounters over 150 keeps 50, strategy over
    60 keeps 25 (60 is kept whole), each under one header line, before PLAN."""
    lines = lambda tag, n: "\n".join(f"{tag}{i}" for i in range(1, n + 1))  # noqa: E731
    log = [f"<|APPEND|>actions_log.txt|{lines('a', 201)}<|END|><|APPEND|>monster_encounters.txt|{lines('m', 151)}"
           f"<|END|><|APPEND|>strategy.txt|{lines('s', 40)}<|END|><|DONE|>",
           "<|APPEND|>strategy.txt|one more<|END|><|DONE|>"]
    records, ag = scripted(tmp_path, 3, log)
    diff = records[1]["memory_diff"]
    assert diff["actions_log.txt"] == {"replaced": "[101 older lines pruned after LOG]\n" +
                                       "".join(f"a{i}\n" for i in range(102, 202))}
    assert diff["monster_encounters.txt"] == {"replaced": "[101 older lines pruned after LOG]\n" +
                                              "".join(f"m{i}\n" for i in range(102, 152))}
    assert diff["strategy.txt"]["appended"][-1] == "s40" and "replaced" not in diff["strategy.txt"]
    index = first_prompt(records[1], "plan")
    for shown in ("actions_log.txt (101 lines)", "monster_encounters.txt (51 lines)", "strategy.txt (60 lines)"):
        assert shown in index
    assert records[2]["memory_diff"]["strategy.txt"] == {
        "replaced": "[36 older lines pruned after LOG]\n" + "".join(f"s{i}\n" for i in range(17, 41)) + "one more\n"}
    assert "strategy.txt (26 lines)" in first_prompt(records[2], "plan")


def test_back_and_forth_moves_get_the_oscillation_warning(tmp_path):
    """3 reversals among the last moves warn at the next PLAN: west east west south (2) does not,
    then north (3) does."""
    moves = ("west", "east", "west", "south", "north", "wait")
    records, _ = scripted(tmp_path, 6, plan=lambda n: f"<|ACTION|>{moves[n]}<|END|>")
    warned = ["WARNING: you are going back and forth" in first_prompt(r, "plan") for r in records]
    assert warned == [False] * 5 + [True]
    assert ("(3 reversals in your last 5 moves: west -> east -> west -> south -> north)"
            in first_prompt(records[5], "plan"))
    assert "Recent actions: west, east, west, south, north\n" in first_prompt(records[5], "plan")


def test_two_model_the_specialist_logs_and_consults_the_base_model_commits(tmp_path):
    """nethack_v2_twomodel: LOG on the specialist; in PLAN its ACTION is removed before the
    hand-off (a reply left empty becomes a placeholder), and the base model commits."""
    def specialist(first):
        if first.startswith("MEMORY UPDATE"):
            return "<|UPSERT_MAP|>1,2|floor<|END|><|DONE|>"
        return ("<|ACTION|>west<|END|>" if "Step:0" in first
                else "<|READ|>dungeon_map.txt<|END|> so: <|ACTION|>west<|END|>")
    records, ag = scripted(tmp_path, 2, plan=lambda n: "<|ACTION|>east<|END|>", specialist=specialist)
    assert [[t["role"] for name in r["routines"] for t in r[name]["turns"]] for r in records] == [
        ["specialist", "base"], ["specialist", "specialist", "base"]]
    assert [r["action"]["raw"] for r in records] == ["east", "east"]
    assert ag.fs.read("dungeon_map.txt") == "(1,2): floor\n"
    first, second = (r["plan"]["messages"][1:r["plan"]["turns"][1]["input_messages"]] for r in records)
    assert first == [{"role": "assistant", "content": "(memory consultation done)"},
                     {"role": "user", "content": V2.render("handoff", {"results": ""}).strip()}]
    assert second[0] == {"role": "assistant", "content": "<|READ|>dungeon_map.txt<|END|> so:"}
    assert second[1]["content"].startswith("[READ dungeon_map.txt]\ndungeon_map.txt (1 line):\n(1,2): floor\n\n"
                                           "The memory consultation is over.")


def test_it_plays_nethack_only(tmp_path):
    assert V2.games == ("nle",)
    with pytest.raises(agent.ScaffoldError, match="scaffold nethack_v2 plays nle, not minihack"):
        make_agent("memory", envs.make_env("minihack", "MiniHack-Corridor-R3-v0"), V2, tmp_path / "mem")


MAP = """map:
       -------------
       |.......>...+
  >    |....F<.`0...
       |...}@+~....|
       |...^....{..>

       ------------
        >
Agent the Footpad              St:12 Dx:18 Co:14 In:10 Wi:11 Ch:10 Chaotic S:0
Dlvl:1 $:0 HP:12(12) Pw:2(2) AC:7 Xp:1/0
"""


def test_map_analysis_as_the_authors_read_the_map():
    """Section 1.1: directions N S E W NE NW SE SW; ` and 0 blocked, ~ passable; the first 3 >
    in reading order beyond one square (not the nearest 3: the one 4 squares away is 4th)."""
    around = POLICY["survey"](MAP)
    assert POLICY["analysis"](around) == (
        "MAP ANALYSIS (computed from the map around @):\n"
        "STAIRS NEXT TO YOU: northeast: < stairs up\n"
        "STAIRS DOWN ON THE MAP: > about 3 squares northeast; > about 10 squares northwest; "
        "> about 7 squares southeast\n"
        "MONSTERS NEXT TO YOU: north: F (move into it to attack)\n"
        "DOORS NEXT TO YOU: east: + closed door (open it)\n"
        "DANGER NEXT TO YOU: west: }; southwest: ^\n"
        "YOU CAN MOVE: north (F monster); south (. floor); east (+ door); northeast (< stairs up); "
        "northwest (. floor); southeast (. floor)")
    # stairs up next to @ and stairs down further away: the authors' "stairs down one square" quirk
    assert POLICY["stairs_down_direction"](around) == "northeast"
    assert POLICY["stairs_down_direction"](POLICY["survey"](MAP.replace("<", "."))) is None
    assert POLICY["stairs_down_direction"](POLICY["survey"]("|.>..|\n|.@..|\n|....|")) == "north"
    # a lone @ in a dark corridor, indented: the player's row is found by its right-stripped text
    lone = POLICY["survey"]("map:\n\n          @`\n         #0~")
    assert [(name, kind) for name, _, kind in lone["near"]] == [
        ("north", "off the map"), ("south", "unknown"), ("east", "unknown"), ("west", "rock"),
        ("northeast", "off the map"), ("northwest", "off the map"), ("southeast", "item"), ("southwest", "floor")]
    assert POLICY["survey"]("@ Agent the Footpad, a line of letters") is None
