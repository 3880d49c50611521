"""Loop #1: a meta-LLM investigates a run's traces and rewrites the scaffold; a gate keeps a
revision only if its paired improvement over the parent is significant.

    python meta_scaffold.py propose --scaffold v0 --run runs/loop1/gate/v0 [--out scaffolds/v1]
        [--meta-model NAME] [--meta-base-url URL] [--log runs/loop1/loop1_log.jsonl]
    python meta_scaffold.py gate --base runs/loop1/gate/v0 --candidate runs/loop1/gate/v1 [--alpha 0.05]
    python meta_scaffold.py gate --power --base runs/loop1/gate/v0    # how many gate episodes?
    python meta_scaffold.py report --log runs/loop1/loop1_log.jsonl --out runs/loop1/report.md

`propose` runs the meta-LLM as a tool-using agent over any OpenAI-compatible chat endpoint
(function calling; key in META_API_KEY, never the agent server's): it lists, reads and greps the
run, reads a trace step by step, field by field, reads the parent scaffold, this project's code
and, in a loop, every earlier version and attempt; it writes only in the new scaffold. With a loop
log it is given the whole lineage (each version's scores, CHANGES.md and analysis) and every
rejected attempt (gate result, analysis, diff). The new scaffold starts as a copy of the parent;
it is kept only once it validates (failures go back to the meta-LLM, for a bounded number of
rounds). The transcript and the meta-LLM's analysis are saved beside the scaffold.

`gate` exits 0 (accept), 1 (reject) or 2 (runs that cannot be compared: other settings than the
scaffold, other or unfinished episodes). It accepts only when a one-sided paired sign-flip test
on the per-seed differences is significant at --alpha.

scripts/loop1.sh chains these with eval.py; its log (`loop-state` reads it) makes it resumable.
A loop folder holds loop1_log.jsonl, gate/<version>/ and report/<version>/ runs, report.md.
"""
import argparse
import ast
import difflib
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import agent as agent_mod
import eval as ev
from scaffolds import STAGING, policy_line

ROOT = Path(__file__).resolve().parent
CODE_FILES = ("agent.py", "memory_fs.py", "envs.py", "eval.py", "README.md")
CODE_ENTRIES = (*CODE_FILES, "docs", "scaffolds", "scripts", "tests")      # all that code/ shows
RESULT_CHARS = 16_000        # any tool result is cut here, with a note of what was cut
FIELD_CHARS = 3_000          # one field of one trace step, when a step is shown whole
LINE_CHARS = 2_000           # read_file cuts longer lines (trace lines: read_steps)
GREP_CHARS = 300             # grep shows this much of a matching line, around the match
MAX_STEPS_SHOWN = 200        # steps per read_steps call
KEEP_RECENT = 6              # tool results never dropped from the context
PYTHON_TIMEOUT = 60          # seconds for one run_python call
CHARS_PER_TOKEN = 3          # a conservative guess (prose and code run 3.5-4): the context budget in characters
REQUEST_TIMEOUT = 600        # seconds for one meta-LLM request, and never past --max-wall
META_RETRIES = 3             # a request the server may answer next time is tried this often again
NO_TOOL_REPLIES = 2          # replies without a tool call (one after a reminder) that find an endpoint without tool calling
VALIDATE_TIMEOUT = 600       # seconds for the smoke episodes, and never past --max-wall


def _tool(name, description, properties, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_S, _I = {"type": "string"}, {"type": "integer"}
TOOLS = [
    _tool("list_files", "List files under a folder (recursively, up to 300).", {"path": _S}, ["path"]),
    _tool("read_file", f"Read lines [offset, offset+limit) of a text file; lines longer than {LINE_CHARS} "
          "characters are cut (read trace lines with read_steps).",
          {"path": _S, "offset": _I, "limit": _I}, ["path"]),
    _tool("grep", f"Lines matching a regular expression in a file or under a folder; a long line is shown "
          f"as {GREP_CHARS} characters around the match.",
          {"pattern": _S, "path": _S, "max_results": _I}, ["pattern", "path"]),
    _tool("read_steps", "Read a trace (ep_<seed>.jsonl or .jsonl.gz) step by step, field by field. One step (end "
          "omitted): every field (or those named), each cut at "
          f"{FIELD_CHARS} characters with a note; one field of one step: up to {RESULT_CHARS} characters "
          "from `offset`. A range of steps: one line per step (action, reward, progression, ops per "
          "routine), or the named fields of each step. Fields: step, observation, action, reward, done, "
          "progression, memory_diff, info, tokens, state, next_state, system, and each routine by name "
          "(log, plan, ...: its turns, responses and ops with results).",
          {"path": _S, "step": _I, "end": _I, "fields": {"type": "array", "items": _S}, "offset": _I},
          ["path", "step"]),
    _tool("write_file", "Create or replace a file inside new/ (the new scaffold).",
          {"path": _S, "content": _S}, ["path", "content"]),
    _tool("finish", "The revision is complete: validate it. `analysis`: what the traces showed and why "
          "this change should help (the next proposals read it).",
          {"analysis": _S}, ["analysis"]),
]
PYTHON_TOOL = _tool(
    "run_python", f"Run a short Python 3 analysis with the run folder as working directory and its output "
    f"(stdout and stderr, cut at {RESULT_CHARS} characters) as the result; {PYTHON_TIMEOUT} s limit. "
    "`import eval; eval.read_trace(path)` parses a trace into step records.", {"code": _S}, ["code"])


# How a scaffold is written: scaffolds/README.md whole, so the meta-LLM reads what users read.
SCAFFOLD_API = (agent_mod.SCAFFOLDS / "README.md").read_text().strip()

META_SYSTEM = """You improve the scaffold of an LLM game agent whose memory is a folder of files.
Each step the agent runs LOG (it records what its previous action did, with memory ops) and PLAN
(it consults memory read-only and commits a game action), as the parent scaffold's policy.py
says. A scaffold is code plus data; this is how one is written:

""" + SCAFFOLD_API + """

Investigate the run with the tools: read and grep the traces (ep_<seed>.jsonl.gz, gzipped when
the episode finished; the tools read them as text. One JSON line per step: observation, per
routine (LOG, PLAN) its conversation and its turns, each with its raw response and ops with
results, action, reward, progression, memory_diff), the final memory folders, the parent scaffold and the agent's code. Find where memory use went wrong (what
was never recorded, searches that came back empty, redundant writes, repeated useless actions) and
revise the scaffold in new/ (it starts as a copy of the parent).

You must preserve: memory operations stay actions the model itself issues in its action space;
LOG records an action's outcome only after the environment's response was observed (PLAN stays
read-only). The revision must change structure (policy.py, ops, memory-file schema, routine
structure), not wording alone. Write CHANGES.md in new/ with your analysis and the method change.
Paths: run/ (the run), parent/ (parent scaffold), code/ (project code), new/ (the new scaffold,
the only place you may write). Call finish when done."""

META_VIEW = f"""How you see things: every tool result is cut at {RESULT_CHARS} characters, with a note
saying what was cut; when the conversation grows long, older tool results are replaced by a
one-line note (call the tool again if you need one). A trace line is one step and too long for
read_file: read it with read_steps, and scan a range of steps with read_steps(path, step, end).
In a loop, two more read-only folders: analyses/ (the run on the analysis seeds of every version
studied so far, analyses/<version>/; the runs that decide and report are on other seeds and never
shown) and versions/ (the scaffold of every version and attempt; beside each, <version>.analysis.md
and <version>.transcript.json). The user message lists the lineage and
every rejected attempt: learn from them, do not repeat a rejected change."""


class ToolError(Exception):
    pass


def keyless_env(home, extra=None):
    """The environment for code the meta-LLM wrote (scaffold validation, run_python): only the
    variables a run needs (paths, locale, thread counts), none that looks like a credential, and
    HOME, the XDG folders and HF_HOME pointed at `home`, a fresh empty folder, so that it finds no
    ~/.netrc or Hugging Face token either. Not a filesystem sandbox: the code still runs with
    your file rights, and the loader's AST checks are the first line of defence."""
    keep = ("PATH", "LANG", "LC_", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "AUTOMEM_",
            "BOXOBAN_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_", "MKL_", "CUDA_VISIBLE_DEVICES")
    secret = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.I)
    env = {k: v for k, v in os.environ.items() if k.startswith(keep) and not secret.search(k)}
    homes = {k: str(Path(home, sub)) for k, sub in [("HOME", "."), ("XDG_CONFIG_HOME", ".config"),
             ("XDG_CACHE_HOME", ".cache"), ("XDG_DATA_HOME", ".local/share"), ("HF_HOME", ".cache/hf")]}
    return {**env, **homes, **(extra or {})}


