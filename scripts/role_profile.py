#!/usr/bin/env python3
"""Summarize the `role ...` lines a DEEP_EP_PROFILE_ROLES=ON build prints (kernels/common/role_timer.cuh):
per kernel, role and rank, the mean over warps and calls of each bucket, in microseconds per call.

    python3 scripts/role_profile.py LOG [LOG...]
"""

import collections
import sys


def main(paths):
    sums = collections.defaultdict(lambda: [0, 0, 0, 0, 0, 0])  # count, total, b0..b3
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                fields = line.split()
                # Ranks print from several processes into one log: a line another process cut into is skipped.
                expected = ("role", None, None, "rank", None, "block", None, "warp", None, "total")
                if len(fields) != 19 or any(e is not None and fields[i] != e for i, e in enumerate(expected)):
                    continue
                if not all(fields[i].isdigit() for i in (4, 6, 8, 10, 12, 14, 16, 18)):
                    continue
                kernel, role, rank = fields[1], fields[2], int(fields[4])
                values = [int(fields[i]) for i in (10, 12, 14, 16, 18)]
                entry = sums[(kernel, role, rank)]
                entry[0] += 1
                for i, v in enumerate(values):
                    entry[i + 1] += v
    if not sums:
        print("no role lines (was the build made with DEEP_EP_PROFILE_ROLES=ON?)")
        return 1
    print(
        f"{'kernel':<15} {'role':<10} {'rank':>4} {'warp-calls':>10} {'total us':>9} {'b0':>8} {'b1':>8} {'b2':>8} {'b3':>8}"
    )
    for (kernel, role, rank), entry in sorted(sums.items()):
        n = entry[0]
        means = [v / n for v in entry[1:]]
        print(f"{kernel:<15} {role:<10} {rank:>4} {n:>10} " + " ".join(f"{m:>8.0f}" for m in means))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
