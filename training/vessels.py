"""Transfer to retinal-vessel segmentation on DRIVE (SWCL's downstream check, docs/methods.md).

A U-Net whose encoder is the classification backbone (same ``ArchitectureSpec``), started from scratch or
from the backbone of a finished run (SWCL's patch pretraining, or any other), trained on DRIVE's training
images with their first observer's vessel masks, scored by Dice inside the field-of-view mask on DRIVE's
20 test images at full resolution. An arm × DRIVE-label-fraction × seed sweep; the same outputs as
``medcl experiment`` (JSON, markdown table, plot, ``summary.json`` under dataset ``drive``), from the
same command: ``medcl experiment CONFIG`` dispatches here when the config says ``kind: vessel_transfer``.

Why DRIVE images are shrunk (``scale``): the encoders were pretrained on 28 px RetinaMNIST fundus images
on a 2-core CPU; at half resolution DRIVE's vessels are still 1-4 px wide and a run takes minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from medcl.card import ArchitectureSpec
from medcl.errors import MedclError
from training.models import ResNet, create_backbone, load_pretrained
from training.nuclei import random_crops, read_mask, read_rgb


class TransferArm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    # a backbone weight file or a run folder (its model.safetensors); "{seed}" is replaced by the seed, so
    # seed s of this sweep starts from seed s of the pretraining sweep. None: from scratch.
    init: str | None = None


class VesselTransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["vessel_transfer"]
    name: str
    dataset: str = "drive"
    data: str  # DRIVE's folder: training/ and test/, each with images/, 1st_manual/, mask/
    architecture: ArchitectureSpec
    mean: list[float] = [0.5, 0.5, 0.5]  # the pretraining runs' normalisation
    std: list[float] = [0.25, 0.25, 0.25]
    arms: list[TransferArm] = Field(min_length=1)
    label_fractions: list[float] = [1.0]  # of DRIVE's 20 training images
    seeds: list[int] = [0, 1, 2]
    scale: float = Field(0.5, gt=0, le=1)
    crop: int = Field(64, ge=16)
    batch: int = Field(8, ge=1)
    steps: int = Field(200, ge=1)
    lr: float = 1e-3
    decoder_width: int = Field(32, ge=4)
    threads: int | None = None
    output_dir: str = "runs/experiments"
    results_dir: str = "docs/results"
    note: str = ""


class TransferError(MedclError, ValueError):
    """A vessel-transfer config or data that cannot be used."""


def is_vessel_transfer_config(path: str | Path) -> bool:
    from training.config import top_level_value

    return top_level_value(path, "kind") == "vessel_transfer"


def load_transfer_config(path: str | Path) -> tuple[VesselTransferConfig, Path]:
    path = Path(path)
    try:
        config = VesselTransferConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as e:
        first = e.errors()[0]
        raise TransferError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    if not config.architecture.backbone.startswith("resnet"):
        raise TransferError(f"{path}: architecture.backbone must be one of this project's ResNets for the U-Net")
    for f in config.label_fractions:
        if not 0 < f <= 1:
            raise TransferError(f"{path}: label fraction {f} is not in (0, 1]")
    return config, path.parent


# --- model ---------------------------------------------------------------------------------------

def _conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class ResNetUNet(nn.Module):
    """The ResNet trunk as a U-Net encoder (stem and four stages as skips) and a light decoder."""

    def __init__(self, encoder: ResNet, decoder_width: int) -> None:
        super().__init__()
        self.encoder = encoder
        width = encoder.conv1.out_channels
        stage = [width * 2 ** i * (encoder.feature_dim // (width * 8)) for i in range(4)]  # block expansion
        self.stride = 8 * (1 if isinstance(encoder.maxpool, nn.Identity) else 4)
        self.up = nn.ModuleList()
        channels = stage[3]
        for skip in (stage[2], stage[1], stage[0]):
            self.up.append(_conv(channels + skip, max(decoder_width, skip // 2)))
            channels = max(decoder_width, skip // 2)
        self.head = nn.Sequential(_conv(channels + width, decoder_width), nn.Conv2d(decoder_width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        stem = F.relu(e.bn1(e.conv1(x)), inplace=True)
        s1 = e.layer1(e.maxpool(stem))
        s2 = e.layer2(s1)
        s3 = e.layer3(s2)
        y = e.layer4(s3)
        for block, skip in zip(self.up, (s3, s2, s1)):
            y = block(torch.cat([F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False),
                                 skip], 1))
        y = F.interpolate(y, size=stem.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([y, stem], 1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_unet(config: VesselTransferConfig, init: Path | None) -> ResNetUNet:
    encoder, _ = create_backbone(config.architecture.model_copy())
    if init is not None:
        load_pretrained(encoder, init)
    return ResNetUNet(encoder, config.decoder_width)


def init_weights(arm: TransferArm, seed: int, base_dir: Path) -> Path | None:
    if arm.init is None:
        return None
    path = (base_dir / arm.init.replace("{seed}", str(seed))).resolve()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise TransferError(f"arm {arm.label}: no weights at {path} (run the pretraining sweep first)")
    return path


# --- data ----------------------------------------------------------------------------------------

class DriveSplit:
    """One DRIVE split at ``scale``: RGB images, vessel masks and field-of-view masks, plus full-size truth."""

    def __init__(self, folder: Path, scale: float) -> None:
        images = sorted((folder / "images").glob("*.png")) + sorted((folder / "images").glob("*.tif"))
        if not images:
            raise TransferError(f"no DRIVE images under {folder / 'images'}")
        self.names = [p.stem.split("_")[0] for p in images]
        self.images = [read_rgb(p, scale) for p in images]
        self.vessels_full, self.fov_full, self.vessels = [], [], []
        for name, img in zip(self.names, self.images):
            manual = _one(folder / "1st_manual", f"{name}_manual1")
            fov = _one(folder / "mask", f"{name}_")
            self.vessels_full.append(read_mask(manual) > 0)
            self.fov_full.append(read_mask(fov) > 0)
            self.vessels.append(read_mask(manual, size=img.shape[:2]))


def _one(folder: Path, prefix: str) -> Path:
    found = sorted(p for p in folder.glob(f"{prefix}*") if p.suffix.lower() in {".png", ".gif", ".tif"})
    if not found:
        raise TransferError(f"no file {prefix}* in {folder}")
    return found[0]


def _normalise(x: torch.Tensor, config: VesselTransferConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    return 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)


def train_unet(model: ResNetUNet, split: DriveSplit, indices: list[int], config: VesselTransferConfig,
               seed: int, progress: bool, desc: str) -> list[float]:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    images = [split.images[i] for i in indices]
    masks = [split.vessels[i] for i in indices]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    losses = []
    model.train()
    for _ in tqdm(range(config.steps), desc=desc, disable=not progress, unit="step"):
        x, y = random_crops(images, masks, config.batch, config.crop, rng)
        logits = model(_normalise(x, config))
        loss = F.binary_cross_entropy_with_logits(logits, y) + _soft_dice_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def vessel_probability(model: ResNetUNet, rgb: np.ndarray, config: VesselTransferConfig,
                       full_size: tuple[int, int]) -> np.ndarray:
    """Vessel probability of a whole (scaled) image, resized to the original resolution."""
    model.eval()
    x = _normalise(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0, config)
    h, w = x.shape[-2:]
    m = model.stride
    x = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="reflect")
    prob = model(x)[..., :h, :w].sigmoid()
    return F.interpolate(prob, size=full_size, mode="bilinear", align_corners=False)[0, 0].numpy()


def dice_in_fov(prob: np.ndarray, truth: np.ndarray, fov: np.ndarray, threshold: float = 0.5) -> float:
    pred = (prob >= threshold) & fov
    truth = truth & fov
    total = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / total) if total else 1.0


def evaluate_unet(model: ResNetUNet, split: DriveSplit, config: VesselTransferConfig) -> dict:
    scores = [dice_in_fov(vessel_probability(model, img, config, truth.shape), truth, fov)
              for img, truth, fov in zip(split.images, split.vessels_full, split.fov_full)]
    return {"dice": float(np.mean(scores)), "dice_per_image": [round(s, 4) for s in scores]}


def training_subset(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded draw of round(fraction * n) training images (at least one)."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


# --- sweep ---------------------------------------------------------------------------------------

def run_transfer(path: str | Path, progress: bool = True, fractions: list[float] | None = None,
                 methods: list[str] | None = None) -> dict:
    from training.experiment import cell_fingerprint, finish_sweep

    config, base_dir = load_transfer_config(path)
    arms = [a for a in config.arms if not methods or a.label in methods]
    chosen = [f for f in config.label_fractions if not fractions or f in fractions]
    if not arms or not chosen:
        raise TransferError(f"nothing to run: arms {[a.label for a in config.arms]}, "
                            f"fractions {config.label_fractions}")
    command = f"medcl experiment {path}"
    command += (" --fractions " + " ".join(f"{f:g}" for f in fractions)) if fractions else ""
    command += (" --methods " + " ".join(methods)) if methods else ""
    if config.threads:
        torch.set_num_threads(config.threads)
    data = (base_dir / config.data).resolve()
    train_split, test_split = DriveSplit(data / "training", config.scale), DriveSplit(data / "test", config.scale)
    out_dir = (base_dir / config.output_dir).resolve()
    # what decides a run's result, besides its own arm, fraction and seed: a finished run is reused while it holds
    fingerprint = config.model_dump_json(exclude={"threads", "output_dir", "results_dir", "note", "arms",
                                                  "label_fractions", "seeds", "name"})
    for arm in arms:  # every arm's weights are there before anything trains
        for seed in config.seeds:
            init_weights(arm, seed, base_dir)
    # every cell of the full config, in table order: this call's rows and the earlier ones it keeps
    cells = {(a.label, f, s): cell_fingerprint({"config": fingerprint, "arm": a.model_dump()})
             for a in config.arms for f in config.label_fractions for s in config.seeds}
    rows, total, done = [], len(arms) * len(chosen) * len(config.seeds), 0
    for arm in arms:
        for fraction in chosen:
            for seed in config.seeds:
                done += 1
                name = f"{config.name}-{arm.label}-{fraction * 100:g}pct-s{seed}"
                print(f"medcl: experiment {config.name}: run {done}/{total}: {name}", flush=True)
                row = _run_arm(config, arm, fraction, seed, name, base_dir, out_dir, fingerprint,
                               train_split, test_split, progress)
                rows.append({**row, "fingerprint": cells[(arm.label, fraction, seed)], "command": command})
    report = {"name": config.name, "dataset": config.dataset, "metrics": ["dice"], "rows": rows,
              "note": config.note}
    return finish_sweep(report, (base_dir / config.results_dir).resolve(), cells)


def _run_arm(config: VesselTransferConfig, arm: TransferArm, fraction: float, seed: int, name: str,
             base_dir: Path, out_dir: Path, fingerprint: str, train_split: DriveSplit, test_split: DriveSplit,
             progress: bool) -> dict:
    run_dir = out_dir / name
    result_file = run_dir / "result.json"
    init = init_weights(arm, seed, base_dir)
    key = json.dumps({"config": fingerprint, "arm": arm.model_dump(), "init": str(init) if init else None})
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved.get("key") == key:
            return saved["row"]  # finished before with this exact config
    torch.manual_seed(seed)
    model = build_unet(config, init)
    indices = training_subset(len(train_split.images), fraction, seed)
    started = time.time()
    losses = train_unet(model, train_split, indices, config, seed, progress, name)
    scores = evaluate_unet(model, test_split, config)
    row = {"method": arm.label, "label_fraction": fraction, "seed": seed, "run": str(run_dir),
           "train_seconds": round(time.time() - started, 1), "dice": scores["dice"],
           "training_images": [train_split.names[i] for i in indices], "init": str(init) if init else None,
           "final_loss": round(float(np.mean(losses[-20:])), 4)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    result_file.write_text(json.dumps({"key": key, "row": row}, indent=2))
    return row
