"""The shipped pretrained models (lipmargin/pretrained/): they load, their files verify, and a sound
certificate on the shipped sample gives what their record says."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch

from lipmargin.certify import certify
from lipmargin.config import config_from_dict
from lipmargin.data import DatasetError, load_dataset, to_float
from lipmargin.pretrained import PretrainedError, list_pretrained, load_pretrained, pretrained_eval_sample

NAMES = ["digits-2c2f-cll", "fmnist-4c3f-cll", "moons-mlp-cll"]
FOLDER = resources.files("lipmargin").joinpath("pretrained")


def _record(name: str) -> dict:
    return json.loads(FOLDER.joinpath(f"{name}.json").read_text())


def _copy(name: str, dest: Path) -> Path:
    for suffix in (".json", ".safetensors", ".sample.npz"):
        with resources.as_file(FOLDER.joinpath(name + suffix)) as src:
            shutil.copyfile(src, dest / (name + suffix))
    return dest


def test_the_shipped_models_are_listed():
    assert list_pretrained() == NAMES
    total = sum(FOLDER.joinpath(f"{n}{s}").stat().st_size if hasattr(FOLDER, "stat") else
                len(FOLDER.joinpath(f"{n}{s}").read_bytes()) for n in NAMES for s in (".safetensors", ".sample.npz"))
    assert total < 8 * 2**20


@pytest.mark.parametrize("name", NAMES)
def test_record_hashes_match_the_files(name):
    info = _record(name)
    for key in ("weights", "eval_sample"):
        data = FOLDER.joinpath(info[key]["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info[key]["sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_record_config_builds_the_shipped_model(name):
    info = _record(name)
    cfg = config_from_dict(info["training"]["config"])  # the recorded run config is a valid config
    assert cfg.model.name == info["model"]["name"] and cfg.data.name == info["dataset"]
    assert [float(e) for e in cfg.eval.eps] == info["eval_eps"]
    assert info["training"]["command"].startswith("lipmargin ") and len(info["git_commit"]) == 40
    model, loaded_info = load_pretrained(name)
    assert loaded_info == info
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    assert list(model.in_shape) == info["input_shape"] and model.num_classes == info["num_classes"]


@pytest.mark.parametrize("name", NAMES)
def test_sound_certificate_on_the_sample_reproduces_the_record(name):
    model, info = load_pretrained(name)
    sample = pretrained_eval_sample(name)
    rec = info["eval_sample"]
    assert len(sample) == rec["num_samples"]
    res = certify(model, [(to_float(sample.inputs), sample.labels)], info["eval_eps"], method="sound")
    assert res.sound
    n = len(sample)
    # the same count of samples: each accuracy is (count / n), recorded from the shipped files
    assert round(res.clean_accuracy * n) == round(rec["clean_accuracy"] * n)
    for e in info["eval_eps"]:
        assert round(res.certified_accuracy[e] * n) == round(rec["certified_accuracy"][repr(e)] * n)
    accs = [res.certified_accuracy[e] for e in sorted(info["eval_eps"])]
    assert all(a >= b for a, b in zip(accs, accs[1:])) and accs[0] <= res.clean_accuracy
    assert accs[0] > 0.5  # a trained model, not a random one: the check above certified something
    # an attack-free truth check of the certificate: the recorded sound Lipschitz bound is at least
    # the gradient norm of every logit difference at the sample (a lower bound of the true constant)
    x = to_float(sample.inputs[:32]).to(torch.float64).requires_grad_(True)
    logits = model.to(torch.float64)(x)
    top2 = logits.topk(2, dim=1).values
    (g,) = torch.autograd.grad((top2[:, 0] - top2[:, 1]).sum(), x)
    assert g.flatten(1).norm(dim=1).max() <= rec["lipschitz_bound"]


@pytest.mark.parametrize("name", NAMES)
def test_sample_is_the_start_of_the_test_split(name):
    info = _record(name)
    sample = pretrained_eval_sample(name)
    try:
        test = load_dataset(info["dataset"], split="test")
    except DatasetError:
        pytest.skip(f"{info['dataset']} files are not installed")
    n = len(sample)
    assert torch.equal(sample.labels, test.labels[:n])
    assert torch.equal(sample.inputs, test.inputs[:n])


def test_damaged_weights_are_refused(tmp_path):
    name = "moons-mlp-cll"
    _copy(name, tmp_path)
    path = tmp_path / f"{name}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in a weight
    path.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match=r"weights file moons-mlp-cll.safetensors is damaged") as err:
        load_pretrained(name, root=tmp_path)
    assert "\n" not in str(err.value)
    path.unlink()
    with pytest.raises(PretrainedError, match="missing"):
        load_pretrained(name, root=tmp_path)


def test_damaged_sample_is_refused(tmp_path):
    name = "digits-2c2f-cll"
    _copy(name, tmp_path)
    path = tmp_path / f"{name}.sample.npz"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(PretrainedError, match="eval sample file .* is damaged"):
        pretrained_eval_sample(name, root=tmp_path)
    load_pretrained(name, root=tmp_path)  # the weights are still fine


def test_intact_copy_loads_like_the_shipped_one(tmp_path):
    name = "digits-2c2f-cll"
    _copy(name, tmp_path)
    assert list_pretrained(tmp_path) == [name]
    a, _ = load_pretrained(name)
    b, _ = load_pretrained(name, root=tmp_path)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown pretrained model 'mnist-cll'; shipped: digits-2c2f-cll, fmnist-4c3f-cll, moons-mlp-cll"):
        load_pretrained("mnist-cll")
    with pytest.raises(ValueError, match="unknown pretrained model"):
        pretrained_eval_sample("nope")


def test_loading_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    load_pretrained("moons-mlp-cll")
    assert torch.equal(torch.get_rng_state(), state)
