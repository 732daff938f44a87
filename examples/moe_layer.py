"""A Mixture-of-Experts layer over deep_ep: forward (dispatch -> experts -> combine) and backward
(combine's backward is a cached dispatch, dispatch's backward is a combine), checked against a
single-process computation of the same layer.

    python examples/moe_layer.py [--num-ranks 4]

Runs N ranks on the GPUs present (several ranks per GPU under MPS when there are fewer GPUs).
"""

import argparse

import torch

import deep_ep
from deep_ep.testing import destroy_process_group, init_process_group, launch

HIDDEN, NUM_TOKENS, NUM_TOPK, EXPERTS_PER_RANK = 512, 96, 4, 4


class Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buffer):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS_PER_RANK * buffer.group_size)
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
        )
        ctx.buffer, ctx.handle = buffer, handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_w, recv_idx, handle

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_w, _grad_idx, _grad_handle):
        # Each token's gradient is the sum of its copies' gradients: a combine over the same routing.
        grad_x, grad_w, _ = ctx.buffer.combine(
            grad_recv_x.contiguous(), ctx.handle, topk_weights=grad_recv_w.contiguous()
        )
        return grad_x, grad_w, None, None


class Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, handle, buffer):
        ctx.buffer, ctx.handle = buffer, handle
        combined, _, _ = buffer.combine(y, handle)
        return combined

    @staticmethod
    def backward(ctx, grad_combined):
        # Every copy of a token receives the token's gradient: a cached dispatch.
        grad_y, _, _, _, _, _ = ctx.buffer.dispatch(grad_combined.contiguous(), handle=ctx.handle)
        return grad_y, None, None


def weighted_experts(x, slot_weights, slot_experts, expert_weights):
    """out[row] = sum over the row's slots with an expert of weight * (x @ W_expert), in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for slot in range(slot_experts.size(1)):
        for e in range(expert_weights.size(0)):
            rows = slot_experts[:, slot] == e
            if rows.any():
                out[rows] += slot_weights[rows, slot, None] * (x[rows].float() @ expert_weights[e])
    return out


def run_rank(ctx):
    group = init_process_group(ctx)
    num_ranks = ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    hint = deep_ep.Buffer.get_combine_config(num_ranks).get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks)
    hint = max(hint, deep_ep.Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks))
    buffer = deep_ep.Buffer(group, num_nvl_bytes=hint)

    torch.manual_seed(0)  # the same expert weights on every rank
    all_weights = torch.randn(num_experts, HIDDEN, HIDDEN, device="cuda") / HIDDEN**0.5
    my_weights = all_weights[ctx.rank * EXPERTS_PER_RANK : (ctx.rank + 1) * EXPERTS_PER_RANK]
    torch.manual_seed(1 + ctx.rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, device="cuda").to(torch.bfloat16).requires_grad_()
    topk_idx = torch.rand(NUM_TOKENS, num_experts, device="cuda").topk(NUM_TOPK, dim=1).indices
    topk_weights = torch.rand(NUM_TOKENS, NUM_TOPK, device="cuda").requires_grad_()

    recv_x, recv_w, recv_idx, handle = Dispatch.apply(x, topk_weights, topk_idx, buffer)
    y = weighted_experts(recv_x, recv_w, recv_idx, my_weights).to(torch.bfloat16)  # local expert ids
    out = Combine.apply(y, handle, buffer)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = topk_weights.detach().clone().requires_grad_()
    out_ref = weighted_experts(x_ref, w_ref, topk_idx, all_weights)  # global expert ids
    out_ref.backward(grad_out.float())

    def rel_err(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))

    errors = {
        "out": rel_err(out, out_ref),
        "grad_x": rel_err(x.grad, x_ref.grad),
        "grad_topk_weights": rel_err(topk_weights.grad, w_ref.grad),
    }
    for name, err in errors.items():
        assert err < 3e-2, f"rank {ctx.rank}: {name} relative error {err:.2e} vs the single-process layer"
    destroy_process_group()
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-ranks", type=int, default=4)
    args = parser.parse_args()
    for rank, errors in enumerate(launch(run_rank, args.num_ranks, timeout_s=300)):
        print(f"rank {rank}: " + ", ".join(f"{k} rel. error {v:.1e}" for k, v in errors.items()))
    print("MoE layer forward and backward match the single-process layer")


if __name__ == "__main__":
    main()
