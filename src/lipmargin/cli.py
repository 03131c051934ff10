"""The ``lipmargin`` command line: the only place in the package that prints.

Every command is a function of parsed arguments returning an exit code; ``main(argv)`` is what the
console script and the tests call.  Expected failures (bad config, missing data, damaged
checkpoint) print one line to stderr and return 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

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
# Progress bar (stderr, only on a terminal)
# --------------------------------------------------------------------------------------------


class ProgressBar:
    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled
        self.total = 0
        self.t0 = time.perf_counter()

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = event.get("event")
        if kind == "start":
            self.total = int(event["epochs"])
            self.t0 = time.perf_counter()
            if "precision" in event:
                layout = ", channels-last" if event.get("channels_last") else ""
                self.stream.write(f"training on {event.get('device')} in {event['precision']}{layout}\n")
        elif kind == "epoch":
            done = int(event["epoch"])
            width = 24
            fill = int(width * done / max(self.total, 1))
            k = event.get("lipschitz_per_layer") or []
            kk = 1.0
            for v in k:
                kk *= v
            text = (
                f"\repoch {done}/{self.total} [{'#' * fill}{'.' * (width - fill)}] "
                f"loss {event['train_loss']:.4f} acc {event['train_accuracy']:.3f} K {kk:.3g} "
                f"{time.perf_counter() - self.t0:.0f}s"
            )
            self.stream.write(text)
            self.stream.flush()
        elif kind == "end":
            self.stream.write("\n")
            self.stream.flush()


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
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")


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
    from lipmargin.config import DEFAULT_PRESET, load_config
    from lipmargin.train import fit

    if args.resume:
        if args.config or args.preset or args.overrides:
            _err("--resume continues a run with its saved config; drop CONFIG, --preset and --set")
            return EXIT_USAGE
        out = Path(args.resume)
        cfg = None
    else:
        cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
        name = args.preset or (Path(args.config).stem if args.config else DEFAULT_PRESET)
        out = Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from lipmargin.train import dist_info_from_env

    is_main = dist_info_from_env().is_main  # under torchrun only rank 0 talks
    bar = ProgressBar(sys.stderr, enabled=is_main and not args.quiet and sys.stderr.isatty())
    if cfg is None:
        from lipmargin.config import RunConfig

        summary = fit(RunConfig(), out, resume=True, on_event=bar)
    else:
        summary = fit(cfg, out, on_event=bar)
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
        return float(num) / float(den)
    return float(text)


def _certify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--eps", help="comma-separated radii (default: the run's eval.eps); 36/255 works too")
    p.add_argument("--bound", default="sound", help="sound (default, provable) or power (converged power iteration)")
    p.add_argument("--split", default="test", choices=["test", "train"], help="which split to certify")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto")


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, split: str) -> Any:
    """A dataset split, loaded once per process (a sweep audit reads the same data for every run)."""
    from lipmargin.data import load_dataset

    return load_dataset(name, root, split)


def _load_certifiable(
    args: argparse.Namespace, split: str = "test", run_dir: str | Path | None = None
) -> tuple[Any, Any, int, list[tuple[str, float]], Any, Any]:
    """Shared by certify and audit: check --bound / --eps, load the run and its data split.

    Returns ``(cfg, model, epoch, eps_items, dataset, device)``; bad input raises ValueError (exit 2).
    """
    from lipmargin.certify import BOUND_METHODS
    from lipmargin.train import eps_key, load_run, resolve_device

    if args.bound not in BOUND_METHODS:
        raise ValueError(f"--bound must be one of {', '.join(sorted(BOUND_METHODS))}; got {args.bound!r}")
    eps_items = _parse_eps_list(args.eps) if args.eps else None
    device = resolve_device(args.device)
    cfg, model, epoch = load_run(args.run_dir if run_dir is None else run_dir, device)
    if eps_items is None:
        eps_items = [(eps_key(e), e) for e in cfg.eval.eps]
    ds = _dataset(cfg.data.name, cfg.data.root, split)
    if ds.in_shape != model.in_shape:
        raise ValueError(f"dataset {cfg.data.name} has inputs of shape {ds.in_shape} but the model expects {model.in_shape}")
    return cfg, model, epoch, eps_items, ds, device


@command("certify", "certified accuracy of a trained run", _certify_args)
def _certify(args: argparse.Namespace) -> int:
    from lipmargin.certify import certify, model_bound
    from lipmargin.train import eval_batches

    cfg, model, epoch, eps_items, ds, device = _load_certifiable(args, args.split)
    bounds = {name: model_bound(model, name) for name in sorted({args.bound, "power", "sound"})}
    result = certify(model, eval_batches(ds, cfg.eval.batch_size, device), [v for _, v in eps_items], bound=bounds[args.bound])
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
    }
    if args.json:
        print(json.dumps(payload))
    else:
        print(f"run {args.run_dir} (epoch {epoch}), {result.num_samples} {args.split} samples, bound: {result.bound_method}")
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
    p.add_argument("--quiet", action="store_true")


@command("sweep", "train a grid of configs x seeds and tabulate mean / std", _sweep_args)
def _sweep(args: argparse.Namespace) -> int:
    from lipmargin.config import config_to_dict, load_config
    from lipmargin.sweep import parse_grid, run_sweep

    cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
    base = config_to_dict(cfg)
    # --grid / --seeds given on the command line replace the preset's sweep section.
    grid = parse_grid(args.grid or list(cfg.sweep.grid))
    seeds = args.seeds if args.seeds is not None else cfg.sweep.seeds
    verbose = not args.quiet

    def progress(event: dict[str, Any]) -> None:
        if verbose and event.get("event") == "run":
            print(f"[{event['index']}/{event['total']}] {event['status']:<6} {event['run_dir']}", file=sys.stderr, flush=True)

    run_sweep(base, grid, seeds, args.out, on_event=progress, jobs=args.jobs)
    if verbose:
        print((Path(args.out) / "results.md").read_text(), end="")
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--out", help="folder for report.md and the figures (default: the run / sweep folder)")


@command("report", "write report.md with figures for a run or a sweep", _report_args)
def _report(args: argparse.Namespace) -> int:
    try:
        from lipmargin.report import write_report
    except ImportError as e:  # matplotlib missing
        _err(str(e))
        return EXIT_USAGE
    try:
        path = write_report(args.path, args.out)
    except ImportError as e:
        _err(str(e))
        return EXIT_USAGE
    print(path)
    return 0


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--eps", help="comma-separated radii (default: the run's eval.eps)")
    p.add_argument("--n", type=int, default=1000, help="test samples to audit (default 1000)")
    p.add_argument("--bound", default="sound", help="bound whose certificates are audited (sound or power)")
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--pgd-restarts", type=int, default=5)
    p.add_argument("--lobo-pairs", type=int, default=500, help="LOBO pairs (the paper: 4000)")
    p.add_argument("--lobo-steps", type=int, default=200, help="LOBO Adam steps (the paper: 1000)")
    p.add_argument("--lobo-lr", type=float, default=3e-4)
    p.add_argument("--autoattack", action="store_true", help="also run APGD-CE / APGD-T (needs lipmargin[attacks])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto")


@command("audit", "attack every certificate and bound the Lipschitz constant from below (a run, or every run of a sweep)", _audit_args)
def _audit(args: argparse.Namespace) -> int:
    from lipmargin.sweep import write_results

    for name in ("n", "pgd_steps", "pgd_restarts", "lobo_pairs", "lobo_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
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
    runs = sorted(d for d in (root / "cells").glob("*/seed-*") if (d / "summary.json").is_file())
    if not runs:
        raise ValueError(f"{root}: a sweep folder without finished runs; run `lipmargin sweep` first")
    violations = 0
    for run in runs:
        previous = _read_json(run / "audit.json")
        if previous is not None and previous.get("settings") == _audit_settings(args):
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


def _audit_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("eps", "n", "bound", "pgd_steps", "pgd_restarts", "lobo_pairs", "lobo_steps", "lobo_lr", "autoattack", "seed")
    return {k: getattr(args, k) for k in keys}


def _audit_one(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Audit one run folder and write its ``audit.json``; returns the payload."""
    import torch

    from lipmargin.audit import audit_model
    from lipmargin.checkpoint import atomic_write_text
    from lipmargin.certify import model_bound
    from lipmargin.data import input_box, to_float

    cfg, model, epoch, eps_items, test, device = _load_certifiable(args, run_dir=run_dir)
    train = _dataset(cfg.data.name, cfg.data.root, "train")
    n = min(args.n, len(test))
    x = to_float(test.inputs[:n]).to(device)
    y = test.labels[:n].to(device)
    # LOBO starts from training images chosen by the audit's seed.
    lobo_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: 2 * args.lobo_pairs]
    result = audit_model(
        model, x, y, [v for _, v in eps_items],
        lobo_inputs=to_float(train.inputs[lobo_idx]).to(device),
        bound=model_bound(model, args.bound),
        pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
        lobo_pairs=args.lobo_pairs, lobo_steps=args.lobo_steps, lobo_lr=args.lobo_lr,
        use_autoattack=args.autoattack, clamp=input_box(test.inputs), seed=args.seed,
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
        "epoch": epoch,
        "settings": _audit_settings(args),
    }
    atomic_write_text(run_dir / "audit.json", json.dumps(payload, indent=1))
    return payload


