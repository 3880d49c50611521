"""The three games as BALROG shows them to a language model: Crafter, MiniHack, NetHack.

`make_env(env, task, seed)` returns an environment whose `reset()` and `step(action_text)` give
BALROG's text observation (`long_term_context`, `short_term_context`) character for character,
whose `instruction` is BALROG's instruction prompt (data/balrog_instructions.json), with BALROG's
progression, plus the seeding fixes that make every episode reproducible from its
seed. `nle_language(obs)` is the NetHack/MiniHack text as a pure function.

    python envs.py --env crafter --seed 42          # instruction + first observation
    python envs.py --env minihack --task MiniHack-Corridor-R3-v0 --play
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import warnings
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # minihack 1.0.2
warnings.filterwarnings("ignore", message=".*Env.reset. can be passed a .seed.")  # nle's seeding
DATA_DIR = Path(__file__).resolve().parent / "data"
ENVS = ("crafter", "minihack", "nle")
CRAFTER_TASKS = ("default",)
MINIHACK_TASKS = (
    "MiniHack-Boxoban-Hard-v0", "MiniHack-Boxoban-Medium-v0", "MiniHack-MazeWalk-9x9-v0",
    "MiniHack-MazeWalk-15x15-v0", "MiniHack-Corridor-R3-v0", "MiniHack-CorridorBattle-Dark-v0",
    "MiniHack-Quest-Easy-v0", "MiniHack-Quest-Medium-v0",
)
NLE_TASKS = ("NetHackChallenge-v0",)
TASKS = {"crafter": CRAFTER_TASKS, "minihack": MINIHACK_TASKS, "nle": NLE_TASKS}
# BALROG's step limits (env.max_steps); NetHack also ends after NO_PROGRESS_TIMEOUT steps in a row
# without in-game time passing (BALROG's and the authors' no_progress_timeout), counted in NLEEnv.step
# The paper's protocol in one place (data/protocol.json): step limits here, the rest in eval.py.
PROTOCOL = json.loads((DATA_DIR / "protocol.json").read_text())
MAX_STEPS = {game: p["max_steps"] for game, p in PROTOCOL["games"].items()}
NO_PROGRESS_TIMEOUT = PROTOCOL["games"]["nle"]["no_progress_timeout"]
NLE_BL_TIME = 20    # nle.nethack.NLE_BL_TIME: the in-game turn counter in blstats


def make_env(env, task=None, seed=0, max_steps=None, **options):
    """One game episode source. `options`: `seeded` (NLE/MiniHack, default True),
    `autopickup` (MiniHack, default False as in BALROG; the AutoMem configs use True)."""
    if env not in TASKS:
        raise ValueError(f"unknown env {env!r}; valid: {', '.join(ENVS)}")
    if task is None:
        if env == "minihack":
            raise ValueError(f"minihack needs a task; valid: {', '.join(MINIHACK_TASKS)}")
        task = TASKS[env][0]
    if task not in TASKS[env]:
        raise ValueError(f"unknown {env} task {task!r}; valid: {', '.join(TASKS[env])}")
    if env == "crafter":
        return CrafterEnv(seed=seed, max_steps=max_steps or MAX_STEPS["crafter"], **options)
    return NLEEnv(env, task, seed=seed, max_steps=max_steps, **options)


def _digest(data):
    """A short hash of what the agent's situation is, for "did this action change anything"."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _normalise(text):
    return re.sub(r"[\s_]+", " ", text.strip().lower())


@lru_cache(maxsize=1)
def _balrog_prompts():
    """BALROG's instruction prompts as data (data/balrog_instructions.json names the source)."""
    return json.loads((DATA_DIR / "balrog_instructions.json").read_text())


def balrog_instruction(env, task="", names=()):
    """BALROG's `env.get_instruction_prompt()`, the first user message of every request, character
    for character. Crafter and NetHack list their whole action table; MiniHack lists the task's
    action `names` that are in its table, in the task's order, and picks its goal by the task id."""
    prompt = _balrog_prompts()[env]
    table = prompt["actions"]
    listed = [n for n in names if n in table] if env == "minihack" else list(table)
    actions = ",\n".join(f"{n}: {table[n]}" for n in listed)
    goal = next((text for key, text in prompt.get("goals", ()) if key in task.lower()), "")
    return "\n".join(prompt["lines"]).replace("{goal}", goal).replace("{actions}", actions)


# --------------------------------------------------------------------------------------------
# Crafter
# --------------------------------------------------------------------------------------------

