"""The certified predictor: plain torch copies of a model's layers and its baked pairwise bound.

:func:`build_predictor` turns a model with ``features`` (layers applied in order), a linear
``head``, ``in_shape`` and ``num_classes`` (what :class:`lipmargin.models.LipschitzNet` has; the
model is only duck-typed here) and a *sound* :class:`lipmargin.certify.ModelBound` of its current
weights into a :class:`CertifiedPredictor` mapping ``x`` to ``(label, radius)``.  Each layer type
needs an export conversion (:data:`LAYER_EXPORTS`, :func:`register_layer_export`) and a
forward-rounding step rule (:mod:`lipmargin.export.allowance`); any other layer is refused.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lipmargin.certify import ModelBound, certify
from lipmargin.export.allowance import (
    ExactStep,
    build_step,
    down_to,
    final_factor,
    normalize_step,
    register_step_rule,
    up_to,
)
from lipmargin.lipschitz import flatten_layers, operator_norm_bound
from lipmargin.lipschitz.rounding import SQRT2_UP, unit_roundoff
from lipmargin.nn.activations import GroupSort, MaxMin, Normalize

if TYPE_CHECKING:
    from lipmargin.models import LipschitzNet

__all__ = [
    "ALLOWANCE_MULTIPLE",
    "LAYER_EXPORTS",
    "CertifiedPredictor",
    "build_predictor",
    "check_bound_matches",
    "exportable_parts",
    "register_layer_export",
]



class _MaxMin(nn.Module):
    """``[max(a, b), min(a, b)]`` of the two channel halves (as :class:`lipmargin.nn.activations.MaxMin`)."""

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class _GroupSort(nn.Module):
    """Channels sorted descending within groups (as :class:`lipmargin.nn.activations.GroupSort`)."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        grouped = x.unflatten(1, (x.shape[1] // self.group_size, self.group_size))  # (B, G, g, ...)
        return grouped.sort(dim=2, descending=True).values.flatten(1, 2)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with float64 buffers."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().to(torch.float64, copy=True))
        self.register_buffer("std", std.detach().to(torch.float64, copy=True))

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64, copy=True)


