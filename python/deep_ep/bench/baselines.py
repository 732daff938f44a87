"""Baselines that only exist with several GPUs (the real-NVLink runs): the peer-to-peer copy bandwidth
between two GPUs, and NCCL's all_to_all_single moving the bytes of the normal-mode BF16 dispatch. With
one GPU every rank's traffic is HBM traffic, and the suite's HBM copy is the ceiling instead."""

import os
import statistics

import torch
import torch.distributed as dist

from .timing import median_ms

# NVLink multicast stays off wherever this runs (NCCL's NVLS, torch symmetric memory).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def p2p_copy_gbps(src_device, dst_device, iters=20):
    """Bytes per second of a 1 GiB copy from one GPU to another (one direction)."""
    src = torch.randn(256 << 20, device=f"cuda:{src_device}")
    dst = torch.empty(src.numel(), device=f"cuda:{dst_device}")
    ms = median_ms(lambda: dst.copy_(src), iters)
    return src.numel() * 4 / (ms * 1e-3) / 1e9


def bench_multi_gpu_baselines(ctx, group, opts):
    """Table rows, or none with a single GPU."""
    if ctx.num_gpus < 2:
        return []
    rows = []
    gbps = p2p_copy_gbps(ctx.device, (ctx.device + 1) % ctx.num_gpus) if ctx.rank == 0 else 0.0
    dist.barrier(group)
    rows.append(("NVLink p2p copy, one direction", "1 GiB", "-", f"{gbps:.0f} GB/s", "NVLink ceiling"))
    if ctx.num_ranks > ctx.num_gpus:
        return rows  # NCCL refuses two ranks on one GPU

    # NCCL all-to-all of exactly the dispatch's BF16 rows: token t goes once to every rank holding one of
    # its top-k experts, as deep_ep's dispatch sends it.
    nccl = dist.new_group(backend="nccl")
    t, h, k, e = opts["num_tokens"], opts["hidden"], opts["num_topk"], opts["num_experts"]
    torch.manual_seed(100 + ctx.rank)
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    topk_idx = torch.rand(t, e, device="cuda").topk(k, dim=1).indices
    rank_of_expert = topk_idx // (e // ctx.num_ranks)
    in_rank = torch.zeros(t, ctx.num_ranks, dtype=torch.bool, device="cuda")
    in_rank.scatter_(1, rank_of_expert, True)
    send_rows = torch.cat([x[in_rank[:, j]] for j in range(ctx.num_ranks)])
    send_counts = in_rank.sum(dim=0).to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=nccl)
    recv_rows = torch.empty(int(recv_counts.sum().item()), h, dtype=torch.bfloat16, device="cuda")
    in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
    ms = median_ms(
        lambda: dist.all_to_all_single(recv_rows, send_rows, out_splits, in_splits, group=nccl), opts["iters"]
    )
    local = torch.tensor([ms, recv_rows.numel() * 2], dtype=torch.float64)
    gathered = [None] * ctx.num_ranks
    dist.all_gather_object(gathered, local.tolist(), group=group)
    mean_ms = statistics.fmean(g[0] for g in gathered)
    mean_bytes = statistics.fmean(g[1] for g in gathered)
    rows.append(
        (
            "NCCL all_to_all_single, dispatch BF16 bytes",
            f"{t} tok x {h}, top-{k}/{e}",
            "NCCL",
            f"{mean_bytes / (mean_ms * 1e-3) / 1e9:.0f} GB/s/rank, {mean_ms * 1e3:.0f} us",
            "same bytes as dispatch BF16",
        )
    )
    dist.destroy_process_group(nccl)
    return rows
