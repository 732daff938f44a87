"""Building blocks of the intranode GPU tests: random inputs per rank, the CPU reference of this rank's results
from every rank's inputs (gathered over the gloo group), and exact comparisons of every output and handle element."""

import numpy as np
import torch
import torch.distributed as dist

import deep_ep
from common import assert_equal, gather_numpy, to_numpy

ref = deep_ep.reference


def make_topk(num_tokens, num_experts, num_topk, num_ranks, routing):
    """topk_idx for a routing pattern: random (with -1 slots), one_rank, all_minus_one."""
    if num_tokens == 0:
        return torch.empty((0, num_topk), dtype=torch.int64, device="cuda")
    if routing == "all_minus_one":
        return torch.full((num_tokens, num_topk), -1, dtype=torch.int64, device="cuda")
    if routing == "one_rank":
        # Every token's experts live on rank 1 (or 0 with a single rank).
        local = num_experts // num_ranks
        target = 1 % num_ranks
        scores = torch.rand(num_tokens, local, device="cuda")
        k = min(num_topk, local)
        idx = torch.full((num_tokens, num_topk), -1, dtype=torch.int64, device="cuda")
        idx[:, :k] = scores.topk(k, dim=1).indices + target * local
        return idx
    scores = torch.rand(num_tokens, num_experts, device="cuda")
    idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    idx[torch.rand(num_tokens, num_topk, device="cuda") < 0.1] = -1
    # A few tokens with no expert at all.
    idx[torch.rand(num_tokens, device="cuda") < 0.03] = -1
    return idx.contiguous()


def event_kwargs(buffer, mode):
    """An op's keyword arguments in a test mode: sync (none), async (async_finish), previous_event (an
    event captured just before), comm_alloc (both, and outputs allocated on the communication stream)."""
    if mode == "async":
        return dict(async_finish=True)
    if mode == "previous_event":
        return dict(previous_event=buffer.capture())
    if mode == "comm_alloc":
        return dict(previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=True)
    return {}


def wait_for_outputs(mode, event):
    """Make an op's outputs usable on the current stream in the modes that hand back an event."""
    if mode in ("async", "comm_alloc"):
        event.current_stream_wait()


def make_bias(num_tokens, hidden, num_tensors):
    """combine's bias: None, one bf16 [T, H] tensor, or a tuple of two."""

    def one():
        return torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)

    if num_tensors == 0:
        return None
    return one() if num_tensors == 1 else (one(), one())


def check_combine(expected, combined_x, combined_weights, topk_idx, topk_weights, in_rank, with_topk, label):
    """combine's outputs against the reference (exactly); with top-k, the weights of every routed slot
    come back as they were sent, since each survives on exactly one rank."""
    assert_equal(f"{label} combined_x", to_numpy(combined_x), expected.combined_x)
    if with_topk:
        assert_equal(f"{label} combined_topk_weights", to_numpy(combined_weights), expected.combined_topk_weights)
        routed = in_rank.any(dim=1, keepdim=True) & (topk_idx >= 0)
        assert torch.equal(torch.where(routed, topk_weights, 0.0), torch.where(routed, combined_weights, 0.0))
    else:
        assert combined_weights is None


