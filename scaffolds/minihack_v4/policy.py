"""minihack_v4: the authors' converged MiniHack scaffold (their minihack_v4 and, in two-model
mode, minihack_v4_twomodel), behaviourally: v0 plus blocks that code computes for the model.

A step: the observation as the authors' agent read it; the trackers (the last 12 actions, the
position and its visit counts, the mandatory move); the map analysis with doors on the map; LOG
from the second step on, auto-logged when it writes nothing; then PLAN: the short
direction-only prompt when the game asks a direction or an item, else the full prompt with the
task's tips, the trackers' blocks, the stairs navigator and the newest lines of actions_log.txt.
Boxoban has its own instruction, rules file, fallback and (the game's) four actions. CHANGES.md
lists what differs from the authors' code.
"""
import re

# the map analysis examines the neighbours in this order; a step's (dx, dy) on the map and in the cursor's (x, y)
STEPS = {"north": (0, -1), "south": (0, 1), "east": (1, 0), "west": (-1, 0),
         "northeast": (1, -1), "northwest": (-1, -1), "southeast": (1, 1), "southwest": (-1, 1)}
DIRECTIONS = tuple(STEPS)
# the authors read the passable directions back from the analysis's text in this order
PASSABLE_ORDER = ("northeast", "northwest", "southeast", "southwest", "north", "south", "east", "west")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east",
            "northeast": "southwest", "southwest": "northeast", "northwest": "southeast", "southeast": "northwest"}
BESIDE = {"north": ("northeast", "northwest"), "south": ("southeast", "southwest"),
          "east": ("northeast", "southeast"), "west": ("northwest", "southwest"),
          "northeast": ("north", "east"), "northwest": ("north", "west"),
          "southeast": ("south", "east"), "southwest": ("south", "west")}
ACROSS = {"north": ("east", "west"), "south": ("east", "west"), "east": ("north", "south"),
          "west": ("north", "south"), "northeast": ("northwest", "southeast"),
          "northwest": ("northeast", "southwest"), "southeast": ("northeast", "southwest"),
          "southwest": ("northwest", "southeast")}
# commands that ask for an item or a direction next: "eat d" is sent as "eat"
TWO_STEP = ("open", "close", "kick", "fight", "fire", "zap", "eat", "quaff", "wear", "wield", "read",
            "apply", "puton", "remove", "takeoff", "dip", "rub", "invoke", "quiver", "throw", "offer",
            "drop", "force", "loot", "cast", "pickup")
ITEM_PROMPTS = ("What do you want to eat?", "What do you want to quaff?", "What do you want to wield?",
                "What do you want to wear?", "What do you want to read?")
ITEM_GLYPHS = "$)[!?/=\"(*%~"
# the authors' environment wrapper rewrote BALROG's distance and compass words in the text
DISTANCE_WORDS = ((r"\bvery far\b", "9+ steps away"), (r"\bvery near\b", "2 steps away"),
                  (r"\bfar\b", "5-8 steps away"), (r"\bnear\b", "3-4 steps away"),
                  (r"\badjacent\b", "1 step away (directly reachable)"))
BETWEEN = r"\b(north|south|east|west)((?:north|south)(?:east|west))\b"   # eastnortheast


def setup(ep):
    ep.state.update(previous=None, unchanged=0, returned=None, fell_back=False, actions=[],
                    here=None, path=[], visits={}, failed=set(), last_mandatory=None)


def step(ep):
    s = ep.state
    obs = observation(ep)
    question = game_question(ep, obs)
    if not question:
        track_position(s, obs)
    if ep.step > 0:
        s["actions"] = (s["actions"] + [ep.previous_action["executed"]])[-12:]
    same = s["previous"] is not None and obs.strip() == s["previous"].strip()
    s["unchanged"] = s["unchanged"] + 1 if same else 0
    analysis, seen = map_analysis(obs, is_boxoban(ep))
    moves = [d for d in seen["passable"] if d in directions(ep)]
    mandatory = mandatory_move(s, moves)    # chosen on every step: a move not taken counts as failed
    newest_log = recent_log(ep)             # before LOG writes
    if ep.step > 0:
        yield from log(ep, obs, analysis)
    if question:
        prompt = ep.render("plan_direction", notice=question.strip(), analysis=section(analysis), observation=obs)
    else:
        prompt = full_plan(ep, obs, analysis, seen, moves, mandatory, newest_log)
    action = yield from plan(ep, prompt.strip())
    s["fell_back"] = action is None
    s["returned"] = ep.fallback if action is None else action
    s["previous"] = obs
    return None if action is None else s["returned"]


