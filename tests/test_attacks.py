"""Properties of the empirical attacks and of the Lipschitz lower bound.

The linear-model tests use closed forms: for f(x) = W x + b the smallest L2 perturbation that
makes class j beat the true class y is (f_y - f_j)(x) / ||W_y - W_j||, and every difference
quotient of f_c - f_j lies in [0, ||W_c - W_j||], reached along W_c - W_j.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lipmargin.certify.attacks import (
    radius_groups,
    LOSSES,
    LipschitzLowerResult,
    autoattack_l2,
    lipschitz_lower,
    pgd_l2,
    robust_accuracy,
)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: thread hand-offs cost more than they save, badly so on a busy
    # 2-core machine.  Restored afterwards so other test modules see the usual setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Models and closed forms
# --------------------------------------------------------------------------------------------


class MaxMin(nn.Module):
    """Sorts neighbouring pairs of features: a permutation on each piece, so 1-Lipschitz in L2.
    Defined here so these tests do not depend on the library's layer module."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([torch.maximum(a, b), torch.minimum(a, b)], dim=-1).flatten(-2)


def _mlp(d_in: int, hidden: int, classes: int, act: nn.Module, dtype: torch.dtype, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, hidden),
        act,
        nn.Linear(hidden, hidden),
        act,
        nn.Linear(hidden, classes),
    ).to(dtype)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _spectral(w: Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().double(), ord=2).item()


def _mlp_bounds(model: nn.Module) -> tuple[float, Tensor]:
    """Sound Lipschitz bounds for an MLP with 1-Lipschitz activations.

    Returns (global bound on any logit difference, (C, C) pairwise bounds).  ||Δf||_2 <= K
    ||Δx|| with K the product of spectral norms; |Δ(f_c - f_j)| = |(e_c - e_j)·Δf| <= sqrt(2) K.
    Pairwise: the head row difference W_c - W_j applied to the body's output change.
    The 1e-9 inflation covers the float64 SVD's rounding.
    """
    layers = _linears(model)
    body = math.prod(_spectral(m.weight) for m in layers[:-1])
    head = layers[-1].weight.detach().double()
    glob = math.sqrt(2.0) * body * _spectral(head) * (1 + 1e-9)
    pair = body * (head[:, None, :] - head[None, :, :]).norm(dim=2) * (1 + 1e-9)
    return glob, pair


