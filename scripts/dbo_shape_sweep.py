"""The dual-batch-overlap case (tests/gpu/test_intranode.py dbo_streams, FP8) on 8 ranks of one GPU at several
block counts and shapes, new processes per run, to tell which one the dispatch timeouts on a shared GPU follow.

    python3 scripts/dbo_shape_sweep.py 8,8n,16,20,20p0 [--rounds 10]

Each entry is num_sms, then optionally `n` for the two-blocks-per-SM shape (DEEP_EP_INTRANODE_SHAPE=narrow;
without it the runtime picks the shape) and `pN` for comm stream priority N (DEEP_EP_COMM_STREAM_PRIORITY;
without it the default, high). Prints one PASS / FAIL line per entry."""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gpu"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", help="comma-separated num_sms, each optionally suffixed with n (narrow)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import test_intranode
    from deep_ep.testing import MpsDaemon, RankFailure, launch

    daemon = MpsDaemon()
    with daemon:
        for entry in args.entries.split(","):
            match = re.fullmatch(r"(\d+)(n?)(?:p(-?\d+))?", entry)
            if match is None:
                raise SystemExit(f"dbo_shape_sweep: bad entry {entry!r} (expected e.g. 20, 8n, 20p0, 8np0)")
            num_sms, narrow, priority = int(match.group(1)), match.group(2) == "n", match.group(3)
            env = {"DEEP_EP_INTRANODE_SHAPE": "narrow"} if narrow else {}
            if priority is not None:
                env["DEEP_EP_COMM_STREAM_PRIORITY"] = priority
            opts = dict(fp8=True, num_sms=num_sms, rounds=args.rounds)
            label = (
                f"dbo_streams_fp8 num_sms={num_sms} shape={'narrow' if narrow else 'auto'} "
                f"priority={priority if priority is not None else 'default'}"
            )
            try:
                launch(test_intranode.dbo_streams, 8, args=(opts,), timeout_s=180, num_gpus=1, env=env)
                print(f"{label} PASS", flush=True)
            except RankFailure as error:
                print(f"{label} FAIL {str(error).strip().splitlines()[-1][:240]}", flush=True)
                daemon.stop()  # a crashed client can leave the server refusing new ones
                daemon.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
