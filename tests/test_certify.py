"""Certified radius and accuracy: monotonicity, strictness, edge cases, and that certificates hold."""

from __future__ import annotations

import copy
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from lipmargin.certify import (
    BOUND_METHODS,
    ModelBound,
    ModelEstimate,
    certified_accuracy,
    certified_fraction,
    certified_mask,
    certified_radius,
    certify,
    model_bound,
    model_estimate,
)
from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.models import create_model
from lipmargin.train import load_run

f64 = torch.float64


def _random_problem(seed: int, batch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, classes, generator=g, dtype=f64)
    pairwise = torch.rand(1, generator=g, dtype=f64) * 5 * pairwise_head_norms(torch.randn(classes, 3, generator=g, dtype=f64))
    target = torch.randint(0, classes, (batch,), generator=g)
    return logits, pairwise, target


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 40),
    classes=st.integers(2, 6),
    eps=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=6),
)
def test_certified_accuracy_below_clean_and_monotone(seed: int, batch: int, classes: int, eps: list[float]) -> None:
    logits, pairwise, target = _random_problem(seed, batch, classes)
    radius, pred = certified_radius(logits, pairwise)
    assert (radius >= 0).all()
    clean = float((pred == target).double().mean())
    acc = certified_accuracy(radius, pred, target, sorted(eps))
    values = [acc[float(e)] for e in sorted(eps)]
    assert all(0.0 <= v <= clean for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))
    # At radius 0 exactly the correct predictions with a strictly positive margin count.
    at_zero = certified_accuracy(radius, pred, target, [0.0])[0.0]
    assert at_zero == float(((radius > 0) & (pred == target)).double().mean())


def test_certified_radius_matches_brute_force() -> None:
    logits, pairwise, _ = _random_problem(1, 30, 5)
    radius, pred = certified_radius(logits, pairwise)
    assert torch.equal(pred, logits.argmax(1))
    for b in range(30):
        c = int(pred[b])
        expected = min(float(logits[b, c] - logits[b, j]) / float(pairwise[c, j]) for j in range(5) if j != c)
        assert float(radius[b]) == pytest.approx(expected, rel=1e-14)


def test_certification_is_strict_at_radius_equal_eps() -> None:
    logits = torch.tensor([[1.5, 1.0]], dtype=f64)  # margin 0.5, bound 2: radius 0.25 exactly
    pairwise = torch.tensor([[0.0, 2.0], [2.0, 0.0]], dtype=f64)
    radius, pred = certified_radius(logits, pairwise)
    # Every rounding is directed down: at most a few ulps below the exact 0.25, never above.
    assert 0.25 - 1e-15 <= float(radius) <= 0.25
    acc = certified_accuracy(radius, pred, torch.tensor([0]), [0.25, 0.25 - 1e-15, 0.2])
    assert acc == {0.25: 0.0, 0.25 - 1e-15: 1.0, 0.2: 1.0}
    # A wrong prediction is never certified, whatever its radius.
    assert certified_accuracy(radius, pred, torch.tensor([1]), [0.0, 0.1]) == {0.0: 0.0, 0.1: 0.0}


def test_zero_pairwise_entry() -> None:
    pairwise = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=f64)
    # Class 0 vs 1 has a zero bound: their difference is constant, so a positive margin never ends.
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, -math.inf], [2.0, 2.0, 0.0]], dtype=f64)
    radius, pred = certified_radius(logits, pairwise)
    assert 2.0 - 1e-14 <= float(radius[0]) <= 2.0  # limited by class 2 only (rounded down)
    assert float(radius[1]) >= 1e308  # an infinite margin (the downward rounding gives the largest float)
    assert float(radius[2]) == 0.0  # a tie: zero margin, zero bound, not certified
    # Only zero bounds and positive margins: infinitely robust.
    r, _ = certified_radius(torch.tensor([[1.0, 0.0]], dtype=f64), torch.zeros(2, 2, dtype=f64))
    assert float(r) == math.inf
    assert not torch.isnan(radius).any()


def test_certified_radius_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="pairwise"):
        certified_radius(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="logits"):
        certified_radius(torch.zeros(3), torch.zeros(3, 3))


# --------------------------------------------------------------------------------------------
# certify() on a model
# --------------------------------------------------------------------------------------------


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(5)
    return create_model("2C2F", (1, 8, 8), 4, width=4, dense_width=8)


