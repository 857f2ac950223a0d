"""The folders the library writes: never into one that already holds something, one writer per run.

* :func:`ensure_empty` is the one guard every writer of a new folder calls (demo collection, dataset
  import and export, a new run): a folder that holds anything is refused with the way out, so no
  file a user made or collected earlier is overwritten or mixed with new ones.
* :func:`staging_folder` is where a writer builds a folder before one atomic rename to its name: a
  killed writer leaves only its staging folder behind, which the next attempt replaces.
* :class:`RunLock` stops two commands from writing one run folder at the same time.
* :func:`storage_error` turns the operating system's refusal to write (read-only, a path through a file,
  a full disk) into a :class:`~selfimprove.errors.StorageError` naming the path and the way out.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TypeVar

from selfimprove.errors import RunStateError, StorageError
from selfimprove.rundir import RunDir

log = logging.getLogger(__name__)

_LAYOUT = RunDir("")
LOCK_FILE = _LAYOUT.lock.name
#: what a run folder holds before its first stage finishes: a fresh run that fails holding only these
#: is removed, so the same command can simply be run again
BOOKKEEPING = frozenset({p.name for p in (_LAYOUT.lock, _LAYOUT.config, _LAYOUT.provenance, _LAYOUT.timing,
                                         _LAYOUT.metrics, _LAYOUT.tensorboard)} | {".demos.partial"})
T = TypeVar("T")

#: errno -> (what went wrong, the way out) for the file-system errors a writer meets
_FILE_SYSTEM_ERRORS = {
    errno.EROFS: ("the file system is read-only", "write somewhere writable (--runs-dir, --out)"),
    errno.EACCES: ("permission denied", "write somewhere you may write (--runs-dir, --out), or fix its permissions"),
    errno.EPERM: ("operation not permitted", "write somewhere you may write (--runs-dir, --out)"),
    errno.ENOSPC: ("the disk is full", "free some space, or write somewhere else (--runs-dir, --out)"),
    errno.EDQUOT: ("the disk quota is used up", "free some space, or write somewhere else (--runs-dir, --out)"),
    errno.ENOTDIR: ("", "give a folder, not a file (--runs-dir, --out)"),
    errno.EISDIR: ("it is a folder", "give a file path"),
    errno.EEXIST: ("it already exists", "choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ENOENT: ("a folder on the way does not exist", "check the path"),
    errno.EIO: ("an input/output error of the disk", "check the disk, or write somewhere else"),
}


def is_file_system_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the file system refusing a read or write (not a bug, not a network error)."""
    return isinstance(exc, OSError) and not isinstance(exc, StorageError) and exc.errno in _FILE_SYSTEM_ERRORS


def storage_error(exc: OSError, path: str | Path | None = None, doing: str = "write") -> StorageError:
    """A :class:`StorageError` that says what could not be done to which path, why, and the way out.

    ``path`` defaults to the one the error names; for "not a directory" the message names the file that
    stands where a folder should be.
    """
    if isinstance(exc, StorageError):
        return exc
    path = Path(path if path is not None else (exc.filename or "?"))
    why, fix = _FILE_SYSTEM_ERRORS.get(exc.errno, (exc.strerror or str(exc), "check the path"))
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir through a file says one or the other
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            why, fix = f"{blocker} is a file, not a folder", _FILE_SYSTEM_ERRORS[errno.ENOTDIR][1]
        elif exc.errno == errno.ENOTDIR:
            why = "a part of it is not a folder"
    error = StorageError(f"cannot {doing} {path}: {why}; {fix}")
    error.errno, error.filename = exc.errno, str(path)
    return error


def run_contents(run_dir: str | Path) -> set[str]:
    """The names in a run folder, its lock aside (empty when the folder does not exist)."""
    run_dir = Path(run_dir)
    return {p.name for p in run_dir.iterdir()} - {LOCK_FILE} if run_dir.is_dir() else set()


