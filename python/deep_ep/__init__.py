"""deep_ep: expert-parallel dispatch/combine for Mixture-of-Experts, compatible with DeepEP V1.

`Buffer`, `EventOverlap`, `EventHandle`, `Config` and `topk_idx_t` are the V1 interface, with
`deep_ep.utils` (EventHandle, EventOverlap, check_nvlink_connections). They need PyTorch at run time;
without it only `Config` and the CPU reference (`deep_ep.reference`) are available.
"""

from ._C import Config, reference  # noqa: F401  (torch-free)

try:
    import torch as _torch
except ImportError:  # CPU-only environments (CI): the reference and Config still work
    _torch = None

if _torch is not None:
    from .buffer import Buffer  # noqa: F401
    from .utils import EventHandle, EventOverlap  # noqa: F401

    topk_idx_t = _torch.int64

__all__ = ["Buffer", "EventOverlap", "EventHandle", "Config", "topk_idx_t", "reference"]
__version__ = "0.1.0"
