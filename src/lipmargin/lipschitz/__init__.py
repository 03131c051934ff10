"""Lipschitz machinery: power iteration on the real layer operators and the network bound.

Naming follows the project's rule: an ``*_estimate`` may be below the true value (a power
iteration converges to the operator norm from below); a ``*_bound`` is always >= the truth.

A network ``f(x) = W phi(x) + b`` is handled as a feature extractor ``phi`` (a sequence of
layers, each with a rule in :data:`LAYER_RULES`) and a linear head.  The feature bound ``K`` is the
product of the per-layer constants; the pairwise head bound ``K * ||W_i - W_j||`` bounds the
Lipschitz constant of the logit difference ``f_i - f_j``.
"""

from __future__ import annotations

import math

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LAYER_RULES",
    "LayerRule",
    "register_layer_rule",
    "layer_rule",
    "find_layer_rule",
    "supported_layers",
    "PEER_LAYER_RULES",
    "flatten_layers",
    "linear_operator",
    "conv2d_operator",
    "power_iteration",
    "operator_norm_estimate",
    "converge_operator_norm",
    "pairwise_head_norms",
    "pairwise_head_norms_bound",
    "operator_norm_bound",
    "ROUNDING_MARGIN",
    "no_autocast",
]

#: Relative inflation applied to float64 results that are called bounds.  float64 SVD / FFT / norm
#: computations on the layer sizes we meet are accurate to ~1e-13 relative; 1e-9 leaves four
#: orders of magnitude of head room.
ROUNDING_MARGIN = 1e-9

Operator = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LayerRule:
    """How the Lipschitz constant of one kind of layer is estimated (for training) and bounded.

    Training uses the first that is set of ``operator`` (power iteration), ``estimate``,
    ``constant``, ``bound`` (a shape-dependent constant such as a pooling layer's); certification
    uses ``bound`` if set, else ``constant``:

    - ``operator(module, in_shape) -> (A, A_T)``: the layer is affine; ``A`` is its linear part
      (no bias) acting on a batch of inputs shaped ``(B, *in_shape)`` and ``A_T`` its adjoint.  Its
      norm is estimated by power iteration with a persistent vector.
    - ``estimate(module) -> Tensor``: a scalar, possibly differentiable in the parameters (e.g. 1
      for a layer that is 1-Lipschitz by construction, or a layer's own norm estimate).
    - ``constant(module) -> float``: a proven constant that holds for every input (activations,
      reshapes, fixed normalisation); it is its own sound bound.
    - ``bound(module, in_shape) -> float``: provably >= the layer's Lipschitz constant on inputs
      of ``in_shape`` (see :mod:`lipmargin.lipschitz.bounds`).  Required unless ``constant`` is set.
    - ``rounding(module, x, y) -> Tensor``: per-sample ``(B,)`` bound on the L2 norm of the
      rounding error the layer itself adds when ``y = module(x)`` is evaluated in ``x.dtype``
      (see :mod:`lipmargin.lipschitz.graph`); ``None`` means the layer has no proven rule and a documented
      generous model is used instead.
    """

    operator: Callable[[nn.Module, tuple[int, ...]], tuple[Operator, Operator]] | None = None
    estimate: Callable[[nn.Module], Tensor] | None = None
    constant: Callable[[nn.Module], float] | None = None
    bound: Callable[[nn.Module, tuple[int, ...]], float] | None = None
    rounding: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None


#: Registry of layer rules, filled by :func:`register_layer_rule`.  Look-ups use the EXACT type: a
#: subclass may override ``forward``, so it never inherits its parent's rule (it is traced through
#: its own ``forward`` by :mod:`lipmargin.lipschitz.graph`, or refused).
LAYER_RULES: dict[type, LayerRule] = {}

