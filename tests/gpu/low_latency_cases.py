"""Building blocks of the low-latency GPU tests: random inputs per rank, the global CPU reference through
the gloo group, exact comparisons of dispatch outputs and handle, and combine checks (bit-level for bf16
transport, within a stated bound for LogFMT).

The reference's outputs are [L, S, H] per rank (E * M * H elements whatever R is), so one copy of the global
view is already R such arrays. Rank 0 alone runs deep_ep.reference on every rank's inputs and hands each rank
only what it compares: counts, layout, and the valid rows of its experts. Rows past recv_count are undefined
on the GPU and are never compared.
"""

import numpy as np
import torch
import torch.distributed as dist

import deep_ep
from common import assert_equal, gather_numpy, random_topk_idx, to_numpy

ref = deep_ep.reference

# LogFMT combine: |got - ref| <= LOGFMT_RELATIVE * sum_k |w_k| |y_k| + LOGFMT_ABSOLUTE * max|y| per element.
# The codec's own error is about 0.7% of each value (plus the bf16 rounding of the sum); values far below
# the largest of their 64-channel group may be flushed, which the absolute term covers. The bound is looser
# than the codec on purpose: it catches wrong rows, weights or signs, not the codec's last bit.
LOGFMT_RELATIVE = 0.02
LOGFMT_ABSOLUTE = 1e-2


# ---- inputs --------------------------------------------------------------------------------------------
def make_x(num_tokens, hidden):
    """bf16 [T, H]: randn with a per-token magnitude from 2^-6 to 2^6, and one all-zero 128-channel group in
    the first token (its FP8 scale comes from the amax floor of 1e-4)."""
    x = torch.randn(num_tokens, hidden, device="cuda")
    if num_tokens > 0:
        x *= torch.exp2(torch.randint(-6, 7, (num_tokens, 1), device="cuda").float())
        x[0, 128:256] = 0
    return x.to(torch.bfloat16)


def make_topk(num_tokens, num_experts, num_topk, drop_prob=0.1, num_empty_tokens=0):
    """int64 [T, K]: distinct experts per token, some -1 slots, and the first `num_empty_tokens` tokens with
    no expert at all."""
    idx = random_topk_idx(num_tokens, num_experts, num_topk, drop_prob=drop_prob)
    idx[: min(num_empty_tokens, num_tokens)] = -1
    return idx


def make_weights(num_tokens, num_topk):
    return torch.rand(num_tokens, num_topk, device="cuda")


def make_expert_output(num_local_experts, num_slots, hidden):
    """bf16 [L, S, H] expert outputs; rows past recv_count hold random values too (combine must skip them)."""
    return torch.randn(num_local_experts, num_slots, hidden, device="cuda", dtype=torch.bfloat16)


def sync(group):
    """Finish this rank's GPU work and line the ranks up, so that the next low-latency op starts together on
    every rank (a rank busy with the CPU reference must not look like a dead peer)."""
    torch.cuda.synchronize()
    dist.barrier(group)


