"""Low-latency benchmark (docs/design.md section 4): 128 tokens per rank, hidden 7168, top-8 of 288 experts, FP8
dispatch and BF16 combine; microseconds per call without the receive hook, and with it the send half and the
receive half (hook()) each alone. Calls are captured in CUDA graphs, as decoding runs them, so the figures are
GPU time without the CPU's launch cost.

Next to each time: the minimum bytes the op must move through this rank's GPU memory, and the rate that makes,
counted the way the suite's copy ceiling counts a copy (bytes read + bytes written, per second):
  dispatch  reads x (T * H * 2 bytes) and writes, for every valid (token, k), one FP8 row and its scales
            (H + H / 128 * 4 bytes) into the receiving rank's memory;
  combine   reads every row this rank received (2 * H bytes per valid (token, k) routed to its experts) and
            writes the combined tokens (T * H * 2 bytes).
Ranks sharing one GPU run concurrently through the same HBM, so a figure sums these bytes over every rank on
this rank's GPU and divides by the time of one call. The design makes more passes than this minimum (staging
buffers, the receive copy), so 100% of the copy ceiling is out of reach; the percentage says how close it gets.
"""

import statistics

import torch
import torch.distributed as dist

import deep_ep

# GPU cycles the stream sleeps before each timed part, so that the CPU has queued what follows and the events
# time GPU work only; before a receive it also lets every rank's send land first (the receive is then timed
# alone, not the wait for the slowest sender).
_SLEEP_CYCLES = 1_000_000


def _capture(fn, num_calls):
    """A CUDA graph of `num_calls` fn() calls (decode runs low-latency ops this way: no CPU cost per call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(num_calls):
            fn()
    torch.cuda.synchronize()
    return graph


def _time_graphs(parts, group, iters, flush, calls_per_sample):
    """Milliseconds of one call of each graph in `parts` (each captured with `calls_per_sample` calls, or one
    call when the part list has several graphs that alternate): medians over `iters` samples, each after an L2
    flush and a barrier; every part is preceded by a GPU sleep that no event covers."""
    times = [[] for _ in parts]
    for _ in range(iters):
        flush.zero_()
        torch.cuda.synchronize()
        dist.barrier(group)
        events = [
            [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in parts]
            for _ in range(calls_per_sample if len(parts) > 1 else 1)
        ]
        for per_part in events:
            for graph, (start, end) in zip(parts, per_part):
                torch.cuda._sleep(_SLEEP_CYCLES)
                start.record()
                graph.replay()
                end.record()
        events[-1][-1][1].synchronize()
        scale = 1 if len(parts) > 1 else calls_per_sample
        for i in range(len(parts)):
            times[i].append(sum(e[i][0].elapsed_time(e[i][1]) for e in events) / len(events) / scale)
    return [statistics.median(t) for t in times]


def _time_halves(send, group, iters, flush, calls_per_sample=8):
    """(send ms, receive ms) of an op with return_recv_hook=True (its hook is the last element of its result):
    sends and hooks captured as separate graphs and replayed alternately, each timed alone. Two (send, hook)
    pairs alternate, one per buffer half, as successive eager calls would."""
    for _ in range(2):
        send()[-1]()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    graphs = []
    for _ in range(2):
        send_graph, receive_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(send_graph, stream=side):
            hook = send()[-1]
        with torch.cuda.graph(receive_graph, stream=side):
            hook()
        graphs += [send_graph, receive_graph]
    torch.cuda.synchronize()
    times = _time_graphs(graphs, group, iters, flush, calls_per_sample // 2)
    return (times[0] + times[2]) / 2, (times[1] + times[3]) / 2


def _ranks_on_my_gpu(ctx):
    """Ranks placed on this rank's GPU by the launcher (rank % num_gpus)."""
    num_gpus = max(ctx.num_gpus, 1)
    return [r for r in range(ctx.num_ranks) if r % num_gpus == ctx.rank % num_gpus]