#: Rules for layers of other libraries, keyed by ``"module.QualName"`` of the exact class, so that
#: lipmargin can certify their models without importing them.
PEER_LAYER_RULES: dict[str, LayerRule] = {}


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_rule(*types: type | str, override: bool = False, **rule_fields: Callable) -> LayerRule:
    """Register a :class:`LayerRule` built from ``rule_fields`` for each of ``types``.

    A type may also be given as the string ``"package.module.ClassName"`` (a peer library's layer,
    matched exactly without importing it).  Registering a type that already has a rule raises
    ``ValueError`` unless ``override=True``, so an import can never silently replace the rule of a
    built-in layer.

    Example: ``register_layer_rule(nn.ReLU, constant=lambda m: 1.0)``.
    """
    if not types:
        raise ValueError("register_layer_rule needs at least one layer type")
    for t in types:
        key = t if isinstance(t, str) else _class_key(t)
        if not override and (t in LAYER_RULES or key in PEER_LAYER_RULES):
            raise ValueError(f"a Lipschitz rule for {key} is already registered; pass override=True to replace it")
    rule = LayerRule(**rule_fields)
    if rule.constant is None and rule.bound is None:
        raise ValueError("a layer rule needs a sound 'bound' unless it has a proven 'constant'")
    for t in types:
        if isinstance(t, str):
            PEER_LAYER_RULES[t] = rule
        else:
            LAYER_RULES[t] = rule
    return rule


def find_layer_rule(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)`` exactly, or ``None``."""
    if nn.Linear not in LAYER_RULES:
        import lipmargin.lipschitz.torch_layers  # noqa: F401  (registers torch's layers; it imports this module)
    cls = type(module)
    rule = LAYER_RULES.get(cls)
    return rule if rule is not None else PEER_LAYER_RULES.get(_class_key(cls))


def supported_layers() -> list[str]:
    return sorted({t.__name__ for t in LAYER_RULES} | {k.rsplit(".", 1)[-1] + f" ({k})" for k in PEER_LAYER_RULES})


def layer_rule(module: nn.Module) -> LayerRule:
    """The rule for ``module``'s exact type; ``TypeError`` naming the module if none is registered."""
    rule = find_layer_rule(module)
    if rule is not None:
        return rule
    supported = ", ".join(supported_layers())
    raise TypeError(
        f"no Lipschitz rule for module {type(module).__name__} ({module!r}); "
        f"supported layers: {supported}. Register one with lipmargin.register_layer_rule."
    )


