"""`python -m deep_ep.bench`: benchmark deep_ep over the GPUs present: normal mode (intranode dispatch and
combine), low-latency mode, or both (--mode); `--mode internode` times internode normal mode on nodes of
--ranks-per-node ranks (emulated through DEEP_EP_RANKS_PER_NODE when the ranks share a host).

With one GPU, the ranks share it under a private MPS daemon (every "NVLink" byte is then an HBM byte),
so the HBM copy bandwidth of the same GPU is measured first and reported next to every figure.
Prints tables; the final table follows a line `=== SUMMARY ===`.
"""

import argparse
import os
import sys

from deep_ep.testing import launch, visible_gpu_count

from . import suite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--num-ranks", type=int, default=None, help="ranks (processes); default 8, or 16 with --mode internode"
    )
    parser.add_argument("--num-sms", type=int, default=16, help="SMs (blocks) per rank for normal mode")
    parser.add_argument("--num-tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--num-topk", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--eager-breakdown",
        action="store_true",
        help="normal mode: also time the cached ops per call on the comm stream and with events around 50 calls",
    )
    parser.add_argument("--sweep", action="store_true", help="also time queue shapes (send chunk, ring slots)")
    parser.add_argument(
        "--mode",
        choices=("all", "normal", "low_latency", "internode"),
        default="all",
        help="which ops to time: normal mode, low-latency mode, or both (default); or internode",
    )
    parser.add_argument(
        "--internode-tokens",
        type=lambda v: [int(t) for t in v.split(",") if t],
        default=None,
        help="--mode internode: comma-separated tokens per rank to time (default: --num-tokens and "
        "4x it, to show the streaming scales linearly)",
    )
    parser.add_argument(
        "--internode-sweep",
        action="store_true",
        help="--mode internode: also time other warp splits and batches (tuning)",
    )
    parser.add_argument(
        "--internode-barrier-start",
        action="store_true",
        help="--mode internode: start each timed sample at the CPU barrier, without the untimed lead-in call "
        "(the ranks leave the barrier milliseconds apart, and that skew is then in every sample)",
    )
    parser.add_argument(
        "--ranks-per-node", type=int, default=8, help="--mode internode: ranks per (emulated) node; default 8"
    )
    parser.add_argument(
        "--ll-num-tokens",
        type=int,
        default=128,
        help="low-latency mode: tokens per rank (= num_max_dispatch_tokens_per_rank)",
    )
    parser.add_argument("--ll-num-experts", type=int, default=288, help="low-latency mode: experts")
    args = parser.parse_args()

    if args.num_ranks is None:
        args.num_ranks = 16 if args.mode == "internode" else 8
    if args.mode == "internode":
        # Read by every rank when its Buffer is created: consecutive ranks form the nodes.
        os.environ["DEEP_EP_RANKS_PER_NODE"] = str(args.ranks_per_node)
    num_gpus = visible_gpu_count()
    if num_gpus == 0:
        print("deep_ep.bench: no CUDA device visible; nothing to benchmark")
        return 1
    print(
        f"deep_ep.bench: {args.num_ranks} ranks on {num_gpus} GPU(s), {args.num_sms} SMs per rank (normal mode), "
        f"mode {args.mode}"
    )
    results = launch(suite.run_rank, args.num_ranks, args=(vars(args),), timeout_s=600, num_gpus=num_gpus)
    rows = results[0]
    print("\n=== SUMMARY ===")
    suite.print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
