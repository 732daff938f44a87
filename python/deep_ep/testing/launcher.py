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
# What a rank's report (rank, kind, body, run id) carries: its pickled result, a traceback, or the reason of a Skip.
# The run id tells a RankPool's runs apart (launch() uses 0).
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
    payload = _run_payload(fn, args, timeout_s)
    disable_multicast()
    if num_gpus is None:
        num_gpus = visible_gpu_count()
    if num_gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")

    with _mps_for_run(num_ranks, num_gpus, use_mps):
        return _run_ranks(payload, num_ranks, num_gpus, timeout_s, dict(env or {}))


class RankPool:
    """num_ranks rank processes kept for many runs: a test suite's cases without the several seconds each process
    start costs (Python, torch and CUDA start-up, an MPS client connection).

    run(fn, args, timeout_s) has launch()'s contract: fn(ctx, *args) on every rank, results in rank order,
    RankFailure / RankTimeout / RankSkipped otherwise. Each run gets its own rendezvous port (ctx.master_port) and
    starts from the environment the processes started with. After a run that did not return on every rank the
    processes are stopped and the next run starts fresh ones, so a dead CUDA context or a rank left inside a
    collective never reaches another run. between_runs, a module-level function, is called as between_runs(ctx) on
    each rank after each run that returned there (leave a process group the run left joined, restore class-level
    settings); if it raises, the run fails. close() stops the processes and raises RankFailure when one of them
    ended badly; use the pool as a context manager.
    """

    def __init__(
        self,
        num_ranks: int,
        num_gpus: Optional[int] = None,
        use_mps: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None,
        between_runs: Optional[Callable[..., Any]] = None,
    ) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        disable_multicast()
        self.num_ranks = num_ranks
        self.num_gpus = visible_gpu_count() if num_gpus is None else num_gpus
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        self._env = dict(env or {})
        self._between_runs = None if between_runs is None else pickle.dumps((between_runs, ()))
        self._mps = contextlib.ExitStack()
        self._mps.enter_context(_mps_for_run(num_ranks, self.num_gpus, use_mps))
        self._processes: List[Any] = []
        self._tasks: List[Any] = []
        self._results: Any = None
        self._next_run_id = 1

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if exc_info[0] is None:
            self.close()
        else:  # the error in flight is the one to see
            self.terminate()

    def run(self, fn: Callable[..., Any], args: Sequence[Any] = (), timeout_s: float = 300.0) -> List[Any]:
        payload = _run_payload(fn, args, timeout_s)
        if not self._processes:
            self._start()
        run_id, self._next_run_id = self._next_run_id, self._next_run_id + 1
        master_port = _free_port()
        for tasks in self._tasks:
            tasks.put((run_id, master_port, payload, self._between_runs))
        try:
            return _collect_reports(
                self._processes, self._results, time.monotonic() + timeout_s, timeout_s, run_id=run_id
            )
        except BaseException:
            self._stop(graceful=False)
            raise

    def terminate(self) -> None:
        """Stop the processes at once, without asking or checking (an error is already on its way)."""
        try:
            self._stop(graceful=False)
        finally:
            self._mps.close()

    def close(self) -> None:
        try:
            crashed = self._stop(graceful=True)
        finally:
            self._mps.close()
        if crashed:
            raise RankFailure(_failure_message(crashed, [], self.num_ranks), crashed, [])

    def _start(self) -> None:
        mp_context = multiprocessing.get_context("spawn")
        self._results = mp_context.Queue()
        for rank in range(self.num_ranks):
            ctx = RankContext(
                rank=rank,
                num_ranks=self.num_ranks,
                device=rank % self.num_gpus if self.num_gpus > 0 else None,
                num_gpus=self.num_gpus,
            )
            tasks = mp_context.Queue()
            process = mp_context.Process(
                target=_pool_rank_main, args=(ctx, tasks, self._results), name=f"deep_ep-pool-rank{rank}"
            )
            with _patched_environ(_rank_environ(ctx, self._env)):
                process.start()
            self._processes.append(process)
            self._tasks.append(tasks)

    def _stop(self, graceful: bool) -> Dict[int, str]:
        """Stop the processes (asking them to leave first when graceful); the ranks whose process ended badly."""
        crashed: Dict[int, str] = {}
        if graceful and self._processes:
            for tasks in self._tasks:
                tasks.put(None)
            grace_end = time.monotonic() + TERMINATE_GRACE_S
            for process in self._processes:
                process.join(max(0.0, grace_end - time.monotonic()))
            for rank, process in enumerate(self._processes):
                if process.exitcode is None:
                    crashed[rank] = "did not leave the pool when asked; stopped"
                elif process.exitcode != 0:
                    crashed[rank] = _describe_exit(process.exitcode, reported=True)
        _stop_ranks(self._processes)
        for q in self._tasks + ([self._results] if self._results is not None else []):
            q.close()
        self._processes, self._tasks, self._results = [], [], None
        return crashed


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


