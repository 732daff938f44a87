"""Tests of the multi-rank launcher with CPU-only rank functions: they need neither a GPU nor torch.

Functions run by ranks are module-level because spawned processes import them by name.
"""

import importlib.util
import multiprocessing
import os
import pathlib
import sys
import time

import pytest

try:
    from deep_ep.testing import launcher, mps
except (ImportError, OSError):
    # The package is not installed, or its compiled extension is not built: load the two stdlib-only modules from
    # the source tree as top-level modules. Their folder goes on sys.path so spawned ranks import them the same way.
    _TESTING_DIR = pathlib.Path(__file__).resolve().parents[2] / "python" / "deep_ep" / "testing"
    sys.path.insert(0, str(_TESTING_DIR))

    def _load(name):
        if name in sys.modules:  # a spawned rank has already imported it to reach its entry point
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, _TESTING_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    mps = _load("mps")
    launcher = _load("launcher")

ENV_NAMES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "DEEP_EP_TEST_EXTRA",
    *launcher.MULTICAST_OFF_ENV,
)


def _report_rank(ctx, tag):
    # Later ranks finish first, so the result order can only come from the launcher.
    time.sleep(0.05 * (ctx.num_ranks - ctx.rank))
    return {"ctx": ctx, "tag": tag, "pid": os.getpid(), "env": {name: os.environ.get(name) for name in ENV_NAMES}}


def _raise_on_rank(ctx, failing_rank):
    if ctx.rank == failing_rank:
        raise ValueError(f"rank {ctx.rank} refuses to run")
    time.sleep(120)


def _exit_on_rank_zero(ctx):
    if ctx.rank == 0:
        os._exit(3)
    time.sleep(120)


def _sleep_on_rank_one(ctx):
    if ctx.rank == 1:
        while True:
            time.sleep(1)
    return ctx.rank


def _return_unpicklable(ctx):
    return lambda: ctx.rank


def _skip_on_ranks(ctx, skipping_ranks, others):
    if ctx.rank in skipping_ranks:
        if others == "fail":  # let the failure arrive first: a skip ends the run soon after it arrives
            time.sleep(3)
        raise launcher.Skip(f"rank {ctx.rank} lacks an optional package")
    if others == "wait":  # a collective the skipping rank never joins
        time.sleep(120)
    if others == "fail":
        raise ValueError(f"rank {ctx.rank} fails")
    return ctx.rank


@pytest.fixture(autouse=True)
def no_outside_mps(monkeypatch):
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_launch_returns_results_in_rank_order_with_rank_environment(num_ranks):
    results = launcher.launch(
        _report_rank,
        num_ranks,
        args=("hello",),
        timeout_s=60,
        num_gpus=0,
        env={"DEEP_EP_TEST_EXTRA": "x", "NCCL_NVLS_ENABLE": "1"},
    )

    assert len(results) == num_ranks
    assert len({result["pid"] for result in results}) == num_ranks
    ports = {result["env"]["MASTER_PORT"] for result in results}
    assert len(ports) == 1 and int(ports.pop()) == results[0]["ctx"].master_port > 0
    for rank, result in enumerate(results):
        ctx = result["ctx"]
        assert (ctx.rank, ctx.num_ranks, ctx.device, ctx.num_gpus) == (rank, num_ranks, None, 0)
        assert result["tag"] == "hello"
        env = result["env"]
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == str(num_ranks)
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["DEEP_EP_TEST_EXTRA"] == "x"


def test_multicast_stays_off_in_ranks_and_in_the_launching_process():
    results = launcher.launch(_report_rank, 1, args=(None,), timeout_s=60, num_gpus=0, env={"NCCL_NVLS_ENABLE": "1"})
    expected = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    for name, value in expected.items():
        assert results[0]["env"][name] == value
        assert os.environ[name] == value


def test_rank_exception_fails_the_run_and_stops_the_other_ranks():
    start = time.monotonic()
    with pytest.raises(launcher.RankFailure) as caught:
        launcher.launch(_raise_on_rank, 3, args=(1,), timeout_s=60, num_gpus=0)

    assert time.monotonic() - start < 30
    assert not isinstance(caught.value, launcher.RankTimeout)
    message = str(caught.value)
    assert "rank 1 of 3 failed" in message
    assert "Traceback" in message and "ValueError: rank 1 refuses to run" in message
    assert set(caught.value.failures) == {1}
    assert caught.value.unfinished == [0, 2]
    assert multiprocessing.active_children() == []