def flatten_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Unroll nested ``nn.Sequential`` containers into a flat list of layers.

    Only containers of the exact type ``nn.Sequential`` are unrolled: a subclass may override
    ``forward`` (a skip connection, say), so it stays one layer and needs its own rule.
    """
    flat: list[nn.Module] = []
    for m in modules:
        if type(m) is nn.Sequential:
            flat.extend(flatten_layers(m))
        else:
            flat.append(m)
    return flat


# --------------------------------------------------------------------------------------------
# Operators of the built-in affine layers
# --------------------------------------------------------------------------------------------


def linear_operator(weight: Tensor) -> tuple[Operator, Operator]:
    """``x -> x W^T`` and its adjoint ``y -> y W`` for batches ``(B, in)`` / ``(B, out)``."""
    return (lambda x: x @ weight.t()), (lambda y: y @ weight)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def conv2d_operator(
    weight: Tensor,
    in_shape: tuple[int, int, int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> tuple[Operator, Operator]:
    """The zero-padded convolution acting on ``(B, *in_shape)`` and its exact adjoint.

    The adjoint is ``conv_transpose2d`` with the same stride, padding, dilation and groups, and the
    ``output_padding`` that makes its output exactly ``in_shape`` again.  Without it a stride-2
    layer whose ``H + 2p - k`` is odd would shrink the iterate by a pixel and the power iteration
    would estimate the norm on a smaller input.
    """
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    k = weight.shape[-2:]
    h, w = in_shape[-2:]
    out = [(n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((h, w))]
    if out[0] < 1 or out[1] < 1:
        raise ValueError(
            f"convolution with kernel {tuple(k)}, stride {s}, padding {p}, dilation {d} "
            f"has an empty output on input of shape {tuple(in_shape)}"
        )
    # output_padding = what conv_transpose2d misses to reach the input size.
    op = tuple(
        n - ((o - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1) for i, (n, o) in enumerate(zip((h, w), out))
    )

    def forward(x: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, s, p, d, groups)

    def adjoint(y: Tensor) -> Tensor:
        return F.conv_transpose2d(y, weight, None, s, p, op, groups, d)

    return forward, adjoint


def no_autocast(t: Tensor) -> contextlib.AbstractContextManager:
    """A context that leaves autocast on ``t``'s device (a no-op on devices without autocast).

    Power iterations, weight parametrisations and bounds run in the parameters' own precision even
    when the surrounding forward runs under ``torch.autocast`` (``train.precision=bf16``).
    """
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Power iteration (pure functions)
# --------------------------------------------------------------------------------------------


def _norms(v: Tensor, batched: bool) -> Tensor:
    """``||v||`` (a scalar); with ``batched``, ``||v[i]||`` of each member, shaped to broadcast on ``v``."""
    if not batched:
        return v.norm()
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def _normalize(v: Tensor, batched: bool = False) -> Tensor:
    # The tiny floor keeps an all-zero operator (a dead layer) from producing NaNs.
    return v / _norms(v, batched).clamp_min(torch.finfo(v.dtype).tiny)


def power_iteration(forward: Operator, adjoint: Operator, v: Tensor, n_iter: int, *, batched: bool = False) -> Tensor:
    """``n_iter`` steps of ``v <- A^T A v / ||A^T A v||``; returns the new unit vector.

    ``batched``: ``v`` stacks independent vectors along dim 0 (one per operator of a block-diagonal
    ``A``, as in a batched sweep) and each is normalised on its own.
    """
    for _ in range(n_iter):
        u = adjoint(forward(v))
        norm = _norms(u, batched)  # what _normalize(u) divides by, computed once
        # v in the null space (e.g. a dead, all-zero layer): keep v instead of a zero vector, whose
        # estimate ||A 0|| / ||0|| would be NaN.  torch.where, not `if`, so the GPU never syncs.
        v = torch.where(norm > 0, u / norm.clamp_min(torch.finfo(u.dtype).tiny), v)
    return v


def operator_norm_estimate(forward: Operator, v: Tensor, *, batched: bool = False) -> Tensor:
    """``||A v|| / ||v||``: a lower estimate of ``||A||_2`` (a scalar tensor, differentiable in A).

    ``batched``: one estimate per vector stacked along dim 0, shape ``(M,)``.
    """
    if not batched:
        return forward(v).norm() / v.norm()
    return (_norms(forward(v), True) / _norms(v, True)).reshape(-1)


def converge_operator_norm(
    forward: Operator, adjoint: Operator, v: Tensor, *, tol: float = 1e-9, max_iter: int = 10_000,
    check_every: int = 10,
) -> tuple[Tensor, Tensor]:
    """Power-iterate until one step changes the estimate by at most ``tol`` (relative), or
    ``max_iter`` steps.

    The test runs every ``check_every`` steps (comparing the last two), so that on a GPU the host
    waits for the device once per chunk rather than once per step.  Returns ``(sigma, v)``;
    ``sigma`` is still an estimate from below, only a good one.
    """
    with torch.no_grad():
        v = _normalize(v)
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


# --------------------------------------------------------------------------------------------
# Rules for torch's built-in layers
# --------------------------------------------------------------------------------------------


def _conv_checked(m: nn.Conv2d) -> nn.Conv2d:
    if m.padding_mode != "zeros":
        raise TypeError(
            f"Lipschitz rule for Conv2d supports padding_mode='zeros' only, got {m.padding_mode!r}"
        )
    if isinstance(m.padding, str):
        raise TypeError(
            f"Lipschitz rule for Conv2d needs explicit integer padding, got padding={m.padding!r}"
        )
    return m


def _conv_op(m: nn.Module, in_shape: tuple[int, ...]) -> tuple[Operator, Operator]:
    c = _conv_checked(m)  # type: ignore[arg-type]
    return conv2d_operator(c.weight, in_shape, c.stride, c.padding, c.dilation, c.groups)  # type: ignore[arg-type]


def _conv_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    from lipmargin.lipschitz.bounds import conv2d_norm_bound

    c = _conv_checked(m)  # type: ignore[arg-type]
    return conv2d_norm_bound(
        c.weight.detach(), tuple(in_shape), stride=c.stride, padding=c.padding,  # type: ignore[arg-type]
        dilation=c.dilation, groups=c.groups,
    )


def _linear_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    from lipmargin.lipschitz.bounds import linear_norm_bound

    return linear_norm_bound(m.weight.detach())  # type: ignore[arg-type]


# The rules of torch's own layers are registered in lipmargin.lipschitz.torch_layers.


def operator_norm_bound(layer: nn.Module, input_shape: Sequence[int]) -> float:
    """A value provably >= the L2 Lipschitz constant of ``layer`` on inputs of ``input_shape``.

    ``input_shape`` excludes the batch dimension.  Raises ``TypeError`` for a layer without a
    registered rule.
    """
    rule = layer_rule(layer)
    if rule.bound is not None:
        return float(rule.bound(layer, tuple(input_shape)))
    assert rule.constant is not None  # enforced by register_layer_rule
    return float(rule.constant(layer))


# --------------------------------------------------------------------------------------------
# Pairwise head norms
# --------------------------------------------------------------------------------------------


def pairwise_head_norms(weight: Tensor) -> Tensor:
    """``D[i, j] = ||W_i - W_j||_2`` for a head weight ``(C, d)``; differentiable, ``(C, C)``.

    Written as explicit differences (not ``cdist``'s Gram trick) so that ``D[i, i]`` is exactly 0
    and small distances keep their precision.  Where a distance is 0 (the diagonal, or two equal
    rows) its gradient is defined as 0 instead of sqrt's infinite slope.
    """
    diff = weight.unsqueeze(1) - weight.unsqueeze(0)  # (C, C, d)
    sq = diff.pow(2).sum(-1)  # (C, C)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def pairwise_head_norms_bound(weight: Tensor) -> Tensor:
    """``(C, C)`` float64 values >= the exact ``||W_i - W_j||``, for any finite weights.

    The weight is first scaled by an exact power of two so that its largest entry lies in
    ``[1/2, 1)`` (subnormal weights become normal; nothing overflows).  The float64 differences,
    squares, sum and root then carry a relative error far below :data:`ROUNDING_MARGIN`; squares
    that underflow are covered by an absolute ``2**-500 sqrt(d)`` on every pair of rows that differ.
    The result is scaled back exactly (or rounded up once if subnormal).  Equal rows give exactly 0.
    """
    from lipmargin.lipschitz.rounding import mul_pow2

    w = weight.detach().to(torch.float64)
    top = w.abs().max() if w.numel() else torch.zeros((), dtype=torch.float64)
    if not torch.isfinite(top):
        return torch.full((w.shape[0], w.shape[0]), math.inf, dtype=torch.float64).fill_diagonal_(0.0)
    if top == 0:
        return torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64)
    _, e = torch.frexp(top)  # top = f 2**e, f in [1/2, 1)
    scaled = mul_pow2(w, -e)  # exact
    differ = (w.unsqueeze(1) != w.unsqueeze(0)).any(-1)  # (C, C)
    d = pairwise_head_norms(scaled) * (1.0 + ROUNDING_MARGIN) + differ * (2.0**-500 * math.sqrt(w.shape[1]))
    d = mul_pow2(torch.nextafter(d, torch.full_like(d, math.inf)), e)
    return torch.where(differ, torch.nextafter(d, torch.full_like(d, math.inf)), torch.zeros_like(d))


def _float64_operator(rule: LayerRule, m: nn.Module, shape: tuple[int, ...]) -> tuple[Operator, Operator]:
    """The layer's operator with its parameters promoted to float64 (the module is not changed)."""
    assert rule.operator is not None
    if isinstance(m, nn.Linear):
        return linear_operator(m.weight.detach().double())
    if isinstance(m, nn.Conv2d):
        c = _conv_checked(m)
        return conv2d_operator(c.weight.detach().double(), shape, c.stride, c.padding, c.dilation, c.groups)  # type: ignore[arg-type]
    fwd, adj = rule.operator(m, shape)
    dtype = next(m.parameters()).dtype

    def f64(op: Operator) -> Operator:
        return lambda x: op(x.to(dtype)).double()

    return f64(fwd), f64(adj)
