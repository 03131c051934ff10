"""1-Lipschitz layer families and backbones: every sound bound holds against the dense truth.

For each layer: the sound bound (``operator_norm_bound``) is >= the spectral norm of its Jacobian at
random points and >= the ratio ``||f(x) - f(x')|| / ||x - x'||`` after gradient ascent on the pair;
for the linear ones (AOL, SOC) it is >= the largest singular value of the layer written out as a
dense matrix.  AOL, CPL and SLL stay within ``1 + 1e-5`` at initialisation and after Adam steps;
SOC's computed bound is within a few per cent of its truncated series.  Every registered backbone
obeys its model-level sound bound, trains without NaN and runs ``feature_lipschitz`` in train mode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lipmargin.lipschitz import dense_conv_matrix
from lipmargin.certify import model_bound
from lipmargin.lipschitz import operator_norm_bound
from lipmargin.models import BACKBONES, LipschitzNet, create_model, list_models, lipconvnet
from lipmargin.nn import (
    AOLConv2d,
    AOLLinear,
    ChannelPad,
    CPLConv2d,
    CPLLinear,
    HouseHolder,
    InvertibleDownsample,
    ScaledAvgPool2d,
    SLLConv2d,
    SLLLinear,
    SOCConv2d,
    ZeroPadding,
    aol_conv_scale,
    exp_series_tail_bound,
    skew_kernel,
    soc_bound_from_norm,
)

f64 = torch.float64

#: Relative slack for *measured* ratios and Jacobian norms: float64 rounding in the forward pass and
#: in the norm computations makes an isometry measure 1 + 4e-16; bounds themselves carry no slack.
MEASURED = 1 + 1e-12

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _frozen64(layer: nn.Module) -> nn.Module:
    """A float64 eval-mode copy whose parameters need no gradients."""
    m = copy.deepcopy(layer).to(f64).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _jacobian_norm(layer: nn.Module, shape: tuple[int, ...], n_points: int, seed: int) -> float:
    """Largest spectral norm of the Jacobian of ``layer`` (float64) over random points."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(n_points):
        x = torch.randn(1, *shape, generator=g, dtype=f64)
        jac = torch.autograd.functional.jacobian(lambda z: layer(z.view(1, *shape)).flatten(), x.flatten())
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


