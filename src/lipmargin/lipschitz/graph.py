"""Lipschitz bounds of any ``nn.Module`` through its ``torch.fx`` graph.

A model is traced with :class:`torch.fx` down to *leaves*: modules whose exact type has a rule in
:data:`lipmargin.lipschitz.LAYER_RULES` (or :data:`~lipmargin.lipschitz.PEER_LAYER_RULES`).  Any
other module is traced through its own ``forward``; a built-in torch layer without a rule stays a
leaf and is refused.  Every node then gets a *combinator* that says how the Lipschitz constant of
its output (as a function of the model input) follows from those of its arguments:

- ``leaf``: a layer with constant ``c`` applied to an argument with constant ``L`` gives ``c L``
  (composition: ``||g(f(x)) - g(f(y))|| <= c ||f(x) - f(y)|| <= c L ||x - y||``);
- ``sum`` with weights ``w``: ``sum_i w_i a_i(x)`` gives ``sum_i |w_i| L_i`` (triangle inequality;
  ``x + f(x)`` gives ``1 + Lip f``; a constant operand has ``L = 0``);
- ``scale`` by a constant tensor ``c`` (``x * c``, ``x / c``): ``max |c|`` (resp. ``1 / min |c|``),
  because ``|c_k (a_k - b_k)| <= max|c| |a_k - b_k|`` entrywise;
- ``rss``: ``torch.cat`` / ``torch.stack`` of branches and ``torch.maximum`` / ``minimum`` give
  ``sqrt(sum_i L_i^2)``: the squared distance of a concatenation is the sum of the parts', and
  ``|max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|)`` entrywise.
- reshapes, permutations that keep the batch dimension first, slices: ``1`` (they copy a subset of
  the entries without repetition).

The functions here never change the caller's model: tracing is symbolic, the shape probe runs
under ``no_grad`` on a random batch from a private generator, and nothing is written back.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lipmargin.lipschitz.graph_ops import OP_RULES, OpRule, supported_operations
from lipmargin.lipschitz.operators import pairwise_head_norms, pairwise_head_norms_bound
from lipmargin.lipschitz.rules import find_layer_rule, layer_rule, supported_layers
from lipmargin.lipschitz.torch_layers import TRAINING_MODE_REFUSED
from lipmargin.lipschitz.rounding import SQRT2_UP, next_up

__all__ = ["GraphPlan", "Step", "trace_model", "compose_sound", "compose_estimate", "check_input_shape", "ModelStructureError"]


class ModelStructureError(RuntimeError):
    """The model changed after its bound or estimator was built."""


_PROBE_BATCH = 2


class _Tracer(fx.Tracer):
    """Leaves: modules with an exact-type rule, and torch's own layers (refused if rule-less)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if find_layer_rule(m) is not None:
            return True
        if type(m) in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
            return False
        return type(m).__module__.startswith("torch.")


@dataclass(frozen=True)
class Step:
    """One node of the plan: ``kind`` is input | const | leaf | op; ``inputs`` its dependent args."""

    name: str
    kind: str
    inputs: tuple[str, ...] = ()
    comb: tuple[Any, ...] = ()  # ("sum", weights) | ("scale", const-node or number, invert) | ("rss",) | ("leaf", qualname)
    module: str | None = None
    in_shape: tuple[int, ...] | None = None
    local: tuple[Any, ...] = ("exact",)  # rounding model of an op node


