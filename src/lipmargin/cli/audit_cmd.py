"""``lipmargin audit``: attack every certificate and bound the Lipschitz constant from below, for a
run, every run of a sweep, or a ``--model FILE.py:FACTORY``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lipmargin.cli.common import checkpoint_arg, command, make_progress
from lipmargin.cli.targets import cached_dataset, load_certifiable, load_user_target, require_target, user_model_args, weights_record


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_OR_SWEEP_DIR", nargs="?", help="a run or sweep folder (or use --model)")
    checkpoint_arg(p)
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
    user_model_args(p)


@command("audit", "attack every certificate and bound the Lipschitz constant from below (a run, or every run of a sweep)", _audit_args)
def _audit(args: argparse.Namespace) -> int:
    from lipmargin.sweep import write_results

    for name in ("n", "pgd_steps", "pgd_restarts", "lobo_pairs", "lobo_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    require_target(args)
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
    from lipmargin._io import atomic_write_text
    from lipmargin.certify import model_bound
    from lipmargin.cli.progress import audit_progress
    from lipmargin.data import input_box, to_float

    if run_dir is None:
        model, shape, eps_items, test, device = load_user_target(args)
        epoch, ref = None, None
        train = cached_dataset(args.data, args.data_root, "train")
    else:
        cfg, model, epoch, eps_items, test, device, ref = load_certifiable(args, run_dir=run_dir)
        shape = model.in_shape
        train = cached_dataset(cfg.data.name, cfg.data.root, "train")
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
        on_event=audit_progress(make_progress(args), f"audit {run_dir or args.model}"),
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
        "checkpoint": ref.to_dict(relative_to=run_dir) if ref is not None else weights_record(args.weights),
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
