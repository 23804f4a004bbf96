"""How fast bergson generates its dense projection matrix on this machine's CPU, for benchmarks/gradients.py's
estimate of a (d) global row before it runs one.

Runs in bergson's own virtual environment (see benchmarks/bergson_row.py). bergson's global projection has no
cache: every batch regenerates the whole [proj_dim, n] matrix, one block of [proj_dim, 2^27 / proj_dim] at a time
(bergson/collector/collector.py:966, 988-994), with ``random_matrix``, whose CPU path is single-threaded NumPy
Philox (bergson/collector/projection_matrix.py:164-177). Timed here: that call on one such block, so n * proj_dim
entries at this rate are a lower bound on a batch's projection (the products with the gradients come on top).

    python benchmarks/bergson_rate.py --proj-dim 8192          # prints: bergson_rademacher_entries_per_s=<x>
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--projection", choices=["rademacher", "normal"], default="rademacher")
    parser.add_argument("--repeats", type=int, default=3, help="the fastest of this many timings is reported")
    args = parser.parse_args()

    from bergson.collector.collector import CHUNKED_PROJECTION_INSTANTIATION_NUMEL
    from bergson.collector.projection_matrix import random_matrix

    columns = max(1, CHUNKED_PROJECTION_INSTANTIATION_NUMEL // args.proj_dim)  # one block, as global_projection_blocks cuts it
    seconds = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        random_matrix(f"rate-probe/{repeat}", args.proj_dim, columns, "cpu", args.projection)
        seconds.append(time.perf_counter() - start)
    print(f"bergson_{args.projection}_entries_per_s={args.proj_dim * columns / min(seconds):.6g}", flush=True)


if __name__ == "__main__":
    main()