def cut(text, limit=RESULT_CHARS, hint="narrow the request"):
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[cut: {limit} of {len(text)} characters shown; {hint}]"


def is_trace(path):
    """ep_<seed>.jsonl, or its .gz once the episode finished (read_steps reads both)."""
    return path.name.endswith((".jsonl", ".jsonl.gz"))


class Workspace:
    """The meta-LLM's file view: named roots, writes only under new/, no path escapes."""

    def __init__(self, run, parent, new, analyses=None, versions=None, allow_python=False):
        self.roots = {"run": Path(run).resolve(), "parent": Path(parent).resolve(),
                      "code": ROOT, "new": Path(new).resolve()}
        if analyses:   # a loop's analysis runs only: its gate and report runs stay out of view
            self.roots.update(analyses=Path(analyses).resolve(), versions=Path(versions).resolve())
        self.allow_python = allow_python

    @property
    def tools(self):
        return TOOLS + [PYTHON_TOOL] * self.allow_python

    def resolve(self, path, write=False):
        heads = ", ".join(f"{h}/" for h in self.roots)
        if not isinstance(path, str) or not path.strip():
            raise ToolError("a path is needed, e.g. run/summary.json")
        if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or "\0" in path:
            raise ToolError(f"refused {path!r}: paths start with {heads}")
        head, _, rest = path.strip().partition("/")
        if head not in self.roots:
            raise ToolError(f"refused {path!r}: paths start with {heads}")
        if write and head != "new":
            raise ToolError(f"refused {path!r}: you may write only inside new/")
        root = self.roots[head]
        target = root / rest
        if ".." in Path(rest).parts:
            raise ToolError(f"refused {path!r}: '..' is not allowed")
        # no link anywhere on the way, and the resolved target stays inside its root
        probe = root
        for part in Path(rest).parts:
            probe = probe / part
            if probe.is_symlink():
                raise ToolError(f"refused {path!r}: it goes through a symbolic link")
        real = Path(os.path.realpath(target))
        if real != root and root not in real.parents:
            raise ToolError(f"refused {path!r}: outside {head}/")
        if head == "code" and Path(rest).parts and Path(rest).parts[0] not in CODE_ENTRIES:
            raise ToolError(f"refused {path!r}: code/ shows {', '.join(CODE_FILES)}, docs/, scaffolds/, scripts/, tests/")
        return real

    def files(self, path):
        """The folder path resolves to and the files a listing or grep of it sees: under code/ only
        CODE_ENTRIES, and never a file reached through a link or outside its root (a link planted
        in a run folder must not become a way out)."""
        p = self.resolve(path)
        if p.is_file():
            return p, [p]
        tops = [p / e for e in CODE_ENTRIES] if p == ROOT else [p]
        found = (f for top in tops for f in ([top] if top.is_file() else top.rglob("*")))
        # root and p are resolved, so a file whose real path differs went through a link
        return p, sorted(f for f in found if f.is_file() and "__pycache__" not in f.parts
                         and Path(os.path.realpath(f)) == f)

    def list_files(self, path):
        p, files = self.files(path)
        if p.is_file():
            return path
        files = [str(f.relative_to(p)) for f in files]
        more = f"\n... {len(files) - 300} more" if len(files) > 300 else ""
        return "\n".join(files[:300]) + more or "(empty)"

    def read_file(self, path, offset=0, limit=200):
        p = self.resolve(path)
        if not p.is_file():
            raise ToolError(f"{path} is not a file")
        with ev.open_text(p, errors="replace") as f:
            lines = f.read().splitlines()
        offset, limit = max(0, int(offset or 0)), max(1, min(int(limit or 200), 2000))
        chunk = [line if len(line) <= LINE_CHARS else
                 line[:LINE_CHARS] + f" [line cut: {LINE_CHARS} of {len(line)} characters"
                 + ("; read trace steps with read_steps]" if is_trace(p) else "]")
                 for line in lines[offset:offset + limit]]
        return f"[{path}: lines {offset}-{offset + len(chunk)} of {len(lines)}]\n" + "\n".join(chunk)

    def grep(self, pattern, path, max_results=50):
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ToolError(f"bad pattern: {e}")
        p, files = self.files(path)
        out, max_results = [], max(1, min(int(max_results or 50), 500))
        for f in files:
            with ev.open_text(f, errors="replace") as text:
                lines = text.read().splitlines()
            for i, line in enumerate(lines):
                m = rx.search(line)
                if not m:
                    continue
                if len(line) > GREP_CHARS:
                    a = max(0, m.start() - GREP_CHARS // 3)
                    line = (f"[{len(line)} characters, from {a}] " + ("..." if a else "")
                            + line[a:a + GREP_CHARS] + ("..." if a + GREP_CHARS < len(line) else ""))
                out.append(f"{f.relative_to(p) if f != p else path}:{i}: {line}")
                if len(out) >= max_results:
                    return "\n".join(out) + f"\n[stopped at {max_results} matches]"
        return "\n".join(out) or "(no match)"

    def read_steps(self, path, step, end=None, fields=None, offset=0):
        p = self.resolve(path)
        if not p.is_file() or not is_trace(p):
            raise ToolError(f"{path} is not a trace (an ep_<seed>.jsonl or .jsonl.gz file)")
        first, last = int(step), int(step if end is None else end)
        if first < 0 or last < first:
            raise ToolError("need 0 <= step <= end")
        note = ""
        if last - first >= MAX_STEPS_SHOWN:
            last = first + MAX_STEPS_SHOWN - 1
            note = f"\n[only steps {first}-{last} shown: {MAX_STEPS_SHOWN} per call]"
        records, total = [], 0
        for i, record in enumerate(ev.iter_trace(p)):
            total = i + 1
            if first <= i:
                records.append(record)
            if i >= last:
                break
        if not records:
            raise ToolError(f"{path} has no step {first} ({total} steps)")
        fields = list(fields) if fields else None
        if "system" in (fields or []):
            system = next((m["content"] for r in records for _, routine in ev.routines(r)
                           for m in routine["messages"] if m["role"] == "system"), None)
            records[0]["system"] = system if system is not None else "(no system prompt in these steps)"
        if len(records) == 1:
            return render_step(records[0], fields, offset) + note
        if not fields:
            return "\n".join(step_line(r) for r in records) + note
        per = max(200, RESULT_CHARS // (len(records) * len(fields)))
        return "\n\n".join(render_step(r, fields, cap=per) for r in records) + note

    def write_file(self, path, content):
        p = self.resolve(path, write=True)
        if p.is_dir():
            raise ToolError(f"{path} is a folder")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, p)
        return f"wrote {path} ({len(content)} characters)"

    def run_python(self, code):
        """LLM-written code: a subprocess with a time limit, no credentials in its environment."""
        if not self.allow_python:
            raise ToolError("run_python is not enabled (propose --allow-python)")
        try:
            with tempfile.TemporaryDirectory(prefix="automem_home_") as home:
                r = subprocess.run([sys.executable, "-c", code], cwd=self.roots["run"], capture_output=True, text=True,
                                   timeout=PYTHON_TIMEOUT, env=keyless_env(home, {"PYTHONPATH": str(ROOT)}))
        except subprocess.TimeoutExpired:
            raise ToolError(f"stopped after {PYTHON_TIMEOUT} s: make the analysis shorter")
        return f"[exit {r.returncode}]\n{r.stdout}" + (f"\n[stderr]\n{r.stderr}" if r.stderr else "")

    def call(self, name, args):
        if name not in ("list_files", "read_file", "grep", "read_steps", "write_file", "run_python"):
            raise ToolError(f"unknown tool {name!r}")
        return cut(getattr(self, name)(**args))


def step_line(record):
    """One step in a line: what a range view shows."""
    a = record.get("action") or {}
    ops = "; ".join(f"{name}: " + (", ".join(o["op"] + ("!" if o.get("error") else "")
                                              + (f"({','.join(o['flags'])})" if o.get("flags") else "")
                                              for o in ev.routine_ops(routine)) or "-")
                    for name, routine in ev.routines(record))
    return (f"step {record.get('step')}: action {a.get('raw')!r} -> {a.get('executed')}"
            f"{'' if a.get('valid', True) else ' (invalid)'}, reward {record.get('reward', 0):+.2f}, "
            f"progression {record.get('progression', 0):.3f} | {ops}")


def render_routine(routine):
    """Turn by turn: the messages its input added (the system prompt named, not shown), the raw
    response, its ops and, when the policy rewrote the reply, what the next turn was shown."""
    def said(m):
        return f"{m['role']}: " + ("[the system prompt: field 'system']" if m["role"] == "system" else m["content"])
    messages, shown = routine["messages"], 0
    lines = [f"ended: {routine.get('ended')}"]
    for k, turn in enumerate(routine["turns"]):
        lines.append(f"-- turn {k} ({turn.get('role', 'base')})")
        lines += [said(m) for m in messages[shown:turn["input_messages"]]]
        shown = turn["input_messages"]
        lines.append(f"response: {turn.get('response')}")
        for o in turn.get("ops", []):
            extra = f" error: {o['error']}" if o.get("error") else f" -> {o.get('result')!r}"
            lines.append(f"op {o['op']}({' | '.join(map(str, o.get('args', [])))}){extra}"
                         + (f" flags {o['flags']}" if o.get("flags") else ""))
        if not turn.get("error") and shown < len(messages):   # the reply joined the conversation
            if messages[shown]["content"] != turn.get("response"):
                lines.append(f"rewritten as: {messages[shown]['content']}")
            shown += 1
    lines += [said(m) for m in messages[shown:]]
    return "\n".join(lines)


def render_step(record, fields=None, offset=0, cap=FIELD_CHARS):
    """One step, field by field. One field alone is shown up to RESULT_CHARS from `offset`."""
    routine_names = [name for name, _ in ev.routines(record)]
    order = ["step", "action", "reward", "done", "progression", "observation", *routine_names, "memory_diff"]
    names = fields or order + [k for k in record if k not in order]
    unknown = [n for n in names if n not in record]
    if unknown:
        raise ToolError(f"step {record.get('step')} has no field {unknown[0]!r}; it has: {', '.join(record)}")
    single = fields is not None and len(fields) == 1
    out = []
    for name in names:
        value = record[name]
        text = (render_routine(value) if name in routine_names else
                value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        if single:
            text, limit = text[int(offset or 0):], RESULT_CHARS - 200
            shown = cut(text, limit, f"offset={int(offset or 0) + limit} shows more")
        else:
            shown = cut(text, cap, f"read_steps(path, {record.get('step')}, fields=['{name}']) shows it whole")
        out.append(f"## {name}\n{shown}" if "\n" in shown or len(shown) > 80 else f"## {name}: {shown}")
    return f"[step {record.get('step')}]\n" + "\n".join(out)


def fit_context(messages, budget):
    """Keep the conversation under `budget` characters: the oldest tool results (all but the last
    KEEP_RECENT) become a one-line note, then the file contents of older write_file calls. The
    transcript keeps everything; this changes only what is sent."""
    def size():
        return sum(len(json.dumps(m, ensure_ascii=False)) for m in messages)
    if size() <= budget:
        return
    calls = {c["id"]: c["function"] for m in messages if m.get("tool_calls") for c in m["tool_calls"]}
    tool_idx = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    for i in tool_idx[:-KEEP_RECENT]:
        m = messages[i]
        if m["content"].startswith("[dropped"):
            continue
        fn = calls.get(m.get("tool_call_id"), {"name": "?", "arguments": ""})
        first = m["content"].split("\n", 1)[0][:120]
        messages[i] = {**m, "content": f"[dropped to fit the context: {fn['name']}({fn['arguments'][:160]}) "
                                       f"gave {len(m['content'])} characters, starting {first!r}; call "
                                       "it again if you need it]"}
        if size() <= budget:
            return
    asst = [i for i, m in enumerate(messages) if m.get("tool_calls")]
    for i in asst[:-KEEP_RECENT]:
        calls_i = []
        for c in messages[i]["tool_calls"]:
            fn = c["function"]
            if fn["name"] == "write_file" and len(fn["arguments"]) > 300:
                try:
                    path = json.loads(fn["arguments"]).get("path")
                except json.JSONDecodeError:
                    path = "?"
                fn = {**fn, "arguments": json.dumps({"path": path, "content": "[written earlier: read "
                                                     "the file to see it]"})}
            calls_i.append({**c, "function": fn})
        messages[i] = {**messages[i], "tool_calls": calls_i}
        if size() <= budget:
            return



# ---------------------------------------------------------------------------------------------
# The run's digest
# ---------------------------------------------------------------------------------------------

def longest_streak(records):
    best = cur = 0
    for r in records:
        cur = cur + 1 if r.get("next_state") is not None and r.get("next_state") == r.get("state") else 0
        best = max(best, cur)
    return best


def digest(run):
    """What the meta-LLM reads first: scores, behaviour, per-episode facts, and where things are."""
    run = Path(run)
    episodes = []

    def describe(env_name, task, seed, records, s):
        trace, _, memory = ev.episode_paths(run, env_name, task, seed)
        trace = ev.trace_file(trace)
        ops = {}
        for r in records:
            for phase, routine in ev.routines(r):
                for op in ev.routine_ops(routine):
                    key = f"{phase}:{op['op']}" + (":error" if op.get("error") else "")
                    ops[key] = ops.get(key, 0) + 1
        rewards = [f"{r['step']}:{r['reward']:+.2f}" for r in records if r["reward"] > 0][:15]
        episodes.append(f"- run/{trace.relative_to(run)} (memory: run/{memory.relative_to(run)}/): progression "
                        f"{s['progression']:.3f}, {s['steps']} steps, {s['counts']['invalid_actions']} invalid, "
                        f"streak {longest_streak(records)}, end {s['end_status']}, rewards at {rewards}, ops {ops}")

    summary = ev.summarize(run, on_episode=describe)
    lines = [f"Run {run.name}: model {summary.get('model')}, scaffold {summary.get('scaffold')}, "
             f"agent {summary.get('agent')}."]
    for env_name, e in summary["envs"].items():
        p = e["progression_pct"]
        lines.append(f"{env_name}: progression {p['mean']:.2f} ± {p['stderr']:.2f} % over {p['n']} episodes; "
                     f"behaviour {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in e['behaviour'].items()})}")
    lines.append("\nEpisodes (path in run/, progression, steps, invalid actions, longest unchanged-state "
                 "streak, reward events, ops by phase):")
    return "\n".join(lines + episodes)


# ---------------------------------------------------------------------------------------------
# The loop's log: where it stands, the lineage and the rejected attempts
# ---------------------------------------------------------------------------------------------

def read_log(path):
    """The loop's events in order; a line cut by a kill mid-write is skipped."""
    events = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def append_event(path, event):
    """One event, one write on an O_APPEND file; after a line cut by a kill, a new line first."""
    line = json.dumps({**event, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, ensure_ascii=False) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def loop_state(events, attempts):
    """Where a loop stands after its logged events: the best version, the chain of accepted
    versions, the next (iteration, attempt), and a candidate already proposed for it whose
    evaluation or gate did not finish (a restart evaluates it instead of proposing again)."""
    start = next((e for e in events if e["event"] == "start"), None)
    if start is None:
        raise ValueError("the log has no start event")
    chain, iteration, attempt, pending = [start["scaffold"]], 1, 1, None
    for e in events:
        if e["event"] == "proposed":
            pending = e["candidate"]
        elif e["event"] in ("gated", "invalid"):
            pending = None
            if e.get("accept"):
                chain.append(e["candidate"])
            done = e.get("accept") or e["attempt"] >= attempts
            iteration, attempt = (e["iteration"] + 1, 1) if done else (e["iteration"], e["attempt"] + 1)
    if pending and not Path(pending).is_dir():
        pending = None
    return {"best": chain[-1], "chain": chain, "iteration": iteration, "attempt": attempt, "pending": pending}


def analysis_path(scaffold):
    return Path(f"{scaffold}.analysis.md")


def _text(path, limit, where):
    p = Path(path)
    return cut(p.read_text(errors="replace").strip(), limit, f"read {where}") if p.is_file() else "(none)"


def scaffold_diff(a, b):
    """Unified diff of every text file of two scaffold folders."""
    rels = sorted({str(p.relative_to(d)) for d in (a, b) for p in Path(d).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts})
    out = []
    for rel in rels:
        old, new = ((Path(d) / rel).read_text(errors="replace").splitlines(keepends=True)
                    if (Path(d) / rel).is_file() else [] for d in (a, b))
        out += difflib.unified_diff(old, new, f"{Path(a).name}/{rel}", f"{Path(b).name}/{rel}")
    return "".join(out) or "(no difference)"


def gate_line(e):
    return (f"gate {e['candidate_mean_pct']:.2f} % vs its parent's {e['base_mean_pct']:.2f} % on {e['n']} "
            f"paired episodes: difference {e['mean_diff_pct']:+.2f} points, one-sided p = "
            f"{e['p_value']:.4f} (alpha {e['alpha']:g})")


def history_text(log):
    """The whole loop so far, for the next proposal: every accepted version (scores, CHANGES.md,
    analysis) and every rejected attempt (gate result or validation problem, analysis, diff)."""
    events = read_log(log)
    chain = loop_state(events, attempts=1)["chain"]
    gated = [e for e in events if e["event"] == "gated"]
    accepted = {e["candidate"]: e for e in gated if e["accept"]}
    base_score = {e["parent"]: e["base_mean_pct"] for e in gated}
    parts = ["# The loop so far", "## Lineage: the accepted versions, oldest first (the last is your parent)"]
    for s in chain:
        name = Path(s).name
        if s in accepted:
            score = f"parent {Path(accepted[s]['parent']).name}; {gate_line(accepted[s])}"
        else:
            score = "the starting scaffold" + (f"; gate {base_score[s]:.2f} %" if s in base_score else "")
        parts.append(f"### {name}: {score}\nCHANGES.md:\n{_text(Path(s) / 'CHANGES.md', 3000, f'versions/{name}/CHANGES.md')}"
                     f"\nAnalysis:\n{_text(analysis_path(s), 2000, f'versions/{name}.analysis.md')}")
    rejected = [e for e in events if (e["event"] == "gated" and not e["accept"]) or e["event"] == "invalid"]
    parts.append(f"## Rejected attempts ({len(rejected)}), oldest first")
    for e in rejected:
        name, parent = Path(e["candidate"]).name, Path(e["parent"]).name
        head = f"### {name} (iteration {e['iteration']}, attempt {e['attempt']}, parent {parent}): "
        analysis = f"Analysis:\n{_text(analysis_path(e['candidate']), 2000, f'versions/{name}.analysis.md')}"
        if e["event"] == "invalid":
            parts.append(head + f"not valid: {e['problem']}\n" + analysis)
            continue
        diff = cut(scaffold_diff(e["parent"], e["candidate"]), 3000, f"read versions/{name}/ for the rest")
        parts.append(head + f"rejected by the {gate_line(e)}.\n"
                     f"{analysis}\nDiff against its parent:\n{diff}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def structure(folder):
    """What makes a scaffold's structure: its policy code (comments and docstrings aside), the
    ops each routine may use, which prompt templates exist, and the initial memory files. Not
    limits, fallbacks or a prompt's wording."""
    folder = Path(folder)
    try:
        tree = ast.parse((folder / "policy.py").read_text())
    except (OSError, SyntaxError, ValueError):
        tree = None
    for node in ast.walk(tree) if tree else []:
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    try:
        config = json.loads((folder / "scaffold.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    return {"policy.py": tree and ast.dump(tree), "ops": config.get("ops"),
            "initial_files": config.get("initial_files"),
            "prompts": sorted(p.name for p in (folder / "prompts").glob("*.txt")),
            "memory": {str(p.relative_to(folder)): p.read_text(errors="replace")
                       for p in sorted((folder / "memory").rglob("*")) if p.is_file()}}


def structural_change(parent_dir, new_dir):
    """The parts of the structure a revision changed (empty: wording or limits only)."""
    a, b = structure(parent_dir), structure(new_dir)
    return [k for k in a if a[k] != b[k]]


SMOKE_STEPS = 12              # per game, at most: every routine that lists ops must run by then
SMOKE_ARGS = {"READ": ["smoke.txt"], "SEARCH": ["smoke.txt", "line"], "TAIL": ["smoke.txt", "2"],
              "COUNT": ["smoke.txt", "line"], "APPEND": ["smoke.txt", "a line"],
              "WRITE": ["smoke.txt", "a first line"], "CREATE": ["smoke_new.txt"],
              "UPSERT": ["smoke.txt", "key", "value"], "DELETE": ["smoke_new.txt"]}


class SmokeStop(Exception):
    """Ends a smoke episode early: with a problem, or None once every op has been called."""


class SmokeModel:
    """The scripted model of the smoke episodes, in process: every reply calls each op the
    scaffold lists (placeholder arguments), commits `actions` in turn and ends with DONE. A
    routine runs the ops it allows and refuses the others, so each routine that runs calls all of
    its ops. Like a backend without a specialist, it answers a specialist turn with an error."""

    batched = True     # run_episodes hands it each round's requests together

    def __init__(self, listed, arity):
        self.calls = [f"<|{op}|>" + "|".join(SMOKE_ARGS.get(op, ["smoke"] * arity[op])) + ("<|END|>" if arity[op] else "")
                      for op in listed if op not in ("ACTION", "DONE")]
        self.actions, self.turns = (), itertools.count()

    def reply(self):
        action = self.actions[next(self.turns) % 2]
        return "\n".join(self.calls + [f"<|ACTION|>{action}<|END|>", "<|DONE|>"])

    def generate(self, requests):
        return [agent_mod.Reply(self.reply(), finish_reason="stop") if r.role == "base"
                else agent_mod.Reply("", error="no specialist model configured") for r in requests]


def smoke(scaffold_dir, games):
    """Load a scaffold (the checker) and play up to SMOKE_STEPS steps of each (env, task) with a
    scripted model that calls every op the scaffold lists in each routine, committing a valid
    and an invalid action in turn. None, or what went wrong. Runs LLM-written code: call it in
    a process without credentials (`validate`)."""
    import envs
    from memory_fs import ARITY
    try:
        scaffold = agent_mod.load_scaffold(scaffold_dir)
    except agent_mod.ScaffoldError as e:
        return f"the scaffold does not load: {e}"
    arity = {**ARITY, **{op: spec["arity"] for op, spec in scaffold.module().get("OPS", {}).items()}}
    wanted = {(routine, op) for routine, ops in scaffold.config["ops"].items() for op in ops}
    listed = sorted({op for _, op in wanted})
    called, model = set(), SmokeModel(listed, arity)
    with tempfile.TemporaryDirectory() as tmp:
        for env_name, task in games:
            env = envs.make_env(env_name, task, seed=0)
            model.actions = (env.default_action, "not an action")
            agent = agent_mod.make_agent("memory", env, scaffold, Path(tmp) / env_name)
            steps = []

            def on_step(record):
                json.dumps(record)   # a trace line must serialise
                for name, routine in ev.routines(record):
                    for op in ev.routine_ops(routine):
                        if str(op.get("result")).startswith(f"error: {op['op']} failed: "):
                            raise SmokeStop(f"op {op['op']} failed in routine {name!r} at step {record['step']} "
                                            f"of the smoke episode on {task or env_name}: {op['result'][7:]}")
                        if op.get("error") is None:
                            called.add((name, op["op"]))
                steps.append(record["step"])
                if wanted <= called and len(steps) >= 2:
                    raise SmokeStop(None)
            try:
                result = agent_mod.run_episodes([agent_mod.play(env, agent, 0, on_step, SMOKE_STEPS)], model)[0]
                if isinstance(result, agent_mod.Unfinished):
                    raise result.error   # what ended the episode, for the handlers below
            except SmokeStop as stop:
                if stop.args[0]:
                    return stop.args[0]
            except Exception as e:
                line = policy_line(e, scaffold.path / "policy.py")
                where = f"policy.py:{line}: " if line else ""
                return (f"the smoke episode on {task or env_name} failed at step {len(steps)}: "
                        f"{where}{type(e).__name__}: {e}")
            finally:
                agent.close()
    missing = sorted(wanted - called)
    if missing:
        return ("these ops were never called in the smoke episodes (a scripted model offers every "
                f"op in every turn, up to {SMOKE_STEPS} steps of {', '.join(t or e for e, t in games)}): "
                + ", ".join(f"{op} in routine {r!r}" for r, op in missing)
                + ". scaffold.json's ops are keyed by routine name, and each routine must run within "
                  f"the first {SMOKE_STEPS} steps")
    return None


def validate(new_dir, parent_dir, games, timeout=VALIDATE_TIMEOUT):
    """None if the revision may be kept, else what is wrong (it goes back to the meta-LLM). The
    code it wrote is loaded and run only in a subprocess whose environment holds no credentials."""
    changed = structural_change(parent_dir, new_dir)
    if not changed:
        return ("the revision changes wording or limits only: change structure too (policy.py, "
                "the ops of a routine, prompt templates, memory files)")
    changes = [Path(d, "CHANGES.md").read_text() if Path(d, "CHANGES.md").exists() else "" for d in (new_dir, parent_dir)]
    if not changes[0].strip() or changes[0] == changes[1]:
        return "write new/CHANGES.md: your analysis of the run and the method change"
    try:
        with tempfile.TemporaryDirectory(prefix="automem_home_") as home:
            # cwd and HOME in a scratch folder: the scaffold's code starts where nothing of yours lies;
            # it is a copy under the name it will have, as a staging folder is no scaffold
            copy = shutil.copytree(new_dir, Path(home, "scaffold", Path(new_dir).name.removesuffix(STAGING)),
                                   symlinks=True)
            r = subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "validate",
                                str(copy), *(f"{e}:{t}" for e, t in games)], cwd=home,
                               capture_output=True, text=True, timeout=timeout, env=keyless_env(home))
    except subprocess.TimeoutExpired:
        return f"the validation did not finish in {timeout:.0f} s (a policy that loops forever, or --max-wall)"
    if r.returncode == 0:
        return None
    return r.stdout.strip() or f"the validation process failed:\n{r.stderr[-1500:]}"


# ---------------------------------------------------------------------------------------------
# propose
# ---------------------------------------------------------------------------------------------

def next_version(scaffolds=agent_mod.SCAFFOLDS):
    """The next vN free both in `scaffolds` and in the project's scaffolds/. A transcript or
    analysis (vN.*) reserves its number too: an attempt that left no scaffold keeps its record."""
    names = [d.name for folder in {Path(scaffolds), agent_mod.SCAFFOLDS} if folder.is_dir()
             for d in folder.iterdir()]
    nums = [int(m.group(1)) for n in names if (m := re.fullmatch(r"v(\d+)(\..*)?", n))]
    return f"v{max(nums, default=-1) + 1}"


def stamp_lineage(folder, parent, version):
    """scaffold.json always records its parent and version, whatever the meta-LLM wrote."""
    path = Path(folder) / "scaffold.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # validation reports it
    if isinstance(config, dict):
        config.update(parent=parent, version=version)
        path.write_text(json.dumps(config, indent=2) + "\n")


class MetaLLMError(Exception):
    """The endpoint cannot serve this proposal; the message is one line, in the server's words."""


def context_length(client, model):
    """The model's context in tokens where the server lists it (vLLM's /v1/models gives
    max_model_len), else None."""
    import openai
    try:
        listed = {m.id: m for m in client.models.list()}
    except (openai.APIError, ValueError, AttributeError):
        return None
    extra = getattr(listed.get(model), "model_extra", None) or {}
    n = extra.get("max_model_len") or extra.get("context_length")
    return int(n) if isinstance(n, int) and n > 0 else None


def meta_request(client, deadline, **request):
    """One chat request within --max-wall: each try may take at most the seconds left before
    `deadline`, and a failure the server may not repeat (a dropped connection, 429, 5xx) is tried
    again, META_RETRIES times at most, while time is left. None once the time is out; any other
    failure raises the client's error."""
    import openai
    for attempt in range(META_RETRIES + 1):
        left = deadline - time.time()
        if left <= 0:
            return None
        try:
            timeout = agent_mod.request_timeout(min(REQUEST_TIMEOUT, left))
            return client.with_options(timeout=timeout).chat.completions.create(**request)
        except openai.APIError as e:
            if time.time() >= deadline:       # cut by the deadline
                return None
            if not agent_mod.retryable(e) or attempt == META_RETRIES:
                raise
            time.sleep(min(2 ** attempt, max(0.0, deadline - time.time())))


def failure_line(client, model, e):
    """A failed meta-LLM request in one line with the server's words, and what helps, if anything."""
    line = str(agent_mod.meta_failure(client, model, e))
    if agent_mod.context_length_rejection(e):
        return line + " (the conversation is over the model's context: lower --context-tokens)"
    return line + (" (it may answer later: rerun then)" if agent_mod.retryable(e) else "")


def run_meta_agent(client, model, messages, ws, budget, transcript):
    """The tool loop, until the meta-LLM calls finish ("finish", its analysis) or a budget runs
    out ("budget" / "stopped", None). An endpoint that fails, or that never calls a tool, raises
    MetaLLMError: that is no attempt of the meta-LLM's and must not be recorded as one."""
    import openai
    reminded = False
    while True:
        r = None
        if budget["tool_calls"] > 0 and budget["tokens"] > 0:
            fit_context(messages, budget["context_chars"])
            try:
                r = meta_request(client, budget["deadline"], model=model, messages=messages, tools=ws.tools,
                                 max_completion_tokens=budget["reply_tokens"])
            except openai.APIError as e:
                transcript.append({"event": "meta-LLM error", "error": failure_line(client, model, e)})
                raise MetaLLMError(transcript[-1]["error"])
        if r is None:
            transcript.append({"event": "budget exhausted", "budget": dict(budget)})
            return "budget", None
        if r.usage:
            budget["tokens"] -= r.usage.total_tokens
        msg = r.choices[0].message
        # a turn of tool calls carries content null, not "" (some proxies reject an empty string)
        entry = {"role": "assistant", "content": msg.content or (None if msg.tool_calls else "")}
        if msg.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in msg.tool_calls]
        messages.append(entry)
        transcript.append(entry)
        replies = [e for e in transcript if e.get("role") == "assistant"]
        if len(replies) >= NO_TOOL_REPLIES and not any(e.get("tool_calls") for e in replies):
            transcript.append({"event": "meta-LLM error", "error": (
                f"the meta-LLM {model} at {str(client.base_url).rstrip('/')} answered {len(replies)} requests "
                "that offered tools without calling one: the endpoint does not do tool calling (vLLM does when "
                "started with --enable-auto-tool-choice --tool-call-parser <parser>, e.g. hermes for Qwen2.5)")})
            raise MetaLLMError(transcript[-1]["error"])
        if not msg.tool_calls:
            if reminded:
                return "stopped", None
            reminded = True
            note = {"role": "user", "content": "Use the tools to investigate and write new/, then call finish."}
            messages.append(note)
            transcript.append(note)
            continue
        analysis = None
        for call in msg.tool_calls:
            budget["tool_calls"] -= 1
            try:
                args = json.loads(call.function.arguments or "{}")
                if call.function.name == "finish":
                    analysis, result = str(args.get("analysis") or ""), "validating your revision"
                else:
                    result = ws.call(call.function.name, args)
            except ToolError as e:
                result = f"error: {e}"
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                result = f"error: bad arguments for {call.function.name}: {e}"
            reply = {"role": "tool", "tool_call_id": call.id, "content": result}
            messages.append(reply)
            transcript.append(reply)
        if analysis is not None:
            return "finish", analysis


def opening_problem(messages, tools, context, source, reply_tokens):
    """Why the opening prompt cannot be sent (one line), or None; `context`: the model's tokens."""
    size = sum(len(json.dumps(m, ensure_ascii=False)) for m in [*messages, *tools])
    room = (context - reply_tokens) * CHARS_PER_TOKEN
    if size <= room:
        return None
    return (f"the opening prompt (instructions, tools, the run's digest and the loop's history: about "
            f"{size // CHARS_PER_TOKEN:,} tokens) does not fit the meta-LLM's context of {context:,} tokens "
            f"({source}) less --meta-max-tokens {reply_tokens:,}: use a model with a longer context")


def claim_staging(staging):
    """An open file holding this process's lock on `staging` (the lock dies with the process),
    after removing every other staging folder beside it that no live proposal holds: a killed
    proposal (SIGKILL runs no clean-up) leaves one behind, and the next one clears it."""
    held = None
    staging.parent.mkdir(parents=True, exist_ok=True)
    for folder in sorted({*staging.parent.glob("*" + STAGING), staging}):
        lock = open(f"{folder}.lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:    # a live proposal's
            lock.close()
            if folder == staging:
                raise RuntimeError(f"another proposal is writing {staging.name} now") from None
            continue
        if folder == staging:
            held = lock
        else:
            shutil.rmtree(folder, ignore_errors=True)
            Path(f"{folder}.lock").unlink(missing_ok=True)
            lock.close()
    return held


def release_staging(staging, lock):
    shutil.rmtree(staging, ignore_errors=True)     # a kept revision was moved to its name already
    Path(f"{staging}.lock").unlink(missing_ok=True)
    lock.close()


def propose(args):
    deadline = time.time() + args.max_wall
    parent = agent_mod.load_scaffold(args.scaffold)
    run = Path(args.run)
    games = sorted({(e, t) for e, t, _ in ev.planned_episodes(settings(run))})
    out = (Path(args.out) if args.out else agent_mod.SCAFFOLDS / next_version()).resolve()
    staging = out.with_name(out.name + STAGING)
    client = agent_mod.meta_client(args.meta_base_url, max_retries=0)   # meta_request retries
    try:   # the checks too end by --max-wall
        agent_mod.require_models(client, args.meta_base_url, [args.meta_model], "--meta-model",
                                 min(60, deadline - time.time()), key_var="META_API_KEY")
    except agent_mod.EndpointError as e:
        print(f"meta_scaffold.py: the meta-LLM {args.meta_model}: {e}; nothing recorded", file=sys.stderr)
        return 3
    left = agent_mod.request_timeout(max(deadline - time.time(), 0.1))
    context = context_length(client.with_options(timeout=left), args.meta_model)
    source = "as the server reports it" if context else "--context-tokens"
    context = context or args.context_tokens
    log = Path(args.log).resolve() if args.log else None
    ws = Workspace(run, parent.path, staging, analyses=log and log.parent / "analysis", versions=out.parent,
                   allow_python=args.allow_python)
    user = f"Digest of the run:\n{digest(run)}"
    if log:
        user += "\n\n" + history_text(log)
    messages = [{"role": "system", "content": META_SYSTEM + "\n\n" + META_VIEW}, {"role": "user", "content": user}]
    if problem := opening_problem(messages, ws.tools, context, source, args.meta_max_tokens):
        print(f"meta_scaffold.py: {problem}; nothing recorded", file=sys.stderr)
        return 2
    transcript = [{"event": "start", "parent": parent.name, "run": str(run), "out": str(out),
                   "context_tokens": context, "context_from": source}, *messages]
    budget = {"tool_calls": args.max_tool_calls, "tokens": args.max_tokens, "reply_tokens": args.meta_max_tokens,
              "context_chars": (context - args.meta_max_tokens) * CHARS_PER_TOKEN
                               - len(json.dumps(ws.tools, ensure_ascii=False)),
              "deadline": deadline}
    record = log and args.iteration is not None
    slot = {"iteration": args.iteration, "attempt": args.attempt, "parent": str(parent.path.resolve()),
            "candidate": str(out)}
    problem, analysis = "no attempt made", None
    lock = claim_staging(staging)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(parent.path, staging, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    stamp_lineage(staging, parent.name, out.name)
    try:
        for rnd in range(1, args.rounds + 1):
            try:
                status, said = run_meta_agent(client, args.meta_model, messages, ws, budget, transcript)
            except MetaLLMError as e:
                print(f"meta_scaffold.py: {e}; nothing recorded", file=sys.stderr)
                return 3
            analysis = said or analysis
            stamp_lineage(staging, parent.name, out.name)  # the meta-LLM may have rewritten the file
            left = budget["deadline"] - time.time()
            problem = (validate(staging, parent.path, games, min(VALIDATE_TIMEOUT, left)) if left > 0 else
                       f"--max-wall {args.max_wall:g} s ran out before a valid revision")
            transcript.append({"event": "validation", "round": rnd, "status": status, "problem": problem})
            if problem is None:
                os.replace(staging, out)
                if record:
                    append_event(log, {"event": "proposed", **slot})
                print(f"kept {out} (parent {parent.name}) after {rnd} validation round(s)")
                return 0
            print(f"round {rnd}: {problem.splitlines()[0]}", file=sys.stderr)
            note = {"role": "user", "content": f"Validation failed, the revision is not kept yet:\n{problem}\n"
                                               "Fix it in new/ and call finish again."}
            messages.append(note)
            transcript.append(note)
            if left <= 0:
                break
        if record:
            append_event(log, {"event": "invalid", **slot, "problem": problem.splitlines()[0]})
        print(f"meta_scaffold.py: no valid revision after {rnd} validation round(s): "
              f"{problem.splitlines()[0]}", file=sys.stderr)
        return 1
    except BaseException as e:     # Ctrl-C, SIGTERM (main turns it into SystemExit)
        transcript.append({"event": "stopped", "by": type(e).__name__})
        raise
    finally:
        release_staging(staging, lock)
        out.with_name(out.name + ".transcript.json").write_text(json.dumps(transcript, indent=1, ensure_ascii=False))
        if analysis:
            analysis_path(out).write_text(analysis.strip() + "\n")


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------

# config.json keys in which a base and a candidate may differ: the scaffold, and facts about how
# a run went rather than what it measured (throughput, the code's commit and package
# versions: a loop may commit its scaffolds between runs). Every other key must be equal.
GATE_FREE = ("scaffold", "scaffold_path", "scaffold_hash", "concurrency", "git_commit", "versions", "command")
TEST = "one-sided paired sign-flip test"


def settings(run):
    return json.loads((Path(run) / "config.json").read_text())


def _short(value):
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def not_comparable(base, cand):
    """Why two runs cannot be compared episode by episode (one line), or None."""
    if problem := ev.not_a_run([base, cand]):
        return problem
    a, b = settings(base), settings(cand)
    for key in sorted(set(a) | set(b)):
        if key not in GATE_FREE and a.get(key) != b.get(key):
            return f"the runs differ in {key} ({_short(a.get(key))} vs {_short(b.get(key))}): only the scaffold may differ"
    return unfinished(base) or unfinished(cand)


def unfinished(run):
    missing = sorted(set(ev.planned_episodes(settings(run))) - set(ev.finished_episodes(run)))
    if missing:
        return (f"{run} has {len(missing)} unfinished episode(s) (e.g. {'/'.join(map(str, missing[0]))}): "
                "finish it with eval.py --resume")
    return None


def progressions(run):
    """(env, task, seed) -> final progression of every finished episode, from its result file."""
    return {key: json.loads(ev.episode_paths(run, *key)[1].read_text())["progression"]
            for key in ev.finished_episodes(run)}


def describe_test(n, flips=100_000):
    return (f"{TEST}, " +
            (f"exact over all 2^{n} sign patterns" if n <= ev.EXACT_UP_TO else f"{flips:,} random sign patterns"))


def gate(args):
    base, cand = Path(args.base), Path(args.candidate)
    if problem := not_comparable(base, cand):
        print(f"meta_scaffold.py gate: {problem}", file=sys.stderr)
        return 2
    a, b = progressions(base), progressions(cand)
    keys = sorted(a)
    diffs = np.array([100 * (b[k] - a[k]) for k in keys])
    p = float(ev.sign_flip_p(diffs)[0])
    accept = p <= args.alpha
    mean_a, mean_b = 100 * np.mean([a[k] for k in keys]), 100 * np.mean([b[k] for k in keys])
    se = diffs.std(ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    print(f"{'env':<10}{'task':<32}{'seed':>6}{'base %':>9}{'cand %':>9}{'diff':>8}")
    for k, d in zip(keys, diffs):
        print(f"{k[0]:<10}{k[1]:<32}{k[2]:>6}{100 * a[k]:>9.2f}{100 * b[k]:>9.2f}{d:>+8.2f}")
    print(f"mean progression: base {mean_a:.2f} %, candidate {mean_b:.2f} %; paired difference "
          f"{diffs.mean():+.2f} ± {se:.2f} points (mean ± s.e., {len(diffs)} pairs)")
    print(f"{describe_test(len(diffs))}: p = {p:.4f} {'<=' if accept else '>'} alpha {args.alpha:g} -> "
          f"{'ACCEPT' if accept else 'REJECT'}")
    decision = {"accept": accept, "p_value": p, "alpha": args.alpha, "test": describe_test(len(diffs)),
                "base_run": str(base), "candidate_run": str(cand), "base_mean_pct": mean_a, "candidate_mean_pct": mean_b,
                "mean_diff_pct": float(diffs.mean()), "n": len(diffs),
                "per_seed": [{"env": k[0], "task": k[1], "seed": k[2], "base": a[k], "candidate": b[k]}
                             for k in keys]}
    ev.write_json(Path(args.out) if args.out else cand / "gate.json", decision)
    if args.log and args.iteration is not None:
        append_event(args.log, {"event": "gated", "iteration": args.iteration, "attempt": args.attempt,
                                "parent": str(Path(settings(base)["scaffold_path"]).resolve()),
                                "candidate": str(Path(settings(cand)["scaffold_path"]).resolve()),
                                **{k: v for k, v in decision.items() if k != "per_seed"}})
    return 0 if accept else 1


def power(args):
    """How often the gate accepts, simulated from a run's own per-episode variance: under no
    change (its false-accept rate) and for true gains of 2, 5 and 10 points."""
    base = Path(args.base)
    if problem := ev.not_a_run([base]) or unfinished(base):
        print(f"meta_scaffold.py gate --power: {problem}", file=sys.stderr)
        return 2
    a = progressions(base)
    by_task = {}
    for (env_name, task, _), v in a.items():
        by_task.setdefault((env_name, task), []).append(100 * v)
    resid = np.concatenate([np.asarray(v) - np.mean(v) for v in by_task.values()])
    sd = np.sqrt((resid ** 2).sum() / max(1, len(resid) - len(by_task)))
    if args.candidate:
        if problem := not_comparable(base, Path(args.candidate)):
            print(f"meta_scaffold.py gate --power: {problem}", file=sys.stderr)
            return 2
        b = progressions(Path(args.candidate))
        d = np.array([100 * (b[k] - a[k]) for k in sorted(a)])
        null, source = d - d.mean(), f"the centred paired differences of {base} and {args.candidate}"
    else:
        null = np.array([x - y for v in by_task.values() for x, y in itertools.permutations(v, 2)])
        source = ("differences of two episodes of the same task in this run (independent draws: "
                  "no benefit from pairing assumed, so conservative when seeds pair well)")
    if len(null) == 0:
        print("meta_scaffold.py gate --power: need at least two episodes of a task", file=sys.stderr)
        return 2
    print(f"{base}: {len(a)} episodes, per-episode SD {sd:.2f} points (within task); null paired "
          f"differences: {source}, SD {null.std():.2f} points.")
    print(f"Gate: {TEST} at alpha {args.alpha:g}; {args.sims} simulated gates per cell.")
    rng = np.random.default_rng(args.seed)
    gains = (0, 2, 5, 10)
    print(f"{'gate episodes':>14}{'false accept':>14}" + "".join(f"{f'P(accept +{g})':>15}" for g in gains[1:])
          + f"{'mean higher':>13}")
    for n in sorted(set(args.episodes) | {len(a)}):   # this run's own size too
        draws = rng.choice(null, size=(args.sims, n))
        rates = [float(np.mean(ev.sign_flip_p(draws + g, flips=2000, seed=args.seed) <= args.alpha)) for g in gains]
        higher = float(np.mean(draws.mean(1) > 0))
        print(f"{n:>14}{rates[0]:>14.3f}" + "".join(f"{r:>15.3f}" for r in rates[1:]) + f"{higher:>13.3f}")
    print("(mean higher: the authors' rule, accept whenever the candidate's mean is higher; its false-accept rate)")
    return 0


# ---------------------------------------------------------------------------------------------
# The loop's bookkeeping (scripts/loop1.sh) and its final report
# ---------------------------------------------------------------------------------------------

def seed_ranges(seeds):
    """[100, 101, 102, 105] -> '100-102,105', as the loop's log records them."""
    return ev.seed_ranges(seeds, sep=",")


SEED_CLASHES = {("gate", "report"): "the gate would select on the seeds it reports",
                ("analysis", "gate"): "a revision would be gated on seeds whose traces the meta-LLM studied",
                ("analysis", "report"): "the meta-LLM would study the seeds that are reported"}


def seed_clash(gate, report, analysis=()):
    """What is wrong with a loop's seeds, or None. Analysis seeds (the meta-LLM studies their
    traces), gate seeds (revisions are decided on them) and report seeds share none, and none
    meets loop #2's training seeds (a trained model would be judged on episodes it learned from)."""
    seeds = {"analysis": set(analysis), "gate": set(gate), "report": set(report)}
    for (a, b), why in SEED_CLASHES.items():
        if overlap := sorted(seeds[a] & seeds[b]):
            return f"{a} seeds and {b} seeds overlap ({seed_ranges(overlap)}): {why}"
    if trained := sorted(s for s in set().union(*seeds.values()) if s >= ev.TRAIN_SEEDS_START):
        return (f"seeds {seed_ranges(trained)} are loop #2's training seeds ({ev.TRAIN_SEEDS_START} and up): "
                f"analysis, gate and report seeds stay below {ev.TRAIN_SEEDS_START}")
    return None


def judged_seeds_shown(log, run):
    """Why the meta-LLM may not study `run` in this loop (it holds episodes on the loop's gate or
    report seeds: a revision would be judged on seeds whose traces it was shown), or None."""
    began = next((e for e in read_log(log) if e["event"] == "start"), {})
    judged = {s for key in ("gate_seeds", "report_seeds") if began.get(key) for s in ev.parse_seeds(began[key])}
    if shown := sorted(judged & set(settings(run)["seeds"])):
        return (f"{run} holds episodes on the loop's gate or report seeds ({seed_ranges(shown)}): the meta-LLM "
                f"studies runs on its analysis seeds ({began.get('analysis_seeds')})")
    return None


def cmd_loop_state(args):
    """Begin the log if new; check it belongs to this loop; print the state as shell assignments."""
    log = Path(args.log)
    try:
        start = str(agent_mod.load_scaffold(args.start).path.resolve())
        clash = seed_clash(ev.parse_seeds(args.gate_seeds), ev.parse_seeds(args.report_seeds),
                           ev.parse_seeds(args.analysis_seeds))
    except (agent_mod.ScaffoldError, ev.UsageError) as e:
        return f"{e}"
    if clash:
        return clash
    # the protocol the loop began with: a restart with other values would change it silently
    protocol = {"scaffold": start, "analysis_seeds": seed_ranges(ev.parse_seeds(args.analysis_seeds)),
                "gate_seeds": seed_ranges(ev.parse_seeds(args.gate_seeds)),
                "report_seeds": seed_ranges(ev.parse_seeds(args.report_seeds)), "attempts": args.attempts,
                **dict(kv.partition("=")[::2] for kv in args.setting)}
    events = read_log(log)
    if not events:
        log.parent.mkdir(parents=True, exist_ok=True)
        append_event(log, {"event": "start", **protocol})
        events = read_log(log)
    began = next((e for e in events if e["event"] == "start"), {})
    if changed := [k for k in {*protocol, *began} - {"event", "time"} if began.get(k) != protocol.get(k)]:
        k = sorted(changed)[0]
        return (f"{log} is a loop that began with {k}={began.get(k)}, not {protocol.get(k)}: rerun it with "
                "the settings it began with, or use another RUNS folder")
    state = loop_state(events, args.attempts)
    print(f"best={shlex.quote(state['best'])}")
    print(f"iteration={state['iteration']}")
    print(f"attempt={state['attempt']}")
    print(f"pending={shlex.quote(state['pending'] or '')}")
    print("chain=(" + " ".join(shlex.quote(s) for s in state["chain"]) + ")")
    return None


def _cell(p):
    return "-" if not p or p["mean"] is None else f"{p['mean']:.2f} ± {p['stderr']:.2f} ({p['n']})"


def loop_alpha_line(events, alphas):
    """The false-accept rate of the whole loop, not only of one attempt: a union bound over every
    attempt it may make, beside what bench/gate_bench.py measures."""
    began = next((e for e in events if e["event"] == "start"), {})
    attempts = int(began.get("attempts") or 1)
    iterations = int(began.get("iterations") or max((e.get("iteration") or 1 for e in events), default=1))
    if not alphas:
        return "No revision reached the gate."
    a = max(alphas)
    return (f"False accepts: at most {a:g} per attempt, {a * attempts:g} per iteration ({attempts} attempts), "
            f"and over the loop's {iterations} iterations at most {min(1, a * attempts * iterations):g} chance "
            "of keeping at least one revision that changes nothing (a union bound; bench/gate_bench.py "
            "measures 0.12 of loops for 5 x 3 at 0.05 / 3 on 30 gate seeds).")


def loop_report(log):
    """report.md of a finished loop: every accepted version's gate numbers (the seeds it was
    chosen on) beside its report numbers (seeds evaluated once, after the loop), with the model."""
    log = Path(log)
    folder, events = log.parent, read_log(log)
    state = loop_state(events, attempts=1)
    runs = []
    for s in state["chain"]:
        gate_run, report_run = folder / "gate" / Path(s).name, folder / "report" / Path(s).name
        for run in (gate_run, report_run):
            if problem := ev.not_a_run([run]) or unfinished(run):
                raise ev.UsageError(problem)
        runs.append((s, gate_run, report_run))
    g0, r0 = settings(runs[0][1]), settings(runs[0][2])
    analysis_seeds = ev.parse_seeds(next(e for e in events if e["event"] == "start")["analysis_seeds"])
    if clash := seed_clash(g0["seeds"], r0["seeds"], analysis_seeds):
        raise ev.UsageError(clash)
    studied = sorted(p.parent.name for p in (folder / "analysis").glob("*/config.json"))
    gated = [e for e in events if e["event"] == "gated"]
    accepted = {e["candidate"]: e for e in gated if e["accept"]}
    alphas = sorted({e["alpha"] for e in gated})
    lines = [f"# Loop #1: {g0['env']}, model {g0['model']}", "",
             f"Analysis seeds {seed_ranges(analysis_seeds)}: the meta-LLM studied the traces of runs on these seeds "
             f"only, one per version it revised ({', '.join(studied) or 'none'}: analysis/<version>/); it was shown "
             "no trace of the gate or report runs, only each gate's result (means, difference, p).",
             f"Gate seeds {seed_ranges(g0['seeds'])} ({len(ev.planned_episodes(g0))} episodes per version): every "
             f"decision was taken on them ({TEST}, alpha {', '.join(f'{a:g}' for a in alphas) or '-'} "
             "per attempt), so their numbers are biased upward by selection.",
             loop_alpha_line(events, alphas),
             f"Report seeds {seed_ranges(r0['seeds'])} ({len(ev.planned_episodes(r0))} episodes per version): "
             "evaluated once, after the loop, for the accepted versions only. These are the numbers to report.",
             f"Attempts: {sum(e['event'] in ('gated', 'invalid') for e in events)} "
             f"({len(accepted)} accepted, {sum(not e['accept'] for e in gated)} rejected by the gate, "
             f"{sum(e['event'] == 'invalid' for e in events)} not valid).", "", *stage_costs(folder), ""]
    summaries = [(s, ev.summarize(g), ev.summarize(r)) for s, g, r in runs]
    for env_name in summaries[0][1]["envs"]:
        lines += [f"## {env_name} (progression %, mean ± s.e. (episodes), {g0['model']})", "",
                  "| version | parent | gate seeds | gate: paired difference vs parent, p | report seeds |",
                  "| --- | --- | --- | --- | --- |"]
        for s, gs, rs in summaries:
            e = accepted.get(s)
            step = f"{e['mean_diff_pct']:+.2f} points, p = {e['p_value']:.4f}" if e else "-"
            lines.append(f"| {Path(s).name} | {Path(e['parent']).name if e else '-'} | "
                         f"{_cell(gs['envs'].get(env_name, {}).get('progression_pct'))} | {step} | "
                         f"{_cell(rs['envs'].get(env_name, {}).get('progression_pct'))} |")
        lines.append("")
    return "\n".join(lines)


def stage_costs(folder):
    """What the agent's model was asked for in each stage of a loop, over all its runs."""
    lines = ["| stage | runs | episodes | LLM calls | prompt tokens | completion tokens | tokens per step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage in ("analysis", "gate", "report"):
        summaries = [ev.summarize(p.parent) for p in sorted((folder / stage).glob("*/config.json"))]
        costs = [s["cost"] for s in summaries if s.get("cost")]
        total = {k: sum(c[k] for c in costs) for k in ("llm_calls", "prompt_tokens", "completion_tokens", "steps")}
        episodes = sum(e["progression_pct"]["n"] for s in summaries for e in s["envs"].values())
        per_step = ev._ratio(total["prompt_tokens"] + total["completion_tokens"], total["steps"])
        lines.append(f"| {stage} | {len(summaries)} | {episodes} | {total['llm_calls']:,} | {total['prompt_tokens']:,} | "
                     f"{total['completion_tokens']:,} | {ev._fmt(per_step)} |")
    return lines


def cmd_report(args):
    try:
        text = loop_report(args.log)
    except (ev.UsageError, ValueError) as e:
        return str(e)
    Path(args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return None


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("propose", help="write scaffolds/vN from a run")
    pp.add_argument("--scaffold", required=True)
    pp.add_argument("--run", required=True)
    pp.add_argument("--out", default=None, help="default: the next free scaffolds/vN")
    pp.add_argument("--meta-model", default=os.environ.get("META_MODEL", "gpt-5"))
    pp.add_argument("--meta-base-url", default=os.environ.get("META_BASE_URL"),
                    help="OpenAI-compatible endpoint with tool calling (key: META_API_KEY)")
    pp.add_argument("--log", default=None, help="the loop's log: its lineage and rejected attempts are "
                                                "given to the meta-LLM, and with --iteration the outcome is appended")
    pp.add_argument("--iteration", type=int, default=None)
    pp.add_argument("--attempt", type=int, default=None)
    pp.add_argument("--rounds", type=int, default=3, help="validation rounds: failures go back to the meta-LLM")
    pp.add_argument("--allow-python", action="store_true",
                    help="give the meta-LLM run_python (a subprocess, time limit, no credentials in its "
                         "environment, but the user's file rights: opt in)")
    pp.add_argument("--max-tool-calls", type=int, default=200)
    pp.add_argument("--max-tokens", type=int, default=3_000_000)
    pp.add_argument("--meta-max-tokens", type=int, default=16_384, help="the longest reply of one meta-LLM request")
    pp.add_argument("--context-tokens", type=int, default=128_000,
                    help="the meta-LLM's context when the server does not report it (vLLM's /v1/models does): "
                         "older tool results are dropped to keep the conversation within it")
    pp.add_argument("--max-wall", type=float, default=3600,
                    help="seconds for the whole proposal, requests and validation included")
    pg = sub.add_parser("gate", help="accept a candidate run only if its paired improvement is significant")
    pg.add_argument("--base", required=True)
    pg.add_argument("--candidate", default=None)
    pg.add_argument("--alpha", type=float, default=0.05, help="level of the one-sided test")
    pg.add_argument("--out", default=None, help="decision JSON (default: <candidate>/gate.json)")
    pg.add_argument("--log", default=None, help="append the decision to this loop log (with --iteration)")
    pg.add_argument("--iteration", type=int, default=None)
    pg.add_argument("--attempt", type=int, default=None)
    pg.add_argument("--power", action="store_true",
                    help="simulate the gate from --base's own variance (and --candidate's pairing, if given)")
    pg.add_argument("--episodes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20, 30, 50],
                    help="gate sizes for --power, e.g. 10,20,30")
    pg.add_argument("--sims", type=int, default=2000)
    pg.add_argument("--seed", type=int, default=0)
    pn = sub.add_parser("next-version", help="print the next free scaffold version name")
    pn.add_argument("--dir", default=str(agent_mod.SCAFFOLDS))
    pv = sub.add_parser("validate", help="load a scaffold and run the smoke episodes (run it without credentials)")
    pv.add_argument("scaffold")
    pv.add_argument("games", nargs="+", help="env:task pairs, e.g. crafter:default")
    ps = sub.add_parser("loop-state", help="scripts/loop1.sh: begin or read the loop's log, print its state")
    ps.add_argument("--log", required=True)
    ps.add_argument("--start", required=True)
    ps.add_argument("--attempts", type=int, required=True)
    ps.add_argument("--analysis-seeds", required=True, help="the meta-LLM studies runs on these")
    ps.add_argument("--gate-seeds", required=True)
    ps.add_argument("--report-seeds", required=True)
    ps.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="another part of the loop's protocol (alpha, iterations, model, ...), checked on restart")
    pr = sub.add_parser("report", help="the loop's report: gate and report numbers of each accepted version")
    pr.add_argument("--log", required=True)
    pr.add_argument("--out", required=True)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "gate":
        if not 0 < args.alpha < 1:
            p.exit(2, "meta_scaffold.py: error: --alpha must be in (0, 1)\n")
        if args.power:
            return power(args)
        if not args.candidate:
            p.exit(2, "meta_scaffold.py: error: gate needs --candidate (or --power)\n")
        return gate(args)
    if args.command == "validate":
        problem = smoke(args.scaffold, [tuple(g.split(":", 1)) for g in args.games])
        print(problem or f"{args.scaffold}: valid")
        return 1 if problem else 0
    if args.command == "next-version":
        print(next_version(args.dir))
        return 0
    if args.command in ("loop-state", "report"):
        problem = (cmd_loop_state if args.command == "loop-state" else cmd_report)(args)
        if problem:
            p.exit(2, f"meta_scaffold.py {args.command}: error: {problem}\n")
        return 0
    try:
        agent_mod.load_scaffold(args.scaffold)
    except agent_mod.ScaffoldError as e:
        p.exit(2, f"meta_scaffold.py: error: {e}\n")
    if problem := ev.not_a_run([args.run]):
        p.exit(2, f"meta_scaffold.py: error: {problem}\n")
    if args.out and Path(args.out).exists():
        p.exit(2, f"meta_scaffold.py: error: {args.out} exists already; choose another --out\n")
    if not args.meta_base_url:
        p.exit(2, "meta_scaffold.py: error: --meta-base-url (or META_BASE_URL) is needed: an "
                  "OpenAI-compatible endpoint serving --meta-model with tool calling\n")
    if (args.iteration is None) != (args.attempt is None) or (args.iteration is not None and not args.log):
        p.exit(2, "meta_scaffold.py: error: --iteration and --attempt go together, with --log\n")
    if args.log and (problem := judged_seeds_shown(args.log, args.run)):
        p.exit(2, f"meta_scaffold.py: error: {problem}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a killed proposal cleans up as Ctrl-C does
    return propose(args)


if __name__ == "__main__":
    sys.exit(main())
