"""GPU tests of normal-mode internode dispatch and combine against the CPU reference, emulated on the GPUs
present: DEEP_EP_RANKS_PER_NODE groups the ranks into nodes of consecutive ranks (layouts 2x2, 2x4, 2x8,
4x4 = nodes x ranks per node), so the Buffer takes the internode path with every rank on one host."""

import gc
import os
import re
import time

import torch

import deep_ep
from common import (
    assert_equal,
    check_freed_inputs_returned,
    expect_raises,
    free_device_memory,
    setup,
    teardown,
    to_numpy,
)
from intranode_cases import (
    check_combine,
    check_dispatch,
    event_kwargs,
    make_bias,
    make_topk,
    make_x,
    reference_combine,
    reference_dispatch,
    wait_for_outputs,
)
from internode_cases import (
    LAYOUTS,
    buffer_sizes,
    check_internode_handle,
    check_rdma_layout,
    make_buffer,
    parse_layout,
    use_ranks_per_node,
)

NUM_EXPERTS = 256

# Bounded waits in tests fail fast; the timeout test lowers it further.
os.environ.setdefault("DEEP_EP_TIMEOUT_S", "30")


def _prepare(ctx, rn, opts=None, seed=0):
    """Node layout and SM count (both read when the Buffer is created), then the process group."""
    use_ranks_per_node(rn)
    deep_ep.Buffer.set_num_sms((opts or {}).get("num_sms", 8))
    return setup(ctx, seed_base=seed)


def _num_tokens(ctx, opts):
    """Uneven per rank, but no rank empty unless asked (with 16 ranks the intranode 300 - 37 * rank would
    leave whole nodes without tokens to send)."""
    base = opts.get("num_tokens", 200)
    num_tokens = base
    if opts.get("uneven", True):
        num_tokens = base - (37 * ctx.rank) % (base // 2 + 1)
    if opts.get("empty_rank") is not None and ctx.rank == opts["empty_rank"]:
        num_tokens = 0
    return num_tokens


def _layout(buffer, topk_idx, rn, label):
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    check_rdma_layout(per_rdma, in_rank, rn, label)
    return dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )


def _times_ranks_reached(x, layout):
    """What combine(dispatch(x)) must return without weights: each token's row times the ranks it reached (exact for
    small integers: the per-node partials and their sum are)."""
    return x.float() * layout["is_token_in_rank"].sum(dim=1, keepdim=True).float()


def _check_round_trip(buffer, x, layout, label, overwrite_input=False):
    """One dispatch/combine round of x: asserts the combined rows are x times the ranks each token reached. With
    overwrite_input, the combine's input is overwritten with NaN on the stream right after the call (before the
    check's host sync): a peer still reading it after this rank's combine ended would sum NaNs."""
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout)
    combined, _, _ = buffer.combine(recv_x, handle)
    if overwrite_input:
        recv_x.fill_(float("nan"))
    expected = _times_ranks_reached(x, layout)
    if not torch.equal(combined.float(), expected):
        bad = (combined.float() != expected).nonzero()[0].tolist()
        raise AssertionError(f"{label}: combine(dispatch(x)) differs at {bad}")


