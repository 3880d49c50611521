"""Eval under failing servers: every fault kind retried on the backoff schedule, a context-length
refusal survived, a bug on this side not retried, a dead server ending episodes unfinished within
two minutes of waiting (and --resume finishing them), a 30 % faulty server, an exception in one
episode, a launcher's rank that ends first with a failed episode, and the endpoint check."""
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import agent
import envs
import eval as ev
from agent import OpenAIBackend, Request, ServerDown, Unfinished
from scripted_server import FAULTS, ScriptedServer
from test_eval import deterministic_model, first_view, torchrun_eval, wait_for

ROOT = Path(ev.__file__).resolve().parent
ASK = Request([{"role": "user", "content": "Your move?"}])
# what the backend says when a fault outlasts its retries
SAID = {"http_500": "InternalServerError: Error code: 500", "http_503": "InternalServerError: Error code: 503",
        "http_429": "RateLimitError: Error code: 429", "drop": "APIConnectionError: Connection error.",
        "cut": "APIConnectionError: Connection error.",
        "not_json": "JSONDecodeError: Expecting value", "no_choices": "BadReply: the answer has no choices",
        "no_usage": "BadReply: the answer has no usage", "stall": "APITimeoutError: Request timed out."}


def faults_first(n, kind):
    """A server script: `kind` for the first n requests, then a real answer."""
    count = itertools.count()
    return lambda body: kind if next(count) < n else "<|ACTION|>Do<|END|>"


def fast_backend(url, **kw):
    return OpenAIBackend(url, "scripted", **{"max_retries": 1, "backoff": 0.01, "timeout": 0.5, **kw})


def patch_sleep(monkeypatch, sleep):
    """agent.py's time.sleep (its waits before a retry or a probe) replaced by `sleep`; the scripted
    server and the test's own threads still sleep."""
    monkeypatch.setattr(agent, "time", types.SimpleNamespace(**{**vars(time), "sleep": sleep}))


@pytest.fixture
def waits(monkeypatch):
    """The backend's waits before retries, recorded instead of slept."""
    waited = []
    patch_sleep(monkeypatch, waited.append)
    return waited


def test_backoff_doubles_with_jitter_and_honours_retry_after(waits):
    with ScriptedServer(lambda body: "http_500") as server:
        reply = OpenAIBackend(server.url, "scripted", max_retries=5, backoff=1.0).complete(ASK)
    assert reply.retries == 5 and len(server.requests) == 6 and len(waits) == 5
    assert all(0.5 * 2 ** k <= w <= 2 ** k for k, w in enumerate(waits))   # 1, 2, 4, 8, 16 s times 0.5-1
    assert len({w / 2 ** k for k, w in enumerate(waits)}) == 5               # jittered: no lock-step
    for retry_after, waited in ((7, [7.0, 7.0]), (3600, [agent.MAX_WAIT])):
        waits.clear()
        with ScriptedServer(faults_first(len(waited), "http_503"), retry_after=retry_after) as server:
            reply = OpenAIBackend(server.url, "scripted", max_retries=5, backoff=1.0).complete(ASK)
        assert reply.text == "<|ACTION|>Do<|END|>" and waits == waited
    for retry_after in ("nan", "-5", "inf"):     # not a number of seconds: the backoff's own waits
        waits.clear()
        with ScriptedServer(faults_first(2, "http_503"), retry_after=retry_after) as server:
            OpenAIBackend(server.url, "scripted", max_retries=5, backoff=1.0).complete(ASK)
        assert 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2, retry_after


@pytest.mark.parametrize("kind", [k for k in FAULTS if k != "context_length"])
def test_each_fault_kind_is_retried_and_counted(kind):
    with ScriptedServer(faults_first(3, kind), stall=1.0) as server:
        backend = fast_backend(server.url)
        failed = backend.complete(ASK)          # two attempts, both faulty: the turn fails
        assert failed.error.startswith(SAID[kind]) and failed.text == "" and failed.retries == 1
        assert backend.failures == {"scripted": 1}
        ok = backend.complete(ASK)              # a fault, then the answer
        assert (ok.text, ok.error, ok.retries, ok.finish_reason) == ("<|ACTION|>Do<|END|>", None, 1, "stop")
        assert backend.failures == {"scripted": 0} and len(server.requests) == 4


