"""envs.py against the specs: concrete strings, progression, success, seeding, bad input."""
import json
import random
import subprocess
import sys
from collections import deque

import numpy as np
import pytest

import envs
from envs import make_env, nle_language

ROOT = envs.DATA_DIR.parent


# ---------------------------------------------------------------- Crafter ---------------------

def test_crafter_first_observation_seed_42():
    env = make_env("crafter", seed=42)
    obs = env.reset()
    assert obs["long_term_context"] == (
        "You see:\n- grass 1 step to your west\n- tree 5 steps to your north-east\n\n"
        "You face grass at your front.")
    assert obs["short_term_context"] == (
        "Your status:\n- health: 9/9\n- food: 9/9\n- drink: 9/9\n- energy: 9/9\n\n"
        "You have nothing in your inventory.")
    assert obs["text"] == obs["long_term_context"] + "\n\n" + obs["short_term_context"]
    assert env.frame.shape == (256, 256, 3)
    assert len(env.actions) == 17 and env.default_action == "Noop"
    assert env.instruction == CRAFTER_INSTRUCTION  # BALROG's, listing exactly the valid actions
    listed = CRAFTER_INSTRUCTION.split("\n")[2:19]
    assert env.actions == tuple(line.split(":")[0] for line in listed)


NAMES = ["None", "water", "grass", "stone", "path", "sand", "tree", "lava", "coal", "iron",
         "diamond", "table", "furnace", "player", "cow", "zombie", "skeleton", "arrow", "plant"]
N = {n: i for i, n in enumerate(NAMES)}


def scene(cells, facing=(0, 1), **state):
    sem = np.full((64, 64), N["grass"])
    for (x, y), name in cells.items():
        sem[x, y] = N[name]
    sem[30, 30] = N["player"]
    return envs.crafter_scene(sem, (30, 30), facing, NAMES, N["player"], **state)


def test_crafter_scene_items_ties_and_facing():
    text = scene({(31, 30): "tree", (33, 30): "tree", (29, 29): "cow", (31, 31): "stone",
                  (30, 32): "water", (32, 30): "water", (26, 27): "zombie", (34, 33): "iron"},
                 facing=(1, 0))
    # x-major scan from (26, 27), the zombie's cell; names keep the order first met even when
    # a closer cell replaces the location (grass); ties keep the first (water south, not east).
    assert text == (
        "You see:\n"
        "- zombie 7 steps to your north-west\n"
        "- grass 1 step to your west\n"
        "- cow 2 steps to your north-west\n"
        "- water 2 steps to your south\n"
        "- tree 1 step to your east\n"
        "- stone 2 steps to your south-east\n"
        "- iron 7 steps to your south-east\n\n"
        "You face tree at your front.")


def test_crafter_scene_sleeping_dead_and_empty():
    sem = np.full((64, 64), N["player"])
    only_player = envs.crafter_scene(sem, (30, 30), (0, 1), NAMES, N["player"], sleeping=True)
    # BALROG ends the state line with a blank line and joins blocks with another: 4 newlines
    assert only_player == ("You are sleeping, and will not be able take actions until energy "
                           "is full.\n\n\n\nYou see nothing away from you.\n\nYou face player at your front.")
    assert scene({}, dead=True).startswith("You died.\n\n\n\nYou see:\n- grass 1 step")
    # at the map's west edge the window slice is empty: nothing seen, nothing faced
    sem = np.full((64, 64), N["grass"])
    assert envs.crafter_scene(sem, (2, 30), (-1, 0), NAMES, N["player"]) == \
        "You see nothing away from you.\n\nYou face nothing at your front."


def test_crafter_inventory_text():
    inv = {"health": 7, "food": 5, "drink": 9, "energy": 2, "sapling": 1, "wood": 3, "stone": 0,
           "wood_pickaxe": 1}
    assert envs.crafter_body(inv) == (
        "Your status:\n- health: 7/9\n- food: 5/9\n- drink: 9/9\n- energy: 2/9\n\n"
        "Your inventory:\n- sapling: 1\n- wood: 3\n- wood_pickaxe: 1")


