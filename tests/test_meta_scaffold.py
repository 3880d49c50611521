"""meta_scaffold.py and scripts/loop1.sh with a scripted meta-LLM that makes real tool calls."""
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import agent
import eval as ev
import meta_scaffold as ms
from scripted_server import ScriptedServer

ROOT = Path(ms.__file__).resolve().parent
V0 = agent.SCAFFOLDS / "v0"

# v1 as the meta-LLM writes it: the parent's policy.py plus code that computes, from the
# observation, where the nearest tree is and puts it into the PLAN prompt (a new template).
V1_POLICY_TAIL = '''


TREE = re.compile(r"- tree (\\d+) steps? to your ([a-z-]+)")
v0_plan = plan


def nearest_tree(obs):
    """Where the nearest tree is, read from the observation by code."""
    if "You face tree" in obs:
        return "in front of you"
    found = TREE.search(obs)
    return f"{found.group(1)} steps to your {found.group(2)}" if found else "not in sight"


def plan(ep, obs, analysis):
    """v1: PLAN is told where the nearest tree is."""
    return (yield from v0_plan(ep, ep.render("target", where=nearest_tree(obs)) + "\\n" + obs, analysis))
'''
V1_TARGET = "TARGET: the nearest tree is {where}.\n"
MOVES = {"north": "Move North", "south": "Move South", "west": "Move West", "east": "Move East"}


def tree_seeker(body):
    """The agent's model over HTTP: LOG ends at once; in PLAN it walks to the tree the prompt
    names and collects wood, and with no such line it waits. Only a policy that computes the
    target makes it better."""
    first = next(m["content"] for m in body["messages"] if m["role"] == "user")
    if first.startswith("MEMORY UPDATE"):
        return "<|DONE|>"
    target = re.search(r"TARGET: the nearest tree is (in front of you|\d+ steps to your ([a-z]+))", first)
    if not target:
        return "<|ACTION|>Noop<|END|>"
    return f"<|ACTION|>{'Do' if target.group(2) is None else MOVES[target.group(2)]}<|END|>"


