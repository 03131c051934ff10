"""Device, precision and memory layout of a run: ``auto`` settings resolved for the machine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lipmargin.config import RunConfig
from lipmargin.train.errors import TrainingError

__all__ = [
    "resolve_device", "FAST_BF16_CPU_FLAGS", "cpu_flags", "resolve_precision", "resolve_channels_last", "resolve_hardware",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device is {name!r} but no CUDA device is available; use cpu or auto")
    return dev


#: CPU flags (``/proc/cpuinfo``) with which oneDNN runs bfloat16 convolutions and matmuls natively
#: (AMX tiles on Sapphire Rapids and later; AVX512-BF16 on Cooper Lake / Zen 4).  Without them
#: PyTorch's CPU bfloat16 convolution falls back to a slow reference kernel (measured 10-30x
#: slower than float32 on an AVX2-only EPYC), so ``auto`` keeps float32 there.
FAST_BF16_CPU_FLAGS: frozenset[str] = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor listed in ``cpuinfo`` (empty if unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux, or no procfs
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            return frozenset(value.split())
    return frozenset()


def resolve_precision(
    precision: str, device: torch.device, *, flags: frozenset[str] | None = None, cuda_bf16: bool | None = None
) -> str:
    """``train.precision`` with ``auto`` replaced by what runs fastest on ``device``.

    ``auto`` is ``bf16`` on a CUDA device that supports bfloat16 and on a CPU with one of
    :data:`FAST_BF16_CPU_FLAGS`, ``fp32`` elsewhere.  ``flags`` / ``cuda_bf16`` replace the
    machine's own answers (for tests); other values are returned unchanged.

    >>> cpu = torch.device("cpu")
    >>> resolve_precision("auto", cpu, flags=frozenset({"avx2"})), resolve_precision("auto", cpu, flags=frozenset({"amx_bf16"}))
    ('fp32', 'bf16')
    >>> resolve_precision("fp64", cpu)
    'fp64'
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return "bf16" if supported else "fp32"
    if device.type == "cpu":
        return "bf16" if FAST_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags) else "fp32"
    return "fp32"


def resolve_channels_last(channels_last: bool | None, device: torch.device, precision: str) -> bool:
    """``train.channels_last`` with ``None`` (auto) replaced by the layout measured faster.

    The rule (benchmarks/cpu_precision.py, docs/results.md): channels-last on CUDA with bf16
    (tensor-core convolutions want NHWC) and on a CPU in bf16 (oneDNN's AMX kernels are NHWC);
    contiguous NCHW otherwise, which was faster for float32 on the CPU.

    >>> resolve_channels_last(None, torch.device("cpu"), "bf16"), resolve_channels_last(None, torch.device("cpu"), "fp32")
    (True, False)
    """
    if channels_last is not None:
        return channels_last
    return precision == "bf16" and device.type in ("cuda", "cpu")


def resolve_hardware(cfg: RunConfig, device: torch.device) -> RunConfig:
    """``cfg`` with ``train.precision`` and ``train.channels_last`` resolved for ``device``.

    The resolved values go into the run's ``config.yaml`` and summary, so a run folder always says
    which precision and layout it trained with (a resumed run keeps them).
    """
    precision = resolve_precision(cfg.train.precision, device)
    layout = resolve_channels_last(cfg.train.channels_last, device, precision)
    return replace(cfg, train=replace(cfg.train, precision=precision, channels_last=layout))