CRAFTER_ACTIONS = (
    "Noop", "Move West", "Move East", "Move North", "Move South", "Do", "Sleep", "Place Stone",
    "Place Table", "Place Furnace", "Place Plant", "Make Wood Pickaxe", "Make Stone Pickaxe",
    "Make Iron Pickaxe", "Make Wood Sword", "Make Stone Sword", "Make Iron Sword",
)
CRAFTER_VITALS = ("health", "food", "drink", "energy")


class _MembersInOrder(dict):
    """A set that iterates in insertion order: crafter's chunk sets iterate by memory address,
    so its seeded creature balancer would pick different creatures in different processes."""

    def add(self, item):
        self[item] = None

    def remove(self, item):
        del self[item]


@lru_cache(maxsize=None)
def _ordered_chunks_world(world_cls):
    class OrderedChunksWorld(world_cls):
        def reset(self, seed=None):
            super().reset(seed)
            self._chunks = defaultdict(_MembersInOrder)

    return OrderedChunksWorld


class CrafterEnv:
    """Crafter as BALROG plays it: reset + Noop, an extra render after every step."""

    name, task = "crafter", "default"
    actions = CRAFTER_ACTIONS
    default_action = "Noop"

    def __init__(self, seed=0, max_steps=MAX_STEPS["crafter"]):
        import crafter

        self.seed, self.max_steps = seed, max_steps
        self._env = crafter.Env(area=(64, 64), view=(9, 9), size=(256, 256), reward=True, seed=seed)
        self._env._world.__class__ = _ordered_chunks_world(type(self._env._world))
        names = {i: str(n) for n, i in self._env._world._mat_ids.items()}
        names.update({i: cls.__name__.lower() for cls, i in self._env._sem_view._obj_ids.items()})
        self._names = [names.get(i, "") for i in range(max(names) + 1)]
        self._player_id = self._names.index("player")
        self._achievements = crafter.constants.achievements
        self.instruction = balrog_instruction("crafter")
        self.frame = None

    def reset(self, seed=None):
        if seed is not None and seed != self.seed:
            self.__init__(seed, self.max_steps)
        self._env._episode = 0  # crafter derives the world seed from (seed, episode number)
        self._env.reset()
        self.steps, self.progression, self.achievements = 0, 0.0, {}
        obs, _, _, info = self._env_step(0)
        return obs

    def _env_step(self, index):
        _, reward, done, info = self._env.step(index)
        self.frame = self._env.render()  # BALROG's extra render: it draws night noise from the world RNG
        player = self._env._player
        scene = crafter_scene(info["semantic"], info["player_pos"], player.facing, self._names,
                              self._player_id, sleeping=player.sleeping, dead=player.health <= 0)
        body = crafter_body(info["inventory"])
        text = f"{scene}\n\n{body}"
        return {"long_term_context": scene, "short_term_context": body, "text": text,
                "state": _digest(text.encode())}, reward, done, info

    def parse_action(self, text):
        key = _normalise(text)
        for name in CRAFTER_ACTIONS:
            if _normalise(name) == key or name.lower().replace(" ", "") == key.replace(" ", ""):
                return name
        return None

    def step(self, action_text):
        action = self.parse_action(action_text)
        executed = action or self.default_action
        obs, reward, done, info = self._env_step(CRAFTER_ACTIONS.index(executed))
        self.steps += 1
        self.achievements = dict(info["achievements"])
        unlocked = sorted(k for k, v in self.achievements.items() if v > 0)
        self.progression = len(unlocked) / len(self._achievements)
        truncated = self.steps >= self.max_steps and not done
        end = None
        if done or truncated:
            end = "death" if self._env._player.health <= 0 else "truncated"
        return obs, reward, done or truncated, {
            "valid": action is not None, "executed_action": executed,
            "progression": self.progression, "achievements": self.achievements,
            "unlocked": unlocked, "end_status": end, "truncated": truncated,
        }


