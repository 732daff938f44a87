#!/usr/bin/env bash
# The one command for the GPU machine (docs/design.md section 3): build and install deep_ep, run the GPU test suite
# and the benchmark, and print a short summary table last. Every stage runs whatever the previous ones did, so
# one call always tells as much as it can; the exit code is non-zero when any stage failed.
#
# Usage: scripts/run_gpu.sh [--tests-only | --bench-only] [--filter PATTERN] [--shard K/N] [--fresh-processes]
#   --tests-only       build, then the GPU tests (no benchmark)
#   --bench-only       build, then the benchmark (no tests)
#   --filter PATTERN   passed to tests/gpu/run_all.py as --filter (substrings of case names, comma-separated)
#   --shard K/N        passed to tests/gpu/run_all.py: part K of N of the suite (parts of similar length)
#   --fresh-processes  passed to tests/gpu/run_all.py: new rank processes for every case
# DEEP_EP_BENCH_ARGS holds options for `python -m deep_ep.bench` (e.g. "--mode internode"); DEEP_EP_BUILD_DEFINES
# holds CMake definitions for the build (e.g. "DEEP_EP_PROFILE_ROLES=ON"), each passed as -C cmake.define.NAME=VALUE.
# Logs go to $OUT when it is set, else ./build/gpu_logs. Stage time limits in seconds:
#   DEEP_EP_BUILD_TIMEOUT_S (300), DEEP_EP_TESTS_TIMEOUT_S (1800: the whole suite at 2, 4 and 8 ranks on one
#   H100 takes about 9 minutes with rank processes reused, longer with new ones per case; --shard 1/3 .. 3/3 runs
#   it in three parts of about 3 minutes each; DEEP_EP_TEST_RANKS and --filter run a part),
#   DEEP_EP_BENCH_TIMEOUT_S (300).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

run_tests=1
run_bench=1
filter=""
shard=""
fresh_processes=0
while [ $# -gt 0 ]; do
    case "$1" in
        --tests-only) run_bench=0 ;;
        --bench-only) run_tests=0 ;;
        --filter)
            if [ $# -lt 2 ]; then echo "run_gpu.sh: --filter needs a PATTERN" >&2; exit 2; fi
            filter="$2"
            shift ;;
        --filter=*) filter="${1#--filter=}" ;;
        --shard)
            if [ $# -lt 2 ]; then echo "run_gpu.sh: --shard needs K/N" >&2; exit 2; fi
            shard="$2"
            shift ;;
        --shard=*) shard="${1#--shard=}" ;;
        --fresh-processes) fresh_processes=1 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run_gpu.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$run_tests" = 0 ] && [ "$run_bench" = 0 ]; then
    echo "run_gpu.sh: --tests-only and --bench-only exclude each other" >&2
    exit 2
fi

LOGDIR="${OUT:-./build/gpu_logs}"
mkdir -p "$LOGDIR" || exit 2
LOGDIR="$(cd "$LOGDIR" && pwd)"

# NVLink multicast stays off on every machine; unbuffered Python so a killed stage still leaves its output.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The machine is offline: pip must not look for an index or for its own updates.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

BUILD_TIMEOUT_S="${DEEP_EP_BUILD_TIMEOUT_S:-300}"
TESTS_TIMEOUT_S="${DEEP_EP_TESTS_TIMEOUT_S:-1800}"
BENCH_TIMEOUT_S="${DEEP_EP_BENCH_TIMEOUT_S:-300}"

declare -A stage_status stage_seconds
for stage in build tests bench; do
    stage_status[$stage]=SKIPPED
    stage_seconds[$stage]=0
done

# A marker older than every MPS folder this run may create: only those daemons are ours to stop.
run_marker="$(mktemp /tmp/deep_ep_run_gpu.XXXXXX)"

# run_stage NAME LIMIT_S LOG COMMAND...: run with a time limit, output to LOG only, and record status and seconds.
run_stage() {
    local name="$1" limit="$2" log="$3"
    shift 3
    echo "=== $name: $* (limit ${limit} s, log $log)"
    local start=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" </dev/null >"$log" 2>&1
    rc=$?
    stage_seconds[$name]=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        stage_status[$name]=PASS
    elif { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ "${stage_seconds[$name]}" -ge "$limit" ]; then
        stage_status[$name]=TIMEOUT
    else
        stage_status[$name]="FAIL(rc=$rc)"
    fi
}

# Print the end of a failed stage's log, so the cause is visible without fetching the file.
show_failure() {
    local name="$1" log="$2"
    if [ "${stage_status[$name]}" != PASS ] && [ -f "$log" ]; then
        echo "--- $name ${stage_status[$name]}; last lines of $log:"
        tail -n 25 "$log" | sed 's/^/  | /'
    fi
    echo "=== $name: ${stage_status[$name]} in ${stage_seconds[$name]} s"
}