# ---- gloo transfers rooted at rank 0 ---------------------------------------------------------------------
def _gather_to_root(group, obj):
    """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
    is_root = dist.get_rank(group) == 0
    out = [None] * dist.get_world_size(group) if is_root else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(group, 0), group=group)
    return out


def _scatter_from_root(group, per_rank):
    """Rank 0 passes one object per rank (others pass None); each rank gets its own."""
    out = [None]
    dist.scatter_object_list(out, per_rank, src=dist.get_global_rank(group, 0), group=group)
    return out[0]


# ---- bf16 bit helpers ---------------------------------------------------------------------------------------
def bf16_bits_to_float(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _bf16_ordered(bits):
    """bf16 bit patterns mapped to integers that are consecutive for consecutive bf16 values (+0 == -0)."""
    b = np.asarray(bits, dtype=np.uint16).astype(np.int32)
    return np.where(b & 0x8000, -(b & 0x7FFF), b)


def bf16_ulp_distance(got_bits, expected_bits):
    return np.abs(_bf16_ordered(got_bits) - _bf16_ordered(expected_bits))


# ---- the reference ----------------------------------------------------------------------------------------
def _valid_row_mask(recv_count, num_slots):
    """bool [L, S]: the first recv_count[l] rows of each local expert."""
    return np.arange(num_slots)[None, :] < np.asarray(recv_count)[:, None]


def _expected_dispatch_of(out, mask, dims, use_fp8, use_ue8m0):
    """One rank's reference dispatch output, reduced to what the GPU result is compared with; the large
    payload fields of `out` are emptied (combine needs only its handle fields)."""
    num_local_experts, num_slots, hidden = dims
    expected = {
        "recv_count": out.recv_count,
        "layout_range": out.layout_range,
        "src_info": out.src_info.reshape(num_local_experts, num_slots)[mask],
    }
    if use_fp8:
        expected["rows"] = out.recv_x_fp8.reshape(num_local_experts, num_slots, hidden)[mask]
        out.recv_x_fp8 = np.empty(0, np.uint8)
        if use_ue8m0:
            expected["scales"] = out.recv_scales_ue8m0.reshape(num_local_experts, num_slots, hidden // 512)[mask]
            out.recv_scales_ue8m0 = np.empty(0, np.int32)
        else:
            expected["scales"] = out.recv_scales.reshape(num_local_experts, num_slots, hidden // 128)[mask]
            out.recv_scales = np.empty(0, np.float32)
    else:
        expected["rows"] = out.recv_x_bf16.reshape(num_local_experts, num_slots, hidden)[mask]
        out.recv_x_bf16 = np.empty(0, np.uint16)
    return expected


def _assert_rows_equal(label, got, expected, mask):
    """got/expected: [N, W] valid rows in (expert, slot) order; names the expert, slot and column of the
    first difference."""
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise AssertionError(f"{label}: shape {got.shape} != expected {expected.shape}")
    differs = got != expected
    if differs.any():
        row, column = np.argwhere(differs)[0]
        expert, slot = np.argwhere(mask)[row]
        raise AssertionError(
            f"{label}: {int(differs.any(axis=1).sum())} of {expected.shape[0]} valid rows differ; "
            f"first at local expert {expert}, slot {slot}, column {column}: got {got[row, column]}, "
            f"expected {expected[row, column]}"
        )


def _check_tensor(label, tensor, dtype, shape):
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise AssertionError(f"{label} must be {dtype} {tuple(shape)}, got {got}")


class LowLatencyReference:
    """The CPU reference of one low-latency dispatch, and of combines of its rows (collective calls).

    Every rank constructs it with its own inputs (a rank that sits out an op passes 0 tokens). Rank 0 keeps
    the global reference state; each rank keeps `expected`, its own part of the dispatch result.
    """

    def __init__(
        self, group, ctx, x, topk_idx, num_experts, num_max_tokens, use_fp8=True, round_scale=False, use_ue8m0=False
    ):
        self.group, self.rank, self.num_ranks = group, ctx.rank, ctx.num_ranks
        self.num_tokens, self.hidden = x.size(0), x.size(1)
        self.num_topk = topk_idx.size(1)
        self.num_experts, self.num_max_tokens = num_experts, num_max_tokens
        self.num_local_experts = num_experts // ctx.num_ranks
        self.num_slots = ctx.num_ranks * num_max_tokens
        self.use_fp8, self.use_ue8m0 = use_fp8, use_fp8 and use_ue8m0

        mine = {"num_tokens": self.num_tokens, "x": to_numpy(x), "topk_idx": to_numpy(topk_idx)}
        everyone = gather_numpy(group, mine)
        per_rank = None
        if self.rank == 0:
            args = ref.LowLatencyDispatchArgs()
            args.num_ranks = ctx.num_ranks
            args.num_experts = num_experts
            args.hidden = self.hidden
            args.num_topk = self.num_topk
            args.num_max_dispatch_tokens_per_rank = num_max_tokens
            args.use_fp8, args.round_scale, args.use_ue8m0 = use_fp8, round_scale, use_ue8m0
            inputs = []
            for f in everyone:
                item = ref.LowLatencyDispatchInput()
                item.num_tokens = f["num_tokens"]
                item.x = f["x"]
                item.topk_idx = f["topk_idx"]
                inputs.append(item)
            outputs = ref.low_latency_dispatch(inputs, args)
            dims = (self.num_local_experts, self.num_slots, self.hidden)
            masks = [_valid_row_mask(out.recv_count, self.num_slots) for out in outputs]
            per_rank = [
                _expected_dispatch_of(out, mask, dims, use_fp8, self.use_ue8m0) for out, mask in zip(outputs, masks)
            ]
            self._prepare_combine(args, inputs, outputs, masks)
        del everyone
        self.expected = _scatter_from_root(group, per_rank)
        self.mask = _valid_row_mask(self.expected["recv_count"], self.num_slots)

    def _prepare_combine(self, args, inputs, outputs, masks):
        """Rank 0: the reference state combine checks need, trimmed to the rows combine can read.

        The reference combine reads only the first recv_count[l] rows of each expert (through layout_range
        and src_info), and rows start at slot 0 of the expert whatever M is. So it is handed the same handle
        with every expert cut to S' = R * M' slots, M' the smallest count with S' >= the largest recv_count:
        an exact equivalent whose [L, S', H] inputs are a small fraction of the [L, S, H] ones.
        """
        num_ranks, num_slots = self.num_ranks, self.num_slots
        max_count = max((int(out.recv_count.max()) for out in outputs if out.recv_count.size), default=0)
        trimmed_max_tokens = max(1, -(-max_count // num_ranks))
        trimmed_slots = num_ranks * trimmed_max_tokens
        for out in outputs:
            src_info = out.src_info.reshape(self.num_local_experts, num_slots)[:, :trimmed_slots]
            out.src_info = np.ascontiguousarray(src_info).reshape(-1)
        combine_args = ref.LowLatencyDispatchArgs()
        for name in ("num_ranks", "num_experts", "hidden", "num_topk", "use_fp8", "round_scale", "use_ue8m0"):
            setattr(combine_args, name, getattr(args, name))
        combine_args.num_max_dispatch_tokens_per_rank = trimmed_max_tokens
        self._combine_args, self._inputs, self._outputs = combine_args, inputs, outputs
        self._trimmed_masks = [mask[:, :trimmed_slots] for mask in masks]

    def _gpu_mask(self):
        return torch.from_numpy(self.mask).cuda()

    # ---- dispatch: rank-local, exact --------------------------------------------------------------------
    def check_dispatch(self, recv_x, recv_count, handle, label):
        L, S, H, R = self.num_local_experts, self.num_slots, self.hidden, self.num_ranks
        e = self.expected
        _check_tensor(f"{label} recv_count", recv_count, torch.int32, (L,))
        assert_equal(f"{label} recv_count", to_numpy(recv_count), e["recv_count"])
        mask = self._gpu_mask()

        if self.use_fp8:
            assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"{label}: FP8 recv_x must be (data, scales)"
            data, scales = recv_x
            num_scales = H // 512 if self.use_ue8m0 else H // 128
            _check_tensor(f"{label} recv_x", data, torch.float8_e4m3fn, (L, S, H))
            _check_tensor(
                f"{label} recv_x scales", scales, torch.int32 if self.use_ue8m0 else torch.float32, (L, S, num_scales)
            )
            # Column-major in the last two dims: a transposed view of [L, num_scales, S].
            assert scales.stride(1) == 1, f"{label}: scales must be column-major, got strides {scales.stride()}"
            _assert_rows_equal(
                f"{label} recv_x (e4m3 bytes)",
                to_numpy(data.view(torch.uint8)[mask]).reshape(-1, H),
                e["rows"],
                self.mask,
            )
            _assert_rows_equal(
                f"{label} recv_x scales", to_numpy(scales[mask]).reshape(-1, num_scales), e["scales"], self.mask
            )
        else:
            _check_tensor(f"{label} recv_x", recv_x, torch.bfloat16, (L, S, H))
            _assert_rows_equal(
                f"{label} recv_x (bf16 bits)", to_numpy(recv_x[mask]).reshape(-1, H), e["rows"], self.mask
            )

        assert isinstance(handle, tuple) and len(handle) == 5, f"{label}: handle must be a 5-tuple"
        src_info, layout_range = handle[0], handle[1]
        geometry = (self.num_max_tokens, H, self.num_experts)
        assert tuple(handle[2:]) == geometry, f"{label}: handle[2:] = {tuple(handle[2:])}, expected {geometry}"
        _check_tensor(f"{label} src_info", src_info, torch.int32, (L, S))
        _check_tensor(f"{label} layout_range", layout_range, torch.int64, (L, R))
        _assert_rows_equal(
            f"{label} src_info", to_numpy(src_info[mask]).reshape(-1, 1), e["src_info"].reshape(-1, 1), self.mask
        )
        assert_equal(f"{label} layout_range ((begin << 32) | count)", to_numpy(layout_range), e["layout_range"])

    # ---- combine: collective ------------------------------------------------------------------------------
    def check_combine(self, y, topk_weights, combined_x, label, masked_ranks=(), logfmt=False):
        """Compare combined_x (bf16 [T, H]) with the reference combine of every rank's expert outputs y
        (bf16 [L, S, H], any strides; only the valid rows are read). A rank that sat out the combine passes
        None for y, topk_weights and combined_x. Collective: every rank calls it."""
        H = self.hidden
        rows = None if y is None else to_numpy(y[self._gpu_mask()]).reshape(-1, H)
        weights = np.empty(0, np.float32) if topk_weights is None else to_numpy(topk_weights.float())
        gathered = _gather_to_root(self.group, (rows, weights))
        per_rank = self._reference_combine(gathered, masked_ranks, logfmt) if self.rank == 0 else None
        del gathered, rows
        expected = _scatter_from_root(self.group, per_rank)

        summary, failure = None, None
        if combined_x is not None:
            summary, failure = self._compare_combined(combined_x, expected, label, logfmt)
        summaries = _gather_to_root(self.group, summary)
        if self.rank == 0:
            worst = [s for s in summaries if s is not None]
            if worst:
                what = "max |got - ref| / bound" if logfmt else "max bf16 ulp"
                print(
                    f"{label}: combined_x max |got - ref| = {max(s[0] for s in worst):.4g}, "
                    f"{what} = {max(s[1] for s in worst):.4g} (over {len(worst)} ranks)",
                    flush=True,
                )
        if failure is not None:
            raise AssertionError(failure)

    def _reference_combine(self, gathered, masked_ranks, logfmt):
        """Rank 0: the reference combine of every rank (and for LogFMT the per-element bound)."""
        L, H = self.num_local_experts, self.hidden
        S = self._combine_args.num_max_dispatch_tokens_per_rank * self.num_ranks

        def inputs_from(transform_rows, transform_weights):
            inputs = []
            for mask, (rows, weights) in zip(self._trimmed_masks, gathered):
                item = ref.LowLatencyCombineInput()
                full = np.zeros((L, S, H), np.uint16)
                if rows is not None:
                    full[mask] = transform_rows(rows)
                item.x = full.reshape(-1)
                del full
                item.topk_weights = transform_weights(weights)
                inputs.append(item)
            return inputs

        masked = [1 if r in masked_ranks else 0 for r in range(self.num_ranks)]
        inputs = inputs_from(lambda rows: rows, lambda w: w)
        combined = ref.low_latency_combine(self._inputs, self._outputs, inputs, self._combine_args, masked_ranks=masked)
        del inputs
        if not logfmt:
            return [{"combined": c} for c in combined]
        # The same reduction over |w| and |y|: the scale of each element's LogFMT error.
        inputs = inputs_from(lambda rows: rows & np.uint16(0x7FFF), lambda w: np.abs(w))
        magnitude = ref.low_latency_combine(
            self._inputs, self._outputs, inputs, self._combine_args, masked_ranks=masked
        )
        del inputs
        max_abs_y = 0.0
        for r, (rows, _) in enumerate(gathered):
            if rows is not None and rows.size and not masked[r]:
                max_abs_y = max(max_abs_y, float(np.abs(bf16_bits_to_float(rows)).max()))
        return [{"combined": c, "magnitude": m, "max_abs_y": max_abs_y} for c, m in zip(combined, magnitude)]

    def _compare_combined(self, combined_x, expected, label, logfmt):
        """(summary (max abs diff, max ulp or bound ratio), failure text or None) of this rank's result."""
        T, H = self.num_tokens, self.hidden
        if combined_x.dtype != torch.bfloat16 or tuple(combined_x.shape) != (T, H):
            return None, (
                f"{label}: combined_x must be bf16 [{T}, {H}], got {combined_x.dtype} {tuple(combined_x.shape)}"
            )
        got_bits = to_numpy(combined_x)
        exp_bits = expected["combined"]
        if got_bits.size == 0:
            return (0.0, 0.0), None
        got, exp = bf16_bits_to_float(got_bits), bf16_bits_to_float(exp_bits)
        diff = np.abs(got - exp)
        max_abs = float(np.nan_to_num(diff, nan=np.inf).max())
        if not logfmt:
            ulps = bf16_ulp_distance(got_bits, exp_bits)
            bad = np.flatnonzero(ulps > 1)
            summary = (max_abs, float(ulps.max()))
            if bad.size:
                i = bad[0]
                return summary, (
                    f"{label}: combined_x differs from the reference by more than 1 bf16 ulp in "
                    f"{bad.size} of {ulps.size} elements; first at token {i // H}, channel {i % H}: "
                    f"got {float(got[i])}, expected {float(exp[i])} ({int(ulps[i])} ulp)"
                )
            return summary, None
        bound = LOGFMT_RELATIVE * bf16_bits_to_float(expected["magnitude"]) + LOGFMT_ABSOLUTE * expected["max_abs_y"]
        ok = diff <= bound  # False for NaN
        ratio = diff / np.maximum(bound, np.float32(1e-30))
        summary = (max_abs, float(np.nan_to_num(ratio, nan=np.inf).max()))
        bad = np.flatnonzero(~ok)
        if bad.size:
            i = bad[0]
            return summary, (
                f"{label}: LogFMT combined_x outside the bound in {bad.size} of {ok.size} elements; "
                f"first at token {i // H}, channel {i % H}: got {float(got[i])}, "
                f"expected {float(exp[i])}, bound {float(bound[i])}"
            )
        return summary, None


# ---- cheap GPU-side checks (many rounds, CUDA graphs) ---------------------------------------------------------
def identity_combine_expected(x, topk_idx, topk_weights):
    """float32 [T, H]: what combine returns when every expert is the identity (y = the received row):
    sum over valid k of w_k * x_t = x_t * sum_k w_k (with w_k >= 0 every term has x_t's sign: no cancellation,
    so float32 summation order changes the result by far less than a bf16 ulp)."""
    valid = topk_idx >= 0
    weight_sum = torch.where(valid, topk_weights, torch.zeros_like(topk_weights)).sum(dim=1, keepdim=True)
    return x.float() * weight_sum


def identity_combine_excess(combined_x, expected, ulps=2):
    """0-dim float32 on the GPU (no host sync): max over elements of |got - expected| - ulps * 2^-7 |expected|.
    2^-7 |v| is at least one bf16 ulp of v (bf16 keeps 8 significant bits), so <= 0 means every element is
    within `ulps` (up to twice that many) bf16 ulps of the float32 expectation. NaN makes it +inf."""
    if combined_x.numel() == 0:
        return torch.zeros((), device=combined_x.device)
    excess = (combined_x.float() - expected).abs() - ulps * 2.0**-7 * expected.abs()
    return torch.nan_to_num(excess, nan=float("inf")).max()


def expected_recv_count(group, topk_idx, num_experts, rank, num_ranks):
    """int32 [L]: rows each local expert of `rank` receives, from every rank's topk_idx (small all-gather)."""
    everyone = gather_numpy(group, to_numpy(topk_idx))
    num_local = num_experts // num_ranks
    counts = np.zeros(num_local, np.int64)
    for idx in everyone:
        local = idx[(idx >= rank * num_local) & (idx < (rank + 1) * num_local)] - rank * num_local
        counts += np.bincount(local, minlength=num_local)
    return counts.astype(np.int32)
