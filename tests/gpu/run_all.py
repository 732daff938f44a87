"""GPU test suite runner: every test function runs on N ranks (one process each) sharing the GPUs
present, under one private MPS daemon for the whole suite. Prints `RESULT <name> PASS|FAIL|SKIP
<seconds> <detail>` per test and a summary table last (SKIP: no GPU, or a rank raised
deep_ep.testing.Skip). Collects tests/gpu and tests/clients. Needs torch and a CUDA device; no pytest.

    python3 tests/gpu/run_all.py [--filter SUBSTRING[,SUBSTRING...]] [--ranks 2,4,8] [--shard K/N] [--list]
                                 [--fresh-processes]

Cases run grouped by rank count (in module order within a count), and the cases of one rank count run one after
another on the same rank processes (deep_ep.testing.RankPool: each case from the processes' starting environment,
with common.between_cases after it; after a failed case, new processes), which saves the start-up of a process
per rank and case. --fresh-processes starts new processes for every case. --shard K/N runs the K-th of N parts
(every N-th case of that order, from the K-th): the parts take similar time, so a suite longer than one sitting
runs as N calls.

Exit status: 0 when every case that ran passed; 1 when a case failed; 2 when no case ran at all (no CUDA
device, the filter matched no case, or every case skipped), since a run that tested nothing must not pass.
--list prints the matching case names and exits 0, even when none match.
"""

import argparse
import contextlib
import importlib
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
# tests/clients: real clients' call patterns (Megatron-core, vLLM, SGLang); its cases are named clients/...
CLIENTS = os.path.join(os.path.dirname(HERE), "clients")
sys.path.insert(0, CLIENTS)
sys.path.insert(0, HERE)

MODULES = [
    "test_foundation",
    "test_intranode",
    "test_internode",
    "test_low_latency",
    "test_megatron",
    "test_vllm",
    "test_sglang",
]

EXIT_FAILED = 1  # a case failed
EXIT_NOTHING_RAN = 2  # no case ran: no CUDA device, nothing matched --filter, or every case skipped


def collect(rank_counts):
    """(name, fn, num_ranks, args, timeout_s) for every case of every module that exists."""
    cases = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        for case in module.cases(rank_counts):
            cases.append(case)
    return cases


def new_pool(num_ranks, num_gpus):
    """The rank processes for a run of cases of num_ranks ranks (common.between_cases after each case)."""
    from common import between_cases
    from deep_ep.testing import RankPool

    return RankPool(num_ranks, num_gpus=num_gpus, between_runs=between_cases)


