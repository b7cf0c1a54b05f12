"""The model card: one validated record that travels with every checkpoint and package.

Everything the service needs to preprocess an image and name its answer comes from here, never from
constants in service code: training writes it, export checks it, the service obeys it.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CARD_FILENAME = "card.json"
CARD_SCHEMA_VERSION = 1

Interpolation = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]


class PreprocessSpec(BaseModel):
    """How a decoded image becomes the network's input tensor.

    Geometry: optional centre crop, then a resize of the crop to ``input_size`` x ``input_size``.
    ``crop_pixels`` reproduces a fixed crop in source pixels (MedMNIST cut 200x200 from the
    ~360x363 PBC photographs before resizing to 28x28); when the image is smaller than the crop,
    the largest centred square is used instead, so a 28x28 BloodMNIST tile passes unchanged.
    Colour: RGB, scaled to [0, 1], then normalised with ``mean``/``std``; alpha is composited on
    white (the colour of an empty slide or smear background).
    """

    model_config = ConfigDict(extra="forbid")

    input_size: int = Field(ge=8, le=4096)
    crop: Literal["none", "center"] = "none"
    crop_pixels: int | None = Field(default=None, ge=1)
    crop_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    interpolation: Interpolation = "bilinear"
    channel_order: Literal["RGB"] = "RGB"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Microns per pixel of the training images. With it, a tile sent with its own pixel size has the
    # same field of view cut from it: crop_pixels x (this / the tile's) source pixels, then resized.
    pixel_size_um: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _crop_is_defined(self) -> "PreprocessSpec":
        if self.crop == "center" and (self.crop_pixels is None) == (self.crop_fraction is None):
            raise ValueError("crop 'center' needs exactly one of crop_pixels or crop_fraction")
        if self.crop == "none" and (self.crop_pixels is not None or self.crop_fraction is not None):
            raise ValueError("crop_pixels/crop_fraction are only meaningful with crop 'center'")
        if self.pixel_size_um is not None and self.crop_pixels is None:
            raise ValueError("pixel_size_um needs crop 'center' with crop_pixels (the field of view it scales)")
        return self

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("std values must be > 0")
        return v


class ArchitectureSpec(BaseModel):
    """What to build in training/models.py: the factory's arguments, nothing else."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "resnet18"
    stem: Literal["imagenet", "small"] = "small"
    width: int = Field(default=64, ge=8)
    embedding_dim: int = Field(default=64, ge=2)
    feature_dim: int | None = None  # pooled backbone width, filled in by the model factory
    # Inference only (training is unchanged): "d4" averages logits and embeddings over the 8 flips and
    # quarter-turns of a square tile, for tiles that have no "up" (histology). It is part of the
    # exported graph, so the service, evaluation and the drift reference all see the same answer.
    test_time_augmentation: Literal["none", "d4"] = "none"


class DataSpec(BaseModel):
    """Where the training data came from, so results and parity checks can be traced and redone."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["npz", "folder", "csv"]
    path: str
    fingerprint: str = ""
    label_fraction: float = 1.0
    n_labelled: int = 0
    n_unlabelled: int = 0
    n_test: int = 0
    test_split: str = "test"


class OnnxSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = "model.onnx"
    opset: int
    exporter: str
    input_name: str = "image"
    output_names: list[str] = ["logits", "embedding"]
    parity: dict[str, float | int | str] = {}
    # fp16/int8 files beside model.onnx, with their agreement, task-metric change and speed vs fp32
    variants: dict[str, dict[str, float | int | str | bool]] = {}


class OodSpec(BaseModel):
    """The out-of-distribution flag of a classifier (medcl/drift.py), from two label-free signals:

    - ``threshold``: on the cosine distance from the image's embedding to the nearest embedding of the
      package's training sample (``ood_score`` in answers);
    - ``image_threshold``: on the distance of the image's colour and texture statistics from the
      training images' (``image_ood_score``; ``image_score`` names how it is measured).

    An image is in distribution when neither exceeds its threshold. Each threshold is the ``quantile``
    of its score over the run's validation images (cut from the training data, never the test split)."""

    model_config = ConfigDict(extra="forbid")

    score: Literal["nearest_training_cosine_distance"] = "nearest_training_cosine_distance"
    threshold: float = Field(ge=0.0, le=2.0)
    image_threshold: float | None = Field(default=None, ge=0.0)
    # "knn10_statistics26": mean distance to the 10 nearest training images in 26 standardised statistics;
    # "mahalanobis_statistics14": Mahalanobis distance of 14 (packages built before the choice; None here)
    image_score: str | None = None
    quantile: float = Field(gt=0.0, lt=1.0)
    images: int = Field(ge=1)  # validation images the thresholds were set on


