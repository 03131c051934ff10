"""Certified samples per second for 4C3F (3x32x32) and 8C2F (3x64x64), bound computation included.

Times ``model_bound(model, "sound")`` (per-layer sound bounds) plus ``certify`` (float64 logits and
radii) over N random inputs, and the same with the converged power iteration.

    python benchmarks/certify_throughput.py [--device cuda] [--n 10000]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import report, sync
from lipmargin import certify, create_model, model_bound


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--models", default="4C3F,8C2F")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = {"4C3F": ((3, 32, 32), 10), "8C2F": ((3, 64, 64), 200)}
    for name in args.models.split(","):
        in_shape, classes = shapes[name]
        torch.manual_seed(0)
        model = create_model(name, in_shape, classes).to(device).eval()
        x = torch.rand(args.n, *in_shape)
        y = torch.randint(0, classes, (args.n,))
        batches = [(x[i : i + args.batch].to(device), y[i : i + args.batch].to(device)) for i in range(0, args.n, args.batch)]
        out = {}
        for method in ("sound", "power"):
            sync(device)
            t0 = time.perf_counter()
            bound = model_bound(model, method)
            sync(device)
            t_bound = time.perf_counter() - t0
            certify(model, batches, [36 / 255], bound=bound)
            sync(device)
            total = time.perf_counter() - t0
            out[method] = {"bound_s": t_bound, "total_s": total, "samples_per_s": args.n / total}
        report(
            "certify_throughput",
            {"device": str(device), "model": name, "n": args.n, **{f"{m}_{k}": v for m, d in out.items() for k, v in d.items()}},
            f"{name}: {out['sound']['samples_per_s']:.0f} certified samples/s with sound bounds "
            f"(bound {out['sound']['bound_s']:.2f} s, n={args.n}, {device})",
            record=not args.no_record,
        )


if __name__ == "__main__":
    main()
