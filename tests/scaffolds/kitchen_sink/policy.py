"""A test scaffold that uses every capability of the episode API (tests/test_scaffold_api.py):
a rejection gate (at most 2 re-prompts), action repair, a Boxoban prompt and fallback, a status
block computed from the observation, a visit-count tracker, a map op at the agent's position,
pruning after LOG, a conditional PLAN prompt, a read-only scaffold op and a third routine."""
import re
from collections import Counter

MOVES = {"north": (0, -1), "south": (0, 1), "east": (1, 0), "west": (-1, 0),
         "northeast": (1, -1), "northwest": (-1, -1), "southeast": (1, 1), "southwest": (-1, 1)}


def map_rows(ep):
    text = ep.observation["long_term"]
    return text.split("map:\n", 1)[1].split("\n") if "map:\n" in text else []


def position(ep):
    """(x, y) of @ in the game's screen coordinates (the map starts on screen row 1)."""
    rows = map_rows(ep)
    y = next((i for i, row in enumerate(rows) if "@" in row), None)
    return None if y is None else (rows[y].index("@"), y + 1)


def note_here(ep, text):
    """NOTE_HERE|text: one line per place in map.txt, keyed by where the agent stands."""
    x, y = position(ep)
    key = f"({x},{y}):"
    lines = [line for line in (ep.read("map.txt") or "").splitlines() if not line.startswith(key)]
    ep.write("map.txt", "\n".join(lines + [f"{key} {text}"]))
    return f"noted at ({x},{y})"


def visits_here(ep):
    return f"you have stood here {ep.state['visits'][position(ep)]} time(s)"


OPS = {"NOTE_HERE": {"handler": note_here, "arity": 1, "kind": "write"},
       "VISITS": {"handler": visits_here, "arity": 0, "kind": "read"}}


def setup(ep):
    ep.state["visits"] = Counter()
    if "Boxoban" in ep.task:
        ep.set_fallback("south")


def step(ep):
    ep.state["visits"][position(ep)] += 1
    if ep.step > 0:
        yield from log(ep)
        prune(ep)
    if ep.step == 2:
        yield from reflect(ep)
    return (yield from plan(ep))


def log(ep):
    limits = ep.data["limits"]
    routine = ep.routine("log", ep.data["ops"]["log"], system=ep.render("system", game=ep.env))
    changed = ep.previous_observation["text"] != ep.observation["text"]
    routine.say(ep.render("log", step=ep.step, action=ep.previous_action["executed"],
                          outcome="the game changed" if changed else "nothing changed", files=ep.file_index()))
    for _ in range(limits["log_turns"]):
        turn = yield from routine.ask("specialist" if ep.two_model else "base")
        if turn.error or turn.done or not turn.ops:
            routine.end("backend_error" if turn.error else "done" if turn.done else "no_ops")
            return
        routine.say(ep.render("results", results=turn.results))
    routine.end("turn_limit")


def prune(ep):
    """After LOG, by code: actions.txt keeps its newest lines only."""
    lines = (ep.read("actions.txt") or "").splitlines()
    keep = ep.data["limits"]["keep_log_lines"]
    if len(lines) > keep:
        ep.write("actions.txt", "\n".join(lines[-keep:]))


def reflect(ep):
    routine = ep.routine("reflect", ep.data["ops"]["reflect"])
    routine.say(ep.render("reflect"))
    turn = yield from routine.ask("base")
    ep.state["reflection"] = turn.text[:200]
    routine.end("done")


def status(ep):
    text = ep.observation["long_term"]
    hp, level = re.search(r"HP:(\d+)\((\d+)\)", text), re.search(r"Dlvl:(\d+)", text)
    where = position(ep)
    return (f"HP {hp.group(1)}/{hp.group(2)}, Dlvl {level.group(1)}, position {where}, "
            f"visits here {ep.state['visits'][where]}")


def blocked(ep, action):
    """Whether a move walks into a wall or rock, by the map around @."""
    rows, (x, y) = map_rows(ep), position(ep)
    dx, dy = MOVES[action]
    row = rows[y - 1 + dy] if 0 <= y - 1 + dy < len(rows) else ""
    return (row[x + dx] if 0 <= x + dx < len(row) else " ") in "-| "


def repair(ep, text):
    """'Go West.' or 'move west' -> the game's own name."""
    text = re.sub(r"^(go|move)\s+", "", text.strip().lower())
    return ep.action_name(text) or text


def plan(ep):
    limits, role = ep.data["limits"], "base"
    routine = ep.routine("plan", ep.data["ops"]["plan"], system=ep.render("system", game=ep.env))
    message = ep.observation["long_term"].split("\n")[1]
    if "In what direction?" in message:
        routine.say(ep.render("plan_direction", step=ep.step, message=message))
    elif "Boxoban" in ep.task:
        routine.say(ep.render("plan_boxoban", step=ep.step, status=status(ep), observation=ep.observation["text"]))
    else:
        routine.say(ep.render("plan", step=ep.step, status=status(ep), observation=ep.observation["text"],
                              files=ep.file_index()))
    rejections = 0
    for _ in range(limits["plan_turns"]):
        turn = yield from routine.ask(role)
        if turn.error or (turn.action is None and not turn.ops):
            routine.end("backend_error" if turn.error else "no_action")
            return None
        if turn.action is None:
            routine.say(ep.render("results", results=turn.results))
            continue
        action = repair(ep, turn.action)
        if action in MOVES and blocked(ep, action) and rejections < limits["max_rejections"]:
            rejections += 1
            routine.say(ep.render("rejected", action=action, left=limits["max_rejections"] - rejections))
            continue
        routine.end("action" if rejections == 0 else f"action after {rejections} rejections")
        return action
    routine.end("turn_limit")
    return None
