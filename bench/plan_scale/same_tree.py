"""Check that two `disaggctl render --out` folders are the same: every path, its type, mode and bytes.

    python bench/plan_scale/same_tree.py MAIN_OUT BRANCH_OUT     # exit 0 when identical

Used to check an optimization of render against main's output (16 and 128 racks, with the
operator's cache folder empty and filled, and a re-render into the same folder).
"""

from __future__ import annotations

import os
import stat
import sys


def tree(root: str) -> dict[str, tuple[int, int, bytes | None]]:
    out: dict[str, tuple[int, int, bytes | None]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), data)
    return out


def main() -> int:
    a, b = tree(sys.argv[1]), tree(sys.argv[2])
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not a or differ:
        print(f"DIFFER: {len(a)} and {len(b)} entries; first differences: {differ[:5]}")
        return 1
    print(f"identical: {len(a)} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
