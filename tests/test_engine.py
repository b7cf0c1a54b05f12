"""The training engine on the carried BloodMNIST subset: outputs, resume, and the baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcl.card import Card
from tests.conftest import DEMO_CONFIG
from training.config import ConfigError, load_config
from training.engine import train

FAST = {"schedule.eval_every": 0, "schedule.unlabelled_batch": 16, "schedule.labelled_batch": 16,
        "schedule.m_per_class": 2, "model.width": 8, "data.max_train_images": 400,
        "method.pseudo_warmup_steps": 2, "schedule.threads": 1}


def test_a_run_writes_checkpoint_card_metrics_and_figures(tiny_run: Path) -> None:
    card = Card.load(tiny_run)
    assert card.method == "s5cl" and card.class_names[0] == "basophil" and card.onnx is None
    assert len(card.data.fingerprint) == 16 and card.training["steps_done"] == 40
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "knn_accuracy", "per_class_f1", "confusion_matrix"):
        assert key in card.metrics
    assert sum(map(sum, card.metrics["confusion_matrix"])) == card.data.n_test == 800
    for f in ("model.safetensors", "history.json", "metrics.json", "learning_curve.png", "confusion_matrix.png"):
        assert (tiny_run / f).is_file(), f
    history = json.loads((tiny_run / "history.json").read_text())
    # S5CL switches from L_u to L_p after the warm-up (20 steps in the tiny config).
    assert "supcon_unlabelled" in history[0] and "supcon_pseudo" in history[-1]
    assert card.metrics["accuracy"] > 1 / 8  # better than chance after 40 steps


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    straight = train(load_config(DEMO_CONFIG, {**FAST, "name": "a", "output_dir": str(tmp_path),
                                               "schedule.steps": 6}), progress=False)
    interrupted = load_config(DEMO_CONFIG, {**FAST, "name": "b", "output_dir": str(tmp_path), "schedule.steps": 3})
    train(interrupted, progress=False)
    resumed = train(load_config(DEMO_CONFIG, {**FAST, "name": "b", "output_dir": str(tmp_path),
                                              "schedule.steps": 6}), progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Card.load(resumed).training["steps_done"] == 6


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    train(load_config(DEMO_CONFIG, {**FAST, "name": "c", "output_dir": str(tmp_path), "schedule.steps": 2}),
          progress=False)
    changed = load_config(DEMO_CONFIG, {**FAST, "name": "c", "output_dir": str(tmp_path), "schedule.steps": 4,
                                        "optim.lr": 0.01})
    with pytest.raises(RuntimeError, match="different config"):
        train(changed, progress=False)


@pytest.mark.parametrize("method, terms", [("cross_entropy", {"ce"}), ("supcon", {"ce", "supcon_labelled"})])
def test_baselines_run_in_the_same_engine(tmp_path: Path, method: str, terms: set[str]) -> None:
    run = train(load_config(DEMO_CONFIG, {**FAST, "name": method, "output_dir": str(tmp_path),
                                          "schedule.steps": 2, "method.name": method,
                                          "data.label_fraction": 0.1}), progress=False)
    history = json.loads((run / "history.json").read_text())
    assert set(history[0]) - {"step", "loss"} == terms
    assert Card.load(run).data.n_labelled < 60


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_CONFIG.read_text().replace("name: s5cl", "name: magic"))
    with pytest.raises(ConfigError, match="method.name"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "missing.yaml")
