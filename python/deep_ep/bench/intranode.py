"""Normal-mode intranode benchmark in the DeepSeek-V3 setting (docs/design.md section 4): per-rank GB/s of
logical bytes (dispatch: BF16 recv_x bytes, x (1 + 4/128) / 2 for FP8; combine: bytes sent back), the
time of one cached-handle call, SMs per rank, and the HBM copy ceiling of the same run."""

import torch
import torch.distributed as dist

import deep_ep

from .timing import env_setting, fp8_cast, time_op, time_op_graph, time_op_per_call

# DeepEP V1 in exactly this setting (8 ranks on one H100 under MPS, 16 SMs per rank), GB/s per rank.
REFERENCE_GBPS = {"dispatch FP8": 92.0, "dispatch BF16": 93.0, "combine BF16": 107.0}
# The HBM copy (read + write) of the H100s those figures compare with, as this suite measures it. With
# every rank on one GPU both designs are bound by HBM, so on another GPU (an H200 copies about 1.4 times
# faster) the fair comparison scales DeepEP's figures by this run's copy over this one.
REFERENCE_COPY_GBPS = 2940.0


def _vs_scaled_reference(gbps, name, copy_gbps):
    if copy_gbps <= 0:
        return "no copy ceiling to scale by"
    return f"{gbps / (REFERENCE_GBPS[name] * copy_gbps / REFERENCE_COPY_GBPS):.2f}x scaled by copy"


def intranode_buffer(group, num_ranks, hidden, num_sms):
    """A Buffer sized for the recommended dispatch and combine configs of `num_ranks` ranks at `num_sms` SMs and
    BF16 rows of `hidden`: (buffer, dispatch_config, combine_config). Destroy it with buffer.destroy()."""
    deep_ep.Buffer.set_num_sms(num_sms)
    dispatch_config = deep_ep.Buffer.get_dispatch_config(num_ranks)
    combine_config = deep_ep.Buffer.get_combine_config(num_ranks)
    nvl_bytes = max(
        dispatch_config.get_nvl_buffer_size_hint(hidden * 2, num_ranks),
        combine_config.get_nvl_buffer_size_hint(hidden * 2, num_ranks),
    )
    buffer = deep_ep.Buffer(group, num_nvl_bytes=nvl_bytes, explicitly_destroy=True)
    return buffer, dispatch_config, combine_config