def _print_audit(run_dir: Path, payload: dict[str, Any]) -> None:
    print(f"audit of {run_dir} (epoch {payload['epoch']}) on {payload['num_samples']} test samples, "
          f"bound {payload['bound_method']}, attacks {', '.join(payload['attacks'])}")
    for label, cert in payload["certified_accuracy"].items():
        print(f"eps {label:<8} certified {cert:.4f}  empirical robust {payload['empirical_robust_accuracy'][label]:.4f}")
    print(f"Lipschitz upper {payload['lipschitz_upper']:.6g}  lower (LOBO) {payload['lipschitz_lower']:.6g}  "
          f"tightness {payload['tightness']:.4f}")
    print(f"violations: {payload['violations']}")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, help="torchscript, onnx (needs lipmargin[export]) or torch-export")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--no-check", action="store_true", help="skip re-checking the export against certify")
    p.add_argument("--batch-size", type=int, default=1000)


@command("export", "write a self-contained predictor returning (label, radius) with the sound bound baked in", _export_args)
def _export(args: argparse.Namespace) -> int:
    from lipmargin.export import export_certified

    try:
        r = export_certified(args.run_dir, args.format, args.out, check=not args.no_check, batch_size=args.batch_size)
    except ImportError as e:  # the optional extra for the format is missing
        _err(str(e))
        return EXIT_USAGE
    checked = (
        f"{r.num_samples} test samples re-checked with {r.runtime}, max relative radius difference "
        f"{r.max_relative_difference:.3g}" if r.num_samples else "not checked"
    )
    print(f"{r.path}  ({r.format}; {checked}; Lipschitz {r.lipschitz:.6g})")
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
                        help="CPU threads for torch (default: torch's choice; 1 helps on a busy shared machine)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, configure, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        configure(sp)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from lipmargin.checkpoint import CheckpointError
    from lipmargin.config import ConfigError
    from lipmargin.data import DatasetError
    from lipmargin.sweep import SweepError
    from lipmargin.train import TrainingError

    # ValueError: any other invalid argument met deeper in the library (its messages name the
    # argument); OSError: a folder that cannot be written, a full disk.
    return (ConfigError, DatasetError, CheckpointError, TrainingError, SweepError, ValueError, OSError)


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
    if args.threads is not None:
        if args.threads < 1:
            _err(f"--threads must be >= 1; got {args.threads}")
            return EXIT_USAGE
        import torch

        torch.set_num_threads(args.threads)  # the CLI owns the process; the library never does this
    try:
        return fn(args)
    except _expected_errors() as e:
        if debug:
            raise
        _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def entry() -> None:
    sys.exit(main())
