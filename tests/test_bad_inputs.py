"""Bad input from the command line: a clear error (exit code 2, no traceback) before any work, and every
file that existed before is byte-identical after. One row per case; the scratch folder holds a
finished quick run, a store, and a folder of someone's own files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
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


def _config_files(tmp: Path, files: dict[str, str]) -> None:
    (tmp / "conf").mkdir()
    for name, text in files.items():
        (tmp / "conf" / name).write_text(text)


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` (with what it holds) on a read-only file system: a read-only tmpfs mount for root (which no
    file mode stops), else the write bits removed; skips where neither is possible."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    saved = folder.with_name(folder.name + ".saved")
    shutil.copytree(folder, saved)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True).returncode:
        shutil.rmtree(saved)
        pytest.skip("a read-only file system needs a mount, and this root may not mount")
    try:
        shutil.copytree(saved, folder, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)
        shutil.rmtree(saved)


def _no_action_store(tmp: Path) -> None:
    import pyarrow.parquet as pq

    shutil.copytree(tmp / "runs" / "shared" / "demos", tmp / "noaction")
    for path in (tmp / "noaction" / "data").rglob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["action"]), path)


def _disk_full(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _diagnosed(tmp: Path) -> None:
    """The run's own diagnostics (demos only), and a second store to diagnose it on."""
    assert main(["diagnose", str(tmp / "runs" / "shared" / "checkpoints" / "sft"), "--rollouts", "0"]) == 0
    shutil.copytree(tmp / "runs" / "shared" / "demos", tmp / "other-demos")


#: what a case prepares in the scratch folder before the command: (tmp, monkeypatch) -> a context or None
PREPARE = {
    "self-extending config": lambda tmp, mp: _config_files(tmp, {"self.toml": 'extends = "self.toml"\n'}),
    "mutually extending configs": lambda tmp, mp: _config_files(
        tmp, {"a.toml": 'extends = "b.toml"\n', "b.toml": 'extends = "a.toml"\nseed = 1\n'}),
    "extends a missing file": lambda tmp, mp: _config_files(tmp, {"c.toml": 'extends = "nowhere.toml"\n'}),
    "read-only folder": lambda tmp, mp: _read_only(tmp / "ro"),
    "read-only run": lambda tmp, mp: _read_only(tmp / "runs"),
    "disk full": lambda tmp, mp: mp.setattr(os, "fsync", _disk_full),
    "bad MUJOCO_GL": lambda tmp, mp: mp.setenv("MUJOCO_GL", "nonsense"),
    "PYOPENGL_PLATFORM against MUJOCO_GL": lambda tmp, mp: (mp.setenv("MUJOCO_GL", "egl"),
                                                            mp.setenv("PYOPENGL_PLATFORM", "osmesa")),
    "store without an action column": lambda tmp, mp: _no_action_store(tmp),
    "the run's diagnostics": lambda tmp, mp: _diagnosed(tmp),
}