def _round(ctx, group, buffer, rn, opts, round_idx):
    """Layout -> dispatch -> combine -> cached dispatch of fresh data, each checked exactly. Collective."""
    hidden, num_topk = opts.get("hidden", 7168), opts.get("num_topk", 8)
    fp8, with_topk = opts.get("fp8", False), opts.get("with_topk", True)
    routing, mode = opts.get("routing", "random"), opts.get("mode", "sync")
    worst = opts.get("worst", False)
    round_sms = opts.get("round_num_sms")  # per round: a Config with that many SMs (channels), else the default
    round_rings = opts.get("round_configs")  # per round: (nvl send, nvl recv, rdma send, rdma recv)
    label = f"rank {ctx.rank} round {round_idx}"
    config = {}
    if round_sms:
        config = dict(config=deep_ep.Config(round_sms[round_idx % len(round_sms)], 8, 32, 16, 256))
    if round_rings:
        rings = round_rings[round_idx % len(round_rings)]
        config = dict(config=deep_ep.Config(opts.get("num_sms", 8), *rings))
        label += f" config {rings}"
    num_tokens = _num_tokens(ctx, opts)
    x = make_x(num_tokens, hidden, fp8)
    topk_idx = make_topk(num_tokens, NUM_EXPERTS, num_topk, ctx.num_ranks, routing)
    topk_weights = torch.rand(num_tokens, num_topk, device="cuda")
    layout = _layout(buffer, topk_idx, rn, label)
    in_rank = layout["is_token_in_rank"]
    num_worst = ctx.num_ranks * opts.get("num_tokens", 200) if worst else 0
    kwargs = dict(layout, expert_alignment=opts.get("alignment", 1), num_worst_tokens=num_worst, **config)
    if with_topk:
        kwargs.update(topk_idx=topk_idx, topk_weights=topk_weights)
    kwargs.update(event_kwargs(buffer, mode))
    recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = buffer.dispatch(x, **kwargs)
    wait_for_outputs(mode, event)
    inputs, outputs = reference_dispatch(
        group, ctx, x, topk_idx, topk_weights, in_rank, with_topk, NUM_EXPERTS, opts.get("alignment", 1), num_worst
    )
    # Outputs as intranode; the handle is the internode 10-tuple.
    check_dispatch(
        outputs[ctx.rank], recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, None, with_topk, num_worst, label
    )
    check_internode_handle(outputs[ctx.rank], handle, in_rank, ctx.rank, rn, num_worst, label)

    # Combine fresh expert outputs (bf16) of the received rows, with the received weights and bias.
    rows = (recv_x[0] if fp8 else recv_x).size(0)
    expert_out = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
    bias = make_bias(num_tokens, hidden, opts.get("bias", 0))
    combined_x, combined_weights, event = buffer.combine(
        expert_out,
        handle,
        topk_weights=recv_topk_weights if with_topk else None,
        bias=bias,
        **config,
        **event_kwargs(buffer, mode),
    )
    wait_for_outputs(mode, event)
    expected = reference_combine(
        group,
        inputs,
        outputs,
        expert_out,
        recv_topk_weights if with_topk else None,
        bias,
        hidden,
        num_topk if with_topk else 0,
        num_ranks_per_node=rn,
    )[ctx.rank]
    check_combine(expected, combined_x, combined_weights, topk_idx, topk_weights, in_rank, with_topk, label)

    # Cached dispatch with the handle: same routing, fresh x.
    x2 = make_x(num_tokens, hidden, fp8)
    cached = buffer.dispatch(x2, handle=handle, **config)
    assert cached[1] is None and cached[4] is None
    _, outputs2 = reference_dispatch(group, ctx, x2, topk_idx, topk_weights, in_rank, False, NUM_EXPERTS, 1, num_worst)
    check_dispatch(outputs2[ctx.rank], cached[0], None, None, None, None, False, num_worst, label + " cached")


def _sized_buffer(group, ctx, rn, hidden, opts):
    """make_buffer, large enough for the default configs and every config of opts["round_configs"]."""
    nvl, rdma = buffer_sizes(ctx.num_ranks, hidden, rn)
    for rings in opts.get("round_configs", ()):
        config = deep_ep.Config(opts.get("num_sms", 8), *rings)
        nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden * 2, ctx.num_ranks, num_ranks_per_node=rn))
        rdma = max(rdma, config.get_rdma_buffer_size_hint(hidden * 2, ctx.num_ranks, num_ranks_per_node=rn))
    buffer = deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, explicitly_destroy=True)
    assert buffer.runtime.num_nodes() == ctx.num_ranks // rn
    return buffer


def dispatch_combine(ctx, rn, opts):
    """One or more rounds of layout -> dispatch -> combine -> cached dispatch, each checked exactly."""
    group = _prepare(ctx, rn, opts, seed=opts.get("seed", 0))
    buffer = _sized_buffer(group, ctx, rn, opts.get("hidden", 7168), opts)
    for round_idx in range(opts.get("rounds", 1)):
        _round(ctx, group, buffer, rn, opts, round_idx)
    torch.cuda.synchronize()
    buffer.destroy()
    teardown()


def with_low_latency_ops(ctx, rn):
    """One low_latency_mode Buffer for both kinds of ops, as V1 allows (prefill and decode on one Buffer):
    internode rounds, then low-latency rounds after clean_low_latency_buffer (refused without it), then
    internode rounds again, which first restore the internode state the low-latency ops overwrote."""
    import test_low_latency as ll

    group = _prepare(ctx, rn)
    hidden = 2048
    nvl, rdma = buffer_sizes(ctx.num_ranks, hidden, rn)
    rdma = max(
        rdma, deep_ep.Buffer.get_low_latency_rdma_size_hint(ll.NUM_MAX_TOKENS, hidden, ctx.num_ranks, ll.NUM_EXPERTS)
    )
    buffer = deep_ep.Buffer(
        group,
        num_nvl_bytes=nvl,
        num_rdma_bytes=rdma,
        low_latency_mode=True,
        num_qps_per_rank=ll.NUM_EXPERTS // ctx.num_ranks,
        explicitly_destroy=True,
    )
    opts = dict(hidden=hidden, bias=1)
    for cycle in range(2):
        for i in range(2):
            _round(ctx, group, buffer, rn, opts, 2 * cycle + i)
        x, topk_idx, _ = ll._inputs(ll.NUM_MAX_TOKENS, hidden)
        expect_raises(
            ValueError,
            "clean_low_latency_buffer",
            lambda: buffer.low_latency_dispatch(x, topk_idx, ll.NUM_MAX_TOKENS, ll.NUM_EXPERTS),
        )
        buffer.clean_low_latency_buffer(ll.NUM_MAX_TOKENS, hidden, ll.NUM_EXPERTS)
        for i in range(3):  # both halves, and the first again
            ll._round(ctx, group, buffer, hidden, f"rank {ctx.rank} cycle {cycle} low-latency round {i}")
    _round(ctx, group, buffer, rn, opts, 4)
    torch.cuda.synchronize()
    buffer.destroy()
    teardown()


