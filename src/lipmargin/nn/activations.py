"""Layers with known Lipschitz constants: MaxMin / GroupSort activations and input normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lipmargin.lipschitz import register_layer_rule

__all__ = ["MaxMin", "GroupSort", "Normalize", "max_min_pairs"]


def _pair_views(t: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The two members of each channel pair as views: ``(i, i + C/2)``, or ``(2i, 2i + 1)``."""
    if interleaved:
        return t[:, 0::2], t[:, 1::2]
    h = t.shape[1] // 2
    return t[:, :h], t[:, h:]


class _MaxMinPairs(torch.autograd.Function):
    """Channel pairs ``(a, b) -> (max(a, b), min(a, b))`` in place of ``(a, b)``, two-mask backward.

    The autograd graph of ``cat([maximum(a, b), minimum(a, b)])`` runs about ten element-wise
    kernels backward (two masks per op, their sum, the cat and chunk copies); this one saves two
    bool masks, writes into views of one output (keeping the input's memory format, e.g.
    channels-last) and runs three ``where``s.  Gradients equal torch's for ``maximum`` /
    ``minimum``: at a tie each input gets half of each output's gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, interleaved: bool) -> Tensor:  # type: ignore[override]
        a, b = _pair_views(x, interleaved)
        out = torch.empty_like(x)
        hi, lo = _pair_views(out, interleaved)
        torch.maximum(a, b, out=hi)
        torch.minimum(a, b, out=lo)
        ctx.save_for_backward(a > b, a == b)
        ctx.interleaved = interleaved
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        gt, tie = ctx.saved_tensors
        g_hi, g_lo = _pair_views(grad, ctx.interleaved)
        half = g_hi * 0.5 + g_lo * 0.5  # a tie: maximum's and minimum's backward give half each
        if grad.requires_grad:  # create_graph (double backward): out= is not differentiable
            g_a = torch.where(tie, half, torch.where(gt, g_hi, g_lo))
            g_b = torch.where(tie, half, torch.where(gt, g_lo, g_hi))
            if ctx.interleaved:
                return torch.stack([g_a, g_b], 2).flatten(1, 2), None
            return torch.cat([g_a, g_b], 1), None
        g_x = torch.empty_like(grad)
        g_a, g_b = _pair_views(g_x, ctx.interleaved)
        torch.where(gt, g_hi, g_lo, out=g_a)
        torch.where(gt, g_lo, g_hi, out=g_b)
        torch.where(tie, half, g_a, out=g_a)
        torch.where(tie, half, g_b, out=g_b)
        return g_x, None


def max_min_pairs(x: Tensor, *, interleaved: bool = False) -> Tensor:
    """Sort channel pairs (dim 1) descending, in place of the pair; same shape and memory format.

    Pairs are channels ``(i, i + C/2)`` (MaxMin), or ``(2i, 2i + 1)`` with ``interleaved``
    (GroupSort with groups of two).  NaN propagates as in ``torch.maximum`` / ``torch.minimum``.

    >>> import torch
    >>> max_min_pairs(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), interleaved=True).tolist()
    [[4.0, 1.0, 3.0, 2.0]]
    """
    if x.dim() < 2 or x.shape[1] % 2:
        raise ValueError(f"max_min_pairs needs an even number of channels in dim 1, got shape {tuple(x.shape)}")
    if torch._C._are_functorch_transforms_active():  # vmap / grad (batched sweeps): the plain ops
        a, b = _pair_views(x, interleaved)
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return torch.stack([hi, lo], 2).flatten(1, 2) if interleaved else torch.cat([hi, lo], 1)
    return _MaxMinPairs.apply(x, interleaved)


class GroupSort(nn.Module):
    """Sort the channels (dim 1) within groups of ``group_size`` (Anil et al., ICML 2019).

    Sorting is a permutation chosen per input; it is piecewise a permutation matrix and
    continuous, hence 1-Lipschitz in L2 (and gradient-norm preserving).

    >>> import torch
    >>> GroupSort(2)(torch.tensor([[1.0, 4.0, 3.0, 2.0]])).tolist()
    [[4.0, 1.0, 3.0, 2.0]]
    """

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"GroupSort: group_size must be >= 2, got {group_size}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c % self.group_size:
            raise ValueError(f"GroupSort: {c} channels are not divisible by group_size {self.group_size}")
        shape = x.shape
        grouped = x.reshape(shape[0], c // self.group_size, self.group_size, *shape[2:])  # (B, G, g, ...)
        if self.group_size == 2:
            return max_min_pairs(x, interleaved=True)  # a sort of two is a max and a min
        return grouped.sort(dim=2, descending=True).values.reshape(shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(nn.Module):
    """Split the channels (dim 1) into two halves ``a``, ``b`` and return ``[max(a, b), min(a, b)]``.

    For each coordinate pair, ``(a, b) -> (max, min)`` is the identity or a swap, so the map is
    piecewise a permutation and continuous: 1-Lipschitz in L2 (this is GroupSort with groups of
    two, pairing channel i with channel i + C/2 as in the CLL research code).

    >>> import torch
    >>> MaxMin()(torch.tensor([[1.0, 4.0, 3.0, 2.0]])).tolist()
    [[3.0, 4.0, 1.0, 2.0]]
    """

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {c}")
        return max_min_pairs(x)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a layer inside the model, so ``eps`` stays in pixel space.

    Lipschitz constant: ``max_c 1 / std_c`` (a diagonal scaling; the shift does not count).

    >>> import torch
    >>> Normalize(mean=[0.5], std=[0.25])(torch.ones(1, 1, 1, 1)).item()
    2.0
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} entries but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: every std must be > 0, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _normalize_constant(m: nn.Module) -> float:
    # float32 std rounded: take the float64 reciprocal of the stored value, which is what the
    # layer divides by; inflate by one float32 ulp because the division itself rounds.
    std = m.std.detach().double()  # type: ignore[union-attr]
    return float((1.0 / std).max()) * (1.0 + 2.0**-22)


def _exact(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)


def _normalize_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    # (x - mean) / std: two roundings, each relative to a value bounded by (|x| + |mean|) / std.
    from lipmargin.lipschitz.rounding import round_up, unit_roundoff

    u = unit_roundoff(y.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    t = (x.detach().double().abs() + m.mean.double().abs().view(shape)) / m.std.double().view(shape)
    n = t[0].numel()
    return round_up(4 * u * t.reshape(t.shape[0], -1).norm(dim=1) * (1 + 1e-12) + 4 * float(torch.finfo(y.dtype).tiny) * n**0.5)


# max / min of pairs and sorting only move entries: no rounding.
register_layer_rule(MaxMin, GroupSort, constant=lambda m: 1.0, rounding=_exact)
register_layer_rule(Normalize, constant=_normalize_constant, rounding=_normalize_rounding)
