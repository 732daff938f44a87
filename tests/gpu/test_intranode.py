"""GPU tests of intranode dispatch and combine against the CPU reference (2, 4, 8 ranks on the GPUs
present; several ranks share a GPU under MPS)."""

import gc
import os
import time

import torch

import deep_ep
from common import (
    StallWatchdog,
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

NUM_EXPERTS = 256

# Bounded waits in tests fail fast; the timeout test lowers it further.
os.environ.setdefault("DEEP_EP_TIMEOUT_S", "20")


def _buffer(group, hidden, num_sms=None):
    num_sms = num_sms or deep_ep.Buffer.num_sms
    num_ranks = group.size() if hasattr(group, "size") else torch.distributed.get_world_size(group)
    hint = max(
        deep_ep.Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden * 2, num_ranks),
        deep_ep.Buffer.get_combine_config(num_ranks).get_nvl_buffer_size_hint(hidden * 2, num_ranks),
    )
    return deep_ep.Buffer(group, num_nvl_bytes=hint, explicitly_destroy=True)


def dispatch_combine(ctx, opts):
    """One or more rounds of layout -> dispatch -> combine -> cached dispatch, each checked exactly."""
    group = setup(ctx, seed_base=opts.get("seed", 0))
    hidden, num_topk = opts.get("hidden", 7168), opts.get("num_topk", 8)
    fp8, with_topk = opts.get("fp8", False), opts.get("with_topk", True)
    routing, mode = opts.get("routing", "random"), opts.get("mode", "sync")
    worst = opts.get("worst", False)
    deep_ep.Buffer.set_num_sms(opts.get("num_sms", 20))
    if opts.get("nccl_window"):
        os.environ["DEEP_EP_FORCE_NCCL_WINDOW"] = "1"  # read by the Buffer below, on every rank
    # The pull combine (the default) reaches the expert ranks' x by CUDA IPC: every case here but GIN's
    # window. combine="ring" selects the ring combine (read by each combine call, on every rank).
    pull = opts.get("combine") != "ring"
    os.environ["DEEP_EP_PULL_COMBINE"] = "1" if pull else "0"
    # Likewise the push dispatch (the default) writes into the destinations' outputs by CUDA IPC; dispatch="ring"
    # selects the ring dispatch.
    pushed = opts.get("dispatch") != "ring" and not opts.get("nccl_window")
    os.environ["DEEP_EP_PUSH_DISPATCH"] = "0" if opts.get("dispatch") == "ring" else "1"
    # torch's allocator on expandable_segments, whose memory CUDA IPC cannot export: the Buffer must find that out
    # when it is made and take the rings with the requests above (staging every tensor would be slower).
    unexportable = opts.get("unexportable_allocator", False)
    if unexportable:
        torch.cuda.synchronize()
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        gc.collect()
        torch.cuda.empty_cache()  # later allocations, the Buffer's probe first, come from expandable segments
        pushed = pull = False
    buffer = _buffer(group, hidden)
    assert buffer.runtime.tensors_exportable() != unexportable, f"tensors exportable: {not unexportable} expected"
    for round_idx in range(opts.get("rounds", 1)):
        num_tokens = opts.get("num_tokens", 300)
        if opts.get("uneven", True):
            num_tokens = max(0, num_tokens - 37 * ctx.rank)
        if opts.get("empty_rank") is not None and ctx.rank == opts["empty_rank"]:
            num_tokens = 0
        x = make_x(num_tokens, hidden, fp8)
        topk_idx = make_topk(num_tokens, NUM_EXPERTS, num_topk, ctx.num_ranks, routing)
        topk_weights = torch.rand(num_tokens, num_topk, device="cuda")
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        num_worst = ctx.num_ranks * opts.get("num_tokens", 300) if worst else 0
        kwargs = dict(
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            expert_alignment=opts.get("alignment", 1),
            num_worst_tokens=num_worst,
        )
        if with_topk:
            kwargs.update(topk_idx=topk_idx, topk_weights=topk_weights)
        kwargs.update(event_kwargs(buffer, mode))
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = buffer.dispatch(x, **kwargs)
        wait_for_outputs(mode, event)
        assert buffer.runtime.last_dispatch_pushed() == pushed, f"expected the {'push' if pushed else 'ring'} dispatch"
        inputs, outputs = reference_dispatch(
            group, ctx, x, topk_idx, topk_weights, in_rank, with_topk, NUM_EXPERTS, opts.get("alignment", 1), num_worst
        )
        label = f"rank {ctx.rank} round {round_idx}"
        check_send_head(handle, in_rank, ctx.rank, label)
        check_dispatch(
            outputs[ctx.rank],
            recv_x,
            recv_topk_idx,
            recv_topk_weights,
            per_expert_list,
            handle,
            with_topk,
            num_worst,
            label,
        )

        # Combine fresh expert outputs (bf16) of the received rows, with the received weights and bias.
        rows = (recv_x[0] if fp8 else recv_x).size(0)
        expert_out = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
        bias = make_bias(num_tokens, hidden, opts.get("bias", 0))
        combined_x, combined_weights, event = buffer.combine(
            expert_out,
            handle,
            topk_weights=recv_topk_weights if with_topk else None,
            bias=bias,
            **event_kwargs(buffer, mode),
        )
        wait_for_outputs(mode, event)
        pulled = pull and not opts.get("nccl_window")
        assert buffer.runtime.last_combine_pulled() == pulled, f"expected the {'pull' if pulled else 'ring'} combine"
        expected = reference_combine(
            group,
            inputs,
            outputs,
            expert_out,
            recv_topk_weights if with_topk else None,
            bias,
            hidden,
            num_topk if with_topk else 0,
        )[ctx.rank]
        check_combine(expected, combined_x, combined_weights, topk_idx, topk_weights, in_rank, with_topk, label)

        # Cached dispatch with the handle: same routing, fresh x.
        x2 = make_x(num_tokens, hidden, fp8)
        cached = buffer.dispatch(x2, handle=handle)
        assert cached[1] is None and cached[4] is None
        assert buffer.runtime.last_dispatch_pushed() == pushed, f"expected the {'push' if pushed else 'ring'} dispatch"
        _, outputs2 = reference_dispatch(
            group, ctx, x2, topk_idx, topk_weights, in_rank, False, NUM_EXPERTS, 1, num_worst
        )
        check_dispatch(outputs2[ctx.rank], cached[0], None, None, None, None, False, num_worst, label + " cached")
    torch.cuda.synchronize()
    buffer.destroy()
    if unexportable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        torch.cuda.empty_cache()
    teardown()