def back_to_back(ctx, rn, num_calls, overwrite_input=False):
    """Many dispatch/combine pairs with fresh data; combine(dispatch(x)) == x * ranks reached, checked every call.
    With overwrite_input, each combine's input is overwritten with NaN on the stream right after the call: a
    peer still reading it after this rank's combine ended would sum NaNs.

    Small integers: the per-node partials (rounded to bf16) and their sum are exact."""
    group = _prepare(ctx, rn, seed=7)
    hidden = 2048
    buffer = make_buffer(group, ctx.num_ranks, hidden, rn)
    for call in range(num_calls):
        num_tokens = int(torch.randint(0, 160, ()).item())
        topk_idx = make_topk(num_tokens, NUM_EXPERTS, 8, ctx.num_ranks, "random")
        x = torch.randint(-8, 8, (num_tokens, hidden), device="cuda").to(torch.bfloat16)
        layout = _layout(buffer, topk_idx, rn, f"rank {ctx.rank} call {call}")
        _check_round_trip(buffer, x, layout, f"rank {ctx.rank} call {call}", overwrite_input)
    buffer.destroy()
    teardown()


def inputs_freed(ctx, rn, num_rounds):
    """Every round's combine input in a fresh 64 MiB allocation, freed and the cache emptied after the combine: more
    rounds than the input exports have slots, every result checked exactly, so the freed inputs' slots must be
    retired and used again. Then, after three more combines (the first finds the freed inputs, the next ones close
    the peers' retired mappings), the GPU's free memory must be back to within two inputs per rank of what it was
    before the rounds. Small integers: combine(dispatch(x)) == x * ranks reached is exact."""
    group = _prepare(ctx, rn, seed=29)
    hidden = 2048
    buffer = make_buffer(group, ctx.num_ranks, hidden, rn)
    num_tokens = 96 + 5 * ctx.rank
    topk_idx = make_topk(num_tokens, NUM_EXPERTS, 8, ctx.num_ranks, "random")
    x = torch.randint(-8, 8, (num_tokens, hidden), device="cuda").to(torch.bfloat16)
    weights = torch.rand(num_tokens, 8, device="cuda")
    layout = _layout(buffer, topk_idx, rn, f"rank {ctx.rank}")
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    reached = layout["is_token_in_rank"].sum(dim=1, keepdim=True).float()
    routed = layout["is_token_in_rank"].any(dim=1, keepdim=True) & (topk_idx >= 0)
    input_bytes = 64 << 20
    assert recv_x.numel() * 2 <= input_bytes

    def fresh_input(sign):
        storage = torch.empty(input_bytes, dtype=torch.uint8, device="cuda")
        expert_out = storage[: recv_x.numel() * 2].view(torch.bfloat16).view_as(recv_x)
        expert_out.copy_(recv_x * sign)
        return storage, expert_out

    torch.cuda.empty_cache()
    before = free_device_memory(group)
    torch.distributed.barrier(group)  # every rank has read it before any allocates again
    for round_idx in range(num_rounds):
        torch.cuda.empty_cache()
        sign = 1 if round_idx % 2 == 0 else -1
        storage, expert_out = fresh_input(sign)
        combined, combined_w, _ = buffer.combine(expert_out, handle, topk_weights=recv_w.clone())
        if not torch.equal(combined.float(), x.float() * reached * sign):
            bad = (combined.float() != x.float() * reached * sign).nonzero()[0].tolist()
            raise AssertionError(f"rank {ctx.rank} round {round_idx}: combine(dispatch(x)) differs at {bad}")
        assert torch.equal(torch.where(routed, weights, 0.0), torch.where(routed, combined_w, 0.0)), (
            f"rank {ctx.rank} round {round_idx}: combined_topk_weights must restore the routed weights"
        )
        del combined, combined_w, expert_out, storage
        torch.distributed.barrier(group)
    torch.cuda.empty_cache()
    storage, expert_out = fresh_input(1)
    for _ in range(3):
        buffer.combine(expert_out, handle, topk_weights=recv_w)
        torch.cuda.synchronize()
        torch.distributed.barrier(group)
        time.sleep(0.2)
    check_freed_inputs_returned(group, ctx, before, input_bytes, num_rounds)
    del expert_out, storage
    buffer.destroy()
    teardown()


