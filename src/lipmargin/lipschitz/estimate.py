"""Power-iteration estimates of a module's Lipschitz constant over its traced graph.

:class:`FeatureEstimate` keeps one persistent power-iteration vector per affine leaf of the traced
module (a buffer shaped like the leaf's real input, batch 1) and composes the per-leaf values with
the rules of :mod:`lipmargin.lipschitz.graph`: a plain chain gives the product of the per-layer sigmas (the
paper's ``K``), a residual ``x + f(x)`` gives ``1 + Lip f``, and so on.  The values are
*estimates* (a power iteration approaches a norm from below); certificates use
:func:`lipmargin.certify.model_bound`, which composes sound per-leaf bounds over the same graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lipmargin.lipschitz.graph import GraphPlan, ModelStructureError, compose_estimate, compose_sound, pairwise_estimate, structure_signature, trace_model
from lipmargin.lipschitz.operators import float64_operator, operator_norm_bound
from lipmargin.lipschitz.power import converge_operator_norm, no_autocast, normalize, training_estimate
from lipmargin.lipschitz.rules import LayerRule, layer_rule

__all__ = ["FeatureEstimate"]


def __getattr__(name: str) -> object:
    if name == "FeatureBound":
        raise AttributeError(
            "FeatureBound was renamed FeatureEstimate (it holds power-iteration estimates, not bounds): "
            "use lipmargin.lipschitz.estimate.FeatureEstimate"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FeatureEstimate(nn.Module):
    """Persistent power-iteration state for the leaves of a traced module.

    ``module`` is an ``nn.Module`` (or a sequence of layers, applied in order); it is referenced,
    not registered, so its parameters are not duplicated in ``state_dict``.  Buffer ``v{i}`` belongs
    to the ``i``-th leaf (in graph order) when that leaf has a power-iteration operator.

    ``forward(n_iter)`` advances the vectors by ``n_iter`` steps (under ``no_grad``, in training
    mode only) and returns ``(K, sigmas)``: the composed estimate and the per-leaf values, computed
    with the vectors detached so gradients reach the weights.  A module whose structure changed
    after construction (a layer replaced or appended) raises :class:`ModelStructureError`.

    >>> layer = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.diag(torch.tensor([3.0, 1.0])))
    >>> estimate = FeatureEstimate(nn.Sequential(layer, nn.ReLU()), input_shape=(2,))
    >>> k, sigmas = estimate(n_iter=50)  # a fresh module is in training mode: the vectors advance
    >>> round(float(k.detach()), 4), sigmas.shape
    (3.0, torch.Size([2]))
    >>> estimate.compose(estimate.sound()) >= 3.0  # the sound counterpart, for certificates
    True
    """

    def __init__(self, module: nn.Module | Sequence[nn.Module], input_shape: Sequence[int]) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            module = nn.Sequential(*module)
        self._module = [module]  # a list: not registered as a submodule
        self.input_shape = tuple(int(s) for s in input_shape)
        self._plan: GraphPlan = trace_model(module, self.input_shape, for_certificate=False)
        self.input_shapes: list[tuple[int, ...]] = []
        self._vector_names: list[str | None] = []
        self._rules: list[LayerRule] = []
        p = next(module.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
        for i, step in enumerate(self._plan.leaves):
            m = self._plan.module(step)
            rule = layer_rule(m)
            self._rules.append(rule)
            shape = step.in_shape or ()
            self.input_shapes.append(shape)
            if rule.operator is not None:
                name = f"v{i}"
                mp = next(m.parameters(), None)
                v = torch.randn(1, *shape, dtype=mp.dtype if mp is not None else dtype)
                self.register_buffer(name, normalize(v))
                self._vector_names.append(name)
            else:
                self._vector_names.append(None)

    @property
    def plan(self) -> GraphPlan:
        return self._plan

    @property
    def layers(self) -> list[nn.Module]:
        return [self._plan.module(s) for s in self._plan.leaves]

    def _check_structure(self) -> None:
        if torch.compiler.is_compiling():
            return  # checked by the eager calls around a compiled step
        if structure_signature(self._module[0]) != self._plan.structure:
            raise ModelStructureError(
                "the model's layers changed after its Lipschitz estimator was built (a layer replaced, "
                "added or removed); build the model again (e.g. a new LipschitzNet) so the bound sees them"
            )

    def _reference_tensor(self) -> Tensor:
        for b in self.buffers():
            return b
        for p in self._module[0].parameters():
            return p
        return torch.zeros(())

    def _operator(self, i: int):
        """The power-iteration operator ``(A, A^T)`` of leaf ``i`` (``None`` rule: ``TypeError``)."""
        step, rule = self._plan.leaves[i], self._rules[i]
        if rule.operator is None:
            raise TypeError(f"leaf {i} ({type(self._plan.module(step)).__name__}) has no power-iteration operator")
        return rule.operator(self._plan.module(step), step.in_shape or ())

    @property
    def vector_names(self) -> list[str | None]:
        """Per leaf: the name of its power-iteration buffer, or ``None`` (no operator rule)."""
        return list(self._vector_names)

    @property
    def is_chain(self) -> bool:
        """Whether the traced module is a plain chain of layers: no tensor operation between them
        (no sums, branches, scalings, slices), so running the leaves in order is the module."""
        return all(s.kind in ("input", "leaf", "const") for s in self._plan.steps)

    def forward(self, n_iter: int = 0, unrolled: bool = False) -> tuple[Tensor, Tensor]:
        k, sigmas, vectors = self.advance(n_iter, unrolled)
        with torch.no_grad():
            for name, v in vectors.items():
                getattr(self, name).copy_(v)
        return k, sigmas

    def advance(self, n_iter: int = 0, unrolled: bool = False) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(K, sigmas, vectors)`` like :meth:`forward`, without writing the buffers.

        ``unrolled``: the ``n_iter`` power-iteration steps run with gradients, so that ``K``'s
        gradient flows through every step (the authors' code does this for GloRo and the Lipschitz
        penalty); by default the advanced vector is a constant and only ``||A v|| / ||v||`` is
        differentiated (equal at convergence).  docs/method.md#power-iteration.

        ``vectors`` maps buffer names to the advanced vectors (empty unless ``n_iter > 0`` in
        training mode).  Free of in-place buffer writes, it runs under ``torch.func.vmap`` /
        ``functional_call`` over stacked members (see :mod:`lipmargin.train.batched`).
        """
        lip, sigmas, vectors = self._estimate(n_iter, unrolled)
        return lip[self._plan.output], sigmas, vectors

    def pairwise(self, n_iter: int = 0) -> tuple[Tensor, Tensor]:
        """``(K, pairwise (C, C))`` for a whole model: ``K ||W_i - W_j||`` when it ends in a linear
        head (``K`` the features' estimate), else ``sqrt(2) L`` for every pair; differentiable.

        This is what ``cll_loss`` / ``gloro_loss`` need to train any traceable model.
        """
        if self._plan.num_classes == 0:
            raise ValueError("pairwise needs a model that returns logits of shape (B, C)")
        lip, _, vectors = self._estimate(n_iter)
        with torch.no_grad():
            for name, v in vectors.items():
                getattr(self, name).copy_(v)
        return pairwise_estimate(self._plan, lip)

    def _estimate(self, n_iter: int, unrolled: bool = False) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        # Never under autocast: with train.precision=bf16 only the model's forward is bfloat16.
        with no_autocast(self._reference_tensor()):
            return self._estimate_fp(n_iter, unrolled)

    def _estimate_fp(self, n_iter: int, unrolled: bool) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        self._check_structure()
        ref = self._reference_tensor()
        values: dict[str, Tensor] = {}
        sigmas: list[Tensor] = []
        vectors: dict[str, Tensor] = {}
        for step, rule, name in zip(self._plan.leaves, self._rules, self._vector_names):
            m = self._plan.module(step)
            if name is not None:
                assert rule.operator is not None
                fwd, adj = rule.operator(m, step.in_shape or ())
                sigma, advanced = training_estimate(fwd, adj, getattr(self, name), n_iter if self.training else 0, unrolled=unrolled)
                if advanced is not None:
                    vectors[name] = advanced
            elif rule.estimate is not None:
                sigma = rule.estimate(m).reshape(()).to(ref)
            elif rule.constant is not None:
                sigma = torch.tensor(float(rule.constant(m)), dtype=ref.dtype, device=ref.device)
            else:  # a shape-dependent constant (pooling): its bound, fixed
                assert rule.bound is not None
                sigma = torch.tensor(float(rule.bound(m, step.in_shape or ())), dtype=ref.dtype, device=ref.device)
            values[step.name] = sigma
            sigmas.append(sigma)
        lip = compose_estimate(self._plan, values, ref)
        return lip, (torch.stack(sigmas) if sigmas else torch.ones(0)), vectors

    @torch.no_grad()
    def converge(self, *, tol: float = 1e-9, max_iter: int = 10_000) -> Tensor:
        """Run every power iteration to convergence in float64; returns the per-leaf estimates.

        The float64 vectors are written back to the buffers, so training warm-starts from them.
        """
        self._check_structure()
        out: list[float] = []
        for step, rule, name in zip(self._plan.leaves, self._rules, self._vector_names):
            m = self._plan.module(step)
            shape = step.in_shape or ()
            if name is not None:
                v = getattr(self, name)
                fwd, adj = float64_operator(rule, m, shape)
                sigma, v64 = converge_operator_norm(fwd, adj, v.detach().to(torch.float64), tol=tol, max_iter=max_iter)
                v.copy_(v64.to(v.dtype))
                out.append(float(sigma))
            elif rule.estimate is not None:
                out.append(float(rule.estimate(m).detach().double()))
            elif rule.constant is not None:
                out.append(float(rule.constant(m)))
            else:
                assert rule.bound is not None
                out.append(float(rule.bound(m, shape)))
        return torch.tensor(out, dtype=torch.float64)

    def compose(self, per_leaf: Tensor) -> float:
        """The constant of the whole module from per-leaf values (rounded up at every step)."""
        values = {s.name: float(v) for s, v in zip(self._plan.leaves, per_leaf.tolist())}
        return compose_sound(self._plan, values)[self._plan.output]

    @torch.no_grad()
    def sound(self) -> Tensor:
        """Per-leaf values provably >= each leaf's Lipschitz constant (float64)."""
        self._check_structure()
        return torch.tensor(
            [operator_norm_bound(self._plan.module(s), s.in_shape or ()) for s in self._plan.leaves], dtype=torch.float64
        )