def test_rank_exiting_without_a_result_fails_the_run_with_its_exit_code():
    with pytest.raises(launcher.RankFailure) as caught:
        launcher.launch(_exit_on_rank_zero, 2, timeout_s=60, num_gpus=0)

    message = str(caught.value)
    assert "rank 0 of 2 failed" in message
    assert "exit code 3" in message and "without reporting a result" in message
    assert multiprocessing.active_children() == []


def test_hanging_rank_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(launcher.RankTimeout) as caught:
        launcher.launch(_sleep_on_rank_one, 2, timeout_s=3, num_gpus=0)

    assert time.monotonic() - start < 3 + launcher.TERMINATE_GRACE_S + 5
    assert isinstance(caught.value, launcher.RankFailure)
    assert 1 in caught.value.unfinished
    assert "timed out after 3 s" in str(caught.value) and "1" in str(caught.value)
    assert multiprocessing.active_children() == []


def test_skip_on_every_rank_reports_the_reason():
    with pytest.raises(launcher.RankSkipped) as caught:
        launcher.launch(_skip_on_ranks, 2, args=((0, 1), "return"), timeout_s=60, num_gpus=0)
    assert not isinstance(caught.value, launcher.RankFailure)
    assert set(caught.value.skipped) == {0, 1}
    assert "lacks an optional package" in caught.value.reason and "lacks an optional package" in str(caught.value)
    assert multiprocessing.active_children() == []


def test_skip_on_one_rank_stops_the_others_soon_and_reports_a_skip():
    start = time.monotonic()
    with pytest.raises(launcher.RankSkipped) as caught:
        launcher.launch(_skip_on_ranks, 3, args=((1,), "wait"), timeout_s=60, num_gpus=0)
    assert time.monotonic() - start < 30
    assert set(caught.value.skipped) == {1} and "rank 1" in str(caught.value)
    assert multiprocessing.active_children() == []


def test_a_failure_outweighs_a_skip():
    with pytest.raises(launcher.RankFailure) as caught:
        launcher.launch(_skip_on_ranks, 2, args=((0,), "fail"), timeout_s=60, num_gpus=0)
    assert set(caught.value.failures) == {1} and "ValueError: rank 1 fails" in str(caught.value)


def test_unpicklable_result_is_reported_as_a_rank_failure():
    with pytest.raises(launcher.RankFailure) as caught:
        launcher.launch(_return_unpicklable, 1, timeout_s=60, num_gpus=0)
    assert "rank 0 of 1 failed" in str(caught.value)


def test_unpicklable_function_is_refused_before_spawning():
    with pytest.raises(TypeError, match="picklable"):
        launcher.launch(lambda ctx: None, 2, num_gpus=0)


def test_mps_daemon_without_control_binary_raises_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvidia-cuda-mps-control"):
        with mps.MpsDaemon():
            pass
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    with pytest.raises(RuntimeError, match="nvidia-cuda-mps-control"):
        launcher.launch(_report_rank, 2, args=(None,), num_gpus=1, use_mps=True)