def crafter_scene(semantic, player_pos, facing, names, player_id, sleeping=False, dead=False):
    """BALROG's Crafter scene text (spec: crafter_text_observation.md, long-term context)."""
    try:
        px, py = int(player_pos[0]), int(player_pos[1])
        window = semantic[px - 4: px + 5, py - 3: py + 4]
        cx, cy = 4, 3
        closest = {}  # name -> (distance, location text); dicts keep first-met order
        for i in range(window.shape[0]):
            for j in range(window.shape[1]):
                idx = window[i, j]
                if idx == player_id:
                    continue
                dx, dy = i - cx, j - cy
                words = (["north"] if dy < 0 else ["south"] if dy > 0 else []) + \
                        (["west"] if dx < 0 else ["east"] if dx > 0 else [])
                dist = abs(dx) + abs(dy)
                name = names[idx]
                if name not in closest or dist < closest[name][0]:
                    step_word = "step" if dist == 1 else "steps"
                    closest[name] = (dist, f"{dist} {step_word} to your {'-'.join(words)}")
        # BALROG unpacks the window shape as (max_y, max_x) and checks x against the second:
        # kept as is, an edge window can raise and give the error text, as BALROG's does.
        max_y, max_x = window.shape
        tx, ty = cx + int(facing[0]), cy + int(facing[1])
        if 0 <= tx < max_x and 0 <= ty < max_y:
            front = f"You face {names[window[tx, ty]]} at your front."
        else:
            front = "You face nothing at your front."
        if closest:
            seen = "You see:\n" + "\n".join(f"- {n} {loc}" for n, (_, loc) in closest.items())
        else:
            seen = "You see nothing away from you."
        state = ("You are sleeping, and will not be able take actions until energy is full."
                 if sleeping else "You died." if dead else "")
        return f"{state}\n\n\n\n{seen}\n\n{front}".strip()
    except Exception:
        return "Error, you are out of the map."


def crafter_body(inventory):
    """BALROG's Crafter status and inventory text (short-term context)."""
    status = "Your status:\n" + "\n".join(f"- {v}: {inventory[v]}/9" for v in CRAFTER_VITALS)
    items = "\n".join(f"- {k}: {n}" for k, n in inventory.items()
                      if k not in CRAFTER_VITALS and n != 0)
    return status + "\n\n" + (f"Your inventory:\n{items}" if items
                              else "You have nothing in your inventory.")


# --------------------------------------------------------------------------------------------
# NetHack / MiniHack language observation
# --------------------------------------------------------------------------------------------

DUNGEON_W, DUNGEON_H = 79, 21
_DISTANCE_ORDER = ("very far", "far", "near", "very near", "adjacent")
_DIRECTION_ORDER = (
    "north", "northnortheast", "northeast", "eastnortheast", "east", "eastsoutheast",
    "southeast", "southsoutheast", "south", "southsouthwest", "southwest", "westsouthwest",
    "west", "westnorthwest", "northwest", "northnorthwest",
)
_RANK = {(d, r): i * 16 + j for i, d in enumerate(_DISTANCE_ORDER)
         for j, r in enumerate(_DIRECTION_ORDER)}
_SCREEN_CMAP = {
    "horizontal closed door", "vertical closed door", "bars", "tree", "stairs up", "stairs down",
    "ladder up", "ladder down", "alter", "grave", "throne", "sink", "fountain", "pool", "ice",
    "lava", "vertical raised drawbridge", "horizontal raised drawbridge",
}
_FLOOR_CMAP = {"room floor", "dark room floor", "corridor floor", "lit corridor floor"}
_BLOCKING = {
    "dark area", "vertical wall", "horizontal wall", "northwest room corner",
    "northeast room corner", "southwest corner", "southeast corner", "cross wall", "t up wall",
    "t down wall", "t west wall", "t east wall", "horizontal closed door", "vertical closed door",
    "horizontal raised drawbridge", "vertical raised drawbridge",
}
# (x step, y step) of the rays, in BALROG's order; y grows southward on the map.
_RAYS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))
_HUNGER = ("Satiated", "Not Hungry", "Hungry", "Weak", "Fainting", "Fainted", "Starved")
_ENCUMBRANCE = ("Unencumbered", "Burdened", "Stressed", "Strained", "Overtaxed", "Overloaded")
_ALIGNMENT = {-128: "None", 1: "Lawful", 0: "Neutral", -1: "Chaotic"}
_CONDITIONS = (
    ("FLY", "Flying"), ("LEV", "Levitating"), ("HALLU", "Hallucinating"), ("CONF", "Confused"),
    ("STUN", "Stunned"), ("DEAF", "Deaf"), ("BLIND", "Blind"), ("TERMILL", "Terminally Ill"),
    ("FOODPOIS", "Food Poisoning"), ("STRNGL", "Strangled"), ("SLIME", "Slimed"),
    ("RIDE", "Riding"), ("STONE", "Stoned"),
)


def distance_direction(dx, dy):
    """(distance word, direction word) of a cell dx east and dy north of the player."""
    k = min(abs(dx), abs(dy))
    diagonal = ""
    if k > 0:
        diagonal = ("north" if dy > 0 else "south") + ("east" if dx > 0 else "west")
    vertical = dy - k * int(np.sign(dy))
    horizontal = dx - k * int(np.sign(dx))
    d = max(abs(dx), abs(dy))
    distance = ("adjacent" if d == 1 else "very near" if d == 2 else "near" if d < 6
                else "far" if d < 20 else "very far")
    words = ("north" if vertical > 0 else "south" if vertical < 0 else "") + \
            ("east" if horizontal > 0 else "west" if horizontal < 0 else "")
    return distance, words + diagonal


