"""Kernel names are part of the interface (docs/compatibility.md section 1): profilers and users' timing code find ops by
V1's kernel names. This reads the kernels compiled into the library (their host launch stubs) and checks
that each family has exactly V1's names, so that a profile of repeated calls shows one row per name.

    python3 check_kernel_names.py LIBRARY   (run by ctest)
"""

import re
import subprocess
import sys

# family (namespace) -> the kernel names it must have, and nothing else that launches per op.
EXPECTED = {
    "layout": {"get_dispatch_layout"},
    "intranode": {"notify_dispatch", "cached_notify_dispatch", "cached_notify_combine", "dispatch", "combine"},
    "internode": {"notify_dispatch", "cached_notify", "dispatch", "combine"},
    # The mask helpers run only on the user's mask calls, never inside dispatch or combine.
    "low_latency": {"dispatch", "combine", "update_mask_kernel", "query_mask_kernel"},
}


def _identifiers(mangled, count):
    """The first `count` length-prefixed identifiers of an Itanium-mangled nested name after _ZN."""
    out, i = [], 0
    while len(out) < count:
        match = re.match(r"(\d+)", mangled[i:])
        if not match:
            break
        length = int(match.group(1))
        start = i + len(match.group(1))
        out.append(mangled[start : start + length])
        i = start + length
    return out


def kernel_names(library):
    """{namespace: {kernel name}} of the __global__ functions whose launch stubs the library defines. The stub
    symbols carry the kernel's mangled name: _ZN 7deep_ep <namespace> [<anonymous namespace>] <kernel>."""
    symbols = subprocess.run(["nm", "--defined-only", library], check=True, capture_output=True, text=True).stdout
    names = {}
    for mangled in set(re.findall(r"__device_stub__Z?N?7deep_ep(\w+)", symbols)):
        parts = _identifiers(mangled, 3)
        if len(parts) < 2:
            continue
        namespace, kernel = parts[0], parts[1]
        if kernel.startswith("_GLOBAL__N") and len(parts) == 3:
            kernel = parts[2]
        names.setdefault(namespace, set()).add(kernel)
    return names


def main():
    names = kernel_names(sys.argv[1])
    failures = []
    for family, expected in EXPECTED.items():
        found = names.get(family, set())
        if found != expected:
            failures.append(f"{family}: kernels {sorted(found)}, expected {sorted(expected)}")
    # A filter by "notify" must not also catch a main kernel, nor "dispatch"/"combine" a cached_notify of the
    # other op: cached_notify_dispatch runs only before a cached dispatch, cached_notify_combine before a combine.
    for family, found in names.items():
        for name in found:
            if "notify" in name and ("combine" in name and "dispatch" in name):
                failures.append(f"{family}: {name} matches both dispatch and combine filters")
    checked = sum(len(v) for v in EXPECTED.values())
    print(f"{checked} kernel names checked, {len(failures)} failed")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