# ---------------------------------------------------------------- what the agent reads ------

def is_boxoban(ep):
    return "boxoban" in ep.task.lower()


def directions(ep):
    """The directions the task accepts (Boxoban: the four cardinal ones), in the analysis's order."""
    return [d for d in DIRECTIONS if d in ep.actions]


def previous_valid(ep):
    """Whether the evaluator took the last output as a valid action. A fallback counts only when
    its name is exactly what ran ('search' where the task has no search is not)."""
    if ep.state["fell_back"]:
        return ep.state["returned"] == ep.previous_action["executed"]
    return ep.previous_action["valid"]


def authors_text(text):
    for word, steps in DISTANCE_WORDS:
        text = re.sub(word, steps, text)
    return re.sub(BETWEEN, r"between \1 and \2", text)


def observation(ep):
    obs = ep.observation
    long_term = authors_text(obs["long_term"])
    if ep.step > 0 and not previous_valid(ep):
        long_term = ep.render("invalid_feedback", executed=ep.previous_action["executed"]) + long_term
    return long_term + "\n" + authors_text(obs["short_term"])


def game_question(ep, obs):
    """The notice for a question the game is asking (a direction, or one of five item prompts), or ''."""
    if "In what direction?" in obs:
        return ep.render("prompt_direction")
    asked = next((q for q in ITEM_PROMPTS if q in obs), None)
    return ep.render("prompt_item", question=asked) if asked else ""


def section(text):
    """A part of a prompt that may be empty: followed by a blank line when it is not."""
    return text.strip() + "\n\n" if text.strip() else ""


def memory_ops(turn):
    """The well-formed memory ops of a turn (DONE and ACTION are not memory ops)."""
    return [op for op in turn.ops if op["error"] is None and op["kind"] != "control"]


def instruction(ep):
    return ep.render("instruction_boxoban") if is_boxoban(ep) else ep.render("instruction_minihack")


def task_tips(ep):
    task = ep.task.lower()
    if "boxoban" in task:
        return ep.render("tips_boxoban")
    if "mazewalk" in task:
        return ep.render("tips_mazewalk")
    if "corridorbattle" in task:
        return ep.render("tips_corridorbattle")
    if "corridor" in task:
        return ep.render("tips_corridor")
    if "quest" in task:
        return ep.render("tips_quest")
    return ""


def unchanged_note(ep):
    n = ep.state["unchanged"]
    if n == 0:
        return ""
    return ep.render("unchanged_mild") if n < 3 else ep.render("unchanged_stuck", count=n)


def recent_log(ep):
    """The last 5 lines of actions_log.txt, or a placeholder. The authors tested their TAIL's
    result text, so a line holding their error or empty-file markers also gives the placeholder."""
    text = ep.read("actions_log.txt") or ""
    tail = "\n".join(text.splitlines()[-5:])
    if not text.strip() or "[FILE IS EMPTY]" in tail or "[ERROR:" in tail:
        return "(nothing logged yet)"
    return tail


# ---------------------------------------------------------------- trackers ------------------

def track_position(s, obs):
    """The cursor's (x, y) and its visit count; staying put marks the last mandatory move failed."""
    found = re.search(r"\(x=(\d+),\s*y=(\d+)\)", obs)
    if not found:
        return
    here = (int(found.group(1)), int(found.group(2)))
    stayed = s["here"] == here
    s["here"] = here
    s["path"].append(here)
    s["visits"][here] = s["visits"].get(here, 0) + 1
    if not stayed:
        s["failed"].clear()
    elif s["last_mandatory"]:
        s["failed"].add(s["last_mandatory"])


def neighbour(here, direction):
    dx, dy = STEPS[direction]
    return here[0] + dx, here[1] + dy


