"""Paths the README advertises, each exercised end to end (issue 17): TensorBoard event files read
back, ``train.compile``, ``channels_last`` and bf16 training steps.  (ONNX export checked with
onnxruntime lives in test_export.py; bf16 fit on the CPU also in test_cpu_speed.py.)"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from lipmargin.cli import main
from lipmargin.models import create_model
from lipmargin.train import TrainStep


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    argv = ["train", "--preset", "moons-cll", "--set", "train.epochs=3", "--set", "eval.every=1",
            "--set", "train.batch_size=500", "--out", str(run), "--quiet"]
    assert main(argv) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "clean_accuracy", "lipschitz"} <= tags
    records = [r for r in _metrics(run) if "train_loss" in r]
    assert [int(r["epoch"]) for r in records] == [1, 2, 3]
    for tag in ("train_loss", "clean_accuracy", "lipschitz"):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        expected = {int(r["epoch"]): float(r[tag]) for r in records if tag in r}
        assert expected and set(logged) == set(expected), tag
        for step, value in expected.items():  # event files hold float32
            assert logged[step] == pytest.approx(value, rel=1e-6), (tag, step)


def _step_outputs(step: TrainStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    step.model.zero_grad()
    logits, k = step(x)
    (logits.square().mean() + k).backward()
    return logits.detach(), k.detach(), [p.grad.clone() for p in step.model.parameters()]


def test_compiled_train_step_matches_the_eager_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile`` wraps the step in ``torch.compile``.  Dynamo traces the real step here, with the
    ``aot_eager`` backend (inductor's C++ build takes minutes on two cores); values and gradients must
    match the eager step."""
    torch.manual_seed(0)
    eager_model = create_model("moons-mlp", (2,), 2)
    compiled_model = create_model("moons-mlp", (2,), 2)
    compiled_model.load_state_dict(eager_model.state_dict())
    x = torch.randn(32, 2)
    calls: list[dict] = []
    real_compile = torch.compile

    def compile_with_aot_eager(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **{**kwargs, "mode": None, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    compiled = TrainStep(compiled_model, 2, "fp32", compile="default")
    assert calls == [{"mode": "default"}]
    eager = TrainStep(eager_model, 2, "fp32", compile=None)
    torch._dynamo.reset()
    for _ in range(2):  # the second call runs the cached graph; buffers advance identically
        logits_e, k_e, grads_e = _step_outputs(eager, x)
        logits_c, k_c, grads_c = _step_outputs(compiled, x)
        torch.testing.assert_close(logits_c, logits_e)
        torch.testing.assert_close(k_c, k_e)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e)
    for name, buf in eager_model.named_buffers():
        torch.testing.assert_close(dict(compiled_model.named_buffers())[name], buf)


def test_channels_last_training_equals_nchw_in_float64(tmp_path: Path) -> None:
    """One epoch of the digits conv net with and without ``train.channels_last``: the layout changes
    only the order of additions, so in float64 the runs agree to ~1e-12."""
    results = {}
    for flag in ("true", "false"):
        run = tmp_path / flag
        argv = ["train", "--preset", "digits-cll", "--set", "train.epochs=1", "--set", f"train.channels_last={flag}",
                "--set", "data.train_size=256", "--set", "data.test_size=100", "--out", str(run), "--quiet"]
        assert main(argv) == 0
        results[flag] = _metrics(run)[-1]
    on, off = results["true"], results["false"]
    assert on["train_loss"] == pytest.approx(off["train_loss"], rel=1e-10)
    assert on["lipschitz"] == pytest.approx(off["lipschitz"], rel=1e-10)
    assert on["clean_accuracy"] == off["clean_accuracy"]


def test_bf16_train_step_stays_close_to_fp32() -> None:
    """bf16 autocast changes the logits by bf16 rounding only (8 bits of mantissa) and never the bound."""
    torch.manual_seed(0)
    model = create_model("2C2F", (1, 8, 8), 10)
    x = torch.randn(16, 1, 8, 8)
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    logits_32, k_32 = TrainStep(model, 1, "fp32")(x)
    model.load_state_dict({**model.state_dict(), **bufs})
    logits_16, k_16 = TrainStep(model, 1, "bf16")(x)
    assert logits_16.dtype == torch.float32 and k_16.dtype == torch.float32
    torch.testing.assert_close(k_16, k_32)  # the power iteration never runs under autocast
    scale = logits_32.abs().max()
    assert (logits_16 - logits_32).abs().max() <= 0.05 * scale
    assert (logits_16 - logits_32).abs().max() > 0  # autocast really ran in bf16
