"""CPU training-step speed: lipmargin's CLL step in fp32 and bf16, the plain CE step, an authors'-style step.

All steps train a 4C3F on Fashion-MNIST-sized inputs (batch 256, 1x28x28, 10 classes), on the CPU,
with torch's thread count from ``--threads`` (default 1):

- ``cll``: lipmargin's own step as ``fit`` runs it: :class:`lipmargin.train.TrainStep` (forward under
  ``torch.autocast`` for bf16, then ``power_iters`` power-iteration steps outside it), the CLL loss
  from the trainer's loss registry, the ``lambda K^2`` penalty, backward, the trainer's AdamW.
- ``ce``: the same model and optimiser with a plain cross-entropy loss (no power iteration, no K).
- ``authors``: a minimal stand-in for the CLL research code's step, written here: an
  ``nn.Sequential`` 4C3F with the slice/cat MaxMin, 5 power iterations per conv / linear layer on
  the layer operator (``conv2d`` and ``conv_transpose2d``) under ``no_grad``, ``sigma = ||A v||``
  with the gradient through sigma, ``K = prod sigma``, the CLL loss and penalty, AdamW; fp32.

The layouts (contiguous NCHW, channels-last) are timed for each precision.  Prints one JSON line and
appends a row to RESULTS.md (``--no-record`` to skip).  Targets (issue 15): bf16 CLL step >= 1.5x
faster than the fp32 CLL step and than the authors'-style fp32 step; CLL/CE <= 1.10.

    python benchmarks/cpu_precision.py [--threads 1] [--repeat 5] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import report, time_it
from lipmargin import create_model
from lipmargin.config import LossConfig, RunConfig
from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.losses import cll_loss, lipschitz_penalty
from lipmargin.train import FAST_BF16_CPU_FLAGS, TRAIN_LOSSES, TrainStep, build_optimizer, cpu_flags

CPU = torch.device("cpu")


def lipmargin_steps(precision: str, channels_last: bool, x: Tensor, y: Tensor, power_iters: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(CLL step, CE step) of lipmargin's trainer for one precision and layout."""
    torch.manual_seed(0)
    cll_model = create_model("4C3F", (1, 28, 28), 10)
    ce_model = create_model("4C3F", (1, 28, 28), 10)
    ce_model.load_state_dict(cll_model.state_dict())
    if channels_last:
        cll_model = cll_model.to(memory_format=torch.channels_last)
        ce_model = ce_model.to(memory_format=torch.channels_last)
    cfg = RunConfig()
    cll_opt, ce_opt = build_optimizer(cll_model, cfg.optim, CPU), build_optimizer(ce_model, cfg.optim, CPU)
    cll = TRAIN_LOSSES["cll"](LossConfig(name="cll", eps=0.5, p=0.01))
    step = TrainStep(cll_model, power_iters, precision)
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = ce_model(x)
        loss = F.cross_entropy(logits.float(), y)
        ce_opt.zero_grad(set_to_none=True)
        loss.backward()
        ce_opt.step()

    return cll_step, ce_step