def make_x(num_tokens, hidden, fp8):
    """bf16 x, or (e4m3 x, column-major float32 scales) as DeepEP users pass them."""
    x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    if not fp8:
        return x
    x_fp8 = (torch.randn(num_tokens, hidden, device="cuda") * 50).to(torch.float8_e4m3fn)
    scales = torch.rand(hidden // 128, num_tokens, device="cuda").t()  # stride (1, T)
    return x_fp8, scales


def dispatch_input(x, topk_idx, topk_weights, is_token_in_rank, with_topk):
    item = ref.NormalDispatchInput()
    x_data, x_scales = x if isinstance(x, tuple) else (x, None)
    item.num_tokens = x_data.size(0)
    item.x = to_numpy(x_data.view(torch.uint8))
    if x_scales is not None:
        item.x_scales = to_numpy(x_scales.contiguous())
    if with_topk:
        item.topk_idx = to_numpy(topk_idx)
        item.topk_weights = to_numpy(topk_weights)
    item.is_token_in_rank = to_numpy(is_token_in_rank)
    return item


def reference_dispatch(
    group, ctx, x, topk_idx, topk_weights, is_token_in_rank, with_topk, num_experts, expert_alignment, num_worst_tokens
):
    """(inputs of all ranks, reference outputs of all ranks: this rank's complete, the others' routing only)."""
    mine = dispatch_input(x, topk_idx, topk_weights, is_token_in_rank, with_topk)
    fields = {name: getattr(mine, name) for name in ("x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank")}
    fields["num_tokens"] = mine.num_tokens
    everyone = gather_numpy(group, fields)
    inputs = []
    for f in everyone:
        item = ref.NormalDispatchInput()
        item.num_tokens = f["num_tokens"]
        for name in ("x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank"):
            setattr(item, name, f[name])
        inputs.append(item)
    x_data = x[0] if isinstance(x, tuple) else x
    args = ref.NormalDispatchArgs()
    args.num_ranks = ctx.num_ranks
    args.num_experts = num_experts
    args.row_bytes = x_data.size(1) * x_data.element_size()
    args.num_scales = x_data.size(1) // 128 if isinstance(x, tuple) else 0
    args.num_topk = topk_idx.size(1) if with_topk else 0
    args.expert_alignment = expert_alignment
    args.num_worst_tokens = num_worst_tokens
    args.only_rank = ctx.rank  # the rows of the other ranks are theirs to check
    return inputs, ref.normal_dispatch(inputs, args)


def check_dispatch(
    expected, recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, with_topk, num_worst_tokens, label
):
    n = expected.num_recv_tokens
    x_data, x_scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    rows = num_worst_tokens if num_worst_tokens else n
    assert x_data.size(0) == rows, f"{label}: recv_x has {x_data.size(0)} rows, expected {rows}"
    row_bytes = x_data.size(1) * x_data.element_size()
    assert_equal(f"{label} recv_x", to_numpy(x_data[:n].view(torch.uint8)), expected.recv_x[: n * row_bytes])
    if x_scales is not None:
        s = x_scales.size(1)
        assert_equal(f"{label} recv_x_scales", to_numpy(x_scales[:n]), expected.recv_x_scales[: n * s])
    if with_topk:
        k = recv_topk_idx.size(1)
        assert_equal(f"{label} recv_topk_idx", to_numpy(recv_topk_idx), expected.recv_topk_idx[: rows * k])
        assert_equal(f"{label} recv_topk_weights", to_numpy(recv_topk_weights), expected.recv_topk_weights[: rows * k])
        if num_worst_tokens:
            assert per_expert_list == [], f"{label}: num_worst_tokens must return an empty list"
        else:
            assert_equal(
                f"{label} num_recv_tokens_per_expert",
                np.array(per_expert_list, dtype=np.int32),
                expected.num_recv_tokens_per_expert,
            )
    if handle is not None:
        assert_equal(f"{label} rank_prefix_matrix", to_numpy(handle[0]), expected.rank_prefix_matrix)
        assert_equal(f"{label} recv_src_idx", to_numpy(handle[3][:n]), expected.recv_src_idx)
        if num_worst_tokens:
            assert bool((handle[3][n:] == -1).all()), f"{label}: padded recv_src_idx rows must be -1"


def reference_combine(
    group, dispatch_inputs, dispatch_outputs, x, topk_weights, bias, hidden, num_topk, num_ranks_per_node=0
):
    """The reference combine, indexed by rank: this rank's entry is complete, the others are empty (each rank
    checks its own). num_ranks_per_node > 0 selects the internode (two-level) summation order of nodes of that many
    consecutive ranks; 0 is the flat intranode order."""
    rank = dist.get_rank(group)
    # Only this rank's biases are summed here: the other ranks' stay where they are.
    mine = {"x": to_numpy(x), "topk_weights": None if topk_weights is None else to_numpy(topk_weights)}
    inputs = []
    for f in gather_numpy(group, mine):
        c = ref.NormalCombineInput()
        c.x = f["x"]
        if f["topk_weights"] is not None:
            c.topk_weights = f["topk_weights"]
        inputs.append(c)
    if bias is not None:
        biases = bias if isinstance(bias, tuple) else (bias,)
        inputs[rank].bias_0 = to_numpy(biases[0])
        if len(biases) > 1:
            inputs[rank].bias_1 = to_numpy(biases[1])
    return ref.normal_combine(
        dispatch_inputs,
        dispatch_outputs,
        inputs,
        hidden,
        num_topk,
        num_ranks_per_node=num_ranks_per_node,
        only_rank=rank,
    )
