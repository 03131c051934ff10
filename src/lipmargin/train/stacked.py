"""M copies of one LipschitzNet stacked along a leading member dimension: forward, power iteration,
loss and end-of-epoch convergence for all members at once (used by :mod:`lipmargin.train.batched`).

Parameters and buffers live in tensors shaped ``(M, *shape)``; each member model's tensors are views
of its slice, so whatever updates the stacks (one AdamW, ``load_state_dict`` on a member, a member's
``converge``) is seen on both sides.

Two forwards give the same values: :class:`StackedForward` runs ``bmm`` / grouped convolutions for
networks of ``Linear``, ``Conv2d`` and parameter-free per-sample layers (few, large kernels), and
:class:`VmapForward` runs any LipschitzNet under ``torch.func.vmap(functional_call)``.

On the CPU, :class:`StackedForward` keeps each member's bits for dense layers: its linear layers
round forward and backward as ``F.linear`` does (:class:`_MemberLinear`), products small enough
for ATen's own ``bmm`` loop go through ``mm`` member by member (:func:`member_matmul`), and K is
multiplied up factor by factor as ``compose_estimate`` does.  Training amplifies any one-ulp
difference to tenths of a percent over a long run, so this is what lets a batched sweep print the
sequential sweep's table exactly (``tests/test_batched_bits.py``).  Grouped convolutions do not
round as separate ones; conv members agree with their separate runs to rounding only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lipmargin.config import LossConfig
from lipmargin.nn.activations import GroupSort, MaxMin
from lipmargin.lipschitz import (
    conv2d_operator,
    layer_rule,
    normalize,
    operator_norm_estimate,
    pairwise_head_norms,
    power_iteration,
    training_estimate,
)
from lipmargin.losses import lipschitz_penalty
from lipmargin.models import LipschitzNet
from lipmargin.losses import TRAIN_LOSSES

__all__ = ["stack_members", "StackedForward", "VmapForward", "member_losses", "converge_members"]

#: Parameter-free layers that act on each sample alone: run on the (M * B) samples at once.
PER_SAMPLE_LAYERS = (MaxMin, GroupSort, nn.Flatten, nn.ReLU, nn.Identity)

Operator = Callable[[Tensor], Tensor]


def stack_members(models: Sequence[nn.Module]) -> tuple[dict[str, nn.Parameter], dict[str, Tensor]]:
    """Stack the models' parameters and buffers along dim 0 and make each model's tensors views of
    its slice (so updates of the stacks show in the members and the other way round)."""
    params = {n: nn.Parameter(torch.stack([m.get_parameter(n).detach() for m in models])) for n, _ in models[0].named_parameters()}
    buffers = {n: torch.stack([m.get_buffer(n) for m in models]) for n, _ in models[0].named_buffers()}
    for i, m in enumerate(models):
        for n, p in params.items():
            m.get_parameter(n).data = p.data[i]
        for n, b in buffers.items():
            owner, _, leaf = n.rpartition(".")
            m.get_submodule(owner)._buffers[leaf] = b[i]
    return params, buffers


def member_optimizer_state(state: dict[str, Any], i: int, members: int) -> dict[str, Any]:
    """Member ``i``'s slice of a stacked optimizer's ``state_dict`` (a separate run's format)."""

    def pick(name: str, t: Any) -> Any:
        if isinstance(t, Tensor) and name != "step" and t.dim() > 0 and t.shape[0] == members:
            return t[i].clone()
        return t.clone() if isinstance(t, Tensor) else copy.deepcopy(t)

    return {
        "state": {k: {n: pick(n, t) for n, t in s.items()} for k, s in state["state"].items()},
        "param_groups": copy.deepcopy(state["param_groups"]),
    }


def stacked_optimizer_state(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of :func:`member_optimizer_state` (the shared ``step`` from the first member)."""
    stacked = {
        k: {n: t if n == "step" or not isinstance(t, Tensor) else torch.stack([s["state"][k][n] for s in states]) for n, t in v.items()}
        for k, v in states[0]["state"].items()
    }
    return {"state": stacked, "param_groups": states[0]["param_groups"]}


# --------------------------------------------------------------------------------------------
# Stacked operators (block-diagonal over members) and the native forward
# --------------------------------------------------------------------------------------------


def _stackable(layer: nn.Module) -> bool:
    """A plain Linear or zero-padded Conv2d: its stacked operator is a batched matmul / grouped conv."""
    if type(layer) is nn.Conv2d:
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return type(layer) is nn.Linear


#: ATen's CPU ``bmm`` multiplies slices of fewer than this many multiply-adds with a plain loop of
#: its own (``bmm_out_or_baddbmm_``), which rounds differently from ``mm``; larger slices go through
#: ``mm`` one by one.  A power-iteration vector times a small layer is such a slice.
_CPU_BMM_OWN_KERNEL_BELOW = 400


def member_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for stacks ``(M, n, k) @ (M, k, p)``, each member's product rounded as its separate
    run's ``mm`` rounds it (so a batched member keeps its separate run's bits on the CPU)."""
    n, k, p = a.shape[-2], a.shape[-1], b.shape[-1]
    if a.device.type != "cpu" or n * k * p >= _CPU_BMM_OWN_KERNEL_BELOW:
        return a @ b
    # (Not mm(..., out=slice): with an out tensor ATen may take yet another kernel.)
    return torch.stack([x @ y for x, y in zip(a.unbind(0), b.unbind(0))])


class _MemberLinear(torch.autograd.Function):
    """``F.linear`` of every member at once, ``(M, B, in) -> (M, B, out)``, whose forward and backward
    round each member's numbers as ``F.linear`` rounds its separate run's: the weight gradient is
    formed as ``g^T x`` (``addmm``'s backward), not as ``(x^T g)^T`` (``bmm``'s), which sums in
    another order."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, w)
        ctx.has_bias = bias is not None
        b, (n_in, n_out) = h.shape[-2], w.shape[-1:-3:-1]
        if h.device.type == "cpu" and b * n_in * n_out < _CPU_BMM_OWN_KERNEL_BELOW:
            return torch.stack([F.linear(x, wi, None if bias is None else bias[i]) for i, (x, wi) in enumerate(zip(h, w))])
        return torch.baddbmm(bias.unsqueeze(1), h, w.mT) if bias is not None else torch.bmm(h, w.mT)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        h, w = ctx.saved_tensors
        grad_h = member_matmul(g, w) if ctx.needs_input_grad[0] else None
        grad_w = member_matmul(g.mT, h) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b


def _stacked_operator(layer: nn.Module, weight: Tensor, shape: tuple[int, ...]) -> tuple[Operator, Operator]:
    """``(A, A_T)`` of every member's layer at once on vectors ``(M, 1, *shape)`` (a stackable layer)."""
    m = weight.shape[0]
    if type(layer) is nn.Linear:
        return (lambda v: member_matmul(v, weight.mT)), (lambda y: member_matmul(y, weight))
    if _stackable(layer):
        c, h, w = shape
        grouped = weight.reshape(-1, *weight.shape[2:])  # (M * O, C / g, kh, kw): member i is group block i
        fwd, adj = conv2d_operator(grouped, (m * c, h, w), layer.stride, layer.padding, layer.dilation, layer.groups * m)  # type: ignore[arg-type]
        return (
            lambda v: (lambda out: out.reshape(m, 1, -1, *out.shape[-2:]))(fwd(v.reshape(1, m * c, h, w))),
            lambda y: adj(y.reshape(1, -1, *y.shape[-2:])).reshape(m, 1, c, h, w),
        )
    raise TypeError(f"no stacked operator for {type(layer).__name__}")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(mod): name for name, mod in model.named_modules()}


class StackedForward:
    """``x (M, B, ...) -> (logits (M, B, C), K (M,), advanced vectors)`` with bmm / grouped convs."""

    def __init__(
        self, template: LipschitzNet, params: dict[str, Tensor], buffers: dict[str, Tensor], n_iter: int, fp64: bool,
        unrolled: bool = False,
    ) -> None:
        self.template, self.params, self.buffers = template, params, buffers
        self.n_iter, self.fp64, self.unrolled = n_iter, fp64, unrolled
        names = _module_names(template)
        bound = template.bound
        self.layers = [(names[id(m)], m) for m in bound.layers]
        self.vectors = list(zip(bound.layers, bound.input_shapes, bound.vector_names))

    @staticmethod
    def supports(model: LipschitzNet) -> bool:
        # The stacked forward runs the leaves one after the other and multiplies their constants:
        # only a plain chain (no residual sums, branches or scalings) is that.
        return model.bound.is_chain and all(type(m) in PER_SAMPLE_LAYERS or _stackable(m) for m in model.bound.layers)

    def _layer(self, name: str, m: nn.Module, h: Tensor) -> Tensor:
        mm, b = h.shape[:2]
        if type(m) is nn.Linear:
            return _MemberLinear.apply(h, self.params[f"{name}.weight"], self.params.get(f"{name}.bias"))
        if type(m) is nn.Conv2d:
            w, bias = self.params[f"{name}.weight"], self.params.get(f"{name}.bias")
            z = h.transpose(0, 1).reshape(b, -1, *h.shape[-2:])  # (B, M * C, H, W)
            out = F.conv2d(z, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                           m.stride, m.padding, m.dilation, m.groups * mm)  # type: ignore[arg-type]
            return out.reshape(b, mm, -1, *out.shape[-2:]).transpose(0, 1)
        out = m(h.reshape(mm * b, *h.shape[2:]))
        return out.reshape(mm, b, *out.shape[1:])

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = x.double() if self.fp64 else x
        for name, m in self.layers:
            h = self._layer(name, m, h)
        logits = self._layer("head", self.template.head, h)
        sigmas: list[Tensor] = []
        vectors: dict[str, Tensor] = {}
        for (name, m), (_, shape, vec) in zip(self.layers, self.vectors):
            if vec is None:
                sigmas.append(torch.full((h.shape[0],), float(layer_rule(m).constant(m)), dtype=logits.dtype, device=logits.device))  # type: ignore[misc]
                continue
            fwd, adj = _stacked_operator(m, self.params[f"{name}.weight"], shape)
            sigma, advanced = training_estimate(fwd, adj, self.buffers[f"bound.{vec}"], self.n_iter, unrolled=self.unrolled, batched=True)
            if advanced is not None:
                vectors[vec] = advanced
            sigmas.append(sigma)
        # K as the separate run's compose_estimate forms it, factor by factor from the input
        # (torch.prod's backward would round the gradients differently).
        k = torch.ones_like(sigmas[0])
        for sigma in sigmas:
            k = sigma * k
        return logits, k, vectors


class _MemberForward(nn.Module):
    """``x -> (logits, K, advanced vectors)`` of one member (what :class:`TrainStep` computes)."""

    def __init__(self, model: LipschitzNet, n_iter: int, fp64: bool, unrolled: bool = False) -> None:
        super().__init__()
        self.model = model
        self.n_iter = n_iter
        self.fp64 = fp64
        self.unrolled = unrolled

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if self.fp64:
            x = x.double()
        logits = self.model(x)
        k, _, vectors = self.model.bound.advance(self.n_iter, self.unrolled)
        return logits, k, vectors


class VmapForward:
    """Same contract as :class:`StackedForward`, for any LipschitzNet (vmap over ``functional_call``)."""

    def __init__(
        self, template: LipschitzNet, params: dict[str, Tensor], buffers: dict[str, Tensor], n_iter: int, fp64: bool,
        unrolled: bool = False,
    ) -> None:
        step = _MemberForward(template, n_iter, fp64, unrolled)
        self.params = {f"model.{n}": t for n, t in params.items()}
        self.buffers = {f"model.{n}": t for n, t in buffers.items()}
        self._forward = vmap(lambda p, b, x: functional_call(step, (p, b), (x,)))

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return self._forward(self.params, self.buffers, x)


# --------------------------------------------------------------------------------------------
# Per-member losses
# --------------------------------------------------------------------------------------------


@dataclass
class _HeadView:
    """What a batched training loss sees of its member's model: the head weight (a stacked slice)."""

    weight: Tensor

    @property
    def head(self) -> _HeadView:
        return self

    def pairwise_lipschitz(self, feature_lipschitz: Tensor) -> Tensor:
        return feature_lipschitz * pairwise_head_norms(self.weight)


def _loss_fn(cfg: LossConfig) -> Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]:
    """One member's training loss as ``train_one_epoch`` computes it (loss plus Lipschitz penalty)."""
    train_loss = TRAIN_LOSSES[cfg.name](cfg)

    def loss(logits: Tensor, target: Tensor, head_weight: Tensor, k: Tensor, progress: float) -> Tensor:
        value = train_loss(logits, target, _HeadView(head_weight), k, progress)  # type: ignore[arg-type]
        if cfg.lipschitz_penalty > 0:
            k_tot = k * pairwise_head_norms(head_weight).max()
            value = value + lipschitz_penalty(k_tot, cfg.lipschitz_penalty, cfg.penalty_power)
        return value

    return loss


