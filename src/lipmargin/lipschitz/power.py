"""THE power-iteration step, and what is built on it (pure functions over tensors).

A power iteration on ``A^T A`` approaches ``||A||_2`` from below: everything here is an
*estimate*.  Sound values come from :mod:`lipmargin.lipschitz.dense` / :mod:`lipmargin.lipschitz.conv`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["normalize", "power_iteration", "operator_norm_estimate", "training_estimate", "converge_operator_norm", "no_autocast"]

Operator = Callable[[Tensor], Tensor]


def no_autocast(t: Tensor) -> contextlib.AbstractContextManager:
    """A context that leaves autocast on ``t``'s device (a no-op on devices without autocast).

    Power iterations, weight parametrisations and bounds run in the parameters' own precision even
    when the surrounding forward runs under ``torch.autocast`` (``train.precision=bf16``).

    >>> with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast(torch.zeros(1)):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _norms(v: Tensor, batched: bool) -> Tensor:
    """``||v||`` (a scalar); with ``batched``, ``||v[i]||`` of each member, shaped to broadcast on ``v``."""
    if not batched:
        return v.norm()
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def normalize(v: Tensor, batched: bool = False) -> Tensor:
    """``v / ||v||`` (each member on its own with ``batched``); an all-zero ``v`` stays zero.

    >>> normalize(torch.tensor([3.0, 4.0]))
    tensor([0.6000, 0.8000])
    """
    # The tiny floor keeps an all-zero operator (a dead layer) from producing NaNs.
    return v / _norms(v, batched).clamp_min(torch.finfo(v.dtype).tiny)


def power_iteration(forward: Operator, adjoint: Operator, v: Tensor, n_iter: int, *, batched: bool = False) -> Tensor:
    """``n_iter`` steps of ``v <- A^T A v / ||A^T A v||``; returns the new unit vector.

    ``batched``: ``v`` stacks independent vectors along dim 0 (one per operator of a block-diagonal
    ``A``, as in a batched sweep) and each is normalised on its own.

    >>> a = torch.diag(torch.tensor([3.0, 1.0]))
    >>> power_iteration(lambda x: x @ a.T, lambda y: y @ a, torch.tensor([[1.0, 1.0]]), 20).round(decimals=4)
    tensor([[1., 0.]])
    """
    for _ in range(n_iter):
        u = adjoint(forward(v))
        norm = _norms(u, batched)  # what normalize(u) divides by, computed once
        # v in the null space (e.g. a dead, all-zero layer): keep v instead of a zero vector, whose
        # estimate ||A 0|| / ||0|| would be NaN.  torch.where, not `if`, so the GPU never syncs.
        v = torch.where(norm > 0, u / norm.clamp_min(torch.finfo(u.dtype).tiny), v)
    return v


def operator_norm_estimate(forward: Operator, v: Tensor, *, batched: bool = False) -> Tensor:
    """``||A v|| / ||v||``: a lower estimate of ``||A||_2`` (a scalar tensor, differentiable in A).

    ``batched``: one estimate per vector stacked along dim 0, shape ``(M,)``.

    >>> a = torch.diag(torch.tensor([3.0, 1.0]))
    >>> operator_norm_estimate(lambda x: x @ a.T, torch.tensor([[1.0, 1.0]]))
    tensor(2.2361)
    """
    if not batched:
        return forward(v).norm() / v.norm()
    return (_norms(forward(v), True) / _norms(v, True)).reshape(-1)


def training_estimate(
    forward: Operator, adjoint: Operator, v: Tensor, n_iter: int, *, unrolled: bool = False, batched: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One training step's ``(||A u|| / ||u||, u)``: ``u`` is ``v`` advanced by ``n_iter`` steps
    (``None`` when ``n_iter`` is 0: nothing to store).

    The estimate is differentiable in ``A``.  By default ``u`` is a constant in it; ``unrolled``
    differentiates through the ``n_iter`` steps as well (``train.power_grad``), starting from a
    copy of ``v`` so that the caller may overwrite its buffer before the backward.  The returned
    ``u`` carries no graph either way.
    """
    if n_iter <= 0:
        return operator_norm_estimate(forward, v.detach(), batched=batched), None
    if unrolled:
        u = power_iteration(forward, adjoint, v.detach().clone(), n_iter, batched=batched)
        return operator_norm_estimate(forward, u, batched=batched), u.detach()
    with torch.no_grad():
        u = power_iteration(forward, adjoint, v, n_iter, batched=batched)
    return operator_norm_estimate(forward, u.detach(), batched=batched), u


def converge_operator_norm(
    forward: Operator, adjoint: Operator, v: Tensor, *, tol: float = 1e-9, max_iter: int = 10_000,
    check_every: int = 10,
) -> tuple[Tensor, Tensor]:
    """Power-iterate until one step changes the estimate by at most ``tol`` (relative), or
    ``max_iter`` steps.

    The test runs every ``check_every`` steps (comparing the last two), so that on a GPU the host
    waits for the device once per chunk rather than once per step.  Returns ``(sigma, v)``;
    ``sigma`` is still an estimate from below, only a good one.

    >>> a = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    >>> sigma, _ = converge_operator_norm(lambda x: x @ a.T, lambda y: y @ a, torch.ones(1, 2, dtype=torch.float64))
    >>> round(float(sigma), 6), round(float(torch.linalg.matrix_norm(a, 2)), 6)
    (2.288246, 2.288246)
    """
    with torch.no_grad():
        v = normalize(v)
        sigma = operator_norm_estimate(forward, v)
        done_steps = 0
        while done_steps < max_iter:
            chunk = min(check_every, max_iter - done_steps)
            v = power_iteration(forward, adjoint, v, chunk - 1)
            before = operator_norm_estimate(forward, v)
            v = power_iteration(forward, adjoint, v, 1)
            sigma = operator_norm_estimate(forward, v)
            done_steps += chunk
            pair = torch.stack([before, sigma]).tolist()  # one device sync per chunk
            if abs(pair[1] - pair[0]) <= tol * max(pair[1], 1e-300):
                break
    return sigma, v
