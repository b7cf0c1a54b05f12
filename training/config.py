"""Training configuration: YAML validated by pydantic. Paths are relative to the YAML file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medcl.card import ArchitectureSpec, PreprocessSpec
from medcl.errors import MedclError
from training.augment import AugmentSpec


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["npz", "folder", "csv"]
    path: str
    # Folder sources: names for the class folders in sorted folder order (folders named 0/1 become
    # normal/tumor); CSV sources: the class order.
    class_names: list[str] | None = None
    # Folder sources with an official evaluation split of their own (same class folders): used as the
    # test split as it is, instead of cutting one from ``path``. It only reports; selection uses val.
    test_path: str | None = None
    label_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    # Folder and CSV sources have no official split: a seeded, stratified, group-safe one is made.
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    # The seed of that split. Unset: the run's seed, so the test images change with the seed and a
    # spread over seeds mixes training noise with test resampling; sweeps fix it.
    split_seed: int | None = Field(default=None, ge=0)
    path_column: str = "path"
    # Instead of path_column: a format string over the CSV's columns, e.g. "images/{image_id}.jpg".
    path_template: str | None = None
    label_column: str = "label"
    group_column: str | None = None
    max_train_images: int | None = Field(default=None, ge=1)


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["cross_entropy", "supcon", "s5cl", "srcl", "srcl_pretrain", "mean_teacher", "swcl"]
    tau_labelled: float = Field(default=0.2, gt=0.0)
    tau_unlabelled: float = Field(default=0.7, gt=0.0)
    tau_pseudo: float = Field(default=0.7, gt=0.0)
    # S5CL switches L_u -> L_p after a warm-up: one epoch over the unlabelled set in the reference.
    pseudo_warmup_steps: int = Field(default=100, ge=0)
    # None = the reference behaviour (every pseudo-label counts); a value keeps only confident ones.
    pseudo_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    # SRCL / mean teacher (docs/methods.md)
    tau_ntxent: float = Field(default=0.5, gt=0.0)
    lambda_contrastive: float = Field(default=1.0, ge=0.0)
    relation_weight: float = Field(default=1.0, ge=0.0)
    ema_decay: float = Field(default=0.99, gt=0.0, lt=1.0)
    rampup_steps: int | None = Field(default=None, ge=1)  # None: 40% of the run
    # SWCL (docs/methods.md): the stage-1 label-propagation model (a finished run or package folder) that
    # gives unlabelled images a pseudo-label and every patch an abnormality score; patches at five fixed
    # positions (four corners + centre) with a side of patch_fraction x the image; a patch is abnormal
    # when its image is and its score (1 - P(normal classes)) reaches abnormal_threshold; SupCon at tau_patch.
    teacher: str | None = None
    patch_fraction: float = Field(default=0.6, gt=0.2, le=1.0)
    normal_classes: list[int] = Field(default_factory=lambda: [0])
    abnormal_threshold: float = Field(default=0.4, ge=0.0, le=1.0)
    tau_patch: float = Field(default=0.1, gt=0.0)


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["adamax", "adam", "adamw", "sgd"] = "adamax"
    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    # "constant" is the S5CL reference; "cosine" decays to 0 over schedule.steps, which steadies the
    # final model of a short CPU run (the demo's validation accuracy swung by 10 points without it).
    schedule: Literal["constant", "cosine"] = "constant"


class ScheduleConfig(BaseModel):
    """The budget is in optimiser steps so that methods compare at equal compute and labelled batches."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    labelled_batch: int = Field(default=32, ge=2)
    m_per_class: int = Field(default=4, ge=1)
    unlabelled_batch: int = Field(default=128, ge=2)
    eval_every: int = Field(default=0, ge=0)  # 0: only at the end
    checkpoint_every: int = Field(default=100, ge=1)
    max_minutes: float | None = Field(default=None, gt=0.0)
    threads: int | None = Field(default=None, ge=1)
    knn_k: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _m_divides_batch(self) -> "ScheduleConfig":
        if self.labelled_batch % self.m_per_class:
            raise ValueError(f"labelled_batch {self.labelled_batch} must be a multiple of m_per_class {self.m_per_class}")
        return self


