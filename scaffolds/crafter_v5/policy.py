"""crafter_v5: the authors' converged Crafter scaffold (loop #1's best), behaviourally.

v0's step, for Crafter only: the observation as the authors' agent read it, the unchanged
counter, LOG from the second step on, PLAN, the repair. What loop #1 added: a Crafter
instruction and memory of its own (game_knowledge, goals, progress), goals.txt shown in every
PLAN, blocks computed from the observation (inventory changes, failed crafts, threats, vitals,
repetition, the tech tree, stagnation, Noop streaks, files grown long), and a gate that refuses
an action bound to fail, at most twice a step. CHANGES.md lists every difference from the
authors' code and the quirks kept on purpose.
"""
import re

VITALS = ("health", "food", "drink")   # energy is never read
HOSTILE = ("zombie", "skeleton")
CRAFTS = ("Make Wood Pickaxe", "Make Stone Pickaxe", "Make Iron Pickaxe",
          "Make Wood Sword", "Make Stone Sword", "Make Iron Sword")
COSTS = {"Place Table": {"wood": 2}, "Place Stone": {"stone": 1}, "Place Furnace": {"stone": 4},
         "Place Plant": {"sapling": 1}, "Make Wood Pickaxe": {"wood": 1}, "Make Wood Sword": {"wood": 1},
         "Make Stone Pickaxe": {"wood": 1, "stone": 1}, "Make Stone Sword": {"wood": 1, "stone": 1},
         "Make Iron Pickaxe": {"wood": 1, "coal": 1, "iron": 1}, "Make Iron Sword": {"wood": 1, "coal": 1, "iron": 1}}
# commands that ask for an item or a direction next: "eat d" is sent as "eat" (the authors' repair, all games)
TWO_STEP = ("open", "close", "kick", "fight", "fire", "zap", "eat", "quaff", "wear", "wield", "read",
            "apply", "puton", "remove", "takeoff", "dip", "rub", "invoke", "quiver", "throw", "offer",
            "drop", "force", "loot", "cast", "pickup")
# (vital, critical at or below, warning at or below, what a critical level asks, what a warning asks)
URGENCY = (("health", 2, 4, "you are about to DIE. Get food (a cow, a plant) or water NOW.",
            "keep out of fights; find food or water."),
           ("food", 1, 3, "you are about to starve. Hit a cow (Do) or eat a plant NOW.", "falling. Find food soon."),
           ("drink", 1, 3, "you are about to die of thirst. Face water and use Do NOW.", "falling. Find water soon."))
REFERENCE_FILES = ("game_knowledge.txt", "progress.txt")   # never flagged as too long
LONG_FILE = 25


def setup(ep):
    ep.state.update(previous=None, unchanged=0, history=[], inventory={}, health=None, craft_failures=0,
                    noops=0, since_gain=0, effective=set())


def step(ep):
    s = ep.state
    obs = observation(ep)
    executed = ep.previous_action["executed"] if ep.step > 0 else None
    changed = s["previous"] is None or obs.strip() != s["previous"].strip()
    s["unchanged"] = 0 if changed else s["unchanged"] + 1
    if executed is not None:
        s["history"] = (s["history"] + [(executed, changed)])[-20:]
        s["noops"] = s["noops"] + 1 if executed == "Noop" else 0
    have = inventory(obs)
    s["since_gain"] = 0 if gained(s["inventory"], have) else s["since_gain"] + 1
    notes = {"inventory": inventory_changes(ep, s["inventory"], have), "craft": craft_failure(ep, executed, changed),
             "combat": threats(ep, obs), "tech": tech_tree(ep, obs), "stagnation": stagnation(ep),
             "noops": noop_streak(ep), "survival": survival(ep, obs), "repetition": repetition(ep),
             "context": craft_context(ep, obs, executed, changed)}
    if executed is not None and changed:   # after the tech tree's EASY WINS have read the set
        s["effective"].add(executed)
    if ep.step > 0:
        yield from log(ep, obs, notes)
    action = yield from plan(ep, obs, notes)
    s.update(previous=obs, inventory=have, health=vitals(obs).get("health", 9))
    return action