def call(name, **arguments):
    return {"role": "assistant", "content": "",
            "tool_calls": [{"id": f"call_{name}_{len(json.dumps(arguments))}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def tree_revision(parent=V0):
    return [
        call("read_steps", path="run/crafter/default/ep_100.jsonl.gz", step=1),
        call("read_file", path="parent/policy.py"),
        call("write_file", path="new/policy.py", content=(parent / "policy.py").read_text() + V1_POLICY_TAIL),
        call("write_file", path="new/prompts/target.txt", content=V1_TARGET),
        call("write_file", path="new/CHANGES.md",
             content="# v1\nAnalysis: the agent never found a tree.\nChange: PLAN is told where the nearest tree is.\n"),
        call("finish", analysis="The agent waited where it was: it never read the map for trees."),
    ]


def neutral_revision(k):
    """A structural change that does not change play: a new initial memory file."""
    return [call("write_file", path="new/memory/crafter/goals.txt", content=f"goal {k}: wood\n"),
            call("write_file", path="new/CHANGES.md", content=f"# attempt {k}\nA goals file.\n"),
            call("finish", analysis=f"Goals were not written down (attempt {k}).")]


class MetaScript:
    """Plays a list of tool calls; after a failed validation switches to `repair`."""

    def __init__(self, first, repair=None):
        self.first, self.repair, self.seen = first, repair, []

    def __call__(self, body):
        self.seen.append(body)
        assert {t["function"]["name"] for t in body["tools"]} >= {"read_steps", "write_file", "finish"}
        msgs = body["messages"]
        failed = [i for i, m in enumerate(msgs) if m["role"] == "user" and "Validation failed" in m["content"]]
        plan = self.first if not failed else (self.repair or self.first)
        since = msgs[failed[-1] + 1:] if failed else msgs
        done = sum(1 for m in since if m["role"] == "assistant")
        return plan[min(done, len(plan) - 1)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A v0 run on the real game, played by the tree seeker over HTTP."""
    out = tmp_path_factory.mktemp("runs") / "v0"
    with ScriptedServer(tree_seeker) as server:
        r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--env", "crafter", "--seeds", "100-101",
                            "--max-steps", "3", "--base-url", server.url, "--model", "scripted", "--out", str(out)],
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def propose(server, base_run, out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "propose", "--scaffold", "v0",
                           "--run", str(base_run), "--out", str(out), "--meta-base-url", server.url,
                           "--meta-model", "scripted", *extra], capture_output=True, text=True, timeout=900)


def test_a_broken_op_handler_fails_validation_and_is_fed_back(tmp_path, base_run):
    """The smoke episode's scripted model calls every op of every routine: a new op whose handler
    raises fails validation; the meta-LLM is told which op, where and why, and repairs it."""
    policy = (V0 / "policy.py").read_text()
    cfg = json.loads((V0 / "scaffold.json").read_text())
    cfg["ops"]["log"].insert(-1, "NOTE")
    op = ('\n\ndef note(ep, text):\n    """NOTE|text: one line in notes.txt."""\n    ep.append("notes.txt", {})\n'
          '    return "noted"\n\n\nOPS = {{"NOTE": {{"handler": note, "arity": 1, "kind": "write"}}}}\n')
    broken = [call("write_file", path="new/policy.py", content=policy + op.format("text + 1")),
              call("write_file", path="new/scaffold.json", content=json.dumps(cfg, indent=1)),
              call("write_file", path="new/CHANGES.md", content="# v1\nA NOTE op.\n"),
              call("finish", analysis="nothing was noted")]
    fixed = [call("write_file", path="new/policy.py", content=policy + op.format("text")),
             call("finish", analysis="nothing was noted; the handler is fixed")]
    script = MetaScript(broken, repair=fixed)
    with ScriptedServer(script) as server:
        r = propose(server, base_run, tmp_path / "v1")
    assert r.returncode == 0, r.stderr[-3000:]
    feedback = [m["content"] for m in script.seen[-1]["messages"]
                if m["role"] == "user" and "Validation failed" in m["content"]]
    assert len(feedback) == 1, feedback
    assert "op NOTE failed in routine 'log' at step 1 of the smoke episode on default" in feedback[0]
    assert "TypeError: can only concatenate str" in feedback[0]
    assert "NOTE" in agent.load_scaffold(tmp_path / "v1").config["ops"]["log"]
    assert (tmp_path / "v1.analysis.md").read_text() == "nothing was noted; the handler is fixed\n"
    sent = [m for m in script.seen[-1]["messages"] if m["role"] == "assistant"]
    assert sent and all(m["content"] is None and m["tool_calls"] for m in sent)   # not "": proxies refuse it


HOSTILE = [  # what a policy tries, what the checker says
    ("import os\nKEY = os.environ.get('OPENAI_API_KEY')\n", "policy.py:1: import of 'os' is not allowed"),
    ("def setup(ep):\n    open('/tmp/automem_escape.txt', 'w').write('x')\n", "policy.py:2: the name 'open' is not allowed"),
    ("def setup(ep):\n    ep._agent._env.progression = 1.0\n", "policy.py:2: assigning or deleting .progression is not allowed"),
]


def test_hostile_scaffolds_are_refused_before_any_episode(tmp_path, base_run, monkeypatch):
    """Reading an API key, writing outside the sandbox, patching the game to report 100 %: each is
    refused by the checker when the validation subprocess loads the scaffold, before a step runs."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    policy = (V0 / "policy.py").read_text()
    rounds = [[call("write_file", path="new/policy.py", content=code + policy),
               call("write_file", path="new/CHANGES.md", content=f"# v1\nround {k}\n"),
               call("finish", analysis=f"round {k}")] for k, (code, _) in enumerate(HOSTILE)]

    def script(body):
        msgs = body["messages"]
        k = sum(1 for m in msgs if m["role"] == "user" and "Validation failed" in m["content"])
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        return rounds[k][min(sum(1 for m in msgs[last_user:] if m["role"] == "assistant"), 2)]
    with ScriptedServer(script) as server:
        r = propose(server, base_run, tmp_path / "v1", "--rounds", "3")
    assert r.returncode == 1 and "no valid revision after 3 validation round(s)" in r.stderr
    lines = r.stderr.splitlines()
    for k, (_, why) in enumerate(HOSTILE, 1):
        assert lines[k - 1].startswith(f"round {k}: the scaffold does not load: scaffold v1: {why}"), lines
    assert "smoke episode" not in r.stderr and not Path("/tmp/automem_escape.txt").exists()
    assert not (tmp_path / "v1").exists()
    env = ms.keyless_env(tmp_path / "home")                                         # what validation runs with
    assert "OPENAI_API_KEY" not in env and "PATH" in env and env["HOME"] == str(tmp_path / "home")


def test_wording_or_limits_only_revisions_are_refused(tmp_path, base_run):
    cfg = json.loads((V0 / "scaffold.json").read_text())
    cfg["limits"]["plan_turns"] = 3
    plan = [call("write_file", path="new/prompts/plan.txt",
                 content="Just act well.\n" + (V0 / "prompts/plan.txt").read_text()),
            call("write_file", path="new/scaffold.json", content=json.dumps(cfg)),
            call("write_file", path="new/CHANGES.md", content="reworded"), call("finish", analysis="x")]
    with ScriptedServer(MetaScript(plan)) as server:
        r = propose(server, base_run, tmp_path / "v1", "--rounds", "1")
    assert r.returncode == 1 and "changes wording or limits only" in r.stderr
    v1 = shutil.copytree(V0, tmp_path / "same")
    (v1 / "policy.py").write_text((V0 / "policy.py").read_text().replace('"""', '"""Reworded. ', 1) + "# a note\n")
    assert ms.structural_change(V0, v1) == []               # docstrings and comments are wording
    (v1 / "policy.py").write_text((V0 / "policy.py").read_text() + V1_POLICY_TAIL)
    (v1 / "prompts" / "target.txt").write_text(V1_TARGET)
    assert ms.structural_change(V0, v1) == ["policy.py", "prompts"]


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def test_an_endpoint_without_tool_calling_stops_after_two_replies(tmp_path, base_run):
    """It answers in prose although tools are offered: two requests (the second after a reminder),
    then one line that says so and how vLLM switches tool calling on; every request carries
    --meta-max-tokens; nothing is recorded, and no staging folder stays."""
    with ScriptedServer(lambda body: "I would look at the traces first.") as server:
        r = propose(server, base_run, tmp_path / "v1", "--meta-max-tokens", "123")
    assert r.returncode == 3
    assert one_error_line(r) == (
        f"meta_scaffold.py: the meta-LLM scripted at {server.url} answered 2 requests that offered tools without "
        "calling one: the endpoint does not do tool calling (vLLM does when started with --enable-auto-tool-choice "
        "--tool-call-parser <parser>, e.g. hermes for Qwen2.5); nothing recorded")
    chats = [b for b in server.requests if b.get("tools")]
    assert len(chats) == 2 and all(b["max_completion_tokens"] == 123 for b in chats)
    transcript = json.loads((tmp_path / "v1.transcript.json").read_text())
    assert transcript[-1]["event"] == "meta-LLM error" and "without calling one" in transcript[-1]["error"]
    assert sorted(os.listdir(tmp_path)) == ["v1.transcript.json"]


@pytest.mark.parametrize("fault,said,advice", [
    ("context_length", "HTTP 400: 'max_tokens' or 'max_completion_tokens' is too large", "lower --context-tokens"),
    (500, "HTTP 500: scripted failure 500", "it may answer later: rerun then"),
    (422, "HTTP 422: scripted failure 422", None),
])
def test_a_failing_meta_llm_is_named_in_the_servers_words(tmp_path, base_run, fault, said, advice):
    """Terminal and transcript carry the server's status and message; a 5xx is tried again
    (3 times) and may pass on a rerun; a 400 for the context or a 422 is refused as sent, and
    nothing says a rerun helps."""
    with ScriptedServer(lambda body: fault) as server:
        r = propose(server, base_run, tmp_path / "v1")
    line = one_error_line(r)
    assert r.returncode == 3 and line.startswith(f"meta_scaffold.py: the meta-LLM scripted at {server.url} failed: {said}")
    assert (advice in line) if advice else ("rerun" not in line and "(" not in line.split(said)[1])
    assert len([b for b in server.requests if b.get("tools")]) == (4 if fault == 500 else 1)
    assert said in json.loads((tmp_path / "v1.transcript.json").read_text())[-1]["error"]
    assert not (tmp_path / "v1.staging").exists()


def test_the_context_budget_and_an_opening_prompt_over_it(tmp_path, base_run):
    """The model's context comes from the server where it lists it (vLLM's max_model_len), else
    from --context-tokens; an opening prompt over it is refused in one line, before any request."""
    with ScriptedServer(lambda body: "prose") as server:
        r = propose(server, base_run, tmp_path / "v1", "--context-tokens", "3000")
        assert not [b for b in server.requests if b.get("tools")]
    assert r.returncode == 2 and re.fullmatch(
        r"meta_scaffold.py: the opening prompt \(instructions, tools, the run's digest and the loop's history: about "
        r"[\d,]+ tokens\) does not fit the meta-LLM's context of 3,000 tokens \(--context-tokens\) less "
        r"--meta-max-tokens 16,384: use a model with a longer context; nothing recorded", one_error_line(r))
    assert not list(tmp_path.iterdir())

    class Listed:
        def __init__(self, extra):
            self.model_extra = extra
            self.id = "m"

    class Client:
        def __init__(self, extra):
            self.models = type("Models", (), {"list": lambda _: [Listed(extra)]})()
    assert ms.context_length(Client({"max_model_len": 32768}), "m") == 32768
    assert ms.context_length(Client({}), "m") is None and ms.context_length(Client({}), "other") is None


def test_max_wall_bounds_every_request_and_the_whole_proposal(tmp_path, base_run):
    """A meta-LLM that takes 60 s per answer under --max-wall 4: the request is cut when the time
    is out, and the proposal ends as an attempt that ran out of time."""
    with ScriptedServer(lambda body: "slow", delay=60) as server:
        t0 = time.time()
        r = propose(server, base_run, tmp_path / "v1", "--max-wall", "4")
        took = time.time() - t0
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "meta_scaffold.py: no valid revision after 1 validation round(s): --max-wall 4 s ran out before a valid revision")
    assert took < 40, took     # the process's start and imports, and 4 s
    assert not (tmp_path / "v1.staging").exists()


def test_max_wall_bounds_the_endpoint_check_too(tmp_path, base_run):
    """An endpoint that takes connections and never answers, under --max-wall 4: the model check
    gives up with the time (it allowed itself 60 s), one line, nothing recorded."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        t0 = time.time()
        r = subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "propose", "--scaffold", "v0", "--run",
                            str(base_run), "--out", str(tmp_path / "v1"), "--meta-base-url",
                            f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "--meta-model", "m", "--max-wall", "4"],
                           capture_output=True, text=True, timeout=120)
        took = time.time() - t0
    assert r.returncode == 3 and one_error_line(r).endswith("(APITimeoutError: Request timed out. (ReadTimeout: timed "
                                                            "out)); nothing recorded")
    assert took < 40, took     # the process's start and imports, and 4 s
    assert not list(tmp_path.iterdir())


def test_a_stopped_proposal_leaves_no_staging_and_a_staging_folder_is_no_scaffold(tmp_path, base_run):
    with ScriptedServer(lambda body: "slow", delay=60) as server:
        p = subprocess.Popen([sys.executable, str(ROOT / "meta_scaffold.py"), "propose", "--scaffold", "v0", "--run",
                              str(base_run), "--out", str(tmp_path / "v1"), "--meta-base-url", server.url,
                              "--meta-model", "scripted"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not [b for b in server.requests if b.get("tools")] and time.time() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "v1.staging").is_dir()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
    assert not (tmp_path / "v1.staging").exists()
    assert json.loads((tmp_path / "v1.transcript.json").read_text())[-1] == {"event": "stopped", "by": "SystemExit"}
    staged = shutil.copytree(V0, tmp_path / "v2.staging")
    with pytest.raises(agent.ScaffoldError, match="v2.staging is a revision that meta_scaffold.py propose is writing"):
        agent.load_scaffold(staged)


def test_a_stopped_or_wrong_meta_endpoint_is_refused_before_anything(tmp_path, base_run):
    with ScriptedServer(lambda body: "x", models=("meta",)) as server:
        r = propose(server, base_run, tmp_path / "v1")
    assert r.returncode == 3 and one_error_line(r) == (
        f"meta_scaffold.py: the meta-LLM scripted: {server.url} does not serve scripted (it serves: meta); check "
        "--meta-model; nothing recorded")
    r = subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "propose", "--scaffold", "v0", "--run",
                        str(base_run), "--out", str(tmp_path / "v1"), "--meta-base-url", "http://127.0.0.1:9/v1",
                        "--meta-model", "m"], capture_output=True, text=True)
    assert r.returncode == 3 and one_error_line(r).startswith(
        "meta_scaffold.py: the meta-LLM m: cannot reach http://127.0.0.1:9/v1 (APIConnectionError: Connection error. (")
    assert not list(tmp_path.iterdir())


def test_writes_outside_the_new_scaffold_are_refused(tmp_path, base_run):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    parent = shutil.copytree(V0, tmp_path / "parent")
    os.symlink(outside, parent / "prompts" / "link.txt")
    new = shutil.copytree(parent, tmp_path / "new", symlinks=True)    # as propose stages it
    ws = ms.Workspace(base_run, parent, new)
    for name, args in [("write_file", {"path": "../evil.txt", "content": "x"}),
                       ("write_file", {"path": "/tmp/abs_evil.txt", "content": "x"}),
                       ("write_file", {"path": "new/../../evil.txt", "content": "x"}),
                       ("write_file", {"path": "parent/prompts/plan.txt", "content": "x"}),
                       ("write_file", {"path": "run/summary.json", "content": "x"}),
                       ("write_file", {"path": "new/prompts/link.txt", "content": "overwritten"}),
                       ("read_file", {"path": "code/../../../etc/passwd"}),
                       ("read_file", {"path": "new/prompts/link.txt"})]:
        with pytest.raises(ms.ToolError, match="^refused"):
            ws.call(name, args)
    assert outside.read_text() == "keep me"
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/tmp/abs_evil.txt").exists()
    assert (parent / "prompts" / "plan.txt").read_text() == (V0 / "prompts" / "plan.txt").read_text()


# ---------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------

STEP = 100 / 22                 # one Crafter achievement, in progression points
GATE_SEEDS = list(range(100, 130))


def crafter_noise(rng, level):
    """Progressions as the paper's runs vary: about 7 points per episode around each seed's own
    level, in whole achievements."""
    return np.clip(np.round((level + rng.normal(0, 7, len(level))) / STEP) * STEP, 0, 100) / 100


def make_run(path, progressions, scaffold=V0, env_name="crafter", **settings):
    """A run folder as eval.py writes it (its real config.json, a one-step trace and a result per
    episode) with the given final progressions; a seed mapped to None is left unfinished."""
    args = ev.build_parser().parse_args([
        "--env", env_name, "--scaffold", str(scaffold), "--seeds", ",".join(map(str, progressions)),
        "--model", agent.PAPER_MODEL, "--base-url", "http://127.0.0.1:8000/v1", "--max-steps", "100",
        "--max-new-tokens", "1024"])
    loaded, jobs = ev.check_args(args)
    path.mkdir(parents=True)
    ev.write_json(path / "config.json", {**ev.make_config(args, loaded, jobs), **settings})
    for env_name, task, seed in jobs:
        if progressions[seed] is None:
            continue
        trace, result, _ = ev.episode_paths(path, env_name, task, seed)
        trace.parent.mkdir(parents=True, exist_ok=True)
        writer = ev.TraceWriter(trace)
        writer.write({"step": 0, "observation": "obs", "state": None, "next_state": None, "log": None,
                      "plan": None, "action": {"raw": "Noop", "executed": "Noop", "valid": True},
                      "reward": 0.0, "done": True, "progression": progressions[seed],
                      "info": {"end_status": "death"}, "memory_diff": None, "hook_errors": [],
                      "tokens": {"prompt": 1, "completion": 1}, "latency_s": 0.0})
        writer.close()
        ev.write_json(result, {"seed": seed, "steps": 1, "progression": progressions[seed], "return": 0.0,
                               "end_status": "death"})
    return path


def gate(base, cand, tmp_path, *extra):
    out = tmp_path / "decision.json"
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "gate", "--base", str(base),
                        "--candidate", str(cand), "--out", str(out), *extra], capture_output=True, text=True)
    return r, (json.loads(out.read_text()) if out.exists() else None)


def test_sign_flip_p_values_are_exact():
    assert ev.sign_flip_p([5.0] * 6)[0] == 1 / 64
    assert ev.sign_flip_p([5.0] * 4)[0] == 1 / 16          # 4 wins of 4: the authors' rule accepts, this does not
    assert ev.sign_flip_p([0.0] * 8)[0] == 1.0
    assert list(ev.sign_flip_p([[3.0], [0.0], [-2.0]])) == [0.5, 1.0, 1.0]    # one pair: its 2 patterns
    assert np.isnan(ev.sign_flip_p([np.nan, 5.0, 5.0])[0])                  # never accepted
    d = np.random.default_rng(0).normal(1, 3, 11)
    brute = np.mean([np.dot(s, d) >= d.sum() - 1e-9 for s in itertools.product((-1, 1), repeat=11)])
    assert ev.sign_flip_p(d)[0] == pytest.approx(brute)
    p = ev.sign_flip_p([5.0] * 20)[0]                        # Monte Carlo: (1 + hits) / (1 + 100000)
    assert p == pytest.approx(1 / 100_001) or p == pytest.approx(2 / 100_001)   # all +: 2^-20 flips tie


def test_gate_false_accept_rate_under_the_papers_noise():
    """1000 candidates exactly as good as their base (200 bases, 5 candidates each, 30 seeds): the
    test accepts about alpha of them, and rarely two of one base's five; the authors' rule (mean higher) accepts half.
    A true +10 points is found almost always."""
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(200):
        level = np.clip(rng.normal(25, 6, 30), 0, 100)
        base = crafter_noise(rng, level)
        diffs += [100 * (crafter_noise(rng, level) - base) for _ in range(5)]
    diffs = np.array(diffs)
    accepted = ev.sign_flip_p(diffs, flips=4000) <= 0.05
    assert accepted.mean() <= 0.06
    assert (accepted.reshape(200, 5).sum(1) >= 2).mean() <= 0.06
    assert (diffs.mean(1) > 0).mean() >= 0.4                    # the authors' rule
    assert (ev.sign_flip_p(diffs + 10, flips=4000) <= 0.05).mean() >= 0.9


def test_five_noise_only_candidates_at_most_one_accepted(tmp_path):
    # The first draw (of generator seeds 0-9) in which all five noise-only candidates have a higher
    # mean than the base, as the issue measured; gated at loop1.sh's level (0.05 over 3 attempts).
    rng = np.random.default_rng(9)
    level = np.clip(rng.normal(25, 6, len(GATE_SEEDS)), 0, 100)
    base = make_run(tmp_path / "v0", dict(zip(GATE_SEEDS, crafter_noise(rng, level))))
    decisions = []
    for i in range(5):
        cand = make_run(tmp_path / f"sample{i}", dict(zip(GATE_SEEDS, crafter_noise(rng, level))))
        r, d = gate(base, cand, tmp_path, "--alpha", str(0.05 / 3))
        assert r.returncode == (0 if d["accept"] else 1), r.stderr
        assert "seed" in r.stdout and "one-sided paired sign-flip test" in r.stdout and "p = " in r.stdout
        assert len([line for line in r.stdout.splitlines() if line.startswith("crafter")]) == 30
        decisions.append(d)
    assert sum(d["candidate_mean_pct"] > d["base_mean_pct"] for d in decisions) == 5   # the authors' rule: all
    assert sum(d["accept"] for d in decisions) <= 1


def test_gate_decides_on_hand_built_runs(tmp_path):
    seeds = [100, 101, 102, 103, 104, 105]
    base = make_run(tmp_path / "base", dict(zip(seeds, [0.10, 0.20, 0.30, 0.40, 0.20, 0.10])))
    better = make_run(tmp_path / "better", dict(zip(seeds, [0.15, 0.25, 0.35, 0.45, 0.25, 0.15])))
    r, d = gate(base, better, tmp_path)
    assert r.returncode == 0 and "ACCEPT" in r.stdout and "exact over all 2^6 sign patterns" in r.stdout
    assert d["p_value"] == 1 / 64 and d["mean_diff_pct"] == pytest.approx(5.0) and d["n"] == 6
    assert d["base_mean_pct"] == pytest.approx(21.6667, abs=1e-3) and [p["seed"] for p in d["per_seed"]] == seeds
    assert "crafter   default                            100    10.00    15.00   +5.00" in r.stdout
    four = make_run(tmp_path / "four", dict(zip(seeds, [0.15, 0.25, 0.35, 0.45, 0.20, 0.10])))
    r, d = gate(base, four, tmp_path)     # higher mean (the authors' rule accepted), 4 wins and 2 ties
    assert r.returncode == 1 and "REJECT" in r.stdout and d["p_value"] == 1 / 16
    r, d = gate(base, base, tmp_path)
    assert r.returncode == 1 and d["p_value"] == 1.0


@pytest.mark.parametrize("setting", [dict(max_steps=3), dict(model="other"), dict(temperature=0.0),
                                     dict(max_new_tokens=256), dict(agent="cot"), dict(specialist="memory"),
                                     dict(nle_seeded=False)])
def test_gate_refuses_runs_with_other_settings(tmp_path, setting):
    progs = dict(zip(GATE_SEEDS[:4], [0.1, 0.2, 0.3, 0.4]))
    base = make_run(tmp_path / "base", progs)
    cand = make_run(tmp_path / "cand", {s: p + 0.3 for s, p in progs.items()}, **setting)
    r, d = gate(base, cand, tmp_path)
    key = next(iter(setting))
    assert r.returncode == 2 and d is None and r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"differ in {key} " in r.stderr, r.stderr


def test_gate_refuses_other_seeds_other_scaffold_settings_and_unfinished_runs(tmp_path):
    base = make_run(tmp_path / "base", dict(zip(GATE_SEEDS[:4], [0.1, 0.2, 0.3, 0.4])))
    other = make_run(tmp_path / "other", dict(zip(GATE_SEEDS[1:5], [0.5] * 4)))
    r, _ = gate(base, other, tmp_path)
    assert r.returncode == 2 and "differ in seeds" in r.stderr
    unfinished = make_run(tmp_path / "unfinished", dict(zip(GATE_SEEDS[:4], [0.9, 0.9, 0.9, None])))
    r, _ = gate(base, unfinished, tmp_path)
    assert r.returncode == 2 and "1 unfinished episode(s) (e.g. crafter/default/103)" in r.stderr
    r, _ = gate(base, tmp_path / "missing", tmp_path)
    assert r.returncode == 2 and "not a run folder" in r.stderr
    # a different scaffold (and how the run went) is what the gate compares: allowed
    v1 = tmp_path / "v1"
    shutil.copytree(V0, v1)
    (v1 / "CHANGES.md").write_text("# v1\n")
    cand = make_run(tmp_path / "cand", dict(zip(GATE_SEEDS[:4], [0.2, 0.3, 0.4, 0.5])), scaffold=v1,
                    concurrency=3, git_commit="abc")
    r, d = gate(base, cand, tmp_path)
    assert r.returncode == 1 and d["p_value"] == 1 / 16, r.stderr


def test_gate_power_from_a_runs_own_variance(tmp_path):
    rng = np.random.default_rng(3)
    base = make_run(tmp_path / "v0", dict(zip(GATE_SEEDS, crafter_noise(rng, np.full(30, 25.0)))))
    r = subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "gate", "--power", "--base", str(base),
                        "--episodes", "10", "--sims", "400", "--alpha", "0.05"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sd = float(r.stdout.split("per-episode SD ")[1].split()[0])
    assert 5 < sd < 9.5                                    # the 7 points it was drawn with
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]]
            for line in r.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {10, 30}                           # asked for, and the run's own size
    assert "mean higher" in r.stdout and "(mean higher: the authors' rule" in r.stdout
    for n, (false_accept, plus2, plus5, plus10, higher) in rows.items():
        assert false_accept <= 0.09 and higher >= 0.35
        assert false_accept <= plus2 <= plus5 <= plus10
    assert rows[30][3] >= 0.9 and rows[30][2] > rows[10][2]


# ---------------------------------------------------------------------------------------------
# The meta-LLM's view
# ---------------------------------------------------------------------------------------------

def long_trace(path):
    """A finished two-step trace (gzipped) whose PLAN response (10,000 characters) no line-based
    tool shows whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ev.TraceWriter(path)
    for step in range(2):
        response = "thinking " * 1100 + "<|ACTION|>Noop<|END|>"
        messages = [{"role": "system", "content": "SYSTEM PROMPT"}, {"role": "user", "content": f"PLAN prompt {step}"},
                    {"role": "assistant", "content": response}]
        turn = {"role": "base", "input_messages": 2, "response": response,
                "ops": [{"op": "SEARCH", "args": ["notes.md", "tree"], "result": "(no match)", "flags": ["empty"]},
                        {"op": "ACTION", "args": ["Noop"], "result": None}]}
        writer.write({"step": step, "observation": f"You see grass. step {step}", "log": None,
                      "plan": {"messages": messages, "turns": [turn], "ended": "action"},
                      "action": {"raw": "Noop", "executed": "Noop", "valid": True}, "reward": 1.0 * step,
                      "done": step == 1, "progression": 0.05 * step, "memory_diff": {"notes.md": "+ tree at 3,4"},
                      "info": {}, "tokens": {"prompt": 10, "completion": 5}})
    writer.close()
    ev.finish_trace(path)
    return path


def test_read_steps_shows_fields_that_lines_cut(tmp_path, base_run):
    ws = ms.Workspace(base_run, V0, tmp_path / "new")
    real = ws.call("read_steps", {"path": "run/crafter/default/ep_100.jsonl.gz", "step": 1})
    for field in ("## step: 1", "## action", "## reward: 0.0", "## progression", "## observation", "## log",
                  "## plan", "## memory_diff", "-- turn 0 (base)", "user: MEMORY UPDATE.", "response: <|DONE|>"):
        assert field in real, field
    scan = ws.call("read_steps", {"path": "run/crafter/default/ep_100.jsonl.gz", "step": 0, "end": 5})
    assert [line.split(":")[0] for line in scan.splitlines()] == ["step 0", "step 1", "step 2"]

    long_trace(tmp_path / "run" / "ep_7.jsonl")
    ws = ms.Workspace(tmp_path / "run", V0, tmp_path / "new")
    whole = ws.call("read_steps", {"path": "run/ep_7.jsonl.gz", "step": 1})
    assert "system: [the system prompt: field 'system']" in whole     # the same every step: shown on request
    assert ws.call("read_steps", {"path": "run/ep_7.jsonl.gz", "step": 1, "fields": ["system"]}) == \
        "[step 1]\n## system: SYSTEM PROMPT"
    assert "## reward: 1.0" in whole and "## progression: 0.05" in whole and "+ tree at 3,4" in whole
    assert f"[cut: {ms.FIELD_CHARS} of " in whole and "read_steps(path, 1, fields=['plan']) shows it whole" in whole
    plan = ws.call("read_steps", {"path": "run/ep_7.jsonl.gz", "step": 1, "fields": ["plan"]})
    assert "<|ACTION|>Noop<|END|>" in plan and "op SEARCH(notes.md | tree) -> '(no match)' flags ['empty']" in plan
    rest = ws.call("read_steps", {"path": "run/ep_7.jsonl.gz", "step": 1, "fields": ["plan"], "offset": 9000})
    assert rest.count("thinking") < 300 and "<|ACTION|>Noop<|END|>" in rest
    scan = ws.call("read_steps", {"path": "run/ep_7.jsonl.gz", "step": 0, "end": 1})
    assert scan.splitlines()[1] == ("step 1: action 'Noop' -> Noop, reward +1.00, progression 0.050 | "
                                    "plan: SEARCH(empty), ACTION")
    with pytest.raises(ms.ToolError, match="has no step 5 .2 steps"):
        ws.call("read_steps", {"path": "run/ep_7.jsonl.gz", "step": 5})
    with pytest.raises(ms.ToolError, match="no field 'reward_total'"):
        ws.call("read_steps", {"path": "run/ep_7.jsonl.gz", "step": 0, "fields": ["reward_total"]})
    line = ws.call("read_file", {"path": "run/ep_7.jsonl.gz"})
    assert f"[line cut: {ms.LINE_CHARS} of " in line and "read trace steps with read_steps]" in line
    hit = ws.call("grep", {"pattern": "ACTION\\|>Noop", "path": "run/ep_7.jsonl.gz"})
    assert hit.count("characters, from ") == 2 and all(len(h) < ms.GREP_CHARS + 80 for h in hit.splitlines())
    big = ws.call("read_file", {"path": "run/ep_7.jsonl.gz", "limit": 2000})
    assert len(big) < ms.RESULT_CHARS + 200


def test_old_tool_results_leave_the_context_first():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "digest"}]
    for i in range(10):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function",
             "function": {"name": "read_file", "arguments": json.dumps({"path": f"run/f{i}"})}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"[run/f{i}: lines 0-9]\n" + "x" * 10_000})
    originals = [dict(m) for m in messages]
    sent = list(messages)
    ms.fit_context(sent, 75_000)
    assert sum(len(json.dumps(m)) for m in sent) <= 75_000
    dropped = [m["content"] for m in sent if m["role"] == "tool" and m["content"].startswith("[dropped")]
    assert 3 <= len(dropped) <= 4
    assert dropped[0].startswith('[dropped to fit the context: read_file({"path": "run/f0"}) gave 10020 '
                                 "characters, starting '[run/f0: lines 0-9]'")
    assert all(len(m["content"]) > 10_000 for m in sent[-12:] if m["role"] == "tool")   # the recent stay
    assert messages == originals                       # the transcript's objects are not changed


