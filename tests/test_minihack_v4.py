"""scaffolds/minihack_v4 is the authors' converged MiniHack scaffold (automem_reference.md section
2): on the real tasks, with scripted replies, each behaviour asserted from the episode's trace as
eval writes and reads it; its map analysis on hand-made maps (section 1.1's rules).
tests/test_converged_scaffolds.py plays it on tiny-random and SmolLM2-135M."""
import re

import pytest

import envs
import eval as ev
from agent import OpenAIBackend, load_scaffold, make_agent, play, run_episodes
from scripted_server import ScriptedServer

V4 = load_scaffold("minihack_v4")
POLICY = V4.module()    # the pure functions (map analysis, repair)
CORRIDOR = "MiniHack-Corridor-R3-v0"   # seed 0: @ at (54, 6), a closed door east


def traced_episode(tmp_path, model, task, steps, two_model=False):
    """One episode against a scripted server, written by eval's TraceWriter and read back."""
    path = tmp_path / "trace.jsonl"
    writer = ev.TraceWriter(path)
    with ScriptedServer(model) as server:
        env = envs.make_env("minihack", task, seed=0)
        ag = make_agent("memory", env, V4, tmp_path / "mem", two_model=two_model)
        backend = OpenAIBackend(server.url, "m", specialist="memory-lora" if two_model else None, max_retries=0)
        run_episodes([play(env, ag, 0, writer.write, steps)], backend)
    writer.close()
    return ev.read_trace(path), ag


def prompt(record, routine="plan"):
    return record[routine]["messages"][0]["content"]


def is_log(body):
    return body["messages"][0]["content"].startswith("MEMORY UPDATE")


def logging_model(body):
    """PLAN searches every step; LOG (which shows the step it logs) writes nothing at steps 0, 1
    and 3 (step 1: reads first), and adds a map line at step 2."""
    if not is_log(body):
        return "<|ACTION|>search<|END|>"
    logged = re.search(r"\(step (\d+)\)", body["messages"][0]["content"]).group(1)
    if logged == "1" and len(body["messages"]) == 1:
        return "<|SEARCH|>actions_log.txt|search<|END|>"
    return "<|APPEND|>dungeon_map.txt|(54,6): door east<|END|><|DONE|>" if logged == "2" else "<|DONE|>"


@pytest.fixture(scope="module")
def searching(tmp_path_factory):
    """Five searches on the same square of Corridor-R3."""
    return traced_episode(tmp_path_factory.mktemp("searching"), logging_model, CORRIDOR, steps=5)


def test_the_move_at_4_visits_is_mandatory(searching):
    records, _ = searching
    assert [r["action"]["executed"] for r in records] == ["search"] * 5
    assert all("(x=54, y=6)" in r["observation"] for r in records)
    assert ["MANDATORY MOVE\nYou have stood" in prompt(r) for r in records] == [False, False, False, True, True]
    # visit 4: the first unvisited passable direction, diagonals first (as the authors read them)
    assert ("MANDATORY MOVE\nYou have stood on this square 4 times: you are going round in circles.\n"
            "The move you must make: NORTHWEST\nGo northwest now, and in no other direction.") in prompt(records[3])
    assert ("  You are at (54, 6), visited 4 time(s)\n  Explored: 1 distinct squares in 4 steps\n"
            "  UNVISITED passable directions: northwest, north, east, west\n") in prompt(records[3])
    # northwest was not taken (the position stayed): it is skipped from then on
    assert "5 times: you are going round in circles.\nThe move you must make: NORTH\n" in prompt(records[4])
    # the step's full PLAN, in the authors' order
    at = [prompt(records[3]).find(part) for part in (
        "You are playing MiniHack", "You keep a memory of this episode", "TIPS FOR THIS TASK (rooms joined",
        "Spatial notes:", "Do not repeat your last action (search)", "Your last 3 actions, oldest first:\n"
        "  1: search\n  2: search\n  3: search\n\nREPETITION: search, search, search: the same action three times running",
        "MAP ANALYSIS (around @):\nDoors next to you: east: + closed door (open it)\n"
        "Doors on the map: + about 2 squares northeast\n", "EXPLORATION STATUS:", "MANDATORY MOVE\nYou",
        "Memory files (name and number of lines):\nactions_log.txt (2 lines)\ndungeon_map.txt (1 line)\n"
        "game_rules.txt (33 lines)\ninventory.txt (0 lines)\n", "The newest lines of actions_log.txt",
        "Current observation:\nmessage:", "Work through these steps in order:\n1.", "10. When you are sure")]
    assert -1 not in at and at == sorted(at)


