"""The two gradient variants of the authors' code (issue 19): ``train.power_grad=unrolled`` and
``loss.gloro_head_gradient``, each checked against a plain-torch re-derivation of its gradient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lipmargin.config import ConfigError, load_config
from lipmargin.losses import TRAIN_LOSSES
from lipmargin.models import create_model
from lipmargin.train import fit
from lipmargin.train.batched import train_group


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("moons-mlp", (2,), 2).double().train()


def _linear_layers(model: nn.Module) -> list[tuple[nn.Linear, torch.Tensor]]:
    bound = model.bound
    return [(m, getattr(bound, name)) for m, name in zip(bound.layers, bound.vector_names) if name is not None]


def _hand_k(model: nn.Module, n_iter: int, unrolled: bool) -> torch.Tensor:
    """prod_l ||W_l u_l|| / ||u_l||, u_l = n_iter steps u <- W^T W u / ||W^T W u|| from the stored
    vector, written with plain matrix products (the MLP's other layers are MaxMin: factor 1)."""
    k = torch.ones((), dtype=torch.float64)
    for layer, v in _linear_layers(model):
        w = layer.weight
        u = v.detach().reshape(-1)
        with torch.set_grad_enabled(unrolled):
            for _ in range(n_iter):
                u = w.T @ (w @ u)
                u = u / u.norm()
        if not unrolled:
            u = u.detach()
        k = k * (w @ u).norm() / u.norm()
    return k


@pytest.mark.parametrize("unrolled", [False, True])
def test_k_gradient_matches_a_hand_derivation(unrolled: bool) -> None:
    model = _mlp()
    hand = _mlp()
    hand.load_state_dict(model.state_dict())
    k, _ = model.feature_lipschitz(3, unrolled)
    k.backward()
    k_ref = _hand_k(hand, 3, unrolled)
    k_ref.backward()
    assert float(k.detach()) == pytest.approx(float(k_ref.detach()), rel=1e-12)
    for (layer, _), (ref, _) in zip(_linear_layers(model), _linear_layers(hand)):
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-12)
    # The stored vectors advanced as in the detached mode, and they carry no graph.
    for (_, v), (_, v_ref) in zip(_linear_layers(model), _linear_layers(hand)):
        assert not v.requires_grad


def test_unrolled_and_detached_gradients_differ_from_fresh_vectors_and_agree_at_convergence() -> None:
    def grads(model: nn.Module, unrolled: bool) -> list[torch.Tensor]:
        model.zero_grad()
        state = {n: b.clone() for n, b in model.named_buffers()}
        k, _ = model.feature_lipschitz(2, unrolled)
        k.backward()
        for n, b in model.named_buffers():  # the same starting vectors for the other mode
            b.copy_(state[n])
        return [layer.weight.grad.clone() for layer, _ in _linear_layers(model)]

    model = _mlp(1)
    fresh = [torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b) for a, b in zip(grads(model, True), grads(model, False))]
    assert max(fresh) > 0.05  # random vectors: the steps' own gradient is large
    model.bound.converge(tol=1e-15)
    conv = [torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b) for a, b in zip(grads(model, True), grads(model, False))]
    assert max(conv) < 1e-5  # at a singular vector d(||Av||/||v||)/dv = 0


def _gloro_cfg(head_gradient: bool):
    return load_config(None, preset="moons-gloro", overrides=[f"loss.gloro_head_gradient={str(head_gradient).lower()}"]).loss


def test_gloro_head_gradient_keeps_the_loss_and_adds_the_log_distance_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    model = _mlp(2)
    x = torch.randn(64, 2, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (64,), generator=gen)
    k0 = torch.tensor(3.0, dtype=torch.float64)

    def run(head_gradient: bool, k_value: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        model.zero_grad()
        k = k_value.clone().requires_grad_()
        loss = TRAIN_LOSSES["gloro"](_gloro_cfg(head_gradient))(model(x), y, model, k, 0.5)
        loss.backward()
        return float(loss.detach()), model.head.weight.grad.clone(), k.grad.clone()

    plain_loss, plain_head, dl_dk = run(False, k0)
    loss, head, _ = run(True, k0)
    assert loss == pytest.approx(plain_loss, rel=1e-14)
    # Independent: d = max_ij ||W_i - W_j|| by cdist; the extra gradient is dL/dK * K * grad(log d).
    w = model.head.weight.detach().clone().requires_grad_()
    torch.log(torch.cdist(w, w).max()).backward()
    torch.testing.assert_close(head - plain_head, dl_dk * k0 * w.grad, rtol=1e-9, atol=1e-12)
    assert torch.linalg.vector_norm(head - plain_head) > 1e-6


def test_bad_power_grad_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.power_grad must be detached or unrolled; got 'both'"):
        load_config(None, preset="moons-gloro", overrides=["train.power_grad=both"])


def test_batched_members_follow_both_options(tmp_path: Path) -> None:
    base = ["train.epochs=2", "train.precision=fp64", "train.power_grad=unrolled", "loss.gloro_head_gradient=true", "eval.batch_size=5000"]
    cfgs = [load_config(None, preset="moons-gloro", overrides=base + [f"train.seed={s}"]) for s in (0, 1)]
    train_group([(c, tmp_path / f"b{i}") for i, c in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        fit(cfg, tmp_path / f"s{i}")
        got, want = (
            [json.loads(line) for line in (tmp_path / f"{kind}{i}" / "metrics.jsonl").read_text().splitlines()]
            for kind in ("b", "s")
        )
        for a, b in zip(got, want):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
            assert a["lipschitz_per_layer"] == pytest.approx(b["lipschitz_per_layer"], rel=1e-9)
    # ... and the options change training (the test would pass vacuously if they were ignored).
    plain = load_config(None, preset="moons-gloro", overrides=[
        "train.epochs=2", "train.precision=fp64", "eval.batch_size=5000", "train.power_grad=detached", "loss.gloro_head_gradient=false",
    ])
    fit(plain, tmp_path / "plain")
    last = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1]) for name in ("s0", "plain")]
    assert last[0]["train_loss"] != pytest.approx(last[1]["train_loss"], rel=1e-9)