# ---------------------------------------------------------------- what the agent reads ------

def observation(ep):
    """Long-term context, a new line, short-term context; after an invalid output, the
    evaluator's note first (BALROG's feedback on invalid actions)."""
    obs = ep.observation
    long_term = obs["long_term"]
    if ep.step > 0 and not ep.previous_action["valid"]:
        long_term = ep.render("invalid_feedback", executed=ep.previous_action["executed"]) + long_term
    return long_term + "\n" + obs["short_term"]


def vitals(text):
    found = {v: re.search(rf"{v}: (\d+)/9", text) for v in VITALS}
    return {v: int(m.group(1)) for v, m in found.items() if m}


def inventory(text):
    """The items listed under 'Your inventory:' (the vitals are listed under 'Your status:')."""
    items, inside = {}, False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Your inventory:"):
            inside = True
        elif inside and line.startswith("- "):
            m = re.match(r"- (.+?):\s*(\d+)", line)
            if m:
                items[m.group(1).strip()] = int(m.group(2))
        elif inside and line:
            break
    return items


def seen(text):
    """(name, distance, direction) of each thing the observation lists, then of what the player
    faces (distance 0, 'in front')."""
    found = [(m.group(1).lower(), int(m.group(2)), m.group(3).strip()) for line in text.splitlines()
             if (m := re.match(r"- \s*(\S+)\s+(\d+)\s+steps?\s+to\s+your\s+(.+)", line.strip()))]
    front = re.search(r"You face (\S+) at your front", text)
    return found + [(front.group(1).lower(), 0, "in front")] if front else found


def nearest(text):
    found = {}
    for name, distance, direction in seen(text):
        if name not in found or distance < found[name][0]:
            found[name] = (distance, direction)
    return found


def best(have, tool):
    """'Iron', 'Stone', 'Wood' or None: the best pickaxe or sword held."""
    return next((tier for tier in ("Iron", "Stone", "Wood") if have.get(f"{tier.lower()}_{tool}", 0) > 0), None)


def gained(before, now):
    """Whether an item count went up (always so while the previous inventory was empty)."""
    return not before or any(n > before.get(item, 0) for item, n in now.items())


def section(text):
    """A part of a prompt that may be empty: followed by a blank line when it is not."""
    return text.strip() + "\n\n" if text.strip() else ""


def memory_ops(turn):
    """The well-formed memory ops of a turn (DONE and ACTION are not memory ops)."""
    return [op for op in turn.ops if op["error"] is None and op["kind"] != "control"]


# ---------------------------------------------------------------- blocks -------------------

def unchanged_note(ep):
    n = ep.state["unchanged"]
    if n == 0:
        return ""
    return ep.render("unchanged_mild") if n < 3 else ep.render("unchanged_stuck", count=n)


def inventory_changes(ep, before, now):
    if not before:
        return ""
    lines = []
    for item in sorted(set(before) | set(now)):
        old, new = before.get(item, 0), now.get(item, 0)
        if new > old:
            lines.append(f"GAINED: +{new - old} {item} (now {new})")
        elif new < old:
            lines.append(f"LOST: -{old - new} {item} (now {new})")
    return ep.render("inventory_changes", changes="\n".join(lines)) if lines else ""


def craft_failure(ep, executed, changed):
    """A craft that changed nothing; the count of such crafts resets only on a craft that worked."""
    s = ep.state
    if executed not in CRAFTS:
        return ""
    if changed:
        s["craft_failures"] = 0
        return ""
    s["craft_failures"] += 1
    if s["craft_failures"] >= 2:
        return ep.render("craft_failed_again", attempt=s["craft_failures"], action=executed)
    return ep.render("craft_failed", action=executed)


def survival(ep, obs):
    now, lines = vitals(obs), []
    for vital, critical_at, warning_at, critical, warning in URGENCY:
        n = now.get(vital, 9)
        if n <= critical_at:
            lines.append(f"CRITICAL: {vital} {n}/9: {critical}")
        elif n <= warning_at:
            lines.append(f"WARNING: {vital} {n}/9: {warning}")
    return ep.render("survival", warnings="\n".join(lines)) if lines else ""


