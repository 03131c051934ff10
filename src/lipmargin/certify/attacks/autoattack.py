"""AutoAttack's APGD components (Croce & Hein 2020) in L2 through ``torchattacks`` (optional).

``pip install --no-deps torchattacks``: its declared requirements would replace torch via
torchvision.  :func:`autoattack_l2` runs APGD-CE / APGD-DLR at a per-sample radius and APGD-T per
group of radii (:func:`radius_groups`), and leaves the caller's RNG streams as they were.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lipmargin.certify.attacks._common import (
    _check_clamp,
    _check_inputs,
    _check_logits,
    _check_positive_int,
    _check_target,
    _enforce_ball,
    _eps_tensor,
    _eval_mode,
    _is_int,
    _margin,
)

__all__ = ["RADIUS_GROUP_WIDTH", "autoattack_l2", "radius_groups"]


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

