"""Run one Python function on N local ranks, one process each: the harness of multi-rank GPU tests and benchmarks.

Ranks are placed round-robin on the visible GPUs; with more ranks than GPUs an MPS daemon is started first so the
ranks sharing a GPU run concurrently instead of time-sliced (docs/design.md section 3). This module uses the standard
library only; torch is imported lazily inside the bootstrap helpers, so it loads on machines without torch or GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import socket
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

# NVLink multicast must stay off on every machine: set for every rank, and kept set in the launching process.
MULTICAST_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

MASTER_ADDR = "127.0.0.1"

# After the first failing rank, how long the parent keeps listening so that the reports of ranks failing for the
# same reason (or because of it) land in the same error.
FAILURE_GRACE_S = 1.0
# Between SIGTERM and SIGKILL when stopping ranks.
TERMINATE_GRACE_S = 5.0
# Granularity of the parent's polling loop; every wait of the parent is bounded by it or by the run's deadline.
POLL_INTERVAL_S = 0.05
# What a rank's report (rank, kind, body) carries: its pickled result, a traceback, or the reason of a Skip.
_REPORT_RESULT, _REPORT_ERROR, _REPORT_SKIP = "result", "error", "skip"


@dataclasses.dataclass(frozen=True)
class RankContext:
    """What a rank function learns about its place in the run (also exported as environment variables).

    device is the CUDA device index of this rank (rank % num_gpus), or None when the run has no GPU.
    master_port is the TCP port of the rendezvous used by init_process_group.
    """

    rank: int
    num_ranks: int
    device: Optional[int]
    num_gpus: int
    master_port: int = 0


class RankFailure(Exception):
    """One or more ranks raised, or their processes died without reporting.

    failures maps a rank to its formatted traceback (or to a description of how its process ended); unfinished
    lists the ranks that were still running when the run was stopped.
    """

    def __init__(
        self, message: str, failures: Optional[Mapping[int, str]] = None, unfinished: Sequence[int] = ()
    ) -> None:
        super().__init__(message)
        self.failures: Dict[int, str] = dict(failures or {})
        self.unfinished: List[int] = list(unfinished)


class RankTimeout(RankFailure):
    """The run passed its wall-clock limit; unfinished names the ranks that had not returned."""


class Skip(Exception):
    """Raised by a rank function when its test cannot run here (an optional package is missing, ...).

    The message says why. Every rank should decide the same way, before any collective call: the run stops
    shortly after the first skip, and the ranks still running are stopped.
    """


class RankSkipped(Exception):
    """launch(): a rank raised Skip and none failed. reason is the first skipping rank's message; skipped maps
    each skipping rank to its message."""

    def __init__(self, reason: str, skipped: Optional[Mapping[int, str]] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.skipped: Dict[int, str] = dict(skipped or {})


def disable_multicast() -> None:
    """Force NVLink multicast off in this process's environment (inherited by everything it starts)."""
    os.environ.update(MULTICAST_OFF_ENV)


def visible_gpu_count() -> int:
    """Number of CUDA devices torch sees, or 0 when torch is missing or has no CUDA.

    torch answers through NVML when it can, which does not create a CUDA context in the launching process.
    """
    try:
        import torch
    except Exception:
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:
        return 0


