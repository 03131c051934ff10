"""Power iteration, conv operators and their adjoints, sound bounds, FeatureEstimate, pairwise head norms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lipmargin.nn.activations import GroupSort, MaxMin, Normalize
from lipmargin.lipschitz import (
    FeatureEstimate,
    converge_operator_norm,
    conv2d_operator,
    layer_rule,
    linear_operator,
    operator_norm_bound,
    operator_norm_estimate,
    pairwise_head_norms,
    pairwise_head_norms_bound,
    power_iteration,
)
from lipmargin.models import LipschitzNet

f64 = torch.float64


def dense_conv(weight: torch.Tensor, in_shape: tuple[int, int, int], **conv_args: object) -> torch.Tensor:
    """The zero-padded convolution as an explicit float64 matrix, one column per input basis vector."""
    n = in_shape[0] * in_shape[1] * in_shape[2]
    basis = torch.eye(n, dtype=f64).reshape(n, *in_shape)
    out = F.conv2d(basis, weight.to(f64), None, **conv_args)  # (n, C_out, H', W')
    return out.reshape(n, -1).t()  # (out_dim, in_dim)


def top_singular_value(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.to(f64), 2))


# --------------------------------------------------------------------------------------------
# Power iteration on dense matrices
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (20, 20), (1, 6), (64, 3)])
def test_power_iteration_converges_to_matrix_norm(shape: tuple[int, int]) -> None:
    weight = torch.randn(*shape, dtype=f64)
    fwd, adj = linear_operator(weight)
    sigma, v = converge_operator_norm(fwd, adj, torch.randn(1, shape[1], dtype=f64))
    truth = top_singular_value(weight)
    assert float(sigma) == pytest.approx(truth, rel=1e-6)
    assert float(sigma) <= truth * (1 + 1e-9)
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-12)


def test_power_iteration_estimates_never_exceed_truth() -> None:
    weight = torch.randn(12, 10, dtype=f64)
    truth = top_singular_value(weight)
    fwd, adj = linear_operator(weight)
    v = torch.randn(1, 10, dtype=f64)
    previous = 0.0
    for _ in range(30):
        v = power_iteration(fwd, adj, v, 1)
        est = float(operator_norm_estimate(fwd, v))
        assert est <= truth * (1 + 1e-9)
        assert est >= previous * (1 - 1e-12)  # power iteration increases ||A v|| monotonically
        previous = est


def test_linear_adjoint_is_exact() -> None:
    weight = torch.randn(6, 4, dtype=f64)
    fwd, adj = linear_operator(weight)
    x, y = torch.randn(3, 4, dtype=f64), torch.randn(3, 6, dtype=f64)
    assert_close((fwd(x) * y).sum(), (x * adj(y)).sum(), rtol=1e-12, atol=1e-12)


def test_power_iteration_of_zero_operator_is_finite() -> None:
    # A dead (all-zero) layer has norm 0, not NaN, and its vector stays a usable unit vector.
    fwd, adj = linear_operator(torch.zeros(3, 4, dtype=f64))
    sigma, v = converge_operator_norm(fwd, adj, torch.randn(1, 4, dtype=f64))
    assert float(sigma) == 0.0
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-12)
    v = power_iteration(fwd, adj, v, 3)
    assert float(operator_norm_estimate(fwd, v)) == 0.0
    # The same through a FeatureEstimate in training mode: K is 0 and finite, and the layer recovers
    # once its weights become non-zero.
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.zero_()
    fb = FeatureEstimate([layer], (4,))
    k, _ = fb(5)
    assert float(k.detach()) == 0.0
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4))
    k, _ = fb(200)
    assert float(k.detach()) == pytest.approx(top_singular_value(layer.weight.detach()), rel=1e-4)


# --------------------------------------------------------------------------------------------
# Conv2d operators against the dense matrix
# --------------------------------------------------------------------------------------------

CONV_CASES = [
    pytest.param(dict(kernel=k, stride=s, padding=p), id=f"k{k}-s{s}-p{p}")
    for k in (3, 4) for s in (1, 2) for p in (0, 1)
] + [
    pytest.param(dict(kernel=3, stride=1, padding=2, dilation=2), id="k3-s1-p2-d2"),
    pytest.param(dict(kernel=3, stride=2, padding=1, dilation=2), id="k3-s2-p1-d2"),
    pytest.param(dict(kernel=3, stride=1, padding=1, groups=2), id="k3-s1-p1-g2"),
    pytest.param(dict(kernel=4, stride=2, padding=1, groups=2), id="k4-s2-p1-g2"),
    pytest.param(dict(kernel=3, stride=(2, 1), padding=(1, 0)), id="k3-s21-p10"),
]
# H = 5 and W = 6 in one input: for every kernel / stride / padding above, one of the two axes has
# (n + 2p - k) not a multiple of the stride (the case the research code gets wrong).
IN_SHAPES = [(2, 5, 6), (2, 7, 7)]


def _conv_case(case: dict) -> tuple[torch.Tensor, dict]:
    groups = case.get("groups", 1)
    weight = torch.randn(4, 2 // groups, case["kernel"], case["kernel"], dtype=f64)
    args = dict(stride=case["stride"], padding=case["padding"], dilation=case.get("dilation", 1), groups=groups)
    return weight, args


@pytest.mark.parametrize("in_shape", IN_SHAPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_adjoint_is_exact(case: dict, in_shape: tuple[int, int, int]) -> None:
    weight, args = _conv_case(case)
    fwd, adj = conv2d_operator(weight, in_shape, **args)
    x = torch.randn(3, *in_shape, dtype=f64)
    y = torch.randn_like(fwd(x))
    back = adj(y)
    assert back.shape == x.shape  # the output_padding restores the input shape exactly
    assert_close((fwd(x) * y).sum(), (x * back).sum(), rtol=1e-12, atol=1e-12)
    # The operator is the dense matrix, and the adjoint is its transpose.
    dense = dense_conv(weight, in_shape, **args)
    assert_close(fwd(x).reshape(3, -1), x.reshape(3, -1) @ dense.t(), rtol=1e-12, atol=1e-12)
    assert_close(back.reshape(3, -1), y.reshape(3, -1) @ dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_shape", IN_SHAPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_power_iteration_converges_to_dense_norm(case: dict, in_shape: tuple[int, int, int]) -> None:
    weight, args = _conv_case(case)
    truth = top_singular_value(dense_conv(weight, in_shape, **args))
    fwd, adj = conv2d_operator(weight, in_shape, **args)
    # Convolutions often have nearly equal top singular values (k3-s1-p1 on 2x7x7 here: a relative gap
    # of 2e-4) and the default stopping rule (change <= 1e-9) can stop well below the top one.  Run
    # to a much tighter tolerance: this tests that the operator pair is right, not the stopping rule.
    sigma, v = converge_operator_norm(fwd, adj, torch.randn(1, *in_shape, dtype=f64), tol=1e-14, max_iter=100_000)
    assert v.shape == (1, *in_shape)
    assert float(sigma) == pytest.approx(truth, rel=1e-6)
    assert float(sigma) <= truth * (1 + 1e-9)
    # A few steps from a random start are an estimate: never above the truth.
    v0 = power_iteration(fwd, adj, torch.randn(1, *in_shape, dtype=f64), 3)
    assert float(operator_norm_estimate(fwd, v0)) <= truth * (1 + 1e-9)


def test_conv_operator_rejects_empty_output() -> None:
    with pytest.raises(ValueError, match="empty output"):
        conv2d_operator(torch.randn(2, 2, 5, 5), (2, 3, 3))


# --------------------------------------------------------------------------------------------
# Sound bounds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape", IN_SHAPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_sound_bound_is_above_truth(case: dict, in_shape: tuple[int, int, int]) -> None:
    weight, args = _conv_case(case)
    layer = nn.Conv2d(2, 4, case["kernel"], bias=True, **args)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
    truth = top_singular_value(dense_conv(layer.weight.detach(), in_shape, **args))
    bound = operator_norm_bound(layer, in_shape)
    assert bound >= truth * (1 + 1e-12)  # strictly above: the bound carries a rounding margin


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (64, 64), (1, 3)])
def test_linear_sound_bound_is_above_truth(shape: tuple[int, int]) -> None:
    layer = nn.Linear(shape[1], shape[0])
    truth = top_singular_value(layer.weight.detach())
    bound = operator_norm_bound(layer, (shape[1],))
    assert bound >= truth
    assert bound <= truth * (1 + 1e-6)  # a dense matrix has an essentially exact bound


def test_constant_layers_have_their_constant() -> None:
    assert operator_norm_bound(MaxMin(), (4, 3, 3)) == 1.0
    assert operator_norm_bound(GroupSort(4), (8,)) == 1.0
    assert operator_norm_bound(nn.Flatten(), (4, 3, 3)) == 1.0
    assert operator_norm_bound(nn.ReLU(), (4,)) == 1.0
    norm = Normalize([0.5, 0.4, 0.3], [0.25, 0.2, 0.5])
    assert operator_norm_bound(norm, (3, 4, 4)) >= 1 / float(torch.tensor(0.2))
    assert operator_norm_bound(norm, (3, 4, 4)) == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("module", [nn.Softmax(dim=1), nn.PReLU(), nn.Upsample(scale_factor=2)], ids=lambda m: type(m).__name__)
def test_operator_norm_bound_unknown_layer(module: nn.Module) -> None:
    with pytest.raises(TypeError, match=type(module).__name__):
        operator_norm_bound(module, (4, 4, 4))


# --------------------------------------------------------------------------------------------
# FeatureEstimate
# --------------------------------------------------------------------------------------------


def _make_feature_estimate(dtype: torch.dtype = torch.float32) -> tuple[list[nn.Module], FeatureEstimate, list[float]]:
    """Conv(k3 s2 p1) -> MaxMin -> Conv(k3) -> MaxMin -> Flatten -> Linear on (2, 7, 8), with dense truths."""
    in_shape = (2, 7, 8)
    conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)  # (4, 4, 4): (7 + 2 - 3) / 2 + 1 = 4
    conv2 = nn.Conv2d(4, 6, 3, stride=1, padding=0)  # (6, 2, 2)
    linear = nn.Linear(24, 8)
    layers = [conv1, MaxMin(), conv2, MaxMin(), nn.Flatten(), linear]
    for m in layers:
        m.to(dtype)
    truths = [
        top_singular_value(dense_conv(conv1.weight.detach(), in_shape, stride=2, padding=1)),
        1.0,
        top_singular_value(dense_conv(conv2.weight.detach(), (4, 4, 4))),
        1.0,
        1.0,
        top_singular_value(linear.weight.detach()),
    ]
    return layers, FeatureEstimate(layers, in_shape), truths


def test_feature_estimate_buffers_shaped_like_layer_inputs() -> None:
    layers, fb, _ = _make_feature_estimate()
    buffers = dict(fb.named_buffers())
    assert {k: tuple(v.shape) for k, v in buffers.items()} == {"v0": (1, 2, 7, 8), "v2": (1, 4, 4, 4), "v5": (1, 24)}
    assert fb.input_shapes == [(2, 7, 8), (4, 4, 4), (4, 4, 4), (6, 2, 2), (6, 2, 2), (24,)]
    # The layers are referenced, not registered: no parameters are duplicated.
    assert list(fb.parameters()) == []
    assert set(fb.state_dict()) == {"v0", "v2", "v5"}


def test_feature_estimate_updates_buffers_only_in_training() -> None:
    _, fb, _ = _make_feature_estimate()
    before = {k: v.clone() for k, v in fb.named_buffers()}
    fb.eval()
    fb(5)
    for k, v in fb.named_buffers():
        assert torch.equal(v, before[k]), f"buffer {k} moved in eval mode"
    fb.train()
    fb(0)
    for k, v in fb.named_buffers():
        assert torch.equal(v, before[k]), f"buffer {k} moved with n_iter=0"
    fb(5)
    for k, v in fb.named_buffers():
        assert not torch.equal(v, before[k]), f"buffer {k} did not move in training mode"
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-5)


def test_feature_estimate_sigma_has_gradient_to_weights_not_buffers() -> None:
    layers, fb, _ = _make_feature_estimate()
    fb.train()
    k, sigmas = fb(3)
    assert sigmas.shape == (6,)
    # K of a chain is the product of the per-layer estimates, each ||A v|| / ||v|| recomputed here
    # from the advanced buffers with torch's own conv / matmul (MaxMin and Flatten count 1).
    w0, w2, w5 = (layers[i].weight.detach() for i in (0, 2, 5))
    v0, v2, v5 = fb.v0, fb.v2, fb.v5
    by_hand = (
        F.conv2d(v0, w0, None, 2, 1).norm() / v0.norm()
        * (F.conv2d(v2, w2).norm() / v2.norm())
        * ((v5 @ w5.T).norm() / v5.norm())
    )
    assert_close(k.detach(), by_hand)
    assert_close(sigmas[[1, 3, 4]], torch.ones(3))
    assert k.requires_grad
    for name, buf in fb.named_buffers():
        assert not buf.requires_grad, name
    k.backward()
    for i in (0, 2, 5):
        grad = layers[i].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert layers[i].bias.grad is None  # the bias does not enter the Lipschitz constant
    for name, buf in fb.named_buffers():
        assert buf.grad is None, name
    # The sigma for one layer is d||A v||/dW with v fixed: the gradient matches that formula.
    conv = layers[0]
    conv.weight.grad = None
    v = fb.v0.detach()
    _, sigmas = fb(0)
    sigmas[0].backward()
    w = conv.weight.detach().clone().requires_grad_(True)
    ref = F.conv2d(v, w, None, 2, 1).norm() / v.norm()
    (g_ref,) = torch.autograd.grad(ref, w)
    assert_close(conv.weight.grad, g_ref)


def test_feature_estimate_converge_matches_dense_truths() -> None:
    layers, fb, truths = _make_feature_estimate(f64)
    per_layer = fb.converge(tol=1e-14, max_iter=100_000)
    assert per_layer.dtype == f64
    assert_close(per_layer, torch.tensor(truths, dtype=f64), rtol=1e-6, atol=0)
    assert (per_layer <= torch.tensor(truths, dtype=f64) * (1 + 1e-9)).all()
    # After converging, a forward pass (no further steps) reads the same values off the buffers.
    fb.eval()
    _, sigmas = fb(0)
    assert_close(sigmas.detach(), torch.tensor(truths, dtype=f64), rtol=1e-6, atol=0)
    # The sound per-layer values are above the truths.
    sound = fb.sound()
    assert (sound >= torch.tensor(truths, dtype=f64)).all()


def test_feature_estimate_converge_in_float32_model() -> None:
    # A float32 model is converged in float64 (the vectors are written back in float32).
    layers, fb, truths = _make_feature_estimate(torch.float32)
    per_layer = fb.converge(tol=1e-14, max_iter=100_000)
    assert_close(per_layer, torch.tensor(truths, dtype=f64), rtol=1e-5, atol=0)
    assert fb.v0.dtype == torch.float32


def test_feature_estimate_estimates_below_truth_after_few_steps() -> None:
    _, fb, truths = _make_feature_estimate(f64)
    fb.train()
    for _ in range(4):
        _, sigmas = fb(1)
        assert (sigmas.detach() <= torch.tensor(truths, dtype=f64) * (1 + 1e-9)).all()


def test_feature_estimate_of_a_diagonal_network_is_its_closed_form() -> None:
    # Linear(diag(3, 1/2)) -> ReLU -> Linear(diag(1/4, 2)) -> ReLU -> Linear([[1, 1]]) on R^2: the
    # per-layer norms are 3, 2 and sqrt(2) by hand, so the chain's estimate converges to
    # 3 * 2 * sqrt(2).  The network itself is x -> 3/4 relu(x1) + relu(x2), whose Lipschitz
    # constant ||(3/4, 1)|| = 5/4 the product (an upper estimate for a chain) must not undercut.
    first, second, head = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.diag(torch.tensor([3.0, 0.5], dtype=f64)).float())
        second.weight.copy_(torch.diag(torch.tensor([0.25, 2.0], dtype=f64)).float())
        head.weight.copy_(torch.tensor([[1.0, 1.0]]))
    layers = [first, nn.ReLU(), second, nn.ReLU(), head]
    for m in layers:
        m.to(f64)
    estimate = FeatureEstimate(layers, (2,))
    k, sigmas = estimate(200)
    assert_close(sigmas.detach(), torch.tensor([3.0, 1.0, 2.0, 1.0, 2.0**0.5], dtype=f64))
    assert_close(k.detach(), torch.tensor(3.0 * 2.0 * 2.0**0.5, dtype=f64))
    assert float(k.detach()) >= 1.25
    # The sound composition sits above the closed form.
    assert estimate.compose(estimate.sound()) >= 3.0 * 2.0 * 2.0**0.5


@pytest.mark.parametrize("bad", [nn.Softmax(dim=1), nn.PReLU(), nn.Upsample(scale_factor=1)], ids=lambda m: type(m).__name__)
def test_feature_estimate_unsupported_module_raises(bad: nn.Module) -> None:
    layers = [nn.Conv2d(2, 4, 3, padding=1), bad, nn.Flatten()]
    with pytest.raises(TypeError, match=type(bad).__name__):
        FeatureEstimate(layers, (2, 6, 6))
    # Also from a whole model, with the unknown layer nested inside a Sequential.
    features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Sequential(bad, MaxMin()), nn.Flatten())
    with pytest.raises(TypeError, match=type(bad).__name__):
        LipschitzNet(features, nn.Linear(4 * 36, 3), (2, 6, 6))


def test_conv_with_unsupported_padding_mode_raises() -> None:
    conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")
    with pytest.raises(TypeError, match="padding_mode"):
        FeatureEstimate([conv], (2, 6, 6))(0)
    with pytest.raises(TypeError, match="padding_mode"):
        operator_norm_bound(conv, (2, 6, 6))


# --------------------------------------------------------------------------------------------
# Pairwise head norms
# --------------------------------------------------------------------------------------------


def test_pairwise_head_norms_equal_explicit_norms() -> None:
    weight = torch.randn(6, 9, dtype=f64)
    d = pairwise_head_norms(weight)
    assert d.shape == (6, 6)
    expected = torch.tensor([[float((weight[i] - weight[j]).norm()) for j in range(6)] for i in range(6)], dtype=f64)
    assert_close(d, expected, rtol=1e-14, atol=0)
    assert torch.equal(d, d.t())
    assert torch.equal(torch.diagonal(d), torch.zeros(6, dtype=f64))
    bound = pairwise_head_norms_bound(weight.float())
    assert bound.dtype == f64
    assert (bound >= pairwise_head_norms(weight.float().double())).all()


def test_pairwise_head_norms_gradient_is_finite() -> None:
    weight = torch.randn(5, 4, dtype=f64, requires_grad=True)
    d = pairwise_head_norms(weight)
    (grad,) = torch.autograd.grad(d.sum(), weight)
    assert torch.isfinite(grad).all()
    # Against an explicit off-diagonal sum (the diagonal contributes nothing).
    w = weight.detach().clone().requires_grad_(True)
    ref = sum((w[i] - w[j]).norm() for i in range(5) for j in range(5) if i != j)
    (g_ref,) = torch.autograd.grad(ref, w)
    assert_close(grad, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(pairwise_head_norms, (weight,))


@pytest.mark.parametrize("conv_args", [dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(stride=3)])
def test_conv1d_operator_is_the_conv_and_converges_to_its_dense_norm(conv_args: dict) -> None:
    g = torch.Generator().manual_seed(4)
    layer = nn.Conv1d(3, 4, 3, **conv_args).to(f64)
    fwd, adj = layer_rule(layer).operator(layer, (3, 11))
    # The conv applied to every basis vector, written out here with torch's own conv1d.
    basis = torch.eye(33, dtype=f64).reshape(33, 3, 11)
    with torch.no_grad():
        dense = F.conv1d(basis, layer.weight, None, layer.stride, layer.padding, layer.dilation).reshape(33, -1).t()
        x = torch.randn(1, 3, 11, generator=g, dtype=f64)
        assert_close(fwd(x).flatten(), dense @ x.flatten())
        y = torch.randn(fwd(x).shape, generator=g, dtype=f64)
        assert_close((fwd(x) * y).sum(), (x * adj(y)).sum())  # <A x, y> = <x, A^T y>
        sigma, _ = converge_operator_norm(fwd, adj, x, tol=1e-14)
    truth = top_singular_value(dense)
    assert float(sigma) <= truth * (1 + 1e-12)
    assert float(sigma) == pytest.approx(truth, rel=1e-8)
    assert operator_norm_bound(layer, (3, 11)) >= truth


@pytest.mark.parametrize("package", ["lipmargin", "lipmargin.lipschitz", "lipmargin.lipschitz.estimate"])
def test_the_old_name_feature_bound_fails_naming_feature_estimate(package: str) -> None:
    import importlib

    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="FeatureBound was renamed FeatureEstimate"):
        getattr(module, "FeatureBound")
    assert getattr(module, "FeatureEstimate") is FeatureEstimate