def pluralize(noun):
    """The language wrapper's plural of a glyph name."""
    if noun.endswith(("boots", "shoes", "scales", "lenses", "bars")):
        return noun
    special = {"can of grease": "cans of grease", "Master of Thieves": "Masters of Thieves",
               "ice": "area of ice", "lava": "area of lava"}
    if noun in special:
        return special[noun]
    for head in ("boom ", "shield ", "swallow ", "scroll ", "worthless piece ", "unknown creature "):
        if noun.startswith(head):
            return head[:-1] + "s " + noun[len(head):]
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("z", "x", "ch", "sh", "ss")):
        return noun + "es"
    if noun.endswith("ff"):
        return noun[:-2] + "ves"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    if noun.endswith("s"):
        return noun + "es"
    return noun + "s"


@lru_cache(maxsize=1)
def _glyph_tables():
    """Per glyph id: screen name, sight name and whether the sight name blocks a ray.
    Built once per process from nle's static tables and data/nle_glyph_names.json."""
    import nle.nethack as nh

    symbols = json.loads((DATA_DIR / "nle_glyph_names.json").read_text())
    cmap, warnings = symbols["cmap"], symbols["warning"]
    classes = {chr(getattr(nh, f"{c}_CLASS")): c for c in (
        "ILLOBJ", "WEAPON", "ARMOR", "RING", "AMULET", "TOOL", "FOOD", "POTION", "SCROLL",
        "SPBOOK", "WAND", "COIN", "GEM", "ROCK", "BALL", "CHAIN", "VENOM")}

    def object_name(i):
        descr = nh.objdescr.from_idx(i)
        name, desc = descr.oc_name or "", descr.oc_descr or ""
        cls = classes.get(nh.objclass(i).oc_class)
        if cls in ("ILLOBJ", "WEAPON", "COIN", "ROCK", "BALL", "CHAIN"):
            return name
        if cls in ("ARMOR", "TOOL"):
            return desc or name
        return {
            "RING": lambda: f"{desc} ring",
            "AMULET": lambda: desc if "Amulet" in desc else f"{desc} amulet",
            "FOOD": lambda: name + desc,
            "POTION": lambda: f"{desc} potion",
            "SCROLL": lambda: f"scroll labeled {desc}",
            "SPBOOK": lambda: f"{desc} spellbook",
            "WAND": lambda: f"{desc} wand",
            "GEM": lambda: name if desc in name else f"{desc} {name}",
            "VENOM": lambda: f"splash of {name}",
        }.get(cls, lambda: "")()

    mon = lambda i: nh.permonst(i).mname  # noqa: E731
    swallow = ("top left", "top center", "top right", "middle left", "middle right",
               "bottom left", "bottom center", "bottom right")
    zap = ("horizontal", "vertical", "left slant", "right slant")
    screen, sight = [""] * nh.MAX_GLYPH, [""] * nh.MAX_GLYPH
    for g in range(nh.MAX_GLYPH):
        if g >= nh.GLYPH_STATUE_OFF:
            screen[g] = f"{mon(g - nh.GLYPH_STATUE_OFF)} statue"
        elif g >= nh.GLYPH_WARNING_OFF:
            screen[g] = warnings[g - nh.GLYPH_WARNING_OFF]
        elif g >= nh.GLYPH_SWALLOW_OFF:
            screen[g] = f"swallow {swallow[(g - nh.GLYPH_SWALLOW_OFF) % 8]}"
        elif g >= nh.GLYPH_ZAP_OFF:
            screen[g] = f"{zap[(g - nh.GLYPH_ZAP_OFF) % 4]} zap beam"
        elif g >= nh.GLYPH_EXPLODE_OFF:
            screen[g] = cmap[-9 + (g - nh.GLYPH_EXPLODE_OFF) % 9]  # the nine "explosion ..." names
        elif g >= nh.GLYPH_CMAP_OFF:
            name = cmap[g - nh.GLYPH_CMAP_OFF]
            if name in _SCREEN_CMAP:
                screen[g] = name
            elif name not in _FLOOR_CMAP:
                sight[g] = name
        elif g >= nh.GLYPH_OBJ_OFF:
            screen[g] = object_name(g - nh.GLYPH_OBJ_OFF)
        elif g >= nh.GLYPH_RIDDEN_OFF:
            screen[g] = f"ridden {mon(g - nh.GLYPH_RIDDEN_OFF)}"
        elif g >= nh.GLYPH_BODY_OFF:
            screen[g] = f"{mon(g - nh.GLYPH_BODY_OFF)} corpse"
        elif g >= nh.GLYPH_DETECT_OFF:
            screen[g] = f"detected {mon(g - nh.GLYPH_DETECT_OFF)}"
        elif g >= nh.GLYPH_INVIS_OFF:
            screen[g] = "invisible creature"
        elif g >= nh.GLYPH_PET_OFF:
            screen[g] = f"tame {mon(g - nh.GLYPH_PET_OFF)}"
        else:
            screen[g] = mon(g)
    has_screen = np.array([bool(s) for s in screen])
    blocking = [s in _BLOCKING for s in sight]
    masks = [(getattr(nh, f"BL_MASK_{m}"), text) for m, text in _CONDITIONS]
    return screen, sight, has_screen, blocking, masks


