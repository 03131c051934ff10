"""Forward-error bounds (lipmargin.lipschitz.rounding) against exact rational arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from lipmargin.lipschitz.rounding import (
    SQRT2_UP,
    affine_error_bound,
    elementwise_error_bound,
    gamma,
    margin_radius_lower,
    mul_pow2,
    nonnegative_norm_bound,
    propagate_error,
    radius_lower,
    unit_roundoff,
)


def _fr(t: torch.Tensor) -> list:
    """Exact rationals of a tensor's entries (nested lists)."""
    if t.dim() == 0:
        return Fraction(float(t))
    return [_fr(s) for s in t]


def _exact_affine(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None) -> list[list[Fraction]]:
    """Exact ``x @ w.T + b`` per sample, as rationals."""
    wf, xf = _fr(w), _fr(x)
    bf = _fr(b) if b is not None else [Fraction(0)] * w.shape[0]
    return [[sum((wi[k] * xs[k] for k in range(len(xs))), bf[i]) for i, wi in enumerate(wf)] for xs in xf]


def _sq_err(computed: torch.Tensor, exact: list) -> list[Fraction]:
    """Per-sample exact squared L2 distance between a computed (B, N) tensor and exact values."""
    out = []
    for row, ex in zip(computed, exact):
        out.append(sum((Fraction(float(c)) - e) ** 2 for c, e in zip(row, ex)))
    return out


# --------------------------------------------------------------------------------------------
# unit roundoff and gamma
# --------------------------------------------------------------------------------------------


def test_unit_roundoff_values_and_refusals() -> None:
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.float64) == 2.0**-53
    for dt in (torch.float16, torch.bfloat16, torch.int32):
        with pytest.raises(TypeError, match="float32 and float64"):
            unit_roundoff(dt)
    with pytest.raises(TypeError):
        gamma(3, torch.bfloat16)


def test_gamma_hand_values() -> None:
    # gamma_1 (float32) = 2**-24 / (1 - 2**-24) = 1 / (2**24 - 1)
    g1 = gamma(1, torch.float32)
    exact = Fraction(1, 2**24 - 1)
    assert Fraction(g1) >= exact and g1 <= math.nextafter(float(exact), math.inf)
    # gamma_10 (float64) = 10 / (2**53 - 10)
    g10 = gamma(10, torch.float64)
    exact = Fraction(10, 2**53 - 10)
    assert Fraction(g10) >= exact and g10 <= math.nextafter(float(exact), math.inf)
    assert gamma(0, torch.float32) == 0.0
    # 2**23 * 2**-24 = 1/2: refused
    with pytest.raises(ValueError, match="not useful"):
        gamma(2**23, torch.float32)
    with pytest.raises(ValueError):
        gamma(-1, torch.float32)


def test_pow2_scaling_is_exact_over_the_whole_range() -> None:
    for k in (-1074, -1060, -1000, -500, 0, 500, 1000, 1023):
        y = mul_pow2(torch.ones(1, dtype=torch.float64), torch.tensor([k]))
        assert Fraction(float(y)) == Fraction(2) ** k


