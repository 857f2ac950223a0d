"""``selfimprove dataset import|export|info``: LeRobot v3 datasets. Parses and prints; each is one API call."""

from __future__ import annotations

import argparse
import json


def _mapping_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="auto",
                   help="feature mapping: 'auto' (default), 'pointmass', 'language-table', 'aloha', or a .toml file "
                        "with an [observations] table (our key = LeRobot feature)")
    p.add_argument("--map", action="append", default=[], metavar="LEROBOT_FEATURE=OUR_KEY",
                   help="map one feature (repeatable), e.g. --map observation.state=state, --map action=actions, "
                        "--map 'observation.state[0:2]=effector'; LEROBOT_FEATURE= drops a feature")


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_dataset_commands(sub: argparse._SubParsersAction) -> None:
    """The ``dataset`` command group."""
    p = sub.add_parser("dataset", help="LeRobot v3 datasets: import into / export from episode stores, inspect")
    group = p.add_subparsers(dest="dataset_command", required=True)
    q = group.add_parser("import", help="convert a LeRobot v3 dataset folder into an episode store")
    q.add_argument("path", help="LeRobot v3 dataset folder (with meta/info.json)")
    q.add_argument("--out", required=True, help="new episode store folder (e.g. data/my_demos; train with --dataset)")
    _mapping_flags(q)
    _output_flags(q)
    q = group.add_parser("export", help="write an episode store as a LeRobot v3 dataset (cameras as PNG images)")
    q.add_argument("store", help="episode store folder (e.g. runs/<name>/demos)")
    q.add_argument("--out", required=True, help="new LeRobot dataset folder")
    q.add_argument("--robot-type", dest="robot_type", help="robot_type in info.json (default: the store's)")
    _mapping_flags(q)
    _output_flags(q)
    q = group.add_parser("info", help="episodes, frames, fps, features and tasks of a LeRobot dataset or store")
    q.add_argument("path")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--check", action="store_true", help="also check the LeRobot v3 layout (exit 1 on problems)")
    _output_flags(q)


def run_dataset_command(args: argparse.Namespace) -> int:
    import selfimprove as si

    progress = not args.no_progress
    if args.dataset_command == "import":
        out = si.import_lerobot(args.path, args.out, mapping=args.preset, overrides=args.map, progress=progress)
        summary = si.dataset_info(out)
        print(f"imported {summary['episodes']} episodes ({summary['frames']} frames) into {out}")
        return 0
    if args.dataset_command == "export":
        out = si.export_lerobot(args.store, args.out, mapping=args.preset, overrides=args.map,
                                robot_type=args.robot_type, progress=progress)
        summary = si.dataset_info(out)
        print(f"exported {summary['episodes']} episodes ({summary['frames']} frames) to {out}")
        return 0
    from selfimprove.data.lerobot import format_info

    summary = si.dataset_info(args.path)
    problems = si.check_lerobot(args.path) if args.check else None
    if args.json:
        print(json.dumps({**summary, **({"problems": problems} if problems is not None else {})}, indent=2))
    else:
        print(format_info(summary))
        if problems is not None:
            print("  layout      " + ("LeRobot v3 ok" if not problems else "PROBLEMS:"))
            for problem in problems or []:
                print(f"    - {problem}")
            if problems and summary["format"].startswith("selfimprove"):
                print("  (an episode store: `selfimprove dataset export` writes it as a LeRobot v3 dataset)")
    return 1 if problems else 0
