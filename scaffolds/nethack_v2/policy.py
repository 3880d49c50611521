"""nethack_v2: the AutoMem authors' converged NetHack scaffold (their nethack_v2; with
ep.two_model, their nethack_v2_twomodel), behaviourally. It builds on v0 (CHANGES.md).

A step: the observation as the authors' agent read it, the unchanged counter, the map analysis,
LOG from the second step on (the map is written with UPSERT_MAP), pruning of the long files,
current_status.txt and inventory.txt rewritten by code, then PLAN: a stairs-urgency block before
the instruction, the game status, an oscillation warning and a priority process; it commits one
action, repaired. LOG and PLAN are fresh conversations each step; PLAN never sees LOG.
"""
import re

# commands that ask for an item or a direction next: "eat d" is sent as "eat"
TWO_STEP = ("open", "close", "kick", "fight", "fire", "zap", "eat", "quaff", "wear", "wield", "read",
            "apply", "puton", "remove", "takeoff", "dip", "rub", "invoke", "quiver", "throw", "offer",
            "drop", "force", "loot", "cast", "pickup")
# the neighbours of @ in the order the authors examine them: (name, rows down, columns right)
NEIGHBOURS = (("north", -1, 0), ("south", 1, 0), ("east", 0, 1), ("west", 0, -1),
              ("northeast", -1, 1), ("northwest", -1, -1), ("southeast", 1, 1), ("southwest", 1, -1))
PAIRS = (("north", "south"), ("east", "west"), ("northeast", "southwest"), ("northwest", "southeast"))
# every move action (one square or running) and the one that undoes it
OPPOSITE = {run + a: run + b for run in ("", "far ") for x, y in PAIRS for a, b in ((x, y), (y, x))}
ITEM_GLYPHS = "$)[!?/=\"(*%~"
PASSABLE = ("stairs down", "stairs up", "door", "floor", "item", "monster")
HUNGER = ("Satiated", "Hungry", "Weak", "Fainting")
CONDITIONS = ("FoodPois", "Ill", "Conf", "Stun", "Hallu", "Blind")
MAP_FILE = "dungeon_map.txt"
# BALROG's distance words -> the authors' step counts ("very near" before "near")
DISTANCE_WORDS = ((r"\bvery far\b", "9+ steps away"), (r"\bvery near\b", "2 steps away"),
                  (r"\bfar\b", "5-8 steps away"), (r"\bnear\b", "3-4 steps away"),
                  (r"\badjacent\b", "1 step away (directly reachable)"))
BETWEEN = r"\b(north|south|east|west)((?:north|south)(?:east|west))\b"   # eastnortheast


# ---------------------------------------------------------------- UPSERT_MAP ---------------

def upsert_map(ep, square, description):
    """<|UPSERT_MAP|>x,y|description<|END|>: dungeon_map.txt keeps one line per square; the
    square's older lines go and the new one is added last."""
    try:
        x, y = (int(n) for n in square.strip().strip("()").split(","))
    except ValueError:
        raise ValueError(f"the square is two whole numbers x,y, not {square!r}: "
                         "<|UPSERT_MAP|>12,5|door, leads east<|END|>") from None
    key = f"({x},{y}):"
    kept = [line for line in (ep.read(MAP_FILE) or "").splitlines() if not line.startswith(key)]
    ep.write(MAP_FILE, "\n".join(kept + [f"{key} {description}"]))
    return f"{MAP_FILE}: ({x},{y}) now reads: {description}"


OPS = {"UPSERT_MAP": {"handler": upsert_map, "arity": 2, "kind": "write"}}


# ---------------------------------------------------------------- the step -----------------

def setup(ep):
    ep.state.update(previous=None, unchanged=0, returned=None, fell_back=False, recent=[], visited=set())