def _linear_problem(classes: int, d: int, batch: int, dtype: torch.dtype, seed: int) -> tuple[nn.Linear, Tensor, Tensor, Tensor]:
    """A random linear classifier, inputs, their predicted labels, and each input's exact
    minimal adversarial L2 distance."""
    torch.manual_seed(seed)
    lin = nn.Linear(d, classes).to(dtype)
    x = torch.randn(batch, d, dtype=dtype)
    with torch.no_grad():
        f = lin(x)
    y = f.argmax(dim=1)
    w = lin.weight.detach()
    gap = f.gather(1, y[:, None]) - f  # (B, C), >= 0, zero at y
    row_dist = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)  # ||W_y - W_j||
    per_class = torch.where(gap > 0, gap / row_dist.clamp_min(1e-300), torch.full_like(gap, math.inf))
    return lin, x, y, per_class.amin(dim=1)


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} f_j - f_y, computed independently of the library."""
    other = logits.clone()
    other[torch.arange(len(y)), y] = -math.inf
    return other.amax(dim=1) - logits[torch.arange(len(y)), y]


def _flipped(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return _margin(model(x), y) >= 0


def _dist(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).reshape(a.shape[0], -1).double().norm(dim=1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# PGD: strength and feasibility against closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_pgd_linear_flips_just_outside_and_never_inside_minimal_distance(classes: int, loss: str) -> None:
    lin, x, y, dist = _linear_problem(classes, d=10, batch=64, dtype=torch.float64, seed=classes)
    # Just outside the exact minimal distance every sample can be flipped, and the attack must
    # find it.  Cross-entropy does not aim at the nearest boundary, so it is held to this only in
    # the 2-class case, where its gradient is exactly the margin's direction.
    if loss == "margin" or classes == 2:
        robust, x_adv = robust_accuracy(lin, x, y, 1.05 * dist, clamp=None, loss=loss, generator=_gen())
        assert not robust.any()
        assert _flipped(lin, x_adv, y).all()
        assert (_dist(x_adv, x) <= 1.05 * dist + 1e-9).all()
    # Just inside it no sample can be flipped: anything else means the attack left the ball.
    x_in = pgd_l2(lin, x, y, 0.95 * dist, clamp=None, loss=loss, generator=_gen())
    assert not _flipped(lin, x_in, y).any()
    assert (_dist(x_in, x) <= 0.95 * dist + 1e-9).all()
    robust_in, _ = robust_accuracy(lin, x, y, 0.95 * dist, clamp=None, loss=loss, generator=_gen())
    assert robust_in.all()


def test_pgd_scalar_eps_matches_closed_form_robustness() -> None:
    # One radius for all samples: exactly those whose minimal distance is below it are flipped,
    # away from a 10% band where the attack's convergence is not being tested.
    lin, x, y, dist = _linear_problem(4, d=8, batch=96, dtype=torch.float64, seed=11)
    eps = dist.median().item()
    robust, _ = robust_accuracy(lin, x, y, eps, clamp=None, generator=_gen())
    clear = (dist < 0.9 * eps) | (dist > 1.1 * eps)
    assert clear.sum() > 40
    assert torch.equal(robust[clear], (dist > eps)[clear])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    clamped=st.booleans(),
    loss=st.sampled_from(sorted(LOSSES)),
    scale=st.floats(0.05, 3.0),
)
def test_pgd_feasibility_invariants(seed: int, dtype: torch.dtype, clamped: bool, loss: str, scale: float) -> None:
    gen = _gen(seed)
    batch = 12
    model = _mlp(16, 16, 3, nn.ReLU(), dtype, seed=seed % 7)
    # Images with saturated pixels, so the box constraint is active.
    x = torch.rand(batch, 1, 4, 4, generator=gen, dtype=dtype).mul(1.4).sub(0.2).clamp(0.0, 1.0)
    if not clamped:
        x = x * 4 - 2
    y = torch.randint(0, 3, (batch,), generator=gen)
    eps = torch.rand(batch, generator=gen, dtype=dtype) * scale
    eps[::3] = 0.0  # "do not perturb"
    clamp = (0.0, 1.0) if clamped else None
    x_adv = pgd_l2(model, x, y, eps, steps=6, restarts=3, clamp=clamp, loss=loss, generator=gen)

    assert x_adv.shape == x.shape and x_adv.dtype == dtype
    assert (_dist(x_adv, x) <= eps.double() + 1e-6).all()
    assert torch.equal(x_adv[::3], x[::3])
    if clamped:
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # The clean point is evaluated first, so a sample's kept point is either misclassified or
    # at least as good as x on the attack's (untargeted) objective.
    objective = _margin if loss == "margin" else lambda f, t: nn.functional.cross_entropy(f, t, reduction="none")
    with torch.no_grad():
        f_clean, f_adv = model(x), model(x_adv)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    ok = (_margin(f_adv, y) >= -tol) | (objective(f_adv, y) >= objective(f_clean, y) - tol)
    assert ok.all()


def test_pgd_clean_misclassified_samples_returned_unchanged() -> None:
    lin, x, y, dist = _linear_problem(3, d=6, batch=20, dtype=torch.float64, seed=3)
    wrong_y = (y + 1) % 3
    y_mixed = torch.where(torch.arange(20) % 2 == 0, wrong_y, y)
    robust, x_adv = robust_accuracy(lin, x, y_mixed, 0.5 * dist, clamp=None, generator=_gen())
    bad = torch.arange(20) % 2 == 0
    assert not robust[bad].any()
    # The clean point already misclassifies: it is the first misclassifying point.
    assert torch.equal(x_adv[bad], x[bad])
    assert robust[~bad].all()


def test_pgd_zero_eps_everywhere_is_identity_without_calling_the_model() -> None:
    class Boom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise AssertionError("model must not be evaluated when nothing may be perturbed")

    x = torch.rand(5, 3)
    out = pgd_l2(Boom(), x, torch.zeros(5, dtype=torch.long), 0.0)
    assert torch.equal(out, x)
    out_t = pgd_l2(Boom(), x, torch.zeros(5, dtype=torch.long), torch.zeros(5))
    assert torch.equal(out_t, x)


@pytest.mark.parametrize("act", [MaxMin(), nn.ReLU()], ids=["maxmin", "relu"])
def test_pgd_never_flips_a_certified_sample(act: nn.Module) -> None:
    # The audit property: margin > bound * eps proves robustness, so no point the attack
    # returns may flip such a sample.
    model = _mlp(32, 32, 5, act, torch.float64, seed=5)
    gen = _gen(5)
    x = torch.rand(128, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    glob, pair = _mlp_bounds(model)
    gaps = logits.gather(1, y[:, None]) - logits  # f_y - f_j
    # Per-sample certified radii from both bounds (pairwise is tighter); 0 where none.
    r_glob = gaps.sort(dim=1).values[:, 1] / glob
    pair_y = pair[y].clone()
    pair_y[torch.arange(128), y] = math.inf
    r_pair = (gaps / pair_y).masked_fill(gaps <= 0, math.inf).amin(dim=1)
    for radius in (r_glob, r_pair):
        assert (radius <= r_pair + 1e-12).all()  # sanity: the pairwise bound is the tighter one
        eps = (radius * (1 - 1e-6)).clamp_min(0.0)
        robust, x_adv = robust_accuracy(model, x, y, eps, steps=30, restarts=3, generator=gen)
        assert robust.all()
        assert (_dist(x_adv, x) <= eps + 1e-12).all()
    # Not vacuous: well beyond the (crude) certified radius the same attack does flip samples.
    robust_far, _ = robust_accuracy(model, x, y, 40 * r_pair, steps=30, restarts=3, generator=gen)
    assert (~robust_far).sum() > 10


def test_pgd_reproducible_with_generator_and_leaves_global_rng_alone() -> None:
    model = _mlp(8, 8, 3, nn.ReLU(), torch.float32, seed=1)
    x = torch.rand(10, 8)
    y = torch.randint(0, 3, (10,))
    state = torch.get_rng_state()
    a = pgd_l2(model, x, y, 0.3, steps=5, restarts=3, generator=_gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    b = pgd_l2(model, x, y, 0.3, steps=5, restarts=3, generator=_gen(7))
    assert torch.equal(a, b)


def test_pgd_works_inside_no_grad_and_for_image_batches() -> None:
    model = _mlp(2 * 3 * 3, 8, 4, MaxMin(), torch.float32, seed=2)
    x = torch.rand(6, 2, 3, 3)
    y = torch.randint(0, 4, (6,))
    with torch.no_grad():
        x_adv = pgd_l2(model, x, y, 0.5, steps=5, restarts=2, generator=_gen())
    assert x_adv.shape == x.shape
    assert not x_adv.requires_grad
    assert (_dist(x_adv, x) <= 0.5 + 1e-6).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pgd_and_lower_bound_on_cuda() -> None:
    lin, x, y, dist = _linear_problem(5, d=10, batch=32, dtype=torch.float32, seed=0)
    lin, x, y, dist = lin.cuda(), x.cuda(), y.cuda(), dist.cuda()
    x_adv = pgd_l2(lin, x, y, 1.05 * dist, clamp=None, generator=_gen())  # CPU generator is fine
    assert x_adv.device == x.device
    assert (_dist(x_adv, x) <= 1.05 * dist.double() + 1e-5).all()
    res = lipschitz_lower(lin, x.sigmoid(), pairs=16, steps=20, lr=1e-2)
    assert res.lipschitz_lower > 0


# --------------------------------------------------------------------------------------------
# Lipschitz lower bound (LOBO)
# --------------------------------------------------------------------------------------------


def _head_pairs(lin: nn.Linear) -> Tensor:
    w = lin.weight.detach().double()
    return (w[:, None, :] - w[None, :, :]).norm(dim=2)


@pytest.mark.parametrize("classes", [2, 5])
def test_lower_bound_linear_reaches_row_difference_norm(classes: int) -> None:
    torch.manual_seed(classes)
    lin = nn.Linear(24, classes).double()
    x = torch.rand(32, 24, dtype=torch.float64)
    pw = _head_pairs(lin)
    with torch.no_grad():
        present = lin(x).argmax(dim=1).unique()
    reachable = pw[present].max().item()  # classes c that are predicted somewhere
    truth = pw.max().item()  # no quotient of any f_c - f_j can exceed this
    res = lipschitz_lower(lin, x, pairs=64, steps=200, lr=1e-2, batch_pairs=32, generator=_gen())
    assert isinstance(res, LipschitzLowerResult)
    assert (res.pairs, res.steps) == (64, 200)
    assert 0.9 * reachable <= res.lipschitz_lower <= truth * (1 + 1e-9) + 1e-12
    # For a linear model the optimum is attained; the optimiser should get essentially there.
    assert res.lipschitz_lower >= reachable * (1 - 1e-4)

    # Scaled by the pairwise norms every quotient is <= 1, and the best approaches 1.
    scaled = lipschitz_lower(lin, x, pairs=64, steps=200, lr=1e-2, pairwise_scale=pw, generator=_gen())
    assert 0.9 <= scaled.lipschitz_lower <= 1 + 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", [MaxMin(), nn.ReLU()], ids=["maxmin", "relu"])
def test_lower_bound_never_exceeds_upper_bounds_on_mlp(dtype: torch.dtype, act: nn.Module) -> None:
    model = _mlp(16, 16, 4, act, dtype, seed=3)
    x = torch.rand(24, 1, 4, 4, dtype=dtype)
    glob, pair = _mlp_bounds(model)
    # float32 logits carry ~1e-7 relative rounding; float64 essentially none.
    slack = 1e-4 if dtype == torch.float32 else 1e-9
    res = lipschitz_lower(model, x, pairs=48, steps=150, lr=1e-2, batch_pairs=24, generator=_gen())
    assert 0 < res.lipschitz_lower <= glob * (1 + slack)
    body = pair[0, 1].item() / _head_pairs(_linears(model)[-1])[0, 1].item()
    scaled = lipschitz_lower(
        model, x, pairs=48, steps=150, lr=1e-2, pairwise_scale=pair / body, generator=_gen()
    )
    # With the head's pairwise norms factored out, what is left is bounded by the body's norm.
    assert 0 < scaled.lipschitz_lower <= body * (1 + slack)


def test_lower_bound_tracks_the_best_step_not_the_last() -> None:
    model = _mlp(16, 16, 4, nn.ReLU(), torch.float64, seed=4)
    x = torch.rand(16, 16, dtype=torch.float64)
    # Same seed: the long run evaluates the same first two iterates as the one-step run, so its
    # maximum can only be larger, even with a step size that throws later iterates around.
    one = lipschitz_lower(model, x, pairs=32, steps=1, lr=0.5, generator=_gen(9))
    many = lipschitz_lower(model, x, pairs=32, steps=60, lr=0.5, generator=_gen(9))
    assert many.lipschitz_lower >= one.lipschitz_lower > 0


def test_lower_bound_with_single_input_and_no_clamp() -> None:
    model = _mlp(6, 8, 3, MaxMin(), torch.float64, seed=6)
    x = torch.randn(1, 6, dtype=torch.float64) * 3  # outside [0, 1]: needs clamp=None
    res = lipschitz_lower(model, x, pairs=8, steps=20, lr=1e-2, clamp=None, generator=_gen())
    glob, _ = _mlp_bounds(model)
    assert 0 < res.lipschitz_lower <= glob


# --------------------------------------------------------------------------------------------
# Side effects on the model
# --------------------------------------------------------------------------------------------


class _ModeSpy(nn.Module):
    """Records the training flag seen by every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(self.training)
        return x


