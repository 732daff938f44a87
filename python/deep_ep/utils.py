"""deep_ep.utils: DeepEP V1's public helpers (docs/compatibility.md sections 1 and 4). Clients import them directly
(`from deep_ep.utils import EventHandle, EventOverlap`), so they live here; deep_ep.event re-exports them.

- EventHandle: a CUDA event recorded on a stream when it is created.
- EventOverlap: what every op returns: an EventHandle (or None) plus tensors to keep alive with it.
- check_nvlink_connections: on PCIe parts, checks that the group's GPUs are NVLink-connected.
"""

import os
import socket
from typing import Optional, Sequence

try:
    import torch
except ImportError as _error:  # deep_ep itself imports without torch; these helpers cannot
    raise ImportError(
        "deep_ep.utils needs PyTorch: EventHandle, EventOverlap and check_nvlink_connections work "
        "on torch CUDA streams and process groups; install torch to use them"
    ) from _error

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]


def _event_types() -> tuple:
    """The event classes a bare event may be given as: torch.cuda.Event, and torch.Event where torch has it."""
    types = [torch.cuda.Event]
    generic = getattr(torch, "Event", None)
    if isinstance(generic, type) and generic not in types:
        types.append(generic)
    return tuple(types)


class EventHandle:
    """A CUDA event recorded, when the handle is created, on `stream` (default: the current stream).

    `current_stream_wait()` orders the stream current at that call after everything enqueued on the
    recording stream before the record. Copies (copy.copy, copy.deepcopy) share the same event. The
    torch.cuda.Event is `.event`.
    """

    __slots__ = ("event",)

    def __init__(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        if stream is None:
            stream = torch.cuda.current_stream()
        elif not callable(getattr(stream, "record_event", None)):
            raise TypeError(f"EventHandle(stream): stream must be a torch.cuda.Stream, got {type(stream).__name__}")
        self.event = stream.record_event()

    @classmethod
    def from_event(cls, event) -> "EventHandle":
        """A handle on an event that is already recorded (a torch.cuda.Event); nothing is recorded."""
        if not isinstance(event, _event_types()):
            raise TypeError(f"EventHandle.from_event: event must be a torch.cuda.Event, got {type(event).__name__}")
        handle = cls.__new__(cls)
        handle.event = event
        return handle

    def current_stream_wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)

    # The torch.cuda.Event methods code written for an EventOverlap holding a bare torch event calls on
    # `.event` (torch's Stream.wait_event(e) calls e.wait(stream)).
    def wait(self, stream=None) -> None:
        self.event.wait(stream)

    def query(self) -> bool:
        return self.event.query()

    def synchronize(self) -> None:
        self.event.synchronize()

    # A CUDA event cannot be pickled or duplicated: copies refer to the same one, as in V1.
    def __copy__(self) -> "EventHandle":
        copied = EventHandle.__new__(EventHandle)
        copied.event = self.event
        return copied

    def __deepcopy__(self, memo) -> "EventHandle":
        return self.__copy__()

    def __repr__(self) -> str:
        return f"EventHandle({self.event!r})"


class EventOverlap:
    """Returned by every op, and accepted by every op as `previous_event`.

    `event` is an EventHandle, or None when the op finished on the current stream (async_finish=False).
    `current_stream_wait()` (or leaving a `with event:` block; entering does nothing) orders the current
    stream after it. `extra_tensors` are kept alive as long as this object. For compatibility with code
    written against earlier deep_ep versions, a bare torch.cuda.Event is accepted and wrapped.
    """

    def __init__(self, event=None, extra_tensors: Optional[Sequence["torch.Tensor"]] = None) -> None:
        if event is not None and not isinstance(event, EventHandle):
            if not isinstance(event, _event_types()):
                raise TypeError(
                    f"EventOverlap(event): event must be a deep_ep.utils.EventHandle or a "
                    f"torch.cuda.Event, got {type(event).__name__}"
                )
            event = EventHandle.from_event(event)
        self.event: Optional[EventHandle] = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event; nothing to wait for when there is none."""
        if self.event is not None:
            self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


def _torch_event_of(previous_event: Optional[EventOverlap], arg: str = "previous_event"):
    """The torch.cuda.Event an op's stream waits on for `previous_event` (an EventOverlap), or None when it
    carries no event. Raises TypeError naming `arg` for anything else."""
    if previous_event is None:
        return None
    if not isinstance(previous_event, EventOverlap):
        wrappable = isinstance(previous_event, (EventHandle,) + _event_types())
        hint = "; wrap it in an EventOverlap" if wrappable else ""
        raise TypeError(
            f"{arg} must be a deep_ep.EventOverlap such as Buffer.capture() or "
            f"EventOverlap(EventHandle()), got {type(previous_event).__name__}{hint}"
        )
    return None if previous_event.event is None else previous_event.event.event


# ---- NVLink check -----------------------------------------------------------------------------------------
def _physical_gpu_id(device_index: int) -> str:
    """The NVML identity of visible CUDA device `device_index`: its entry of CUDA_VISIBLE_DEVICES (an index or a
    UUID), or the index itself when the variable is unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return str(device_index)
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if device_index >= len(entries):
        raise RuntimeError(
            f"check_nvlink_connections: CUDA device {device_index} is not among CUDA_VISIBLE_DEVICES={visible!r}"
        )
    return entries[device_index]


def _nvml_handle(pynvml, gpu_id: str):
    if gpu_id.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
    return pynvml.nvmlDeviceGetHandleByUUID(gpu_id)


def check_nvlink_connections(group) -> None:
    """Check that every two GPUs of `group` on the same host are connected by NVLink (V1's check).

    Only PCIe parts (device name containing 'PCIE') are checked: SXM parts are NVLink-connected by
    construction and return at once. Collective over `group` on PCIe parts (one all-gather of each rank's
    host and physical GPU; any torch.distributed backend, gloo included). Ranks sharing a GPU are not a
    pair to check. Raises AssertionError naming the two GPUs when a pair is not NVLink-connected; needs
    pynvml (package nvidia-ml-py) on PCIe parts only.
    """
    if "PCIE" not in torch.cuda.get_device_name().upper():
        return
    import torch.distributed as dist

    me = (socket.gethostname(), _physical_gpu_id(torch.cuda.current_device()))
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    pairs = sorted(
        {
            tuple(sorted((a, b)))
            for i, a in enumerate(everyone)
            for b in everyone[i + 1 :]
            if a[0] == b[0] and a[1] != b[1]
        }
    )
    if not pairs:
        return
    try:
        import pynvml
    except ImportError as error:
        raise ImportError(
            "check_nvlink_connections needs pynvml (pip install nvidia-ml-py) to check the NVLink "
            "connections of PCIe GPUs"
        ) from error
    pynvml.nvmlInit()
    try:
        for (host, first), (_, second) in pairs:
            status = pynvml.nvmlDeviceGetP2PStatus(
                _nvml_handle(pynvml, first), _nvml_handle(pynvml, second), pynvml.NVML_P2P_CAPS_INDEX_NVLINK
            )
            if status != pynvml.NVML_P2P_STATUS_OK:
                raise AssertionError(
                    f"GPU {first} and GPU {second} on {host} are not connected by NVLink "
                    f"(NVML P2P status {status}); the group's GPUs must be"
                )
    finally:
        pynvml.nvmlShutdown()
