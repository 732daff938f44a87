"""deep_ep.Buffer: DeepEP V1's Buffer over the torch-free core (docs/compatibility.md section 3).

This module only adapts: it turns tensors into views, allocates outputs with torch's caching
allocator on the right stream, and orders streams with events. Validation, layout and kernels are
in C++.
"""

import os
from typing import Optional, Tuple

import torch

from . import _C
from ._views import optional_view, view
from .utils import EventHandle, EventOverlap, _torch_event_of
from .groups import make_group, nccl_comm_address

Config = _C.Config

# Outputs of a non-cached internode dispatch that follow is_token_in_rank in its handle, in V1's order.
_INTERNODE_HANDLE_OUTPUTS = (
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


# Buffer._comm_joined_by before the comm stream has had any work.
_ANY_STREAM = "any"
# torch's high stream priority (lower is higher), the one DeepEP V1 takes its comm stream from.
_COMM_STREAM_PRIORITY = -1


def _comm_stream_priority() -> int:
    """The comm stream's priority: -1 (high), or DEEP_EP_COMM_STREAM_PRIORITY (a diagnostic aid; 0 is torch's
    default priority)."""
    value = os.environ.get("DEEP_EP_COMM_STREAM_PRIORITY")
    if value is None or value == "":
        return _COMM_STREAM_PRIORITY
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"DEEP_EP_COMM_STREAM_PRIORITY must be an integer, got {value!r}") from None


def _current_stream_handle(device_index: int) -> int:
    """The current stream's handle through torch.cuda.Stream, for a torch without the raw accessor below."""
    return torch.cuda.current_stream(device_index).cuda_stream


# The current stream's handle (torch.cuda.Stream.cuda_stream) without building a Stream object.
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_handle)