def check_send_head(handle, in_rank, rank, label):
    """handle[5][t][j]: the row of this rank's token t in rank j's outputs (rows from lower ranks first, then this
    rank's tokens in order), -1 where t does not go to j."""
    rank_prefix_matrix, send_head = handle[0], handle[5]
    sent = in_rank.to(torch.int32)
    rows = torch.cumsum(sent, dim=0, dtype=torch.int32) - sent
    if rank > 0:
        rows += rank_prefix_matrix[rank - 1].unsqueeze(0)
    expected = torch.where(in_rank, rows, torch.full_like(rows, -1))
    assert_equal(f"{label} send_head", to_numpy(send_head), to_numpy(expected))


def dispatch_outputs_kept(ctx, num_rounds):
    """Dispatch outputs kept alive across rounds, each round's recv_x in an allocation of its own: more live
    allocations than export slots (64, 8 of them for staging), so the push dispatch stages the later rounds'
    outputs and copies them out. Every round is checked exactly with fresh inputs, and the first rounds' outputs
    again at the end: no later round may have written into them."""
    group = setup(ctx, seed_base=31)
    hidden, num_topk = 7168, 8
    deep_ep.Buffer.set_num_sms(20)
    buffer = _buffer(group, hidden)
    kept, rechecked = [], []
    for round_idx in range(num_rounds):
        x, topk_idx, topk_weights, in_rank, received = _routed_dispatch(
            buffer, 512 - 13 * ctx.rank, hidden, num_topk, ctx.num_ranks
        )
        assert buffer.runtime.last_dispatch_pushed(), "expected the push dispatch"
        _, outputs = reference_dispatch(group, ctx, x, topk_idx, topk_weights, in_rank, True, NUM_EXPERTS, 1, 0)
        label = f"rank {ctx.rank} round {round_idx}"
        check_dispatch(outputs[ctx.rank], *received[:5], True, 0, label)
        kept.append(received)
        if round_idx < 2:
            rechecked.append((round_idx, outputs[ctx.rank]))
    torch.cuda.synchronize()
    for round_idx, expected in rechecked:
        check_dispatch(expected, *kept[round_idx][:5], True, 0, f"rank {ctx.rank} round {round_idx} at the end")
    del kept
    buffer.destroy()
    teardown()


