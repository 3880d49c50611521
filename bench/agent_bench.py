"""Throughput of the many-episode driver, side by side in one run:

    python bench/agent_bench.py

(a) steps/s of 1 vs 16 concurrent episodes of the memory agent (v0, MiniHack) against a local
scripted OpenAI-compatible server that answers after 50 ms (target: 16 episodes >= 12x one);
(b) generated tokens/s of tiny-random (HF, CPU) batched vs one request at a time (target >= 3x).
"""
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # the project, and its tests' scripted server
import envs  # noqa: E402
from agent import HFBackend, OpenAIBackend, all_finished, load_scaffold, make_agent, play, run_episodes  # noqa: E402
from scripted_server import ScriptedServer  # noqa: E402


def episodes(n, steps, scaffold, root, counted):
    """n memory-agent episodes on MiniHack Corridor; `counted` gets each step's completion tokens."""
    agents = [make_agent("memory", envs.make_env("minihack", "MiniHack-Corridor-R3-v0", seed=i),
                         scaffold, Path(root) / f"mem_{i}") for i in range(n)]
    gens = [play(a.env, a, seed=i, max_steps=steps,
                 on_step=lambda r: counted.append(r["tokens"]["completion"]))
            for i, a in enumerate(agents)]
    return gens, agents


def server_concurrency(scaffold):
    def scripted(body):  # any scaffold: DONE ends a routine that allows it, ACTION commits in one that allows it
        return "<|DONE|><|ACTION|>north<|END|>"

    print("(a) memory agent (v0, MiniHack) on a local OpenAI-compatible server answering after 50 ms")
    server = ScriptedServer(scripted, delay=0.05)
    proc = server.serve_in_process()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            backend = OpenAIBackend(server.url, "scripted", max_retries=0)
            rates = {}
            for n in (1, 16):
                gens, agents = episodes(n, 20, scaffold, f"{tmp}/{n}", [])
                t0 = time.perf_counter()
                steps = sum(r["steps"] for r in all_finished(run_episodes(gens, backend, concurrency=n)))
                rates[n] = steps / (time.perf_counter() - t0)
                for a in agents:
                    a.close()
                print(f"    {n:>2} concurrent episode(s): {rates[n]:7.1f} steps/s")
            print(f"    ratio 16 vs 1: {rates[16] / rates[1]:.1f}x (target >= 12x)")
    finally:
        proc.terminate()


def hf_batching(scaffold):
    print("(b) tiny-random (HF, CPU), memory agent (v0, MiniHack), 8 episodes x 2 steps, up to 128 "
          "new tokens per reply: generated tokens/s, batched vs one at a time")
    backend = HFBackend("tiny-random", max_new_tokens=128, temperature=1.0, seed=0)
    generate, in_llm = backend.generate, [0.0]

    def timed_generate(requests):  # time spent in the model, apart from the games
        t0 = time.perf_counter()
        out = generate(requests)
        in_llm[0] += time.perf_counter() - t0
        return out
    backend.generate = timed_generate
    with tempfile.TemporaryDirectory() as tmp:
        speeds = {}
        for conc in (1, 8):
            counted, in_llm[0] = [], 0.0
            gens, _ = episodes(8, 2, scaffold, f"{tmp}/{conc}", counted)
            t0 = time.perf_counter()
            all_finished(run_episodes(gens, backend, concurrency=conc))
            wall = time.perf_counter() - t0
            speeds[conc] = sum(counted) / in_llm[0]
            print(f"    concurrency {conc}: {speeds[conc]:7.1f} generated tokens/s in the model "
                  f"({sum(counted) / wall:.1f} end to end, games included)")
        print(f"    ratio batched vs one at a time: {speeds[8] / speeds[1]:.1f}x (target >= 3x)")


if __name__ == "__main__":
    scaffold = load_scaffold("v0")
    server_concurrency(scaffold)
    hf_batching(scaffold)