LossPartition = tuple[list[int], Callable[..., Tensor]]


def loss_partitions(loss_configs: Sequence[LossConfig]) -> list[LossPartition]:
    """Members with equal loss settings, each set with its loss vmapped over its members."""
    by_cfg: dict[LossConfig, list[int]] = {}
    for j, cfg in enumerate(loss_configs):
        by_cfg.setdefault(cfg, []).append(j)
    return [(idx, vmap(_loss_fn(cfg), in_dims=(0, 0, 0, 0, None))) for cfg, idx in by_cfg.items()]


def member_losses(parts: Sequence[LossPartition], logits: Tensor, y: Tensor, head_weight: Tensor, k: Tensor, progress: float) -> Tensor:
    """``(M,)`` training losses, member ``j``'s with member ``j``'s loss settings."""
    if len(parts) == 1:
        return parts[0][1](logits, y, head_weight, k, progress)
    order: list[int] = []
    values: list[Tensor] = []
    for idx, fn in parts:
        sel = torch.tensor(idx, device=logits.device)
        values.append(fn(logits[sel], y[sel], head_weight[sel], k[sel], progress))
        order += idx
    inverse = torch.empty(len(order), dtype=torch.long, device=logits.device)
    inverse[torch.tensor(order, device=logits.device)] = torch.arange(len(order), device=logits.device)
    return torch.cat(values)[inverse]


