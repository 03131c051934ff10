"""Lipschitz machinery: power iteration on the real layer operators and the network bound.

Naming follows the project's rule: an ``*_estimate`` may be below the true value (a power
iteration converges to the operator norm from below); a ``*_bound`` is always >= the truth.

A network ``f(x) = W phi(x) + b`` is handled as a feature extractor ``phi`` (a sequence of
layers, each with a rule in :data:`LAYER_RULES`) and a linear head.  The feature bound ``K`` is the
product of the per-layer constants; the pairwise head bound ``K * ||W_i - W_j||`` bounds the
Lipschitz constant of the logit difference ``f_i - f_j``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LAYER_RULES",
    "LayerRule",
    "FeatureBound",
    "register_layer_rule",
    "layer_rule",
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
    ``constant``; certification uses ``bound`` if set, else ``constant``:

    - ``operator(module, in_shape) -> (A, A_T)``: the layer is affine; ``A`` is its linear part
      (no bias) acting on a batch of inputs shaped ``(B, *in_shape)`` and ``A_T`` its adjoint.  Its
      norm is estimated by power iteration with a persistent vector.
    - ``estimate(module) -> Tensor``: a scalar, possibly differentiable in the parameters (e.g. 1
      for a layer that is 1-Lipschitz by construction, or a layer's own norm estimate).
    - ``constant(module) -> float``: a proven constant that holds for every input (activations,
      reshapes, fixed normalisation); it is its own sound bound.
    - ``bound(module, in_shape) -> float``: provably >= the layer's Lipschitz constant on inputs
      of ``in_shape`` (see :mod:`lipmargin.bounds`).  Required unless ``constant`` is set.
    """

    operator: Callable[[nn.Module, tuple[int, ...]], tuple[Operator, Operator]] | None = None
    estimate: Callable[[nn.Module], Tensor] | None = None
    constant: Callable[[nn.Module], float] | None = None
    bound: Callable[[nn.Module, tuple[int, ...]], float] | None = None


#: Registry of layer rules, filled by :func:`register_layer_rule`.  Look-ups walk the MRO, so a
#: subclass of a registered layer inherits its rule unless it registers its own.
LAYER_RULES: dict[type, LayerRule] = {}


def register_layer_rule(*types: type, **rule_fields: Callable) -> LayerRule:
    """Register a :class:`LayerRule` built from ``rule_fields`` for each of ``types``.

    Example: ``register_layer_rule(nn.ReLU, constant=lambda m: 1.0)``.
    """
    if not types:
        raise ValueError("register_layer_rule needs at least one layer type")
    rule = LayerRule(**rule_fields)
    if rule.operator is None and rule.estimate is None and rule.constant is None:
        raise ValueError("a layer rule needs one of 'operator', 'estimate' or 'constant' for training")
    if rule.constant is None and rule.bound is None:
        raise ValueError("a layer rule needs a sound 'bound' unless it has a proven 'constant'")
    for t in types:
        LAYER_RULES[t] = rule
    return rule


def layer_rule(module: nn.Module) -> LayerRule:
    """The rule for ``module``; ``TypeError`` naming the module if none is registered."""
    for cls in type(module).__mro__:
        if cls in LAYER_RULES:
            return LAYER_RULES[cls]
    supported = ", ".join(sorted(t.__name__ for t in LAYER_RULES))
    raise TypeError(
        f"no Lipschitz rule for module {type(module).__name__} ({module!r}); "
        f"supported layers: {supported}. Register one with lipmargin.register_layer_rule."
    )


