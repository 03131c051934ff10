"""Layers with known Lipschitz constants: MaxMin / GroupSort activations and input normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lipmargin.lipschitz import register_layer_rule

__all__ = ["MaxMin", "GroupSort", "Normalize"]


class GroupSort(nn.Module):
    """Sort the channels (dim 1) within groups of ``group_size`` (Anil et al., ICML 2019).

    Sorting is a permutation chosen per input; it is piecewise a permutation matrix and
    continuous, hence 1-Lipschitz in L2 (and gradient-norm preserving).
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
        return grouped.sort(dim=2, descending=True).values.reshape(shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(nn.Module):
    """Split the channels (dim 1) into two halves ``a``, ``b`` and return ``[max(a, b), min(a, b)]``.

    For each coordinate pair, ``(a, b) -> (max, min)`` is the identity or a swap, so the map is
    piecewise a permutation and continuous: 1-Lipschitz in L2 (this is GroupSort with groups of
    two, pairing channel i with channel i + C/2 as in the CLL research code).
    """

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {c}")
        a, b = x[:, : c // 2], x[:, c // 2 :]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a layer inside the model, so ``eps`` stays in pixel space.

    Lipschitz constant: ``max_c 1 / std_c`` (a diagonal scaling; the shift does not count).
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
    from lipmargin.rounding import round_up, unit_roundoff

    u = unit_roundoff(y.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    t = (x.detach().double().abs() + m.mean.double().abs().view(shape)) / m.std.double().view(shape)
    n = t[0].numel()
    return round_up(4 * u * t.reshape(t.shape[0], -1).norm(dim=1) * (1 + 1e-12) + 4 * float(torch.finfo(y.dtype).tiny) * n**0.5)


# max / min of pairs and sorting only move entries: no rounding.
register_layer_rule(MaxMin, GroupSort, constant=lambda m: 1.0, rounding=_exact)
register_layer_rule(Normalize, constant=_normalize_constant, rounding=_normalize_rounding)