class Buffer:
    """Communication buffers of one rank, and the expert-parallel ops on them.

    Construction is collective over `group` (a torch.distributed ProcessGroup of any backend) or,
    when `group` is None, over `comm` (an mpi4py communicator).
    """

    num_sms: int = 20

    def __init__(
        self,
        group,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
    ) -> None:
        core_group = make_group(group, comm)
        if not torch.cuda.is_available():
            raise RuntimeError("deep_ep.Buffer needs a CUDA device; none is visible")
        for name, value in (
            ("num_nvl_bytes", num_nvl_bytes),
            ("num_rdma_bytes", num_rdma_bytes),
            ("num_qps_per_rank", num_qps_per_rank),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        self.group = group
        self.comm = comm
        self.rank = core_group.rank
        self.group_size = core_group.size
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        # A tensor from torch's allocator, as the ops' tensors will be: whether CUDA IPC can export its memory decides
        # whether the ops may read and write peers' tensors in place (not with expandable_segments or cudaMallocAsync).
        # Large enough for the large-block pool, where outputs and inputs of real sizes live.
        allocator_probe = torch.empty(4 << 20, dtype=torch.uint8, device=f"cuda:{torch.cuda.current_device()}")
        self.runtime = _C.Buffer(
            core_group,
            num_nvl_bytes,
            num_rdma_bytes,
            low_latency_mode,
            num_qps_per_rank,
            allow_nvlink_for_low_latency_mode,
            allow_mnnvl,
            use_fabric,
            explicitly_destroy,
            enable_shrink,
            torch.cuda.current_device(),
            nccl_comm_address=lambda: nccl_comm_address(group),
            allocator_probe_address=allocator_probe.data_ptr(),
        )
        del allocator_probe
        self._device = torch.device("cuda", self.runtime.device)
        self._device_index = self.runtime.device
        # High priority, as DeepEP V1's: the scheduler places a comm kernel's blocks before the pending blocks of
        # compute kernels, so a large compute grid launched first cannot hold back a kernel that peers wait for.
        self._comm_stream = torch.cuda.Stream(device=self._device, priority=_comm_stream_priority())
        # The stream (cuda_stream handle) that waited for all the comm stream's work so far, or _ANY_STREAM while
        # the comm stream has had none: a call made on that stream is already ordered after every earlier op.
        self._comm_joined_by = _ANY_STREAM

    # ---- lifetime ------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the buffers (collective). Only for buffers created with explicitly_destroy=True."""
        if not self.explicitly_destroy:
            raise RuntimeError(
                "Buffer.destroy() is only for buffers created with explicitly_destroy=True; "
                "other buffers are released when they are garbage-collected"
            )
        self.runtime.destroy()

    def is_available(self) -> bool:
        return self.runtime.is_available()

    # ---- class-level configuration ---------------------------------------------------------------
    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise ValueError(f"num_sms must be a positive even int, got {new_num_sms!r}")
        cls.num_sms = new_num_sms

    @classmethod
    def get_dispatch_config(cls, num_ranks: int) -> Config:
        return _C.get_dispatch_config(num_ranks, cls.num_sms)

    @classmethod
    def get_combine_config(cls, num_ranks: int) -> Config:
        return _C.get_combine_config(num_ranks, cls.num_sms)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether this build's kernels include sm_90 (CMAKE_CUDA_ARCHITECTURES)."""
        return _C.is_sm90_compiled()

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        return _C.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ---- raw access ----------------------------------------------------------------------------
    def get_local_buffer_tensor(
        self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0, use_rdma_buffer: bool = False
    ) -> torch.Tensor:
        """This rank's payload buffer as a `dtype` tensor starting `offset` bytes in (as in V1)."""
        raw = self.runtime.payload_tensor(use_rdma_buffer)
        if offset < 0 or offset > raw.numel():
            raise ValueError(f"offset must be in [0, {raw.numel()}] bytes, got {offset}")
        element_size = torch.empty((), dtype=dtype).element_size()
        raw = raw[offset:]
        raw = raw[: raw.numel() // element_size * element_size]
        tensor = raw.view(dtype)
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > tensor.numel():
            raise ValueError(f"size {tuple(size)} needs {size.numel()} elements, the buffer has {tensor.numel()}")
        return tensor[: size.numel()].view(size)

    def get_comm_stream(self) -> torch.cuda.Stream:
        self._comm_joined_by = None  # the caller may queue work there that no stream has waited for
        return self._comm_stream

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap holding an EventHandle recorded on the current stream."""
        return EventOverlap(EventHandle())

    # ---- stream protocol shared by every op (docs/compatibility.md section 4) -------------------
    def _begin(self, previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True requires previous_event and async_finish=True")
        # An EventOverlap whose event is an EventHandle (Buffer.capture(), EventOverlap(EventHandle()), an
        # earlier op's event); the stream waits on the torch event inside.
        wait_for = _torch_event_of(previous_event, "previous_event")
        # Device errors of earlier ops are raised by the op's own first check, before anything is launched.
        compute = torch.cuda.current_stream()
        if wait_for is not None:
            self._comm_stream.wait_event(wait_for)
        else:
            self._comm_stream.wait_stream(compute)
        # None: outputs on the current stream (the common case, without a stream switch per allocation).
        return compute, (self._comm_stream if allocate_on_comm_stream else None)

    def _end(self, compute: torch.cuda.Stream, async_finish: bool, tensors) -> EventOverlap:
        if async_finish:
            live = tuple(t for t in tensors if isinstance(t, torch.Tensor))
            # Inputs and outputs must outlive the comm stream's work: the caching allocator may
            # otherwise hand their memory to the compute stream early.
            for t in live:
                t.record_stream(self._comm_stream)
            self._comm_joined_by = None  # until a later op's compute stream waits for it
            return EventOverlap(EventHandle(self._comm_stream), extra_tensors=live)
        compute.wait_stream(self._comm_stream)
        self._comm_joined_by = compute.cuda_stream
        return EventOverlap(None)

    def _empty(self, shape, dtype, stream) -> torch.Tensor:
        """A tensor allocated on `stream` (None: the current stream)."""
        if stream is None:
            return torch.empty(shape, dtype=dtype, device=self._device)
        with torch.cuda.stream(stream):
            return torch.empty(shape, dtype=dtype, device=self._device)

    # ---- layout ----------------------------------------------------------------------------------
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event)."""
        topk_view = view(topk_idx, "topk_idx")
        if topk_idx.dim() != 2:
            raise ValueError(f"topk_idx must be 2-D [num_tokens, num_topk], got shape {tuple(topk_idx.shape)}")
        if not isinstance(num_experts, int) or isinstance(num_experts, bool):
            raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
        # The raw handle, not a torch.cuda.Stream: this call is host-bound when made eagerly.
        current = _current_raw_stream(self._device_index)
        if (
            previous_event is None
            and not async_finish
            and not allocate_on_comm_stream
            and self._comm_joined_by in (_ANY_STREAM, current)
        ):
            # Nothing to overlap, and the current stream already follows every earlier op: running the kernel here
            # orders it exactly as the comm stream between two stream waits would (it touches no communication
            # buffer), and the call saves both waits.
            compute, alloc_stream, run_stream = None, None, current
        else:
            compute, alloc_stream = self._begin(previous_event, async_finish, allocate_on_comm_stream)
            run_stream = self._comm_stream.cuda_stream
        num_ranks = self.group_size
        num_tokens = topk_idx.size(0)
        per_rank = self._empty((num_ranks,), torch.int32, alloc_stream)
        num_nodes = self.runtime.num_nodes()
        per_rdma_rank = self._empty((num_nodes,), torch.int32, alloc_stream) if num_nodes > 1 else None
        per_expert = self._empty((max(num_experts, 0),), torch.int32, alloc_stream)
        in_rank = self._empty((num_tokens, num_ranks), torch.bool, alloc_stream)
        # The outputs were made here (contiguous, of the shapes the core expects): their addresses suffice.
        self.runtime.get_dispatch_layout(
            topk_view,
            num_experts,
            per_rank.data_ptr(),
            0 if per_rdma_rank is None else per_rdma_rank.data_ptr(),
            per_expert.data_ptr(),
            in_rank.data_ptr(),
            run_stream,
        )
        if compute is None:
            return per_rank, per_rdma_rank, per_expert, in_rank, EventOverlap(None)
        event = self._end(compute, async_finish, (topk_idx, per_rank, per_rdma_rank, per_expert, in_rank))
        return per_rank, per_rdma_rank, per_expert, in_rank, event

    # ---- normal-mode dispatch and combine (docs/compatibility.md sections 6 and 7) ------------
    def _allocator(self, stream, outputs):
        """The core's output allocator: torch tensors on `stream`, kept in `outputs` by name."""

        def allocate(name, dtype_name, shape):
            tensor = self._empty(tuple(shape), getattr(torch, dtype_name.split(".")[-1]), stream)
            outputs[name] = tensor
            return view(tensor, name)

        return allocate

    def dispatch(
        self,
        x,
        handle: Optional[tuple] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token to the ranks in `is_token_in_rank` (or the routing of `handle`).

        Returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event);
        in cached mode (handle given) (recv_x, None, None, None, None, event).
        """
        if self.runtime.num_nodes() > 1:
            return self.internode_dispatch(
                x,
                handle,
                num_tokens_per_rank,
                num_tokens_per_rdma_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                expert_alignment,
                num_worst_tokens,
                config,
                previous_event,
                async_finish,
                allocate_on_comm_stream,
            )
        return self._normal_dispatch(
            False,
            x,
            handle,
            num_tokens_per_rank,
            None,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: Optional[torch.Tensor] = None,
        bias=None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Sum each token's rows from the ranks it was dispatched to (plus `bias`).

        Returns (combined_x, combined_topk_weights or None, event).
        """
        if self.runtime.num_nodes() > 1:
            return self.internode_combine(
                x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
            )
        return self._normal_combine(
            False, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
        )

    def _dispatch_inputs(self, x, config):
        """(config, x data, x scales or None) of a normal-mode dispatch."""
        config = self.get_dispatch_config(self.group_size) if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config must be a deep_ep.Config, got {type(config).__name__}")
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"FP8 x must be a tuple (x_e4m3, x_scales), got a tuple of {len(x)}")
            return config, x[0], x[1]
        return config, x, None

    def _combine_inputs(self, config, bias):
        """(config, (bias_0, bias_1)) of a normal-mode combine."""
        config = self.get_combine_config(self.group_size) if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config must be a deep_ep.Config, got {type(config).__name__}")
        if bias is None:
            return config, (None, None)
        if isinstance(bias, torch.Tensor):
            return config, (bias, None)
        if isinstance(bias, (tuple, list)) and 1 <= len(bias) <= 2:
            return config, (tuple(bias) + (None,))[:2]
        raise ValueError("bias must be None, a tensor, or a tuple of one or two tensors")

    # ---- internode normal mode (num_nodes() > 1): a token crosses to each node once -------------
    def internode_dispatch(
        self,
        x,
        handle: Optional[tuple] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """dispatch() across nodes; the handle is V1's internode 10-tuple (is_token_in_rank first)."""
        return self._normal_dispatch(
            True,
            x,
            handle,
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    def internode_combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: Optional[torch.Tensor] = None,
        bias=None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """combine() across nodes, for the handle of internode_dispatch.

        Returns (combined_x, combined_topk_weights or None, event).
        """
        return self._normal_combine(
            True, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
        )

    # One implementation for both forms: the core op, the handle's length and the handle's contents
    # differ; the streams, events, allocation and results do not.
    def _normal_dispatch(
        self,
        internode: bool,
        x,
        handle,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        expert_alignment,
        num_worst_tokens,
        config,
        previous_event,
        async_finish,
        allocate_on_comm_stream,
    ):
        config, x_data, x_scales = self._dispatch_inputs(x, config)
        _check_handle(handle, internode, optional=True)
        compute, alloc_stream = self._begin(previous_event, async_finish, allocate_on_comm_stream)
        outputs = {}
        layout = [optional_view(num_tokens_per_rank, "num_tokens_per_rank")]
        if internode:
            layout.append(optional_view(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank"))
        layout += [
            optional_view(is_token_in_rank, "is_token_in_rank"),
            optional_view(num_tokens_per_expert, "num_tokens_per_expert"),
        ]
        run = self.runtime.internode_dispatch if internode else self.runtime.intranode_dispatch
        _, per_expert = run(
            view(x_data, "x"),
            optional_view(x_scales, "x_scales"),
            optional_view(topk_idx, "topk_idx"),
            optional_view(topk_weights, "topk_weights"),
            *layout,
            None if handle is None else [view(t, f"handle[{i}]") for i, t in enumerate(handle)],
            expert_alignment,
            num_worst_tokens,
            config,
            self._allocator(alloc_stream, outputs),
            self._comm_stream.cuda_stream,
        )
        cached = handle is not None
        if not cached and internode:
            handle = (is_token_in_rank, *(outputs[name] for name in _INTERNODE_HANDLE_OUTPUTS))
        elif not cached:
            handle = (
                outputs["rank_prefix_matrix"],
                outputs["channel_prefix_matrix"],
                outputs["recv_channel_prefix_matrix"],
                outputs["recv_src_idx"],
                is_token_in_rank,
                outputs["send_head"],
            )
        event = self._end(
            compute,
            async_finish,
            (
                x_data,
                x_scales,
                topk_idx,
                topk_weights,
                num_tokens_per_rank,
                num_tokens_per_rdma_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                *outputs.values(),
                *handle,
            ),
        )
        recv_x = outputs["recv_x"] if x_scales is None else (outputs["recv_x"], outputs["recv_x_scales"])
        if cached:
            return recv_x, None, None, None, None, event
        per_expert_list = [] if num_worst_tokens > 0 else list(per_expert)
        return (recv_x, outputs.get("recv_topk_idx"), outputs.get("recv_topk_weights"), per_expert_list, handle, event)

    def _normal_combine(
        self,
        internode: bool,
        x,
        handle,
        topk_weights,
        bias,
        config,
        previous_event,
        async_finish,
        allocate_on_comm_stream,
    ):
        config, biases = self._combine_inputs(config, bias)
        _check_handle(handle, internode, optional=False)
        compute, alloc_stream = self._begin(previous_event, async_finish, allocate_on_comm_stream)
        outputs = {}
        run = self.runtime.internode_combine if internode else self.runtime.intranode_combine
        run(
            view(x, "x"),
            optional_view(topk_weights, "topk_weights"),
            optional_view(biases[0], "bias[0]"),
            optional_view(biases[1], "bias[1]"),
            [view(t, f"handle[{i}]") for i, t in enumerate(handle)],
            config,
            self._allocator(alloc_stream, outputs),
            self._comm_stream.cuda_stream,
        )
        event = self._end(compute, async_finish, (x, topk_weights, *biases, *outputs.values(), *handle))
        return outputs["combined_x"], outputs.get("combined_topk_weights"), event

    # ---- low-latency mode (docs/compatibility.md section 8) ------------------------------------
    # A low-latency op runs on the current stream, ordered like any kernel and CUDA-graph capturable,
    # unless async_finish moves it to the comm stream. Outputs are always allocated on the current stream.
    def _check_low_latency(self, async_finish: bool = False, return_recv_hook: bool = False) -> None:
        if not self.low_latency_mode:
            raise RuntimeError("low-latency ops need a Buffer created with low_latency_mode=True")
        if async_finish and return_recv_hook:
            raise ValueError(
                "return_recv_hook=True cannot be combined with async_finish=True: the hook launches "
                "the receive on the stream current when it is called"
            )

    def _low_latency_begin(self, async_finish: bool):
        """(compute stream, stream the op runs on)."""
        if async_finish:
            compute, _ = self._begin(None, True, False)
            return compute, self._comm_stream
        compute = torch.cuda.current_stream()
        return compute, compute

    def _low_latency_end(self, compute, async_finish: bool, pending, tensors):
        """(event, hook) of a low-latency op whose send (and receive without hook) was launched."""
        event = self._end(compute, True, tensors) if async_finish else EventOverlap(None)
        if pending is None:
            return event, None  # as in V1: a hook only when return_recv_hook=True
        return event, self._receive_hook(pending, compute, tensors)

    def _receive_hook(self, pending, alloc_stream, tensors):
        live = [t for t in tensors if isinstance(t, torch.Tensor)]
        state = {"pending": pending}

        def hook() -> None:
            if state["pending"] is None:
                raise RuntimeError("this receive hook was already called; each hook launches its receive once")
            stream = torch.cuda.current_stream()
            if stream != alloc_stream:
                # The receive writes the outputs on this stream: the caching allocator must not hand
                # their memory to the allocating stream before it is done.
                for t in live:
                    t.record_stream(stream)
            self.runtime.low_latency_receive(state["pending"], stream.cuda_stream)
            state["pending"] = None
            live.clear()

        return hook

    def _low_latency_handle(self, handle):
        if not isinstance(handle, (tuple, list)) or len(handle) != 5:
            raise ValueError(
                "handle must be the 5-tuple (src_info, layout_range, num_max_dispatch_tokens_per_rank, "
                "hidden, num_experts) returned by low_latency_dispatch"
            )
        src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts = handle
        for i, name in ((2, "num_max_dispatch_tokens_per_rank"), (3, "hidden"), (4, "num_experts")):
            _check_int(f"handle[{i}] ({name})", handle[i])
        return (
            view(src_info, "handle[0] (src_info)"),
            view(layout_range, "handle[1] (layout_range)"),
            num_max_dispatch_tokens_per_rank,
            hidden,
            num_experts,
        )

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Send each (token, top-k expert) pair to the expert's rank, into fixed per-expert slots.

        Returns (recv_x, recv_count, handle, event, hook). recv_x is bf16 [L, S, H], or with use_fp8 the
        tuple (e4m3 [L, S, H], scales [L, S, H / 128] column-major in the last two dims; int32
        [L, S, H / 512] with use_ue8m0). With return_recv_hook the data has arrived only after hook().
        """
        self._check_low_latency(async_finish, return_recv_hook)
        _check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        _check_int("num_experts", num_experts)
        compute, stream = self._low_latency_begin(async_finish)
        outputs = {}
        pending = self.runtime.low_latency_dispatch(
            view(x, "x"),
            view(topk_idx, "topk_idx"),
            num_max_dispatch_tokens_per_rank,
            num_experts,
            optional_view(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats"),
            optional_view(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats"),
            use_fp8,
            round_scale,
            use_ue8m0,
            return_recv_hook,
            self._allocator(compute, outputs),
            stream.cuda_stream,
        )
        recv_x = outputs["recv_x"]
        if use_fp8:
            # Stored [L, H / 128, S] so that each expert's scales of one channel group are contiguous;
            # V1 users index them as [L, S, H / 128].
            recv_x = (recv_x, outputs["recv_x_scales"].transpose(1, 2))
        # Plane 1 of src_info stays reachable through plane 0's storage, which combine reads.
        handle = (
            outputs["src_info"][0],
            outputs["layout_range"],
            num_max_dispatch_tokens_per_rank,
            outputs["recv_x"].size(-1),
            num_experts,
        )
        event, hook = self._low_latency_end(
            compute,
            async_finish,
            pending,
            (x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, *outputs.values()),
        )
        return recv_x, outputs["recv_count"], handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ):
        """Send the expert outputs x [L, S, H] back and reduce them with topk_weights on each token's rank.

        Returns (combined_x, event, hook); combined_x is bf16 [T, H], or `out` when given.
        """
        self._check_low_latency(async_finish, return_recv_hook)
        src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts = self._low_latency_handle(handle)
        compute, stream = self._low_latency_begin(async_finish)
        outputs = {}
        pending = self.runtime.low_latency_combine(
            view(x, "x"),
            view(topk_idx, "topk_idx"),
            view(topk_weights, "topk_weights"),
            src_info,
            layout_range,
            num_max_dispatch_tokens_per_rank,
            hidden,
            num_experts,
            use_logfmt,
            zero_copy,
            return_recv_hook,
            optional_view(out, "out"),
            optional_view(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats"),
            self._allocator(compute, outputs),
            stream.cuda_stream,
        )
        combined_x = out if out is not None else outputs["combined_x"]
        event, hook = self._low_latency_end(
            compute,
            async_finish,
            pending,
            (x, topk_idx, topk_weights, handle[0], handle[1], out, combine_wait_recv_cost_stats, *outputs.values()),
        )
        return combined_x, event, hook

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The bf16 [L, S, H] view of the buffer the next low_latency_combine(zero_copy=True) sends from."""
        self._check_low_latency()
        src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts = self._low_latency_handle(handle)
        ptr, row_stride = self.runtime.next_low_latency_combine_buffer(
            src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts
        )
        payload = self.get_local_buffer_tensor(torch.bfloat16, use_rdma_buffer=True)
        offset_bytes = ptr - payload.data_ptr()
        if offset_bytes % payload.element_size() != 0:
            raise RuntimeError(
                f"the zero-copy combine buffer starts {offset_bytes} bytes into the RDMA payload, "
                "not on a bf16 boundary"
            )
        num_slots = self.group_size * num_max_dispatch_tokens_per_rank
        return torch.as_strided(
            payload,
            (num_experts // self.group_size, num_slots, hidden),
            (num_slots * row_stride, row_stride, 1),
            payload.storage_offset() + offset_bytes // payload.element_size(),
        )

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency signalling state (collective; synchronizes). Needed after internode normal ops
        on this Buffer: the next low-latency op raises a ValueError until it is called."""
        self._check_low_latency()
        for name, value in (
            ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
            ("hidden", hidden),
            ("num_experts", num_experts),
        ):
            _check_int(name, value)
        self.runtime.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # Masking (enable_shrink=True): a masked rank is neither sent to nor waited for.
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (mask=True) or unmask rank `rank_to_mask`, on the current stream."""
        _check_int("rank_to_mask", rank_to_mask)
        self.runtime.low_latency_update_mask(rank_to_mask, mask, torch.cuda.current_stream().cuda_stream)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Fill int32 [num_ranks] `mask_status` with 1 for masked ranks, on the current stream."""
        self.runtime.low_latency_query_mask(view(mask_status, "mask_status"), torch.cuda.current_stream().cuda_stream)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank, on the current stream."""
        self.runtime.low_latency_clean_mask(torch.cuda.current_stream().cuda_stream)


def _check_handle(handle, internode: bool, optional: bool) -> None:
    """The normal-mode handle: V1's 10-tuple across nodes, the 6-tuple inside one."""
    if optional and handle is None:
        return
    length, form = (10, "an internode") if internode else (6, "an intranode")
    if not isinstance(handle, (tuple, list)) or len(handle) != length:
        raise ValueError(f"handle must be the {length}-tuple returned by {form} dispatch")


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