def worst_tokens_too_small(ctx, dispatch):
    """num_worst_tokens below the rows a rank receives: that rank gets a ValueError naming num_worst_tokens at its
    next check, its first num_worst_tokens rows are still right, and the buffer stays usable (a dispatch with enough
    rows follows, checked exactly). `dispatch`: "push" or "ring"."""
    group = setup(ctx, seed_base=37)
    hidden, num_topk = 2048, 8
    os.environ["DEEP_EP_PUSH_DISPATCH"] = "1" if dispatch == "push" else "0"
    buffer = _buffer(group, hidden)
    num_tokens = 96 - 5 * ctx.rank
    x = make_x(num_tokens, hidden, False)
    topk_idx = make_topk(num_tokens, NUM_EXPERTS, num_topk, ctx.num_ranks, "random")
    topk_weights = torch.rand(num_tokens, num_topk, device="cuda")
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    _, outputs = reference_dispatch(group, ctx, x, topk_idx, topk_weights, in_rank, True, NUM_EXPERTS, 1, 0)
    num_recv = outputs[ctx.rank].num_recv_tokens
    num_worst = 40
    recv_x, _, _, _, _, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=num_worst, **layout
    )
    assert buffer.runtime.last_dispatch_pushed() == (dispatch == "push")
    torch.cuda.synchronize()
    label = f"rank {ctx.rank} ({num_recv} rows received, num_worst_tokens={num_worst})"
    if num_recv > num_worst:
        expect_raises(ValueError, "num_worst_tokens", buffer.runtime.check_device_errors)
    else:
        buffer.runtime.check_device_errors()
    kept = min(num_recv, num_worst)
    row_bytes = hidden * 2
    assert_equal(
        f"{label} first rows", to_numpy(recv_x[:kept].view(torch.uint8)), outputs[ctx.rank].recv_x[: kept * row_bytes]
    )
    received = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
    check_dispatch(outputs[ctx.rank], *received[:5], True, 0, label + " then enough rows")
    buffer.destroy()
    teardown()


def _dbo_round(ctx, buffer, hidden, num_topk, fp8):
    """One round of two micro-batches in flight (see dbo_streams); returns their inputs, dispatch results and
    combine results once every stream has finished."""
    streams = [(torch.cuda.Stream(), torch.cuda.Stream()) for _ in range(2)]
    batches = []
    for compute, comm in streams:
        compute.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(compute):
            num_tokens = max(1, 192 - 23 * ctx.rank)
            x = make_x(num_tokens, hidden, fp8)
            topk_idx = make_topk(num_tokens, NUM_EXPERTS, num_topk, ctx.num_ranks, "random")
            topk_weights = torch.rand(num_tokens, num_topk, device="cuda")
            ready = buffer.capture()
        with torch.cuda.stream(comm):
            in_rank, received = _layout_and_dispatch(buffer, x, topk_idx, topk_weights, previous_event=ready)
        compute.wait_stream(comm)
        batches.append((x, topk_idx, topk_weights, in_rank, received))
    combined_all = []
    for (compute, comm), (_, _, _, _, received) in zip(streams, batches):
        recv_x, _, recv_topk_weights, _, handle, _ = received
        with torch.cuda.stream(compute):
            rows = (recv_x[0] if fp8 else recv_x).size(0)
            expert_out = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
            ready = buffer.capture()
        with torch.cuda.stream(comm):
            combined = buffer.combine(expert_out, handle, topk_weights=recv_topk_weights, previous_event=ready)
        compute.wait_stream(comm)
        combined_all.append((expert_out, combined))
    torch.cuda.synchronize()
    return batches, combined_all


