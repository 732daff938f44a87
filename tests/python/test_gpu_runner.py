"""tests/gpu/run_all.py's exit status and output, over stand-in cases and a stand-in launcher (neither torch nor a
GPU needed): a run in which no case ran (no CUDA device, a filter that matches nothing, every case skipped) exits
non-zero with a message saying why, --list exits 0, and the RESULT lines and the summary keep their format
(scripts/run_gpu.sh reads them)."""

import importlib.util
import pathlib
import re
import sys

import pytest

import deep_ep.testing as testing

RUN_ALL = pathlib.Path(__file__).resolve().parents[1] / "gpu" / "run_all.py"
RESULT_LINE = re.compile(r"^RESULT (\S+) (PASS|FAIL|SKIP) (\d+\.\d) ?(.*)$")
CASES = ["intranode/r2", "intranode/r4", "low_latency/r2"]


@pytest.fixture
def run(monkeypatch):
    """run(argv, gpus=1, outcome=None) -> (exit status, stdout, stderr): run_all.main() over CASES, with
    outcome(name) deciding each launched case (None: it passes; otherwise an exception launch raises)."""
    # run_all puts tests/gpu and tests/clients first on sys.path: keep that out of this process' later imports.
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("deep_ep_gpu_run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def invoke(capsys, argv, gpus=1, outcome=None, ranks_from_names=False):
        launched = []
        pools = []  # ("new", num_ranks) / ("close", num_ranks) events of the stand-in pools

        def launch(fn, num_ranks, args=(), timeout_s=None, num_gpus=None):
            name = args[0] if args else None
            launched.append(name)
            error = outcome(name) if outcome is not None else None
            if error is not None:
                raise error
            return [None] * num_ranks

        class Pool:
            def __init__(self, num_ranks, num_gpus):
                self.num_ranks = num_ranks
                pools.append(("new", num_ranks))

            def run(self, fn, args=(), timeout_s=None):
                return launch(fn, self.num_ranks, args, timeout_s)

            def close(self):
                pools.append(("close", self.num_ranks))

            def terminate(self):
                pools.append(("terminate", self.num_ranks))

        # The stand-in cases carry their name as their argument, so the launcher knows which one it runs.
        def num_ranks(name):  # 1 unless asked: more ranks than GPUs would start an MPS daemon
            return int(name.rsplit("/r", 1)[1]) if ranks_from_names else 1

        monkeypatch.setattr(
            module,
            "collect",
            lambda rank_counts: [(name, lambda ctx, n: None, num_ranks(name), (name,), 60.0) for name in CASES],
        )
        monkeypatch.setattr(testing, "visible_gpu_count", lambda: gpus)
        monkeypatch.setattr(testing, "launch", launch)
        monkeypatch.setattr(module, "new_pool", Pool)
        monkeypatch.setattr(sys, "argv", ["run_all.py", *argv])
        status = module.main()
        out, err = capsys.readouterr()
        invoke.pools = pools
        return status, out, err, launched

    return invoke


def _results(out):
    return [RESULT_LINE.match(line).groups() for line in out.splitlines() if line.startswith("RESULT ")]


def _summary_counts(out):
    assert "=== GPU TEST SUMMARY ===" in out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"(\d+) passed, (\d+) failed, (\d+) skipped", last)
    assert match, f"the summary's last line is {last!r}"
    return tuple(int(n) for n in match.groups())


def test_list_exits_zero_even_when_the_filter_matches_nothing(run, capsys):
    status, out, _, launched = run(capsys, ["--list"])
    assert status == 0 and out.split() == CASES and launched == []
    status, out, _, launched = run(capsys, ["--list", "--filter", "no-such-case"])
    assert status == 0 and out == "" and launched == []


def test_filter_matching_nothing_fails_naming_the_filter(run, capsys):
    status, out, err, launched = run(capsys, ["--filter", "no-such-case"])
    assert status == 2 and launched == []
    assert "no GPU case ran" in err and "no-such-case" in err
    assert _results(out) == [] and _summary_counts(out) == (0, 0, 0)


