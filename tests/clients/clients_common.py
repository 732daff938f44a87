"""Shared pieces of the client tests (tests/clients): the rank layouts each client runs on, emulated nodes,
stand-ins for the clients' quantization and expert kernels, and single-process expectations computed
from every rank's inputs (gathered over the gloo group), compared bit for bit where the library only
moves bytes and within a stated bound where bf16 partial sums are rounded.

The client modules reproduce the clients' calls into deep_ep; everything here is test scaffolding.
"""

import os

import torch
import torch.distributed as dist

from common import setup, teardown
from deep_ep.testing import Skip  # noqa: F401  (re-exported for the client modules)

RANKS_PER_NODE_ENV = "DEEP_EP_RANKS_PER_NODE"
FP8_MAX = 448.0

# Bounded waits fail fast in tests.
os.environ.setdefault("DEEP_EP_TIMEOUT_S", "30")

# Combined rows are sums of bf16 partials (one per receiving rank, or per expert slot), each rounded to bf16,
# then rounded once more: at most 2^-8 of the magnitude each, so 2^-7 in all. The bound doubles that.
BF16_SUM_RELATIVE = 2.0**-6
# An e4m3 value is within half an ulp (2^-4 of it) of what it encodes, or within half the smallest
# subnormal (2^-10 of the group's scale) near zero.
E4M3_RELATIVE = 2.0**-4
E4M3_SUBNORMAL = 2.0**-10


# ---- layouts and bootstrap ------------------------------------------------------------------------------------
def layouts(rank_counts, emulated=("2x4", "2x8")):
    """(tag, num_ranks, num_ranks_per_node) of the runs of a client case: one group of 2, 4 or 8 ranks sharing
    the GPUs (num_ranks_per_node 0), and the emulated node layouts in `emulated` whose rank count was asked
    for (2x4: 8 ranks, 2x8: 16 ranks)."""
    out = [(f"r{r}", r, 0) for r in rank_counts if r in (2, 4, 8)]
    for layout in emulated:
        num_nodes, per_node = (int(v) for v in layout.split("x"))
        if num_nodes * per_node in rank_counts:
            out.append((layout, num_nodes * per_node, per_node))
    return out


def start(ctx, num_ranks_per_node, seed):
    """Group the ranks into nodes (read when a Buffer is created; 0 = one node), join the gloo group, seed."""
    if num_ranks_per_node:
        os.environ[RANKS_PER_NODE_ENV] = str(num_ranks_per_node)
    else:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    return setup(ctx, seed_base=seed)


def finish(group):
    torch.cuda.synchronize()
    dist.barrier(group)
    teardown()


def sync(group):
    """Finish this rank's GPU work and line the ranks up (a rank busy checking must not look like a dead peer)."""
    torch.cuda.synchronize()
    dist.barrier(group)


def gather(group, tensor):
    """Every rank's `tensor` as CPU tensors, in rank order. e4m3 tensors come back as their bytes (uint8): CPU
    indexing and concatenation of float8 tensors are not available in every torch."""
    mine = tensor.detach().contiguous().cpu()
    if mine.dtype == torch.float8_e4m3fn:
        mine = mine.view(torch.uint8)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


# ---- inputs and stand-ins for the clients' kernels ----------------------------------------------------------------
def random_routing(num_tokens, num_experts, num_topk, drop_prob=0.05):
    """int64 [T, K] distinct experts per token with some -1 slots (dropped by capacity), float32 weights."""
    scores = torch.rand(num_tokens, num_experts, device="cuda")
    topk_idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    topk_idx[torch.rand(num_tokens, num_topk, device="cuda") < drop_prob] = -1
    topk_weights = torch.rand(num_tokens, num_topk, device="cuda", dtype=torch.float32)
    return topk_idx.contiguous(), topk_weights


def expert_scale(expert_ids):
    """float32 factor of each global expert id: the tests' experts multiply their input by it (1/64 steps in
    [0.5, 1.5), so that a row handed to the wrong expert shows)."""
    return 0.5 + ((expert_ids.to(torch.int64) * 37) % 64).to(torch.float32) / 64.0


