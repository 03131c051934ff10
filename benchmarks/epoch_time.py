"""One training epoch of 4C3F + CLL over CIFAR-shaped synthetic images: lipmargin's pipeline vs a
conventional ``torch.utils.data.DataLoader`` with per-sample transforms feeding the same model.

lipmargin: the uint8 dataset lives on the training device; batches are sliced from a shuffled index
and augmented there, batched (crop 32 pad 4, flip, colour jitter 0.25, rotation 2 degrees).
Conventional: per-sample transforms (the same operations, one image at a time) in DataLoader
worker processes, batches copied to the device (pinned memory on CUDA).

    python benchmarks/epoch_time.py [--device cuda] [--images 50000] [--workers 8]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from _common import report, sync
from lipmargin import create_model
from lipmargin.config import LossConfig, RunConfig, TrainConfig
from lipmargin.data import ArrayDataset, Augment, DeviceLoader, augment_batch, to_float
from lipmargin.train import TRAIN_LOSSES, TrainStep, build_optimizer, train_one_epoch

AUG = Augment(crop_padding=4, hflip=True, brightness=0.25, contrast=0.25, saturation=0.25, rotation=2.0)


class PerSampleDataset(Dataset):
    """Conventional pipeline: decode one uint8 image and transform it on the CPU."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.gen = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(self.images[i : i + 1])  # (1, 3, 32, 32)
        return augment_batch(x, AUG, self.gen)[0], self.labels[i]


def run_epoch(model, loader, device: torch.device, cfg: RunConfig) -> float:
    opt = build_optimizer(model, cfg.optim, device)
    loss = TRAIN_LOSSES["cll"](cfg.loss)
    step = TrainStep(model, cfg.train.power_iters, cfg.train.precision, None if cfg.train.compile == "none" else cfg.train.compile)
    sync(device)
    t0 = time.perf_counter()
    train_one_epoch(model, loader, opt, loss, 1, len(loader), epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                    penalty=cfg.loss.lipschitz_penalty, penalty_power=cfg.loss.penalty_power, step_module=step)
    sync(device)
    return time.perf_counter() - t0


class ToDevice:
    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", default="none", help="torch.compile mode of the lipmargin train step")
    ap.add_argument("--skip-dataloader", action="store_true", help="time lipmargin's pipeline only")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    cfg = RunConfig(loss=LossConfig(name="cll", eps=0.5, p=0.01),
                    train=TrainConfig(epochs=1, batch_size=args.batch, precision=args.precision, compile=args.compile))

    torch.manual_seed(0)
    model = create_model("4C3F", (3, 32, 32), 10).to(device)
    fast = DeviceLoader(ArrayDataset(images, labels, 10, "synthetic"), args.batch, device=device,
                        shuffle=True, augment=AUG, seed=0)
    fast.set_epoch(1)
    run_epoch(model, fast, device, cfg) if device.type == "cuda" else None  # warm-up (cuDNN autotune)
    t_fast = run_epoch(model, fast, device, cfg)

    result = {"device": str(device), "images": args.images, "batch": args.batch, "precision": args.precision,
              "lipmargin_epoch_s": t_fast, "lipmargin_epoch_s_per_50k": t_fast * 50_000 / args.images}
    result["compile"] = args.compile
    figure = f"lipmargin {t_fast:.2f} s/epoch ({args.images} imgs, {device}, {args.precision}, compile {args.compile})"
    if not args.skip_dataloader:
        torch.manual_seed(0)
        model = create_model("4C3F", (3, 32, 32), 10).to(device)
        slow = DataLoader(PerSampleDataset(images, labels), batch_size=args.batch, shuffle=True,
                          num_workers=args.workers, pin_memory=device.type == "cuda",
                          persistent_workers=args.workers > 0)
        t_slow = run_epoch(model, ToDevice(slow, device), device, cfg)
        result.update({"dataloader_epoch_s": t_slow, "workers": args.workers, "speedup": t_slow / t_fast})
        figure += f"; DataLoader({args.workers} workers) {t_slow:.2f} s; speed-up {t_slow / t_fast:.1f}x"
    report("epoch_time", result, figure, record=not args.no_record)


if __name__ == "__main__":
    main()