def threats(ep, obs):
    """Health lost since the last step; zombies and skeletons within 2 steps (skeletons within 4);
    arrows within 2 steps."""
    health = vitals(obs).get("health", 9)
    before, visible, lines = ep.state["health"], seen(obs), []
    if before is not None and health < before:
        lines.append(f"YOU LOST {before - health} HEALTH last step: now {health}/9. "
                     "Something hostile is attacking you.")
    for name, distance, where in visible:
        if name in HOSTILE and distance <= 2 and health <= 3:
            lines.append(f"CRITICAL: {name} {distance} step(s) {where}. RUN NOW: health {health}/9, "
                         "one more hit could kill you.")
        elif name in HOSTILE and distance <= 2:
            lines.append(f"THREAT: {name} {distance} step(s) {where}. Fight it (face it, Do) or get to safety.")
        elif name == "skeleton" and distance <= 4:
            lines.append(f"CAUTION: skeleton {distance} steps {where}: skeletons shoot arrows from afar. Stay alert.")
    lines += [f"ARROW COMING {distance} step(s) {where}: a skeleton is shooting at you!"
              for name, distance, where in visible if name == "arrow" and distance <= 2]
    return ep.render("combat", warnings="\n".join(lines)) if lines else ""


def maintenance(ep):
    long = [(name, len(text.splitlines())) for name, text in sorted(ep.files().items()) if name not in REFERENCE_FILES]
    lines = [f"TOO LONG: {name} has {n} lines. WRITE it again as a summary that keeps only the most important "
             "recent facts." for name, n in long if n > LONG_FILE]
    return ep.render("maintenance", warnings="\n".join(lines)) if lines else ""


def repetition(ep):
    """Over the last 8 (action, changed) pairs: the latest action failing 3 times, or tried 5
    times with 2 failures; else 6 actions of at most 2 kinds, 5 of them moves."""
    history = ep.state["history"]
    if not history:
        return ""
    last = history[-1][0]
    outcomes = [changed for action, changed in history[-8:] if action == last]
    failures = outcomes.count(False)
    if failures >= 3 and last in CRAFTS:
        return ep.render("repetition_craft", action=last, failures=failures)
    if failures >= 3:
        return ep.render("repetition_alert", action=last, failures=failures, tries=len(outcomes))
    if len(outcomes) >= 5 and failures >= 2:
        return ep.render("repetition_warning", action=last, tries=len(outcomes), failures=failures)
    recent = [action for action, _ in history[-6:]]
    if len(history) >= 6 and len(set(recent)) <= 2 and sum(a.startswith("Move") for a in recent) >= 5:
        return ep.render("stuck_moving", actions=", ".join(recent))
    return ""


def craft_context(ep, obs, executed, changed):
    """Right after a table or furnace went down: craft now. Else, with a table in sight: what
    could be crafted at it."""
    if changed and executed == "Place Table":
        return ep.render("placed_table")
    if changed and executed == "Place Furnace":
        return ep.render("placed_furnace")
    if "table" not in obs.lower():
        return ""
    have = inventory(obs)
    wood, stone = have.get("wood", 0) > 0, have.get("stone", 0) > 0
    pick, sword = best(have, "pickaxe"), best(have, "sword")
    crafts = [name for name, wanted in (("Make Wood Pickaxe", wood and pick is None),
                                        ("Make Wood Sword", wood and sword is None),
                                        ("Make Stone Pickaxe", wood and stone and pick in (None, "Wood")),
                                        ("Make Stone Sword", wood and stone and sword in (None, "Wood"))) if wanted]
    return ep.render("table_nearby", crafts=", ".join(crafts)) if crafts else ""


def toward(found, thing, full):
    """A hint toward the nearest `thing`; `full` also says when it is in front, or not in sight."""
    if thing not in found:
        return f"No {thing} in sight: explore to find some" if full else None
    distance, direction = found[thing]
    if full and distance == 0:
        return f"{thing.capitalize()} right in front of you: use Do NOW"
    return f"Nearest {thing}: {distance} step(s) {direction}"