def bench_intranode(ctx, group, opts, flush, copy_gbps):
    num_ranks = ctx.num_ranks
    t, h, k, e = opts["num_tokens"], opts["hidden"], opts["num_topk"], opts["num_experts"]
    buffer, dispatch_config, combine_config = intranode_buffer(group, num_ranks, h, opts["num_sms"])

    torch.manual_seed(100 + ctx.rank)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    x_fp8 = fp8_cast(x)
    scores = torch.rand(t, e, device="cuda")
    topk_idx = scores.topk(k, dim=1).indices.to(torch.int64)
    topk_weights = torch.rand(t, k, device="cuda")
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, e)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        config=dispatch_config,
    )
    num_recv = recv_x.size(0)
    recv_bf16_bytes = num_recv * h * 2

    iters = opts["iters"]
    results = {}
    results["dispatch FP8"] = (
        time_op(lambda: buffer.dispatch(x_fp8, handle=handle, config=dispatch_config), group, iters, flush),
        recv_bf16_bytes * (1 + 4 / 128) / 2,
    )
    results["dispatch BF16"] = (
        time_op(lambda: buffer.dispatch(x, handle=handle, config=dispatch_config), group, iters, flush),
        recv_bf16_bytes,
    )
    results["combine BF16"] = (
        time_op(lambda: buffer.combine(recv_x, handle, config=combine_config), group, iters, flush),
        recv_bf16_bytes,
    )
    # The same ops as a training loop calls them (per-call events, eager) and replayed from a CUDA graph.
    ops = {
        "dispatch FP8": lambda: buffer.dispatch(x_fp8, handle=handle, config=dispatch_config),
        "dispatch BF16": lambda: buffer.dispatch(x, handle=handle, config=dispatch_config),
        "combine BF16": lambda: buffer.combine(recv_x, handle, config=combine_config),
    }
    modes = {}
    for name, fn in ops.items():
        host_ms = []
        eager_ms = time_op_per_call(fn, group, 50, flush, host_ms)
        modes[name] = (eager_ms, time_op_graph(fn, group, iters, flush), host_ms[0])
    pulled = buffer.runtime.last_combine_pulled()
    pushed = buffer.runtime.last_dispatch_pushed()
    # The ring dispatch (DEEP_EP_PUSH_DISPATCH=0, read per call on every rank), next to the default above.
    with env_setting("DEEP_EP_PUSH_DISPATCH", "0"):
        ring_dispatch_ms = {name: time_op(ops[name], group, iters, flush) for name in ("dispatch FP8", "dispatch BF16")}
    # The ring combine (DEEP_EP_PULL_COMBINE=0, read per call on every rank), next to the default above.
    with env_setting("DEEP_EP_PULL_COMBINE", "0"):
        ring_combine_ms = time_op(lambda: buffer.combine(recv_x, handle, config=combine_config), group, iters, flush)
    non_cached_ms = time_op(
        lambda: buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            config=dispatch_config,
        ),
        group,
        iters,
        flush,
    )

    # Mean over ranks of each rank's median time.
    local = torch.tensor(
        [results[name][0] for name in REFERENCE_GBPS]
        + [ring_combine_ms, non_cached_ms]
        + [ms for name in REFERENCE_GBPS for ms in modes[name]]
        + [ring_dispatch_ms["dispatch FP8"], ring_dispatch_ms["dispatch BF16"]]
        + [float(num_recv)],
        dtype=torch.float64,
    )
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, local.tolist(), group=group)
    mean = torch.tensor(gathered, dtype=torch.float64).mean(dim=0).tolist()
    mean_recv = mean[-1]
    rows = []
    size = f"{t} tok x {h}, top-{k}/{e}"
    for i, name in enumerate(REFERENCE_GBPS):
        ms = mean[i]
        logical = results[name][1] / num_recv * mean_recv
        gbps = logical / (ms * 1e-3) / 1e9
        rows.append(
            (
                f"{name} (cached)",
                size,
                str(opts["num_sms"]),
                f"{gbps:.0f} GB/s/rank, {ms * 1e3:.0f} us",
                f"{gbps / REFERENCE_GBPS[name]:.2f}x DeepEP ({REFERENCE_GBPS[name]:.0f}), "
                f"{_vs_scaled_reference(gbps, name, copy_gbps)}; "
                f"{num_ranks} ranks x {gbps:.0f} = {num_ranks * gbps:.0f} GB/s logical vs copy {copy_gbps:.0f}",
            )
        )
    ring_gbps = recv_bf16_bytes / num_recv * mean_recv / (mean[3] * 1e-3) / 1e9
    rows.append(
        (
            "combine BF16 (cached), ring",
            size,
            str(opts["num_sms"]),
            f"{ring_gbps:.0f} GB/s/rank, {mean[3] * 1e3:.0f} us",
            f"DEEP_EP_PULL_COMBINE=0: {ring_gbps / REFERENCE_GBPS['combine BF16']:.2f}x DeepEP; the row above "
            f"{'pulled' if pulled else 'did not pull'}, {mean[3] / mean[2]:.2f}x faster than this",
        )
    )
    for i, name in enumerate(("dispatch FP8", "dispatch BF16")):
        ms = mean[-3 + i]
        gbps = results[name][1] / num_recv * mean_recv / (ms * 1e-3) / 1e9
        rows.append(
            (
                f"{name} (cached), ring",
                size,
                str(opts["num_sms"]),
                f"{gbps:.0f} GB/s/rank, {ms * 1e3:.0f} us",
                f"DEEP_EP_PUSH_DISPATCH=0: {gbps / REFERENCE_GBPS[name]:.2f}x DeepEP; the row above "
                f"{'pushed' if pushed else 'did not push'}, {ms / mean[list(REFERENCE_GBPS).index(name)]:.2f}x faster than this",
            )
        )
    rows.append(
        (
            "dispatch BF16 (with notify)",
            size,
            str(opts["num_sms"]),
            f"{mean[4] * 1e3:.0f} us",
            f"{mean_recv:.0f} rows received per rank",
        )
    )
    for i, name in enumerate(REFERENCE_GBPS):
        eager_ms, graph_ms, host_ms = mean[5 + 3 * i], mean[6 + 3 * i], mean[7 + 3 * i]
        logical = results[name][1] / num_recv * mean_recv
        rows.append(
            (
                f"{name} (cached), eager / graph",
                size,
                str(opts["num_sms"]),
                f"eager {logical / (eager_ms * 1e-3) / 1e9:.0f}, graph {logical / (graph_ms * 1e-3) / 1e9:.0f} GB/s/rank",
                f"eager: 50 calls, events per call, median {eager_ms * 1e3:.0f} us; graph replay {graph_ms * 1e3:.0f} us "
                f"(eager / graph {eager_ms / graph_ms:.2f}x); host {host_ms * 1e3:.0f} us per call",
            )
        )
    if opts.get("eager_breakdown"):
        rows.extend(_eager_breakdown(ctx, group, flush, buffer.get_comm_stream(), ops, modes, size, opts["num_sms"]))
    if opts.get("sweep"):
        rows.extend(_sweep(ctx, group, opts, flush, buffer_args=(x, x_fp8, recv_x, handle, num_recv)))
    buffer.destroy()
    return rows


