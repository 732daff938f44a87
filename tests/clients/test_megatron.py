"""Client: Megatron-core's fused all-to-all, run from the real package.

Project: Megatron-LM / Megatron-core (NVIDIA), version 0.19.2 (PyPI wheel megatron-core==0.19.2).
File: megatron/core/transformer/moe/fused_a2a.py. What it does with deep_ep:
- at import, `from deep_ep import Buffer` and `from deep_ep.utils import EventHandle, EventOverlap` (any
  ImportError turns HAVE_DEEP_EP off and fused_dispatch / fused_combine into None);
- get_buffer(group, hidden_bytes): sizes with Buffer.get_dispatch_config / get_combine_config(group.size())
  and their get_nvl/rdma_buffer_size_hint(hidden_bytes, group.size()), keeps one module-level `_buffer`, and
  replaces it when `_buffer.group != group` or its num_nvl_bytes / num_rdma_bytes are too small;
  Buffer(group, num_nvl_bytes, num_rdma_bytes);
- FusedDispatch: with async_finish, previous_event = EventOverlap(EventHandle()); get_dispatch_layout(...,
  previous_event, async_finish, allocate_on_comm_stream); dispatch(x, topk_idx=, topk_weights=, layout...,
  previous_event=<layout's event>, async_finish, allocate_on_comm_stream); event.current_stream_wait();
  backward: combine(grad, handle, topk_weights=grad_probs.float(), ...);
- FusedCombine: combine(x, handle=, async_finish, previous_event, allocate_on_comm_stream); backward: cached
  dispatch(grad, handle=, ...);
- set_deepep_num_sms(n) -> Buffer.set_num_sms(n).

The wheel is installed next to the suite by scripts/run_gpu.sh (from .whl/); without it the case is SKIP.
Megatron sizes the RDMA buffer for nodes of 8 ranks (the hint's default), so it runs on one GPU-sharing
group of 2, 4 or 8 ranks, and on emulated nodes only as 2x8 (16 ranks): with 2x4 its RDMA hint is 0.
Not stubbed: the import of fused_a2a needs torch, numpy, packaging, typing_extensions and triton only
(transformer_engine, apex and the like are optional imports in megatron-core 0.19.2).
"""

import gc

import torch
import torch.distributed as dist

import deep_ep
from clients_common import (
    Skip,
    assert_close,
    check_combined,
    check_normal_dispatch,
    expected_normal_dispatch,
    expert_scale,
    finish,
    layouts,
    random_routing,
    start,
    sync,
)
from common import teardown

NUM_EXPERTS = 64
NUM_TOPK = 8
HIDDEN = 4096
NUM_TOKENS = 256


def _fused_a2a():
    """megatron.core.transformer.moe.fused_a2a, or Skip when megatron-core is not installed."""
    try:
        from megatron.core.transformer.moe import fused_a2a
    except ImportError as error:
        raise Skip(
            f"megatron-core is not importable ({error}); scripts/run_gpu.sh installs .whl/*.whl "
            f"(pip download megatron-core==0.19.2) on the PYTHONPATH"
        ) from None
    if not fused_a2a.HAVE_DEEP_EP or fused_a2a.fused_dispatch is None:
        # Megatron swallowed an ImportError of `from deep_ep.utils import EventHandle, EventOverlap`: say which.
        try:
            from deep_ep.utils import EventHandle, EventOverlap  # noqa: F401
        except ImportError as error:
            raise AssertionError(f"megatron-core found no usable deep_ep: {error}") from error
        raise AssertionError("megatron-core found no usable deep_ep (fused_a2a.HAVE_DEEP_EP is False)")
    return fused_a2a


def _megatron_buffer_sizes(group, hidden_bytes):
    """The (num_nvl_bytes, num_rdma_bytes) fused_a2a.get_buffer asks for."""
    configs = (deep_ep.Buffer.get_dispatch_config(group.size()), deep_ep.Buffer.get_combine_config(group.size()))
    return (
        max(c.get_nvl_buffer_size_hint(hidden_bytes, group.size()) for c in configs),
        max(c.get_rdma_buffer_size_hint(hidden_bytes, group.size()) for c in configs),
    )