def launch(
    fn: Callable[..., Any],
    num_ranks: int,
    args: Sequence[Any] = (),
    timeout_s: float = 300.0,
    num_gpus: Optional[int] = None,
    use_mps: Optional[bool] = None,
    env: Optional[Mapping[str, str]] = None,
) -> List[Any]:
    """Call fn(ctx, *args) on num_ranks spawned processes and return their results in rank order.

    fn and args must be picklable (a module-level function), and so must every result. use_mps: None starts a
    private MPS daemon only when ranks outnumber GPUs, True whenever there is a GPU, False never; a daemon
    already announced by CUDA_MPS_PIPE_DIRECTORY is reused. env adds variables to every rank's environment.
    Raises RankFailure when a rank raises or dies, RankTimeout when the run lasts longer than timeout_s, and
    RankSkipped when a rank raised Skip and none failed; the remaining ranks are stopped in every case.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    try:
        payload = pickle.dumps((fn, tuple(args)))
    except Exception as error:
        raise TypeError(
            f"fn and args must be picklable to reach spawned ranks (use a module-level function): {error!r}"
        ) from error
    disable_multicast()
    if num_gpus is None:
        num_gpus = visible_gpu_count()
    if num_gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")

    with _mps_for_run(num_ranks, num_gpus, use_mps):
        return _run_ranks(payload, num_ranks, num_gpus, timeout_s, dict(env or {}))


def init_process_group(ctx: RankContext, timeout_s: float = 300.0) -> Any:
    """Join the run's torch.distributed group over gloo and select this rank's GPU; returns the WORLD group.

    gloo rather than NCCL because NCCL refuses two ranks on one GPU, and the group is only used for bootstrap.
    """
    import datetime

    import torch
    import torch.distributed as dist

    disable_multicast()
    if ctx.device is not None:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(
        "gloo",
        rank=ctx.rank,
        world_size=ctx.num_ranks,
        init_method=f"tcp://{MASTER_ADDR}:{ctx.master_port}",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD


def destroy_process_group() -> None:
    """Leave the torch.distributed group if one was joined (safe to call twice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Parent side


def _mps_for_run(num_ranks: int, num_gpus: int, use_mps: Optional[bool]) -> contextlib.AbstractContextManager:
    """The MPS daemon this run needs, or a no-op context when it needs none or one is already running."""
    wanted = num_gpus >= 1 and use_mps is not False and (use_mps is True or num_ranks > num_gpus)
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
    if not wanted or (pipe_dir and os.path.exists(os.path.join(pipe_dir, "control"))):
        return contextlib.nullcontext()
    try:
        from .mps import MpsDaemon, mps_control_path
    except ImportError:  # loaded as a top-level module, beside mps.py, without the compiled package
        from mps import MpsDaemon, mps_control_path  # type: ignore[no-redef]
    if use_mps is None and mps_control_path() is None:
        warnings.warn(
            f"{num_ranks} ranks share {num_gpus} GPU(s) but nvidia-cuda-mps-control is not on PATH: "
            f"ranks will be time-sliced and cross-rank handshakes will be slow"
        )
        return contextlib.nullcontext()
    return MpsDaemon()


def _free_port() -> int:
    """A TCP port free on the loopback interface right now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((MASTER_ADDR, 0))
        return sock.getsockname()[1]


def _rank_environ(ctx: RankContext, extra: Mapping[str, str]) -> Dict[str, Optional[str]]:
    """Environment of one rank; None removes a variable the launching process may have."""
    environ: Dict[str, Optional[str]] = {
        "RANK": str(ctx.rank),
        "WORLD_SIZE": str(ctx.num_ranks),
        "LOCAL_RANK": str(ctx.rank),
        "LOCAL_WORLD_SIZE": str(ctx.num_ranks),
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(ctx.master_port),
        "DEEP_EP_TEST_DEVICE": None if ctx.device is None else str(ctx.device),
    }
    # All ranks live on this host: let gloo talk over loopback instead of resolving the host name.
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        environ["GLOO_SOCKET_IFNAME"] = "lo"
    environ.update(extra)
    environ.update(MULTICAST_OFF_ENV)
    return environ


@contextlib.contextmanager
def _patched_environ(updates: Mapping[str, Optional[str]]) -> Iterator[None]:
    """Apply updates to os.environ for the duration of the block.

    Spawned children copy the parent's environment when they start, before they import anything, so this is how
    a rank's variables are in place before torch or CUDA could read them.
    """
    saved = {name: os.environ.get(name) for name in updates}
    try:
        for name, value in updates.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_ranks(
    payload: bytes, num_ranks: int, num_gpus: int, timeout_s: float, extra_env: Mapping[str, str]
) -> List[Any]:
    mp_context = multiprocessing.get_context("spawn")
    results_queue = mp_context.Queue()
    master_port = _free_port()
    deadline = time.monotonic() + timeout_s
    processes: List[Any] = []
    try:
        for rank in range(num_ranks):
            ctx = RankContext(
                rank=rank,
                num_ranks=num_ranks,
                device=rank % num_gpus if num_gpus > 0 else None,
                num_gpus=num_gpus,
                master_port=master_port,
            )
            # Not daemonic: a rank may start processes of its own; _stop_ranks below reaps every rank instead.
            process = mp_context.Process(
                target=_rank_main, args=(ctx, payload, results_queue), name=f"deep_ep-rank{rank}"
            )
            with _patched_environ(_rank_environ(ctx, extra_env)):
                process.start()
            processes.append(process)
        return _collect(processes, results_queue, deadline, timeout_s)
    finally:
        _stop_ranks(processes)
        results_queue.close()


def _collect(processes: Sequence[Any], results_queue: Any, deadline: float, timeout_s: float) -> List[Any]:
    """Wait for every rank's report and exit; raise RankFailure / RankTimeout as soon as the outcome is known.

    A rank's report is flushed into the queue before its process exits, so a process seen dead in one pass and
    still without a report after the next (empty) read of the queue died without reporting.
    """
    num_ranks = len(processes)
    results: Dict[int, Any] = {}
    failures: Dict[int, str] = {}
    skipped: Dict[int, str] = {}
    seen_dead: set = set()
    stop_at = deadline
    while len(results) + len(failures) + len(skipped) < num_ranks and time.monotonic() < stop_at:
        try:
            rank, status, body = results_queue.get(timeout=POLL_INTERVAL_S)
        except queue_module.Empty:
            pass
        else:
            if status == _REPORT_RESULT:
                try:
                    results[rank] = pickle.loads(body)
                except Exception:
                    failures[rank] = "the rank's result could not be unpickled:\n" + traceback.format_exc()
            elif status == _REPORT_SKIP:
                skipped[rank] = body
            else:
                failures[rank] = body
            if failures or skipped:
                # A skip ends the test too: ranks still running may be waiting for the one that left.
                stop_at = min(stop_at, time.monotonic() + FAILURE_GRACE_S)
            continue
        for rank, process in enumerate(processes):
            if rank in results or rank in failures or rank in skipped or process.exitcode is None:
                continue
            if rank in seen_dead:
                failures[rank] = _describe_exit(process.exitcode, reported=False)
                stop_at = min(stop_at, time.monotonic() + FAILURE_GRACE_S)
            seen_dead.add(rank)

    unfinished = [
        rank for rank in range(num_ranks) if rank not in results and rank not in failures and rank not in skipped
    ]
    if failures:
        raise RankFailure(_failure_message(failures, unfinished, num_ranks), failures, unfinished)
    if skipped:
        first = next(iter(skipped))
        raise RankSkipped(f"skipped by rank {first}: {skipped[first]}", skipped)
    if unfinished:
        raise RankTimeout(_timeout_message(unfinished, num_ranks, timeout_s, "had not finished"), {}, unfinished)

    # Every rank returned. A process that then crashes on its way out (a destructor, a driver teardown) is a bug
    # worth hearing about too.
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    lingering = [rank for rank, process in enumerate(processes) if process.exitcode is None]
    if lingering:
        raise RankTimeout(_timeout_message(lingering, num_ranks, timeout_s, "returned but did not exit"), {}, lingering)
    crashed = {
        rank: _describe_exit(process.exitcode, reported=True)
        for rank, process in enumerate(processes)
        if process.exitcode != 0
    }
    if crashed:
        raise RankFailure(_failure_message(crashed, [], num_ranks), crashed, [])
    return [results[rank] for rank in range(num_ranks)]


def _describe_exit(exitcode: int, reported: bool) -> str:
    what = "returned a result, then its process" if reported else "the rank's process"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"was killed by {name} (exit code {exitcode})"
    else:
        how = f"exited with exit code {exitcode}"
    suffix = "" if reported else " without reporting a result"
    return f"{what} {how}{suffix}"


def _rank_list(ranks: Sequence[int]) -> str:
    return ", ".join(str(rank) for rank in sorted(ranks))


def _failure_message(failures: Mapping[int, str], unfinished: Sequence[int], num_ranks: int) -> str:
    noun = "rank" if len(failures) == 1 else "ranks"
    lines = [f"{noun} {_rank_list(failures)} of {num_ranks} failed"]
    if unfinished:
        still = "rank {} was" if len(unfinished) == 1 else "ranks {} were"
        lines[0] += f"; {still.format(_rank_list(unfinished))} still running and stopped"
    # In the order the failures arrived: the first is usually the cause, later ones often its consequence.
    for rank, text in failures.items():
        lines.append(f"\n--- rank {rank} ---\n{text.rstrip()}")
    return "\n".join(lines)


def _timeout_message(ranks: Sequence[int], num_ranks: int, timeout_s: float, what: str) -> str:
    noun = "rank" if len(ranks) == 1 else "ranks"
    return (
        f"timed out after {timeout_s:g} s: {noun} {_rank_list(ranks)} of {num_ranks} {what}; "
        f"all ranks have been stopped"
    )


def _stop_ranks(processes: Sequence[Any]) -> None:
    """SIGTERM every live rank, SIGKILL those still alive after TERMINATE_GRACE_S, and reap them all (bounded)."""
    alive = [process for process in processes if process.exitcode is None]
    for process in alive:
        process.terminate()
    grace_end = time.monotonic() + TERMINATE_GRACE_S
    for process in alive:
        process.join(max(0.0, grace_end - time.monotonic()))
    for process in alive:
        if process.exitcode is None:
            process.kill()
            process.join(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Rank side


def _rank_main(ctx: RankContext, payload: bytes, results_queue: Any) -> None:
    """Entry point of a rank process: run fn and report (rank, kind, pickled result | traceback | skip reason).

    fn is unpickled here rather than by multiprocessing so that an import error in fn's module is reported with
    its traceback like any other failure.
    """
    try:
        try:
            fn, args = pickle.loads(payload)
            message = (ctx.rank, _REPORT_RESULT, pickle.dumps(fn(ctx, *args)))
        except Skip as skip:
            message = (ctx.rank, _REPORT_SKIP, str(skip) or "skipped")
        except BaseException:  # SystemExit and KeyboardInterrupt too: the parent must learn how every rank ended
            message = (ctx.rank, _REPORT_ERROR, traceback.format_exc())
        results_queue.put(message)
    finally:
        # Flush the report into the pipe before the process exits; the parent relies on that order.
        results_queue.close()
        results_queue.join_thread()