def _eager_breakdown(ctx, group, flush, comm_stream, ops, modes, size, num_sms):
    """Where an eager loop loses time against graph replay: the same 50 calls timed per call (events on the
    current stream, the op on the comm stream), per call with the comm stream current (no stream hop), and
    with events around all 50 calls only; next to the graph replay."""
    rows = []
    for name, fn in ops.items():
        with torch.cuda.stream(comm_stream):
            on_comm_ms = time_op_per_call(fn, group, 50, flush)
        back_to_back_ms = time_op(fn, group, 1, flush, calls_per_sample=50)  # events around 50 calls only
        local = [modes[name][0], on_comm_ms, back_to_back_ms, modes[name][1]]
        gathered = [None] * ctx.num_ranks
        dist.all_gather_object(gathered, local, group=group)
        per_call, on_comm, back_to_back, graph = (sum(g[i] for g in gathered) / len(gathered) for i in range(4))
        rows.append(
            (
                f"{name} (cached), eager breakdown",
                size,
                str(num_sms),
                f"{per_call * 1e3:.0f} / {on_comm * 1e3:.0f} / {back_to_back * 1e3:.0f} / {graph * 1e3:.0f} us",
                "per-call events / per-call events on the comm stream / events around 50 calls / graph replay",
            )
        )
    return rows


def _sweep(ctx, group, opts, flush, buffer_args):
    """Time cached dispatch (BF16 and FP8) and combine over queue shapes (send chunk, ring slots) at fixed num_sms.
    Where ranks share a GPU the dispatch cycles through fewer slots than a shape asks for
    (runtime/intranode_rings.hpp)."""
    x, x_fp8, recv_x, handle, num_recv = buffer_args
    num_sms, h = opts["num_sms"], opts["hidden"]
    shapes = [(1, 2), (2, 4), (2, 6), (3, 6), (2, 8), (4, 8), (3, 9), (4, 12), (6, 12), (4, 16), (8, 16), (8, 32)]
    biggest = max(deep_ep.Config(num_sms, s, q).get_nvl_buffer_size_hint(h * 2, ctx.num_ranks) for s, q in shapes)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=biggest, explicitly_destroy=True)
    rows = []
    for send, slots in shapes:
        config = deep_ep.Config(num_sms, send, slots)
        d = time_op(lambda: buffer.dispatch(x, handle=handle, config=config), group, 5, flush)
        f = time_op(lambda: buffer.dispatch(x_fp8, handle=handle, config=config), group, 5, flush)
        c = time_op(lambda: buffer.combine(recv_x, handle, config=config), group, 5, flush)
        gathered = [None] * ctx.num_ranks
        dist.all_gather_object(gathered, (d, c, f), group=group)
        d = sum(g[0] for g in gathered) / len(gathered)
        c = sum(g[1] for g in gathered) / len(gathered)
        f = sum(g[2] for g in gathered) / len(gathered)
        gb = num_recv * h * 2 / 1e9
        fp8_gb = gb * (1 + 4 / 128) / 2  # counted as the dispatch FP8 row above counts it
        rows.append(
            (
                f"sweep send={send} slots={slots}",
                "BF16",
                str(num_sms),
                f"dispatch {gb / (d * 1e-3):.0f} GB/s (FP8 {fp8_gb / (f * 1e-3):.0f}), "
                f"combine {gb / (c * 1e-3):.0f} GB/s",
                "-",
            )
        )
    buffer.destroy()
    return rows
