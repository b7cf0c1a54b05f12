"""Encoders and heads behind one factory (``create_model``), in the spirit of timm's registry.

ResNet-18/50 are written here because torchvision does not import beside the CPU torch this
project installs. The ``small`` stem (3x3 conv, stride 1, no max-pool) keeps spatial detail for
28-64 px tiles; ``imagenet`` is the usual 7x7/2 conv + 3x3/2 max-pool for 224 px inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from medcl.card import ArchitectureSpec


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = _shortcut(in_ch, ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int) -> None:
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """A ResNet trunk that returns pooled features (no classification layer).

    Parameter names follow torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) so that
    torchvision-format state dicts load without renaming.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], stem: str = "imagenet",
                 width: int = 64) -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        elif stem == "small":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem {stem!r}; use 'imagenet' or 'small'")
        self.bn1 = nn.BatchNorm2d(width)
        in_ch = width
        stages = []
        for i, n_blocks in enumerate(layers):
            ch = width * 2 ** i
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, ch, 2 if (j == 0 and i > 0) else 1))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def resnet18(stem: str = "imagenet", width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], stem, width)


def resnet50(stem: str = "imagenet", width: int = 64) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], stem, width)


BACKBONES: dict[str, Callable[..., ResNet]] = {"resnet18": resnet18, "resnet50": resnet50}


class TimmBackbone(nn.Module):
    """Any timm model as a pooled-feature trunk (optional: only where timm imports)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            import timm
        except Exception as e:  # timm imports torchvision, which fails beside some torch builds
            raise RuntimeError(f"backbone 'timm:{name}' needs a working timm install ({e})") from None
        # pretrained=False: weights come only from local files (see load_pretrained), never a hub.
        self.model = timm.create_model(name, pretrained=False, num_classes=0)
        self.feature_dim = int(self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class EncoderClassifier(nn.Module):
    """S5CL's model: backbone -> embedder Linear(F, D), no activation -> classifier Linear(D, C).

    The classifier reads the un-normalised embedding; contrastive losses normalise it themselves.
    ``forward`` returns (logits, embedding).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, num_classes: int,
                 test_time_augmentation: str = "none") -> None:
        super().__init__()
        self.backbone = backbone
        self.embedder = nn.Linear(feature_dim, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.test_time_augmentation = test_time_augmentation

    def forward(self, x: torch.Tensor, features: bool = False) -> tuple[torch.Tensor, ...]:
        """(logits, embedding); with ``features``, also the pooled backbone features (SRC-MT's relations).

        In eval mode with test_time_augmentation "d4", the mean over the tile's 8 flips and quarter-turns
        (one batch of 8N through the network)."""
        if self.test_time_augmentation == "d4" and not self.training and not features and x.shape[-1] == x.shape[-2]:
            n = x.shape[0]
            # the 8 symmetries of a square: {identity, transpose} x {no flip, flip x, flip y, both}
            # (torch.rot90 has no ONNX export; transposes and flips do)
            mirrored = x.transpose(-2, -1)
            views = [v for t in (x, mirrored) for v in (t, t.flip(-1), t.flip(-2), t.flip(-2, -1))]
            logits, embedding = self._forward(torch.cat(views))
            return (logits.reshape(8, n, -1).mean(dim=0), embedding.reshape(8, n, -1).mean(dim=0))
        return self._forward(x, features)

    def _forward(self, x: torch.Tensor, features: bool = False) -> tuple[torch.Tensor, ...]:
        pooled = self.backbone(x)
        embedding = self.embedder(pooled)
        if features:
            return self.classifier(embedding), embedding, pooled
        return self.classifier(embedding), embedding


class ExportWrapper(nn.Module):
    """What the ONNX package computes: (logits, L2-normalised embedding)."""

    def __init__(self, model: EncoderClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.model(image)
        return logits, F.normalize(embedding, dim=1)


def create_backbone(spec: ArchitectureSpec) -> tuple[nn.Module, int]:
    if spec.backbone.startswith("timm:"):
        trunk = TimmBackbone(spec.backbone.split(":", 1)[1])
        return trunk, trunk.feature_dim
    if spec.backbone not in BACKBONES:
        known = ", ".join(sorted(BACKBONES)) + ", timm:<name>"
        raise ValueError(f"unknown backbone {spec.backbone!r}; known: {known}")
    trunk = BACKBONES[spec.backbone](stem=spec.stem, width=spec.width)
    return trunk, trunk.feature_dim


def create_model(spec: ArchitectureSpec, num_classes: int, pretrained: str | Path | None = None) -> EncoderClassifier:
    """Build the model a card describes; ``pretrained`` is a local backbone weight file, if any."""
    backbone, feature_dim = create_backbone(spec)
    spec.feature_dim = feature_dim
    if pretrained:
        load_pretrained(backbone, pretrained)
    return EncoderClassifier(backbone, feature_dim, spec.embedding_dim, num_classes, spec.test_time_augmentation)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local file: safetensors, or a torch file loaded with ``weights_only=True``.

    Neither path can execute code stored in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pretrained(backbone: nn.Module, path: str | Path) -> None:
    """Load backbone weights, tolerating classifier heads and common prefixes; refuse a mismatch."""
    state = read_state_dict(path)
    own = backbone.state_dict()
    for prefix in ("", "backbone.", "module.", "model.", "encoder.", "module.backbone."):
        mapped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
        if len(usable) >= 0.9 * len(own):
            break
    else:
        raise ValueError(f"{path}: fewer than 90% of the backbone's tensors match by name and shape")
    backbone.load_state_dict(usable, strict=False)