# --------------------------------------------------------------------------------------------
# End-of-epoch convergence of the power iterations, batched over members
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def converge_members(models: Sequence[LipschitzNet], *, tol: float = 1e-9, max_iter: int = 10_000, check_every: int = 10) -> list[Tensor]:
    """``[m.bound.converge() for m in models]`` with the power iterations of all members batched.

    Each member runs the chunks :func:`~lipmargin.lipschitz.converge_operator_norm` runs for it
    alone and stops at its own convergence test; the vectors are written back to its buffers.
    """
    if not models:
        return []
    first = models[0].bound
    for m, name in zip(first.layers, first.vector_names):
        if name is not None and not _stackable(m):
            return [model.bound.converge(tol=tol, max_iter=max_iter) for model in models]
    per_member = [[0.0] * len(first.layers) for _ in models]
    for i, (layer, shape, name) in enumerate(zip(first.layers, first.input_shapes, first.vector_names)):
        if name is None:
            for j, model in enumerate(models):
                m, rule = model.bound.layers[i], layer_rule(model.bound.layers[i])
                per_member[j][i] = float(rule.estimate(m).detach().double()) if rule.estimate is not None else float(rule.constant(m))  # type: ignore[misc]
            continue
        weights = torch.stack([model.bound.layers[i].weight.detach().double() for model in models])  # (M, ...)
        v = torch.stack([getattr(model.bound, name).detach().double() for model in models])  # (M, 1, *shape)
        sigma = _converge_stacked(layer, weights, shape, v, tol, max_iter, check_every)
        for j, model in enumerate(models):
            buf = getattr(model.bound, name)
            buf.copy_(v[j].to(buf.dtype))
            per_member[j][i] = float(sigma[j])
    return [torch.tensor(r, dtype=torch.float64) for r in per_member]


def _converge_stacked(layer: nn.Module, weights: Tensor, shape: tuple[int, ...], v: Tensor, tol: float, max_iter: int, check_every: int) -> Tensor:
    """``converge_operator_norm`` for stacked members; ``v`` is updated in place; returns sigmas."""
    v.copy_(normalize(v, batched=True))
    fwd, _ = _stacked_operator(layer, weights, shape)
    sigma = operator_norm_estimate(fwd, v, batched=True)
    active = torch.arange(v.shape[0])
    done = 0
    while done < max_iter and active.numel():
        chunk = min(check_every, max_iter - done)
        fwd, adj = _stacked_operator(layer, weights[active], shape)
        x = power_iteration(fwd, adj, v[active], chunk - 1, batched=True)
        before = operator_norm_estimate(fwd, x, batched=True)
        x = power_iteration(fwd, adj, x, 1, batched=True)
        after = operator_norm_estimate(fwd, x, batched=True)
        v[active], sigma[active] = x, after
        done += chunk
        pairs = torch.stack([before, after]).tolist()  # one device sync per chunk
        still = [not abs(b - a) <= tol * max(b, 1e-300) for a, b in zip(*pairs)]
        active = active[torch.tensor(still, dtype=torch.bool)]
    return sigma
