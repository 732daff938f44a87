"""GPU tests of the foundation: Buffer lifetime, get_dispatch_layout vs the CPU reference, argument
validation before launch, device-side detection of out-of-range expert ids."""

import gc

import torch

import deep_ep
from common import assert_equal, expect_raises, random_topk_idx, setup, teardown, to_numpy
from internode_cases import check_rdma_layout, use_ranks_per_node

NUM_EXPERTS = 256
NUM_TOPK = 8
# Past one node's ranks the group is emulated nodes of this many consecutive ranks (and the Buffer gets an RDMA
# area): the layout then also counts tokens per node.
RANKS_PER_NODE = 8


def _buffer(ctx, group, num_nvl_bytes, **kwargs):
    """A Buffer for this case; at more than RANKS_PER_NODE ranks, of emulated nodes with an RDMA area."""
    if ctx.num_ranks > RANKS_PER_NODE:
        kwargs.setdefault("num_rdma_bytes", 1 << 20)
    return deep_ep.Buffer(group, num_nvl_bytes=num_nvl_bytes, **kwargs)


def _setup(ctx, seed_base=0):
    if ctx.num_ranks > RANKS_PER_NODE:
        use_ranks_per_node(RANKS_PER_NODE)  # read when a Buffer is created
    return setup(ctx, seed_base=seed_base)


def buffer_create_destroy(ctx):
    group = _setup(ctx)
    for round_idx in range(3):
        buffer = _buffer(ctx, group, 1 << 22, explicitly_destroy=True)
        assert buffer.rank == ctx.rank and buffer.group_size == ctx.num_ranks
        assert buffer.runtime.num_ranks_per_device >= 1
        if ctx.num_gpus == 1:
            assert buffer.runtime.num_ranks_per_device == ctx.num_ranks, buffer.runtime.num_ranks_per_device
        local = buffer.get_local_buffer_tensor(torch.int32, size=torch.Size([1024]))
        local.fill_(ctx.rank * 100 + round_idx)
        torch.cuda.synchronize()
        assert int(local.sum()) == 1024 * (ctx.rank * 100 + round_idx)
        comm_stream = buffer.get_comm_stream()
        assert comm_stream.priority < 0, f"the comm stream has priority {comm_stream.priority}, expected a high one"
        buffer.destroy()
        assert not buffer.is_available()
        del buffer
    # Implicitly destroyed buffers are released on garbage collection.
    for _ in range(2):
        buffer = _buffer(ctx, group, 1 << 20)
        expect_raises(RuntimeError, "explicitly_destroy", buffer.destroy)
        del buffer
        gc.collect()
    teardown()


def layout_matches_reference(ctx, num_tokens, num_topk=NUM_TOPK, num_experts=NUM_EXPERTS):
    """Every output of get_dispatch_layout against the CPU reference, in each stream mode."""
    group = _setup(ctx, seed_base=num_tokens + num_topk)
    buffer = _buffer(ctx, group, 1 << 20, explicitly_destroy=True)
    for mode in ("sync", "async", "previous_event", "comm_alloc"):
        topk_idx = random_topk_idx(num_tokens, num_experts, num_topk)
        if mode == "sync":
            out = buffer.get_dispatch_layout(topk_idx, num_experts)
        elif mode == "async":
            out = buffer.get_dispatch_layout(topk_idx, num_experts, async_finish=True)
            out[4].current_stream_wait()
        elif mode == "previous_event":
            out = buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=buffer.capture())
        else:
            out = buffer.get_dispatch_layout(
                topk_idx, num_experts, previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=True
            )
            out[4].current_stream_wait()
        per_rank, per_rdma_rank, per_expert, in_rank, _ = out
        if ctx.num_ranks > RANKS_PER_NODE:
            check_rdma_layout(per_rdma_rank, in_rank, RANKS_PER_NODE, f"layout ({mode})")
        else:
            assert per_rdma_rank is None, "num_tokens_per_rdma_rank must be None within one node"
        assert per_rank.dtype == torch.int32 and per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool
        assert tuple(in_rank.shape) == (num_tokens, ctx.num_ranks)
        ref = deep_ep.reference.get_dispatch_layout(topk_idx.cpu().numpy(), ctx.num_ranks, num_experts)
        assert_equal(f"num_tokens_per_rank ({mode})", to_numpy(per_rank), ref.num_tokens_per_rank)
        assert_equal(f"num_tokens_per_expert ({mode})", to_numpy(per_expert), ref.num_tokens_per_expert)
        assert_equal(f"is_token_in_rank ({mode})", to_numpy(in_rank), ref.is_token_in_rank)
    buffer.runtime.check_device_errors()
    buffer.destroy()
    teardown()