def test_crafter_actions_progression_and_invalid():
    env = make_env("crafter", seed=1)
    env.reset()
    _, _, _, info = env.step("  move   WEST ")
    assert info["valid"] and info["executed_action"] == "Move West"
    _, _, _, info = env.step("make_wood_pickaxe")
    assert info["valid"] and info["executed_action"] == "Make Wood Pickaxe"
    _, _, done, info = env.step("dance wildly")
    assert not info["valid"] and info["executed_action"] == "Noop" and not done
    player = env._env._player
    player.achievements["collect_wood"] = 2
    player.achievements["place_table"] = 1
    _, _, _, info = env.step("Noop")
    assert info["progression"] == pytest.approx(2 / 22)
    assert info["unlocked"] == ["collect_wood", "place_table"]


def test_crafter_step_cap():
    env = make_env("crafter", seed=3, max_steps=5)
    env.reset()
    dones = [env.step("Noop")[2] for _ in range(5)]
    assert dones == [False] * 4 + [True]


# ---------------------------------------------------------------- NetHack text ----------------

@pytest.mark.parametrize("dx,dy,expected", [
    (5, 2, ("near", "eastnortheast")), (-1, 3, ("near", "northnorthwest")),
    (3, 3, ("near", "northeast")), (0, -4, ("near", "south")), (1, 0, ("adjacent", "east")),
    (-2, -2, ("very near", "southwest")), (-19, 1, ("far", "westnorthwest")),
    (0, 20, ("very far", "north")), (6, -7, ("far", "southsoutheast")),
])
def test_distance_direction(dx, dy, expected):
    assert envs.distance_direction(dx, dy) == expected


@pytest.mark.parametrize("noun,plural", [
    ("newt", "newts"), ("jackal", "jackals"), ("pair of boots", "pair of boots"),
    ("iron bars", "iron bars"), ("ice", "area of ice"), ("lava", "area of lava"),
    ("can of grease", "cans of grease"), ("scroll labeled FOO", "scrolls labeled FOO"),
    ("boom left", "booms left"), ("unknown creature causing you worry",
                                  "unknown creatures causing you worry"),
    ("fly", "flies"), ("monkey", "monkeys"), ("fox", "foxes"), ("grass", "grasses"),
    ("dwarf", "dwarves"), ("staff", "staves"), ("wolf", "wolves"), ("bench", "benches"),
    ("dark area", "dark areas"), ("lens", "lenses"), ("contact lenses", "contact lenses"),
])
def test_pluralize(noun, plural):
    assert envs.pluralize(noun) == plural


def _glyph_ids():
    import nle.nethack as nh
    mon = {nh.permonst(i).mname: i for i in range(nh.NUMMONS)}
    obj = {nh.objdescr.from_idx(i).oc_name: i for i in range(nh.NUM_OBJECTS)}
    cmap = json.loads((envs.DATA_DIR / "nle_glyph_names.json").read_text())["cmap"]
    return nh, mon, obj, {name: nh.GLYPH_CMAP_OFF + i for i, name in enumerate(cmap[:87])}


def crafted_nle_obs():
    nh, mon, obj, cm = _glyph_ids()
    glyphs = np.full((21, 79), cm["room floor"], dtype=np.int16)
    put = lambda x, y, g: glyphs.__setitem__((y, x), g)  # noqa: E731
    put(10, 10, nh.GLYPH_MON_OFF + mon["human"])           # the player
    put(12, 10, nh.GLYPH_MON_OFF + mon["newt"])
    put(20, 10, nh.GLYPH_MON_OFF + mon["newt"])
    put(21, 10, nh.GLYPH_MON_OFF + mon["newt"])
    put(20, 3, nh.GLYPH_MON_OFF + mon["newt"])
    put(9, 7, nh.GLYPH_PET_OFF + mon["kitten"])
    put(15, 10, cm["fountain"])
    put(15, 11, cm["fountain"])
    put(13, 10, cm["vertical wall"])                      # stops the east ray
    put(10, 13, cm["dark area"])                          # stops the south ray
    for x, y in ((11, 9), (11, 11), (9, 11)):
        put(x, y, nh.GLYPH_OBJ_OFF + obj["arrow"])
    blstats = np.zeros(27, dtype=np.int64)
    blstats[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
             23, 24, 25, 26]] = [10, 10, 18, 17, 8, 10, 9, 14, 17, 12, 14, 16, 2, 35, 5, 6, 3,
                                 0, 2, 21, 1234, 2, 1, 0, 2,
                                 nh.BL_MASK_BLIND | nh.BL_MASK_CONF | nh.BL_MASK_STONE, -1]
    tty = np.full((24, 80), ord(" "), dtype=np.uint8)
    inv_strs = np.zeros((55, 80), dtype=np.uint8)
    inv_letters = np.zeros(55, dtype=np.uint8)
    for i, (letter, item) in enumerate([("a", "a +1 long sword (weapon in hand)"),
                                        ("b", "12 uncursed apples")]):
        inv_letters[i] = ord(letter)
        inv_strs[i, :len(item)] = np.frombuffer(item.encode(), dtype=np.uint8)
    return {"glyphs": glyphs, "blstats": blstats, "tty_chars": tty,
            "tty_cursor": np.array([11, 10]), "inv_strs": inv_strs, "inv_letters": inv_letters}


