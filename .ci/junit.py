"""Check a pytest JUnit report, so a test run can neither pass nor fail silently.

``python .ci/junit.py REPORT [--status N]``: prints one summary line (tests, passed, failed, errors,
skipped, seconds) and exits 0 only when the report exists, holds at least one test, and none failed or
errored (and pytest's own exit ``--status`` was 0). A pytest that died before its summary (killed, or a
library that ends the process) writes no report, and that is an error here, not a pass. ``summarize`` is
also what ``bench/fleet_stress.py`` tabulates.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def summarize(report: str | Path) -> dict | None:
    """Counts of a JUnit report (None when it is missing or unreadable: pytest did not finish)."""
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = round(sum(float(s.get("time", 0.0)) for s in suites), 1)
    return counts


def verdict(counts: dict | None, status: int = 0) -> tuple[bool, str]:
    """(ok, one summary line) for a report's counts and pytest's exit status."""
    if counts is None:
        return False, (f"pytest wrote no report (exit status {status}): it stopped before its summary; "
                       "the run neither passed nor failed. Run it again and read its last output")
    line = (f"{counts['tests']} tests: {counts['passed']} passed, {counts['failures']} failed, {counts['errors']} "
            f"errors, {counts['skipped']} skipped in {counts['seconds']} s")
    if counts["tests"] == 0:
        return False, line + " (no test ran)"
    if counts["failures"] or counts["errors"] or status != 0:
        return False, line + (f" (pytest exit status {status})" if status else "")
    return True, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--status", type=int, default=0, help="pytest's exit status")
    args = parser.parse_args()
    ok, line = verdict(summarize(args.report), args.status)
    print(("test summary: " if ok else "TEST RUN NOT GREEN: ") + line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