def bad_inputs_raise_before_launch(ctx):
    group = _setup(ctx)
    buffer = _buffer(ctx, group, 1 << 20, explicitly_destroy=True)
    good = random_topk_idx(16, NUM_EXPERTS, NUM_TOPK)
    expect_raises(
        TypeError, "topk_idx must be torch.int64", lambda: buffer.get_dispatch_layout(good.int(), NUM_EXPERTS)
    )
    expect_raises(TypeError, "cpu", lambda: buffer.get_dispatch_layout(good.cpu(), NUM_EXPERTS))
    expect_raises(ValueError, "contiguous", lambda: buffer.get_dispatch_layout(good.t().contiguous().t(), NUM_EXPERTS))
    expect_raises(ValueError, "2-D", lambda: buffer.get_dispatch_layout(good.reshape(-1), NUM_EXPERTS))
    expect_raises(ValueError, "num_experts", lambda: buffer.get_dispatch_layout(good, NUM_EXPERTS + 1))
    expect_raises(TypeError, "torch.Tensor", lambda: buffer.get_dispatch_layout(good.tolist(), NUM_EXPERTS))
    expect_raises(
        ValueError,
        "allocate_on_comm_stream",
        lambda: buffer.get_dispatch_layout(good, NUM_EXPERTS, allocate_on_comm_stream=True),
    )
    expect_raises(ValueError, "even", lambda: deep_ep.Buffer.set_num_sms(7))
    expect_raises(ValueError, "num_sms", lambda: deep_ep.Config(7))
    # Still fully usable after the errors.
    per_rank, _, _, _, _ = buffer.get_dispatch_layout(good, NUM_EXPERTS)
    ref = deep_ep.reference.get_dispatch_layout(good.cpu().numpy(), ctx.num_ranks, NUM_EXPERTS)
    assert_equal("num_tokens_per_rank", to_numpy(per_rank), ref.num_tokens_per_rank)
    buffer.destroy()
    teardown()


def out_of_range_expert_is_reported(ctx):
    group = _setup(ctx)
    buffer = _buffer(ctx, group, 1 << 20, explicitly_destroy=True)
    topk_idx = random_topk_idx(64, NUM_EXPERTS, NUM_TOPK, drop_prob=0.0)
    bad_token = 5 + ctx.rank
    topk_idx[bad_token, 3] = NUM_EXPERTS + 7  # lives in device memory: only the kernel can see it
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    torch.cuda.synchronize()
    # The bad slot was skipped; the valid ones are counted exactly.
    valid = topk_idx.clone()
    valid[bad_token, 3] = -1
    ref = deep_ep.reference.get_dispatch_layout(valid.cpu().numpy(), ctx.num_ranks, NUM_EXPERTS)
    assert_equal("num_tokens_per_expert", to_numpy(per_expert), ref.num_tokens_per_expert)
    assert_equal("is_token_in_rank", to_numpy(in_rank), ref.is_token_in_rank)
    expect_raises(
        ValueError,
        f"token {bad_token} has expert id {NUM_EXPERTS + 7}",
        lambda: buffer.get_dispatch_layout(valid, NUM_EXPERTS),
    )
    # Reported once: the buffer stays usable.
    buffer.get_dispatch_layout(valid, NUM_EXPERTS)
    torch.cuda.synchronize()
    buffer.runtime.check_device_errors()
    buffer.destroy()
    teardown()


def cases(rank_counts):
    out = []
    for r in rank_counts:
        out.append((f"foundation/buffer_create_destroy/r{r}", buffer_create_destroy, r, (), 180))
        for t in (0, 1, 127, 4096):
            out.append((f"foundation/layout_matches_reference/r{r}/t{t}", layout_matches_reference, r, (t,), 180))
        # Prefill size and V3's top-9 of 288 (a token's ids in two load rounds); top-16 of 64 experts (many slots
        # of a token on one rank, compared across rounds); top-1.
        for t, k, e in ((16384, 9, 288), (333, 16, 64), (1000, 1, 64)):
            name = f"foundation/layout_matches_reference/r{r}/t{t}_top{k}_e{e}"
            out.append((name, layout_matches_reference, r, (t, k, e), 180))
        out.append((f"foundation/bad_inputs_raise_before_launch/r{r}", bad_inputs_raise_before_launch, r, (), 180))
        out.append((f"foundation/out_of_range_expert_is_reported/r{r}", out_of_range_expert_is_reported, r, (), 180))
    return out
