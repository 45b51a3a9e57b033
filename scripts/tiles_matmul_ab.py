"""One matmul at a time: AMX tiles (TileWeight, kernels.rowgemm_tiles) against the vector kernel (kernels.rowgemm)
for the few rows of a step, and against oneDNN (F.linear) for the many rows of a prefill (BENCHMARKS.md section T).

    .venv/bin/python scripts/tiles_matmul_ab.py [threads]

Shapes: the demo model's (K = 256 / 768, N up to its 8192-row head) and the 0.8B body's. Each weight is reused
call after call, so the small ones sit in L2 here, as they do not in a whole step; the step figures of section T
come from `mtpx bench`.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mtpx import kernels
from mtpx.models.linear import TileWeight


def timed(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def main() -> None:
    if not kernels.amx_available():
        sys.exit("no AMX tiles here (CPU without AMX_BF16, kernels not built, or MTPX_AMX=0)")
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} thread(s); step rows: microseconds for 1 / 2 / 3 / 5 rows")
    for n, k in [(1536, 256), (256, 768), (776, 256), (2048, 256), (8192, 256), (7168, 1024), (6144, 1024)]:
        w = torch.randn(n, k, generator=g).bfloat16()
        tiles = TileWeight(w)
        reps = 400 if n * k < 1 << 20 else 50
        row = {"tiles": [], "vector": []}
        for m in (1, 2, 3, 5):
            x = torch.randn(m, k, generator=g).bfloat16()
            row["tiles"].append(timed(lambda: tiles.matmul(x, True), reps) * 1e6)
            row["vector"].append(timed(lambda: kernels.rowgemm(x, w), reps) * 1e6)
        t, v = row["tiles"], row["vector"]
        print(f"  {n:5d} x {k:4d}: tiles {' / '.join(f'{a:.0f}' for a in t)} (5 rows {t[3] / t[0]:.2f}x one), "
              f"vector {' / '.join(f'{a:.0f}' for a in v)} ({v[3] / v[0]:.2f}x)")
    print("prefill rows: milliseconds, tiles against oneDNN's F.linear on the bf16 weight")
    for n, k in [(1536, 256), (8192, 256), (7168, 1024), (1024, 3584), (8224, 1024)]:
        w = torch.randn(n, k, generator=g).bfloat16()
        tiles = TileWeight(w)
        for m in (64, 512):
            x = torch.randn(m, k, generator=g).bfloat16()
            a = timed(lambda: tiles.matmul(x, False), 10) * 1e3
            b = timed(lambda: F.linear(x, w), 10) * 1e3
            print(f"  {n:5d} x {k:4d}, {m:3d} rows: tiles {a:.2f} ms, oneDNN {b:.2f} ms ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
