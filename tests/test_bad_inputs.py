"""Bad input from the command line: a clear error (exit code 2, no traceback) before any work, and every
file that existed before is byte-identical after. One row per case; the scratch folder holds a
finished quick run, a store, and a folder of someone's own files."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from selfimprove.cli import main
from selfimprove.folders import LOCK_FILE
from selfimprove.runlog import WallClock

# (case id, argv with {tmp} for the scratch folder, a piece of the expected message)
CASES = [
    ("collect into a folder of other files",
     ["collect", "pointmass-quick", "--out", "{tmp}/mine", "--name", "c"], "already holds notes.txt"),
    ("collect into an existing store",
     ["collect", "pointmass-quick", "--out", "{tmp}/runs/shared/demos", "--name", "c"], "already holds a dataset"),
    ("run --dataset at a folder of other files",
     ["run", "pointmass-quick", "--dataset", "{tmp}/mine", "--name", "r"], "already holds notes.txt"),
    ("resume a run that does not exist",
     ["run", "pointmass-quick", "--name", "nosuchrun", "--resume"], "nothing to resume"),
    ("resume with another seed",
     ["sft", "pointmass-quick", "--name", "shared", "--resume", "--seed", "1"], "seed: 0 -> 1"),
    ("resume with another learning rate",
     ["improve", "pointmass-quick", "--name", "shared", "--resume", "--set", "improve.lr=0.001"], "improve.lr:"),
    ("negative learning rate", ["run", "pointmass-quick", "--name", "x", "--set", "improve.lr=-1"],
     "sft.lr and improve.lr must be > 0"),
    ("NaN learning rate", ["run", "pointmass-quick", "--name", "x", "--set", "sft.lr=nan"], "sft.lr = nan is not a finite"),
    ("negative seed", ["run", "pointmass-quick", "--name", "x", "--seed", "-1"], "seed must be >= 0"),
    ("zero-width model", ["run", "pointmass-quick", "--name", "x", "--set", "model.hidden=0"],
     "model.hidden and model.layers must be >= 1"),
    ("threshold that can never fire", ["improve", "pointmass-quick", "--name", "x", "--threshold", "-1"],
     "success_threshold (--threshold) must be > 0"),
    ("unknown domain on a built-in env", ["run", "pointmass-quick", "--name", "x", "--set", "domain=reach"],
     "'reach' is not a built-in domain"),
    ("negative temperature", ["eval", "pointmass-quick", "--checkpoint", "{tmp}/runs/shared/checkpoints/sft",
                              "--temperature", "-1"], "eval.temperature (--temperature) >= 0 (0: greedy)"),
    ("a fraction of less than one episode",
     ["sft", "pointmass-quick", "--name", "f", "--dataset", "{tmp}/runs/shared/demos", "--fraction", "0.001"],
     "is less than one episode"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (lock files aside) -> its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture
def scratch(trained_quick, tmp_path) -> Path:
    shutil.copytree(trained_quick.run_dir, tmp_path / "runs" / "shared")
    saved = json.loads((tmp_path / "runs" / "shared" / "config.json").read_text())
    saved["runs_dir"] = str(tmp_path / "runs")  # the copy is the run: resume compares against it
    (tmp_path / "runs" / "shared" / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own notes\n")
    return tmp_path


@pytest.mark.parametrize("argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(scratch, capsys, argv, message):
    before = _snapshot(scratch)
    argv = [a.format(tmp=scratch) for a in argv] + ["--runs-dir", str(scratch / "runs"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert _snapshot(scratch) == before  # nothing changed, and no half-made folder was left behind


def test_a_run_folder_in_use_is_refused(scratch, capsys):
    """Two commands on one run at once: the second is refused while the first holds the lock."""
    run = scratch / "runs" / "shared"
    before = _snapshot(scratch)
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another holder of the run
        assert main(["sft", "pointmass-quick", "--name", "shared", "--resume", "--runs-dir", str(scratch / "runs"),
                     "--no-progress"]) == 2
        assert "is in use" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert _snapshot(scratch) == before
    # released: the same command goes on (the finished checkpoint is reused)
    assert main(["sft", "pointmass-quick", "--name", "shared", "--resume", "--runs-dir", str(scratch / "runs"),
                 "--no-progress"]) == 0


def test_wall_time_survives_a_kill(tmp_path):
    """The clock writes its total as it runs, so a killed run's time is not lost on resume."""
    path = tmp_path / "timing.json"
    WallClock(path, before=5.0, every=0.02)  # never stopped: as if the process were killed
    time.sleep(0.2)
    assert json.loads(path.read_text())["wall_time_s"] > 5.0
    clock = WallClock(path, before=json.loads(path.read_text())["wall_time_s"])
    assert clock.stop() > 5.0


def test_a_killed_collection_leaves_no_half_store_and_the_rerun_matches(tmp_path):
    """SIGKILL mid-collection: the target folder never exists half-written; the same command again collects
    the same demos, byte for byte, as an undisturbed collection."""
    import signal
    import subprocess
    import sys

    def collect(out: Path) -> list[str]:
        return [sys.executable, "-m", "selfimprove.cli", "collect", "pointmass-quick", "--out", str(out),
                "--episodes", "1500", "--no-progress", "--runs-dir", str(tmp_path / "runs")]

    subprocess.run(collect(tmp_path / "reference"), check=True, capture_output=True)
    target, staging = tmp_path / "demos", tmp_path / ".demos.partial"
    proc = subprocess.Popen(collect(target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (staging / "meta" / "info.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the first 1,000 demos are flushed while 500 more are still being played
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists() and staging.exists()
    subprocess.run(collect(target), check=True, capture_output=True)
    assert not staging.exists()
    assert _snapshot(target) == _snapshot(tmp_path / "reference")