def test_run_python_runs_without_credentials_and_stops(tmp_path, base_run, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-agent")
    monkeypatch.setenv("META_API_KEY", "sk-meta")
    monkeypatch.setenv("HF_TOKEN", "hf-x")
    off = ms.Workspace(base_run, V0, tmp_path / "new")
    assert "run_python" not in [t["function"]["name"] for t in off.tools]
    with pytest.raises(ms.ToolError, match="not enabled"):
        off.call("run_python", {"code": "print(1)"})
    ws = ms.Workspace(base_run, V0, tmp_path / "new", allow_python=True)
    out = ws.call("run_python", {"code": (
        "import os, eval\n"
        "print(sorted(v for v in os.environ.values() if v.startswith(('sk-', 'hf-'))))\n"
        "print(len(eval.read_trace('crafter/default/ep_100.jsonl')), 'steps')\n"
        "from pathlib import Path; print('HOME', Path.home(), sorted(Path.home().iterdir()))")})
    assert out.startswith("[exit 0]") and "[]" in out and "3 steps" in out
    home = out.split("HOME ")[1].split()[0]
    assert home != str(Path.home()) and "automem_home_" in home and out.rstrip().endswith(" []")
    monkeypatch.setattr(ms, "PYTHON_TIMEOUT", 1)
    with pytest.raises(ms.ToolError, match="stopped after 1 s"):
        ws.call("run_python", {"code": "while True: pass"})


# ---------------------------------------------------------------------------------------------
# The loop's log: state, lineage, rejected attempts, report
# ---------------------------------------------------------------------------------------------

def loop_state(log, start, *extra):
    return subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "loop-state", "--log", str(log),
                           "--start", str(start), "--attempts", "3", "--analysis-seeds", "200-209",
                           "--gate-seeds", "100-129", "--report-seeds", "42-51", *extra], capture_output=True, text=True)


