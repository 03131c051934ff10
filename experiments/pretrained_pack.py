"""Pack one trained run folder as a shipped pretrained model (called by experiments/pretrained.sh).

    python experiments/pretrained_pack.py RUN_DIR NAME --command "lipmargin train ..." \
        [--sample-size 1000] [--commit HASH] [--out src/lipmargin/pretrained]

Writes ``NAME.safetensors`` (the run's newest checkpoint's state_dict, float32), ``NAME.sample.npz``
(the first ``--sample-size`` test samples; uint8 images stay uint8) and ``NAME.json``.  The
certified accuracies it records are those of a sound ``lipmargin.certify`` of the SHIPPED float32
weights, loaded back through ``lipmargin.pretrained.load_pretrained`` (so the record is what a user
reproduces), on the sample and, when the dataset is available, on the whole test split.  The run's
own ``certify.json`` / ``audit.json`` (written by the CLI beside the run) are embedded as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

import lipmargin
from lipmargin.certify import certify
from lipmargin.config import config_to_dict
from lipmargin.data import load_dataset, to_float
from lipmargin.pretrained import FORMAT_VERSION, load_pretrained, pretrained_eval_sample
from lipmargin.train import open_run


def _batches(ds, batch_size=500):
    for i in range(0, len(ds), batch_size):
        yield to_float(ds.inputs[i:i + batch_size]), ds.labels[i:i + batch_size]


def _certified(model, ds, eps):
    res = certify(model, _batches(ds), eps, method="sound")
    return {
        "num_samples": res.num_samples,
        "clean_accuracy": res.clean_accuracy,
        "certified_accuracy": {repr(float(e)): res.certified_accuracy[float(e)] for e in eps},
        "lipschitz_bound": res.lipschitz,
        "bound_method": res.bound_method,
    }


def _audit_summary(audit: dict) -> dict:
    keep = ("num_samples", "clean_accuracy", "certified_accuracy", "empirical_robust_accuracy", "violations",
            "lipschitz_upper", "lipschitz_lower", "tightness", "bound_method", "attacks", "settings", "epoch")
    return {k: audit[k] for k in keep if k in audit}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("name")
    p.add_argument("--command", required=True, help="the exact training command")
    p.add_argument("--sample-size", type=int, default=1000)
    p.add_argument("--commit", default="")
    p.add_argument("--note", default="", help="recorded as info['note'] (e.g. a run stopped early)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage of the shipped weights; float16 halves the file, and the record certifies the "
                        "float16-rounded weights as loaded (same_as_run_checkpoint is then false)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/lipmargin/pretrained")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    loaded = open_run(args.run_dir)
    cfg, model = loaded.config, loaded.model
    dtype = getattr(torch, args.dtype)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    same_as_run = all(torch.equal(state[k], v.cpu()) and state[k].dtype == v.dtype for k, v in model.state_dict().items())
    weights = st_save(state, metadata={"format": "pt"})
    (args.out / f"{args.name}.safetensors").write_bytes(weights)

    test = load_dataset(cfg.data.name, cfg.data.root, "test")
    n = min(args.sample_size, len(test))
    labels = test.labels[:n].numpy().astype(np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, inputs=test.inputs[:n].numpy(), labels=labels)
    sample = buf.getvalue()
    sample_file = f"{args.name}.sample.npz"
    (args.out / sample_file).write_bytes(sample)

    options = {}
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    if cfg.model.widths is not None:
        options["widths"] = list(cfg.model.widths)
    eps = [float(e) for e in cfg.eval.eps]
    whole = "the whole test split" if n == len(test) else f"the first {n} of the {len(test)} test samples"
    info = {
        "format_version": FORMAT_VERSION,
        "name": args.name,
        "description": cfg.description,
        "model": {"name": cfg.model.name, "options": options},
        "dataset": cfg.data.name,
        "input_shape": list(model.in_shape),
        "num_classes": int(model.num_classes),
        "eval_eps": eps,
        "weights": {"file": f"{args.name}.safetensors", "sha256": hashlib.sha256(weights).hexdigest(),
                    "dtype": args.dtype, "epoch": loaded.epoch,
                    "trained_precision": cfg.train.precision,
                    # True: these tensors equal the model open_run builds from the run's checkpoint (float32; a fp64
                    # checkpoint is rounded on load), which `lipmargin certify/audit RUN` certify: run_certify / audit are of these weights
                    "same_as_run_checkpoint": same_as_run,
                    "run_checkpoint_sha256": loaded.checkpoint.sha256},
        "eval_sample": {"file": sample_file, "sha256": hashlib.sha256(sample).hexdigest(),
                        "description": f"{whole} of {cfg.data.name} (lipmargin.data.load_dataset "
                                       f"{cfg.data.name!r}, split 'test', in order)",
                        "inputs_dtype": str(test.inputs.dtype).replace("torch.", "")},
        "training": {"command": args.command, "config": config_to_dict(cfg)},
        "lipmargin_version": lipmargin.__version__,
        "git_commit": args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                    text=True, check=False).stdout.strip(),
    }
    if args.note:
        info["note"] = args.note
    json_path = args.out / f"{args.name}.json"
    json_path.write_text(json.dumps(info, indent=1) + "\n")

    # certify the shipped files exactly as a user loads them
    shipped, _ = load_pretrained(args.name, root=args.out)
    info["eval_sample"].update(_certified(shipped, pretrained_eval_sample(args.name, root=args.out), eps))
    if not same_as_run:  # (else the run's certify.json, embedded below, is this certificate)
        info["test_set"] = _certified(shipped, test, eps)
    for what, file in (("run_certify", "certify.json"), ("audit", "audit.json")):
        path = args.run_dir / file
        if path.is_file():
            record = json.loads(path.read_text())
            info[what] = _audit_summary(record) if what == "audit" else record
    json_path.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info.get(k) for k in ("name", "eval_sample", "test_set")}, indent=1))


if __name__ == "__main__":
    main()