def streaming_identity(ctx, rn, num_tokens, hidden, rings):
    """Many more tokens per rank than the rings hold (production sizes): with small integers,
    combine(dispatch(x)) == x * ranks reached for every token, through fresh and cached dispatch, BF16 and
    FP8, so every row must have crossed every ring lap to the right place and back. `rings` as Config's
    last four arguments, or None for the default configs."""
    group = _prepare(ctx, rn, seed=13)
    opts = dict(round_configs=[rings]) if rings else {}
    buffer = _sized_buffer(group, ctx, rn, hidden, opts)
    config = dict(config=deep_ep.Config(8, *rings)) if rings else {}
    topk_idx = make_topk(num_tokens, NUM_EXPERTS, 8, ctx.num_ranks, "random")
    x = torch.randint(-8, 8, (num_tokens, hidden), device="cuda").to(torch.bfloat16)
    layout = _layout(buffer, topk_idx, rn, f"rank {ctx.rank}")
    reached = layout["is_token_in_rank"].sum(dim=1, keepdim=True).float()
    weights = torch.rand(num_tokens, 8, device="cuda")
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout, **config)
    expected_rows = int(layout["num_tokens_per_rank"].sum().item())  # rows this rank sends, for the label
    for attempt, (send_x, cached) in enumerate(((x, False), (-x, True))):
        if cached:
            recv_x = buffer.dispatch(send_x, handle=handle, **config)[0]
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, **config)
        expected = send_x.float() * reached
        if not torch.equal(combined.float(), expected):
            bad = (combined.float() != expected).nonzero()[0].tolist()
            raise AssertionError(
                f"rank {ctx.rank} ({num_tokens} tokens, {expected_rows} rows sent, attempt "
                f"{attempt}): combine(dispatch(x)) differs at {bad}"
            )
        routed = layout["is_token_in_rank"].any(dim=1, keepdim=True) & (topk_idx >= 0)
        assert torch.equal(torch.where(routed, weights, 0.0), torch.where(routed, combined_w, 0.0)), (
            f"rank {ctx.rank}: combined_topk_weights must restore the routed weights"
        )

    # FP8 rows (payload and scales) stream too: each received row is its source's, bit for bit. The
    # values are a function of (source rank, token, column), so no rank needs another's inputs.
    def fp8_rows(source, tokens):
        cols = torch.arange(hidden, device="cuda")
        bits = ((tokens[:, None] * 7 + source * 13 + cols[None, :]) % 120).to(torch.uint8)
        groups = torch.arange(hidden // 128, device="cuda")
        row_scales = (tokens[:, None] + source * 100000 + 0.5 * groups[None, :]).float()
        return bits, row_scales

    bits, row_scales = fp8_rows(ctx.rank, torch.arange(num_tokens, device="cuda"))
    scales = row_scales.t().contiguous().t()  # column-major, as DeepEP users pass them
    recv_fp8, recv_scales = buffer.dispatch((bits.view(torch.float8_e4m3fn), scales), handle=handle, **config)[0]
    src_idx = handle[7][:, 0].long()
    begin = 0
    for source, end in enumerate(handle[6].tolist()):
        if end > begin:
            want_bits, want_scales = fp8_rows(source, src_idx[begin:end])
            assert torch.equal(recv_fp8[begin:end].view(torch.uint8), want_bits), (
                f"rank {ctx.rank}: FP8 rows from rank {source} differ"
            )
            assert torch.equal(recv_scales[begin:end], want_scales), (
                f"rank {ctx.rank}: scales from rank {source} differ"
            )
        begin = end
    torch.cuda.synchronize()
    buffer.destroy()
    teardown()


def cuda_graph(ctx, rn):
    """layout + dispatch (num_worst_tokens) + combine captured in a CUDA graph, replayed with new inputs."""
    group = _prepare(ctx, rn, seed=11)
    hidden, num_tokens, num_topk = 4096, 128, 8
    buffer = make_buffer(group, ctx.num_ranks, hidden, rn)
    num_worst = num_tokens * ctx.num_ranks
    static_x = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device="cuda")
    static_topk = torch.empty(num_tokens, num_topk, dtype=torch.int64, device="cuda")
    static_w = torch.empty(num_tokens, num_topk, dtype=torch.float32, device="cuda")

    def step():
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(static_topk, NUM_EXPERTS)
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            static_x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=static_topk,
            topk_weights=static_w,
            num_worst_tokens=num_worst,
        )
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        return recv_x, recv_idx, in_rank, handle, combined, combined_w

    def fill():
        static_x.copy_(torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16))
        static_topk.copy_(make_topk(num_tokens, NUM_EXPERTS, num_topk, ctx.num_ranks, "random"))
        static_w.copy_(torch.rand(num_tokens, num_topk, device="cuda"))

    fill()
    step()  # warm-up outside the graph
    torch.cuda.synchronize()
    torch.distributed.barrier(group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for replay in range(3):
        fill()
        torch.cuda.synchronize()
        torch.distributed.barrier(group)
        graph.replay()
        torch.cuda.synchronize()
        recv_x, recv_idx, in_rank, handle, combined, combined_w = outs
        label = f"rank {ctx.rank} replay {replay}"
        inputs, outputs = reference_dispatch(
            group, ctx, static_x, static_topk, static_w, in_rank, True, NUM_EXPERTS, 1, num_worst
        )
        check_dispatch(outputs[ctx.rank], recv_x, recv_idx, None, [], None, False, num_worst, label)
        check_internode_handle(outputs[ctx.rank], handle, in_rank, ctx.rank, rn, num_worst, label)
        expected = reference_combine(group, inputs, outputs, recv_x, None, None, hidden, 0, num_ranks_per_node=rn)[
            ctx.rank
        ]
        assert_equal(f"{label} combined_x", to_numpy(combined), expected.combined_x)
        routed = in_rank.any(dim=1, keepdim=True) & (static_topk >= 0)
        assert torch.equal(torch.where(routed, static_w, 0.0), torch.where(routed, combined_w, 0.0)), (
            f"{label}: combined_topk_weights must restore the routed weights"
        )
    del graph
    torch.cuda.synchronize()
    buffer.destroy()
    teardown()


def bad_inputs(ctx, rn):
    """Wrong handle arity and a too small RDMA buffer raise ValueError before launching; the buffers stay usable."""
    group = _prepare(ctx, rn)
    hidden = 2048
    buffer = make_buffer(group, ctx.num_ranks, hidden, rn)
    topk_idx = make_topk(32, NUM_EXPERTS, 8, ctx.num_ranks, "random")
    # Small integers: the two-level sums are exact, so combine(dispatch(x)) == x * ranks reached.
    x = torch.randint(-8, 8, (32, hidden), device="cuda").to(torch.bfloat16)
    layout = _layout(buffer, topk_idx, rn, f"rank {ctx.rank}")
    expected = _times_ranks_reached(x, layout)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout)
    assert isinstance(handle, tuple) and len(handle) == 10
    for short in (handle[:6], handle[:9]):
        expect_raises(ValueError, "10-tuple", lambda: buffer.dispatch(x, handle=short))
        expect_raises(ValueError, "10-tuple", lambda: buffer.combine(recv_x, short))

    # The same NVL bytes but an RDMA buffer below the dispatch config's hint.
    config = deep_ep.Buffer.get_dispatch_config(ctx.num_ranks)
    rdma_needed = config.get_rdma_buffer_size_hint(hidden * 2, ctx.num_ranks, num_ranks_per_node=rn)
    small_rdma = min(1 << 20, rdma_needed // 2 // 128 * 128)
    assert 0 < small_rdma < rdma_needed, f"dispatch RDMA hint {rdma_needed} leaves no smaller size to test"
    small = make_buffer(group, ctx.num_ranks, hidden, rn, num_rdma_bytes=small_rdma)
    expect_raises(ValueError, "get_rdma_buffer_size_hint", lambda: small.dispatch(x, **layout))

    # The failed calls launched nothing: the first handle still combines, and a fresh round works.
    combined, _, _ = buffer.combine(recv_x, handle)
    assert torch.equal(combined.float(), expected), f"rank {ctx.rank}: combine after the errors differs"
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout)
    combined, _, _ = buffer.combine(recv_x, handle)
    assert torch.equal(combined.float(), expected), f"rank {ctx.rank}: a fresh round after the errors differs"
    torch.cuda.synchronize()
    small.destroy()
    buffer.destroy()
    teardown()


