"""Batched sweeps: a stacked member trains exactly as its separate run (checked against real
separate ``fit`` runs), writes the same run folder, resumes after an interruption, and runs that
cannot be batched fall back to separate training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lipmargin.train import batched
from lipmargin.train.batched import group_key, plan_groups, train_group
from lipmargin.checkpoint import latest_checkpoint, list_checkpoints
from lipmargin.cli import main
from lipmargin.config import config_from_dict, config_to_dict, load_config
from lipmargin.sweep import run_sweep
from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.train import TrainingError, fit, load_run

GRID = {"loss.p": [0.25, 0.01]}
EPOCHS = 3


def _base(**extra: object) -> dict:
    overrides = [f"train.epochs={EPOCHS}", "train.precision=fp64", "eval.every=1", "eval.batch_size=5000"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return config_to_dict(load_config(None, preset="moons-slack", overrides=overrides))


def _runs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "cells").glob("*/seed-*") if p.is_dir())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(a: list[dict], b: list[dict], rtol: float = 1e-6) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == list(range(1, EPOCHS + 1))
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_accuracy", "clean_accuracy", "lipschitz", "lipschitz_features", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=rtol, abs=1e-12), (ra["epoch"], key)
        assert rb["lipschitz_per_layer"] == pytest.approx(ra["lipschitz_per_layer"], rel=rtol)
        assert rb["certified_accuracy"].keys() == ra["certified_accuracy"].keys()
        for e in ra["certified_accuracy"]:
            assert rb["certified_accuracy"][e] == pytest.approx(ra["certified_accuracy"][e], abs=1e-6)


@pytest.fixture(scope="module")
def batched_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batched") / "sweep"
    events: list[dict] = []
    run_sweep(_base(), GRID, 2, out, batched=True, on_event=events.append)
    groups = [e for e in events if e["event"] == "group"]
    # One group of all four runs, reported after every epoch.
    assert [e["epoch"] for e in groups] == list(range(EPOCHS + 1))
    assert all(e["members"] == 4 and e["groups"] == 1 for e in groups)
    return out


def test_member_metrics_equal_separate_fit_runs(batched_sweep: Path, tmp_path: Path) -> None:
    runs = _runs(batched_sweep)
    assert len(runs) == 4
    for run in runs:
        cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        separate = tmp_path / run.parent.name / run.name
        fit(cfg, separate)  # an actual separate run of the same config
        _assert_same_metrics(_metrics(separate), _metrics(run))
        got, want = (json.loads((r / "summary.json").read_text()) for r in (run, separate))
        assert got["seed"] == want["seed"] == cfg.train.seed
        assert got["clean_accuracy"] == pytest.approx(want["clean_accuracy"], abs=1e-6)
        assert got["lipschitz"] == pytest.approx(want["lipschitz"], rel=1e-6)
        # Per-sample certificates: same predictions and radii.
        lines_a = (separate / "certificates.csv").read_text().splitlines()
        lines_b = (run / "certificates.csv").read_text().splitlines()
        assert len(lines_a) == len(lines_b)
        for la, lb in zip(lines_a[1:], lines_b[1:]):
            ia, ta, pa, ra = la.split(",")
            ib, tb, pb, rb = lb.split(",")
            assert (ia, ta, pa) == (ib, tb, pb)
            assert float(rb) == pytest.approx(float(ra), rel=1e-6, abs=1e-9)
        # Weights, power-iteration vectors and AdamW moments of the final checkpoints agree.
        ca, cb = latest_checkpoint(separate / "checkpoints"), latest_checkpoint(run / "checkpoints")
        assert ca is not None and cb is not None and ca.epoch == cb.epoch == EPOCHS
        assert ca.model_state.keys() == cb.model_state.keys()
        for k in ca.model_state:
            torch.testing.assert_close(cb.model_state[k], ca.model_state[k], rtol=1e-6, atol=1e-9)
        oa, ob = ca.extra_state["optimizer"], cb.extra_state["optimizer"]
        assert oa["param_groups"] == ob["param_groups"]
        for k in oa["state"]:
            for name in oa["state"][k]:
                torch.testing.assert_close(ob["state"][k][name], oa["state"][k][name], rtol=1e-6, atol=1e-9)
        assert ca.extra_state["scheduler"] == cb.extra_state["scheduler"]


def test_member_folders_have_every_file_and_work_with_the_run_tools(batched_sweep: Path) -> None:
    for run in _runs(batched_sweep):
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "certificates.csv"):
            assert (run / name).is_file(), name
        assert list((run / "checkpoints").glob("epoch-*.safetensors"))
        cfg, model, epoch = load_run(run)
        assert epoch == EPOCHS and cfg.train.precision == "fp64"
    assert (batched_sweep / "results.md").is_file()
    run = _runs(batched_sweep)[0]
    assert main(["certify", str(run), "--eps", "0.15", "--json"]) == 0


def test_interrupted_group_resumes_to_the_same_result(batched_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"

    def stop_after_epoch_2(event: dict) -> None:
        if event["event"] == "group" and event["epoch"] == 2:
            raise KeyboardInterrupt  # as a kill would, after the epoch-2 checkpoints

    with pytest.raises(KeyboardInterrupt):
        run_sweep(_base(), GRID, 2, out, batched=True, on_event=stop_after_epoch_2)
    runs = _runs(out)
    assert all(not (r / "summary.json").exists() for r in runs)
    # One member also lost its newest checkpoint (killed while writing it): the group goes back to
    # the newest epoch all members hold.
    newest = list_checkpoints(runs[1] / "checkpoints")[-1]
    newest.with_suffix(".safetensors").write_bytes(b"torn")
    events: list[dict] = []
    run_sweep(_base(), GRID, 2, out, batched=True, on_event=events.append)
    assert [e["epoch"] for e in events if e["event"] == "group"] == [1, 2, 3]
    for run, ref in zip(runs, _runs(batched_sweep)):
        _assert_same_metrics(_metrics(ref), _metrics(run))
    # Finished members are skipped on the next invocation.
    events.clear()
    run_sweep(_base(), GRID, 2, out, batched=True, on_event=events.append)
    assert {e["status"] for e in events if e["event"] == "run"} == {"done"}


def test_runs_that_cannot_share_a_graph_fall_back_to_separate_groups(tmp_path: Path) -> None:
    def cfg(*overrides: str):
        return load_config(None, preset="moons-slack", overrides=list(overrides))

    plain, other_p, other_seed = cfg(), cfg("loss.p=0.3"), cfg("train.seed=4")
    assert group_key(plain) == group_key(other_p) == group_key(other_seed)
    assert group_key(cfg("train.batch_size=50")) != group_key(plain)
    assert group_key(cfg("model.name=mlp")) != group_key(plain)
    assert group_key(cfg("train.precision=bf16")) is None
    assert group_key(cfg("train.compile=default")) is None
    cfgs = [plain, cfg("train.batch_size=50"), other_p, cfg("train.precision=bf16"), other_seed]
    assert plan_groups(cfgs) == [[0, 2, 4], [1], [3]]
    assert plan_groups(cfgs, group_size=2) == [[0, 2], [4], [1], [3]]
    with pytest.raises(ValueError, match="one batched group"):
        train_group([(plain, tmp_path / "a"), (cfgs[1], tmp_path / "b")])

    # A sweep over the batch size: two groups of one, trained as plain runs, same as sequential.
    base = _base(**{"train.epochs": 1})
    grid = {"train.batch_size": [50, 100]}
    events: list[dict] = []
    got = run_sweep(base, grid, 1, tmp_path / "b", batched=True, on_event=events.append)
    want = run_sweep(base, grid, 1, tmp_path / "s")
    assert not [e for e in events if e["event"] == "group"]
    for cb, cs in zip(got["cells"], want["cells"]):
        assert cb["clean_accuracy"]["mean"] == pytest.approx(cs["clean_accuracy"]["mean"], abs=1e-9)


def test_memory_error_names_the_largest_group_that_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, preset="moons-slack", overrides=["train.epochs=1"])
    runs = [(load_config(None, preset="moons-slack", overrides=["train.epochs=1", f"train.seed={s}"]), tmp_path / str(s)) for s in range(4)]
    from lipmargin.train import build_model

    per = batched.member_bytes_estimate(build_model(cfg, (2,), 2), cfg.train.batch_size)
    monkeypatch.setattr(batched, "_free_bytes", lambda device: int(2.5 * per / 0.8))
    with pytest.raises(TrainingError, match=r"group of 4 members .* largest group that fits is about 2 \(use --group-size 2\)"):
        train_group(runs)
    assert not any((tmp_path / str(s)).exists() for s in range(4))  # refused before writing


def test_cli_sweep_batched_and_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sweep", "--preset", "moons-slack", "--set", "train.epochs=1", "--grid", "loss.p=0.25,0.01", "--seeds", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--batched", "--group-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "group 1/1: 2 members, epoch 1/1" in captured.err
    assert "| 0.25 |" in captured.out
    assert main([*args, "--out", str(tmp_path / "b"), "--group-size", "2"]) == 2
    assert "--group-size" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--batched", "--jobs", "2"]) == 2


def test_vmap_path_matches_separate_runs(tmp_path: Path) -> None:
    """The general path (vmap over functional_call, for models without a bmm / grouped-conv form)."""
    cfgs = [config_from_dict({**_base(**{"train.epochs": 1}), "train": {**_base()["train"], "epochs": 1, "seed": s}})
            for s in (3, 4)]
    assert train_group([(c, tmp_path / f"b{i}") for i, c in enumerate(cfgs)], vmap_only=True) == []
    for i, c in enumerate(cfgs):
        fit(c, tmp_path / f"s{i}")
        a, b = _metrics(tmp_path / f"s{i}"), _metrics(tmp_path / f"b{i}")
        assert len(a) == len(b) == 1
        for key in ("train_loss", "train_accuracy", "clean_accuracy", "lipschitz"):
            assert b[0][key] == pytest.approx(a[0][key], rel=1e-6), key
        assert b[0]["lipschitz_per_layer"] == pytest.approx(a[0]["lipschitz_per_layer"], rel=1e-6)


def test_stacked_conv_operators_and_convergence_match_each_member() -> None:
    """Grouped-conv operators of stacked members against each member's own conv operator, and the
    batched end-of-epoch convergence against each member's ``bound.converge()``."""
    from lipmargin.models import create_model
    from lipmargin.train.stacked import StackedForward, _stacked_operator, converge_members, stack_members

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(create_model("2C2F", (1, 8, 8), 10, width=4, dense_width=8).double())
    copies = [__import__("copy").deepcopy(m) for m in models]
    params, buffers = stack_members(models)
    for layer, shape in zip(models[0].bound.layers, models[0].bound.input_shapes):
        if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        name = {id(m): n for n, m in models[0].named_modules()}[id(layer)]
        fwd, adj = _stacked_operator(layer, params[f"{name}.weight"], shape)
        v = torch.randn(3, 1, *shape, dtype=torch.float64)
        out = fwd(v)
        y = torch.randn_like(out)
        for j, m in enumerate(copies):
            own = m.bound._operator(m.bound.layers.index(m.get_submodule(name)))
            torch.testing.assert_close(out[j], own[0](v[j]))
            torch.testing.assert_close(adj(y)[j], own[1](y[j]))
    x = torch.rand(3, 5, 1, 8, 8, dtype=torch.float64)
    logits, k, _ = StackedForward(models[0], params, buffers, 0, True)(x)
    for j, m in enumerate(copies):
        torch.testing.assert_close(logits[j], m(x[j]))
        torch.testing.assert_close(k[j], m.feature_lipschitz(0)[0])
    got = converge_members(models)
    for j, m in enumerate(copies):
        want = m.bound.converge()
        torch.testing.assert_close(got[j], want, rtol=1e-8, atol=0)
        # The members' buffers (views of the stacks) received the converged vectors.
        for name, buf in m.bound.named_buffers():
            torch.testing.assert_close(getattr(models[j].bound, name), buf, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(batched.BATCHED_LOSSES))
