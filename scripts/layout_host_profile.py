"""Where the host time of an eager get_dispatch_layout call goes: each step of the call timed alone on every rank
(median microseconds over many calls), next to a plain torch launch and an empty binding call as yardsticks.

    python3 scripts/layout_host_profile.py [--num-ranks 8] [--calls 2000]

Ranks share the GPUs present (MPS when they outnumber them), as in the benchmark."""

import argparse
import statistics
import sys
import time

import torch

import deep_ep
from deep_ep._views import view
from deep_ep.testing import destroy_process_group, init_process_group, launch


def _median_us(fn, calls):
    for _ in range(50):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def run_rank(ctx, opts):
    group = init_process_group(ctx)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 22, explicitly_destroy=True)
    num_tokens, num_experts, num_topk, calls = 4096, 256, 8, opts["calls"]
    torch.manual_seed(ctx.rank + 1)
    topk_idx = torch.rand(num_tokens, num_experts, device="cuda").topk(num_topk, dim=1).indices.to(torch.int64)
    R = ctx.num_ranks
    outs = (
        torch.empty((R,), dtype=torch.int32, device="cuda"),
        torch.empty((num_experts,), dtype=torch.int32, device="cuda"),
        torch.empty((num_tokens, R), dtype=torch.bool, device="cuda"),
    )
    topk_view = view(topk_idx, "topk_idx")
    stream = torch.cuda.current_stream().cuda_stream
    dev = torch.device("cuda", torch.cuda.current_device())
    steps = {
        "get_dispatch_layout (whole call)": lambda: buffer.get_dispatch_layout(topk_idx, num_experts),
        # The steps of one call on one node: three outputs made, topk_idx viewed, the binding with addresses.
        "3 x torch.empty": lambda: [
            torch.empty((R,), dtype=torch.int32, device=dev),
            torch.empty((num_experts,), dtype=torch.int32, device=dev),
            torch.empty((num_tokens, R), dtype=torch.bool, device=dev),
        ],
        "view(topk_idx)": lambda: view(topk_idx, "topk_idx"),
        "runtime.get_dispatch_layout (inputs made)": lambda: buffer.runtime.get_dispatch_layout(
            topk_view, num_experts, outs[0].data_ptr(), 0, outs[1].data_ptr(), outs[2].data_ptr(), stream
        ),
        "torch._C._cuda_getCurrentRawStream": lambda: torch._C._cuda_getCurrentRawStream(dev.index),
        "runtime.num_nodes() (empty binding call)": lambda: buffer.runtime.num_nodes(),
        "torch launch (tensor.zero_())": lambda: outs[0].zero_(),
    }
    results = {name: _median_us(fn, calls) for name, fn in steps.items()}
    buffer.destroy()
    torch.cuda.synchronize()
    gathered = [None] * ctx.num_ranks
    torch.distributed.all_gather_object(gathered, results, group=group)
    destroy_process_group()
    return gathered


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-ranks", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    gathered = launch(run_rank, args.num_ranks, args=(vars(args),), timeout_s=300)[0]
    names = list(gathered[0])
    print(f"host microseconds per call, median over {args.calls} calls; ranks {args.num_ranks}: min / median / max")
    for name in names:
        per_rank = sorted(r[name] for r in gathered)
        print(f"  {name:45s} {per_rank[0]:7.1f} {statistics.median(per_rank):7.1f} {per_rank[-1]:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
