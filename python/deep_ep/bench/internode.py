"""Normal-mode internode benchmark in the DeepSeek-V3 setting (docs/design.md section 4), on emulated nodes
(DEEP_EP_RANKS_PER_NODE groups consecutive ranks; cross-node bytes take the P2P transport, so with one GPU
every byte is still an HBM byte). Per rank: the time of one cached-handle call and GB/s of three logical byte
counts: DeepEP's figure (BF16 recv_x bytes, x (1 + 4/128) / 2 for FP8; combine: the same bytes sent back),
the bytes that cross nodes ("RDMA": one row per token and remote destination node) and the bytes the node's
ranks read from their forwarders ("NVLink": one row per received row). In brackets after the time: the fastest
and slowest sample, each sample's time averaged over the ranks. Each sample starts with one untimed call after
the barrier, so that the ranks' skew in leaving the barrier is in no sample (--internode-barrier-start: without
it)."""

import math

import torch
import torch.distributed as dist

import deep_ep

from .timing import env_setting, fp8_cast, time_op, time_op_per_call


def _time(fn, group, opts, flush, samples=None):
    """time_op for an internode op: --iters samples, each led in by one untimed call unless
    --internode-barrier-start (16 processes leave a CPU barrier milliseconds apart: without the lead-in that skew
    is in every sample)."""
    return time_op(fn, group, opts["iters"], flush, samples=samples, lead_in=not opts.get("internode_barrier_start"))


def bench_internode(ctx, group, opts, flush, copy_gbps):
    """Rows for every token count of opts["internode_tokens"] (default: num_tokens and 4x it), with the
    recommended configs (V1's table: the tokens stream through rings of num_max_rdma_chunked_recv_tokens)."""
    counts = opts.get("internode_tokens") or [opts["num_tokens"], 4 * opts["num_tokens"]]
    rows, dispatch_us = [], {}
    for num_tokens in counts:
        table, us = _bench_tokens(ctx, group, dict(opts, num_tokens=num_tokens), flush, copy_gbps)
        torch.cuda.empty_cache()  # this count's tensors are gone: the next count's outputs reuse the memory
        rows += table
        dispatch_us[num_tokens] = us
    if len(counts) > 1:
        first = counts[0]
        for t in counts[1:]:
            ratios = ", ".join(
                f"{name} {dispatch_us[t][name] / dispatch_us[first][name]:.2f}x" for name in dispatch_us[first]
            )
            rows.append(
                (
                    f"internode time {t} / {first} tokens",
                    f"{t // first}x the tokens",
                    "-",
                    ratios,
                    "linear streaming gives the token ratio",
                )
            )
    return rows


# Warp splits ("senders,producers,forwarders", DEEP_EP_INTERNODE_WARPS) and ring batches the sweep times.
_SWEEP_WARPS = ("4,4,6", "2,4,6", "6,4,6", "4,8,4", "4,6,6", "4,4,8", "4,8,6")
# Dispatch batches: (nvl send, rdma send) with V1's rings (on one GPU, a round takes at most half the ring).
_SWEEP_BATCHES = ((36, 20), (36, 16), (36, 24), (36, 32), (16, 8))
_SWEEP_PUSH = (4, 16, 64)  # combine: NVL push batch with V1's rings
# Ring sizes: (dispatch RDMA ring with V1's batches; combine NVL ring, combine RDMA ring). On one GPU every rank's
# rings share its L2: smaller rings keep the rows between their writer and their reader there.
_SWEEP_RINGS = ((128, 288, 128), (64, 64, 64), (32, 32, 32), (24, 16, 24))


