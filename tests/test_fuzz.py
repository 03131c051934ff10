"""Fuzzing what users and disks get wrong: config values, damaged checkpoints, CIFAR pickles.

Every target either accepts its input or raises its own error type with a one-line message
(ConfigError, CheckpointError, DatasetError); nothing else escapes, the CLI answers exit code 2
with one stderr line, and no pickle ever runs code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import shutil
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lipmargin.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from lipmargin.cli import main
from lipmargin.config import ConfigError, RunConfig, apply_overrides, config_from_dict, preset_values
from lipmargin.data import DatasetError, load_dataset

# No shrinking: minimising a failure through deeply nested YAML / JSON takes minutes, and the
# unshrunk example already names the input that escaped.
FUZZ = settings(
    max_examples=60,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


def _one_line(message: str) -> None:
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message[:300]!r}"


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _config_keys() -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(RunConfig).items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{name}.{f}" for f in typing.get_type_hints(tp)]
        else:
            keys.append(name)
    return keys


CONFIG_KEYS = _config_keys()
BAD_KEYS = ["modle.name", "loss.epz", "loss", "train", "eval", "nope", "loss.eps.x", "", ".", "loss..eps"]
# Up to 4000 digits: Python refuses str() of ints above 4300 digits, and hypothesis must be able to
# print a failing example; test_huge_integers_are_config_errors covers the longer ones.
HUGE_INTS = [10**400, -(10**400), 10**4000, 2**64, 2**63 - 1, -(2**63)]
# YAML sources that break parsers: unclosed flows, deep nesting, tags, anchors, huge literals.
TRICKY_TEXT = [
    "[", "{a", "]", "[1,", "[" * 2000, "{" * 2000, "- " * 2000, "&a [*a]", "!!binary AAAA", "!!set {a}",
    "!!python/object:os.system", "!!python/name:os.system", "9" * 5000, "-" + "9" * 400, "1e999", "1.0e999",
    ".nan", ".inf", "-.inf", "0x1F", "1_000", "~", "null", "yes", "36/255", "0.1,0.2", "0.1,,", ",", "2020-01-01",
    "'", '"', "a: b: c", "\x00", "\t", "\n", "1\n2", "%YAML 1.2", "---", "...", "? a",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE_INTS)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(TRICKY_TEXT)
)
config_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["name", "eps", "p", "x", ""]) | st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)
config_keys = st.sampled_from(CONFIG_KEYS) | st.sampled_from(BAD_KEYS) | st.text(max_size=8)


def _nested(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _config_or_config_error(build: Callable[[], RunConfig]) -> None:
    try:
        cfg = build()
    except ConfigError as e:
        _one_line(str(e))
    else:
        assert isinstance(cfg, RunConfig)


@FUZZ
@given(st.lists(st.tuples(config_keys, config_values), min_size=1, max_size=3))
def test_config_from_dict_accepts_or_raises_config_error(items: list[tuple[str, Any]]) -> None:
    values: dict[str, Any] = {}
    for key, value in items:
        values.update(_nested(key, value))
    _config_or_config_error(lambda: config_from_dict(values))


@pytest.mark.parametrize("key", ["loss.eps", "data.root", "train.epochs", "model.width", "description", "eval.eps"])
def test_huge_integers_are_config_errors(key: str) -> None:
    """Beyond 4300 digits even str() and repr() of an int raise ValueError."""
    _config_or_config_error(lambda: config_from_dict(_nested(key, 10**5000)))


override_sources = st.sampled_from(TRICKY_TEXT) | st.text(max_size=16) | config_values.map(json.dumps)


@FUZZ
@given(st.lists(st.tuples(config_keys, override_sources), min_size=1, max_size=3), st.booleans())
def test_overrides_accept_or_raise_config_error(items: list[tuple[str, str]], on_preset: bool) -> None:
    base = preset_values("digits-cll") if on_preset else {}
    overrides = [f"{key}={source}" for key, source in items]
    _config_or_config_error(lambda: config_from_dict(apply_overrides(base, overrides)))


@pytest.mark.parametrize(
    "override",
    [
        "loss.p=1.5", "train.epochs=-1", "modle.name=4C3F", "loss.eps=0", "data.name=nope", "model.name=nope",
        "loss.name=nope", "eval.eps=[]", "train.batch_size=abc", "loss.eps=.nan", "loss.eps=-.inf",
        "optim.milestones=[1.0e999]", "train.device=cuda:x",
        # found by the fuzz tests above: huge numbers and YAML that does not parse inside a list
        "loss.eps=" + "9" * 400, "train.epochs=" + "9" * 5000, "eval.eps=[", "model.widths={a",
        "loss.eps=" + "[" * 3000,
    ],
    ids=lambda s: s if len(s) < 40 else s[:30] + "...",
)
def test_cli_rejects_bad_values_in_one_line(override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--set", override, "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # rejected before training started


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class _Evil:
    """A pickle payload that creates ``path`` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.path!r}, 'w').close()",))


