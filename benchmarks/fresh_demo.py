"""`make demo` as a newcomer meets it: a fresh clone, no pip cache, no model cache.

Clones the committed HEAD into a temporary folder, runs `make demo` there with an empty pip cache
(`PIP_NO_CACHE_DIR=1`), an empty home and an empty model cache, and writes how long the set-up
(until the demo starts) and the demo took.

Usage:
    python benchmarks/fresh_demo.py --output benchmarks/results/fresh_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_STARTS = "bin/dspy-greater demo"  # the line make prints when set-up is done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="fresh-demo-") as folder:
        clone, home = pathlib.Path(folder) / "clone", pathlib.Path(folder) / "home"
        home.mkdir()
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "HOME": str(home), "DSPY_GREATER_CACHE": str(home / "cache")}
        start = time.perf_counter()
        setup_s, tail = None, []
        with subprocess.Popen(["make", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as make:
            for line in make.stdout:
                sys.stdout.write(line)
                tail = (tail + [line.rstrip()])[-12:]
                if setup_s is None and DEMO_STARTS in line:
                    setup_s = time.perf_counter() - start
        total_s = time.perf_counter() - start
    if make.returncode != 0 or setup_s is None:
        raise SystemExit(f"make demo failed (exit {make.returncode})")
    report = {"commit": commit, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "python": platform.python_version(), "setup_s": round(setup_s, 1),
              "demo_s": round(total_s - setup_s, 1), "total_s": round(total_s, 1), "demo_output_tail": tail}
    pathlib.Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"set-up {setup_s:.0f} s, demo {total_s - setup_s:.0f} s, total {total_s:.0f} s -> {args.output}")


if __name__ == "__main__":
    main()
