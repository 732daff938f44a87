"""Host-side behaviour of the extension that needs no GPU: Config and its hints, argument errors,
the file-backed bootstrap group, and the CPU reference as exposed to Python."""

import os
import threading

import numpy as np
import pytest

_C = pytest.importorskip("deep_ep._C")
import deep_ep  # noqa: E402

ref = deep_ep.reference


def test_config_keywords_positions_and_fields():
    c = deep_ep.Config(24, 8, 64)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (24, 8, 64)
    k = deep_ep.Config(num_sms=12, num_max_nvl_chunked_send_tokens=4, num_max_nvl_chunked_recv_tokens=32)
    assert k.num_sms == 12 and "num_sms=12" in repr(k)


def test_config_rejects_odd_num_sms_naming_the_field():
    with pytest.raises(ValueError, match="num_sms"):
        deep_ep.Config(7)


def test_nvl_hint_is_exact_multiple_of_128_and_monotone():
    c = deep_ep.Config(16, 4, 16)
    small, large = c.get_nvl_buffer_size_hint(4096, 8), c.get_nvl_buffer_size_hint(14336, 8)
    assert small % 128 == 0 and large % 128 == 0 and small < large
    assert c.get_rdma_buffer_size_hint(14336, 8) == 0


def test_recommended_configs_cover_v1_rank_counts():
    for r in (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160):
        assert _C.get_dispatch_config(r, 20).num_sms == 20
    with pytest.raises(ValueError, match="num_ranks=3"):
        _C.get_combine_config(3, 20)


def test_low_latency_hint_is_multiple_of_128_and_validates():
    assert _C.get_low_latency_rdma_size_hint(128, 7168, 8, 288) % 128 == 0
    with pytest.raises(ValueError, match="hidden"):
        _C.get_low_latency_rdma_size_hint(128, 7000, 8, 288)


def test_tensor_view_errors_name_the_problem():
    with pytest.raises(TypeError, match="float16"):
        _C.make_view(0, "torch.float16", [1], [1], 0)
    with pytest.raises(ValueError, match="strides"):
        _C.make_view(0, "torch.int32", [2, 2], [1], 0)


def test_file_group_all_gather_across_threads(tmp_path):
    results = {}

    def rank_main(rank):
        g = _C.FileGroup(str(tmp_path), rank, 3, 10.0)
        results[rank] = g.all_gather(bytes([rank]) * (rank + 1))
        g.barrier()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert all(results[r] == [b"\x00", b"\x01\x01", b"\x02\x02\x02"] for r in range(3))


def test_file_group_timeout_names_missing_rank(tmp_path):
    g = _C.FileGroup(str(tmp_path), 0, 2, 0.2)
    with pytest.raises(TimeoutError, match="rank 1"):
        g.all_gather(b"x")


def test_reference_layout_counts_tokens_once_per_rank():
    topk = np.array([[0, 1, -1], [3, 7, 6], [-1, -1, -1]], dtype=np.int64)
    layout = ref.get_dispatch_layout(topk, 4, 8)  # 2 experts per rank
    assert layout.num_tokens_per_rank.tolist() == [1, 1, 0, 1]
    assert layout.num_tokens_per_expert.tolist() == [1, 1, 0, 1, 0, 0, 1, 1]
    assert layout.is_token_in_rank.reshape(3, 4).tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]


def test_reference_layout_rejects_out_of_range_expert():
    with pytest.raises(ValueError, match="topk_idx"):
        ref.get_dispatch_layout(np.array([[8]], dtype=np.int64), 4, 8)


def _dispatch_inputs(rng, num_ranks, num_tokens, hidden, num_experts, num_topk):
    inputs = []
    for r in range(num_ranks):
        t = num_tokens + r
        topk = np.stack([rng.choice(num_experts, num_topk, replace=False) for _ in range(t)]).astype(np.int64)
        layout = ref.get_dispatch_layout(topk, num_ranks, num_experts)
        item = ref.NormalDispatchInput()
        item.num_tokens = t
        x = rng.integers(-4, 4, size=(t, hidden)).astype(np.float32)
        item.x = np.array([ref.float_to_bf16(float(v)) for v in x.reshape(-1)], dtype=np.uint16).view(np.uint8)
        item.topk_idx = topk.reshape(-1)
        item.topk_weights = rng.random(t * num_topk).astype(np.float32)
        item.is_token_in_rank = layout.is_token_in_rank
        inputs.append((item, x, layout))
    return inputs


