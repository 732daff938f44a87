"""The dual-batch-overlap case (tests/gpu/test_intranode.py dbo_streams, FP8) on 8 ranks of one GPU at several
block counts and shapes, new processes per run, to tell which one the dispatch timeouts on a shared GPU follow.

    python3 scripts/dbo_shape_sweep.py 8,8n,16,20,20 [--rounds 10]

Each entry is num_sms, with an `n` suffix for the two-blocks-per-SM shape (DEEP_EP_INTRANODE_SHAPE=narrow);
without it the runtime picks the shape. Prints one PASS / FAIL line per entry."""

import argparse
import os
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
            narrow = entry.endswith("n")
            num_sms = int(entry.rstrip("n"))
            env = {"DEEP_EP_INTRANODE_SHAPE": "narrow"} if narrow else {}
            opts = dict(fp8=True, num_sms=num_sms, rounds=args.rounds)
            label = f"dbo_streams_fp8 num_sms={num_sms} shape={'narrow' if narrow else 'auto'}"
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
