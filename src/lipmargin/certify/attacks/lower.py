"""An empirical lower bound of the Lipschitz constant ("LOBO" in the CLL paper).

:func:`lipschitz_lower` maximises difference quotients of the logit differences over pairs of
inputs.  Every quotient it reports was evaluated on a concrete pair, so it is a lower bound on the
true Lipschitz constant and must never exceed a sound upper bound; the gap between the two shows
how loose the upper bound is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipmargin.certify.attacks._common import (
    _check_clamp,
    _check_inputs,
    _check_logits,
    _check_positive_float,
    _check_positive_int,
    _eval_mode,
    _flat_norm,
    _randint,
    _randn,
)

__all__ = ["LipschitzLowerResult", "lipschitz_lower"]


@dataclass(frozen=True)
class LipschitzLowerResult:
    """Outcome of :func:`lipschitz_lower`.

    Attributes:
        lipschitz_lower: the largest difference quotient
            ``max_j |(f_c - f_j)(x1) - (f_c - f_j)(x2)| / ||x1 - x2||`` (divided by
            ``pairwise_scale[c, j]`` when given) evaluated on any pair at any step.
        pairs: number of input pairs optimised.
        steps: Adam steps per pair.
    """

    lipschitz_lower: float
    pairs: int
    steps: int


def _pair_ratios(model: nn.Module, x1: Tensor, x2: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per pair: the largest (scaled) logit-difference quotient, and the pair's distance."""
    n = x1.shape[0]
    logits = model(torch.cat([x1, x2]))
    f1, f2 = logits[:n], logits[n:]
    # c = class predicted at x1, re-read at every evaluation: each evaluated quotient is a true
    # difference quotient whatever c is, so following the current prediction costs nothing in
    # soundness and keeps the quotient about the decision that matters at x1.
    c = f1.detach().argmax(dim=1)
    diff = f1 - f2  # (n, C): change of every logit between the two points
    num = (diff.gather(1, c[:, None]) - diff).abs()  # |Δ(f_c - f_j)|; zero at j = c
    if scale is not None:
        num = num / scale[c]
    dist = _flat_norm(x1 - x2)
    # The clamp only keeps the gradient finite; such pairs are excluded from the reported max.
    ratio = num.amax(dim=1) / dist.clamp_min(torch.finfo(dist.dtype).tiny)
    return ratio, dist