# --------------------------------------------------------------------------------------------
# norms of non-negative vectors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-310, 1e-200, 1e150, 1e300])
def test_nonnegative_norm_bound_against_exact(scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.rand(3, 40, generator=g, dtype=torch.float64) * scale
    v[1, :20] = 0.0
    v[2, 0] = scale * 0.75  # one dominant entry
    bound = nonnegative_norm_bound(v)
    for i in range(3):
        exact_sq = sum(Fraction(float(a)) ** 2 for a in v[i])
        b = Fraction(float(bound[i]))
        assert b * b >= exact_sq
        assert float(bound[i]) <= math.sqrt(float(exact_sq / Fraction(scale) ** 2)) * scale * (1 + 1e-9) + 1e-320
    assert nonnegative_norm_bound(torch.zeros(2, 5, dtype=torch.float64)).tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------------------------
# affine maps: float32 evaluation in several summation orders vs exact rationals
# --------------------------------------------------------------------------------------------


def _orders(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same affine map evaluated in float32 with different summation orders."""
    prods = x.unsqueeze(1) * w.unsqueeze(0)  # (B, M, N), each product rounded once
    seq = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    for k in range(w.shape[1]):  # left to right, bias last
        seq = seq + prods[:, :, k]
    rev = b.expand(x.shape[0], -1).clone()
    for k in reversed(range(w.shape[1])):  # right to left, bias first
        rev = rev + prods[:, :, k]
    return {
        "linear": F.linear(x, w, b),
        "matmul": x @ w.T + b,
        "sequential": seq + b,
        "reversed": rev,
        "pairwise": prods.sum(2) + b,
    }


@pytest.mark.parametrize("case", ["uniform", "cancellation", "underflow"])
def test_affine_error_bound_holds_in_every_order(case: str) -> None:
    g = torch.Generator().manual_seed({"uniform": 0, "cancellation": 1, "underflow": 2}[case])
    m, n, batch = 5, 24, 4
    w = torch.randn(m, n, generator=g)
    x = torch.randn(batch, n, generator=g)
    b = torch.randn(m, generator=g)
    if case == "cancellation":  # large terms that cancel: the relative error of the result is huge
        x = x * 1e4
        b = -(x[0] @ w.T).detach()
    if case == "underflow":  # products ~1e-44: a few subnormal ulps in float32, relative errors ~10%
        w = w * 1e-22
        x = x * 1e-22
        b = b * 1e-43
    exact = _exact_affine(w, x, b)
    bound = affine_error_bound(lambda v: v @ w.abs().to(torch.float64).T, x, b.abs(), n, torch.float32)
    assert bound.shape == (batch,) and bound.dtype == torch.float64
    worst = 0.0
    for name, y in _orders(w, x, b).items():
        for i, sq in enumerate(_sq_err(y, exact)):
            assert Fraction(float(bound[i])) ** 2 >= sq, (name, i)
            worst = max(worst, math.sqrt(float(sq)) / float(bound[i]))
    # the orders above really differ from the exact value, so the test can fail
    assert worst > 0.0
    if case == "underflow":  # a relative-only bound (gamma_{n+1} || |W||x| + |b| ||) is too small here
        t = x.abs().double() @ w.abs().double().T + b.abs().double()
        relative_only = gamma(n + 1, torch.float32) * t.norm(dim=1)
        sq = _sq_err(F.linear(x, w, b), exact)
        assert any(Fraction(float(r)) ** 2 < s for r, s in zip(relative_only, sq))


def test_affine_error_bound_conv2d_against_exact() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 5, 5, generator=g)
    w = torch.randn(3, 2, 3, 3, generator=g)
    b = torch.randn(3, generator=g)
    y = F.conv2d(x, w, b, padding=1)  # float32, whatever algorithm torch picks on CPU (direct/gemm)
    xp = F.pad(x, (1, 1, 1, 1))
    xf, wf, bf = _fr(xp), _fr(w), _fr(b)
    exact = []
    for s in range(2):
        vals = []
        for o in range(3):
            for i in range(5):
                for j in range(5):
                    acc = bf[o]
                    for c in range(2):
                        for di in range(3):
                            for dj in range(3):
                                acc += wf[o][c][di][dj] * xf[s][c][i + di][j + dj]
                    vals.append(acc)
        exact.append(vals)
    wa = w.abs().to(torch.float64)
    bound = affine_error_bound(
        lambda v: F.conv2d(v, wa, padding=1), x, b.abs().to(torch.float64).view(1, 3, 1, 1), 18, torch.float32
    )
    for i, sq in enumerate(_sq_err(y.reshape(2, -1), exact)):
        assert sq > 0  # the conv did round
        assert Fraction(float(bound[i])) ** 2 >= sq


def test_whole_mlp_forward_error_is_bounded() -> None:
    """Compose local errors with propagate_error through Linear-ReLU-Linear against exact logits."""
    g = torch.Generator().manual_seed(4)
    w1, b1 = torch.randn(16, 12, generator=g), torch.randn(16, generator=g)
    w2, b2 = torch.randn(4, 16, generator=g), torch.randn(4, generator=g)
    x = torch.randn(3, 12, generator=g)
    h = F.relu(F.linear(x, w1, b1))
    logits = F.linear(h, w2, b2)
    e1 = affine_error_bound(lambda v: v @ w1.abs().double().T, x, b1.abs(), 12, torch.float32)
    # ReLU is exact and 1-Lipschitz: e stays e1
    local2 = affine_error_bound(lambda v: v @ w2.abs().double().T, h, b2.abs(), 16, torch.float32)
    lip2 = float(torch.linalg.matrix_norm(w2.double(), 2)) * (1 + 1e-9)
    e2 = propagate_error(e1, lip2, local2)
    hex_ = [[max(v, Fraction(0)) for v in row] for row in _exact_affine(w1, x, b1)]
    w2f, b2f = _fr(w2), _fr(b2)
    exact = [[sum((w2f[i][k] * hs[k] for k in range(16)), b2f[i]) for i in range(4)] for hs in hex_]
    for i, sq in enumerate(_sq_err(logits, exact)):
        assert Fraction(float(e2[i])) ** 2 >= sq


def test_propagate_error_rounds_up() -> None:
    e = torch.tensor([0.1, 1e-300, 3.0], dtype=torch.float64)
    loc = torch.tensor([0.2, 0.0, 1e-5], dtype=torch.float64)
    out = propagate_error(e, 1.1, loc)
    for i in range(3):
        assert Fraction(float(out[i])) >= Fraction(1.1) * Fraction(float(e[i])) + Fraction(float(loc[i]))
    with pytest.raises(ValueError):
        propagate_error(e, -1.0, loc)


def test_elementwise_error_bound_covers_float32_tanh() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 50, generator=g) * 3
    y = torch.tanh(x)
    truth = torch.tanh(x.double())  # float64 tanh: ~1e-16 from the real tanh, far below float32's ulp
    bound = elementwise_error_bound(y, 4.0, torch.float32)
    err = (y.double() - truth).norm(dim=1)
    assert bool((err > 0).all()) and bool((err <= bound * (1 - 1e-6)).all())
    with pytest.raises(TypeError):
        elementwise_error_bound(y.half(), 1.0, torch.float16)


# --------------------------------------------------------------------------------------------
# the radius
# --------------------------------------------------------------------------------------------


def test_margin_radius_lower_is_below_the_exact_quotient_and_close_to_it() -> None:
    g = torch.Generator().manual_seed(6)
    margin = torch.rand(5, 4, generator=g, dtype=torch.float64) * 3
    rows = torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.1
    err = torch.rand(5, generator=g, dtype=torch.float64) * 1e-3
    r = margin_radius_lower(margin, err, rows)
    for i in range(5):
        for j in range(4):
            # exact: (margin - sqrt(2) err) / rows; sqrt(2) < SQRT2_UP so this is larger than needed
            exact_num = Fraction(float(margin[i, j])) - Fraction(float(err[i])) * Fraction(SQRT2_UP)
            assert Fraction(float(r[i, j])) * Fraction(float(rows[i, j])) <= max(exact_num, Fraction(0))
            if exact_num > 0:
                assert float(r[i, j]) >= float(exact_num / Fraction(float(rows[i, j]))) * (1 - 1e-14)
    # a zero row: constant difference, inf if the deflated margin is positive, else 0
    z = margin_radius_lower(
        torch.tensor([[1.0, 1e-20]], dtype=torch.float64),
        torch.tensor([1e-10], dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
    )
    assert z.tolist() == [[math.inf, 0.0]]
    # nan errors certify nothing
    n = margin_radius_lower(margin[:1], torch.tensor([math.nan], dtype=torch.float64), rows[:1])
    assert n.tolist() == [[0.0] * 4]


def test_radius_lower_within_rounding_of_the_boundary_is_zero() -> None:
    """A float32 logit pair 1 ulp apart has a margin below the float32 forward allowance."""
    logits = torch.tensor([[1.0, 1.0 - 2.0**-24]], dtype=torch.float32)  # one float32 ulp apart
    pairwise = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    e = torch.tensor([2.0**-23], dtype=torch.float64)
    radius, pred = radius_lower(logits, e, pairwise)
    assert pred.tolist() == [0] and radius.tolist() == [0.0]
    radius, _ = radius_lower(logits, torch.zeros(1, dtype=torch.float64), pairwise)
    assert 0 < float(radius) < 2.0**-24