def test_language_observation_grouping_sorting_and_rays():
    text = nle_language(crafted_nle_obs())["text_glyphs"]
    assert text == "\n".join([
        "newt far eastnortheast",
        "newts far east",
        "fountain near east and eastsoutheast",
        "vertical wall near east",
        "dark area near south",
        "tame kitten near northnorthwest",
        "newt very near east",
        "arrow adjacent northeast, southeast, and southwest",
    ])


def test_cursor_statistics_inventory():
    obs = crafted_nle_obs()
    lang = nle_language(obs)
    assert lang["text_cursor"] == "Yourself a human"
    obs["tty_cursor"] = np.array([11, 12])
    assert nle_language(obs)["text_cursor"] == "very near east newt"
    obs["tty_cursor"] = np.array([0, 5])  # on the message line: no map cell
    assert nle_language(obs)["text_cursor"] == ""
    assert lang["text_blstats"] == "\n".join([
        "Strength: 17/18", "Dexterity: 8", "Constitution: 10", "Intelligence: 9", "Wisdom: 14",
        "Charisma: 17", "Depth: 2", "Gold: 35", "HP: 14/16", "Energy: 5/6", "AC: 3",
        "XP: 2/21", "Time: 1234", "Position: 10|10", "Hunger: Hungry", "Monster Level: 0",
        "Encumbrance: Burdened", "Dungeon Number: 0", "Level Number: 2", "Score: 12",
        "Alignment: Chaotic", "Condition: Confused Blind Stoned"])
    assert lang["text_inventory"] == "a: a +1 long sword (weapon in hand)\nb: 12 uncursed apples"


def _tty(*rows, width=80):
    tty = np.full((24, width), ord(" "), dtype=np.uint8)
    for i, row in enumerate(rows):
        tty[i, :len(row)] = np.frombuffer(row.encode("latin-1"), dtype=np.uint8)
    return tty


def test_message_rules():
    msg = envs.text_message
    assert msg(_tty("")) == ""
    assert msg(_tty("Hello Agent, welcome to NetHack!  You are a lawful human Knight.")) == \
        "Hello Agent, welcome to NetHack!  You are a lawful human Knight."
    # multi-row, page ends with --More--, blank rows skipped, read from the first row's indent
    assert msg(_tty("   You kill the newt!", "", "   The jackal bites!--More--", "   ignored")) == \
        "You kill the newt!\nThe jackal bites!--More--"
    assert msg(_tty(" Things that are here:", " a dagger", " (1 of 2)")) == \
        "Things that are here:\na dagger\n(1 of 2)"
    assert msg(_tty(" A list", " (end)")) == "A list\n(end)"
    # no page end: only the first row
    assert msg(_tty("You see here a scroll.", "second row")) == "You see here a scroll."
    # the trim quirk: a row whose only character is its last one trims to empty
    assert msg(_tty(" " * 79 + "x")) == ""
    assert msg(_tty("\x1a  You hear a door open. \x1a")) == "You hear a door open."


