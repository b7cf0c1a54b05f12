"""Readers on real data, group-safe splits, label-fraction subsampling and the m-per-class sampler."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medcl.card import PreprocessSpec
from tests.conftest import DEMO_NPZ, shared
from training.data import (DataError, MPerClassSampler, RandomBatches, group_split, label_subsample,
                           read_csv_manifest, read_folder, read_npz)


def test_npz_reader_on_the_carried_demo_subset() -> None:
    splits = read_npz(DEMO_NPZ)
    assert splits.train.images.shape[1:] == (28, 28, 3) and splits.train.images.dtype == np.uint8
    assert splits.val is not None and len(splits.test) == 800
    assert splits.train.class_names[3] == "immature_granulocyte"
    assert set(np.unique(splits.train.labels)) == set(range(8))


def test_npz_reader_on_official_bloodmnist() -> None:
    splits = read_npz(shared("bloodmnist", "bloodmnist.npz"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (11959, 1712, 3421)


def test_npz_reader_says_what_is_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="lacks train_images"):
        read_npz(bad)


def test_folder_reader_on_real_tiles_with_unlabelled(tmp_path: Path) -> None:
    src = shared("histology-tiles", "kather2016")
    spec = PreprocessSpec(input_size=32)
    labelled, unlabelled = read_folder(src, spec)
    assert labelled.images.shape[1:] == (32, 32, 3)
    assert len(labelled.class_names) == 8 and len(labelled) == 24
    assert unlabelled is None
    # An unlabelled/ folder is read as unlabelled images, not as a class.
    root = tmp_path / "tree"
    (root / "unlabelled").mkdir(parents=True)
    for cls in labelled.class_names[:2]:
        (root / cls).symlink_to(src / cls)
    for f in list((src / labelled.class_names[2]).iterdir())[:2]:
        (root / "unlabelled" / f.name).symlink_to(f)
    lab, unl = read_folder(root, spec)
    assert lab.class_names == labelled.class_names[:2]
    assert unl is not None and len(unl) == 2 and (unl.labels == -1).all()


def test_csv_manifest_reader_on_real_photos(tmp_path: Path) -> None:
    photos = shared("blood-photos")
    rows = list(csv.DictReader((photos / "manifest.csv").open()))[::100]
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"])
        for i, r in enumerate(rows):
            w.writerow([str(photos / r["file"]), r["class"] if i % 3 else "", f"p{i % 4}"])
    spec = PreprocessSpec(input_size=28, crop="center", crop_pixels=200)
    data = read_csv_manifest(manifest, spec, group_column="patient")
    assert len(data) == len(rows) and (data.labels == -1).sum() == len(range(0, len(rows), 3))
    assert data.groups is not None and set(data.groups) == {"p0", "p1", "p2", "p3"}


def test_csv_manifest_names_missing_columns(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="lacks column"):
        read_csv_manifest(manifest, PreprocessSpec(input_size=28))


def test_group_split_never_splits_a_lesion() -> None:
    rows = list(csv.DictReader(shared("ham10000", "labels.csv").open()))
    names = sorted({r["dx"] for r in rows})
    labels = np.array([names.index(r["dx"]) for r in rows])
    groups = np.array([r["lesion_id"] for r in rows])
    train, test = group_split(labels, groups, 0.2, seed=0)
    assert not set(groups[train]) & set(groups[test])
    assert len(test) / len(labels) == pytest.approx(0.2, abs=0.05)
    # Stratified: every class is on both sides.
    assert set(labels[test]) == set(labels)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_label_subsample_is_seeded_and_stratified(fraction: float) -> None:
    labels = read_npz(DEMO_NPZ).train.labels
    a = label_subsample(labels, fraction, seed=3)
    assert np.array_equal(a, label_subsample(labels, fraction, seed=3))
    assert not np.array_equal(a, label_subsample(labels, fraction, seed=4)) or fraction == 1.0
    for c in range(8):
        want = max(1, round(fraction * (labels == c).sum()))
        assert (labels[a] == c).sum() == want


def test_label_subsample_keeps_groups_whole() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    chosen = label_subsample(labels, 0.5, seed=0, groups=groups)
    for g in set(groups):
        members = set(np.flatnonzero(groups == g))
        assert members <= set(chosen) or not members & set(chosen)


def test_m_per_class_sampler() -> None:
    labels = np.repeat(np.arange(8), [3, 40, 20, 20, 20, 20, 40, 30])
    sampler = MPerClassSampler(labels, batch_size=32, m=4, seed=0)
    for _ in range(10):
        b = sampler.next_batch()
        counts = np.bincount(labels[b], minlength=8)
        assert len(b) == 32 and set(counts[counts > 0]) == {4} and (counts > 0).sum() == 8


@pytest.mark.parametrize("make", [lambda seed: RandomBatches(100, 16, seed),
                                  lambda seed: MPerClassSampler(np.repeat(np.arange(5), 9), 8, 2, seed)])
def test_samplers_resume_exactly_where_they_stopped(make) -> None:
    original = make(1)
    for _ in range(9):  # stop mid-epoch
        original.next_batch()
    state = original.state()
    expected = [original.next_batch() for _ in range(5)]
    resumed = make(123)
    resumed.set_state(state)
    assert all(np.array_equal(a, resumed.next_batch()) for a in expected)


def test_a_fixed_split_seed_keeps_one_test_split_across_run_seeds(tmp_path: Path) -> None:
    """Folder and CSV sources are split by seed; with data.split_seed every run seed sees the same test
    images, so a spread over seeds is training noise, not test resampling."""
    from PIL import Image

    from training.config import DataConfig
    from training.engine import load_splits

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(20):
            Image.new("RGB", (8, 8), (i * 10, 0, 0) if label == "a" else (0, i * 10, 0)).save(tmp_path / label / f"{i}.png")
    spec = PreprocessSpec(input_size=8, crop="none")
    test_of = lambda data, seed: {img.tobytes() for img in load_splits(data, spec, seed).test.images}  # noqa: E731
    moving = DataConfig(name="t", kind="folder", path=str(tmp_path), val_fraction=0.0)
    fixed = moving.model_copy(update={"split_seed": 0})
    assert test_of(fixed, 0) == test_of(fixed, 1) == test_of(fixed, 2)
    assert len({frozenset(test_of(moving, s)) for s in range(3)}) > 1


def test_a_folder_source_with_its_own_test_folder_and_class_names(tmp_path: Path) -> None:
    """PatchCamelyon's layout: train/{0,1} and valid/{0,1}; valid/ is the test split whole, the validation
    share comes out of train/, and the folders 0/1 are named normal/tumor."""
    from PIL import Image

    from training.config import DataConfig
    from training.engine import load_splits

    for part, n in (("train", 20), ("valid", 5)):
        for label in ("0", "1"):
            (tmp_path / part / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(tmp_path / part / label / f"{i}.png")
    spec = PreprocessSpec(input_size=8, crop="none")
    data = DataConfig(name="t", kind="folder", path=str(tmp_path / "train"), test_path=str(tmp_path / "valid"),
                      class_names=["normal", "tumor"], val_fraction=0.2)
    splits = load_splits(data, spec, 0)
    assert len(splits.test) == 10 and all(s.split("/")[-3] == "valid" for s in splits.test.sources)
    assert len(splits.train) + len(splits.val) == 40 and len(splits.val) == 8
    assert splits.train.class_names == splits.test.class_names == ["normal", "tumor"]
    with pytest.raises(DataError, match="3 class_names given for the 2 class folders"):
        load_splits(data.model_copy(update={"class_names": ["a", "b", "c"]}), spec, 0)
    (tmp_path / "valid" / "2").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "valid" / "2" / "x.png")
    with pytest.raises(DataError, match="has classes"):
        load_splits(data.model_copy(update={"class_names": None}), spec, 0)
