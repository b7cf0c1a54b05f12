"""DRIVE vessel transfer (training/vessels.py): the U-Net on the classification trunk, its start from a
real run's backbone, Dice inside the field of view, and a short sweep through `medcl experiment`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medcl.card import Card
from tests.conftest import shared
from tests.test_cli import medcl
from training.models import read_state_dict
from training.vessels import (TransferArm, VesselTransferConfig, build_unet, dice_in_fov, init_weights,
                              training_subset)


def _config(tiny_run: Path, **extra) -> VesselTransferConfig:
    card = Card.load(tiny_run)
    return VesselTransferConfig(kind="vessel_transfer", name="t", data=str(shared("drive")),
                                architecture=card.architecture, arms=[TransferArm(label="scratch")], **extra)


def test_the_unet_starts_from_the_runs_backbone_and_keeps_the_image_size(tiny_run: Path) -> None:
    config = _config(tiny_run)
    weights = init_weights(TransferArm(label="x", init=str(tiny_run)), seed=0, base_dir=Path("/"))
    model = build_unet(config, weights)
    saved = {k[len("backbone."):]: v for k, v in read_state_dict(weights).items() if k.startswith("backbone.")}
    encoder = model.encoder.state_dict()
    assert saved and all(torch.equal(encoder[k], v) for k, v in saved.items())
    scratch = build_unet(config, None).encoder.state_dict()
    assert not torch.equal(scratch["layer1.0.conv1.weight"], encoder["layer1.0.conv1.weight"])
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 56)).shape == (1, 1, 40, 56)


def test_missing_pretraining_weights_are_named(tmp_path: Path) -> None:
    from training.vessels import TransferError

    with pytest.raises(TransferError, match="run the pretraining sweep first"):
        init_weights(TransferArm(label="swcl", init="nowhere-s{seed}"), seed=2, base_dir=tmp_path)


def test_dice_counts_only_inside_the_field_of_view() -> None:
    truth = np.zeros((4, 4), bool)
    truth[0, :2] = True
    fov = np.ones((4, 4), bool)
    fov[3] = False
    prob = np.zeros((4, 4))
    prob[0, :2] = 0.9
    prob[3, :] = 0.9  # outside the field of view: ignored
    assert dice_in_fov(prob, truth, fov) == 1.0
    prob[1, 0] = 0.6
    assert dice_in_fov(prob, truth, fov) == pytest.approx(2 * 2 / (3 + 2))


def test_training_subsets_are_seeded_and_nested_in_size() -> None:
    assert training_subset(20, 0.25, seed=1) == training_subset(20, 0.25, seed=1)
    assert len(training_subset(20, 0.25, seed=1)) == 5 and len(training_subset(20, 0.01, seed=0)) == 1
    assert training_subset(20, 1.0, seed=3) == list(range(20))


def test_a_short_transfer_sweep_learns_vessels_and_is_reused(tiny_run: Path, tmp_path: Path) -> None:
    card = Card.load(tiny_run)
    config = {"kind": "vessel_transfer", "name": "drive-t", "data": str(shared("drive")),
              "architecture": card.architecture.model_dump(), "mean": card.preprocess.mean, "std": card.preprocess.std,
              "arms": [{"label": "scratch"}, {"label": "blood", "init": str(tiny_run)}],
              "label_fractions": [0.25], "seeds": [0], "steps": 50, "crop": 64, "threads": 1,
              "output_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")}
    path = tmp_path / "drive.yaml"
    path.write_text(yaml.safe_dump(config))
    first = medcl("experiment", "--quiet", str(path))
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "results" / "drive-t.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["scratch", "blood"]
    assert all(len(r["training_images"]) == 5 and r["dice"] > 0.4 for r in report["rows"])
    # (calling every pixel in the field of view a vessel scores about 0.2: these learned vessels)
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["drive"]["blood"]["0.25"]["dice"] == [report["rows"][1]["dice"]]
    again = medcl("experiment", "--quiet", str(path))
    assert again.returncode == 0 and json.loads((tmp_path / "results" / "drive-t.json").read_text())["rows"] == \
        report["rows"]  # reused, not retrained
    config["arms"][1]["init"] = str(tmp_path / "missing")
    path.write_text(yaml.safe_dump(config))
    bad = medcl("experiment", "--quiet", str(path))
    assert bad.returncode != 0 and "run the pretraining sweep first" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