def test_hybrid_layout_on_real_game():
    env = make_env("nle", seed=7)
    obs = env.reset()
    raw = env.last_obs
    lang = nle_language(raw)
    rows = ["".join(map(chr, r)) for r in raw["tty_chars"]]
    cursor = f"(x={raw['tty_cursor'][1]}, y={raw['tty_cursor'][0]})"
    assert obs["long_term_context"] == (
        f"message:\n{lang['text_message']}\n\nlanguage observation:\n{lang['text_glyphs']}\n\n"
        f"cursor:\n{lang['text_cursor']}\n{cursor}\n\nmap:\n" + "\n".join(rows[1:]) + "\n\n")
    assert obs["short_term_context"] == f"inventory:\n{lang['text_inventory']}\n"
    assert lang["text_cursor"].startswith("Yourself a ")
    assert env.default_action == "esc" and "far northeast" in env.actions


# ---------------------------------------------------------------- NetHack episodes -------------

def test_nethack_progression_table():
    env = make_env("nle", seed=0)
    env.reset()
    table = json.loads((ROOT / "data" / "nle_progression.json").read_text())
    raw = env.last_obs
    for depth, xp in ((3, 1), (1, 5), (2, 2)):
        raw["blstats"][12], raw["blstats"][18] = depth, xp
        env._update_progression(raw["blstats"])
    assert env.reached == {"Dlvl:1", "Dlvl:2", "Dlvl:3", "Xp:1", "Xp:2", "Xp:5"}
    assert env.progression == pytest.approx(max(table["Dlvl:3"], table["Xp:5"]))


def test_nethack_invalid_action_letters_and_skip_more():
    env = make_env("nle", seed=3)
    env.reset()
    _, _, _, info = env.step("do a backflip")
    assert not info["valid"] and info["executed_action"] == "esc"
    _, _, _, info = env.step("i")          # a letter is a key: here, the inventory menu
    assert info["valid"] and info["executed_action"] == "i"
    obs, _, _, info = env.step("Far East")
    assert info["valid"] and info["executed_action"] == "far east"


NLE_USEFUL_NAMES = (  # the names of nle's USEFUL_ACTIONS, in the game's order (BALROG's words)
    "north", "east", "south", "west", "northeast", "southeast", "southwest", "northwest",
    "far north", "far east", "far south", "far west", "far northeast", "far southeast",
    "far southwest", "far northwest", "up", "down", "wait", "more", "adjust", "apply", "attributes",
    "call", "cast", "chat", "close", "dip", "drop", "droptype", "eat", "engrave", "enhance", "esc",
    "fight", "fire", "force", "inventory", "inventtype", "invoke", "jump", "kick", "look", "loot",
    "monster", "move", "movefar", "offer", "open", "pay", "pickup", "pray", "puton", "quaff",
    "quiver", "read", "remove", "ride", "rub", "rush", "rush2", "search", "seeamulet", "seearmor",
    "seegold", "seerings", "seespells", "seetools", "seetrap", "seeweapon", "shell", "sit", "swap",
    "takeoff", "takeoffall", "throw", "tip", "turnundead", "twoweapon", "untrap", "versionshort",
    "wear", "wield", "wipe", "zap", "space")


def test_nethack_action_set_is_balrogs():
    """BALROG's NetHack actions: the names of USEFUL_ACTIONS, a-z, A-Z, 0-9 and 00-99 (spec
    section 2). Names of other nle commands run esc, as in BALROG. 00-99 (no alias in balrog-nle,
    where they would crash) type their two digits."""
    env = make_env("nle", seed=3)
    env.reset()
    keys = [chr(c) for c in (*range(97, 123), *range(65, 91), *range(48, 58))] + [f"{n:02d}" for n in range(100)]
    assert env.actions == NLE_USEFUL_NAMES and set(env._index) == {*NLE_USEFUL_NAMES, *keys}
    for name in ("far east", "esc", "space", "a", "Z", "5", "42"):
        assert env.parse_action(name) == name
    for name in ("quit", "save", "teleport", "travel", "extcmd", "annotate", "options", "seeall",
                 "whatis", "minus", "apos", "zero", "nine", "100", "7a"):
        assert env.parse_action(name) is None
        _, _, done, info = env.step(name)
        assert not info["valid"] and info["executed_action"] == "esc" and not done
    _, _, done, info = env.step("12")                  # a count: two keys, one step
    assert info["valid"] and info["executed_action"] == "12" and not done
    assert env.steps == 16