def dbo_streams(ctx, opts):
    """Two micro-batches in flight on their own (compute, comm) stream pairs, as dual-batch-overlap runners issue
    them: inputs made on the micro-batch's compute stream, every op called on its comm stream with previous_event
    captured on the compute stream, the second micro-batch dispatched before the first is combined. `rounds`
    times; every dispatch and combine checked exactly after each round."""
    group = setup(ctx, seed_base=opts.get("seed", 7))
    hidden, num_topk, fp8 = opts.get("hidden", 7168), 8, opts.get("fp8", False)
    deep_ep.Buffer.set_num_sms(opts.get("num_sms", 20))
    os.environ["DEEP_EP_PULL_COMBINE"] = "0" if opts.get("combine") == "ring" else "1"
    os.environ["DEEP_EP_PUSH_DISPATCH"] = "0" if opts.get("dispatch") == "ring" else "1"
    buffer = _buffer(group, hidden)
    for round_idx in range(opts.get("rounds", 10)):
        with StallWatchdog(f"rank {ctx.rank} round {round_idx}", 12.0):
            batches, combined_all = _dbo_round(ctx, buffer, hidden, num_topk, fp8)
        buffer.runtime.check_device_errors()  # a device timeout is the cause to report, not the data it spoiled
        for ub, (batch, (expert_out, combined)) in enumerate(zip(batches, combined_all)):
            x, topk_idx, topk_weights, in_rank, received = batch
            label = f"rank {ctx.rank} round {round_idx} micro-batch {ub}"
            inputs, outputs = reference_dispatch(
                group, ctx, x, topk_idx, topk_weights, in_rank, True, NUM_EXPERTS, 1, 0
            )
            check_dispatch(outputs[ctx.rank], *received[:5], True, 0, label)
            expected = reference_combine(group, inputs, outputs, expert_out, received[2], None, hidden, num_topk)
            check_combine(expected[ctx.rank], combined[0], combined[1], topk_idx, topk_weights, in_rank, True, label)
    buffer.destroy()
    teardown()


