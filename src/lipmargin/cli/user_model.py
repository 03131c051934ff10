"""Load a model that lipmargin did not train: a factory in a Python file plus a weights file.

Used by ``lipmargin certify/audit --model FILE.py:FACTORY --weights W.safetensors``.  The factory
is called without arguments and must return an ``nn.Module`` that maps an input batch to logits;
the weights are loaded with ``strict=True`` (every key must match).  Errors are one-line
``ValueError``s naming what is wrong.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_user_model", "parse_input_shape"]


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``; ``ValueError`` for anything else."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--input-shape must be positive integers separated by commas (e.g. 1,28,28); got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"--input-shape must be positive integers separated by commas (e.g. 1,28,28); got {text!r}")
    return shape


def _load_factory(spec: str):
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise ValueError(f"--model must be FILE.py:FACTORY (a function returning the nn.Module); got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"--model: no such file {path}")
    module_name = f"_lipmargin_user_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"--model: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # fx and pickling look classes up by module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  (the user's file: report any failure in one line)
        raise ValueError(f"--model: importing {path} failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--model: {path} has no function {name!r}")
    return factory


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"--weights: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--weights: cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights: {path} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_user_model(spec: str, weights: str | Path | None) -> nn.Module:
    """Build ``FILE.py:FACTORY`` and load ``weights`` (safetensors, or a ``torch.save`` state dict).

    The model is returned in eval mode (BatchNorm uses its running statistics, Dropout is off).
    """
    factory = _load_factory(spec)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--model: calling {spec} failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model: {spec} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        state = _load_state(Path(weights))
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"--weights: {str(e).strip().splitlines()[-1].strip()}") from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"--weights: keys do not match the model: missing {list(result.missing_keys)[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )
    return model.eval()