def _spied_model() -> tuple[nn.Sequential, _ModeSpy]:
    torch.manual_seed(0)
    spy = _ModeSpy()
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), spy, nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # a mixed-mode model: the child's own flag must survive too
    model[0].weight.requires_grad_(False)
    return model, spy


def _state(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: pgd_l2(m, x, y, 0.5, steps=3, restarts=2),
        lambda m, x, y: robust_accuracy(m, x, y, 0.5, steps=3, restarts=2),
        lambda m, x, y: lipschitz_lower(m, x, pairs=4, steps=3, lr=1e-2),
    ],
    ids=["pgd_l2", "robust_accuracy", "lipschitz_lower"],
)
def test_model_state_untouched(call) -> None:  # type: ignore[no-untyped-def]
    model, spy = _spied_model()
    before = _state(model)
    x = torch.rand(7, 6)
    y = torch.randint(0, 3, (7,))
    call(model, x, y)
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())
    # It ran in eval mode (dropout off), then gave the flags back.
    assert spy.seen and not any(spy.seen)


def test_model_state_restored_when_the_model_raises() -> None:
    model, _ = _spied_model()
    before = _state(model)
    calls = {"n": 0}

    def explode(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    x = torch.rand(4, 6)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    handle = model.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            # A tiny radius keeps every sample correct, so the attack runs long enough to hit
            # the failing call.
            pgd_l2(model, x, y, 1e-6, steps=5)
    finally:
        handle.remove()
    assert _state(model) == before


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------

_M = nn.Linear(4, 3)
_X = torch.rand(5, 4)
_Y = torch.zeros(5, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"eps": torch.tensor([0.1, 0.2, -0.1, 0.0, 0.3])}, "eps"),
        ({"eps": torch.ones(4)}, "eps"),
        ({"eps": torch.tensor([0.1, math.inf, 0.1, 0.1, 0.1])}, "eps"),
        ({"loss": "hinge"}, "loss"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"step_size": -1.0}, "step_size"),
        ({"clamp": (1.0, 0.0)}, "clamp"),
        ({"clamp": (0.0, 0.5)}, "clamp"),  # inputs outside the box
        ({"target": torch.zeros(4, dtype=torch.long)}, "target"),
        ({"target": torch.zeros(5)}, "target"),
        ({"target": torch.full((5,), 3)}, "target"),
        ({"inputs": torch.zeros(5, 4, dtype=torch.long)}, "inputs"),
    ],
)
def test_pgd_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"inputs": _X, "target": _Y, "eps": 0.1} | kwargs
    with pytest.raises(ValueError, match=name):
        pgd_l2(_M, args.pop("inputs"), args.pop("target"), args.pop("eps"), **args)