def _layout_and_dispatch(buffer, x, topk_idx, topk_weights, previous_event=None):
    """The layout of `topk_idx` and the dispatch of `x` with it (both after `previous_event` when given):
    (is_token_in_rank, the dispatch's outputs)."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, NUM_EXPERTS, previous_event=previous_event
    )
    received = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        previous_event=previous_event,
    )
    return in_rank, received


def _routed_dispatch(buffer, num_tokens, hidden, num_topk, num_ranks):
    """Fresh BF16 tokens with random top-k routing, dispatched with their layout: (x, topk_idx, topk_weights,
    is_token_in_rank, the dispatch's outputs)."""
    x = make_x(num_tokens, hidden, False)
    topk_idx = make_topk(num_tokens, NUM_EXPERTS, num_topk, num_ranks, "random")
    topk_weights = torch.rand(num_tokens, num_topk, device="cuda")
    in_rank, received = _layout_and_dispatch(buffer, x, topk_idx, topk_weights)
    return x, topk_idx, topk_weights, in_rank, received


def combine_runs_ahead(ctx):
    """The default (host-free pull) combine does not wait on the host for other ranks: while rank 0 is still busy
    (2 s on its host before its combine), every other rank's combine call returns at once and the rank goes on
    enqueueing work; then all results are checked exactly. Twice: the first call maps the inputs' allocations,
    the second reuses the mappings. The work enqueued behind the combine runs once before: with CUDA's lazy
    module loading, the first launch of a kernel waits for the process's work in flight, the spinning combine
    included, which is the loader's wait and not the combine's."""
    group = setup(ctx, seed_base=11)
    hidden, num_topk = 4096, 8
    deep_ep.Buffer.set_num_sms(20)
    os.environ["DEEP_EP_PULL_COMBINE"] = "1"
    buffer = _buffer(group, hidden)
    further_work = lambda: torch.ones(1024, device="cuda").sum()  # noqa: E731
    further_work()
    for round_idx in range(2):
        num_tokens = max(1, 256 - 29 * ctx.rank)
        x, topk_idx, topk_weights, in_rank, received = _routed_dispatch(
            buffer, num_tokens, hidden, num_topk, ctx.num_ranks
        )
        expert_out = torch.randn(received[0].size(0), hidden, device="cuda").to(torch.bfloat16)
        torch.cuda.synchronize()
        torch.distributed.barrier(group)
        if ctx.rank == 0:
            time.sleep(2.0)
        start = time.monotonic()
        combined = buffer.combine(expert_out, received[4], topk_weights=received[2])
        combine_s = time.monotonic() - start
        after = further_work()  # enqueued behind the combine
        enqueued_s = time.monotonic() - start
        assert buffer.runtime.last_combine_pulled(), "expected the pull combine"
        if ctx.rank != 0:
            assert enqueued_s < 1.0, (
                f"rank {ctx.rank} round {round_idx}: combine held the host {enqueued_s:.2f} s while rank 0 was busy "
                f"({combine_s:.2f} s in the combine call)"
            )
        torch.cuda.synchronize()
        assert float(after) == 1024.0
        label = f"rank {ctx.rank} round {round_idx}"
        inputs, outputs = reference_dispatch(group, ctx, x, topk_idx, topk_weights, in_rank, True, NUM_EXPERTS, 1, 0)
        expected = reference_combine(group, inputs, outputs, expert_out, received[2], None, hidden, num_topk)
        check_combine(expected[ctx.rank], combined[0], combined[1], topk_idx, topk_weights, in_rank, True, label)
    buffer.destroy()
    teardown()


def combine_inputs_freed(ctx, num_rounds):
    """The host-free combine with a combine input in a new allocation every round, freed and the cache emptied
    after it (an allocator that keeps returning memory): more rounds than there are export slots, every result
    checked exactly, so freed allocations' slots must be retired and used again (or the inputs staged). Then the
    memory: with every rank's inputs freed and three more combines (the first looks for freed allocations, the
    later ones close the peers' retired mappings), the GPU's free memory must come back to within two inputs per rank
    of what it was before the rounds (every rank's last input is still allocated)."""
    group = setup(ctx, seed_base=23)
    hidden, num_topk = 2048, 4
    os.environ["DEEP_EP_PULL_COMBINE"] = "1"
    buffer = _buffer(group, hidden)
    x, topk_idx, topk_weights, in_rank, received = _routed_dispatch(
        buffer, 64 + 7 * ctx.rank, hidden, num_topk, ctx.num_ranks
    )
    inputs, outputs = reference_dispatch(group, ctx, x, topk_idx, topk_weights, in_rank, True, NUM_EXPERTS, 1, 0)
    # Each round's input sits at the start of a 64 MiB allocation of its own (the cache is emptied before it).
    input_bytes = 64 << 20
    num_rows = received[0].size(0)
    assert num_rows * hidden * 2 <= input_bytes

    torch.cuda.empty_cache()
    before = free_device_memory(group)
    torch.distributed.barrier(group)  # every rank has read it before any allocates again
    for round_idx in range(num_rounds):
        torch.cuda.empty_cache()
        storage = torch.empty(input_bytes, dtype=torch.uint8, device="cuda")
        expert_out = storage[: num_rows * hidden * 2].view(torch.bfloat16).view(num_rows, hidden)
        expert_out.copy_(torch.randn(num_rows, hidden, device="cuda").to(torch.bfloat16))
        combined = buffer.combine(expert_out, received[4], topk_weights=received[2])
        assert buffer.runtime.last_combine_pulled(), "expected the pull combine"
        expected = reference_combine(group, inputs, outputs, expert_out, received[2], None, hidden, num_topk)
        check_combine(
            expected[ctx.rank],
            combined[0],
            combined[1],
            topk_idx,
            topk_weights,
            in_rank,
            True,
            f"rank {ctx.rank} round {round_idx}",
        )
        del combined, expert_out, storage
        torch.distributed.barrier(group)
    torch.cuda.empty_cache()
    # More combines from one new allocation: the first makes each rank look for its freed inputs and retire their
    # slots; the peers' mapping threads then retire their mappings, which each rank closes at its next combine.
    storage = torch.empty(input_bytes, dtype=torch.uint8, device="cuda")
    expert_out = storage[: num_rows * hidden * 2].view(torch.bfloat16).view(num_rows, hidden)
    expert_out.zero_()
    for _ in range(3):
        buffer.combine(expert_out, received[4], topk_weights=received[2])
        torch.cuda.synchronize()
        torch.distributed.barrier(group)
        time.sleep(0.2)
    check_freed_inputs_returned(group, ctx, before, input_bytes, num_rounds)
    del expert_out, storage
    buffer.destroy()
    teardown()


def back_to_back(ctx, num_calls):
    """Many dispatch/combine pairs with fresh data; combine(dispatch(x)) == x * ranks reached, checked every call."""
    group = setup(ctx, seed_base=7)
    hidden = 2048
    buffer = _buffer(group, hidden)
    for call in range(num_calls):
        num_tokens = int(torch.randint(0, 160, ()).item())
        topk_idx = make_topk(num_tokens, NUM_EXPERTS, 8, ctx.num_ranks, "random")
        # Small integers: sums of bf16 copies are exact.
        x = torch.randint(-8, 8, (num_tokens, hidden), device="cuda").to(torch.bfloat16)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
        )
        combined, _, _ = buffer.combine(recv_x, handle)
        expected = x.float() * in_rank.sum(dim=1, keepdim=True).float()
        if not torch.equal(combined.float(), expected):
            bad = (combined.float() != expected).nonzero()[0].tolist()
            raise AssertionError(f"rank {ctx.rank} call {call}: combine(dispatch(x)) differs at {bad}")
    buffer.destroy()
    teardown()


