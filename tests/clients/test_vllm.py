"""Client: vLLM's DeepEP prepare/finalize paths, reproduced call for call (vLLM itself is not installed).

Project: vLLM (vllm-project/vllm). Files: vllm/model_executor/layers/fused_moe/deepep_ht_prepare_finalize.py and
deepep_ll_prepare_finalize.py (later moved to fused_moe/prepare_finalize/deepep_ht.py and deepep_ll.py with the
same deep_ep calls; read at vllm-project/vllm commit 055e47c2), and the Buffer arguments of
vllm/distributed/device_communicators/all2all.py (DeepEPHTAll2AllManager, DeepEPLLAll2AllManager; read at
commit 00143004). The version
is the one whose low-latency path lists SUPPORTED_HIDDEN_SIZES = [2048, 2560, 3072, 4096, 5120, 6144, 7168,
8192] and micro-batches with DBO (dual batch overlap).

High throughput (HT):
- Buffer(group=<cpu group>, num_nvl_bytes=VLLM_DEEPEP_BUFFER_SIZE_MB MiB (1024), num_rdma_bytes=the same when
  the group spans nodes else 0, low_latency_mode=False, num_qps_per_rank=10 (its num_sms // 2) across nodes, else 1,
  explicitly_destroy=True); destroy() at shutdown.
- Block FP8 models quantize before dispatch (per token and 128 channels, float32 scales [T, H / 128] as
  per_token_group_quant_fp8 returns them on Hopper: row-major); others dispatch bf16.
- get_dispatch_layout(topk_idx=, num_experts=, previous_event=, async_finish=False, allocate_on_comm_stream=False)
  with previous_event = dbo_get_previous_event(buffer.capture): None without DBO, else Buffer.capture() run on
  the micro-batch's compute stream while the current stream is its comm stream.
- dispatch(x=, handle=None, <layout>, topk_idx=, topk_weights=, expert_alignment=1,
  config=Buffer.get_dispatch_config(num_dispatchers), previous_event=, async_finish=not DBO,
  allocate_on_comm_stream=False); the receiver waits with `if event.event is not None: event.current_stream_wait()`
  and maps -1 expert ids to a non-local expert (num_experts - 1 on rank 0, else 0).
- combine(x=<bf16 rows reduced over top-k with the received weights>, handle=, topk_weights=None,
  config=Buffer.get_combine_config(num_dispatchers), previous_event=, async_finish=<async and not DBO>,
  allocate_on_comm_stream=False); then the same `event.event is not None` wait and output.copy_(combined_x).
Low latency (LL):
- Buffer(group=, num_nvl_bytes=1024 MiB, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(
  num_max_dispatch_tokens_per_rank=, hidden=, num_ranks=, num_experts=), low_latency_mode=True,
  num_qps_per_rank=num_local_experts, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
  explicitly_destroy=True, enable_shrink=False).
- low_latency_dispatch(a1, topk_ids, max_tokens_per_rank, num_experts, use_fp8=, round_scale=use_ue8m0,
  use_ue8m0=, async_finish=False, return_recv_hook=True), then hook() (prepare) before the experts; with block
  size 128 the (e4m3, scales) pair goes to the experts as is, otherwise it is dequantized with
  scales.contiguous().view(num_experts, -1, 1).
- low_latency_combine(y, topk_ids, topk_weights, handle, async_finish=False, zero_copy=False,
  return_recv_hook=<async>, out=output).
- Decode runs as CUDA graphs (one per batch size) over the same Buffer, between eager batches.
"""

import torch

import deep_ep
from clients_common import (
    check_combined,
    check_low_latency_combine,
    check_low_latency_dispatch,
    check_normal_dispatch,
    dequantize,
    expected_normal_dispatch,
    explain_intranode_dispatch,
    finish,
    gather,
    layouts,
    low_latency_expert_output,
    normal_expert_output,
    per_token_group_quant_fp8,
    random_routing,
    start,
    sync,
)

