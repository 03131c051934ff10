"""What every attack shares: argument checks, eval mode, the misclassification margin, the L2 ball.

Conventions (see :mod:`lipmargin.certify.attacks`): a sample is correctly classified only if its
true logit is strictly larger than every other one (ties count as errors); models run in eval mode
with every module's own ``training`` flag restored afterwards; randomness comes from the caller's
``torch.Generator`` when one is given.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode and restore every module's own ``training`` flag afterwards.

    ``model.train(old_flag)`` alone would not do: a model may mix modes (e.g. a frozen backbone in
    eval mode inside a training model), and ``train()`` recurses, flattening that mix.  Restoring
    through ``train()`` (rather than assigning ``.training``) keeps the side effects of modules
    that override it (e.g. weight caches invalidated when leaving eval mode).
    """
    flags = [(m, m.training) for m in model.modules()]
    if any(f for _, f in flags):
        model.eval()
    try:
        yield
    finally:
        # modules() is pre-order, so a parent's recursive train() runs before its children are
        # set back to their own flags.
        for m, f in flags:
            if m.training != f:
                m.train(f)


def _margin(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``max_{j != y} f_j - f_y`` (>= 0 means misclassified, ties included)."""
    true = logits.gather(1, target[:, None]).squeeze(1)
    is_true = F.one_hot(target, logits.shape[1]).to(torch.bool)
    other = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
    return other - true


def _targeted_margin(logits: Tensor, target: Tensor, toward: Tensor) -> Tensor:
    """Per-sample ``f_t - f_y``: how far class ``t`` is from overtaking the true class."""
    return (logits.gather(1, toward[:, None]) - logits.gather(1, target[:, None])).squeeze(1)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_positive_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_inputs(inputs: object) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 1:
        raise ValueError(
            "inputs must be a floating-point tensor shaped (B, ...), got "
            f"{getattr(inputs, 'dtype', type(inputs))!r} with shape {getattr(inputs, 'shape', None)}"
        )


def _check_target(target: object, batch: int) -> None:
    if (
        not isinstance(target, Tensor)
        or target.shape != (batch,)
        or target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
    ):
        raise ValueError(
            f"target must be an integer tensor shaped ({batch},) (one class index per input), got "
            f"{getattr(target, 'dtype', type(target))!r} with shape {getattr(target, 'shape', None)}"
        )


def _check_clamp(clamp: object, inputs: Tensor) -> tuple[float, float] | None:
    if clamp is None:
        return None
    ok = isinstance(clamp, (tuple, list)) and len(clamp) == 2
    if ok:
        lo, hi = clamp  # type: ignore[misc]
        ok = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in (lo, hi)
        ) and lo < hi
    if not ok:
        raise ValueError(f"clamp must be None or a pair (low, high) of finite numbers with low < high, got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])  # type: ignore[index]
    # The feasibility argument in _project needs the clean inputs inside the box; without it the
    # ball-box intersection can be empty and "x_adv within clamp" would be unsatisfiable.
    if inputs.numel() and (inputs.min().item() < lo or inputs.max().item() > hi):
        raise ValueError(f"inputs must lie inside clamp=({lo}, {hi}); pass clamp=None for unbounded inputs")
    return lo, hi


def _check_logits(logits: Tensor, target: Tensor | None = None) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"model output must be logits shaped (B, C) with C >= 2, got shape {tuple(logits.shape)}")
    if target is not None and target.numel():
        if target.min().item() < 0 or target.max().item() >= logits.shape[1]:
            raise ValueError(f"target must hold class indices in [0, {logits.shape[1]}), got values outside")


def _eps_tensor(eps: float | Tensor, inputs: Tensor) -> Tensor:
    """Validate ``eps`` and return it as a (B,) tensor in the inputs' dtype and device."""
    batch = inputs.shape[0]
    if isinstance(eps, Tensor):
        if eps.ndim == 0:
            eps = eps.expand(batch)
        if eps.shape != (batch,) or not (eps.is_floating_point() or _int_dtype(eps)):
            raise ValueError(f"eps must be a number or a real tensor shaped () or ({batch},), got shape {tuple(eps.shape)}")
        if eps.numel() and (not torch.isfinite(eps).all().item() or (eps < 0).any().item()):
            raise ValueError("eps must be finite and >= 0 for every sample (0 = do not perturb)")
        return eps.detach().to(device=inputs.device, dtype=inputs.dtype).clone()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 or a (B,) tensor of them, got {eps!r}")
    return torch.full((batch,), float(eps), dtype=inputs.dtype, device=inputs.device)


def _int_dtype(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    # A generator only draws on its own device; sample there and move, so that a CPU generator
    # still gives reproducible draws for CUDA inputs.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _randint(high: int, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=gen_device).to(device)


def _flat_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor so it broadcasts against ``like`` shaped (B, ...)."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _project(z: Tensor, x: Tensor, eps: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    """Map ``z`` into ``{||z - x||_2 <= eps} ∩ box``, per sample.

    Project onto the ball first, then clamp to the box.  The clamp cannot leave the ball: when x
    lies in the box, clamping coordinate i moves z_i towards the interval [lo, hi], which
    contains x_i, and stops at the interval's edge, i.e. never beyond x_i; so
    ``|clamp(z)_i - x_i| <= |z_i - x_i|`` for every i and the L2 distance to x can only shrink.
    (The result is feasible, though not the exact Euclidean projection onto the intersection;
    feasibility is what the certificate audit needs.)

    Floating point: storing ``x + delta`` rounds each coordinate by up to ``u * |x_i + delta_i|``
    (u = unit roundoff), so the stored point's distance to x can differ from ``||delta||`` by up
    to ``u * ||x + delta||`` -- relative to a small eps that is far more than one ulp (float32
    images of norm ~10 and eps ~1e-2 give ~1e-4 relative).  Points are therefore pulled onto a
    radius reduced by that much, and the distance is then re-measured in float64 (where
    differences of float32 values are exact) by :func:`_enforce_ball`.
    """
    delta = z - x
    norm = _flat_norm(delta)
    unit = torch.finfo(z.dtype).eps
    slack = 2.0 * unit * (_flat_norm(x) + eps)
    radius = (eps - slack).clamp_min(0.0)
    factor = torch.where(norm > radius, radius / norm.clamp_min(torch.finfo(z.dtype).tiny), torch.ones_like(norm))
    out = x + delta * _per_sample(factor, x)
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return _enforce_ball(out, x, eps, clamp)


def _enforce_ball(z: Tensor, x: Tensor, eps: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    """Guarantee ``||z - x|| <= eps`` as measured in float64; rarely changes anything."""
    eps64 = eps.to(torch.float64)
    unit = torch.finfo(z.dtype).eps
    for k in range(1, 9):
        dist = _flat_norm(z.to(torch.float64) - x.to(torch.float64))
        bad = dist > eps64
        if not bad.any().item():
            return z
        # Pull offenders inside by a margin that grows each round (4u, 16u, ...), so rounding
        # of the rescaled point cannot keep them outside for long.
        factor = (eps64 / dist.clamp_min(1e-300) * (1.0 - unit * 4.0**k)).clamp(0.0, 1.0)
        factor = torch.where(bad, factor, torch.ones_like(factor)).to(z.dtype)
        z = x + (z - x) * _per_sample(factor, x)
        if clamp is not None:
            z = z.clamp(clamp[0], clamp[1])
    # Only reachable when eps is below the inputs' floating-point resolution; the clean point
    # keeps the invariant unconditional.
    dist = _flat_norm(z.to(torch.float64) - x.to(torch.float64))
    return torch.where(_per_sample(dist > eps64, x), x, z)


def _random_in_ball(x: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
    """A point uniformly distributed in the L2 ball of radius ``eps`` around each sample.

    Uniform direction (normalised Gaussian) and radius ``eps * U^(1/d)``: the volume of a d-ball
    grows like r^d, so this radius law makes the density uniform in volume.
    """
    batch = x.shape[0]
    dim = x[0].numel()
    direction = _randn(tuple(x.shape), x, generator)
    direction = direction / _per_sample(_flat_norm(direction).clamp_min(torch.finfo(x.dtype).tiny), x)
    radius = eps * _rand((batch,), x, generator).pow(1.0 / dim)
    return x + direction * _per_sample(radius, x)
