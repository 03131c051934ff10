"""CLL, GloRo and the Lipschitz penalty: hand-worked values, closed forms, gradients, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from lipmargin.certify import certified_accuracy, certified_radius
from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.losses import (
    CLLoss,
    GloRoLoss,
    cll_logits,
    cll_loss,
    cll_sigma,
    gloro_eps_schedule,
    gloro_logits,
    gloro_loss,
    k_scale_schedule,
    lipschitz_penalty,
)

f64 = torch.float64
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _random_case(seed: int, batch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 logits (B, C), targets (B,) and positive pairwise bounds (B, C)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(batch, classes, generator=g, dtype=f64)
    target = torch.randint(0, classes, (batch,), generator=g)
    lipschitz = 0.1 + 10.0 * torch.rand(batch, classes, generator=g, dtype=f64)
    return logits, target, lipschitz


# --------------------------------------------------------------------------------------------
# The worked example of docs/method.md#cll
# --------------------------------------------------------------------------------------------

W_EXAMPLE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=f64)
F_EXAMPLE = torch.tensor([[2.0, 1.0, -0.5]], dtype=f64)
Y_EXAMPLE = torch.tensor([0])
K_EXAMPLE, EPS_EXAMPLE, P_EXAMPLE = 2.0, 0.15, 0.3


def test_worked_example_sigma() -> None:
    p = P_EXAMPLE
    logit = lambda q: math.log(q / (1 - q))  # noqa: E731
    assert logit(1 - p / 2) - logit(p / 2) == pytest.approx(3.4692021, abs=1e-6)
    assert cll_sigma(EPS_EXAMPLE, P_EXAMPLE) == pytest.approx(0.08647522, abs=1e-6)
    # The two forms of docs/method.md agree to rounding.
    assert cll_sigma(EPS_EXAMPLE, p) == pytest.approx(2 * EPS_EXAMPLE / (logit(1 - p / 2) - logit(p / 2)), rel=1e-14)


def test_worked_example_pairwise_norms_and_radii() -> None:
    norms = pairwise_head_norms(W_EXAMPLE)  # (3, 3)
    assert_close(norms[0, 1:], torch.tensor([1.4142136, 2.2360680], dtype=f64), atol=1e-6, rtol=0)
    r = (F_EXAMPLE[0, 0] - F_EXAMPLE[0, 1:]) / (K_EXAMPLE * norms[0, 1:])
    assert_close(r, torch.tensor([0.3535534, 0.5590170], dtype=f64), atol=1e-6, rtol=0)


def test_worked_example_calibrated_logits_and_loss() -> None:
    lipschitz = K_EXAMPLE * pairwise_head_norms(W_EXAMPLE)[Y_EXAMPLE]  # (1, 3), 0 at the target
    z = cll_logits(F_EXAMPLE, Y_EXAMPLE, lipschitz, EPS_EXAMPLE, P_EXAMPLE)
    assert z.dtype == f64
    assert_close(z, torch.tensor([[-1.734601, -2.353893, -4.729875]], dtype=f64), atol=1e-6, rtol=0)
    loss = cll_loss(F_EXAMPLE, Y_EXAMPLE, lipschitz, EPS_EXAMPLE, P_EXAMPLE)
    assert loss.dtype == f64
    assert float(loss) == pytest.approx(0.4626948, abs=1e-6)


def test_worked_example_certified_radius() -> None:
    pairwise = K_EXAMPLE * pairwise_head_norms(W_EXAMPLE)
    radius, pred = certified_radius(F_EXAMPLE, pairwise)
    assert int(pred) == 0
    assert float(radius) == pytest.approx(0.3535534, abs=1e-6)
    acc = certified_accuracy(radius, pred, Y_EXAMPLE, [36 / 255, 0.25, 0.5])
    assert acc == {36 / 255: 1.0, 0.25: 1.0, 0.5: 0.0}


# --------------------------------------------------------------------------------------------
# CLL: closed form, module, reductions, variants
# --------------------------------------------------------------------------------------------


def _closed_form(logits: torch.Tensor, target: torch.Tensor, lipschitz: torch.Tensor, eps: float, p: float,
                 offset: float = 2.0) -> torch.Tensor:
    """``log(1 + sum_{j != y} exp((offset * eps - r_yj) / sigma))`` per sample, written independently."""
    sigma = eps / math.log((2 - p) / p)
    f_y = logits.gather(1, target[:, None])
    r = (f_y - logits) / lipschitz  # (B, C)
    a = (offset * eps - r) / sigma
    is_target = F.one_hot(target, logits.shape[1]).bool()
    a = a.masked_fill(is_target, 0.0)  # exp(0) = the "1 +" term; the target's own term is replaced
    return torch.logsumexp(a, dim=1)


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    classes=st.integers(2, 7),
    eps=st.floats(0.01, 2.0),
    p=st.floats(1e-3, 0.999),
)
def test_cll_equals_closed_form(seed: int, batch: int, classes: int, eps: float, p: float) -> None:
    logits, target, lipschitz = _random_case(seed, batch, classes)
    loss = cll_loss(logits, target, lipschitz, eps, p, reduction="none")
    assert_close(loss, _closed_form(logits, target, lipschitz, eps, p), rtol=1e-9, atol=1e-10)


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.01, 2.0), p=st.floats(1e-3, 0.999))
def test_cll_one_sided_equals_its_closed_form(seed: int, eps: float, p: float) -> None:
    # Without the -eps/sigma on the target logit the offset shrinks from 2 eps to eps.
    logits, target, lipschitz = _random_case(seed, 4, 5)
    loss = cll_loss(logits, target, lipschitz, eps, p, one_sided=True, reduction="none")
    assert_close(loss, _closed_form(logits, target, lipschitz, eps, p, offset=1.0), rtol=1e-9, atol=1e-10)


def test_cll_ignores_target_entry_of_lipschitz() -> None:
    logits, target, lipschitz = _random_case(1, 5, 4)
    other = lipschitz.clone()
    other[torch.arange(5), target] = 123.0
    assert_close(cll_loss(logits, target, lipschitz, 0.3, 0.1, reduction="none"),
                 cll_loss(logits, target, other, 0.3, 0.1, reduction="none"), rtol=0, atol=0)


def test_cll_reads_the_target_row_of_a_pairwise_matrix_by_hand() -> None:
    # C = 3, a symmetric (C, C) matrix K*||W_i - W_j|| whose rows all differ.
    pairwise = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]], dtype=f64)
    logits = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.5, 1.0]], dtype=f64)
    target = torch.tensor([1, 0])
    eps, p = 0.5, 0.2
    inv_sigma = math.log(9.0) / eps  # 1/sigma = ln((2 - p) / p) / eps
    # Two-sided closed form log(1 + sum_{j != y} exp((2 eps - r_yj) / sigma)), r_yj = (f_y - f_j) / M[y, j]:
    # sample 0 (y = 1): r_10 = (3 - 1) / 2 = 1, r_12 = (3 - 0) / 1 = 3;
    # sample 1 (y = 0): r_01 = (2 - 0.5) / 2 = 0.75, r_02 = (2 - 1) / 4 = 0.25.
    expected = torch.tensor([
        math.log(1 + math.exp((1.0 - 1.0) * inv_sigma) + math.exp((1.0 - 3.0) * inv_sigma)),
        math.log(1 + math.exp((1.0 - 0.75) * inv_sigma) + math.exp((1.0 - 0.25) * inv_sigma)),
    ], dtype=f64)
    got = cll_loss(logits, target, pairwise, eps, p, pairwise=True, reduction="none")
    assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The same as handing over each sample's target row (B, C); the module form takes the flag too.
    assert_close(cll_loss(logits, target, pairwise[target], eps, p, reduction="none"), expected, rtol=1e-12, atol=1e-12)
    assert_close(CLLoss(eps, p, pairwise=True, reduction="none")(logits, target, pairwise), expected, rtol=1e-12, atol=1e-12)


def test_cll_pairwise_matrix_when_batch_equals_classes() -> None:
    # B == C: the shape cannot say whether a (C, C) tensor is rows or the matrix; the flag does.
    pairwise = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]], dtype=f64)
    logits = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.5, 1.0], [0.0, 1.0, 2.5]], dtype=f64)
    target = torch.tensor([1, 0, 0])
    as_matrix = cll_loss(logits, target, pairwise, 0.5, 0.2, pairwise=True, reduction="none")
    as_rows = cll_loss(logits, target, pairwise, 0.5, 0.2, reduction="none")  # row b for sample b
    assert_close(as_matrix, cll_loss(logits, target, pairwise[target], 0.5, 0.2, reduction="none"), rtol=0, atol=0)
    assert not torch.allclose(as_matrix, as_rows)


def test_cll_pairwise_matrix_needs_the_flag_and_the_shape() -> None:
    pairwise = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]], dtype=f64)
    logits, target = torch.zeros(2, 3, dtype=f64), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="pairwise=True"):
        cll_loss(logits, target, pairwise, 0.5, 0.2)
    with pytest.raises(ValueError, match=r"\(3, 3\) matrix"):
        cll_loss(logits, target, pairwise[:2], 0.5, 0.2, pairwise=True)
    with pytest.raises(ValueError, match="per_logit"):
        cll_loss(logits, target, pairwise, 0.5, 0.2, pairwise=True, per_logit=True)


def test_cll_module_equals_function() -> None:
    logits, target, lipschitz = _random_case(2, 8, 5)
    for kwargs in ({}, {"one_sided": True}, {"per_logit": True}, {"reduction": "sum"}, {"reduction": "none"}):
        module = CLLoss(0.25, 0.05, **kwargs)
        assert module.sigma == pytest.approx(cll_sigma(0.25, 0.05), rel=1e-15)
        assert_close(module(logits, target, lipschitz), cll_loss(logits, target, lipschitz, 0.25, 0.05, **kwargs),
                     rtol=0, atol=0)
    module = CLLoss(0.25, 0.05)
    assert_close(module(logits, target, lipschitz, k_scale=0.3),
                 cll_loss(logits, target, lipschitz, 0.25, 0.05, k_scale=0.3), rtol=0, atol=0)


def test_cll_reductions_consistent() -> None:
    logits, target, lipschitz = _random_case(3, 7, 4)
    none = cll_loss(logits, target, lipschitz, 0.5, 0.2, reduction="none")
    assert none.shape == (7,)
    assert (none > 0).all()  # cross entropy of a C >= 2 softmax is positive
    assert_close(cll_loss(logits, target, lipschitz, 0.5, 0.2, reduction="sum"), none.sum())
    assert_close(cll_loss(logits, target, lipschitz, 0.5, 0.2, reduction="mean"), none.mean())
    assert_close(cll_loss(logits, target, lipschitz, 0.5, 0.2), none.mean())


def test_cll_one_sided_by_hand() -> None:
    lipschitz = K_EXAMPLE * pairwise_head_norms(W_EXAMPLE)[Y_EXAMPLE]
    sigma = EPS_EXAMPLE / math.log((2 - P_EXAMPLE) / P_EXAMPLE)
    f = [2.0, 1.0, -0.5]
    k01, k02 = K_EXAMPLE * math.sqrt(2), K_EXAMPLE * math.sqrt(5)
    z = [0.0, (f[1] - f[0]) / (sigma * k01) + EPS_EXAMPLE / sigma, (f[2] - f[0]) / (sigma * k02) + EPS_EXAMPLE / sigma]
    expected = -z[0] + math.log(sum(math.exp(v) for v in z))
    z_lib = cll_logits(F_EXAMPLE, Y_EXAMPLE, lipschitz, EPS_EXAMPLE, P_EXAMPLE, one_sided=True)
    assert_close(z_lib, torch.tensor([z], dtype=f64), rtol=1e-12, atol=1e-12)
    loss = cll_loss(F_EXAMPLE, Y_EXAMPLE, lipschitz, EPS_EXAMPLE, P_EXAMPLE, one_sided=True)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("one_sided", [False, True])
def test_cll_per_logit_by_hand(one_sided: bool) -> None:
    # Per-logit normalisation: z_j = f_j / (sigma K ||W_j||) plus the offsets.
    row_norms = [1.0, 1.0, math.sqrt(2)]
    lipschitz = torch.tensor([K_EXAMPLE * n for n in row_norms], dtype=f64)  # (C,)
    sigma = EPS_EXAMPLE / math.log((2 - P_EXAMPLE) / P_EXAMPLE)
    f = [2.0, 1.0, -0.5]
    off = EPS_EXAMPLE / sigma
    z = [f[j] / (sigma * K_EXAMPLE * row_norms[j]) for j in range(3)]
    z = [z[0] - (0.0 if one_sided else off), z[1] + off, z[2] + off]
    expected = -z[0] + math.log(sum(math.exp(v) for v in z))
    z_lib = cll_logits(F_EXAMPLE, Y_EXAMPLE, lipschitz, EPS_EXAMPLE, P_EXAMPLE, per_logit=True, one_sided=one_sided)
    assert_close(z_lib, torch.tensor([z], dtype=f64), rtol=1e-12, atol=1e-12)
    loss = cll_loss(F_EXAMPLE, Y_EXAMPLE, lipschitz, EPS_EXAMPLE, P_EXAMPLE, per_logit=True, one_sided=one_sided)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_cll_k_scale_multiplies_the_divisor() -> None:
    logits, target, lipschitz = _random_case(4, 6, 5)
    for scale in (0.01, 0.37, 1.0, 2.5):
        assert_close(cll_loss(logits, target, lipschitz, 0.3, 0.1, k_scale=scale, reduction="none"),
                     cll_loss(logits, target, lipschitz * scale, 0.3, 0.1, reduction="none"), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="k_scale"):
        cll_loss(logits, target, lipschitz, 0.3, 0.1, k_scale=0.0)


def test_k_scale_schedule() -> None:
    assert k_scale_schedule(0.0) == pytest.approx(0.01, abs=1e-15)
    assert k_scale_schedule(1.0) == 1.0
    assert k_scale_schedule(0.5) == pytest.approx(1 - 0.99 * 0.5**10, rel=1e-15)
    values = [k_scale_schedule(t / 20) for t in range(21)]
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("eps, p", [(0.15, 0.3), (0.5, 0.01), (1.0, 0.7), (36 / 255, 1e-4)])
def test_single_pair_probability_calibration(eps: float, p: float) -> None:
    # Two classes, y = 0, bound L: the true-class probability is sigmoid((r - 2 eps) / sigma).
    lipschitz = torch.tensor([[0.0, 3.0]], dtype=f64)
    target = torch.tensor([0])
    for radius, expected in ((eps, p / 2), (2 * eps, 0.5), (3 * eps, 1 - p / 2)):
        logits = torch.tensor([[0.7 + 3.0 * radius, 0.7]], dtype=f64)
        prob = torch.exp(-cll_loss(logits, target, lipschitz, eps, p))
        assert float(prob) == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------------------------
# CLL gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"one_sided": True}, {"per_logit": True}, {"k_scale": 0.4}])
def test_cll_gradcheck_logits(kwargs: dict) -> None:
    logits, target, lipschitz = _random_case(5, 4, 3)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cll_loss(x, target, lipschitz, 0.3, 0.2, **kwargs), (logits,))


@pytest.mark.parametrize("per_logit", [False, True])
def test_cll_gradcheck_lipschitz_when_not_detached(per_logit: bool) -> None:
    logits, target, lipschitz = _random_case(6, 4, 3)
    lipschitz.requires_grad_(True)

    def fn(bound: torch.Tensor) -> torch.Tensor:
        return cll_loss(logits, target, bound, 0.3, 0.2, per_logit=per_logit, detach_lipschitz=False)

    assert torch.autograd.gradcheck(fn, (lipschitz,))
    (grad,) = torch.autograd.grad(fn(lipschitz), lipschitz)
    assert grad.abs().sum() > 0


def test_cll_no_gradient_to_lipschitz_by_default() -> None:
    logits, target, _ = _random_case(7, 5, 4)
    weight = torch.randn(4, 6, dtype=f64, requires_grad=True)
    k = torch.tensor(2.0, dtype=f64, requires_grad=True)
    logits.requires_grad_(True)
    lipschitz = (k * pairwise_head_norms(weight))[target]  # (B, C) built from parameters, as in training
    loss = cll_loss(logits, target, lipschitz, 0.3, 0.2)
    grads = torch.autograd.grad(loss, (logits, weight, k), allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None and grads[2] is None
    # ...and it does flow when asked for.
    loss = cll_loss(logits, target, (k * pairwise_head_norms(weight))[target], 0.3, 0.2, detach_lipschitz=False)
    g_weight, g_k = torch.autograd.grad(loss, (weight, k))
    assert g_weight.abs().sum() > 0 and g_k.abs() > 0


def test_cll_zero_target_entry_no_nan() -> None:
    # lipschitz[b, y_b] = ||W_y - W_y|| = 0 exactly: neither the value nor any gradient may be NaN.
    logits, target, _ = _random_case(8, 6, 4)
    logits.requires_grad_(True)
    weight = torch.randn(4, 5, dtype=f64, requires_grad=True)
    for kwargs in ({}, {"one_sided": True}):
        lipschitz = (1.7 * pairwise_head_norms(weight))[target]
        assert (lipschitz[torch.arange(6), target] == 0).all()
        loss = cll_loss(logits, target, lipschitz, 0.3, 0.2, detach_lipschitz=False, **kwargs)
        assert torch.isfinite(loss)
        g_logits, g_weight = torch.autograd.grad(loss, (logits, weight))
        assert torch.isfinite(g_logits).all() and torch.isfinite(g_weight).all()
        assert g_weight.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# CLL argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, -0.1, float("nan"), float("inf")])
def test_cll_rejects_bad_eps(eps: float) -> None:
    logits, target, lipschitz = _random_case(9, 2, 3)
    with pytest.raises(ValueError, match="eps"):
        cll_loss(logits, target, lipschitz, eps, 0.1)
    with pytest.raises(ValueError, match="eps"):
        CLLoss(eps, 0.1)
    with pytest.raises(ValueError, match="eps"):
        cll_sigma(eps, 0.1)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_cll_rejects_bad_p(p: float) -> None:
    logits, target, lipschitz = _random_case(9, 2, 3)
    with pytest.raises(ValueError, match=r"^p\b"):
        cll_loss(logits, target, lipschitz, 0.1, p)
    with pytest.raises(ValueError, match=r"^p\b"):
        CLLoss(0.1, p)


def test_cll_rejects_shape_mismatch() -> None:
    logits, target, lipschitz = _random_case(9, 3, 4)
    with pytest.raises(ValueError, match="lipschitz"):
        cll_loss(logits, target, lipschitz[:, :3], 0.1, 0.1)
    with pytest.raises(ValueError, match="target"):
        cll_loss(logits, target[:2], lipschitz, 0.1, 0.1)
    with pytest.raises(ValueError, match="logits"):
        cll_loss(logits[0], target, lipschitz, 0.1, 0.1)


def test_cll_rejects_unknown_reduction() -> None:
    logits, target, lipschitz = _random_case(9, 3, 4)
    with pytest.raises(ValueError, match="reduction"):
        cll_loss(logits, target, lipschitz, 0.1, 0.1, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        CLLoss(0.1, 0.1, reduction="elementwise_mean")


# --------------------------------------------------------------------------------------------
# GloRo
# --------------------------------------------------------------------------------------------


def test_gloro_hand_computed() -> None:
    pairwise = K_EXAMPLE * pairwise_head_norms(W_EXAMPLE)  # (3, 3)
    eps = 0.15
    # Predicted class 0; bottom logit = max(1 + eps*2*sqrt2, -0.5 + eps*2*sqrt5) = 1 + 0.3 sqrt2.
    y_bot = max(1.0 + eps * 2 * math.sqrt(2), -0.5 + eps * 2 * math.sqrt(5))
    assert y_bot == 1.0 + 0.3 * math.sqrt(2)
    aug = gloro_logits(F_EXAMPLE, pairwise, eps)
    assert_close(aug, torch.tensor([[2.0, 1.0, -0.5, y_bot]], dtype=f64), rtol=1e-14, atol=1e-14)
    logs = [2.0, 1.0, -0.5, y_bot]
    for y in range(3):
        expected = -logs[y] + math.log(sum(math.exp(v) for v in logs))
        loss = gloro_loss(F_EXAMPLE, torch.tensor([y]), pairwise, eps)
        assert float(loss) == pytest.approx(expected, rel=1e-12)
    # With eps = 0 the bottom logit is the runner-up logit.
    assert float(gloro_logits(F_EXAMPLE, pairwise, 0.0)[0, -1]) == 1.0


def test_gloro_bottom_logit_is_max_over_other_classes() -> None:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(20, 6, generator=g, dtype=f64)
    pairwise = 3 * pairwise_head_norms(torch.randn(6, 4, generator=g, dtype=f64))
    eps = 0.4
    aug = gloro_logits(logits, pairwise, eps)
    assert aug.shape == (20, 7)
    assert_close(aug[:, :6], logits, rtol=0, atol=0)
    for b in range(20):
        c = int(logits[b].argmax())
        expected = max(float(logits[b, i] + eps * pairwise[c, i]) for i in range(6) if i != c)
        assert float(aug[b, -1]) == pytest.approx(expected, rel=1e-14)


def test_gloro_trades_equals_formula() -> None:
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(9, 5, generator=g, dtype=f64)
    target = torch.randint(0, 5, (9,), generator=g)
    pairwise = 2 * pairwise_head_norms(torch.randn(5, 3, generator=g, dtype=f64))
    eps, lam = 0.3, 1.7
    aug = gloro_logits(logits, pairwise, eps)
    log_p = aug.log_softmax(1)
    ce = -log_p[torch.arange(9), target]
    q = torch.cat([logits.softmax(1), torch.zeros(9, 1, dtype=f64)], dim=1)
    expected = ce + lam * -(q * log_p).sum(1)
    got = gloro_loss(logits, target, pairwise, eps, trades_lambda=lam, reduction="none")
    assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert_close(gloro_loss(logits, target, pairwise, eps, trades_lambda=lam), expected.mean())
    assert_close(gloro_loss(logits, target, pairwise, eps, trades_lambda=lam, reduction="sum"), expected.sum())
    # The module is the function.
    module = GloRoLoss(eps, trades_lambda=lam)
    assert_close(module(logits, target, pairwise), expected.mean())
    assert_close(module(logits, target, pairwise, eps=0.1),
                 gloro_loss(logits, target, pairwise, 0.1, trades_lambda=lam), rtol=0, atol=0)
    # The q term is detached: its gradient to the logits only comes through log_softmax.
    x = logits.clone().requires_grad_(True)
    (g_lib,) = torch.autograd.grad(gloro_loss(x, target, pairwise, eps, trades_lambda=lam), x)
    y = logits.clone().requires_grad_(True)
    aug_y = gloro_logits(y, pairwise, eps).log_softmax(1)
    ref = (-aug_y[torch.arange(9), target] + lam * -(q * aug_y).sum(1)).mean()
    (g_ref,) = torch.autograd.grad(ref, y)
    assert_close(g_lib, g_ref, rtol=1e-12, atol=1e-12)


def test_gloro_gradient_flows_through_pairwise() -> None:
    g = torch.Generator().manual_seed(13)
    weight = torch.randn(4, 6, generator=g, dtype=f64, requires_grad=True)
    k = torch.tensor(1.5, dtype=f64, requires_grad=True)
    logits = torch.randn(8, 4, generator=g, dtype=f64, requires_grad=True)
    target = torch.randint(0, 4, (8,), generator=g)
    loss = gloro_loss(logits, target, k * pairwise_head_norms(weight), 0.5)
    g_logits, g_weight, g_k = torch.autograd.grad(loss, (logits, weight, k))
    for grad in (g_logits, g_weight, g_k):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # A larger bound lifts the bottom logit, so the loss grows with K.
    assert float(g_k) > 0
    pairwise = (k * pairwise_head_norms(weight)).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: gloro_loss(logits.detach(), target, m, 0.5), (pairwise,))


def test_gloro_rejects_bad_args() -> None:
    logits = torch.randn(2, 3, dtype=f64)
    target = torch.tensor([0, 1])
    pairwise = torch.ones(3, 3, dtype=f64)
    with pytest.raises(ValueError, match="pairwise"):
        gloro_loss(logits, target, torch.ones(4, 4, dtype=f64), 0.1)
    with pytest.raises(ValueError, match="eps"):
        gloro_loss(logits, target, pairwise, -0.1)
    with pytest.raises(ValueError, match="trades_lambda"):
        gloro_loss(logits, target, pairwise, 0.1, trades_lambda=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        gloro_loss(logits, target, pairwise, 0.1, reduction="mea")
    with pytest.raises(ValueError, match="eps"):
        GloRoLoss(0.0)


def test_gloro_eps_schedule() -> None:
    assert gloro_eps_schedule(0.0, 0.5) == 0.0
    assert gloro_eps_schedule(1.0, 0.5) == 0.5
    assert gloro_eps_schedule(0.5, 0.5) == pytest.approx(0.5 * (1 - 0.5**5), rel=1e-15)
    assert gloro_eps_schedule(2.0, 0.5) == 0.5  # clamped past the end
    values = [gloro_eps_schedule(t / 10, 1.0) for t in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------------------------
# Lipschitz penalty
# --------------------------------------------------------------------------------------------


def test_lipschitz_penalty_value_and_gradient() -> None:
    k = torch.tensor(3.0, dtype=f64, requires_grad=True)
    penalty = lipschitz_penalty(k, 0.1)
    assert float(penalty.detach()) == pytest.approx(0.9, rel=1e-15)
    (grad,) = torch.autograd.grad(penalty, k)
    assert float(grad) == pytest.approx(0.6, rel=1e-15)  # d/dK lambda K^2 = 2 lambda K
    k = k.detach()
    assert float(lipschitz_penalty(k, 0.1, power=1.0)) == pytest.approx(0.3, rel=1e-15)
    assert float(lipschitz_penalty(k, 0.0)) == 0.0
    with pytest.raises(ValueError, match="weight"):
        lipschitz_penalty(k, -1e-4)
    with pytest.raises(ValueError, match="power"):
        lipschitz_penalty(k, 1e-4, power=0.0)
