"""scaffolds/crafter_v5 is the authors' converged Crafter scaffold (automem_reference.md section 2),
behaviourally, asserted from the traces of real Crafter episodes with scripted replies: the gate
(materials, Sleep near a zombie, a Noop streak; at most 2 refusals a step, on the action as
written, before the repair), goals.txt in every PLAN, the blocks in the authors' order, two-model
mode. tests/test_converged_scaffolds.py plays it on tiny-random and SmolLM2-135M."""
import json

import pytest

import envs
from agent import OpenAIBackend, all_finished, load_scaffold, make_agent, play, run_episodes
from scripted_server import ScriptedServer

V5 = load_scaffold("crafter_v5")
GOALS = V5.initial_files("crafter")["goals.txt"]


def is_log(body):
    return body["messages"][0]["content"].startswith("MEMORY UPDATE")


def by_step(log, plan):
    """A scripted model: LOG answers log(step), PLAN answers plan(step, body); the step is counted
    from the PLAN conversations opened so far (a step's LOG runs before its PLAN)."""
    opened = []

    def reply(body):
        if is_log(body):
            return log(len(opened))
        if len(body["messages"]) == 1:
            opened.append(body)
        return plan(len(opened) - 1, body)
    return reply


def episode(tmp_path, script, steps, env=None, two_model=False):
    records = []
    env = env or envs.make_env("crafter", seed=0)
    with ScriptedServer(script) as server:
        ag = make_agent("memory", env, V5, tmp_path / "mem", two_model=two_model)
        backend = OpenAIBackend(server.url, "m", specialist="memory-lora" if two_model else None, max_retries=0)
        all_finished(run_episodes([play(env, ag, env.seed, records.append, steps)], backend))
    return [json.loads(json.dumps(r)) for r in records]


def said(record, routine="plan"):
    """The user messages of the routine's conversation after its first one."""
    return [m["content"] for m in record[routine]["messages"][1:] if m["role"] == "user"]


def first_prompt(record, routine):
    return record[routine]["messages"][0]["content"]


def turn_input(record, k, routine="plan"):
    """The messages turn k of the routine was given."""
    return record[routine]["messages"][:record[routine]["turns"][k]["input_messages"]]


def goals_shown(record):
    prompt = first_prompt(record, "plan")
    return prompt.split("YOUR CURRENT GOALS (goals.txt):\n", 1)[1].split("\n\nMemory files", 1)[0]


def in_order(text, *parts):
    at = [text.find(p) for p in parts]
    assert all(i >= 0 for i in at), [p for p, i in zip(parts, at) if i < 0]
    assert at == sorted(at), [p for p, _ in sorted(zip(parts, at), key=lambda x: x[1])]


REFUSED_TABLE = ("ACTION REFUSED: 'Place Table' WILL FAIL: not enough materials (need 2 wood, you have 0). "
                 "Gather what is missing first, then try again.\n"
                 "Choose a DIFFERENT action and commit it with <|ACTION|>action name<|END|>.")


def gate_plan(step, body):
    """Step 0: Place Table with no wood, a READ beside it; step 1: the same in lower case; step 2:
    no op and no action (the fallback); then Noop at every step."""
    if step == 0:
        return "<|READ|>progress.txt<|END|> <|ACTION|>Place Table<|END|>"
    return {1: "<|ACTION|>place table<|END|>", 2: "I am not sure what to do."}.get(step, "<|ACTION|>Noop<|END|>")


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    """Seed 0, 9 steps; each LOG rewrites goals.txt with its step."""
    script = by_step(lambda step: f"<|WRITE|>goals.txt|CURRENT GOAL: from step {step}<|END|><|DONE|>", gate_plan)
    return episode(tmp_path_factory.mktemp("gate"), script, steps=9)


def test_place_table_without_wood_is_refused_twice_then_accepted(gate_run):
    plan = gate_run[0]["plan"]
    assert said(gate_run[0]) == [REFUSED_TABLE, REFUSED_TABLE]      # the rejection alone: no READ results
    assert [t["response"] for t in plan["turns"]] == ["<|READ|>progress.txt<|END|> <|ACTION|>Place Table<|END|>"] * 3
    assert plan["turns"][0]["ops"][0]["op"] == "READ" and "[ ] Collect Wood" in plan["turns"][0]["ops"][0]["result"]
    assert plan["ended"] == "action after 2 rejections"
    assert gate_run[0]["action"] == {"raw": "Place Table", "executed": "Place Table", "valid": True}
    # the gate reads the action as written: "place table" passes, then the repair names it
    assert gate_run[1]["plan"]["ended"] == "action" and len(gate_run[1]["plan"]["turns"]) == 1
    assert gate_run[1]["action"] == {"raw": "Place Table", "executed": "Place Table", "valid": True}


