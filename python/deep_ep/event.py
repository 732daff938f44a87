"""EventOverlap: a CUDA event plus the tensors that must live until it completes (spec section 4)."""

from typing import Optional, Sequence

import torch


class EventOverlap:
    """Returned by every op. With `async_finish=True` it marks the op's completion on the
    communication stream; `current_stream_wait()` (or leaving a `with event:` block) orders the
    current stream after it. `extra_tensors` are kept alive until then."""

    def __init__(self, event: Optional[torch.cuda.Event] = None,
                 extra_tensors: Optional[Sequence[torch.Tensor]] = None) -> None:
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.event is not None:
            self.current_stream_wait()