def _dense_map(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The Jacobian at 0 of a float64 layer without bias, i.e. its matrix, found by autograd
    through the forward pass (independent of the weight transforms the bounds read)."""
    zero = torch.zeros(math.prod(shape), dtype=f64)
    return torch.autograd.functional.jacobian(lambda z: layer(z.view(1, *shape)).flatten(), zero)


def _ascent_ratio(layer: nn.Module, shape: tuple[int, ...], seed: int, steps: int = 12, n: int = 4) -> float:
    """Largest ``||f(x) - f(x')|| / ||x - x'||`` seen while Adam maximises it over both points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=f64).requires_grad_(True)
    x2 = (x.detach() + 0.1 * torch.randn(x.shape, generator=g, dtype=f64)).requires_grad_(True)
    opt = torch.optim.Adam([x, x2], lr=0.05)
    best = 0.0
    for _ in range(steps):
        ratio = (layer(x) - layer(x2)).flatten(1).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
        best = max(best, float(ratio.max().detach()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def _adam_steps(layer: nn.Module, shape: tuple[int, ...], steps: int = 5, lr: float = 1e-2) -> nn.Module:
    """A few Adam steps (training mode) on a random regression target; returns the layer."""
    g = torch.Generator().manual_seed(11)
    layer.train()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    dtype = next(layer.parameters()).dtype
    x = torch.randn(8, *shape, generator=g, dtype=dtype)
    target = torch.randn(layer(x).shape, generator=g, dtype=dtype)
    for _ in range(steps):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.eval()


# (name, factory, input shape): every layer of the 1-Lipschitz families of lipmargin.nn on a tiny input.
LAYER_CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("aol-linear", lambda: AOLLinear(6, 4), (6,)),
    ("aol-linear-wide", lambda: AOLLinear(3, 7), (3,)),
    ("aol-conv3", lambda: AOLConv2d(3, 4, 3), (3, 5, 5)),
    ("aol-conv1", lambda: AOLConv2d(4, 2, 1), (4, 3, 3)),
    ("cpl-linear", lambda: CPLLinear(6, 4), (6,)),
    ("cpl-conv", lambda: CPLConv2d(3, 4, (5, 4)), (3, 5, 4)),
    ("sll-linear", lambda: SLLLinear(6, 4), (6,)),
    ("sll-conv", lambda: SLLConv2d(3, 4), (3, 5, 4)),
    ("soc-conv3", lambda: SOCConv2d(3, 4, 3), (3, 5, 5)),
    ("soc-conv1-shrink", lambda: SOCConv2d(6, 2, 1), (6, 2, 2)),
    ("householder", lambda: HouseHolder(4), (4, 2, 3)),
    ("householder-dense", lambda: HouseHolder(6), (6,)),
    ("invertible-downsample", lambda: InvertibleDownsample(2), (2, 4, 4)),
    ("channel-pad", lambda: ChannelPad(5), (3, 2, 2)),
    ("zero-padding", lambda: ZeroPadding(1, 2, 0, 1), (2, 3, 3)),
    ("avg-pool", lambda: ScaledAvgPool2d(2), (2, 4, 4)),
    ("avg-pool-overlap", lambda: ScaledAvgPool2d(3, 1), (1, 5, 5)),
]
ONE_LIPSCHITZ = {
    "aol-linear", "aol-linear-wide", "aol-conv3", "aol-conv1", "cpl-linear", "cpl-conv", "sll-linear", "sll-conv",
}


def _make(case: str) -> tuple[nn.Module, tuple[int, ...]]:
    for name, factory, shape in LAYER_CASES:
        if name == case:
            torch.manual_seed(3)
            return factory(), shape
    raise KeyError(case)


def _randomise(layer: nn.Module) -> None:
    """Move every parameter away from its (often structured) initialisation."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p) * (p.abs().mean() + 0.1))


# --------------------------------------------------------------------------------------------
# Every layer: bound >= Jacobian and >= optimised pair ratio (at init and after training)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("case", [c[0] for c in LAYER_CASES])
def test_bound_is_above_jacobian_and_pair_ratios(case: str, trained: bool) -> None:
    layer, shape = _make(case)
    if trained and any(p.requires_grad for p in layer.parameters()):
        _randomise(layer)
        _adam_steps(layer, shape)
    layer.eval()
    bound = operator_norm_bound(layer, shape)
    m64 = _frozen64(layer)
    jac = _jacobian_norm(m64, shape, n_points=4, seed=5)
    ratio = _ascent_ratio(m64, shape, seed=6)
    assert jac > 0 and ratio > 0
    assert jac <= bound * MEASURED, (jac, bound)
    assert ratio <= bound * MEASURED, (ratio, bound)
    if case in ONE_LIPSCHITZ:
        assert bound <= 1 + 1e-5, bound


def test_every_layer_class_is_covered() -> None:
    import lipmargin.nn
    from lipmargin.nn import activations  # MaxMin, GroupSort, Normalize: tests/test_lipschitz.py

    public = {getattr(lipmargin.nn, n) for n in lipmargin.nn.__all__}
    classes = {c for c in public if isinstance(c, type)} - {getattr(activations, n) for n in activations.__all__}
    covered = {type(_make(name)[0]) for name, _, _ in LAYER_CASES}
    assert classes == covered


# --------------------------------------------------------------------------------------------
# AOL, CPL, SLL: within 1 + 1e-5 at initialisation and after training
# --------------------------------------------------------------------------------------------

ONE_LIP_FACTORIES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("aol-linear", lambda: AOLLinear(20, 12), (20,)),
    ("aol-conv", lambda: AOLConv2d(6, 8, 3), (6, 7, 7)),
    ("cpl-linear", lambda: CPLLinear(20, 12), (20,)),
    ("cpl-conv", lambda: CPLConv2d(6, 5, (9, 9)), (6, 9, 9)),
    ("sll-linear", lambda: SLLLinear(20, 12), (20,)),
    ("sll-conv", lambda: SLLConv2d(6, 5), (6, 9, 9)),
]


@pytest.mark.parametrize("name, factory, shape", ONE_LIP_FACTORIES, ids=[c[0] for c in ONE_LIP_FACTORIES])
def test_one_lipschitz_families_stay_within_one(
    name: str, factory: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(4)
    layer = factory().eval()
    bounds = [operator_norm_bound(layer, shape)]
    _randomise(layer)
    for lr in (1e-3, 3e-2):  # small and large steps
        _adam_steps(layer, shape, steps=6, lr=lr)
        bounds.append(operator_norm_bound(layer, shape))
    assert max(bounds) <= 1 + 1e-5, bounds
    # and the trained layer is really not above its bound
    m64 = _frozen64(layer)
    assert _jacobian_norm(m64, shape, 3, seed=8) <= bounds[-1] * MEASURED


# --------------------------------------------------------------------------------------------
# Linear layers against their dense matrices
# --------------------------------------------------------------------------------------------


def test_aol_linear_dense_truth() -> None:
    layer = AOLLinear(9, 5, bias=False).double()
    _randomise(layer)
    w = layer.effective_weight().detach()
    x = torch.randn(3, 9, dtype=f64)
    assert_close(layer(x), x @ w.t())
    truth = float(torch.linalg.matrix_norm(_dense_map(layer, (9,)), 2))
    bound = operator_norm_bound(layer, (9,))
    assert truth <= bound <= truth * (1 + 1e-8)
    assert truth <= 1 + 1e-12
    # AOL rescaling: column i scaled by (sum_j |W^T W|_ij)^(-1/2)
    raw = layer.weight.detach()
    expected = raw / (raw.t() @ raw).abs().sum(1).sqrt()[None, :]
    assert_close(w, expected)


@pytest.mark.parametrize("c_in, c_out, k, size", [(3, 4, 3, 5), (4, 4, 3, 4), (5, 3, 1, 3), (2, 3, 5, 6)])
def test_aol_conv_dense_truth(c_in: int, c_out: int, k: int, size: int) -> None:
    layer = AOLConv2d(c_in, c_out, k, bias=False).double()
    _randomise(layer)
    shape = (c_in, size, size)
    kernel = layer.effective_weight().detach()
    mat = dense_conv_matrix(kernel, shape, padding=k // 2)
    x = torch.randn(2, *shape, dtype=f64)
    assert_close(layer(x).flatten(1), x.flatten(1) @ mat.t())
    truth = float(torch.linalg.matrix_norm(_dense_map(layer, shape), 2))
    bound = operator_norm_bound(layer, shape)
    assert truth <= bound <= truth * (1 + 1e-6)
    assert truth <= 1 + 1e-12  # the AOL theorem, also with zero padding
    # the Gram of the conv is the convolution of the kernel with itself: check the scale against P^T P
    raw = layer.weight.detach()
    p = dense_conv_matrix(raw, (c_in, 2 * k + 1, 2 * k + 1), padding=k)  # interior pixels see every shift
    gram = (p.t() @ p).abs().sum(1).view(c_in, 2 * k + 1, 2 * k + 1)[:, k, k]  # centre pixel of each channel
    assert_close(aol_conv_scale(raw), gram.rsqrt())


def _soc_dense(layer: SOCConv2d, shape: tuple[int, ...], terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The skew matrix A and the layer's full linear map (pad channels, truncated series, slice)."""
    c_in, h, w = shape
    kernel = layer.skew_operator_kernel(size=(h, w)).detach()  # the eval-mode kernel
    a = dense_conv_matrix(kernel, (layer.channels, h, w), padding=layer.padding)
    series = torch.eye(a.shape[0], dtype=f64)
    term = series.clone()
    for i in range(1, terms + 1):
        term = term @ a / i
        series = series + term
    n = h * w
    full = series[: layer.out_channels * n, : c_in * n]  # zero-padded input channels / kept outputs
    return a, full


@pytest.mark.parametrize(
    "c_in, c_out, k, size", [(3, 3, 3, 5), (2, 4, 3, 4), (6, 2, 1, 3), (4, 4, 5, 5)], ids=str
)
def test_soc_matches_dense_truncated_series(c_in: int, c_out: int, k: int, size: int) -> None:
    torch.manual_seed(1)
    layer = SOCConv2d(c_in, c_out, k, bias=False).double()
    _adam_steps(layer, (c_in, size, size), steps=3)
    shape = (c_in, size, size)
    a, full = _soc_dense(layer, shape, layer.eval_terms)
    assert torch.equal(a, -a.t())  # exactly skew-symmetric
    x = torch.randn(2, *shape, dtype=f64)
    assert_close(layer(x).flatten(1), x.flatten(1) @ full.t())
    bound = operator_norm_bound(layer, shape)
    # soundness against the layer's own function (autograd through the forward pass) ...
    layer_map = _dense_map(layer.eval(), shape)
    assert_close(layer_map, full)
    assert float(torch.linalg.matrix_norm(layer_map, 2)) <= bound
    # ... and tightness against the square series the bound describes (channels zero-padded)
    square = _soc_dense(layer, (layer.channels, size, size), layer.eval_terms)[1]
    truth = float(torch.linalg.matrix_norm(square, 2))
    assert truth <= bound <= truth * 1.03


def test_soc_bound_is_computed_not_assumed() -> None:
    # A large A and a short series: the truncation is far from orthogonal and the bound says so.
    torch.manual_seed(2)
    layer = SOCConv2d(3, 3, 3, bias=False, correction=2.5, eval_terms=3, eval_max_norm=10.0).double().eval()
    shape = (3, 4, 4)
    truth = float(torch.linalg.matrix_norm(_dense_map(layer, shape), 2))
    bound = operator_norm_bound(layer, shape)
    assert truth > 1.05
    assert truth <= bound


def test_soc_eval_mode_caps_the_norm_of_a() -> None:
    torch.manual_seed(3)
    layer = SOCConv2d(16, 16, 1, bias=False, init_iters=200).double().eval()
    # converged estimate (a 1x1 kernel's estimate is exact): the cap leaves the kernel alone
    assert torch.equal(layer.skew_operator_kernel(size=(2, 2)), layer.skew_operator_kernel())
    # a stale estimate (vector along the smallest singular direction) inflates the train-mode A ...
    with torch.no_grad():
        mat = skew_kernel(layer.weight).reshape(16, 16)
        layer.v0.copy_(torch.linalg.svd(mat)[2][-1])
    shape = (16, 2, 2)
    train_kernel = layer.skew_operator_kernel()
    a_train = float(torch.linalg.matrix_norm(dense_conv_matrix(train_kernel.detach(), shape), 2))
    assert a_train > 10
    # ... while eval mode caps it at eval_max_norm, and the bound stays near 1
    eval_kernel = layer.skew_operator_kernel(size=(2, 2)).detach()
    a_eval = float(torch.linalg.matrix_norm(dense_conv_matrix(eval_kernel, shape), 2))
    assert a_eval <= layer.eval_max_norm * (1 + 1e-9)
    bound = operator_norm_bound(layer, shape)
    assert bound <= 1 + 1e-5
    assert _jacobian_norm(_frozen64(layer), shape, 2, seed=4) <= bound * MEASURED


def test_soc_bound_from_norm_values() -> None:
    assert soc_bound_from_norm(0.0, 6) == pytest.approx(1.0, abs=1e-8)
    # a = 1, 6 terms: tail = e - sum_{k <= 6} 1/k! = 2.26e-4 (bound within 20 % of it)
    tail = math.e - sum(1 / math.factorial(k) for k in range(7))
    b = soc_bound_from_norm(1.0, 6)
    assert 1 + tail <= b <= 1 + 1.2 * tail
    # no useful geometric tail: falls back to exp(a)
    assert soc_bound_from_norm(10.0, 3) == pytest.approx(math.exp(10.0), rel=1e-8)


@pytest.mark.parametrize("a", [0.01, 0.3, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("terms", [0, 1, 6, 12])
def test_exp_series_tail_bound_is_an_upper_bound(a: float, terms: int) -> None:
    exact = Fraction(0)
    fa = Fraction(a)
    for k in range(terms + 1, terms + 120):  # the rest is far below float64 resolution
        exact += fa**k / math.factorial(k)
    bound = exp_series_tail_bound(a, terms)
    assert math.isinf(bound) or Fraction(bound) >= exact
    if a < terms + 2:  # the geometric series converges: a finite bound
        assert math.isfinite(bound)
    if a < (terms + 2) / 2:  # geometric ratio <= 1/2: the bound is within a factor 2
        assert bound <= 2 * float(exact)


def test_exp_series_tail_bound_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="a >= 0"):
        exp_series_tail_bound(-1.0, 3)
    assert exp_series_tail_bound(0.0, 3) == 0.0
    assert math.isinf(exp_series_tail_bound(8.0, 3))


# --------------------------------------------------------------------------------------------
# CPL: the step size and the eval-mode clamp
# --------------------------------------------------------------------------------------------


def test_cpl_bound_uses_the_step_actually_taken() -> None:
    torch.manual_seed(5)
    layer = CPLLinear(10, 6, safety=1.0, power_iters=0, init_iters=0).double()
    # a power-iteration vector in the null space of the top singular direction: sigma is far low
    with torch.no_grad():
        _, _, vh = torch.linalg.svd(layer.weight)
        layer.u.copy_(vh[-1])
    norm = float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
    layer.train()
    assert float(layer.sigma_estimate().detach()) < 0.9 * norm
    train_jac = _jacobian_norm(_frozen64(layer).train(), (10,), 6, seed=1)
    assert train_jac > 1.05  # the paper's training-mode step overshoots with a bad estimate
    # eval mode clamps the step with a sound norm bound: provably 1-Lipschitz again
    layer.eval()
    assert operator_norm_bound(layer, (10,)) <= 1 + 1e-8
    assert _jacobian_norm(_frozen64(layer), (10,), 6, seed=1) <= 1 + 1e-8
    # a stale cache can only loosen the bound, never break it
    key = layer._bound_cache[0]
    layer._bound_cache = (key, 0.5 * norm)
    bound = operator_norm_bound(layer, (10,))
    assert bound > 1.5
    frozen = copy.deepcopy(layer).eval()  # the copy recomputes its cache: re-plant the stale value
    frozen._bound_cache = ((frozen.weight.data_ptr(), frozen.weight._version, frozen.weight.dtype,
                            str(frozen.weight.device), tuple(frozen.weight.shape)), 0.5 * norm)
    with torch.no_grad():
        jac = _jacobian_norm(frozen, (10,), 6, seed=2)
    assert 1.05 < jac <= bound * MEASURED


def test_cpl_training_forward_advances_power_iteration() -> None:
    torch.manual_seed(6)
    layer = CPLConv2d(3, 4, (6, 6), init_iters=0)
    before = layer.u.clone()
    layer.eval()
    layer(torch.randn(2, 3, 6, 6))
    assert torch.equal(layer.u, before)  # eval mode never changes state
    layer.train()
    layer(torch.randn(2, 3, 6, 6))
    assert not torch.equal(layer.u, before)
    with pytest.raises(ValueError, match="built for"):
        layer(torch.randn(2, 3, 5, 6))


def test_cpl_step_is_unclamped_when_the_estimate_is_good() -> None:
    torch.manual_seed(7)
    layer = CPLLinear(8, 5, init_iters=500).double()
    layer.eval()
    h_eval = float(layer.step_size().detach())
    layer.train()
    h_train = float(layer.step_size().detach())
    assert h_eval == pytest.approx(h_train, rel=1e-12)


# --------------------------------------------------------------------------------------------
# SLL, HouseHolder, reshaping and pooling
# --------------------------------------------------------------------------------------------


def test_sll_t_dominates_the_gram() -> None:
    torch.manual_seed(8)
    layer = SLLLinear(7, 5).double()
    with torch.no_grad():
        layer.q.normal_()
    w = layer.weight.detach()
    t_inv = layer.inverse_t().detach()
    gap = torch.diag(1 / t_inv) - w @ w.t()  # T - W W^T is positive semi-definite
    assert float(torch.linalg.eigvalsh(gap).min()) >= -1e-12


def test_householder_at_init_sorts_pairs_and_is_orthogonal_piecewise() -> None:
    act = HouseHolder(4).double()
    x = torch.randn(5, 4, 3, 3, dtype=f64)
    a, b = x.chunk(2, dim=1)
    assert_close(act(x), torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1))
    with torch.no_grad():
        act.theta.normal_()
    for seed in range(3):
        z = torch.randn(1, 4, dtype=f64, generator=torch.Generator().manual_seed(seed))
        jac = torch.autograd.functional.jacobian(lambda v: act(v.view(1, 4, 1, 1)).flatten(), z.flatten())
        assert_close(jac.t() @ jac, torch.eye(4, dtype=f64))
    with pytest.raises(ValueError, match="even"):
        HouseHolder(3)


@pytest.mark.parametrize("layer, shape", [
    (InvertibleDownsample(2), (3, 4, 6)), (ChannelPad(6), (2, 3, 3)), (ZeroPadding(2, 0, 1, 3), (2, 3, 3)),
])
def test_reshaping_layers_are_isometries(layer: nn.Module, shape: tuple[int, ...]) -> None:
    x, x2 = torch.randn(4, *shape, dtype=f64), torch.randn(4, *shape, dtype=f64)
    assert_close((layer(x) - layer(x2)).flatten(1).norm(dim=1), (x - x2).flatten(1).norm(dim=1))
    assert operator_norm_bound(layer, shape) == 1.0


@pytest.mark.parametrize(
    "kernel, stride, size, exact", [(2, None, 4, True), (4, None, 9, False), (3, 1, 5, False), (2, 1, 4, False)]
)
def test_scaled_avg_pool_constant(kernel: int, stride: int | None, size: int, exact: bool) -> None:
    pool = ScaledAvgPool2d(kernel, stride)
    shape = (1, size, size)
    zero = torch.zeros(size * size, dtype=f64)
    mat = torch.autograd.functional.jacobian(lambda z: pool(z.view(1, *shape)).flatten(), zero)
    truth = float(torch.linalg.matrix_norm(mat, 2))
    const = operator_norm_bound(pool, shape)
    assert truth <= const * MEASURED
    if exact:
        assert truth == pytest.approx(const, rel=1e-12)
    assert ScaledAvgPool2d(4).lipschitz_constant() == 1.0
    assert ScaledAvgPool2d(3, 2).lipschitz_constant() == 2.0
    assert ScaledAvgPool2d(3, 1).lipschitz_constant() == 3.0


def test_layers_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="odd"):
        SOCConv2d(3, 3, 2)
    with pytest.raises(ValueError, match="odd"):
        AOLConv2d(3, 3, 4)
    with pytest.raises(ValueError, match="safety"):
        CPLLinear(3, 2, safety=0.5)
    with pytest.raises(ValueError, match="divisible"):
        InvertibleDownsample(2)(torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="pads to"):
        ChannelPad(2)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="input channels"):
        SOCConv2d(3, 3)(torch.zeros(1, 2, 4, 4))