def chat_completion(content="<|ACTION|>Do<|END|>", prompt_tokens=1):
    """The body of a chat completion, bytes as the server sends them."""
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": 2}},
                      ensure_ascii=False).encode()


@pytest.mark.parametrize("body,said", [
    (chat_completion("café").replace("é".encode(), b"\xc3"), "UnicodeDecodeError: 'utf-8' codec can't decode"),
    (chat_completion(prompt_tokens="abc"), "BadReply: the answer is not a chat completion (ValueError: invalid "
                                           "literal for int() with base 10: 'abc')"),
    (chat_completion(content=5), "BadReply: the answer is not a chat completion (TypeError: its content is a int)"),
], ids=["cut_mid_character", "tokens_not_a_number", "content_not_text"])
def test_a_body_not_utf8_or_not_a_chat_completion_is_retried(body, said):
    """Bodies cut mid-character or with fields of the wrong type: the server's fault, retried."""
    with ScriptedServer(faults_first(3, body)) as server:
        backend = fast_backend(server.url)
        failed = backend.complete(ASK)
        assert failed.error.startswith(said) and failed.retries == 1 and backend.failures == {"scripted": 1}
        assert backend.complete(ASK).text == "<|ACTION|>Do<|END|>" and len(server.requests) == 4


def test_context_length_refusal_and_client_errors_are_not_retried():
    with ScriptedServer(lambda body: "context_length") as server:
        backend = fast_backend(server.url, max_failures=1)
        reply = backend.complete(ASK)           # the server is up: never ServerDown for this
        assert reply.finish_reason == "context_length" and reply.retries == 0
        assert "maximum context length" in reply.error and len(server.requests) == 1
    with ScriptedServer(lambda body: 404) as server:
        reply = fast_backend(server.url, max_failures=2).complete(ASK)
        assert reply.error.startswith("NotFoundError") and len(server.requests) == 1


def test_failed_requests_in_a_row_find_the_server_down_then_each_request_is_tried_once(waits):
    script = iter(["http_503"] * 2 + ["ok"] + ["http_503"] * 5 + ["ok"])
    with ScriptedServer(lambda body: next(script)) as server:
        backend = fast_backend(server.url, max_failures=2)
        assert backend.complete(ASK).error and backend.complete(ASK).text == "ok"   # a success resets
        assert backend.complete(ASK).server_down is None
        down = backend.complete(ASK)           # the 2nd failed request in a row, retried like any
        assert down.server_down.startswith(f"model scripted at {server.url} down: 2 requests for it in a row failed (last: "
                                           "InternalServerError: Error code: 503")
        assert len(server.requests) == 7 and len(waits) == 3
        again = backend.complete(ASK)          # down: tried once, no wait
        assert again.server_down and again.retries == 0 and len(server.requests) == 8 and len(waits) == 3
        assert backend.complete(ASK).text == "ok" and backend.failures == {"scripted": 0}   # it is back


def test_a_bug_on_this_side_is_raised_not_retried(waits):
    """Only the server's and the network's failures are retried: a local error (here the client
    cannot set an infinite timeout) raises at once and ends its episode, and is no server fault."""
    with ScriptedServer(lambda body: "ok") as server:
        backend = OpenAIBackend(server.url, "scripted", timeout=float("inf"))
        with pytest.raises(OverflowError):
            backend.complete(ASK)
        assert server.requests == [] and waits == [] and backend.failures == {}


