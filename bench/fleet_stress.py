"""The Ray fleet tests N times in a row: does any run die silently, fail, or hang?

Each run is a fresh ``pytest tests/test_ray_fleet.py`` process (slow tests too with ``--slow``) writing a
JUnit report, judged by ``.ci/junit.py``: a run that ends without its report (the process was ended from
inside, as Ray does when it is used after ``ray.shutdown()``) counts as "died", not as a pass. Prints a
table (one row per run) and ends with one JSON line: runs, green, failed, died, per-run outcomes.
Usage: ``python bench/fleet_stress.py [--runs 10] [--slow] [--timeout 900] [-k EXPR]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("junit", ROOT / ".ci" / "junit.py")
junit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(junit)


def one_run(report: Path, slow: bool, timeout: float, select: str | None) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_ray_fleet.py"),
           f"--junitxml={report}"] + (["-m", "slow or not slow"] if slow else []) + (["-k", select] if select else [])
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        status, tail = done.returncode, (done.stdout + done.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        status, tail = None, [f"timed out after {timeout:g} s"]
    counts = junit.summarize(report)
    ok, line = junit.verdict(counts, status if status is not None else -1)
    outcome = "green" if ok else ("hung" if status is None else "died" if counts is None else "failed")
    return {"outcome": outcome, "status": status, "seconds": round(time.time() - start, 1), "summary": line,
            "last_line": tail[0] if tail else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--slow", action="store_true", help="also the slow (timing-sensitive) tests")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as hung")
    parser.add_argument("-k", dest="select", help="pytest -k expression to run only some of the tests")
    args = parser.parse_args()
    results = []
    print(f"{'run':>4} {'outcome':>8} {'status':>6} {'seconds':>8}  summary")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            result = one_run(Path(tmp) / f"run{i}.xml", args.slow, args.timeout, args.select)
            results.append(result)
            print(f"{i + 1:>4} {result['outcome']:>8} {str(result['status']):>6} {result['seconds']:>8}  "
                  f"{result['summary']}", flush=True)
    tally = {k: sum(r["outcome"] == k for r in results) for k in ("green", "failed", "died", "hung")}
    print(json.dumps({"bench": "fleet_stress", "runs": args.runs, **tally, "slow": args.slow,
                      "seconds": round(sum(r["seconds"] for r in results), 1), "results": results}))
    return 0 if tally["green"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
