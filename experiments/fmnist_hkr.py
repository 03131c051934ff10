"""deel-torchlip's HKR baseline on Fashion-MNIST, on lipmargin's data budget, certified soundly.

One run: train deel-torchlip's Fashion-MNIST tutorial network (``experiments/fmnist_hkr_model.py``,
optionally widened) with ``deel.torchlip.HKRMulticlassLoss(alpha, min_margin)`` on exactly the
images, subset and augmentation a lipmargin run of the preset ``fmnist-4c3f-cll`` sees with
``data.train_size=N data.val_fraction=F train.seed=S train.batch_size=B`` (they come from
lipmargin's own ``load_config`` / ``load_run_data`` / ``DeviceLoader``, as in ``fit``); then
``vanilla_export()``, convert it to a :class:`lipmargin.LipschitzNet` of plain layers
(``benchmarks/peer_deel_torchlip.py``), check the converted logits equal the exported ones, and
certify it with lipmargin's *sound* bound on the run's evaluation set (the validation part when
F > 0, else the 10,000 test images) at the preset's ``eval.eps`` (36/255, 72/255, 108/255 to 7
digits, 0.5, 1.0).  Optionally ``lipmargin audit`` attacks the certificates.

    python experiments/fmnist_hkr.py OUT_RUN_DIR --alpha 0.99 --margin 0.25 --seed 0 --epochs 30 \\
        --milestones 20,27 --batch-size 128 [--train-size N] [--val-fraction F] [--lr 1e-3] \\
        [--width-mult W] [--audit-n 1000 --autoattack --lobo-pairs 500 --audit-eps 0.1411765,0.5] \\
        [--device auto] [--threads 1]

OUT_RUN_DIR receives ``command.txt``, ``metrics.jsonl`` (one line per epoch), ``model.safetensors``
(the converted network, loadable with ``--model experiments/fmnist_hkr_model.py:hkr_w<W>``),
``certificates.csv``, ``summary.json`` (written last, atomically: it marks the run finished) and,
with ``--audit-n``, ``audit.json``.  A finished run with the same settings is not trained again; one
with other settings is refused (exit 2); a run killed before ``summary.json`` is trained again from
the start.  An audit is redone only when its settings or the weights changed; it runs ``lipmargin
audit --model experiments/fmnist_hkr_model.py:hkr_w<W> --weights OUT/model.safetensors --data
fashion-mnist`` as a subprocess, i.e. on the first N *test* images (also when the run evaluates on a
validation part), and its clean / certified accuracies and Lipschitz bound are checked against this
run's model recomputed in-process on those images.  Bad input is a one-line error and exit 2.

HKR in deel-torchlip 1.0.5 (``deel/torchlip/functional.py``: ``hkr_multiclass_loss``,
``hinge_multiclass_loss``, ``kr_loss_standard``).  For logits ``f`` (K = 10 classes), one-hot
targets ``t`` and a batch of B samples, ``s_k = +1`` if k = y else -1::

    hinge_i = (1/K) [ (K-1) relu(m/2 - f_y(x_i)) + sum_{j != y} relu(m/2 + f_j(x_i)) ]
    KR      = (1/K) sum_k [ mean_{i: y_i = k} f_k(x_i) - mean_{i: y_i != k} f_k(x_i) ]   (batch estimate)
    loss    = mean_i alpha * hinge_i  -  (1 - alpha) * KR

- ``alpha`` in [0, 1] weighs hinge against KR (1: hinge only; 0: KR only, ``min_margin`` unused).
  deel 1.0.5 still accepts alpha > 1 (the old convention) with a deprecation warning and uses
  alpha / (1 + alpha); this runner refuses anything outside [0, 1].
- ``min_margin`` = m: the hinge is zero for a sample exactly when ``f_y >= m/2`` and
  ``f_j <= -m/2`` for every j != y, which implies the logit margin ``f_y - f_j >= m`` (each logit
  is a one-vs-rest score thresholded at 0, the margin split symmetrically around it).
- Certified radius: lipmargin certifies ``min_j (f_y - f_j) / L_yj`` with ``L_yj`` a sound bound of
  ``Lip(f_y - f_j) <= Lip(features) * ||w_y - w_j||`` (head rows w).  deel makes the feature map
  1-Lipschitz and, with ``disjoint_neurons=True``, every head row unit-norm, so
  ``L_yj <= 2``; it is ``sqrt(2)`` for orthogonal rows (the value for any 1-Lipschitz vector map
  f, since ``f_y - f_j = <e_y - e_j, f>``), and smaller for aligned rows.  A sample whose hinge
  is satisfied therefore has a certified radius of at least ``m / L_yj``: about ``m / sqrt(2)``,
  never less than ``m / 2`` (times 1 / the sound feature bound, which is ~1 for deel's layers).
  To target radius eps take ``m >= sqrt(2) * eps`` (``2 * eps`` for the worst case); the KR term
  keeps pushing every margin up, more so for smaller alpha.

The loader, optimizer (AdamW, ``optim.weight_decay`` = 0 as in lipmargin: the same as Adam) and
schedule (MultiStepLR x ``optim.gamma`` = 0.1 at the milestones) are lipmargin's; the model is drawn
after ``torch.manual_seed(S)``.  Summary keys follow lipmargin's ``summary.json`` (``lipschitz`` =
the sound bound of ``max_ij Lip(f_i - f_j)``), plus ``params`` (alpha, margin, width_mult) and
``settings`` (everything that defines the run; a rerun must match them).  In ``metrics.jsonl``,
``lr`` is the rate after the epoch's scheduler step (as lipmargin writes it) and ``lr_epoch`` the
rate the epoch trained with.  ``audit.json`` is ``lipmargin audit --json``'s object with the
radius labels rewritten to the summary's keys (``0.1411765`` -> ``0.141177``), plus ``runner``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
MODEL_FILE = HERE / "fmnist_hkr_model.py"
PRESET = "fmnist-4c3f-cll"
AUDIT_FIXED = {"pgd_steps": 20, "pgd_restarts": 2, "lobo_steps": 100}


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        raise UsageError(message)


def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}; got {v}")
        return v
    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite; got {text}")
    return v


def _radii(text: str) -> list[float]:
    values = [_float(item) for item in text.split(",") if item.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"radii must be a comma-separated list of numbers > 0; got {text!r}")
    return values


def _milestones(text: str) -> list[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        values = [int(s) for s in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of epochs (e.g. 20,27)") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"epochs must be >= 1; got {text}")
    if values != sorted(values):
        raise argparse.ArgumentTypeError(f"epochs must not decrease; got {text}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="fmnist_hkr.py", description=__doc__.splitlines()[0])
    p.add_argument("out", metavar="OUT_RUN_DIR")
    p.add_argument("--alpha", type=_float, required=True, help="HKR alpha in [0, 1] (1: hinge only)")
    p.add_argument("--margin", type=_float, required=True, help="HKR min_margin > 0 (target logit margin)")
    p.add_argument("--seed", type=_nonneg_int, required=True)
    p.add_argument("--epochs", type=_positive_int, required=True)
    p.add_argument("--milestones", type=_milestones, required=True, help="epochs of the x0.1 steps, e.g. 20,27")
    p.add_argument("--batch-size", type=_positive_int, required=True)
    p.add_argument("--train-size", type=_positive_int, default=None, help="stratified subset (data.train_size)")
    p.add_argument("--val-fraction", type=_float, default=0.0, help="data.val_fraction (> 0: evaluate on it)")
    p.add_argument("--lr", type=_float, default=1e-3)
    p.add_argument("--width-mult", type=_positive_int, default=1)
    p.add_argument("--device", default="auto", help="training device: auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads, also for the audit (default 1)")
    a = p.add_argument_group("audit (lipmargin audit of the converted model on the first N test images)")
    a.add_argument("--audit-n", type=_positive_int, default=None)
    a.add_argument("--autoattack", action="store_true")
    a.add_argument("--lobo-pairs", type=_positive_int, default=None, help="LOBO pairs (default 500)")
    a.add_argument("--audit-eps", type=_radii, default=None, help="comma-separated radii attacked (default: the preset's eval.eps)")
    args = p.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1] (deel-torchlip's HKR weight of the hinge); got {args.alpha}")
    if not args.margin > 0:
        raise UsageError(f"--margin must be > 0; got {args.margin}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0; got {args.lr}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1); got {args.val_fraction}")
    if args.audit_n is None and (args.autoattack or args.lobo_pairs is not None or args.audit_eps is not None):
        raise UsageError("--autoattack / --lobo-pairs / --audit-eps only apply with --audit-n N")
    if args.lobo_pairs is None:
        args.lobo_pairs = 500
    return args


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that defines the trained model and its evaluation (device and threads do not)."""
    return {
        "preset": PRESET, "alpha": args.alpha, "margin": args.margin, "seed": args.seed, "epochs": args.epochs,
        "milestones": list(args.milestones), "batch_size": args.batch_size, "train_size": args.train_size,
        "val_fraction": args.val_fraction, "lr": args.lr, "width_mult": args.width_mult,
    }