VLLM_DEEPEP_BUFFER_SIZE_MB = 1024
VLLM_NUM_SMS = 20  # DeepEPAll2AllManagerBase.num_sms
NUM_EXPERTS = 32
NUM_TOPK = 8
HT_HIDDEN = 7168
HT_NUM_TOKENS = 192
# vLLM's DeepEPLLPrepareAndFinalize.SUPPORTED_HIDDEN_SIZES.
SUPPORTED_HIDDEN_SIZES = [2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192]
LL_MAX_TOKENS = 256  # max_tokens_per_rank: vLLM's VLLM_MOE_DP_CHUNK_SIZE default
AVAILABLE_RANK_CONFIGS = [2, 4, 8, 16, 24, 32, 64, 128, 144, 160]


def _set_num_sms(emulated):
    """vLLM's DeepEPHTAll2AllManager.set_num_sms: Buffer.set_num_sms(min(n, 20)). Without it the Buffer's
    default (20) holds; on emulated nodes every rank shares one GPU and the internode kernels keep all their
    blocks resident together, so the test lowers it to 8 there through that knob."""
    if emulated:
        deep_ep.Buffer.set_num_sms(min(8, VLLM_NUM_SMS))


# ---- high throughput ------------------------------------------------------------------------------------------
def _ht_buffer(group, internode):
    num_nvl_bytes = VLLM_DEEPEP_BUFFER_SIZE_MB * 1024 * 1024
    if internode:
        num_rdma_bytes, num_qps_per_rank = VLLM_DEEPEP_BUFFER_SIZE_MB * 1024 * 1024, VLLM_NUM_SMS // 2
    else:
        num_rdma_bytes, num_qps_per_rank = 0, 1
    return deep_ep.Buffer(
        group=group,
        num_nvl_bytes=num_nvl_bytes,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=False,
        num_qps_per_rank=num_qps_per_rank,
        explicitly_destroy=True,
    )


class _HighThroughput:
    """The deep_ep calls of vLLM's DeepEPHTPrepareAndFinalize, in its order and with its arguments. `dbo` holds
    the micro-batch's (compute, comm) streams when dual batch overlap is on."""

    def __init__(self, buffer, num_dispatchers, rank_expert_offset):
        self.buffer = buffer
        self.num_dispatchers = num_dispatchers
        self.rank_expert_offset = rank_expert_offset
        self.async_prepare = True

    def _config(self, getter):
        return getter(self.num_dispatchers) if self.num_dispatchers in AVAILABLE_RANK_CONFIGS else None

    def _previous_event(self, dbo):
        if dbo is None:
            return None
        with torch.cuda.stream(dbo[0]):  # on the micro-batch's compute stream
            return self.buffer.capture()

    def prepare_async(self, tokens, token_scales, topk_ids, topk_weights, num_experts, dbo=None):
        has_scales = token_scales is not None
        previous_event = self._previous_event(dbo)
        (num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank, event) = (
            self.buffer.get_dispatch_layout(
                topk_idx=topk_ids,
                num_experts=num_experts,
                previous_event=previous_event,
                async_finish=False,
                allocate_on_comm_stream=False,
            )
        )
        token_data = (tokens, token_scales) if has_scales else tokens
        (token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle, event) = (
            self.buffer.dispatch(
                x=token_data,
                handle=None,
                num_tokens_per_rank=num_tokens_per_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=dispatch_expert_num_tokens,
                topk_idx=topk_ids,
                topk_weights=topk_weights,
                expert_alignment=1,
                config=self._config(deep_ep.Buffer.get_dispatch_config),
                previous_event=previous_event,
                async_finish=self.async_prepare and dbo is None,
                allocate_on_comm_stream=False,
            )
        )

        def receiver():
            if event.event is not None:
                event.current_stream_wait()
            mapped_ids = torch.where(
                expert_topk_ids == -1,
                num_experts - 1 if self.rank_expert_offset == 0 else 0,
                expert_topk_ids + self.rank_expert_offset,
            )
            return (token_data, expert_topk_ids, mapped_ids, expert_topk_weights, expert_num_tokens_per_expert_list)

        return handle, receiver

    def finalize_async(self, output, fused_expert_output, handle, dbo=None):
        previous_event = self._previous_event(dbo)
        combined_x, _, event = self.buffer.combine(
            x=fused_expert_output,
            handle=handle,
            topk_weights=None,
            config=self._config(deep_ep.Buffer.get_combine_config),
            previous_event=previous_event,
            async_finish=dbo is None,
            allocate_on_comm_stream=False,
        )

        def receiver():
            if event.event is not None:
                event.current_stream_wait()
            output.copy_(combined_x, non_blocking=True)

        return receiver


