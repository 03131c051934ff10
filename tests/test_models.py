"""Every registered model obeys its Lipschitz bounds; registry and architectures match docs/method.md."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lipmargin.certify import ModelBound, model_bound
from lipmargin.nn import MaxMin
from lipmargin.models import BACKBONES, MODELS, LipschitzNet, create_model, list_models, register_model

f64 = torch.float64

SMALL_CONV = {"width": 8, "dense_width": 32}  # the paper's layouts, narrow enough for CPU tests

#: (model, input shape, options) covering every registered model; 2C2F is also tried on 8x8 inputs.
MODEL_CASES = [
    ("2C2F", (1, 28, 28), SMALL_CONV),
    ("2C2F", (1, 8, 8), {}),
    ("4C3F", (1, 28, 28), SMALL_CONV),
    ("6C2F", (1, 28, 28), SMALL_CONV),
    ("8C2F", (1, 28, 28), SMALL_CONV),
    ("mlp", (1, 8, 8), {}),
    ("moons-mlp", (2,), {}),
]
NUM_CLASSES = 5


def _case_id(case: tuple) -> str:
    name, shape, options = case
    return f"{name}-{'x'.join(map(str, shape))}{'-narrow' if options else ''}"


def test_cases_cover_every_registered_model() -> None:
    # A newly registered model must be added to MODEL_CASES so that its bound gets tested; the
    # 1-Lipschitz backbones are covered by tests/test_onelip.py (its MODEL_CASES check).
    assert {name for name, _, _ in MODEL_CASES} == set(list_models()) - set(BACKBONES)


@dataclass
class Trained:
    model: LipschitzNet  # float32, as trained
    model64: LipschitzNet  # a float64 copy for the numerical checks
    sound: ModelBound
    power: ModelBound


def _train_a_little(model: LipschitzNet, steps: int = 3) -> None:
    """A few Adam steps on random data so the weights are no longer the plain initialisation."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.rand(16, *model.in_shape)
        y = torch.randint(0, model.num_classes, (16,))
        k, _ = model.feature_lipschitz(2)
        loss = F.cross_entropy(model(x), y) + 1e-4 * k**2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module", params=MODEL_CASES, ids=_case_id)
def trained(request: pytest.FixtureRequest) -> Trained:
    name, shape, options = request.param
    torch.manual_seed(1)
    model = create_model(name, shape, NUM_CLASSES, **options)
    _train_a_little(model)
    sound = model_bound(model, "sound")
    power = model_bound(model, "power")
    model64 = copy.deepcopy(model).to(f64).eval()
    return Trained(model, model64, sound, power)


def _pair_differences(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, :, None] - logits[:, None, :]  # (B, C, C): f_i - f_j


