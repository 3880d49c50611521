"""v0: the AutoMem paper's starting scaffold (the authors' inner_agent_v0), behaviourally.

A step: the observation as the authors' agent read it (long-term context, a new line, short-term
context; the evaluator's note first when the last output was not a valid action), the unchanged
counter, the NetHack / MiniHack map analysis, LOG from the second step on (record what the last
action did), PLAN (consult memory read-only, commit one action, repaired).
LOG and PLAN are fresh conversations each step; PLAN never sees LOG. CHANGES.md lists every
difference from the authors' code and the quirks kept on purpose.
"""
import re

NETHACK_LIKE = ("nle", "minihack")
# commands that ask for an item or a direction next: "eat d" is sent as "eat"
TWO_STEP = ("open", "close", "kick", "fight", "fire", "zap", "eat", "quaff", "wear", "wield", "read",
            "apply", "puton", "remove", "takeoff", "dip", "rub", "invoke", "quiver", "throw", "offer",
            "drop", "force", "loot", "cast", "pickup")
# BALROG's words -> the authors' (the order matters: "very near" before "near")
DISTANCE_WORDS = ((r"\bvery far\b", "9+ steps away"), (r"\bvery near\b", "2 steps away"),
                  (r"\bfar\b", "5-8 steps away"), (r"\bnear\b", "3-4 steps away"),
                  (r"\badjacent\b", "1 step away (directly reachable)"))
BETWEEN = r"\b(north|south|east|west)((?:north|south)(?:east|west))\b"   # eastnortheast
# the authors' order of examining the neighbours: N S E W NE NW SE SW
MOVES = (("north", -1, 0), ("south", 1, 0), ("east", 0, 1), ("west", 0, -1),
         ("northeast", -1, 1), ("northwest", -1, -1), ("southeast", 1, 1), ("southwest", 1, -1))
ITEM_GLYPHS = "$)[!?/=\"(*%~"


def setup(ep):
    ep.state.update(previous=None, unchanged=0, returned=None, fell_back=False)


def step(ep):
    s = ep.state
    obs = observation(ep)
    same = s["previous"] is not None and obs.strip() == s["previous"].strip()
    s["unchanged"] = s["unchanged"] + 1 if same else 0
    analysis = map_analysis(obs) if ep.env in NETHACK_LIKE else ""
    if ep.step > 0:
        yield from log(ep, obs, analysis)
    action = yield from plan(ep, obs, analysis)
    s["fell_back"] = action is None
    s["returned"] = ep.fallback if action is None else action
    s["previous"] = obs
    return None if action is None else s["returned"]


# ---------------------------------------------------------------- what the agent reads ------

def previous_valid(ep):
    """Whether the evaluator took the last output as a valid action. A fallback counts only when
    its name is exactly what ran (Crafter's 'noop' is not 'Noop': invalid, as for the authors)."""
    if ep.state["fell_back"]:
        return ep.state["returned"] == ep.previous_action["executed"]
    return ep.previous_action["valid"]


def authors_text(ep, text):
    """NetHack / MiniHack text as the authors' environment wrapper handed it to every agent of
    theirs: BALROG's distance words as step counts, and 16-point compass words spelled out."""
    if ep.env not in NETHACK_LIKE:
        return text
    for word, steps in DISTANCE_WORDS:
        text = re.sub(word, steps, text)
    return re.sub(BETWEEN, r"between \1 and \2", text)


def observation(ep):
    obs = ep.observation
    long_term = authors_text(ep, obs["long_term"])
    if ep.step > 0 and not previous_valid(ep):
        long_term = ep.render("invalid_feedback", executed=ep.previous_action["executed"]) + long_term
    return long_term + "\n" + authors_text(ep, obs["short_term"])


def unchanged_note(ep):
    n = ep.state["unchanged"]
    if n == 0:
        return ""
    return ep.render("unchanged_mild") if n < 3 else ep.render("unchanged_stuck", count=n)


def spatial(ep):
    return ep.render("spatial_nethack") if ep.env in NETHACK_LIKE else ep.render("spatial_crafter")


def instruction(ep):
    if ep.env == "nle":
        return ep.render("instruction_nle")
    if ep.env == "minihack":
        return ep.render("instruction_minihack")
    return ep.instruction


def section(text):
    """A part of a prompt that may be empty: followed by a blank line when it is not."""
    return text.strip() + "\n\n" if text.strip() else ""


def memory_ops(turn):
    """The well-formed memory ops of a turn (DONE and ACTION are not memory ops)."""
    return [op for op in turn.ops if op["error"] is None and op["kind"] != "control"]


# ---------------------------------------------------------------- LOG ----------------------

def log(ep, obs, analysis):
    ops = ep.data["ops"]["log"]
    routine = ep.routine("log", ops, order=ops)   # the authors ran a reply's ops grouped by type
    if previous_valid(ep):
        previous = ep.render("previous_action", step=ep.step - 1, action=ep.state["returned"])
    else:
        previous = ep.render("previous_invalid", step=ep.step - 1, output=ep.state["returned"],
                             executed=ep.previous_action["executed"])
    routine.say(ep.render("log", previous=section(previous), unchanged=section(unchanged_note(ep)),
                          spatial=section(spatial(ep)), analysis=section(analysis), observation=obs,
                          files=ep.file_index()).strip())
    role = "specialist" if ep.two_model else "base"
    for _ in range(ep.data["limits"]["log_turns"]):
        turn = yield from routine.ask(role)
        ended = "backend_error" if turn.error else "done" if turn.done else None if memory_ops(turn) else "no_ops"
        if ended:   # a DONE reply's ops have run
            routine.end(ended)
            return
        routine.say(ep.render("log_continue", results=turn.results, files=ep.file_index()).strip())
    routine.end("turn_limit")