def step(ep):
    s = ep.state
    obs = observation(ep)
    same = s["previous"] is not None and obs.strip() == s["previous"].strip()
    s["unchanged"] = s["unchanged"] + 1 if same else 0
    around = survey(obs)
    seen = analysis(around)
    status = read_status(obs)
    if "position" in status:
        s["visited"].add(status["position"])
    if ep.step > 0:
        yield from log(ep, obs, seen)
        prune(ep)
    rewrite_status_files(ep, status)
    action = yield from plan(ep, obs, around, seen, status)
    s["fell_back"] = action is None
    s["returned"] = ep.fallback if action is None else action
    s["recent"] = (s["recent"] + [s["returned"].strip().lower()])[-20:]
    s["previous"] = obs
    return None if action is None else s["returned"]


def previous_valid(ep):
    """Whether the evaluator took the last output as a valid action (a fallback counts when its
    name is exactly what ran)."""
    if ep.state["fell_back"]:
        return ep.state["returned"] == ep.previous_action["executed"]
    return ep.previous_action["valid"]


def authors_text(text):
    """The game's text as the authors' environment wrapper handed it to their agents: BALROG's
    distance words as step counts, 16-point compass words spelled out."""
    for word, steps in DISTANCE_WORDS:
        text = re.sub(word, steps, text)
    return re.sub(BETWEEN, r"between \1 and \2", text)


def observation(ep):
    """Long-term context, a new line, short-term context, as the authors' wrapper gave them;
    BALROG's note first after an invalid output."""
    obs = ep.observation
    long_term = authors_text(obs["long_term"])
    if ep.step > 0 and not previous_valid(ep):
        long_term = ep.render("invalid_feedback", executed=ep.previous_action["executed"]) + long_term
    return long_term + "\n" + authors_text(obs["short_term"])


def unchanged_note(ep):
    n = ep.state["unchanged"]
    if n == 0:
        return ""
    return ep.render("unchanged_mild") if n < 3 else ep.render("unchanged_stuck", count=n)


def section(text):
    """A part of a prompt that may be empty: followed by a blank line when it is not."""
    return text.strip() + "\n\n" if text.strip() else ""


def memory_ops(turn):
    """The well-formed memory ops of a turn (DONE and ACTION are not memory ops)."""
    return [op for op in turn.ops if op["error"] is None and op["kind"] != "control"]


# ---------------------------------------------------------------- LOG and what follows it --

def log(ep, obs, seen):
    ops = ep.data["ops"]["log"]
    routine = ep.routine("log", ops, order=ops)   # grouped by type: UPSERT_MAP after APPEND, before WRITE
    if previous_valid(ep):
        previous = ep.render("previous_action", step=ep.step - 1, action=ep.state["returned"])
    else:
        previous = ep.render("previous_invalid", step=ep.step - 1, output=ep.state["returned"],
                             executed=ep.previous_action["executed"])
    routine.say(ep.render("log", previous=section(previous), unchanged=section(unchanged_note(ep)),
                          spatial=section(ep.render("spatial")), analysis=section(seen),
                          observation=obs, files=ep.file_index()).strip())
    role = "specialist" if ep.two_model else "base"
    for _ in range(ep.data["limits"]["log_turns"]):
        turn = yield from routine.ask(role)
        ended = "backend_error" if turn.error else "done" if turn.done else None if memory_ops(turn) else "no_ops"
        if ended:   # a DONE reply's ops have run
            routine.end(ended)
            return
        routine.say(ep.render("log_continue", results=turn.results, files=ep.file_index()).strip())
    routine.end("turn_limit")


def prune(ep):
    """After LOG: a file over its line limit keeps its newest lines under a header line."""
    for name, (most, keep) in ep.data["prune"].items():
        lines = (ep.read(name) or "").splitlines()
        if len(lines) > most:
            ep.write(name, "\n".join([f"[{len(lines) - keep} older lines pruned after LOG]"] + lines[-keep:]))