def test_no_cuda_device_reports_every_case_skipped_and_fails(run, capsys):
    status, out, err, launched = run(capsys, [], gpus=0)
    assert status == 2 and launched == []
    assert "no GPU case ran" in err and "no CUDA device" in err
    assert [(name, state) for name, state, _, _ in _results(out)] == [(name, "SKIP") for name in CASES]
    assert all(detail == "no CUDA device" for *_, detail in _results(out))
    assert _summary_counts(out) == (0, 0, 3)


def test_every_case_passing_exits_zero(run, capsys):
    status, out, err, launched = run(capsys, ["--filter", "intranode"])
    assert status == 0 and launched == CASES[:2] and err == ""
    assert [(name, state) for name, state, _, _ in _results(out)] == [(name, "PASS") for name in CASES[:2]]
    assert _summary_counts(out) == (2, 0, 0)


def test_a_failed_case_exits_one(run, capsys):
    def outcome(name):
        return testing.RankFailure("rank 1 raised AssertionError") if name == "intranode/r4" else None

    status, out, _, _ = run(capsys, [], outcome=outcome)
    assert status == 1
    assert [state for _, state, _, _ in _results(out)] == ["PASS", "FAIL", "PASS"]
    assert _summary_counts(out) == (2, 1, 0)


def test_every_case_skipped_fails_and_a_skip_next_to_a_pass_does_not(run, capsys):
    status, out, err, _ = run(capsys, [], outcome=lambda name: testing.RankSkipped("megatron-core is missing"))
    assert status == 2 and "no GPU case ran" in err and "3 case(s) skipped" in err
    assert _summary_counts(out) == (0, 0, 3)

    def outcome(name):
        return testing.RankSkipped("megatron-core is missing") if name == "low_latency/r2" else None

    status, out, err, _ = run(capsys, [], outcome=outcome)
    assert status == 0 and err == ""
    assert _results(out)[-1][:2] == ("low_latency/r2", "SKIP") and _results(out)[-1][3] == "megatron-core is missing"
    assert _summary_counts(out) == (2, 0, 1)


def test_cases_of_one_rank_count_share_a_pool_and_a_failure_replaces_it(run, capsys):
    status, out, _, launched = run(capsys, [], gpus=4, ranks_from_names=True)
    # Grouped by rank count (module order within it): one pool per rank count, closed after its cases.
    assert status == 0 and launched == ["intranode/r2", "low_latency/r2", "intranode/r4"]
    assert run.pools == [("new", 2), ("close", 2), ("new", 4), ("close", 4)]

    status, out, _, _ = run(
        capsys,
        ["--filter", "intranode"],
        gpus=4,
        ranks_from_names=True,
        outcome=lambda name: testing.RankFailure("rank 0 raised") if name == "intranode/r2" else None,
    )
    assert status == 1 and [state for _, state, _, _ in _results(out)] == ["FAIL", "PASS"]


def test_fresh_processes_launch_every_case_on_its_own(run, capsys):
    status, _, _, launched = run(capsys, ["--fresh-processes"], gpus=4, ranks_from_names=True)
    assert status == 0 and launched == ["intranode/r2", "low_latency/r2", "intranode/r4"] and run.pools == []


def test_shards_split_the_grouped_order_round_robin_and_cover_every_case(run, capsys):
    parts = []
    for shard in ("1/2", "2/2"):
        status, out, _, launched = run(capsys, ["--shard", shard], gpus=4, ranks_from_names=True)
        assert status == 0 and [name for name, *_ in _results(out)] == launched
        parts.append(launched)
    assert parts == [["intranode/r2", "intranode/r4"], ["low_latency/r2"]]
    # More parts than cases: an empty part tested nothing, so it fails and says why.
    status, _, err, launched = run(capsys, ["--shard", "3/3", "--filter", "intranode"])
    assert status == 2 and launched == [] and "no GPU case ran" in err and "--shard 3/3" in err


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_a_usage_error_naming_the_argument(run, capsys, shard):
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, ["--shard", shard])
    assert exit_info.value.code == 2
    assert "--shard expects K/N" in capsys.readouterr().err
