"""Run configuration: presets, YAML files, --set overrides, type and range checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lipmargin.config import (
    DEFAULT_PRESET,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    load_preset,
)


def _load(*overrides: str) -> RunConfig:
    return load_config(preset="moons-cll", overrides=list(overrides))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_every_preset_loads() -> None:
    presets = list_presets()
    assert {"digits-cll", "moons-cll", "moons-gloro"} <= set(presets)
    assert DEFAULT_PRESET in presets
    for name in presets:
        cfg = load_preset(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.description  # every preset says what it is
        # The resolved config survives a round trip through plain data (what config.yaml holds).
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_moons_cll_preset_values() -> None:
    cfg = load_preset("moons-cll")
    assert (cfg.data.name, cfg.model.name, cfg.loss.name) == ("moons", "moons-mlp", "cll")
    assert (cfg.loss.eps, cfg.loss.p, cfg.loss.lipschitz_penalty) == (0.15, 0.01, 1e-6)
    assert cfg.loss.one_sided and cfg.loss.per_logit
    assert cfg.eval.eps == (0.15,)


def test_default_is_the_default_preset() -> None:
    assert load_config() == load_preset(DEFAULT_PRESET)


def test_config_is_frozen() -> None:
    cfg = _load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss.eps = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_overrides_are_typed() -> None:
    cfg = _load("loss.eps=0.5", "train.epochs=2.0", "eval.eps=0.1,0.2", "loss.one_sided=false", "model.width=4")
    assert cfg.loss.eps == 0.5 and isinstance(cfg.loss.eps, float)
    assert cfg.train.epochs == 2 and type(cfg.train.epochs) is int
    assert cfg.eval.eps == (0.1, 0.2)
    assert cfg.loss.one_sided is False
    assert cfg.model.width == 4
    # Integers are accepted where a float is expected, and stored as floats.
    assert _load("loss.eps=1").loss.eps == 1.0 and isinstance(_load("loss.eps=1").loss.eps, float)
    # A single number for a tuple, and YAML list syntax.
    assert _load("eval.eps=0.3").eval.eps == (0.3,)
    assert _load("eval.eps=[0.3, 0.4]").eval.eps == (0.3, 0.4)
    assert _load("optim.milestones=[2, 3]").optim.milestones == (2, 3)
    # Optional fields take null.
    assert _load("model.width=null").model.width is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.eps=abc", "loss.eps"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=abc", "train.epochs"),
        ("loss.one_sided=1", "loss.one_sided"),
        ("eval.eps=0.1,x", "eval.eps"),
        ("loss=3", "loss"),
    ],
)
def test_overrides_with_wrong_types_fail(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(override)


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.p=1.5", "loss.p"),
        ("loss.p=0", "loss.p"),
        ("loss.eps=0", "loss.eps"),
        ("loss.eps=-0.1", "loss.eps"),
        ("train.epochs=-1", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("optim.lr=0", "optim.lr"),
        ("eval.eps=0.1,0", "eval.eps"),
        ("train.device=gpu", "train.device"),
        ("model.name=resnet", "model.name"),
        ("data.name=imagenet", "data.name"),
        ("loss.name=hinge", "loss.name"),
        ("eval.bound=exact", "eval.bound"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        _load(override)
    assert "\n" not in str(info.value)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="valid keys") as info:
        _load("loss.epz=0.5")
    assert "loss.epz" in str(info.value)
    for key in ("loss.eps", "loss.p", "loss.one_sided"):
        assert key in str(info.value)
    with pytest.raises(ConfigError, match="valid keys") as info:
        _load("modle.name=x")
    assert "model" in str(info.value) and "train" in str(info.value)


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        _load("loss.eps")


# --------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------


def test_yaml_file_on_top_of_preset_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("loss: {eps: 0.3}\ntrain: {epochs: 7}\n")
    cfg = load_config(path, preset="moons-cll", overrides=["train.epochs=9"])
    assert cfg.loss.eps == 0.3  # from the file
    assert cfg.loss.p == 0.01  # from the preset
    assert cfg.train.epochs == 9  # the override wins


def test_exponent_floats_are_numbers_everywhere(tmp_path: Path) -> None:
    """PyYAML reads ``3e-05`` (how Python prints 0.00003) as text; lipmargin reads it as a number in
    overrides, config files and sweep grids, and a sweep's own override strings round-trip."""
    from lipmargin.sweep import _override_strings, parse_grid

    assert _load("loss.p=3e-05").loss.p == 3e-05
    assert _load("loss.p=1E-4", "train.epochs=7").loss.p == 1e-4
    path = tmp_path / "run.yaml"
    path.write_text("loss: {p: 1e-5, lipschitz_penalty: 2.5e-3}\n")
    cfg = load_config(path, preset="moons-cll")
    assert (cfg.loss.p, cfg.loss.lipschitz_penalty) == (1e-5, 2.5e-3)
    grid = parse_grid(["loss.p=0.03,0.00003,3e-6"])
    assert grid == {"loss.p": [0.03, 3e-05, 3e-06]}
    for value in grid["loss.p"]:
        assert _load(*_override_strings({"loss.p": value})).loss.p == value
    # Text that only looks numeric stays text, and a string field still refuses a number.
    assert _load("model.name=mlp").model.name == "mlp"
    with pytest.raises(ConfigError, match="model.name"):
        _load("model.name=1e5")


def test_yaml_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {eps: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("loss: {epss: 0.3}\n")
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(unknown, preset="moons-cll")


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="moons-cll"):
        load_config(preset="moons")