def next_goal(have, found, table, furnace):
    """(the tech tree's next step, a hint toward it), either may be None: the authors' decision
    tree over the best pickaxe, the best sword, the materials held and a table / furnace in sight."""
    wood, stone, coal, iron = (have.get(m, 0) for m in ("wood", "stone", "coal", "iron"))
    pick, tree = best(have, "pickaxe"), toward(found, "tree", False)
    if pick is None:
        if wood >= 3 and table:
            return f">>> Make Wood Pickaxe NOW (a table is in sight, you hold {wood} wood) <<<", None
        if wood >= 4:
            return "Place Table (face GRASS; 2 wood), then Make Wood Pickaxe and Make Wood Sword!", None
        if wood >= 3:
            return "Place Table (2 wood, leaving 1 for the pickaxe); 1 more wood first would pay for a sword too", None
        return f"Collect wood (Do on a tree): {4 - wood} more needed", toward(found, "tree", True)
    if best(have, "sword") is None:
        if wood >= 1 and table:
            return f">>> Make Wood Sword NOW (a table is in sight, you hold {wood} wood) <<<", None
        if wood >= 3:
            return "Place Table (2 wood), then Make Wood Sword (1 wood)", None
        if wood >= 1:
            return f"Find a table, OR collect {3 - wood} more wood to place a new one and craft the sword", tree
        return "Collect wood (3 needed: 2 for a table, 1 for the sword)", tree
    if pick == "Wood":
        if stone >= 1 and wood >= 1 and table:
            then = " Then Make Stone Sword!" if stone >= 2 and wood >= 2 and not have.get("stone_sword", 0) else ""
            return f">>> Make Stone Pickaxe NOW (a table is in sight; {wood} wood, {stone} stone) <<<{then}", None
        if stone == 0:
            return "Mine stone (face stone, Do: the Wood Pickaxe will do)", toward(found, "stone", True)
        if not table and wood >= 2:
            grass_ahead = found.get("grass", (None,))[0] == 0
            return "Place Table (face grass; 2 wood) to craft the Stone Pickaxe", \
                "Grass in front: Place Table now!" if grass_ahead else None
        if not table and wood >= 1:
            return "1 more wood for a table (2 wood), then craft the Stone Pickaxe", tree
        if not table:
            return "Collect 2 wood for a table, then craft the Stone Pickaxe (3 wood and 1 stone in all)", tree
        return "Collect wood to craft with (1 or more for the Stone Pickaxe)", tree
    if pick == "Stone":
        if iron >= 1 and coal >= 1 and wood >= 1 and table and furnace:
            then = " Then Make Iron Sword!" if min(iron, coal, wood) >= 2 and not have.get("iron_sword", 0) else ""
            return (f">>> Make Iron Pickaxe NOW (a table and a furnace are in sight; {wood} wood, {coal} coal, "
                    f"{iron} iron) <<<{then}"), None
        if not furnace and stone >= 4:
            near = ", NEAR the table!" if table else ""
            return f"Place Furnace (face GRASS; 4 stone, you hold {stone}){near}", None
        if not furnace:
            return (f"Mine {4 - stone} more stone for a furnace (4 stone, you hold {stone})",
                    toward(found, "stone", True))
        if iron == 0:
            return "Mine iron (face iron, Do: the Stone Pickaxe will do)", toward(found, "iron", True)
        if coal == 0:
            return "Mine coal (face coal, Do: any pickaxe will do)", toward(found, "coal", True)
        if not table and wood >= 2:
            return "Place Table (face grass; 2 wood) near the furnace, for the iron crafts", None
        if not table:
            return "Collect wood (2 for a table) for the iron crafts", tree
        return None, None
    return "Mine diamond (face a diamond, Do: the Iron Pickaxe will do)", toward(found, "diamond", True)


