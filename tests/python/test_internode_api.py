"""The internode normal-mode surface that can be checked without a GPU: deep_ep.Buffer's internode_dispatch
and internode_combine keep DeepEP V1's parameters (docs/compatibility.md sections 6 and 7), dispatch and combine route to
them when the group spans several nodes, the extension binds what they call, and the Config size hints take
num_ranks_per_node.

The Buffer signatures are read from the installed package's source, so they are checked where torch is
missing too; where torch is present, what Buffer builds from a stand-in runtime (handle, routing, layout)
is checked as well.
"""

import pytest

from api_signatures import REQUIRED, binding_parameters, buffer_source_methods

# V1's parameter names in order, with their defaults (the same as dispatch and combine).
V1_INTERNODE_METHODS = {
    "internode_dispatch": [
        ("x", REQUIRED),
        ("handle", None),
        ("num_tokens_per_rank", None),
        ("num_tokens_per_rdma_rank", None),
        ("is_token_in_rank", None),
        ("num_tokens_per_expert", None),
        ("topk_idx", None),
        ("topk_weights", None),
        ("expert_alignment", 1),
        ("num_worst_tokens", 0),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "internode_combine": [
        ("x", REQUIRED),
        ("handle", REQUIRED),
        ("topk_weights", None),
        ("bias", None),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
}

# What deep_ep.Buffer calls on its runtime (deep_ep._C.Buffer), with the argument names it passes.
CORE_INTERNODE_BINDINGS = {
    "internode_dispatch": [
        "x",
        "x_scales",
        "topk_idx",
        "topk_weights",
        "num_tokens_per_rank",
        "num_tokens_per_rdma_rank",
        "is_token_in_rank",
        "num_tokens_per_expert",
        "handle",
        "expert_alignment",
        "num_worst_tokens",
        "config",
        "allocate",
        "stream",
    ],
    "internode_combine": ["x", "topk_weights", "bias_0", "bias_1", "handle", "config", "allocate", "stream"],
    "num_nodes": [],
    "num_ranks_per_node": [],
}

# The handle's tensors after is_token_in_rank, as the core allocates them (include/deep_ep/buffer.hpp).
HANDLE_OUTPUTS = (
    "rdma_channel_prefix_matrix",
    "gbl_channel_prefix_matrix",
    "recv_rdma_channel_prefix_matrix",
    "recv_rdma_rank_prefix_sum",
    "recv_gbl_channel_prefix_matrix",
    "recv_gbl_rank_prefix_sum",
    "recv_src_meta",
    "send_rdma_head",
    "send_nvl_head",
)


@pytest.mark.parametrize("name", sorted(V1_INTERNODE_METHODS))
def test_buffer_internode_method_keeps_v1_parameters_and_defaults(name):
    methods = buffer_source_methods()
    assert name in methods, f"deep_ep.Buffer has no method {name}"
    assert methods[name] == V1_INTERNODE_METHODS[name]
    public = {"internode_dispatch": "dispatch", "internode_combine": "combine"}[name]
    assert methods[public] == V1_INTERNODE_METHODS[name]


@pytest.mark.parametrize("name", sorted(CORE_INTERNODE_BINDINGS))
def test_core_buffer_binds_internode_op_with_named_arguments(name):
    _C = pytest.importorskip("deep_ep._C")
    assert hasattr(_C.Buffer, name), f"deep_ep._C.Buffer has no method {name}"
    assert [n for n, _ in binding_parameters(getattr(_C.Buffer, name))] == CORE_INTERNODE_BINDINGS[name]


@pytest.mark.parametrize("hint", ["get_nvl_buffer_size_hint", "get_rdma_buffer_size_hint"])
def test_config_hints_take_num_ranks_per_node_defaulting_to_8(hint):
    _C = pytest.importorskip("deep_ep._C")
    assert binding_parameters(getattr(_C.Config, hint)) == [
        ("hidden_bytes", None),
        ("num_ranks", None),
        ("num_ranks_per_node", "8"),
    ]
    method = getattr(_C.Config(16, 4, 16), hint)
    default = method(7168 * 2, 8)
    assert method(7168 * 2, 8, num_ranks_per_node=8) == default
    assert method(7168 * 2, 8, 8) == default


# ---- deep_ep.Buffer over a stand-in runtime (needs torch, not a GPU) ----------------------------------
# The stand-in allocates what the core allocates, by name, so these tests check what Python builds from
# it: routing between the intranode and internode ops, handles and layout outputs.


class _FakeStream:
    def __init__(self, handle):
        self.cuda_stream = handle

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self):
        return ("event", self.cuda_stream)


class _FakeRuntime:
    def __init__(self, num_nodes, num_ranks):
        self.nodes, self.num_ranks = num_nodes, num_ranks
        self.calls = []

    def check_device_errors(self):
        pass

    def num_nodes(self):
        return self.nodes

    def num_ranks_per_node(self):
        return self.num_ranks // self.nodes

    def get_dispatch_layout(self, topk_idx, num_experts, per_rank, per_rdma_rank, per_expert, in_rank, stream):
        self.calls.append(("layout", None if per_rdma_rank is None else list(per_rdma_rank.shape)))

    def _dispatch(self, op, x, x_scales, topk_idx, handle, num_worst_tokens, allocate, handle_outputs):
        rows = num_worst_tokens or 5
        allocate("recv_x", "torch.bfloat16", [rows, x.shape[1]])
        if x_scales is not None:
            allocate("recv_x_scales", "torch.float32", [rows, x.shape[1] // 128])
        if topk_idx is not None:
            allocate("recv_topk_idx", "torch.int64", [rows, topk_idx.shape[1]])
            allocate("recv_topk_weights", "torch.float32", [rows, topk_idx.shape[1]])
        if handle is None:
            for i, name in enumerate(handle_outputs):
                allocate(name, "torch.int32", [i + 1])
        return rows, ([] if handle is not None or num_worst_tokens else [3, 2])

    def intranode_dispatch(
        self,
        x,
        x_scales,
        topk_idx,
        topk_weights,
        num_tokens_per_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        handle,
        expert_alignment,
        num_worst_tokens,
        config,
        allocate,
        stream,
    ):
        self.calls.append(("intranode_dispatch", None if handle is None else len(handle)))
        return self._dispatch(
            "intranode",
            x,
            x_scales,
            topk_idx,
            handle,
            num_worst_tokens,
            allocate,
            ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx", "send_head"),
        )

    def internode_dispatch(
        self,
        x,
        x_scales,
        topk_idx,
        topk_weights,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        handle,
        expert_alignment,
        num_worst_tokens,
        config,
        allocate,
        stream,
    ):
        self.calls.append(
            (
                "internode_dispatch",
                None if handle is None else len(handle),
                None if num_tokens_per_rdma_rank is None else list(num_tokens_per_rdma_rank.shape),
                config.num_sms,
                stream,
            )
        )
        return self._dispatch("internode", x, x_scales, topk_idx, handle, num_worst_tokens, allocate, HANDLE_OUTPUTS)

    def _combine(self, op, x, topk_weights, bias_0, bias_1, handle, allocate):
        self.calls.append((op, len(handle), bias_0 is not None, bias_1 is not None))
        allocate("combined_x", "torch.bfloat16", [4, x.shape[1]])
        if topk_weights is not None:
            allocate("combined_topk_weights", "torch.float32", [4, topk_weights.shape[1]])

    def intranode_combine(self, x, topk_weights, bias_0, bias_1, handle, config, allocate, stream):
        self._combine("intranode_combine", x, topk_weights, bias_0, bias_1, handle, allocate)

    def internode_combine(self, x, topk_weights, bias_0, bias_1, handle, config, allocate, stream):
        self._combine("internode_combine", x, topk_weights, bias_0, bias_1, handle, allocate)


_T, _H, _K = 4, 256, 2


def _make_buffer(monkeypatch, num_nodes, num_ranks):
    torch = pytest.importorskip("torch")
    pytest.importorskip("deep_ep._C")
    import contextlib

    from deep_ep.buffer import Buffer

    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _FakeStream(1))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None, raising=False)
    buffer = object.__new__(Buffer)
    buffer.low_latency_mode, buffer.group_size, buffer.rank = False, num_ranks, 0
    buffer._device, buffer._comm_stream = torch.device("cpu"), _FakeStream(2)
    buffer.runtime = _FakeRuntime(num_nodes, num_ranks)
    return torch, buffer


@pytest.fixture
def internode(monkeypatch):
    return _make_buffer(monkeypatch, 2, 16)


@pytest.fixture
def intranode(monkeypatch):
    return _make_buffer(monkeypatch, 1, 8)


def _layout_inputs(torch, num_ranks, num_nodes):
    return dict(
        num_tokens_per_rank=torch.zeros(num_ranks, dtype=torch.int32),
        num_tokens_per_rdma_rank=torch.zeros(num_nodes, dtype=torch.int32) if num_nodes > 1 else None,
        is_token_in_rank=torch.zeros(_T, num_ranks, dtype=torch.bool),
        num_tokens_per_expert=torch.zeros(num_ranks * 2, dtype=torch.int32),
    )


def test_dispatch_routes_to_internode_and_returns_the_v1_handle(internode):
    torch, buffer = internode
    x = torch.zeros(_T, _H, dtype=torch.bfloat16)
    layout = _layout_inputs(torch, 16, 2)
    topk_idx, topk_weights = torch.zeros(_T, _K, dtype=torch.int64), torch.zeros(_T, _K)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, **layout
    )
    assert buffer.runtime.calls == [("internode_dispatch", None, [2], buffer.get_dispatch_config(16).num_sms, 2)]
    assert recv_x.shape == (5, _H) and recv_topk_idx.shape == (5, _K) and recv_topk_weights.shape == (5, _K)
    assert per_expert == [3, 2] and event.event is None
    assert len(handle) == 10 and handle[0] is layout["is_token_in_rank"]
    # The core allocated output i with i + 1 elements: the handle keeps V1's order.
    assert [t.numel() for t in handle[1:]] == list(range(1, 10))

    # Cached: the handle's routing, no top-k, no counts.
    result = buffer.dispatch(x, handle=handle)
    assert buffer.runtime.calls[-1][:2] == ("internode_dispatch", 10)
    assert result[0].shape == (5, _H) and result[1:5] == (None, None, None, None)


