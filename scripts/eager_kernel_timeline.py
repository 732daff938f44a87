#!/usr/bin/env python3
"""Every rank's cached-dispatch kernels on one timeline, for the gap between eager calls and graph replay.

8 ranks on one GPU under MPS, 16 SMs, 4096 tokens x 7168, top-8 of 256. Each rank profiles its own CUDA activity
(CUPTI times share one host clock) over 8 calls, four ways:
  eager       8 calls back to back (a training loop)
  eager_sync  a synchronize after each call (nothing queued behind a running kernel)
  eager_keep  8 calls whose outputs are all kept (fresh output memory per call)
  graph       one replay of the 8 calls captured in a CUDA graph
and prints, per call, each rank's kernel start (us after the earliest rank) / duration, and the spread of the
kernels' ends. Kernels under 100 us (each call's small prologue) are left out.

    python3 scripts/eager_kernel_timeline.py [fp8|bf16]
"""

import sys

NUM_RANKS, NUM_CALLS = 8, 8
MODES = ("eager", "eager_sync", "eager_keep", "graph")


def rank_fn(ctx, dtype):
    import torch
    import torch.distributed as dist

    import deep_ep
    from deep_ep.bench.timing import fp8_cast
    from deep_ep.testing import destroy_process_group, init_process_group

    group = init_process_group(ctx)
    num_tokens, hidden, num_topk, num_experts = 4096, 7168, 8, 256
    deep_ep.Buffer.set_num_sms(16)
    config = deep_ep.Buffer.get_dispatch_config(NUM_RANKS)
    combine_config = deep_ep.Buffer.get_combine_config(NUM_RANKS)
    nvl_bytes = max(
        config.get_nvl_buffer_size_hint(hidden * 2, NUM_RANKS),
        combine_config.get_nvl_buffer_size_hint(hidden * 2, NUM_RANKS),
    )
    buffer = deep_ep.Buffer(group, num_nvl_bytes=nvl_bytes, explicitly_destroy=True)
    torch.manual_seed(100 + ctx.rank)
    x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    x_in = fp8_cast(x) if dtype == "fp8" else x
    topk_idx = torch.rand(num_tokens, num_experts, device="cuda").topk(num_topk, dim=1).indices.to(torch.int64)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    handle = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        config=config,
    )[4]

    def call():
        return buffer.dispatch(x_in, handle=handle, config=config)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(NUM_CALLS):
            call()
    graph.replay()
    torch.cuda.synchronize()

    timelines = {}
    for mode in MODES:
        dist.barrier(group)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            if mode == "eager":
                for _ in range(NUM_CALLS):
                    call()
            elif mode == "eager_sync":
                for _ in range(NUM_CALLS):
                    call()
                    torch.cuda.synchronize()
            elif mode == "eager_keep":
                kept = [call() for _ in range(NUM_CALLS)]
                del kept
            else:
                graph.replay()
            torch.cuda.synchronize()
        kernels = []
        for event in prof.profiler.kineto_results.events():
            if event.device_type() != torch.autograd.DeviceType.CUDA:
                continue
            start_us, duration_us = event.start_ns() / 1e3, event.duration_ns() / 1e3
            if duration_us > 100:
                kernels.append((start_us, duration_us))
        timelines[mode] = sorted(kernels)
    del graph
    torch.cuda.synchronize()
    buffer.destroy()
    destroy_process_group()
    return timelines


def print_timeline(mode, per_rank):
    print(f"{mode}: per call, each rank's kernel start (us after the earliest rank) / duration (us)")
    for index in range(min(len(kernels) for kernels in per_rank)):
        starts = [kernels[index][0] for kernels in per_rank]
        ends = [kernels[index][0] + kernels[index][1] for kernels in per_rank]
        first = min(starts)
        cells = " ".join(f"{kernels[index][0] - first:6.0f}/{kernels[index][1]:5.0f}" for kernels in per_rank)
        print(f"  call {index}: {cells}  end spread {max(ends) - min(ends):.0f}")


def main(argv):
    dtype = argv[0] if argv else "fp8"
    if dtype not in ("fp8", "bf16"):
        print(f"eager_kernel_timeline.py: expected fp8 or bf16, got {dtype!r}", file=sys.stderr)
        return 2
    from deep_ep.testing import MpsDaemon, launch

    with MpsDaemon():
        results = launch(rank_fn, NUM_RANKS, args=(dtype,), timeout_s=240, num_gpus=1)
    for mode in MODES:
        print_timeline(mode, [results[rank][mode] for rank in range(NUM_RANKS)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
