"""eval.py replay: page data checked against traces, divergence, and a real headless browser."""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import eval as ev
from scripted_server import ScriptedServer
from test_eval import deterministic_model

ROOT = Path(ev.__file__).resolve().parent
ARTIFACTS = ROOT / ".artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run(args):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay_runs")
    out = {}
    with ScriptedServer(deterministic_model) as server:
        for name, extra in (("crafter_scripted", ["--env", "crafter", "--seeds", "7", "--max-steps", "12"]),
                            ("minihack_scripted", ["--env", "minihack", "--tasks", "MiniHack-Quest-Easy-v0",
                                                   "--seeds", "7", "--max-steps", "8"])):
            run([*extra, "--base-url", server.url, "--model", "scripted", "--out", str(root / name)])
            out[name] = root / name
    run(["--env", "crafter", "--seeds", "7", "--max-steps", "6", "--model", "tiny-random", "--out", str(root / "crafter_tiny")])
    run(["--env", "nle", "--seeds", "7", "--max-steps", "4", "--model", "tiny-random", "--out", str(root / "nle_tiny")])
    out["crafter_tiny"], out["nle_tiny"] = root / "crafter_tiny", root / "nle_tiny"
    return out


def page_data(html):
    blob = re.search(r'<script id="data" type="application/octet-stream">(.*?)</script>', html, re.S).group(1)
    return json.loads(zlib.decompress(base64.b64decode(blob), -15))


@pytest.mark.parametrize("names", [("crafter_scripted", "crafter_tiny"), ("minihack_scripted",), ("nle_tiny",)])
def test_page_data_matches_the_traces(tmp_path, runs, names):
    out = tmp_path / "replay.html"
    run(["replay", *[str(runs[n]) for n in names], "--seed", "7", "--out", str(out)])
    html = out.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script src" not in html   # self-contained
    data = page_data(html)
    assert [p["run"] for p in data["panels"]] == list(names)
    for panel, name in zip(data["panels"], names):
        env_name = panel["env"]
        trace = next(runs[name].glob(f"{env_name}/*/ep_7.jsonl.gz"))
        records = ev.read_trace(trace)
        assert panel["diverged"] is None and len(panel["steps"]) == len(records)
        cfg = json.loads((runs[name] / "config.json").read_text())
        assert panel["scaffold"] == cfg["scaffold"] and panel["model"] == cfg["model"]
        assert panel["final_progression"] == records[-1]["progression"]
        for step, rec in zip(panel["steps"], records):
            assert step["obs"] == rec["observation"] and step["action"] == rec["action"]
            assert step["progression"] == rec["progression"]
            assert [name for name, _ in step["routines"]] == rec["routines"]
            for (name, ops), (_, routine) in zip(step["routines"], ev.routines(rec)):
                assert [o["op"] for o in ops] == [o["op"] for o in ev.routine_ops(routine)]
            frame = panel["frames"][step["f"]]
            if env_name == "crafter":
                assert base64.b64decode(frame)[8:12] == b"WEBP"
            else:
                assert len(frame["chars"]) == 24 and len(frame["chars"][0]) == 80
                # the terminal's map rows are the hybrid observation's map
                map_text = rec["observation"].split("map:\n", 1)[1]
                assert map_text.startswith("\n".join(frame["chars"][1:4]))


def test_a_non_reproducible_episode_stops_with_a_note(tmp_path, runs):
    broken = tmp_path / "broken"
    shutil.copytree(runs["crafter_scripted"], broken)
    trace = broken / "crafter/default/ep_7.jsonl"
    records = ev.read_trace(trace)
    records[5]["observation"] = records[5]["observation"].replace("You see", "You once saw")
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))   # a plain trace is read as well
    trace.with_name("ep_7.jsonl.gz").unlink()
    r = run(["replay", str(broken), "--seed", "7", "--out", str(tmp_path / "b.html")])
    assert "STOPPED at step 5" in r.stdout
    panel = page_data((tmp_path / "b.html").read_text())["panels"][0]
    assert panel["diverged"]["step"] == 5 and len(panel["steps"]) == 5


def test_replay_arguments(tmp_path, runs):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "replay", str(runs["crafter_tiny"]), "--seed", "99"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no episode with seed 99" in r.stderr


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_panels_move_together_in_a_real_browser(tmp_path, runs):
    from playwright.sync_api import sync_playwright
    out = tmp_path / "replay.html"
    run(["replay", str(runs["crafter_scripted"]), str(runs["crafter_tiny"]), "--seed", "7", "--out", str(out)])
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.set_offline(True)
        page = context.new_page()
        page.on("request", lambda req: requests.append(req.url))
        page.goto(out.as_uri())
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=30_000)
        page.select_option("#speed", "50")
        page.click("#play")
        page.wait_for_function("Number(document.getElementById('scrub').value) >= 4", timeout=30_000)
        page.click("#play")                                           # pause
        steps = page.eval_on_selector_all(".panel", "els => els.map(e => Number(e.dataset.step))")
        assert len(steps) == 2 and steps[0] == steps[1] >= 4
        assert page.eval_on_selector_all(".panel .view img", "els => els.length") == 2   # both visual
        ended = page.eval_on_selector_all(".panel .step", "els => els.map(e => e.textContent.includes('episode over'))")
        assert ended == [False, steps[0] > 5]                          # the tiny run has 6 steps
        page.click("#toggle")
        texts = page.eval_on_selector_all(".panel .text", "els => els.map(e => e.textContent)")
        step = steps[0]
        expected = [ev.read_trace(runs[n] / "crafter/default/ep_7.jsonl") for n in ("crafter_scripted", "crafter_tiny")]
        assert texts[0] == expected[0][step]["observation"]
        assert texts[1] == expected[1][min(step, len(expected[1]) - 1)]["observation"]
        page.click("#toggle")
        page.click("#prev")
        assert page.eval_on_selector_all(".panel", "els => els.map(e => Number(e.dataset.step))") == [step - 1] * 2
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "replay_screenshot.png"), full_page=False)
        browser.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
