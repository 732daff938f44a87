"""The low-latency surface that can be checked without a GPU: deep_ep.Buffer's low-latency methods keep
DeepEP V1's parameter names, order and defaults (docs/compatibility.md section 8), the extension exposes the bindings
they call, and the low-latency buffer size hint grows with every size it depends on.

The Buffer signatures are read from the installed package's source, so they are checked where torch
is missing too; where torch is present, the imported class is checked as well, and so is what Buffer
builds from a stand-in runtime (output views, handle, hooks, streams).
"""

import inspect

import pytest

from api_signatures import REQUIRED, binding_parameters, buffer_source_methods

# docs/compatibility.md section 8 (and section 3 for the size hint): parameter names in order, with V1's defaults.
V1_LOW_LATENCY_METHODS = {
    "low_latency_dispatch": [
        ("x", REQUIRED),
        ("topk_idx", REQUIRED),
        ("num_max_dispatch_tokens_per_rank", REQUIRED),
        ("num_experts", REQUIRED),
        ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None),
        ("use_fp8", True),
        ("round_scale", False),
        ("use_ue8m0", False),
        ("async_finish", False),
        ("return_recv_hook", False),
    ],
    "low_latency_combine": [
        ("x", REQUIRED),
        ("topk_idx", REQUIRED),
        ("topk_weights", REQUIRED),
        ("handle", REQUIRED),
        ("use_logfmt", False),
        ("zero_copy", False),
        ("async_finish", False),
        ("return_recv_hook", False),
        ("out", None),
        ("combine_wait_recv_cost_stats", None),
    ],
    "get_next_low_latency_combine_buffer": [("handle", REQUIRED)],
    "clean_low_latency_buffer": [
        ("num_max_dispatch_tokens_per_rank", REQUIRED),
        ("hidden", REQUIRED),
        ("num_experts", REQUIRED),
    ],
    "low_latency_update_mask_buffer": [("rank_to_mask", REQUIRED), ("mask", False)],
    "low_latency_query_mask_buffer": [("mask_status", REQUIRED)],
    "low_latency_clean_mask_buffer": [],
    "get_low_latency_rdma_size_hint": [
        ("num_max_dispatch_tokens_per_rank", REQUIRED),
        ("hidden", REQUIRED),
        ("num_ranks", REQUIRED),
        ("num_experts", REQUIRED),
    ],
}

# What deep_ep.Buffer calls on its runtime (deep_ep._C.Buffer), with the argument names it passes.
CORE_LOW_LATENCY_BINDINGS = {
    "low_latency_dispatch": [
        "x",
        "topk_idx",
        "num_max_dispatch_tokens_per_rank",
        "num_experts",
        "cumulative_local_expert_recv_stats",
        "dispatch_wait_recv_cost_stats",
        "use_fp8",
        "round_scale",
        "use_ue8m0",
        "return_recv_hook",
        "allocate",
        "stream",
    ],
    "low_latency_combine": [
        "x",
        "topk_idx",
        "topk_weights",
        "src_info",
        "layout_range",
        "num_max_dispatch_tokens_per_rank",
        "hidden",
        "num_experts",
        "use_logfmt",
        "zero_copy",
        "return_recv_hook",
        "out",
        "combine_wait_recv_cost_stats",
        "allocate",
        "stream",
    ],
    "low_latency_receive": ["pending", "stream"],
    "next_low_latency_combine_buffer": [
        "src_info",
        "layout_range",
        "num_max_dispatch_tokens_per_rank",
        "hidden",
        "num_experts",
    ],
    "clean_low_latency_buffer": ["num_max_dispatch_tokens_per_rank", "hidden", "num_experts"],
    "low_latency_update_mask": ["rank_to_mask", "mask", "stream"],
    "low_latency_query_mask": ["mask_status", "stream"],
    "low_latency_clean_mask": ["stream"],
}


@pytest.mark.parametrize("name", sorted(V1_LOW_LATENCY_METHODS))
def test_buffer_low_latency_method_keeps_v1_parameters_and_defaults(name):
    methods = buffer_source_methods()
    assert name in methods, f"deep_ep.Buffer has no method {name}"
    assert methods[name] == V1_LOW_LATENCY_METHODS[name]