def read_status(text):
    """The status the authors' code reads anywhere in the observation text: the status line's
    numbers, the first hunger word, the conditions, and a position only in the forms
    `position x,y` or `cursor x,y` (BALROG's cursor text is `cursor:\\nYourself ...`)."""
    found = {}
    for key, pattern in (("dlvl", r"Dlvl:(\d+)"), ("hp", r"HP:(\d+)\((\d+)\)"), ("xp", r"Xp:(\d+)"),
                         ("gold", r"\$:(\d+)")):
        match = re.search(pattern, text)
        if match:
            numbers = tuple(int(n) for n in match.groups())
            found[key] = numbers if key == "hp" else numbers[0]
    found["hunger"] = next((word for word in HUNGER if re.search(rf"\b{word}\b", text)), "Normal")
    found["conditions"] = [c for c in CONDITIONS if c in text]
    where = (re.search(r"[Pp]osition[:\s]*\(?(\d+)[,\s]+(\d+)\)?", text)
             or re.search(r"[Cc]ursor[:\s]*\(?(\d+)[,\s]+(\d+)\)?", text))
    if where:
        found["position"] = (int(where.group(1)), int(where.group(2)))
    return found


def rewrite_status_files(ep, status):
    """current_status.txt and inventory.txt, rewritten by code before every PLAN."""
    s = ep.state
    lines = ["CURRENT STATUS (rewritten by code at every step)", f"Dungeon level: {status.get('dlvl', 'unknown')}"]
    if "hp" in status:
        lines.append(f"HP: {status['hp'][0]}/{status['hp'][1]}")
    lines.append(f"Hunger: {status['hunger']}")
    if status["conditions"]:
        lines.append(f"!!! CONDITIONS: {', '.join(status['conditions'])} !!!")
    if "xp" in status:
        lines.append(f"Experience level: {status['xp']}")
    if "gold" in status:
        lines.append(f"Gold: {status['gold']}")
    if "position" in status:
        lines.append(f"Position: ({status['position'][0]},{status['position'][1]})")
    lines += [f"Step: {ep.step}", f"Tiles explored: {len(s['visited'])}"]
    if s["recent"]:
        lines += ["", "RECENT ACTIONS (oldest first)"] + [f"  {a}" for a in s["recent"][-10:]]
    ep.write("current_status.txt", "\n".join(lines))
    inventory = authors_text(ep.observation["short_term"]).strip()
    if inventory:
        ep.write("inventory.txt", "INVENTORY (rewritten by code at every step)\n" + inventory)


# ---------------------------------------------------------------- PLAN ---------------------

def plan(ep, obs, around, seen, status):
    """The PLAN routine; returns the committed action, repaired, or None (the fallback runs). In
    two-model mode the specialist consults first, then the base model continues the same
    conversation with the whole PLAN loop."""
    ops = ep.data["ops"]["plan"]
    routine = ep.routine("plan", ops, order=ops)
    stuck = ""
    if ep.state["unchanged"]:
        stuck = unchanged_note(ep).strip() + "\n" + ep.render("dont_repeat", action=ep.previous_action["executed"])
    urgency, reminder = stairs_prompts(ep, obs, around)
    routine.say(ep.render("plan", urgency=section(urgency), instruction=ep.render("instruction").strip(),
                          spatial=section(ep.render("spatial")), stuck=section(stuck),
                          oscillation=section(oscillation(ep)), status=section(status_block(ep, status)),
                          analysis=section(seen), files=ep.file_index(), observation=obs,
                          reminder="\n\n" + reminder.strip() if reminder else "").strip())
    if ep.two_model:
        yield from consult(ep, routine)
    action = None
    for _ in range(ep.data["limits"]["plan_turns"]):
        turn = yield from routine.ask("base")
        if turn.error:
            routine.end("backend_error")
            break
        if turn.actions:   # this reply's reads ran too; their results are never shown
            routine.end("action")
            action = committed(ep, turn)
            break
        if not memory_ops(turn):
            routine.end("no_ops")
            break
        routine.say(ep.render("plan_continue", results=turn.results).strip())
    else:
        routine.end("turn_limit")
    return action


