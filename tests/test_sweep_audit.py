"""Sweeps (resumable, mean/std tables) and the certificate audit (finds planted violations)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lipmargin.certify import audit_model
from lipmargin.certify import model_bound
from lipmargin.config import ConfigError, config_to_dict, load_preset
from lipmargin.data import load_dataset, to_float
from lipmargin.train.runfolder import RunExistsError
from lipmargin.sweep import mean_std, parse_grid, run_sweep
from lipmargin.train import fit, load_run


def _moons_base(epochs: int = 2) -> dict:
    values = config_to_dict(load_preset("moons-cll"))
    values["train"]["epochs"] = epochs
    values["train"]["batch_size"] = 500
    return values


def test_parse_grid_and_errors() -> None:
    assert parse_grid(["loss.p=0.75,0.01", "loss.eps=0.15"]) == {"loss.p": [0.75, 0.01], "loss.eps": [0.15]}
    with pytest.raises(ConfigError, match="section.key=v1,v2"):
        parse_grid(["loss.p"])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["loss.p=0.1", "loss.p=0.2"])


def test_mean_std_matches_hand_values() -> None:
    s = mean_std([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([3.0]) == {"mean": 3.0, "std": 0.0}


def test_sweep_tables_resume_and_spec_guard(tmp_path) -> None:
    out = tmp_path / "s"
    grid = {"loss.p": [0.75, 0.01]}
    results = run_sweep(_moons_base(), grid, 2, out)
    assert [c["params"] for c in results["cells"]] == [{"loss.p": 0.75}, {"loss.p": 0.01}]
    for cell in results["cells"]:
        summaries = [json.loads((out / r / "summary.json").read_text()) for r in cell["runs"]]
        assert cell["n"] == 2
        assert cell["clean_accuracy"]["mean"] == pytest.approx(sum(s["clean_accuracy"] for s in summaries) / 2)
        cfgs = [(out / r / "config.yaml").read_text() for r in cell["runs"]]
        assert "seed: 0" in cfgs[0] and "seed: 1" in cfgs[1]
    for name in ("results.json", "results.csv", "results.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "results.csv").read_text().splitlines()[0].startswith("loss.p,n,clean_mean")
    # A second invocation finishes without retraining: summaries are untouched.
    stamp = (out / results["cells"][0]["runs"][0] / "summary.json").stat().st_mtime_ns
    again = run_sweep(_moons_base(), grid, 2, out)
    assert again == results
    assert (out / results["cells"][0]["runs"][0] / "summary.json").stat().st_mtime_ns == stamp
    # A sweep.json written before a config key existed still counts as the same sweep.
    spec = json.loads((out / "sweep.json").read_text())
    del spec["base"]["loss"]["cr_gamma"]
    (out / "sweep.json").write_text(json.dumps(spec))
    assert run_sweep(_moons_base(), grid, 2, out) == results
    with pytest.raises(RunExistsError, match="different sweep"):
        run_sweep(_moons_base(), {"loss.p": [0.5]}, 1, out)
    assert run_sweep(_moons_base(), grid, 2, out) == results  # the refused call changed nothing


def test_a_sweep_can_be_extended_by_values_and_seeds(tmp_path) -> None:
    out = tmp_path / "s"
    first = run_sweep(_moons_base(), {"loss.p": [0.75]}, 1, out)
    old_run = out / first["cells"][0]["runs"][0]
    stamp = (old_run / "summary.json").stat().st_mtime_ns
    events: list[dict] = []
    results = run_sweep(_moons_base(), {"loss.p": [0.75, 0.01]}, 2, out, on_event=events.append)
    assert [e["event"] for e in events if e["event"] in ("extended", "moved")] == ["extended"]
    trained = sorted(e["run_dir"] for e in events if e["event"] == "run" and e["status"] == "start")
    assert trained == sorted(str(out / "cells" / c / f"seed-{s}") for c, s in
                             (("loss.p=0.75", 1), ("loss.p=0.01", 0), ("loss.p=0.01", 1)))
    assert (old_run / "summary.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert [c["params"] for c in results["cells"]] == [{"loss.p": 0.75}, {"loss.p": 0.01}]
    assert [c["n"] for c in results["cells"]] == [2, 2]
    assert json.loads((out / "sweep.json").read_text())["grid"] == {"loss.p": [0.75, 0.01]}
    # Dropping a value, changing the base or a key is still another sweep.
    with pytest.raises(RunExistsError, match="different sweep"):
        run_sweep(_moons_base(), {"loss.p": [0.01]}, 2, out)
    other = _moons_base()
    other["loss"]["eps"] = 0.3
    with pytest.raises(RunExistsError, match="different sweep"):
        run_sweep(other, {"loss.p": [0.75, 0.01]}, 2, out)
    with pytest.raises(RunExistsError, match="different sweep"):
        run_sweep(_moons_base(), {"loss.eps": [0.15]}, 2, out)
    # An extension with a value the config refuses changes nothing: the sweep stays what it was.
    spec = (out / "sweep.json").read_text()
    with pytest.raises(ConfigError, match="loss.p"):
        run_sweep(_moons_base(), {"loss.p": [0.75, 0.01, "tiny"]}, 2, out)
    assert (out / "sweep.json").read_text() == spec


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    cfg = load_preset("moons-cll")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=15, batch_size=200))
    fit(cfg, out)
    return out


def _audit_inputs(n: int = 200):
    test = load_dataset("moons", None, "test")
    train = load_dataset("moons", None, "train")
    return to_float(test.inputs[:n]), test.labels[:n], to_float(train.inputs[:200])


def test_audit_of_sound_certificates_finds_no_violation(moons_run) -> None:
    _, model, _ = load_run(moons_run)
    x, y, lobo = _audit_inputs()
    res = audit_model(model, x, y, [0.05, 0.15], lobo_inputs=lobo, pgd_steps=20, pgd_restarts=2,
                      lobo_pairs=50, lobo_steps=50, lobo_lr=1e-2, clamp=None)
    assert res.violations == 0
    assert 0 < res.tightness <= 1
    for e in (0.05, 0.15):
        assert res.empirical_robust_accuracy[e] >= res.certified_accuracy[e]
    assert res.certified_accuracy[0.15] <= res.certified_accuracy[0.05] <= res.clean_accuracy
    assert all(layer["sound"] >= layer["power"] * (1 - 1e-9) for layer in res.per_layer)


def test_audit_finds_a_planted_violation(moons_run) -> None:
    """A bound deliberately halved certifies radii twice too large: the audit must catch it."""
    _, model, _ = load_run(moons_run)
    x, y, lobo = _audit_inputs()
    honest = model_bound(model, "sound")
    halved = dataclasses.replace(honest, pairwise=honest.pairwise / 2, lipschitz=honest.lipschitz / 2,
                                 feature=honest.feature / 2)
    res = audit_model(model, x, y, [0.15], lobo_inputs=lobo, bound=halved, pgd_steps=30, pgd_restarts=3,
                      lobo_pairs=100, lobo_steps=100, lobo_lr=1e-2, clamp=None)
    assert res.violations > 0
    kinds = {v["kind"] for v in res.violation_details}
    assert "own-radius" in kinds


def test_cli_audit_json_and_exit_code(moons_run, capsys) -> None:
    from lipmargin.cli import main

    rc = main(["audit", str(moons_run), "--eps", "0.15", "--n", "100", "--json", "--pgd-steps", "10",
               "--pgd-restarts", "1", "--lobo-pairs", "20", "--lobo-steps", "20"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    payload = json.loads(out[0])
    for key in ("certified_accuracy", "empirical_robust_accuracy", "violations", "lipschitz_upper",
                "lipschitz_lower", "tightness", "per_layer"):
        assert key in payload
    assert payload["violations"] == 0 and payload["tightness"] <= 1
    assert list(payload["certified_accuracy"]) == ["0.15"]


def test_sound_bound_close_to_power_on_trained_conv_net(tmp_path) -> None:
    """Issue 4: per-layer sound bounds of a trained 4C3F within 5 % of the converged power iteration."""
    cfg = load_preset("digits-cll")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name="4C3F", width=8),
        train=dataclasses.replace(cfg.train, epochs=2, batch_size=256),
    )
    fit(cfg, tmp_path / "r")
    _, model, _ = load_run(tmp_path / "r")
    power = model_bound(model, "power")
    sound = model_bound(model, "sound")
    for p, s in zip(power.per_layer, sound.per_layer):
        assert p * (1 - 1e-7) <= s <= p * 1.05
    assert torch.all(sound.pairwise >= power.pairwise * (1 - 1e-7))


def test_parallel_sweep_trains_the_same_runs_as_a_sequential_one(tmp_path) -> None:
    """--jobs 2: each run is trained in its own spawned process, with the same config and seed."""
    base = _moons_base(epochs=1)
    grid = {"loss.p": [0.75, 0.01]}
    seq = run_sweep(base, grid, 1, tmp_path / "seq")
    events: list[dict] = []
    par = run_sweep(base, grid, 1, tmp_path / "par", jobs=2, on_event=events.append)
    assert [e["status"] for e in events].count("finished") == 2
    for a, b in zip(seq["cells"], par["cells"]):
        assert a["params"] == b["params"] and a["runs"] == b["runs"]
        # The same config and seed in another process: the same numbers, bit for bit (the run draws
        # only from train.seed; the moons MLP's float32 ops are too small to be split over threads).
        assert {k: a[k] for k in ("clean_accuracy", "certified_accuracy", "lipschitz")} == \
            {k: b[k] for k in ("clean_accuracy", "certified_accuracy", "lipschitz")}
        for run in a["runs"]:
            s_seq, s_par = (json.loads((tmp_path / side / run / "summary.json").read_text()) for side in ("seq", "par"))
            assert s_par["checkpoint"]["sha256"] == s_seq["checkpoint"]["sha256"]  # the same final weights
            drop = ("train_seconds", "checkpoint")
            assert {k: v for k, v in s_par.items() if k not in drop} == {k: v for k, v in s_seq.items() if k not in drop}
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        run_sweep(base, grid, 1, tmp_path / "bad", jobs=0)


def test_cli_audit_of_a_sweep_writes_audits_and_the_table_column(tmp_path, capsys) -> None:
    from lipmargin.cli import main

    out = tmp_path / "s"
    run_sweep(_moons_base(epochs=3), {"loss.p": [0.01]}, 2, out)
    args = ["audit", str(out), "--eps", "0.15", "--n", "50", "--pgd-steps", "5", "--pgd-restarts", "1",
            "--lobo-pairs", "10", "--lobo-steps", "10"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "violations: 0 over 2 runs" in text
    results = json.loads((out / "results.json").read_text())
    audit = results["cells"][0]["audit"]
    assert audit["runs"] == 2 and audit["violations"] == 0 and audit["samples_per_run"] == 50
    assert "audit violations" in (out / "results.md").read_text()
    for run in results["cells"][0]["runs"]:
        assert json.loads((out / run / "audit.json").read_text())["settings"]["n"] == 50
    # A second call finds the audits done with the same settings and does not redo them.
    stamp = (out / results["cells"][0]["runs"][0] / "audit.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / results["cells"][0]["runs"][0] / "audit.json").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------
# The audit with real torchattacks (APGD-CE / APGD-T), on a tiny net over inputs in [0, 1]
# --------------------------------------------------------------------------------------------


def _box_net_and_inputs(n: int = 16):
    import torch
    from torch import nn

    from lipmargin.models import LipschitzNet

    torch.manual_seed(5)
    model = LipschitzNet(nn.Sequential(nn.Linear(12, 16), nn.ReLU()), nn.Linear(16, 5), (12,)).double().eval()
    x = torch.randn(n, 12, dtype=torch.float64).sigmoid()
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample correct: each one is attacked
    return model, x, y


def _require_torchattacks() -> None:
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        pytest.skip("torchattacks is not installed (make setup installs it with --no-deps)")


def test_audit_runs_real_apgd_at_eval_and_own_radii() -> None:
    _require_torchattacks()
    model, x, y = _box_net_and_inputs(8)
    res = audit_model(model, x, y, [0.01], lobo_inputs=x, pgd_steps=10, pgd_restarts=1, lobo_pairs=10,
                      lobo_steps=10, lobo_lr=1e-2, use_autoattack=True, autoattack_steps=10, clamp=(0.0, 1.0))
    assert res.attacks == ["pgd-l2", "apgd-ce", "apgd-t"] and res.notes == []
    assert res.violations == 0


def test_audit_real_apgd_finds_a_planted_violation_at_own_radius() -> None:
    """A bound 10x too small: APGD (not only PGD) breaks certificates at the samples' own radii."""
    _require_torchattacks()
    model, x, y = _box_net_and_inputs()
    honest = model_bound(model, "sound")
    small = dataclasses.replace(honest, pairwise=honest.pairwise / 10, lipschitz=honest.lipschitz / 10,
                                feature=honest.feature / 10)
    res = audit_model(model, x, y, [], lobo_inputs=x, bound=small, pgd_steps=1, pgd_restarts=1, lobo_pairs=10,
                      lobo_steps=10, lobo_lr=1e-2, use_autoattack=True, autoattack_steps=10, clamp=(0.0, 1.0))
    own = [v for v in res.violation_details if v["kind"] == "own-radius"]
    assert own and any({"apgd-ce", "apgd-t"} & set(v["attacks"]) for v in own)
    assert any("apgd-t" in v["attacks"] for v in own)


