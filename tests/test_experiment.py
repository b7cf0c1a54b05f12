"""`medcl experiment`: a real (tiny) sweep on the carried BloodMNIST subset, its outputs and the summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO_CONFIG


def test_a_sweep_writes_tables_plots_and_the_summary_and_resumes(tmp_path: Path) -> None:
    from training.experiment import run_experiment

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-sweep", "dataset": "bloodmnist-demo", "base_config": str(DEMO_CONFIG),
        "methods": ["cross_entropy", {"label": "srcl_pft", "method": "srcl_pretrain", "then": "cross_entropy"}],
        "label_fractions": [0.1], "seeds": [0, 1], "metrics": ["accuracy", "macro_f1"],
        "set": {"schedule.steps": 4, "schedule.eval_every": 0, "schedule.unlabelled_batch": 16,
                "schedule.labelled_batch": 16, "schedule.m_per_class": 2, "model.width": 8,
                "data.max_train_images": 300, "method.pseudo_warmup_steps": 2, "schedule.threads": 1},
        "output_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
        "note": "4 steps: a plumbing test, not a result.",
        "published": [{"source": "MedMNIST v2, ResNet-18 (28)", "method": "resnet18", "label_fraction": 1.0,
                       "values": {"accuracy": 0.958}}]}))
    report = run_experiment(config, progress=False)
    assert len(report["rows"]) == 4
    assert all(r["run"].endswith("-finetune") for r in report["rows"] if r["method"] == "srcl_pft")
    results = tmp_path / "results"
    table = (results / "tiny-sweep.md").read_text()
    assert "| 10% | cross_entropy |" in table and "| 10% | srcl_pft |" in table and " ± " in table
    assert (results / "tiny-sweep.png").stat().st_size > 1000
    # published numbers sit in their own table, with their source, and never enter the summary
    assert "| 100% | resnet18 | 0.958 | – | MedMNIST v2, ResNet-18 (28) |" in table.split("Published")[1]
    summary = json.loads((results / "summary.json").read_text())
    cell = summary["bloodmnist-demo"]["srcl_pft"]["0.1"]
    assert set(summary["bloodmnist-demo"]) == {"cross_entropy", "srcl_pft"}
    assert len(cell["accuracy"]) == 2 and len(cell["macro_f1"]) == 2
    # the fine-tuned run started from the pretraining run's weights
    finetune = json.loads((Path(report["rows"][-1]["run"]) / "card.json").read_text())
    assert finetune["method"] == "cross_entropy"
    assert re.search(r"tiny-sweep-srcl_pft-10pct-s1(-r\d+)?/model\.safetensors$", finetune["training"]["pretrained"])
    # a second call reuses every finished run: nothing is trained again
    stamps = {r["run"]: (Path(r["run"]) / "metrics.json").stat().st_mtime_ns for r in report["rows"]}
    again = run_experiment(config, progress=False)
    assert {r["run"]: (Path(r["run"]) / "metrics.json").stat().st_mtime_ns for r in again["rows"]} == stamps
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]


def test_partial_sweeps_add_up_across_machines_and_drop_rows_of_changed_settings(tmp_path: Path, capsys) -> None:
    """Run folders are not kept in the repository: a later `--fractions` call on a fresh machine must add
    its rows to the committed results, not replace them, and must not keep rows its config no longer makes."""
    import shutil

    from training.experiment import ExperimentError, run_experiment

    spec = {
        "name": "grow", "dataset": "bloodmnist-demo", "base_config": str(DEMO_CONFIG),
        "methods": ["cross_entropy"], "label_fractions": [0.1, 0.2], "seeds": [0],
        "metrics": ["accuracy"],
        "set": {"schedule.steps": 3, "schedule.eval_every": 0, "schedule.labelled_batch": 16,
                "schedule.m_per_class": 2, "model.width": 8, "data.max_train_images": 200, "schedule.threads": 1},
        "output_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")}
    config = tmp_path / "grow.yaml"
    config.write_text(yaml.safe_dump(spec))
    first = run_experiment(config, progress=False, fractions=[0.1])
    shutil.rmtree(tmp_path / "runs")  # another machine: only the results travel
    # threads only change how fast a run goes: the earlier row still counts
    config.write_text(yaml.safe_dump({**spec, "set": {**spec["set"], "schedule.threads": 2}}))
    second = run_experiment(config, progress=False, fractions=[0.2])
    assert [(r["label_fraction"], r["accuracy"]) for r in second["rows"]] == [
        (0.1, first["rows"][0]["accuracy"]), (0.2, second["rows"][1]["accuracy"])]
    results = tmp_path / "results"
    saved = json.loads((results / "grow.json").read_text())
    assert [r["label_fraction"] for r in saved["rows"]] == [0.1, 0.2]
    assert all(r["train_seconds"] > 0 and len(r["fingerprint"]) == 12 for r in saved["rows"])
    table = (results / "grow.md").read_text()
    assert "| 10% | cross_entropy |" in table and "| 20% | cross_entropy |" in table
    assert f"medcl experiment {config} --fractions 0.1\n" in table and f"{config} --fractions 0.2\n" in table
    assert set(json.loads((results / "summary.json").read_text())["bloodmnist-demo"]["cross_entropy"]) == {"0.1", "0.2"}
    # settings that shape training change: the 10% row came from other settings and is left out, with a message
    config.write_text(yaml.safe_dump({**spec, "set": {**spec["set"], "schedule.steps": 4}}))
    with pytest.raises(ExperimentError, match="holds a run of other settings.*remove that folder"):
        run_experiment(config, progress=False, fractions=[0.2])  # its 20% run folder is of the old settings
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    third = run_experiment(config, progress=False, fractions=[0.2])
    assert [r["label_fraction"] for r in third["rows"]] == [0.2]
    assert "1 earlier row(s)" in capsys.readouterr().out
    assert "| 10% |" not in (results / "grow.md").read_text()


def test_paired_statistics_are_exact_and_say_when_a_sample_is_small() -> None:
    from training.stats import paired_summary, sign_test

    assert sign_test(3, 0) == pytest.approx(0.25)  # three seeds cannot reach 0.05
    assert sign_test(5, 0) == pytest.approx(0.0625)
    assert sign_test(8, 0) == pytest.approx(2 / 256)
    assert sign_test(2, 1) == pytest.approx(1.0)
    summary = paired_summary([0.05, 0.03, 0.04, 0.06, 0.02])
    assert summary.mean == pytest.approx(0.04) and summary.ahead == 5
    assert 0.02 <= summary.ci_low < summary.mean < summary.ci_high <= 0.06
    mixed = paired_summary([0.05, -0.04, 0.01])
    assert mixed.ci_low < 0 < mixed.ci_high and "2 of 3 ahead" in mixed.describe()