@pytest.mark.parametrize("method", ["sound", "power"])
@pytest.mark.parametrize("training", [True, False])
def test_certify_leaves_the_callers_model_alone(method: str, training: bool) -> None:
    model = _tiny_model().train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(10, 1, 8, 8), torch.randint(0, 4, (10,))
    result = certify(model, [(x, y)], [0.01, 0.1], method=method)
    assert model.training is training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert result.bound_method == method and result.sound is (method == "sound")


def test_certify_result_matches_the_pure_functions() -> None:
    model = _tiny_model().eval()
    g = torch.Generator().manual_seed(6)
    batches = [(torch.rand(7, 1, 8, 8, generator=g), torch.randint(0, 4, (7,), generator=g)) for _ in range(3)]
    bound = model_bound(model, "sound")
    result = certify(model, batches, [0.0, 0.001, 0.01], bound=bound)
    assert result.bound is bound and result.lipschitz == bound.lipschitz
    assert result.num_samples == 21
    m64 = copy.deepcopy(model).double()
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    radius, pred = certified_radius(m64(x).detach(), bound.pairwise)
    # certify deflates for the rounding of its float64 forward pass: never above the undeflated
    # radius, and the allowance is tiny for this small model.
    assert (result.radius <= radius).all()
    assert_close(result.radius, radius, rtol=1e-9, atol=1e-12)
    assert torch.equal(result.prediction, pred) and torch.equal(result.target, y)
    assert result.clean_accuracy == float((pred == y).double().mean())
    for e in (0.0, 0.001, 0.01):  # counted from the definition: correct and radius > eps
        hand = sum(1 for r, c, t in zip(result.radius.tolist(), pred.tolist(), y.tolist()) if c == t and r > e) / 21
        assert result.certified_accuracy[e] == hand
    assert set(result.certified_accuracy) == {0.0, 0.001, 0.01}


def test_certify_rejects_bad_arguments() -> None:
    model = _tiny_model()
    batch = [(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="eps"):
        certify(model, batch, [-0.1])
    with pytest.raises(ValueError, match="unknown bound method 'exact'") as info:
        certify(model, batch, [0.1], method="exact")
    for name in BOUND_METHODS:
        assert name in str(info.value)


def test_certify_empty_batches() -> None:
    result = certify(_tiny_model(), [], [0.1])
    assert result.num_samples == 0 and result.certified_accuracy == {0.1: 0.0}


# --------------------------------------------------------------------------------------------
# Certificates of a trained model hold
# --------------------------------------------------------------------------------------------


def test_sound_bound_above_power_on_trained_run(tiny_run: Path) -> None:
    _, model, _ = load_run(tiny_run)
    sound, power = model_bound(copy.deepcopy(model), "sound"), model_bound(copy.deepcopy(model), "power")
    assert sound.lipschitz >= power.lipschitz * (1 - 1e-9)
    assert (sound.pairwise >= power.pairwise * (1 - 1e-9)).all()


def test_certified_samples_cannot_be_flipped_inside_their_radius(tiny_run: Path) -> None:
    """Two moons is 2-D: search the whole circle of radius 0.999 r (and inside it) for a flip."""
    _, model, _ = load_run(tiny_run)
    g = torch.Generator().manual_seed(7)
    x = 2.5 * torch.rand(400, 2, generator=g) - torch.tensor([0.75, 0.5])
    result = certify(model, [(x, torch.zeros(400, dtype=torch.long))], [0.0])
    radius, pred = result.radius, result.prediction
    keep = torch.isfinite(radius) & (radius > 1e-3)
    assert int(keep.sum()) >= 50
    m64 = copy.deepcopy(model).double().eval()
    angles = torch.linspace(0, 2 * math.pi, 257, dtype=f64)[:-1]
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)  # (256, 2)
    with torch.no_grad():
        for scale in (0.999, 0.7, 0.3):
            points = x[keep].double()[:, None, :] + scale * radius[keep][:, None, None] * directions[None]  # (N, 256, 2)
            flipped = m64(points.reshape(-1, 2)).argmax(1).reshape(points.shape[:2]) != pred[keep][:, None]
            assert not flipped.any(), f"{int(flipped.any(1).sum())} certified samples flip at {scale} r"
        # The search can find flips: at distance 1 (beyond most radii) some predictions do change.
        far = x[keep].double()[:, None, :] + 1.0 * directions[None]
        assert (m64(far.reshape(-1, 2)).argmax(1).reshape(far.shape[:2]) != pred[keep][:, None]).any()


