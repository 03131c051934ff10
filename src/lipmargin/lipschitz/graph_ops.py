"""Rules for the tensor operations of a traced graph (functions and methods, not layers).

Each rule looks at one ``torch.fx`` node and returns ``(combinator, rounding)``:

- the combinator (see :mod:`lipmargin.lipschitz.graph`) says how the node's Lipschitz constant follows from
  its input-dependent arguments: ``("sum", ((name, w), ...))``, ``("scale", name, operand,
  invert)``, ``("rss", (name, ...))``;
- the rounding model says what error the operation itself adds when evaluated in floating point:
  ``("exact",)`` (copies, max/min, sign changes), ``("ulps", k)`` (a result within ``k`` units of
  roundoff of the exact one), ``("reduce", dims, n)`` (a sum of ``n`` terms per output).

A rule raises ``TypeError`` with the reason when the node's arguments make it unsupported (a
product of two input-dependent tensors, an operation that moves the batch dimension, ...).
Anything not in :data:`OP_RULES` is refused by the tracer.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["OP_RULES", "OpRule", "supported_operations", "GELU_LIPSCHITZ"]

OpRule = Callable[[fx.Node, set, dict], tuple[tuple[Any, ...], tuple[Any, ...]]]

#: Registry: a function object, or ``("method", name)`` for ``tensor.name(...)``.
OP_RULES: dict[Any, OpRule] = {}

#: ``sup_x d/dx (x Phi(x)) = Phi(sqrt 2) + sqrt 2 phi(sqrt 2) = 1.12899...`` (exact GELU; the tanh
#: approximation's maximum slope is 1.12906...): 1.13 bounds both (checked in the tests).
GELU_LIPSCHITZ = 1.13


def _register(*keys: Any) -> Callable[[OpRule], OpRule]:
    def deco(fn: OpRule) -> OpRule:
        for k in keys:
            OP_RULES[k] = fn
        return fn

    return deco


def supported_operations() -> list[str]:
    names = set()
    for k in OP_RULES:
        if isinstance(k, tuple):
            names.add(f"Tensor.{k[1]}")
        else:
            mod = getattr(k, "__module__", "") or ""
            prefix = "F." if "functional" in mod else ("operator." if mod in ("_operator", "operator") else "torch.")
            names.add(prefix + getattr(k, "__name__", str(k)))
    return sorted(names)


def _dep(arg: Any, dependent: set) -> bool:
    return isinstance(arg, fx.Node) and arg.name in dependent


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _value(arg: Any, values: dict) -> Any:
    return values[arg.name] if isinstance(arg, fx.Node) else arg


def _ndim(node: fx.Node, values: dict) -> int:
    return values[node.args[0].name].dim()


def _tensors_in(arg: Any) -> list[Any]:
    return list(arg) if isinstance(arg, (list, tuple)) else [arg]


# ---- sums -------------------------------------------------------------------------------------


@_register(operator.add, torch.add, ("method", "add"), operator.sub, torch.sub, ("method", "sub"), torch.subtract)
def _add(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    a, b = node.args[0], _arg(node, 1, "other")
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, fx.Node):
        raise TypeError("alpha must be a number")
    weights: dict[str, float] = {}
    for arg, w in ((a, 1.0), (b, abs(float(alpha)))):
        if _dep(arg, dependent):
            weights[arg.name] = weights.get(arg.name, 0.0) + w
    return ("sum", tuple(weights.items())), ("ulps", 1.0)


@_register(operator.neg, torch.neg, ("method", "neg"))
def _neg(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return ("sum", ((node.args[0].name, 1.0),)), ("exact",)


# ---- scaling by a constant --------------------------------------------------------------------


@_register(operator.mul, torch.mul, ("method", "mul"), torch.multiply)
def _mul(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    a, b = node.args[0], _arg(node, 1, "other")
    if _dep(a, dependent) and _dep(b, dependent):
        raise TypeError("a product of two input-dependent tensors has no global Lipschitz bound")
    x, c = (a, b) if _dep(a, dependent) else (b, a)
    return ("scale", x.name, c.name if isinstance(c, fx.Node) else c, False), ("ulps", 1.0)


@_register(operator.truediv, torch.div, ("method", "div"), torch.true_divide)
def _div(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    a, b = node.args[0], _arg(node, 1, "other")
    if _dep(b, dependent):
        raise TypeError("division by an input-dependent tensor has no global Lipschitz bound")
    if node.kwargs.get("rounding_mode") is not None:
        raise TypeError("rounding division is not Lipschitz")
    return ("scale", a.name, b.name if isinstance(b, fx.Node) else b, True), ("ulps", 1.0)


# ---- concatenation and pointwise max / min ----------------------------------------------------


@_register(torch.cat, torch.concat, torch.concatenate, torch.stack)
def _cat(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    parts = _tensors_in(node.args[0])
    dim = _arg(node, 1, "dim", 0)
    if node.target is torch.stack:
        if dim == 0 or (isinstance(dim, int) and dim < 0 and -dim == values[parts[0].name].dim() + 1):
            raise TypeError("stacking along dim 0 mixes the batch")
    elif isinstance(dim, int) and (dim == 0 or (dim < 0 and -dim == values[parts[0].name].dim())):
        raise TypeError("concatenating along the batch dimension mixes samples")
    return ("rss", tuple(p.name for p in parts if _dep(p, dependent))), ("exact",)


@_register(torch.maximum, torch.minimum, torch.max, torch.min, ("method", "maximum"), ("method", "minimum"))
def _maximum(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    if node.target in (torch.max, torch.min) and (len(node.args) != 2 or not isinstance(node.args[1], fx.Node)):
        raise TypeError("torch.max / torch.min are supported only as the elementwise max of two tensors")
    names = tuple(a.name for a in node.args[:2] if _dep(a, dependent))
    return ("rss", names), ("exact",)


# ---- 1-Lipschitz elementwise functions and activations ----------------------------------------


def _activation(lipschitz: Callable[[fx.Node], float], rounding: tuple[Any, ...]) -> OpRule:
    def rule(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        others = list(node.args[1:]) + list(node.kwargs.values())
        if any(_dep(a, dependent) for a in others):  # e.g. clamp(x, min=f(x)) is max(x, f(x))
            raise TypeError("only the first argument may depend on the input")
        if node.kwargs.get("inplace") or (len(node.args) > 2 and node.args[-1] is True and node.target in (F.relu, F.leaky_relu, F.elu)):
            raise TypeError("in-place activations are not supported in a traced graph")
        return ("sum", ((node.args[0].name, lipschitz(node)),)), rounding

    return rule


_one = _activation(lambda n: 1.0, ("exact",))
for _key in (F.relu, torch.relu, ("method", "relu"), torch.abs, ("method", "abs"), torch.clamp, torch.clip,
             ("method", "clamp"), ("method", "clip"), F.hardtanh, F.relu6):
    OP_RULES[_key] = _one
for _key in (torch.tanh, F.tanh, ("method", "tanh")):
    OP_RULES[_key] = _activation(lambda n: 1.0, ("ulps", 8.0))
for _key in (torch.sigmoid, F.sigmoid, ("method", "sigmoid")):
    OP_RULES[_key] = _activation(lambda n: 0.25, ("ulps", 8.0))
OP_RULES[F.gelu] = _activation(lambda n: GELU_LIPSCHITZ, ("ulps", 8.0))
OP_RULES[F.leaky_relu] = _activation(lambda n: max(1.0, abs(float(_arg(n, 1, "negative_slope", 0.01)))), ("ulps", 1.0))
OP_RULES[F.elu] = _activation(lambda n: max(1.0, abs(float(_arg(n, 1, "alpha", 1.0)))), ("ulps", 8.0))


# ---- reshaping, slicing, moving dimensions (batch dimension kept first) -----------------------


def _same(node: fx.Node) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return ("sum", ((node.args[0].name, 1.0),)), ("exact",)


@_register(torch.flatten, ("method", "flatten"))
def _flatten(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    start = _arg(node, 1, "start_dim", 0)
    if start == 0 or (start < 0 and -start == _ndim(node, values)):
        raise TypeError("flatten must start after the batch dimension (start_dim >= 1)")
    return _same(node)


@_register(("method", "view"), ("method", "reshape"), torch.reshape, ("method", "contiguous"), ("method", "clone"),
           torch.clone, ("method", "view_as"), ("method", "reshape_as"))
def _reshape(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    # The tracer checks on a 2-sample probe that dim 0 is still the batch; a reshape that keeps
    # the outermost dimension maps each sample's entries to the same sample.
    if node.target in ("view", "view_as") and any(isinstance(a, torch.dtype) for a in node.args[1:]):
        raise TypeError("view as another dtype reinterprets bits")
    return _same(node)


def _dims_norm(dims: Any, ndim: int) -> list[int]:
    return [d % ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


@_register(("method", "permute"), torch.permute)
def _permute(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
    if _dims_norm(dims, _ndim(node, values))[0] != 0:
        raise TypeError("permute must keep the batch dimension first")
    return _same(node)


@_register(("method", "transpose"), torch.transpose, torch.swapaxes, ("method", "swapaxes"))
def _transpose(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    if 0 in _dims_norm([_arg(node, 1, "dim0"), _arg(node, 2, "dim1")], _ndim(node, values)):
        raise TypeError("transpose must not move the batch dimension")
    return _same(node)


@_register(("method", "unsqueeze"), torch.unsqueeze)
def _unsqueeze(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    d = _arg(node, 1, "dim")
    if d % (_ndim(node, values) + 1) == 0:
        raise TypeError("unsqueeze must not insert a dimension before the batch")
    return _same(node)


@_register(("method", "squeeze"), torch.squeeze)
def _squeeze(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    d = _arg(node, 1, "dim")
    if d is None or 0 in _dims_norm(d, _ndim(node, values)):
        raise TypeError("squeeze needs an explicit dim other than the batch dimension (a batch of one would be squeezed)")
    return _same(node)


@_register(operator.getitem)
def _getitem(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    base = values[node.args[0].name]
    index = node.args[1]
    if isinstance(base, (tuple, list)):
        if not isinstance(index, int):
            raise TypeError("only integer indexing of a tuple of tensors is supported")
        return _same(node)
    items = index if isinstance(index, tuple) else (index,)
    if not items or not (items[0] == slice(None) or (items[0] is Ellipsis and len(items) < base.dim())):
        raise TypeError("tensor indexing must keep the whole batch dimension (x[:, ...])")
    for it in items:
        if isinstance(it, fx.Node) or not (it is None or it is Ellipsis or isinstance(it, (int, slice))):
            raise TypeError("only integers, slices, None and ... are supported as indices (no tensor or list indexing)")
        if isinstance(it, slice) and (it.step is not None and it.step <= 0):
            raise TypeError("slices need a positive step")
    return _same(node)


@_register(torch.chunk, ("method", "chunk"), torch.split, ("method", "split"), torch.unbind, ("method", "unbind"),
           torch.tensor_split, ("method", "tensor_split"))
def _chunk(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    name = getattr(node.target, "__name__", node.target)
    default = 0
    dim = _arg(node, 2, "dim", default) if name != "unbind" else _arg(node, 1, "dim", default)
    if dim % _ndim(node, values) == 0:
        raise TypeError(f"{name} along the batch dimension mixes samples")
    return _same(node)  # each piece is a projection: constant <= that of the input


@_register(F.pad)
def _pad(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    mode = _arg(node, 2, "mode", "constant")
    if mode != "constant":
        raise TypeError(f"F.pad mode {mode!r} repeats entries; only constant padding is supported")
    pads = _arg(node, 1, "pad")
    if len(pads) >= 2 * _ndim(node, values):
        raise TypeError("padding the batch dimension is not supported")
    # Padding with a constant embeds the entries isometrically (the constant cancels in differences).
    return _same(node)


# ---- reductions over non-batch dimensions -----------------------------------------------------


@_register(torch.mean, ("method", "mean"), torch.sum, ("method", "sum"))
def _reduce(node: fx.Node, dependent: set, values: dict) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    x = values[node.args[0].name]
    dims = _arg(node, 1, "dim")
    if dims is None:
        raise TypeError("a reduction needs explicit dims that exclude the batch dimension")
    dims = _dims_norm(dims, x.dim())
    if 0 in dims:
        raise TypeError("a reduction over the batch dimension mixes samples")
    n = math.prod(x.shape[d] for d in dims)
    name = getattr(node.target, "__name__", node.target)
    # sum of n entries: |sum(a) - sum(b)| <= sqrt(n) ||a - b|| (Cauchy-Schwarz) per output; the
    # outputs use disjoint entries, so the squared norms add up.  The mean divides by n.
    factor = math.sqrt(n) if name == "sum" else 1.0 / math.sqrt(n)
    return ("sum", ((node.args[0].name, math.nextafter(factor, math.inf)),)), ("reduce", tuple(dims), n)
