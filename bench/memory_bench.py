"""MemoryFS against its floor, side by side in one run:

    python bench/memory_bench.py [--repeat 30]

SEARCH on a 100,000-line file vs `str.lower()` + `in` over the same text (target <= 3x), and
file_index() over 200 files, unchanged and rebuilt after a write (target < 1 ms).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_fs import MemoryFS, parse_ops  # noqa: E402


def median_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def search(repeat):
    with tempfile.TemporaryDirectory() as tmp:
        fs = MemoryFS(tmp, max_file_bytes=10**8, max_total_bytes=10**9, max_files=1000)
        words = ["tree", "stone", "water", "cow", "zombie", "coal", "iron", "table"]
        lines = [f"step {i}: saw {words[i % 8]} at ({i % 64}, {i * 7 % 64}); Diamond" if i % 997 == 0
                 else f"step {i}: saw {words[i % 8]} at ({i % 64}, {i * 7 % 64})"
                 for i in range(100_000)]
        fs.write("log.md", "\n".join(lines))
        data = fs.read("log.md")
        op = parse_ops("<|SEARCH|>log.md|diamond<|END|>").ops[0]
        assert "containing 'diamond'" in fs.execute(op)
        ours = median_ms(lambda: fs.execute(op), repeat)
        floor = median_ms(lambda: "diamond" in data.lower(), repeat)
        print(f"SEARCH, 100,000-line file ({len(data) / 1e6:.1f} MB), ~100 hits:"
              f" {ours:.3f} ms median; floor (str.lower() + in over the same text):"
              f" {floor:.3f} ms; ratio {ours / floor:.2f}x (target <= 3x)")


def file_index():
    with tempfile.TemporaryDirectory() as tmp:
        fs = MemoryFS(tmp, max_files=1000)
        for i in range(200):
            fs.write(f"file_{i:03d}.md", "a line\n" * (i % 17 + 1))
        fs.file_index()
        cached = median_ms(fs.file_index, 1000)
        op = parse_ops("<|APPEND|>file_007.md|one more line<|END|>").ops[0]

        def after_write():
            fs.execute(op)
            return fs.file_index()
        t_write = median_ms(lambda: fs.execute(op), 200)
        rebuilt = median_ms(after_write, 200) - t_write
        print(f"file_index(), 200 files: {cached:.4f} ms median when unchanged, "
              f"{max(rebuilt, 0):.4f} ms to rebuild after a write (target < 1 ms)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=30, help="timings per SEARCH figure")
    args = p.parse_args()
    search(args.repeat)
    file_index()