def test_internode_dispatch_keeps_fp8_worst_tokens_and_async_like_intranode(internode):
    torch, buffer = internode
    from deep_ep.utils import EventHandle

    x = torch.zeros(_T, _H, dtype=torch.float8_e4m3fn)
    scales = torch.zeros(_T, _H // 128)
    recv_x, _, _, per_expert, handle, event = buffer.internode_dispatch(
        (x, scales),
        topk_idx=torch.zeros(_T, _K, dtype=torch.int64),
        topk_weights=torch.zeros(_T, _K),
        num_worst_tokens=7,
        previous_event=buffer.capture(),
        async_finish=True,
        allocate_on_comm_stream=True,
        **_layout_inputs(torch, 16, 2),
    )
    assert isinstance(recv_x, tuple) and recv_x[0].shape == (7, _H) and recv_x[1].shape == (7, _H // 128)
    assert per_expert == [] and len(handle) == 10
    # The event is V1's EventHandle, recorded on the comm stream; its torch event is .event.
    assert isinstance(event.event, EventHandle) and event.event.event == ("event", 2) and event.extra_tensors
    with pytest.raises(ValueError, match="allocate_on_comm_stream"):
        buffer.internode_dispatch(x, allocate_on_comm_stream=True, **_layout_inputs(torch, 16, 2))


def test_combine_routes_to_internode_with_biases(internode):
    torch, buffer = internode
    *_, handle, _ = buffer.dispatch(torch.zeros(_T, _H, dtype=torch.bfloat16), **_layout_inputs(torch, 16, 2))
    rows = torch.zeros(5, _H, dtype=torch.bfloat16)
    bias = torch.zeros(_T, _H, dtype=torch.bfloat16)
    combined_x, combined_weights, event = buffer.combine(rows, handle)
    assert combined_x.shape == (4, _H) and combined_weights is None and event.event is None
    assert buffer.runtime.calls[-1] == ("internode_combine", 10, False, False)
    _, combined_weights, _ = buffer.combine(rows, handle, topk_weights=torch.zeros(5, _K), bias=(bias, bias))
    assert combined_weights.shape == (4, _K)
    assert buffer.runtime.calls[-1] == ("internode_combine", 10, True, True)
    buffer.internode_combine(rows, handle, bias=bias)
    assert buffer.runtime.calls[-1] == ("internode_combine", 10, True, False)


def test_internode_handle_must_be_the_10_tuple(internode):
    torch, buffer = internode
    x = torch.zeros(_T, _H, dtype=torch.bfloat16)
    *_, handle, _ = buffer.dispatch(x, **_layout_inputs(torch, 16, 2))
    calls = len(buffer.runtime.calls)
    for bad in (handle[:6], handle + (handle[0],), handle[0]):
        with pytest.raises(ValueError, match="10-tuple"):
            buffer.dispatch(x, handle=bad)
        with pytest.raises(ValueError, match="10-tuple"):
            buffer.internode_dispatch(x, handle=bad)
        with pytest.raises(ValueError, match="10-tuple"):
            buffer.combine(x, bad)
        with pytest.raises(ValueError, match="10-tuple"):
            buffer.internode_combine(x, bad)
    assert len(buffer.runtime.calls) == calls  # rejected before reaching the core


def test_single_node_stays_intranode(intranode):
    torch, buffer = intranode
    x = torch.zeros(_T, _H, dtype=torch.bfloat16)
    *_, handle, _ = buffer.dispatch(x, **_layout_inputs(torch, 8, 1))
    assert buffer.runtime.calls == [("intranode_dispatch", None)] and len(handle) == 6
    buffer.combine(torch.zeros(5, _H, dtype=torch.bfloat16), handle)
    assert buffer.runtime.calls[-1] == ("intranode_combine", 6, False, False)
    with pytest.raises(ValueError, match="6-tuple"):
        buffer.combine(x, handle + handle[:4])


@pytest.mark.parametrize("num_nodes, num_ranks, expected", [(1, 8, None), (2, 16, [2]), (4, 16, [4])])
def test_layout_has_one_rdma_count_per_node_across_nodes(monkeypatch, num_nodes, num_ranks, expected):
    torch, buffer = _make_buffer(monkeypatch, num_nodes, num_ranks)
    _, per_rdma_rank, *_ = buffer.get_dispatch_layout(torch.zeros(_T, _K, dtype=torch.int64), num_ranks * 2)
    assert buffer.runtime.calls == [("layout", expected)]
    assert (per_rdma_rank is None) if expected is None else (list(per_rdma_rank.shape) == expected)