def test_never_more_than_2_rejections_a_step(gate_run):
    """Noop is refused once 5 executed Noops ran in a row (steps 7 and 8), twice at most, then run."""
    refusals = [len(said(r)) for r in gate_run]
    assert refusals == [2, 0, 0, 0, 0, 0, 0, 2, 2]
    assert [len(r["plan"]["turns"]) for r in gate_run] == [n + 1 for n in refusals]
    assert said(gate_run[8]) == ["ACTION REFUSED: Noop REFUSED: you have already chosen Noop 6 times in a row. Pick an "
                                 "action that gets something done.\nChoose a DIFFERENT action and commit it with "
                                 "<|ACTION|>action name<|END|>."] * 2
    assert all(r["action"]["executed"] == ("Place Table" if r["step"] < 2 else "Noop") for r in gate_run)
    assert "=== 4 NOOPS IN A ROW ===" in first_prompt(gate_run[6], "plan")


def test_a_step_without_an_action_runs_noop_as_a_valid_action(gate_run):
    """The fallback `noop` is repaired like a committed action: `Noop`, a valid action."""
    assert gate_run[2]["plan"]["ended"] == "no_ops" and len(gate_run[2]["plan"]["turns"]) == 1
    assert gate_run[2]["action"] == {"raw": "Noop", "executed": "Noop", "valid": True}
    assert "Your previous action (step 2): Noop\n" in first_prompt(gate_run[3], "log")


def test_goals_txt_is_in_every_plan(gate_run):
    """The step's goals.txt as LOG left it: the initial file at step 0, then what each LOG wrote."""
    assert goals_shown(gate_run[0]) == GOALS.strip()
    assert [goals_shown(r) for r in gate_run[1:]] == [f"CURRENT GOAL: from step {k}" for k in range(1, 9)]


def test_log_and_plan_blocks_in_the_authors_order(gate_run):
    """Step 1, after a Place Table that changed nothing."""
    log, plan = first_prompt(gate_run[1], "log"), first_prompt(gate_run[1], "plan")
    in_order(log, "MEMORY UPDATE.", "Your previous action (step 0): Place Table\n",
             "Note: the observation is exactly what it was before your previous action",
             "WHERE YOU ARE:", "What the game answered (the current observation):\nYou see:",
             "Memory files (name and number of lines):\nactions_log.txt (0 lines)\ngame_knowledge.txt (73 lines)\n"
             "goals.txt (5 lines)\nobservations.txt (0 lines)\nprogress.txt (24 lines)",
             "<|DONE|>                            end the memory update", "Rules:\n1. Check before you write",
             "Crafter rules:\n4. EVERY turn, WRITE goals.txt",
             "9. Keep goals.txt, observations.txt and actions_log.txt under 25 lines", "finish with <|DONE|>.")
    in_order(plan, "You play Crafter,", "THE 22 ACHIEVEMENTS", "You keep a memory of this episode", "WHERE YOU ARE:",
             "The last action that ran was 'Place Table'. Do not repeat it",
             "=== WHERE YOU ARE IN THE TECH TREE ===\nTOOLS: None\nNEXT: Collect wood (Do on a tree): 4 more needed\n"
             "  -> Nearest tree: 7 step(s) north-west\n\nYOUR CURRENT GOALS (goals.txt):\nCURRENT GOAL: from step 1",
             "Current observation:\nYou see:", "Decide in six steps:", "Crafter planning rules:",
             "<|ACTION|>action name<|END|>        commit your action", "You must commit exactly one action")


def test_tech_tree_next_step_and_the_repair():
    """The authors' NEXT decision tree, a case per tier; the repair after PLAN."""
    policy = V5.module()
    next_goal, repair = policy["next_goal"], policy["repair"]
    assert next_goal({"wood": 3}, {}, True, False) == (
        ">>> Make Wood Pickaxe NOW (a table is in sight, you hold 3 wood) <<<", None)
    assert next_goal({"wood": 1, "wood_pickaxe": 1}, {"tree": (0, "in front")}, False, False) == (
        "Find a table, OR collect 2 more wood to place a new one and craft the sword", "Nearest tree: 0 step(s) in front")
    assert next_goal({"wood_pickaxe": 1, "wood_sword": 1}, {"stone": (0, "in front")}, False, False) == (
        "Mine stone (face stone, Do: the Wood Pickaxe will do)", "Stone right in front of you: use Do NOW")
    assert next_goal({"wood": 2, "stone": 1, "wood_pickaxe": 1, "wood_sword": 1}, {"grass": (0, "in front")},
                     False, False) == ("Place Table (face grass; 2 wood) to craft the Stone Pickaxe",
                                       "Grass in front: Place Table now!")
    stone_tools = {"stone_pickaxe": 1, "stone_sword": 1}
    assert next_goal({**stone_tools, "stone": 2}, {"tree": (3, "west")}, True, False) == (
        "Mine 2 more stone for a furnace (4 stone, you hold 2)", "No stone in sight: explore to find some")
    assert next_goal({**stone_tools, "iron": 1, "coal": 1}, {}, True, True) == (None, None)   # no wood: no NEXT
    assert next_goal({"iron_pickaxe": 1, "wood_sword": 1}, {"diamond": (4, "south-east")}, False, False) == (
        "Mine diamond (face a diamond, Do: the Iron Pickaxe will do)", "Nearest diamond: 4 step(s) south-east")
    assert [repair(a, envs.CRAFTER_ACTIONS) for a in ("place table", "noop", " Move North-East", "move south west",
                                                      "eat cow", "Do", "jump")] == \
        ["Place Table", "Noop", "Move North", "Move South", "eat", "Do", "jump"]