def cuda_graph(ctx):
    """dispatch (num_worst_tokens) + combine captured in a CUDA graph, replayed with new inputs."""
    group = setup(ctx, seed_base=11)
    hidden, num_tokens, num_topk = 4096, 128, 8
    buffer = _buffer(group, hidden)
    num_worst = num_tokens * ctx.num_ranks
    static_x = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device="cuda")
    static_topk = torch.empty(num_tokens, num_topk, dtype=torch.int64, device="cuda")
    static_w = torch.empty(num_tokens, num_topk, dtype=torch.float32, device="cuda")

    def step():
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(static_topk, NUM_EXPERTS)
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            static_x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=static_topk,
            topk_weights=static_w,
            num_worst_tokens=num_worst,
        )
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        return recv_x, recv_idx, in_rank, combined, combined_w

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
        recv_x, recv_idx, in_rank, combined, combined_w = outs
        inputs, outputs = reference_dispatch(
            group, ctx, static_x, static_topk, static_w, in_rank, True, NUM_EXPERTS, 1, num_worst
        )
        check_dispatch(outputs[ctx.rank], recv_x, recv_idx, None, [], None, False, num_worst, f"replay {replay}")
        expected = reference_combine(group, inputs, outputs, recv_x, None, None, hidden, 0)[ctx.rank]
        assert_equal(f"replay {replay} combined_x", to_numpy(combined), expected.combined_x)
    del graph
    torch.cuda.synchronize()
    buffer.destroy()
    teardown()


def timeout_names_rank_peer_phase(ctx):
    """A rank that never joins: the others get TimeoutError naming rank, peer and phase; the process survives."""
    os.environ["DEEP_EP_TIMEOUT_S"] = "4"
    group = setup(ctx)
    buffer = _buffer(group, 2048)
    if ctx.rank != 0:
        topk_idx = make_topk(64, NUM_EXPERTS, 8, ctx.num_ranks, "random")
        x = torch.randn(64, 2048, device="cuda").to(torch.bfloat16)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        try:
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            raise AssertionError("dispatch without rank 0 must time out")
        except TimeoutError as error:
            text = str(error)
            assert f"rank {ctx.rank}" in text and "peer rank 0" in text and "barrier" in text, text
        torch.cuda.synchronize()  # the process and its CUDA context survive
        expect_raises(RuntimeError, "unusable", lambda: buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS))
    torch.distributed.barrier(group)
    teardown()


def with_rings(ctx, fn, *args):
    """fn(ctx, *args) with the ring dispatch and the ring combine."""
    os.environ["DEEP_EP_PULL_COMBINE"] = "0"
    os.environ["DEEP_EP_PUSH_DISPATCH"] = "0"
    return fn(ctx, *args)


def combine_timeout_names_rank_peer_phase(ctx):
    """A rank that skips a combine: the others' combine times out naming rank, peer and phase. The host-free
    pull combine returns at once and its kernel times out on the device (raised at the next check); the
    per-call host exchange (DEEP_EP_HOST_FREE_COMBINE=0) times out in the call, before launching."""
    os.environ["DEEP_EP_TIMEOUT_S"] = "4"
    group = setup(ctx)
    buffer = _buffer(group, 2048)
    topk_idx = make_topk(64, NUM_EXPERTS, 8, ctx.num_ranks, "random")
    x = torch.randn(64, 2048, device="cuda").to(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )
    if ctx.rank != 0:
        try:
            buffer.combine(recv_x, handle)
            torch.cuda.synchronize()  # the device timeout ends the kernel: the process and its context survive
            buffer.runtime.check_device_errors()
            raise AssertionError("combine without rank 0 must time out")
        except TimeoutError as error:
            text = str(error)
            assert f"rank {ctx.rank}" in text and "peer rank 0" in text and "combine" in text, text
        torch.cuda.synchronize()
        expect_raises(RuntimeError, "unusable", lambda: buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS))
    torch.distributed.barrier(group)
    buffer.destroy()
    teardown()


