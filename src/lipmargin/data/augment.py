"""Training augmentation: pure, batched functions on the batch's own device, and :class:`Augment`.

Every random draw comes from an explicit :class:`torch.Generator` living on the batch's device
(never the global RNG), so a batch's augmentation is a function of the generator's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Augment", "augment_batch", "color_jitter", "random_crop", "random_hflip", "random_rotation", "rotate"]


@dataclass(frozen=True)
class Augment:
    """Training augmentation, applied per batch on the training device.

    Order in :func:`augment_batch`: random crop -> horizontal flip -> colour
    jitter (brightness, contrast, saturation, in that fixed order) -> rotation.

    >>> Augment().is_identity, Augment(crop_padding=4, hflip=True).is_identity
    (True, False)
    """

    crop_padding: int = 0  # random crop back to the original size after zero padding by this many pixels
    hflip: bool = False
    brightness: float = 0.0  # jitter factors, torchvision semantics: factor ~ U[max(0, 1-b), 1+b]
    contrast: float = 0.0
    saturation: float = 0.0
    rotation: float = 0.0  # max degrees: angle ~ U[-r, r], bilinear, zero fill

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"Augment.crop_padding must be a non-negative int, got {self.crop_padding!r}")
        for field in ("brightness", "contrast", "saturation", "rotation"):
            value = getattr(self, field)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Augment.{field} must be a finite number >= 0, got {value!r}")

    @property
    def is_identity(self) -> bool:
        """True when no transformation is enabled."""
        return (
            self.crop_padding == 0
            and not self.hflip
            and self.brightness == 0
            and self.contrast == 0
            and self.saturation == 0
            and self.rotation == 0
        )


def _check_images(x: torch.Tensor, who: str) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"{who}: expected a float (B, C, H, W) batch, got {x.dtype} of shape {tuple(x.shape)}"
        )


def _check_generator(x: torch.Tensor, generator: torch.Generator, who: str) -> None:
    gd, xd = generator.device, x.device
    same = gd.type == xd.type and (gd.index is None or xd.index is None or gd.index == xd.index)
    if not same:
        raise ValueError(
            f"{who}: the generator lives on {gd} but the batch is on {xd}; "
            f"create it with torch.Generator(device=x.device)"
        )


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) float32 samples of U[low, high]."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    return low + (high - low) * u


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each side by ``padding`` pixels and crop back to (H, W) at a random offset per sample.

    >>> x = torch.ones(2, 1, 4, 4)
    >>> y = random_crop(x, 1, torch.Generator().manual_seed(0))
    >>> y.shape, bool(((y == 0) | (y == 1)).all())
    (torch.Size([2, 1, 4, 4]), True)
    """
    _check_images(x, "random_crop")
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    _check_generator(x, generator, "random_crop")
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)  # (2, B)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))  # (B, C, H, W+2p)
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``.

    >>> x = torch.arange(3.0).reshape(1, 1, 1, 3)
    >>> random_hflip(x, torch.Generator().manual_seed(0), p=1.0).flatten().tolist()
    [2.0, 1.0, 0.0]
    """
    _check_images(x, "random_hflip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_hflip: p must be in [0, 1], got {p}")
    _check_generator(x, generator, "random_hflip")
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luminance (ITU-R 601 weights for RGB, channel mean otherwise)."""
    if x.shape[1] == 3:
        r, g, b = x.unbind(1)
        return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
    return x.mean(dim=1, keepdim=True)


def color_jitter(
    x: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random brightness, contrast and saturation per sample (torchvision semantics, fixed order).

    Each factor is drawn from U[max(0, 1-f), 1+f]; a zero ``f`` skips that step.
    Brightness scales the image, contrast blends it with its mean luminance,
    saturation blends it with its own grayscale (RGB only: skipped when C != 3).
    Each step clamps to [0, 1], as torchvision does.

    >>> x = torch.full((1, 3, 2, 2), 0.5)
    >>> bool(torch.equal(color_jitter(x, 0.0, 0.0, 0.0, torch.Generator()), x))
    True
    >>> color_jitter(x, 0.5, 0.0, 0.0, torch.Generator().manual_seed(0)).unique().numel()  # one factor per sample
    1
    """
    _check_images(x, "color_jitter")
    for label, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"color_jitter: {label} must be a finite number >= 0, got {value}")
    if brightness == 0 and contrast == 0 and (saturation == 0 or x.shape[1] != 3):
        return x
    _check_generator(x, generator, "color_jitter")
    b = x.shape[0]
    if brightness > 0:
        f = _uniform(b, max(0.0, 1.0 - brightness), 1.0 + brightness, generator, x.device)  # (B,)
        x = (x * f[:, None, None, None]).clamp(0.0, 1.0)
    if contrast > 0:
        f = _uniform(b, max(0.0, 1.0 - contrast), 1.0 + contrast, generator, x.device)[:, None, None, None]
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)
    if saturation > 0 and x.shape[1] == 3:
        f = _uniform(b, max(0.0, 1.0 - saturation), 1.0 + saturation, generator, x.device)[:, None, None, None]
        x = (f * x + (1.0 - f) * _grayscale(x)).clamp(0.0, 1.0)
    return x


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each sample about its centre by ``angles`` (B,) degrees; bilinear, zero fill.

    >>> x = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    >>> torch.allclose(rotate(x, torch.zeros(2)), x, atol=1e-6)
    True
    """
    _check_images(x, "rotate")
    b, _, h, w = x.shape
    if angles.shape != (b,):
        raise ValueError(f"rotate: angles must have shape ({b},), got {tuple(angles.shape)}")
    rad = torch.deg2rad(angles.to(device=x.device, dtype=x.dtype))  # (B,)
    cos, sin = rad.cos(), rad.sin()
    zero = torch.zeros_like(cos)
    # Rotation in pixel space, expressed in grid_sample's normalised [-1, 1] coordinates
    # (the aspect factors keep non-square images undistorted).
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), zero], dim=1),
            torch.stack([sin * (w / h), cos, zero], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each sample by an angle ~ U[-degrees, degrees] (bilinear, zero fill).

    >>> random_rotation(torch.ones(2, 1, 5, 5), 10.0, torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 5, 5])
    """
    _check_images(x, "random_rotation")
    if not math.isfinite(degrees) or degrees < 0:
        raise ValueError(f"random_rotation: degrees must be a finite number >= 0, got {degrees}")
    if degrees == 0:
        return x
    _check_generator(x, generator, "random_rotation")
    angles = _uniform(x.shape[0], -degrees, degrees, generator, x.device)  # (B,)
    return rotate(x, angles)


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply ``aug`` to a (B, C, H, W) float batch in [0, 1]; output in [0, 1], same shape.

    All per-sample parameters are drawn in one call per transformation from
    ``generator``, which must live on ``x.device``; the result is deterministic
    given the generator state.

    >>> x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> aug = Augment(crop_padding=2, hflip=True, brightness=0.2)
    >>> a = augment_batch(x, aug, torch.Generator().manual_seed(1))
    >>> bool(torch.equal(a, augment_batch(x, aug, torch.Generator().manual_seed(1)))), a.shape
    (True, torch.Size([4, 3, 8, 8]))
    """
    _check_images(x, "augment_batch")
    if aug.is_identity:
        return x
    _check_generator(x, generator, "augment_batch")
    x = random_crop(x, aug.crop_padding, generator)
    if aug.hflip:
        x = random_hflip(x, generator)
    x = color_jitter(x, aug.brightness, aug.contrast, aug.saturation, generator)
    x = random_rotation(x, aug.rotation, generator)
    return x.clamp(0.0, 1.0)
