"""How fast the command line answers: `--help`, an argument error and a missing path, each in a fresh process.

Each case runs `python -m mergeguard ARGS` REPEAT times (median and min printed), beside
`python -c "import torch"` for scale. `--src DIR` times another source tree (PYTHONPATH=DIR), so an older
commit can be measured in the same run:

    git worktree add /tmp/before <commit>
    python bench/startup_bench.py --src /tmp/before/src --src src --repeat 5

A case that loads torch pays its import (about 2-3 s on 2 cores); tests/cli/test_startup.py checks that
none of these does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "mergeguard --help": ["--help"],
    "merge --help": ["merge", "--help"],
    "defend lfpm --help": ["defend", "lfpm", "--help"],
    "attack badtv --help": ["attack", "badtv", "--help"],
    "argument error (merge --method typo)": ["merge", "a", "b", "-o", "c", "--method", "ties_merging"],
    "argument error (scan --steps 0)": ["scan", "--base", "a", "b", "--shadow", "s", "--steps", "0"],
    "missing path (merge)": ["merge", "nope.safetensors", "nope2.safetensors", "-o", "out"],
}


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", default=[], help="A source tree to time (repeatable); default: "
                                                               "the installed mergeguard.")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    trees = args.src or [""]
    rows = []
    with tempfile.TemporaryDirectory() as cwd:
        for tree in trees:
            env = {**os.environ, "COLUMNS": "100"}
            if tree:
                env["PYTHONPATH"] = os.path.abspath(tree)
            for label, argv in {**CASES, "python -c 'import torch' (scale)": None}.items():
                cmd = [sys.executable, "-c", "import torch"] if argv is None else [sys.executable, "-m", "mergeguard",
                                                                                  *argv]
                times = [timed(cmd, env, cwd) for _ in range(args.repeat)]
                rows.append((tree or "installed", label, statistics.median(times), min(times)))
    width = max(len(r[1]) for r in rows)
    print(f"{'tree':<24} {'case':<{width}}  median s  min s")
    for tree, label, med, low in rows:
        print(f"{tree[-24:]:<24} {label:<{width}}  {med:8.2f}  {low:5.2f}")


if __name__ == "__main__":
    main()