def test_ranks_sharing_a_gpu_without_mps_tools_still_run_round_robin(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(UserWarning, match="time-sliced"):
        results = launcher.launch(_report_rank, 3, args=(None,), timeout_s=60, num_gpus=2)
    assert [result["ctx"].device for result in results] == [0, 1, 0]


# ---- RankPool: many runs on the same processes ----------------------------------------------------------------

_CLEANUPS = {"count": 0}


def _leave_a_mark(ctx, value):
    os.environ["DEEP_EP_TEST_LEFT_BEHIND"] = value
    return {
        "pid": os.getpid(),
        "port": ctx.master_port,
        "env_port": os.environ.get("MASTER_PORT"),
        "seen": os.environ.get("DEEP_EP_TEST_SEEN"),
        "cleanups": _CLEANUPS["count"],
    }


def _report_leftovers(ctx):
    return {"pid": os.getpid(), "left": os.environ.get("DEEP_EP_TEST_LEFT_BEHIND"), "cleanups": _CLEANUPS["count"]}


def _count_cleanup(ctx):
    _CLEANUPS["count"] += 1


def _fail_cleanup(ctx):
    raise RuntimeError(f"rank {ctx.rank} could not clean up")


def test_pool_runs_many_functions_on_the_same_processes_each_from_a_clean_environment():
    with launcher.RankPool(3, num_gpus=0, env={"DEEP_EP_TEST_SEEN": "yes"}, between_runs=_count_cleanup) as pool:
        first = pool.run(_leave_a_mark, args=("first",), timeout_s=60)
        second = pool.run(_report_leftovers, timeout_s=60)
        third = pool.run(_leave_a_mark, args=("third",), timeout_s=60)
    assert [r["pid"] for r in first] == [r["pid"] for r in second] == [r["pid"] for r in third]
    assert len({r["pid"] for r in first}) == 3
    # Every run has its own rendezvous port, in ctx and in MASTER_PORT alike, and the pool's environment.
    assert len({r["port"] for r in first}) == 1 and first[0]["port"] != third[0]["port"]
    assert all(r["env_port"] == str(r["port"]) and r["seen"] == "yes" for r in first + third)
    # What a run set in os.environ is gone for the next; between_runs ran after each run that returned.
    assert [r["left"] for r in second] == [None] * 3
    assert [r["cleanups"] for r in first] == [0] * 3
    assert [r["cleanups"] for r in second] == [1] * 3
    assert [r["cleanups"] for r in third] == [2] * 3
    assert multiprocessing.active_children() == []


def test_pool_replaces_its_processes_after_a_failed_run():
    with launcher.RankPool(2, num_gpus=0) as pool:
        before = pool.run(_report_leftovers, timeout_s=60)
        with pytest.raises(launcher.RankFailure) as caught:
            pool.run(_raise_on_rank, args=(1,), timeout_s=60)
        assert "ValueError: rank 1 refuses to run" in str(caught.value)
        after = pool.run(_report_leftovers, timeout_s=60)
    assert {r["pid"] for r in before}.isdisjoint(r["pid"] for r in after)
    assert multiprocessing.active_children() == []


def test_pool_kills_a_hanging_run_at_its_timeout_and_goes_on():
    start = time.monotonic()
    with launcher.RankPool(2, num_gpus=0) as pool:
        with pytest.raises(launcher.RankTimeout) as caught:
            pool.run(_sleep_on_rank_one, timeout_s=3)
        assert caught.value.unfinished == [1]
        assert [r["left"] for r in pool.run(_report_leftovers, timeout_s=60)] == [None, None]
    assert time.monotonic() - start < 60
    assert multiprocessing.active_children() == []


def test_pool_reports_skips_and_a_failing_between_runs():
    with launcher.RankPool(2, num_gpus=0, between_runs=_fail_cleanup) as pool:
        with pytest.raises(launcher.RankSkipped):
            pool.run(_skip_on_ranks, args=((0, 1), "return"), timeout_s=60)
        with pytest.raises(launcher.RankFailure) as caught:
            pool.run(_report_leftovers, timeout_s=60)
        assert "between_runs failed" in str(caught.value) and "could not clean up" in str(caught.value)
    assert multiprocessing.active_children() == []


def test_pool_close_reports_a_rank_that_died_between_runs():
    pool = launcher.RankPool(2, num_gpus=0)
    pool.run(_report_leftovers, timeout_s=60)
    pool._processes[1].kill()  # as a crash after its run returned would
    pool._processes[1].join(10)
    with pytest.raises(launcher.RankFailure) as caught:
        pool.close()
    assert "rank 1 of 2 failed" in str(caught.value)
    assert multiprocessing.active_children() == []


def _start_pool_and_vanish(result_path):
    # A launching process that dies without closing its pool: the pool's ranks must not wait for work forever.
    pool = launcher.RankPool(2, num_gpus=0)
    pids = [r["pid"] for r in pool.run(_report_leftovers, timeout_s=60)]
    pathlib.Path(result_path).write_text(" ".join(str(pid) for pid in pids))
    os._exit(0)


def test_pool_ranks_leave_when_the_launching_process_dies(tmp_path):
    result_path = tmp_path / "pids"
    parent = multiprocessing.get_context("spawn").Process(target=_start_pool_and_vanish, args=(str(result_path),))
    parent.start()
    parent.join(60)
    pids = [int(pid) for pid in result_path.read_text().split()]
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in pids if _process_exists(pid)]
    assert alive == [], f"pool ranks {alive} outlived their launching process"


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
