"""Empirical robustness checks: L2 PGD, robust accuracy, and an empirical Lipschitz lower bound.

Certificates are upper-bound arguments (``margin > K * eps`` implies robustness); the functions
here are their empirical counterparts and are used to *audit* them:

- :func:`pgd_l2` / :func:`robust_accuracy` search for misclassified points inside an L2 ball
  (projected gradient ascent, Madry et al. 2018).  A point they return is always feasible, so a
  sample that is certified at radius ``eps`` must never be flipped; if it is, the certificate is
  wrong.
- :func:`lipschitz_lower_bound` ("LOBO" in the CLL paper) maximises difference quotients of the
  logit differences over pairs of inputs.  Every quotient it reports was evaluated on a concrete
  pair, so it is a lower bound on the true Lipschitz constant and must never exceed a sound upper
  bound; the gap between the two shows how loose the upper bound is.
- :func:`autoattack_l2` (optional: ``pip install --no-deps torchattacks``) runs APGD-CE / APGD-T
  (Croce & Hein 2020) through ``torchattacks`` as a stronger, independent attack.

Conventions shared by all functions:

- A sample counts as *correctly classified* only if its true logit is strictly larger than every
  other logit (``f_y > max_{j != y} f_j``).  Ties count as errors: that is the conservative choice
  for an attack, and it never contradicts a certificate, which needs a strictly positive margin.
- The model is run in eval mode (dropout/batch-norm statistics would otherwise make the attacked
  function differ from the certified one) and every module's ``training`` flag is restored
  afterwards.  Gradients are taken with :func:`torch.autograd.grad` w.r.t. the inputs only, so
  parameters' ``.grad`` and ``requires_grad`` are never touched.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "AttackLoss",
    "LowerBoundResult",
    "autoattack_l2",
    "radius_groups",
    "RADIUS_GROUP_WIDTH",
    "lipschitz_lower_bound",
    "pgd_l2",
    "robust_accuracy",
]


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


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


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def _targeted_cross_entropy(logits: Tensor, target: Tensor, toward: Tensor) -> Tensor:
    # Maximising -CE(f, t) pulls the prediction towards t.
    return -F.cross_entropy(logits, toward, reduction="none")


@dataclass(frozen=True)
class AttackLoss:
    """An attack objective (per sample, to be maximised) in its two forms.

    ``untargeted(logits, y)`` ranks points across all runs (which point is kept);
    ``targeted(logits, y, t)`` drives the restarts aimed at one wrong class ``t``.
    """

    untargeted: Callable[[Tensor, Tensor], Tensor]
    targeted: Callable[[Tensor, Tensor, Tensor], Tensor]


#: Attack objectives by name.  A registry rather than string branches so that validation and the
#: list of allowed names come from one place.
LOSSES: dict[str, AttackLoss] = {
    "margin": AttackLoss(untargeted=_margin, targeted=_targeted_margin),
    "ce": AttackLoss(untargeted=_cross_entropy, targeted=_targeted_cross_entropy),
}


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


# --------------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------------


def _wrong_classes_by_rank(logits: Tensor, target: Tensor, batch: int, idx: Tensor) -> Tensor:
    """A (batch, C-1) table: row ``idx[k]`` lists sample k's wrong classes by decreasing logit."""
    n_classes = logits.shape[1]
    order = logits.argsort(dim=1, descending=True)
    # Drop the true class from each row; what remains keeps its order.
    keep = order != target[:, None]
    wrong = order[keep].reshape(-1, n_classes - 1)
    table = torch.zeros(batch, n_classes - 1, dtype=torch.long, device=logits.device)
    table[idx] = wrong
    return table


