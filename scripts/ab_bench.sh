#!/usr/bin/env bash
# Benchmark several builds of deep_ep in one call on the same GPU, alternating them, so that their figures
# are comparable (a freshly started machine drifts between runs; docs/design.md section 4).
#
# Usage: scripts/ab_bench.sh [--rounds N] ARCHIVE... [-- BENCH_ARGS...]
#   ARCHIVE      a source archive of another revision (`git archive REV -o NAME.tar` in the repository root,
#                so that it travels with the working tree); the working tree itself is always built too, as "head"
#   --rounds N   how many times each build is timed, in turn (default 2)
#   BENCH_ARGS   options for `python -m deep_ep.bench` (default: --mode low_latency)
# Each build is installed into its own folder and imported through PYTHONPATH, so builds never mix.
# Prints every summary table, labelled by archive name, last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

rounds=2
archives=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        --rounds) rounds="$2"; shift ;;
        *) if [ ! -f "$1" ]; then echo "ab_bench.sh: no archive '$1'" >&2; exit 2; fi
           archives+=("$(cd "$(dirname "$1")" && pwd)/$(basename "$1")") ;;
    esac
    shift
done
if [ $# -gt 0 ]; then shift; fi
bench_args=("$@")
if [ ${#bench_args[@]} -eq 0 ]; then bench_args=(--mode low_latency); fi

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

work="$(mktemp -d /tmp/deep_ep_ab.XXXXXX)"
logdir="${OUT:-$work/logs}"
mkdir -p "$logdir" || exit 2

labels=()
install_build() {  # install_build LABEL SRC
    local log="$logdir/build_$1.log"
    if timeout 600 python3 -m pip install --no-build-isolation --no-deps --target "$work/$1" "$2" >"$log" 2>&1; then
        labels+=("$1")
    else
        echo "ab_bench.sh: building $1 failed; last lines of $log:" >&2
        tail -n 20 "$log" >&2
    fi
}
for archive in ${archives[@]+"${archives[@]}"}; do
    label="$(basename "$archive" .tar)"
    mkdir -p "$work/src_$label" && tar -xf "$archive" -C "$work/src_$label" && install_build "$label" "$work/src_$label"
done
install_build head "$PWD"

for ((round = 1; round <= rounds; round++)); do
    for label in "${labels[@]}"; do
        log="$logdir/bench_${label}_${round}.log"
        echo "=== round $round, $label: python3 -m deep_ep.bench ${bench_args[*]}"
        (cd "$work" && PYTHONPATH="$work/$label" timeout 300 python3 -m deep_ep.bench "${bench_args[@]}") \
            >"$log" 2>&1 || { echo "  failed (rc=$?); last lines:"; tail -n 15 "$log" | sed 's/^/  | /'; }
    done
done

echo
echo "================ summary (head = working tree) ================"
for ((round = 1; round <= rounds; round++)); do
    for label in "${labels[@]}"; do
        echo "--- round $round, $label"
        awk '/=== SUMMARY ===/ { text = ""; next } { text = text $0 "\n" } END { printf "%s", text }' \
            "$logdir/bench_${label}_${round}.log" 2>/dev/null
    done
done
rm -rf "$work"