def test_nethack_ends_after_150_steps_without_game_time():
    """BALROG's no_progress_timeout: 150 steps in a row in which the in-game time (blstats TIME)
    does not pass end the episode, not 75 (nle 1.3.0 counts twice per step). esc takes no game
    time; search takes a turn and starts the count again."""
    env = make_env("nle", seed=42)
    env.reset()
    assert [env.step("esc")[2] for _ in range(100)] == [False] * 100
    import nle.nethack
    assert envs.NLE_BL_TIME == nle.nethack.NLE_BL_TIME
    time_before = env.game_time
    _, _, done, _ = env.step("search")
    assert not done and env.game_time > time_before and env.steps_without_time == 0
    results = [env.step("esc") for _ in range(150)]
    assert [done for _, _, done, _ in results] == [False] * 149 + [True]
    info = results[-1][3]
    assert info["end_status"] == "aborted_no_progress" and info["truncated"]
    assert env.steps == 251 and env.steps_without_time == 150


def test_nethack_skip_more_joins_the_pages():
    env = make_env("nle", seed=5)                # seed 5 meets --More-- pages on these runs
    env.reset()
    skipped = []
    for action in ["far east", "far west", "far north", "far south"] * 5:
        obs, _, done, info = env.step(action)
        message = obs["long_term_context"].split("message:\n", 1)[1].split("\n\nlanguage observation:")[0]
        assert "--More--" not in message
        if info["more_skipped"]:
            skipped.append(message)
            assert "\n" in message              # each --More-- became a line break between pages
        if done:
            break
    assert skipped, "no --More-- met: the test would not exercise skip-more"


# ---------------------------------------------------------------- MiniHack --------------------

def _position(raw):
    return int(raw["blstats"][0]), int(raw["blstats"][1])


def _explore_to_stairs(env, budget):
    """A small explorer: BFS to '>' if seen, else to the nearest floor next to unseen space."""
    moves = {(0, -1): "north", (1, 0): "east", (0, 1): "south", (-1, 0): "west"}
    blocked = set()
    for _ in range(budget):
        raw = env.last_obs
        chars = raw["tty_chars"][1:22]
        me = _position(raw)
        passable = lambda c: chr(c) in ".<>{#@`"  # noqa: E731
        start, seen = me, {me: None}
        queue, target = deque([me]), None
        while queue:
            cur = queue.popleft()
            ch = chr(chars[cur[1], cur[0]])
            if ch == ">" or (cur != me and any(
                    0 <= cur[0] + dx < 79 and 0 <= cur[1] + dy < 21 and
                    chars[cur[1] + dy, cur[0] + dx] == ord(" ") and
                    (cur, (cur[0] + dx, cur[1] + dy)) not in blocked for dx, dy in moves)):
                target = cur
                if ch == ">":
                    break
                if not any(chr(chars[y, x]) == ">" for y in range(21) for x in range(79)):
                    break
            for dx, dy in moves:
                nxt = (cur[0] + dx, cur[1] + dy)
                if 0 <= nxt[0] < 79 and 0 <= nxt[1] < 21 and nxt not in seen and \
                        passable(chars[nxt[1], nxt[0]]) and (cur, nxt) not in blocked:
                    seen[nxt] = cur
                    queue.append(nxt)
        if target is None:
            return None
        if target == me:  # frontier is here: step into the unseen
            for (dx, dy), name in moves.items():
                nxt = (me[0] + dx, me[1] + dy)
                if chars[nxt[1], nxt[0]] == ord(" ") and (me, nxt) not in blocked:
                    step, first = name, nxt
                    break
        else:
            first = target
            while seen[first] != start:
                first = seen[first]
            step = moves[(first[0] - me[0], first[1] - me[1])]
        _, reward, done, info = env.step(step)
        if done:
            return info
        if _position(env.last_obs) == me:
            blocked.add((me, first))
    return None


def test_minihack_success_gives_full_progression():
    env = make_env("minihack", "MiniHack-MazeWalk-9x9-v0", seed=5, max_steps=400)
    env.reset()
    info = _explore_to_stairs(env, 400)
    assert info is not None and info["end_status"] == "task_successful"
    assert info["progression"] == 1.0