def test_loss_error_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"'ce', 'margin'"):
        pgd_l2(_M, _X, _Y, 0.1, loss="cw")


def test_robust_accuracy_rejects_unknown_keyword() -> None:
    with pytest.raises(ValueError, match="pgd_kwargs"):
        robust_accuracy(_M, _X, _Y, 0.1, stepz=3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"pairs": 0}, "pairs"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"batch_pairs": 0}, "batch_pairs"),
        ({"clamp": (0.0, 0.0)}, "clamp"),
        ({"pairwise_scale": torch.ones(2, 2)}, "pairwise_scale"),
        ({"pairwise_scale": torch.zeros(3, 3)}, "pairwise_scale"),
    ],
)
def test_lower_bound_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        lipschitz_lower(_M, _X, **({"pairs": 2, "steps": 2} | kwargs))


def test_pairwise_scale_diagonal_is_ignored() -> None:
    scale = torch.ones(3, 3)
    scale.fill_diagonal_(0.0)  # would be 0/0 if it were used
    res = lipschitz_lower(_M, _X, pairs=4, steps=2, pairwise_scale=scale, generator=_gen())
    assert math.isfinite(res.lipschitz_lower) and res.lipschitz_lower > 0


# --------------------------------------------------------------------------------------------
# Optional AutoAttack wrapper
# --------------------------------------------------------------------------------------------


