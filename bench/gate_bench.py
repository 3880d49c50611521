"""Loop #1 with revisions that change nothing: the old gate against this one, side by side.

    python bench/gate_bench.py [--loops 1000]

Every candidate is exactly as good as v0 (true Crafter progression 25 %); only the model's
sampling differs, with the paper's per-episode noise (SD about 7 points around each seed's own
level, in whole achievements). A loop runs 5 iterations of up to 3 attempts, as the authors'.
- Old: gate and report on the same 10 seeds (42-51), accept whenever the candidate's mean is
  higher, report the best version's gate mean.
- New (scripts/loop1.sh): gate on 30 other seeds with the one-sided paired sign-flip test at
  0.05 / 3 per attempt, then evaluate the final version once on the 10 report seeds.
It prints how many "improvements" a loop finds and what it reports, against the truth.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ev  # noqa: E402

STEP = 100 / 22   # one Crafter achievement in progression points


def episode(rng, level):
    return np.clip(np.round((level + rng.normal(0, 7, len(level))) / STEP) * STEP, 0, 100)


def one_loop(rng, level_gate, level_report, new, iterations=5, attempts=3):
    """(accepted revisions, reported progression %) of one loop of no-change revisions."""
    levels = level_gate if new else level_report
    best, accepted = episode(rng, levels), 0
    for _ in range(iterations):
        for _ in range(attempts):
            cand = episode(rng, levels)
            ok = (ev.sign_flip_p(cand - best, flips=2000, seed=int(rng.integers(1 << 30)))[0] <= 0.05 / attempts
                  if new else cand.mean() > best.mean())
            if ok:
                best, accepted = cand, accepted + 1
                break
    return accepted, (episode(rng, level_report).mean() if new else best.mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = {}
    for new in (False, True):
        runs = []
        for _ in range(args.loops):
            # each seed has its own level (its world), mean 25 %
            level_gate, level_report = (np.clip(rng.normal(25, 6, n), 0, 100) for n in (30, 10))
            runs.append(one_loop(rng, level_gate, level_report, new))
        acc, rep = np.array(runs).T
        rows[new] = (acc.mean(), (acc > 0).mean(), rep.mean())
    print(f"{args.loops} loops of 5 iterations x 3 attempts; every revision as good as v0 (true 25.0 %)")
    print(f"{'gate':<58}{'accepted per loop':>18}{'loops accepting any':>21}{'reported %':>12}")
    print(f"{'old: mean higher, same 10 seeds as reported':<58}{rows[False][0]:>18.2f}{rows[False][1]:>21.2f}"
          f"{rows[False][2]:>12.2f}")
    print(f"{'new: sign-flip p <= 0.05/3 on 30 gate seeds, report seeds':<58}{rows[True][0]:>18.2f}"
          f"{rows[True][1]:>21.2f}{rows[True][2]:>12.2f}")
    print(f"false improvements per loop, old / new: {rows[False][0] / max(rows[True][0], 1e-9):.1f}x")


if __name__ == "__main__":
    main()