def tech_tree(ep, obs):
    have, found, lower = inventory(obs), nearest(obs), obs.lower()
    table, furnace = "table" in lower, "furnace" in lower
    wood, stone, coal, iron, sapling = (have.get(m, 0) for m in ("wood", "stone", "coal", "iron", "sapling"))
    pick, sword = best(have, "pickaxe"), best(have, "sword")
    tools = [f"{tier} {tool}" for tier, tool in ((pick, "Pickaxe"), (sword, "Sword")) if tier]
    lines = ["TOOLS: " + (", ".join(tools) or "None")]
    materials = [f"{m}:{have[m]}" for m in ("wood", "stone", "coal", "iron", "sapling") if have.get(m, 0)]
    if materials:
        lines.append("MATERIALS: " + ", ".join(materials))
    goal, hint = next_goal(have, found, table, furnace)
    if goal:
        lines.append("NEXT: " + goal)
    if hint:
        lines.append("  -> " + hint)
    if pick == "Stone" and sword == "Wood" and stone >= 1 and wood >= 1 and table:
        lines.append("ALSO: Make Stone Sword (the materials are in hand, a table is in sight)")
    elif pick == "Iron" and sword != "Iron" and min(iron, coal, wood) >= 1 and table and furnace:
        lines.append("ALSO: Make Iron Sword (the materials are in hand, a table and a furnace are in sight)")
    done = ep.state["effective"]
    wins = []
    if "Sleep" not in done and pick:
        wins.append("Sleep to unlock Wake Up (a free achievement)")
    if "Place Stone" not in done and stone > 0 and pick:
        wins.append("Place Stone (face grass): a free achievement")
    if "Place Plant" not in done and sapling > 0:
        wins.append("Place Plant (face grass): it grows into food")
    if vitals(obs).get("drink", 9) < 7 and "water" in found:
        wins.append(f"Collect Drink: water {found['water'][0]} step(s) {found['water'][1]}")
    if wins and len(lines) < 6:
        lines.append("EASY WINS: " + "; ".join(wins[:2]))
    return ep.render("tech_tree", lines="\n".join(lines))


def stagnation(ep):
    steps = ep.state["since_gain"]
    if steps >= 50:
        return ep.render("stagnation_critical", steps=steps)
    return ep.render("stagnation", steps=steps) if steps >= 30 else ""


def noop_streak(ep):
    count = ep.state["noops"]
    if count >= 8:
        return ep.render("noop_spiral", count=count)
    return ep.render("noop_streak", count=count) if count >= 4 else ""


def goals(ep):
    text = ep.read("goals.txt") or ""
    return text.strip() or ep.render("no_goals").strip()


# ---------------------------------------------------------------- LOG ----------------------

def log(ep, obs, notes):
    ops = ep.data["ops"]["log"]
    routine = ep.routine("log", ops, order=ops)   # the authors ran a reply's ops grouped by type
    done = ep.previous_action
    if done["valid"]:
        previous = ep.render("previous_action", step=ep.step - 1, action=done["executed"])
    else:
        previous = ep.render("previous_invalid", step=ep.step - 1, output=done["raw"], executed=done["executed"])
    routine.say(ep.render("log", previous=section(previous), unchanged=section(unchanged_note(ep)),
                          inventory=section(notes["inventory"]), craft=section(notes["craft"]),
                          combat=section(notes["combat"]), survival=section(notes["survival"]),
                          spatial=section(ep.render("spatial")), observation=obs, files=ep.file_index(),
                          maintenance=section(maintenance(ep))).strip())
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

