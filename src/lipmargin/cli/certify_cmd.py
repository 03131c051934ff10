"""``lipmargin certify``: certified accuracy of a run folder or of a ``--model FILE.py:FACTORY``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lipmargin.cli.common import checkpoint_arg, checkpoint_text, command, make_progress
from lipmargin.cli.targets import (
    is_pretrained,
    load_certifiable,
    load_pretrained_target,
    load_user_target,
    require_target,
    user_model_args,
    weights_record,
)


def _certify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help="a training run folder, or pretrained:NAME (a shipped model, on its own "
                   "evaluation sample; with --data-root DIR on the full split), or use --model")
    checkpoint_arg(p)
    p.add_argument("--eps", help="comma-separated radii (default: the run's eval.eps); 36/255 works too")
    p.add_argument("--bound", default="sound", help="sound (default, provable) or power (converged power iteration)")
    p.add_argument("--split", default="test", choices=["test", "train"], help="which split to certify")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    user_model_args(p)


@command("certify", "certified accuracy of a trained run", _certify_args)
def _certify(args: argparse.Namespace) -> int:
    require_target(args)  # before torch is imported
    from lipmargin.certify import certify, model_bound
    from lipmargin.cli.progress import certify_progress
    from lipmargin.train import eval_batches

    pretrained_record = None
    if is_pretrained(args):
        model, shape, eps_items, ds, device, pretrained_record = load_pretrained_target(args, args.split)
        epoch, batch_size, source, ref = pretrained_record["epoch"], args.batch_size, args.run_dir, None
    elif args.model:
        model, shape, eps_items, ds, device = load_user_target(args, args.split)
        epoch, batch_size, source, ref = None, args.batch_size, args.model, None
    else:
        cfg, model, epoch, eps_items, ds, device, ref = load_certifiable(args, args.split)
        shape, batch_size, source = model.in_shape, cfg.eval.batch_size, args.run_dir
    progress = make_progress(args)
    # "power" is an estimate (a converged power iteration), "sound" a bound; both are reported.
    what = "sound bound" if args.bound == "sound" else f"{args.bound} estimate"
    progress.status(f"certify: computing the {what}", force=True)
    by_method = {name: model_bound(model, name, input_shape=shape) for name in sorted({args.bound, "power", "sound"})}
    result = certify(model, eval_batches(ds, batch_size, device), [v for _, v in eps_items], bound=by_method[args.bound],
                     checkpoint=ref, on_event=certify_progress(progress, len(ds)))
    progress.clear()
    cert = {label: result.certified_accuracy[float(v)] for label, v in eps_items}
    payload = {
        "clean_accuracy": result.clean_accuracy,
        "certified_accuracy": cert,
        "lipschitz": result.lipschitz,
        "lipschitz_power": by_method["power"].lipschitz,
        "lipschitz_sound": by_method["sound"].lipschitz,
        "num_samples": result.num_samples,
        "bound_method": result.bound_method,
        "sound": result.sound,
        "epoch": epoch,
        "split": "sample" if pretrained_record is not None and not args.data_root else args.split,
        "checkpoint": (ref.to_dict(relative_to=Path(args.run_dir)) if ref is not None
                       else pretrained_record if pretrained_record is not None else weights_record(args.weights)),
    }
    if args.model:
        payload["model"] = args.model
    if args.json:
        print(json.dumps(payload))
    else:
        what = f"run {source} (epoch {epoch})" if epoch is not None else f"model {source}"
        split = "sample" if pretrained_record is not None and not args.data_root else args.split
        samples = "samples of its shipped evaluation sample" if split == "sample" else f"{split} samples"
        print(f"{what}, {result.num_samples} {samples}, bound: {result.bound_method}")
        if ref is not None:
            print(checkpoint_text(ref))
        from lipmargin.certify import radius_text

        rows = [("clean accuracy", f"{result.clean_accuracy:.4f}")]
        rows += [(f"certified accuracy @ {radius_text(v)}", f"{cert[label]:.4f}") for label, v in eps_items]
        rows += [("Lipschitz (sound)", f"{by_method['sound'].lipschitz:.6g}"),
                 ("Lipschitz (power estimate)", f"{by_method['power'].lipschitz:.6g}")]
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
    return 0
