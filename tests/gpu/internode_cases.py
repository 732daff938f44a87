"""Building blocks of the internode GPU tests: emulated node layouts on one GPU (DEEP_EP_RANKS_PER_NODE),
buffer sizing with the internode hints, and exact checks of the internode handle (docs/compatibility.md section 6,
'handle (internode)'). Dispatch outputs and combine results reuse intranode_cases' reference helpers."""

import os

import numpy as np
import torch

import deep_ep
from common import assert_equal, to_numpy

RANKS_PER_NODE_ENV = "DEEP_EP_RANKS_PER_NODE"

# Emulated layouts "<nodes>x<ranks per node>" per rank count.
LAYOUTS = {16: ("2x8", "4x4"), 8: ("2x4",), 4: ("2x2",)}


def parse_layout(layout):
    """(num_nodes, num_ranks_per_node) of "NxRn"."""
    num_nodes, num_ranks_per_node = (int(v) for v in layout.split("x"))
    return num_nodes, num_ranks_per_node


def use_ranks_per_node(num_ranks_per_node):
    """Group ranks into nodes of num_ranks_per_node consecutive ranks; read when a Buffer is created."""
    os.environ[RANKS_PER_NODE_ENV] = str(num_ranks_per_node)


def buffer_sizes(num_ranks, hidden, num_ranks_per_node):
    """(num_nvl_bytes, num_rdma_bytes): the max of the dispatch and combine configs' hints (README pattern)."""
    configs = (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks))
    nvl = max(c.get_nvl_buffer_size_hint(hidden * 2, num_ranks, num_ranks_per_node=num_ranks_per_node) for c in configs)
    rdma = max(
        c.get_rdma_buffer_size_hint(hidden * 2, num_ranks, num_ranks_per_node=num_ranks_per_node) for c in configs
    )
    return nvl, rdma


def make_buffer(group, num_ranks, hidden, num_ranks_per_node, num_rdma_bytes=None):
    """An internode Buffer sized by the hints (num_rdma_bytes overrides the RDMA size); checks the node count."""
    nvl, rdma = buffer_sizes(num_ranks, hidden, num_ranks_per_node)
    if num_rdma_bytes is not None:
        rdma = num_rdma_bytes
    buffer = deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, explicitly_destroy=True)
    expected_nodes = num_ranks // num_ranks_per_node
    nodes = buffer.runtime.num_nodes()
    assert nodes == expected_nodes, (
        f"{RANKS_PER_NODE_ENV}={num_ranks_per_node} with {num_ranks} ranks must give "
        f"{expected_nodes} nodes, the buffer has {nodes}"
    )
    assert buffer.runtime.num_ranks_per_node() == num_ranks_per_node, buffer.runtime.num_ranks_per_node()
    return buffer


