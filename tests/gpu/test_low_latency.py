"""GPU tests of low-latency dispatch and combine (docs/compatibility.md section 8) against the CPU reference, on 2, 4, 8 ranks
sharing the GPUs present: every dispatch output and handle element exactly, combine to the bit (bf16
transport) or within the LogFMT bound, receive hooks, two results in flight, statistics, 1000 back-to-back
rounds, CUDA graphs, and rank masking (explicit and after a timeout)."""

import os
import random
import time

import torch
import torch.distributed as dist

import deep_ep
from common import expect_raises, setup, teardown
from low_latency_cases import (
    LowLatencyReference,
    expected_recv_count,
    identity_combine_excess,
    identity_combine_expected,
    make_expert_output,
    make_topk,
    make_weights,
    make_x,
    sync,
)

NUM_EXPERTS = 288  # divisible by 2, 4 and 8 ranks
NUM_MAX_TOKENS = 128  # M: num_max_dispatch_tokens_per_rank
NUM_TOPK = 8
HIDDEN = 7168
SMALL_HIDDEN = 2048  # cases whose subject is not the row size; keeps the CPU reference cheap

# Bounded waits in tests fail fast; the automatic-mask test lowers it further.
os.environ.setdefault("DEEP_EP_TIMEOUT_S", "20")


# Set by without_nvlink: every peer is then reached through the transport, as V1 does with
# allow_nvlink_for_low_latency_mode=False.
_ALLOW_NVLINK = True


def _buffer(ctx, group, hidden, enable_shrink=False):
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(NUM_MAX_TOKENS, hidden, ctx.num_ranks, NUM_EXPERTS)
    return deep_ep.Buffer(
        group,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=NUM_EXPERTS // ctx.num_ranks,
        explicitly_destroy=True,
        enable_shrink=enable_shrink,
        allow_nvlink_for_low_latency_mode=_ALLOW_NVLINK,
    )


def _geometry(ctx):
    """(L, S): local experts per rank and slots per local expert."""
    return NUM_EXPERTS // ctx.num_ranks, ctx.num_ranks * NUM_MAX_TOKENS


def _inputs(num_tokens, hidden, drop_prob=0.1, num_empty_tokens=0):
    return (
        make_x(num_tokens, hidden),
        make_topk(num_tokens, NUM_EXPERTS, NUM_TOPK, drop_prob=drop_prob, num_empty_tokens=num_empty_tokens),
        make_weights(num_tokens, NUM_TOPK),
    )


def _finish(mode, event, hook):
    """Make an op's outputs usable on the current stream: call the receive hook (after some unrelated work
    that stands in for the compute it overlaps) or wait for the async event."""
    if mode == "hook":
        a = torch.randn(1024, 1024, device="cuda")
        a = a @ a
        hook()
    elif mode == "async":
        event.current_stream_wait()


def _combine(buffer, y, topk_idx, topk_weights, handle, mode, kind):
    """One combine of expert outputs y in the given mode (sync, hook, async) and kind (plain, logfmt, out,
    zero_copy: x is the buffer view, zero_copy_v1: V1's own pattern, x is a tensor holding the same rows).
    Returns combined_x."""
    x, kwargs = y, dict(async_finish=mode == "async", return_recv_hook=mode == "hook")
    if kind == "logfmt":
        kwargs["use_logfmt"] = True
    elif kind in ("zero_copy", "zero_copy_v1"):
        send = buffer.get_next_low_latency_combine_buffer(handle)
        assert send.dtype == torch.bfloat16 and send.shape == y.shape, (
            f"get_next_low_latency_combine_buffer: expected bf16 {tuple(y.shape)}, got {send.dtype} {tuple(send.shape)}"
        )
        send.copy_(y)
        x = send if kind == "zero_copy" else y
        kwargs["zero_copy"] = True
    elif kind == "out":
        # Stale NaNs: every element must be overwritten.
        kwargs["out"] = torch.full((topk_idx.size(0), y.size(-1)), float("nan"), dtype=torch.bfloat16, device="cuda")
    elif kind != "plain":
        raise ValueError(f"unknown combine kind {kind!r}")
    combined_x, event, hook = buffer.low_latency_combine(x, topk_idx, topk_weights, handle, **kwargs)
    _finish(mode, event, hook)
    if kind == "out":
        assert combined_x is kwargs["out"], "low_latency_combine(out=...) must return the out tensor itself"
    return combined_x


