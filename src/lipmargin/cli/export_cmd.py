"""``lipmargin export``: open a run and write its certified predictor file (lipmargin.export)."""

from __future__ import annotations

import argparse

from lipmargin.cli.common import EXIT_USAGE, checkpoint_arg, checkpoint_text, command, err, make_progress


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    checkpoint_arg(p)
    p.add_argument("--format", required=True, help="torchscript, onnx (needs onnx, onnxscript, onnxruntime) or torch-export")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--no-check", action="store_true", help="skip re-checking the export against certify")
    p.add_argument("--batch-size", type=int, default=1000)


@command("export", "write a self-contained predictor returning (label, radius) with the sound bound baked in", _export_args)
def _export(args: argparse.Namespace) -> int:
    from lipmargin.cli.progress import export_progress
    from lipmargin.data import load_dataset
    from lipmargin.export import export_certified, get_format
    from lipmargin.train import open_run

    try:  # an unknown format or a missing extra is said before the run is read
        get_format(args.format).requires()
    except ImportError as e:  # the optional extra for the format is missing
        err(str(e))
        return EXIT_USAGE
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    # The export works on a model in memory: open the run here (a damaged newest checkpoint fails
    # before any progress line) and pass the model, its checkpoint record and the test inputs.
    run = open_run(args.run_dir, "cpu", checkpoint=args.checkpoint)
    model, cfg = run.model, run.config
    test_inputs = None
    if not args.no_check:
        test = load_dataset(cfg.data.name, cfg.data.root, "test")
        if tuple(test.input_shape) != tuple(model.in_shape):
            raise ValueError(f"dataset {cfg.data.name} has inputs of shape {test.input_shape} but the model expects {model.in_shape}")
        test_inputs = test.inputs
    r = export_certified(model, args.format, args.out, test_inputs=test_inputs, check=not args.no_check,
                         batch_size=args.batch_size, checkpoint=run.checkpoint,
                         on_event=export_progress(make_progress(args)))
    checked = (
        f"{r.num_samples} test samples re-checked with {r.runtime}, radii at most certify's, largest relative deflation "
        f"{r.max_relative_difference:.3g}" if r.num_samples else "not checked"
    )
    print(f"{r.path}  ({r.format}; {checked}; Lipschitz {r.lipschitz:.6g})")
    if r.checkpoint is not None:
        print(f"from {checkpoint_text(r.checkpoint)}")
    return 0
