"""The training engine on the carried BloodMNIST subset: outputs, resume, and the baselines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcl.card import Card
from tests.conftest import DEMO_CONFIG
from training.checkpoint import find_training_checkpoint
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


def _weights_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_killed_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    """SIGKILL a real `medcl train` after its first checkpoint, resume it, compare with a straight run."""
    overrides = {**FAST, "schedule.steps": 16, "schedule.checkpoint_every": 2, "output_dir": str(tmp_path)}
    straight = train(load_config(DEMO_CONFIG, {**overrides, "name": "straight"}), progress=False)
    args = [sys.executable, "-m", "medcl.cli", "train", str(DEMO_CONFIG), "--quiet", "--set", "name=killed"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 240
    while find_training_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A kill between the two renames of a checkpoint swap leaves checkpoint.old, which is found too.
    checkpoint = find_training_checkpoint(run_dir)
    assert checkpoint is not None
    step_at_kill = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert 2 <= step_at_kill < 16, "the kill must land mid-run for this test to mean anything"
    resumed = train(load_config(DEMO_CONFIG, {**overrides, "name": "killed"}), progress=False)
    assert _weights_equal(straight, resumed)
    assert Card.load(resumed).training["steps_done"] == 16


def test_a_finished_constant_lr_run_can_be_extended(tmp_path: Path) -> None:
    base = {**FAST, "optim.schedule": "constant", "output_dir": str(tmp_path)}
    straight = train(load_config(DEMO_CONFIG, {**base, "name": "a", "schedule.steps": 6}), progress=False)
    train(load_config(DEMO_CONFIG, {**base, "name": "b", "schedule.steps": 3}), progress=False)
    extended = train(load_config(DEMO_CONFIG, {**base, "name": "b", "schedule.steps": 6}), progress=False)
    assert _weights_equal(straight, extended)


def test_cosine_runs_refuse_a_changed_step_budget(tmp_path: Path) -> None:
    base = {**FAST, "optim.schedule": "cosine", "output_dir": str(tmp_path), "name": "cos"}
    train(load_config(DEMO_CONFIG, {**base, "schedule.steps": 2}), progress=False)
    with pytest.raises(RuntimeError, match="different config"):
        train(load_config(DEMO_CONFIG, {**base, "schedule.steps": 4}), progress=False)


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    train(load_config(DEMO_CONFIG, {**FAST, "name": "c", "output_dir": str(tmp_path), "schedule.steps": 2}),
          progress=False)
    changed = load_config(DEMO_CONFIG, {**FAST, "name": "c", "output_dir": str(tmp_path), "schedule.steps": 4,
                                        "optim.lr": 0.01})
    with pytest.raises(RuntimeError, match="different config"):
        train(changed, progress=False)


@pytest.mark.parametrize("method, terms", [
    ("cross_entropy", {"ce"}), ("supcon", {"ce", "supcon_labelled"}),
    ("srcl", {"ce", "ntxent", "relation", "consistency"}), ("srcl_pretrain", {"ntxent", "relation"}),
    ("mean_teacher", {"ce", "consistency"})])
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


def test_mean_teacher_follows_the_student_by_ema_and_the_weight_ramps() -> None:
    from training.config import MethodConfig
    from training.methods import MeanTeacherRelations, StepContext
    from training.models import create_model
    from medcl.card import ArchitectureSpec

    student = create_model(ArchitectureSpec(width=8), 3)
    method = MeanTeacherRelations(MethodConfig(name="srcl", ema_decay=0.9))
    teacher = method._update_teacher(student, 0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in teacher.parameters()]
    method._update_teacher(student, 50)  # alpha = min(1 - 1/51, 0.9) = 0.9
    for b, t in zip(before, teacher.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * (b + 1.0), atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    ctx = lambda step: StepContext(step=step, generator=torch.Generator(), augment=None, preprocess=None,  # noqa: E731
                                   total_steps=100)
    assert method.ramp(ctx(0)) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert method.ramp(ctx(40)) == pytest.approx(1.0) and method.ramp(ctx(99)) == pytest.approx(1.0)
    relation = method.relation(torch.randn(6, 4))
    assert relation.shape == (6, 6) and torch.allclose(relation.norm(dim=1), torch.ones(6), atol=1e-5)


def test_srcl_terms_match_an_independent_src_mt_implementation() -> None:
    """The relation and consistency terms against SRC-MT's definitions written out in numpy: G = A A^T of
    the raw pooled features, each row divided by its L2 norm, sum of squared differences over B; softmax
    MSE weighted per class by 10000 / count_c, over B."""
    import numpy as np

    from training.config import MethodConfig
    from training.methods import MeanTeacherRelations
    from training.models import create_model
    from medcl.card import ArchitectureSpec

    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 5)) * 3.0, rng.normal(size=(6, 5)) * 3.0

    def relation(a: np.ndarray) -> np.ndarray:
        gram = a @ a.T
        return gram / np.sqrt((gram ** 2).sum(axis=1, keepdims=True))

    expected = ((relation(student) - relation(teacher)) ** 2).sum() / 6
    method = MeanTeacherRelations(MethodConfig(name="srcl"))
    got = ((method.relation(torch.tensor(student)) - method.relation(torch.tensor(teacher))) ** 2).sum() / 6
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # not the cosine matrix of the earlier variant: its terms are of another size
    cosine = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T  # noqa: E731
    assert abs(((cosine(student) - cosine(teacher)) ** 2).sum() / 6 - expected) > 0.1 * expected

    labels = torch.tensor([0, 0, 0, 1, 2, 2])  # labelled shares 3:1:2 of a training set of 600 images
    head = method.prepare(create_model(ArchitectureSpec(width=8), 3), labels, 3, 600)
    assert head and all(p.requires_grad for p in head)  # the NT-Xent projection head, to be optimised
    counts = (np.array([3, 1, 2]) + 1) / (6 + 3) * 600
    logits_s, logits_t = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    softmax = lambda z: np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # noqa: E731
    expected = ((10000.0 / counts)[None, :] * (softmax(logits_s) - softmax(logits_t)) ** 2).sum() / 6
    got = method.consistency(torch.tensor(logits_s, dtype=torch.float32), torch.tensor(logits_t, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert MeanTeacherRelations(MethodConfig(name="mean_teacher")).prepare(
        create_model(ArchitectureSpec(width=8), 3), labels, 3, 600) == []  # no head without NT-Xent


def test_a_config_fingerprint_survives_new_optional_fields() -> None:
    """Runs resume, and experiments reuse finished runs, only when the fingerprint matches. It is pinned
    here: a new config field must go into training.config.ADDED_LATER (left out while unset) instead
    of changing every existing fingerprint and orphaning every earlier run (that happened once: a
    sweep's 15 finished runs were refused after `init_from` was added)."""
    from training.config import TrainConfig

    raw = {"name": "pinned", "data": {"name": "bloodmnist", "kind": "npz", "path": "/data/bloodmnist.npz",
                                      "label_fraction": 0.1},
           "preprocess": {"input_size": 28}, "method": {"name": "s5cl"}, "schedule": {"steps": 300}}
    config = TrainConfig.model_validate(raw)
    assert config.fingerprint() == "980cc341db4d"
    assert TrainConfig.model_validate({**raw, "init_from": "/champion"}).fingerprint() != "980cc341db4d"
    assert TrainConfig.model_validate({**raw, "schedule": {"steps": 300, "threads": 1}}).fingerprint() == "980cc341db4d"