def _round(
    ctx,
    group,
    buffer,
    hidden,
    label,
    num_tokens=NUM_MAX_TOKENS,
    mode="sync",
    kind="plain",
    use_fp8=True,
    round_scale=False,
    use_ue8m0=False,
    drop_prob=0.1,
    num_empty_tokens=0,
):
    """Fresh inputs -> dispatch (checked exactly) -> combine of fresh expert outputs (checked). Collective."""
    L, S = _geometry(ctx)
    x, topk_idx, topk_weights = _inputs(num_tokens, hidden, drop_prob, num_empty_tokens)
    flags = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
    sync(group)
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, NUM_MAX_TOKENS, NUM_EXPERTS, async_finish=mode == "async", return_recv_hook=mode == "hook", **flags
    )
    _finish(mode, event, hook)
    reference = LowLatencyReference(group, ctx, x, topk_idx, NUM_EXPERTS, NUM_MAX_TOKENS, **flags)
    reference.check_dispatch(recv_x, recv_count, handle, f"{label} dispatch")

    y = make_expert_output(L, S, hidden)
    sync(group)
    combined_x = _combine(buffer, y, topk_idx, topk_weights, handle, mode, kind)
    reference.check_combine(y, topk_weights, combined_x, f"{label} combine ({kind})", logfmt=kind == "logfmt")


def dispatch_combine(ctx, opts):
    """Rounds of dispatch + combine checked against the reference, one per combine kind in opts["combine"]."""
    group = setup(ctx, seed_base=opts.get("seed", 0))
    hidden = opts.get("hidden", HIDDEN)
    buffer = _buffer(ctx, group, hidden)
    num_tokens = NUM_MAX_TOKENS
    if opts.get("fewer_tokens"):
        # Fewer than M tokens, a different count on every rank, and none at all on one rank.
        num_tokens = 0 if ctx.rank == ctx.num_ranks // 2 else max(1, NUM_MAX_TOKENS - 1 - 23 * ctx.rank)
    for i, kind in enumerate(opts.get("combine", ("plain",))):
        _round(
            ctx,
            group,
            buffer,
            hidden,
            f"rank {ctx.rank} round {i}",
            num_tokens=num_tokens,
            mode=opts.get("mode", "sync"),
            kind=kind,
            use_fp8=opts.get("use_fp8", True),
            round_scale=opts.get("round_scale", False),
            use_ue8m0=opts.get("use_ue8m0", False),
            drop_prob=opts.get("drop_prob", 0.1),
            num_empty_tokens=opts.get("num_empty_tokens", 0),
        )
    sync(group)
    buffer.destroy()
    teardown()


def two_micro_batches(ctx, opts):
    """Two dispatches with receive hooks in flight at once (both buffer halves), then both hooks; the same
    for the two combines. Each result checked against its own reference."""
    group = setup(ctx, seed_base=3)
    hidden = opts.get("hidden", SMALL_HIDDEN)
    buffer = _buffer(ctx, group, hidden)
    L, S = _geometry(ctx)
    batches = [_inputs(NUM_MAX_TOKENS - 9 * b, hidden) for b in range(2)]
    sync(group)
    dispatched = [
        buffer.low_latency_dispatch(x, topk_idx, NUM_MAX_TOKENS, NUM_EXPERTS, return_recv_hook=True)
        for x, topk_idx, _ in batches
    ]
    for result in dispatched:
        result[4]()
    references = []
    for b, ((x, topk_idx, _), (recv_x, recv_count, handle, _, _)) in enumerate(zip(batches, dispatched)):
        reference = LowLatencyReference(group, ctx, x, topk_idx, NUM_EXPERTS, NUM_MAX_TOKENS)
        reference.check_dispatch(recv_x, recv_count, handle, f"rank {ctx.rank} micro-batch {b} dispatch")
        references.append(reference)

    ys = [make_expert_output(L, S, hidden) for _ in batches]
    sync(group)
    combined = [
        buffer.low_latency_combine(y, topk_idx, topk_weights, result[2], return_recv_hook=True)
        for y, (_, topk_idx, topk_weights), result in zip(ys, batches, dispatched)
    ]
    for result in combined:
        result[2]()
    for b, (reference, y, (_, _, topk_weights), result) in enumerate(zip(references, ys, batches, combined)):
        reference.check_combine(y, topk_weights, result[0], f"rank {ctx.rank} micro-batch {b} combine")
    sync(group)
    buffer.destroy()
    teardown()