def parse_shard(parser, text):
    """(K, N) of a --shard K/N argument, or a usage error naming what was expected."""
    try:
        shard, num_shards = (int(v) for v in text.split("/"))
    except ValueError:
        parser.error(f"--shard expects K/N with integers 1 <= K <= N, got {text!r}")
    if not 1 <= shard <= num_shards:
        parser.error(f"--shard expects K/N with 1 <= K <= N, got {text!r}")
    return shard, num_shards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--filter",
        default="",
        help="run only tests whose name contains this substring, or one of several given "
        "comma-separated (intranode/r8,internode/2x8)",
    )
    parser.add_argument(
        "--ranks",
        default=os.environ.get("DEEP_EP_TEST_RANKS", "2,4,8"),
        help="comma-separated rank counts (default: $DEEP_EP_TEST_RANKS or 2,4,8)",
    )
    parser.add_argument(
        "--shard",
        default="",
        metavar="K/N",
        help="run only part K of N (1 <= K <= N): every N-th selected case, from the K-th",
    )
    parser.add_argument("--list", action="store_true")
    parser.add_argument(
        "--fresh-processes", action="store_true", help="new rank processes for every case (no process reuse)"
    )
    args = parser.parse_args()

    from deep_ep.testing import MpsDaemon, RankFailure, RankSkipped, launch, visible_gpu_count

    rank_counts = [int(r) for r in args.ranks.split(",") if r]
    patterns = args.filter.split(",")
    cases = [c for c in collect(rank_counts) if any(p in c[0] for p in patterns)]
    cases.sort(key=lambda case: case[2])  # stable: one pool per rank count, module order within it
    num_selected = len(cases)
    if args.shard:
        shard, num_shards = parse_shard(parser, args.shard)
        cases = cases[shard - 1 :: num_shards]
    if args.list:
        for c in cases:
            print(c[0])
        return 0
    if not cases:
        print_summary([])
        why = (
            f"part --shard {args.shard} of the {num_selected} selected case(s) is empty"
            if num_selected
            else f"no case name matches --filter {args.filter!r} (see --list)"
        )
        print(f"run_all: no GPU case ran: {why}", file=sys.stderr, flush=True)
        return EXIT_NOTHING_RAN
    num_gpus = visible_gpu_count()
    results = []
    if num_gpus == 0:
        for name, *_ in cases:
            print(f"RESULT {name} SKIP 0.0 no CUDA device", flush=True)
            results.append((name, "SKIP", 0.0))
        print_summary(results)
        print(
            f"run_all: no GPU case ran: no CUDA device is visible (torch missing, built without CUDA, or "
            f"CUDA_VISIBLE_DEVICES empty); {len(cases)} case(s) skipped",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_NOTHING_RAN
    needs_mps = any(c[2] > num_gpus for c in cases)
    daemon = MpsDaemon() if needs_mps else None
    pool = None  # the rank processes of the current rank count, reused from case to case

    def close_pool(after_case):
        nonlocal pool
        if pool is None:
            return
        try:
            pool.close()
        except RankFailure as error:  # a rank process ended badly after its last case returned
            print(f"RESULT {after_case}/process_exit FAIL 0.0 {str(error).splitlines()[0]}", flush=True)
            print(str(error), flush=True)
            results.append((f"{after_case}/process_exit", "FAIL", 0.0))
        pool = None

    with daemon if daemon is not None else contextlib.nullcontext(), contextlib.ExitStack() as on_error:
        # Interrupted (Ctrl-C, a runner's time limit): the pool's processes must not outlive the suite.
        on_error.callback(lambda: pool is not None and pool.terminate())
        previous = None
        for name, fn, num_ranks, fn_args, timeout_s in cases:
            if pool is not None and pool.num_ranks != num_ranks:
                close_pool(previous)
            if pool is None and not args.fresh_processes:
                pool = new_pool(num_ranks, num_gpus)
            previous = name
            start = time.time()
            try:
                if pool is not None:
                    pool.run(fn, args=fn_args, timeout_s=timeout_s)
                else:
                    launch(fn, num_ranks, args=fn_args, timeout_s=timeout_s, num_gpus=num_gpus)
                status, detail = "PASS", ""
            except RankFailure as error:
                status, detail = "FAIL", str(error)
            except RankSkipped as error:  # a rank raised deep_ep.testing.Skip (e.g. an optional client missing)
                status, detail = "SKIP", str(error)
            except Exception:  # the launcher itself failed
                status, detail = "FAIL", traceback.format_exc()
            seconds = time.time() - start
            first_line = detail.strip().splitlines()[-1][:200] if detail.strip() else ""
            print(f"RESULT {name} {status} {seconds:.1f} {first_line}", flush=True)
            if status == "FAIL":
                print(detail, flush=True)
            results.append((name, status, seconds))
            if status == "FAIL" and daemon is not None:
                # A rank that crashed mid-kernel can leave the MPS server refusing new clients ("busy or
                # unavailable"): the next case starts with a fresh daemon (and the pool with new processes).
                print("restarting the MPS daemon after a failed case", flush=True)
                close_pool(name)
                daemon.stop()
                daemon.start()
        close_pool(previous)

    print_summary(results)
    if any(r[1] == "FAIL" for r in results):
        return EXIT_FAILED
    if not any(r[1] == "PASS" for r in results):
        print(f"run_all: no GPU case ran: all {len(results)} case(s) skipped", file=sys.stderr, flush=True)
        return EXIT_NOTHING_RAN
    return 0


def print_summary(results):
    """The summary table of (name, PASS|FAIL|SKIP, seconds) results and the count line."""
    passed = sum(1 for r in results if r[1] == "PASS")
    failed = sum(1 for r in results if r[1] == "FAIL")
    skipped = sum(1 for r in results if r[1] == "SKIP")
    print("\n=== GPU TEST SUMMARY ===")
    for name, status, seconds in results:
        print(f"{status:5s} {seconds:7.1f}s  {name}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
