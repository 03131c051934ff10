"""The scripts in examples/ run, with tiny settings, and do what they say.

Each example is imported from its file and its ``main(argv)`` called in this process (seconds
each).  Their results are checked against independent truths: an attack inside each certified
radius that never flips the label, the exported file against the float64 model's own argmax,
and the saved weights loaded into the factory that `lipmargin certify --model` calls.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lipmargin_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attack_flips(model: nn.Module, x: torch.Tensor, radius: torch.Tensor, steps: int = 20) -> torch.Tensor:
    """(B,) bool: a projected gradient attack on the top-2 margin, inside 0.999 x each radius,
    changed the float64 model's label.  An independent check of a certificate (finds only what
    exists; a flip inside a certified radius would prove the certificate wrong)."""
    m64 = model.double().eval()
    x = x.double()
    label = m64(x).argmax(1)
    r = (radius.clamp(max=10.0) * 0.999).double().reshape(-1, *([1] * (x.dim() - 1)))
    delta = torch.zeros_like(x, requires_grad=True)
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        out = m64(x + delta)
        flipped |= (out.argmax(1) != label).detach()
        own = out.gather(1, label.unsqueeze(1)).squeeze(1)
        other = out.masked_fill(nn.functional.one_hot(label, out.shape[1]).bool(), -torch.inf).amax(1)
        (grad,) = torch.autograd.grad((other - own).sum(), delta)
        with torch.no_grad():
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(r.shape)
            delta += 0.25 * r * grad / norm
            size = delta.flatten(1).norm(dim=1).reshape(r.shape)
            delta *= torch.where(size > r, r / size.clamp_min(1e-30), torch.ones_like(size))
    with torch.no_grad():
        flipped |= m64(x + delta).argmax(1) != label
    return flipped


def test_residual_cll_trains_a_plain_module_whose_certificates_survive_an_attack(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (tests/test_any_model.py runs the CLI's `certify --model examples/residual_cll.py:make_model`.)
    pytest.importorskip("sklearn")
    import lipmargin
    from lipmargin.data import load_dataset, to_float

    example = load_example("residual_cll")
    weights = tmp_path / "residual.safetensors"
    with torch.random.fork_rng():  # the script seeds the global RNG, as scripts may
        example.main(["--data", "digits", "--steps", "3", "--out", str(weights)])
    assert "certified" in capsys.readouterr().out
    # The saved weights load strictly into the factory the CLI uses (8x8 digits variant) ...
    monkeypatch.setenv("LIPMARGIN_EXAMPLE_SHAPE", "1,8,8")
    from safetensors.torch import load_file

    model = example.make_model()
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    # ... and no attack inside a certified radius of that plain PyTorch module changes its label.
    x = to_float(load_dataset("digits", split="test").inputs[:64])
    result = lipmargin.certify(model, [(x, torch.zeros(64, dtype=torch.long))], [], input_shape=(1, 8, 8))
    positive = result.radius > 0
    assert positive.any()
    assert not attack_flips(model, x[positive], result.radius[positive]).any()


def test_deel_torchlip_example_certificates_survive_an_attack(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("deel.torchlip", reason="deel-torchlip is not installed (pip install deel-torchlip)")
    pytest.importorskip("sklearn")
    example = load_example("certify_deel_torchlip")
    with torch.random.fork_rng():
        out = example.main(["--steps", "5", "--n", "64"])
    assert "certified accuracy" in capsys.readouterr().out
    result, model, x = out["result"], out["model"], out["inputs"]
    assert result.sound and result.num_samples == 64
    certified = result.radius > 0
    assert not attack_flips(model, x[certified], result.radius[certified]).any()
    # The bound is >= an observed ratio |(f_i - f_j)(a) - (f_i - f_j)(b)| / ||a - b||.
    with torch.no_grad():
        m64 = model.double()
        a, b = x[:32].double(), x[32:64].double()
        d = m64(a) - m64(b)  # (32, C)
        ratio = (d.unsqueeze(2) - d.unsqueeze(1)).abs().amax((1, 2)) / (a - b).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= result.lipschitz


def test_moons_slack_example_draws_one_panel_per_p(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    example = load_example("moons_slack")
    figure = tmp_path / "slack.png"
    with torch.random.fork_rng():
        stats = example.main(["--epochs", "2", "--p", "0.75,0.01", "--out", str(figure), "--runs", str(tmp_path / "runs")])
    assert "figure ->" in capsys.readouterr().out
    assert sorted(stats) == [0.01, 0.75]
    for s in stats.values():
        assert 0.0 <= s["certified"] <= s["clean"] <= 1.0 and s["lipschitz"] > 0
    image = matplotlib.image.imread(str(figure))  # a real PNG, two panels side by side
    assert image.shape[1] > image.shape[0] > 100
    assert len(torch.unique(torch.from_numpy(image[..., :3].reshape(-1, 3).copy()), dim=0)) > 10
    # The runs are kept as ordinary run folders.
    assert (tmp_path / "runs" / "p0.75" / "summary.json").is_file()


def test_certify_and_export_example_file_answers_like_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    import lipmargin
    from lipmargin.data import load_dataset, to_float

    run_dir = tmp_path / "run"
    with torch.random.fork_rng():
        lipmargin.fit(lipmargin.load_config(preset="digits-cll", overrides=["train.epochs=1"]), run_dir)
    example = load_example("certify_and_export")
    path = tmp_path / "digits.pt"
    check = example.main(["--run", str(run_dir), "--out", str(path)])
    assert "exported" in capsys.readouterr().out
    assert check["samples"] > 0 and 0.0 <= check["max_relative_deflation"] < 1e-3
    # Independently of certify(): the file's labels are the float64 model's argmax wherever it
    # claims a radius, and no attack inside that radius changes the model's label.
    model = lipmargin.open_run(run_dir).model.eval()
    x = to_float(load_dataset("digits", split="test").inputs[:96])
    label, radius = torch.jit.load(str(path))(x)
    with torch.no_grad():
        own = model.double()(x.double()).argmax(1)
    positive = radius > 0
    assert positive.any()
    assert torch.equal(label[positive], own[positive])
    assert not attack_flips(model, x[positive], radius[positive]).any()
