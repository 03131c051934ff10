"""Run configuration: frozen dataclasses per concern, YAML loading, ``--set`` overrides, presets.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` (a ``ValueError``)
with a one-line message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "SweepConfig",
    "RunConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "apply_overrides",
    "list_presets",
    "load_preset",
    "preset_description",
    "DEFAULT_PRESET",
]

DEFAULT_PRESET = "digits-cll"


class ConfigError(ValueError):
    """A bad configuration value or key; the message is one line."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    root: str | None = None
    val_fraction: float = 0.0  # held out of the training set; evaluation then uses it, not the test set
    augment: bool = True  # the dataset's default augmentation (docs/method.md#d-layouts)
    # Class-stratified subsets drawn from train.seed (data.stratified_subset); None: every sample.
    train_size: int | None = None  # of the training set (after the validation split, if any)
    test_size: int | None = None  # of the evaluation set (the test set, or the validation part)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "2C2F"
    width: int | None = None  # base width of the conv models (None: the architecture's default)
    widths: tuple[int, ...] | None = None  # hidden widths of the MLP


@dataclass(frozen=True)
class LossConfig:
    name: str = "cll"  # cll | gloro | ce | lmt | hkr | ce-cr
    eps: float = 0.5
    p: float = 0.01
    lipschitz_penalty: float = 1e-4  # lambda in lambda * K_tot^power
    penalty_power: float = 2.0
    one_sided: bool = False  # CLL: no offset on the target logit
    per_logit: bool = False  # CLL: per-logit normalisation
    k_scale_schedule: bool = False  # CLL: scheduled inverse temperature (Tiny-ImageNet configs)
    detach_lipschitz: bool = True  # CLL: K is a constant inside the loss (the authors' default)
    eps_anneal: bool = True  # GloRo: eps_end * (1 - (1 - t/T)^5)
    # GloRo: K times d / detach(d), d = max_ij ||W_i - W_j|| of the head (the authors' GloroLoss):
    # the same value, plus a gradient that pulls the head's largest row distance down
    gloro_head_gradient: bool = False
    trades_lambda: float = 0.0  # GloRo: > 0 selects the TRADES variant
    hkr_alpha: float = 10.0  # HKR: weight of the hinge term
    hkr_margin: float = 1.0  # HKR: hinge margin
    cr_gamma: float = 0.5  # ce-cr: weight of the certificate regulariser


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()  # epochs at which the learning rate is multiplied by gamma
    gamma: float = 0.1


#: How K's gradient treats the power iterations of a training step (``train.power_grad``).
POWER_GRAD_MODES = ("detached", "unrolled")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 128
    seed: int = 0
    power_iters: int = 5  # power-iteration steps per training step
    # detached: K's gradient is that of ||A v|| / ||v|| with the advanced v a constant;
    # unrolled: through all power_iters steps as well (the authors' GloRo and penalty)
    power_grad: str = "detached"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    # fp32 | bf16 (autocast forward/backward, CPU or CUDA; power iterations and bounds stay fp32)
    # | fp64 (all float64) | auto (bf16 on CUDA and on CPUs with AMX / AVX512-BF16, else fp32)
    precision: str = "fp32"
    channels_last: bool | None = None  # None: the faster layout for the device and precision
    compile: str = "none"  # none | default | reduce-overhead | max-autotune (torch.compile of the train step)
    checkpoint_every: int = 1
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class EvalConfig:
    eps: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255)
    every: int = 0  # evaluate every N epochs (0: only after the last epoch)
    batch_size: int = 1000
    bound: str = "sound"  # sound (guaranteed) or power (the paper's converged power iteration)


@dataclass(frozen=True)
class SweepConfig:
    """Defaults for ``lipmargin sweep`` when a preset describes a whole experiment."""

    grid: tuple[str, ...] = ()  # "key=v1,v2" entries, as for --grid
    seeds: int = 1