def mandatory_move(s, moves):
    """From 4 visits to this square on: the first unvisited passable direction, skipping those
    that failed; from 5 on, else the least visited one."""
    here, pick = s["here"], None
    visits = s["visits"].get(here, 1)
    if here is not None and visits >= 4:
        options = [d for d in moves if d not in s["failed"]]
        if not options:
            s["failed"].clear()
            options = list(moves)
        fresh = [d for d in options if s["visits"].get(neighbour(here, d), 0) == 0]
        if fresh:
            pick = fresh[0]
        elif visits >= 5 and options:
            pick = min(options, key=lambda d: s["visits"][neighbour(here, d)])
    s["last_mandatory"] = pick
    return pick


def recent_actions(ep):
    """The last actions that ran, with the oscillation and repetition warnings."""
    acts = ep.state["actions"]
    if not acts:
        return ""
    lines = [f"Your last {len(acts)} actions, oldest first:"] + [f"  {i}: {a}" for i, a in enumerate(acts, 1)]
    warnings = []
    last6 = acts[-6:]
    reversals = sum(OPPOSITE.get(a) == b for a, b in zip(last6, last6[1:]))
    if len(acts) >= 4 and reversals >= 2 and acts[-1] in OPPOSITE:
        pair = (acts[-1], OPPOSITE[acts[-1]])
        others = ", ".join([d for d in directions(ep) if d not in pair][:4])
        warnings.append(ep.render("oscillation", direction=pair[0], opposite=pair[1], others=others))
    if len(acts) >= 3 and acts[-1] == acts[-2] == acts[-3]:
        warnings.append(ep.render("repetition", action=acts[-1]))
    return "\n".join(lines) + ("\n\n" + "".join(warnings) if warnings else "")


def exploration_status(s, moves):
    here = s["here"]
    if here is None:
        return ""
    visits = s["visits"].get(here, 1)
    seen = {d: s["visits"].get(neighbour(here, d), 0) for d in moves}
    fresh = [d for d in moves if seen[d] == 0]
    known = [f"{d} ({seen[d]}x)" for d in moves if seen[d]]
    lines = ["EXPLORATION STATUS:", f"  You are at ({here[0]}, {here[1]}), visited {visits} time(s)",
             f"  Explored: {len(s['visits'])} distinct squares in {len(s['path'])} steps"]
    if fresh:
        lines += [f"  UNVISITED passable directions: {', '.join(fresh)}",
                  f"  >>> PRIORITY: go {' or '.join(fresh[:3])} to explore NEW ground!"]
    else:
        lines.append("  Every passable square next to you has been visited.")
        if known:
            least = min(moves, key=lambda d: seen[d])
            lines.append(f"  Least visited: {least} ({seen[least]}x). Try that way.")
        lines += ["  TIP: nothing new nearby. Look at the doors on the map, or", "  for corridors further away."]
    if known:
        lines.append(f"  Visited already: {', '.join(known)}")
    if visits >= 3:
        lines += ["", f"  *** You have been on ({here[0]},{here[1]}) {visits} times! Go to NEW squares!"]
    path = s["path"]
    if len(path) >= 6 and len(set(path[-6:])) <= 2:
        lines += ["", f"  *** GOING BACK AND FORTH: only {len(set(path[-6:]))} distinct squares in the last 6 steps!",
                  f"  Path: {' -> '.join(f'({x},{y})' for x, y in path[-6:])}",
                  "  Break the pattern: choose a DIFFERENT direction!"]
        if fresh:
            lines.append(f"  Suggestion: {fresh[0]}")
    elif len(path) >= 10 and len(set(path[-6:])) <= 3 and len(set(path[-10:])) <= 3:
        lines += ["", f"  *** STUCK: only {len(set(path[-10:]))} distinct squares in the last 10 steps.",
                  "  Take a direction you have NOT used lately."]
    return "\n".join(lines)


def stairs_directive(ep, seen, moves):
    """The stairs navigator: stairs down next to you; else the way to the first > on the map, or
    a detour when lava (}) lies on 2 or more of that direction and its two neighbours."""
    if seen["stairs_next"]:
        return ep.render("stairs_adjacent", loud=seen["stairs_next"].upper(), direction=seen["stairs_next"])
    if not seen["stairs_far"]:
        return ""
    distance, goal = seen["stairs_far"]
    side, other_side = BESIDE[goal]
    if len({goal, side, other_side} & set(seen["lava"])) >= 2:
        detour = [d for d in ACROSS[goal] if d in moves] or list(ACROSS[goal])
        return ep.render("lava_detour", distance=distance, direction=goal, detour=" or ".join(detour[:2]))
    toward = [d for d in (goal, side, other_side) if d in moves] or moves[:3]
    return ep.render("stairs_goal", distance=distance, direction=goal, side=side, other_side=other_side,
                     toward=f"Passable directions toward the goal: {', '.join(toward)}" if toward else "")


