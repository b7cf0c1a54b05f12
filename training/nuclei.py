"""Self-supervised nuclei segmentation by patch contrast on confidence maps (NLDL 2023; docs/segmentation.md),
and the supervised U-Net it is compared with.

The confidence network outputs K sigmoid maps. Each step samples, per image and map, windows where
the map is confident (low binary entropy), calls a window positive with probability equal to its
mean confidence, crops ``image x map`` there, and asks the patches of one map to resemble each
other more than its negatives (intra-channel) and more than the positives of the other maps
(inter-channel). Similarity is minus the mean squared difference of the auxiliary feature
network's descriptors; there is no temperature.

Two improvements over the reference, which used labelled validation Dice for both choices:
- the nuclei map is the one whose region agrees best (Dice) with the haematoxylin-rich region of a
  colour deconvolution (``choose_nuclei_channel``);
- the checkpoint kept is the one with the lowest patch-contrast loss on fixed windows of fixed
  training crops (the probe: positives close together, far from negatives and from the other
  map's positives), and training stops once that loss has fallen by less than 1% for ``patience``
  evaluations (the convergence rule). The probe also records the separation ratio (mean
  positive-negative over mean positive-positive distance) for the learning curve. In a development
  run (600 steps planned, stopped at 250) the ratio fell steadily (1.13 -> 0.84) while the loss
  fell and the nuclei map's correlation with haematoxylin rose (0.21 -> 0.65), so the ratio is
  reported, not used to choose.
Labels are read only after training, to report Dice / AJI / PQ.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from medcl.card import ArchitectureSpec, Card, DataSpec, PreprocessSpec, SegmentationSpec
from medcl.errors import MedclError
from medcl.preprocess import IMAGE_SUFFIXES
from medcl.segmentation import (InstanceRules, as_brightfield, dice, haematoxylin, instances_from_probability,
                                network_input, network_input_channels, otsu_foreground, probability_foreground,
                                segmentation_scores)
from training.checkpoint import save_weights

DILATIONS = (1, 2, 3, 5, 10, 20)


# --- networks -----------------------------------------------------------------------------------

class ResidualDilatedBlock(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.elu(self.bn1(self.conv1(x)))
        return F.elu(x + self.bn2(self.conv2(y)))


class ConfidenceNetwork(nn.Module):
    """Conv3x3 3->8 + BN + ELU, six residual blocks of two dilated 3x3 convs, Conv1x1 8->K, sigmoid.

    Input: RGB in [0, 1] (plus the stain channel of ``network_input`` when in_channels is 4),
    (N, C, H, W); output: K confidence maps (N, K, H, W), any H and W.
    """

    def __init__(self, maps: int = 2, channels: int = 8, dilations: tuple[int, ...] = DILATIONS,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ELU())
        self.blocks = nn.Sequential(*[ResidualDilatedBlock(channels, d) for d in dilations])
        self.head = nn.Conv2d(channels, maps, 1)
        self.receptive_radius = 1 + 2 * sum(dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = 0.95 * x + 0.05  # so that masked-out (zero) pixels differ from black ones
        return torch.sigmoid(self.head(self.blocks(self.stem(x))))


class PatchFeatures(nn.Module):
    """The auxiliary network: a patch (image x confidence map) -> a 16-d descriptor."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()

        def layer(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ELU()]

        self.body = nn.Sequential(*layer(3, width, 1), *layer(width, 2 * width, 2), *layer(2 * width, 2 * width, 2))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.body(patches).mean(dim=(2, 3))