def _ht_experts(ctx, token_data, mapped_ids, expert_topk_weights, num_local):
    """vLLM's experts see global ids; its expert_map makes every id outside this rank's range (the remapped -1s
    included) contribute nothing. Then TopKWeightAndReduceContiguous: weights applied, summed over top-k."""
    offset = ctx.rank * num_local
    local = (mapped_ids >= offset) & (mapped_ids < offset + num_local)
    return normal_expert_output(token_data, local, mapped_ids, expert_topk_weights)


def _ht_inputs(ctx, block_fp8):
    num_tokens = max(1, HT_NUM_TOKENS - 23 * ctx.rank)
    a1 = torch.randn(num_tokens, HT_HIDDEN, device="cuda").to(torch.bfloat16)
    topk_ids, topk_weights = random_routing(num_tokens, NUM_EXPERTS, NUM_TOPK)
    if block_fp8:
        tokens, scales = per_token_group_quant_fp8(a1)
        return (tokens, scales), topk_ids, topk_weights
    return (a1, None), topk_ids, topk_weights


def _ht_check(ctx, group, label, tokens, token_scales, topk_ids, topk_weights, received, output, handle):
    token_data, expert_topk_ids, _, expert_topk_weights, per_expert = received
    x = (tokens, token_scales) if token_scales is not None else tokens
    expected = expected_normal_dispatch(group, ctx.rank, NUM_EXPERTS, x, topk_ids, topk_weights)
    # Collective, so before the check: a rank whose check fails can still explain it.
    routing = gather(group, handle[4]) if len(handle) == 6 else None
    try:
        check_normal_dispatch(
            f"{label} dispatch", expected, token_data, expert_topk_ids, expert_topk_weights, per_expert
        )
    except AssertionError as error:
        if routing is None:
            raise
        got = token_data[0] if isinstance(token_data, tuple) else token_data
        want = expected["x"][0] if isinstance(expected["x"], tuple) else expected["x"]
        got_bytes = got.contiguous().cpu().view(torch.uint8).view(got.size(0), -1)
        want_bytes = want.contiguous().cpu().view(torch.uint8).view(want.size(0), -1)
        if got_bytes.shape != want_bytes.shape:
            raise
        explanation = explain_intranode_dispatch(ctx.rank, routing, handle, got_bytes, want_bytes)
        raise AssertionError(f"{error}\n{explanation}") from None
    x_float = dequantize(tokens, token_scales) if token_scales is not None else tokens.float()
    check_combined(f"{label} combine", output, x_float, topk_ids, topk_weights)


