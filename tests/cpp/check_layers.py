"""The layer boundaries of docs/design.md section 1, checked on the #include lines of the tree: a file may
include only the folders its layer may use. Run by ctest: python3 check_layers.py REPO_ROOT."""

import os
import re
import sys

# folder -> include prefixes (project headers) it must not use.
FORBIDDEN = {
    "csrc/kernels": ("runtime/",),
    "csrc/transport": ("runtime/", "kernels/"),
    "csrc/protocol": ("runtime/", "kernels/", "transport/"),
    "csrc/util": ("runtime/", "kernels/", "transport/", "protocol/"),
    "csrc/reference": ("runtime/", "kernels/", "transport/", "protocol/", "util/"),
    "include/deep_ep": ("runtime/", "kernels/", "transport/", "protocol/", "util/", "reference/"),
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def violations(root):
    found = []
    for folder, forbidden in FORBIDDEN.items():
        for directory, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if not name.endswith((".hpp", ".cuh", ".cpp", ".cu", ".h")):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        match = INCLUDE.match(line)
                        if match and match.group(1).startswith(forbidden):
                            found.append(f"{os.path.relpath(path, root)}:{number} includes {match.group(1)}")
    # The CPU reference and the public API build without CUDA headers.
    for folder in ("csrc/reference",):
        for directory, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    if re.search(r"#\s*include\s*<cuda", f.read()):
                        found.append(f"{os.path.relpath(path, root)} includes a CUDA header")
    return found


def main():
    found = violations(sys.argv[1])
    print(f"{len(FORBIDDEN)} layers checked, {len(found)} violations")
    for line in found:
        print("FAIL", line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
