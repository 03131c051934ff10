"""L2 projected gradient ascent (Madry et al. 2018) with multi-targeted restarts, and robust accuracy.

A point :func:`pgd_l2` returns is always inside the ball (and the box), so a sample certified at
radius ``eps`` must never be flipped by it; if it is, the certificate is wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.certify.attacks._common import (
    _check_clamp,
    _check_inputs,
    _check_logits,
    _check_positive_float,
    _check_positive_int,
    _check_target,
    _eps_tensor,
    _eval_mode,
    _flat_norm,
    _margin,
    _per_sample,
    _project,
    _random_in_ball,
    _targeted_margin,
)

__all__ = ["LOSSES", "AttackLoss", "pgd_l2", "robust_accuracy"]


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

    Example: ``f(x) = W x`` with ``W = [[3, 0], [0, 4]]`` at ``x = (0.6, 0.4)`` has margin 0.2 and
    ``||W_0 - W_1|| = 5``, so the nearest error is at distance 0.04: PGD cannot flip the sample
    within 0.03 and finds an error within 0.05.

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    >>> x, y = torch.tensor([[0.6, 0.4]]), torch.tensor([0])
    >>> gen = torch.Generator().manual_seed(0)
    >>> [model(pgd_l2(model, x, y, eps, generator=gen)).argmax(1).item() for eps in (0.03, 0.05)]
    [0, 1]
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