def ht_prepare_finalize(ctx, num_ranks_per_node, repeats=1):
    """vLLM's HT prepare/finalize: bf16 and block-FP8 dispatch, then combine; without DBO (async prepare and
    finalize, waits through event.event) and with DBO (two micro-batches in flight on their own streams, events
    captured on the compute stream, two handles held at once). `repeats` runs the whole sequence that many times
    (a soak: the DBO sequence once timed out on 8 ranks of one GPU and passed when rerun)."""
    group = start(ctx, num_ranks_per_node, seed=41)
    num_ranks = ctx.num_ranks
    # vLLM's `internode`: whether the group spans nodes (here: emulated ones).
    internode = num_ranks_per_node > 0 and num_ranks > num_ranks_per_node
    _set_num_sms(internode)
    buffer = _ht_buffer(group, internode)
    num_local = NUM_EXPERTS // num_ranks
    ht = _HighThroughput(buffer, num_dispatchers=num_ranks, rank_expert_offset=ctx.rank * num_local)
    for block_fp8 in [fp8 for _ in range(repeats) for fp8 in (False, True)]:
        fmt = "block-fp8" if block_fp8 else "bf16"
        # Without DBO: async prepare, async finalize.
        (tokens, scales), topk_ids, topk_weights = _ht_inputs(ctx, block_fp8)
        handle, receive = ht.prepare_async(tokens, scales, topk_ids, topk_weights, NUM_EXPERTS)
        received = receive()
        y = _ht_experts(ctx, received[0], received[2], received[3], num_local)
        output = torch.empty(tokens.size(0), HT_HIDDEN, dtype=torch.bfloat16, device="cuda")
        ht.finalize_async(output, y, handle)()
        torch.cuda.synchronize()
        _ht_check(
            ctx, group, f"rank {ctx.rank} {fmt}", tokens, scales, topk_ids, topk_weights, received, output, handle
        )
        sync(group)

        # DBO: each micro-batch's deep_ep calls run on its comm stream, its compute on its compute stream.
        streams = [(torch.cuda.Stream(), torch.cuda.Stream()) for _ in range(2)]
        batches, handles, receivers = [], [], []
        for compute, comm in streams:
            compute.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(compute):
                batches.append(_ht_inputs(ctx, block_fp8))
            (tokens, scales), topk_ids, topk_weights = batches[-1]
            with torch.cuda.stream(comm):
                handle, receive = ht.prepare_async(
                    tokens, scales, topk_ids, topk_weights, NUM_EXPERTS, dbo=(compute, comm)
                )
            compute.wait_stream(comm)  # dbo_switch_to_compute_sync
            handles.append(handle)
            receivers.append(receive)
        outputs, received_all = [], []
        for (compute, comm), handle, receive, batch in zip(streams, handles, receivers, batches):
            with torch.cuda.stream(compute):
                received = receive()
                y = _ht_experts(ctx, received[0], received[2], received[3], num_local)
                output = torch.empty(batch[0][0].size(0), HT_HIDDEN, dtype=torch.bfloat16, device="cuda")
            with torch.cuda.stream(comm):
                ht.finalize_async(output, y, handle, dbo=(compute, comm))()
            compute.wait_stream(comm)
            outputs.append(output)
            received_all.append(received)
        torch.cuda.synchronize()
        buffer.runtime.check_device_errors()  # a device timeout is the cause to report, not the data it spoiled
        for ub, ((tokens, scales), topk_ids, topk_weights) in enumerate(batches):
            _ht_check(
                ctx,
                group,
                f"rank {ctx.rank} {fmt} DBO micro-batch {ub}",
                tokens,
                scales,
                topk_ids,
                topk_weights,
                received_all[ub],
                outputs[ub],
                handles[ub],
            )
        sync(group)
    buffer.destroy()
    deep_ep.Buffer.set_num_sms(20)
    finish(group)


# ---- low latency -----------------------------------------------------------------------------------------------
def _ll_buffer(group, num_ranks, hidden):
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank=LL_MAX_TOKENS, hidden=hidden, num_ranks=num_ranks, num_experts=NUM_EXPERTS
    )
    return deep_ep.Buffer(
        group=group,
        num_nvl_bytes=VLLM_DEEPEP_BUFFER_SIZE_MB * 1024 * 1024,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=NUM_EXPERTS // num_ranks,
        allow_nvlink_for_low_latency_mode=True,
        allow_mnnvl=False,
        explicitly_destroy=True,
        enable_shrink=False,
    )


def _vllm_dequant_fp8(expert_x_fp8, expert_x_scales):
    """vLLM's dequant_fp8 (block size other than 128): scales made contiguous and read as [L, -1, 1]."""
    assert expert_x_fp8.is_contiguous(), "vLLM asserts the dispatched e4m3 rows are contiguous"
    expert_x_scales = expert_x_scales.contiguous()
    num_experts = expert_x_fp8.size(0)
    x = expert_x_fp8.to(torch.float32).view(num_experts, -1, 128)
    return (x * expert_x_scales.view(num_experts, -1, 1)).view(expert_x_fp8.size())