def test_skew_kernel_is_the_conv_minus_its_adjoint() -> None:
    k = torch.randn(3, 3, 3, 3, dtype=f64)
    conv = dense_conv_matrix(k, (3, 4, 4), padding=1)
    assert_close(dense_conv_matrix(skew_kernel(k), (3, 4, 4), padding=1), conv - conv.t())


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------

NUM_CLASSES = 5

#: (model, input shape, options): narrow versions of every registered backbone.
MODEL_CASES: list[tuple[str, tuple[int, ...], dict]] = [
    ("lipconvnet-5", (1, 16, 16), {"width": 4}),
    ("lipconvnet-5", (3, 32, 32), {"width": 2, "activation": "householder"}),
    ("lipconvnet-10", (1, 8, 8), {"width": 2}),
    ("lipconvnet-20", (1, 8, 8), {"width": 2}),
    ("cpl-s", (1, 8, 8), {"width": 4, "depth": 2, "dense_depth": 1, "dense_features": 8}),
    ("cpl-xl", (3, 8, 8), {"width": 6, "depth": 3, "dense_depth": 2, "dense_features": 8}),
    ("sll-s", (1, 8, 8), {"width": 4, "depth": 2, "dense_depth": 1, "dense_features": 8}),
    ("sll-xl", (3, 8, 8), {"width": 6, "depth": 3, "dense_depth": 2, "dense_features": 8}),
    ("aol-s", (1, 8, 8), {"width": 4, "depth": 2, "reduce_channels": 4, "dense_features": 8}),
]