@pytest.mark.parametrize("name", sorted(V1_LOW_LATENCY_METHODS))
def test_imported_buffer_low_latency_method_keeps_v1_parameters_and_defaults(name):
    pytest.importorskip("torch")
    import deep_ep

    params = list(inspect.signature(getattr(deep_ep.Buffer, name)).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    got = [(p.name, REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == V1_LOW_LATENCY_METHODS[name]


@pytest.mark.parametrize("name", sorted(CORE_LOW_LATENCY_BINDINGS))
def test_core_buffer_binds_low_latency_op_with_named_arguments(name):
    _C = pytest.importorskip("deep_ep._C")
    assert hasattr(_C.Buffer, name), f"deep_ep._C.Buffer has no method {name}"
    assert [n for n, _ in binding_parameters(getattr(_C.Buffer, name))] == CORE_LOW_LATENCY_BINDINGS[name]


def test_pending_receive_is_opaque_and_only_made_by_the_ops():
    _C = pytest.importorskip("deep_ep._C")
    with pytest.raises(TypeError):
        _C.LowLatencyPendingReceive()


def test_low_latency_hint_is_positive_and_grows_with_each_size():
    _C = pytest.importorskip("deep_ep._C")
    hint = _C.get_low_latency_rdma_size_hint
    base = hint(128, 7168, 8, 256)
    assert base > 0 and base % 128 == 0
    assert hint(256, 7168, 8, 256) > base  # more tokens per rank
    assert hint(128, 7168 + 128, 8, 256) > base  # wider rows
    assert hint(128, 7168, 8, 288) > base  # more experts
    # With the experts fixed, more ranks never shrink the buffer: every expert still needs a slot per
    # (source rank, token), and the per-rank signals grow.
    assert hint(128, 7168, 16, 256) >= base
    assert hint(1, 128, 2, 2) > 0


def test_low_latency_hint_covers_the_fp8_payload_of_both_halves():
    _C = pytest.importorskip("deep_ep._C")
    num_tokens, hidden, num_ranks, num_experts = 128, 7168, 8, 256
    # Each half holds at least one FP8 row with its float32 scales per (expert, source token).
    fp8_row_bytes = hidden + hidden // 128 * 4
    assert (
        _C.get_low_latency_rdma_size_hint(num_tokens, hidden, num_ranks, num_experts)
        >= 2 * num_experts * num_tokens * fp8_row_bytes
    )


# ---- deep_ep.Buffer's adaptation layer over a stand-in runtime (needs torch, not a GPU) --------------
# The stand-in allocates what the core allocates, by name and storage shape (include/deep_ep/low_latency.hpp),
# so these tests check what Python builds from it: views, handle, hooks and streams.


class _FakeStream:
    def __init__(self, handle):
        self.cuda_stream = handle

    def __eq__(self, other):
        return isinstance(other, _FakeStream) and other.cuda_stream == self.cuda_stream

    def __hash__(self):
        return self.cuda_stream

    def wait_stream(self, other):
        pass

    def record_event(self):
        return ("event", self.cuda_stream)


class _FakeRuntime:
    def __init__(self, torch, num_local_experts, num_ranks):
        self.payload = torch.zeros(1 << 16, dtype=torch.uint8)
        self.num_local_experts, self.num_ranks = num_local_experts, num_ranks
        self.calls = []

    def check_device_errors(self):
        pass

    def payload_tensor(self, use_rdma_buffer):
        return self.payload

    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        recv_stats,
        wait_stats,
        use_fp8,
        round_scale,
        use_ue8m0,
        return_recv_hook,
        allocate,
        stream,
    ):
        self.calls.append(("dispatch", stream))
        num_slots, hidden = self.num_ranks * num_max_dispatch_tokens_per_rank, x.shape[1]
        allocate(
            "recv_x",
            "torch.float8_e4m3fn" if use_fp8 else "torch.bfloat16",
            [self.num_local_experts, num_slots, hidden],
        )
        if use_fp8:
            allocate("recv_x_scales", "torch.float32", [self.num_local_experts, hidden // 128, num_slots])
        allocate("recv_count", "torch.int32", [self.num_local_experts])
        allocate("src_info", "torch.int32", [2, self.num_local_experts, num_slots])
        allocate("layout_range", "torch.int64", [self.num_local_experts, self.num_ranks])
        return object() if return_recv_hook else None

    def low_latency_combine(
        self,
        x,
        topk_idx,
        topk_weights,
        src_info,
        layout_range,
        num_max_dispatch_tokens_per_rank,
        hidden,
        num_experts,
        use_logfmt,
        zero_copy,
        return_recv_hook,
        out,
        wait_stats,
        allocate,
        stream,
    ):
        self.calls.append(
            ("combine", stream, list(src_info.shape), num_max_dispatch_tokens_per_rank, hidden, num_experts)
        )
        if out is None:
            allocate("combined_x", "torch.bfloat16", [topk_idx.shape[0], hidden])
        return object() if return_recv_hook else None

    def low_latency_receive(self, pending, stream):
        self.calls.append(("receive", stream))

    def next_low_latency_combine_buffer(
        self, src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts
    ):
        return self.payload.data_ptr() + 256, hidden + 64


_L, _R, _M, _H, _K = 3, 2, 4, 256, 2


@pytest.fixture
def ll_buffer(monkeypatch):
    torch = pytest.importorskip("torch")
    import contextlib

    from deep_ep.buffer import Buffer

    current = {"stream": _FakeStream(1)}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current["stream"])
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None, raising=False)
    buffer = object.__new__(Buffer)
    buffer.low_latency_mode, buffer.group_size, buffer.rank = True, _R, 0
    buffer._device, buffer._comm_stream = torch.device("cpu"), _FakeStream(2)
    buffer.runtime = _FakeRuntime(torch, _L, _R)
    buffer.current = current
    x = torch.randn(3, _H, dtype=torch.bfloat16)
    topk_idx = torch.randint(0, _L * _R, (3, _K))
    return torch, buffer, x, topk_idx


def test_fp8_dispatch_returns_column_major_scales_and_the_handle_of_v1(ll_buffer):
    torch, buffer, x, topk_idx = ll_buffer
    (recv_x, scales), recv_count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx, _M, _L * _R)
    num_slots = _R * _M
    assert recv_x.dtype == torch.float8_e4m3fn and recv_x.shape == (_L, num_slots, _H)
    assert scales.shape == (_L, num_slots, _H // 128) and scales.stride() == (_H // 128 * num_slots, 1, num_slots)
    assert recv_count.shape == (_L,)
    src_info, layout_range, *sizes = handle
    assert sizes == [_M, _H, _L * _R] and layout_range.shape == (_L, _R)
    # Plane 0 of the [2, L, S] allocation: combine reaches plane 1 through the same storage.
    assert src_info.shape == (_L, num_slots) and src_info.is_contiguous() and src_info.storage_offset() == 0
    assert src_info.untyped_storage().nbytes() == 2 * src_info.nbytes
    assert event.event is None and hook is None  # as in V1: no hook unless return_recv_hook


def test_receive_hook_launches_once_on_the_stream_current_when_called(ll_buffer):
    torch, buffer, x, topk_idx = ll_buffer
    *_, hook = buffer.low_latency_dispatch(x, topk_idx, _M, _L * _R, use_fp8=False, return_recv_hook=True)
    assert buffer.runtime.calls == [("dispatch", 1)]
    buffer.current["stream"] = _FakeStream(7)
    hook()
    assert buffer.runtime.calls[-1] == ("receive", 7)
    with pytest.raises(RuntimeError, match="already called"):
        hook()


def test_async_finish_runs_on_the_comm_stream_and_excludes_the_hook(ll_buffer):
    torch, buffer, x, topk_idx = ll_buffer
    from deep_ep.utils import EventHandle

    *_, event, _ = buffer.low_latency_dispatch(x, topk_idx, _M, _L * _R, async_finish=True)
    assert buffer.runtime.calls[-1] == ("dispatch", 2) and event.extra_tensors
    assert isinstance(event.event, EventHandle) and event.event.event == ("event", 2)  # V1's EventHandle
    with pytest.raises(ValueError, match="async_finish"):
        buffer.low_latency_dispatch(x, topk_idx, _M, _L * _R, async_finish=True, return_recv_hook=True)
    with pytest.raises(TypeError, match="num_experts"):
        buffer.low_latency_dispatch(x, topk_idx, _M, float(_L * _R))


def test_combine_passes_the_handle_and_writes_into_out(ll_buffer):
    torch, buffer, x, topk_idx = ll_buffer
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, _M, _L * _R)
    expert_out = torch.randn(_L, _R * _M, _H, dtype=torch.bfloat16)
    weights = torch.rand(3, _K)
    combined_x, event, _ = buffer.low_latency_combine(expert_out, topk_idx, weights, handle)
    assert combined_x.shape == (3, _H) and combined_x.dtype == torch.bfloat16
    assert buffer.runtime.calls[-1] == ("combine", 1, [_L, _R * _M], _M, _H, _L * _R)
    out = torch.empty(3, _H, dtype=torch.bfloat16)
    assert buffer.low_latency_combine(expert_out, topk_idx, weights, handle, out=out)[0] is out
    with pytest.raises(ValueError, match="5-tuple"):
        buffer.low_latency_combine(expert_out, topk_idx, weights, handle[:4])


def test_zero_copy_combine_buffer_is_a_strided_view_of_the_rdma_payload(ll_buffer):
    torch, buffer, x, topk_idx = ll_buffer
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, _M, _L * _R)
    view = buffer.get_next_low_latency_combine_buffer(handle)
    row_stride, num_slots = _H + 64, _R * _M
    assert view.dtype == torch.bfloat16 and view.shape == (_L, num_slots, _H)
    assert view.stride() == (num_slots * row_stride, row_stride, 1)
    view[1, 2, 3] = 1.5
    flat = buffer.runtime.payload.view(torch.bfloat16)
    assert flat[256 // 2 + num_slots * row_stride + 2 * row_stride + 3].item() == 1.5


def test_low_latency_ops_need_a_low_latency_buffer(ll_buffer):
    torch, buffer, x, topk_idx = ll_buffer
    buffer.low_latency_mode = False
    with pytest.raises(RuntimeError, match="low_latency_mode"):
        buffer.low_latency_dispatch(x, topk_idx, _M, _L * _R)