# (case id, what to prepare (a PREPARE key or None), full argv with {tmp}, pieces of the expected message)
PREPARED_CASES = [
    ("a config that extends itself", "self-extending config",
     ["run", "{tmp}/conf/self.toml", "--name", "x", "--runs-dir", "{tmp}/runs"], ["self.toml extends itself"]),
    ("two configs that extend each other", "mutually extending configs",
     ["run", "{tmp}/conf/a.toml", "--name", "x", "--runs-dir", "{tmp}/runs"], ["a.toml extends itself", "b.toml"]),
    ("a config that extends a missing file", "extends a missing file",
     ["run", "{tmp}/conf/c.toml", "--name", "x", "--runs-dir", "{tmp}/runs"], ["conf/nowhere.toml"]),
    ("--runs-dir naming a file", None,
     ["run", "pointmass-quick", "--name", "x", "--runs-dir", "{tmp}/mine/notes.txt", "--no-progress"],
     ["cannot write the run folder", "notes.txt is a file, not a folder"]),
    ("collect --out through a file", None,
     ["collect", "pointmass-quick", "--out", "{tmp}/mine/notes.txt/demos", "--runs-dir", "{tmp}/runs"],
     ["cannot write", "notes.txt is a file, not a folder"]),
    ("--runs-dir on a read-only file system", "read-only folder",
     ["run", "pointmass-quick", "--name", "x", "--runs-dir", "{tmp}/ro", "--no-progress"], ["cannot write", "ro/x"]),
    ("collect --out on a read-only file system", "read-only folder",
     ["collect", "pointmass-quick", "--out", "{tmp}/ro/demos", "--runs-dir", "{tmp}/runs"],
     ["cannot write", "ro/demos"]),
    ("report on a read-only run", "read-only run", ["report", "{tmp}/runs/shared"], ["cannot write", "runs/shared/"]),
    ("report with the disk full", "disk full", ["report", "{tmp}/runs/shared"], ["the disk is full", "runs/shared/"]),
    ("a new run with the disk full", "disk full",
     ["sft", "pointmass-quick", "--name", "new", "--runs-dir", "{tmp}/runs", "--dataset", "{tmp}/runs/shared/demos",
      "--no-progress"], ["the disk is full", "runs/new/"]),
    ("dataset export --out through a file", None,
     ["dataset", "export", "{tmp}/runs/shared/demos", "--out", "{tmp}/mine/notes.txt/export"],
     ["cannot write", "notes.txt is a file, not a folder"]),
    ("dataset import --out on a read-only file system", "read-only folder",
     ["dataset", "import", "{tmp}/runs/shared/demos", "--out", "{tmp}/ro/imported"], ["cannot write", "ro/imported"]),
    ("diagnose --out on a read-only file system", "read-only folder",
     ["diagnose", "{tmp}/runs/shared/checkpoints/sft", "--rollouts", "0", "--out", "{tmp}/ro/diag"],
     ["cannot write", "ro/diag"]),
    ("experiment --runs-dir naming a file", None,
     ["experiment", "data-efficiency-quick", "--runs-dir", "{tmp}/mine/notes.txt", "--no-progress"],
     ["cannot write", "notes.txt is a file, not a folder"]),
    ("MUJOCO_GL=nonsense", "bad MUJOCO_GL",
     ["collect", "aloha-quick", "--out", "{tmp}/aloha", "--runs-dir", "{tmp}/runs"],
     ["MUJOCO_GL='nonsense' is not a MuJoCo rendering backend", "egl"]),
    ("PYOPENGL_PLATFORM contradicting MUJOCO_GL", "PYOPENGL_PLATFORM against MUJOCO_GL",
     ["collect", "aloha-quick", "--out", "{tmp}/aloha", "--runs-dir", "{tmp}/runs"], ["PYOPENGL_PLATFORM='osmesa'"]),
    ("a store whose Parquet lacks the action column", "store without an action column",
     ["sft", "pointmass-quick", "--name", "f", "--dataset", "{tmp}/noaction", "--runs-dir", "{tmp}/runs",
      "--no-progress"], ["has no column 'action'"]),
    ("diagnose --out into another run's folder", None,
     ["diagnose", "{tmp}/runs/shared/checkpoints/sft", "--rollouts", "0", "--out", "{tmp}/runs/shared"],
     ["which diagnose did not write", "config.json"]),
    ("diagnose --out into a folder of other files", None,
     ["diagnose", "{tmp}/runs/shared/checkpoints/sft", "--rollouts", "0", "--out", "{tmp}/mine"],
     ["holds notes.txt, which diagnose did not write"]),
    ("diagnose on another --dataset over the run's own diagnostics", "the run's diagnostics",
     ["diagnose", "{tmp}/runs/shared/checkpoints/sft", "--rollouts", "0", "--dataset", "{tmp}/other-demos"],
     ["runs/shared/diagnostics holds the diagnostics of", "made with another dataset", "--out"]),
    ("diagnose with other settings over the run's own diagnostics", "the run's diagnostics",
     ["diagnose", "{tmp}/runs/shared/checkpoints/sft", "--rollouts", "0", "--set", "improve.success_hold=2"],
     ["made with another improve.success_hold"]),
]


@pytest.mark.parametrize("prepare,argv,messages", [c[1:] for c in PREPARED_CASES], ids=[c[0] for c in PREPARED_CASES])
def test_broken_configs_file_systems_and_stores_are_refused_clearly(scratch, capsys, monkeypatch, prepare, argv,
                                                                    messages):
    """Configs that extend themselves, writes the file system refuses, a bad GL setting, a store missing a
    column: exit code 2, one clear line that names the path, no traceback, nothing changed."""
    with contextlib.ExitStack() as stack:
        context = PREPARE[prepare](scratch, monkeypatch) if prepare else None
        if isinstance(context, contextlib.AbstractContextManager):
            stack.enter_context(context)
        before = _snapshot(scratch)
        code = main([a.format(tmp=scratch) for a in argv])
        err = capsys.readouterr().err
        after = _snapshot(scratch)
    assert code == 2, err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert after == before


def test_diagnose_rewrites_its_own_earlier_output(scratch, capsys):
    """The same diagnosis again (same checkpoint, store and settings) replaces its own folder; a copy of the
    checkpoint is the same checkpoint."""
    checkpoint = scratch / "runs" / "shared" / "checkpoints" / "sft"
    out = scratch / "diag"
    argv = ["diagnose", str(checkpoint), "--rollouts", "0", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads((out / "diagnostics.json").read_text())
    assert main(argv) == 0
    shutil.copytree(checkpoint, scratch / "copy")
    assert main(["diagnose", str(scratch / "copy"), "--rollouts", "0", "--out", str(out), "--config", "pointmass-quick",
                 "--dataset", str(scratch / "runs" / "shared" / "demos")]) == 0
    assert json.loads((out / "diagnostics.json").read_text())["identity"] == first["identity"]


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