# A test run killed at its limit cannot stop the MPS daemon it started (the daemon left the process group).
stop_stray_mps() {
    local dir
    while IFS= read -r dir; do
        [ -e "$dir/control" ] || continue
        echo "stopping the MPS daemon left behind in $dir"
        echo quit | CUDA_MPS_PIPE_DIRECTORY="$dir" timeout 30 nvidia-cuda-mps-control >/dev/null 2>&1
        rm -rf "$dir"
    done < <(find /tmp -maxdepth 1 -name 'deep_ep_mps_*' -newer "$run_marker" 2>/dev/null)
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    timeout 30 nvidia-smi --query-gpu=index,name,memory.total,compute_mode,driver_version --format=csv,noheader
    timeout 60 python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$LOGDIR/env.log" 2>&1
sed 's/^/  /' "$LOGDIR/env.log"

build_args=()
for define in ${DEEP_EP_BUILD_DEFINES:-}; do build_args+=(-C "cmake.define.$define"); done
run_stage build "$BUILD_TIMEOUT_S" "$LOGDIR/build.log" \
    python3 -m pip install --no-build-isolation --no-deps -v ${build_args[@]+"${build_args[@]}"} .
show_failure build "$LOGDIR/build.log"

# Real clients for tests/clients (tests/clients/test_megatron.py: megatron-core): wheels fetched beforehand into
# .whl/ (git-ignored; `pip download --no-deps` on a machine with internet) are installed, offline and without
# their dependencies, into a private folder put on PYTHONPATH for the tests. A wheel whose tags do not fit this
# Python is unpacked instead (pure-Python packages run anyway). Without .whl/ those cases report SKIP.
install_client_wheels() {
    local site="${DEEP_EP_CLIENT_SITE:-/tmp/site}" wheel
    rm -rf "$site" && mkdir -p "$site" || return 1
    for wheel in .whl/*.whl; do
        if ! python3 -m pip install -q --no-index --no-deps --target "$site" "$wheel"; then
            echo "pip refused $wheel here; unpacking it into $site instead"
            python3 -m zipfile -e "$wheel" "$site" || return 1
        fi
    done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "client wheels installed in $site: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
}

if [ "$run_tests" = 1 ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        install_client_wheels || echo "installing the client wheels from .whl/ failed; client cases may SKIP"
    fi
    test_args=()
    if [ -n "$filter" ]; then test_args=(--filter "$filter"); fi
    if [ -n "$shard" ]; then test_args+=(--shard "$shard"); fi
    if [ "$fresh_processes" = 1 ]; then test_args+=(--fresh-processes); fi
    run_stage tests "$TESTS_TIMEOUT_S" "$LOGDIR/gpu_tests.log" python3 tests/gpu/run_all.py ${test_args[@]+"${test_args[@]}"}
    if [ "${stage_status[tests]}" = PASS ] && grep -q '^RESULT [^ ]* FAIL' "$LOGDIR/gpu_tests.log"; then
        stage_status[tests]=FAIL
    fi
    show_failure tests "$LOGDIR/gpu_tests.log"
    stop_stray_mps
fi

if [ "$run_bench" = 1 ]; then
    # shellcheck disable=SC2086  # DEEP_EP_BENCH_ARGS is a list of options
    run_stage bench "$BENCH_TIMEOUT_S" "$LOGDIR/bench.log" python3 -m deep_ep.bench ${DEEP_EP_BENCH_ARGS:-}
    show_failure bench "$LOGDIR/bench.log"
    stop_stray_mps
fi
rm -f "$run_marker"

echo
echo "================ deep_ep GPU run summary ================"
printf '%-8s %-14s %8s\n' stage status seconds
exit_code=0
for stage in build tests bench; do
    printf '%-8s %-14s %8s\n' "$stage" "${stage_status[$stage]}" "${stage_seconds[$stage]}"
    case "${stage_status[$stage]}" in
        PASS|SKIPPED) ;;
        *) exit_code=1 ;;
    esac
done

if [ "$run_tests" = 1 ]; then
    echo "---------------- tests ----------------"
    # RESULT <name> PASS|FAIL|SKIP <seconds> <detail>: the detail is kept, shortened, for what did not pass.
    awk '
        $1 == "RESULT" {
            detail = ""
            for (i = 5; i <= NF; i++) detail = detail (i > 5 ? " " : "") $i
            if ($3 == "PASS") detail = ""
            if (length(detail) > 70) detail = substr(detail, 1, 67) "..."
            line = sprintf("%-50s %-5s %8s", $2, $3, $4)
            print (detail == "" ? line : line "  " detail)
            count[$3]++
            total++
        }
        END {
            if (total == 0) { print "(no RESULT lines)"; exit }
            printf "%d tests: %d pass, %d fail, %d skip\n", total, count["PASS"], count["FAIL"], count["SKIP"]
        }' "$LOGDIR/gpu_tests.log" 2>/dev/null || echo "(no test log)"
fi

if [ "$run_bench" = 1 ]; then
    echo "---------------- bench ----------------"
    if grep -q '=== SUMMARY ===' "$LOGDIR/bench.log" 2>/dev/null; then
        # The lines after the last summary marker.
        awk '/=== SUMMARY ===/ { text = ""; next } { text = text $0 "\n" } END { printf "%s", text }' \
            "$LOGDIR/bench.log"
    else
        echo "(no '=== SUMMARY ===' in $LOGDIR/bench.log)"
    fi
fi
echo "logs: $LOGDIR"
exit $exit_code