@dataclass
class GraphPlan:
    """A traced model: the graph module, one :class:`Step` per node, and the head if any.

    ``head`` is the qualified name of a final ``nn.Linear`` applied to input-dependent features
    (then ``pairwise[i, j] = K ||W_i - W_j||`` with ``K`` the features' constant); ``None`` means
    the global bound ``sqrt(2) L`` is used for every pair.
    """

    root: nn.Module
    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    steps: list[Step]
    output: str
    head: str | None
    num_classes: int
    structure: tuple[tuple[str, str], ...] = field(repr=False, default=())

    @property
    def leaves(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "leaf"]

    def module(self, step: Step) -> nn.Module:
        """The live module of a leaf (looked up in the traced model, not in a copy)."""
        assert step.module is not None
        return self.root.get_submodule(step.module)

    def step(self, name: str) -> Step:
        return self._by_name[name]

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.steps}

    def fingerprint(self) -> str:
        """SHA-256 of the graph's code and of every parameter and buffer it uses (as float64)."""
        h = hashlib.sha256(self.gm.code.encode())
        for name, t in sorted(self.root.state_dict().items()):
            if not name.split(".")[0] == "bound":  # power-iteration vectors do not change the function
                h.update(name.encode())
                t = t.detach().to("cpu")
                t = t.double() if t.is_floating_point() else t
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def structure_signature(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """Names and types of every submodule: changes when a layer is added, removed or replaced by
    another kind (a copy of the model has the same signature; a same-type replacement is looked up
    live by name, so the estimate follows it)."""
    return tuple((name, f"{type(m).__module__}.{type(m).__qualname__}") for name, m in model.named_modules())


def check_hooks(model: nn.Module) -> None:
    """Refuse models whose output is changed by hooks (the traced graph would not see them)."""
    from torch.nn.modules import module as module_mod

    if getattr(module_mod, "_global_forward_hooks", None) or getattr(module_mod, "_global_forward_pre_hooks", None):
        raise TypeError("global forward hooks are registered; a certificate cannot describe a hooked forward pass")
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            raise TypeError(
                f"module {name or '<root>'} ({type(m).__name__}) has forward hooks; remove them before "
                "bounding or certifying (a hook can change the output without the bound knowing)"
            )


def _unsupported(node: fx.Node, why: str, gm: fx.GraphModule | None = None) -> TypeError:
    where = f"node {node.name!r} ({node.op} {_target_name(node, gm)})"
    return TypeError(
        f"cannot bound {where}: {why}. Supported layers: {', '.join(supported_layers())}. "
        f"Supported operations: {', '.join(supported_operations())}"
    )


def _target_name(node: fx.Node, gm: fx.GraphModule | None) -> str:
    if node.op == "call_module" and gm is not None:
        return f"{node.target} = {type(gm.get_submodule(str(node.target))).__name__}"
    t = node.target
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def trace_model(model: nn.Module, input_shape: Sequence[int], *, for_certificate: bool = True) -> GraphPlan:
    """Trace ``model`` and give every node a rule, or raise ``TypeError`` naming the first that has none.

    ``input_shape`` excludes the batch dimension.  The model is run once on a random probe batch
    of two samples (under ``no_grad``) to learn every node's shape and to check that no operation
    mixes the samples of a batch.  ``for_certificate`` refuses layers in training mode
    (BatchNorm, Dropout); without it (a training estimate) they are probed on an eval-mode copy.

    >>> plan = trace_model(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (4,))
    >>> [step.kind for step in plan.steps], plan.num_classes, plan.head
    (['input', 'leaf', 'leaf', 'leaf'], 2, '2')
    >>> trace_model(nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)), (4,))
    Traceback (most recent call last):
    ...
    TypeError: ...Softmax...
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes; got {tuple(input_shape)}")
    check_hooks(model)
    if find_layer_rule(model) is not None:
        model = nn.Sequential(model)  # a single layer: trace it as a leaf, not through its forward
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001  (fx reports data-dependent control flow in many ways)
        raise TypeError(f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}".splitlines()[0]) from e
    gm = fx.GraphModule(model, graph)
    values = _probe(gm, model, shape, for_certificate)
    steps: list[Step] = []
    dependent: set[str] = set()
    output = ""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if steps and any(s.kind == "input" for s in steps):
                raise _unsupported(node, "the model must take exactly one input tensor", gm)
            steps.append(Step(node.name, "input"))
            dependent.add(node.name)
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or out.name not in dependent or not isinstance(values.get(out.name), Tensor):
                raise _unsupported(node, "the model must return one logits tensor that depends on its input", gm)
            output = out.name
            continue
        deps = tuple(a.name for a in node.all_input_nodes if a.name in dependent)
        if node.op == "get_attr" or not deps:
            steps.append(Step(node.name, "const"))
            continue
        value = values[node.name]
        if not _is_tensor_like(value):
            steps.append(Step(node.name, "const"))  # a size or shape read from the input: fixed for its shape
            continue
        _check_batch(node, value, gm)
        dependent.add(node.name)
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
                raise _unsupported(node, "a layer must be called with exactly one tensor argument", gm)
            try:
                rule = layer_rule(m)
            except TypeError as e:
                raise _unsupported(node, f"no Lipschitz rule for {type(m).__name__}", gm) from e
            if getattr(m, "inplace", False) and len(node.args[0].users) > 1:
                raise _unsupported(node, "an in-place layer overwrites a tensor that is used again", gm)
            in_value = values[node.args[0].name]
            steps.append(Step(node.name, "leaf", deps, ("leaf", str(node.target)), str(node.target), tuple(in_value.shape[1:])))
            continue
        key = node.target if node.op == "call_function" else ("method", node.target)
        op_rule: OpRule | None = OP_RULES.get(key)  # type: ignore[arg-type]
        if op_rule is None:
            raise _unsupported(node, "no Lipschitz rule for this operation", gm)
        try:
            comb, local = op_rule(node, dependent, values)
        except TypeError as e:
            raise _unsupported(node, str(e), gm) from None
        steps.append(Step(node.name, "op", deps, comb, local=local))
    out_value = values[output]
    if out_value.dim() != 2 and for_certificate:
        raise TypeError(f"the model must return logits of shape (B, C); got {tuple(out_value.shape)} for a batch of {_PROBE_BATCH}")
    head = _find_head(gm, steps, output)
    return GraphPlan(model, gm, shape, steps, output, head, int(out_value.shape[1]) if out_value.dim() == 2 else 0, structure_signature(model))


def _is_tensor_like(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, Tensor) for v in value)


def _check_batch(node: fx.Node, value: Any, gm: fx.GraphModule) -> None:
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if v.dim() == 0 or v.shape[0] != _PROBE_BATCH:
            raise _unsupported(node, f"the batch dimension is not kept first (probe of {_PROBE_BATCH} samples gave shape {tuple(v.shape)})", gm)
        if not v.is_floating_point():
            raise _unsupported(node, f"an input-dependent tensor of dtype {v.dtype} has no Lipschitz bound", gm)


def _probe(gm: fx.GraphModule, model: nn.Module, shape: tuple[int, ...], for_certificate: bool) -> dict[str, Any]:
    """Every node's value on a random batch of two inputs in [0, 1] (the model is not changed)."""
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(_PROBE_BATCH, *shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    training = [name for name, m in gm.named_modules() if m.training and _refuses_training(m)]
    if training and for_certificate:
        m = gm.get_submodule(training[0])
        raise TypeError(
            f"module {training[0]} ({type(m).__name__}) is in training mode, where its output depends on "
            "the batch or on chance; call model.eval() before bounding or certifying"
        )
    if training:  # probe an eval-mode copy: a training-mode forward would update running statistics
        gm = copy.deepcopy(gm).eval()
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad():
        try:
            _Recorder(gm).run(x)
        except TypeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"the model cannot run on inputs of shape {shape}: {type(e).__name__}: {e}".splitlines()[0]) from e
    return values


def check_training_mode(model: nn.Module) -> None:
    """``TypeError`` naming the first BatchNorm / Dropout of ``model`` that is in training mode."""
    for name, m in model.named_modules():
        if m.training and _refuses_training(m):
            raise TypeError(
                f"module {name} ({type(m).__name__}) is in training mode, where its output depends on "
                "the batch or on chance; call model.eval() before bounding or certifying"
            )


def _refuses_training(m: nn.Module) -> bool:
    return isinstance(m, TRAINING_MODE_REFUSED)


def _find_head(gm: fx.GraphModule, steps: list[Step], output: str) -> str | None:
    last = next(s for s in steps if s.name == output)
    if last.kind == "leaf" and type(gm.get_submodule(last.module or "")) is nn.Linear and len(last.inputs) == 1:
        return last.module
    return None


def check_input_shape(plan_shape: Sequence[int], x: Tensor) -> None:
    if tuple(x.shape[1:]) != tuple(plan_shape):
        raise ValueError(
            f"input of shape {tuple(x.shape[1:])} (batch excluded) but the bound was computed for "
            f"{tuple(plan_shape)}; the conv bounds depend on the input size, so pass input_shape={tuple(x.shape[1:])}"
        )


# --------------------------------------------------------------------------------------------
# Composition: sound (float64, every operation rounded up) and differentiable estimates
# --------------------------------------------------------------------------------------------


def constant_values(plan: GraphPlan, *, detach: bool) -> dict[str, Any]:
    """Values of the input-independent nodes, computed from the model's current parameters."""
    env: dict[str, Any] = {}
    for node in plan.gm.graph.nodes:
        if node.op in ("placeholder", "output") or plan.step(node.name).kind != "const":
            continue
        try:
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        except KeyError:
            continue  # derived from the input's shape: not needed by any combinator
        if node.op == "get_attr":
            val: Any = plan.root
            for part in str(node.target).split("."):
                val = getattr(val, part)
        elif node.op == "call_function":
            val = node.target(*args, **kwargs)
        elif node.op == "call_method":
            val = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            val = plan.root.get_submodule(str(node.target))(*args, **kwargs)
        env[node.name] = val.detach() if detach and isinstance(val, Tensor) else val
    return env


def _scale_factor(comb: tuple[Any, ...], consts: dict[str, Any]) -> Any:
    _, _, operand, invert = comb
    value = consts[operand] if isinstance(operand, str) and operand in consts else operand
    if isinstance(value, str):
        raise TypeError(f"constant operand {value} could not be evaluated")
    if isinstance(value, Tensor):
        mag = value.detach().abs().amin() if invert else value.abs().amax()
    else:
        mag = abs(float(value))
    return (1.0 / mag) if invert else mag


def compose_sound(plan: GraphPlan, leaf_bounds: dict[str, float]) -> dict[str, float]:
    """Float64 constant of every dependent node, each operation rounded up (a bound)."""
    consts = constant_values(plan, detach=True)
    lip: dict[str, float] = {}
    for s in plan.steps:
        if s.kind == "input":
            lip[s.name] = 1.0
        elif s.kind == "leaf":
            lip[s.name] = next_up(float(leaf_bounds[s.name]) * lip[s.inputs[0]])
        elif s.kind == "op":
            lip[s.name] = _combine_float(s, lip, consts)
    return lip


def _combine_float(s: Step, lip: dict[str, float], consts: dict[str, Any]) -> float:
    kind = s.comb[0]
    if kind == "sum":
        total = 0.0
        for name, w in s.comb[1]:
            total = next_up(total + next_up(abs(float(w)) * lip[name]))
        return total
    if kind == "scale":
        f = float(_scale_factor(s.comb, consts))
        if s.comb[3]:
            f = next_up(f)  # 1 / min|c| was one rounded division
        return next_up(f * lip[s.comb[1]])
    if kind == "rss":
        sq = 0.0
        for name in s.comb[1]:
            sq = next_up(sq + next_up(lip[name] * lip[name]))
        return next_up(math.sqrt(sq))
    raise AssertionError(kind)


def compose_estimate(plan: GraphPlan, leaf_values: dict[str, Tensor], reference: Tensor) -> dict[str, Tensor]:
    """The same composition with tensors (differentiable; an estimate when the leaves are)."""
    consts = constant_values(plan, detach=False)
    one = torch.ones((), dtype=reference.dtype, device=reference.device)
    lip: dict[str, Tensor] = {}
    for s in plan.steps:
        if s.kind == "input":
            lip[s.name] = one
        elif s.kind == "leaf":
            lip[s.name] = leaf_values[s.name] * lip[s.inputs[0]]
        elif s.kind == "op":
            kind = s.comb[0]
            if kind == "sum":
                lip[s.name] = sum((abs(float(w)) * lip[n] for n, w in s.comb[1]), torch.zeros_like(one))
            elif kind == "scale":
                f = _scale_factor(s.comb, consts)
                lip[s.name] = (f.to(one) if isinstance(f, Tensor) else f) * lip[s.comb[1]]
            else:
                lip[s.name] = torch.sqrt(sum((lip[n] ** 2 for n in s.comb[1]), torch.zeros_like(one)))
    return lip


def pairwise_from_plan(plan: GraphPlan, lip: dict[str, float]) -> tuple[float, Tensor]:
    """``(K, pairwise (C, C) float64)`` from the sound node constants."""
    if plan.head is not None:
        k = lip[plan.step(plan.output).inputs[0]]
        w = plan.root.get_submodule(plan.head).weight
        d = pairwise_head_norms_bound(w)
        pairwise = torch.where(d > 0, torch.nextafter(k * d, torch.full_like(d, math.inf)), torch.zeros_like(d))
        return k, pairwise
    total = lip[plan.output]
    c = plan.num_classes
    value = next_up(SQRT2_UP * total)
    pairwise = torch.full((c, c), value, dtype=torch.float64)
    pairwise.fill_diagonal_(0.0)
    return total, pairwise


def pairwise_estimate(plan: GraphPlan, lip: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Differentiable ``(K, pairwise (C, C))``: ``K ||W_i - W_j||`` with a head, else ``sqrt(2) L``."""
    if plan.head is not None:
        k = lip[plan.step(plan.output).inputs[0]]
        return k, k * pairwise_head_norms(plan.root.get_submodule(plan.head).weight)
    total = lip[plan.output]
    c = plan.num_classes
    off = 1.0 - torch.eye(c, dtype=total.dtype, device=total.device)
    return total, math.sqrt(2.0) * total * off