def _sweep(buffer, x, x_fp8, recv_x, handle, group, opts, flush):
    """Cached dispatch BF16 and combine under other warp splits and batches (same data, same Buffer), and the FP8
    dispatch under other batches and rings: one row per setting with the mean time over ranks, for tuning the
    defaults."""
    num_sms = opts["num_sms"]
    results = []
    for warps in _SWEEP_WARPS:
        with env_setting("DEEP_EP_INTERNODE_WARPS", warps):
            d = _time(
                lambda: buffer.dispatch(x, handle=handle, config=deep_ep.Config(num_sms, 36, 288, 20, 128)),
                group,
                opts,
                flush,
            )
            c = _time(
                lambda: buffer.combine(recv_x, handle, config=deep_ep.Config(num_sms, 4, 288, 12, 128)),
                group,
                opts,
                flush,
            )
        results.append((f"warps {warps}", d, c, float("nan")))
    for nvl_send, rdma_send in _SWEEP_BATCHES:
        batch_config = deep_ep.Config(num_sms, nvl_send, 288, rdma_send, 128)
        d = _time(lambda: buffer.dispatch(x, handle=handle, config=batch_config), group, opts, flush)
        f = _time(lambda: buffer.dispatch(x_fp8, handle=handle, config=batch_config), group, opts, flush)
        results.append((f"dispatch batch {rdma_send}", d, float("nan"), f))
    for push in _SWEEP_PUSH:
        c = _time(
            lambda: buffer.combine(recv_x, handle, config=deep_ep.Config(num_sms, push, 288, 12, 128)),
            group,
            opts,
            flush,
        )
        results.append((f"combine push {push}", float("nan"), c, float("nan")))
    for dispatch_ring, nvl_ring, rdma_ring in _SWEEP_RINGS:
        dispatch_config = deep_ep.Config(num_sms, 36, 288, min(20, dispatch_ring // 2), dispatch_ring)
        d = _time(lambda: buffer.dispatch(x, handle=handle, config=dispatch_config), group, opts, flush)
        f = _time(lambda: buffer.dispatch(x_fp8, handle=handle, config=dispatch_config), group, opts, flush)
        c = _time(
            lambda: buffer.combine(recv_x, handle, config=deep_ep.Config(num_sms, 4, nvl_ring, 12, rdma_ring)),
            group,
            opts,
            flush,
        )
        results.append((f"rings {dispatch_ring} / {nvl_ring},{rdma_ring}", d, c, f))
    gathered = [None] * group.size()
    dist.all_gather_object(gathered, [(d, c, f) for _, d, c, f in results], group=group)
    rows = []
    for i, (name, _, _, _) in enumerate(results):
        d = sum(g[i][0] for g in gathered) / len(gathered)
        c = sum(g[i][1] for g in gathered) / len(gathered)
        f = sum(g[i][2] for g in gathered) / len(gathered)
        fp8 = "" if math.isnan(f) else f", dispatch FP8 {f * 1e3:.0f} us"
        rows.append(
            (
                f"internode sweep {name}",
                f"{x.size(0)} tok",
                str(num_sms),
                f"dispatch BF16 {d * 1e3:.0f} us, combine {c * 1e3:.0f} us{fp8}",
                "-",
            )
        )
    return rows


def _bench_tokens(ctx, group, opts, flush, copy_gbps):
    num_ranks, rn = ctx.num_ranks, opts["ranks_per_node"]
    t, h, k, e = opts["num_tokens"], opts["hidden"], opts["num_topk"], opts["num_experts"]
    num_sms = opts["num_sms"]
    deep_ep.Buffer.set_num_sms(num_sms)
    dispatch_config = deep_ep.Buffer.get_dispatch_config(num_ranks)
    combine_config = deep_ep.Buffer.get_combine_config(num_ranks)
    nvl_bytes = max(
        c.get_nvl_buffer_size_hint(h * 2, num_ranks, num_ranks_per_node=rn) for c in (dispatch_config, combine_config)
    )
    rdma_bytes = max(
        c.get_rdma_buffer_size_hint(h * 2, num_ranks, num_ranks_per_node=rn) for c in (dispatch_config, combine_config)
    )
    buffer = deep_ep.Buffer(group, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, explicitly_destroy=True)
    assert buffer.runtime.num_nodes() == num_ranks // rn, "DEEP_EP_RANKS_PER_NODE must be set before the ranks start"

    torch.manual_seed(200 + ctx.rank)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    x_fp8 = fp8_cast(x)
    scores = torch.rand(t, e, device="cuda")
    topk_idx = scores.topk(k, dim=1).indices.to(torch.int64)
    topk_weights = torch.rand(t, k, device="cuda")
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, e)
    layout_ms = time_op_per_call(lambda: buffer.get_dispatch_layout(topk_idx, e), group, 50, flush)
    layout = dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config, **layout
    )
    num_recv = recv_x.size(0)
    node = ctx.rank // rn
    sent_per_node = handle[1][:, -1].tolist()  # tokens this rank sends to each node
    rdma_rows = sum(n for i, n in enumerate(sent_per_node) if i != node)

    cached_ops = {
        "dispatch FP8": lambda: buffer.dispatch(x_fp8, handle=handle, config=dispatch_config),
        "dispatch BF16": lambda: buffer.dispatch(x, handle=handle, config=dispatch_config),
        "combine BF16": lambda: buffer.combine(recv_x, handle, config=combine_config),
    }
    # Each op's per-sample times on this rank: the table gives the spread of the samples' means over ranks (a wide
    # one says the median hides a difference between samples).
    samples = {name: [] for name in cached_ops}
    timed = {name: _time(fn, group, opts, flush, samples=samples[name]) for name, fn in cached_ops.items()}
    with_notify = _time(
        lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config, **layout),
        group,
        opts,
        flush,
    )
    in_place = buffer.runtime.last_combine_in_place()
    sweep_rows = _sweep(buffer, x, x_fp8, recv_x, handle, group, opts, flush) if opts.get("internode_sweep") else []
    torch.cuda.synchronize()
    buffer.destroy()
    # The pushed combine (DEEP_EP_INTERNODE_IN_PLACE=0, read when a Buffer is made) next to the default above.
    timed["combine BF16, pushed"] = _pushed_combine_ms(
        group, nvl_bytes, rdma_bytes, x, topk_idx, topk_weights, layout, dispatch_config, combine_config, opts, flush
    )
    local = [timed[name] for name in timed] + [with_notify, layout_ms, float(num_recv), float(rdma_rows)]
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, (local, samples), group=group)
    mean = torch.tensor([g[0] for g in gathered], dtype=torch.float64).mean(dim=0).tolist()
    mean_notify, mean_layout, mean_recv, mean_rdma = mean[len(timed) :]
    sample_means = {
        name: [sum(g[1][name][i] for g in gathered) / num_ranks for i in range(len(samples[name]))] for name in samples
    }
    size = f"{t} tok x {h}, top-{k}/{e}, {num_ranks // rn} nodes x {rn}"
    rings = (
        f"rings: dispatch RDMA {dispatch_config.num_max_rdma_chunked_recv_tokens} rows (batch "
        f"{dispatch_config.num_max_rdma_chunked_send_tokens}), combine NVL "
        f"{combine_config.num_max_nvl_chunked_recv_tokens} / RDMA {combine_config.num_max_rdma_chunked_recv_tokens}"
    )
    rows = []
    for i, name in enumerate(timed):
        ms = mean[i]
        row_bytes = h * 2 * ((1 + 4 / 128) / 2 if "FP8" in name else 1)
        logical = mean_recv * row_bytes / (ms * 1e-3) / 1e9
        rdma = mean_rdma * row_bytes / (ms * 1e-3) / 1e9
        form = ""
        if name == "combine BF16":
            form = ", in place" if in_place else ", pushed"
        spread = ""
        if sample_means.get(name):
            spread = f" ({min(sample_means[name]) * 1e3:.0f}-{max(sample_means[name]) * 1e3:.0f})"
        rows.append(
            (
                f"internode {name} (cached){form}",
                size,
                str(num_sms),
                f"{logical:.0f} GB/s/rank, {ms * 1e3:.0f} us{spread}",
                f"RDMA {rdma:.0f} GB/s, NVLink {logical:.0f} GB/s per rank; {num_ranks} ranks x {logical:.0f} "
                f"= {num_ranks * logical:.0f} GB/s logical vs copy {copy_gbps:.0f}",
            )
        )
    rows.append(
        (
            "internode dispatch BF16 (with notify)",
            size,
            str(num_sms),
            f"{mean_notify * 1e3:.0f} us",
            f"{mean_recv:.0f} rows received, {mean_rdma:.0f} tokens sent across nodes per rank; {rings}",
        )
    )
    rows.append(
        (
            "get_dispatch_layout (with num_tokens_per_rdma_rank)",
            f"{t} tok, top-{k}/{e}, {num_ranks} ranks",
            "-",
            f"eager {mean_layout * 1e3:.1f} us/call",
            "mean over ranks of the median of 50 back-to-back calls",
        )
    )
    rows += sweep_rows
    return rows, {name: mean[i] for i, name in enumerate(timed)}


def _pushed_combine_ms(
    group, nvl_bytes, rdma_bytes, x, topk_idx, topk_weights, layout, dispatch_config, combine_config, opts, flush
):
    """Milliseconds of one cached combine on a Buffer made with DEEP_EP_INTERNODE_IN_PLACE=0 on every rank."""
    with env_setting("DEEP_EP_INTERNODE_IN_PLACE", "0"):
        buffer = deep_ep.Buffer(group, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, explicitly_destroy=True)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config, **layout
    )
    ms = _time(lambda: buffer.combine(recv_x, handle, config=combine_config), group, opts, flush)
    assert not buffer.runtime.last_combine_in_place(), "DEEP_EP_INTERNODE_IN_PLACE=0 must push rows"
    torch.cuda.synchronize()
    buffer.destroy()
    return ms
