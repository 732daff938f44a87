"""Client: SGLang's DeepEP token dispatcher, reproduced call for call (SGLang itself is not installed).

Project: SGLang (sgl-project/sglang), python/sglang/srt/layers/moe/token_dispatcher/deepep.py, read at
sgl-project/sglang commit 003a81bf. What it does with deep_ep:
- DeepEPBuffer.get_deepep_buffer: one Buffer per process, made at first use. Normal (and auto) mode: for the
  dispatch and combine configs (its --deepep-config, else Buffer.get_dispatch_config / get_combine_config
  (group.size())), num_nvl_bytes / num_rdma_bytes = max of get_nvl/rdma_buffer_size_hint(hidden_size *
  params_bytes, group.size()); low-latency (and auto) mode: num_rdma_bytes = max(that,
  Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden_size, group.size(),
  num_experts)); num_qps_per_rank = num_sms (normal), num_experts // group.size() (low latency), the larger
  (auto); Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=<low latency or auto>,
  num_qps_per_rank=, allow_mnnvl=True).
- Moving from normal to low-latency dispatch calls buffer.clean_low_latency_buffer(
  num_max_dispatch_tokens_per_rank, hidden_size, num_experts) (its "auto" mode: prefill normal, decode low
  latency, one low_latency_mode Buffer).
- Normal: FP8 hidden states are quantized per token and 128 channels (float32 scales [T, H / 128], row-major on
  Hopper); previous_event = Buffer.capture() if async_finish else None; get_dispatch_layout(topk_ids,
  num_experts, previous_event=, async_finish=, allocate_on_comm_stream=previous_event is not None); dispatch(x,
  topk_idx=, topk_weights=, <layout>, previous_event=<layout's event>, async_finish=,
  allocate_on_comm_stream=(previous_event is not None) and async_finish, expert_alignment=128 (DeepGEMM),
  config=<--deepep-config or None>); event.current_stream_wait() if async_finish; combine(x, handle,
  async_finish=, previous_event=Buffer.capture() or None, allocate_on_comm_stream=previous_event is not None,
  config=); event.current_stream_wait() if async_finish.
- Low latency: low_latency_dispatch(hidden_states, topk_ids, num_max_dispatch_tokens_per_rank (128),
  num_experts, use_fp8=, async_finish=not return_recv_hook, return_recv_hook=, round_scale=False,
  use_ue8m0=False (Hopper)); hook() if return_recv_hook else event.current_stream_wait();
  low_latency_combine(x=, topk_idx=, topk_weights=, handle=, async_finish=not return_recv_hook,
  return_recv_hook=); the same wait. Two-batch overlap keeps two dispatchers' results in flight.

SGLang passes its tensor-parallel NCCL group; here the group is gloo (ranks share one GPU). The normal-mode
Buffer is sized with params_bytes=2 (SGLang's BF16 dispatcher dtype), and FP8 batches then run on it: with
params_bytes=1 (its FP8 dtype) the NVLink hint is sized for rows of hidden_size bytes, smaller than a BF16
combine of those rows needs. Normal mode sizes RDMA for nodes of 8 ranks, so normal and auto mode run on
emulated nodes only as 2x8; low-latency mode also runs on 2x4.
"""

import enum
import gc

import torch

import deep_ep
from clients_common import (
    check_combined,
    check_low_latency_combine,
    check_low_latency_dispatch,
    check_normal_dispatch,
    dequantize,
    expected_normal_dispatch,
    finish,
    layouts,
    low_latency_expert_output,
    normal_expert_output,
    per_token_group_quant_fp8,
    random_routing,
    start,
    sync,
)

NUM_EXPERTS = 32
NUM_TOPK = 8
HIDDEN = 4096
NUM_TOKENS = 256  # a prefill chunk per rank (normal mode)
NUM_MAX_DISPATCH_TOKENS_PER_RANK = 128  # SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK default
DECODE_TOKENS = 48
PARAMS_BYTES = 2


class Mode(enum.Enum):
    NORMAL = "normal"
    LOW_LATENCY = "low_latency"
    AUTO = "auto"

    def enable_normal(self):
        return self in (Mode.NORMAL, Mode.AUTO)

    def enable_low_latency(self):
        return self in (Mode.LOW_LATENCY, Mode.AUTO)


class _DeepEPConfig:
    """SGLang's --deepep-config: None (the recommended configs), or explicit dispatch and combine Configs built
    with Config(**fields) (used here when 16 ranks share one GPU: fewer SMs per rank)."""

    def __init__(self, num_ranks):
        if num_ranks <= 8:
            self.normal_dispatch_config = self.normal_combine_config = None
            self.num_sms = deep_ep.Buffer.num_sms
            return
        self.num_sms = 8
        fields = (
            "num_max_nvl_chunked_send_tokens",
            "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens",
            "num_max_rdma_chunked_recv_tokens",
        )
        for name, getter in (
            ("normal_dispatch_config", deep_ep.Buffer.get_dispatch_config),
            ("normal_combine_config", deep_ep.Buffer.get_combine_config),
        ):
            recommended = getter(num_ranks)
            setattr(self, name, deep_ep.Config(num_sms=self.num_sms, **{f: getattr(recommended, f) for f in fields}))