# ---------------------------------------------------------------- PLAN ---------------------

def plan(ep, obs, analysis):
    """The PLAN routine; returns the committed action, repaired, or None (the fallback runs). In two-model
    mode the specialist consults first, then the base model continues the same conversation
    with the whole PLAN loop."""
    ops = ep.data["ops"]["plan"]
    routine = ep.routine("plan", ops, order=ops)
    stuck = ""
    if ep.state["unchanged"]:
        stuck = unchanged_note(ep).strip() + "\n" + ep.render("dont_repeat", action=ep.previous_action["executed"])
    routine.say(ep.render("plan", instruction=instruction(ep).strip(), spatial=section(spatial(ep)),
                          stuck=section(stuck), analysis=section(analysis), files=ep.file_index(),
                          observation=obs).strip())
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
    never shown to the base model), stops using memory, fails, or reaches the turn limit; then
    the hand-off, with its last results."""
    for _ in range(ep.data["limits"]["plan_turns"]):
        turn = yield from routine.ask("specialist")
        if turn.error:
            return
        if turn.actions:   # its reads ran: their results go with the hand-off
            routine.rewrite_reply(ep.remove_ops(turn.text, "ACTION"))
            routine.say(ep.render("handoff", results=section(turn.results)).strip())
            return
        if not memory_ops(turn):   # a plain hand-off
            routine.say(ep.render("handoff", results="").strip())
            return
        routine.say(ep.render("plan_continue", results=turn.results).strip())


def committed(ep, turn):
    """A reply's actions hold the authors' pick first, then the others; each is repaired, and
    the first the game accepts wins, else the authors' pick (so an echoed placeholder, "action
    name", does not win over a real action after it)."""
    repaired = [repair(a) for a in turn.actions]
    return next((a for a in repaired if ep.action_name(a) == a), repaired[0])


def repair(action):
    """A two-step command sent with its argument keeps the command: "eat d" -> "eat"."""
    words = action.split()
    return words[0].lower() if len(words) >= 2 and words[0].lower() in TWO_STEP else action


# ---------------------------------------------------------------- map analysis -------------

def letter_ratio(text):
    """Letters other than @ over the length of `text` (a right-stripped row)."""
    return sum(ch.isalpha() and ch != "@" for ch in text) / len(text) if text else 0.0


def tile_class(ch):
    """The authors' classes: `>` `<` stairs, `+` door, `-` `|` and space blocked, `}` `^` danger,
    floor and item glyphs passable, other letters monsters; the rest (the boulders ` and 0
    too) and off the grid blocked."""
    if ch is None or ch in "-| ":
        return "blocked"
    if ch in "<>":
        return "stairs"
    if ch == "+":
        return "door"
    if ch in "}^":
        return "danger"
    if ch in ".#{_" + ITEM_GLYPHS:
        return "passable"
    return "monster" if ch.isalpha() else "blocked"


def offset(dy, dx):
    """'2 north, 5 west': how far away a tile is, in rows and columns."""
    parts = [(abs(dy), "north" if dy < 0 else "south"), (abs(dx), "west" if dx < 0 else "east")]
    return ", ".join(f"{n} {word}" for n, word in parts if n)


def map_analysis(obs):
    """What surrounds @, from the text, by the authors' rules. The player's row is the first line
    with @ whose right-stripped text has at least 3 characters, under half of them letters
    (leading spaces count: in a dark maze @ stands almost alone). Rows from 15 above it to 14
    below it (Python's range(row - 15, row + 15)) whose right-stripped text is not empty and
    under 55% letters form the grid, the rows left out closing up; the 8 neighbours are
    classified; the stairs down on the map are the first 3 `>` in reading order more than a
    step away."""
    lines = obs.split("\n")
    row = next((i for i, line in enumerate(lines) if "@" in line and len(line.rstrip()) >= 3
                and letter_ratio(line.rstrip()) < 0.5), None)
    if row is None:
        return ""
    kept = [i for i in range(max(0, row - 15), min(len(lines), row + 15))
            if lines[i].rstrip() and letter_ratio(lines[i].rstrip()) < 0.55]
    grid = [lines[i].rstrip() for i in kept]
    r, c = kept.index(row), lines[row].index("@")
    found = {"stairs": [], "monster": [], "door": [], "danger": [], "move": [], "blocked": []}
    for name, dy, dx in MOVES:
        y, x = r + dy, c + dx
        ch = grid[y][x] if 0 <= y < len(grid) and 0 <= x < len(grid[y]) else None
        kind = tile_class(ch)
        if kind in ("stairs", "monster", "door", "danger"):
            found[kind].append(f"{ch} {name}")
        if kind != "danger":
            found["blocked" if kind == "blocked" else "move"].append(name)
    far = [(max(abs(y - r), abs(x - c)), y - r, x - c) for y, line in enumerate(grid)
           for x, ch in enumerate(line) if ch == ">" and max(abs(y - r), abs(x - c)) > 1]
    sections = [("Stairs next to you", found["stairs"]),
                ("Stairs down on the map", [f"> {offset(dy, dx)} (distance {d})" for d, dy, dx in far[:3]]),
                ("Monsters next to you", found["monster"]), ("Doors next to you", found["door"]),
                ("Danger next to you", found["danger"]), ("You can move", found["move"]),
                ("Blocked", found["blocked"])]
    return "MAP ANALYSIS (around @):\n" + "\n".join(f"{title}: {', '.join(items)}" for title, items in sections if items)