def _export_linear(m: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    assert isinstance(m, nn.Linear)
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
    out.weight = nn.Parameter(_f64(m.weight).to(dtype), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(_f64(m.bias).to(dtype), requires_grad=False)
    return out


def _export_conv(m: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    assert isinstance(m, nn.Conv2d)
    out = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,  # type: ignore[arg-type]
        m.dilation, m.groups, bias=m.bias is not None, padding_mode=m.padding_mode, dtype=dtype,
    )
    out.weight = nn.Parameter(_f64(m.weight).to(dtype), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(_f64(m.bias).to(dtype), requires_grad=False)
    return out


LayerExport = Callable[[nn.Module, torch.dtype], nn.Module]

#: How each layer type becomes a plain module of the graph's dtype; filled by
#: :func:`register_layer_export`.  Look-ups use the exact type: a subclass may compute something
#: else with the same weights.  Each exported type also needs a forward-rounding step rule
#: (:data:`lipmargin.export.allowance.STEP_RULES`).
LAYER_EXPORTS: dict[type, LayerExport] = {}


def register_layer_export(*types: type) -> Callable[[LayerExport], LayerExport]:
    """Decorator: ``convert(layer, dtype) -> plain module`` for layers of exactly these types."""

    def decorator(convert: LayerExport) -> LayerExport:
        for t in types:
            LAYER_EXPORTS[t] = convert
        return convert

    return decorator


register_layer_export(nn.Linear)(_export_linear)
register_layer_export(nn.Conv2d)(_export_conv)
register_layer_export(nn.Flatten)(lambda m, dtype: nn.Flatten(m.start_dim, m.end_dim))  # type: ignore[arg-type]
register_layer_export(nn.ReLU)(lambda m, dtype: nn.ReLU())
register_layer_export(nn.Identity)(lambda m, dtype: nn.Identity())
register_layer_export(MaxMin)(lambda m, dtype: _MaxMin())
register_layer_export(GroupSort)(lambda m, dtype: _GroupSort(m.group_size))  # type: ignore[arg-type]
register_layer_export(Normalize)(lambda m, dtype: _Normalize(m.mean, m.std).to(dtype))  # type: ignore[arg-type]

# Layers computed exactly in floating point (max, min, sort, copies) and at most 1-Lipschitz: the
# forward error passes through unchanged.
register_step_rule(nn.ReLU, nn.Identity, nn.Flatten, _MaxMin, _GroupSort)(
    lambda layer, original, in_shape, out_shape, lip, dtype: ExactStep(layer)
)


@register_step_rule(_Normalize)
def _normalize_step(layer, original, in_shape, out_shape, lip, dtype):  # type: ignore[no-untyped-def]
    return normalize_step(layer, original.mean, original.std, out_shape, lip, dtype)


def _export_layer(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    convert = LAYER_EXPORTS.get(type(m))
    if convert is None:
        # Its forward could round in ways no rule accounts for: refuse rather than guess.
        supported = ", ".join(sorted(t.__name__ for t in LAYER_EXPORTS))
        raise TypeError(
            f"cannot export layer {type(m).__name__} ({m!r}) as a certified predictor: no export "
            f"conversion with a forward-rounding allowance; supported: {supported}"
        )
    return convert(m, dtype).to(device="cpu").eval().requires_grad_(False)


#: The exported radius subtracts this many times its own forward allowance, per graph dtype (see
#: :meth:`CertifiedPredictor.forward` for why this keeps it below certify()'s float64 radius).
ALLOWANCE_MULTIPLE = {torch.float64: 3, torch.float32: 2}


class CertifiedPredictor(nn.Module):
    """``x -> (label (B,) int64, radius (B,) float64)`` with the pairwise bound as a constant.

    Holds copies of the model's layers in the graph dtype (float64, or float32 for ONNX Runtime),
    each wrapped in a step of :mod:`lipmargin.export.allowance` that also updates a proven bound of the
    forward pass's rounding error, and the ``(C, C)`` pairwise bound rounded up to the dtype.  The
    radius is deflated by :data:`ALLOWANCE_MULTIPLE` times that error and every rounding of the
    radius formula is directed downwards.  Build it with :func:`build_predictor`.
    """

    pairwise: Tensor

    def __init__(
        self,
        steps: nn.ModuleList,
        head_step: nn.Module,
        pairwise: Tensor,
        in_shape: Sequence[int],
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.head_step = head_step
        self.head = head_step.layer  # the head Linear (shared with its step)
        self.dtype = dtype
        self.in_shape = tuple(int(s) for s in in_shape)
        # pairwise rounded up to the dtype, so the divisions below use values >= the float64 bound
        up = pairwise.detach().to(torch.float64).to(dtype)
        up = torch.where(up.to(torch.float64) < pairwise.to(torch.float64), torch.nextafter(up, torch.full_like(up, math.inf)), up)
        self.register_buffer("pairwise", up)
        u = unit_roundoff(dtype)
        self.register_buffer("factor", final_factor(len(steps) + 1, dtype))
        self.register_buffer("shrink", down_to(1.0 - 8.0 * u, dtype))  # exact for both dtypes
        multiple = ALLOWANCE_MULTIPLE[dtype]
        self.register_buffer("inflate", up_to(multiple * SQRT2_UP * (1.0 + 8.0 * u) * (1.0 + 1e-12), dtype))

    def logits_and_error(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (B, C), err (B,))``: ``err`` bounds ``||logits - exact logits||_2``."""
        x = x.to(self.dtype)
        err = x.flatten(1)[:, 0] * 0.0  # (B,) zeros (nan for a non-finite input: radius 0)
        for step in self.steps:
            x, err = step(x, err)
        logits, err = self.head_step(x, err)
        return logits, err * self.factor

    def logits(self, x: Tensor) -> Tensor:
        return self.logits_and_error(x)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Why the radius is <= certify()'s.  Let m* be a margin f_c - f_j of the exact network, m
        # the one computed here, m' the one certify() computes in float64, A >= sqrt(2) ||logit
        # error|| here and A' >= sqrt(2) ||logit error|| of certify's float64 pass, so that
        # |m - m*| <= A and |m' - m*| <= A'.  With k = ALLOWANCE_MULTIPLE the numerator here is at
        # most m - k A <= m* - (k - 1) A; certify's is at least m' - A' >= m* - 2 A' when it
        # deflates by its own allowance (and m' >= m* - A' when it does not).  So ours is the
        # smaller one whenever (k - 1) A >= 2 A'.
        # - float32 graph, k = 2: A >= 2 A' as A ~ 2**29 A' (unit roundoffs 2**-24 vs 2**-53 and
        #   gamma_{n+2} vs gamma_{n+1} on the same |W| |x| magnitudes, which differ only by the
        #   forward errors; if those were comparable to |x| the allowance would exceed the margin
        #   and the radius here would be 0 anyway).
        # - float64 graph, k = 3: A >= A' as both evaluate the same formula (rounding.py's
        #   gamma_{n+1} || |W| |x| + |b| ||, propagated by the same sound per-layer Lipschitz
        #   bounds), here with more inflation (gamma_{n+2}, the (1 + gamma) factors of the in-graph
        #   evaluation), at activations that agree with certify's up to both forward errors (a
        #   relative change ~ gamma |||W||| Lip, far below that inflation).
        # The pairwise rows are the same sound float64 bound (rounded up here) and every rounding
        # below is directed downwards.  The export's own check verifies the result on the whole
        # test split and refuses the file otherwise.
        logits, err = self.logits_and_error(x)  # (B, C), (B,)
        pred = logits.argmax(1)  # (B,)
        margin = logits.gather(1, pred.unsqueeze(1)) - logits  # (B, C), one rounding
        allowance = (err * self.inflate).unsqueeze(1)  # (B, 1), >= k sqrt(2) err
        num = ((margin * self.shrink - allowance) * self.shrink).clamp_min(0.0)
        rows = self.pairwise[pred]  # (B, C)
        safe = torch.where(rows > 0, rows, torch.ones_like(rows))
        ratio = num / safe * self.shrink
        inf = torch.full_like(ratio, math.inf)
        ratio = torch.where(rows > 0, ratio, torch.where(num > 0, inf, torch.zeros_like(ratio)))
        ratio = torch.where(torch.isnan(ratio), torch.zeros_like(ratio), ratio)
        classes = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)  # (1, C)
        ratio = torch.where(classes == pred.unsqueeze(1), inf, ratio)
        return pred, ratio.amin(1).to(torch.float64)


def exportable_parts(model: nn.Module) -> tuple[list[nn.Module], nn.Module, tuple[int, ...], int]:
    """``(layers, head, in_shape, num_classes)`` of a LipschitzNet-like model (duck-typed)."""
    missing = [a for a in ("features", "head", "in_shape", "num_classes") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"cannot export {type(model).__name__} as a certified predictor: it has no {', '.join(missing)} "
            "(export needs a LipschitzNet-like model: features, a linear head, in_shape, num_classes)"
        )
    head = model.head
    if not isinstance(head, nn.Module):
        raise TypeError(f"cannot export {type(model).__name__}: its head is not a module")
    features: Any = model.features
    return [*flatten_layers(features), head], head, tuple(int(s) for s in model.in_shape), int(model.num_classes)


def check_bound_matches(model: nn.Module, bound: ModelBound, input_shape: Sequence[int]) -> None:
    """``ValueError`` unless ``bound`` was computed from ``model``'s current weights and graph (its
    fingerprint) for inputs of ``input_shape``: a bound remembers which weights it holds for."""
    shape = tuple(int(s) for s in input_shape)
    if bound.input_shape and tuple(bound.input_shape) != shape:
        raise ValueError(f"the bound holds for inputs of shape {tuple(bound.input_shape)}, the model takes {shape}")
    # certify() compares the bound's fingerprint with the model's graph and weights (no batches:
    # nothing else is computed); a stale bound raises ValueError there.
    certify(model, [], [], bound=bound, input_shape=shape)


def build_predictor(
    model: LipschitzNet | nn.Module, bound: ModelBound, dtype: torch.dtype = torch.float64
) -> CertifiedPredictor:
    """A :class:`CertifiedPredictor` for ``model`` with ``bound.pairwise`` baked in.

    Args:
        model: a :class:`lipmargin.models.LipschitzNet` or any module with its attributes
            (``features`` applied in order, a linear ``head``, ``in_shape``, ``num_classes``);
            it is copied, never changed.
        bound: a sound :class:`lipmargin.certify.ModelBound` of the model's *current* weights,
            e.g. ``model_bound(model, "sound")``.
        dtype: the graph's arithmetic (float64, or float32 for runtimes without float64 kernels).

    Raises:
        ValueError: an unsound bound, a bound of other weights (a stale bound: its fingerprint
            differs) or of another class count / input shape.
        TypeError: a layer without an export conversion (named), or a model without those attributes.

    Example (radii below :func:`lipmargin.certify.certify`'s, by the forward-rounding allowance):

    >>> import torch
    >>> from torch import nn
    >>> from lipmargin.certify import certify, model_bound
    >>> from lipmargin.models import LipschitzNet
    >>> _ = torch.manual_seed(0)
    >>> model = LipschitzNet(nn.Sequential(nn.Linear(2, 4), nn.ReLU()), nn.Linear(4, 3), (2,))
    >>> predictor = build_predictor(model, model_bound(model, "sound"))
    >>> x = torch.rand(5, 2)
    >>> label, radius = predictor(x)
    >>> label.shape, radius.dtype
    (torch.Size([5]), torch.float64)
    >>> ref = certify(model, [(x, torch.zeros(5, dtype=torch.long))], [])
    >>> bool(torch.equal(label, ref.prediction)), bool((radius <= ref.radius).all())
    (True, True)
    """
    layers, _, in_shape, num_classes = exportable_parts(model)
    if not bound.sound:
        raise ValueError(f"an exported certificate needs a sound bound; got method {bound.method!r}")
    if bound.pairwise.shape != (num_classes, num_classes):
        raise ValueError(f"the bound is {tuple(bound.pairwise.shape)} but the model has {num_classes} classes")
    unit_roundoff(dtype)  # refuses unsupported dtypes
    check_bound_matches(model, bound, in_shape)
    steps = []
    x = torch.zeros(1, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        for original in layers:
            m64 = copy.deepcopy(original).to(device="cpu", dtype=torch.float64).eval()
            shape = tuple(x.shape[1:])
            x = m64(x)
            layer = _export_layer(original, dtype)
            lip = operator_norm_bound(m64, shape)
            steps.append(build_step(layer, m64, shape, tuple(x.shape[1:]), lip, dtype))
    predictor = CertifiedPredictor(nn.ModuleList(steps[:-1]), steps[-1], bound.pairwise, in_shape, dtype)
    return predictor.eval().requires_grad_(False)
