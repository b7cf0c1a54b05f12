"""`medcl experiment`: a real (tiny) sweep on the carried BloodMNIST subset, its outputs and the summary."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert finetune["training"]["pretrained"].endswith("tiny-sweep-srcl_pft-10pct-s1/model.safetensors")
    # a second call reuses every finished run: nothing is trained again
    stamps = {r["run"]: (Path(r["run"]) / "metrics.json").stat().st_mtime_ns for r in report["rows"]}
    again = run_experiment(config, progress=False)
    assert {r["run"]: (Path(r["run"]) / "metrics.json").stat().st_mtime_ns for r in again["rows"]} == stamps
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