def test_autoattack_without_torchattacks_says_how_to_install() -> None:
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install --no-deps torchattacks"):
            autoattack_l2(_M, _X, _Y, 0.1)
    else:
        pytest.skip("torchattacks is installed")


def _requires_torchattacks() -> None:
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        pytest.skip("torchattacks is not installed (make setup installs it with --no-deps)")


def _unit_box_problem(classes: int, batch: int, seed: int) -> tuple[nn.Linear, Tensor, Tensor, Tensor]:
    """A linear classifier on inputs in [0, 1]^12 and each input's exact minimal L2 flip distance
    (unconstrained; the box can only make it larger)."""
    lin, x, _, _ = _linear_problem(classes, d=12, batch=batch, dtype=torch.float64, seed=seed)
    x = x.sigmoid()
    with torch.no_grad():
        f = lin(x)
    y = f.argmax(1)
    w = lin.weight.detach()
    gap = f.gather(1, y[:, None]) - f
    row = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)
    dist = torch.where(gap > 0, gap / row.clamp_min(1e-300), torch.full_like(gap, math.inf)).amin(1)
    return lin, x, y, dist


def test_real_apgd_l2_respects_the_ball_and_finds_easy_flips() -> None:
    _requires_torchattacks()
    lin, x, y, dist = _unit_box_problem(5, batch=24, seed=8)
    eps = 0.3
    x_adv = autoattack_l2(lin, x, y, eps, steps=20)
    assert (_dist(x_adv, x) <= eps).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    flipped = _flipped(lin, x_adv, y)
    assert not flipped[dist > eps].any()  # impossible flips never happen
    # Stronger than nothing: it flips at least what a plain PGD run flips.
    pgd = _flipped(lin, pgd_l2(lin, x, y, eps, generator=_gen()), y)
    assert flipped.sum() >= pgd.sum() - 2 and flipped.any()


