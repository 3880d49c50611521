"""Trace bytes per step on disk (eval.TraceWriter, eval.finish_trace), on Crafter and NetHack.

    python bench/trace_bench.py [--steps 40]

Plays seeded episodes with the memory agent (v0) and the cot baseline against a local scripted
OpenAI-compatible server whose replies look like a model's (reasoning, SEARCH / READ / APPEND,
an action), writes their step records as a run does: plain JSON lines while the episode runs,
gzipped when it finished; each file read back with eval.read_trace equals the records. No model
runs: the numbers are about the trace format.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # the project, and its tests' scripted server
import agent  # noqa: E402
import envs  # noqa: E402
import eval as ev  # noqa: E402
from scripted_server import ScriptedServer  # noqa: E402

ACTIONS = {"crafter": ["Move West", "Move East", "Move North", "Do", "Collect Wood"],
           "nle": ["north", "east", "south", "west", "search"]}
THOUGHT = ("Let me think about what I see. The observation shows my surroundings and status; "
           "I should keep exploring while watching my health, and record what worked. ")


def scripted_model(env_name):
    """Replies in the shape a model gives: LOG looks before it writes, PLAN reads and searches;
    a baseline reasons, then names its action as BALROG asks."""
    def reply(body):
        first, last = body["messages"][0]["content"], body["messages"][-1]["content"]
        action = ACTIONS[env_name][(len(first) + len(body["messages"])) % len(ACTIONS[env_name])]
        if first.startswith("MEMORY UPDATE"):
            if "[SEARCH" not in last:
                return THOUGHT + "<|SEARCH|>survival_log.txt|step<|END|>"
            return (THOUGHT + f"<|APPEND|>survival_log.txt|after {action}: nothing new, still exploring, "
                    f"health fine<|END|><|DONE|>")
        if "<|ACTION|>" in first:   # v0's PLAN
            if "[READ" not in last:
                return THOUGHT + "<|READ|>strategy.txt<|END|><|SEARCH|>survival_log.txt|after<|END|>"
            return THOUGHT + f"<|ACTION|>{action}<|END|>"
        return THOUGHT + f"\nACTION: {action}"     # BALROG's baselines
    return reply


def play_records(env_name, kind, steps, folder):
    env = envs.make_env(env_name, seed=42)
    scaffold = agent.load_scaffold("v0")
    records = []
    with ScriptedServer(scripted_model(env_name)) as server:
        backend = agent.OpenAIBackend(server.url, "scripted", max_retries=0)
        ag = agent.make_agent(kind, env, scaffold, Path(folder) / "memory")
        agent.all_finished(agent.run_episodes([agent.play(env, ag, 42, records.append, steps)], backend))
        ag.close()
    return [json.loads(json.dumps(r)) for r in records]   # as written: JSON types only


def write(records, path):
    """Bytes of the running (plain) trace and of the finished (gzipped) one."""
    writer = ev.TraceWriter(path)
    for r in records:
        writer.write(r)
    writer.close()
    assert ev.read_trace(path) == records, f"{path} does not read back to its records"
    running = Path(path).stat().st_size
    ev.finish_trace(path)
    assert ev.read_trace(path) == records, f"{path}.gz does not read back to its records"
    return running, Path(f"{path}.gz").stat().st_size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    print(f"bytes per step over {args.steps} steps (seed 42); every file read back equal to its records")
    print(f"{'game':8} {'agent':7} {'running':>9} {'finished':>9} {'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for env_name in ("crafter", "nle"):
            for kind in ("memory", "cot"):
                records = play_records(env_name, kind, args.steps, tmp)
                running, finished = write(records, f"{tmp}/{env_name}_{kind}.jsonl")
                n = len(records)
                print(f"{env_name:8} {kind:7} {running / n:9,.0f} {finished / n:9,.0f} {running / finished:7.1f}x")


if __name__ == "__main__":
    main()
