"""Train your own residual network with CLL through the Python API, then certify it.

The model below is plain PyTorch (a residual block, LeakyReLU, average pooling, optionally a
BatchNorm): lipmargin never needs it to be built from its own layers.  ``FeatureEstimate`` traces it
with torch.fx and gives differentiable power-iteration estimates of its pairwise Lipschitz
constants for the loss; ``lipmargin.certify`` bounds the same graph soundly.

    python examples/residual_cll.py --data fashion-mnist --steps 200 --out runs/residual.safetensors
    lipmargin certify --model examples/residual_cll.py:make_model --weights runs/residual.safetensors \\
        --data fashion-mnist --json
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import lipmargin
from lipmargin.data import load_dataset, to_float


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.act(self.conv(x))  # Lipschitz <= 1 + 0.5 * Lip(conv)


class ResidualNet(nn.Module):
    def __init__(self, in_channels: int = 1, size: int = 28, classes: int = 10, width: int = 16, batchnorm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.block1 = Block(width)
        self.pool = nn.AvgPool2d(2)
        self.block2 = Block(width)
        self.head = nn.Linear(width * (size // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm(self.stem(x)), 0.1)
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        return self.head(torch.flatten(x, 1))


def make_model() -> nn.Module:
    """Factory for ``lipmargin certify --model examples/residual_cll.py:make_model``.

    ``LIPMARGIN_EXAMPLE_SHAPE=C,H,W`` and ``LIPMARGIN_EXAMPLE_BN=1`` select the variant.
    """
    c, h, _ = (int(v) for v in os.environ.get("LIPMARGIN_EXAMPLE_SHAPE", "1,28,28").split(","))
    return ResidualNet(c, h, batchnorm=os.environ.get("LIPMARGIN_EXAMPLE_BN") == "1")


def train(model: nn.Module, data: str, steps: int, *, eps: float = 0.5, p: float = 0.01, batch: int = 128,
          penalty: float = 1e-4, seed: int = 0, root: str | None = None) -> dict[str, float]:
    ds = load_dataset(data, root, "train")
    shape = tuple(ds.input_shape)
    estimate = lipmargin.FeatureEstimate(model, shape)  # power-iteration vectors for every conv/linear leaf
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    estimate.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ds), (batch,), generator=gen)
        x, y = to_float(ds.inputs[idx]), ds.labels[idx]
        logits = model(x)
        k, pairwise = estimate.pairwise(n_iter=2)  # (C, C) estimate K ||W_i - W_j||, differentiable
        loss = lipmargin.cll_loss(logits, y, pairwise[y], eps, p) + lipmargin.lipschitz_penalty(pairwise.max(), penalty)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"loss": loss.item(), "lipschitz_estimate": pairwise.max().item()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batchnorm", action="store_true")
    ap.add_argument("--out", default="residual.safetensors")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    test = load_dataset(args.data, None, "test")
    c, h, _ = test.input_shape
    model = ResidualNet(c, h, batchnorm=args.batchnorm)
    print("training:", train(model, args.data, args.steps))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    x, y = to_float(test.inputs[:1000]), test.labels[:1000]
    result = lipmargin.certify(model, [(x, y)], [36 / 255, 72 / 255, 108 / 255], input_shape=test.input_shape)
    print(f"clean {result.clean_accuracy:.3f}  certified {result.certified_accuracy}  L {result.lipschitz:.3g}  -> {args.out}")


if __name__ == "__main__":
    main()