def _round(ctx, group, fused_a2a, async_finish, allocate_on_comm_stream, label):
    """Forward and backward of dispatch -> experts -> combine through fused_dispatch / fused_combine, checked
    against a single-process computation: the dispatch outputs bit for bit, the combined output and both
    gradients within the bf16 rounding of the partial sums."""
    num_tokens = max(1, NUM_TOKENS - 29 * ctx.rank)
    x = torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16).requires_grad_()
    topk_idx, probs = random_routing(num_tokens, NUM_EXPERTS, NUM_TOPK)
    probs.requires_grad_()
    grad_out = torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16)

    recv_x, recv_idx, recv_probs, tokens_per_expert, handle = fused_a2a.fused_dispatch(
        x, topk_idx, probs, NUM_EXPERTS, group, async_finish, allocate_on_comm_stream
    )
    expected = expected_normal_dispatch(group, ctx.rank, NUM_EXPERTS, x.detach(), topk_idx, probs.detach())
    check_normal_dispatch(
        f"{label} dispatch", expected, recv_x.detach(), recv_idx, recv_probs.detach(), tokens_per_expert.tolist()
    )

    # The experts of this rank: row m -> x_m * sum_k p_mk * scale(e_mk) over its local slots, differentiable in
    # recv_x and recv_probs (what a grouped GEMM with probabilities applied does to the gradients' routes).
    num_local = NUM_EXPERTS // ctx.num_ranks
    local = recv_idx >= 0
    scale = expert_scale(torch.where(local, recv_idx + ctx.rank * num_local, torch.zeros_like(recv_idx)))
    weight = (recv_probs * scale * local).sum(dim=1, keepdim=True)
    y = (recv_x.float() * weight).to(torch.bfloat16)
    out, _ = fused_a2a.fused_combine(y, group, handle, async_finish, allocate_on_comm_stream)
    out.backward(grad_out)
    torch.cuda.synchronize()

    x_float = x.detach().float()
    check_combined(f"{label} combined", out.detach(), x_float, topk_idx, probs.detach())
    check_combined(f"{label} grad x", x.grad, grad_out.float(), topk_idx, probs.detach())
    # d loss / d p_tk = scale(e_tk) * <x_t, g_t> on the rank owning e_tk, 0 for -1 slots; float32 dot products
    # of HIDDEN terms, summed in another order than here.
    valid = topk_idx >= 0
    dot = (x_float * grad_out.float()).sum(dim=1, keepdim=True)
    dot_abs = (x_float * grad_out.float()).abs().sum(dim=1, keepdim=True)
    expert_factor = torch.where(valid, expert_scale(topk_idx.clamp(min=0)), torch.zeros_like(probs))
    assert_close(f"{label} grad probs", probs.grad, expert_factor * dot, 1e-3 * expert_factor * dot_abs + 1e-6)


def fused_a2a_forward_backward(ctx, num_ranks_per_node):
    group = start(ctx, num_ranks_per_node, seed=31)  # selects this rank's GPU before megatron-core loads
    try:
        fused_a2a = _fused_a2a()  # before any Buffer: every rank skips, or none
    except Skip:
        teardown()
        raise
    label = f"rank {ctx.rank}"
    emulated = num_ranks_per_node > 0
    # 16 ranks share one GPU in the 2x8 emulation: fewer SMs per rank (16 x 8 blocks fit 132 SMs), set through
    # Megatron's own knob.
    base_sms, fewer_sms, more_sms = (6, 4, 8) if emulated else (20, 8, 24)
    fused_a2a.set_deepep_num_sms(base_sms)
    hidden_bytes = HIDDEN * 2
    try:
        _round(ctx, group, fused_a2a, False, False, f"{label} sync")
        buffer = fused_a2a._buffer
        if not isinstance(buffer, deep_ep.Buffer):
            raise AssertionError(f"{label}: fused_a2a._buffer is {type(buffer).__name__}, expected deep_ep.Buffer")
        sizes = (buffer.num_nvl_bytes, buffer.num_rdma_bytes)
        if sizes != _megatron_buffer_sizes(group, hidden_bytes) or buffer.group is not group:
            raise AssertionError(
                f"{label}: Buffer made with {sizes} for group {buffer.group}, expected "
                f"{_megatron_buffer_sizes(group, hidden_bytes)} for the WORLD group"
            )

        # Every later call passes Megatron's re-use checks (group, num_nvl_bytes, num_rdma_bytes).
        _round(ctx, group, fused_a2a, True, False, f"{label} async_finish")
        _round(ctx, group, fused_a2a, True, True, f"{label} async_finish + allocate_on_comm_stream")
        fused_a2a.set_deepep_num_sms(fewer_sms)  # smaller hints: the same Buffer serves
        _round(ctx, group, fused_a2a, True, True, f"{label} {fewer_sms} SMs")
        if fused_a2a._buffer is not buffer:
            raise AssertionError(f"{label}: fused_a2a replaced its Buffer although the old one was large enough")

        # More SMs: larger hints, so get_buffer makes a new Buffer and drops the old one. Megatron does not wait
        # for the peers there; the test lines them up first so that no kernel still touches the old memory.
        sync(group)
        fused_a2a.set_deepep_num_sms(more_sms)
        _round(ctx, group, fused_a2a, False, False, f"{label} {more_sms} SMs")
        grown = fused_a2a._buffer
        if grown is buffer or grown.num_nvl_bytes <= buffer.num_nvl_bytes:
            raise AssertionError(
                f"{label}: {more_sms} SMs need a larger NVLink buffer; fused_a2a kept {buffer.num_nvl_bytes} bytes"
            )
        del buffer
        fused_a2a.set_deepep_num_sms(base_sms)
        _round(ctx, group, fused_a2a, True, False, f"{label} back to {base_sms} SMs")
        if fused_a2a._buffer is not grown:
            raise AssertionError(f"{label}: fused_a2a replaced a Buffer that was large enough")
    finally:
        deep_ep.Buffer.set_num_sms(20)
    sync(group)
    fused_a2a._buffer = None  # released without destroy(), as Megatron's buffer is
    gc.collect()
    dist.barrier(group)
    finish(group)


def cases(rank_counts):
    out = []
    for tag, num_ranks, num_ranks_per_node in layouts(rank_counts, emulated=("2x8",)):
        out.append(
            (
                f"clients/megatron/{tag}/fused_a2a_forward_backward",
                fused_a2a_forward_backward,
                num_ranks,
                (num_ranks_per_node,),
                240,
            )
        )
    return out