def bad_dispatch_inputs(ctx):
    group = setup(ctx)
    buffer = _buffer(group, 2048)
    topk_idx = make_topk(32, NUM_EXPERTS, 8, ctx.num_ranks, "random")
    x = torch.randn(32, 2048, device="cuda").to(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    expect_raises(TypeError, "x must be torch.bfloat16", lambda: buffer.dispatch(x.float(), **layout))
    expect_raises(ValueError, "contiguous", lambda: buffer.dispatch(x.t().contiguous().t(), **layout))
    expect_raises(ValueError, "both or neither", lambda: buffer.dispatch(x, topk_idx=topk_idx, **layout))
    expect_raises(ValueError, "num_tokens_per_rank", lambda: buffer.dispatch(x))
    expect_raises(TypeError, "cpu", lambda: buffer.dispatch(x.cpu(), **layout))
    expect_raises(
        ValueError,
        "x_scales",
        lambda: buffer.dispatch((x.to(torch.float8_e4m3fn), torch.ones(32, 15, device="cuda")), **layout),
    )
    small = deep_ep.Buffer(group, num_nvl_bytes=1 << 16, explicitly_destroy=True)
    expect_raises(ValueError, "get_nvl_buffer_size_hint", lambda: small.dispatch(x, **layout))
    # Contiguous views that start 2 bytes past a 16-byte boundary: the kernels move 16-byte vectors.
    x_off = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view_as(x).copy_(x)
    expect_raises(ValueError, "16-byte aligned", lambda: buffer.dispatch(x_off, **layout))
    # The failed calls launched nothing: a valid call still works on both buffers' group.
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout)
    expect_raises(ValueError, "num_sms", lambda: buffer.combine(recv_x, handle, config=deep_ep.Config(10, 4, 16)))
    recv_off = torch.empty(recv_x.numel() + 1, dtype=recv_x.dtype, device="cuda")[1:].view_as(recv_x).copy_(recv_x)
    expect_raises(ValueError, "16-byte aligned", lambda: buffer.combine(recv_off, handle))
    combined, _, _ = buffer.combine(recv_x, handle)
    # Copies are summed in float32 and rounded once, like x * count rounded to bf16.
    assert torch.equal(combined, (x.float() * in_rank.sum(dim=1, keepdim=True).float()).to(torch.bfloat16))
    small.destroy()
    buffer.destroy()
    teardown()