def _check_wait_costs(label, snapshots):
    """int64 [R] cycle counters: never negative, never decreasing, and some waiting was counted."""
    snapshots = [s.cpu() for s in snapshots]
    for i, (before, after) in enumerate(zip(snapshots, snapshots[1:])):
        assert after.dtype == torch.int64 and bool((after >= 0).all()), f"{label} after call {i}: {after.tolist()}"
        assert bool((after >= before).all()), f"{label} decreased in call {i}: {before.tolist()} -> {after.tolist()}"
    assert int(snapshots[-1].sum()) > int(snapshots[0].sum()), f"{label} did not grow: {snapshots[-1].tolist()}"


def stats(ctx, opts):
    """Three dispatches back to back with statistics, then their three combines: the cumulative per-expert
    count grows by exactly recv_count per call; the wait-cost counters only grow."""
    group = setup(ctx, seed_base=5)
    hidden = opts.get("hidden", SMALL_HIDDEN)
    buffer = _buffer(ctx, group, hidden)
    L, S = _geometry(ctx)
    initial = torch.randint(0, 1000, (L,), dtype=torch.int32, device="cuda")
    cumulative = initial.clone()
    dispatch_wait = torch.zeros(ctx.num_ranks, dtype=torch.int64, device="cuda")
    combine_wait = torch.zeros(ctx.num_ranks, dtype=torch.int64, device="cuda")
    dispatch_snapshots, combine_snapshots = [dispatch_wait.clone()], [combine_wait.clone()]

    rounds = [_inputs(NUM_MAX_TOKENS - 5 * i, hidden) for i in range(3)]
    sync(group)
    dispatched = []
    for x, topk_idx, _ in rounds:
        dispatched.append(
            buffer.low_latency_dispatch(
                x,
                topk_idx,
                NUM_MAX_TOKENS,
                NUM_EXPERTS,
                cumulative_local_expert_recv_stats=cumulative,
                dispatch_wait_recv_cost_stats=dispatch_wait,
            )
        )
        dispatch_snapshots.append(dispatch_wait.clone())
    expected = initial.long() + sum(result[1].long() for result in dispatched)
    assert torch.equal(cumulative.long(), expected), (
        f"rank {ctx.rank}: cumulative_local_expert_recv_stats {cumulative.tolist()} != {expected.tolist()}"
    )

    for i, ((x, topk_idx, topk_weights), (recv_x, recv_count, handle, _, _)) in enumerate(zip(rounds, dispatched)):
        label = f"rank {ctx.rank} call {i}"
        reference = LowLatencyReference(group, ctx, x, topk_idx, NUM_EXPERTS, NUM_MAX_TOKENS)
        reference.check_dispatch(recv_x, recv_count, handle, f"{label} dispatch")
        y = make_expert_output(L, S, hidden)
        sync(group)
        combined_x, _, _ = buffer.low_latency_combine(
            y, topk_idx, topk_weights, handle, combine_wait_recv_cost_stats=combine_wait
        )
        combine_snapshots.append(combine_wait.clone())
        reference.check_combine(y, topk_weights, combined_x, f"{label} combine")
    _check_wait_costs(f"rank {ctx.rank} dispatch_wait_recv_cost_stats", dispatch_snapshots)
    _check_wait_costs(f"rank {ctx.rank} combine_wait_recv_cost_stats", combine_snapshots)
    sync(group)
    buffer.destroy()
    teardown()


