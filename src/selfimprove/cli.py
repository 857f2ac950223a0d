"""The ``selfimprove`` command. It only parses and prints; each subcommand is one API call."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from selfimprove.cli_dataset import add_dataset_commands, run_dataset_command
from selfimprove.config import RunConfig, available_presets, load_config
from selfimprove.errors import SelfImproveError

# flag -> config field; every flag maps to a field so a run's config.json says everything.
FLAG_FIELDS = {
    "name": "name", "seed": "seed", "runs_dir": "runs_dir", "episodes": "data.episodes",
    "fraction": "data.fraction", "dataset": "data.path", "workers": "data.collect_workers",
    "steps": "sft.steps", "iterations": "improve.iterations", "robots": "fleet.robots",
    "threshold": "improve.success_threshold", "eval_episodes": "eval.episodes",
    "temperature": "eval.temperature", "threads": "torch_threads", "fleet": "fleet.backend",
    "address": "fleet.address", "reset_free": "fleet.reset_free",
}


def _common(p: argparse.ArgumentParser, *flags: str) -> None:
    p.add_argument("preset", nargs="?", default="pointmass",
                   help=f"preset name in configs/ ({', '.join(available_presets())}) or a .toml path")
    p.add_argument("--quick", action="store_true", help="use the '<preset>-quick' preset (tiny data and model)")
    p.add_argument("--name", help="run name: outputs go to runs/<name>/")
    p.add_argument("--seed", type=int)
    p.add_argument("--runs-dir", dest="runs_dir")
    p.add_argument("--threads", type=int, help="torch threads per process (1 is fastest for small models)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set improve.lr=1e-4 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    for flag in flags:
        {
            "episodes": lambda: p.add_argument("--episodes", type=int, help="number of demos (data.episodes)"),
            "fraction": lambda: p.add_argument("--fraction", type=float, help="share of the training split for SFT"),
            "dataset": lambda: p.add_argument("--dataset", help="episode store to train on (data.path)"),
            "workers": lambda: p.add_argument("--workers", type=int, help="parallel collection processes"),
            "steps": lambda: p.add_argument("--steps", type=int, help="SFT gradient steps"),
            "iterations": lambda: p.add_argument("--iterations", type=int, help="Self-Improvement iterations"),
            "robots": lambda: p.add_argument("--robots", type=int, help="robots in the fleet"),
            "fleet": lambda: (
                p.add_argument("--fleet", choices=["local", "ray"], help="where robots run (fleet.backend)"),
                p.add_argument("--address", help="ray: join this cluster (default: start a local Ray on 127.0.0.1)"),
                p.add_argument("--reset-free", dest="reset_free", action="store_const", const=True,
                               help="practise without resets between episodes (fleet.reset_free)")),
            "threshold": lambda: p.add_argument("--threshold", type=float, help="success threshold s (default: calibrated)"),
            "eval_episodes": lambda: p.add_argument("--eval-episodes", dest="eval_episodes", type=int),
            "temperature": lambda: p.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)"),
            "resume": lambda: p.add_argument("--resume", action="store_true",
                                             help="continue the run in runs/<name>/; finished work is kept"),
        }[flag]()


def build_parser() -> argparse.ArgumentParser:
    from selfimprove import __version__

    parser = argparse.ArgumentParser(prog="selfimprove", description=__doc__)
    parser.add_argument("--version", action="version", version=f"selfimprove {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("collect", help="write expert demonstrations to an episode store")
    _common(p, "episodes", "workers")
    p.add_argument("--out", help="store folder (default runs/<name>/demos)")
    p = sub.add_parser("sft", help="stage 1: BC + steps-to-go fine-tuning")
    _common(p, "dataset", "fraction", "steps", "resume")
    p = sub.add_parser("improve", help="stage 2: Self-Improvement from an SFT checkpoint")
    _common(p, "dataset", "fraction", "iterations", "robots", "fleet", "threshold", "resume")
    p.add_argument("--sft", help="SFT checkpoint (default runs/<name>/checkpoints/sft)")
    p = sub.add_parser("eval", help="true success rate of a checkpoint on fixed eval seeds")
    _common(p, "eval_episodes", "temperature")
    p.add_argument("--checkpoint", required=True)
    p = sub.add_parser("run", help="the whole pipeline: collect -> sft -> improve -> eval -> report")
    _common(p, "episodes", "dataset", "fraction", "steps", "iterations", "robots", "fleet", "threshold",
            "eval_episodes", "resume", "workers")
    add_dataset_commands(sub)
    p = sub.add_parser("report", help="rebuild runs/<name>/report.md from the run's files (also mid-run)")
    p.add_argument("run", metavar="RUN", help="run name (a folder in --runs-dir) or path of a run folder")
    p.add_argument("--runs-dir", dest="runs_dir", default="runs", help="where run names are looked up")
    p = sub.add_parser("diagnose", help="reward-model diagnostics of an SFT checkpoint and the recommended s")
    p.add_argument("checkpoint", help="checkpoint folder, e.g. runs/<name>/checkpoints/sft")
    p.add_argument("--dataset", help="store whose validation split holds the held-out demos (data.path; "
                                     "default: the run's)")
    p.add_argument("--rollouts", type=int, help="policy episodes on the eval seeds (diagnose.rollouts; 0: demos only)")
    p.add_argument("--out", help="output folder (default: runs/<name>/diagnostics)")
    p.add_argument("--config", help="preset or .toml, when the checkpoint is not inside a run folder")
    p.add_argument("--threads", type=int, help="torch threads (torch_threads)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("experiment", help="run a named grid of runs (configs/experiments/) and summarise it")
    p.add_argument("experiment", metavar="NAME", help="experiment name in configs/experiments/ or a .toml path")
    p.add_argument("--quick", action="store_true", help="run the '<NAME>-quick' variant (tiny budgets)")
    p.add_argument("--resume", action="store_true", help="continue: finished cells are kept, interrupted ones resume")
    p.add_argument("--parallel", type=int, help="worker processes, one cell each (default: one per CPU core)")
    p.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells (names or globs) and their controls")
    p.add_argument("--runs-dir", dest="runs_dir", default="runs", help="results go to <runs-dir>/experiments/<NAME>/")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field in every cell (before the grid's axes), e.g. --set data.path=data/lt10k")
    p.add_argument("--report-only", action="store_true", help="only rebuild summary.json and report.md from disk")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    preset = args.preset
    if getattr(args, "quick", False) and not preset.endswith("-quick") and not preset.endswith(".toml"):
        preset = f"{preset}-quick"
    overrides = list(args.set)
    for flag, field in FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{field}={value}")
    return load_config(preset, overrides)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # flush here (also after --help's SystemExit) so a closed pipe is caught below
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (e.g. `selfimprove dataset info ... | head -1`): stop quietly, as the
        # "Note on SIGPIPE" in the signal module docs recommends. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured in tests)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM from a scheduler, ``docker stop`` or ``kill``; SIGHUP from a closed terminal),
    raised in the main thread so the command stops as on Ctrl-C: finished work saved, locks released."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: the signals handled like Ctrl-C (SIGINT)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _stop_signals_interrupt():
    """While the command runs, :data:`STOP_SIGNALS` raise :class:`Stopped` (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with _stop_signals_interrupt():
            return _dispatch(args)
    except SelfImproveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused a write no writer turned into a StorageError itself
        from selfimprove.folders import is_file_system_error, storage_error

        if isinstance(exc, BrokenPipeError) or not is_file_system_error(exc):
            raise
        print(f"error: {storage_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}); finished work is saved; continue with --resume",
              file=sys.stderr)
        return 128 + signum


def _dispatch(args: argparse.Namespace) -> int:
    import selfimprove as si

    if args.command == "dataset":
        return run_dataset_command(args)
    if args.command == "report":
        print(si.write_report(args.run, runs_dir=args.runs_dir))
        return 0
    if args.command == "diagnose":
        from selfimprove.diagnose.report import print_summary

        overrides = list(args.set) + [f"{field}={getattr(args, flag)}" for flag, field in
                                      (("rollouts", "diagnose.rollouts"), ("threads", "torch_threads"))
                                      if getattr(args, flag) is not None]
        print_summary(si.diagnose(args.checkpoint, dataset=args.dataset, out=args.out, preset=args.config,
                                  overrides=overrides))
        return 0
    if args.command == "experiment":
        from selfimprove.experiment.report import format_summary

        summary = si.run_experiment(args.experiment, quick=args.quick, resume=args.resume, parallel=args.parallel,
                                    only=args.only, runs_dir=args.runs_dir, overrides=args.set,
                                    progress=not args.no_progress, report_only=args.report_only)
        print(format_summary(summary, Path(args.runs_dir)))
        return 1 if summary["counts"]["failed"] or summary["failed_runs"] else 0
    config = config_from_args(args)
    if getattr(args, "resume", False):
        from selfimprove.runlog import check_resume

        check_resume(config)  # before any work: the run must exist and keep its config
    import torch

    torch.set_num_threads(config.torch_threads)
    progress = not args.no_progress
    if args.command == "collect":
        start = time.perf_counter()
        path = si.collect_demos(config, out=args.out, progress=progress)
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        print(f"wrote {config.data.episodes} episodes to {path} in {(time.perf_counter() - start) / 60:.1f} min "
              f"({config.data.collect_workers} workers), {size / 1e6:.0f} MB on disk")
    elif args.command == "sft":
        print(si.sft(config, resume=args.resume, progress=progress))
    elif args.command == "improve":
        print(si.improve(config, sft_path=args.sft, resume=args.resume, progress=progress))
    elif args.command == "eval":
        result = si.evaluate(config, args.checkpoint)
        from selfimprove.runlog import dumps_json

        print(dumps_json(result, indent=2))
    elif args.command == "run":
        summary = si.run_pipeline(config, resume=args.resume, progress=progress)
        _print_summary(config, summary)
    return 0


def _print_summary(config: RunConfig, summary: dict) -> None:
    print(f"\nrun {config.name} ({summary['domain']}, seed {summary['seed']}, {summary['wall_time_s']:.0f} s)")
    for stage in ("sft", "improve"):
        s = summary[stage]
        extra = f", {s['robot_episodes']} robot episodes" if "robot_episodes" in s else ""
        print(f"  {stage:8s} success {s['success_rate']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}], "
              f"mean length {s['mean_episode_length']:.1f} over {s['eval_episodes']} episodes{extra}")
    print(f"  report: {config.run_dir / 'report.md'}")


if __name__ == "__main__":
    sys.exit(main())
