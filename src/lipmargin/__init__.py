"""lipmargin: certified L2-robust classifiers with the Calibrated Lipschitz-Margin Loss (CLL).

Public API; see README.md.  The names below are imported on first use (PEP 562), so that
``import lipmargin`` -- and with it ``lipmargin --help`` -- does not import torch.  Using a name
imports its module, which fills that module's registries (layers' Lipschitz rules, models,
datasets, losses); importing has no other side effects.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from lipmargin._version import __version__

# submodule -> the public names it defines
_EXPORTS: dict[str, tuple[str, ...]] = {
    "certify": (
        "BOUND_METHODS",
        "CertifyResult",
        "ModelBound",
        "ModelEstimate",
        "certified_accuracy",
        "certified_radius",
        "certify",
        "model_bound",
        "model_estimate",
    ),
    "checkpoint": (
        "CheckpointError",
        "CheckpointRef",
    ),
    "config": (
        "ConfigError",
        "RunConfig",
        "load_config",
    ),
    "data": (
        "DatasetError",
        "list_datasets",
        "load_dataset",
    ),
    "nn": (
        "GroupSort",
        "MaxMin",
        "Normalize",
    ),
    "lipschitz": (
        "FeatureEstimate",
        "operator_norm_bound",
        "pairwise_head_norms",
        "register_layer_rule",
    ),
    "losses": (
        "CertRegLoss",
        "CLLoss",
        "GloRoLoss",
        "HKRLoss",
        "LMTLoss",
        "cert_reg_loss",
        "hkr_loss",
        "lmt_loss",
        "cll_loss",
        "cll_sigma",
        "gloro_eps_schedule",
        "gloro_loss",
        "k_scale_schedule",
        "lipschitz_penalty",
    ),
    "models": (
        "LipschitzNet",
        "create_model",
        "list_models",
        "register_model",
    ),
    "pretrained": (
        "PretrainedError",
        "list_pretrained",
        "load_pretrained",
        "pretrained_eval_sample",
    ),
    "train": (
        "TrainingError",
        "evaluate",
        "fit",
        "load_run",
        "open_run",
    ),
}

_NAME_TO_MODULE = {name: module for module, names in _EXPORTS.items() for name in names}

#: Public names that were renamed: the old name fails with an error naming the new one.
_RENAMED = {"FeatureBound": "FeatureEstimate"}

if TYPE_CHECKING:  # static type checkers see ordinary imports
    from lipmargin.certify import BOUND_METHODS, CertifyResult, ModelBound, ModelEstimate, certified_accuracy, certified_radius, certify, model_bound, model_estimate  # noqa: F401
    from lipmargin.pretrained import PretrainedError, list_pretrained, load_pretrained, pretrained_eval_sample  # noqa: F401
    from lipmargin.checkpoint import CheckpointError, CheckpointRef  # noqa: F401
    from lipmargin.config import ConfigError, RunConfig, load_config  # noqa: F401
    from lipmargin.data import DatasetError, list_datasets, load_dataset  # noqa: F401
    from lipmargin.nn import GroupSort, MaxMin, Normalize  # noqa: F401
    from lipmargin.lipschitz import FeatureEstimate, operator_norm_bound, pairwise_head_norms, register_layer_rule  # noqa: F401
    from lipmargin.losses import CertRegLoss, CLLoss, GloRoLoss, HKRLoss, LMTLoss, cert_reg_loss, hkr_loss, lmt_loss, cll_loss, cll_sigma, gloro_eps_schedule, gloro_loss, k_scale_schedule, lipschitz_penalty  # noqa: F401
    from lipmargin.models import LipschitzNet, create_model, list_models, register_model  # noqa: F401
    from lipmargin.train import TrainingError, evaluate, fit, load_run, open_run  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name)
    if name in _RENAMED:
        raise AttributeError(f"{name} was renamed {_RENAMED[name]}: use lipmargin.{_RENAMED[name]}")
    if module is None:
        raise AttributeError(f"module 'lipmargin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lipmargin.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module.  Importing a submodule makes the import system set it as an attribute of
    the package; where a public name is also a submodule's name (``certify``), the name keeps
    meaning the function, as ``from lipmargin import certify`` always did."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _NAME_TO_MODULE:
            return  # the submodule stays reachable as sys.modules["lipmargin.certify"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "BOUND_METHODS",
    "CLLoss",
    "CertRegLoss",
    "HKRLoss",
    "LMTLoss",
    "cert_reg_loss",
    "hkr_loss",
    "lmt_loss",
    "CertifyResult",
    "CheckpointError",
    "CheckpointRef",
    "ConfigError",
    "DatasetError",
    "FeatureEstimate",
    "GloRoLoss",
    "GroupSort",
    "LipschitzNet",
    "MaxMin",
    "ModelBound",
    "ModelEstimate",
    "Normalize",
    "PretrainedError",
    "RunConfig",
    "TrainingError",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "cll_loss",
    "cll_sigma",
    "create_model",
    "evaluate",
    "fit",
    "gloro_eps_schedule",
    "gloro_loss",
    "k_scale_schedule",
    "lipschitz_penalty",
    "list_datasets",
    "list_models",
    "load_config",
    "load_dataset",
    "load_run",
    "open_run",
    "model_bound",
    "model_estimate",
    "list_pretrained",
    "load_pretrained",
    "pretrained_eval_sample",
    "operator_norm_bound",
    "pairwise_head_norms",
    "register_layer_rule",
    "register_model",
    "__version__",
]