def version(folder, parent, plan_line, changes):
    shutil.copytree(parent, folder)
    with open(folder / "prompts" / "plan.txt", "a") as f:
        f.write(plan_line + "\n")
    (folder / "CHANGES.md").write_text(changes)
    return folder


def test_loop_state_resumes_and_history_holds_lineage_and_rejections(tmp_path):
    sc = tmp_path / "scaffolds"
    v0 = shutil.copytree(V0, sc / "v0")
    v1 = version(sc / "v1", v0, "Check map_notes.md first.", "# v1\nMAP NOTES: a map file.\n")
    v2 = version(sc / "v2", v1, "Always craft a table.", "# v2\nTABLE FIRST.\n")
    (sc / "v1.analysis.md").write_text("The agent forgot where trees were.")
    (sc / "v2.analysis.md").write_text("The agent never crafted.")
    (sc / "v3.analysis.md").write_text("Tried a SCOUT op.")
    v4 = version(sc / "v4", v1, "Scout.", "# v4\n")
    log = tmp_path / "runs" / "loop1_log.jsonl"
    r = loop_state(log, v0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"best={v0}", "iteration=1", "attempt=1", "pending=''", f"chain=({v0})"]

    def gated(i, a, parent, cand, accept, base_mean, cand_mean):
        ms.append_event(log, {"event": "gated", "iteration": i, "attempt": a, "parent": str(parent),
                              "candidate": str(cand), "accept": accept, "p_value": 0.004 if accept else 0.41,
                              "alpha": 0.05 / 3, "base_mean_pct": base_mean, "candidate_mean_pct": cand_mean,
                              "mean_diff_pct": cand_mean - base_mean, "n": 30})
    ms.append_event(log, {"event": "proposed", "iteration": 1, "attempt": 1, "parent": str(v0), "candidate": str(v1)})
    gated(1, 1, v0, v1, True, 25.0, 31.0)
    ms.append_event(log, {"event": "proposed", "iteration": 2, "attempt": 1, "parent": str(v1), "candidate": str(v2)})
    gated(2, 1, v1, v2, False, 31.0, 31.5)
    ms.append_event(log, {"event": "invalid", "iteration": 2, "attempt": 2, "parent": str(v1),
                          "candidate": str(sc / "v3"), "problem": "the scaffold does not load: policy.py line 3"})
    ms.append_event(log, {"event": "proposed", "iteration": 2, "attempt": 3, "parent": str(v1), "candidate": str(v4)})
    with open(log, "a") as f:
        f.write('{"event": "gated", "iter')            # killed mid-write
    r = loop_state(log, v0)
    assert r.stdout.splitlines() == [f"best={v1}", "iteration=2", "attempt=3", f"pending={v4}", f"chain=({v0} {v1})"]
    assert ms.next_version(sc) == "v5"                  # v3 left only its analysis, and keeps its number

    history = ms.history_text(log)
    lineage, rejected = history.split("## Rejected attempts (2), oldest first")
    assert "### v0: the starting scaffold; gate 25.00 %" in lineage
    assert ("### v1: parent v0; gate 31.00 % vs its parent's 25.00 % on 30 paired episodes: difference "
            "+6.00 points, one-sided p = 0.0040 (alpha 0.0166667)") in lineage
    assert "MAP NOTES: a map file." in lineage and "The agent forgot where trees were." in lineage
    assert "### v2 (iteration 2, attempt 1, parent v1): rejected by the gate 31.50 %" in rejected
    assert "p = 0.4100" in rejected and "The agent never crafted." in rejected and "gate/" not in history
    assert "--- v1/prompts/plan.txt" in rejected and "+Always craft a table." in rejected
    assert "-# v1" in rejected and "+# v2" in rejected
    assert ("### v3 (iteration 2, attempt 2, parent v1): not valid: the scaffold does not load: policy.py "
            "line 3\nAnalysis:\nTried a SCOUT op.") in rejected

    gated(2, 3, v1, v4, False, 31.0, 30.0)
    r = loop_state(log, v0)
    assert r.stdout.splitlines()[1:4] == ["iteration=3", "attempt=1", "pending=''"]
    r = loop_state(log, v1)
    assert r.returncode == 2 and f"is a loop that began with scaffold={v0}, not {v1}" in r.stderr
    assert {k: v for k, v in ms.read_log(log)[0].items() if k != "time"} == {"event": "start", "scaffold": str(v0), "gate_seeds": "100-129",
                                   "analysis_seeds": "200-209", "report_seeds": "42-51", "attempts": 3}
    for changed, said in [(["--attempts", "2"], "attempts=3, not 2"), (["--gate-seeds", "100-128"], "gate_seeds=100-129, not 100-128"),
                          (["--setting", "alpha=0.1"], "alpha=None, not 0.1")]:
        r = loop_state(log, v0, *changed)
        assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    other = tmp_path / "runs2" / "loop1_log.jsonl"
    assert loop_state(other, v0, "--setting", "alpha=0.05", "--setting", "model=m").returncode == 0
    assert loop_state(other, v0, "--setting", "alpha=0.05", "--setting", "model=m").returncode == 0
    r = loop_state(other, v0, "--setting", "alpha=0.05", "--setting", "model=other")
    assert r.returncode == 2 and "began with model=m, not other" in r.stderr
    r = loop_state(tmp_path / "other.jsonl", v0, "--report-seeds", "120-140")
    assert r.returncode == 2 and "overlap (120-129)" in r.stderr and not (tmp_path / "other.jsonl").exists()
    r = loop_state(tmp_path / "other.jsonl", v0, "--analysis-seeds", "129-131")
    assert r.returncode == 2 and ("analysis seeds and gate seeds overlap (129): a revision would be gated on seeds "
                                  "whose traces the meta-LLM studied") in r.stderr
    r = loop_state(tmp_path / "other.jsonl", v0, "--analysis-seeds", "50-60")
    assert r.returncode == 2 and "analysis seeds and report seeds overlap (50-51)" in r.stderr
    r = loop_state(tmp_path / "other.jsonl", v0, "--gate-seeds", "1000-1029")
    assert r.returncode == 2 and "seeds 1000-1029 are loop #2's training seeds (1000 and up)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "other.jsonl").exists()


