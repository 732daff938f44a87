#!/usr/bin/env bash
# Benchmark several builds of deep_ep in one call on the same GPU, alternating them, so that their figures
# are comparable (a freshly started machine drifts between runs; docs/design.md section 4).
#
# Usage: scripts/ab_bench.sh [--rounds N] [--env 'NAME:VAR=VALUE [VAR=VALUE...]']... ARCHIVE... [-- BENCH_ARGS...]
#   ARCHIVE      a source archive of another revision (`git archive REV -o NAME.tar` in the repository root,
#                so that it travels with the working tree); the working tree itself is always built too, as "head"
#   --rounds N   how many times each build is timed, in turn (default 2)
#   --env        the working tree's build once more per round with these environment settings (separated by
#                spaces), as "head+NAME"; e.g. --env ring:DEEP_EP_INTERNODE_OWN_NODE_PUSH=0
#   BENCH_ARGS   options for `python -m deep_ep.bench` (default: --mode low_latency)
# Each build is installed into its own folder (in parallel) and imported through PYTHONPATH, so builds never mix.
# Prints every summary table, labelled by archive name, last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

rounds=2
archives=()
env_variants=()  # NAME:VAR=VALUE [VAR=VALUE...]
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        --rounds) rounds="$2"; shift ;;
        --env) if [[ "$2" != *:*=* ]]; then echo "ab_bench.sh: --env takes NAME:VAR=VALUE, got '$2'" >&2; exit 2; fi
               env_variants+=("$2"); shift ;;
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

# Builds run side by side (each with a share of the cores); a label is kept only if its build succeeded.
build_labels=() build_pids=()
start_build() {  # start_build LABEL SRC
    timeout 600 python3 -m pip install --no-build-isolation --no-deps --target "$work/$1" "$2" \
        >"$logdir/build_$1.log" 2>&1 &
    build_labels+=("$1")
    build_pids+=($!)
}
for archive in ${archives[@]+"${archives[@]}"}; do
    label="$(basename "$archive" .tar)"
    mkdir -p "$work/src_$label" && tar -xf "$archive" -C "$work/src_$label" && start_build "$label" "$work/src_$label"
done
start_build head "$PWD"
labels=()
for i in "${!build_pids[@]}"; do
    label="${build_labels[$i]}"
    if wait "${build_pids[$i]}"; then
        labels+=("$label")
    else
        echo "ab_bench.sh: building $label failed; last lines of $logdir/build_$label.log:" >&2
        tail -n 20 "$logdir/build_$label.log" >&2
    fi
done
# head+NAME: the working tree's build under NAME's settings.
declare -A build_of env_of
for label in "${labels[@]}"; do build_of[$label]=$label; env_of[$label]=""; done
if [ -n "${build_of[head]:-}" ]; then
    for variant in ${env_variants[@]+"${env_variants[@]}"}; do
        label="head+${variant%%:*}"
        labels+=("$label")
        build_of[$label]=head
        env_of[$label]="${variant#*:}"
    done
fi

for ((round = 1; round <= rounds; round++)); do
    for label in "${labels[@]}"; do
        log="$logdir/bench_${label}_${round}.log"
        read -r -a settings <<<"${env_of[$label]}"
        echo "=== round $round, $label: ${settings[*]} python3 -m deep_ep.bench ${bench_args[*]}"
        (cd "$work" && env ${settings[@]+"${settings[@]}"} PYTHONPATH="$work/${build_of[$label]}" timeout 300 \
            python3 -m deep_ep.bench "${bench_args[@]}") \
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