def test_reference_dispatch_then_combine_multiplies_by_ranks_reached():
    rng = np.random.default_rng(5)
    num_ranks, hidden, num_experts, num_topk = 4, 16, 16, 3
    prepared = _dispatch_inputs(rng, num_ranks, 6, hidden, num_experts, num_topk)
    args = ref.NormalDispatchArgs()
    args.num_ranks, args.num_experts, args.row_bytes, args.num_topk = num_ranks, num_experts, hidden * 2, num_topk
    outputs = ref.normal_dispatch([p[0] for p in prepared], args)
    for r, out in enumerate(outputs):
        assert out.rank_prefix_matrix.reshape(num_ranks, num_ranks)[-1, r] == out.num_recv_tokens
    combine_inputs = []
    for out in outputs:
        c = ref.NormalCombineInput()
        c.x = out.recv_x.view(np.uint16)
        combine_inputs.append(c)
    combined = ref.normal_combine([p[0] for p in prepared], outputs, combine_inputs, hidden, 0)
    for (item, x, layout), result in zip(prepared, combined):
        reached = layout.is_token_in_rank.reshape(item.num_tokens, num_ranks).sum(axis=1, keepdims=True)
        got = np.array([ref.bf16_to_float(int(v)) for v in result.combined_x], dtype=np.float32)
        np.testing.assert_array_equal(got.reshape(x.shape), x * reached)


def test_reference_only_rank_gives_that_rank_the_full_results():
    # What each GPU test process asks for: its own rank's rows and sums, the others' routing only.
    rng = np.random.default_rng(6)
    num_ranks, hidden, num_experts, num_topk = 4, 16, 16, 3
    prepared = _dispatch_inputs(rng, num_ranks, 5, hidden, num_experts, num_topk)
    inputs = [p[0] for p in prepared]
    args = ref.NormalDispatchArgs()
    args.num_ranks, args.num_experts, args.row_bytes, args.num_topk = num_ranks, num_experts, hidden * 2, num_topk
    full = ref.normal_dispatch(inputs, args)
    combine_inputs = []
    for out in full:
        c = ref.NormalCombineInput()
        c.x = out.recv_x.view(np.uint16)
        c.topk_weights = out.recv_topk_weights
        combine_inputs.append(c)
    full_combined = ref.normal_combine(inputs, full, combine_inputs, hidden, num_topk)
    for rank in range(num_ranks):
        args.only_rank = rank
        one = ref.normal_dispatch(inputs, args)
        for j in range(num_ranks):
            np.testing.assert_array_equal(one[j].recv_src_idx, full[j].recv_src_idx)
            assert one[j].recv_x.size == (full[j].recv_x.size if j == rank else 0)
        np.testing.assert_array_equal(one[rank].recv_x, full[rank].recv_x)
        np.testing.assert_array_equal(one[rank].recv_topk_weights, full[rank].recv_topk_weights)
        combined = ref.normal_combine(inputs, one, combine_inputs, hidden, num_topk, only_rank=rank)
        np.testing.assert_array_equal(combined[rank].combined_x, full_combined[rank].combined_x)
        np.testing.assert_array_equal(combined[rank].combined_topk_weights, full_combined[rank].combined_topk_weights)
        assert all(combined[j].combined_x.size == 0 for j in range(num_ranks) if j != rank)
    args.only_rank = num_ranks
    with pytest.raises(ValueError, match="only_rank"):
        ref.normal_dispatch(inputs, args)


def test_build_reports_its_cuda_architectures():
    # The default build (CI, pip install .) targets sm_90.
    assert "90" in _C.compiled_cuda_architectures()
    assert _C.is_sm90_compiled() is True


def test_build_reports_whether_it_has_gin():
    # The default build (CI, pip install .) has no GIN; -Ccmake.define.DEEP_EP_ENABLE_GIN=ON turns it on.
    expected = os.environ.get("DEEP_EP_EXPECT_GIN", "0") == "1"
    assert _C.gin_compiled() is expected