def test_a_log_that_writes_nothing_is_auto_logged(searching):
    records, ag = searching
    assert [r["routines"] for r in records] == [["plan"]] + [["log", "plan"]] * 4
    assert [r["memory_diff"] for r in records] == [
        {}, {"actions_log.txt": {"appended": ["Step 0 action 'search': [auto-logged]"]}},
        {"actions_log.txt": {"appended": ["Step 1 action 'search': [auto-logged]"]}},   # it only read
        {"dungeon_map.txt": {"appended": ["(54,6): door east"]}},                       # it wrote: no auto-log
        {"actions_log.txt": {"appended": ["Step 3 action 'search': [auto-logged]"]}}]
    assert [t["ops"][0]["op"] for t in records[2]["log"]["turns"]] == ["SEARCH", "DONE"]
    # PLAN shows the last 5 lines of actions_log.txt as they were before this step's LOG
    assert "(read for you):\n(nothing logged yet)\n" in prompt(records[1])
    assert "(read for you):\nStep 0 action 'search': [auto-logged]\nStep 1 action 'search': [auto-logged]\n\n" \
        in prompt(records[4])
    assert ag.fs.read("actions_log.txt").count("[auto-logged]") == 3
    assert set(ag.fs.files()) == {"actions_log.txt", "dungeon_map.txt", "game_rules.txt", "inventory.txt",
                                  "nethack_symbols.txt", "strategy.txt"}


def test_a_direction_prompt_gets_a_short_plan(tmp_path):
    """kick makes the game ask "In what direction?": PLAN is then the short, direction-only prompt,
    and the position is not counted (the cursor sits on the message line)."""
    records, _ = traced_episode(tmp_path, lambda body: "<|DONE|>" if is_log(body) else
                                "<|ACTION|>east<|END|>" if "GAME PROMPT" in body["messages"][0]["content"]
                                else "<|ACTION|>kick<|END|>", CORRIDOR, steps=3)
    assert [r["action"]["executed"] for r in records] == ["kick", "east", "kick"]
    short = prompt(records[1])
    assert "In what direction?" in records[1]["observation"]
    assert short.startswith('GAME PROMPT: the game asks "In what direction?"\nThe command you gave last')
    assert "Do not give another command such as open or search.\n\nMAP ANALYSIS (around @):\n" in short
    assert "\n\nCurrent observation:\nmessage:\nIn what direction?\n" in short
    assert short.endswith("no other command, and no memory search.\n\n<|ACTION|>direction<|END|>")
    assert "Memory files" not in short and "You are playing MiniHack" not in short
    assert prompt(records[2]).startswith("You are playing MiniHack")
    assert "  You are at (54, 6), visited 2 time(s)\n  Explored: 1 distinct squares in 2 steps\n" in prompt(records[2])


def test_boxoban_gets_its_own_rules_and_actions(tmp_path, boxoban_levels):
    """Its own instruction, tips and game_rules.txt, no inventory.txt, fallback north, # blocked,
    and the game's 4 directions: northeast is invalid (north runs)."""
    def script(body):
        if is_log(body):
            return "<|DONE|>"
        return "I am not sure." if "Your last 1 actions" in body["messages"][0]["content"] else \
            "<|ACTION|>northeast<|END|>"
    records, ag = traced_episode(tmp_path, script, "MiniHack-Boxoban-Hard-v0", steps=2)
    assert ag.ep.actions == ("north", "east", "south", "west") and ag.ep.fallback == "north"
    assert [r["action"] for r in records] == [{"raw": "northeast", "executed": "north", "valid": False},
                                              {"raw": None, "executed": "north", "valid": False}]
    files = ag.fs.files()
    assert set(files) == {"actions_log.txt", "dungeon_map.txt", "game_rules.txt", "nethack_symbols.txt",
                          "strategy.txt"}
    assert files["game_rules.txt"].startswith("BOXOBAN (SOKOBAN) RULES FOR THIS AGENT\n\nACTIONS\n- Only four")
    plan = prompt(records[0])
    assert plan.startswith("You are solving a Boxoban (Sokoban) puzzle in MiniHack.\n\nActions: north, south, "
                           "east, west. These four are the only actions.")
    assert "\n\nRULES FOR THIS TASK (Boxoban, a Sokoban puzzle):\n- Only north, south, east and west" in plan
    assert "game_rules.txt (31 lines)\nnethack_symbols.txt (65 lines)\nstrategy.txt (0 lines)\n" in plan
    analysis = plan.split("MAP ANALYSIS (around @):\n")[1].split("\n\n")[0]
    assert "(unknown #)" in analysis and "(floor #)" not in analysis
    assert ("Your previous output (step 0) was 'northeast'. That is not a valid action, so the game ran its "
            "default action, north, instead.") in prompt(records[1], "log")