class _LowLatency:
    """The deep_ep calls of vLLM's DeepEPLLPrepareAndFinalize."""

    def __init__(self, buffer, max_tokens_per_rank, use_fp8_dispatch, use_ue8m0_dispatch):
        self.buffer = buffer
        self.max_tokens_per_rank = max_tokens_per_rank
        self.use_fp8_dispatch = use_fp8_dispatch
        self.use_ue8m0_dispatch = use_ue8m0_dispatch

    def prepare(self, a1, topk_ids, num_experts):
        expert_x, expert_num_tokens, handle, _, hook = self.buffer.low_latency_dispatch(
            a1,
            topk_ids,
            self.max_tokens_per_rank,
            num_experts,
            use_fp8=self.use_fp8_dispatch,
            round_scale=self.use_ue8m0_dispatch,
            use_ue8m0=self.use_ue8m0_dispatch,
            async_finish=False,
            return_recv_hook=True,
        )
        hook()
        return expert_x, expert_num_tokens, handle

    def finalize(self, output, fused_expert_output, topk_ids, topk_weights, handle, do_async):
        _, _, recv_hook = self.buffer.low_latency_combine(
            fused_expert_output,
            topk_ids,
            topk_weights,
            handle,
            async_finish=False,
            zero_copy=False,
            return_recv_hook=do_async,
            out=output,
        )
        return recv_hook


def _ll_experts(ctx, expert_x, use_fp8, use_ue8m0, block_128):
    """Block size 128: the experts take (e4m3, scales) as dispatched; otherwise vLLM dequantizes first."""
    if use_fp8 and not use_ue8m0 and not block_128:
        return low_latency_expert_output(_vllm_dequant_fp8(*expert_x), ctx.rank)
    return low_latency_expert_output(expert_x, ctx.rank, use_ue8m0=use_ue8m0)


def _ll_round(ctx, group, ll, hidden, num_tokens, label, use_ue8m0=False, block_128=True, do_async=False):
    a1 = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    topk_ids, topk_weights = random_routing(num_tokens, NUM_EXPERTS, NUM_TOPK)
    sync(group)
    expert_x, expert_num_tokens, handle = ll.prepare(a1, topk_ids, NUM_EXPERTS)
    y = _ll_experts(ctx, expert_x, ll.use_fp8_dispatch, use_ue8m0, block_128)
    output = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device="cuda")
    recv_hook = ll.finalize(output, y, topk_ids, topk_weights, handle, do_async)
    if do_async:
        recv_hook()
    torch.cuda.synchronize()
    check_low_latency_dispatch(
        f"{label} dispatch",
        group,
        ctx.rank,
        a1,
        topk_ids,
        NUM_EXPERTS,
        LL_MAX_TOKENS,
        expert_x,
        expert_num_tokens,
        handle,
        ll.use_fp8_dispatch,
        round_scale=use_ue8m0,
        use_ue8m0=use_ue8m0,
    )
    check_low_latency_combine(f"{label} combine", output, a1, topk_ids, topk_weights, ll.use_fp8_dispatch)


def ll_hidden_sizes(ctx, num_ranks_per_node):
    """vLLM's LL prepare/finalize at every hidden size it allows, one Buffer per size as vLLM sizes them: FP8
    dispatch with block-128 scales (experts take them as is), with packed UE8M0 scales (round_scale), FP8 read
    back through vLLM's dequant (other block sizes), and bf16; finalize synchronous and with a receive hook."""
    group = start(ctx, num_ranks_per_node, seed=43)
    for i, hidden in enumerate(SUPPORTED_HIDDEN_SIZES):
        buffer = _ll_buffer(group, ctx.num_ranks, hidden)
        num_tokens = max(1, 32 - 5 * ctx.rank - i)
        label = f"rank {ctx.rank} hidden {hidden}"
        _ll_round(
            ctx,
            group,
            _LowLatency(buffer, LL_MAX_TOKENS, True, False),
            hidden,
            num_tokens,
            f"{label} fp8",
            do_async=i % 2 == 1,
        )
        _ll_round(
            ctx,
            group,
            _LowLatency(buffer, LL_MAX_TOKENS, True, True),
            hidden,
            num_tokens,
            f"{label} fp8 ue8m0",
            use_ue8m0=True,
            do_async=i % 2 == 0,
        )
        if i % 4 == 0:
            _ll_round(
                ctx,
                group,
                _LowLatency(buffer, LL_MAX_TOKENS, True, False),
                hidden,
                num_tokens,
                f"{label} fp8 dequantized",
                block_128=False,
            )
            _ll_round(
                ctx,
                group,
                _LowLatency(buffer, LL_MAX_TOKENS, False, False),
                hidden,
                num_tokens,
                f"{label} bf16",
                do_async=True,
            )
        sync(group)
        buffer.destroy()
    finish(group)