def test_loop_report_puts_gate_and_report_numbers_side_by_side(tmp_path):
    v0 = shutil.copytree(V0, tmp_path / "scaffolds" / "v0")
    v1 = version(tmp_path / "scaffolds" / "v1", v0, "Check map_notes.md first.", "# v1\n")
    loop = tmp_path / "loop"
    log = loop / "loop1_log.jsonl"
    assert loop_state(log, v0).returncode == 0
    gate_seeds, report_seeds = list(range(100, 106)), list(range(42, 46))
    make_run(loop / "gate" / "v0", dict(zip(gate_seeds, [0.1, 0.2, 0.3, 0.2, 0.1, 0.3])), scaffold=v0)
    make_run(loop / "gate" / "v1", dict(zip(gate_seeds, [0.2, 0.3, 0.4, 0.3, 0.2, 0.4])), scaffold=v1)
    r, d = gate(loop / "gate" / "v0", loop / "gate" / "v1", tmp_path, "--log", str(log), "--iteration", "1",
                "--attempt", "1")
    assert r.returncode == 0 and ms.read_log(log)[-1]["candidate"] == str(v1)
    make_run(loop / "report" / "v0", dict(zip(report_seeds, [0.2, 0.2, 0.3, 0.3])), scaffold=v0)
    make_run(loop / "report" / "v1", dict(zip(report_seeds, [0.2, 0.3, 0.3, 0.4])), scaffold=v1)
    r = subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "report", "--log", str(log),
                        "--out", str(loop / "report.md")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (loop / "report.md").read_text()
    assert text.startswith(f"# Loop #1: crafter, model {agent.PAPER_MODEL}")
    assert "Gate seeds 100-105 (6 episodes per version)" in text and "Report seeds 42-45 (4 episodes per version)" in text
    assert ("False accepts: at most 0.05 per attempt, 0.15 per iteration (3 attempts), and over the loop's 1 "
            "iterations at most 0.15 chance") in text and "measures 0.12 of loops" in text
    assert ("Analysis seeds 200-209: the meta-LLM studied the traces of runs on these seeds only, one per version "
            "it revised (none: analysis/<version>/); it was shown no trace of the gate or report runs") in text
    assert "| gate | 2 | 12 | 0 | 12 | 12 | 2.000 |" in text and "| report | 2 | 8 | 0 | 8 | 8 | 2.000 |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| v0 ", "| v1 "))]
    se = lambda pcts: ev.mean_se(pcts)["stderr"]  # noqa: E731  (BALROG's, as every report)
    assert rows[0] == f"| v0 | - | 20.00 ± {se([10, 20, 30, 20, 10, 30]):.2f} (6) | - | 25.00 ± {se([20, 20, 30, 30]):.2f} (4) |"
    assert rows[1].startswith("| v1 | v0 | 30.00 ± ") and "| +10.00 points, p = 0.0156 | 30.00 ± " in rows[1]
    make_run(loop / "report2", dict(zip([100, 42], [0.1, 0.1])), scaffold=v0)
    shutil.rmtree(loop / "report" / "v0")
    shutil.copytree(loop / "report2", loop / "report" / "v0")
    r = subprocess.run([sys.executable, str(ROOT / "meta_scaffold.py"), "report", "--log", str(log),
                        "--out", str(loop / "report.md")], capture_output=True, text=True)
    assert r.returncode == 2 and "gate seeds and report seeds overlap (100)" in r.stderr