def test_every_batched_loss_equals_the_loss_on_each_member_model(name: str) -> None:
    """The vmapped per-member loss (head weight slice + K) against the registered training loss
    called on each member's real model, for every loss ``group_key`` lets into a group."""
    from lipmargin.models import create_model
    from lipmargin.train.stacked import loss_partitions, member_losses, stack_members
    from lipmargin.train import TRAIN_LOSSES

    cfgs = [load_config(None, preset="moons-slack", overrides=[f"loss.name={name}", f"loss.eps={eps}", "loss.p=0.1"])
            for eps in (0.15, 0.3, 0.15)]
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(create_model("mlp", (4,), 3, widths=(6,)).double())
    references = [__import__("copy").deepcopy(m) for m in models]
    params, _ = stack_members(models)
    logits = torch.randn(3, 7, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 7))
    k = torch.rand(3, dtype=torch.float64) + 0.5
    got = member_losses(loss_partitions([c.loss for c in cfgs]), logits, y, params["head.weight"], k, 0.3)
    for j, (c, m) in enumerate(zip(cfgs, references)):
        want = TRAIN_LOSSES[name](c.loss)(logits[j], y[j], m, k[j], 0.3)
        want = want + c.loss.lipschitz_penalty * (k[j] * pairwise_head_norms(m.head.weight).max()) ** c.loss.penalty_power
        torch.testing.assert_close(got[j], want)