def test_audit_autoattack_refuses_data_outside_the_unit_box() -> None:
    model, x, y = _box_net_and_inputs(4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit_model(model, x, y, [0.1], lobo_inputs=x, use_autoattack=True, clamp=None)


def test_audit_leaves_the_global_rng_and_the_callers_model_alone() -> None:
    """No hidden side effects: the global RNG stream, the model's mode, dtype and buffers
    (power-iteration vectors included) are as they were; the audit works on a plain module too."""
    from torch import nn

    from lipmargin.models import LipschitzNet

    torch.manual_seed(3)
    model = LipschitzNet(nn.Sequential(nn.Linear(12, 16), nn.ReLU()), nn.Linear(16, 5), (12,)).train()
    x = torch.rand(6, 12)
    y = torch.randint(0, 5, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = audit_model(model, x, y, [0.01], lobo_inputs=x, pgd_steps=3, pgd_restarts=2, lobo_pairs=4,
                      lobo_steps=3, lobo_lr=1e-2, clamp=(0.0, 1.0), seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert res.num_samples == 6 and res.violations == 0

    plain = nn.Sequential(nn.Linear(12, 5))  # no in_shape: the shape comes from input_shape
    res = audit_model(plain, x, y, [0.01], lobo_inputs=x, pgd_steps=3, pgd_restarts=1, lobo_pairs=4,
                      lobo_steps=3, lobo_lr=1e-2, input_shape=(12,))
    assert res.violations == 0 and res.lipschitz_lower <= res.lipschitz_upper