def holds_something(path: str | Path) -> bool:
    """Whether ``path`` exists and is a file or a non-empty folder."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, rename: a reader never sees half a file
    and a killed writer leaves the previous version (every file the library writes goes through here or,
    for Parquet and checkpoint folders, the same rename)."""
    path = Path(path)
    # a temporary name of this writer's own: two writers of one file (a run's wall clock and its main
    # thread) must not rename each other's temporary file away
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # not even that is allowed here (read-only, not a folder): nothing was written
            pass


def ensure_empty(path: str | Path, what: str, fix: str, error: type[Exception] = RunStateError) -> None:
    """Refuse to write ``what`` into ``path`` when it already holds anything (``fix``: the way out)."""
    path = Path(path)
    if not holds_something(path):
        return
    if not path.is_dir():
        raise error(f"{path} is a file, not a folder for {what}; {fix} (nothing was changed)")
    entries = sorted(p.name for p in path.iterdir())
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise error(f"{path} already holds {shown}; refusing to write {what} into it. {fix} (nothing was changed)")


def staging_folder(target: str | Path) -> Path:
    """An empty hidden sibling of ``target`` to build it in (a leftover of a killed writer is removed)."""
    target = Path(target)
    staging = target.parent / f".{target.name}.partial"
    try:
        if staging.exists():
            log.info("removing %s, left by an interrupted writer", staging)
            shutil.rmtree(staging)
        staging.parent.mkdir(parents=True, exist_ok=True)
        probe = staging.parent / f".{target.name}.{os.getpid()}.probe"
        probe.touch()  # a writer learns now, not after its work, that it cannot write here
        probe.unlink()
    except OSError as exc:
        raise storage_error(exc, target) from exc
    return staging


def publish(staging: Path, target: str | Path) -> Path:
    """Move a finished staging folder to ``target`` in one rename (``target`` must not hold anything)."""
    target = Path(target)
    if target.exists():
        target.rmdir()  # an empty folder only: ensure_empty refused anything else before the work began
    os.replace(staging, target)
    return target


class RunLock:
    """An exclusive lock on a run folder for as long as this process works in it.

    An advisory ``flock`` on ``<run>/.lock``: the operating system drops it when the process ends,
    killed or not, so a crashed run never leaves a stale lock. Re-entrant within one process (the
    pipeline's stages take it in turn). Where ``fcntl`` does not exist the run goes on unlocked.
    """

    _held: dict[Path, tuple[int, int]] = {}  # run folder -> (file descriptor, depth)

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()

    def __enter__(self) -> "RunLock":
        held = RunLock._held.get(self.run_dir)
        if held is not None:
            RunLock._held[self.run_dir] = (held[0], held[1] + 1)
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, self.run_dir, "write the run folder") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunStateError(f"{self.run_dir} is in use by {holder}; wait for it to finish or stop it, "
                                "or choose another --name (nothing was changed)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        RunLock._held[self.run_dir] = (fd, 1)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        held = RunLock._held.get(self.run_dir)
        if held is None:
            return
        fd, depth = held
        if depth > 1:
            RunLock._held[self.run_dir] = (fd, depth - 1)
            return
        del RunLock._held[self.run_dir]
        os.close(fd)  # closing the descriptor releases the flock


def locks_run(stage: Callable[..., T]) -> Callable[..., T]:
    """Run ``stage(config, ...)`` holding :class:`RunLock` on ``config.run_dir``; when the folder was new and
    the stage fails before it holds more than :data:`BOOKKEEPING`, the folder is removed again."""

    @functools.wraps(stage)
    def locked(config: Any, *args: Any, **kwargs: Any) -> T:
        run_dir = Path(config.run_dir)
        fresh = not run_dir.exists()
        with RunLock(run_dir):
            try:
                return stage(config, *args, **kwargs)
            except BaseException:
                if fresh and run_contents(run_dir) <= BOOKKEEPING:
                    shutil.rmtree(run_dir, ignore_errors=True)  # nothing finished: leave nothing behind
                raise

    return locked