class _DeepEPBuffer:
    """SGLang's DeepEPBuffer: the process's one Buffer and the dispatch mode it was last used in."""

    def __init__(self, group, mode, config):
        self.group, self.mode, self.config = group, mode, config
        self.buffer = None
        self.dispatch_mode = None

    def get(self):
        if self.buffer is not None:
            return self.buffer
        group, mode, config = self.group, self.mode, self.config
        num_nvl_bytes, num_rdma_bytes = 0, 0
        if mode.enable_normal():
            hidden_bytes = HIDDEN * PARAMS_BYTES
            for cfg in (
                config.normal_dispatch_config or deep_ep.Buffer.get_dispatch_config(group.size()),
                config.normal_combine_config or deep_ep.Buffer.get_combine_config(group.size()),
            ):
                num_nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
                num_rdma_bytes = max(cfg.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
        if mode.enable_low_latency():
            assert NUM_EXPERTS % group.size() == 0
            num_rdma_bytes = max(
                deep_ep.Buffer.get_low_latency_rdma_size_hint(
                    NUM_MAX_DISPATCH_TOKENS_PER_RANK, HIDDEN, group.size(), NUM_EXPERTS
                ),
                num_rdma_bytes,
            )
        if mode == Mode.NORMAL:
            num_qps_per_rank = config.num_sms
        elif mode == Mode.LOW_LATENCY:
            num_qps_per_rank = NUM_EXPERTS // group.size()
        else:
            num_qps_per_rank = max(config.num_sms, NUM_EXPERTS // group.size())
        self.buffer = deep_ep.Buffer(
            group,
            num_nvl_bytes,
            num_rdma_bytes,
            low_latency_mode=mode.enable_low_latency(),
            num_qps_per_rank=num_qps_per_rank,
            allow_mnnvl=True,
        )
        return self.buffer

    def as_normal(self):
        self.dispatch_mode = Mode.NORMAL
        return self.get()

    def as_low_latency(self):
        if self.dispatch_mode == Mode.NORMAL and self.buffer.low_latency_mode:
            self.buffer.clean_low_latency_buffer(NUM_MAX_DISPATCH_TOKENS_PER_RANK, HIDDEN, NUM_EXPERTS)
        self.dispatch_mode = Mode.LOW_LATENCY
        return self.get()


class _Normal:
    """SGLang's _DeepEPDispatcherImplNormal (DeepGEMM runner: expert_alignment 128)."""

    def __init__(self, buffers, async_finish, use_fp8):
        self.buffers, self.async_finish, self.use_fp8 = buffers, async_finish, use_fp8
        self.handle = None

    def dispatch_a(self, hidden_states, topk_ids, topk_weights):
        topk_ids = topk_ids.to(torch.int64)
        if self.use_fp8:
            hidden_states = per_token_group_quant_fp8(hidden_states, 128)
        previous_event = deep_ep.Buffer.capture() if self.async_finish else None
        return hidden_states, topk_ids, topk_weights, previous_event

    def dispatch_b(self, hidden_states, topk_ids, topk_weights, previous_event):
        buffer = self.buffers.as_normal()
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event) = (
            buffer.get_dispatch_layout(
                topk_ids,
                NUM_EXPERTS,
                previous_event=previous_event,
                async_finish=self.async_finish,
                allocate_on_comm_stream=previous_event is not None,
            )
        )
        (recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, self.handle, event) = buffer.dispatch(
            hidden_states,
            topk_idx=topk_ids,
            topk_weights=topk_weights,
            num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            previous_event=previous_event,
            async_finish=self.async_finish,
            allocate_on_comm_stream=(previous_event is not None) and self.async_finish,
            expert_alignment=128,
            config=self.buffers.config.normal_dispatch_config,
        )
        event.current_stream_wait() if self.async_finish else ()
        return recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert

    def combine_a(self, hidden_states):
        previous_event = deep_ep.Buffer.capture() if self.async_finish else None
        return hidden_states, previous_event

    def combine_b(self, hidden_states, previous_event):
        buffer = self.buffers.as_normal()
        combined_x, _, event = buffer.combine(
            hidden_states,
            self.handle,
            async_finish=self.async_finish,
            previous_event=previous_event,
            allocate_on_comm_stream=previous_event is not None,
            config=self.buffers.config.normal_combine_config,
        )
        event.current_stream_wait() if self.async_finish else ()
        self.handle = None
        return combined_x


class _LowLatency:
    """SGLang's _DeepEPDispatcherImplLowLatency (Hopper: round_scale and use_ue8m0 off)."""

    def __init__(self, buffers, return_recv_hook, use_fp8):
        self.buffers, self.return_recv_hook, self.use_fp8 = buffers, return_recv_hook, use_fp8
        self.handle = self.packed_recv_count = None

    def dispatch_a(self, hidden_states, topk_ids):
        buffer = self.buffers.as_low_latency()
        topk_ids = topk_ids.to(torch.int64)
        expected_m = (hidden_states.shape[0] * buffer.group_size * topk_ids.shape[1] + NUM_EXPERTS) // NUM_EXPERTS
        fp8_opts = dict(round_scale=False, use_ue8m0=False) if self.use_fp8 else dict()
        buffer = self.buffers.as_low_latency()
        packed_recv_hidden, self.packed_recv_count, self.handle, event, hook = buffer.low_latency_dispatch(
            hidden_states,
            topk_ids,
            NUM_MAX_DISPATCH_TOKENS_PER_RANK,
            NUM_EXPERTS,
            use_fp8=self.use_fp8,
            async_finish=not self.return_recv_hook,
            return_recv_hook=self.return_recv_hook,
            **fp8_opts,
        )
        return packed_recv_hidden, self.packed_recv_count, expected_m, event, hook

    def dispatch_b(self, packed_recv_hidden, masked_m, expected_m, event, hook):
        hook() if self.return_recv_hook else event.current_stream_wait()
        return packed_recv_hidden, masked_m, expected_m

    def combine_a(self, hidden_states, topk_ids, topk_weights):
        buffer = self.buffers.as_low_latency()
        combined_hidden_states, event, hook = buffer.low_latency_combine(
            x=hidden_states,
            topk_idx=topk_ids,
            topk_weights=topk_weights,
            handle=self.handle,
            async_finish=not self.return_recv_hook,
            return_recv_hook=self.return_recv_hook,
        )
        self.packed_recv_count = self.handle = None
        return combined_hidden_states, event, hook

    def combine_b(self, hidden_states, event, hook):
        hook() if self.return_recv_hook else event.current_stream_wait()
        return hidden_states


# ---- rounds ------------------------------------------------------------------------------------------------------
def _normal_round(ctx, group, buffers, async_finish, use_fp8, label):
    num_tokens = max(1, NUM_TOKENS - 31 * ctx.rank)
    hidden_states = torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16)
    topk_ids, topk_weights = random_routing(num_tokens, NUM_EXPERTS, NUM_TOPK)
    impl = _Normal(buffers, async_finish, use_fp8)
    state = impl.dispatch_a(hidden_states, topk_ids, topk_weights)
    recv_x, recv_topk_ids, recv_topk_weights, per_expert = impl.dispatch_b(*state)
    sent = state[0]
    expected = expected_normal_dispatch(
        group, ctx.rank, NUM_EXPERTS, sent, topk_ids, topk_weights, expert_alignment=128
    )
    check_normal_dispatch(f"{label} dispatch", expected, recv_x, recv_topk_ids, recv_topk_weights, per_expert)

    num_local = NUM_EXPERTS // ctx.num_ranks
    local = recv_topk_ids >= 0
    y = normal_expert_output(
        recv_x, local, torch.where(local, recv_topk_ids + ctx.rank * num_local, recv_topk_ids), recv_topk_weights
    )
    combined = impl.combine_b(*impl.combine_a(y))
    torch.cuda.synchronize()
    x_float = dequantize(*sent) if use_fp8 else hidden_states.float()
    check_combined(f"{label} combine", combined, x_float, topk_ids, topk_weights)


