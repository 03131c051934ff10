"""What certify and audit work on: a run folder or a ``--model FILE.py:FACTORY``, its data split
and the ``--eps`` radii.  Heavy modules are imported inside the functions."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

__all__ = ["parse_eps_list", "user_model_args", "load_user_target", "weights_record", "require_target",
           "cached_dataset", "load_certifiable", "PRETRAINED_PREFIX", "is_pretrained", "load_pretrained_target"]

PRETRAINED_PREFIX = "pretrained:"


def is_pretrained(args: argparse.Namespace) -> bool:
    return str(getattr(args, "run_dir", None) or "").startswith(PRETRAINED_PREFIX)


def load_pretrained_target(
    args: argparse.Namespace, split: str = "test"
) -> tuple[Any, tuple[int, ...], list[tuple[str, float]], Any, Any, dict[str, Any]]:
    """``(model, input_shape, eps_items, dataset, device, weights_record)`` for ``pretrained:NAME``.

    The dataset is the evaluation sample shipped with the model (seconds, no data files needed);
    with ``--data-root DIR`` it is the dataset's whole ``split`` read from DIR instead.
    """
    from lipmargin.certify import BOUND_METHODS
    from lipmargin.pretrained import list_pretrained, load_pretrained, pretrained_eval_sample
    from lipmargin.train import eps_key, resolve_device

    name = str(args.run_dir)[len(PRETRAINED_PREFIX):]
    if name not in list_pretrained():
        raise ValueError(f"unknown pretrained model {name!r}; shipped: {', '.join(list_pretrained())}")
    if getattr(args, "checkpoint", None) or getattr(args, "weights", None) or getattr(args, "model", None):
        raise ValueError("pretrained:NAME brings its own weights: drop --checkpoint / --model / --weights")
    if args.bound not in BOUND_METHODS:
        raise ValueError(f"--bound must be one of {', '.join(sorted(BOUND_METHODS))}; got {args.bound!r}")
    device = resolve_device(args.device)
    model, info = load_pretrained(name)
    eps_items = parse_eps_list(args.eps) if args.eps else [(eps_key(e), float(e)) for e in info["eval_eps"]]
    if getattr(args, "data_root", None):
        ds = cached_dataset(info["dataset"], args.data_root, split)
    else:
        ds = pretrained_eval_sample(name)
    record = {"pretrained": name, "sha256": info["weights"]["sha256"], "epoch": info["weights"].get("epoch")}
    return model.to(device), tuple(model.in_shape), eps_items, ds, device, record


def parse_eps_list(text: str) -> list[tuple[str, float]]:
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


def user_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a model trained anywhere (instead of RUN_DIR)")
    g.add_argument("--model", metavar="FILE.py:FACTORY", help="a function returning the nn.Module (maps a batch to logits)")
    g.add_argument("--weights", metavar="FILE", help="its weights: .safetensors or a torch.save state dict")
    g.add_argument("--data", metavar="NAME", help="registered dataset to certify on (see `lipmargin datasets`)")
    g.add_argument("--data-root", metavar="DIR", help="the dataset's folder (default: the dataset's own)")
    g.add_argument("--input-shape", metavar="C,H,W", help="one input's shape (default: the dataset's)")
    g.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")


_DEFAULT_USER_EPS = "36/255,72/255,108/255"


def load_user_target(args: argparse.Namespace, split: str = "test") -> tuple[Any, tuple[int, ...], list[tuple[str, float]], Any, Any]:
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
    eps_items = parse_eps_list(args.eps or _DEFAULT_USER_EPS)
    device = resolve_device(args.device)
    ds = cached_dataset(args.data, args.data_root, split)
    shape = parse_input_shape(args.input_shape) if args.input_shape else tuple(ds.input_shape)
    if tuple(ds.input_shape) != shape:
        raise ValueError(f"dataset {args.data} has inputs of shape {tuple(ds.input_shape)} but --input-shape is {shape}")
    model = load_user_model(args.model, args.weights).to(device)
    return model, shape, eps_items, ds, device


def weights_record(weights: str | None) -> dict[str, Any] | None:
    """The weights file of a ``--model`` certificate: path and SHA-256 of its bytes (as sha256sum)."""
    if weights is None:
        return None
    import hashlib

    return {"path": str(weights), "epoch": None, "sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest()}


def require_target(args: argparse.Namespace) -> None:
    if not args.model and not args.run_dir:
        raise ValueError("give a run folder, pretrained:NAME, or --model FILE.py:FACTORY --weights W --data NAME")


@functools.lru_cache(maxsize=4)
def cached_dataset(name: str, root: str | None, split: str) -> Any:
    """A dataset split, loaded once per process (a sweep audit reads the same data for every run)."""
    from lipmargin.data import load_dataset

    return load_dataset(name, root, split)


def load_certifiable(
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
    eps_items = parse_eps_list(args.eps) if args.eps else None
    device = resolve_device(args.device)
    loaded = open_run(args.run_dir if run_dir is None else run_dir, device, checkpoint=args.checkpoint)
    cfg, model, epoch = loaded.config, loaded.model, loaded.epoch
    if eps_items is None:
        eps_items = [(eps_key(e), e) for e in cfg.eval.eps]
    ds = cached_dataset(cfg.data.name, cfg.data.root, split)
    if ds.input_shape != model.in_shape:
        raise ValueError(f"dataset {cfg.data.name} has inputs of shape {ds.input_shape} but the model expects {model.in_shape}")
    return cfg, model, epoch, eps_items, ds, device, loaded.checkpoint
