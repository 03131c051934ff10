"""A batched member keeps its separate run's bits on the CPU (issue 16: "the same table").

Training is chaotic: a one-ulp difference in one gradient grows into tenths of a percent of
certified accuracy after a thousand epochs.  So a batched sweep can only print the sequential
sweep's table if every member's arithmetic rounds exactly as its separate run's.  These tests
hold the stacked kernels to that, against ``F.linear`` / ``mm`` and against real ``fit`` runs in
float32, and check that the hand-written backward is the true gradient.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lipmargin.checkpoint import latest_checkpoint
from lipmargin.config import load_config
from lipmargin.train import fit
from lipmargin.train.batched import train_group
from lipmargin.train.stacked import _MemberLinear, member_matmul

# The moons MLP's layers (2-10-20-40-40-20-10-2), plus a wider one; batch 100 and a single row
# (a power-iteration vector), so that both of ATen's bmm kernels (small slices / per-slice mm) run.
SHAPES = [(2, 10), (10, 20), (20, 40), (40, 40), (20, 10), (10, 2), (64, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 100])
def test_member_linear_rounds_each_member_as_f_linear(dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    m = 5
    for n_in, n_out in SHAPES:
        h = torch.randn(m, rows, n_in, dtype=dtype, generator=gen)
        w = torch.randn(m, n_out, n_in, dtype=dtype, generator=gen)
        b = torch.randn(m, n_out, dtype=dtype, generator=gen)
        g = torch.randn(m, rows, n_out, dtype=dtype, generator=gen)
        hs, ws, bs = (t.clone().requires_grad_() for t in (h, w, b))
        out = _MemberLinear.apply(hs, ws, bs)
        out.backward(g)
        for i in range(m):
            hi, wi, bi = (t[i].clone().requires_grad_() for t in (h, w, b))
            ref = F.linear(hi, wi, bi)
            ref.backward(g[i])
            assert torch.equal(out[i], ref), (n_in, n_out, "forward")
            assert torch.equal(hs.grad[i], hi.grad), (n_in, n_out, "input gradient")
            assert torch.equal(ws.grad[i], wi.grad), (n_in, n_out, "weight gradient")
            assert torch.equal(bs.grad[i], bi.grad), (n_in, n_out, "bias gradient")


def test_plain_bmm_does_not_keep_the_bits_of_mm() -> None:
    """The reason for member_matmul: without it some members' products round differently.  (If a
    future torch made bmm agree with mm everywhere, this test would say the workaround can go.)"""
    gen = torch.Generator().manual_seed(0)
    differs = False
    for n_in, n_out in SHAPES:
        v = torch.randn(8, 1, n_in, generator=gen)
        w = torch.randn(8, n_out, n_in, generator=gen)
        plain, ours = v @ w.mT, member_matmul(v, w.mT)
        for i in range(8):
            assert torch.equal(ours[i], v[i] @ w[i].T)
            differs |= not torch.equal(plain[i], v[i] @ w[i].T)
    assert differs


def test_member_linear_backward_is_the_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    for n_in, n_out, rows in [(3, 4, 2), (6, 5, 30)]:
        args = tuple(
            torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
            for shape in [(3, rows, n_in), (3, n_out, n_in), (3, n_out)]
        )
        assert torch.autograd.gradcheck(_MemberLinear.apply, args)
        assert torch.autograd.gradcheck(lambda h, w: _MemberLinear.apply(h, w, None), args[:2])


def _state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None
    return ckpt.model_state


def test_float32_members_equal_separate_runs_bit_for_bit(tmp_path: Path) -> None:
    epochs = 4
    cfgs = [
        load_config(None, preset="moons-slack", overrides=[
            f"train.epochs={epochs}", f"loss.p={p}", f"train.seed={seed}", "eval.every=2", "eval.batch_size=5000",
        ])
        for p, seed in [(0.75, 0), (0.01, 1), (0.0001, 2)]
    ]
    assert all(c.train.precision == "fp32" for c in cfgs)
    train_group([(c, tmp_path / f"batched-{i}") for i, c in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        batched, separate = tmp_path / f"batched-{i}", tmp_path / f"separate-{i}"
        fit(cfg, separate)
        a, b = _state(batched), _state(separate)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (i, name)
        rows_a = [json.loads(line) for line in (batched / "metrics.jsonl").read_text().splitlines()]
        rows_b = [json.loads(line) for line in (separate / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b] == list(range(1, epochs + 1))
        for ra, rb in zip(rows_a, rows_b):
            ra.pop("seconds"), rb.pop("seconds")
            assert ra == rb
        assert (batched / "certificates.csv").read_bytes() == (separate / "certificates.csv").read_bytes()
        assert (batched / "config.yaml").read_text() == (separate / "config.yaml").read_text()
        sa, sb = (json.loads((run / "summary.json").read_text()) for run in (batched, separate))
        for timing in ("train_seconds", "checkpoint"):  # wall time, and the checkpoint's hash (which covers it)
            sa.pop(timing), sb.pop(timing)
        assert sa == sb