def tokens_per_node(in_rank, num_ranks_per_node):
    """bool [T, N]: token t goes to some rank of node n."""
    num_tokens, num_ranks = in_rank.shape
    return in_rank.view(num_tokens, num_ranks // num_ranks_per_node, num_ranks_per_node).any(dim=2)


def check_rdma_layout(per_rdma_rank, in_rank, num_ranks_per_node, label):
    """num_tokens_per_rdma_rank of get_dispatch_layout: [num_nodes], tokens with an expert in node n."""
    num_ranks = in_rank.size(1)
    num_nodes = num_ranks // num_ranks_per_node
    assert per_rdma_rank is not None and per_rdma_rank.numel() == num_nodes, (
        f"{label}: num_tokens_per_rdma_rank must have {num_nodes} entries, got {per_rdma_rank}"
    )
    expected = tokens_per_node(in_rank, num_ranks_per_node).sum(dim=0).to(torch.int32)
    assert_equal(f"{label} num_tokens_per_rdma_rank", to_numpy(per_rdma_rank), to_numpy(expected))


def _check_prefix(name, matrix, rows, label):
    """int32 [rows, C>=1], non-decreasing along channels (inclusive prefixes)."""
    assert matrix.dtype == torch.int32, f"{label}: {name} must be int32, got {matrix.dtype}"
    assert matrix.dim() == 2 and matrix.size(0) == rows and matrix.size(1) >= 1, (
        f"{label}: {name} must be [{rows}, num_channels], got {tuple(matrix.shape)}"
    )
    if matrix.size(1) > 1:
        assert bool((matrix[:, 1:] >= matrix[:, :-1]).all()), f"{label}: {name} must be non-decreasing per row"
    assert bool((matrix >= 0).all()), f"{label}: {name} has negative entries"


def check_internode_handle(expected, handle, in_rank, rank, num_ranks_per_node, num_worst_tokens, label):
    """The internode 10-tuple against the reference dispatch output of this rank and the layout's is_token_in_rank.

    Checks the elements with a defined meaning: is_token_in_rank, recv_gbl_rank_prefix_sum (column `rank` of
    the reference rank_prefix_matrix), recv_src_meta[:, 0] (source token index), the per-rank and per-node
    send totals in the last channel column of gbl/rdma_channel_prefix_matrix, and where send_rdma_head is set.
    """
    assert isinstance(handle, tuple) and len(handle) == 10, (
        f"{label}: internode handle must be a 10-tuple, got {type(handle).__name__} of {len(handle)}"
    )
    num_tokens, num_ranks = in_rank.shape
    num_nodes = num_ranks // num_ranks_per_node
    n = expected.num_recv_tokens
    (
        h_in_rank,
        rdma_channel_prefix,
        gbl_channel_prefix,
        _recv_rdma_channel_prefix,
        _recv_rdma_rank_prefix,
        _recv_gbl_channel_prefix,
        recv_gbl_rank_prefix_sum,
        recv_src_meta,
        send_rdma_head,
        _send_nvl_head,
    ) = handle

    # [0] the layout's is_token_in_rank, kept for combine.
    assert h_in_rank.dtype == torch.bool and tuple(h_in_rank.shape) == (num_tokens, num_ranks), (
        f"{label}: handle[0] must be bool {(num_tokens, num_ranks)}, got {h_in_rank.dtype} {tuple(h_in_rank.shape)}"
    )
    assert torch.equal(h_in_rank, in_rank), f"{label}: handle[0] differs from the is_token_in_rank passed in"

    # [6] inclusive prefix over source ranks of the rows received here: P[:, rank].
    prefix = np.asarray(expected.rank_prefix_matrix, dtype=np.int32).reshape(num_ranks, num_ranks)[:, rank]
    assert recv_gbl_rank_prefix_sum.dtype == torch.int32, f"{label}: handle[6] must be int32"
    assert_equal(f"{label} recv_gbl_rank_prefix_sum", to_numpy(recv_gbl_rank_prefix_sum), prefix)

    # [7] (source token, ...) per received row; its row count is what cached dispatch returns.
    rows = num_worst_tokens if num_worst_tokens else n
    assert recv_src_meta.dtype == torch.int32, f"{label}: handle[7] must be int32, got {recv_src_meta.dtype}"
    assert recv_src_meta.dim() == 2 and tuple(recv_src_meta.shape) == (rows, 2), (
        f"{label}: handle[7] (recv_src_meta) must be [{rows}, 2], got {tuple(recv_src_meta.shape)}"
    )
    assert_equal(f"{label} recv_src_meta[:, 0]", to_numpy(recv_src_meta[:n, 0]), expected.recv_src_idx)

    # [2] tokens this rank sends to each rank: the last channel column.
    _check_prefix("gbl_channel_prefix_matrix (handle[2])", gbl_channel_prefix, num_ranks, label)
    sent_per_rank = in_rank.sum(dim=0).to(torch.int32)
    assert_equal(
        f"{label} gbl_channel_prefix_matrix[:, -1]", to_numpy(gbl_channel_prefix[:, -1]), to_numpy(sent_per_rank)
    )

    # [1] tokens this rank sends to each node (any rank of it).
    per_node = tokens_per_node(in_rank, num_ranks_per_node)
    _check_prefix("rdma_channel_prefix_matrix (handle[1])", rdma_channel_prefix, num_nodes, label)
    assert_equal(
        f"{label} rdma_channel_prefix_matrix[:, -1]",
        to_numpy(rdma_channel_prefix[:, -1]),
        to_numpy(per_node.sum(dim=0).to(torch.int32)),
    )

    # [8] send_rdma_head[t, n] >= 0 exactly where token t goes to node n.
    assert send_rdma_head.dtype == torch.int32, f"{label}: handle[8] must be int32, got {send_rdma_head.dtype}"
    assert tuple(send_rdma_head.shape) == (num_tokens, num_nodes), (
        f"{label}: handle[8] (send_rdma_head) must be {(num_tokens, num_nodes)}, got {tuple(send_rdma_head.shape)}"
    )
    assert_equal(f"{label} send_rdma_head >= 0", to_numpy(send_rdma_head >= 0), to_numpy(per_node))