def consult(ep, routine):
    """Two-model mode: the specialist runs the PLAN loop until it commits (its ACTION is removed,
    never shown to the base model; an emptied reply becomes a placeholder), stops using memory,
    fails, or reaches the turn limit; then the hand-off, with its last results."""
    for _ in range(ep.data["limits"]["plan_turns"]):
        turn = yield from routine.ask("specialist")
        if turn.error:
            return
        if turn.actions:   # its reads ran: their results go with the hand-off
            routine.rewrite_reply(ep.remove_ops(turn.text, "ACTION") or ep.render("consulted").strip())
            routine.say(ep.render("handoff", results=section(turn.results)).strip())
            return
        if not memory_ops(turn):
            routine.say(ep.render("handoff", results="").strip())
            return
        routine.say(ep.render("plan_continue", results=turn.results).strip())


def committed(ep, turn):
    """Each committed action repaired (the authors' pick first); the first the game accepts
    wins, else the authors' pick."""
    repaired = [repair(a) for a in turn.actions]
    return next((a for a in repaired if ep.action_name(a) == a), repaired[0])


def repair(action):
    """A two-step command sent with its argument keeps the command: "eat d" -> "eat"."""
    words = action.split()
    return words[0].lower() if len(words) >= 2 and words[0].lower() in TWO_STEP else action


def status_block(ep, status):
    """GAME STATUS for PLAN: level, HP with its percentage, hunger, experience, step, conditions,
    the last 6 actions and the visited-tile count (none without a dungeon level)."""
    if not status.get("dlvl"):
        return ""
    parts = [f"Dlvl:{status['dlvl']}"]
    if "hp" in status:
        hp, top = status["hp"]
        parts.append(f"HP:{hp}/{top} ({hp * 100 // top if top > 0 else 0}%)")
    parts.append(f"Hunger:{status['hunger']}")
    if "xp" in status:
        parts.append(f"Xp:{status['xp']}")
    parts.append(f"Step:{ep.step}")
    lines = ["GAME STATUS", " | ".join(parts)]
    if status["conditions"]:
        lines.append(f"!!! CONDITIONS: {', '.join(status['conditions'])} -- deal with them now !!!")
    if ep.state["recent"]:
        lines.append("Recent actions: " + ", ".join(ep.state["recent"][-6:]))
    lines.append(f"Tiles explored: {len(ep.state['visited'])}")
    return "\n".join(lines)


def oscillation(ep):
    """A warning when the moves among the last 10 actions reverse each other 3 times or more."""
    recent = ep.state["recent"]
    moves = [a for a in recent[-10:] if a in OPPOSITE]
    if len(recent) < 4 or len(moves) < 4:
        return ""
    reversals = sum(OPPOSITE[b] == a for a, b in zip(moves, moves[1:]))
    if reversals < 3:
        return ""
    return ep.render("oscillation", reversals=reversals, moves=len(moves), recent=" -> ".join(moves[-6:]))


def stairs_prompts(ep, obs, around):
    """The stairs-urgency block (before the instruction) and its closing reminder: standing on
    stairs down (the game says so), or stairs down one square away."""
    said = obs.lower()
    if "staircase down here" in said or "stairway down here" in said:
        return ep.render("stairs_on"), ep.render("stairs_on_reminder")
    direction = stairs_down_direction(around)
    if direction is None:
        return "", ""
    return (ep.render("stairs_next", heading=direction.upper(), direction=direction),
            ep.render("stairs_next_reminder", direction=direction))


def stairs_down_direction(around):
    """Where the authors' code finds stairs down one square away. It looks only when some stairs
    (< or >) are next to @, and then takes the first > next to @, else the first > further away
    on the map (their quirk: stairs up next to @ make far stairs down 'one square away')."""
    if around is None or not any(kind.startswith("stairs") for _, _, kind in around["near"]):
        return None
    down = [name for name, _, kind in around["near"] if kind == "stairs down"]
    if down:
        return down[0]
    return around["far"][0][1] if around["far"] else None