# ---------------------------------------------------------------------------------------------
# The whole loop
# ---------------------------------------------------------------------------------------------

# Every proposal first looks for the gate runs' traces (gate seed 103) through each of its folders.
GATE_TRACE = "gate/v0/crafter/default/ep_103.jsonl.gz"
PROBES = [call("list_files", path=root) for root in ("run", "analyses", "versions", "parent", "code")] + [
    call("read_steps", path=f"analyses/../{GATE_TRACE}", step=0), call("read_steps", path=f"loop/{GATE_TRACE}", step=0),
    call("read_file", path=f"run/../../{GATE_TRACE}"), call("grep", pattern="Move", path="analyses/../gate")]
for i, probe in enumerate(PROBES):
    probe["tool_calls"][0]["id"] = f"call_probe_{i}"


class LoopMeta:
    """The meta-LLM of a whole loop, by what it is told: with no accepted version yet it writes
    v1 (the tree target); after that, neutral revisions the gate must reject."""

    def __init__(self):
        self.first_messages = []      # the user message that opened each proposal
        self.tool_results = {}        # (proposal, call id) -> what the tool answered

    def __call__(self, body):
        msgs = body["messages"]
        if not any(m["role"] == "assistant" for m in msgs):
            self.first_messages.append(msgs[1]["content"])
        self.tool_results.update({(len(self.first_messages), m["tool_call_id"]): m["content"]
                                  for m in msgs if m["role"] == "tool"})
        user = msgs[1]["content"]
        rejected = int(re.search(r"## Rejected attempts \((\d+)\)", user).group(1))
        plan = PROBES + (neutral_revision(rejected) if "\n### v1: parent v0;" in user else tree_revision())
        return plan[min(sum(m["role"] == "assistant" for m in msgs), len(plan) - 1)]


