"""The ``lipmargin`` command line: the only place in the package that prints.

Every command is a function of parsed arguments returning an exit code; ``main(argv)`` is what the
console script and the tests call.  Expected failures (bad config, missing data, damaged
checkpoint, a run folder that would be overwritten, out of memory) print one line to stderr and
return 2; ``--debug`` shows the traceback instead.

Building the parser imports neither torch nor the heavy parts of lipmargin (each command imports
what it needs when it runs), so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "entry", "COMMANDS"]

EXIT_USAGE = 2

CommandFn = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[CommandFn, Configure, str]] = {}


def command(name: str, help_text: str, configure: Configure) -> Callable[[CommandFn], CommandFn]:
    """Register a sub-command: ``configure(parser)`` adds its arguments, the function runs it."""

    def decorator(fn: CommandFn) -> CommandFn:
        COMMANDS[name] = (fn, configure, help_text)
        return fn

    return decorator


def _no_args(p: argparse.ArgumentParser) -> None:
    return None


def _err(message: str) -> None:
    print(f"lipmargin: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Progress (stderr; lipmargin.cli.progress draws it)
# --------------------------------------------------------------------------------------------


def _progress(args: argparse.Namespace, enabled: bool = True) -> Any:
    """The progress display for a command: silent with --quiet, a line every --progress-every
    seconds when stderr is not a terminal."""
    from lipmargin.cli.progress import Progress

    return Progress(sys.stderr, enabled=enabled and not args.quiet, every=args.progress_every)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (applied on top of --preset)")
    p.add_argument("--preset", help="named preset (see `lipmargin presets`); default digits-cll")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set loss.eps=0.5 (repeatable)")


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--out", help="run folder (default runs/<preset>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest intact checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a run: move it aside to OUT.old-<time> and start again (nothing is deleted)")


def _format_table(summary: dict[str, Any], run_dir: Path) -> str:
    rows = [("clean accuracy", f"{summary['clean_accuracy']:.4f}")]
    for eps, acc in summary["certified_accuracy"].items():
        rows.append((f"certified accuracy @ {eps}", f"{acc:.4f}"))
    rows.append((f"Lipschitz bound ({summary['bound_method']})", f"{summary['lipschitz']:.4g}"))
    rows.append(("evaluated on", f"{summary['num_samples']} {summary.get('eval_split', 'test')} samples"))
    rows.append(("run folder", str(run_dir)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@command("train", "train a model from a preset / YAML config", _train_args)
def _train(args: argparse.Namespace) -> int:
    from lipmargin.cli.progress import train_progress
    from lipmargin.config import DEFAULT_PRESET, load_config
    from lipmargin.train.runfolder import RunExistsError
    from lipmargin.train import fit

    if args.resume:
        if args.config or args.preset or args.overrides:
            _err("--resume continues a run with its saved config; drop CONFIG, --preset and --set")
            return EXIT_USAGE
        if args.overwrite:
            _err("--resume continues the run in RUN_DIR; --overwrite would move it aside: choose one")
            return EXIT_USAGE
        out = Path(args.resume)
        cfg = None
    else:
        cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
        name = args.preset or (Path(args.config).stem if args.config else DEFAULT_PRESET)
        out = Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from lipmargin.train import dist_info_from_env

    is_main = dist_info_from_env().is_main  # under torchrun only rank 0 talks
    show = train_progress(_progress(args, enabled=is_main))

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
        _err(f"{e.path} already holds a run ({', '.join(e.found)}); continue it with `lipmargin train --resume "
             f"{e.path}`, or add --overwrite to move it aside and start again (or choose another --out)")
        return EXIT_USAGE
    if is_main and not args.quiet:
        print(_format_table(summary, out))
    return 0


# --------------------------------------------------------------------------------------------
# certify
# --------------------------------------------------------------------------------------------


def _parse_eps_list(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = _eval_radius(item)
        except ValueError:
            raise ValueError(f"--eps: {item!r} is not a number (use e.g. 0.141,0.5 or 36/255)") from None
        if not value > 0:
            raise ValueError(f"--eps: radii must be > 0; got {item}")
        out.append((item, value))
    if not out:
        raise ValueError("--eps: give at least one radius, e.g. --eps 0.141,0.5")
    return out


def _eval_radius(text: str) -> float:
    if "/" in text:
        num, den = text.split("/", 1)
        if float(den) == 0:
            raise ValueError(f"{text}: division by zero")
        return float(num) / float(den)
    return float(text)


def _user_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a model trained anywhere (instead of RUN_DIR)")
    g.add_argument("--model", metavar="FILE.py:FACTORY", help="a function returning the nn.Module (maps a batch to logits)")
    g.add_argument("--weights", metavar="FILE", help="its weights: .safetensors or a torch.save state dict")
    g.add_argument("--data", metavar="NAME", help="registered dataset to certify on (see `lipmargin datasets`)")
    g.add_argument("--data-root", metavar="DIR", help="the dataset's folder (default: the dataset's own)")
    g.add_argument("--input-shape", metavar="C,H,W", help="one input's shape (default: the dataset's)")
    g.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")


_DEFAULT_USER_EPS = "36/255,72/255,108/255"


def _load_user_target(args: argparse.Namespace, split: str = "test") -> tuple[Any, tuple[int, ...], list[tuple[str, float]], Any, Any]:
    """``(model, input_shape, eps_items, dataset, device)`` for ``--model``; ValueError on bad input."""
    from lipmargin.certify import BOUND_METHODS
    from lipmargin.train import resolve_device
    from lipmargin.cli.user_model import load_user_model, parse_input_shape

    if getattr(args, "run_dir", None):
        raise ValueError("give either a run folder or --model, not both")
    if getattr(args, "checkpoint", None):
        raise ValueError("--checkpoint chooses a run's checkpoint; with --model give the weights file with --weights")
    if not args.data:
        raise ValueError("--model needs --data NAME (the dataset to certify on; see `lipmargin datasets`)")
    if args.bound not in BOUND_METHODS:
        raise ValueError(f"--bound must be one of {', '.join(sorted(BOUND_METHODS))}; got {args.bound!r}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    eps_items = _parse_eps_list(args.eps or _DEFAULT_USER_EPS)
    device = resolve_device(args.device)
    ds = _dataset(args.data, args.data_root, split)
    shape = parse_input_shape(args.input_shape) if args.input_shape else tuple(ds.input_shape)
    if tuple(ds.input_shape) != shape:
        raise ValueError(f"dataset {args.data} has inputs of shape {tuple(ds.input_shape)} but --input-shape is {shape}")
    model = load_user_model(args.model, args.weights).to(device)
    return model, shape, eps_items, ds, device


def _weights_record(weights: str | None) -> dict[str, Any] | None:
    """The weights file of a ``--model`` certificate: path and SHA-256 of its bytes (as sha256sum)."""
    if weights is None:
        return None
    import hashlib

    return {"path": str(weights), "epoch": None, "sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest()}


def _require_target(args: argparse.Namespace) -> None:
    if not args.model and not args.run_dir:
        raise ValueError("give a run folder, or --model FILE.py:FACTORY --weights W --data NAME")


def _checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="NAME|PATH",
                   help="use this checkpoint instead of the newest: a name in the run's checkpoints/ "
                        "(epoch-000001) or a path to a checkpoint's .json / .safetensors file")


def _checkpoint_text(ref: Any) -> str:
    return f"checkpoint {ref.path} (epoch {ref.epoch}, sha256 {ref.sha256})"


def _certify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help="a training run folder (or use --model)")
    _checkpoint_arg(p)
    p.add_argument("--eps", help="comma-separated radii (default: the run's eval.eps); 36/255 works too")
    p.add_argument("--bound", default="sound", help="sound (default, provable) or power (converged power iteration)")
    p.add_argument("--split", default="test", choices=["test", "train"], help="which split to certify")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    _user_model_args(p)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, split: str) -> Any:
    """A dataset split, loaded once per process (a sweep audit reads the same data for every run)."""
    from lipmargin.data import load_dataset

    return load_dataset(name, root, split)


def _load_certifiable(
    args: argparse.Namespace, split: str = "test", run_dir: str | Path | None = None
) -> tuple[Any, Any, int, list[tuple[str, float]], Any, Any, Any]:
    """Shared by certify and audit: check --bound / --eps, load the run and its data split.

    Returns ``(cfg, model, epoch, eps_items, dataset, device, checkpoint_ref)``; bad input raises
    ValueError (exit 2); a damaged newest checkpoint raises CheckpointError (exit 2, no fallback).
    """
    from lipmargin.certify import BOUND_METHODS
    from lipmargin.train import eps_key, open_run, resolve_device

    if args.bound not in BOUND_METHODS:
        raise ValueError(f"--bound must be one of {', '.join(sorted(BOUND_METHODS))}; got {args.bound!r}")
    eps_items = _parse_eps_list(args.eps) if args.eps else None
    device = resolve_device(args.device)
    loaded = open_run(args.run_dir if run_dir is None else run_dir, device, checkpoint=args.checkpoint)
    cfg, model, epoch = loaded.config, loaded.model, loaded.epoch
    if eps_items is None:
        eps_items = [(eps_key(e), e) for e in cfg.eval.eps]
    ds = _dataset(cfg.data.name, cfg.data.root, split)
    if ds.input_shape != model.in_shape:
        raise ValueError(f"dataset {cfg.data.name} has inputs of shape {ds.input_shape} but the model expects {model.in_shape}")
    return cfg, model, epoch, eps_items, ds, device, loaded.checkpoint


@command("certify", "certified accuracy of a trained run", _certify_args)
def _certify(args: argparse.Namespace) -> int:
    _require_target(args)  # before torch is imported
    from lipmargin.certify import certify, model_bound
    from lipmargin.cli.progress import certify_progress
    from lipmargin.train import eval_batches

    if args.model:
        model, shape, eps_items, ds, device = _load_user_target(args, args.split)
        epoch, batch_size, source, ref = None, args.batch_size, args.model, None
    else:
        cfg, model, epoch, eps_items, ds, device, ref = _load_certifiable(args, args.split)
        shape, batch_size, source = model.in_shape, cfg.eval.batch_size, args.run_dir
    progress = _progress(args)
    progress.status(f"certify: computing the {args.bound} bound", force=True)
    bounds = {name: model_bound(model, name, input_shape=shape) for name in sorted({args.bound, "power", "sound"})}
    result = certify(model, eval_batches(ds, batch_size, device), [v for _, v in eps_items], bound=bounds[args.bound],
                     checkpoint=ref, on_event=certify_progress(progress, len(ds)))
    progress.clear()
    cert = {label: result.certified_accuracy[float(v)] for label, v in eps_items}
    payload = {
        "clean_accuracy": result.clean_accuracy,
        "certified_accuracy": cert,
        "lipschitz": result.lipschitz,
        "lipschitz_power": bounds["power"].lipschitz,
        "lipschitz_sound": bounds["sound"].lipschitz,
        "num_samples": result.num_samples,
        "bound_method": result.bound_method,
        "sound": result.sound,
        "epoch": epoch,
        "split": args.split,
        "checkpoint": ref.to_dict(relative_to=Path(args.run_dir)) if ref is not None else _weights_record(args.weights),
    }
    if args.model:
        payload["model"] = args.model
    if args.json:
        print(json.dumps(payload))
    else:
        what = f"run {source} (epoch {epoch})" if epoch is not None else f"model {source}"
        print(f"{what}, {result.num_samples} {args.split} samples, bound: {result.bound_method}")
        if ref is not None:
            print(_checkpoint_text(ref))
        print(f"clean accuracy              {result.clean_accuracy:.4f}")
        for label, acc in cert.items():
            print(f"certified accuracy @ {label:<7} {acc:.4f}")
        print(f"Lipschitz (sound)           {bounds['sound'].lipschitz:.6g}")
        print(f"Lipschitz (power estimate)  {bounds['power'].lipschitz:.6g}")
    return 0


# --------------------------------------------------------------------------------------------
# sweep, report, audit
# --------------------------------------------------------------------------------------------


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
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
    from lipmargin.train.runfolder import RunExistsError
    from lipmargin.sweep import parse_grid, run_sweep

    cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
    base = config_to_dict(cfg)
    # --grid / --seeds given on the command line replace the preset's sweep section.
    grid = parse_grid(args.grid or list(cfg.sweep.grid))
    seeds = args.seeds if args.seeds is not None else cfg.sweep.seeds
    verbose = not args.quiet
    display = _progress(args)
    run_events = train_progress(display)

    def progress(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "moved":  # said even with --quiet
            display.clear()
            print(f"lipmargin: moved {event['run_dir']} to {event['moved_to']}", file=sys.stderr, flush=True)
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
        _err(f"{e}; re-run with --overwrite to move it aside (nothing is deleted), or choose another --out")
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
    _checkpoint_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a report: move its report files to OUT/previous-report-<time>/ first")


@command("report", "write report.md with figures for a run or a sweep", _report_args)
def _report(args: argparse.Namespace) -> int:
    try:
        from lipmargin.report import write_report
    except ImportError as e:  # matplotlib missing
        _err(str(e))
        return EXIT_USAGE
    if args.out is not None:
        from lipmargin.train.runfolder import move_report_aside, report_files

        found = report_files(args.out)
        if found and not args.overwrite:
            _err(f"{args.out} already holds a report ({found[0]}{' and more' if len(found) > 1 else ''}); "
                 "add --overwrite to move the old report files aside, or choose another --out")
            return EXIT_USAGE
        if found:
            moved = move_report_aside(args.out, found)
            print(f"lipmargin: moved the old report files of {args.out} to {moved}", file=sys.stderr, flush=True)
    try:
        path = write_report(args.path, args.out, checkpoint=args.checkpoint)
    except ImportError as e:
        _err(str(e))
        return EXIT_USAGE
    print(path)
    return 0


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_OR_SWEEP_DIR", nargs="?", help="a run or sweep folder (or use --model)")
    _checkpoint_arg(p)
    p.add_argument("--eps", help="comma-separated radii (default: the run's eval.eps)")
    p.add_argument("--n", type=int, default=1000, help="test samples to audit (default 1000)")
    p.add_argument("--bound", default="sound", help="bound whose certificates are audited (sound or power)")
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--pgd-restarts", type=int, default=5)
    p.add_argument("--lobo-pairs", type=int, default=500, help="LOBO pairs (the paper: 4000)")
    p.add_argument("--lobo-steps", type=int, default=200, help="LOBO Adam steps (the paper: 1000)")
    p.add_argument("--lobo-lr", type=float, default=3e-4)
    p.add_argument("--autoattack", action="store_true", help="also run APGD-CE / APGD-T (needs the torchattacks package)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto")
    _user_model_args(p)


@command("audit", "attack every certificate and bound the Lipschitz constant from below (a run, or every run of a sweep)", _audit_args)
def _audit(args: argparse.Namespace) -> int:
    from lipmargin.sweep import write_results

    for name in ("n", "pgd_steps", "pgd_restarts", "lobo_pairs", "lobo_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    _require_target(args)
    if args.model:
        payload = _audit_one(args, None)
        if args.json:
            print(json.dumps(payload))
        else:
            _print_audit(args.model, payload)
        return 1 if payload["violations"] else 0
    root = Path(args.run_dir)
    if not (root / "sweep.json").is_file():
        payload = _audit_one(args, root)
        if args.json:
            print(json.dumps(payload))
        else:
            _print_audit(root, payload)
        return 1 if payload["violations"] else 0

    # A sweep folder: audit each finished run not yet audited with these settings, then refresh
    # the sweep's results tables (they gain the audit column).
    # seed-<n> only: a run moved aside by --overwrite (seed-0.old-<time>) is not part of the sweep.
    runs = sorted(d for d in (root / "cells").glob("*/seed-*")
                  if d.name[5:].lstrip("-").isdigit() and (d / "summary.json").is_file())
    if not runs:
        raise ValueError(f"{root}: a sweep folder without finished runs; run `lipmargin sweep` first")
    if args.checkpoint is not None and len(Path(args.checkpoint).parts) > 1:
        raise ValueError("--checkpoint with a sweep folder takes a name (e.g. epoch-000001) used in every run, not a path")
    violations = 0
    for run in runs:
        previous = _read_json(run / "audit.json")
        if previous is not None and previous.get("settings") == _audit_settings(args) and _audited_same_weights(args, run, previous):
            payload = previous
        else:
            payload = _audit_one(args, run)
        violations += int(payload["violations"])
        if not args.json:
            print(f"{run.relative_to(root)}: violations {payload['violations']}, "
                  f"tightness {payload['tightness']:.4f}, {payload['num_samples']} samples", flush=True)
    results = write_results(root)
    if args.json:
        print(json.dumps({"runs": len(runs), "violations": violations, "cells": [
            {"params": c["params"], "audit": c.get("audit")} for c in results["cells"]]}))
    else:
        print(f"violations: {violations} over {len(runs)} runs; tables: {root / 'results.md'}")
    return 1 if violations else 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _audited_same_weights(args: argparse.Namespace, run: Path, previous: dict[str, Any]) -> bool:
    """Whether ``previous`` (an audit.json) audited the checkpoint that would be audited now."""
    from lipmargin.checkpoint import resolve_checkpoint

    ref = resolve_checkpoint(run / "checkpoints", args.checkpoint).ref  # a damaged newest one fails here
    record = previous.get("checkpoint")
    if isinstance(record, dict):
        return record.get("sha256") == ref.sha256
    return args.checkpoint is None and previous.get("epoch") == ref.epoch  # written before audits named weights


def _audit_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("eps", "n", "bound", "pgd_steps", "pgd_restarts", "lobo_pairs", "lobo_steps", "lobo_lr", "autoattack", "seed")
    return {k: getattr(args, k) for k in keys}


def _audit_one(args: argparse.Namespace, run_dir: Path | None) -> dict[str, Any]:
    """Audit one run folder and write its ``audit.json`` (or a ``--model``); returns the payload."""
    import torch

    from lipmargin.certify import audit_model
    from lipmargin.checkpoint import atomic_write_text
    from lipmargin.certify import model_bound
    from lipmargin.cli.progress import audit_progress
    from lipmargin.data import input_box, to_float

    if run_dir is None:
        model, shape, eps_items, test, device = _load_user_target(args)
        epoch, ref = None, None
        train = _dataset(args.data, args.data_root, "train")
    else:
        cfg, model, epoch, eps_items, test, device, ref = _load_certifiable(args, run_dir=run_dir)
        shape = model.in_shape
        train = _dataset(cfg.data.name, cfg.data.root, "train")
    n = min(args.n, len(test))
    x = to_float(test.inputs[:n]).to(device)
    y = test.labels[:n].to(device)
    # LOBO starts from training images chosen by the audit's seed.
    lobo_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: 2 * args.lobo_pairs]
    result = audit_model(
        model, x, y, [v for _, v in eps_items],
        lobo_inputs=to_float(train.inputs[lobo_idx]).to(device),
        bound=model_bound(model, args.bound, input_shape=shape),
        pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
        lobo_pairs=args.lobo_pairs, lobo_steps=args.lobo_steps, lobo_lr=args.lobo_lr,
        use_autoattack=args.autoattack, clamp=input_box(test.inputs), seed=args.seed, checkpoint=ref,
        on_event=audit_progress(_progress(args), f"audit {run_dir or args.model}"),
    )
    labels = {float(v): label for label, v in eps_items}
    payload = {
        "certified_accuracy": {labels[e]: v for e, v in result.certified_accuracy.items()},
        "empirical_robust_accuracy": {labels[e]: v for e, v in result.empirical_robust_accuracy.items()},
        "clean_accuracy": result.clean_accuracy,
        "violations": result.violations,
        "violation_details": result.violation_details[:20],
        "lipschitz_upper": result.lipschitz_upper,
        "lipschitz_lower": result.lipschitz_lower,
        "tightness": result.tightness,
        "per_layer": result.per_layer,
        "num_samples": result.num_samples,
        "bound_method": args.bound,
        "attacks": result.attacks,
        "notes": result.notes,
        "epoch": epoch,
        "checkpoint": ref.to_dict(relative_to=run_dir) if ref is not None else _weights_record(args.weights),
        "settings": _audit_settings(args),
    }
    if run_dir is not None:
        atomic_write_text(run_dir / "audit.json", json.dumps(payload, indent=1))
    return payload


def _print_audit(run_dir: Path | str, payload: dict[str, Any]) -> None:
    print(f"audit of {run_dir} (epoch {payload['epoch']}) on {payload['num_samples']} test samples, "
          f"bound {payload['bound_method']}, attacks {', '.join(payload['attacks'])}")
    ck = payload["checkpoint"]
    if ck is not None:
        print(f"checkpoint {ck['path']} (epoch {ck['epoch']}, sha256 {ck['sha256']})")
    for label, cert in payload["certified_accuracy"].items():
        print(f"eps {label:<8} certified {cert:.4f}  empirical robust {payload['empirical_robust_accuracy'][label]:.4f}")
    print(f"Lipschitz upper {payload['lipschitz_upper']:.6g}  lower (LOBO) {payload['lipschitz_lower']:.6g}  "
          f"tightness {payload['tightness']:.4f}")
    for note in payload.get("notes", []):
        print(f"note: {note}")
    print(f"violations: {payload['violations']}")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    _checkpoint_arg(p)
    p.add_argument("--format", required=True, help="torchscript, onnx (needs onnx, onnxscript, onnxruntime) or torch-export")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--no-check", action="store_true", help="skip re-checking the export against certify")
    p.add_argument("--batch-size", type=int, default=1000)


@command("export", "write a self-contained predictor returning (label, radius) with the sound bound baked in", _export_args)
def _export(args: argparse.Namespace) -> int:
    from lipmargin.cli.progress import export_progress
    from lipmargin.export import export_certified

    try:
        r = export_certified(args.run_dir, args.format, args.out, check=not args.no_check, batch_size=args.batch_size,
                             checkpoint=args.checkpoint, on_event=export_progress(_progress(args)))
    except ImportError as e:  # the optional extra for the format is missing
        _err(str(e))
        return EXIT_USAGE
    checked = (
        f"{r.num_samples} test samples re-checked with {r.runtime}, radii at most certify's, largest relative deflation "
        f"{r.max_relative_difference:.3g}" if r.num_samples else "not checked"
    )
    print(f"{r.path}  ({r.format}; {checked}; Lipschitz {r.lipschitz:.6g})")
    if r.checkpoint is not None:
        print(f"from {_checkpoint_text(r.checkpoint)}")
    return 0


# --------------------------------------------------------------------------------------------
# listings
# --------------------------------------------------------------------------------------------


def _print_listing(rows: dict[str, str]) -> None:
    width = max(len(n) for n in rows)
    for name, text in rows.items():
        print(f"{name:<{width}}  {text}")


@command("presets", "list the named presets", _no_args)
def _presets(args: argparse.Namespace) -> int:
    from lipmargin.config import list_presets, preset_description

    _print_listing({name: preset_description(name) for name in list_presets()})
    return 0


@command("models", "list the registered models", _no_args)
def _models(args: argparse.Namespace) -> int:
    from lipmargin.models import MODELS

    _print_listing({name: MODELS[name].description for name in sorted(MODELS)})
    return 0


@command("datasets", "list the registered datasets", _no_args)
def _datasets(args: argparse.Namespace) -> int:
    from lipmargin.data import DATASETS

    _print_listing({
        name: spec.description + (f" (default root {spec.default_root})" if spec.default_root else "")
        for name, spec in sorted(DATASETS.items())
    })
    return 0


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from lipmargin import __version__

    parser = argparse.ArgumentParser(prog="lipmargin", description="Certified L2-robust classifiers with CLL.")
    parser.add_argument("--version", action="version", version=f"lipmargin {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the cores no other process is busy on, from /proc; "
                             "OMP_NUM_THREADS, when set, is respected)")
    _output_args(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, configure, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        _output_args(sp, argparse.SUPPRESS)
        configure(sp)
    return parser


def _output_args(p: argparse.ArgumentParser, default: Any) -> None:
    """--quiet and --progress-every, before or after the command name (``default`` SUPPRESS on the
    sub-commands, so that they do not reset a value given before the command)."""
    p.add_argument("--quiet", action="store_true", default=False if default is None else default,
                   help="no progress output (train: no result table either)")
    p.add_argument("--progress-every", type=_seconds, default=30.0 if default is None else default, metavar="SECONDS",
                   help="when stderr is not a terminal, a progress line every SECONDS (default 30)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0; got {text}")
    return value


def _expected_errors() -> tuple[type[BaseException], ...]:
    from lipmargin.checkpoint import CheckpointError
    from lipmargin.config import ConfigError
    from lipmargin.data import DatasetError
    from lipmargin.train.runfolder import RunExistsError
    from lipmargin.sweep import SweepError
    from lipmargin.train import TrainingError

    # ValueError: any other invalid argument met deeper in the library (its messages name the
    # argument); OSError: a folder that cannot be written, a full disk.
    return (ConfigError, DatasetError, CheckpointError, TrainingError, SweepError, RunExistsError, ValueError, OSError)


#: Per command, the knobs that lower memory use (named in the out-of-memory message).
_MEMORY_KNOBS = {
    "train": "a smaller --set train.batch_size=N (or --set eval.batch_size=N), or --set train.device=cpu",
    "sweep": "a smaller --set train.batch_size=N, fewer --jobs, or --set train.device=cpu",
    "certify": "--device cpu, or a smaller eval.batch_size in the run's config.yaml",
    "audit": "a smaller --n, --lobo-pairs, or --device cpu",
    "export": "a smaller --batch-size",
    "report": "a smaller eval.batch_size in the run's config.yaml",
}


def _out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError (a RuntimeError), CPU allocator failures and MemoryError."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _memory_message(command: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(first) > 160:
        first = first[:157] + "..."
    knobs = _MEMORY_KNOBS.get(command, "a smaller batch size or another --device")
    return f"out of memory ({first}); try {knobs}"


def _set_threads(threads: int | None) -> str | None:
    """Set torch's CPU threads: ``--threads``, else OMP_NUM_THREADS when set (torch reads it itself),
    else :func:`lipmargin.threads.auto_threads`.  Returns an error message for a bad value."""
    import os

    if threads is not None and threads < 1:
        return f"--threads must be >= 1; got {threads}"
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        from lipmargin.threads import auto_threads

        threads = auto_threads()
    import torch

    torch.set_num_threads(threads)  # the CLI owns the process; the library never does this
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage message
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    fn = COMMANDS[args.command][0]
    debug = bool(getattr(args, "debug", False))
    problem = _set_threads(args.threads)
    if problem:
        _err(problem)
        return EXIT_USAGE
    try:
        return fn(args)
    except (MemoryError, RuntimeError) as e:
        if debug or not (_out_of_memory(e) or isinstance(e, _expected_errors())):
            raise
        _err(_memory_message(args.command, e) if _out_of_memory(e) else _first_line(e))
        return EXIT_USAGE
    except (ValueError, OSError, ImportError) as e:  # bad input (the library's errors subclass ValueError), a missing extra
        if debug:
            raise
        _err(_first_line(e))
        return EXIT_USAGE
    except _expected_errors() as e:
        if debug:
            raise
        _err(_first_line(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def entry() -> None:
    sys.exit(main())