def full_plan(ep, obs, analysis, seen, moves, mandatory, newest_log):
    s = ep.state
    stuck = ""
    if s["unchanged"]:
        stuck = unchanged_note(ep).strip() + "\n" + ep.render("dont_repeat", action=ep.previous_action["executed"])
    must = ""
    if mandatory:
        must = ep.render("mandatory", visits=s["visits"].get(s["here"], 0), loud=mandatory.upper(), direction=mandatory)
    return ep.render("plan", instruction=instruction(ep).strip(), tips=section(task_tips(ep)),
                     spatial=section(ep.render("spatial")), stuck=section(stuck),
                     recent=section(recent_actions(ep)), analysis=section(analysis),
                     stairs=section(stairs_directive(ep, seen, moves)), exploration=section(exploration_status(s, moves)),
                     mandatory=section(must), files=ep.file_index(), recent_log=newest_log, observation=obs)


# ---------------------------------------------------------------- LOG ----------------------

def log(ep, obs, analysis):
    """v0's LOG; when none of its replies held a write op, the step is logged by code."""
    ops = ep.data["ops"]["log"]
    routine = ep.routine("log", ops, order=ops)   # the authors ran a reply's ops grouped by type
    executed = ep.previous_action["executed"]
    if previous_valid(ep):
        previous = ep.render("previous_action", step=ep.step - 1, action=ep.state["returned"])
    else:
        previous = ep.render("previous_invalid", step=ep.step - 1, output=ep.state["returned"], executed=executed)
    routine.say(ep.render("log", previous=section(previous), unchanged=section(unchanged_note(ep)),
                          spatial=section(ep.render("spatial")), analysis=section(analysis), observation=obs,
                          files=ep.file_index()).strip())
    role = "specialist" if ep.two_model else "base"
    wrote, ended = False, "turn_limit"
    for _ in range(ep.data["limits"]["log_turns"]):
        turn = yield from routine.ask(role)
        wrote = wrote or any(op["kind"] == "write" for op in memory_ops(turn))
        stop = "backend_error" if turn.error else "done" if turn.done else None if memory_ops(turn) else "no_ops"
        if stop:   # a DONE reply's ops have run
            ended = stop
            break
        routine.say(ep.render("log_continue", results=turn.results, files=ep.file_index()).strip())
    routine.end(ended)
    if not wrote:
        ep.append("actions_log.txt", ep.render("auto_log", step=ep.step - 1, action=executed))


# ---------------------------------------------------------------- PLAN ---------------------

def plan(ep, prompt):
    """The PLAN routine on `prompt`; returns the committed action, repaired, or None (the fallback
    runs). In two-model mode the specialist consults first, then the base model continues the
    same conversation with the whole PLAN loop."""
    ops = ep.data["ops"]["plan"]
    routine = ep.routine("plan", ops, order=ops)
    routine.say(prompt)
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
            routine.rewrite_reply(ep.remove_ops(turn.text, "ACTION") or "(memory consultation complete)")
            routine.say(ep.render("handoff", results=section(turn.results)).strip())
            return
        if not memory_ops(turn):   # a plain hand-off
            routine.say(ep.render("handoff", results="").strip())
            return
        routine.say(ep.render("plan_continue", results=turn.results).strip())


def committed(ep, turn):
    """Each committed action repaired (the authors' pick first); the first the game accepts wins,
    else the authors' pick (as v0)."""
    repaired = [repair(a) for a in turn.actions]
    return next((a for a in repaired if ep.action_name(a) == a), repaired[0])


def repair(action):
    """'go north' / 'move north' -> 'north'; a two-step command with its argument keeps the
    command ('eat d' -> 'eat'); anything else is left as it is ('far east' included)."""
    words = action.split(None, 1)
    if len(words) < 2:
        return action
    command, rest = words[0].lower(), words[1].strip().lower()
    if command in ("go", "move") and rest in DIRECTIONS:
        return rest
    return command if command in TWO_STEP else action


