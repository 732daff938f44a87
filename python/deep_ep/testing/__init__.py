"""Multi-rank test support: run a function on N local ranks (one per GPU, or several per GPU under MPS).

Standard library only at import time, so CPU-only machines can use and test it; torch is imported lazily by the
bootstrap helpers that need it.
"""

from .launcher import (
    MULTICAST_OFF_ENV,
    RankContext,
    RankFailure,
    RankPool,
    RankSkipped,
    RankTimeout,
    Skip,
    destroy_process_group,
    disable_multicast,
    init_process_group,
    launch,
    visible_gpu_count,
)
from .mps import MpsDaemon, mps_control_path

__all__ = [
    "MULTICAST_OFF_ENV",
    "MpsDaemon",
    "RankContext",
    "RankFailure",
    "RankPool",
    "RankSkipped",
    "RankTimeout",
    "Skip",
    "destroy_process_group",
    "disable_multicast",
    "init_process_group",
    "launch",
    "mps_control_path",
    "visible_gpu_count",
]