def ll_cuda_graph(ctx, num_ranks_per_node):
    """vLLM's decode: the LL prepare (dispatch with a receive hook, hook() at once), experts and finalize (combine
    into `out`) captured in CUDA graphs for two batch sizes on one Buffer, replayed with new data between eager
    batches on the same Buffer; every replay checked."""
    group = start(ctx, num_ranks_per_node, seed=47)
    hidden = 7168
    buffer = _ll_buffer(group, ctx.num_ranks, hidden)
    ll = _LowLatency(buffer, LL_MAX_TOKENS, use_fp8_dispatch=True, use_ue8m0_dispatch=False)
    graphs = {}
    for batch_size in (8, 32):
        static = {
            "a1": torch.zeros(batch_size, hidden, dtype=torch.bfloat16, device="cuda"),
            "topk_ids": torch.zeros(batch_size, NUM_TOPK, dtype=torch.int64, device="cuda"),
            "topk_weights": torch.zeros(batch_size, NUM_TOPK, dtype=torch.float32, device="cuda"),
            "output": torch.empty(batch_size, hidden, dtype=torch.bfloat16, device="cuda"),
        }
        _fill(static)

        def step(static=static):
            expert_x, expert_num_tokens, handle = ll.prepare(static["a1"], static["topk_ids"], NUM_EXPERTS)
            y = _ll_experts(ctx, expert_x, True, False, True)
            ll.finalize(static["output"], y, static["topk_ids"], static["topk_weights"], handle, do_async=False)
            return expert_x, expert_num_tokens, handle

        # Warm-up outside the graph, on a side stream (torch's rule for code about to be captured).
        sync(group)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        sync(group)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
        graphs[batch_size] = (graph, static, outputs)
        sync(group)

    for replay, batch_size in enumerate((8, 32, 32, 8)):
        graph, static, (expert_x, expert_num_tokens, handle) = graphs[batch_size]
        _fill(static)
        sync(group)
        graph.replay()
        torch.cuda.synchronize()
        label = f"rank {ctx.rank} replay {replay} (batch {batch_size})"
        check_low_latency_dispatch(
            f"{label} dispatch",
            group,
            ctx.rank,
            static["a1"],
            static["topk_ids"],
            NUM_EXPERTS,
            LL_MAX_TOKENS,
            expert_x,
            expert_num_tokens,
            handle,
            True,
        )
        check_low_latency_combine(
            f"{label} combine", static["output"], static["a1"], static["topk_ids"], static["topk_weights"], True
        )
        # An eager batch between replays (prefill or a batch size without a graph) on the same Buffer.
        _ll_round(ctx, group, ll, hidden, max(1, 40 - 3 * ctx.rank), f"rank {ctx.rank} eager after replay {replay}")
    del graphs
    sync(group)
    buffer.destroy()
    finish(group)


def _fill(static):
    batch_size = static["a1"].size(0)
    static["a1"].copy_(torch.randn(batch_size, static["a1"].size(1), device="cuda").to(torch.bfloat16))
    topk_ids, topk_weights = random_routing(batch_size, NUM_EXPERTS, NUM_TOPK)
    static["topk_ids"].copy_(topk_ids)
    static["topk_weights"].copy_(topk_weights)


def cases(rank_counts):
    out = []
    for tag, num_ranks, num_ranks_per_node in layouts(rank_counts):
        base = f"clients/vllm/{tag}"
        out.append((f"{base}/ht_prepare_finalize", ht_prepare_finalize, num_ranks, (num_ranks_per_node,), 240))
        if tag == "r8":
            out.append((f"{base}/ht_dbo_soak", ht_prepare_finalize, num_ranks, (num_ranks_per_node, 20), 420))
        out.append((f"{base}/ll_hidden_sizes", ll_hidden_sizes, num_ranks, (num_ranks_per_node,), 300))
        out.append((f"{base}/ll_cuda_graph", ll_cuda_graph, num_ranks, (num_ranks_per_node,), 240))
    return out
