"""S5CL's weak and strong views, vectorised over a batch of uint8 images, every factor drawn per image.

Weak: flips, 90-degree rotations, colour jitter (0.1). Strong: flips, 90-degree rotations,
H&E (HED) stain jitter (theta 0.01), random resized crop and a small affine, done as one
``affine_grid``/``grid_sample``. The reference HED jitter drew its factors once per run; here they
are drawn per image (docs/methods.md, S5CL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

# Ruifrok & Johnston stain vectors, as in scikit-image's rgb2hed / hed2rgb.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)


class AugmentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    colour_jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    hed_theta: float = Field(default=0.01, ge=0.0, le=0.5)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    rotate_degrees: float = Field(default=10.0, ge=0.0, le=45.0)
    translate: float = Field(default=0.05, ge=0.0, le=0.3)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def flips_and_rot90(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flip and k*90 degree rotation per image (tiles have no 'up')."""
    n = x.shape[0]
    hflip = torch.rand(n, generator=generator) < 0.5
    vflip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
    x = torch.where(vflip[:, None, None, None], x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        k = torch.randint(0, 4, (n,), generator=generator)
        out = x.clone()
        for r in (1, 2, 3):
            sel = k == r
            if sel.any():
                out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        x = out
    return x


def colour_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1-s, 1+s], one set per image."""
    if strength <= 0:
        return x
    n = x.shape[0]

    def factor() -> torch.Tensor:
        return (1.0 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(x)

    x = x * factor()
    grey_mean = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2)).view(n, 1, 1, 1)
    x = (x - grey_mean) * factor() + grey_mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey) * factor() + grey
    return x.clamp_(0.0, 1.0)


def hed_jitter(x: torch.Tensor, theta: float, generator: torch.Generator) -> torch.Tensor:
    """Stain augmentation: scale by U(1-theta, 1+theta) and shift by U(-theta, theta) in HED space."""
    if theta <= 0:
        return x
    n = x.shape[0]
    hed_from_rgb = _HED_FROM_RGB.to(x)
    rgb_from_hed = _RGB_FROM_HED.to(x)
    rgb = x.clamp(min=1e-6).permute(0, 2, 3, 1)  # N, H, W, 3
    stains = (torch.log(rgb) / _LOG_ADJUST) @ hed_from_rgb
    stains = stains.clamp(min=0)
    alpha = (1.0 + (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * theta).to(x)
    beta = ((torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * theta).to(x)
    stains = stains * alpha + beta
    out = torch.exp((stains * _LOG_ADJUST) @ rgb_from_hed)
    return out.clamp_(0.0, 1.0).permute(0, 3, 1, 2).contiguous()


def random_resized_affine(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop, rotation and translation in one resampling (reflect padding)."""
    n = x.shape[0]
    lo, hi = spec.crop_scale
    scale = torch.sqrt(lo + torch.rand(n, generator=generator) * (hi - lo))  # side fraction
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(spec.rotate_degrees)
    max_shift = (1 - scale) + spec.translate
    tx = (torch.rand(n, generator=generator) * 2 - 1) * max_shift
    ty = (torch.rand(n, generator=generator) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def weak_view(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    return colour_jitter(flips_and_rot90(to_float(images), generator), spec.colour_jitter, generator)


def strong_view(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    x = flips_and_rot90(to_float(images), generator)
    x = hed_jitter(x, spec.hed_theta, generator)
    return random_resized_affine(x, spec, generator)


def standardise(x: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]) -> torch.Tensor:
    """The card's normalisation on [0, 1] floats; mirrors ``medcl.preprocess.normalise``."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