def plan(ep, obs, notes):
    """The PLAN routine; returns the action, repaired (the fallback when none was committed).
    An action the gate refuses gets the reason as the next message, at most max_rejections
    times a step; refusals use PLAN turns. In two-model mode the specialist consults first, then
    the base model continues the same conversation with the whole loop, gate included."""
    ops, limits = ep.data["ops"]["plan"], ep.data["limits"]
    routine = ep.routine("plan", ops, order=ops)
    stuck = ""
    if ep.state["unchanged"]:
        stuck = unchanged_note(ep).strip() + "\n" + ep.render("dont_repeat", action=ep.previous_action["executed"])
    routine.say(ep.render("plan", instruction=ep.render("instruction").strip(), spatial=section(ep.render("spatial")),
                          stuck=section(stuck), survival=section(notes["survival"]), combat=section(notes["combat"]),
                          repetition=section(notes["repetition"]), craft=section(notes["context"]),
                          tech=section(notes["tech"]), stagnation=section(notes["stagnation"]),
                          noops=section(notes["noops"]), goals=goals(ep), files=ep.file_index(),
                          observation=obs).strip())
    if ep.two_model:
        yield from consult(ep, routine)
    action, ended, refused = None, "turn_limit", 0
    for _ in range(limits["plan_turns"]):
        turn = yield from routine.ask("base")
        if turn.error:
            ended = "backend_error"
            break
        if turn.actions:   # this reply's reads ran too; their results are never shown
            written = chosen(ep, turn)
            reason = refusal(ep, written, obs) if refused < limits["max_rejections"] else ""
            if reason:
                refused += 1
                routine.say(ep.render("rejected", reason=reason.strip()).strip())
                continue
            action, ended = written, "action"
            break
        if not memory_ops(turn):
            ended = "no_ops"
            break
        routine.say(ep.render("plan_continue", results=turn.results).strip())
    routine.end(ended + (f" after {refused} rejections" if refused else ""))
    return repair(ep.fallback if action is None else action, ep.actions)


def refusal(ep, action, obs):
    """Why the gate refuses an action, as the model wrote it ('' if it passes): a Place or Make
    short of materials, Sleep with a zombie or skeleton within 3 steps, a Noop after 5 in a row."""
    have = inventory(obs)
    missing = [f"need {n} {item}, you have {have.get(item, 0)}" for item, n in COSTS.get(action, {}).items()
               if have.get(item, 0) < n]
    if missing:
        return ep.render("short_of", action=action, missing="; ".join(missing))
    hostile = next(((name, d, where) for name, d, where in seen(obs) if name in HOSTILE and d <= 3), None)
    if action == "Sleep" and hostile:
        return ep.render("sleep_unsafe", creature=hostile[0], distance=hostile[1], direction=hostile[2])
    if action == "Noop" and ep.state["noops"] >= 5:
        return ep.render("noop_refused", count=ep.state["noops"])
    return ""


def consult(ep, routine):
    """Two-model mode: the specialist runs the PLAN loop (no gate) until it commits (its ACTION
    is removed, never shown to the base model), stops using memory, fails, or reaches the turn
    limit; then the hand-off, with its last results."""
    for _ in range(ep.data["limits"]["plan_turns"]):
        turn = yield from routine.ask("specialist")
        if turn.error:
            return
        if turn.actions:   # its reads ran: their results go with the hand-off
            routine.rewrite_reply(ep.remove_ops(turn.text, "ACTION").strip() or ep.render("consulted").strip())
            routine.say(ep.render("handoff", results=section(turn.results)).strip())
            return
        if not memory_ops(turn):
            routine.say(ep.render("handoff", results="").strip())
            return
        routine.say(ep.render("plan_continue", results=turn.results).strip())


def chosen(ep, turn):
    """The committed action as the model wrote it: the first whose repair the game accepts, else
    the first (v0's rule)."""
    return next((a for a in turn.actions if ep.action_name(repair(a, ep.actions)) == repair(a, ep.actions)),
                turn.actions[0])


def repair(action, actions):
    """The authors' two repairs, in order. A two-step command keeps its command ("eat d" -> "eat").
    Then Crafter's names: a diagonal move keeps its north or south ("move north-east" -> "Move
    North"), and an action in the wrong case gets the game's ("place table" -> "Place Table",
    "noop" -> "Noop")."""
    words = action.split()
    if len(words) >= 2 and words[0].lower() in TWO_STEP:
        action = words[0].lower()
    text = action.strip().lower()
    diagonal = re.fullmatch(r"move (north|south)[- ]?(?:east|west)", text)
    if diagonal:
        return "Move " + diagonal.group(1).capitalize()
    return {name.lower(): name for name in actions}.get(text, action.strip())