# ---------------------------------------------------------------- map analysis -------------

def letter_share(line):
    """Letters other than @ over the length of the line without its trailing blanks."""
    text = line.rstrip()
    return sum(ch.isalpha() and ch != "@" for ch in text) / max(len(text), 1)


def tile(ch, boxoban):
    """What a map character is, in the authors' order; Boxoban's # are iron bars."""
    kinds = {">": "stairs down", "<": "stairs up", "+": "door", "-": "wall", "|": "wall", " ": "rock",
             "}": "danger", "^": "danger", None: "off the map"}
    if ch in kinds:
        return kinds[ch]
    if ch in (".{_" if boxoban else ".#{_"):
        return "floor"
    if ch in ITEM_GLYPHS:
        return "item"
    return "monster" if ch.isalpha() and ch != "@" else "unknown"


BLOCKED = ("wall", "rock", "off the map", "unknown")
LISTED = {"stairs down": ("stairs", "stairs down, go there!"), "stairs up": ("stairs", "stairs up"),
          "door": ("doors", "closed door (open it)"), "monster": ("monsters", "monster (move into it to attack)")}


def heading(dy, dx):
    return ("north" if dy < 0 else "south" if dy > 0 else "") + ("east" if dx > 0 else "west" if dx < 0 else "")


def map_analysis(obs, boxoban):
    """What surrounds @, from the text, and what the navigators read of it. The player's row is
    the first line with @ that is 3+ characters long without its trailing blanks and under half
    letters; the rows from 15 above it to 14 below that are under 55% letters (and the player's
    row) form the grid, closing up; each neighbour is classified, N S E W NE NW SE SW."""
    lines = obs.split("\n")
    row = next((i for i, line in enumerate(lines)
                if "@" in line and len(line.rstrip()) >= 3 and letter_share(line) < 0.5), None)
    if row is None:
        return "", {"passable": [], "stairs_next": None, "stairs_far": None, "lava": []}
    kept = [i for i in range(max(0, row - 15), min(len(lines), row + 15))
            if lines[i].rstrip() and (letter_share(lines[i]) < 0.55 or i == row)]
    grid = [lines[i].rstrip() for i in kept]
    r, c = kept.index(row), lines[row].find("@")
    found = {"stairs": [], "monsters": [], "doors": [], "danger": [], "move": [], "blocked": []}
    around = {}
    for name, (dx, dy) in STEPS.items():
        y, x = r + dy, c + dx
        ch = grid[y][x] if 0 <= y < len(grid) and 0 <= x < len(grid[y]) else None
        kind = tile(ch, boxoban)
        shown = f"{kind} {ch}" if ch not in (None, " ") else kind
        if kind in LISTED:
            found[LISTED[kind][0]].append(f"{name}: {ch} {LISTED[kind][1]}")
        if kind == "danger":
            found["danger"].append(f"{name}: {ch}")
        else:
            found["blocked" if kind in BLOCKED else "move"].append(f"{name} ({shown})")
        around[name] = (kind, ch)
    far = {">": [], "+": []}
    for y, line in enumerate(grid):
        for x, ch in enumerate(line):
            if ch in far and max(abs(y - r), abs(x - c)) > 1:
                far[ch].append((max(abs(y - r), abs(x - c)), heading(y - r, x - c)))
    sections = [("Stairs next to you", found["stairs"]),
                ("Stairs down on the map", [f"> about {d} squares {h}" for d, h in far[">"][:3]]),
                ("Monsters next to you", found["monsters"]), ("Doors next to you", found["doors"]),
                ("Doors on the map", [f"+ about {d} squares {h}" for d, h in far["+"][:4]]),
                ("Danger next to you", found["danger"]), ("You can move", found["move"]),
                ("Blocked", found["blocked"])]
    text = "MAP ANALYSIS (around @):\n" + "\n".join(f"{title}: {'; '.join(items)}" for title, items in sections if items)
    seen = {"passable": [d for d in PASSABLE_ORDER if around[d][0] not in BLOCKED + ("danger",)],
            "stairs_next": next((d for d in DIRECTIONS if around[d][0] == "stairs down"), None),
            "stairs_far": far[">"][0] if far[">"] else None,
            "lava": [d for d in DIRECTIONS if around[d][1] == "}"]}
    return text, seen