# --------------------------------------------------------------------------------------------
# One certified-accuracy formula; names that say what is guaranteed; no upward imports
# --------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    samples=st.lists(
        st.tuples(st.one_of(st.floats(0.0, 2.0), st.sampled_from([0.0, 0.5, math.inf, math.nan])), st.booleans()),
        max_size=30,
    ),
    eps=st.lists(st.one_of(st.floats(0.0, 2.5), st.sampled_from([0.0, 0.5])), min_size=1, max_size=8),
)
def test_certified_fraction_counts_the_definition(samples: list[tuple[float, bool]], eps: list[float]) -> None:
    """certified_fraction / certified_accuracy against a sample-by-sample count in plain Python."""
    radius = torch.tensor([r for r, _ in samples], dtype=f64)
    correct = torch.tensor([c for _, c in samples], dtype=torch.bool)
    n = max(len(samples), 1)
    expected = [sum(1 for r, c in samples if c and r > e) / n for e in eps]  # nan > e is False
    assert certified_fraction(radius, correct, eps).tolist() == expected
    target = torch.zeros(len(samples), dtype=torch.long)
    prediction = torch.where(correct, target, torch.ones_like(target))
    assert certified_accuracy(radius, prediction, target, eps) == {float(e): v for e, v in zip(eps, expected)}
    for e, v in zip(eps, expected):
        assert int(certified_mask(radius, correct, e).sum()) == round(v * len(samples))


def _linear_3_4() -> torch.nn.Module:
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    return model


def test_bound_types_say_what_is_guaranteed() -> None:
    """Sound methods give a ModelBound, the power iteration a ModelEstimate; both hold the true 5."""
    model = _linear_3_4()
    sound, power = model_bound(model, "sound", input_shape=(2,)), model_bound(model, "power", input_shape=(2,))
    assert isinstance(sound, ModelBound) and not isinstance(sound, ModelEstimate) and sound.sound
    assert isinstance(power, ModelEstimate) and not isinstance(power, ModelBound) and not power.sound
    assert isinstance(model_estimate(model, input_shape=(2,)), ModelEstimate)
    # ||W_0 - W_1|| = ||(3, -4)|| = 5 exactly: the bound is >= it, the estimate converges to it.
    assert 5.0 <= sound.lipschitz <= 5.0 * (1 + 1e-6)
    assert power.lipschitz == pytest.approx(5.0, rel=1e-8)
    result = certify(model, [(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))], [0.1], bound=power)
    assert result.bound is power and result.sound is False and result.bound_method == "power"


def test_a_plain_module_declaring_in_shape_needs_no_input_shape() -> None:
    """Duck typing: any module with an ``in_shape`` attribute, no LipschitzNet needed."""
    model = _linear_3_4()
    model.in_shape = (2,)
    bound = model_bound(model)
    assert bound.input_shape == (2,)
    # margin 3 at (1, 0) over Lip(f_0 - f_1) = 5: radius 0.6 (deflated by a tiny allowance)
    result = certify(model, [(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))], [0.59, 0.6])
    assert 0.6 * (1 - 1e-6) <= float(result.radius[0]) <= 0.6
    assert result.certified_accuracy == {0.59: 1.0, 0.6: 0.0}
    with pytest.raises(ValueError, match=r"differs from the Linear's in_shape \(2,\)"):
        model_bound(model, input_shape=(3,))


def test_certify_package_does_not_import_models() -> None:
    code = (
        "import sys; import lipmargin.certify.core, lipmargin.certify.audit, lipmargin.certify.attacks; "
        "bad = sorted(m for m in sys.modules if m.startswith(('lipmargin.models', 'lipmargin.train', 'lipmargin.data'))); "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_renamed_lower_bound_names_point_to_the_new_ones() -> None:
    # import_module: ``import lipmargin.certify.attacks as m`` resolves lipmargin.certify to the function
    attacks = importlib.import_module("lipmargin.certify.attacks")
    with pytest.raises(AttributeError, match="renamed lipschitz_lower"):
        attacks.lipschitz_lower_bound  # noqa: B018
    with pytest.raises(AttributeError, match="renamed LipschitzLowerResult"):
        attacks.LowerBoundResult  # noqa: B018