def cases(rank_counts):
    out = []
    t = 240
    for r in rank_counts:
        base = f"intranode/r{r}"
        out.append((f"{base}/bf16_topk", dispatch_combine, r, (dict(bias=1),), t))
        out.append((f"{base}/fp8_topk", dispatch_combine, r, (dict(fp8=True, alignment=4),), t))
        out.append((f"{base}/bf16_no_topk", dispatch_combine, r, (dict(with_topk=False, bias=2),), t))
        out.append((f"{base}/fp8_worst_tokens", dispatch_combine, r, (dict(fp8=True, worst=True),), t))
        out.append((f"{base}/async", dispatch_combine, r, (dict(mode="async", bias=2),), t))
        out.append((f"{base}/previous_event", dispatch_combine, r, (dict(mode="previous_event"),), t))
        out.append((f"{base}/comm_alloc", dispatch_combine, r, (dict(mode="comm_alloc"),), t))
        out.append((f"{base}/unexportable_allocator", dispatch_combine, r, (dict(unexportable_allocator=True),), t))
        out.append(
            (
                f"{base}/edges",
                dispatch_combine,
                r,
                (dict(empty_rank=r - 1, hidden=2048, num_topk=1, routing="one_rank"),),
                t,
            )
        )
        out.append(
            (
                f"{base}/all_minus_one_topk9_h4096",
                dispatch_combine,
                r,
                (dict(routing="all_minus_one", hidden=4096, num_topk=9),),
                t,
            )
        )
        out.append(
            (
                f"{base}/topk9_h4096_multi_round",
                dispatch_combine,
                r,
                (dict(hidden=4096, num_topk=9, rounds=3, num_sms=8),),
                t,
            )
        )
        out.append((f"{base}/back_to_back_200", back_to_back, r, (200,), t))
        # Dual-batch overlap on streams of its own (vLLM's DBO, as deep_ep calls alone): each format and combine.
        out.append((f"{base}/combine_runs_ahead", combine_runs_ahead, r, (), t))
        # More freed inputs than export slots (64, 8 of them for staging).
        out.append((f"{base}/combine_inputs_freed", combine_inputs_freed, r, (80,), t))
        out.append((f"{base}/dbo_streams_bf16", dbo_streams, r, (dict(),), t))
        out.append((f"{base}/dbo_streams_fp8", dbo_streams, r, (dict(fp8=True),), t))
        out.append(
            (f"{base}/dbo_streams_fp8_ring", dbo_streams, r, (dict(fp8=True, combine="ring", dispatch="ring"),), t)
        )
        # 8 SMs per rank: 8 ranks' blocks fit one per SM, the other shape than the 20-SM cases above take.
        out.append((f"{base}/dbo_streams_fp8_8_sms", dbo_streams, r, (dict(fp8=True, num_sms=8),), t))
        out.append((f"{base}/cuda_graph", cuda_graph, r, (), t))
        out.append((f"{base}/bad_inputs", bad_dispatch_inputs, r, (), t))
        out.append((f"{base}/timeout", timeout_names_rank_peer_phase, r, (), t))
        out.append((f"{base}/combine_timeout", combine_timeout_names_rank_peer_phase, r, (), t))
        # More live dispatch outputs than export slots; num_worst_tokens too small, on both dispatches.
        out.append((f"{base}/dispatch_outputs_kept", dispatch_outputs_kept, r, (64,), t))
        out.append((f"{base}/worst_tokens_too_small", worst_tokens_too_small, r, ("push",), t))
        out.append((f"{base}/ring_worst_tokens_too_small", worst_tokens_too_small, r, ("ring",), t))
        # The ring dispatch and combine (DEEP_EP_PUSH_DISPATCH=0, DEEP_EP_PULL_COMBINE=0, and wherever the in-place
        # paths cannot run) on the cases that reach their every branch.
        ring = dict(combine="ring", dispatch="ring")
        out.append((f"{base}/ring_bf16_topk", dispatch_combine, r, (dict(ring, bias=1),), t))
        out.append((f"{base}/ring_bf16_no_topk", dispatch_combine, r, (dict(ring, with_topk=False, bias=2),), t))
        out.append((f"{base}/ring_fp8_worst_tokens", dispatch_combine, r, (dict(ring, fp8=True, worst=True),), t))
        out.append((f"{base}/ring_async", dispatch_combine, r, (dict(ring, mode="async", bias=2),), t))
        out.append(
            (
                f"{base}/ring_edges",
                dispatch_combine,
                r,
                (dict(ring, empty_rank=r - 1, hidden=2048, num_topk=1, routing="one_rank"),),
                t,
            )
        )
        out.append(
            (
                f"{base}/ring_all_minus_one_topk9_h4096",
                dispatch_combine,
                r,
                (dict(ring, routing="all_minus_one", hidden=4096, num_topk=9, rounds=2),),
                t,
            )
        )
        out.append((f"{base}/ring_back_to_back_200", with_rings, r, (back_to_back, 200), t))
        out.append((f"{base}/ring_cuda_graph", with_rings, r, (cuda_graph,), t))
        out.append((f"{base}/moe_layer_example", moe_layer_example, r, (), t))
    if 8 in rank_counts:
        # 24 channels, fewer pull blocks (8 ranks x 24 do not fit): blocks take several channels.
        out.append(("intranode/r8/24_sms_per_rank", dispatch_combine, 8, (dict(num_sms=24, num_tokens=512),), t))
        out.append(
            (
                "intranode/r8/ring_24_sms_per_rank",
                dispatch_combine,
                8,
                (dict(combine="ring", num_sms=24, num_tokens=512),),
                t,
            )
        )
    # The memory of a group spanning hosts with GIN (an NCCL window, peers mapped by NCCL), on one host:
    # NCCL takes one GPU per rank, and the build must have GIN.
    from deep_ep import _C
    from deep_ep.testing import visible_gpu_count

    if _C.gin_compiled():
        for r in rank_counts:
            if r <= visible_gpu_count():
                out.append(
                    (f"intranode/r{r}/nccl_window", dispatch_combine, r, (dict(nccl_window=True, bias=1, rounds=2),), t)
                )
    return out


def moe_layer_example(ctx):
    """The README's example runs and matches its single-process reference."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "moe_layer.py"
    spec = importlib.util.spec_from_file_location("moe_layer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run_rank(ctx)