class _CatMaxMin(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def authors_step(x: Tensor, y: Tensor, power_iters: int) -> Callable[[], None]:
    """A minimal fp32 step in the style of the CLL research code (see the module docstring)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c, size = 1, 28
    for out, stride in ((32, 1), (32, 2), (64, 1), (64, 2)):
        layers += [nn.Conv2d(c, out, 3, stride, 1), _CatMaxMin()]
        c, size = out, (size + 2 - 3) // stride + 1
    layers += [nn.Flatten(), nn.Linear(c * size * size, 512), _CatMaxMin(), nn.Linear(512, 512), _CatMaxMin()]
    body, head = nn.Sequential(*layers), nn.Linear(512, 10)
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    # One persistent vector per affine layer, shaped like its input.
    vectors: list[Tensor] = []
    probe = torch.zeros(1, 1, 28, 28)
    for m in body:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            v = torch.randn_like(probe)
            vectors.append(v / v.norm())
        probe = m(probe).detach()

    def operator(m: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        if isinstance(m, nn.Conv2d):
            op = 1 if m.stride[0] == 2 else 0  # output_padding that restores the 28 / 14 inputs
            return (lambda v: F.conv2d(v, m.weight, None, m.stride, m.padding),
                    lambda u: F.conv_transpose2d(u, m.weight, None, m.stride, m.padding, op))
        return (lambda v: F.linear(v, m.weight)), (lambda u: F.linear(u, m.weight.t()))

    affine = [m for m in body if isinstance(m, (nn.Conv2d, nn.Linear))]

    def step() -> None:
        logits = head(body(x))
        sigmas = []
        for i, m in enumerate(affine):
            fwd, adj = operator(m)
            with torch.no_grad():
                v = vectors[i]
                for _ in range(power_iters):
                    v = adj(fwd(v))
                    v = v / v.norm()
                vectors[i] = v
            sigmas.append(fwd(v).norm())  # gradient through sigma
        k = torch.stack(sigmas).prod()
        bound = (k * pairwise_head_norms(head.weight))[y]  # (B, C)
        loss = cll_loss(logits, y, bound, 0.5, 0.01)
        loss = loss + lipschitz_penalty(k * pairwise_head_norms(head.weight).max(), 1e-4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cpu_model_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5, help="rounds; each times every step once (medians)")
    ap.add_argument("--power-iters", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--layouts", default="nchw,channels_last")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    load_before = os.getloadavg()[0]

    steps: dict[str, Callable[[], None]] = {}
    for precision in args.precisions.split(","):
        for layout in args.layouts.split(","):
            cll_step, ce_step = lipmargin_steps(precision, layout == "channels_last", x, y, args.power_iters)
            steps[f"cll_{precision}_{layout}_ms"], steps[f"ce_{precision}_{layout}_ms"] = cll_step, ce_step
    steps["authors_fp32_ms"] = authors_step(x, y, args.power_iters)
    # Round robin: every round times each step once, so that a change of machine load (other jobs
    # on a shared machine) hits all of them alike; ratios are taken within a round, then the median.
    for fn in steps.values():
        fn()  # warm-up
    rounds: list[dict[str, float]] = []
    for _ in range(args.repeat):
        rounds.append({name: time_it(fn, CPU, warmup=0, repeat=1) * 1e3 for name, fn in steps.items()})
    times = {name: statistics.median(r[name] for r in rounds) for name in steps}

    def paired(num: str, den: str) -> float:
        return statistics.median(r[num] / r[den] for r in rounds)

    def best(kind: str, precision: str) -> tuple[float, str]:
        found = [(v, k.split("_", 2)[2][:-3]) for k, v in times.items() if k.startswith(f"{kind}_{precision}_")]
        return min(found) if found else (float("nan"), "")

    fp32, fp32_layout = best("cll", "fp32")
    bf16, bf16_layout = best("cll", "bf16")
    flags = cpu_flags()
    fp32_key, bf16_key = f"cll_fp32_{fp32_layout}_ms", f"cll_bf16_{bf16_layout}_ms"
    has_bf16 = bf16_key in times
    result = {
        "cpu": cpu_model_name(),
        "fast_bf16_flags": sorted(FAST_BF16_CPU_FLAGS & flags),
        "batch": args.batch,
        "threads": args.threads,
        "power_iters": args.power_iters,
        **{k: round(v, 1) for k, v in times.items()},
        "cll_fp32_ms": round(fp32, 1),
        "cll_fp32_layout": fp32_layout,
        "cll_bf16_ms": round(bf16, 1),
        "cll_bf16_layout": bf16_layout,
        # Medians of the ratios within each round (robust to load changes between rounds).
        "bf16_speedup": round(paired(fp32_key, bf16_key), 3) if has_bf16 else None,
        "bf16_vs_authors": round(paired("authors_fp32_ms", bf16_key), 3) if has_bf16 else None,
        "fp32_vs_authors": round(paired("authors_fp32_ms", fp32_key), 3),
        "cll_ce_overhead_fp32": round(paired(fp32_key, f"ce_fp32_{fp32_layout}_ms"), 3),
        "rounds": args.repeat,
        "fp32_nchw_over_channels_last": (round(paired("cll_fp32_nchw_ms", "cll_fp32_channels_last_ms"), 3)
                                         if {"cll_fp32_nchw_ms", "cll_fp32_channels_last_ms"} <= set(times) else None),
        "bf16_nchw_over_channels_last": (round(paired("cll_bf16_nchw_ms", "cll_bf16_channels_last_ms"), 3)
                                         if {"cll_bf16_nchw_ms", "cll_bf16_channels_last_ms"} <= set(times) else None),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    result["targets_met"] = {
        "bf16_speedup>=1.5": has_bf16 and result["bf16_speedup"] >= 1.5,
        "bf16_vs_authors>=1.5": has_bf16 and result["bf16_vs_authors"] >= 1.5,
        "cll_ce_overhead<=1.10": result["cll_ce_overhead_fp32"] <= 1.10,
    }
    figure = (
        f"4C3F b{args.batch}: CLL fp32 {fp32:.0f} ms ({fp32_layout}), bf16 {bf16:.0f} ms ({bf16_layout}), "
        f"bf16 speed-up {result['bf16_speedup']}x, vs authors'-style fp32 {result['bf16_vs_authors']}x "
        f"(fp32 {result['fp32_vs_authors']:.2f}x); CLL/CE {result['cll_ce_overhead_fp32']:.3f}; fp32 NCHW/channels-last "
        f"{result.get('fp32_nchw_over_channels_last')}; "
        f"{result['cpu']}, bf16 flags {result['fast_bf16_flags'] or 'none'}; load {load_before:.1f}"
    )
    report("cpu_precision", result, figure, record=not args.no_record)


if __name__ == "__main__":
    main()