def test_a_step_survives_a_context_length_refusal(tmp_path):
    """The PLAN turn refused as too long fails; the scaffold's fallback runs; the episode goes on."""
    plans = itertools.count()

    def script(body):
        if body["messages"][0]["content"].startswith("MEMORY UPDATE"):
            return "<|DONE|>"
        return "context_length" if next(plans) == 1 else "<|ACTION|>Do<|END|>"   # step 1's PLAN
    with ScriptedServer(script) as server:
        env = envs.make_env("crafter", seed=3)
        ag = agent.make_agent("memory", env, agent.load_scaffold("v0"), tmp_path / "mem")
        records = []
        result = agent.run_episodes([agent.play(env, ag, 3, records.append, 3)], fast_backend(server.url))[0]
    assert result["steps"] == 3
    assert [r["action"] for r in records] == [{"raw": "Do", "executed": "Do", "valid": True},
                                              {"raw": None, "executed": "Noop", "valid": False},
                                              {"raw": "Do", "executed": "Do", "valid": True}]
    turn = records[1]["plan"]["turns"][0]
    assert turn["finish_reason"] == "context_length" and records[1]["plan"]["ended"] == "backend_error"
    c = ev.episode_stats(records)["counts"]
    assert (c["requests"], c["context_length"], c["failed_requests"]) == (5, 1, 0)


class CrashingEnv:
    """A real game that raises at one step, as a game or a scaffold's code can."""

    def __init__(self, env, at_step):
        self.env, self.at_step, self.steps = env, at_step, 0

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        self.steps += 1
        if self.steps == self.at_step:
            raise RuntimeError("the game crashed")
        return self.env.step(action)


def test_an_exception_ends_its_episode_only(tmp_path):
    with ScriptedServer(deterministic_model) as server:
        plays, ended = [], []
        for seed in (1, 2, 3):
            env = envs.make_env("crafter", seed=seed)
            env = CrashingEnv(env, 2) if seed == 2 else env
            ag = agent.make_agent("memory", env, agent.load_scaffold("v0"), tmp_path / f"m{seed}")
            plays.append(agent.play(env, ag, seed, None, 4))
        results = agent.run_episodes(plays, fast_backend(server.url), concurrency=3,
                                     on_done=lambda i, r: ended.append(i))
    assert [r["steps"] for r in (results[0], results[2])] == [4, 4] and sorted(ended) == [0, 1, 2]
    assert isinstance(results[1], Unfinished) and results[1].reason == "RuntimeError: the game crashed"
    assert "in step" in results[1].traceback and "raise RuntimeError" in results[1].traceback


