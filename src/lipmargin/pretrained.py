"""Small trained models shipped with lipmargin, loadable by name.

Each model is three files in the data folder ``lipmargin/pretrained/``:

* ``<name>.safetensors``: the model's ``state_dict`` in float32, or float16 where its JSON says so (loaded
  into the float32 model; the record certifies the weights as loaded) (safetensors: no pickle);
* ``<name>.json``: how to build it (registered model name and options, dataset, input shape,
  number of classes), how it was trained (the exact command, lipmargin version, git commit), the
  SHA-256 of both binary files, and what a sound certificate gives on the shipped sample and on the
  full test set, plus the attack audit's summary;
* ``<name>.sample.npz``: a small evaluation sample of the model's test set (first images of the
  test split; see ``info["eval_sample"]["description"]``), so that a certificate needs no dataset
  files.  The full test set is used only when the caller loads it
  (``lipmargin.data.load_dataset(info["dataset"], split="test")``).

Every file is hashed before it is read; a mismatch is a one-line :class:`PretrainedError`.
"""

from __future__ import annotations

import hashlib
import io
import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from lipmargin.data import ArrayDataset
from lipmargin.models import LipschitzNet, create_model

__all__ = ["PretrainedError", "list_pretrained", "load_pretrained", "pretrained_eval_sample"]

FORMAT_VERSION = 1


class PretrainedError(ValueError):
    """A shipped model's files are missing, damaged or inconsistent (one-line message)."""


def _folder(root: str | Path | None) -> Traversable:
    if root is None:
        return resources.files("lipmargin").joinpath("pretrained")
    return Path(root)


def list_pretrained(root: str | Path | None = None) -> list[str]:
    """Names of the shipped models (or of those in the folder ``root``), sorted.

    >>> "digits-2c2f-cll" in list_pretrained()
    True
    """
    folder = _folder(root)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _info(name: str, folder: Traversable, root: str | Path | None) -> dict[str, Any]:
    known = list_pretrained(root)
    if name not in known:
        where = "shipped" if root is None else f"in {root}"
        raise ValueError(f"unknown pretrained model {name!r}; {where}: {', '.join(known) or 'none'}")
    try:
        info = json.loads(folder.joinpath(f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"pretrained model {name!r}: its {name}.json is unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise PretrainedError(f"pretrained model {name!r}: {name}.json is not a format-{FORMAT_VERSION} record")
    return info


def _verified_bytes(name: str, folder: Traversable, record: Any, what: str) -> bytes:
    """The bytes of the file ``record["file"]`` after checking them against ``record["sha256"]``."""
    if not (isinstance(record, dict) and isinstance(record.get("file"), str) and isinstance(record.get("sha256"), str)):
        raise PretrainedError(f"pretrained model {name!r}: {name}.json names no {what} file with its sha256")
    file = record["file"]
    if "/" in file or "\\" in file or file.startswith("."):
        raise PretrainedError(f"pretrained model {name!r}: {what} file name {file!r} is not a plain file name")
    try:
        data = folder.joinpath(file).read_bytes()
    except OSError as e:
        raise PretrainedError(f"pretrained model {name!r}: its {what} file {file} is missing ({e.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise PretrainedError(
            f"pretrained model {name!r}: {what} file {file} is damaged (SHA-256 {digest[:12]}... but "
            f"{name}.json records {record['sha256'][:12]}...); reinstall lipmargin"
        )
    return data


def load_pretrained(name: str, root: str | Path | None = None) -> tuple[LipschitzNet, dict[str, Any]]:
    """``(model, info)``: a shipped model in eval mode (float32, CPU) and its JSON record.

    ``root`` is a folder holding ``<name>.json`` and its files (default: the ones shipped with
    lipmargin).  The weights' SHA-256 is verified before they are parsed; a damaged file raises
    :class:`PretrainedError`, an unknown name a ``ValueError`` listing the known names.

    >>> model, info = load_pretrained("moons-mlp-cll")
    >>> model.training, info["dataset"], info["num_classes"]
    (False, 'moons', 2)
    >>> model(torch.zeros(1, 2)).shape
    torch.Size([1, 2])
    """
    folder = _folder(root)
    info = _info(name, folder, root)
    data = _verified_bytes(name, folder, info.get("weights"), "weights")
    try:
        state = st_load(data)
    except SafetensorError as e:
        raise PretrainedError(f"pretrained model {name!r}: its weights are not a valid safetensors file ({e})") from None
    spec = info.get("model")
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("options", {}), dict)):
        raise PretrainedError(f"pretrained model {name!r}: {name}.json has no valid model record")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG as it was
        model = create_model(spec["name"], tuple(info["input_shape"]), int(info["num_classes"]), **spec.get("options", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PretrainedError(f"pretrained model {name!r}: weights do not fit model {spec['name']} ({first})") from None
    return model.eval(), info


def pretrained_eval_sample(name: str, root: str | Path | None = None) -> ArrayDataset:
    """The evaluation sample shipped with model ``name`` (hash-verified), as an ``ArrayDataset``.

    Images are uint8 in 0..255 (convert batches with :func:`lipmargin.data.to_float`); other inputs
    are float32 already in the model's range.

    >>> sample = pretrained_eval_sample("digits-2c2f-cll")
    >>> len(sample), sample.input_shape, sample.num_classes
    (360, (1, 8, 8), 10)
    """
    folder = _folder(root)
    info = _info(name, folder, root)
    data = _verified_bytes(name, folder, info.get("eval_sample"), "eval sample")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            inputs, labels = npz["inputs"], npz["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise PretrainedError(f"pretrained model {name!r}: its eval sample is not a valid .npz file ({e})") from None
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(inputs)),
        torch.from_numpy(labels.astype(np.int64)),
        int(info["num_classes"]),
        f"{info['dataset']} ({name} sample)",
    )
