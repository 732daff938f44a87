"""The benchmark body run on every rank: CUDA-event timing with warm-up and medians, L2 flushed
between iterations, an HBM copy ceiling measured in the same run (docs/design.md section 4)."""

import torch
import torch.distributed as dist

import deep_ep
from deep_ep.testing import destroy_process_group, init_process_group

from .baselines import bench_multi_gpu_baselines
from .internode import bench_internode
from .intranode import bench_intranode
from .low_latency import bench_low_latency
from .timing import (
    L2_FLUSH_BYTES,
    hbm_copy_gbps,
    hbm_write_gbps,
    time_op_graph,
    time_op_graph_alone,
    time_op_per_call,
)


def _op_benches(mode):
    """Benchmarks of the communication ops for `mode` (all, normal, low_latency, internode):
    fn(ctx, group, opts, flush, copy_gbps) -> table rows."""
    if mode == "internode":
        return [bench_internode]
    benches = []
    if mode in ("all", "normal"):
        benches.append(bench_intranode)
    if mode in ("all", "low_latency"):
        benches.append(bench_low_latency)
    return benches


def run_rank(ctx, opts):
    group = init_process_group(ctx)
    rows = []
    # The ceiling: one rank copies while the others wait, so the copy has the GPU to itself.
    copy_gbps = hbm_copy_gbps() if ctx.rank == 0 else 0.0
    write_gbps = hbm_write_gbps() if ctx.rank == 0 else 0.0
    dist.barrier(group)
    rows.append(("HBM copy (read+write), one process", "-", "-", f"{copy_gbps:.0f} GB/s", "ceiling"))
    rows.append(("HBM write (fill), one process", "-", "-", f"{write_gbps:.0f} GB/s", "ceiling of write-bound ops"))

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    mode = opts.get("mode", "all")
    if mode in ("all", "normal"):
        buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 22, explicitly_destroy=True)  # one node: ranks <= 8
        torch.manual_seed(ctx.rank + 1)
        scores = torch.rand(opts["num_tokens"], opts["num_experts"], device="cuda")
        topk_idx = scores.topk(opts["num_topk"], dim=1).indices.to(torch.int64)
        layout = lambda: buffer.get_dispatch_layout(topk_idx, opts["num_experts"])  # noqa: E731
        host_ms = []
        eager_ms = time_op_per_call(layout, group, 50, flush, host_ms)
        graph_ms = time_op_graph(layout, group, opts["iters"], flush)
        # Rank 0's kernel with the GPU to itself (the rows are rank 0's; the others wait at its barriers).
        alone_ms = time_op_graph_alone(layout, group, opts["iters"], flush)
        alone = f", alone {alone_ms * 1e3:.1f} us" if alone_ms is not None else ""
        rows.append(
            (
                "get_dispatch_layout",
                f"{opts['num_tokens']} tok, top-{opts['num_topk']}/{opts['num_experts']}",
                "-",
                f"eager {eager_ms * 1e3:.1f} us/call, graph {graph_ms * 1e3:.1f} us{alone}",
                f"host {host_ms[0] * 1e3:.0f} us/call; DeepEP V1 51-55 us/call (eager, same setting, one H100)",
            )
        )
        buffer.destroy()

    for bench in _op_benches(mode):
        rows.extend(bench(ctx, group, opts, flush, copy_gbps))
    if mode in ("all", "normal"):
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