def test_loop1_accepts_a_real_improvement_remembers_and_resumes_after_a_kill(tmp_path):
    """scripts/loop1.sh on the real game, the agent's model and the meta-LLM both served over
    HTTP. Iteration 1: the meta-LLM's policy.py computes where the nearest tree is, the tree
    seeker then collects wood on each of the 6 gate seeds, and the gate accepts (p = 1/64). Iteration
    2: two neutral revisions, rejected; the second proposal is given the lineage and the first
    rejection. The loop is killed while a candidate is being evaluated and, restarted, goes on
    from there: nothing proposed or evaluated twice. Then the report seeds, once."""
    meta = LoopMeta()
    runs, scaffolds = tmp_path / "runs", tmp_path / "scaffolds"
    with ScriptedServer(meta) as meta_server, ScriptedServer(tree_seeker) as agent_server:
        env = dict(os.environ, ENV_NAME="crafter", GATE_SEEDS="103,104,106,108-110", REPORT_SEEDS="42-43",
                   ANALYSIS_SEEDS="100-101",
                   MAX_STEPS="5",
                   ITERATIONS="2", ATTEMPTS="2", MODEL="scripted", BASE_URL=agent_server.url,
                   META_MODEL="scripted", META_BASE_URL=meta_server.url, META_API_KEY="sk-meta",
                   RUNS=str(runs), SCAFFOLD_DIR=str(scaffolds), PYTHON=sys.executable, CONCURRENCY="8")
        first = tmp_path / "first_run.txt"
        with open(first, "w") as out:
            loop = subprocess.Popen(["bash", str(ROOT / "scripts" / "loop1.sh")], env=env, start_new_session=True,
                                    stdout=out, stderr=subprocess.STDOUT)
        log = runs / "loop1_log.jsonl"
        deadline = time.time() + 600
        while not any(e["event"] == "proposed" and e["iteration"] == 2 for e in ms.read_log(log)):
            assert loop.poll() is None and time.time() < deadline, first.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)                       # v2's gate evaluation is under way
        os.killpg(loop.pid, signal.SIGKILL)
        loop.wait()
        before = ms.read_log(log)
        finished = {p: p.stat().st_mtime for p in (runs / "gate").glob("v[01]/*/*/ep_*.json")}
        assert len(finished) == 12
        r = subprocess.run(["bash", str(ROOT / "scripts" / "loop1.sh")], env=env, capture_output=True,
                           text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    events = ms.read_log(log)
    assert events[:len(before)] == before and before[-1]["event"] == "proposed"
    slots = [(e["event"], e.get("iteration"), e.get("attempt"), Path(e.get("candidate", e.get("scaffold"))).name)
             for e in events]
    assert slots == [("start", None, None, "v0"), ("proposed", 1, 1, "v1"), ("gated", 1, 1, "v1"),
                     ("proposed", 2, 1, "v2"), ("gated", 2, 1, "v2"), ("proposed", 2, 2, "v3"), ("gated", 2, 2, "v3")]
    accepted = events[2]
    assert accepted["accept"] and accepted["p_value"] == 1 / 64 and accepted["alpha"] == 0.025
    assert accepted["base_mean_pct"] == 0 and accepted["candidate_mean_pct"] == pytest.approx(100 / 22)
    assert not events[4]["accept"] and events[4]["p_value"] == 1.0 and not events[6]["accept"]
    assert len(meta.first_messages) == 3                               # v2 was not proposed again
    assert {p: p.stat().st_mtime for p in (runs / "gate").glob("v[01]/*/*/ep_*.json")} == finished
    assert "Gate: one-sided paired sign-flip test at alpha 0.025" in first.read_text()   # the power table
    # what the third proposal was given: the lineage and the rejected attempt
    third = meta.first_messages[2]
    assert "### v1: parent v0; gate 4.55 % vs its parent's 0.00 % on 6 paired episodes" in third
    assert "PLAN is told where the nearest tree is." in third and "it never read the map for trees." in third
    assert "## Rejected attempts (1)" in third and "### v2 (iteration 2, attempt 1, parent v1): rejected by the gate" in third
    assert "p = 1.0000" in third and "Goals were not written down (attempt 0)." in third
    assert "+++ v2/memory/crafter/goals.txt" in third and "+goal 0: wood" in third
    # the report: gate and report numbers side by side, for the accepted chain only
    assert (runs / "best_scaffold").read_text().strip() == str(scaffolds / "v1")
    report = (runs / "report.md").read_text()
    assert report.startswith("# Loop #1: crafter, model scripted") and "Report seeds 42-43" in report
    assert "Attempts: 3 (1 accepted, 2 rejected by the gate, 0 not valid)." in report
    rows = [line for line in report.splitlines() if line.startswith(("| v0 ", "| v1 "))]
    assert rows[0] == "| v0 | - | 0.00 ± 0.00 (6) | - | 0.00 ± 0.00 (2) |"
    assert rows[1].startswith("| v1 | v0 | 4.55 ± 0.00 (6) | +4.55 points, p = 0.0156 | ")
    assert sorted(p.name for p in (runs / "report").iterdir()) == ["v0", "v1"]
    assert not list(agent.SCAFFOLDS.glob("v[1-9]*"))                   # nothing written into the project
    # the meta-LLM studied runs on the analysis seeds, and no tool of its reached a gate run's trace
    assert sorted(p.name for p in (runs / "analysis").iterdir()) == ["v0", "v1"]
    assert ("Analysis seeds 100-101: the meta-LLM studied the traces of runs on these seeds only, one per version "
            "it revised (v0, v1: analysis/<version>/)") in report
    assert re.search(r"\| analysis \| 2 \| 4 \| \d+ \|", report) and re.search(r"\| gate \| 4 \| 24 \| \d+ \|", report)
    assert all("run/crafter/default/ep_100.jsonl" in m and "ep_103" not in m for m in meta.first_messages)
    answers = {k: [meta.tool_results[(k, f"call_probe_{i}")] for i in range(len(PROBES))] for k in (1, 2, 3)}
    for listings in (said[:5] for said in answers.values()):
        assert not any(re.search(r"ep_1(03|04|06|08|09|10)\.json", a) for a in listings), listings
    assert all(a.startswith("error: refused") for said in answers.values() for a in said[5:])
    assert "v0/crafter/default/ep_100.jsonl" in answers[1][1] and "v1/crafter/default/ep_101.jsonl" in answers[3][1]


def test_listing_and_grep_see_only_the_allowlist_and_follow_no_link(tmp_path, base_run):
    run = shutil.copytree(base_run, tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("def keyless leaked\n")
    os.symlink(secret, run / "leak.txt")
    os.symlink(tmp_path, run / "leakdir")
    ws = ms.Workspace(run, V0, tmp_path / "new")
    listing = ws.call("list_files", {"path": "code"}).splitlines()
    assert "agent.py" in listing and "README.md" in listing and "meta_scaffold.py" not in listing
    assert "scaffolds/README.md" in listing and "docs/loop1.md" in listing
    assert not any(f.startswith((".git/", ".ci/", "runs/")) for f in listing)
    assert all(f in ms.CODE_FILES or f.split("/")[0] in ms.CODE_ENTRIES for f in listing)
    hits = ws.call("grep", {"pattern": "def keyless", "path": "code"})
    assert hits != "(no match)"                            # tests/ is shown and mentions it
    assert not any(h.startswith("meta_scaffold.py:") for h in hits.splitlines())
    assert "leak" not in ws.call("list_files", {"path": "run"})
    assert ws.call("grep", {"pattern": "leaked", "path": "run"}) == "(no match)"
    with pytest.raises(ms.ToolError, match="^refused"):
        ws.call("read_file", {"path": "run/leak.txt"})


def test_a_killed_proposals_staging_is_cleared_by_the_next_and_a_live_ones_is_kept(tmp_path):
    """SIGKILL runs no clean-up: the next proposal removes staging folders that no live process
    locks, and leaves a running proposal's alone."""
    (tmp_path / "v3.staging").mkdir()
    (tmp_path / "v3.staging" / "policy.py").write_text("def step(ep):\n    return None\n")
    (tmp_path / "v4.staging").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)",
                               str(tmp_path / "v4.staging.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        lock = ms.claim_staging(tmp_path / "v5.staging")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["v4.staging", "v4.staging.lock", "v5.staging.lock"]
        with pytest.raises(RuntimeError, match="another proposal is writing v4.staging now"):
            ms.claim_staging(tmp_path / "v4.staging")
        ms.release_staging(tmp_path / "v5.staging", lock)
        assert not (tmp_path / "v5.staging.lock").exists()
    finally:
        holder.kill()