@lru_cache(maxsize=None)
def _plural(name):
    return pluralize(name)


def text_glyphs(glyphs, blstats):
    """The language observation: what is where, grouped and sorted as the wrapper does."""
    screen, sight, has_screen, blocking, _ = _glyph_tables()
    px, py = int(blstats[0]), int(blstats[1])
    glyphs = np.asarray(glyphs)
    entries = []
    ys, xs = np.nonzero(has_screen[glyphs])
    for y, x in zip(ys.tolist(), xs.tolist()):
        if x == px and y == py:
            continue
        entries.append((screen[glyphs[y, x]], *distance_direction(x - px, py - y)))
    for sx, sy in _RAYS:
        for offset in range(1, 10):
            x, y = px + sx * offset, py + sy * offset
            if not (0 <= x < DUNGEON_W and 0 <= y < DUNGEON_H):
                break
            g = glyphs[y, x]
            if not has_screen[g] and sight[g]:
                entries.append((sight[g], *distance_direction(x - px, py - y)))
                if blocking[g]:
                    break
    entries.sort(key=lambda e: _RANK[e[1], e[2]])

    groups = {}  # (name, distance) -> directions, in order of first appearance
    for name, distance, direction in entries:
        groups.setdefault((name, distance), []).append(direction)
    order, directions_of = [], {}
    for (name, distance), directions in groups.items():
        counts = {}
        for d in directions:
            counts[d] = counts.get(d, 0) + 1
        single = [d for d, c in counts.items() if c == 1]
        multiple = [d for d, c in counts.items() if c > 1]
        # A later group with the same key overwrites the directions of an earlier one (e.g.
        # "bars", whose plural is itself): the wrapper's behaviour, kept.
        if single:
            order.append((name, distance))
            directions_of[name, distance] = single
        if multiple:
            order.append((_plural(name), distance))
            directions_of[_plural(name), distance] = multiple
    lines = []
    for key in order:
        dirs = directions_of[key]
        said = dirs[0] if len(dirs) == 1 else " and ".join(dirs) if len(dirs) == 2 else \
            ", ".join(dirs[:-1]) + ", and " + dirs[-1]
        lines.append(f"{key[0]} {key[1]} {said}")
    return "\n".join(lines)


def text_cursor(glyphs, blstats, tty_cursor):
    screen = _glyph_tables()[0]
    px, py = int(blstats[0]), int(blstats[1])
    cx, cy = int(tty_cursor[1]), int(tty_cursor[0]) - 1
    dx, dy = cx - px, py - cy
    index = cx + cy * DUNGEON_W
    if not (-DUNGEON_W <= dx < DUNGEON_W and -DUNGEON_H <= dy < DUNGEON_H
            and 0 < index < DUNGEON_W * DUNGEON_H):
        return ""
    name = screen[np.asarray(glyphs).reshape(-1)[index]]
    if dx == 0 and dy == 0:
        return f"Yourself a {name}"
    distance, direction = distance_direction(dx, dy)
    return f"{distance} {direction} {name}"


def text_blstats(blstats):
    b = [int(v) for v in blstats]
    masks = _glyph_tables()[4]
    condition = " ".join(text for mask, text in masks if b[25] & mask) or "None"
    pick = lambda table, i: table[i] if 0 <= i < len(table) else ""  # noqa: E731
    return "\n".join([
        f"Strength: {b[3]}/{b[2]}", f"Dexterity: {b[4]}", f"Constitution: {b[5]}",
        f"Intelligence: {b[6]}", f"Wisdom: {b[7]}", f"Charisma: {b[8]}", f"Depth: {b[12]}",
        f"Gold: {b[13]}", f"HP: {b[10]}/{b[11]}", f"Energy: {b[14]}/{b[15]}", f"AC: {b[16]}",
        f"XP: {b[18]}/{b[19]}", f"Time: {b[20]}", f"Position: {b[0]}|{b[1]}",
        f"Hunger: {pick(_HUNGER, b[21])}", f"Monster Level: {b[17]}",
        f"Encumbrance: {pick(_ENCUMBRANCE, b[22])}", f"Dungeon Number: {b[23]}",
        f"Level Number: {b[24]}", f"Score: {b[9]}", f"Alignment: {_ALIGNMENT.get(b[26], '')}",
        f"Condition: {condition}",
    ])