def _evil_pickle(sentinel: Path, kind: str) -> bytes:
    if kind == "torch.save":  # the zip format of torch.save: a pickle inside
        buf = io.BytesIO()
        torch.save({"model.head.weight": _Evil(sentinel)}, buf)
        return buf.getvalue()
    return pickle.dumps({"model.head.weight": _Evil(sentinel)}, protocol=int(kind))


def test_the_evil_pickle_really_runs_code(tmp_path: Path) -> None:
    """Sanity check of the payload the tests below rely on."""
    sentinel = tmp_path / "sentinel"
    pickle.loads(_evil_pickle(sentinel, "4"))
    assert sentinel.exists()


@pytest.fixture(scope="module")
def checkpoint_source(tiny_run: Path) -> tuple[Path, dict[str, Any]]:
    """The tiny run's checkpoint folder and what its newest checkpoint holds."""
    folder = tiny_run / "checkpoints"
    paths = list_checkpoints(folder)
    assert len(paths) >= 2, "the tiny run keeps two checkpoints"
    ckpt = load_checkpoint(paths[-1])
    return folder, {"epoch": ckpt.epoch, "model_state": ckpt.model_state, "meta": ckpt.meta}


# A corruption takes (json bytes, tensor bytes, sentinel path) and returns the new pair.
Corruption = Callable[[bytes, bytes, Path], tuple[bytes, bytes]]


def _on(target: str, fn: Callable[[bytes], bytes]) -> Corruption:
    def corrupt(js: bytes, tensors: bytes, sentinel: Path) -> tuple[bytes, bytes]:
        return (fn(js), tensors) if target == "json" else (js, fn(tensors))

    return corrupt


def _truncate(fraction: float) -> Callable[[bytes], bytes]:
    return lambda b: b[: int(len(b) * fraction)]


def _flip(flips: list[tuple[float, int]]) -> Callable[[bytes], bytes]:
    def fn(b: bytes) -> bytes:
        out = bytearray(b)
        for where, mask in flips:
            if out:
                out[min(int(where * len(out)), len(out) - 1)] ^= mask
        return bytes(out)

    return fn


def _pickle_payload(kind: str, update_sha: bool) -> Corruption:
    def corrupt(js: bytes, tensors: bytes, sentinel: Path) -> tuple[bytes, bytes]:
        payload = _evil_pickle(sentinel, kind)
        if update_sha:  # an attacker who also rewrites the JSON's hash
            record = json.loads(js)
            record["sha256"], record["bytes"] = hashlib.sha256(payload).hexdigest(), len(payload)
            js = json.dumps(record).encode()
        return js, payload

    return corrupt


def _replace_field(path: list[str], value: Any) -> Corruption:
    def corrupt(js: bytes, tensors: bytes, sentinel: Path) -> tuple[bytes, bytes]:
        record = json.loads(js)
        node = record
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return json.dumps(record).encode(), tensors

    return corrupt


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
RECORD_FIELDS = [
    ["format_version"], ["epoch"], ["sha256"], ["bytes"], ["model_keys"], ["extra_state"], ["meta"],
    ["meta", "config"], ["meta", "data_shape"], ["meta", "train_seconds"],
]
targets = st.sampled_from(["json", "tensors"])
corruptions = st.one_of(
    st.builds(_on, targets, st.builds(_truncate, st.floats(0.0, 0.999))),
    st.builds(_on, targets, st.builds(_flip, st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=8))),
    st.builds(_on, targets, st.binary(min_size=1, max_size=64).map(lambda garbage: lambda b: b + garbage)),
    st.builds(_pickle_payload, st.sampled_from(["2", "4", "5", "torch.save"]), st.booleans()),
    st.builds(lambda g: _on("json", lambda b: g), st.binary(max_size=64)),
    st.builds(lambda v: _on("json", lambda b: json.dumps(v).encode()), json_values),
    st.builds(_replace_field, st.sampled_from(RECORD_FIELDS), json_values),
)


def _copy_checkpoints(source: Path, tmp: Path) -> tuple[Path, list[Path]]:
    folder = tmp / "checkpoints"
    shutil.copytree(source, folder)
    return folder, list_checkpoints(folder)


