"""Model registry and the paper's architectures (docs/method.md#d-layouts).

Every registered model is a :class:`LipschitzNet`: a feature extractor ``phi`` made of layers with
Lipschitz rules, and a plain linear head ``W``.  Inputs are in [0, 1] without normalisation.
Importing this package imports the family modules, which fill the registry from their size tables.

Modules:

- :mod:`~lipmargin.models._registry`: ModelSpec, MODELS, register_model, list_models, create_model
- :mod:`~lipmargin.models.lipnet`: LipschitzNet and the shared building blocks
- :mod:`~lipmargin.models.convnets`: 2C2F, 4C3F, 6C2F, 8C2F (plain convs + MaxMin)
- :mod:`~lipmargin.models.mlp`: moons-mlp, mlp
- :mod:`~lipmargin.models.lipconvnet`: SOC LipConvNets (lipconvnet-5/10/20)
- :mod:`~lipmargin.models.cpl`, :mod:`~lipmargin.models.sll`: CPL and SLL nets (-s, -xl), on the
  layout of :mod:`~lipmargin.models._residual`
- :mod:`~lipmargin.models.aol`: AOL nets (aol-s)
"""

from lipmargin.models._registry import MODELS, ModelSpec, create_model, list_models, register_model, register_variant
from lipmargin.models.aol import AOL_NETS, aol_net
from lipmargin.models.convnets import CONVNETS, conv_net
from lipmargin.models.cpl import CPL_NETS, cpl_net
from lipmargin.models.lipconvnet import LIPCONVNETS, lipconvnet
from lipmargin.models.lipnet import LipschitzNet
from lipmargin.models.mlp import MLPS, mlp
from lipmargin.models.sll import SLL_NETS, sll_net

#: The 1-Lipschitz backbones (SOC LipConvNet, CPL, SLL, AOL): their feature bound is 1 by construction.
BACKBONES: tuple[str, ...] = (*LIPCONVNETS, *CPL_NETS, *SLL_NETS, *AOL_NETS)

__all__ = [
    "BACKBONES",
    "CONVNETS",
    "LipschitzNet",
    "MLPS",
    "MODELS",
    "ModelSpec",
    "aol_net",
    "conv_net",
    "cpl_net",
    "create_model",
    "lipconvnet",
    "list_models",
    "mlp",
    "register_model",
    "register_variant",
    "sll_net",
]