@dataclass(frozen=True)
class RunConfig:
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# --------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters, and it never raises."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int over 4300 digits, a self-referencing value
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-5`` / ``3E+2`` as numbers.  PyYAML follows YAML 1.1,
    whose floats need a dot, so ``loss.p=3e-05`` (as Python prints 0.00003) would be a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's exponent floats (every config text lipmargin reads).

    >>> load_yaml("p: 3e-05")["p"], load_yaml("1E+2"), load_yaml("1.5e3"), load_yaml("e5"), load_yaml("36/255")
    (3e-05, 100.0, 1500.0, 'e5', '36/255')
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def _yaml_item(text: str) -> Any:
    """One list item written as text (``"36/255"`` stays text); unparsable text stays text."""
    try:
        return load_yaml(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        return text


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
        if item is str:
            return tuple(_coerce(v, item, key) for v in value)
        return tuple(_coerce(v if not isinstance(v, str) else _yaml_item(v), item, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # beyond int64 (and beyond what str() may print)
                raise ConfigError(f"{key}: {_show(value)} is out of range for an integer")
            return value
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {_show(value)} is too large for a number") from None
        raise ConfigError(f"{key}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return str(value)
            except ValueError:  # an int over 4300 digits
                raise ConfigError(f"{key}: expected a string, got an integer of {value.bit_length()} bits") from None
        raise ConfigError(f"{key}: expected a string, got {_show(value)}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = ", ".join(f"{prefix}{k}" for k in fields)
            raise ConfigError(f"unknown config key {full!r}; valid keys: {valid}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested mapping (e.g. parsed YAML)."""
    cfg = _build(RunConfig, values or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML / JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


# --------------------------------------------------------------------------------------------
# Validation of ranges and registry names
# --------------------------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Range and name checks; registries are imported here so that the names are always current."""
    from lipmargin.data import list_datasets
    from lipmargin.models import list_models
    from lipmargin.losses import list_train_losses

    _require(cfg.data.name in list_datasets(), f"data.name: unknown dataset {cfg.data.name!r}; choose one of {', '.join(list_datasets())}")
    _require(0.0 <= cfg.data.val_fraction < 1.0, f"data.val_fraction must be in [0, 1); got {cfg.data.val_fraction}")
    for key in ("train_size", "test_size"):
        size = getattr(cfg.data, key)
        _require(size is None or size >= 1, f"data.{key} must be a number of samples >= 1 (or null for all); got {size}")
    _require(cfg.model.name in list_models(), f"model.name: unknown model {cfg.model.name!r}; choose one of {', '.join(list_models())}")
    _require(cfg.model.width is None or cfg.model.width >= 1, f"model.width must be >= 1; got {cfg.model.width}")
    losses = list_train_losses()
    _require(cfg.loss.name in losses, f"loss.name: unknown loss {cfg.loss.name!r}; choose one of {', '.join(losses)}")
    _require(math.isfinite(cfg.loss.eps) and cfg.loss.eps > 0, f"loss.eps must be > 0 (an L2 radius); got {cfg.loss.eps}")
    _require(0.0 < cfg.loss.p < 1.0, f"loss.p must lie in the open interval (0, 1); got {cfg.loss.p}")
    _require(math.isfinite(cfg.loss.lipschitz_penalty) and cfg.loss.lipschitz_penalty >= 0, f"loss.lipschitz_penalty must be >= 0; got {cfg.loss.lipschitz_penalty}")
    _require(math.isfinite(cfg.loss.penalty_power) and cfg.loss.penalty_power > 0, f"loss.penalty_power must be > 0; got {cfg.loss.penalty_power}")
    _require(math.isfinite(cfg.loss.trades_lambda) and cfg.loss.trades_lambda >= 0, f"loss.trades_lambda must be >= 0; got {cfg.loss.trades_lambda}")
    _require(math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0, f"optim.lr must be > 0; got {cfg.optim.lr}")
    _require(math.isfinite(cfg.optim.weight_decay) and cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {cfg.optim.weight_decay}")
    _require(0 < cfg.optim.gamma <= 1, f"optim.gamma must be in (0, 1]; got {cfg.optim.gamma}")
    _require(all(m >= 1 for m in cfg.optim.milestones), f"optim.milestones must be epochs >= 1; got {list(cfg.optim.milestones)}")
    _require(cfg.train.epochs >= 1, f"train.epochs must be >= 1; got {cfg.train.epochs}")
    _require(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1; got {cfg.train.batch_size}")
    _require(cfg.train.power_iters >= 0, f"train.power_iters must be >= 0; got {cfg.train.power_iters}")
    _require(cfg.train.power_grad in POWER_GRAD_MODES, f"train.power_grad must be {' or '.join(POWER_GRAD_MODES)}; got {cfg.train.power_grad!r}")
    _require(cfg.train.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1; got {cfg.train.checkpoint_every}")
    _require(cfg.train.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1; got {cfg.train.keep_checkpoints}")
    dev = cfg.train.device
    _require(
        dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
        f"train.device must be auto, cpu, cuda or cuda:N; got {dev!r}",
    )
    _require(cfg.train.precision in ("fp32", "bf16", "fp64", "auto"), f"train.precision must be fp32, bf16, fp64 or auto; got {cfg.train.precision!r}")
    _require(cfg.train.compile in ("none", "default", "reduce-overhead", "max-autotune"),
             f"train.compile must be none, default, reduce-overhead or max-autotune; got {cfg.train.compile!r}")
    _require(len(cfg.eval.eps) >= 1, "eval.eps must list at least one radius")
    _require(all(math.isfinite(e) and e > 0 for e in cfg.eval.eps), f"eval.eps values must be > 0; got {list(cfg.eval.eps)}")
    _require(cfg.eval.every >= 0, f"eval.every must be >= 0; got {cfg.eval.every}")
    _require(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1; got {cfg.eval.batch_size}")
    _require(cfg.sweep.seeds >= 1, f"sweep.seeds must be >= 1; got {cfg.sweep.seeds}")
    from lipmargin.certify import BOUND_METHODS

    _require(cfg.eval.bound in BOUND_METHODS, f"eval.bound must be one of {', '.join(sorted(BOUND_METHODS))}; got {cfg.eval.bound!r}")


# --------------------------------------------------------------------------------------------
# YAML, overrides, presets
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"loss.eps=0.5"`` -> (["loss", "eps"], 0.5); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. loss.eps=0.5)")
    key, raw = item.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int over 4300 digits
        value = raw
    return path, value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a nested dict (validated later by config_from_dict)."""
    out = dict(values)
    for item in overrides:
        path, value = parse_override(item)
        nested: dict[str, Any] = value
        for k in reversed(path):
            nested = {k: nested}
        out = _merge(out, nested)
    return out


def _preset_dir() -> Path:
    return Path(str(resources.files("lipmargin") / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def preset_values(name: str) -> dict[str, Any]:
    path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(list_presets())}")
    return _read_yaml(path)


def load_preset(name: str) -> RunConfig:
    return config_from_dict(preset_values(name))


def preset_description(name: str) -> str:
    return str(preset_values(name).get("description", ""))


def load_config(
    path: str | Path | None = None, *, preset: str | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Preset (if any), then the YAML file (if any), then the overrides; validated.

    Without a preset or a file the default preset is the base.

    >>> cfg = load_config(preset="moons-cll", overrides=["loss.eps=0.3", "train.epochs=2"])
    >>> cfg.model.name, cfg.loss.name, cfg.loss.eps, cfg.train.epochs
    ('moons-mlp', 'cll', 0.3, 2)
    >>> load_config(preset="moons-cll", overrides=["loss.name=nope"])
    Traceback (most recent call last):
    ...
    lipmargin.config.ConfigError: loss.name: unknown loss 'nope'; choose one of ce, ce-cr, cll, gloro, hkr, lmt
    """
    values: dict[str, Any] = {}
    if preset is not None:
        values = preset_values(preset)
    if path is not None:
        values = _merge(values, _read_yaml(Path(path)))
    if preset is None and path is None:
        values = preset_values(DEFAULT_PRESET)
    values = apply_overrides(values, overrides)
    return config_from_dict(values)