def text_inventory(inv_strs, inv_letters):
    lines = []
    for letter, row in zip(np.asarray(inv_letters).tolist(), np.asarray(inv_strs)):
        if letter == 0:
            break
        item = bytes(row).split(b"\0", 1)[0].decode("latin-1")
        lines.append(f"{chr(letter)}: {item}")
    return "\n".join(lines)


def _trim(row):
    """The wrapper's trim: strip spaces and SUB; a row whose first kept character is its last
    character trims to empty (its quirk, kept)."""
    start = len(row) - len(row.lstrip(" \x1a"))
    if start == len(row) - 1:
        return ""
    return row.strip(" \x1a")


def _ends_page(row):
    of = row.find(" of ")
    numbered = of >= 2 and row[of - 2] == "(" and of + 5 < len(row) and row[of + 5] == ")"
    return numbered or "--More--" in row or "(end)" in row


def text_message(tty_chars):
    rows = [bytes(r).decode("latin-1") for r in np.asarray(tty_chars)]
    first = _trim(rows[0])
    if not first:
        return ""
    indent = len(rows[0]) - len(rows[0].lstrip(" "))
    kept = []
    for row in rows:
        row = _trim(row[indent:])
        if not row:
            continue
        kept.append(row)
        if _ends_page(row):
            return "\n".join(kept)
    return first


def nle_language(obs):
    """BALROG's five text parts of an NLE observation dict (glyphs, blstats, tty_chars,
    tty_cursor, inv_strs, inv_letters)."""
    return {
        "text_message": text_message(obs["tty_chars"]),
        "text_glyphs": text_glyphs(obs["glyphs"], obs["blstats"]),
        "text_cursor": text_cursor(obs["glyphs"], obs["blstats"], obs["tty_cursor"]),
        "text_blstats": text_blstats(obs["blstats"]),
        "text_inventory": text_inventory(obs["inv_strs"], obs["inv_letters"]),
    }


def nle_hybrid(language, tty_chars, tty_cursor):
    """BALROG's hybrid prompt: (long-term context, short-term context)."""
    rows = ["".join(map(chr, r)) for r in np.asarray(tty_chars).tolist()]
    ascii_map = "\n".join(rows[1:]) + "\n"
    cursor = f"{language['text_cursor']}\n(x={int(tty_cursor[1])}, y={int(tty_cursor[0])})"
    parts = (("message", language["text_message"]), ("language observation", language["text_glyphs"]),
             ("cursor", cursor), ("map", ascii_map))
    long_term = "\n".join(f"{name}:\n{text}\n" for name, text in parts)
    return long_term, f"inventory:\n{language['text_inventory']}\n"


# --------------------------------------------------------------------------------------------
# NetHack and MiniHack episodes
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _nle_names_by_value():
    """(the name of each nle action value, the names BALROG accepts per game). NetHack accepts
    the names of nle's USEFUL_ACTIONS (BALROG's language action space, spec section 2): its
    instruction table also lists annotate, overview, teleport, travel, minus and apos, which BALROG
    then treats as invalid. MiniHack accepts the names in BALROG's MiniHack table."""
    from nle.nethack import USEFUL_ACTIONS
    from nle.nethack import actions as A

    table = json.loads((DATA_DIR / "nle_action_names.json").read_text())
    by_value = {}
    for key, names in table["names"].items():
        cls, member = key.split(".")
        by_value.setdefault(int(getattr(A, cls)[member]), names[0])
    return by_value, {"nle": {by_value[int(a)] for a in USEFUL_ACTIONS},
                      "minihack": set(_balrog_prompts()["minihack"]["actions"])}


@lru_cache(maxsize=1)
def _nle_progression():
    return json.loads((DATA_DIR / "nle_progression.json").read_text())


@lru_cache(maxsize=4)
def _boxoban_levels(path):
    """The levels of one Boxoban folder, in sorted file order (minihack lists the folder in
    filesystem order, which differs between machines and would change the level a seed draws)."""
    levels = []
    for file in sorted(os.listdir(path)):
        if file.endswith(".txt"):
            chunk = []
            for line in Path(path, file).read_text().splitlines(keepends=True):
                if line != "\n":
                    chunk.append(line)
                else:
                    levels.append("".join(chunk[1:]))
                    chunk = []
    return levels