def audit_settings(args: argparse.Namespace, eps: list[float], weights_sha256: str) -> dict[str, Any]:
    return {"n": args.audit_n, "autoattack": args.autoattack, "lobo_pairs": args.lobo_pairs, **AUDIT_FIXED,
            "eps": list(eps), "factory": f"{MODEL_FILE.name}:hkr_w{args.width_mult}", "weights_sha256": weights_sha256}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------


def lipmargin_config(args: argparse.Namespace) -> Any:
    """The lipmargin config whose data (and optimizer / schedule) this run shares."""
    from lipmargin import load_config

    overrides = [
        f"train.seed={args.seed}", f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
        f"data.val_fraction={args.val_fraction}", f"optim.lr={args.lr}", f"optim.milestones={list(args.milestones)}",
    ]
    if args.train_size is not None:
        overrides.append(f"data.train_size={args.train_size}")
    return load_config(preset=PRESET, overrides=overrides), overrides


def train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from lipmargin._io import atomic_write_bytes, atomic_write_text
    from lipmargin.data import DATASETS, DeviceLoader
    from lipmargin.train import build_optimizer, evaluate, load_run_data, metrics_record, resolve_device, write_certificates
    from lipmargin.train.errors import TrainingError
    from safetensors.torch import save as safetensors_save

    import fmnist_hkr_model as hm
    from deel import torchlip

    peer = hm.peer
    try:
        cfg, overrides = lipmargin_config(args)
        device = resolve_device(args.device)
        data = load_run_data(cfg)  # as fit: split, then stratified subsets from train.seed
    except (ValueError, TrainingError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if tuple(data.train.input_shape) != hm.IN_SHAPE or data.train.num_classes != hm.NUM_CLASSES:
        raise SystemExit(f"unexpected data shape {data.train.input_shape} / {data.train.num_classes} classes")
    aug = DATASETS[cfg.data.name].augment if cfg.data.augment else None
    loader = DeviceLoader(data.train, cfg.train.batch_size, device=device, shuffle=True, augment=aug, seed=cfg.train.seed)

    # The GroupSort pairing convention the peer script's conversion assumes.
    z = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    swap = torch.arange(8).view(4, 2).flip(1).reshape(-1)
    if not torch.equal(peer.GroupSort(2)(z), torchlip.GroupSort2()(z)[:, swap]):
        raise SystemExit("GroupSort pairing differs from the convention the conversion assumes")

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "command.txt", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) + "\n")
    metrics_path = out / "metrics.jsonl"
    atomic_write_text(metrics_path, "")  # a fresh run (an unfinished one is restarted)
    torch.manual_seed(args.seed)
    net = hm.deel_model(args.width_mult).to(device)
    loss_fn = torchlip.HKRMulticlassLoss(alpha=args.alpha, min_margin=args.margin)
    optimizer = build_optimizer(net, cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.optim.milestones), cfg.optim.gamma)
    log(f"deel-torchlip {metadata.version('deel-torchlip')}: width x{args.width_mult}, "
        f"{sum(p.numel() for p in net.parameters())} parameters; {len(data.train)} training images "
        f"({len(loader)} batches of {cfg.train.batch_size}), {data.eval_split} set {len(data.eval)}; device {device}")
    train_seconds = 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        net.train()
        loader.set_epoch(epoch)
        lr_epoch = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        n = 0
        for x, y in loader:
            output = net(x)
            loss = loss_fn(output, F.one_hot(y, num_classes=hm.NUM_CLASSES))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * y.shape[0]
            correct += (output.detach().argmax(1) == y).sum()
            n += y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        scheduler.step()
        train_seconds += seconds
        record = {"epoch": epoch, "train_loss": float(total) / n, "train_accuracy": int(correct) / n,
                  "lr": optimizer.param_groups[0]["lr"], "lr_epoch": lr_epoch, "seconds": seconds}
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"  epoch {epoch}/{cfg.train.epochs}: loss {record['train_loss']:.4f}, train acc "
            f"{record['train_accuracy']:.4f}, lr {lr_epoch:g}, {seconds:.1f} s")

    # Export, convert, check the logits (float64, as the peer script).
    net = net.cpu()
    exported, converted = hm.export_and_convert(net)
    x_check = torch.cat([x for x, _ in DeviceLoader(data.eval, 256)])[:256]
    with torch.no_grad():
        ref = copy.deepcopy(exported).double()(x_check.double())
        got = copy.deepcopy(converted).double()(x_check.double())
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    max_diff = float((got - ref).abs().max())
    log(f"converted LipschitzNet reproduces the exported logits (float64 max |diff| {max_diff:.1e})")

    # Save, then rebuild through the audit's factory and check it computes the same logits.
    state = {k: v.detach().contiguous() for k, v in converted.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", safetensors_save(state))
    from lipmargin.cli.user_model import load_user_model

    reloaded = load_user_model(f"{MODEL_FILE}:hkr_w{args.width_mult}", out / "model.safetensors")
    with torch.no_grad():
        if not torch.equal(reloaded(x_check), converted(x_check)):
            raise SystemExit("the factory's model with the saved weights computes other logits")

    result = evaluate(converted, data.eval, cfg.eval.eps, method="sound", batch_size=cfg.eval.batch_size)
    checks = peer.empirical_checks(converted, result.bound.pairwise, x_check)
    peer.report_checks(checks)
    write_certificates(out / "certificates.csv", result)
    head = converted.head.weight.detach().double()
    summary = {
        **metrics_record(result),
        "epochs": cfg.train.epochs,
        "eval_split": data.eval_split,
        "train_seconds": train_seconds,
        "num_parameters": sum(p.numel() for p in converted.parameters()),
        "model": f"deel-torchlip {metadata.version('deel-torchlip')} tutorial net (l2 pool) x{args.width_mult}, converted",
        "loss": "hkr",
        "dataset": cfg.data.name,
        "seed": args.seed,
        "precision": "fp32",
        "channels_last": False,
        "device": device.type,
        "num_train_samples": len(data.train),
        "params": {"alpha": args.alpha, "margin": args.margin, "width_mult": args.width_mult},
        "settings": run_settings(args),
        "lipmargin_overrides": overrides,
        "deel_torchlip_version": metadata.version("deel-torchlip"),
        "weights": {"path": "model.safetensors", "sha256": sha256(out / "model.safetensors")},
        "converted_logits_max_abs_diff": max_diff,
        "head_row_norm_max": float(head.norm(dim=1).max()),
        "empirical_pair_ratio": checks["pair_ratio"],
        "empirical_grad_ratio": checks["grad_ratio"],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return summary


def run_audit(args: argparse.Namespace, out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    import torch

    import lipmargin
    from lipmargin._io import atomic_write_text
    from lipmargin.certify import certify, model_bound
    from lipmargin.cli.user_model import load_user_model
    from lipmargin.data import load_dataset, to_float
    from lipmargin.train import eps_key

    weights = out / "model.safetensors"
    if not weights.is_file() or sha256(weights) != summary.get("weights", {}).get("sha256"):
        raise UsageError(f"{weights} is missing or is not the model summary.json describes; remove {out} and rerun")
    cfg, _ = lipmargin_config(args)
    eps = list(args.audit_eps) if args.audit_eps is not None else [float(e) for e in cfg.eval.eps]
    settings = audit_settings(args, eps, summary["weights"]["sha256"])
    previous = read_json(out / "audit.json")
    if previous is not None and previous.get("runner", {}).get("settings") == settings:
        log(f"audit.json with these settings exists: violations {previous['violations']}")
        return previous
    spec = f"{MODEL_FILE}:hkr_w{args.width_mult}"
    cmd = [sys.executable, "-m", "lipmargin", "--threads", str(args.threads), "--quiet", "audit",
           "--model", spec, "--weights", str(weights), "--data", "fashion-mnist", "--n", str(args.audit_n),
           "--eps", ",".join(repr(e) for e in eps), "--pgd-steps", str(AUDIT_FIXED["pgd_steps"]),
           "--pgd-restarts", str(AUDIT_FIXED["pgd_restarts"]), "--lobo-pairs", str(args.lobo_pairs),
           "--lobo-steps", str(AUDIT_FIXED["lobo_steps"]), "--json"]
    if args.autoattack:
        cmd.append("--autoattack")
    env = dict(os.environ)
    src = str(Path(lipmargin.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    log("audit: " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"lipmargin audit failed (exit {proc.returncode})")
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("certified_accuracy", "empirical_robust_accuracy"):
        payload[key] = {eps_key(float(label)): v for label, v in payload[key].items()}

    # The audit must have certified and attacked this run's converted model: recompute its clean
    # and certified accuracy on the same test images with the factory's model and the saved weights.
    test = load_dataset("fashion-mnist", None, "test")
    n = min(args.audit_n, len(test))
    model = load_user_model(spec, weights)
    x, y = to_float(test.inputs[:n]), test.labels[:n]
    mine = certify(model, [(x, y)], eps, bound=model_bound(copy.deepcopy(model), "sound", input_shape=tuple(x.shape[1:])))
    expect = {"clean_accuracy": mine.clean_accuracy,
              "certified_accuracy": {eps_key(e): v for e, v in mine.certified_accuracy.items()}}
    if payload["clean_accuracy"] != expect["clean_accuracy"] or payload["certified_accuracy"] != expect["certified_accuracy"]:
        raise SystemExit(f"the audit's accuracies {payload['clean_accuracy']} / {payload['certified_accuracy']} are not "
                         f"this model's {expect['clean_accuracy']} / {expect['certified_accuracy']}")
    if abs(payload["lipschitz_upper"] - summary["lipschitz"]) > 1e-9 * max(1.0, summary["lipschitz"]):
        raise SystemExit(f"the audit's Lipschitz bound {payload['lipschitz_upper']} is not the summary's {summary['lipschitz']}")
    payload["runner"] = {"settings": settings, "command": cmd, "seconds": seconds, "exit_code": proc.returncode,
                         "checked_against_model": expect}
    atomic_write_text(out / "audit.json", json.dumps(payload, indent=1))
    log(f"audit ({payload['num_samples']} test images, {seconds:.0f} s): clean {payload['clean_accuracy']:.4f} "
        f"(= this model's), violations {payload['violations']}, tightness {payload['tightness']:.4f}")
    return payload


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} exists and is not a folder")
        import torch

        torch.set_num_threads(args.threads)
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        summary = read_json(out / "summary.json")
        if summary is None and ((out / "config.yaml").exists() or (out / "checkpoints").exists()):
            raise UsageError(f"{out} holds a lipmargin run (config.yaml / checkpoints); use another folder")
        if summary is not None:
            if summary.get("settings") != run_settings(args):
                raise UsageError(f"{out} holds a finished run with other settings ({summary.get('settings')}); "
                                 f"use another folder")
            log(f"{out}: finished run with these settings; not training again")
        else:
            summary = train(args, out)
        cra = ", ".join(f"{k} {v:.4f}" for k, v in summary["certified_accuracy"].items())
        log(f"{summary['eval_split']} ({summary['num_samples']}): clean {summary['clean_accuracy']:.4f}; sound certified {cra}; "
            f"Lip(f_i-f_j) <= {summary['lipschitz']:.4f}; {summary['num_parameters']} parameters, "
            f"train {summary['train_seconds']:.1f} s")
        if args.audit_n is not None:
            payload = run_audit(args, out, summary)
            if payload["violations"]:
                print(f"error: the audit found {payload['violations']} violations (see {out / 'audit.json'})", file=sys.stderr)
                return 1
        return 0
    except UsageError as e:
        print(f"fmnist_hkr.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
