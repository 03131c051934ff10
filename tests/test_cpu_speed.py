"""Issue 15: bf16 on the CPU, precision / layout resolution, the fast MaxMin, dataset subsets."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lipmargin import create_model
from lipmargin.config import ConfigError, RunConfig, load_config
from lipmargin.data import ArrayDataset, stratified_subset
from lipmargin.nn import CPLConv2d, GroupSort, MaxMin, SOCConv2d, max_min_pairs
from lipmargin.train import (
    TrainingError,
    TrainStep,
    cpu_flags,
    fit,
    load_run_data,
    resolve_channels_last,
    resolve_hardware,
    resolve_precision,
)

# --------------------------------------------------------------------------------------------
# MaxMin / GroupSort: the same function as the plain autograd formulation
# --------------------------------------------------------------------------------------------


def reference_max_min(x: torch.Tensor) -> torch.Tensor:
    """The previous MaxMin: slices, torch.maximum / torch.minimum, cat (autograd does the rest)."""
    c = x.shape[1]
    a, b = x[:, : c // 2], x[:, c // 2 :]
    return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, ties: bool, gen: torch.Generator) -> torch.Tensor:
    if ties:  # few distinct values: about a third of the pairs tie
        return torch.randint(-1, 2, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(5, 6), (3, 8, 4, 5)])
def test_max_min_matches_reference_outputs_and_gradients(dtype, ties, shape):
    gen = torch.Generator().manual_seed(7)
    x = _inputs(shape, dtype, ties, gen)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    x_new, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_new, y_ref = MaxMin()(x_new), reference_max_min(x_ref)
    (y_new * g).sum().backward()
    (y_ref * g).sum().backward()
    if ties:
        assert bool((x[:, : shape[1] // 2] == x[:, shape[1] // 2 :]).any())  # the case is exercised
    # Bit-identical: the same max / min outputs, and the same half-half split of a tie's gradient.
    assert torch.equal(y_new, y_ref)
    assert torch.equal(x_new.grad, x_ref.grad)


def test_max_min_keeps_channels_last_and_its_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, 4, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    y = MaxMin()(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = reference_max_min(x.detach())
    assert torch.equal(y, ref)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # each output takes exactly one input (no ties)


def test_max_min_double_backward_matches_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 6, dtype=torch.float64, generator=gen)

    def grad_norm(act, x):
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(act(x @ w).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), x)[0]

    torch.testing.assert_close(grad_norm(MaxMin(), x), grad_norm(reference_max_min, x))


def test_max_min_nan_propagates_like_maximum():
    x = torch.tensor([[float("nan"), 1.0, 2.0, 0.0]])
    assert torch.equal(MaxMin()(x).isnan(), reference_max_min(x).isnan())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_group_sort_two_matches_sort(dtype):
    gen = torch.Generator().manual_seed(5)
    x = _inputs((4, 8, 3, 3), dtype, True, gen)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    x_new, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_new = GroupSort(2)(x_new)
    y_ref = x_ref.reshape(4, 4, 2, 3, 3).sort(dim=2, descending=True).values.reshape(x.shape)
    assert torch.equal(y_new, y_ref)
    (y_new * g).sum().backward()
    (y_ref * g).sum().backward()
    a, b = x[:, 0::2], x[:, 1::2]
    tie = (a == b).repeat_interleave(2, dim=1)
    assert bool(tie.any())
    # Away from ties the gradient is the permutation's; at a tie sort hands each output's gradient
    # to one input (which one is unspecified), the fast path half of each to both: the pair sums agree.
    assert torch.equal(x_new.grad[~tie], x_ref.grad[~tie])
    pair_sum = lambda t: t[:, 0::2] + t[:, 1::2]  # noqa: E731
    torch.testing.assert_close(pair_sum(x_new.grad), pair_sum(x_ref.grad))


def test_max_min_pairs_rejects_odd_channels():
    with pytest.raises(ValueError, match="even number of channels"):
        max_min_pairs(torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------
# Precision and layout resolution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (frozenset({"avx2", "fma", "amx_bf16", "amx_tile"}), "bf16"),
        (frozenset({"avx512f", "avx512_bf16"}), "bf16"),
        (frozenset({"avx2", "avx512f", "avx512bw"}), "fp32"),  # AVX-512 without bf16: no fast path
        (frozenset(), "fp32"),
    ],
)
def test_auto_precision_on_cpu_follows_the_flags(flags, expected):
    assert resolve_precision("auto", torch.device("cpu"), flags=flags) == expected


def test_auto_precision_on_cuda_and_explicit_values():
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda, cuda_bf16=True) == "bf16"
    assert resolve_precision("auto", cuda, cuda_bf16=False) == "fp32"
    for explicit in ("fp32", "bf16", "fp64"):
        assert resolve_precision(explicit, torch.device("cpu"), flags=frozenset({"amx_bf16"})) == explicit


def test_cpu_flags_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "amx_bf16", "amx_tile"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_channels_last_rule_and_override():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_channels_last(None, cpu, "fp32") is False
    assert resolve_channels_last(None, cpu, "bf16") is True
    assert resolve_channels_last(None, cuda, "bf16") is True
    assert resolve_channels_last(None, cuda, "fp64") is False
    assert resolve_channels_last(True, cpu, "fp32") is True
    assert resolve_channels_last(False, cuda, "bf16") is False


def test_resolve_hardware_writes_concrete_values():
    cfg = load_config(preset="digits-cll", overrides=["train.precision=auto"])
    resolved = resolve_hardware(cfg, torch.device("cpu"))
    assert resolved.train.precision in ("fp32", "bf16")
    assert isinstance(resolved.train.channels_last, bool)
    with pytest.raises(ConfigError, match="train.precision must be"):
        load_config(preset="digits-cll", overrides=["train.precision=half"])


# --------------------------------------------------------------------------------------------
# bf16 on the CPU: autocast covers the forward only
# --------------------------------------------------------------------------------------------


def test_bf16_train_step_on_cpu_is_finite_and_power_iteration_stays_fp32():
    torch.manual_seed(0)
    model = create_model("2C2F", (1, 8, 8), 10, width=4, dense_width=16)
    fp32_model = copy.deepcopy(model)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    logits, k = TrainStep(model, 5, "bf16")(x)
    logits32, k32 = TrainStep(fp32_model, 5, "fp32")(x)
    assert logits.dtype == torch.float32 and k.dtype == torch.float32
    # The forward ran in bfloat16 (its logits differ from fp32's by bf16 rounding, not more)...
    assert not torch.equal(logits, logits32)
    torch.testing.assert_close(logits, logits32, rtol=0.05, atol=0.05)
    # ... and the power iteration did not: the same vectors and K, bit for bit.
    assert torch.equal(k, k32)
    for name, buf in model.bound.named_buffers():
        assert buf.dtype == torch.float32
        assert torch.equal(buf, dict(fp32_model.bound.named_buffers())[name])
    loss = F.cross_entropy(logits, y) + 1e-4 * k**2
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("make", [
    lambda: CPLConv2d(4, 6, (6, 6), init_iters=3),
    lambda: SOCConv2d(4, 4, 3, init_iters=3),
])
def test_layer_power_iterations_ignore_an_outer_autocast(make):
    torch.manual_seed(0)
    layer = make().train()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    twin_out = twin(x)
    assert not torch.equal(out.float(), twin_out)  # the layer's convolutions did run in bf16
    torch.testing.assert_close(out.float(), twin_out, rtol=0.05, atol=0.05)
    for (name, buf), twin_buf in zip(layer.named_buffers(), twin.buffers()):
        assert buf.dtype == torch.float32, name
        assert torch.equal(buf, twin_buf), name  # advanced exactly as in float32


def test_feature_bound_ignores_an_outer_autocast():
    torch.manual_seed(0)
    model = create_model("2C2F", (1, 8, 8), 10, width=4, dense_width=16).train()
    twin = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k, _ = model.feature_lipschitz(4)
    k32, _ = twin.feature_lipschitz(4)
    assert k.dtype == torch.float32
    assert torch.equal(k, k32)


def test_fit_in_bf16_on_cpu(tmp_path):
    cfg = load_config(preset="digits-cll", overrides=[
        "train.precision=bf16", "train.epochs=1", "data.train_size=256", "data.test_size=100",
        "model.width=4", "train.device=cpu",
    ])
    summary = fit(cfg, tmp_path / "run")
    assert summary["precision"] == "bf16" and summary["channels_last"] is True
    assert summary["num_samples"] == 100
    assert 0.0 <= summary["clean_accuracy"] <= 1.0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "precision: bf16" in saved and "channels_last: true" in saved


# --------------------------------------------------------------------------------------------
# data.train_size / data.test_size
# --------------------------------------------------------------------------------------------


def _toy(n_per_class: tuple[int, ...]) -> ArrayDataset:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(n_per_class)])
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
    labels = labels[perm]
    inputs = torch.arange(labels.numel(), dtype=torch.float32)[:, None]  # the original index
    return ArrayDataset(inputs, labels, len(n_per_class), "toy")


def test_subset_is_deterministic_stratified_and_ordered():
    ds = _toy((50, 30, 20))
    a = stratified_subset(ds, 10, seed=3)
    b = stratified_subset(ds, 10, seed=3)
    c = stratified_subset(ds, 10, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    idx = a.inputs[:, 0].long()
    assert torch.equal(idx, idx.sort().values)  # original order kept
    assert torch.equal(ds.labels[idx], a.labels)  # inputs and labels stay paired
    assert torch.bincount(a.labels, minlength=3).tolist() == [5, 3, 2]  # exact proportions
    # Rounding: 7 of (50, 30, 20) -> 3.5, 2.1, 1.4 -> floors 3, 2, 1, the left-over one to class 0.
    assert torch.bincount(stratified_subset(ds, 7, seed=0).labels, minlength=3).tolist() == [4, 2, 1]
    assert len(stratified_subset(ds, 100, seed=0)) == 100
    assert torch.equal(stratified_subset(ds, 100, seed=0).labels, ds.labels)
    with pytest.raises(ValueError, match="1..100"):
        stratified_subset(ds, 101, seed=0)


def test_subset_config_values_and_run_data():
    with pytest.raises(ConfigError, match="data.train_size must be"):
        load_config(preset="digits-cll", overrides=["data.train_size=0"])
    with pytest.raises(ConfigError, match="data.test_size"):
        load_config(preset="digits-cll", overrides=["data.test_size=-3"])
    with pytest.raises(ConfigError, match="data.train_size"):
        load_config(preset="digits-cll", overrides=["data.train_size=half"])
    cfg = load_config(preset="digits-cll", overrides=["data.train_size=200", "data.test_size=50", "train.seed=2"])
    data = load_run_data(cfg)
    again = load_run_data(cfg)
    full = load_run_data(load_config(preset="digits-cll"))
    assert len(data.train) == 200 and len(data.eval) == 50
    assert torch.equal(data.train.inputs, again.train.inputs) and torch.equal(data.eval.labels, again.eval.labels)
    counts = torch.bincount(data.train.labels, minlength=10).float()
    expected = torch.bincount(full.train.labels, minlength=10).float() * 200 / len(full.train)
    assert bool(((counts - expected).abs() < 1).all())
    other = load_run_data(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=3)))
    assert not torch.equal(data.train.inputs, other.train.inputs)
    too_many = load_config(preset="digits-cll", overrides=[f"data.test_size={len(full.eval) + 1}"])
    with pytest.raises(TrainingError, match=r"data.test_size=\d+ is more than the \d+ samples"):
        load_run_data(too_many)


def test_run_config_default_keeps_every_sample():
    assert RunConfig().data.train_size is None and RunConfig().data.test_size is None


# --------------------------------------------------------------------------------------------
# SOC on few pixels: the dense-matrix path is the same map as the convolution series
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "kernel", "size"), [(6, 3, (2, 2)), (4, 3, (1, 2)), (8, 1, (1, 1))])
@pytest.mark.parametrize("training", [True, False])
def test_soc_dense_path_matches_the_conv_series(channels, kernel, size, training):
    from lipmargin.nn import conv_matrix

    torch.manual_seed(0)
    dense = SOCConv2d(channels, channels, kernel, init_iters=5).double().train(training)
    conv = copy.deepcopy(dense)
    conv.dense_pixels = 0  # force the convolution series
    assert dense.dense_pixels >= size[0] * size[1]
    x = torch.randn(3, channels, *size, dtype=torch.float64)
    y_dense, y_conv = dense(x), conv(x)
    torch.testing.assert_close(y_dense, y_conv, rtol=1e-12, atol=1e-12)
    y_dense.square().sum().backward()
    y_conv.square().sum().backward()
    torch.testing.assert_close(dense.weight.grad, conv.weight.grad, rtol=1e-10, atol=1e-12)
    # The matrix itself against conv2d applied to the identity basis (an independent construction).
    k = torch.randn(channels, channels, kernel, kernel, dtype=torch.float64)
    n = channels * size[0] * size[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, channels, *size)
    columns = F.conv2d(basis, k, padding=kernel // 2).reshape(n, n)  # row j = M e_j
    torch.testing.assert_close(conv_matrix(k, size, kernel // 2), columns.t(), rtol=0, atol=1e-13)
