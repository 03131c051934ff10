"""lipmargin: certified L2-robust classifiers with the Calibrated Lipschitz-Margin Loss (CLL).

Public API; see README.md.  Importing the package has no side effects beyond filling the
registries (layers' Lipschitz rules, models, datasets, losses).
"""

from lipmargin.certify import (
    BOUND_METHODS,
    CertifyResult,
    ModelBound,
    certified_accuracy,
    certified_radius,
    certify,
    model_bound,
)
from lipmargin.checkpoint import CheckpointError, CheckpointRef
from lipmargin.config import ConfigError, RunConfig, load_config
from lipmargin.data import DatasetError, list_datasets, load_dataset
from lipmargin.layers import GroupSort, MaxMin, Normalize
from lipmargin.graph_estimate import FeatureBound
from lipmargin.lipschitz import (
    operator_norm_bound,
    pairwise_head_norms,
    register_layer_rule,
)
from lipmargin.losses import (
    CertRegLoss,
    CLLoss,
    GloRoLoss,
    HKRLoss,
    LMTLoss,
    cert_reg_loss,
    hkr_loss,
    lmt_loss,
    cll_loss,
    cll_sigma,
    gloro_eps_schedule,
    gloro_loss,
    k_scale_schedule,
    lipschitz_penalty,
)
from lipmargin.models import LipschitzNet, create_model, list_models, register_model
from lipmargin.train import TrainingError, evaluate, fit, load_run, open_run

__version__ = "0.1.0"

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
    "FeatureBound",
    "GloRoLoss",
    "GroupSort",
    "LipschitzNet",
    "MaxMin",
    "ModelBound",
    "Normalize",
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
    "model_bound",
    "open_run",
    "operator_norm_bound",
    "pairwise_head_norms",
    "register_layer_rule",
    "register_model",
    "__version__",
]