# Schedule fields that change how long or how visibly a run trains, never what it learns.
VOLATILE_SCHEDULE = frozenset({"max_minutes", "eval_every", "checkpoint_every", "threads"})

# Fields added after runs existed (see TrainConfig.fingerprint), as dotted paths.
ADDED_LATER = ("init_from", "method.teacher", "method.patch_fraction", "method.normal_classes",
               "method.abnormal_threshold", "method.tau_patch", "data.split_seed", "data.test_path",
               "preprocess.pixel_size_um")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    seed: int = 0
    data: DataConfig
    model: ArchitectureSpec = ArchitectureSpec()
    pretrained: str | None = None  # backbone weights only (a local file)
    # A folder (package or run) whose model.safetensors holds the whole model (backbone, projection,
    # classifier):
    # a scheduled retrain's warm start from its champion. The class list must be the same.
    init_from: str | None = None
    preprocess: PreprocessSpec
    augment: AugmentSpec = AugmentSpec()
    method: MethodConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig
    output_dir: str = "runs"

    def fingerprint(self) -> str:
        """Hash of what shapes the training trajectory: a run resumes only into the same one.

        The time budget, evaluation and checkpoint cadence, threads and output folder are left out.
        So is the step budget under a constant learning rate, so that a finished run can be
        extended bit-for-bit; under cosine decay every step's rate depends on it, so it counts.
        """
        volatile = set(VOLATILE_SCHEDULE)
        if self.optim.schedule == "constant":
            volatile.add("steps")
        # test-time augmentation changes answers, not training: a run is reused under either setting
        exclude: dict = {"output_dir": True, "schedule": volatile, "model": {"test_time_augmentation": True}}
        # Fields added after runs existed are left out while unset, so those runs still resume and
        # experiments still reuse them (a new field with a default must not orphan every earlier run).
        for path in ADDED_LATER:
            *parents, field = path.split(".")
            owner = self
            for part in parents:
                owner = getattr(owner, part)
            if getattr(owner, field) == type(owner).model_fields[field].get_default(call_default_factory=True):
                target = exclude
                for part in parents:
                    target = target.setdefault(part, {})
                target[field] = True
        payload = self.model_dump_json(exclude=exclude)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class ConfigError(MedclError, ValueError):
    """A config file that cannot be used; the message names the file and the field."""


def read_config_yaml(path: str | os.PathLike[str], overrides: dict | None = None) -> dict:
    """The YAML mapping of a config file with dotted ``overrides`` applied (``schedule.steps=10``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


def top_level_value(path: str | os.PathLike[str], key: str) -> object:
    """One top-level value of a YAML file, or None when the file or the key is missing or unreadable:
    how the CLI tells config kinds apart before validating one."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return raw.get(key) if isinstance(raw, dict) else None


def validate_config(model: type[BaseModel], raw: dict, path: str | os.PathLike[str]):
    """``model.model_validate(raw)``, or a ConfigError naming the file and the first bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def load_config(path: str | os.PathLike[str], overrides: dict | None = None) -> TrainConfig:
    """Read a YAML config; relative data, pretrained and output paths are taken from the YAML's folder."""
    raw = read_config_yaml(path, overrides)
    base = Path(path).parent
    if isinstance(raw.get("data"), dict):
        for key in ("path", "test_path"):
            if raw["data"].get(key):
                raw["data"][key] = str(resolve_path(base, raw["data"][key]))
    for key in ("pretrained", "init_from"):
        if raw.get(key):
            raw[key] = str(resolve_path(base, raw[key]))
    raw["output_dir"] = str(resolve_path(base, raw.get("output_dir", "runs")))
    return validate_config(TrainConfig, raw, path)


def resolve_path(base: Path, value: str) -> Path:
    """A path from a config: ~ and $VARS expanded, relative ones taken from the config's folder."""
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    return p if p.is_absolute() else (base / p).resolve()