def test_initial_files_by_task_replace_the_games():
    """scaffold.json initial_files: a task's entry (Boxoban's) replaces its game's."""
    boxoban, corridor = (V4.initial_files("minihack", task) for task in ("MiniHack-Boxoban-Medium-v0", CORRIDOR))
    assert set(corridor) - set(boxoban) == {"inventory.txt"} and set(boxoban) < set(corridor)
    assert boxoban["nethack_symbols.txt"] == corridor["nethack_symbols.txt"]
    assert boxoban["game_rules.txt"].startswith("BOXOBAN") and corridor["game_rules.txt"].startswith("NETHACK RULES")
    assert V4.initial_files("minihack") == V4.initial_files("minihack", CORRIDOR)


def test_two_model_mode_routes_memory_turns_to_the_specialist(tmp_path):
    """As the authors' _twomodel copy: LOG on the specialist, PLAN consults it first (its ACTION
    hidden), then the base model commits; the auto-log applies to the specialist's LOG too."""
    def script(body):
        if body["model"] == "memory-lora":
            return "<|DONE|>" if is_log(body) else "<|ACTION|>west<|END|>"
        return "<|ACTION|>search<|END|>"
    records, _ = traced_episode(tmp_path, script, CORRIDOR, steps=2, two_model=True)
    assert [t["role"] for t in records[1]["log"]["turns"]] == ["specialist"]
    assert [t["role"] for t in records[1]["plan"]["turns"]] == ["specialist", "base"]
    assert [r["action"]["raw"] for r in records] == ["search", "search"]
    plan = records[1]["plan"]
    handed = plan["messages"][:plan["turns"][1]["input_messages"]]
    assert handed[-2]["content"] == "(memory consultation complete)" and "west" not in str(handed[1:])
    assert records[1]["memory_diff"] == {"actions_log.txt": {"appended": ["Step 0 action 'search': [auto-logged]"]}}


# ---------------------------------------------------------------- map analysis, repair -------

MAP = "\n".join([
    "message:",
    "Hello @gent, welcome to the maze",
    "       ---------------",
    "       |>....+...>..>|",
    "       |.....F.......   ",
    "       |..`0@~}......|",
    "       ^....>}..+.+...",
    "",
    "      -    > +      +",
])


def test_map_analysis_follows_the_authors_rules():
    """The first @ row short of letters (not the greeting); neighbours N S E W NE NW SE SW; the
    boulder ` and 0 blocked, ~ an item; the first 3 > in scan order beyond 1 step (not the nearest,
    which comes last); the first 4 doors; the blank row closes up (the bottom row is 2 rows down)."""
    text, seen = POLICY["map_analysis"](MAP, False)
    assert text == (
        "MAP ANALYSIS (around @):\n"
        "Stairs next to you: south: > stairs down, go there!\n"
        "Stairs down on the map: > about 4 squares northwest; > about 5 squares northeast; "
        "> about 8 squares northeast\n"
        "Monsters next to you: northeast: F monster (move into it to attack)\n"
        "Doors on the map: + about 2 squares northeast; + about 4 squares southeast; + about 6 squares southeast; "
        "+ about 2 squares southeast\n"
        "Danger next to you: southeast: }\n"
        "You can move: north (floor .); south (stairs down >); east (item ~); northeast (monster F); "
        "northwest (floor .); southwest (floor .)\n"
        "Blocked: west (unknown 0)")
    assert seen == {"passable": ["northeast", "northwest", "southwest", "north", "south", "east"],
                    "stairs_next": "south", "stairs_far": (4, "northwest"), "lava": ["southeast"]}
    # Boxoban's # are iron bars; elsewhere # is a corridor
    assert POLICY["map_analysis"]("|#@#|\n|{`.|", True)[0] == (
        "MAP ANALYSIS (around @):\nYou can move: southeast (floor .); southwest (floor {)\n"
        "Blocked: north (off the map); south (unknown `); east (unknown #); west (unknown #); "
        "northeast (off the map); northwest (off the map)")
    assert "You can move: east (floor #); west (floor #); " in POLICY["map_analysis"]("|#@#|\n|{`.|", False)[0]
    # the player row is measured without its trailing blanks, leading blanks included (a strip()
    # would find no player row); a neighbour beyond the trailing blanks is off the map
    assert POLICY["map_analysis"]("  @" + " " * 70 + "\n   .", False)[0] == (
        "MAP ANALYSIS (around @):\nYou can move: southeast (floor .)\n"
        "Blocked: north (off the map); south (rock); east (off the map); west (rock); northeast (off the map); "
        "northwest (off the map); southwest (rock)")
    assert POLICY["map_analysis"]("Agent @ home, a line of letters", False) == (
        "", {"passable": [], "stairs_next": None, "stairs_far": None, "lava": []})


def test_repair_keeps_the_command_and_reads_go_and_move():
    assert [POLICY["repair"](a) for a in ("go north", "Move West", "eat d", "open west", "far east", "go up")] == \
        ["north", "west", "eat", "open", "far east", "go up"]