class CrafterAfterNoops(envs.CrafterEnv):
    """Crafter seed 2 reset, then 123 Noops played: a zombie has come within 4 steps, east of the
    player (a real state, reached by playing)."""

    def reset(self, seed=None):
        obs = super().reset(seed)
        for _ in range(123):
            obs, *_ = self.step("Noop")
        return obs


def test_sleep_is_refused_with_a_zombie_within_3_steps(tmp_path):
    """The model asks to sleep each step while a zombie walks up; sleeping anyway (after 2
    refusals) costs 7 health, which the next step's combat and survival blocks report."""
    script = by_step(lambda step: "<|DONE|>", lambda step, body: "<|ACTION|>Sleep<|END|>")
    records = episode(tmp_path, script, steps=4, env=CrafterAfterNoops(seed=2))
    assert "- zombie 4 steps to your east" in records[0]["observation"]
    assert records[0]["plan"]["ended"] == "action" and not said(records[0])         # 4 steps away: sleep
    assert "- zombie 3 steps to your east" in records[1]["observation"]
    refused = ("ACTION REFUSED: Sleeping now is DANGEROUS: a zombie is 3 step(s) away (east). It would attack you in "
               "your sleep, and you could not fight back. Get away from it first, then sleep.\n"
               "Choose a DIFFERENT action and commit it with <|ACTION|>action name<|END|>.")
    assert said(records[1]) == [refused, refused]
    assert records[1]["plan"]["ended"] == "action after 2 rejections" and records[1]["action"]["executed"] == "Sleep"
    assert [len(said(r)) for r in records] == [0, 2, 2, 2]
    assert "- health: 2/9\n- food: 5/9\n- drink: 3/9" in records[3]["observation"]
    blocks = ("=== DANGER: COMBAT ===\nYOU LOST 7 HEALTH last step: now 2/9. Something hostile is attacking you.\n"
              "CRITICAL: zombie 1 step(s) east. RUN NOW: health 2/9, one more hit could kill you.\n\n"
              "=== STAYING ALIVE: URGENT ===\nCRITICAL: health 2/9: you are about to DIE. Get food (a cow, a plant) "
              "or water NOW.\nWARNING: drink 3/9: falling. Find water soon.\n\n")
    assert blocks in first_prompt(records[3], "log")
    plan = first_prompt(records[3], "plan")
    in_order(plan, "WHERE YOU ARE:", "=== STAYING ALIVE: URGENT ===\nCRITICAL: health 2/9",
             "=== DANGER: COMBAT ===\nYOU LOST 7 HEALTH", "=== WHERE YOU ARE IN THE TECH TREE ===",
             "YOUR CURRENT GOALS")


def test_two_model_routes_log_and_consultation_to_the_specialist_and_the_commit_to_the_base(tmp_path):
    """The specialist's committed action is removed before the hand-off (a reply that was only an
    ACTION becomes a placeholder); the base model commits, through the gate."""
    def script(body):
        if body["model"] == "memory-lora":
            return specialist(body)
        return "<|ACTION|>Place Table<|END|>"
    specialist = by_step(lambda step: "<|WRITE|>goals.txt|CURRENT GOAL: wood<|END|><|DONE|>",
                         lambda step, body: "<|ACTION|>Do<|END|>" if step == 0 else
                         "<|SEARCH|>game_knowledge.txt|Place Table<|END|> so <|ACTION|>Place Table<|END|>")
    records = episode(tmp_path, script, steps=2, two_model=True)
    assert {t["role"] for t in records[1]["log"]["turns"]} == {"specialist"}
    for r in records:
        assert [t["role"] for t in r["plan"]["turns"]] == ["specialist", "base", "base", "base"]
        assert said(r)[1:] == [REFUSED_TABLE, REFUSED_TABLE] and r["action"]["raw"] == "Place Table"
    assert turn_input(records[0], 1)[-2:] == [
        {"role": "assistant", "content": "(memory consulted)"},
        {"role": "user", "content": V5.render("handoff", {"results": ""}).strip()}]
    handed = turn_input(records[1], 1)
    assert handed[-2] == {"role": "assistant", "content": "<|SEARCH|>game_knowledge.txt|Place Table<|END|> so"}
    assert handed[-1]["content"].startswith("[SEARCH game_knowledge.txt|Place Table]\n")
    assert handed[-1]["content"].endswith("The memory consultation is over. Commit your action now, as <|ACTION|>"
                                          "action name<|END|>. You may still SEARCH, READ, TAIL or COUNT first.")
    assert goals_shown(records[1]) == "CURRENT GOAL: wood"
