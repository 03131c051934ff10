"""``lipmargin sweep`` (a grid of configs x seeds) and ``lipmargin report`` (report.md with figures)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lipmargin.cli.common import EXIT_USAGE, checkpoint_arg, command, config_args, err, make_progress


def _sweep_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept config key and its values, e.g. --grid loss.p=0.01,0.3 (repeatable)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell: train.seed, train.seed+1, ... (default: the preset's sweep.seeds, else 1)")
    p.add_argument("--out", required=True, help="sweep folder (re-running continues where it stopped)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once in separate processes (they share a GPU, or spread over several)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out (or a cell in it) holds runs of a different config: move them aside to *.old-<time>")
    p.add_argument("--batched", action="store_true", help="train runs that share model, data and schedule as one stacked model (same results)")
    p.add_argument("--group-size", type=int, default=None, help="with --batched: at most N runs per stacked model (to fit memory)")


@command("sweep", "train a grid of configs x seeds and tabulate mean / std", _sweep_args)
def _sweep(args: argparse.Namespace) -> int:
    from lipmargin.cli.progress import train_progress
    from lipmargin.config import config_to_dict, load_config
    from lipmargin.train import RunExistsError
    from lipmargin.sweep import parse_grid, run_sweep

    cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
    base = config_to_dict(cfg)
    # --grid / --seeds given on the command line replace the preset's sweep section.
    grid = parse_grid(args.grid or list(cfg.sweep.grid))
    seeds = args.seeds if args.seeds is not None else cfg.sweep.seeds
    verbose = not args.quiet
    display = make_progress(args)
    run_events = train_progress(display)

    def progress(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "moved":  # said even with --quiet
            display.clear()
            print(f"lipmargin: moved {event['run_dir']} to {event['moved_to']}", file=sys.stderr, flush=True)
        elif kind == "extended":  # said even with --quiet
            display.clear()
            print(f"lipmargin: {event['run_dir']}: extending the sweep (finished runs are kept)", file=sys.stderr, flush=True)
        elif kind == "run":
            display.line(f"[{event['index']}/{event['total']}] {event['status']:<6} {event['run_dir']}")
        elif kind == "group":  # a batched group: members, epoch
            if event["epoch"] == event["epochs"]:
                display.line(_group_line(event))
            else:
                display.status(_group_line(event), force=event["epoch"] == 0)
        else:  # the current run's training progress
            run_events(event)

    try:
        run_sweep(base, grid, seeds, args.out, on_event=progress, jobs=args.jobs, overwrite=args.overwrite,
                  batched=args.batched, group_size=args.group_size)
    except RunExistsError as e:
        err(f"{e}; re-run with --overwrite to move it aside (nothing is deleted), or choose another --out")
        return EXIT_USAGE
    if verbose:
        print((Path(args.out) / "results.md").read_text(), end="")
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _group_line(event: dict[str, Any]) -> str:
    """The progress line of a batched group: members, epoch."""
    failed = f", {event['failed']} failed" if event.get("failed") else ""
    return f"group {event['group']}/{event['groups']}: {event['members']} members, epoch {event['epoch']}/{event['epochs']}{failed}"


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--out", help="folder for report.md and the figures (default: the run / sweep folder)")
    checkpoint_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a report: move its report files to OUT/previous-report-<time>/ first")


@command("report", "write report.md with figures for a run or a sweep", _report_args)
def _report(args: argparse.Namespace) -> int:
    try:
        from lipmargin.report import write_report
    except ImportError as e:  # matplotlib missing
        err(str(e))
        return EXIT_USAGE
    if args.out is not None:
        from lipmargin.train.runfolder import move_report_aside, report_files

        found = report_files(args.out)
        if found and not args.overwrite:
            err(f"{args.out} already holds a report ({found[0]}{' and more' if len(found) > 1 else ''}); "
                 "add --overwrite to move the old report files aside, or choose another --out")
            return EXIT_USAGE
        if found:
            moved = move_report_aside(args.out, found)
            print(f"lipmargin: moved the old report files of {args.out} to {moved}", file=sys.stderr, flush=True)
    try:
        path = write_report(args.path, args.out, checkpoint=args.checkpoint)
    except ImportError as e:
        err(str(e))
        return EXIT_USAGE
    print(path)
    return 0
