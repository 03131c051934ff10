"""CLL training step vs a plain cross-entropy step of the same 4C3F (batch 128, 3x32x32).

CLL step: forward, power iterations (train.power_iters), penalty, backward, AdamW.
CE step: forward, backward, AdamW.  Prints one JSON object with both times and their ratio.

    python benchmarks/step_overhead.py [--device cuda] [--precision bf16] [--repeat 30]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import report, time_it
from lipmargin import create_model
from lipmargin.config import LossConfig, RunConfig
from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.losses import lipschitz_penalty
from lipmargin.train import TRAIN_LOSSES, TrainStep, build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--power-iters", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", default=None, help="torch.compile mode for both steps (default, reduce-overhead, ...)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    cll_model = create_model("4C3F", (3, 32, 32), 10).to(device)
    ce_model = create_model("4C3F", (3, 32, 32), 10).to(device)
    ce_model.load_state_dict(cll_model.state_dict())
    run_cfg = RunConfig()
    cll_opt = build_optimizer(cll_model, run_cfg.optim, device)  # the trainer's optimizer for both
    ce_opt = build_optimizer(ce_model, run_cfg.optim, device)
    cll = TRAIN_LOSSES["cll"](LossConfig(name="cll", eps=0.5, p=0.01))
    step = TrainStep(cll_model, args.power_iters, args.precision, args.compile)
    ce_forward = torch.compile(ce_model, mode=args.compile) if args.compile else ce_model
    cll_model.train()
    ce_model.train()

    def cll_step() -> None:
        logits, k = step(x)
        loss = cll(logits, y, cll_model, k, 0.5)
        loss = loss + lipschitz_penalty(k * pairwise_head_norms(cll_model.head.weight).max(), 1e-4)
        cll_opt.zero_grad(set_to_none=True)
        loss.backward()
        cll_opt.step()

    def ce_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = ce_forward(x)
        loss = F.cross_entropy(logits.float(), y)
        ce_opt.zero_grad(set_to_none=True)
        loss.backward()
        ce_opt.step()

    # Interleave the measurements so both see the same machine load.
    t_cll, t_ce = [], []
    for _ in range(3):
        t_cll.append(time_it(cll_step, device, warmup=3, repeat=args.repeat // 3 or 1))
        t_ce.append(time_it(ce_step, device, warmup=3, repeat=args.repeat // 3 or 1))
    cll_s, ce_s = sorted(t_cll)[1], sorted(t_ce)[1]
    ratio = cll_s / ce_s
    report(
        "step_overhead",
        {"device": str(device), "precision": args.precision, "power_iters": args.power_iters, "compile": args.compile,
         "cll_step_ms": cll_s * 1e3, "ce_step_ms": ce_s * 1e3, "ratio": ratio},
        f"CLL/CE step ratio {ratio:.3f} ({cll_s * 1e3:.1f} ms vs {ce_s * 1e3:.1f} ms, {device}, {args.precision}"
        f"{', compile ' + args.compile if args.compile else ''})",
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