def too_few_worst_tokens(ctx, rn):
    """A dispatch whose num_worst_tokens is below the rows every rank receives: each rank raises a ValueError naming
    num_worst_tokens at its next call, the op itself completes on every rank (a value error does not end the
    rank's other waits, so no peer times out), and the next round is exact on every rank: the buffers stay usable.
    Small integers: combine(dispatch(x)) == x * ranks reached is exact."""
    group = _prepare(ctx, rn, seed=31)
    hidden = 2048
    buffer = make_buffer(group, ctx.num_ranks, hidden, rn)
    num_tokens = 96
    topk_idx = make_topk(num_tokens, NUM_EXPERTS, 8, ctx.num_ranks, "random")
    x = torch.randint(-8, 8, (num_tokens, hidden), device="cuda").to(torch.bfloat16)
    weights = torch.rand(num_tokens, 8, device="cuda")
    layout = _layout(buffer, topk_idx, rn, f"rank {ctx.rank}")
    received = int(layout["num_tokens_per_rank"].sum().item())  # rows from this rank, a lower bound elsewhere
    assert received > 8, f"rank {ctx.rank}: {received} rows leave num_worst_tokens=8 nothing to drop"
    buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, num_worst_tokens=8, **layout)
    torch.cuda.synchronize()
    expect_raises(ValueError, "num_worst_tokens", buffer.runtime.check_device_errors)
    torch.distributed.barrier(group)
    _check_round_trip(buffer, x, layout, f"rank {ctx.rank}, the round after the value error")
    buffer.destroy()
    teardown()


