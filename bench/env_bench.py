"""Our games against the raw ones, side by side in one run:

    python bench/env_bench.py [--steps 300]

Median ms per step of each raw game and of ours (the raw step plus BALROG's text observation),
and of the NetHack text alone on real observations (target: about 2 ms).
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from envs import make_env, nle_hybrid, nle_language  # noqa: E402

GAMES = [("crafter", "default"), ("minihack", "MiniHack-Corridor-R3-v0"), ("nle", "NetHackChallenge-v0")]


def step_times(steps):
    """Median ms per step of the raw game and of ours, the same random moves into both."""
    print(f"{'game':<36}{'raw ms/step':>12}{'ours ms/step':>14}{'ours adds':>11}")
    for env_name, task in GAMES:
        env = make_env(env_name, task, seed=0)
        env.reset()
        rng = random.Random(0)
        raw_times, our_times = [], []
        for _ in range(steps):
            action = rng.choice(env.actions[:4] if env_name != "crafter" else env.actions[1:6])
            t0 = time.perf_counter()
            _, _, done, _ = env.step(action)
            our_times.append(time.perf_counter() - t0)
            if done:
                env.reset()
        # the raw game stepped alone: same actions straight into the underlying env
        if env_name == "crafter":
            import crafter
            raw = crafter.Env(area=(64, 64), view=(9, 9), size=(256, 256), seed=0)
            raw.reset()
            for _ in range(steps):
                t0 = time.perf_counter()
                raw.step(rng.randrange(1, 6))
                raw_times.append(time.perf_counter() - t0)
        else:
            raw = env._env
            raw.reset()
            for _ in range(steps):
                t0 = time.perf_counter()
                _, _, term, trunc, _ = raw.step(env._index[rng.choice(env.actions[:4])][0])
                raw_times.append(time.perf_counter() - t0)
                if term or trunc:
                    raw.reset()
        r, o = statistics.median(raw_times) * 1e3, statistics.median(our_times) * 1e3
        print(f"{env_name + ' ' + task:<36}{r:>12.3f}{o:>14.3f}{o - r:>11.3f}")
    print("(Crafter: most of what ours adds is BALROG's second render per step, kept for its dynamics)")


def nethack_text(steps):
    """The text alone, on real NetHack observations (what the 2 ms target is about)."""
    env = make_env("nle", seed=0)
    env.reset()
    samples = []
    for i in range(steps):
        env.step(["north", "east", "south", "west", "search"][i % 5])
        samples.append({k: np.array(v) for k, v in env.last_obs.items()})
    times = []
    for obs in samples:
        t0 = time.perf_counter()
        nle_hybrid(nle_language(obs), obs["tty_chars"], obs["tty_cursor"])
        times.append(time.perf_counter() - t0)
    print(f"NetHack text alone (nle_language + hybrid): median {statistics.median(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    step_times(args.steps)
    nethack_text(args.steps)