# ---------------------------------------------------------------- map analysis -------------

def letters(text):
    return sum(ch.isalpha() and ch != "@" for ch in text)


def tile(ch):
    """The authors' tile classes, tested in their order (None: off the grid)."""
    if ch is None:
        return "off the map"
    for kind, chars in (("stairs down", ">"), ("stairs up", "<"), ("door", "+"), ("wall", "-|"), ("rock", " "),
                        ("danger", "}^"), ("floor", ".#{_"), ("item", ITEM_GLYPHS)):
        if ch in chars:
            return kind
    return "monster" if ch.isalpha() else "unknown"


def heading(dy, dx):
    return ("north" if dy < 0 else "south" if dy > 0 else "") + ("east" if dx > 0 else "west" if dx < 0 else "")


def survey(obs):
    """What lies around @, from the text, or None. The player's row is the first line with @
    whose right-stripped text has at least 3 characters and under half letters; the grid is the
    rows player-15 .. player+14 that are not blank and under 55% letters, right-stripped,
    closing up; `near` classifies the 8 neighbours, `far` holds the first 3 >
    in reading order beyond one square, as (distance, direction)."""
    lines = obs.split("\n")
    row = next((i for i, line in enumerate(lines) if "@" in line and len(line.rstrip()) >= 3
                and letters(line.rstrip()) / len(line.rstrip()) < 0.5), None)
    if row is None:
        return None
    kept = [i for i in range(max(0, row - 15), min(len(lines), row + 15))
            if lines[i].rstrip() and letters(lines[i].rstrip()) / len(lines[i].rstrip()) < 0.55]
    grid = [lines[i].rstrip() for i in kept]
    r, c = kept.index(row), lines[row].index("@")
    near = []
    for name, dy, dx in NEIGHBOURS:
        y, x = r + dy, c + dx
        ch = grid[y][x] if 0 <= y < len(grid) and 0 <= x < len(grid[y]) else None
        near.append((name, ch, tile(ch)))
    far = [(max(abs(y - r), abs(x - c)), heading(y - r, x - c)) for y, line in enumerate(grid)
           for x, ch in enumerate(line) if ch == ">" and max(abs(y - r), abs(x - c)) > 1]
    return {"near": near, "far": far[:3]}


def analysis(around):
    """The map analysis as the prompts show it ("" when there is no player row)."""
    if around is None:
        return ""
    near = around["near"]
    sections = [
        ("STAIRS NEXT TO YOU", [f"{name}: {ch} {kind}" + (", go there!" if ch == ">" else "")
                                for name, ch, kind in near if kind.startswith("stairs")]),
        ("STAIRS DOWN ON THE MAP", [f"> about {d} squares {where}" for d, where in around["far"]]),
        ("MONSTERS NEXT TO YOU", [f"{name}: {ch} (move into it to attack)"
                                  for name, ch, kind in near if kind == "monster"]),
        ("DOORS NEXT TO YOU", [f"{name}: + closed door (open it)" for name, _, kind in near if kind == "door"]),
        ("DANGER NEXT TO YOU", [f"{name}: {ch}" for name, ch, kind in near if kind == "danger"]),
        ("YOU CAN MOVE", [f"{name} ({ch} {kind})" for name, ch, kind in near if kind in PASSABLE]),
        ("BLOCKED", [f"{name} ({kind}{'' if ch is None or ch == ' ' else ' ' + ch})"
                     for name, ch, kind in near if kind not in PASSABLE + ("danger",)]),
    ]
    return "MAP ANALYSIS (computed from the map around @):\n" + "\n".join(
        f"{title}: {'; '.join(items)}" for title, items in sections if items)