def many_rounds(ctx, num_rounds):
    """Back-to-back dispatch + combine rounds with fresh data, 0 to M tokens each, identity experts (combine
    gets recv_x back): every round's combine is checked on the GPU against x_t * sum_k w_k without a host sync;
    the first and last rounds also against the CPU reference."""
    group = setup(ctx, seed_base=9)
    hidden = SMALL_HIDDEN
    buffer = _buffer(ctx, group, hidden)
    rng = random.Random(1000 + ctx.rank)
    excess = torch.zeros(num_rounds, device="cuda")
    sync(group)
    for i in range(num_rounds):
        x, topk_idx, topk_weights = _inputs(rng.randint(0, NUM_MAX_TOKENS), hidden)
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, NUM_MAX_TOKENS, NUM_EXPERTS, use_fp8=False
        )
        combined_x, _, _ = buffer.low_latency_combine(recv_x, topk_idx, topk_weights, handle)
        excess[i] = identity_combine_excess(combined_x, identity_combine_expected(x, topk_idx, topk_weights))
        if i in (0, num_rounds - 1):
            label = f"rank {ctx.rank} round {i}"
            reference = LowLatencyReference(group, ctx, x, topk_idx, NUM_EXPERTS, NUM_MAX_TOKENS, use_fp8=False)
            reference.check_dispatch(recv_x, recv_count, handle, f"{label} dispatch")
            reference.check_combine(recv_x, topk_weights, combined_x, f"{label} combine")
            sync(group)
    bad = (excess > 0).nonzero().flatten().tolist()
    if bad:
        raise AssertionError(
            f"rank {ctx.rank}: combine(dispatch(x)) with identity experts is off x * sum(w) by "
            f"more than 2^-6 of its magnitude in {len(bad)} of {num_rounds} rounds; first round "
            f"{bad[0]} (excess {excess[bad[0]].item():.4g})"
        )
    sync(group)
    buffer.destroy()
    teardown()


def cuda_graph(ctx, opts):
    """dispatch + identity expert (a copy of recv_x) + combine captured in one CUDA graph with static inputs,
    replayed with new inputs; every replay checked (recv_count exactly, combine to 2^-6 of x * sum(w) on the GPU)."""
    group = setup(ctx, seed_base=11)
    hidden = opts.get("hidden", HIDDEN)
    buffer = _buffer(ctx, group, hidden)
    static_x = torch.empty(NUM_MAX_TOKENS, hidden, dtype=torch.bfloat16, device="cuda")
    static_topk_idx = torch.empty(NUM_MAX_TOKENS, NUM_TOPK, dtype=torch.int64, device="cuda")
    static_weights = torch.empty(NUM_MAX_TOKENS, NUM_TOPK, dtype=torch.float32, device="cuda")

    def fill():
        for static, fresh in zip((static_x, static_topk_idx, static_weights), _inputs(NUM_MAX_TOKENS, hidden)):
            static.copy_(fresh)

    def step():
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            static_x, static_topk_idx, NUM_MAX_TOKENS, NUM_EXPERTS, use_fp8=False
        )
        y = torch.empty_like(recv_x)
        y.copy_(recv_x)
        combined_x, _, _ = buffer.low_latency_combine(y, static_topk_idx, static_weights, handle)
        return recv_count, combined_x

    fill()
    sync(group)
    # Warm-up outside the graph, on a side stream as torch asks of code about to be captured.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    sync(group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_count, combined_x = step()
    for replay in range(5):
        fill()
        sync(group)
        graph.replay()
        torch.cuda.synchronize()
        label = f"rank {ctx.rank} replay {replay}"
        counts = expected_recv_count(group, static_topk_idx, NUM_EXPERTS, ctx.rank, ctx.num_ranks)
        assert recv_count.tolist() == counts.tolist(), f"{label}: recv_count {recv_count.tolist()} != {counts.tolist()}"
        excess = identity_combine_excess(
            combined_x, identity_combine_expected(static_x, static_topk_idx, static_weights)
        ).item()
        assert excess <= 0, f"{label}: combined_x is off x * sum(w) by more than 2^-6 of it (excess {excess:.4g})"
    del graph
    sync(group)
    buffer.destroy()
    teardown()


def _query_mask(buffer, num_ranks):
    status = torch.full((num_ranks,), -1, dtype=torch.int32, device="cuda")
    buffer.low_latency_query_mask_buffer(status)
    return status.tolist()