def _low_latency_rounds(ctx, group, buffers, return_recv_hook, use_fp8, label, num_batches=1):
    """num_batches dispatchers (two-batch overlap: 2) with results in flight together; each checked."""
    impls = [_LowLatency(buffers, return_recv_hook, use_fp8) for _ in range(num_batches)]
    inputs = []
    for b in range(num_batches):
        num_tokens = max(1, DECODE_TOKENS - 5 * ctx.rank - 7 * b)
        hidden_states = torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16)
        inputs.append((hidden_states,) + random_routing(num_tokens, NUM_EXPERTS, NUM_TOPK))
    sync(group)
    states = [impl.dispatch_a(x, topk_ids) for impl, (x, topk_ids, _) in zip(impls, inputs)]
    dispatched = [impl.dispatch_b(*state) for impl, state in zip(impls, states)]
    handles = [impl.handle for impl in impls]
    ys = [low_latency_expert_output(recv_x, ctx.rank) for recv_x, _, _ in dispatched]
    combine_states = [
        impl.combine_a(y, topk_ids, topk_weights) for impl, y, (_, topk_ids, topk_weights) in zip(impls, ys, inputs)
    ]
    combined = [impl.combine_b(*state) for impl, state in zip(impls, combine_states)]
    torch.cuda.synchronize()
    for b, ((x, topk_ids, topk_weights), (recv_x, masked_m, expected_m), handle) in enumerate(
        zip(inputs, dispatched, handles)
    ):
        batch = f"{label} batch {b}"
        wanted_m = (x.size(0) * ctx.num_ranks * NUM_TOPK + NUM_EXPERTS) // NUM_EXPERTS
        if expected_m != wanted_m:
            raise AssertionError(f"{batch}: expected_m {expected_m} != {wanted_m}")
        check_low_latency_dispatch(
            f"{batch} dispatch",
            group,
            ctx.rank,
            x,
            topk_ids,
            NUM_EXPERTS,
            NUM_MAX_DISPATCH_TOKENS_PER_RANK,
            recv_x,
            masked_m,
            handle,
            use_fp8,
        )
        check_low_latency_combine(f"{batch} combine", combined[b], x, topk_ids, topk_weights, use_fp8)
    sync(group)