@FUZZ
@given(corruptions)
def test_damaged_checkpoint_loads_intact_or_raises(checkpoint_source: tuple[Path, dict[str, Any]], corrupt: Corruption) -> None:
    source, original = checkpoint_source
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sentinel = tmp / "sentinel"
        _, paths = _copy_checkpoints(source, tmp)
        js_path, st_path = paths[-1], paths[-1].with_suffix(".safetensors")
        js, tensors = js_path.read_bytes(), st_path.read_bytes()
        new_js, new_tensors = corrupt(js, tensors, sentinel)
        js_path.write_bytes(new_js)
        st_path.write_bytes(new_tensors)
        try:
            ckpt = load_checkpoint(js_path)
        except CheckpointError as e:
            _one_line(str(e))
            assert (new_js, new_tensors) != (js, tensors), "an intact checkpoint was refused"
        else:
            assert new_tensors == tensors, "modified weights were accepted"
            assert sorted(ckpt.model_state) == sorted(original["model_state"])
            for key, value in original["model_state"].items():
                assert torch.equal(ckpt.model_state[key], value)
            assert isinstance(ckpt.epoch, int) and not isinstance(ckpt.epoch, bool)
            assert isinstance(ckpt.meta, dict)
            if new_js == js:
                assert ckpt.epoch == original["epoch"] and ckpt.meta == original["meta"]
        assert not sentinel.exists(), "unpickling ran code"


def test_deeply_nested_checkpoint_json_is_a_checkpoint_error(checkpoint_source: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, paths = _copy_checkpoints(checkpoint_source[0], tmp_path)
    paths[-1].write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError):
        load_checkpoint(paths[-1])


# Damage applied to every checkpoint of a run for the CLI tests: (name, corruption).
DAMAGE: list[tuple[str, Corruption]] = [
    ("truncated-weights", _on("tensors", _truncate(0.5))),
    ("flipped-weights", _on("tensors", _flip([(0.7, 1)]))),
    ("garbage-appended", _on("tensors", lambda b: b + b"\x00garbage")),
    ("pickle-weights", _pickle_payload("4", update_sha=False)),
    ("pickle-weights-rehashed", _pickle_payload("2", update_sha=True)),
    ("torch-save-rehashed", _pickle_payload("torch.save", update_sha=True)),
    ("garbage-json", _on("json", lambda b: b"\xff\xfe{not json")),
    ("truncated-json", _on("json", _truncate(0.3))),
    ("json-list", _on("json", lambda b: b"[]")),
    ("deep-json", _on("json", lambda b: b"[" * 100_000 + b"]" * 100_000)),
    ("wrong-version", _replace_field(["format_version"], 99)),
    ("extra-state-garbage", _replace_field(["extra_state"], {"__dict__": [[[1], 2]]})),
    ("meta-list", _replace_field(["meta"], [])),
    ("config-list", _replace_field(["meta", "config"], [])),
    ("data-shape-int", _replace_field(["meta", "data_shape"], 5)),
    ("data-shape-negative", _replace_field(["meta", "data_shape"], {"in_shape": [-1], "num_classes": 2})),
]


def _certify_cli(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["certify", str(run), "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name,corrupt", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_certify_with_every_checkpoint_damaged_fails_in_one_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, corrupt: Corruption
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    sentinel = tmp_path / "sentinel"
    for js_path in list_checkpoints(run / "checkpoints"):
        st_path = js_path.with_suffix(".safetensors")
        js, tensors = corrupt(js_path.read_bytes(), st_path.read_bytes(), sentinel)
        js_path.write_bytes(js)
        st_path.write_bytes(tensors)
    code, out, err = _certify_cli(run, capsys)
    assert code == 2, out
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not sentinel.exists()


def test_certify_refuses_a_damaged_newest_checkpoint_instead_of_falling_back(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    older, newest = list_checkpoints(run / "checkpoints")[-2:]
    st_path = newest.with_suffix(".safetensors")
    st_path.write_bytes(st_path.read_bytes()[:100])
    ckpt = latest_checkpoint(run / "checkpoints")  # resuming training may still start from it
    assert ckpt is not None and ckpt.path == older
    code, out, err = _certify_cli(run, capsys)
    assert code == 2 and out == ""  # certify names the damaged file instead of certifying another model
    assert err.count("\n") == 1 and str(st_path) in err and f"--checkpoint {older.stem}" in err
    code = main(["certify", str(run), "--json", "--checkpoint", older.stem])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == ckpt.epoch == int(older.stem.split("-")[1])


# --------------------------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------------------------

N_IMAGES = 6


def _cifar_arrays() -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (N_IMAGES, 3072), dtype=np.uint8)  # (N, 3072): R, G, B planes
    return data, [int(v) for v in rng.integers(0, 10, N_IMAGES)]


def _cifar_pickle(protocol: int) -> bytes:
    data, labels = _cifar_arrays()
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(N_IMAGES)]}
    return pickle.dumps(batch, protocol=protocol)


