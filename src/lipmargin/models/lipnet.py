"""LipschitzNet: a feature extractor with Lipschitz rules and a plain linear head; shared building blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.lipschitz.estimate import FeatureEstimate

__all__ = ["LipschitzNet"]


class LipschitzNet(nn.Module):
    """``f(x) = head(features(x))`` with persistent power-iteration state for ``features``.

    Attributes:
        features: the feature extractor (``nn.Sequential``); every layer needs a Lipschitz rule.
        head: the final ``nn.Linear`` (C x d); its rows give the pairwise bounds.
        bound: :class:`~lipmargin.lipschitz.FeatureEstimate` holding the power-iteration buffers.
        in_shape: input shape without the batch dimension (the ``input_shape`` it was built for).

    >>> import torch
    >>> from torch import nn
    >>> from lipmargin.nn import MaxMin
    >>> net = LipschitzNet(nn.Sequential(nn.Linear(2, 4), MaxMin()), nn.Linear(4, 3), input_shape=(2,))
    >>> net(torch.rand(5, 2)).shape
    torch.Size([5, 3])
    >>> net.num_classes, net.in_shape
    (3, (2,))
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear, input_shape: Sequence[int]) -> None:
        super().__init__()
        if type(head) is not nn.Linear:
            # exact type: a subclass may override forward (e.g. scale its output)
            raise TypeError(f"the head of a LipschitzNet must be exactly nn.Linear, got {type(head).__name__}")
        self.features = features
        self.head = head
        self.in_shape = tuple(int(s) for s in input_shape)
        self.bound = FeatureEstimate(features, self.in_shape)
        # The traced plan knows the features' output size; running the features again here would
        # advance the power iterations of training-mode layers (CPL, SOC) of the caller's modules.
        width = self.bound.plan.num_classes  # (B, d) outputs: d; any other rank: 0
        if width != head.in_features:
            produced = f"shape ({width},)" if width else "an output that is not (batch, d)"
            raise ValueError(f"features produce {produced} but the head expects ({head.in_features},)")

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def feature_lipschitz(self, n_iter: int = 0, unrolled: bool = False) -> tuple[Tensor, Tensor]:
        """``(K, per-layer sigmas)``: the power-iteration estimate of the feature bound.

        Advances the persistent vectors by ``n_iter`` steps when in training mode; ``K`` carries
        gradients to the weights (``unrolled``: through the ``n_iter`` steps too, see
        :meth:`~lipmargin.lipschitz.FeatureEstimate.advance`).
        """
        return self.bound(n_iter, unrolled)

    def pairwise_lipschitz(self, feature_lipschitz: Tensor) -> Tensor:
        """``(C, C)`` matrix ``K * ||W_i - W_j||`` (differentiable in both factors)."""
        return feature_lipschitz * pairwise_head_norms(self.head.weight)


def _init(module: nn.Module) -> None:
    """Kaiming-normal weights and zero biases (docs/method.md#d-layouts)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _image_shape(input_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input, or a ``ValueError`` naming the model."""
    if len(input_shape) != 3:
        raise ValueError(f"{name} expects image inputs (C, H, W); got input shape {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def _with_head(features: nn.Sequential, width: int, num_classes: int, input_shape: Sequence[int]) -> LipschitzNet:
    """``features`` followed by a kaiming-normal, zero-bias ``nn.Linear(width, num_classes)`` head."""
    head = nn.Linear(width, num_classes)
    _init(head)
    return LipschitzNet(features, head, input_shape)