def _case_id(case: tuple) -> str:
    name, shape, options = case
    return f"{name}-{'x'.join(map(str, shape))}-" + "-".join(f"{k}{v}" for k, v in options.items())


def test_backbones_are_registered_and_covered() -> None:
    assert set(BACKBONES) <= set(list_models())
    assert {name for name, _, _ in MODEL_CASES} == set(BACKBONES)


def _train_two_steps(model: LipschitzNet) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        x = torch.rand(6, *model.in_shape)
        y = torch.randint(0, model.num_classes, (6,))
        k, sigmas = model.feature_lipschitz(2)
        assert k.shape == () and torch.isfinite(k) and torch.isfinite(sigmas).all()
        loss = F.cross_entropy(model(x), y) + 1e-4 * (k * model.head.weight.norm()) ** 2
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    model.eval()


@pytest.mark.parametrize("case", MODEL_CASES, ids=_case_id)
def test_backbone_obeys_its_sound_bound(case: tuple) -> None:
    name, shape, options = case
    torch.manual_seed(1)
    model = create_model(name, shape, NUM_CLASSES, **options)
    assert model(torch.rand(3, *shape)).shape == (3, NUM_CLASSES)
    assert isinstance(model.head, nn.Linear)
    _train_two_steps(model)
    bound = model_bound(model, "sound")
    assert bound.sound
    # every layer is 1-Lipschitz up to SOC's series tail and rounding margins
    assert max(bound.per_layer) <= 1 + 1e-5, bound.per_layer
    model64 = copy.deepcopy(model).to(f64).eval()
    for p in model64.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, *shape, generator=g, dtype=f64)
    far = torch.rand(8, *shape, generator=g, dtype=f64)
    pairs = [(x, far), (x, x + 1e-3 * torch.randn(x.shape, generator=g, dtype=f64))]
    for a, b in pairs:
        with torch.no_grad():
            fa, fb = model64(a), model64(b)
        dist = (a - b).flatten(1).norm(dim=1)
        diff = ((fa[:, :, None] - fa[:, None, :]) - (fb[:, :, None] - fb[:, None, :])).abs() / dist[:, None, None]
        assert (diff <= bound.pairwise * (1 + 1e-9)).all()
        whole = (fa - fb).norm(dim=1) / dist
        head = float(torch.linalg.matrix_norm(model.head.weight.detach().double(), 2))
        assert float(whole.max()) <= bound.feature * head * (1 + 1e-9)
    # gradient ascent on the feature ratio
    feats = model64.features
    ratio = _ascent_ratio(feats, shape, seed=3, steps=8, n=3)
    assert 0 < ratio <= bound.feature * (1 + 1e-9)
    # the state (parameters and power-iteration buffers) round-trips: same eval-mode function
    torch.manual_seed(9)
    clone = create_model(name, shape, NUM_CLASSES, **options)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert_close(clone(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name, options", [("aol-s", {}), ("cpl-s", {}), ("sll-s", {}), ("lipconvnet-5", {"width": 8})])
def test_default_size_backbones_on_fashion_mnist_shape(name: str, options: dict) -> None:
    # The Fashion-MNIST preset sizes; the AOL sound bound alone takes ~20 s on a CPU.
    torch.manual_seed(1)
    model = create_model(name, (1, 28, 28), 10, **options)
    _train_two_steps(model)
    bound = model_bound(model, "sound")
    assert max(bound.per_layer) <= 1 + 1e-5
    model64 = copy.deepcopy(model).to(f64).eval()
    g = torch.Generator().manual_seed(4)
    x, x2 = torch.rand(8, 1, 28, 28, generator=g, dtype=f64), torch.rand(8, 1, 28, 28, generator=g, dtype=f64)
    with torch.no_grad():
        ratio = (model64.features(x) - model64.features(x2)).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound.feature * (1 + 1e-9)


@pytest.mark.parametrize("name", ["cpl-s", "sll-s", "aol-s"])
def test_small_backbones_build_at_default_size(name: str) -> None:
    model = create_model(name, (1, 28, 28), 10)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    k, _ = model.feature_lipschitz(1)
    assert float(k) == 1.0


def test_lipconvnet_layout() -> None:
    model = create_model("lipconvnet-10", (3, 32, 32), 10)
    socs = [m for m in model.features if isinstance(m, SOCConv2d)]
    assert len(socs) == 10
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in socs] == [
        (3, 32, 3), (128, 64, 3), (64, 64, 3), (256, 128, 3), (128, 128, 3), (512, 256, 3),
        (256, 256, 3), (1024, 512, 3), (512, 512, 3), (2048, 1024, 1),
    ]
    assert (model.head.in_features, model.head.out_features) == (1024, 10)
    # 28x28 inputs are zero-padded to 32x32
    small = create_model("lipconvnet-5", (1, 28, 28), 10, width=2)
    assert isinstance(small.features[0], ZeroPadding)
    assert small.bound.input_shapes[1] == (1, 32, 32)


def test_backbones_reject_bad_options() -> None:
    with pytest.raises(ValueError, match="multiple of 5"):
        lipconvnet((1, 32, 32), 10, depth=7)
    with pytest.raises(ValueError, match="divisible"):
        create_model("aol-s", (1, 30, 30), 10)
    with pytest.raises(ValueError, match="activation"):
        create_model("lipconvnet-5", (1, 32, 32), 10, width=2, activation="relu")
    with pytest.raises(ValueError, match="too small"):
        create_model("cpl-s", (1, 3, 3), 10)