def _load_cifar_bytes(blob: bytes, tmp: Path) -> Any:
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(blob)
    return load_dataset("cifar10", tmp, "test")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_valid_cifar_pickle_loads_exactly(tmp_path: Path, protocol: int) -> None:
    ds = _load_cifar_bytes(_cifar_pickle(protocol), tmp_path)
    data, labels = _cifar_arrays()
    assert ds.inputs.dtype == torch.uint8 and ds.inputs.shape == (N_IMAGES, 3, 32, 32)
    assert torch.equal(ds.inputs.reshape(N_IMAGES, 3072), torch.from_numpy(data))
    assert ds.labels.tolist() == labels


def _evil_cifar(sentinel: Path, where: str, protocol: int) -> bytes:
    data, labels = _cifar_arrays()
    evil = _Evil(sentinel)
    batch: Any = {"top": evil, "data": {b"data": evil, b"labels": labels},
                  "labels": {b"data": data, b"labels": evil}, "extra": {b"data": data, b"labels": labels, b"x": evil}}[where]
    return pickle.dumps(batch, protocol=protocol)


# Hand-written protocol-0 programs calling dangerous globals through each opcode that names one.
HANDWRITTEN = [
    b"cos\nsystem\n(S'touch SENTINEL'\ntR.",
    b"cbuiltins\nexec\n(S'open(\"SENTINEL\", \"w\").close()'\ntR.",
    b"(S'touch SENTINEL'\nios\nsystem\n.",  # INST
    b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8cLENGTHtouch SENTINEL\x85R.",  # STACK_GLOBAL
    b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR.",  # an allowed global with a forbidden argument
    b"cnumpy\nload\n(S'SENTINEL'\ntR.",
    b"P0\n.",  # persistent id
    b"\x80\x02\x82\x01.",  # EXT1 extension code
]


_HUGE_LENGTH = (2**63).to_bytes(8, "little")
# Malformed, not malicious: lengths beyond the address space, deep nesting, nothing at all.
BROKEN_PICKLES = {
    "binunicode8-overflow": b"\x8d" + _HUGE_LENGTH + b"\x80",
    "binbytes8-overflow": b"\x8e" + _HUGE_LENGTH,
    "bytearray8-overflow": b"\x96" + _HUGE_LENGTH,
    "deep-lists": b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".",
    "empty": b"",
    "only-proto": b"\x80\x05",
}


def _handwritten(program: bytes, sentinel: Path) -> bytes:
    command = b"touch " + str(sentinel).encode()
    return program.replace(b"LENGTH", bytes([len(command)])).replace(b"SENTINEL", str(sentinel).encode())


cifar_corruptions = st.one_of(
    st.builds(_truncate, st.floats(0.0, 0.999)),
    st.builds(_flip, st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=8)),
    st.binary(min_size=1, max_size=64).map(lambda garbage: lambda b: b + garbage),
    st.binary(max_size=64).map(lambda garbage: lambda b: garbage),
    json_values.map(lambda v: lambda b: pickle.dumps(v)),
)


@FUZZ
@given(st.integers(0, pickle.HIGHEST_PROTOCOL), cifar_corruptions)
def test_damaged_cifar_pickle_loads_or_raises_dataset_error(protocol: int, corrupt: Callable[[bytes], bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        _check_cifar_load(corrupt(_cifar_pickle(protocol)), Path(tmp_name), None)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("where", ["top", "data", "labels", "extra"])
def test_malicious_cifar_pickle_never_runs(tmp_path: Path, where: str, protocol: int) -> None:
    sentinel = tmp_path / "sentinel"
    _check_cifar_load(_evil_cifar(sentinel, where, protocol), tmp_path, sentinel, must_fail=True)


@pytest.mark.parametrize("index", range(len(HANDWRITTEN)))
def test_handwritten_malicious_pickles_never_run(tmp_path: Path, index: int) -> None:
    sentinel = tmp_path / "sentinel"
    _check_cifar_load(_handwritten(HANDWRITTEN[index], sentinel), tmp_path, sentinel, must_fail=True)


@pytest.mark.parametrize("name", sorted(BROKEN_PICKLES))
def test_malformed_cifar_pickles_are_dataset_errors(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError) as info:
        _load_cifar_bytes(BROKEN_PICKLES[name], tmp_path)
    _one_line(str(info.value))


def _check_cifar_load(blob: bytes, tmp: Path, sentinel: Path | None, must_fail: bool = False) -> None:
    try:
        ds = _load_cifar_bytes(blob, tmp)
    except DatasetError as e:
        _one_line(str(e))
    else:
        assert not must_fail, "a malicious pickle loaded"
        n = ds.inputs.shape[0]
        assert ds.inputs.dtype == torch.uint8 and ds.inputs.shape == (n, 3, 32, 32)
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
        assert n == 0 or 0 <= int(ds.labels.min()) <= int(ds.labels.max()) <= 9
    if sentinel is not None:
        assert not sentinel.exists(), "unpickling ran code"