def _run_payload(fn: Callable[..., Any], args: Sequence[Any], timeout_s: float) -> bytes:
    """fn and args pickled for the ranks, after checking the run's arguments."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    try:
        return pickle.dumps((fn, tuple(args)))
    except Exception as error:
        raise TypeError(
            f"fn and args must be picklable to reach spawned ranks (use a module-level function): {error!r}"
        ) from error


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
    """Wait for every rank's report and exit; raise RankFailure / RankTimeout as soon as the outcome is known."""
    results = _collect_reports(processes, results_queue, deadline, timeout_s, run_id=0)

    # Every rank returned. A process that then crashes on its way out (a destructor, a driver teardown) is a bug
    # worth hearing about too.
    num_ranks = len(processes)
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
    return results


def _collect_reports(
    processes: Sequence[Any], results_queue: Any, deadline: float, timeout_s: float, run_id: int
) -> List[Any]:
    """Wait for every rank's report of run `run_id`; raise RankFailure / RankTimeout / RankSkipped as soon as the
    outcome is known, else return the results in rank order.

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
            rank, status, body, report_run = results_queue.get(timeout=POLL_INTERVAL_S)
        except queue_module.Empty:
            pass
        else:
            if report_run != run_id:  # cannot happen: a pool whose run failed is replaced, reports and all
                continue
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


def _run_one(ctx: RankContext, payload: bytes, run_id: int) -> tuple:
    """Run fn(ctx, *args) from its pickled form; the report (rank, kind, pickled result | traceback | skip reason,
    run id).

    fn is unpickled here rather than by multiprocessing so that an import error in fn's module is reported with
    its traceback like any other failure.
    """
    try:
        fn, args = pickle.loads(payload)
        return (ctx.rank, _REPORT_RESULT, pickle.dumps(fn(ctx, *args)), run_id)
    except Skip as skip:
        return (ctx.rank, _REPORT_SKIP, str(skip) or "skipped", run_id)
    except BaseException:  # SystemExit and KeyboardInterrupt too: the parent must learn how every rank ended
        return (ctx.rank, _REPORT_ERROR, traceback.format_exc(), run_id)


def _rank_main(ctx: RankContext, payload: bytes, results_queue: Any) -> None:
    """Entry point of a rank process of launch(): run fn once and report."""
    try:
        results_queue.put(_run_one(ctx, payload, 0))
    finally:
        # Flush the report into the pipe before the process exits; the parent relies on that order.
        results_queue.close()
        results_queue.join_thread()


def _pool_rank_main(ctx: RankContext, tasks: Any, results_queue: Any) -> None:
    """Entry point of a RankPool rank: run the functions sent in `tasks` ((run id, master port, payload,
    between-runs payload) or None to stop) one after another, each with the environment the process started
    with and its own rendezvous port."""
    start_environ = dict(os.environ)
    parent = os.getppid()
    try:
        while True:
            try:
                task = tasks.get(timeout=POLL_INTERVAL_S * 20)
            except queue_module.Empty:
                if os.getppid() != parent:  # the launching process died without stopping the pool
                    return
                continue
            if task is None:
                return
            run_id, master_port, payload, between_runs = task
            run_ctx = dataclasses.replace(ctx, master_port=master_port)
            os.environ["MASTER_PORT"] = str(master_port)
            message = _run_one(run_ctx, payload, run_id)
            if message[1] == _REPORT_RESULT and between_runs is not None:
                # The next run must not inherit this one's state (a process group left joined, class settings).
                cleanup = _run_one(run_ctx, between_runs, run_id)
                if cleanup[1] != _REPORT_RESULT:
                    message = (ctx.rank, _REPORT_ERROR, "after the run, between_runs failed:\n" + cleanup[2], run_id)
            os.environ.clear()
            os.environ.update(start_environ)
            results_queue.put(message)
    finally:
        results_queue.close()
        results_queue.join_thread()
