"""Run a traced model and bound the rounding error of its logits at the same time.

The error of every input-dependent node is a per-sample bound ``e`` on ``||computed - exact||_2``.
It propagates with the same combinators as the Lipschitz constants (:mod:`lipmargin.lipschitz.graph`): a
layer with constant ``c`` maps an input error ``e`` to at most ``c e`` plus what the layer's own
rounding adds (its rule's ``rounding``); ``sum`` adds the weighted errors; ``rss`` (concatenation,
max / min) takes the root of the sum of squares.  The logits' bound then deflates the margins
(:func:`lipmargin.lipschitz.rounding.radius_lower`).

Layers without a proven rounding rule (the 1-Lipschitz families, whose forward passes are long
iterative computations) use a documented model instead: ``2**12 u (c ||x|| + ||y||)`` per sample,
thousands of times the rounding of one matrix product.  It is a modelled allowance, not a proof;
:func:`forward_with_error` reports which layers used it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx

from lipmargin.lipschitz.graph import GraphPlan, Step, _scale_factor, constant_values
from lipmargin.lipschitz.rules import layer_rule
from lipmargin.lipschitz.rounding import affine_error_bound, elementwise_error_bound, nonnegative_norm_bound, propagate_error, round_up, unit_roundoff

__all__ = ["forward_with_error", "MODELLED_ROUNDING_FACTOR"]

#: Multiple of the unit roundoff used for layers without a proven rounding rule.
MODELLED_ROUNDING_FACTOR = 2.0**12


def _modelled(lipschitz: float, x: Tensor, y: Tensor) -> Tensor:
    u = unit_roundoff(y.dtype)
    nx = nonnegative_norm_bound(x.detach().double().abs())
    ny = nonnegative_norm_bound(y.detach().double().abs())
    return round_up(MODELLED_ROUNDING_FACTOR * u * (lipschitz * nx + ny))


def _local(step: Step, args: tuple, value: Tensor) -> Tensor:
    kind = step.local[0]
    if kind == "exact":
        return torch.zeros(value.shape[0] if isinstance(value, Tensor) else value[0].shape[0], dtype=torch.float64)
    if kind == "ulps":
        return elementwise_error_bound(value, float(step.local[1]), value.dtype)
    if kind == "reduce":
        _, dims, n = step.local
        x = args[0]
        return affine_error_bound(lambda v: v.sum(dim=dims), x, None, int(n), value.dtype)
    raise AssertionError(kind)


def _combine_errors(step: Step, err: dict[str, Tensor], consts: dict[str, Any]) -> Tensor:
    kind = step.comb[0]
    if kind == "sum":
        total = sum((abs(float(w)) * err[n] for n, w in step.comb[1]), torch.zeros(()).double())
        return round_up(total * (1.0 + 2.0**-40))
    if kind == "scale":
        f = float(_scale_factor(step.comb, consts))
        return round_up(math.nextafter(f, math.inf) * err[step.comb[1]] * (1.0 + 2.0**-40))
    squares = sum((err[n] ** 2 for n in step.comb[1]), torch.zeros(()).double())
    return round_up(torch.sqrt(round_up(squares * (1.0 + 2.0**-40))))


@torch.no_grad()
def forward_with_error(plan: GraphPlan, x: Tensor, leaf_bounds: dict[str, float]) -> tuple[Tensor, Tensor, set[str]]:
    """``(logits, logit_error (B,), modelled)``: the traced model's logits on ``x`` (in the plan's
    own dtype) and a per-sample bound on their distance to the exact logits.

    ``leaf_bounds`` are the sound per-leaf constants (the same the certificate uses).  ``modelled``
    names the layer types whose rounding used :data:`MODELLED_ROUNDING_FACTOR`.
    """
    env: dict[str, Any] = {}
    err: dict[str, Tensor] = {}
    modelled: set[str] = set()
    consts = constant_values(plan, detach=True)
    for node in plan.gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = x
            err[node.name] = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            continue
        if node.op == "output":
            break
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "get_attr":
            value: Any = plan.root
            for part in str(node.target).split("."):
                value = getattr(value, part)
        elif node.op == "call_module":
            value = plan.root.get_submodule(str(node.target))(*args, **kwargs)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        else:
            value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        env[node.name] = value
        step = plan.step(node.name)
        if step.kind in ("leaf", "op"):
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, Tensor) and (v.dim() == 0 or v.shape[0] != x.shape[0]):
                    raise ValueError(
                        f"node {node.name!r} gives shape {tuple(v.shape)} for a batch of {x.shape[0]}: the model "
                        "does not keep the batch dimension (a hard-coded batch size?); it cannot be certified"
                    )
        if step.kind == "leaf":
            m = plan.module(step)
            rule = layer_rule(m)
            c = float(leaf_bounds[step.name])
            xin = args[0]
            if rule.rounding is not None:
                local = rule.rounding(m, xin, value).to(torch.float64)
            else:
                modelled.add(type(m).__name__)
                local = _modelled(c, xin, value)
            err[node.name] = propagate_error(err[step.inputs[0]], c, local.to(err[step.inputs[0]].device))
        elif step.kind == "op":
            e = _combine_errors(step, err, consts).to(x.device)
            local = _local(step, args, value).to(x.device)
            err[node.name] = round_up((e + local) * (1.0 + 2.0**-40))
    logits = env[plan.output]
    return logits, err[plan.output], modelled
