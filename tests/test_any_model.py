"""Sound bounds and certificates for models lipmargin did not build (issue: any model in).

Every test checks the bound against an independent truth: the gradient norm of ``f_i - f_j`` at
many points (a lower bound of its Lipschitz constant, sharpened by gradient ascent), a dense
Jacobian for linear models, a perturbation that flips the label, or a hand derivation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipmargin
from lipmargin import certified_radius, certify, model_bound
from lipmargin.lipschitz.graph import ModelStructureError
from lipmargin.nn.activations import MaxMin
from lipmargin.lipschitz import register_layer_rule

f64 = torch.float64


def grad_lower_bound(model: nn.Module, input_shape: tuple[int, ...], pairs: list[tuple[int, int]], *,
                     n_points: int = 16, ascent_steps: int = 30, seed: int = 0) -> dict[tuple[int, int], float]:
    """max over points of ||grad (f_i - f_j)(x)||: a lower bound of Lip(f_i - f_j), pushed up by
    gradient ascent on the gradient norm (finite-difference free: double backward)."""
    gen = torch.Generator().manual_seed(seed)
    best: dict[tuple[int, int], float] = {}
    for i, j in pairs:
        x = (torch.randn(n_points, *input_shape, generator=gen, dtype=f64)).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        top = 0.0
        for _ in range(ascent_steps):
            out = model(x)
            d = out[:, i] - out[:, j]
            (g,) = torch.autograd.grad(d.sum(), x, create_graph=True)
            norms = g.flatten(1).norm(dim=1)
            top = max(top, norms.max().item())
            opt.zero_grad()
            (-norms.sum()).backward()
            opt.step()
        best[(i, j)] = top
    return best


def assert_bound_holds(model: nn.Module, input_shape: tuple[int, ...], **kw) -> lipmargin.ModelBound:
    model = model.double().eval()
    bound = model_bound(model, "sound", input_shape=input_shape)
    c = bound.pairwise.shape[0]
    pairs = [(i, j) for i in range(c) for j in range(c) if i < j][:6]
    lower = grad_lower_bound(model, input_shape, pairs, **kw)
    for (i, j), v in lower.items():
        assert float(bound.pairwise[i, j]) >= v * (1 - 1e-12), f"pair {(i, j)}: bound {float(bound.pairwise[i, j])} < gradient {v}"
    return bound


# ---- the reproductions of the issue ------------------------------------------------------------


class SkipSequential(nn.Sequential):
    def forward(self, x):  # type: ignore[override]
        return x + super().forward(x)


def test_sequential_subclass_with_a_skip_is_not_a_chain() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.copy_(0.5 * torch.eye(4))
    features = nn.Sequential(SkipSequential(lin, nn.ReLU()), nn.Flatten())
    model = lipmargin.LipschitzNet(features, nn.Linear(4, 2), (4,))
    bound = model_bound(model, "sound")
    # x + relu(0.5 x) has slope 1.5 for x > 0: the chain would have said 0.5.
    assert bound.feature >= 1.5
    assert_bound_holds(model, (4,))


class Triple(nn.Identity):
    def forward(self, x):  # type: ignore[override]
        return 3 * x


class ScaledLinear(nn.Linear):
    def forward(self, x):  # type: ignore[override]
        return 2.0 * super().forward(x)


def test_subclass_with_its_own_forward_never_inherits_the_parent_rule() -> None:
    model = nn.Sequential(nn.Linear(3, 3), Triple(), nn.Linear(3, 2))
    bound = assert_bound_holds(model, (3,))
    w0, w2 = model[0].weight.double(), model[2].weight.double()
    exact = 3 * torch.linalg.vector_norm((w2[0] - w2[1]) @ w0).item()  # f_0 - f_1 = 3 (W2_0 - W2_1) W0 x + c
    assert float(bound.pairwise[0, 1]) >= exact * (1 - 1e-12)
    # A Linear subclass is traced through its forward; F.linear has no rule: refused, named.
    with pytest.raises(TypeError, match="linear"):
        model_bound(nn.Sequential(ScaledLinear(3, 3), nn.Linear(3, 2)), input_shape=(3,))
    # A LipschitzNet head must be exactly nn.Linear.
    with pytest.raises(TypeError, match="exactly nn.Linear"):
        lipmargin.LipschitzNet(nn.Sequential(nn.Flatten()), ScaledLinear(3, 2), (3,))


def test_registering_a_rule_twice_needs_override() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_layer_rule(nn.Conv2d, constant=lambda m: 0.0)
    assert lipmargin.lipschitz.LAYER_RULES[nn.Conv2d].bound is not None  # unchanged


def test_radius_is_float64_and_rounded_down_for_float32_logits() -> None:
    logits = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    pairwise = torch.tensor([[0.0, 1 + 3e-8], [1 + 3e-8, 0.0]], dtype=f64)
    radius, _ = certified_radius(logits, pairwise)
    assert radius.dtype == f64
    assert float(radius) < 1.0 and float(radius) == pytest.approx(1 / (1 + 3e-8), rel=1e-15)


def test_points_on_the_boundary_are_not_certified() -> None:
    # f(x) = W x with two rows that tie exactly on the line x0 = x1: margins there are rounding
    # noise, so the radius must be ~0 (never the noise / L ~ 1e-16 that used to be certified).
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 0.3], [0.3, 0.1]], dtype=f64))
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(500, 1, generator=gen, dtype=f64) * 7
    x = torch.cat([t, t], 1)  # on the decision boundary: exact margin 0
    result = certify(lin, [(x, torch.zeros(500, dtype=torch.long))], [0.0], input_shape=(2,))
    assert (result.radius == 0).all()
    # The same inputs alone and inside a batch: whatever label each gets, none is certified.
    for k in range(5):
        alone = certify(lin, [(x[k : k + 1], torch.zeros(1, dtype=torch.long))], [0.0], input_shape=(2,))
        assert float(alone.radius[0]) == 0.0


def test_model_changed_after_construction() -> None:
    torch.manual_seed(0)
    model = lipmargin.create_model("2C2F", (1, 8, 8), 3, width=4, dense_width=8)
    before = model_bound(model)
    big = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        big.weight.mul_(100)
    model.features[0] = big
    after = model_bound(model)
    assert after.feature > 10 * before.feature  # the bound sees the new layer
    k, _ = model.feature_lipschitz(0)  # the estimate looks the layer up by name: it follows too
    assert float(k) > 10 * before.feature * 0.01
    model.features.append(nn.Identity())  # a layer added after construction
    with pytest.raises(ModelStructureError):
        model.feature_lipschitz(1)
    with pytest.raises(ValueError, match="other weights"):
        certify(model, [(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))], [0.1], bound=before)


def test_hooks_and_wrong_shapes_are_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    handle = model[1].register_forward_hook(lambda m, i, o: o * 1000)
    with pytest.raises(TypeError, match="hook"):
        model_bound(model, input_shape=(4,))
    handle.remove()
    pre = model.register_forward_pre_hook(lambda m, i: (i[0] * 10,))
    with pytest.raises(TypeError, match="hook"):
        certify(model, [(torch.rand(2, 4), torch.zeros(2, dtype=torch.long))], [0.1], input_shape=(4,))
    pre.remove()
    with pytest.raises(ValueError, match="input of shape"):
        certify(model, [(torch.rand(2, 2, 2), torch.zeros(2, dtype=torch.long))], [0.1], input_shape=(4,))
    with pytest.raises(ValueError, match="input_shape is required"):
        model_bound(model)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.Dropout(0.3)], ids=["BatchNorm1d", "Dropout"])
def test_training_mode_layers_are_refused(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2)).train()
    with pytest.raises(TypeError, match="training mode"):
        model_bound(model, input_shape=(3,))
    model.eval()
    assert_bound_holds(model, (3,))


class Squares(nn.Module):
    def forward(self, x):
        return x * x


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class MixesBatch(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("bad,pattern", [
    (Squares(), "two input-dependent"), (Exp(), "exp"), (MixesBatch(), "batch"),
    (nn.Softmax(dim=1), "Softmax"),
], ids=["x*x", "exp", "mean0", "Softmax"])
def test_unsupported_operations_raise_type_error_naming_them(bad: nn.Module, pattern: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), bad, nn.Linear(3, 2))
    with pytest.raises(TypeError, match=pattern) as info:
        model_bound(model, input_shape=(3,))
    assert "Supported operations" in str(info.value)


# ---- layers people use ------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        return x + 0.5 * self.act(self.conv(x))


class ResNet(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.block = ResBlock(4)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = self.pool(self.block(F.leaky_relu(self.bn(self.stem(x)), 0.2)))
        return self.head(torch.flatten(x, 1))


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
def test_residual_net_with_leaky_relu_and_avg_pool(bn: bool) -> None:
    torch.manual_seed(3)
    model = ResNet(bn)
    if bn:
        with torch.no_grad():
            model.bn.running_var.uniform_(0.2, 2.0)
            model.bn.weight.uniform_(-2, 2)
    bound = assert_bound_holds(model, (1, 6, 6))
    plan = lipmargin.lipschitz.graph.trace_model(model, (1, 6, 6))
    assert plan.head == "head"  # pairwise from the head rows


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, stride=1, padding=1), nn.LPPool2d(2, 2), nn.LPPool2d(2, 3, stride=1),
                                  nn.AvgPool2d(3, stride=1, padding=1), nn.AvgPool2d(3, stride=2, ceil_mode=True),
                                  nn.AdaptiveAvgPool2d(2)], ids=lambda m: repr(m))
def test_pooling_bounds(pool: nn.Module) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), pool, nn.Flatten())
    out = model(torch.zeros(1, 1, 6, 6)).shape[1]
    model.append(nn.Linear(out, 3))
    assert_bound_holds(model, (1, 6, 6))


def test_avg_pool_bound_is_its_dense_norm_when_windows_do_not_overlap() -> None:
    from lipmargin.lipschitz import operator_norm_bound

    # non-overlapping 2x2 averages: P has rows of four 1/4, norm exactly 1/2.
    assert operator_norm_bound(nn.AvgPool2d(2), (1, 4, 4)) == pytest.approx(0.5, rel=1e-8)
    assert operator_norm_bound(nn.AvgPool2d(2), (1, 4, 4)) >= 0.5
    # overlapping 3x3 windows with stride 1: dense truth from the explicit matrix.
    pool = nn.AvgPool2d(3, stride=1, padding=1)
    eye = torch.eye(25, dtype=f64).reshape(25, 1, 5, 5)
    dense = pool(eye).reshape(25, -1).T
    truth = float(torch.linalg.matrix_norm(dense, 2))
    b = operator_norm_bound(pool, (1, 5, 5))
    assert truth <= b <= truth * 1.5


@pytest.mark.parametrize("act", [nn.ELU(2.0), nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.GELU("tanh")], ids=lambda m: repr(m))
def test_smooth_activations(act: nn.Module) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 6), act, nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.mul_(3)
    assert_bound_holds(model, (2,))


def test_gelu_constant_bounds_the_true_slope() -> None:
    x = torch.linspace(-6, 6, 200001, dtype=f64, requires_grad=True)
    for approx in ("none", "tanh"):
        (g,) = torch.autograd.grad(F.gelu(x, approximate=approx).sum(), x)
        assert float(g.abs().max()) <= lipmargin.lipschitz.graph_ops.GELU_LIPSCHITZ


def test_concat_scale_and_maxmin_subclass() -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(3, 4)
            self.register_buffer("scale", torch.tensor([1.0, -2.0, 0.5, 3.0]))

        def forward(self, x):
            h = torch.cat([self.a(x) * self.scale, self.b(x) / 2.0], dim=1)
            return torch.maximum(h[:, :4], h[:, 4:])

    class MyMaxMin(nn.Module):  # a hand-written MaxMin: chunk, maximum / minimum, cat
        def forward(self, x):
            a, b = torch.chunk(x, 2, dim=1)
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    torch.manual_seed(6)
    model = nn.Sequential(Branches(), MyMaxMin(), nn.Linear(4, 3))
    assert_bound_holds(model, (3,))


def test_linear_model_bound_is_at_least_its_dense_jacobian() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    bound = model_bound(model, input_shape=(1, 5, 5))
    jac = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, 1, 5, 5))[0], torch.zeros(25, dtype=f64))
    for i in range(4):
        for j in range(4):
            if i != j:
                truth = float((jac[i] - jac[j]).norm())
                assert float(bound.pairwise[i, j]) >= truth * (1 - 1e-12)


def test_certificates_survive_an_attack_on_a_user_model() -> None:
    torch.manual_seed(8)
    model = ResNet().eval()
    x = torch.rand(64, 1, 6, 6)
    y = model(x).argmax(1)
    result = certify(model, [(x, y)], [0.0], input_shape=(1, 6, 6))
    # PGD-style attack at 0.999 of each certified radius must never flip the label.
    xa = x.clone().double().requires_grad_(True)
    m64 = model.double()
    r = result.radius.clamp(max=10.0).reshape(-1, 1, 1, 1) * 0.999
    delta = torch.zeros_like(xa, requires_grad=True)
    for _ in range(40):
        out = m64(xa.detach() + delta)
        top2 = out.topk(2, dim=1).values
        loss = (top2[:, 1] - top2[:, 0]).sum()
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += 0.2 * r * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
            n = delta.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
            delta *= torch.where(n > r, r / n.clamp_min(1e-30), torch.ones_like(n))
    flipped = m64(xa.detach() + delta).argmax(1) != y
    assert not (flipped & (result.radius > 0)).any()


def test_deel_torchlip_model_certifies_without_conversion_code() -> None:
    tl = pytest.importorskip("deel.torchlip")
    torch.manual_seed(9)
    net = tl.Sequential(
        tl.SpectralConv2d(1, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2),
        nn.Flatten(), tl.SpectralLinear(4 * 4 * 4, 3),
    )
    exported = net.vanilla_export().eval()
    x = torch.rand(32, 1, 8, 8)
    result = certify(exported, [(x, exported(x).argmax(1))], [0.0, 0.1], input_shape=(1, 8, 8))
    assert result.sound and result.num_samples == 32
    assert_bound_holds(exported, (1, 8, 8), n_points=4, ascent_steps=10)
    # 1-Lipschitz layers: the features' bound is close to 1 (the pooling's sqrt(k^2) scaling is undone).
    assert result.bound.feature <= 1.5


# ---- property test: random small graphs --------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ACTS = [nn.ReLU, lambda: nn.LeakyReLU(0.3), nn.Tanh, lambda: nn.ELU(1.5), nn.Sigmoid, nn.Identity]


class RandomGraph(nn.Module):
    """A chain of blocks drawn from a spec: plain, residual add, concat of two branches, scaled."""

    def __init__(self, spec: list[tuple[str, int, float]], width: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.spec = spec
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList()
        for kind, act, _ in spec:
            if kind == "cat":
                self.blocks.append(nn.ModuleList([nn.Linear(width, width // 2), nn.Linear(width, width - width // 2), _ACTS[act]()]))
            else:
                self.blocks.append(nn.ModuleList([nn.Linear(width, width), _ACTS[act]()]))
        self.out = nn.Linear(width, n_out)

    def forward(self, x):
        h = self.inp(x)
        for (kind, _, scale), block in zip(self.spec, self.blocks):
            if kind == "plain":
                h = block[1](block[0](h))
            elif kind == "res":
                h = h + block[1](block[0](h))
            elif kind == "scale":
                h = scale * block[1](block[0](h))
            else:
                h = block[2](torch.cat([block[0](h), block[1](h)], dim=1))
        return self.out(h)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(st.tuples(st.sampled_from(["plain", "res", "cat", "scale"]), st.integers(0, len(_ACTS) - 1),
                            st.floats(-3, 3, allow_nan=False)), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_random_graph_bounds_are_above_gradient_norms(spec: list[tuple[str, int, float]], seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomGraph(spec, 6, 3, 3)
    assert_bound_holds(model, (3,), n_points=8, ascent_steps=15, seed=seed)


# ---- the CLI for a model trained anywhere (the README's example, on the digits) -----------------


def test_cli_certifies_a_user_model_from_a_file(tmp_path, monkeypatch, capsys) -> None:
    import importlib.util
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from lipmargin.cli import main

    pytest.importorskip("sklearn")
    example = Path(__file__).resolve().parents[1] / "examples" / "residual_cll.py"
    spec = importlib.util.spec_from_file_location("residual_cll_example", example)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("LIPMARGIN_EXAMPLE_SHAPE", "1,8,8")
    torch.manual_seed(0)
    model = mod.make_model()
    mod.train(model, "digits", 5, batch=32)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    argv = ["certify", "--model", f"{example}:make_model", "--weights", str(weights), "--data", "digits", "--json"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["sound"] and payload["num_samples"] == 360
    # The same numbers as the Python API on the same weights.
    from lipmargin.data import load_dataset, to_float

    test = load_dataset("digits", None, "test")
    api = certify(model.eval(), [(to_float(test.inputs), test.labels)], [36 / 255], input_shape=(1, 8, 8))
    assert payload["clean_accuracy"] == api.clean_accuracy
    assert payload["certified_accuracy"]["36/255"] == api.certified_accuracy[36 / 255]
    # Bad input: one line, exit 2.
    assert main(["certify", "--model", f"{example}:nope", "--weights", str(weights), "--data", "digits"]) == 2
    assert "no function 'nope'" in capsys.readouterr().err
    assert main(["certify", "--model", f"{example}:make_model", "--weights", str(weights), "--data", "digits", "--input-shape", "1,9,9"]) == 2
    assert main(["certify"]) == 2


def test_pairwise_head_norms_bound_with_subnormal_and_huge_rows() -> None:
    from fractions import Fraction

    from lipmargin.lipschitz import pairwise_head_norms_bound

    for scale in (2.0**-1070, 2.0**-1000, 1.0, 2.0**1000):
        w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [3.0, 4.0, 0.0]], dtype=f64) * scale
        d = pairwise_head_norms_bound(w)
        for i in range(3):
            for j in range(3):
                exact_sq = sum((Fraction(float(w[i, k])) - Fraction(float(w[j, k]))) ** 2 for k in range(3))
                assert Fraction(float(d[i, j])) ** 2 >= exact_sq, (scale, i, j)
        assert float(d[0, 2]) == 0.0 and float(d[0, 1]) > 0  # equal rows exactly 0, different rows never 0
    # a bound that underflows to 0 in the composition still certifies nothing false
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0**-1070, 0.0], [0.0, 0.0]], dtype=f64))
    b = model_bound(nn.Sequential(lin, nn.Linear(2, 2).double()), input_shape=(2,))
    assert float(b.pairwise[0, 1]) > 0


class ClampByItself(nn.Module):
    def forward(self, x):
        return torch.clamp(x, min=3 * x)


class HardCodedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1)


def test_operations_with_a_second_dependent_argument_or_a_fixed_batch_are_refused() -> None:
    with pytest.raises(TypeError, match="first argument"):
        model_bound(nn.Sequential(nn.Linear(3, 3), ClampByItself(), nn.Linear(3, 2)), input_shape=(3,))
    model = nn.Sequential(nn.Linear(3, 3), HardCodedBatch(), nn.Linear(3, 2))  # passes the 2-sample probe
    with pytest.raises(ValueError, match="batch"):
        certify(model, [(torch.rand(4, 3), torch.zeros(4, dtype=torch.long))], [0.1], input_shape=(3,))