def test_minihack_actions_and_default():
    env = make_env("minihack", "MiniHack-Corridor-R3-v0", seed=0)
    env.reset()
    assert env.default_action == "north" and "i" not in env.actions
    assert env.actions == ("north", "east", "south", "west", "northeast", "southeast",
                           "southwest", "northwest", "open", "kick", "search")
    _, _, _, info = env.step("i")
    assert not info["valid"] and info["executed_action"] == "north"
    steps = 0
    done = False
    while not done:
        _, _, done, info = env.step("search")
        steps += 1
    assert steps <= 100 and info["progression"] == 0.0 and info["end_status"] == "truncated"


def test_boxoban_levels_come_from_boxoban_levels(boxoban_levels):
    levels = envs._boxoban_levels(str(boxoban_levels / "hard"))
    assert len(levels) == 3332
    for seed in (3, 11):
        env = make_env("minihack", "MiniHack-Boxoban-Hard-v0", seed=seed)
        obs = env.reset()
        level = random.Random(seed).choice(levels).rstrip("\n").split("\n")
        shown = {".": "{", "$": "`", " ": ".", "#": "#", "@": "@"}
        expect = ["".join(shown[c] for c in row) for row in level]
        map_rows = obs["long_term_context"].split("map:\n")[1].split("\n")
        body = [r.strip() for r in map_rows if r.strip() and not r.startswith(("Agent", "Dlvl"))]
        assert body[:len(expect)] == expect
        assert env.actions == ("north", "east", "south", "west")


def test_boxoban_missing_levels_error(monkeypatch):
    monkeypatch.setenv("BOXOBAN_LEVELS", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="download_boxoban_levels"):
        make_env("minihack", "MiniHack-Boxoban-Medium-v0", seed=0)


# ---------------------------------------------------------------- BALROG's instruction prompts --
# The first user message of every request: BALROG's `env.get_instruction_prompt()`, typed here
# from balrog/environments/{crafter,nle,minihack}/__init__.py (see data/balrog_instructions.json).

CRAFTER_INSTRUCTION = """\
You are an agent playing Crafter. The following are the only valid actions you can take in the game, followed by a short description of each action:

Noop: do nothing,
Move West: move west on flat ground,
Move East: move east on flat ground,
Move North: move north on flat ground,
Move South: move south on flat ground,
Do: Multiuse action to collect material, drink from lake and hit creature in front,
Sleep: sleep when energy level is below maximum,
Place Stone: place a stone in front,
Place Table: place a table,
Place Furnace: place a furnace,
Place Plant: place a plant,
Make Wood Pickaxe: craft a wood pickaxe with a nearby table and wood in inventory,
Make Stone Pickaxe: craft a stone pickaxe with a nearby table, wood, and stone in inventory,
Make Iron Pickaxe: craft an iron pickaxe with a nearby table and furnace, wood, coal, and iron in inventory,
Make Wood Sword: craft a wood sword with a nearby table and wood in inventory,
Make Stone Sword: craft a stone sword with a nearby table, wood, and stone in inventory,
Make Iron Sword: craft an iron sword with a nearby table and furnace, wood, coal, and iron in inventory.

These are the game achievements you can get:
1. Collect Wood
2. Place Table
3. Eat Cow
4. Collect Sapling
5. Collect Drink
6. Make Wood Pickaxe
7. Make Wood Sword
8. Place Plant
9. Defeat Zombie
10. Collect Stone
11. Place Stone
12. Eat Plant
13. Defeat Skeleton
14. Make Stone Pickaxe
15. Make Stone Sword
16. Wake Up
17. Place Furnace
18. Collect Coal
19. Collect Iron
20. Make Iron Pickaxe
21. Make Iron Sword
22. Collect Diamond

In a moment I will present a history of actions and observations from the game.
Your goal is to get as far as possible by completing all the achievements.

PLAY!"""