def timeout_names_rank_peer_phase(ctx, rn):
    """A rank that never joins: the others get TimeoutError naming rank, peer and internode; the process survives."""
    os.environ["DEEP_EP_TIMEOUT_S"] = "4"
    group = _prepare(ctx, rn)
    buffer = make_buffer(group, ctx.num_ranks, 2048, rn)
    if ctx.rank != 0:
        topk_idx = make_topk(64, NUM_EXPERTS, 8, ctx.num_ranks, "random")
        x = torch.randn(64, 2048, device="cuda").to(torch.bfloat16)
        layout = _layout(buffer, topk_idx, rn, f"rank {ctx.rank}")
        try:
            buffer.dispatch(x, **layout)
            raise AssertionError("dispatch without rank 0 must time out")
        except TimeoutError as error:
            text = str(error)
            # "rank <r>" as this rank, not as a prefix of another number or the "peer rank" part.
            names_rank = re.search(rf"(?<!peer )\brank {ctx.rank}\b", text) is not None
            assert names_rank and "peer rank" in text and "internode" in text, text
        torch.cuda.synchronize()  # the process and its CUDA context survive
        expect_raises(RuntimeError, "unusable", lambda: buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS))
    torch.distributed.barrier(group)
    teardown()


def op_forms(ctx, rn, in_place_setting, own_push_setting, expect_in_place, expect_own_push, fn, *args):
    """`fn` with DEEP_EP_INTERNODE_IN_PLACE and DEEP_EP_INTERNODE_OWN_NODE_PUSH set to the given settings (None:
    unset, the default) on every rank before `fn` makes its Buffer, which reads them (the rank processes start each
    case from their first environment). Every combine `fn` makes must have read the node's inputs in place if
    `expect_in_place`, else pushed rows, and every BF16 dispatch must have pushed the own node's rows into its ranks'
    outputs if `expect_own_push`, else staged them in the own ring; an FP8 dispatch pushes only where
    `expect_own_push` and the setting is 1. An allocation that cannot be mapped would fall back without saying, and
    the defaults must be the in-place combine and the own-node push of BF16 rows."""
    for name, setting in (
        ("DEEP_EP_INTERNODE_IN_PLACE", in_place_setting),
        ("DEEP_EP_INTERNODE_OWN_NODE_PUSH", own_push_setting),
    ):
        if setting is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = setting
    combine, dispatch = deep_ep.Buffer.combine, deep_ep.Buffer.dispatch
    combine_forms, dispatch_forms = [], []

    def recording_combine(self, *call_args, **kwargs):
        result = combine(self, *call_args, **kwargs)
        combine_forms.append(self.runtime.last_combine_in_place())
        return result

    def recording_dispatch(self, *call_args, **kwargs):
        result = dispatch(self, *call_args, **kwargs)
        x = call_args[0] if call_args else kwargs["x"]
        expected = expect_own_push and (not isinstance(x, tuple) or own_push_setting == "1")
        dispatch_forms.append((self.runtime.last_dispatch_pushed(), expected))
        return result

    deep_ep.Buffer.combine, deep_ep.Buffer.dispatch = recording_combine, recording_dispatch
    try:
        result = fn(ctx, rn, *args)
    finally:
        deep_ep.Buffer.combine, deep_ep.Buffer.dispatch = combine, dispatch
    assert combine_forms or dispatch_forms, f"rank {ctx.rank}: no dispatch or combine ran"
    assert all(form == expect_in_place for form in combine_forms), (
        f"rank {ctx.rank}: combines in place {combine_forms}, expected {'all' if expect_in_place else 'none'}"
    )
    assert all(pushed == expected for pushed, expected in dispatch_forms), (
        f"rank {ctx.rank}: dispatches (own node pushed, expected) {dispatch_forms}"
    )
    return result