def lipschitz_lower(
    model: nn.Module,
    inputs: Tensor,
    *,
    pairs: int = 4000,
    steps: int = 1000,
    lr: float = 3e-4,
    batch_pairs: int = 500,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    pairwise_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LipschitzLowerResult:
    """Empirical lower bound of the logit-difference Lipschitz constant (LOBO, CLL paper).

    Each pair starts as ``x1`` = an input and ``x2`` = a *different* input (when there is more
    than one) plus Gaussian noise of standard deviation ``1e-3`` per coordinate, so ``x1 != x2``
    even when both come from the same image.  Both points are then optimised with Adam to
    maximise ``max_{j != c} |(f_c - f_j)(x1) - (f_c - f_j)(x2)| / ||x1 - x2||`` where ``c`` is the
    class predicted at ``x1`` (re-read at every step), clamping to ``clamp`` after every step.
    Pairs are processed ``batch_pairs`` at a time (pairs are independent; Adam is element-wise).

    The result is the maximum over *every* evaluated pair and step (the last iterate of a
    non-convex ascent need not be its best).  Quotients over distances below
    ``max(1e-6, sqrt(machine eps))`` are not counted: there the rounding error of the logits
    (relative ~1e-7 in float32) divided by the distance could report a fake large constant.  With
    that guard the result is a true lower bound up to the forward pass's rounding, so it must not
    exceed a sound upper bound.

    Args:
        model: maps ``(B, ...)`` inputs to ``(B, C)`` logits.
        inputs: pool of starting images ``(N, ...)``, N >= 1; must lie inside ``clamp``.
        pairs: number of pairs to optimise.
        steps: Adam steps per pair.
        lr: Adam learning rate.
        batch_pairs: pairs optimised together.
        clamp: box the points are kept in, or ``None``.
        pairwise_scale: optional ``(C, C)`` tensor; the quotient for classes ``(c, j)`` is divided
            by ``pairwise_scale[c, j]`` (e.g. ``||W_c - W_j||`` for a linear head) so the result
            is comparable with a pairwise bound ``K * ||W_c - W_j||``.  Diagonal ignored;
            off-diagonal entries must be finite and > 0.
        generator: source of randomness (pair choice and noise).

    Example: for ``f(x) = W x`` with ``W = [[3, 0], [0, 4]]`` the true constant of ``f_0 - f_1`` is
    ``||W_0 - W_1|| = 5``; the pairs reach it and never exceed it:

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    >>> gen = torch.Generator().manual_seed(0)
    >>> result = lipschitz_lower(model, torch.rand(8, 2, generator=gen), pairs=8, steps=100, lr=1e-2, generator=gen)
    >>> round(result.lipschitz_lower, 4), result.lipschitz_lower <= 5.0 + 1e-5
    (5.0, True)
    """
    _check_inputs(inputs)
    if inputs.shape[0] < 1:
        raise ValueError("inputs must hold at least one sample to draw pairs from")
    _check_positive_int("pairs", pairs)
    _check_positive_int("steps", steps)
    _check_positive_float("lr", lr)
    _check_positive_int("batch_pairs", batch_pairs)
    box = _check_clamp(clamp, inputs)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    x = inputs.detach()
    n_inputs = x.shape[0]
    min_dist = max(1e-6, math.sqrt(torch.finfo(x.dtype).eps))

    with _eval_mode(model):
        with torch.no_grad():
            probe = model(x[:1])
        _check_logits(probe)
        n_classes = probe.shape[1]
        scale: Tensor | None = None
        if pairwise_scale is not None:
            if not isinstance(pairwise_scale, Tensor) or pairwise_scale.shape != (n_classes, n_classes):
                raise ValueError(
                    f"pairwise_scale must be a ({n_classes}, {n_classes}) tensor (one entry per class pair), "
                    f"got shape {getattr(pairwise_scale, 'shape', None)}"
                )
            scale = pairwise_scale.detach().to(device=x.device, dtype=probe.dtype)
            off = ~torch.eye(n_classes, dtype=torch.bool, device=x.device)
            if not (torch.isfinite(scale[off]).all().item() and (scale[off] > 0).all().item()):
                raise ValueError("pairwise_scale must have finite entries > 0 off the diagonal")
            # The diagonal quotient is identically 0; a 1 there avoids 0/0 = nan.
            scale = torch.where(off, scale, torch.ones_like(scale))

        best = torch.zeros((), dtype=torch.float64, device=x.device)
        with torch.enable_grad():
            for start in range(0, pairs, batch_pairs):
                n = min(batch_pairs, pairs - start)
                i1 = _randint(n_inputs, n, x.device, generator)
                if n_inputs > 1:
                    # An offset in [1, N) guarantees a different image.
                    i2 = (i1 + 1 + _randint(n_inputs - 1, n, x.device, generator)) % n_inputs
                else:
                    i2 = i1
                x1 = x[i1].clone()
                x2 = x[i2] + 1e-3 * _randn(tuple(x[i2].shape), x, generator)
                if box is not None:
                    x2 = x2.clamp(box[0], box[1])
                x1.requires_grad_(True)
                x2 = x2.detach().requires_grad_(True)
                opt = torch.optim.Adam([x1, x2], lr=lr)
                for t in range(steps + 1):
                    ratio, dist = _pair_ratios(model, x1, x2, scale)
                    with torch.no_grad():
                        valid = dist >= min_dist
                        masked = torch.where(valid, ratio.detach(), torch.zeros_like(ratio))
                        # nan (e.g. from a model producing nan) must not be reported as a bound.
                        masked = torch.nan_to_num(masked, nan=0.0, posinf=0.0)
                        if masked.numel():
                            best = torch.maximum(best, masked.max().to(torch.float64))
                    if t == steps:
                        break
                    # autograd.grad w.r.t. the two points only: backward() would also accumulate
                    # into the model parameters' .grad.
                    g1, g2 = torch.autograd.grad(-ratio.sum(), [x1, x2])
                    x1.grad, x2.grad = g1, g2
                    opt.step()
                    if box is not None:
                        with torch.no_grad():
                            x1.clamp_(box[0], box[1])
                            x2.clamp_(box[0], box[1])
    return LipschitzLowerResult(lipschitz_lower=float(best.item()), pairs=pairs, steps=steps)