class SmallUNet(nn.Module):
    """The supervised baseline: a three-level U-Net (base width 16), one nuclei logit per pixel."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        w = width
        self.down1, self.down2, self.bottom = double(3, w), double(w, 2 * w), double(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), double(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), double(2 * w, w)
        self.out = nn.Conv2d(w, 1, 1)
        self.receptive_radius = 44  # 3x3 convs over three scales: 2+2 + 2*(2+2) + 4*(2+2) + margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 4, (-w) % 4
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        a = self.down1(x)
        b = self.down2(F.max_pool2d(a, 2))
        c = self.bottom(F.max_pool2d(b, 2))
        b = self.dec2(torch.cat([self.up2(c), b], 1))
        a = self.dec1(torch.cat([self.up1(b), a], 1))
        return torch.sigmoid(self.out(a))[..., :h, :w]


def parameter_count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --- patch contrast -----------------------------------------------------------------------------

def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)  # in bits: 0..1


def sample_windows(confidence: torch.Tensor, size: int, stride: int, per_image: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and map: ``per_image`` windows drawn ∝ max(1 - mean entropy, 0.001), each positive
    with probability = its mean confidence. Returns (N, K, per_image, 2) top-left corners and a
    (N, K, per_image) bool positive flag. Sampling is not differentiated."""
    with torch.no_grad():
        entropy = F.avg_pool2d(binary_entropy(confidence), size, stride)  # (N, K, gh, gw)
        mean_conf = F.avg_pool2d(confidence, size, stride)
        n, k, gh, gw = entropy.shape
        weights = (1 - entropy).clamp_min(0.001).reshape(n * k, gh * gw)
        picks = torch.multinomial(weights, min(per_image, gh * gw), replacement=False, generator=generator)
        conf = mean_conf.reshape(n * k, gh * gw).gather(1, picks)
        positive = torch.rand(conf.shape, generator=generator) < conf
        corners = torch.stack([(picks // gw) * stride, (picks % gw) * stride], -1)
    return corners.reshape(n, k, -1, 2), positive.reshape(n, k, -1)


def crop_patches(images: torch.Tensor, confidence: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """(N, K, P, 3, size, size) crops of image x map (gradients reach the maps)."""
    n, k, p, _ = corners.shape
    out = []
    for i in range(n):
        for c in range(k):
            masked = images[i, :3] * confidence[i, c:c + 1]  # the image's RGB, never the stain channel
            for y, x in corners[i, c].tolist():
                out.append(masked[:, y:y + size, x:x + size])
    return torch.stack(out).reshape(n, k, p, 3, size, size)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s = -MSE between descriptors, all pairs: (A, D) x (B, D) -> (A, B)."""
    return -((a[:, None, :] - b[None, :, :]) ** 2).mean(-1)


def patch_contrast_loss(features: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
    """Sum over maps of intra- and inter-channel terms; None when a map lacks positives or negatives.

    ``features``: (K, M, D) descriptors of each map's M patches; ``positive``: (K, M) flags.
    Intra: for each anchor positive p and other positive q of map c,
    -log(exp s(p,q) / sum over negatives n of c of exp s(p,n)); inter: the same with the sum over
    the positives of the other maps.
    """
    k = features.shape[0]
    total = features.new_zeros(())
    stats: dict[str, float] = {}
    for c in range(k):
        pos, neg = features[c][positive[c]], features[c][~positive[c]]
        others = torch.cat([features[o][positive[o]] for o in range(k) if o != c]) if k > 1 else pos[:0]
        if len(pos) < 2 or len(neg) < 1 or len(others) < 1:
            return None, {}
        s_pp = similarity(pos, pos)
        off_diagonal = ~torch.eye(len(pos), dtype=torch.bool)
        intra = (torch.logsumexp(similarity(pos, neg), 1, keepdim=True) - s_pp)[off_diagonal].mean()
        inter = (torch.logsumexp(similarity(pos, others), 1, keepdim=True) - s_pp)[off_diagonal].mean()
        total = total + intra + inter
        stats[f"intra_{c}"], stats[f"inter_{c}"] = intra.item(), inter.item()
    return total, stats


def separation(features: torch.Tensor, positive: torch.Tensor) -> float:
    """Label-free convergence measure: mean positive-negative distance over mean positive-positive
    distance, averaged over maps (large = the maps separate their patches cleanly)."""
    values = []
    for c in range(features.shape[0]):
        pos, neg = features[c][positive[c]], features[c][~positive[c]]
        if len(pos) < 2 or len(neg) < 1:
            continue
        d_pp = -similarity(pos, pos)[~torch.eye(len(pos), dtype=torch.bool)].mean()
        d_pn = -similarity(pos, neg).mean()
        values.append(float(d_pn / (d_pp + 1e-8)))
    return float(np.mean(values)) if values else 0.0


# --- configuration ------------------------------------------------------------------------------

class ImageSource(BaseModel):
    """One more folder of unlabelled training images, at its own scale."""

    model_config = ConfigDict(extra="forbid")

    images: str
    scale: float = Field(default=1.0, gt=0.0)
    limit: int | None = Field(default=None, ge=1)  # at most this many images, spread evenly over the sorted list


class SegmenterData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    images: str  # a folder of H&E images (PNG/JPEG/TIFF), searched recursively
    masks: str | None = None  # binary nuclei masks with the same file names (supervised U-Net only)
    scale: float = Field(default=1.0, gt=0.0)  # resize factor applied on load (e.g. 2.0: 20x tiles -> 40x)
    # A text file of image names (stems, one per line, '#' comments) never used for training: the
    # development images on which every rule is chosen (configs/splits/monuseg-dev.txt).
    exclude: str | None = None
    more: list[ImageSource] = Field(default_factory=list)  # other unlabelled folders (patch contrast only)
    pixel_size_um: float | None = Field(default=None, gt=0.0)  # after scaling
    eval_images: str | None = None  # held-out images + instance masks for the report only
    eval_instances: str | None = None
    # Development images with instance masks that choose the supervised U-Net's checkpoint (early
    # stopping on their mean Dice); ``select_names`` restricts them to a list (configs/splits/monuseg-dev.txt).
    select_images: str | None = None
    select_instances: str | None = None
    select_names: str | None = None


class SegmenterSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    batch: int = Field(default=6, ge=1)
    crop: int = Field(default=192, ge=64)
    eval_every: int = Field(default=25, ge=1)
    patience: int = Field(default=4, ge=1)  # evaluations without a better separation before stopping
    min_steps: int = Field(default=100, ge=0)
    threads: int | None = Field(default=None, ge=1)


class PatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(default=50, ge=8)
    stride: int = Field(default=20, ge=1)
    per_image: int = Field(default=10, ge=2)


class RefineConfig(BaseModel):
    """Label-free self-training after patch contrast (``steps: 0`` skips it).

    Pseudo-labels come from two independent label-free sources that must agree: a pixel is nucleus
    where the patch-contrast nuclei map is above its cut (Otsu, never below 0.5) AND the smoothed
    haematoxylin density is above its Otsu threshold; background where both say no; ignored where
    they disagree. The same network is then trained on them with a weighted binary cross-entropy."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-3, gt=0.0)
    stain_sigma: float = Field(default=2.0, ge=0.0)  # Gaussian smoothing of the haematoxylin density, px
    rounds: int = Field(default=1, ge=1)  # pseudo-labels re-made from the refined map after each round


class SegmenterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["segment"] = "segment"
    name: str
    method: Literal["patch_contrast", "supervised_unet"] = "patch_contrast"
    seed: int = 0
    maps: int = Field(default=2, ge=2)
    inputs: Literal["rgb", "rgb+haematoxylin"] = "rgb"  # medcl.segmentation.network_input
    data: SegmenterData
    patch: PatchConfig = PatchConfig()
    lr: float = Field(default=2e-4, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    schedule: SegmenterSchedule
    refine: RefineConfig = RefineConfig()
    rules: dict = Field(default_factory=dict)  # InstanceRules overrides
    # which answer /segment gives by default (card segmentation.serve; medcl.nuclei_check.answer_tile);
    # a segmenter that fails its build self-check serves "classical" whatever is set here
    serve: Literal["network", "network-or-classical", "classical"] = "network-or-classical"
    output_dir: str = "runs"


class SegmenterError(MedclError, ValueError):
    """A segmenter config or data folder that cannot be used."""


def is_segmenter_config(path: str | Path) -> bool:
    from training.config import top_level_value

    return top_level_value(path, "task") == "segment"


def load_segmenter_config(path: str | Path, overrides: dict | None = None) -> SegmenterConfig:
    """Read a ``task: segment`` YAML; relative data and output paths are taken from the YAML's folder."""
    from training.config import read_config_yaml, resolve_path, validate_config

    raw = read_config_yaml(path, overrides)
    base = Path(path).parent
    data = raw.get("data")
    for key in ("images", "masks", "eval_images", "eval_instances", "exclude", "select_images", "select_instances",
                "select_names"):
        if isinstance(data, dict) and data.get(key):
            data[key] = str(resolve_path(base, data[key]))
    for source in (data.get("more") or []) if isinstance(data, dict) else []:
        if isinstance(source, dict) and source.get("images"):
            source["images"] = str(resolve_path(base, source["images"]))
    raw["output_dir"] = str(resolve_path(base, raw.get("output_dir", "runs")))
    return validate_config(SegmenterConfig, raw, path)


# --- data ---------------------------------------------------------------------------------------

def image_files(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise SegmenterError(f"no image folder at {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SegmenterError(f"no PNG/JPEG/TIFF images under {root}")
    return files


def read_name_list(path: str | Path) -> list[str]:
    """Image names (stems), one per line; blank lines and '#' comments ignored."""
    file = Path(path)
    if not file.is_file():
        raise SegmenterError(f"no image list at {file}")
    names = [line.split("#", 1)[0].strip() for line in file.read_text().splitlines()]
    return [n for n in names if n]


def training_images(data: SegmenterData) -> tuple[list[Path], list[np.ndarray]]:
    """The training images of a config: its folder less the excluded names, then every further source,
    each resized by its own scale."""
    excluded = set(read_name_list(data.exclude)) if data.exclude else set()
    files = [f for f in image_files(data.images) if f.stem not in excluded]
    if not files:
        raise SegmenterError(f"every image under {data.images} is excluded by {data.exclude}")
    images = [read_rgb(f, data.scale) for f in files]
    for source in data.more:
        found = image_files(source.images)
        if source.limit and len(found) > source.limit:
            found = [found[int(i)] for i in np.linspace(0, len(found) - 1, source.limit)]
        files += found
        images += [read_rgb(f, source.scale) for f in found]
    return files, images


def read_rgb(path: Path, scale: float = 1.0) -> np.ndarray:
    from PIL import Image

    from medcl.preprocess import to_rgb, upright

    with Image.open(path) as im:
        im = to_rgb(upright(im))  # the service's rules: EXIF orientation, alpha on white, 16-bit rescaled
        if scale != 1.0:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def read_mask(path: Path, scale: float = 1.0, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    mask = (arr > 0).astype(np.uint8)
    if size is not None and mask.shape != size:
        mask = np.asarray(Image.fromarray(mask * 255).resize((size[1], size[0]), Image.Resampling.NEAREST)) > 0
    return mask.astype(np.float32)


def random_crops(images: list[np.ndarray], masks: list[np.ndarray] | None, batch: int, crop: int,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crops with flips and 90° turns; images smaller than the crop are reflect-padded.
    ``images``: uint8 RGB (scaled to [0, 1]) or float (H, W, C) network inputs (taken as they are)."""
    xs, ms = [], []
    for _ in range(batch):
        i = int(rng.integers(len(images)))
        img, mask = images[i], masks[i] if masks is not None else None
        pad_h, pad_w = max(0, crop - img.shape[0]), max(0, crop - img.shape[1])
        if pad_h or pad_w:
            img = np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
            mask = np.pad(mask, ((0, pad_h), (0, pad_w))) if mask is not None else None
        y = int(rng.integers(img.shape[0] - crop + 1))
        x = int(rng.integers(img.shape[1] - crop + 1))
        patch = img[y:y + crop, x:x + crop]
        m = mask[y:y + crop, x:x + crop] if mask is not None else None
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        patch = np.rot90(patch, turns)
        m = np.rot90(m, turns) if m is not None else None
        if flip:
            patch, m = patch[:, ::-1], (m[:, ::-1] if m is not None else None)
        xs.append(np.ascontiguousarray(patch))
        if m is not None:
            ms.append(np.ascontiguousarray(m))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float()
    x = x / 255.0 if xs[0].dtype == np.uint8 else x  # float arrays are network inputs already
    return x, (torch.from_numpy(np.stack(ms))[:, None] if ms else None)


# --- training -----------------------------------------------------------------------------------

def choose_nuclei_channel(network: ConfidenceNetwork, images: list[np.ndarray], rules: InstanceRules,
                          limit: int = 16, crop: int = 512, inputs: str = "rgb") -> tuple[int, list[float]]:
    """The map that agrees best with the stain: per image, Dice between the map's region (under the
    card's threshold rule, as the service will cut it) and the haematoxylin-rich region
    (Otsu on the colour-deconvolution haematoxylin density), averaged over up to ``limit`` images
    spread over the whole set (centre crops of at most ``crop`` px). Returns the map and the
    agreement of every map.

    Agreement penalises both ways a map can fail: marking almost nothing and marking all tissue.
    Earlier rules each failed once. Correlation with haematoxylin over all pixels was a near tie on
    the demo tiles (0.58 vs 0.56; both maps follow stain density) and picked the wrong map.
    Haematoxylin contrast inside vs outside the map (mean inside minus mean outside) chose, for
    MoNuSeg seed 2, a map covering 0.7% of the tissue (a few very dark pixels: contrast 0.049 vs
    0.022), test Dice 0.013; its other map, which agreement picks (0.56 vs 0.05 on 16 training
    images), scores 0.625."""
    picks = sorted({int(i) for i in np.linspace(0, len(images) - 1, min(limit, len(images)))})
    sums = np.zeros(network.head.out_channels)
    network.eval()
    with torch.no_grad():
        for i in picks:
            img = images[i]
            y0, x0 = max(0, (img.shape[0] - crop) // 2), max(0, (img.shape[1] - crop) // 2)
            img = np.ascontiguousarray(img[y0:y0 + crop, x0:x0 + crop])
            maps = network(torch.from_numpy(network_input(img, inputs))[None])[0].numpy()
            stain = otsu_foreground(haematoxylin(img))
            for c in range(len(sums)):
                sums[c] += dice(probability_foreground(maps[c], rules), stain)
    agreement = (sums / len(picks)).tolist()
    return int(np.argmax(agreement)), [round(a, 4) for a in agreement]


def _probe_set(images: list[np.ndarray], config: SegmenterConfig) -> torch.Tensor:
    """Fixed training crops on which the label-free separation is measured at each evaluation."""
    x, _ = random_crops(images, None, max(4, config.schedule.batch), config.schedule.crop,
                        np.random.default_rng(config.seed + 1000))
    return x


def _probe_measures(network: ConfidenceNetwork, features: PatchFeatures, probe: torch.Tensor,
                    config: SegmenterConfig) -> tuple[float, float]:
    """(patch-contrast loss, separation) on fixed crops and fixed windows: comparable across steps."""
    network.eval(), features.eval()
    with torch.no_grad():
        maps = network(probe)
        g = torch.Generator().manual_seed(config.seed + 2000)
        corners, positive = sample_windows(maps, config.patch.size, config.patch.stride, config.patch.per_image, g)
        patches = crop_patches(probe, maps, corners, config.patch.size)
        k = maps.shape[1]
        f = features(patches.transpose(0, 1).reshape(-1, 3, config.patch.size, config.patch.size))
        f, positive = f.reshape(k, -1, f.shape[-1]), positive.transpose(0, 1).reshape(k, -1)
        loss, _ = patch_contrast_loss(f, positive)
        value = separation(f, positive)
    network.train(), features.train()
    return (math.inf if loss is None else loss.item()), value


def stain_foreground(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Otsu on the (smoothed) haematoxylin density: the classical method's nuclei region."""
    from medcl.nuclei_check import stain_density

    density, cut = stain_density(rgb, sigma)
    return density > cut


def pseudo_labels(network: ConfidenceNetwork, spec: SegmentationSpec, images: list[np.ndarray],
                  stain_sigma: float) -> list[np.ndarray]:
    """Per image: 1 where the nuclei map and the stain agree on nucleus, 0 where they agree on
    background, 0.5 (ignored) where they disagree."""
    rules = InstanceRules.of(spec)
    out = []
    network.eval()
    for rgb in images:
        marked = probability_foreground(nuclei_probability(network, spec, rgb), rules)
        stain = stain_foreground(rgb, stain_sigma)
        target = np.full(rgb.shape[:2], 0.5, np.float32)
        target[marked & stain] = 1.0
        target[~marked & ~stain] = 0.0
        out.append(target)
    return out


def refine_segmenter(network: ConfidenceNetwork, spec: SegmentationSpec, images: list[np.ndarray],
                     net_inputs: list[np.ndarray], config: SegmenterConfig, progress: bool = True) -> list[dict]:
    """Self-training on agreement pseudo-labels (``RefineConfig``); returns the loss history.
    The chosen nuclei map learns the pseudo-labels, the other map their complement."""
    refine = config.refine
    rng = np.random.default_rng(config.seed + 3000)
    optimizer = torch.optim.Adam(network.parameters(), lr=refine.lr, weight_decay=config.weight_decay)
    history = []
    c = spec.nuclei_channel
    for round_ in range(refine.rounds):
        targets = pseudo_labels(network, spec, images, refine.stain_sigma)
        network.train()
        bar = tqdm(range(1, refine.steps + 1), desc=f"refine {config.name} ({round_ + 1}/{refine.rounds})",
                   disable=not progress)
        for step in bar:
            x, y = random_crops(net_inputs, targets, config.schedule.batch, config.schedule.crop, rng)
            weight = (y != 0.5).float()
            if weight.sum() == 0:
                continue
            maps = network(x)
            target = torch.cat([1 - y, 1 - y], 1) if maps.shape[1] == 2 else (1 - y).repeat(1, maps.shape[1], 1, 1)
            target[:, c:c + 1] = y
            loss = (F.binary_cross_entropy(maps, target.round(), reduction="none") * weight).sum() \
                / (weight.sum() * maps.shape[1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"round": round_ + 1, "step": step, "loss": loss.item(),
                            "labelled_share": float(weight.mean())})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    network.eval()
    return history


def self_check(network: nn.Module, spec: SegmentationSpec, images: list[np.ndarray], limit: int = 32,
               crop: int = 512) -> dict:
    """The segmenter checked on its own training tiles, without labels (``medcl.nuclei_check``): the
    share of tiles whose map passes the per-tile check, the median coverage and stain agreement.
    ``passed``: the median tile is within both bounds of the per-tile check. A map that follows
    background or floods the tile fails on nearly every tile; a working one fails only on some tiles
    with few nuclei (the demo segmenter, seed 0: 78% of its 32 training tiles pass, median coverage
    0.30 and agreement 0.91), so the median, not the share of passing tiles, decides."""
    from medcl.nuclei_check import check_map, stain_density

    picks = sorted({int(i) for i in np.linspace(0, len(images) - 1, min(limit, len(images)))})
    rules = InstanceRules.of(spec)
    checks = []
    for i in picks:
        img = images[i]
        y0, x0 = max(0, (img.shape[0] - crop) // 2), max(0, (img.shape[1] - crop) // 2)
        img = np.ascontiguousarray(img[y0:y0 + crop, x0:x0 + crop])
        density, cut = stain_density(img)
        checks.append(check_map(probability_foreground(nuclei_probability(network, spec, img), rules), density > cut))
    from medcl.nuclei_check import MapCheck

    median = MapCheck(coverage=float(np.median([c.coverage for c in checks])),
                      stain_coverage=float(np.median([c.stain_coverage for c in checks])),
                      stain_agreement=float(np.median([c.stain_agreement for c in checks])))
    return {"self_check_tiles": len(checks),
            "self_check_pass_share": round(float(np.mean([c.passed for c in checks])), 4),
            "self_check_median_coverage": round(median.coverage, 4),
            "self_check_median_agreement": round(median.stain_agreement, 4),
            "self_check_passed": median.passed}


def train_segmenter(config: SegmenterConfig, progress: bool = True) -> Path:
    """Train, choose the checkpoint (label-free for patch contrast), evaluate, and write the run."""
    torch.manual_seed(config.seed)
    if config.schedule.threads:
        torch.set_num_threads(config.schedule.threads)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    files, images = training_images(config.data)
    # what the network reads; ``images`` stay RGB for the stain-based choices
    net_inputs = images if config.inputs == "rgb" else [
        np.ascontiguousarray(network_input(img, config.inputs).transpose(1, 2, 0)) for img in images]
    masks = None
    if config.method == "supervised_unet":
        if not config.data.masks:
            raise SegmenterError("the supervised U-Net needs data.masks (binary nuclei masks, same file names)")
        if config.data.more:
            raise SegmenterError("the supervised U-Net trains on data.images with data.masks only, not data.more")
        masks = [read_mask(Path(config.data.masks) / f.name, config.data.scale, img.shape[:2])
                 for f, img in zip(files, images)]
    run_dir = Path(config.output_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)

    if config.method == "patch_contrast":
        network: nn.Module = ConfidenceNetwork(config.maps, in_channels=len(network_input_channels(config.inputs)))
        features: nn.Module | None = PatchFeatures()
        params = list(network.parameters()) + list(features.parameters())
    else:
        network, features = SmallUNet(), None
        params = list(network.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    probe = _probe_set(net_inputs, config)
    selecting = features is None and bool(config.data.select_images and config.data.select_instances)
    if selecting:
        select_spec = SegmentationSpec(maps=1, nuclei_channel=0, channel_rule="supervised (single nuclei map)",
                                       receptive_radius=network.receptive_radius, **config.rules)
        select_names = set(read_name_list(config.data.select_names)) if config.data.select_names else None
        excluded = set(read_name_list(config.data.exclude)) if config.data.exclude else set()
        if select_names is None or not select_names <= excluded:
            raise SegmenterError("the development images that choose the checkpoint must be excluded from training: "
                                 "set data.select_names to a list that data.exclude also names")
    history: list[dict] = []
    best = {"score": -math.inf, "step": 0, "state": None}
    stale = 0
    started = time.perf_counter()
    bar = tqdm(range(1, config.schedule.steps + 1), desc=f"train {config.name}", disable=not progress)
    for step in bar:
        x, y = random_crops(net_inputs, masks, config.schedule.batch, config.schedule.crop, rng)
        if features is not None:
            maps = network(x)
            corners, positive = sample_windows(maps, config.patch.size, config.patch.stride, config.patch.per_image,
                                               generator)
            patches = crop_patches(x, maps, corners, config.patch.size)
            k = maps.shape[1]
            f = features(patches.transpose(0, 1).reshape(-1, 3, config.patch.size, config.patch.size))
            loss, terms = patch_contrast_loss(f.reshape(k, -1, f.shape[-1]), positive.transpose(0, 1).reshape(k, -1))
            if loss is None:  # a map without positives or negatives: skip the batch, as the reference does
                history.append({"step": step, "skipped": True})
                continue
        else:
            p = network(x)
            bce = F.binary_cross_entropy(p, y)
            soft_dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            loss, terms = bce + soft_dice, {"bce": bce.item(), "dice_loss": soft_dice.item()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": loss.item(), **terms}
        if step % config.schedule.eval_every == 0 or step == config.schedule.steps:
            if features is not None:
                probe_loss, record["separation"] = _probe_measures(network, features, probe, config)
                record["probe_loss"] = probe_loss
                score = -probe_loss
            elif selecting:
                network.eval()
                score = record["select_dice"] = evaluate_segmenter(
                    network, select_spec, config.data.select_images, config.data.select_instances,
                    names=select_names, progress=False)["mean"]["dice"]
                network.train()
            else:
                score = -loss.item()  # without development images the U-Net keeps its last weights
            # better: the probe loss fell by more than 1% (scores are negative losses), or the
            # development Dice rose by more than 0.002
            improved = best["state"] is None or (
                score > best["score"] + 0.01 * abs(best["score"]) if features is not None
                else (score > best["score"] + 0.002 if selecting else True))
            if improved:
                best = {"score": score, "step": step,
                        "state": {k: v.detach().clone() for k, v in network.state_dict().items()}}
                stale = 0
            else:
                stale += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", probe_loss=f"{abs(score):.3f}")
            if (features is not None or selecting) and step >= config.schedule.min_steps \
                    and stale >= config.schedule.patience:
                record["stopped"] = ("converged: the probe loss fell by less than 1% for " if features is not None
                                     else "early stop: the development Dice rose by less than 0.002 for ") \
                    + f"{config.schedule.patience} evaluations"
                history.append(record)
                break
        history.append(record)
    seconds = time.perf_counter() - started
    steps_run = history[-1]["step"] if history else 0
    network.load_state_dict(best["state"])
    network.eval()

    if isinstance(network, ConfidenceNetwork):
        # The maps are confidences, not calibrated probabilities: a per-tile Otsu cut (never below
        # 0.5) scored Dice 0.64 vs 0.45 at a fixed 0.5 in a development run (MoNuSeg test, 300 steps).
        spec = SegmentationSpec(maps=config.maps, nuclei_channel=0, channel_rule="(chosen below)",
                                receptive_radius=network.receptive_radius, pixel_size_um=config.data.pixel_size_um,
                                inputs=config.inputs,
                                # watershed on the map, markers a nucleus radius (3 µm at 0.25 µm/px) apart:
                                # AJI 0.342 -> 0.430 for the demo segmenter on the development images
                                # (distance-transform markers 6 px apart before; docs/segmentation.md)
                                **{"threshold_rule": "otsu", "markers": "map", "min_distance": 12, **config.rules})
        channel, agreement = choose_nuclei_channel(network, images, InstanceRules.of(spec), inputs=config.inputs)
        spec = spec.model_copy(update={
            "nuclei_channel": channel,
            "channel_rule": f"best Dice agreement with the haematoxylin-Otsu region {agreement}"})
        if config.refine.steps:
            started_refine = time.perf_counter()
            refine_history = refine_segmenter(network, spec, images, net_inputs, config, progress)
            history.append({"refine": refine_history[-1] if refine_history else None})
            (run_dir / "refine_history.json").write_text(json.dumps(refine_history))
            seconds += time.perf_counter() - started_refine
        checked = self_check(network, spec, images)
        # a map that fails its self-check is not to be trusted on any tile: the classical answer is served
        spec = spec.model_copy(update={"serve": config.serve if checked["self_check_passed"] else "classical"})
        n_params = parameter_count(network, features)
        backbone = "confidence-net"
    else:
        spec = SegmentationSpec(maps=1, nuclei_channel=0, channel_rule="supervised (single nuclei map)",
                                receptive_radius=network.receptive_radius, pixel_size_um=config.data.pixel_size_um,
                                **config.rules)
        n_params = parameter_count(network)
        backbone = "unet-small"
        checked = {}
    card = Card(name=config.name, version=f"{config.name}-{time.strftime('%Y%m%d%H%M%S')}", task="segment",
                method=config.method, architecture=ArchitectureSpec(backbone=backbone, width=8, embedding_dim=2),
                class_names=["background", "nucleus"],
                preprocess=PreprocessSpec(input_size=spec.window, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
                data=DataSpec(name=config.data.name, kind="folder", path=config.data.images, n_unlabelled=len(files)),
                segmentation=spec,
                training={"steps_run": steps_run, "refine_steps": config.refine.steps * config.refine.rounds,
                          "chosen_step": best["step"], "seconds": round(seconds, 1),
                          "parameters": n_params, "probe_loss": round(-best["score"], 5) if features is not None else None,
                          "crop": config.schedule.crop, "batch": config.schedule.batch, "seed": config.seed,
                          **checked})
    metrics = {}
    if config.data.eval_images and config.data.eval_instances:
        # Held-out images are read at their own resolution: data.scale brings training tiles to it.
        metrics = evaluate_segmenter(network, spec, config.data.eval_images, config.data.eval_instances,
                                     progress=progress)
        card.metrics = {k: v for k, v in metrics["mean"].items()}
    save_weights(network, run_dir)
    card.save(run_dir)
    (run_dir / "history.json").write_text(json.dumps(history))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run_dir


def nuclei_probability(network: nn.Module, spec: SegmentationSpec, rgb: np.ndarray) -> np.ndarray:
    """The nuclei map of a whole image, computed tile by tile with exact stitching."""
    from medcl.segmentation import sliding_window

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.from_numpy(batch)).numpy()

    chw = network_input(rgb, spec.inputs)
    return sliding_window(chw, run, spec.window, spec.receptive_radius)[spec.nuclei_channel]


def evaluate_segmenter(network: nn.Module, spec: SegmentationSpec, images: str | Path, instances: str | Path,
                       scale: float = 1.0, predictions: dict[str, np.ndarray] | None = None,
                       names: set[str] | None = None, progress: bool = True) -> dict:
    """Dice / AJI / PQ per held-out image and their means (labels used here only); the predicted
    label images go into ``predictions`` (by file name) when a dict is given; ``names`` (stems)
    restricts the images, e.g. to the development list."""
    per_image = {}
    files = [f for f in image_files(images) if names is None or f.stem in names]
    for f in tqdm(files, desc="evaluate", leave=False, disable=not progress):
        truth_path = Path(instances) / f.name
        if not truth_path.is_file():
            continue
        from PIL import Image

        truth = np.asarray(Image.open(truth_path)).astype(np.int64)
        rgb, _ = as_brightfield(read_rgb(f, scale))  # as the service does: fluorescence made brightfield-like
        pred = instances_from_probability(nuclei_probability(network, spec, rgb), InstanceRules.of(spec))
        per_image[f.name] = segmentation_scores(truth, pred)
        if predictions is not None:
            predictions[f.name] = pred
    if not per_image:
        raise SegmenterError(f"no instance masks in {instances} match the images in {images}")
    keys = ("dice", "aji", "pq", "dq", "sq")
    mean = {k: round(float(np.mean([v[k] for v in per_image.values()])), 4) for k in keys}
    return {"images": len(per_image), "mean": mean, "per_image": per_image}


def build_segmenter(card: Card) -> nn.Module:
    if card.segmentation is None:
        raise SegmenterError(f"{card.name} is not a segmenter (its card has task {card.task!r})")
    backbone = card.architecture.backbone
    if backbone == "confidence-net":
        return ConfidenceNetwork(card.segmentation.maps,
                                 in_channels=len(network_input_channels(card.segmentation.inputs)))
    if backbone == "unet-small":
        return SmallUNet()
    raise SegmenterError(f"unknown segmenter architecture {backbone!r}")


def load_segmenter(run_dir: str | Path) -> tuple[nn.Module, Card]:
    """A trained segmenter in eval mode, from safetensors weights and its card (no code is unpickled)."""
    from training.checkpoint import load_weights

    card = Card.load(run_dir)
    network = build_segmenter(card)
    load_weights(network, Path(run_dir))
    return network.eval(), card