class SegmentationSpec(BaseModel):
    """How a segmenter's output becomes nuclei: which map, how to tile, how to cut instances."""

    model_config = ConfigDict(extra="forbid")

    maps: int = Field(ge=1)  # confidence maps the network outputs
    nuclei_channel: int = Field(ge=0)
    channel_rule: str  # how nuclei_channel was chosen (label-free for the self-supervised network)
    receptive_radius: int = Field(ge=0)  # tiles overlap by twice this, so stitching is exact
    window: int = Field(default=512, ge=32)
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    threshold_rule: Literal["fixed", "otsu"] = "fixed"
    open_radius: int = Field(default=3, ge=0)
    close_radius: int = Field(default=1, ge=0)
    min_area: int = Field(default=30, ge=0)
    min_distance: int = Field(default=6, ge=0)
    markers: Literal["distance", "map"] = "distance"  # watershed markers (medcl.segmentation.InstanceRules)
    pixel_size_um: float | None = Field(default=None, gt=0.0)  # of the training images
    # what the network reads (medcl.segmentation.network_input): RGB, or RGB plus a per-tile
    # normalised haematoxylin density
    inputs: Literal["rgb", "rgb+haematoxylin"] = "rgb"
    # which answer /segment gives (medcl.nuclei_check.answer_tile): the network's map where it passes a
    # label-free check against the tile's stain, else the classical method's; "classical" when the
    # segmenter failed its own check at build time; "network" unchecked
    serve: Literal["network", "network-or-classical", "classical"] = "network-or-classical"

    @model_validator(mode="after")
    def _channel_exists(self) -> "SegmentationSpec":
        if self.nuclei_channel >= self.maps:
            raise ValueError(f"nuclei_channel {self.nuclei_channel} but only {self.maps} maps")
        return self


class Card(BaseModel):
    """Model card shared by training (checkpoints), export (packages) and the service."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = CARD_SCHEMA_VERSION
    name: str
    version: str
    task: Literal["classify", "embed", "segment"] = "classify"
    method: str
    architecture: ArchitectureSpec
    class_names: list[str]
    preprocess: PreprocessSpec
    data: DataSpec
    metrics: dict[str, float | list[float] | list[list[int]] | dict[str, float]] = {}
    training: dict[str, float | int | str | bool | None] = {}
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    code_version: str = ""
    onnx: OnnxSpec | None = None
    segmentation: SegmentationSpec | None = None
    ood: OodSpec | None = None  # classifiers trained with a validation split

    @model_validator(mode="after")
    def _segmenter_has_rules(self) -> "Card":
        if (self.task == "segment") != (self.segmentation is not None):
            raise ValueError("a card has a segmentation section exactly when its task is 'segment'")
        return self

    @field_validator("class_names")
    @classmethod
    def _unique_names(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class_names must be unique")
        return v

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``card.json`` atomically (a reader never sees half a card)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CARD_FILENAME
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".card-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(self.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the card is read by other users (the service)
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike[str]) -> "Card":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / CARD_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no model card at {path}")
        return cls.model_validate(json.loads(path.read_text()))