def test_real_apgd_per_sample_eps() -> None:
    """A (B,) eps runs through torchattacks' APGD as a (B, 1, 1, 1) tensor: equal radii give the very
    result of a scalar run, and mixed radii attack every sample at its own radius."""
    _requires_torchattacks()
    lin, x, y, dist = _unit_box_problem(5, batch=40, seed=3)
    same = autoattack_l2(lin, x, y, torch.full((40,), 0.25, dtype=torch.float64), version="apgd-ce", steps=15)
    scalar = autoattack_l2(lin, x, y, 0.25, version="apgd-ce", steps=15)
    assert torch.equal(same, scalar)
    # Each sample outside (x1.5) or just inside (x0.95) its exact flip distance.
    eps = torch.where(torch.arange(40) % 2 == 0, dist * 1.5, dist * 0.95).clamp(max=3.0)
    for version in ("apgd-ce", "apgd-t"):
        x_adv = autoattack_l2(lin, x, y, eps, version=version, steps=30)
        d = _dist(x_adv, x)
        assert (d <= eps).all()
        flipped = _flipped(lin, x_adv, y)
        assert not flipped[1::2].any()  # inside the exact distance: a flip is impossible
        # outside it (APGD-T groups radii within 2 %): most are found, some at a radius above
        # twice the smallest eps of the batch, so no single scalar eps was used
        assert flipped[0::2].float().mean() >= 0.8
        assert float(d[flipped].max()) > float(eps.min()) * 2


def test_real_apgd_keeps_the_callers_state_and_rng() -> None:
    _requires_torchattacks()
    lin, x, y, _ = _unit_box_problem(5, batch=30, seed=8)
    x = x.reshape(30, 3, 4)  # non-image shape: the wrapper must flatten and restore
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), lin)
    model.train()
    before = _state(model)
    eps = torch.full((30,), 0.2, dtype=torch.float64)
    eps[:10] = 0.0
    eps[10:20] = 0.4
    rng = torch.get_rng_state()
    x_adv = autoattack_l2(model, x, y, eps, version="apgd-ce+apgd-t", steps=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert _state(model) == before
    assert x_adv.shape == x.shape
    assert torch.equal(x_adv[:10], x[:10])
    assert (_dist(x_adv, x) <= eps).all()
    with torch.no_grad():
        flipped = _margin(model.eval()(x_adv), y) >= 0
    model.train()
    assert flipped[10:].any()
    # A point is only replaced when it really flips the sample.
    assert torch.equal(x_adv[10:][~flipped[10:]], x[10:][~flipped[10:]])
    with pytest.raises(ValueError, match="version"):
        autoattack_l2(model, x, y, 0.1, version="apgd-ce+fab")
    with pytest.raises(ValueError, match="apgd-t"):
        autoattack_l2(nn.Linear(12, 3).double(), x.flatten(1), y % 3, 0.1, version="apgd-t")


def test_radius_groups() -> None:
    eps = torch.tensor([0.0, 1.0, 1.01, 1.03, 0.5, 0.505, 2.0], dtype=torch.float64)
    groups = radius_groups(eps, width=0.02)
    assert [(r0, sorted(idx.tolist())) for r0, idx in groups] == [(0.5, [4, 5]), (1.0, [1, 2]), (1.03, [3]), (2.0, [6])]
    assert all(float(eps[idx].min()) == r0 and float(eps[idx].max()) <= r0 * 1.02 for r0, idx in groups)
