"""Running an experiment's tasks: each Stage-1 group before the runs that start from it, on worker
processes (a dead worker fails its task and is replaced), skipping finished runs (resume) and
recording every task's status in ``status.json``."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selfimprove.experiment.plan import ExperimentPlan, _stage1_dir
from selfimprove.experiment.tasks import _execute
from selfimprove.rundir import RunDir
from selfimprove.runlog import write_json

log = logging.getLogger(__name__)


def _worker_loop(conn: multiprocessing.connection.Connection) -> None:
    """A worker process: run tasks sent by the scheduler until it sends None."""
    logging.getLogger().handlers.clear()
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        try:
            conn.send(_execute(task))
        except KeyboardInterrupt:
            return


class _Worker:
    def __init__(self, ctx, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the child's torch at import
        try:
            self.proc = ctx.Process(target=_worker_loop, args=(child,))
            self.proc.start()
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        child.close()
        self.task: dict[str, Any] | None = None

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)


def _schedule(tasks: dict[str, dict[str, Any]], depends: dict[str, str | None], parallel: int,
              on_done, threads: int) -> None:
    """Run ``tasks`` (name -> task) on ``parallel`` workers, each after the task it depends on.

    A task whose dependency failed fails without running; a worker that dies (killed, out of
    memory) fails its task and is replaced.
    """
    finished: dict[str, dict[str, Any]] = {}
    waiting = list(tasks)

    def ready() -> str | None:
        # Stage-1 groups first: each is the longest task and unlocks its runs, so the grid never ends
        # with one SFT running alone while the other workers idle (longest-first scheduling).
        for want_stage1 in (True, False):
            for name in waiting:
                dep = depends.get(name)
                if (dep is None or dep in finished) and (tasks[name]["kind"] == "stage1") == want_stage1:
                    return name
        return None

    def complete(name: str, result: dict[str, Any]) -> None:
        finished[name] = result
        on_done(name, tasks[name], result)
        if result["status"] != "done":  # everything that waits on it fails too
            for other in [n for n in waiting if depends.get(n) == name]:
                waiting.remove(other)
                complete(other, {"status": "failed", "error": f"its Stage 1 ({name}) failed: {result.get('error')}",
                                 "seconds": 0.0})

    if parallel <= 1:
        while waiting:
            name = ready()
            assert name is not None, "dependency cycle"
            waiting.remove(name)
            complete(name, _execute(tasks[name]))
        return
    ctx = mp.get_context("spawn")
    workers: list[_Worker] = []
    try:
        workers = [_Worker(ctx, threads) for _ in range(min(parallel, len(tasks)))]
        while waiting or any(w.task for w in workers):
            for w in workers:
                if w.task is None:
                    name = ready()
                    if name is None:
                        break
                    waiting.remove(name)
                    w.task = tasks[name]
                    w.conn.send(w.task)
            busy = [w for w in workers if w.task is not None]
            if not busy:
                if waiting:  # nothing runnable and nothing running: the rest wait on failed work
                    raise RuntimeError(f"unschedulable tasks: {waiting}")
                break
            ready_objs = mp.connection.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(workers):
                if w.task is None:
                    continue
                if w.conn in ready_objs:
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        result = None
                elif w.proc.sentinel in ready_objs:
                    result = None
                else:
                    continue
                task, w.task = w.task, None
                if result is None:
                    w.proc.join(1.0)
                    result = {"status": "failed", "seconds": 0.0,
                              "error": f"its worker process died (exit code {w.proc.exitcode}; out of memory or "
                                       "killed?); rerun with --resume to retry it"}
                    w.stop(1.0)
                    workers[i] = _Worker(ctx, threads)
                complete(task["name"], result)
    finally:
        for w in workers:
            if w.task is not None and w.proc.is_alive():
                w.proc.terminate()
            w.stop()


def _finished(run_dir: Path) -> bool:
    return RunDir(run_dir).summary.exists()


def _execute_plan(plan: ExperimentPlan, selected: list[str], parallel: int, progress: bool) -> None:
    plan.root.mkdir(parents=True, exist_ok=True)
    status_path = plan.root / "status.json"
    status: dict[str, Any] = json.loads(status_path.read_text()) if status_path.exists() else {}
    todo = [n for n in selected if not _finished(plan.runs[n].config.run_dir)]
    skipped = len(selected) - len(todo)
    if skipped:
        log.info("%d of %d runs are finished and kept", skipped, len(selected))
    tasks: dict[str, dict[str, Any]] = {}
    depends: dict[str, str | None] = {}

    def stage1_cost(name: str) -> tuple[float, float]:  # longest SFT first: the grid finishes sooner
        config = plan.groups[plan.runs[name].stage1].config
        return (0.0, 0.0) if plan.spec.init_from else (-config.sft.steps, -config.data.fraction)

    todo.sort(key=stage1_cost)
    for name in todo:
        run = plan.runs[name]
        group = plan.groups[run.stage1]
        gdir = _stage1_dir(group)
        gtask = f"stage1:{group.name}"
        if gtask not in tasks:
            tasks[gtask] = {"kind": "stage1", "name": gtask, "config": group.config.to_dict(),
                            "init_from": group.init_from, "log": str(gdir / "experiment.log")}
            depends[gtask] = None
        tasks[name] = {"kind": "run", "name": name, "config": run.config.to_dict(), "stage1_dir": str(gdir),
                       "log": str(run.config.run_dir / "experiment.log")}
        depends[name] = gtask
    threads = max((plan.runs[n].config.torch_threads for n in todo), default=1)
    bar = tqdm(total=len(selected), initial=skipped, desc=f"experiment {plan.spec.name}", unit="run",
               disable=not progress)
    failures: list[str] = []

    def on_done(name: str, task: dict[str, Any], result: dict[str, Any]) -> None:
        status[name] = {k: result.get(k) for k in ("status", "error", "seconds")}
        write_json(status_path, status)
        if result["status"] != "done":
            failures.append(name)
            log.error("%s failed: %s (log: %s)", name, result.get("error"), task["log"])
        if task["kind"] == "run":
            bar.update(1)
        bar.set_postfix(failed=len(failures), refresh=True)

    try:
        _schedule(tasks, depends, parallel, on_done, threads)
    finally:
        bar.close()
    if failures:
        log.error("%d of %d tasks failed: %s; see each one's experiment.log, fix, and rerun with --resume",
                  len(failures), len(tasks), ", ".join(failures))
