"""The CLI starts fast, survives a closed pipe, and run records are strict JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import selfimprove
from selfimprove.cli import main
from selfimprove.runlog import MetricsLog, dumps_json, json_safe, write_json

TINY = Path(__file__).parent / "data" / "lerobot_v3_tiny"  # a LeRobot v3 dataset checked into the repo


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_is_lazy_and_public_names_still_work():
    out = _python("import sys, selfimprove, selfimprove.cli\n"
                  "print(sorted(m for m in ('torch', 'matplotlib', 'pyarrow') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for name in selfimprove.__all__:
        assert name in dir(selfimprove)
    # the names resolve on use, also after the same-named submodules were imported
    out = _python("import selfimprove.diagnose, selfimprove.evaluate\n"
                  "from selfimprove import diagnose, evaluate, sft, improve, RunConfig\n"
                  "import selfimprove as si\n"
                  "assert callable(si.diagnose) and si.diagnose is diagnose and callable(si.evaluate)\n"
                  "assert all(callable(getattr(si, n)) for n in si.__all__)")
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError):
        selfimprove.no_such_name  # noqa: B018


def test_version(capsys):
    out = subprocess.run([sys.executable, "-m", "selfimprove.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"selfimprove {selfimprove.__version__}"
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and selfimprove.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("args", [["dataset", "info", str(TINY)], ["dataset", "info", str(TINY), "--json"],
                                  ["--help"]])
def test_closed_stdout_pipe_is_no_traceback(args):
    """``selfimprove dataset info ... | head -1`` when the reader has gone away: quiet exit, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "selfimprove.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes anything
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert proc.returncode in (0, 141)


def test_reader_that_takes_one_line():
    """The same with a reader that reads a little and then closes (``| head -1``)."""
    proc = subprocess.Popen([sys.executable, "-m", "selfimprove.cli", "dataset", "info", str(TINY)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert str(TINY).encode() in first
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 141)


def _strict(text: str):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


RECORD = {"a": float("nan"), "b": [1.0, float("inf"), -math.inf], "c": {"d": np.float32("nan"), "e": np.float64(2.5)},
          "f": (np.int64(3), np.bool_(True)), "g": np.array([0.5, np.nan]), "h": "text", "i": None}
CLEAN = {"a": None, "b": [1.0, None, None], "c": {"d": None, "e": 2.5}, "f": [3, True], "g": [0.5, None],
         "h": "text", "i": None}


def test_run_records_are_strict_json(tmp_path):
    assert json_safe(RECORD) == CLEAN
    assert _strict(dumps_json(RECORD, indent=2)) == CLEAN
    write_json(tmp_path / "detector.json", RECORD)
    assert _strict((tmp_path / "detector.json").read_text()) == CLEAN
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"stage": "improve", "loss": float("nan"), "x": np.float32(np.inf)})
    log.keep(lambda r: True)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict(line) for line in lines] == [{"stage": "improve", "loss": None, "x": None}]


def test_collect_says_how_long_it_took_and_how_much_disk_it_used(tmp_path, capsys):
    assert main(["collect", "pointmass", "--quick", "--episodes", "4", "--workers", "1", "--no-progress",
                 "--out", str(tmp_path / "demos")]) in (0, None)
    out = capsys.readouterr().out
    assert f"wrote 4 episodes to {tmp_path / 'demos'} in " in out and "min (1 workers)" in out
    assert out.rstrip().endswith("MB on disk")


def test_the_make_test_check_refuses_a_run_that_died_ran_nothing_or_failed(tmp_path):
    """.ci/junit.py (called by `make test`): no report (pytest died before its summary), no test, a failure or
    a non-zero pytest status is never green; a full report prints its summary line."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("junit", Path(__file__).resolve().parents[1] / ".ci" / "junit.py")
    junit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(junit)

    def report(tests, failures=0, errors=0, skipped=0):
        path = tmp_path / f"r{tests}{failures}{errors}{skipped}.xml"
        path.write_text(f'<testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" '
                        f'errors="{errors}" skipped="{skipped}" time="1.5"/></testsuites>')
        return junit.summarize(path)

    assert junit.verdict(junit.summarize(tmp_path / "missing.xml"), 137) == (False, junit.verdict(None, 137)[1])
    assert "stopped before its summary" in junit.verdict(None, 137)[1]
    assert junit.verdict(report(0))[0] is False
    assert junit.verdict(report(5, failures=1))[0] is False and junit.verdict(report(5, errors=1))[0] is False
    assert junit.verdict(report(5), status=1)[0] is False
    assert junit.verdict(report(5, skipped=1)) == (True, "5 tests: 4 passed, 0 failed, 0 errors, 1 skipped in 1.5 s")