def bench_low_latency(ctx, group, opts, flush, copy_gbps):
    num_ranks = ctx.num_ranks
    t, h, k, e = opts["ll_num_tokens"], opts["hidden"], opts["num_topk"], opts["ll_num_experts"]
    size = f"{t} tok x {h}, top-{k}/{e}"
    if e % num_ranks != 0:
        return [("LL dispatch/combine", size, "-", "skipped", f"{e} experts do not split over {num_ranks} ranks")]
    num_local_experts, num_slots = e // num_ranks, num_ranks * t
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(t, h, num_ranks, e)
    buffer = deep_ep.Buffer(
        group,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=num_local_experts,
        explicitly_destroy=True,
    )

    torch.manual_seed(200 + ctx.rank)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    topk_idx = torch.rand(t, e, device="cuda").topk(k, dim=1).indices.to(torch.int64)
    topk_weights = torch.rand(t, k, device="cuda")
    expert_out = torch.randn(num_local_experts, num_slots, h, device="cuda").to(torch.bfloat16)
    _, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, t, e, use_fp8=True)
    torch.cuda.synchronize()

    def dispatch(hook=False):
        return buffer.low_latency_dispatch(x, topk_idx, t, e, use_fp8=True, return_recv_hook=hook)

    def combine(hook=False):
        return buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle, return_recv_hook=hook)

    iters, calls = opts["iters"], 8
    (dispatch_ms,) = _time_graphs([_capture(dispatch, calls)], group, iters, flush, calls)
    (combine_ms,) = _time_graphs([_capture(combine, calls)], group, iters, flush, calls)
    # The same calls as two kernels each (the send, then its hook at once): whether a receive that starts
    # after the whole send beats the fused kernel, whose receiving blocks poll while others still send.
    (split_dispatch_ms,) = _time_graphs(
        [_capture(lambda: dispatch(hook=True)[-1](), calls)], group, iters, flush, calls
    )
    (split_combine_ms,) = _time_graphs([_capture(lambda: combine(hook=True)[-1](), calls)], group, iters, flush, calls)
    dispatch_halves = _time_halves(lambda: dispatch(hook=True), group, iters, flush)
    combine_halves = _time_halves(lambda: combine(hook=True), group, iters, flush)

    # Bytes of this rank (see the module docstring), then summed over the ranks on this GPU: the minimum any
    # design must move, and what this design moves (send pass + receive pass).
    num_sent = int((topk_idx >= 0).sum().item())
    num_received = int(recv_count.sum().item())
    fp8_row, fp8_slot = h + h // 128 * 4, h + h // 128 * 4 + 16
    dispatch_min = t * h * 2 + num_sent * fp8_row
    combine_min = num_received * h * 2 + t * h * 2
    dispatch_design = t * h * 2 + num_sent * fp8_slot + num_received * (fp8_slot + fp8_row + 8)
    combine_design = num_received * h * 2 * 2 + num_sent * h * 2 + t * h * 2
    local = [
        dispatch_ms,
        combine_ms,
        *dispatch_halves,
        *combine_halves,
        dispatch_min,
        combine_min,
        dispatch_design,
        combine_design,
        split_dispatch_ms,
        split_combine_ms,
    ]
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, local, group=group)
    sharing = _ranks_on_my_gpu(ctx)
    # Times: mean over ranks of each rank's median (as the intranode benchmark); bytes: this GPU's ranks.
    mean = [statistics.fmean(g[i] for g in gathered) for i in range(6)]
    gpu_bytes = [sum(gathered[r][i] for r in sharing) for i in range(6, 10)]
    split = [statistics.fmean(g[i] for g in gathered) for i in (10, 11)]

    def figures(ms, min_bytes, design_bytes):
        def share(num_bytes):
            gbps = num_bytes / (ms * 1e-3) / 1e9
            return f"{num_bytes / 1e6:.0f} MB = {100 * gbps / copy_gbps:.0f}%" if copy_gbps > 0 else "no ceiling"

        return (
            f"min {share(min_bytes)}, design moves {share(design_bytes)} of copy {copy_gbps:.0f} GB/s; "
            f"{len(sharing)} rank(s) on this GPU"
        )

    # The kernels take the GPU's SMs split among the ranks sharing it (one block per SM).
    sms = str(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count // len(sharing))
    rows = []
    ops = (
        ("LL dispatch FP8", mean[0], mean[2], mean[3], gpu_bytes[0], gpu_bytes[2]),
        ("LL combine BF16", mean[1], mean[4], mean[5], gpu_bytes[1], gpu_bytes[3]),
    )
    for name, ms, _, _, min_bytes, design_bytes in ops:
        rows.append((name, size, sms, f"{ms * 1e3:.1f} us", figures(ms, min_bytes, design_bytes)))
    for (name, _, _, _, min_bytes, design_bytes), ms in zip(ops, split):
        rows.append(
            (f"{name}, send + hook back to back", size, sms, f"{ms * 1e3:.1f} us", figures(ms, min_bytes, design_bytes))
        )
    for name, _, send_ms, receive_ms, min_bytes, design_bytes in ops:
        rows.append(
            (
                f"{name} with hook: send | recv",
                size,
                sms,
                f"{send_ms * 1e3:.1f} | {receive_ms * 1e3:.1f} us",
                "sum: " + figures(send_ms + receive_ms, min_bytes, design_bytes),
            )
        )
    buffer.destroy()
    return rows