def _pairs(in_shape: tuple[int, ...], n: int, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Far pairs (two random inputs) and close pairs (x' = x + small delta), float64 in [0, 1]."""
    x = torch.rand(n, *in_shape, generator=g, dtype=f64)
    far = torch.rand(n, *in_shape, generator=g, dtype=f64)
    out = [(x, far)]
    for scale in (1e-2, 1e-4):
        out.append((x, x + scale * torch.randn(n, *in_shape, generator=g, dtype=f64)))
    return out


def _ratios(model64: LipschitzNet, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``||f(x) - f(x')|| / ||x - x'||`` (B,) and ``|D(x) - D(x')| / ||x - x'||`` (B, C, C)."""
    dist = (x - x2).flatten(1).norm(dim=1)  # (B,)
    f1, f2 = model64(x), model64(x2)
    whole = (f1 - f2).norm(dim=1) / dist
    pair = (_pair_differences(f1) - _pair_differences(f2)).abs() / dist[:, None, None]
    return whole, pair


@pytest.mark.parametrize("method", ["sound", "power"])
def test_random_pairs_respect_the_bound(trained: Trained, method: str) -> None:
    bound = trained.sound if method == "sound" else trained.power
    # "power" is an estimate: only allow for the stopping rule of the converged iteration.
    slack = 1 + 1e-9 if method == "sound" else 1 + 1e-6
    head_norm = float(torch.linalg.matrix_norm(trained.model.head.weight.detach().double(), 2))
    g = torch.Generator().manual_seed(2)
    for x, x2 in _pairs(trained.model.in_shape, 32, g):
        with torch.no_grad():
            whole, pair = _ratios(trained.model64, x, x2)
        assert (whole > 0).all()  # the pairs do move the output: the check is not vacuous
        assert float(whole.max()) <= bound.feature * head_norm * slack
        assert (pair <= bound.pairwise * slack).all(), float((pair / bound.pairwise.clamp_min(1e-300)).max())


def test_maximised_ratio_stays_below_sound_bound(trained: Trained) -> None:
    """Gradient ascent on both points of each pair, on the ratio normalised by the pairwise bound."""
    model64, pairwise = trained.model64, trained.sound.pairwise
    off_diag = ~torch.eye(NUM_CLASSES, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, *model64.in_shape, generator=g, dtype=f64).requires_grad_(True)
    x2 = (x.detach() + 1e-2 * torch.randn(x.shape, generator=g, dtype=f64)).requires_grad_(True)
    for p in model64.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([x, x2], lr=1e-2)
    best = 0.0
    for _ in range(25):
        _, pair = _ratios(model64, x, x2)
        tight = (pair / torch.where(off_diag, pairwise, torch.ones_like(pairwise)))[:, off_diag]  # (B, C(C-1))
        worst = tight.amax(1)  # (B,)
        best = max(best, float(worst.max().detach()))
        assert best <= 1 + 1e-9
        opt.zero_grad()
        (-worst.sum()).backward()
        opt.step()
    assert best > 0


def test_sound_bound_is_tight_for_a_linear_model() -> None:
    # f(x) = W flatten(x) + b: f_i - f_j is exactly (W_i - W_j)-linear, so the pairwise bound is
    # attained along W_i - W_j and the sound bound may only carry its tiny rounding margin.
    model = LipschitzNet(nn.Sequential(nn.Flatten()), nn.Linear(12, 4), (3, 2, 2)).double().eval()
    bound = model_bound(model, "sound")
    assert bound.feature == pytest.approx(1.0, rel=1e-9)
    w = model.head.weight.detach()
    x = torch.rand(1, 3, 2, 2, dtype=f64)
    for i in range(4):
        for j in range(4):
            if i != j:
                x2 = x + 0.1 * (w[i] - w[j]).reshape(1, 3, 2, 2)
                with torch.no_grad():
                    _, pair = _ratios(model, x, x2)
                assert float(pair[0, i, j]) == pytest.approx(float(bound.pairwise[i, j]), rel=1e-8)


def test_sound_bound_is_above_power_estimate(trained: Trained) -> None:
    sound, power = trained.sound, trained.power
    assert sound.sound and not power.sound
    assert (sound.method, power.method) == ("sound", "power")
    assert len(sound.per_layer) == len(power.per_layer)
    for s, p in zip(sound.per_layer, power.per_layer):
        assert s >= p * (1 - 1e-9)
    assert sound.feature >= power.feature * (1 - 1e-9)
    assert sound.lipschitz >= power.lipschitz * (1 - 1e-9)
    assert (sound.pairwise >= power.pairwise * (1 - 1e-9)).all()
    # The bookkeeping of a ModelBound: feature = product of the layers, lipschitz = the largest pair.
    assert sound.feature == pytest.approx(math.prod(sound.per_layer), rel=1e-9)
    assert power.feature == pytest.approx(math.prod(power.per_layer), rel=1e-12)
    assert sound.lipschitz == float(sound.pairwise.max())
    w = trained.model.head.weight.detach().double()
    assert_close(power.pairwise, power.feature * torch.cdist(w, w), rtol=1e-8, atol=0)  # ||W_i - W_j||
    assert torch.equal(torch.diagonal(sound.pairwise), torch.zeros(NUM_CLASSES, dtype=f64))


def test_output_shape_and_pairwise_lipschitz(trained: Trained) -> None:
    model = trained.model
    x = torch.rand(3, *model.in_shape)
    assert model(x).shape == (3, NUM_CLASSES)
    assert model.num_classes == NUM_CLASSES
    k, _ = model.feature_lipschitz()
    # A power-iteration estimate: positive and (up to float32 rounding) below the sound bound,
    # which is computed independently (sound per-layer norm bounds in float64).
    assert 0 < float(k.detach()) <= trained.sound.feature * (1 + 1e-5)
    w = model.head.weight.detach()
    assert_close(model.pairwise_lipschitz(k).detach(), k.detach() * torch.cdist(w, w))  # K ||W_i - W_j||
    # The power-iteration vectors travel with the model's state.
    assert any(key.startswith("bound.v") for key in model.state_dict())


def _known_net() -> LipschitzNet:
    """Features ``0.5 Q MaxMin(diag(3, 2, 1, 0.5) x)`` (``Q`` orthogonal): layer norms 3, 1, 0.5."""
    first, last = nn.Linear(4, 4, bias=False, dtype=f64), nn.Linear(4, 4, bias=False, dtype=f64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=f64))
    with torch.no_grad():
        first.weight.copy_(torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=f64)))
        last.weight.copy_(0.5 * q)
    return LipschitzNet(nn.Sequential(first, MaxMin(), last), nn.Linear(4, 3, dtype=f64), (4,))


def test_feature_estimate_converges_to_the_closed_form() -> None:
    model = _known_net().train()
    k0, _ = model.feature_lipschitz(1)
    assert 0 < float(k0.detach()) <= 1.5 * (1 + 1e-12)  # an estimate from below after one step
    k, sigmas = model.feature_lipschitz(200)
    # per-layer norms 3 (the largest diagonal entry), 1 (MaxMin) and 0.5 (half an orthogonal matrix)
    assert sorted(float(s) for s in sigmas.detach()) == pytest.approx([0.5, 1.0, 3.0], rel=1e-12)
    assert float(k.detach()) == pytest.approx(1.5, rel=1e-12)
    # K = sigma_1(W1) * 0.5 carries gradients: d sigma_1 / dW1 = u v^T = e_1 e_1^T
    (grad,) = torch.autograd.grad(k, model.features[0].weight)
    expected = torch.zeros(4, 4, dtype=f64)
    expected[0, 0] = 0.5
    assert_close(grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["4C3F", "6C2F", "8C2F", "2C2F"])
def test_full_width_models_respect_sound_bound(name: str) -> None:
    model = create_model(name, (1, 28, 28), NUM_CLASSES).eval()
    bound = model_bound(model, "sound")
    model64 = copy.deepcopy(model).to(f64)
    g = torch.Generator().manual_seed(4)
    for x, x2 in _pairs(model.in_shape, 8, g):
        with torch.no_grad():
            _, pair = _ratios(model64, x, x2)
        assert (pair <= bound.pairwise * (1 + 1e-9)).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["4C3F", "6C2F", "8C2F"])
def test_full_width_sound_bound_above_converged_power(name: str) -> None:
    # Converging the power iteration of the full-width conv nets takes up to ~100 s on a CPU.
    model = create_model(name, (1, 28, 28), NUM_CLASSES).eval()
    sound, power = model_bound(model, "sound"), model_bound(model, "power")
    for s, p in zip(sound.per_layer, power.per_layer):
        assert s >= p * (1 - 1e-9)
    assert sound.lipschitz >= power.lipschitz * (1 - 1e-9)


# --------------------------------------------------------------------------------------------
# Registry and architectures
# --------------------------------------------------------------------------------------------


def test_create_model_unknown_name_lists_models() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'") as info:
        create_model("resnet", (3, 32, 32), 10)
    for name in list_models():
        assert name in str(info.value)


def test_create_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", (4,), 1)
    with pytest.raises(ValueError, match="4C3F"):
        create_model("4C3F", (2,), 2)
    with pytest.raises(ValueError, match="too small"):
        create_model("8C2F", (1, 8, 8), 2)
    with pytest.raises(ValueError, match="even"):
        create_model("mlp", (4,), 2, widths=(5,))


def test_unknown_option_is_a_type_error_naming_the_options() -> None:
    with pytest.raises(TypeError, match=r"unknown options \['widht'\]; it takes \['dense_width', 'width'\]"):
        create_model("4C3F", (1, 28, 28), 10, widht=8)
    with pytest.raises(TypeError, match="depth"):  # the depth of lipconvnet-10 is its name, not an option
        create_model("lipconvnet-10", (1, 32, 32), 10, depth=5)


def test_register_model_rejects_duplicates_and_registers_factories() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda in_shape, num_classes: None)
    try:
        @register_model("test-tiny", "a one-layer test model")
        def _tiny(in_shape: tuple[int, ...], num_classes: int) -> LipschitzNet:
            return LipschitzNet(nn.Sequential(nn.Linear(in_shape[0], 4), MaxMin()), nn.Linear(4, num_classes), in_shape)

        assert "test-tiny" in list_models()
        assert MODELS["test-tiny"].description == "a one-layer test model"
        assert create_model("test-tiny", (3,), 2)(torch.rand(2, 3)).shape == (2, 2)
    finally:
        MODELS.pop("test-tiny", None)


def test_lipschitz_net_checks_head() -> None:
    with pytest.raises(TypeError, match="nn.Linear"):
        LipschitzNet(nn.Sequential(nn.Linear(3, 4)), nn.Sequential(nn.Linear(4, 2)), (3,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head expects"):
        LipschitzNet(nn.Sequential(nn.Linear(3, 4)), nn.Linear(5, 2), (3,))


def _affine_layers(model: LipschitzNet) -> list[nn.Module]:
    return [m for m in model.features.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _conv_layout(model: LipschitzNet) -> list[tuple[int, int, int, int, int]]:
    return [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
        for m in model.features.modules() if isinstance(m, nn.Conv2d)
    ]


def _dense_layout(model: LipschitzNet) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.features.modules() if isinstance(m, nn.Linear)]


def _assert_maxmin_after_every_layer(model: LipschitzNet) -> None:
    layers = list(model.features)
    for i, m in enumerate(layers):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert isinstance(layers[i + 1], MaxMin), f"layer {i} ({m}) is not followed by MaxMin"
    assert isinstance(model.head, nn.Linear)


def test_4c3f_layout() -> None:
    model = create_model("4C3F", (3, 32, 32), 10)
    assert _conv_layout(model) == [(3, 32, 3, 1, 1), (32, 32, 3, 2, 1), (32, 64, 3, 1, 1), (64, 64, 3, 2, 1)]
    assert _dense_layout(model) == [(4096, 512), (512, 512)]
    assert (model.head.in_features, model.head.out_features) == (512, 10)
    _assert_maxmin_after_every_layer(model)


def test_6c2f_layout() -> None:
    model = create_model("6C2F", (3, 32, 32), 10)
    assert _conv_layout(model) == [
        (3, 32, 3, 1, 1), (32, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 1),
    ]
    assert _dense_layout(model) == [(4096, 512)]
    assert (model.head.in_features, model.head.out_features) == (512, 10)
    _assert_maxmin_after_every_layer(model)


def test_8c2f_layout() -> None:
    model = create_model("8C2F", (3, 64, 64), 200)
    assert _conv_layout(model) == [
        (3, 64, 3, 1, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 0),
        (64, 128, 3, 1, 1), (128, 128, 3, 1, 1), (128, 128, 4, 2, 0),
        (128, 256, 3, 1, 1), (256, 256, 4, 2, 0),
    ]
    assert _dense_layout(model) == [(9216, 256)]
    assert (model.head.in_features, model.head.out_features) == (256, 200)
    _assert_maxmin_after_every_layer(model)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 200)


def test_moons_mlp_layout() -> None:
    model = create_model("moons-mlp", (2,), 2)
    assert _dense_layout(model) == [(2, 10), (10, 20), (20, 40), (40, 40), (40, 20), (20, 10)]
    assert (model.head.in_features, model.head.out_features) == (10, 2)
    _assert_maxmin_after_every_layer(model)


@pytest.mark.parametrize("name, shape", [("4C3F", (3, 32, 32)), ("6C2F", (3, 32, 32)), ("2C2F", (1, 28, 28)),
                                         ("mlp", (1, 8, 8)), ("moons-mlp", (2,))])
def test_kaiming_normal_init_with_zero_bias(name: str, shape: tuple[int, ...]) -> None:
    model = create_model(name, shape, 10)
    for m in [*_affine_layers(model), model.head]:
        assert m.bias is not None and torch.equal(m.bias, torch.zeros_like(m.bias)), m
        w = m.weight.detach()
        fan_in = w[0].numel()
        if w.numel() >= 4096:  # enough weights for the empirical std to be within a few per cent
            assert float(w.std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.1), m
            assert abs(float(w.mean())) < 0.1 * math.sqrt(2 / fan_in), m