NLE_ACTION_SECTION = """\
north: move north,
east: move east,
south: move south,
west: move west,
northeast: move northeast,
southeast: move southeast,
southwest: move southwest,
northwest: move northwest,
far north: move far north,
far east: move far east,
far south: move far south,
far west: move far west,
far northeast: move far northeast,
far southeast: move far southeast,
far southwest: move far southwest,
far northwest: move far northwest,
up: go up a staircase,
down: go down a staircase (tip: you can only go down if you are standing on the stairs),
wait: rest one move while doing nothing,
more: display more of the message (tip: ONLY ever use when current message ends with --More--),
annotate: leave a note about the level,
apply: apply (use) a tool,
call: name a monster or object, or add an annotation,
cast: cast a spell,
close: close an adjacent door,
open: open an adjacent door,
dip: dip an object into something,
drop: drop an item,
droptype: drop specific item types (specify in the next prompt),
eat: eat something (tip: replenish food when hungry),
esc: exit menu or message,
engrave: engrave writing on the floor (tip: Elbereth),
enhance: advance or check weapons skills,
fire: fire ammunition from quiver,
fight: fight a monster (even if you only guess one is there),
force: force a lock,
inventory: show your inventory,
invoke: invoke ,
jump: jump to a location,
kick: kick an enemy or a locked door or chest,
look: look at what is under you,
loot: loot a box on the floor,
monster: use a monster's special ability (when polymorphed),
offer: offer a sacrifice to the gods (tip: on an aligned altar),
overview: display an overview of the dungeon,
pay: pay your shopping bill,
pickup: pick up things at the current location,
pray: pray to the gods for help,
puton: put on an accessory,
quaff: quaff (drink) something,
quiver: select ammunition for quiver,
read: read a scroll or spellbook,
remove: remove an accessory,
rub: rub a lamp or a stone,
search: search for hidden doors and passages,
swap: swap wielded and secondary weapons,
takeoff: take off one piece of armor,
takeoffall: take off all armor,
teleport: teleport to another level (if you have the ability),
throw: throw something (e.g. a dagger or dart),
travel: travel to a specific location on the map (tip: in the next action, specify > or < for stairs, { for fountain, and _ for altar),
twoweapon: toggle two-weapon combat,
untrap: untrap something,
wear: wear a piece of armor,
wield: wield a weapon,
wipe: wipe off your face,
zap: zap a wand,
minus: -,
space:  ,
apos: ',
0: 0,
1: 1,
2: 2,
3: 3,
4: 4,
5: 5,
6: 6,
7: 7,
8: 8,
9: 9."""

NLE_INSTRUCTION_END = """\
- You can attack monsters by moving into them.

In a moment I will present a history of actions and observations from the game.
Your goal is to get as far as possible in the game.

PLAY!"""


def test_nethack_instruction_is_balrogs():
    env = make_env("nle", seed=0)
    head = ("You are an agent playing NetHack. The following are the possible actions you can "
            "take in the game, followed by a short description of each action:\n\n")
    assert env.instruction.startswith(head + NLE_ACTION_SECTION + "\n\nTips:\n- When the message ")
    assert env.instruction.endswith(NLE_INSTRUCTION_END)
    assert env.instruction.split(NLE_ACTION_SECTION)[1].count("\n- ") == 8  # BALROG's 8 tips
    # BALROG's list is a fixed table, not the action space: six of its names are not actions
    listed = [line.split(": ")[0] for line in NLE_ACTION_SECTION.split("\n")]
    invalid = [name for name in listed if env.parse_action(name) != name]
    assert len(listed) == 80 and invalid == ["annotate", "overview", "teleport", "travel", "minus", "apos"]


MINIHACK_GOALS = {
    "MiniHack-Boxoban-Hard-v0": "You are playing Boxoban, a box-pushing game inspired by Sokoban. "
    "Your goal is to push the boulders onto the fountains on the map. You can push the boulders by "
    "walking into them, as long as there are no obstacles behind them.",
    "MiniHack-MazeWalk-9x9-v0": "Your goal is to get as far as possible in the game.",
    "MiniHack-Corridor-R3-v0": "Your goal is to explore the level and reach the stairs down",
    "MiniHack-CorridorBattle-Dark-v0": "Your goal is to explore the level and reach the stairs down",
    "MiniHack-Quest-Medium-v0": "Your goal is to explore the level, fight monsters, and navigate "
    "rooms and mazes to ultimately reach the stairs down.",
}
MINIHACK_GOALS["MiniHack-Boxoban-Medium-v0"] = MINIHACK_GOALS["MiniHack-Boxoban-Hard-v0"]
MINIHACK_GOALS["MiniHack-MazeWalk-15x15-v0"] = MINIHACK_GOALS["MiniHack-MazeWalk-9x9-v0"]
MINIHACK_GOALS["MiniHack-Quest-Easy-v0"] = MINIHACK_GOALS["MiniHack-Quest-Medium-v0"]


