"""The benchmark body run on every rank: CUDA-event timing with warm-up and medians, L2 flushed
between iterations, an HBM copy ceiling measured in the same run (design.md section 4)."""

import statistics

import torch
import torch.distributed as dist

import deep_ep
from deep_ep.testing import destroy_process_group, init_process_group

_L2_FLUSH_BYTES = 256 << 20


def _op_benches(mode):
    """Benchmarks of the communication ops for `mode` (all, normal, low_latency, internode):
    fn(ctx, group, opts, flush, copy_gbps) -> table rows."""
    from .internode import bench_internode
    from .intranode import bench_intranode
    from .low_latency import bench_low_latency

    if mode == "internode":
        return [bench_internode]
    benches = []
    if mode in ("all", "normal"):
        benches.append(bench_intranode)
    if mode in ("all", "low_latency"):
        benches.append(bench_low_latency)
    return benches


def time_op(fn, group, iters, flush, calls_per_sample=8):
    """Milliseconds of one fn() call: the median over `iters` samples of `calls_per_sample` back-to-back calls,
    each sample preceded by an L2 flush and a barrier. Several calls per sample amortize the ranks' start skew
    (processes leave the CPU barrier at slightly different times)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        flush.zero_()
        torch.cuda.synchronize()
        dist.barrier(group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls_per_sample):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_sample)
    return statistics.median(times)


def hbm_copy_gbps(iters=20):
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB copy, alone."""
    src = torch.randn(256 << 20, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def run_rank(ctx, opts):
    group = init_process_group(ctx)
    rows = []
    # The ceiling: one rank copies while the others wait, so the copy has the GPU to itself.
    copy_gbps = hbm_copy_gbps() if ctx.rank == 0 else 0.0
    dist.barrier(group)
    rows.append(("HBM copy (read+write), one process", "-", "-", f"{copy_gbps:.0f} GB/s", "ceiling"))

    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    mode = opts.get("mode", "all")
    if mode in ("all", "normal"):
        buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 22, explicitly_destroy=True)  # one node: ranks <= 8
        torch.manual_seed(ctx.rank + 1)
        scores = torch.rand(opts["num_tokens"], opts["num_experts"], device="cuda")
        topk_idx = scores.topk(opts["num_topk"], dim=1).indices.to(torch.int64)
        ms = time_op(lambda: buffer.get_dispatch_layout(topk_idx, opts["num_experts"]), group, opts["iters"], flush)
        rows.append(("get_dispatch_layout", f"{opts['num_tokens']} tok", "-", f"{ms * 1e3:.1f} us", "-"))
        buffer.destroy()

    for bench in _op_benches(mode):
        rows.extend(bench(ctx, group, opts, flush, copy_gbps))
    if mode in ("all", "normal"):
        from .baselines import bench_multi_gpu_baselines
        rows.extend(bench_multi_gpu_baselines(ctx, group, opts))
    gathered = [None] * ctx.num_ranks
    dist.all_gather_object(gathered, rows, group=group)
    destroy_process_group()
    return gathered[0]


def print_table(rows):
    header = ("op", "size", "SMs/rank", "result", "vs ceiling")
    widths = [max(len(str(r[i])) for r in [header] + list(rows)) for i in range(len(header))]
    for row in [header] + list(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