def test_eval_isolates_an_episode_that_raises(tmp_path, monkeypatch, capsys):
    """In eval: the crashed episode keeps its trace, gets an error file and no result; the others
    finish and are scored; the run exits 1 and names it."""
    make_env = envs.make_env
    monkeypatch.setattr(envs, "make_env", lambda name, task=None, seed=None, **kw:
                        CrashingEnv(make_env(name, task, seed=seed, **kw), 3) if seed == 2
                        else make_env(name, task, seed=seed, **kw))
    out = tmp_path / "run"
    with ScriptedServer(deterministic_model) as server:
        rc = ev.main(["--env", "crafter", "--seeds", "1-3", "--max-steps", "4", "--base-url", server.url,
                      "--model", "scripted", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "unfinished: crafter default 2: RuntimeError: the game crashed" in err
    folder = out / "crafter/default"
    assert sorted(p.name for p in folder.glob("ep_*.json")) == ["ep_1.json", "ep_3.json"]
    assert len(ev.read_trace(folder / "ep_2.jsonl")) == 2       # the steps before the crash
    error = (folder / "ep_2.error.txt").read_text()
    assert error.startswith("RuntimeError: the game crashed\n") and "Traceback" in error
    summary = json.loads((out / "summary.json").read_text())
    assert summary["envs"]["crafter"]["progression_pct"]["n"] == 2
    assert summary["unfinished"] == [{"env": "crafter", "task": "default", "seed": 2,
                                      "reason": "RuntimeError: the game crashed"}]
    assert "1 episode(s) unfinished" in (out / "report.md").read_text()


def test_a_connection_gets_ten_seconds_of_the_timeout():
    """A dead node's packets vanish: without its own bound a connect waits for the OS's timeout."""
    timeout = OpenAIBackend("http://127.0.0.1:9/v1", "scripted", timeout=300).client.timeout
    assert (timeout.connect, timeout.read) == (agent.CONNECT_TIMEOUT, 300) and agent.CONNECT_TIMEOUT == 10


def crafter_plays(tmp_path, seeds, steps, two_model=False):
    plays = []
    for seed in seeds:
        env = envs.make_env("crafter", seed=seed)
        ag = agent.make_agent("memory", env, agent.load_scaffold("v0"), tmp_path / f"m{seed}", two_model=two_model)
        plays.append(agent.play(env, ag, seed, None, steps))
    return plays


def test_a_specialist_that_is_gone_ends_the_episode_though_the_base_model_answers(tmp_path, waits):
    """vLLM restarted without the LoRA: 404 for the specialist's name only; base turns succeed in
    between, and do not reset the specialist's count."""
    with ScriptedServer(deterministic_model, models=("scripted",), strict=True) as server:
        backend = fast_backend(server.url, specialist="gone-lora")
        result, = agent.run_episodes(crafter_plays(tmp_path, [1], 10, two_model=True), backend)
    assert isinstance(result, Unfinished) and result.reason.startswith(
        f"ServerDown: model gone-lora at {server.url} down: 3 requests for it in a row failed (last: NotFoundError")
    assert backend.failures == {"scripted": 0, "gone-lora": 3}


@pytest.mark.parametrize("back", [False, True])
def test_no_episode_starts_while_the_server_is_down_and_it_is_probed_before_the_next(tmp_path, monkeypatch, back):
    """At concurrency 2 the server goes down: the 2 running episodes end; before episode 3 starts
    the server is asked for a token, MAX_WAIT s apart, PROBES times; if it is not back episodes 3-4
    are left unstarted (not burned one request each), else they run."""
    state = {"up": True, "plans": 0}
    waited = []

    def wait(seconds):
        waited.append(seconds)
        state["up"] = back
    patch_sleep(monkeypatch, wait)

    def model(body):
        if not state["up"]:
            return 500
        if body["messages"][0]["content"].startswith("MEMORY UPDATE"):
            return "<|DONE|>"
        state["plans"] += 1
        state["up"] = state["plans"] != 3   # down after the first 2 episodes' step 1
        return "<|ACTION|>Do<|END|>" if state["up"] else 500
    with ScriptedServer(model) as server:
        backend = fast_backend(server.url, max_retries=0, max_failures=2)
        results = agent.run_episodes(crafter_plays(tmp_path, [1, 2, 3, 4], 3), backend, concurrency=2)
    assert all(isinstance(r, Unfinished) and r.reason.startswith("ServerDown: model scripted") for r in results[:2]), \
        results
    if back:
        assert waited == [agent.MAX_WAIT] and [r["steps"] for r in results[2:]] == [3, 3]
    else:
        assert waited == [agent.MAX_WAIT] * (agent.PROBES - 1) and agent.PROBES == 3
        why = f"not started: scripted at {server.url} still down"
        assert [(r.reason, type(r.error)) for r in results[2:]] == [(why, ServerDown)] * 2
        probes = [b for b in server.requests if b.get("max_tokens") == 1]
        assert len(probes) == agent.PROBES and server.requests[-1] is probes[-1]   # nothing after them


def run_eval(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


def test_dead_server_ends_the_run_in_two_minutes_and_resume_finishes_it(tmp_path, waits, capsys):
    """eval's default retry schedule, with the waits recorded: 3 requests fail after 5 retries each,
    then the server is down; the episode ends after its step, within 120 s of waiting."""
    out, folder = tmp_path / "run", tmp_path / "run/crafter/default"
    server = ScriptedServer(deterministic_model, delay=0.02).__enter__()
    port = server.httpd.server_address[1]

    def kill_after_the_first_episode():
        while not (folder / "ep_1.json").exists():
            time.sleep(0.01)
        server.__exit__(None, None, None)     # episode 2 is under way
    threading.Thread(target=kill_after_the_first_episode, daemon=True).start()
    common = ["--env", "crafter", "--seeds", "1-2", "--max-steps", "30", "--concurrency", "1",
              "--base-url", server.url, "--model", "scripted", "--out", str(out)]
    assert ev.main(common) == 1
    assert len(waits) == 3 * 5 and sum(waits) <= 3 * (1 + 2 + 4 + 8 + 16) < 120
    assert (folder / "ep_1.json").exists() and not (folder / "ep_2.json").exists()
    reason = (folder / "ep_2.error.txt").read_text().splitlines()[0]
    assert reason.startswith(f"ServerDown: model scripted at {server.url} down: 3 requests for it in a row failed (last: "
                             "APIConnectionError: Connection error.)")
    assert f"unfinished: crafter default 2: {reason}" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["envs"]["crafter"]["progression_pct"]["n"] == 1 and summary["unfinished"][0]["seed"] == 2
    turns = {seed: [t for r in ev.read_trace(folder / f"ep_{seed}.jsonl") for _, ro in ev.routines(r)
                    for t in ro["turns"]] for seed in (1, 2)}   # every line parses
    failed = [(t.get("retries", 0), "server_down" in t) for t in turns[2] if t["error"]]
    assert turns[2][-len(failed):] == [t for t in turns[2] if t["error"]]     # the last turns of the trace
    # 3 failed after their retries, the 3rd found the server down; a LOG's step goes on to PLAN, tried once
    assert failed in ([(5, False), (5, False), (5, True)], [(5, False), (5, False), (5, True), (0, True)])
    n = len(turns[1] + turns[2])     # the backend's figures count the unfinished episode's requests too
    assert summary["backend"] == {"requests": n, "error_rate": len(failed) / n, "failed": len(failed),
                                  "retries": 15, "context_length": 0, "truncated": 0}
    first = {p: p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and (p.name.startswith("ep_1.") or "memory_1" in p.parts)}
    assert len(first) >= 3

    with ScriptedServer(deterministic_model, port=port):   # the server is back at its address
        assert ev.main([*common, "--resume"]) == 0
    assert (folder / "ep_2.json").exists() and not (folder / "ep_2.error.txt").exists()
    assert {p: p.read_bytes() for p in first} == first      # episode 1's files untouched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["envs"]["crafter"]["progression_pct"]["n"] == 2 and summary["unfinished"] == []


def test_a_rank_that_ends_first_with_a_failed_episode_does_not_stop_the_others(tmp_path):
    """torchrun stops every rank as soon as one exits non-zero. Rank 0 (seeds 1, 3) ends first,
    seed 1 unfinished (the server fails its requests), and exits 0; rank 1's long episode (seed 2,
    held until rank 0 has ended, then slow) finishes; rank 1 writes the summary and exits 1."""
    failing, slow = first_view(1), first_view(2)
    folder = tmp_path / "r/crafter/default"

    def model(body):
        history = body["messages"][1]["content"]
        if failing in history:
            return 500
        if slow in history:
            wait_for([folder / "ep_1.error.txt", folder / "ep_3.json"])
            time.sleep(0.5)
        return "<|ACTION|>Do<|END|>"
    r, _ = torchrun_eval(tmp_path / "r", model, 29562, "--retries", "0", "--max-failures", "1")
    assert "2 of 3 episodes of" in r.stdout and "this one exits 0: 1 of its episodes are unfinished" in r.stdout
    assert (folder / "ep_2.json").exists(), r.stderr[-2000:]    # rank 1 was not stopped
    summary = json.loads((tmp_path / "r/summary.json").read_text())
    assert summary["envs"]["crafter"]["seeds"] == [2, 3]
    assert [(u["seed"], u["reason"].split(":")[0]) for u in summary["unfinished"]] == [(1, "ServerDown")]
    assert r.returncode != 0 and "unfinished: crafter default 1: ServerDown" in r.stderr   # the summarizer's exit 1


def test_a_shard_job_with_an_unfinished_episode_exits_1(tmp_path, monkeypatch):
    """An independent --shard job (a Slurm array task) that is not the last reports its failures;
    only a launcher's rank (WORLD_SIZE set) exits 0 for them, lest the launcher stop the others."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with ScriptedServer(lambda body: 500) as server:
        r = run_eval(["--env", "crafter", "--seeds", "1-2", "--max-steps", "2", "--base-url", server.url,
                      "--model", "scripted", "--out", str(tmp_path / "run"), "--shard", "0/2", "--retries", "0",
                      "--max-failures", "1"])
    assert "1 of 2 episodes of" in r.stdout and "this one exits 1: 1 of its episodes are unfinished" in r.stdout
    assert r.returncode == 1 and not (tmp_path / "run/summary.json").exists()


def test_thirty_percent_faults_of_every_kind(tmp_path):
    """3 requests in 10 fail, in turn every kind of fault; retries absorb them, a context-length
    refusal is a failed turn; the run finishes, exits 0, and every trace line parses."""
    count, lock, served = itertools.count(), threading.Lock(), []
    kinds = itertools.cycle(FAULTS)

    def flaky(body):
        with lock:
            n = next(count)
            fault = next(kinds) if n % 10 < 3 else None
        if fault:
            served.append(fault)
            return fault
        return deterministic_model(body)
    out = tmp_path / "run"
    with ScriptedServer(flaky, stall=1.0) as server:
        r = run_eval(["--env", "crafter", "--seeds", "1-2", "--max-steps", "8", "--base-url", server.url,
                      "--model", "scripted", "--out", str(out), "--concurrency", "1", "--retries", "3",
                      "--backoff", "0.01", "--timeout", "0.5"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(served) == set(FAULTS)
    for trace in out.glob("crafter/default/ep_*.jsonl.gz"):
        assert len(ev.read_trace(trace)) == 8
    b = json.loads((out / "summary.json").read_text())["backend"]
    refused = served.count("context_length")
    assert b["context_length"] == refused >= 1 and b["failed"] == 0
    assert b["retries"] == len(served) - refused and b["error_rate"] == pytest.approx(refused / b["requests"])
    assert "Backend, over every episode, unfinished ones too: " in (out / "report.md").read_text()


@pytest.mark.parametrize("server_kw,args,message", [
    ({}, ["--model", "qwen"], "does not serve qwen (it serves: scripted); check --model and --specialist"),
    ({"models": ("base", "memory")}, ["--model", "base", "--specialist", "memroy"], "does not serve memroy"),
    # transformers serve cannot list a model loaded from a path: each name is asked for a token
    ({"models": ("/models/q",), "strict": True, "list_status": 500}, ["--model", "/models/qq"],
     "does not serve /models/qq (it serves: nothing it will list)"),
    ({"list_status": 401}, ["--model", "scripted"], "refuses the API key (HTTP 401: Internal Server Error)"),
])
def test_endpoint_check_stops_before_any_episode(tmp_path, server_kw, args, message):
    with ScriptedServer(lambda body: "<|ACTION|>Do<|END|>", **server_kw) as server:
        r = run_eval(["--env", "crafter", "--seeds", "1", "--max-steps", "2", "--base-url", server.url,
                      *args, "--out", str(tmp_path / "run")])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_endpoint_check_probes_a_server_that_cannot_list(tmp_path):
    def model(body):
        return "OK" if body["max_tokens"] == 1 else deterministic_model(body)
    with ScriptedServer(model, models=("/models/q",), strict=True, list_status=500) as server:
        r = run_eval(["--env", "crafter", "--seeds", "1", "--max-steps", "2", "--base-url", server.url,
                      "--model", "/models/q", "--out", str(tmp_path / "run")])
        probes = [b for b in server.requests if b.get("max_tokens") == 1]
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(probes) == 1
    r = run_eval(["--env", "crafter", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                  "--out", str(tmp_path / "r2")])
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:9/v1" in r.stderr.strip().splitlines()[-1]
