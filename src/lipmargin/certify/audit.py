"""Audit a trained model's certificates: try to break them, and bound the Lipschitz constant from below.

A certificate says no input within distance ``R(x)`` of ``x`` changes the prediction.  The audit
attacks every correctly classified sample with PGD-L2 (and, with ``use_autoattack``, AutoAttack's
APGD-CE and APGD-T through ``torchattacks``) at each evaluation radius, and every certified sample
at (just inside) its own certified radius; any success on a certified sample is a *violation*,
proof that a bound was wrong.  Each violation names the attacks that found it.  The empirical
lower bound of the Lipschitz constant (LOBO) is a true difference quotient, so it must stay below
the upper bound (tightness <= 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torch import nn

from lipmargin.certify.attacks.autoattack import autoattack_l2
from lipmargin.certify.attacks.lower import lipschitz_lower
from lipmargin.certify.attacks.pgd import pgd_l2
from lipmargin.certify.core import ModelBound, ModelEstimate, _float64_copy, certify, model_bound
from lipmargin.certify.radius import certified_mask

if TYPE_CHECKING:
    from lipmargin.checkpoint import CheckpointRef

__all__ = ["AuditResult", "audit_model"]


@dataclass
class AuditResult:
    num_samples: int
    clean_accuracy: float
    certified_accuracy: dict[float, float]
    empirical_robust_accuracy: dict[float, float]
    violations: int
    violation_details: list[dict[str, Any]]
    lipschitz_upper: float
    lipschitz_lower: float
    tightness: float
    per_layer: list[dict[str, Any]]
    attacks: list[str] = field(default_factory=list)
    checkpoint: CheckpointRef | None = None  # the weights audited, when the caller named them
    notes: list[str] = field(default_factory=list)  # attacks that could not run, and why


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def audit_model(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    eps: Sequence[float],
    *,
    lobo_inputs: Tensor,
    bound: ModelBound | ModelEstimate | None = None,
    pgd_steps: int = 50,
    pgd_restarts: int = 5,
    lobo_pairs: int = 500,
    lobo_steps: int = 200,
    lobo_lr: float = 3e-4,
    use_autoattack: bool = False,
    autoattack_steps: int = 100,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    checkpoint: CheckpointRef | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    input_shape: Sequence[int] | None = None,
) -> AuditResult:
    """Audit ``model`` on ``(inputs, target)``; ``lobo_inputs`` are the images LOBO starts from.

    ``clamp`` is the valid input box (pixels in [0, 1]; ``None`` for unbounded data such as two
    moons): attacks and LOBO stay inside it.  ``checkpoint`` (which weights ``model`` holds, e.g.
    :attr:`lipmargin.train.LoadedRun.checkpoint`) is recorded in the result.

    Certification uses float64 logits and ``bound`` (sound by default).  Attacks run on a float64
    copy too, so that a "flip" is never an artefact of float32 rounding at the decision boundary.

    ``on_event`` receives ``{"event": "attack", "index": i, "total": n, "name": ..., "samples": k}``
    before each of the ``n`` stages (the attacks at each eps, at each sample's own radius, LOBO).

    ``use_autoattack`` runs APGD-CE and APGD-T (real ``torchattacks``; ``ImportError`` if it is
    missing) at every evaluation radius and at each sample's own radius times ``1 - 1e-6``:
    APGD-CE at exactly that radius per sample, APGD-T per group of radii within 2 % at the
    group's smallest one (:func:`lipmargin.certify.attacks.autoattack_l2`).  It needs inputs in [0, 1]
    (``clamp=(0, 1)``, else ``ValueError``); APGD-T needs >= 4 classes and is otherwise left out,
    with a note in ``notes``.  ``autoattack_steps``: iterations per APGD run (AutoAttack uses 100).
    """
    if input_shape is None and bound is not None and bound.input_shape:
        input_shape = bound.input_shape
    if bound is None:
        bound = model_bound(model, "sound", input_shape=input_shape)
    if use_autoattack and (clamp is None or tuple(float(c) for c in clamp) != (0.0, 1.0)):
        raise ValueError(f"AutoAttack (torchattacks) attacks inputs in [0, 1] only; this data's box is {clamp}")
    device = inputs.device
    m64 = _float64_copy(model).to(device)
    x64 = inputs.to(torch.float64)
    # The certificates under audit are exactly certify's (the same radius path, rounding allowance included).
    certified_run = certify(model, [(inputs, target)], list(eps), bound=bound, input_shape=input_shape)
    radius, pred = certified_run.radius.to(device), certified_run.prediction.to(device)
    correct = pred == target
    n = int(target.numel())
    gen = torch.Generator(device=device).manual_seed(seed)
    violations: list[dict[str, Any]] = []
    robust_acc: dict[float, float] = {}
    attacks = ["pgd-l2"]
    notes: list[str] = []
    if use_autoattack:
        attacks.append("apgd-ce")
        num_classes = int(bound.pairwise.shape[0])
        if num_classes >= 4:
            attacks.append("apgd-t")
        else:
            notes.append(f"apgd-t not run: it targets the top 3 other classes, the model has {num_classes}")
    stages = len(eps) + 2

    def stage(index: int, name: str, samples: int) -> None:
        if on_event is not None:
            on_event({"event": "attack", "index": index, "total": stages, "name": name, "samples": samples})

    def broken_by_attacks(x: Tensor, y: Tensor, radius_or_eps: float | Tensor) -> tuple[Tensor, list[list[str]]]:
        """``(broken (B,), names of the attacks that broke each sample)``."""
        found: dict[str, Tensor] = {}
        adv = pgd_l2(m64, x, y, radius_or_eps, steps=pgd_steps, restarts=pgd_restarts, clamp=clamp, generator=gen)
        with torch.no_grad():
            found["pgd-l2"] = _predict(m64, adv) != y
        for name in attacks[1:]:  # each APGD component on every sample, so each can be credited
            adv = autoattack_l2(m64, x, y, radius_or_eps, version=name, seed=seed, steps=autoattack_steps)
            with torch.no_grad():
                found[name] = _predict(m64, adv.to(x.dtype)) != y
        broken = torch.stack(list(found.values())).any(0)
        names = [[a for a in found if bool(found[a][i])] for i in range(int(y.numel()))]
        return broken, names

    for k, e in enumerate(eps):
        certified = certified_mask(radius, correct, float(e))
        idx = correct.nonzero().flatten()
        stage(k + 1, f"{'+'.join(attacks)} at eps {float(e):g}", int(idx.numel()))
        robust = torch.zeros_like(correct)
        if idx.numel():
            broken, names = broken_by_attacks(x64[idx], target[idx], float(e))
            robust[idx] = ~broken
            for j in (broken & certified[idx]).nonzero().flatten().tolist():
                i = int(idx[j])
                violations.append({"index": i, "eps": float(e), "radius": float(radius[i]), "kind": "eps", "attacks": names[j]})
        robust_acc[float(e)] = float(robust.sum()) / max(n, 1)

    # Each certified sample at (just inside) its own radius: the strongest claim the bound makes.
    own = certified_mask(radius, correct, 0.0) & torch.isfinite(radius)
    idx = own.nonzero().flatten()
    stage(len(eps) + 1, f"{'+'.join(attacks)} at each sample's own radius", int(idx.numel()))
    if idx.numel():
        r = radius[idx] * (1 - 1e-6)
        broken, names = broken_by_attacks(x64[idx], target[idx], r)
        for k in broken.nonzero().flatten().tolist():
            i = int(idx[k])
            violations.append(
                {"index": i, "eps": float(r[k]), "radius": float(radius[i]), "kind": "own-radius", "attacks": names[k]}
            )

    stage(stages, f"LOBO ({lobo_pairs} pairs, {lobo_steps} steps)", lobo_pairs)
    lower = lipschitz_lower(
        m64, lobo_inputs.to(device=device, dtype=torch.float64), pairs=lobo_pairs, steps=lobo_steps, lr=lobo_lr, clamp=clamp,
        generator=torch.Generator(device=device).manual_seed(seed),
    ).lipschitz_lower
    tightness = lower / bound.lipschitz if bound.lipschitz > 0 else float("inf")
    if tightness > 1.0:
        violations.append({"kind": "tightness", "lower": lower, "upper": bound.lipschitz})

    power = model_bound(model, "power", input_shape=input_shape)
    sound = bound if bound.method == "sound" else model_bound(model, "sound", input_shape=input_shape)
    per_layer = [
        {"layer": f"{i}:{name}", "power": p, "sound": s}
        for i, (name, p, s) in enumerate(zip(sound.layers, power.per_layer, sound.per_layer))
    ]
    return AuditResult(
        num_samples=n,
        clean_accuracy=float(correct.sum()) / max(n, 1),
        certified_accuracy=certified_run.certified_accuracy,
        empirical_robust_accuracy=robust_acc,
        violations=len(violations),
        violation_details=violations,
        lipschitz_upper=bound.lipschitz,
        lipschitz_lower=lower,
        tightness=tightness,
        per_layer=per_layer,
        attacks=attacks,
        checkpoint=checkpoint,
        notes=notes,
    )