def flatten_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Unroll nested ``nn.Sequential`` containers into a flat list of layers."""
    flat: list[nn.Module] = []
    for m in modules:
        if isinstance(m, nn.Sequential):
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


def _normalize(v: Tensor) -> Tensor:
    # The tiny floor keeps an all-zero operator (a dead layer) from producing NaNs.
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def power_iteration(forward: Operator, adjoint: Operator, v: Tensor, n_iter: int) -> Tensor:
    """``n_iter`` steps of ``v <- A^T A v / ||A^T A v||``; returns the new unit vector."""
    for _ in range(n_iter):
        u = adjoint(forward(v))
        # v in the null space (e.g. a dead, all-zero layer): keep v instead of a zero vector, whose
        # estimate ||A 0|| / ||0|| would be NaN.  torch.where, not `if`, so the GPU never syncs.
        v = torch.where(u.norm() > 0, _normalize(u), v)
    return v


def operator_norm_estimate(forward: Operator, v: Tensor) -> Tensor:
    """``||A v|| / ||v||``: a lower estimate of ``||A||_2`` (a scalar tensor, differentiable in A)."""
    return forward(v).norm() / v.norm()


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
    from lipmargin.bounds import conv2d_norm_bound

    c = _conv_checked(m)  # type: ignore[arg-type]
    return conv2d_norm_bound(
        c.weight.detach(), tuple(in_shape), stride=c.stride, padding=c.padding,  # type: ignore[arg-type]
        dilation=c.dilation, groups=c.groups,
    )


def _linear_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    from lipmargin.bounds import linear_norm_bound

    return linear_norm_bound(m.weight.detach())  # type: ignore[arg-type]


register_layer_rule(nn.Linear, operator=lambda m, s: linear_operator(m.weight), bound=_linear_bound)
register_layer_rule(nn.Conv2d, operator=_conv_op, bound=_conv_bound)
# ReLU is 1-Lipschitz (|max(a,0) - max(b,0)| <= |a - b| per coordinate); Flatten, Identity and
# Dropout in eval mode are isometries or the identity.
register_layer_rule(nn.ReLU, nn.Flatten, nn.Identity, constant=lambda m: 1.0)


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
    """Float64 ``||W_i - W_j||`` inflated by :data:`ROUNDING_MARGIN`: >= the exact value."""
    d = pairwise_head_norms(weight.detach().to(torch.float64))
    return d * (1.0 + ROUNDING_MARGIN)


# --------------------------------------------------------------------------------------------
# The feature-extractor bound with persistent power-iteration vectors
# --------------------------------------------------------------------------------------------


class FeatureBound(nn.Module):
    """Persistent power-iteration state for the layers of a feature extractor.

    Holds one buffer per affine layer, shaped like that layer's real input with batch size 1, and
    nothing else: the layers themselves are owned by the model and referenced here without being
    registered (so their parameters are not duplicated in ``state_dict``).

    ``forward(n_iter)`` advances the vectors by ``n_iter`` steps (under ``no_grad``, in training
    mode only) and returns ``(K, sigmas)`` where ``sigmas`` are ``||A v|| / ||v||`` computed with the
    vectors detached, so gradients reach the weights.  ``K`` is an estimate (from below).
    """

    def __init__(self, layers: Sequence[nn.Module], in_shape: Sequence[int]) -> None:
        super().__init__()
        self._layers = list(layers)  # not registered: owned by the model
        self.in_shape = tuple(int(s) for s in in_shape)
        self.input_shapes: list[tuple[int, ...]] = []
        self._vector_names: list[str | None] = []
        rules = [layer_rule(m) for m in self._layers]  # TypeError for an unknown layer, up front
        self._rules = rules
        x = torch.zeros(1, *self.in_shape)
        with torch.no_grad():
            for i, (m, rule) in enumerate(zip(self._layers, rules)):
                shape = tuple(x.shape[1:])
                self.input_shapes.append(shape)
                if rule.operator is not None:
                    name = f"v{i}"
                    p = next(m.parameters())
                    v = torch.randn(1, *shape, dtype=p.dtype)
                    self.register_buffer(name, _normalize(v))
                    self._vector_names.append(name)
                else:
                    self._vector_names.append(None)
                x = _run_on_cpu_probe(m, x)

    @property
    def layers(self) -> list[nn.Module]:
        return self._layers

    def _operator(self, i: int) -> tuple[Operator, Operator]:
        rule = self._rules[i]
        assert rule.operator is not None
        return rule.operator(self._layers[i], self.input_shapes[i])

    def forward(self, n_iter: int = 0) -> tuple[Tensor, Tensor]:
        # Never under autocast: with train.precision=bf16 only the model's forward is bfloat16.
        with no_autocast(self._reference_tensor()):
            return self._forward(n_iter)

    def _forward(self, n_iter: int) -> tuple[Tensor, Tensor]:
        sigmas: list[Tensor] = []
        for i, (m, rule, name) in enumerate(zip(self._layers, self._rules, self._vector_names)):
            if name is not None:
                fwd, adj = self._operator(i)
                v = getattr(self, name)
                if n_iter > 0 and self.training:
                    with torch.no_grad():
                        v.copy_(power_iteration(fwd, adj, v, n_iter))
                sigmas.append(operator_norm_estimate(fwd, v.detach()))
            elif rule.estimate is not None:
                sigmas.append(rule.estimate(m).reshape(()))
            else:
                assert rule.constant is not None
                ref = self._reference_tensor()
                sigmas.append(torch.tensor(float(rule.constant(m)), dtype=ref.dtype, device=ref.device))
        if not sigmas:
            ref = self._reference_tensor()
            return torch.ones((), dtype=ref.dtype, device=ref.device), torch.ones(0)
        stacked = torch.stack(sigmas)
        return stacked.prod(), stacked

    def _reference_tensor(self) -> Tensor:
        for b in self.buffers():
            return b
        for m in self._layers:
            for p in m.parameters():
                return p
        return torch.zeros(())

    @torch.no_grad()
    def converge(self, *, tol: float = 1e-9, max_iter: int = 10_000) -> Tensor:
        """Run every power iteration to convergence in float64; returns the per-layer estimates.

        The float64 vectors are written back to the buffers, so training warm-starts from them.
        """
        out: list[float] = []
        for i, (m, rule, name) in enumerate(zip(self._layers, self._rules, self._vector_names)):
            if name is not None:
                v = getattr(self, name)
                fwd, adj = _float64_operator(rule, m, self.input_shapes[i])
                sigma, v64 = converge_operator_norm(fwd, adj, v.detach().to(torch.float64), tol=tol, max_iter=max_iter)
                v.copy_(v64.to(v.dtype))
                out.append(float(sigma))
            elif rule.estimate is not None:
                out.append(float(rule.estimate(m).detach().double()))
            else:
                assert rule.constant is not None
                out.append(float(rule.constant(m)))
        return torch.tensor(out, dtype=torch.float64)

    @torch.no_grad()
    def sound(self) -> Tensor:
        """Per-layer values provably >= each layer's Lipschitz constant (float64)."""
        return torch.tensor(
            [operator_norm_bound(m, s) for m, s in zip(self._layers, self.input_shapes)], dtype=torch.float64
        )


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


def _run_on_cpu_probe(m: nn.Module, x: Tensor) -> Tensor:
    """Propagate a probe through ``m`` to learn the next layer's input shape."""
    p = next(m.parameters(), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    return m(x)

