"""A compact v0 for bench/loop2_learns.py: LOG from the second step on (search the notes, record
what the last action did), PLAN (search the notes, commit one action); in two-model mode the
specialist consults first and the base model commits after a hand-off, as in v0. Prompts are
about 200 tokens, so that a LoRA specialist trains on a CPU in minutes."""


def step(ep):
    if ep.step > 0:
        yield from log(ep)
    action = yield from plan(ep)
    return action


def memory_ops(turn):
    return [op for op in turn.ops if op["error"] is None and op["kind"] != "control"]


def log(ep):
    routine = ep.routine("log", ep.data["ops"]["log"])
    routine.say(ep.render("log", step=ep.step, action=ep.previous_action["executed"],
                          observation=ep.observation["text"].strip(), files=ep.file_index().replace("\n", ", ")))
    role = "specialist" if ep.two_model else "base"
    for _ in range(ep.data["limits"]["log_turns"]):
        turn = yield from routine.ask(role)
        if turn.error or turn.done or not memory_ops(turn):
            routine.end("backend_error" if turn.error else "done" if turn.done else "no_ops")
            return
        routine.say(ep.render("log_continue", results=turn.results))
    routine.end("turn_limit")


def plan(ep):
    routine = ep.routine("plan", ep.data["ops"]["plan"])
    routine.say(ep.render("plan", step=ep.step, observation=ep.observation["text"].strip(),
                          files=ep.file_index().replace("\n", ", ")))
    turns = ep.data["limits"]["plan_turns"]
    if ep.two_model:   # the specialist consults; its action is hidden from the base model
        for _ in range(turns):
            turn = yield from routine.ask("specialist")
            if turn.error:
                break
            if turn.action is not None or not memory_ops(turn):
                routine.rewrite_reply(ep.remove_ops(turn.text, "ACTION"))
                routine.say(ep.render("handoff", results=turn.results))
                break
            routine.say(ep.render("plan_continue", results=turn.results))
    for _ in range(turns):
        turn = yield from routine.ask("base")
        if turn.error or turn.action is not None or not memory_ops(turn):
            routine.end("backend_error" if turn.error else "action" if turn.action is not None else "no_ops")
            return turn.action
        routine.say(ep.render("plan_continue", results=turn.results))
    routine.end("turn_limit")
    return None
