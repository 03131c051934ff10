"""The deel-torchlip HKR baseline of ``experiments/fmnist_hkr.py``: its network, and the factory that
``lipmargin certify/audit --model FILE.py:FACTORY`` calls to rebuild the *converted* network.

- :func:`deel_model` is deel-torchlip's Fashion-MNIST tutorial network (the one of
  ``benchmarks/peer_deel_torchlip.py``, ``pool="l2"``) with an integer width multiplier ``w`` on
  its channel / unit counts: SpectralConv2d(16w) - GroupSort2 - ScaledL2NormPool2d -
  SpectralConv2d(32w) - GroupSort2 - ScaledL2NormPool2d - SpectralLinear(64w) - GroupSort2 -
  FrobeniusLinear(10, disjoint_neurons=True).  ``w = 1`` is exactly the peer script's network.
- :func:`converted_model` is the :class:`lipmargin.LipschitzNet` of plain layers that the peer
  script's ``to_lipschitz_net`` makes of that network's ``vanilla_export()`` (same layers, same
  state-dict keys and shapes as the trained-and-converted model of a run).

Factories (called without arguments by ``lipmargin ... --model``):

- ``hkr_w<N>`` (any N >= 1, e.g. ``experiments/fmnist_hkr_model.py:hkr_w2``): the converted
  network at width multiplier N.  The name carries the width, so a command line says everything;
  this is what ``fmnist_hkr.py`` uses for its audits.
- ``factory``: the width from the environment variable ``FMNIST_HKR_WIDTH_MULT`` (default 1).

A wrong width cannot go unnoticed: the weights are loaded strictly, and their shapes differ.

    lipmargin audit --model experiments/fmnist_hkr_model.py:hkr_w1 \\
        --weights RUN/model.safetensors --data fashion-mnist --n 1000 --json
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)

import peer_deel_torchlip as peer  # noqa: E402  (registers the DisjointL2Pool2d rule)
from deel import torchlip  # noqa: E402
from lipmargin import LipschitzNet  # noqa: E402

__all__ = ["IN_SHAPE", "NUM_CLASSES", "WIDTH_ENV", "deel_model", "converted_model", "factory", "peer"]

IN_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
WIDTH_ENV = "FMNIST_HKR_WIDTH_MULT"


def _check_width(width_mult: int) -> int:
    if isinstance(width_mult, bool) or not isinstance(width_mult, int) or width_mult < 1:
        raise ValueError(f"width multiplier must be an integer >= 1; got {width_mult!r}")
    return width_mult


def deel_model(width_mult: int = 1) -> torchlip.Sequential:
    """deel-torchlip's Fashion-MNIST tutorial network, channel / unit counts times ``width_mult``."""
    return peer.deel_model("l2", width_mult=_check_width(width_mult))


def export_and_convert(net: nn.Module) -> tuple[nn.Sequential, LipschitzNet]:
    """``(vanilla_export(), the peer script's LipschitzNet of it)``, both on the CPU in eval mode."""
    net.eval()
    exported = net.vanilla_export().cpu().eval()
    return exported, peer.to_lipschitz_net(exported, IN_SHAPE).eval()


def converted_model(width_mult: int = 1) -> LipschitzNet:
    """The converted architecture at ``width_mult`` (weights to be loaded; drawn from a fixed seed
    without touching the caller's RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = deel_model(width_mult)
    return export_and_convert(net)[1]


def factory() -> LipschitzNet:
    """The converted network at the width in ``$FMNIST_HKR_WIDTH_MULT`` (default 1)."""
    text = os.environ.get(WIDTH_ENV, "1")
    try:
        w = int(text)
    except ValueError:
        raise ValueError(f"{WIDTH_ENV} must be an integer >= 1; got {text!r}") from None
    return converted_model(w)


def __getattr__(name: str) -> Callable[[], LipschitzNet]:
    """``hkr_w<N>``: a factory of the converted network at width multiplier N (PEP 562)."""
    m = re.fullmatch(r"hkr_w([1-9][0-9]*)", name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    w = int(m.group(1))

    def _factory() -> LipschitzNet:
        return converted_model(w)

    _factory.__name__ = name
    return _factory