def test_minihack_corridor_instruction_is_balrogs():
    env = make_env("minihack", "MiniHack-Corridor-R3-v0", seed=0)
    assert env.instruction == (
        "You are an agent playing MiniHack. The following are the possible actions you can take "
        "in the game, followed by a short description of each action:\n\n"
        "north: move north,\neast: move east,\nsouth: move south,\nwest: move west,\n"
        "northeast: move northeast,\nsoutheast: move southeast,\nsouthwest: move southwest,\n"
        "northwest: move northwest,\nopen: open an adjacent door,\n"
        "kick: kick an enemy or a locked door or chest,\n"
        "search: search for hidden doors and passages.\n\n"
        "In a moment I will present a history of actions and observations from the game.\n\n"
        "Tip: there is no point in outputting the same action over and over if nothing changes.\n\n"
        "Your goal is to explore the level and reach the stairs down\n\nPLAY!")


@pytest.mark.parametrize("task", envs.MINIHACK_TASKS)
def test_minihack_instruction_lists_the_tasks_actions_and_goal(task, request):
    if "Boxoban" in task:
        request.getfixturevalue("boxoban_levels")
    env = make_env("minihack", task, seed=0)
    head, rest = env.instruction.split("\n\n", 1)
    actions, rest = rest.split(".\n\n", 1)
    assert head.startswith("You are an agent playing MiniHack. ")
    assert [line.split(": ")[0] for line in actions.split(",\n")] == list(env.actions)
    assert rest.endswith(f"\n\n{MINIHACK_GOALS[task]}\n\nPLAY!")
    if "Quest" in task:  # its own action order, no "up"; BALROG's MiniHack wording
        assert actions.startswith("north: move north,\n") and "\nup: " not in actions
        assert ",\ndown: go down the stairs,\nwait: rest one move while doing nothing,\n" in actions
        assert actions.endswith(",\npickup: pick up things at the current location if there are "
                                "any,\npray: pray to the gods for help,\nputon: put on an accessory,"
                                "\nquaff: quaff (drink) something,\nsearch: search for hidden doors "
                                "and passages,\nzap: zap a wand")


# ---------------------------------------------------------------- names and seeds -------------

def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="crafter, minihack, nle"):
        make_env("doom")
    with pytest.raises(ValueError, match="MiniHack-Quest-Medium-v0"):
        make_env("minihack")
    with pytest.raises(ValueError, match="MiniHack-MazeWalk-9x9-v0"):
        make_env("minihack", "MiniHack-River-v0")


PLAY = r"""
import hashlib, sys
sys.path.insert(0, {root!r})
from envs import make_env
env = make_env({env!r}, {task!r}, seed={seed})
h = hashlib.sha256(env.reset()["text"].encode())
acts = [a for a in env.actions if a not in ("Sleep",)][:8]
for i in range({steps}):
    obs, r, done, info = env.step(acts[(i * 7 + i // 5) % len(acts)])
    h.update(obs["text"].encode()); h.update(repr((round(r, 6), info["progression"])).encode())
    if done:
        h.update(b"reset"); h.update(env.reset()["text"].encode())
print(h.hexdigest())
"""


@pytest.mark.parametrize("env,task,steps", [
    ("crafter", "default", 600), ("minihack", "MiniHack-Boxoban-Medium-v0", 150),
    ("minihack", "MiniHack-CorridorBattle-Dark-v0", 150), ("nle", "NetHackChallenge-v0", 400),
])
def test_same_seed_same_episode_across_processes(env, task, steps, request):
    if "Boxoban" in task:
        request.getfixturevalue("boxoban_levels")
    code = PLAY.format(root=str(ROOT), env=env, task=task, seed=42, steps=steps)
    digests = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)]
    assert digests[0] == digests[1] and len(digests[0]) == 64
    other = subprocess.run([sys.executable, "-c", code.replace("seed=42", "seed=43")],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert other != digests[0]


def test_code_and_data_cite_nothing_outside_the_repository():
    """A fork has no ../shared/: code and data name the paper or files of their own."""
    files = [*ROOT.glob("*.py"), *(ROOT / "scaffolds").glob("*.py"), *(ROOT / "data").iterdir()]
    assert [f.name for f in files if "../shared" in f.read_text(errors="replace")] == []