def in_place(ctx, rn, fn, *args):
    """`fn` with the default settings: a BF16 dispatch pushes the own node's rows into its ranks' outputs (an FP8 one
    stages them in the own ring), the combine's forwarders read the node's inputs where they are."""
    return op_forms(ctx, rn, None, None, True, True, fn, *args)


def pushed(ctx, rn, fn, *args):
    """`fn` with DEEP_EP_INTERNODE_IN_PLACE=0: the combine's producers push their rows into the forwarders' rings,
    and without the node's exports the dispatch stages the own node's rows in the own ring too."""
    return op_forms(ctx, rn, "0", None, False, False, fn, *args)


def own_node_push_all(ctx, rn, fn, *args):
    """`fn` with DEEP_EP_INTERNODE_OWN_NODE_PUSH=1: FP8 dispatches push the own node's rows too."""
    return op_forms(ctx, rn, None, "1", True, True, fn, *args)


def own_node_ring(ctx, rn, fn, *args):
    """`fn` with DEEP_EP_INTERNODE_OWN_NODE_PUSH=0: the dispatch stages the own node's rows in the own forwarder's
    ring (as for other nodes), the combine stays in place."""
    return op_forms(ctx, rn, None, "0", True, False, fn, *args)


def unexportable_allocator(ctx, rn, fn, *args):
    """`fn` with torch's allocator on expandable_segments, whose memory CUDA IPC cannot export: the Buffer must find
    that out when it is made and take the rings (every dispatch stages the own node's rows in the own ring, every
    combine pushes rows), with the default settings; staging every tensor would be slower than the rings."""
    torch.cuda.synchronize()
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    gc.collect()
    torch.cuda.empty_cache()  # later allocations, the Buffer's probe first, come from expandable segments
    try:
        return op_forms(ctx, rn, None, None, False, False, fn, *args)
    finally:
        torch.cuda.synchronize()
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        torch.cuda.empty_cache()


def dispatch_outputs_kept(ctx, rn, num_rounds):
    """Dispatch outputs kept alive across rounds, each round's recv_x an allocation of its own: more live
    allocations than the node's exports have slots (64, 8 of them for staging), so the own-node push writes the
    later rounds' recv_x into the staging allocation and copies it out. Every round is checked exactly with fresh
    inputs, and the first two rounds' outputs again at the end: no later round may have written into them."""
    group = _prepare(ctx, rn, seed=31)
    hidden, num_topk = 7168, 8
    buffer = make_buffer(group, ctx.num_ranks, hidden, rn)
    kept, rechecked = [], []
    for round_idx in range(num_rounds):
        label = f"rank {ctx.rank} round {round_idx}"
        num_tokens = 256 - 5 * ctx.rank
        x = make_x(num_tokens, hidden, False)
        topk_idx = make_topk(num_tokens, NUM_EXPERTS, num_topk, ctx.num_ranks, "random")
        topk_weights = torch.rand(num_tokens, num_topk, device="cuda")
        layout = _layout(buffer, topk_idx, rn, label)
        received = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
        assert buffer.runtime.last_dispatch_pushed(), f"{label}: expected the own node's rows pushed"
        in_rank = layout["is_token_in_rank"]
        _, outputs = reference_dispatch(group, ctx, x, topk_idx, topk_weights, in_rank, True, NUM_EXPERTS, 1, 0)
        check_dispatch(outputs[ctx.rank], *received[:4], None, True, 0, label)
        kept.append(received[:4])
        if round_idx < 2:
            rechecked.append((round_idx, outputs[ctx.rank]))
    torch.cuda.synchronize()
    for round_idx, expected in rechecked:
        check_dispatch(expected, *kept[round_idx], None, True, 0, f"rank {ctx.rank} round {round_idx} at the end")
    del kept
    buffer.destroy()
    teardown()


