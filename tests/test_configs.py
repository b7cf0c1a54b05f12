"""Every config the project ships validates through the loader that reads it, and points at data that
exists where the shared data is present: a renamed field or a moved folder fails here, not in a user's
two-hour run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, SHARED_DATA

CONFIGS = sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "configs").rglob("*.yaml")
                 if not p.name.startswith("."))


def _data_paths(path: Path) -> list[Path]:
    """Validate ``path`` with its own loader; return the data paths it names."""
    from training.config import load_config
    from training.experiment import load_experiment
    from training.nuclei import is_segmenter_config, load_segmenter_config
    from training.retrain import load_retrain_config
    from training.vessels import is_vessel_transfer_config, load_transfer_config

    if path.parent.name == "experiments":
        if is_vessel_transfer_config(path):
            config, base = load_transfer_config(path)
            return [(base / config.data).resolve()]
        config, base = load_experiment(path)
        return _data_paths((base / config.base_config).resolve())
    if path.name.startswith("retrain-"):
        return [Path(load_retrain_config(path).data.path)]
    if is_segmenter_config(path):
        config = load_segmenter_config(path)
        return [Path(config.data.images)]
    return [Path(load_config(path).data.path)]


@pytest.mark.parametrize("relative", CONFIGS, ids=str)
def test_every_shipped_config_validates_and_finds_its_data(relative: Path) -> None:
    paths = _data_paths(REPO_ROOT / relative)
    for data in paths:
        if SHARED_DATA in data.parents and not SHARED_DATA.is_dir():
            continue  # a user's machine without ../shared: the config is still valid
        assert data.exists(), f"{relative} names {data}, which does not exist"


@pytest.mark.parametrize("relative", [c for c in CONFIGS if c.parent.name == "experiments"], ids=str)
def test_every_sweep_writes_results_under_its_own_file_name(relative: Path) -> None:
    # a sweep writes docs/results/NAME.{json,md,png}: a config named otherwise sends the reader of
    # configs/experiments/X.yaml to an older page called X
    from training.config import top_level_value

    assert top_level_value(REPO_ROOT / relative, "name") == relative.stem


def test_npz_images_of_another_size_are_resized_by_the_card(tmp_path: Path) -> None:
    from medcl.card import PreprocessSpec
    from tests.conftest import shared
    from training.config import DataConfig
    from training.engine import load_splits

    data = DataConfig(name="retina", kind="npz", path=str(shared("retinamnist", "retinamnist.npz")))
    splits = load_splits(data, PreprocessSpec(input_size=56, mean=[0.5] * 3, std=[0.25] * 3), seed=0)
    native = load_splits(data, PreprocessSpec(input_size=28, mean=[0.5] * 3, std=[0.25] * 3), seed=0)
    assert splits.train.images.shape[1:] == (56, 56, 3) and len(splits.test) == len(native.test)
    # bilinear upsampling keeps each image's mean colour
    assert abs(float(splits.test.images.mean()) - float(native.test.images.mean())) < 1.0
