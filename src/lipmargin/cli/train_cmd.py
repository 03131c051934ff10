"""``lipmargin train``: train a run from a preset / YAML config, or resume one."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lipmargin.cli.common import EXIT_USAGE, command, config_args, err, make_progress


def _train_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--out", help="run folder (default runs/<preset>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest intact checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a run: move it aside to OUT.old-<time> and start again (nothing is deleted)")


def _format_table(summary: dict[str, Any], run_dir: Path) -> str:
    rows = [("clean accuracy", f"{summary['clean_accuracy']:.4f}")]
    from lipmargin.certify import radius_text

    for eps, acc in summary["certified_accuracy"].items():
        rows.append((f"certified accuracy @ {radius_text(float(eps))}", f"{acc:.4f}"))
    rows.append((f"Lipschitz bound ({summary['bound_method']})", f"{summary['lipschitz']:.4g}"))
    rows.append(("evaluated on", f"{summary['num_samples']} {summary.get('eval_split', 'test')} samples"))
    rows.append(("run folder", str(run_dir)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@command("train", "train a model from a preset / YAML config", _train_args)
def _train(args: argparse.Namespace) -> int:
    from lipmargin.cli.progress import train_progress
    from lipmargin.config import DEFAULT_PRESET, load_config
    from lipmargin.train import RunExistsError
    from lipmargin.train import fit

    if args.resume:
        if args.config or args.preset or args.overrides:
            err("--resume continues a run with its saved config; drop CONFIG, --preset and --set")
            return EXIT_USAGE
        if args.overwrite:
            err("--resume continues the run in RUN_DIR; --overwrite would move it aside: choose one")
            return EXIT_USAGE
        out = Path(args.resume)
        cfg = None
    else:
        cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
        name = args.preset or (Path(args.config).stem if args.config else DEFAULT_PRESET)
        out = Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from lipmargin.train import dist_info_from_env

    is_main = dist_info_from_env().is_main  # under torchrun only rank 0 talks
    show = train_progress(make_progress(args, enabled=is_main))

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "moved" and is_main:  # said even with --quiet
            print(f"lipmargin: moved the old run {event['run_dir']} to {event['moved_to']}", file=sys.stderr, flush=True)
        elif kind == "checkpoint_skipped":  # said even with --quiet
            if is_main:
                print(f"lipmargin: warning: {event['message']}", file=sys.stderr, flush=True)
        else:
            show(event)

    try:
        if cfg is None:
            import warnings

            from lipmargin.config import RunConfig
            from lipmargin.train import CheckpointSkippedWarning

            with warnings.catch_warnings():  # the event above already said it, on one line
                warnings.simplefilter("ignore", CheckpointSkippedWarning)
                summary = fit(RunConfig(), out, resume=True, on_event=on_event)
        else:
            summary = fit(cfg, out, overwrite=args.overwrite, on_event=on_event)
    except RunExistsError as e:
        err(f"{e.path} already holds a run ({', '.join(e.found)}); continue it with `lipmargin train --resume "
             f"{e.path}`, or add --overwrite to move it aside and start again (or choose another --out)")
        return EXIT_USAGE
    if is_main and not args.quiet:
        print(_format_table(summary, out))
    return 0