# ---- cases -------------------------------------------------------------------------------------------------------
def _release(group, buffers):
    """SGLang keeps its Buffer for the process's life; the test lets it go, after every rank's last op, before
    leaving the group."""
    sync(group)
    buffers.buffer = None
    gc.collect()


def normal_mode(ctx, num_ranks_per_node):
    """--deepep-mode normal: BF16 and FP8 batches, synchronous and with async_finish (events captured with
    Buffer.capture(), outputs allocated on the comm stream)."""
    group = start(ctx, num_ranks_per_node, seed=51)
    buffers = _DeepEPBuffer(group, Mode.NORMAL, _DeepEPConfig(ctx.num_ranks))
    for async_finish in (False, True):
        for use_fp8 in (False, True):
            _normal_round(
                ctx,
                group,
                buffers,
                async_finish,
                use_fp8,
                f"rank {ctx.rank} {'fp8' if use_fp8 else 'bf16'} async_finish={async_finish}",
            )
            sync(group)
    _release(group, buffers)
    finish(group)


def low_latency_mode(ctx, num_ranks_per_node):
    """--deepep-mode low_latency: FP8 and BF16 with async_finish events, with receive hooks, and two batches
    in flight with hooks (two-batch overlap)."""
    group = start(ctx, num_ranks_per_node, seed=53)
    buffers = _DeepEPBuffer(group, Mode.LOW_LATENCY, _DeepEPConfig(ctx.num_ranks))
    for return_recv_hook in (False, True):
        for use_fp8 in (True, False):
            _low_latency_rounds(
                ctx,
                group,
                buffers,
                return_recv_hook,
                use_fp8,
                f"rank {ctx.rank} {'fp8' if use_fp8 else 'bf16'} hook={return_recv_hook}",
            )
    _low_latency_rounds(ctx, group, buffers, True, True, f"rank {ctx.rank} two-batch overlap", num_batches=2)
    _release(group, buffers)
    finish(group)


def auto_mode(ctx, num_ranks_per_node):
    """--deepep-mode auto: one low_latency_mode Buffer for prefill (normal) and decode (low latency), with
    clean_low_latency_buffer on every move from normal to low latency, twice over."""
    group = start(ctx, num_ranks_per_node, seed=57)
    buffers = _DeepEPBuffer(group, Mode.AUTO, _DeepEPConfig(ctx.num_ranks))
    for cycle in range(2):
        label = f"rank {ctx.rank} cycle {cycle}"
        _normal_round(ctx, group, buffers, cycle == 1, True, f"{label} prefill")
        sync(group)
        _low_latency_rounds(ctx, group, buffers, cycle == 0, True, f"{label} decode")
        _low_latency_rounds(ctx, group, buffers, True, True, f"{label} decode, two-batch overlap", num_batches=2)
    if not buffers.buffer.low_latency_mode:
        raise AssertionError("auto mode must make a low_latency_mode Buffer")
    _release(group, buffers)
    finish(group)


def cases(rank_counts):
    out = []
    for tag, num_ranks, num_ranks_per_node in layouts(rank_counts, emulated=("2x8",)):
        base = f"clients/sglang/{tag}"
        out.append((f"{base}/normal", normal_mode, num_ranks, (num_ranks_per_node,), 240))
        out.append((f"{base}/auto", auto_mode, num_ranks, (num_ranks_per_node,), 240))
    for tag, num_ranks, num_ranks_per_node in layouts(rank_counts):
        out.append((f"clients/sglang/{tag}/low_latency", low_latency_mode, num_ranks, (num_ranks_per_node,), 240))
    return out