def _boxoban_folder():
    root = os.environ.get("BOXOBAN_LEVELS")
    if not root or not Path(root, "hard").is_dir():
        raise FileNotFoundError(
            f"Boxoban levels not found (BOXOBAN_LEVELS={root!r}). Set BOXOBAN_LEVELS to a folder "
            "holding hard/ and medium/train/, or fetch them "
            "with `python -m minihack.scripts.download_boxoban_levels` and point the variable there.")
    return root


class NLEEnv:
    """NetHackChallenge or a MiniHack task with BALROG's settings, "skip more", the hybrid text,
    and seeds that really seed the game."""

    def __init__(self, env, task, seed=0, max_steps=None, seeded=True, autopickup=False):
        import gymnasium as gym

        self.name, self.task, self.seed, self.seeded = env, task, seed, seeded
        self.autopickup = autopickup
        self._boxoban = "Boxoban" in task
        if env == "nle":
            import nle  # noqa: F401  (registers the gym ids)
            self.max_steps = max_steps or MAX_STEPS["nle"]
            # nle 1.3.0 runs its no-progress check twice per step (in step and again in
            # _get_end_status), so its no_progress_timeout=150 would end an episode after 75 steps
            # without game time passing; step() counts the spec's 150 itself and nle's is off
            kwargs = dict(character="@", no_progress_timeout=math.inf)
        else:
            import minihack  # noqa: F401
            self.max_steps = max_steps or MAX_STEPS["minihack"]
            kwargs = dict(observation_keys=("glyphs", "blstats", "tty_chars", "inv_letters",
                                            "inv_strs", "tty_cursor", "tty_colors"),
                          penalty_step=-0.01, penalty_time=0.0, penalty_mode="constant",
                          autopickup=autopickup)
        with self._level_draw():
            self._env = gym.make(task, max_episode_steps=self.max_steps, **kwargs)
        self._game = self._env.unwrapped
        if self._boxoban:
            self._game.reset = self._boxoban_reset
        by_value, accepted = _nle_names_by_value()
        self._index = {}
        for i, action in enumerate(self._game.actions):
            name = by_value.get(int(action))
            if name in accepted[env] and name not in self._index:
                self._index[name] = [i]
        names = list(self._index)
        if env == "nle":  # letters and digits answer the game's prompts ("which item? [abc]")
            keys = {int(a): i for i, a in reversed(list(enumerate(self._game.actions)))}
            for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
                if ord(ch) in keys:   # a letter is the command on that key, as in BALROG
                    self._index.setdefault(ch, [keys[ord(ch)]])
            # 00-99 are in BALROG's action space, but balrog-nle has no alias for them and would
            # raise (spec section 2); here they type their two digits (a count, a menu answer)
            for n in range(100):
                self._index.setdefault(f"{n:02d}", [keys[ord(c)] for c in f"{n:02d}"])
        self.actions = tuple(names)
        self.default_action = "esc" if env == "nle" else "north"
        values = [int(a) for a in self._game.actions]
        self._more = values.index(13) if 13 in values else None  # MiscAction.MORE, Enter
        self.instruction = balrog_instruction(env, task, names)
        self.last_obs = None

    def _boxoban_reset(self, seed=None, options=None):
        """minihack 1.0.2's BoxoHack.reset takes no `seed` (gymnasium's wrappers always pass
        one) and reads its goal squares before setting them; both fixed here, nothing else."""
        game = self._game
        game._goal_pos_set = None
        return type(game).reset(game, options=options or dict(wizkit_items=None))

    def _level_draw(self):
        """Boxoban draws its level with the global `random`; give it a generator seeded from
        the episode seed, and read the levels from BOXOBAN_LEVELS."""
        env = self

        class Draw:
            def __enter__(self):
                if not env._boxoban:
                    return
                import minihack.envs.boxohack as box
                self.saved = box.random, box.LEVELS_PATH, box.load_boxoban_levels
                box.random = random.Random(env.seed) if env.seeded else random.Random()
                box.LEVELS_PATH = _boxoban_folder()
                box.load_boxoban_levels = _boxoban_levels

            def __exit__(self, *exc):
                if env._boxoban:
                    import minihack.envs.boxohack as box
                    box.random, box.LEVELS_PATH, box.load_boxoban_levels = self.saved

        return Draw()

    def _seed_game(self):
        core, disp = (int(s) & (2 ** 63 - 1) for s in
                      np.random.SeedSequence(self.seed).generate_state(2, np.uint64))
        if self.name == "nle":  # NetHackChallenge blocks its seed setters; the class's own works
            nethack = self._game.nethack
            type(nethack).set_initial_seeds(nethack, core, disp, False)
        else:
            self._game.seed(core, disp, False)

    def reset(self, seed=None):
        if seed is not None:
            self.seed = seed
        if self.seeded:
            self._seed_game()
        with self._level_draw():
            raw, _ = self._env.reset()
        self.steps, self.episode_return, self.progression = 0, 0.0, 0.0
        self.reached = set()
        self.game_time, self.steps_without_time = int(raw["blstats"][NLE_BL_TIME]), 0
        self.last_obs = raw
        return self._observe(raw, text_message(raw["tty_chars"]))

    def _observe(self, raw, message):
        language = nle_language(raw)
        language["text_message"] = message
        long_term, short_term = nle_hybrid(language, raw["tty_chars"], raw["tty_cursor"])
        # the state leaves out the turn counter, which the screen shows and every action moves
        state = _digest(raw["glyphs"].tobytes() + raw["blstats"][:2].tobytes() +
                        raw["inv_strs"].tobytes() + message.encode())
        return {"long_term_context": long_term, "short_term_context": short_term,
                "text": f"{long_term}\n{short_term}", "state": state}

    def _update_progression(self, blstats):
        """BALROG's NetHack progression: the best table value over the Dlvl and Xp reached."""
        table = _nle_progression()
        for key in (f"Dlvl:{int(blstats[12])}", f"Xp:{int(blstats[18])}"):
            if key in table:
                self.reached.add(key)
                self.progression = max(self.progression, table[key])

    def parse_action(self, text):
        if text in self._index:
            return text
        key = _normalise(text)
        if len(key) > 1 and key in self._index and not key.isdigit():
            return key
        return None

    def step(self, action_text):
        action = self.parse_action(action_text) if isinstance(action_text, str) else None
        executed = action or self.default_action
        reward, done = 0.0, False
        for index in self._index[executed]:
            raw, r, term, trunc, info = self._env.step(index)
            reward += r
            done = term or trunc
            if done:
                break
        message = text_message(raw["tty_chars"])
        skipped = 0
        while "--More--" in message and not done and self._more is not None:  # "skip more"
            skipped += 1
            message = message.replace("--More--", "\n")
            raw, r, term, trunc, info = self._env.step(self._more)
            done = term or trunc
            message += text_message(raw["tty_chars"])
            reward += r
        self.steps += 1
        self.episode_return += reward
        self.last_obs = raw
        status = self._game.StepStatus(int(info["end_status"]))
        if self.name == "nle":
            self._update_progression(raw["blstats"])
            game_time = int(raw["blstats"][NLE_BL_TIME])
            self.steps_without_time = 0 if game_time != self.game_time else self.steps_without_time + 1
            self.game_time = game_time
        else:
            self.progression = 1.0 if reward >= 1.0 else 0.0  # BALROG: success gives reward 1
        end = None
        if done:
            end = "truncated" if trunc or status.name == "ABORTED" else status.name.lower()
        elif self.name == "nle" and self.steps_without_time >= NO_PROGRESS_TIMEOUT:
            done, end = True, "aborted_no_progress"   # BALROG's no_progress_timeout (see __init__)
        return self._observe(raw, message), reward, done, {
            "valid": action is not None, "executed_action": executed,
            "progression": self.progression, "end_status": end,
            "truncated": end in ("truncated", "aborted_no_progress"),   # ended by a limit, as nle says
            "reached": sorted(self.reached), "more_skipped": skipped,
        }


# --------------------------------------------------------------------------------------------
# Command line: look at a game, or play it by hand
# --------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="crafter", choices=ENVS)
    p.add_argument("--task", default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--play", action="store_true", help="type actions, see the next observation")
    args = p.parse_args(argv)
    try:
        env = make_env(args.env, args.task, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"envs.py: error: {e}\n")
    obs = env.reset()
    print(env.instruction, "\n\n" + "=" * 72 + "\n" + obs["text"])
    while args.play:
        try:
            line = input(f"\naction ({env.default_action} if invalid, ctrl-D quits)> ")
        except EOFError:
            break
        obs, reward, done, info = env.step(line)
        print(f"[{'valid' if info['valid'] else 'INVALID -> ' + info['executed_action']}] "
              f"reward {reward:+.2f} progression {info['progression']:.3f}\n{obs['text']}")
        if done:
            print(f"episode over: {info['end_status']}")
            break


if __name__ == "__main__":
    sys.exit(main())