def _pgd_l2(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    eps: float | Tensor,
    *,
    steps: int,
    restarts: int,
    step_size: float | None,
    clamp: tuple[float, float] | None,
    loss: str,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """PGD returning ``(x_adv, fooled)``; ``fooled`` records misclassification *as observed
    during the attack*, so callers need not trust a re-evaluation on a different batch (batch
    composition can change the last bits of the logits)."""
    _check_inputs(inputs)
    batch = inputs.shape[0]
    _check_target(target, batch)
    eps_t = _eps_tensor(eps, inputs)
    _check_positive_int("steps", steps)
    _check_positive_int("restarts", restarts)
    if step_size is not None:
        _check_positive_float("step_size", step_size)
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    box = _check_clamp(clamp, inputs)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    objective = LOSSES[loss]

    x = inputs.detach()
    y = target.detach().to(device=x.device, dtype=torch.long)
    # Madry et al.'s heuristic: the total path length 2.5*eps lets a run reach the boundary and
    # still move along it; per sample, so per-sample radii get proportionate steps.
    alpha_all = eps_t * (2.5 / steps) if step_size is None else torch.full_like(eps_t, float(step_size))

    best = x.clone()
    best_loss = torch.full((batch,), float("-inf"), dtype=x.dtype, device=x.device)
    fooled = torch.zeros(batch, dtype=torch.bool, device=x.device)
    # Wrong classes of every sample, most likely first (filled from the clean logits).
    ranked: Tensor | None = None
    # eps == 0 means "do not perturb": those samples are never touched, so they come back as x
    # bit for bit.
    active = torch.nonzero(eps_t > 0).squeeze(1)

    with _eval_mode(model), torch.enable_grad():
        for restart in range(restarts):
            idx = active[~fooled[active]]
            if idx.numel() == 0:
                break
            x0, y0, e0, a0 = x[idx], y[idx], eps_t[idx], alpha_all[idx]
            # Run 0 starts at x itself with the untargeted objective: it evaluates the clean
            # point (catching clean-misclassified samples) and is the natural deterministic start.
            # Later runs start uniformly in the ball and each aims at one wrong class, cycling
            # through them by clean-logit rank (as in the multi-targeted attack of Gowal et al.
            # 2019 and APGD-T).  Untargeted ascent follows whichever class currently has the
            # largest logit and can settle on the sphere in a local optimum where that class
            # still loses while another one, with a larger ||grad (f_j - f_y)||, would win;
            # aiming at each class in turn removes that failure mode.
            toward: Tensor | None = None
            if restart == 0:
                z = x0.clone()
            else:
                z = _project(_random_in_ball(x0, e0, generator), x0, e0, box)
                if ranked is None:  # pragma: no cover - run 0 evaluates every active sample
                    raise RuntimeError("internal error: class ranking missing after the first run")
                toward = ranked[idx, (restart - 1) % ranked.shape[1]]
            for t in range(steps + 1):
                z = z.detach().requires_grad_(True)
                logits = model(z)
                if ranked is None:
                    _check_logits(logits, y0)
                    ranked = _wrong_classes_by_rank(logits.detach(), y0, batch, idx)
                values = objective.untargeted(logits, y0) if toward is None else objective.targeted(logits, y0, toward)
                with torch.no_grad():
                    # Points from all runs are compared with the untargeted objective.
                    score = values.detach() if toward is None else objective.untargeted(logits.detach(), y0)
                    wrong = _margin(logits.detach(), y0) >= 0
                    improved = wrong | (score > best_loss[idx])
                    sel = idx[improved]
                    best[sel] = z.detach()[improved]
                    best_loss[sel] = score[improved]
                    fooled[idx[wrong]] = True
                if t == steps:
                    break
                (grad,) = torch.autograd.grad(values.sum(), z)
                with torch.no_grad():
                    # A fooled sample's point is final ("first misclassifying point"); dropping
                    # it from the working set also saves its forward/backward passes.
                    if wrong.any().item():
                        keep = ~wrong
                        if not keep.any().item():
                            break
                        idx, x0, y0, e0, a0 = idx[keep], x0[keep], y0[keep], e0[keep], a0[keep]
                        z, grad = z.detach()[keep], grad[keep]
                        if toward is not None:
                            toward = toward[keep]
                    # Normalised gradient step: the L2 steepest-ascent direction, insensitive to
                    # the gradient's scale (which for Lipschitz networks is tiny).
                    gnorm = _flat_norm(grad).clamp_min(torch.finfo(grad.dtype).tiny)
                    z = z.detach() + grad * _per_sample(a0 / gnorm, grad)
                    z = _project(z, x0, e0, box)
    return best, fooled


def pgd_l2(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    eps: float | Tensor,
    *,
    steps: int = 50,
    restarts: int = 5,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    loss: str = "margin",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Untargeted L2 projected gradient ascent (Madry et al. 2018) with random restarts.

    Run 0 starts at ``x`` and ascends the untargeted objective.  Runs 1, 2, ... start uniformly
    at random in the ball and each ascends the *targeted* form of the objective towards one wrong
    class, cycling through the wrong classes by decreasing clean logit (multi-targeted restarts,
    as in Gowal et al. 2019 / APGD-T): untargeted ascent can stall on the sphere where the
    currently runner-up class still loses although another class would win.  The attack as a
    whole stays untargeted: any misclassification counts.  With ``restarts >= C`` every wrong
    class is aimed at at least once.

    Args:
        model: maps ``(B, ...)`` inputs to ``(B, C)`` logits.
        inputs: clean inputs ``(B, ...)``; must lie inside ``clamp`` when it is given.
        target: true labels ``(B,)``.
        eps: L2 radius, a number or a per-sample ``(B,)`` tensor (e.g. each sample's certified
            radius).  Samples with ``eps == 0`` are returned unchanged.
        steps: gradient steps per restart.
        restarts: number of runs (see above).
        step_size: L2 length of each step; default ``2.5 * eps / steps`` per sample.  A number
            given here is used for every sample.
        clamp: box the adversarial inputs must stay in, or ``None`` for unbounded inputs.
        loss: objective to maximise, a key of :data:`LOSSES`: ``"margin"``
            (``max_{j != y} f_j - f_y``; targeted ``f_t - f_y``), which aims directly at the
            decision boundary, or ``"ce"`` (cross entropy; targeted ``-CE(f, t)``), which on
            multi-class problems often settles on points that are not the nearest error.
        generator: source of randomness for the restarts (reproducible runs).

    Returns:
        ``x_adv`` shaped like ``inputs``, with ``||x_adv - x||_2 <= eps`` per sample and inside
        ``clamp``.  For a sample that was misclassified at some evaluated point, the first such
        point; otherwise the evaluated point with the highest loss (``x`` itself included).
    """
    x_adv, _ = _pgd_l2(
        model,
        inputs,
        target,
        eps,
        steps=steps,
        restarts=restarts,
        step_size=step_size,
        clamp=clamp,
        loss=loss,
        generator=generator,
    )
    return x_adv


#: pgd_l2's keyword options and their defaults, read from its signature so that
#: robust_accuracy cannot drift from it.
_PGD_OPTIONS: dict[str, object] = {
    name: param.default
    for name, param in inspect.signature(pgd_l2).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY
}


def _correct(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    if inputs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=inputs.device)
    with _eval_mode(model), torch.no_grad():
        logits = model(inputs)
    _check_logits(logits, target)
    return _margin(logits, target) < 0


def robust_accuracy(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    eps: float | Tensor,
    **pgd_kwargs: object,
) -> tuple[Tensor, Tensor]:
    """Per-sample empirical robustness under :func:`pgd_l2`.

    Returns:
        ``(robust, x_adv)``: ``robust`` is a bool ``(B,)`` tensor, True where the sample is
        correctly classified (strict margin) both at ``x`` and everywhere the attack looked, and
        ``x_adv`` the attack's points.  A sample counts as non-robust if *any* evaluation saw it
        misclassified (the clean pass, the attack, or a re-evaluation of ``x_adv``): the
        conservative reading, since these evaluations may differ in the last bits.
    """
    unknown = sorted(set(pgd_kwargs) - set(_PGD_OPTIONS))
    if unknown:
        raise ValueError(f"pgd_kwargs got unknown names {unknown}; allowed: {sorted(_PGD_OPTIONS)}")
    _check_inputs(inputs)
    _check_target(target, inputs.shape[0])
    y = target.to(device=inputs.device, dtype=torch.long)
    options = {**_PGD_OPTIONS, **pgd_kwargs}
    x_adv, fooled = _pgd_l2(model, inputs, target, eps, **options)  # type: ignore[arg-type]
    robust = _correct(model, inputs.detach(), y) & ~fooled & _correct(model, x_adv, y)
    return robust, x_adv


# --------------------------------------------------------------------------------------------
# Empirical Lipschitz lower bound (LOBO)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowerBoundResult:
    """Outcome of :func:`lipschitz_lower_bound`.

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


def lipschitz_lower_bound(
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
) -> LowerBoundResult:
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
    return LowerBoundResult(lipschitz_lower=float(best.item()), pairs=pairs, steps=steps)


# --------------------------------------------------------------------------------------------
# Optional: AutoAttack components through torchattacks
# --------------------------------------------------------------------------------------------


class _AsImages(nn.Module):
    """Presents any model to torchattacks, whose L2 APGD code assumes (B, C, H, W) inputs: inputs
    are flattened to (B, 1, 1, D) and reshaped back before the wrapped model sees them."""

    def __init__(self, model: nn.Module, sample_shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.sample_shape = sample_shape
        # torchattacks reads its device from next(model.parameters()); this empty parameter makes
        # that the inputs' device, and makes parameter-free models acceptable.
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.reshape((x.shape[0],) + self.sample_shape))


def _apgd_ce(ta: object, wrapped: nn.Module, eps: float | Tensor, steps: int, seed: int, n_classes: int) -> object:
    return ta.APGD(wrapped, norm="L2", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")  # type: ignore[attr-defined]


def _apgd_dlr(ta: object, wrapped: nn.Module, eps: float | Tensor, steps: int, seed: int, n_classes: int) -> object:
    return ta.APGD(wrapped, norm="L2", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="dlr")  # type: ignore[attr-defined]


def _apgd_t(ta: object, wrapped: nn.Module, eps: float | Tensor, steps: int, seed: int, n_classes: int) -> object:
    return ta.APGDT(wrapped, norm="L2", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=n_classes)  # type: ignore[attr-defined]


#: Components that accept a per-sample ``(B, 1, 1, 1)`` eps tensor.  torchattacks' APGD uses
#: ``eps`` only in broadcast products with ``(B, 1, 1, 1)`` / ``(B, C, H, W)`` tensors of the batch
#: it attacks, and with ``n_restarts=1`` it attacks exactly the samples it classifies correctly, so
#: a batch of such samples keeps eps aligned (checked against scalar runs in the tests).  APGD-T
#: runs once per target class on the samples not yet fooled, a shrinking subset that a per-sample
#: eps would not follow: it gets radius groups instead (:func:`radius_groups`).
_PER_SAMPLE_EPS = frozenset({"apgd-ce", "apgd-dlr"})

#: Relative width of the radius groups of APGD-T: a group spans radii in ``[r0, r0 (1 + w)]`` and
#: is attacked at its smallest radius ``r0``.
RADIUS_GROUP_WIDTH = 0.02


def radius_groups(eps: Tensor, width: float = RADIUS_GROUP_WIDTH) -> list[tuple[float, Tensor]]:
    """Group the indices of ``eps > 0`` into ``(r0, indices)`` with every radius in
    ``[r0, r0 (1 + width)]``; ``r0`` (the group's smallest radius, <= each member's eps) is the
    radius the group is attacked at."""
    order = torch.argsort(eps)
    order = order[eps[order] > 0]
    groups: list[tuple[float, Tensor]] = []
    start = 0
    values = eps[order].tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] > values[start] * (1.0 + width):
            groups.append((values[start], order[start:i]))
            start = i
    return groups


#: AutoAttack components: name -> (factory, minimum number of classes).  The DLR losses index the
#: 3rd (untargeted) / 4th (targeted) largest logit, hence their minimum class counts.
_AA_COMPONENTS: dict[str, tuple[Callable[..., object], int]] = {
    "apgd-ce": (_apgd_ce, 2),
    "apgd-dlr": (_apgd_dlr, 3),
    "apgd-t": (_apgd_t, 4),
}


def autoattack_l2(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    eps: float | Tensor,
    *,
    version: str = "apgd-ce+apgd-t",
    seed: int = 0,
    steps: int = 100,
) -> Tensor:
    """APGD attacks (Croce & Hein 2020) in L2 via ``torchattacks`` (``pip install --no-deps torchattacks``).

    ``version`` is a ``+``-separated chain of components from ``apgd-ce``, ``apgd-dlr`` and
    ``apgd-t`` (targeted DLR over the top ``C - 1`` classes); each component attacks only the
    samples still correctly classified.  Inputs must lie in [0, 1] (torchattacks clamps there).
    ``eps`` may be a ``(B,)`` tensor (e.g. each sample's certified radius; ``eps == 0`` is left
    unchanged): APGD-CE / APGD-DLR attack every sample at its own eps in one batch; APGD-T attacks
    groups of samples whose radii agree within :data:`RADIUS_GROUP_WIDTH` (2 %) at the group's
    smallest radius, so at most 2 % inside a sample's own eps.  The global RNG is left as it was
    (torchattacks reseeds it with ``seed``).

    Returns ``x_adv`` with ``||x_adv - x||_2 <= eps`` per sample.
    """
    _check_inputs(inputs)
    batch = inputs.shape[0]
    _check_target(target, batch)
    eps_t = _eps_tensor(eps, inputs)
    _check_positive_int("steps", steps)
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    names = version.split("+") if isinstance(version, str) else []
    if not names or any(n not in _AA_COMPONENTS for n in names):
        raise ValueError(f"version must be a '+'-joined chain of {sorted(_AA_COMPONENTS)}, got {version!r}")
    box = _check_clamp((0.0, 1.0), inputs)
    # Imported after the argument checks, so bad arguments are reported the same way whether or
    # not the extra is installed.
    try:
        import torchattacks  # noqa: PLC0415  (optional dependency, imported on use)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "autoattack_l2 needs the optional dependency torchattacks: pip install --no-deps torchattacks "
            "scipy tqdm requests (--no-deps: its declared requirements would replace torch via torchvision)"
        ) from err

    x = inputs.detach()
    y = target.detach().to(device=x.device, dtype=torch.long)
    x_adv = x.clone()
    if batch == 0:
        return x_adv
    with _eval_mode(model), torch.no_grad():
        logits = model(x)
    _check_logits(logits, y)
    n_classes = logits.shape[1]
    for n in names:
        if n_classes < _AA_COMPONENTS[n][1]:
            raise ValueError(f"version component {n!r} needs at least {_AA_COMPONENTS[n][1]} classes, the model has {n_classes}")
    robust = _margin(logits, y) < 0

    wrapped = _AsImages(model, tuple(x.shape[1:]), x.device)
    # torchattacks reseeds the global CPU RNG and the current CUDA device's RNG; fork both (and
    # the inputs' device) so the caller's random streams are left exactly as they were.
    rng_devices: set[int] = set()
    if torch.cuda.is_available():
        rng_devices.add(torch.cuda.current_device())
    if x.device.type == "cuda":
        rng_devices.add(x.device.index if x.device.index is not None else torch.cuda.current_device())
    with _eval_mode(model), torch.random.fork_rng(devices=sorted(rng_devices)):
        # torchattacks puts train mode back after an attack iff the module it got was training;
        # a fresh wrapper is, so switch it (and with it the model, inside _eval_mode, which
        # restores the caller's flags on exit) to eval mode.
        wrapped.eval()
        for n in names:
            if n in _PER_SAMPLE_EPS:
                batches = [(None, torch.nonzero(eps_t > 0).squeeze(1))]
            else:
                batches = [(r0, idx) for r0, idx in radius_groups(eps_t)]
            for r0, group in batches:
                todo = group[robust[group]]
                if todo.numel() == 0:
                    continue
                flat = x[todo].reshape(todo.numel(), 1, 1, -1)
                with torch.no_grad():
                    # torchattacks attacks only what it classifies correctly in this very batch;
                    # keep exactly those so a per-sample eps stays aligned with its samples.
                    todo = todo[wrapped(flat).argmax(1) == y[todo]]
                    flat = x[todo].reshape(todo.numel(), 1, 1, -1)
                if todo.numel() == 0:
                    continue
                e = eps_t[todo]
                if r0 is not None:
                    attack_eps: float | Tensor = float(r0)
                elif bool((e == e[0]).all()):
                    attack_eps = float(e[0])
                else:
                    attack_eps = e.reshape(-1, 1, 1, 1)
                attack = _AA_COMPONENTS[n][0](torchattacks, wrapped, attack_eps, steps, seed, n_classes)
                adv = attack(flat, y[todo]).detach().reshape(x[todo].shape).to(x.dtype)  # type: ignore[operator]
                adv = _enforce_ball(adv.clamp(0.0, 1.0), x[todo], e, box)
                with torch.no_grad():
                    hit = _margin(model(adv), y[todo]) >= 0
                x_adv[todo[hit]] = adv[hit]
                robust[todo[hit]] = False
    return x_adv
