"""The medcl command: subcommands work, and bad input gives one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import shared


def medcl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcl.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_help_lists_the_subcommands() -> None:
    out = medcl("--help")
    assert out.returncode == 0
    for sub in ("train", "evaluate", "export", "serve", "demo"):
        assert sub in out.stdout


def test_missing_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = medcl("train", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no config file" in out.stderr


def test_invalid_override_is_one_line(tmp_path: Path) -> None:
    out = medcl("train", "configs/demo-bloodmnist.yaml", "--set", "data.label_fraction=7")
    assert out.returncode == 2 and "label_fraction" in out.stderr and "Traceback" not in out.stderr


def test_serve_without_a_package_says_so(tmp_path: Path) -> None:
    out = medcl("serve", "--package", str(tmp_path / "empty"))
    assert out.returncode == 2 and "no model package" in out.stderr


def test_evaluate_on_full_size_photographs(tiny_run: Path) -> None:
    out = medcl("evaluate", str(tiny_run), "--images", str(shared("blood-photos")), "--alias",
                "ig=immature_granulocyte", "--compact")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["images"] == 1200 and 0.0 <= result["accuracy"] <= 1.0
    assert len(result["confusion_matrix"]) == 8


def test_evaluate_with_unknown_folder_classes_explains(tiny_run: Path) -> None:
    out = medcl("evaluate", str(tiny_run), "--images", str(shared("blood-photos")))
    assert out.returncode == 2 and "--alias" in out.stderr


def test_export_command_prints_parity(tiny_run: Path, tmp_path: Path) -> None:
    out = medcl("export", str(tiny_run), "--out", str(tmp_path / "pkg"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["parity"]["max_abs_diff_logits"] <= 1e-4


def test_demo_serves_existing_packages_without_retraining(tiny_package: Path, segmenter_package: Path,
                                                         tmp_path: Path) -> None:
    import os
    import shutil

    # both demo models in place (the classifier and the nuclei segmenter): nothing may train. With the
    # segmenter missing this test trained it for minutes, and timed out on a loaded machine.
    home = tmp_path / "home"
    shutil.copytree(tiny_package, home / "packages" / "demo-bloodmnist")
    shutil.copytree(segmenter_package, home / "packages" / "demo-nuclei")
    out = medcl("demo", "prepare", env=dict(os.environ, MEDCL_HOME=str(home)))
    assert out.returncode == 0, out.stderr
    assert "demo package ready" in out.stderr and "demo segmenter ready" in out.stderr
    assert "training the demo" not in out.stderr
    assert (home / "index" / "tiny").is_dir()  # the demo index was filled for /search
    assert json.loads(out.stdout)["package"] == str(home / "packages" / "demo-bloodmnist")