def _round_without_last_rank(ctx, group, buffer, hidden, label, wait_for_timeout):
    """Ranks 0..R-2 dispatch and combine while rank R-1 sits out (at a gloo barrier); then everyone checks
    against the reference in which rank R-1 has no tokens and its experts are masked in combine."""
    L, S = _geometry(ctx)
    last = ctx.num_ranks - 1
    active = ctx.rank != last
    x, topk_idx, topk_weights = _inputs(NUM_MAX_TOKENS if active else 0, hidden)
    sync(group)
    recv_x = recv_count = handle = y = combined_x = None
    if active:
        start = time.monotonic()
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, NUM_MAX_TOKENS, NUM_EXPERTS)
        torch.cuda.synchronize()
        waited = time.monotonic() - start
        if wait_for_timeout:
            print(f"{label}: dispatch without rank {last} returned after {waited:.1f} s", flush=True)
        y = make_expert_output(L, S, hidden)
        combined_x, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
        torch.cuda.synchronize()
    dist.barrier(group)
    reference = LowLatencyReference(group, ctx, x, topk_idx, NUM_EXPERTS, NUM_MAX_TOKENS)
    if active:
        reference.check_dispatch(recv_x, recv_count, handle, f"{label} dispatch")
    reference.check_combine(y, topk_weights if active else None, combined_x, f"{label} combine", masked_ranks=(last,))


def _rejoin(ctx, group, buffer, hidden, label):
    """Everyone clears the masks and resets the low-latency state (collective), then one exact round."""
    buffer.low_latency_clean_mask_buffer()
    buffer.clean_low_latency_buffer(NUM_MAX_TOKENS, hidden, NUM_EXPERTS)
    status = _query_mask(buffer, ctx.num_ranks)
    assert status == [0] * ctx.num_ranks, f"{label}: mask after low_latency_clean_mask_buffer is {status}"
    _round(ctx, group, buffer, hidden, f"{label} after rejoin")


def mask_rank(ctx, opts):
    """Every rank masks rank R-1; the others run without it; then masks are cleared and all ranks run again."""
    group = setup(ctx, seed_base=13)
    hidden = opts.get("hidden", SMALL_HIDDEN)
    buffer = _buffer(ctx, group, hidden, enable_shrink=True)
    last = ctx.num_ranks - 1
    label = f"rank {ctx.rank}"
    buffer.low_latency_update_mask_buffer(last, True)
    status = _query_mask(buffer, ctx.num_ranks)
    assert status == [0] * last + [1], f"{label}: mask after masking rank {last} is {status}"
    _round_without_last_rank(ctx, group, buffer, hidden, f"{label} masked", wait_for_timeout=False)
    status = _query_mask(buffer, ctx.num_ranks)
    assert status == [0] * last + [1], f"{label}: mask after the masked round is {status}"
    _rejoin(ctx, group, buffer, hidden, label)
    sync(group)
    buffer.destroy()
    teardown()


def auto_mask(ctx, opts):
    """Rank R-1 skips a dispatch (and its combine): the others' dispatch returns after the timeout instead of
    hanging, with rank R-1 masked; after clearing the masks all ranks run exactly again."""
    os.environ["DEEP_EP_TIMEOUT_S"] = "3"  # read when the buffer is created
    group = setup(ctx, seed_base=17)
    hidden = opts.get("hidden", SMALL_HIDDEN)
    buffer = _buffer(ctx, group, hidden, enable_shrink=True)
    last = ctx.num_ranks - 1
    label = f"rank {ctx.rank}"
    _round_without_last_rank(ctx, group, buffer, hidden, f"{label} silent rank {last}", wait_for_timeout=True)
    if ctx.rank != last:
        status = _query_mask(buffer, ctx.num_ranks)
        assert status == [0] * last + [1], f"{label}: rank {last} should be masked after its timeout, mask {status}"
    dist.barrier(group)
    _rejoin(ctx, group, buffer, hidden, label)
    sync(group)
    buffer.destroy()
    teardown()


