"""Helpers shared by the benchmark modules: how an op is timed (CUDA events, warm-up, medians, L2 flushed
between samples), the HBM copy ceiling, the FP8 input every normal-mode benchmark casts, and the environment
settings a benchmark switches for one measurement.

It imports no other module of deep_ep.bench: suite.py and the per-mode modules (intranode.py, internode.py,
baselines.py) import from here, never from each other in both directions.
"""

import contextlib
import os
import statistics
import time

import torch
import torch.distributed as dist

# Bytes zeroed before each timed sample: larger than any GPU's L2, so no sample starts with a warm cache.
L2_FLUSH_BYTES = 256 << 20


@contextlib.contextmanager
def env_setting(name, value):
    """Environment variable `name` set to `value` inside the block, and as it was (set or unset) after it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def time_op(fn, group, iters, flush, calls_per_sample=8, samples=None, lead_in=False):
    """Milliseconds of one fn() call: the median over `iters` samples of `calls_per_sample` back-to-back calls,
    each sample preceded by an L2 flush and a barrier. Several calls per sample amortize the ranks' start skew
    (processes leave the CPU barrier at slightly different times). With `lead_in` (for a collective fn), one
    untimed call follows the barrier: a rank that left it early waits inside that call for the last one, so every
    rank's timed calls start together and the skew is in no sample. With a list as `samples`, every sample's
    milliseconds per call are appended to it, in order (every rank's i-th sample starts after the same barrier)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        flush.zero_()
        torch.cuda.synchronize()
        dist.barrier(group)
        if lead_in:
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls_per_sample):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_sample)
    if samples is not None:
        samples.extend(times)
    return statistics.median(times)


def time_op_per_call(fn, group, num_calls, flush, host_ms=None):
    """Milliseconds of one fn() call as training loops and DeepEP's own test loop see it: `num_calls` eager
    calls back to back, CUDA events around each one, the median of the per-call times. Host work, allocations
    and waits between calls show up here and not in a graph replay. When `host_ms` is a list, the median host
    time of one call (its Python and C++ work up to the return, launches included) is appended to it."""
    # Three untimed calls, an L2 flush, and every rank leaving a barrier together.
    for _ in range(3):
        fn()
    flush.zero_()
    torch.cuda.synchronize()
    dist.barrier(group)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(num_calls)]
    host = []
    for start, end in events:
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        end.record()
    torch.cuda.synchronize()
    if host_ms is not None:
        host_ms.append(statistics.median(host) * 1e3)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def capture_graph(fn, calls_per_graph, group=None):
    """Three warm-up calls of fn, then a CUDA graph of `calls_per_graph` back-to-back calls (after a barrier of
    `group` when one is given, so every rank captures at the same point)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if group is not None:
        dist.barrier(group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    return graph


def _replay_ms(graph, calls_per_graph):
    """Milliseconds of one call in one replay of `graph`, between CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls_per_graph


def time_op_graph(fn, group, iters, flush, calls_per_graph=8):
    """Milliseconds of one fn() call replayed from a CUDA graph of `calls_per_graph` back-to-back calls: the
    median over `iters` replays, each after an L2 flush and a barrier. The device time alone, no host work."""
    graph = capture_graph(fn, calls_per_graph, group)
    times = []
    for _ in range(iters):
        flush.zero_()
        torch.cuda.synchronize()
        dist.barrier(group)
        times.append(_replay_ms(graph, calls_per_graph))
    torch.cuda.synchronize()
    del graph
    return statistics.median(times)


def time_op_graph_alone(fn, group, iters, flush, timed_rank=0, calls_per_graph=8):
    """time_op_graph on `timed_rank` while the other ranks only join its barriers, for an op that talks to no
    other rank: its device time with the GPU to itself, as on a node with a GPU per rank (ranks sharing one GPU
    otherwise run theirs at the same time in every sample). Returns the timed rank's milliseconds, None on the
    others."""
    timed = dist.get_rank(group) == timed_rank
    graph = capture_graph(fn, calls_per_graph) if timed else None
    times = []
    for _ in range(iters):
        dist.barrier(group)
        if not timed:
            continue
        flush.zero_()
        torch.cuda.synchronize()
        times.append(_replay_ms(graph, calls_per_graph))
    dist.barrier(group)
    if not timed:
        return None
    torch.cuda.synchronize()
    del graph
    return statistics.median(times)


def median_ms(fn, iters):
    """Milliseconds of one fn() call on this process alone (no barrier, no flush): the median over `iters`
    samples of one call each, after three warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hbm_copy_gbps(iters=20):
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB copy, alone."""
    src = torch.randn(256 << 20, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def hbm_write_gbps(iters=20):
    """Device write bandwidth (bytes written per second) of a 1 GiB fill, alone: the ceiling of an op whose HBM
    traffic is mostly writes, as a dispatch's received rows are when its ring stays in L2."""
    dst = torch.empty(256 << 20, device="cuda")
    ms = median_ms(lambda: dst.fill_(1.0), iters)
    return dst.numel() * 4 / (ms * 1e-3) / 1e9


def fp8_cast(x):
    """Per-128-channel FP8 cast with column-major scales, as DeepEP users pass them."""
    t, h = x.shape
    groups = x.float().view(t, h // 128, 128)
    amax = groups.abs().amax(dim=2).clamp(min=1e-4)
    scales = amax / 448.0
    x_fp8 = (groups / scales.unsqueeze(2)).view(t, h).to(torch.float8_e4m3fn)
    return x_fp8, scales.t().contiguous().t()