def per_token_group_quant_fp8(x, group_size=128, eps=1e-10):
    """Block FP8 as vLLM and SGLang feed DeepEP on Hopper: per token and 128-channel group,
    scale = max(amax, eps) / 448, e4m3 = clamp(x / scale); scales float32 [T, H / 128], row-major."""
    num_tokens, hidden = x.shape
    groups = x.float().view(num_tokens, hidden // group_size, group_size)
    scales = groups.abs().amax(dim=2).clamp(min=eps) / FP8_MAX
    x_fp8 = (groups / scales.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x_fp8.view(num_tokens, hidden), scales.contiguous()


def dequantize(x_fp8, scales):
    """float32 rows of e4m3 [..., H] with float32 scales [..., H / 128] (any strides)."""
    hidden = x_fp8.size(-1)
    values = x_fp8.float().view(*x_fp8.shape[:-1], hidden // 128, 128)
    return (values * scales.float().unsqueeze(-1)).view(x_fp8.shape)


def decode_ue8m0(packed):
    """float32 scales [..., H / 128] from int32 [..., H / 512] packing 4 exponent bytes each, low byte first."""
    shifts = torch.arange(0, 32, 8, device=packed.device, dtype=torch.int32)
    exponents = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return torch.exp2(exponents.float() - 127.0).flatten(-2)


def rows_as_float(recv_x, use_ue8m0=False):
    """What an expert computes on: the bf16 rows, or the FP8 rows times their scales."""
    if not isinstance(recv_x, tuple):
        return recv_x.float()
    data, scales = recv_x
    return dequantize(data, decode_ue8m0(scales) if use_ue8m0 else scales)


def normal_expert_output(recv_x, local_mask, recv_expert_ids, recv_topk_weights):
    """An expert stand-in for normal mode, reduced over top-k the way vLLM's TopKWeightAndReduceContiguous and
    SGLang's DeepGEMM path reduce: row m -> bf16(x_m * sum_k w_mk * scale(e_mk)) over the slots local to this
    rank. float32 [N, K] pieces only: the [N, K, H] expert outputs are never materialized."""
    weights = torch.where(
        local_mask, recv_topk_weights * expert_scale(recv_expert_ids.clamp(min=0)), torch.zeros_like(recv_topk_weights)
    )
    return (rows_as_float(recv_x) * weights.sum(dim=1, keepdim=True)).to(torch.bfloat16)


# ---- checks -----------------------------------------------------------------------------------------------------
def _bits(t):
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.contiguous().view(torch.int16)
    if t.dtype in (torch.float8_e4m3fn, torch.bool):
        return t.contiguous().view(torch.uint8)
    if t.dtype == torch.float32:
        return t.contiguous().view(torch.int32)
    return t.contiguous()


def assert_same(label, got, expected):
    """Same shape, dtype and bits."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{label}: expected a tensor, got {type(got).__name__}")
    if got.dtype != expected.dtype or tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{label}: got {got.dtype} {tuple(got.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
        )
    a, b = _bits(got).cpu(), _bits(expected).cpu()
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{label}: {bad.size(0)} of {a.numel()} elements differ; first at {first}: "
            f"got {_value(got, first)}, expected {_value(expected, first)}"
        )


def _value(t, index):
    """One element for a message: its value, or its bits where this torch cannot convert it on the CPU."""
    try:
        return t.detach()[index].float().item()
    except (RuntimeError, TypeError):
        return f"bits {int(_bits(t)[index])}"


def assert_close(label, got, expected, bound):
    """|got - expected| <= bound elementwise (float32 comparison; NaN fails)."""
    diff = (got.float() - expected.float()).abs()
    ok = diff <= bound
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{label}: {bad.size(0)} of {ok.numel()} elements outside the bound; first at {first}: "
            f"got {got[first].item()}, expected {expected[first].item()}, "
            f"bound {bound[first].item() if isinstance(bound, torch.Tensor) else bound}"
        )


def weighted_rows(x_float, topk_idx, topk_weights):
    """(expected, magnitude) float32 [T, H] of sum_k w_k * scale(e_k) * x over the valid slots: what a combine of
    the stand-in experts' outputs returns for each token, and the same sum of absolute values."""
    valid = topk_idx >= 0
    weights = torch.where(valid, topk_weights * expert_scale(topk_idx.clamp(min=0)), torch.zeros_like(topk_weights))
    total = weights.sum(dim=1, keepdim=True)
    return x_float * total, x_float.abs() * weights.abs().sum(dim=1, keepdim=True)


def check_combined(label, combined, x_float, topk_idx, topk_weights, extra_relative=0.0, extra_absolute=None):
    """combined [T, H] against the single-process sum_k w_k * scale(e_k) * x_float: within the bf16 rounding of the
    partial sums (plus `extra_relative` of the magnitude and `extra_absolute`, for FP8 transport)."""
    expected, magnitude = weighted_rows(x_float, topk_idx, topk_weights)
    bound = (BF16_SUM_RELATIVE + extra_relative) * magnitude + 1e-6
    if extra_absolute is not None:
        bound = bound + extra_absolute
    assert_close(label, combined, expected, bound)


# ---- normal mode: the single-process dispatch ------------------------------------------------------------------
def expected_normal_dispatch(group, rank, num_experts, x, topk_idx, topk_weights, expert_alignment=1):
    """What a normal dispatch returns on `rank` (docs/compatibility.md section 6), from every rank's inputs: rows grouped by source
    rank, then by source token; local expert ids (-1 elsewhere), weights (0 elsewhere), per-expert counts
    rounded up to expert_alignment. x is bf16 [T, H] or (e4m3 [T, H], float32 scales [T, H / 128])."""
    fp8 = isinstance(x, tuple)
    all_data = gather(group, x[0] if fp8 else x)
    all_scales = gather(group, x[1]) if fp8 else None
    all_idx = gather(group, topk_idx)
    all_weights = gather(group, topk_weights)
    num_ranks = len(all_idx)
    num_local = num_experts // num_ranks
    first = rank * num_local
    rows, scales, recv_idx, recv_weights = [], [], [], []
    for src in range(num_ranks):
        idx = all_idx[src]
        local = (idx >= first) & (idx < first + num_local)
        chosen = local.any(dim=1)
        rows.append(all_data[src][chosen])
        if fp8:
            scales.append(all_scales[src][chosen])
        recv_idx.append(torch.where(local, idx - first, torch.full_like(idx, -1))[chosen])
        recv_weights.append(torch.where(local, all_weights[src], torch.zeros_like(all_weights[src]))[chosen])
    recv_idx = torch.cat(recv_idx)
    counts = [int((recv_idx == e).any(dim=1).sum()) for e in range(num_local)]
    aligned = [-(-c // expert_alignment) * expert_alignment for c in counts]
    data = torch.cat(rows)
    if fp8:
        data = data.view(torch.float8_e4m3fn)
    return {
        "x": (data, torch.cat(scales)) if fp8 else data,
        "topk_idx": recv_idx,
        "topk_weights": torch.cat(recv_weights),
        "num_recv_tokens_per_expert": aligned,
    }


def check_normal_dispatch(label, expected, recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert):
    """A normal dispatch's outputs, bit for bit, against expected_normal_dispatch."""
    if isinstance(expected["x"], tuple):
        if not isinstance(recv_x, tuple) or len(recv_x) != 2:
            raise AssertionError(f"{label}: FP8 dispatch must return recv_x as (data, scales)")
        assert_same(f"{label} recv_x (e4m3)", recv_x[0], expected["x"][0])
        assert_same(f"{label} recv_x scales", recv_x[1], expected["x"][1])
    else:
        assert_same(f"{label} recv_x", recv_x, expected["x"])
    assert_same(f"{label} recv_topk_idx", recv_topk_idx, expected["topk_idx"])
    assert_same(f"{label} recv_topk_weights", recv_topk_weights, expected["topk_weights"])
    got = [int(v) for v in num_recv_tokens_per_expert]
    if got != expected["num_recv_tokens_per_expert"]:
        raise AssertionError(f"{label}: num_recv_tokens_per_expert {got} != {expected['num_recv_tokens_per_expert']}")


# ---- low-latency mode: direct checks of dispatch and combine ---------------------------------------------------
def check_low_latency_dispatch(
    label,
    group,
    rank,
    x,
    topk_idx,
    num_experts,
    num_max_tokens,
    recv_x,
    recv_count,
    handle,
    use_fp8,
    round_scale=False,
    use_ue8m0=False,
):
    """A low-latency dispatch's outputs (docs/compatibility.md section 8) against every rank's inputs:
    recv_count, layout_range and the set of source tokens of each (expert, source rank) exactly; every valid row
    equal to its source row (bf16) or, with FP8, its scale following the rule and its e4m3 values within half an
    ulp of the source row; the scales' storage column-major."""
    all_x = gather(group, x)
    all_idx = gather(group, topk_idx)
    num_ranks = len(all_idx)
    num_local = num_experts // num_ranks
    num_slots = num_ranks * num_max_tokens
    hidden = x.size(1)
    if tuple(handle[2:]) != (num_max_tokens, hidden, num_experts):
        raise AssertionError(
            f"{label}: handle[2:] = {tuple(handle[2:])}, expected {(num_max_tokens, hidden, num_experts)}"
        )
    src_info, layout_range = handle[0].cpu(), handle[1].cpu()
    counts = recv_count.cpu()
    src_rank = torch.full((num_local, num_slots), -1, dtype=torch.int64)
    for local in range(num_local):
        expert = rank * num_local + local
        expected_total = 0
        for src in range(num_ranks):
            tokens = (all_idx[src] == expert).any(dim=1).nonzero().flatten()
            begin, count = int(layout_range[local, src]) >> 32, int(layout_range[local, src]) & 0xFFFFFFFF
            if count != tokens.numel():
                raise AssertionError(
                    f"{label}: expert {expert} got {count} rows from rank {src} in layout_range, "
                    f"expected {tokens.numel()}"
                )
            got_tokens = src_info[local, begin : begin + count].to(torch.int64).sort().values
            if not torch.equal(got_tokens, tokens):
                raise AssertionError(
                    f"{label}: expert {expert}, rows from rank {src}: source tokens "
                    f"{got_tokens.tolist()} != {tokens.tolist()}"
                )
            if count and bool((src_rank[local, begin : begin + count] >= 0).any()):
                raise AssertionError(f"{label}: expert {expert}: the row ranges of two source ranks overlap")
            src_rank[local, begin : begin + count] = src
            expected_total += count
        if int(counts[local]) != expected_total or bool((src_rank[local, :expected_total] < 0).any()):
            raise AssertionError(
                f"{label}: expert {expert}: recv_count {int(counts[local])}, expected "
                f"{expected_total} rows covering slots [0, {expected_total})"
            )

    # The source row of every valid slot, on the GPU.
    max_tokens = max(1, max(t.size(0) for t in all_x))
    sources = torch.zeros(num_ranks, max_tokens, hidden, dtype=torch.bfloat16)
    for src, rows in enumerate(all_x):
        sources[src, : rows.size(0)] = rows
    valid = src_rank >= 0
    expected_rows = sources[src_rank[valid], src_info.to(torch.int64)[valid]].cuda()
    valid = valid.cuda()
    if not use_fp8:
        assert_same(f"{label} recv_x rows", recv_x[valid], expected_rows)
        return
    data, scales = recv_x
    if scales.stride(1) != 1:
        raise AssertionError(f"{label}: scales must be column-major in the last two dims, strides {scales.stride()}")
    scale = decode_ue8m0(scales) if use_ue8m0 else scales.float()
    scale = scale[valid]
    amax = expected_rows.float().view(-1, hidden // 128, 128).abs().amax(dim=2).clamp(min=1e-4)
    wanted = amax / FP8_MAX
    if round_scale:
        # A power of two, the smallest not below amax / 448.
        mantissa, _ = torch.frexp(scale)
        bad = (mantissa != 0.5) | (scale < wanted * (1 - 1e-6)) | (scale >= 2 * wanted * (1 + 1e-6))
    else:
        bad = (scale - wanted).abs() > 1e-6 * wanted
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{label}: {int(bad.sum())} scales break the FP8 rule; first at valid row/group {first}: "
            f"got {scale[first].item()}, amax / 448 = {wanted[first].item()}"
        )
    values = dequantize(data[valid], scale)
    bound = E4M3_RELATIVE * expected_rows.float().abs() + E4M3_SUBNORMAL * scale.repeat_interleave(128, dim=1)
    assert_close(f"{label} recv_x rows (e4m3 x scale)", values, expected_rows.float(), bound)


def low_latency_expert_output(recv_x, rank, use_ue8m0=False):
    """The stand-in experts on low-latency rows [L, S, H]: y = bf16(scale(e) * rows) (rows past recv_count hold
    whatever was there; combine must not read them)."""
    rows = rows_as_float(recv_x, use_ue8m0)
    num_local = rows.size(0)
    experts = torch.arange(rank * num_local, (rank + 1) * num_local, device=rows.device)
    return (rows * expert_scale(experts).view(-1, 1, 1)).to(torch.bfloat16)


def check_low_latency_combine(label, combined, x, topk_idx, topk_weights, use_fp8):
    """combined [T, H] of the stand-in experts' outputs: sum_k w_k * scale(e_k) * x (with FP8, the dispatched
    x within half an e4m3 ulp: every expert of a token sees the same quantized row)."""
    if not use_fp8:
        check_combined(label, combined, x.float(), topk_idx, topk_weights)
        return
    valid = topk_idx >= 0
    weight_sum = torch.where(
        valid, topk_weights.abs() * expert_scale(topk_idx.clamp(min=0)), torch.zeros_like(topk_weights)
    ).sum(dim=1, keepdim=True)
    group_scale = x.float().view(x.size(0), -1, 128).abs().amax(dim=2).clamp(min=1e-4) / FP8_MAX
    # round_scale may double a scale: take the larger one.
    subnormal = 2 * E4M3_SUBNORMAL * group_scale.repeat_interleave(128, dim=1) * weight_sum
    check_combined(
        label, combined, x.float(), topk_idx, topk_weights, extra_relative=E4M3_RELATIVE, extra_absolute=subnormal
    )


# ---- diagnosis of a failed intranode dispatch --------------------------------------------------------------------
def explain_intranode_dispatch(rank, routing, handle, recv_rows, expected_rows):
    """Where a failed intranode dispatch went wrong on `rank`: the (source, channel) row counts the handle's prefix
    matrices give against those of every rank's is_token_in_rank, and for the first wrong rows their source,
    channel, expected and received source index, and whether the row is all zeros. recv_rows and expected_rows are
    [N, row_bytes] uint8 CPU tensors."""
    rank_prefix = handle[0].cpu()
    num_channels = handle[1].size(1)
    recv_channel_prefix = handle[2].cpu()
    recv_src_idx = handle[3].cpu()
    lines = []
    row_owner = []  # (source, channel, source token) of every expected row, in row order
    for source, in_rank in enumerate(routing):
        num_tokens = in_rank.size(0)
        source_begin = int(rank_prefix[source - 1, rank]) if source > 0 else 0
        source_rows = int(rank_prefix[source, rank]) - source_begin
        for channel in range(num_channels):
            begin, end = num_tokens * channel // num_channels, num_tokens * (channel + 1) // num_channels
            tokens = in_rank[begin:end, rank].nonzero().flatten() + begin
            row_owner += [(source, channel, int(t)) for t in tokens]
            first = int(recv_channel_prefix[source, channel])
            last = int(recv_channel_prefix[source, channel + 1]) if channel + 1 < num_channels else source_rows
            if last - first != tokens.numel():
                lines.append(
                    f"source {source} channel {channel}: handle says {last - first} rows, routing says {tokens.numel()}"
                )
    if not lines:
        lines.append("every (source, channel) row count of the handle matches the routing")
    bad = (recv_rows != expected_rows).any(dim=1).nonzero().flatten().tolist()
    lines.append(f"{len(bad)} wrong rows of {recv_rows.size(0)}")
    for row in bad[:48]:
        source, channel, token = row_owner[row] if row < len(row_owner) else (-1, -1, -1)
        zero = bool((recv_rows[row] == 0).all())
        lines.append(
            f"  row {row}: source {source} channel {channel} token {token}, recv_src_idx {int(recv_src_idx[row])}, "
            f"{'all zeros' if zero else 'wrong bytes'}"
        )
    return "\n".join(lines)