def bad_input(ctx, opts):
    """Bad arguments raise before any launch, naming the argument; the buffer then works normally."""
    group = setup(ctx, seed_base=19)
    hidden = SMALL_HIDDEN
    buffer = _buffer(ctx, group, hidden)
    M, E = NUM_MAX_TOKENS, NUM_EXPERTS
    x, topk_idx, topk_weights = _inputs(M, hidden)
    big_x, big_topk_idx, _ = _inputs(M + 1, hidden)
    dispatch = buffer.low_latency_dispatch
    expect_raises(ValueError, "num_max_dispatch_tokens_per_rank", lambda: dispatch(big_x, big_topk_idx, M, E))
    expect_raises(TypeError, "x must be torch.bfloat16", lambda: dispatch(x.float(), topk_idx, M, E))
    # A dtype the library takes nowhere: the message must still name the argument.
    expect_raises(TypeError, "x", lambda: dispatch(x.half(), topk_idx, M, E))
    expect_raises(TypeError, "topk_idx must be torch.int64", lambda: dispatch(x, topk_idx.int(), M, E))
    expect_raises(
        ValueError, "return_recv_hook", lambda: dispatch(x, topk_idx, M, E, async_finish=True, return_recv_hook=True)
    )
    expect_raises(ValueError, "round_scale", lambda: dispatch(x, topk_idx, M, E, use_ue8m0=True))

    # Nothing was launched: a normal dispatch works, then the combine's own argument checks.
    sync(group)
    recv_x, recv_count, handle, _, _ = dispatch(x, topk_idx, M, E)
    reference = LowLatencyReference(group, ctx, x, topk_idx, E, M)
    reference.check_dispatch(recv_x, recv_count, handle, f"rank {ctx.rank} dispatch after bad input")
    L, S = _geometry(ctx)
    y = make_expert_output(L, S, hidden)
    combine = buffer.low_latency_combine
    expect_raises(
        ValueError,
        "return_recv_hook",
        lambda: combine(y, topk_idx, topk_weights, handle, async_finish=True, return_recv_hook=True),
    )
    bf16_weights = topk_weights.bfloat16()
    expect_raises(TypeError, "topk_weights must be torch.float32", lambda: combine(y, topk_idx, bf16_weights, handle))
    half_rows = y[:, :, : hidden // 2]
    expect_raises(ValueError, "x", lambda: combine(half_rows, topk_idx, topk_weights, handle))
    sync(group)
    combined_x, _, _ = combine(y, topk_idx, topk_weights, handle)
    reference.check_combine(y, topk_weights, combined_x, f"rank {ctx.rank} combine after bad input")
    sync(group)
    buffer.destroy()
    teardown()


def on_emulated_nodes(ctx, num_ranks_per_node, case_name, *args):
    """Runs a case with the ranks grouped into nodes (read when the Buffer is created): low-latency
    traffic to the other node's ranks then crosses an (emulated) node boundary."""
    os.environ["DEEP_EP_RANKS_PER_NODE"] = str(num_ranks_per_node)
    return globals()[case_name](ctx, *args)


def without_nvlink(ctx, case_name, *args):
    """Runs a case with allow_nvlink_for_low_latency_mode=False: every peer, not only those on other
    nodes, is then reached through the transport (staged puts, added signals)."""
    global _ALLOW_NVLINK
    _ALLOW_NVLINK = False
    return globals()[case_name](ctx, *args)


def on_nccl_window(ctx, case_name, *args):
    """Runs a case on a Buffer whose memory is an NCCL window with its peers mapped by NCCL (what a group
    spanning hosts with GIN gets), forced on one host: the halves, signals and staging live in it."""
    os.environ["DEEP_EP_FORCE_NCCL_WINDOW"] = "1"
    return globals()[case_name](ctx, *args)


def cases(rank_counts):
    out = []
    heavy, light = 300, 180
    for r in rank_counts:
        if r < 2 or NUM_EXPERTS % r != 0:
            continue
        base = f"low_latency/r{r}"
        small = dict(hidden=SMALL_HIDDEN)
        out.append((f"{base}/bf16", dispatch_combine, r, (dict(use_fp8=False),), heavy))
        out.append((f"{base}/fp8", dispatch_combine, r, (dict(),), heavy))
        out.append((f"{base}/fp8_round_scale", dispatch_combine, r, (dict(round_scale=True),), heavy))
        out.append((f"{base}/fp8_ue8m0", dispatch_combine, r, (dict(round_scale=True, use_ue8m0=True),), heavy))
        out.append((f"{base}/hook", dispatch_combine, r, (dict(small, mode="hook"),), light))
        out.append((f"{base}/two_micro_batches", two_micro_batches, r, (dict(),), light))
        out.append((f"{base}/logfmt", dispatch_combine, r, (dict(small, combine=("logfmt",)),), light))
        out.append(
            (f"{base}/zero_copy", dispatch_combine, r, (dict(small, combine=("zero_copy", "zero_copy_v1")),), light)
        )
        out.append((f"{base}/out", dispatch_combine, r, (dict(small, combine=("out",)),), light))
        out.append((f"{base}/fewer_tokens", dispatch_combine, r, (dict(small, fewer_tokens=True),), light))
        out.append((f"{base}/minus_one", dispatch_combine, r, (dict(small, drop_prob=0.5, num_empty_tokens=1),), light))
        out.append((f"{base}/async", dispatch_combine, r, (dict(small, mode="async"),), light))
        out.append((f"{base}/stats", stats, r, (dict(),), light))
        out.append((f"{base}/rounds_1000", many_rounds, r, (1000,), heavy))
        out.append((f"{base}/cuda_graph", cuda_graph, r, (dict(),), light))
        out.append((f"{base}/mask", mask_rank, r, (dict(),), light))
        out.append((f"{base}/auto_mask", auto_mask, r, (dict(),), light))
    for r in rank_counts:
        if r not in (8, 16):
            continue
        base = f"low_latency/2x{r // 2}"
        for name, fn, args in (
            ("bf16", "dispatch_combine", (dict(use_fp8=False),)),
            ("fp8", "dispatch_combine", (dict(),)),
            ("hook", "dispatch_combine", (dict(hidden=SMALL_HIDDEN, mode="hook"),)),
            (
                "logfmt_zero_copy",
                "dispatch_combine",
                (dict(hidden=SMALL_HIDDEN, combine=("logfmt", "zero_copy", "zero_copy_v1")),),
            ),
            ("fewer_tokens", "dispatch_combine", (dict(hidden=SMALL_HIDDEN, fewer_tokens=True),)),
            ("two_micro_batches", "two_micro_batches", (dict(),)),
            ("cuda_graph", "cuda_graph", (dict(),)),
            ("mask", "mask_rank", (dict(),)),
            ("auto_mask", "auto_mask", (dict(),)),
        ):
            out.append((f"{base}/{name}", on_emulated_nodes, r, (r // 2, fn, *args), heavy))
    for r in rank_counts:
        if r not in (2, 4):
            continue
        base = f"low_latency/r{r}_no_nvlink"
        for name, fn, args in (
            ("bf16", "dispatch_combine", (dict(use_fp8=False),)),
            ("fp8_ue8m0", "dispatch_combine", (dict(round_scale=True, use_ue8m0=True),)),
            (
                "hook_logfmt_zero_copy",
                "dispatch_combine",
                (dict(hidden=SMALL_HIDDEN, mode="hook", combine=("logfmt", "zero_copy", "zero_copy_v1")),),
            ),
            ("minus_one", "dispatch_combine", (dict(hidden=SMALL_HIDDEN, drop_prob=0.5, num_empty_tokens=1),)),
            ("odd_hidden", "dispatch_combine", (dict(hidden=1152, fewer_tokens=True),)),
            ("rounds_200", "many_rounds", (200,)),
        ):
            out.append((f"{base}/{name}", without_nvlink, r, (fn, *args), heavy))
    # NCCL takes one GPU per rank, and the build must have GIN.
    from deep_ep import _C
    from deep_ep.testing import visible_gpu_count

    if _C.gin_compiled():
        for r in rank_counts:
            if r >= 2 and NUM_EXPERTS % r == 0 and r <= visible_gpu_count():
                out.append((f"low_latency/r{r}/nccl_window", on_nccl_window, r, ("dispatch_combine", dict()), heavy))
                out.append(
                    (
                        f"low_latency/r{r}_no_nvlink/nccl_window",
                        without_nvlink,
                        r,
                        ("on_nccl_window", "dispatch_combine", dict(hidden=SMALL_HIDDEN, mode="hook")),
                        heavy,
                    )
                )
    valid = [r for r in rank_counts if r >= 2 and NUM_EXPERTS % r == 0]
    if valid:
        out.append((f"low_latency/r{min(valid)}/bad_input", bad_input, min(valid), ({},), light))
    return out
