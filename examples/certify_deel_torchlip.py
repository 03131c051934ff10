"""Certify a deel-torchlip network with lipmargin's sound bounds.

deel-torchlip (https://github.com/deel-ai/deel-torchlip) builds 1-Lipschitz networks from spectrally
normalised layers.  After ``vanilla_export()`` the network is made of plain ``nn.Conv2d`` /
``nn.Linear`` layers and deel-torchlip's sorting activations, which lipmargin's tracer knows: it
bounds the exported weights itself (it does not take the 1-Lipschitz claim on trust), so
``lipmargin.certify`` needs no conversion code.

    python examples/certify_deel_torchlip.py --steps 300 --out runs/deel.safetensors

The same model from the command line (the factory below rebuilds the exported architecture):

    lipmargin certify --model examples/certify_deel_torchlip.py:make_exported \\
        --weights runs/deel.safetensors --data digits --json

Needs ``pip install deel-torchlip`` (the ``[bench]`` extra) and scikit-learn for the digits.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lipmargin
from lipmargin.data import load_dataset, to_float

try:
    from deel import torchlip
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit("this example needs deel-torchlip: pip install deel-torchlip") from e

EPS = (36 / 255, 72 / 255, 0.5)


def make_network() -> torchlip.Sequential:
    """A small 1-Lipschitz network for 8x8 grey images (10 classes), as deel-torchlip builds them."""
    return torchlip.Sequential(
        torchlip.SpectralConv2d(1, 16, kernel_size=3, padding=1),
        torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=2),  # 8x8 -> 4x4
        torchlip.SpectralConv2d(16, 32, kernel_size=3, padding=1),
        torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=2),  # 4x4 -> 2x2
        nn.Flatten(),
        torchlip.SpectralLinear(32 * 2 * 2, 64),
        torchlip.GroupSort2(),
        torchlip.FrobeniusLinear(64, 10, disjoint_neurons=True),
    )


def make_exported() -> nn.Module:
    """Factory for ``lipmargin certify --model``: the architecture of ``vanilla_export()``."""
    return make_network().vanilla_export()


def train(net: nn.Module, steps: int, *, batch: int = 64, seed: int = 0) -> float:
    """deel-torchlip's own recipe: HKR multi-class loss, Adam.  Returns the last loss."""
    data = load_dataset("digits", split="train")
    loss_fn = torchlip.HKRMulticlassLoss(alpha=0.98, min_margin=0.25)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)  # batches drawn without touching the global RNG
    net.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x, y = to_float(data.inputs[idx]), data.labels[idx]
        loss = loss_fn(net(x), nn.functional.one_hot(y, 10).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps (try 5 for a smoke run)")
    ap.add_argument("--n", type=int, default=360, help="test images to certify")
    ap.add_argument("--out", default=None, help="write the exported weights here (.safetensors)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)  # the network's initial weights (a script may seed; the library never does)
    net = make_network()
    loss = train(net, args.steps)
    exported = net.vanilla_export().eval()  # plain torch layers: what gets certified

    test = load_dataset("digits", split="test")
    x, y = to_float(test.inputs[: args.n]), test.labels[: args.n]
    input_shape = tuple(x.shape[1:])
    result = lipmargin.certify(exported, [(x, y)], EPS, input_shape=input_shape)  # sound bound by default
    print(f"deel-torchlip net after {args.steps} steps (HKR loss {loss:.3f}), {result.num_samples} test images")
    print(f"  clean accuracy {result.clean_accuracy:.3f}, Lipschitz bound of the logit differences {result.lipschitz:.3f}")
    for eps, acc in result.certified_accuracy.items():
        print(f"  certified accuracy at eps {eps:.3f}: {acc:.3f}")
    if args.out:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, args.out)
        print(f"  weights -> {args.out}")
    return {"result": result, "model": exported, "inputs": x}


if __name__ == "__main__":
    main()