def cases(rank_counts):
    out = []
    t = 240
    # V1's smallest rings and chunks next to its largest, over several calls (the ring-model edge cases).
    small_rings_sweep = dict(
        num_tokens=4096,
        hidden=256,
        bias=1,
        rounds=4,
        round_configs=[(4, 288, 4, 16), (44, 288, 32, 128), (8, 16, 6, 24), (20, 480, 12, 128)],
    )
    for r in rank_counts:
        for layout in LAYOUTS.get(r, ()):
            _, rn = parse_layout(layout)
            base = f"internode/{layout}"

            def add(name, fn, *args):
                out.append((f"{base}/{name}", fn, r, (rn,) + args, t))

            full = layout == "2x4"
            # The default combine form is in place (asserted here; the other cases take it without asserting).
            add("bf16_topk", in_place, dispatch_combine, dict(bias=1))
            # The own node's rows staged in the own ring, as before the own-node push (the combine in place).
            add("bf16_topk_own_node_ring", own_node_ring, dispatch_combine, dict(bias=1))
            add("fp8_worst_tokens_own_node_ring", own_node_ring, dispatch_combine, dict(fp8=True, worst=True))
            # FP8 rows take the own ring by default (asserted), and are pushed on request.
            add("fp8_topk_default_forms", in_place, dispatch_combine, dict(fp8=True, alignment=4))
            add("fp8_worst_tokens_own_node_push", own_node_push_all, dispatch_combine, dict(fp8=True, worst=True))
            add("bf16_topk_unexportable_allocator", unexportable_allocator, dispatch_combine, dict(bias=1))
            add("fp8_topk", dispatch_combine, dict(fp8=True, alignment=4))
            if full:
                add("bf16_no_topk", dispatch_combine, dict(with_topk=False, bias=2))
            add("fp8_worst_tokens", dispatch_combine, dict(fp8=True, worst=True))
            if full:
                # FP8 rows of 256 bytes: fewer 16-byte words than a warp has lanes.
                add("fp8_hidden_256", dispatch_combine, dict(fp8=True, hidden=256))
            if full:
                add("async", dispatch_combine, dict(mode="async", bias=2))
                add("previous_event", dispatch_combine, dict(mode="previous_event"))
                add("comm_alloc", dispatch_combine, dict(mode="comm_alloc"))
            add("edges", dispatch_combine, dict(empty_rank=r - 1, hidden=2048, num_topk=1, routing="one_rank"))
            if full:
                add(
                    "all_minus_one_topk9_h4096",
                    dispatch_combine,
                    dict(routing="all_minus_one", hidden=4096, num_topk=9),
                )
                add("topk9_multi_round", dispatch_combine, dict(hidden=4096, num_topk=9, rounds=3))
                # Ops with other channel counts on one Buffer (the done counter must stay where it is).
                add("num_sms_per_round", dispatch_combine, dict(hidden=2048, rounds=3, round_num_sms=(8, 6, 4)))
            # Streaming: token counts far beyond the rings, with V1's configs and V1's small rings.
            add("one_token", dispatch_combine, dict(num_tokens=1, uneven=False, hidden=2048))
            add("zero_tokens", dispatch_combine, dict(num_tokens=0, uneven=False, hidden=2048))
            add(
                "tokens_4096_v1_rings",
                dispatch_combine,
                dict(num_tokens=4096, hidden=512, fp8=True, round_configs=[(8, 512, 16, 128)]),
            )
            add("tokens_4096_small_rings_sweep", dispatch_combine, small_rings_sweep)
            add("tokens_16384", streaming_identity, 16384, 2048, None)
            if full:
                add("tokens_16384_v1_rings", streaming_identity, 16384, 2048, (8, 512, 16, 128))
                add(
                    "tokens_4096_worst_tokens",
                    dispatch_combine,
                    dict(num_tokens=4096, hidden=512, worst=True, round_configs=[(6, 32, 6, 32)]),
                )
            # The pushed combine (DEEP_EP_INTERNODE_IN_PLACE=0): the same checks with the producers' rows copied
            # into the forwarders' rings; the cases above run in place, the default.
            add("bf16_topk_pushed", pushed, dispatch_combine, dict(bias=1))
            add("fp8_worst_tokens_pushed", pushed, dispatch_combine, dict(fp8=True, worst=True))
            add("tokens_4096_small_rings_sweep_pushed", pushed, dispatch_combine, small_rings_sweep)
            add("cuda_graph_pushed", pushed, cuda_graph)
            add("bf16_no_topk_pushed", pushed, dispatch_combine, dict(with_topk=False, bias=2))
            add(
                "edges_pushed",
                pushed,
                dispatch_combine,
                dict(empty_rank=r - 1, hidden=2048, num_topk=1, routing="one_rank"),
            )
            add("zero_tokens_pushed", pushed, dispatch_combine, dict(num_tokens=0, uneven=False, hidden=2048))
            add("back_to_back_pushed", pushed, back_to_back, 50, True)
            # In place: fresh inputs every call (new exports and mappings), each overwritten after its call.
            add("back_to_back_in_place", in_place, back_to_back, 50, True)
            if full:
                add("inputs_freed_in_place", in_place, inputs_freed, 80)
                # More kept dispatch outputs than export slots: the later ones staged and copied out.
                add("dispatch_outputs_kept", in_place, dispatch_outputs_kept, 60)
            add("with_low_latency_ops", with_low_latency_ops)
            num_calls = 50 if r == 16 else 200
            add(f"back_to_back_{num_calls}", back_to_back, num_calls)
            add("cuda_graph", cuda_graph)
            if full:
                add("bad_inputs", bad_inputs)
                add("timeout", timeout_names_rank_peer_phase)
                add("too_few_worst_tokens", too_few_worst_tokens)
    return out
